"""SMTP submission end to end: a running Gateway, real clients, a real PostgreSQL."""

import base64
import dataclasses
import json
import re
import smtplib

import psycopg2
import treq
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mailgw import admin, credentials
from mailgw.config import DatabaseConfig
from mailgw.smtp import protocol as smtp_protocol
from mailgw.smtp.auth import SHARED_REFRESH_SECONDS, AuthThrottle
from mailgw.store.auth_failures import AuthFailureStore
from mailgw.store.campaigns import NewCampaign
from mailgw.store.templates import Template
from tests.harness import (
    PASSWORD,
    SENDER,
    SIMPLE,
    USER,
    QueriesDatabase,
    fresh_database,
    gateway_config,
    insecure_tls,
    new_cluster,
    run_sql,
    smtp_client,
    start_gateway,
)

# The DATA of the Teenvio seed's conversation (section 3.2.2), lines 022-069.
SEED_MESSAGE = """\
Message-ID: <5231AC96.9010208@dominio.com>
Date: Thu, 12 Sep 2013 13:59:18 +0200
From: =?ISO-8859-1?Q?=22V=EDctor J=2E Chamorro=22?= <remitente@dominio.com>
X-Teenvio-SocialLinks: yes
User-Agent: Mozilla/5.0 (X11; Linux x86 64; rv:10.0.12) Gecko/20130116 Thunderbird/10
MIME-Version: 1.0
To: usuario@dominio.com
Subject: prueba correo simple
Content-Type: multipart/alternative;
 boundary="-----050004090406000109090608"

This is a multi-part message in MIME format.
-------050004090406000109090608
Content-Type: text/plain; charset=ISO-8859-1; format=flowed
Content-Transfer-Encoding: 8bit

Buenas,

Esto es un email *html* para probar el servidor smtp-api de teenvio

Un saludo,

_V\xedctor J. Chamorro_ - teenvio.com


-------050004090406000109090608
Content-Type: text/html; charset=ISO-8859-1
Content-Transfer-Encoding: 7bit

<html>
<head>
<meta http-equiv="content-type" content="text/html; charset=ISO-8859-1">
</head>
<body bgcolor="#FFFFFF" text="#000000">
Buenas, <br>
<br>
Esto es un email <b>html</b> para probar el servidor smtp-api de teenvio<br>
<br>
Un saludo,<br>
<br>
<u>V&iacute;ctor J. Chamorro</u> - teenvio.com<br>
<br>
</body>
</html>

-------050004090406000109090608--
""".replace("\n", "\r\n").encode("latin-1")

def _text_part(encoding: bytes, body: bytes, subtype: bytes = b"plain") -> bytes:
    return (b"From: remitente@dominio.com\r\nSubject: s\r\nContent-Type: text/%s;"
            b" charset=utf-8\r\nContent-Transfer-Encoding: %s\r\n\r\n%s\r\n"
            % (subtype, encoding, body))


def _with_attachment(disposition: bytes, data: bytes = b"%PDF-") -> bytes:
    """A text part and a PDF attached with the given Content-Disposition parameter."""
    return (b"From: remitente@dominio.com\r\nSubject: file\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n"
            b"Content-Type: text/plain\r\n\r\nsee file\r\n--XX\r\n"
            b"Content-Type: application/pdf\r\nContent-Disposition: attachment; "
            + disposition + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + base64.b64encode(data) + b"\r\n--XX--\r\n")


def _plain(user: str, password: str) -> str:
    """The AUTH PLAIN initial response."""
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def _seed_conversation(port: int) -> list[tuple[int, bytes]]:
    """Seed 000, section 3.2.2, after STARTTLS; every reply (code, text) in order."""
    client = smtp_client(port)
    seen = [client.ehlo("MaquinaPrueba")]
    seen.append(client.starttls(context=insecure_tls()))
    seen.append(client.ehlo("MaquinaPrueba"))
    seen.append(client.docmd("AUTH LOGIN"))
    seen.append(client.docmd(base64.b64encode(USER.encode()).decode()))
    seen.append(client.docmd(base64.b64encode(PASSWORD.encode()).decode()))
    seen.append(client.docmd(f"MAIL FROM: <{SENDER}> SIZE=1307"))
    seen.append(client.docmd("RCPT TO:<usuario@dominio.com>"))
    seen.append(client.docmd("DATA"))
    client.send(SEED_MESSAGE + b".\r\n")
    seen.append(client.getreply())
    seen.append(client.docmd("QUIT"))
    client.close()
    return seen


def _sendmail(port: int, implicit_tls: bool, message: bytes, recipients: list[str],
              sender: str = SENDER, user: str = USER, password: str = PASSWORD):
    client = smtp_client(port, implicit_tls)
    try:
        client.ehlo("client.example")
        if not implicit_tls:
            client.starttls(context=insecure_tls())
            client.ehlo("client.example")
        client.login(user, password)
        client.sendmail(sender, recipients, message)
    finally:
        client.close()


def _dialogue(port: int, *commands: str | bytes) -> list[tuple[int, bytes]]:
    """AUTH over STARTTLS, then each command (bytes: raw DATA text ending with '.')."""
    client = smtp_client(port)
    client.ehlo("c")
    client.starttls(context=insecure_tls())
    client.ehlo("c")
    client.login(USER, PASSWORD)
    replies = []
    for command in commands:
        if isinstance(command, bytes):
            client.send(command)
            replies.append(client.getreply())
        else:
            replies.append(client.docmd(command))
    client.quit()  # answered once the transaction's recipient imports are committed
    return replies


def _open_transaction(port: int, recipient: str) -> smtplib.SMTP:
    """A logged-in client left after its RCPT was accepted, without DATA or QUIT."""
    client = smtp_client(port)
    client.ehlo("c")
    client.starttls(context=insecure_tls())
    client.ehlo("c")
    client.login(USER, PASSWORD)
    client.mail(SENDER)
    code, _ = client.rcpt(recipient)
    assert code == 250, code
    return client


class SubmissionFlowTests(QueriesDatabase, unittest.TestCase):
    async def setUp(self):
        self.dsn = fresh_database()
        self.gateway = await start_gateway(self, gateway_config(self, self.dsn))
        self.database = self.gateway.database
        stores = self.gateway.stores
        self.account = await stores.accounts.create_account("acme")
        await stores.accounts.create_user(self.account.id, USER,
                                          credentials.hash_password(PASSWORD))
        await stores.senders.add_sender(self.account.id, SENDER, verified=True)
        self.port = self.gateway.port_for("smtp.starttls_listeners[1]")

    async def submit(self, message: bytes) -> tuple[int, bytes]:
        """The reply to `message` (DATA text up to its final dot) from SENDER to
        a@example.net."""
        replies = await deferToThread(_dialogue, self.port, f"MAIL FROM:<{SENDER}>",
                                      "RCPT TO:<a@example.net>", "DATA", message)
        return replies[-1]

    async def accepted_body(self, message: bytes) -> dict:
        """The prepared body of `message`, submitted and accepted as the only one."""
        reply = await self.submit(message)
        self.assertEqual(reply[0], 250, reply)
        (row,) = await self.sql("SELECT body FROM messages")
        return json.loads(bytes(row[0]))

    async def set_account(self, **columns):
        for column, value in columns.items():
            await self.sql(f"UPDATE accounts SET {column} = %s WHERE id = %s"
                        " RETURNING id", value, self.account.id)

    async def submit_for_template(self, variables: bytes) -> tuple[int, bytes]:
        """The reply to a message for a stored template, with these variables (JSON)."""
        await self.gateway.stores.templates.put(self.account.id, Template(
            "welcome1", "", "Welcome", "<p>Hola {nombre}</p>", "Hola {nombre}"))
        return await self.submit(
            b"From: remitente@dominio.com\r\nSubject: *|tid:welcome1|* x\r\n"
            b"Content-Type: text/plain\r\n\r\n" + variables + b"\r\n.\r\n")

    async def test_teenvio_seed_conversation(self):
        replies = await deferToThread(_seed_conversation, self.port)
        codes = [code for code, _ in replies]
        self.assertEqual(codes, [250, 220, 250, 334, 334, 235, 250, 250, 354, 250, 221])
        self.assertIn(b"AUTH LOGIN PLAIN", replies[2][1])
        self.assertIn(b"SIZE 512000", replies[2][1])
        self.assertEqual(replies[3][1], b"VXNlcm5hbWU6")
        self.assertEqual(replies[4][1], b"UGFzc3dvcmQ6")
        text = replies[9][1].decode()
        self.assertRegex(text, r"^OK id=\d+ [0-9a-f]{32}$")
        send_id, message_uid = int(text.split()[1][3:]), text.split()[2]
        self.assertEqual(replies[10][1], b"2.0.0 Closing connection.")

        (send,) = await self.sql("SELECT id, origin, subject, content_id, group_id"
                              " FROM sends")
        self.assertEqual(send[:3], (send_id, "smtp", "prueba correo simple"))
        (message,) = await self.sql("SELECT message_uid, sender, options, body"
                                 " FROM messages WHERE send_id = %s", send_id)
        self.assertEqual(message[:2], (message_uid, SENDER))
        self.assertTrue(message[2]["social_links"])
        body = json.loads(bytes(message[3]))
        self.assertIn("<b>html</b>", body["html"])
        self.assertIn("Víctor J. Chamorro", body["text"])
        deliveries = await self.sql("SELECT recipient, state FROM deliveries")
        self.assertEqual(deliveries, [("usuario@dominio.com", "queued")])
        (content,) = await self.sql("SELECT html FROM contents WHERE id = %s",
                                 send[3])
        self.assertIn("<b>html</b>", content[0])
        members = await self.sql("SELECT c.email, g.origin FROM group_members m"
                              " JOIN contacts c ON c.id = m.contact_id"
                              " JOIN groups g ON g.id = m.group_id WHERE g.id = %s", send[4])
        self.assertEqual(members, [("usuario@dominio.com", "smtp")])
        events = await self.sql("SELECT type, send_id FROM events")
        self.assertEqual(events, [("queued", send_id)])

    async def test_every_port_accepts_mail(self):
        ports = [(self.gateway.port_for("smtp.starttls_listeners[0]"), False),
                 (self.gateway.port_for("smtp.starttls_listeners[1]"), False),
                 (self.gateway.port_for("smtp.implicit_tls_listeners[0]"), True)]
        for port, implicit in ports:
            await deferToThread(_sendmail, port, implicit, SIMPLE, ["a@example.net"])
        (count,) = await self.sql("SELECT count(*) FROM messages")
        self.assertEqual(count, (3,))

    async def test_unverified_sender_and_reply_to(self):
        replies = await deferToThread(_dialogue, self.port, "MAIL FROM:<x@elsewhere.org>")
        self.assertEqual(replies, [(553, b"5.7.1 Disallowed source address: x@elsewhere.org")])
        message = b"Reply-To: boss@elsewhere.org\r\n" + SIMPLE + b".\r\n"
        self.assertEqual(await self.submit(message),
                         (553, b"5.7.1 Disallowed source address: boss@elsewhere.org"))

    async def test_verified_domain_allows_any_address_in_it(self):
        await self.gateway.stores.senders.add_domain(self.account.id, "news.example", "s", "rsa",
                                                     "PEM", "PUB", "b.news.example")
        await self.gateway.stores.senders.verify_domain(self.account.id, "news.example")
        replies = await deferToThread(_dialogue, self.port, "MAIL FROM:<any@news.example>")
        self.assertEqual(replies[0][0], 250)

    async def test_recipients_imported_without_data(self):
        await deferToThread(_dialogue, self.port, f"MAIL FROM:<{SENDER}>",
                            "RCPT TO:<kept@example.net>")
        contacts = await self.sql("SELECT email FROM contacts")
        self.assertEqual(contacts, [("kept@example.net",)])
        (groups,) = await self.sql("SELECT count(*) FROM group_members")
        self.assertEqual(groups, (1,))

    async def test_stop_commits_the_recipients_of_an_open_transaction(self):
        """A RCPT's import held for its message is committed when a graceful stop closes
        the session (S-7, O-5)."""
        client = await deferToThread(_open_transaction, self.port, "held@example.net")
        self.addCleanup(client.close)
        stopping = self.gateway.stopService()
        # The client reads the 421 and hangs up, as clients do.
        code, _ = await deferToThread(client.getreply)
        self.assertEqual(code, 421)
        client.close()
        await stopping
        connection = psycopg2.connect(self.dsn)
        self.addCleanup(connection.close)
        with connection.cursor() as cursor:
            cursor.execute("SELECT email FROM contacts")
            self.assertEqual(cursor.fetchall(), [("held@example.net",)])

    async def test_empty_data_imports_and_sends_nothing(self):
        replies = await deferToThread(_dialogue, self.port, f"MAIL FROM:<{SENDER}>",
                                      "RCPT TO:<a@example.net>", "RCPT TO:<b@example.net>",
                                      "DATA", b".\r\n")
        self.assertEqual(replies[-1], (250, b"OK imported 2"))
        self.assertEqual(await self.sql("SELECT count(*) FROM sends"), [(0,)])
        self.assertEqual(await self.sql("SELECT count(*) FROM contacts"), [(2,)])

    async def test_suppressed_recipient_recorded_as_not_sent(self):
        await self.sql("INSERT INTO suppressions (account_id, address, reason)"
                    " VALUES (%s, 'gone@example.net', 'unsubscribed') RETURNING id",
                    self.account.id)
        replies = await deferToThread(_dialogue, self.port, f"MAIL FROM:<{SENDER}>",
                                      "RCPT TO:<gone@example.net>", "RCPT TO:<ok@example.net>",
                                      "DATA", SIMPLE + b".\r\n")
        self.assertEqual(replies[-1][0], 250)
        rows = await self.sql("SELECT recipient, state, last_reply FROM deliveries"
                           " ORDER BY recipient")
        self.assertEqual(rows, [("gone@example.net", "not_sent", "unsubscribed"),
                                ("ok@example.net", "queued", None)])
        events = await self.sql("SELECT recipient, type, details FROM events"
                             " ORDER BY recipient")
        self.assertEqual(events, [("gone@example.net", "not_sent", {"reason": "unsubscribed"}),
                                  ("ok@example.net", "queued", {})])

    async def test_monthly_quota(self):
        await self.set_account(sends_per_month=1)
        replies = await deferToThread(_dialogue, self.port, f"MAIL FROM:<{SENDER}>",
                                      "RCPT TO:<a@example.net>", "RCPT TO:<b@example.net>",
                                      "DATA", SIMPLE + b".\r\n")
        self.assertEqual(replies[-1], (554, b"5.6.0 Transaction failed: no sends left"))
        self.assertEqual(await self.sql("SELECT count(*) FROM sends"), [(0,)])

    async def test_contact_quota(self):
        await self.set_account(max_contacts=1)
        replies = await deferToThread(_dialogue, self.port, f"MAIL FROM:<{SENDER}>",
                                      "RCPT TO:<a@example.net>", "RCPT TO:<b@example.net>",
                                      "RCPT TO:<a@example.net>")
        self.assertEqual([r[0] for r in replies], [250, 250, 554, 250])

    async def test_attachment_policy_reject(self):
        await self.set_account(settings=json.dumps({"attachments": "reject"}))
        message = (b"From: remitente@dominio.com\r\nSubject: file\r\nMIME-Version: 1.0\r\n"
                   b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n"
                   b"Content-Type: text/plain\r\n\r\nsee file\r\n--XX\r\n"
                   b"Content-Type: application/pdf\r\nContent-Disposition: attachment;"
                   b" filename=report.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                   b"JVBERi0=\r\n--XX--\r\n.\r\n")
        self.assertEqual(await self.submit(message),
                         (554, b"5.6.0 Transaction failed: Not allowed attachment type pdf"))

    async def test_attachment_policy_links(self):
        """Teenvio: files become download links, cid: images become hosted images."""
        await self.set_account(settings=json.dumps({"attachments": "links"}))
        message = (b"From: remitente@dominio.com\r\nSubject: files\r\nMIME-Version: 1.0\r\n"
                   b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n"
                   b"Content-Type: multipart/related; boundary=YY\r\n\r\n--YY\r\n"
                   b"Content-Type: text/html\r\n\r\n<html><body><img src=\"cid:logo@x\">"
                   b"</body></html>\r\n--YY\r\nContent-Type: image/png\r\n"
                   b"Content-ID: <logo@x>\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                   b"iVBORw0K\r\n--YY--\r\n--XX\r\n"
                   b"Content-Type: application/pdf\r\nContent-Disposition: attachment;"
                   b" filename=report.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                   b"JVBERi0=\r\n--XX--\r\n.\r\n")
        body = await self.accepted_body(message)
        self.assertEqual(body["attachments"], [])
        tokens = re.findall(r"http://localhost:8080/a/([\w-]+)", body["html"])
        self.assertEqual(len(tokens), 2)  # the hosted image and the download link
        self.assertNotIn("cid:", body["html"])
        self.assertIn("report.pdf", body["text"])
        http = self.gateway.port_for("http.listener")
        downloads = {}
        for token in tokens:
            response = await treq.get(f"http://127.0.0.1:{http}/a/{token}", persistent=False)
            self.assertEqual(response.code, 200)
            downloads[response.headers.getRawHeaders("content-type")[0]] = (
                await response.content(), response.headers.getRawHeaders("content-disposition"))
        self.assertEqual(downloads["application/pdf"],
                         (b"%PDF-", ["attachment; filename*=UTF-8''report.pdf"]))
        self.assertEqual(downloads["image/png"][0], base64.b64decode(b"iVBORw0K"))
        missing = await treq.get(f"http://127.0.0.1:{http}/a/nope", persistent=False)
        self.assertEqual(missing.code, 404)
        await missing.content()

    async def test_attachment_policy_links_hosts_only_referenced_images(self):
        """An inline image is hosted only where the HTML shows it, through src or CSS
        url(); one it does not show becomes a download link like any other file."""
        await self.set_account(settings=json.dumps({"attachments": "links"}))
        message = (b"From: remitente@dominio.com\r\nSubject: images\r\nMIME-Version: 1.0\r\n"
                   b"Content-Type: multipart/related; boundary=YY\r\n\r\n--YY\r\n"
                   b"Content-Type: text/html\r\n\r\n<html><body style=\"background:"
                   b" url(&quot;cid:back@x&quot;)\"><img src=\"cid:logo@x\"></body></html>\r\n"
                   + b"".join(b"--YY\r\nContent-Type: image/png\r\nContent-ID: <%s@x>\r\n"
                              b"Content-Transfer-Encoding: base64\r\n\r\niVBORw0K\r\n" % name
                              for name in (b"logo", b"back", b"unused"))
                   + b"--YY--\r\n.\r\n")
        body = await self.accepted_body(message)
        self.assertEqual(body["attachments"], [])
        self.assertNotIn("cid:", body["html"])
        url = r"http://localhost:8080/a/[\w-]+"
        self.assertRegex(body["html"], rf'<img src="{url}">')
        self.assertRegex(body["html"], rf'style="background: url\(&quot;{url}&quot;\)"')
        (link,) = re.findall(rf'<li><a href="({url})">attachment-3</a></li>', body["html"])
        self.assertIn(f"attachment-3: {link}", body["text"])
        stored = await self.sql("SELECT count(*) FROM attachments")
        self.assertEqual(stored, [(3,)])

    async def test_archive_keeps_the_raw_message(self):
        """S-14: with archiving on, the message as received (DATA without its dot
        transparency and final dot) is kept; without it, nothing of it."""
        data = SIMPLE + b"..a line that starts with a dot\r\n.\r\n"
        for archive in (True, False):
            await self.set_account(settings=json.dumps({"archive": archive}))
            reply = await self.submit(data)
            self.assertEqual(reply[0], 250)
        rows = await self.sql("SELECT s.archive, m.raw, m.size FROM messages m"
                           " JOIN sends s ON s.id = m.send_id ORDER BY m.id")
        received = SIMPLE + b".a line that starts with a dot\r\n"
        self.assertEqual([(archive, raw and bytes(raw), size) for archive, raw, size in rows],
                         [(True, received, len(received)), (False, None, len(received))])

    async def test_custom_headers_stored(self):
        """S-9: other X- headers are kept for the events; control headers are not."""
        message = b"X-Order-Id: 42\r\nX-Teenvio-ShowCab: no\r\n" + SIMPLE + b".\r\n"
        reply = await self.submit(message)
        self.assertEqual(reply[0], 250)
        rows = await self.sql("SELECT custom_headers FROM messages")
        self.assertEqual(rows, [({"X-Order-Id": "42"},)])

    async def test_stored_template_with_variables(self):
        await self.gateway.stores.templates.put(self.account.id, Template(
            "welcome1", "", "Welcome", "<p>Hola {nombre}</p>", "Hola {nombre}"))
        message = (b"From: remitente@dominio.com\r\nSubject: *|tid:welcome1|* Para {nombre}\r\n"
                   b"Content-Type: text/plain\r\n\r\n{\"nombre\": \"Ana <3\"}\r\n.\r\n")
        reply = await self.submit(message)
        self.assertEqual(reply[0], 250)
        (row,) = await self.sql("SELECT subject, body FROM messages")
        self.assertEqual(row[0], "Para Ana <3")
        body = json.loads(bytes(row[1]))
        self.assertEqual(body["html"], "<p>Hola Ana &lt;3</p>")
        self.assertEqual(body["text"], "Hola Ana <3")

    async def test_unknown_template_and_bad_variables(self):
        unknown = (b"Subject: *|tid:nope|* x\r\nContent-Type: text/plain\r\n\r\nnull\r\n.\r\n")
        bad = (b"Subject: *|tid:nope|* x\r\nContent-Type: text/plain\r\n\r\n{oops\r\n.\r\n")
        replies = await deferToThread(_dialogue, self.port, f"MAIL FROM:<{SENDER}>",
                                      "RCPT TO:<a@example.net>", "DATA", unknown,
                                      f"MAIL FROM:<{SENDER}>", "RCPT TO:<a@example.net>",
                                      "DATA", bad)
        self.assertEqual(replies[3], (554, b"5.6.0 Transaction failed: unknown template nope"))
        self.assertEqual(replies[-1][0], 554)
        self.assertIn(b"not a valid JSON object", replies[-1][1])

    async def test_nul_refused_for_good_in_text_and_headers(self):
        """PostgreSQL text and jsonb hold no NUL: one in a header or a text part, raw or
        encoded, is a permanent 554 naming where, never a 451 the client would retry for
        days nor a logged traceback (trial fails a test that logs one), and the session
        goes on."""
        cases = [
            (b"Subject: a\x00b\r\n" + SIMPLE, "the Subject header"),
            (b"X-Order: 4\x002\r\n" + SIMPLE, "the X-Order header"),
            (b"X-Order: =?utf-8?q?4=002?=\r\n" + SIMPLE, "the X-Order header"),
            (SIMPLE.replace(b"From: remitente", b"From: =?utf-8?b?QQBC?= <remitente"
                            ).replace(b".com\r\n", b".com>\r\n", 1), "the From header"),
            (b"Reply-To: remitente\x00@dominio.com\r\n" + SIMPLE, "the Reply-To header"),
            (b"Reply-To: =?utf-8?q?=00?= <remitente@dominio.com>\r\n" + SIMPLE,
             "the Reply-To header"),
            (SIMPLE.replace(b"<p>Hi", b"<p>H\x00i"), "the text/html part"),
            (_text_part(b"8bit", b"raw \x00 byte"), "the text/plain part"),
            (_text_part(b"quoted-printable", b"encoded =00 byte"), "the text/plain part"),
            (_text_part(b"base64", base64.b64encode(b"in\x00base64")), "the text/plain part"),
            (_text_part(b"base64", base64.b64encode(b"<p>in\x00base64</p>"), b"html"),
             "the text/html part"),
            (_with_attachment(b"filename*=utf-8''a%00b.pdf"), "the file name of an attachment"),
            (_with_attachment(b'filename="a\x00b.pdf"'),
             "the Content-Disposition header of a MIME part"),
        ]
        commands = []
        for message, _ in cases:
            commands += [f"MAIL FROM:<{SENDER}>", "RCPT TO:<a@example.net>", "DATA",
                         message + b".\r\n"]
        commands += [f"MAIL FROM:<{SENDER}>", "RCPT TO:<a@example.net>", "DATA",
                     SIMPLE + b".\r\n"]
        replies = await deferToThread(_dialogue, self.port, *commands)
        self.assertEqual(replies[3::4], [
            (554, b"5.6.0 Transaction failed: message contains a NUL character in "
                  + where.encode()) for _, where in cases] + [replies[-1]])
        self.assertEqual(replies[-1][0], 250)
        self.assertEqual(await self.sql("SELECT count(*) FROM messages"), [(1,)])

    async def test_nul_in_template_variable_refused(self):
        self.assertEqual(await self.submit_for_template(b'{"nombre": "A\\u0000B"}'), (
            554, b"5.6.0 Transaction failed: message contains a NUL character in"
                 b" the template variable 'nombre'"))

    async def test_lone_surrogates_never_reach_postgresql(self):
        """UTF-7 and the escape codecs decode "+2AA-" and "\\ud800" to lone surrogates,
        which PostgreSQL cannot store (a 451 again): such a decoding is a wrong charset,
        read as UTF-8 instead; a template variable written \\ud800 is bad JSON input."""
        message = (b"From: remitente@dominio.com\r\nSubject: =?utf-7?q?+2AA-?=\r\n"
                   b"X-Note: =?unicode-escape?q?=5Cud800?=\r\n"
                   b"Content-Type: text/plain; charset=utf-7\r\n\r\nhi +2AA-\r\n.\r\n")
        body = await self.accepted_body(message)
        self.assertEqual((body["subject"], body["text"]), ("+2AA-", "hi +2AA-\n"))
        self.assertEqual(await self.sql("SELECT custom_headers FROM messages"),
                         [({"X-Note": "\\ud800"},)])
        self.assertEqual(await self.submit_for_template(b'{"nombre": "\\ud800"}'), (
            554, b"5.6.0 Transaction failed: template variables are not a valid JSON object:"
                 b" value of 'nombre' is not valid Unicode"))

    async def test_nul_kept_in_binary_attachments(self):
        """Attachment data is binary (bytea, base64 in the body): its NULs are faithful,
        attached or behind a download link."""
        data = b"%PDF\x00\x00\x01\x00"
        message = _with_attachment(b"filename=a.pdf", data) + b".\r\n"
        body = await self.accepted_body(message)
        self.assertEqual(base64.b64decode(body["attachments"][0]["data"]), data)
        await self.set_account(settings=json.dumps({"attachments": "links"}))
        self.assertEqual((await self.submit(message))[0], 250)
        (row,) = await self.sql("SELECT filename, data FROM attachments")
        self.assertEqual((row[0], bytes(row[1])), ("a.pdf", data))

    async def campaign(self):
        """An api campaign of the account (H-2) and its key."""
        return await admin.create_campaign(self.gateway.stores, self.gateway.campaign_sealer,
                                           self.account.id, NewCampaign("api", "c"))

    async def test_campaign_credential(self):
        """dmdsid-<numid> with the campaign's key, or with another campaign key of that
        campaign; not with another campaign's key, nor with the account's."""
        campaign, key = await self.campaign()
        other, other_key = await self.campaign()
        _, second_key = await admin.create_api_key(self.gateway.stores, self.account.id, "k2",
                                                   "campaign", campaign.numid)
        _, account_key = await admin.create_api_key(self.gateway.stores, self.account.id, "a")
        port = self.gateway.port_for("smtp.implicit_tls_listeners[0]")
        for password in (key, second_key):
            await deferToThread(_sendmail, port, True, SIMPLE, ["a@example.net"],
                                user=f"dmdsid-{campaign.numid}", password=password)
        self.assertEqual(await self.sql("SELECT count(*) FROM messages"), [(2,)])
        for password in ("wrong", other_key, account_key):
            with self.assertRaises(smtplib.SMTPAuthenticationError):
                await deferToThread(_sendmail, port, True, SIMPLE, ["a@example.net"],
                                    user=f"dmdsid-{campaign.numid}", password=password)

    async def test_campaign_ids_are_ascii_digits(self):
        """A Unicode digit is no campaign id: "²" (which int() refuses) and the campaign's
        id in Arabic-Indic digits (which int() reads as the id) are wrong credentials,
        counted by the throttle like any other."""
        campaign, key = await self.campaign()
        arabic_indic = str(campaign.numid).translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))
        users = ["dmdsid-\u00b2", f"dmdsid-{arabic_indic}"]
        port = self.gateway.port_for("smtp.implicit_tls_listeners[0]")

        def attempts():
            client = smtp_client(port, implicit_tls=True)
            client.ehlo("c")
            replies = [client.docmd("AUTH PLAIN", _plain(user, key)) for user in users]
            client.close()
            return replies

        replies = await deferToThread(attempts)
        self.assertEqual(replies, [(535, b"5.7.8 Authentication credentials invalid")] * 2)
        throttle = self.gateway.smtp_factory.throttle
        self.assertEqual([throttle.user_failures(user) for user in users], [1, 1])

    async def test_failures_are_counted_with_the_other_nodes(self):
        """Issue 12 point 9: a failure on this gateway counts on another node (a throttle
        of its own on the same database)."""
        clock = task.Clock()
        clock.advance(reactor.seconds())
        other_node = AuthThrottle(clock, max_ip_failures=1,
                                  shared=AuthFailureStore(self.gateway.database))
        await other_node.refresh()
        self.assertFalse(other_node.ip_blocked("127.0.0.1"))
        port = self.gateway.port_for("smtp.implicit_tls_listeners[0]")

        def attempt():
            client = smtp_client(port, implicit_tls=True)
            client.ehlo("c")
            reply = client.docmd("AUTH PLAIN", _plain(USER, "wrong"))
            client.close()
            return reply

        self.assertEqual((await deferToThread(attempt))[0], 535)
        clock.advance(SHARED_REFRESH_SECONDS)
        await other_node.refresh()
        self.assertTrue(other_node.ip_blocked("127.0.0.1"))

    async def test_auth_offered_to_other_networks_only_over_tls(self):
        """S-2: from a client not on loopback, AUTH is offered over implicit TLS (and no
        STARTTLS there), and refused with 538 over plain TCP."""
        self.patch(smtp_protocol, "_is_loopback", lambda address: False)
        tls_port = self.gateway.port_for("smtp.implicit_tls_listeners[0]")

        def conversations():
            replies = []
            for port, implicit_tls in ((tls_port, True), (self.port, False)):
                client = smtp_client(port, implicit_tls)
                replies += [client.ehlo("c"), client.docmd("AUTH LOGIN")]
                client.close()
            return replies

        tls_ehlo, tls_auth, plain_ehlo, plain_auth = await deferToThread(conversations)
        self.assertIn(b"\nAUTH LOGIN PLAIN\n", tls_ehlo[1])
        self.assertNotIn(b"STARTTLS", tls_ehlo[1])
        self.assertEqual(tls_auth, (334, b"VXNlcm5hbWU6"))
        self.assertIn(b"\nSTARTTLS\n", plain_ehlo[1])
        self.assertNotIn(b"AUTH", plain_ehlo[1])
        self.assertEqual(plain_auth, (538, b"5.7.11 Encryption required for requested"
                                           b" authentication mechanism"))


class DatabaseTroubleTests(unittest.TestCase):
    """A gateway on a cluster of its own, which the tests stop under it."""

    async def setUp(self):
        self.cluster = new_cluster("mailgw-test-smtp-outage-")
        config = gateway_config(self, self.cluster.dsn).replace(
            database=DatabaseConfig(dsn=self.cluster.dsn, pool_size=2))
        self.gateway = await start_gateway(self, config)
        # Cleanups run last first: PostgreSQL is back before the gateway stops.
        self.addCleanup(self.cluster.start)
        account = await self.gateway.stores.accounts.create_account("acme")
        await self.gateway.stores.accounts.create_user(account.id, USER,
                                                       credentials.hash_password(PASSWORD))
        await self.gateway.stores.senders.add_sender(account.id, SENDER, verified=True)
        self.port = self.gateway.port_for("smtp.starttls_listeners[0]")

    def _tls_client(self) -> smtplib.SMTP:
        client = smtp_client(self.port)
        client.ehlo("c")
        client.starttls(context=insecure_tls())
        client.ehlo("c")
        return client

    async def test_451_never_250_when_postgresql_goes_away(self):
        def conversation():
            client = self._tls_client()
            client.login(USER, PASSWORD)
            replies = [client.docmd(f"MAIL FROM:<{SENDER}>"),
                       client.docmd("RCPT TO:<a@example.net>"), client.docmd("DATA")]
            self.cluster.stop()  # PostgreSQL goes away before the end of DATA
            client.send(SIMPLE + b".\r\n")
            replies.append(client.getreply())
            replies.append(client.docmd(f"MAIL FROM:<{SENDER}>"))  # a cached sender
            replies.append(client.docmd("RCPT TO:<a@example.net>"))
            client.close()
            return replies

        replies = await deferToThread(conversation)
        self.assertEqual([r[0] for r in replies], [250, 250, 354, 451, 250, 451])
        self.assertEqual(replies[3][1], b"4.3.0 Temporary failure, try again later")

    async def test_451_not_535_when_postgresql_is_gone_at_auth(self):
        """Credentials that cannot be checked are not wrong: 451, and no failure
        counted against the user."""
        def conversation():
            client = self._tls_client()
            self.cluster.stop()
            reply = client.docmd("AUTH PLAIN", _plain(USER, PASSWORD))
            client.close()
            return reply

        reply = await deferToThread(conversation)
        self.assertEqual(reply, (451, b"4.3.0 Temporary failure, try again later"))
        self.assertEqual(self.gateway.smtp_factory.throttle.user_failures(USER), 0)


class TrustedNetworkTests(unittest.TestCase):
    async def test_trusted_client_submits_without_auth(self):
        dsn = fresh_database()
        config = gateway_config(self, dsn)
        config = config.replace(smtp=dataclasses.replace(
            config.smtp, trusted_networks=["127.0.0.0/8"], trusted_account="acme"))
        setup = await start_gateway(self, gateway_config(self, dsn))
        account = await setup.stores.accounts.create_account("acme")
        await setup.stores.senders.add_sender(account.id, SENDER, verified=True)
        await setup.stopService()
        gateway = await start_gateway(self, config)

        def send():
            client = smtp_client(gateway.port_for("smtp.starttls_listeners[0]"))
            try:
                client.sendmail(SENDER, ["a@example.net"], SIMPLE)
            finally:
                client.close()

        await deferToThread(send)
        rows = await run_sql(gateway.database, "SELECT s.account_id, m.sender FROM messages m"
                           " JOIN sends s ON s.id = m.send_id")
        self.assertEqual(rows, [(account.id, SENDER)])
