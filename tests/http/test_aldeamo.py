"""`POST /v1/email` (H-1) on a running Gateway: keys, the seed's answers and every error
name, templates, attachments, header injection and bad input (R-3, R-5)."""

import base64
import email
import email.policy
import io
import json
import os
import socket
import uuid

import treq
from twisted.internet import reactor, utils
from twisted.trial import unittest
from twisted.web import resource, server, static

from mailgw import admin
from mailgw.cli import build_parser, run_command
from mailgw.config import DeliveryConfig, HTTPConfig
from mailgw.store.templates import Template
from tests.dns_server import LocalDNS
from tests.harness import (
    LOOPBACK_PORT,
    QueriesDatabase,
    fresh_database,
    gateway_config,
    start_gateway,
    start_with_account,
)
from tests.smtp_sink import SMTPSink

SENDER = "news@dominio.com"
HTML = '<h1>Hola</h1><p>Ver <a href="https://shop.example.com/x">la oferta</a></p>'


def request_body(**changes):
    """The seed's example, with changes (None removes a field)."""
    body = {"to": [{"email": "recipient@example.com"}],
            "options": {"cc": [{"email": "cc@example.com"}],
                        "bcc": [{"email": "bcc@example.com"}]},
            "from": {"email": SENDER, "name": "John Doe"},
            "replyTo": {"email": SENDER, "name": "John Doe"},
            "subject": "Hello World", "body": HTML}
    for name, value in changes.items():
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    return body


class AldeamoTestCase(QueriesDatabase, unittest.TestCase):
    http_config = HTTPConfig(listener=LOOPBACK_PORT)
    delivery: DeliveryConfig | None = None  # None: no delivery

    async def setUp(self):
        self.dsn = fresh_database()
        config = gateway_config(self, self.dsn, http=self.http_config)
        if self.delivery is not None:
            config = config.replace(delivery=self.delivery)
        await start_with_account(self, config)

    async def post(self, body, key=None, raw=None, authorization=None):
        headers = {"Content-Type": ["application/json"]}
        if authorization is None:
            authorization = f"Bearer {key or self.key}"
        if authorization:
            headers["Authorization"] = [authorization]
        data = raw if raw is not None else json.dumps(body).encode()
        response = await treq.post(self.base + "/v1/email", data=data, headers=headers,
                                   persistent=False)
        return response.code, json.loads(await response.content())

    async def error(self, body, **kwargs):
        code, answer = await self.post(body, **kwargs)
        return code, answer["error"]


class SendTests(AldeamoTestCase):
    async def test_the_seeds_request_sent_through_the_submission_path(self):
        code, answer = await self.post(request_body())
        self.assertEqual(code, 200)
        self.assertEqual(answer["message"], "Messages sent!")
        self.assertEqual([r["email"] for r in answer["to"]],
                         ["recipient@example.com", "cc@example.com", "bcc@example.com"])
        rows = await self.sql(
            "SELECT d.recipient, d.kind, d.state, d.msgid::text, g.origin, s.origin"
            " FROM deliveries d JOIN messages m ON m.id = d.message_id"
            " JOIN sends s ON s.id = m.send_id JOIN groups g ON g.id = s.group_id"
            " JOIN group_members gm ON gm.group_id = g.id AND gm.contact_id = d.contact_id"
            " ORDER BY d.id")
        self.assertEqual(rows, [
            ("recipient@example.com", "to", "queued", answer["to"][0]["msgid"], "api", "api"),
            ("cc@example.com", "cc", "queued", answer["to"][1]["msgid"], "api", "api"),
            ("bcc@example.com", "bcc", "queued", answer["to"][2]["msgid"], "api", "api")])
        for recipient in answer["to"]:
            self.assertEqual(uuid.UUID(recipient["msgid"]).version, 4)
        [(body, reply_to)] = await self.sql("SELECT convert_from(body, 'UTF8')::jsonb, reply_to"
                                            " FROM messages")
        # The text part generated from the HTML, as over SMTP; the copies in a Cc header.
        self.assertEqual(body["text"], "# Hola\n\nVer [la oferta](https://shop.example.com/x)\n")
        self.assertEqual((body["subject"], body["from_name"], reply_to),
                         ("Hello World", "John Doe", SENDER))
        self.assertEqual(body["headers"], [["Cc", "cc@example.com"]])

    async def test_bearer_and_bare_keys(self):
        for authorization in (f"Bearer {self.key}", self.key):
            code, _ = await self.post(request_body(), authorization=authorization)
            self.assertEqual(code, 200)

    async def test_suppressed_and_invalid_recipients_are_not_sent(self):
        await self.stores.suppressions.add(self.account.id, "cc@example.com")
        code, answer = await self.post(request_body())
        self.assertEqual(code, 200)
        self.assertEqual(len(answer["to"]), 3)
        self.assertEqual(await self.sql("SELECT recipient, state, last_reply FROM deliveries"
                                        " WHERE state = 'not_sent'"),
                         [("cc@example.com", "not_sent", "manual")])

    async def test_unknown_fields_ignored_and_duplicates_sent_once(self):
        body = request_body(extra={"x": 1}, to=[{"email": "A@example.com", "id": 7},
                                                {"email": "a@example.com"}])
        body["options"]["cc"].append({"email": "a@example.com", "name": "Ana"})
        code, answer = await self.post(body)
        self.assertEqual(code, 200)
        self.assertEqual([r["email"] for r in answer["to"]],
                         ["a@example.com", "cc@example.com", "bcc@example.com"])

    async def test_a_template_with_variables(self):
        await self.stores.templates.put(self.account.id, Template(
            "42eqy7oaigql", "t", "Hola {nombre}", "<p>Precio {precio} para {nombre}</p>", None))
        code, _ = await self.post(request_body(body=None, subject=None,
                                               template_id="42eqy7oaigql",
                                               variables={"nombre": "Ana", "precio": 1.5}))
        self.assertEqual(code, 200)
        [(body,)] = await self.sql("SELECT convert_from(body, 'UTF8')::jsonb FROM messages")
        self.assertEqual((body["subject"], body["html"]),
                         ("Hola Ana", "<p>Precio 1.5 para Ana</p>"))

    async def test_attachments_from_data_uris(self):
        pdf = b"%PDF-1.4 tiny"
        code, _ = await self.post(request_body(attachments=[
            {"filename": "pdf1.pdf",
             "path": "data:application/pdf;base64," + base64.b64encode(pdf).decode()},
            {"path": "data:image/png;base64," + base64.b64encode(b"\x89PNG").decode()}]))
        self.assertEqual(code, 200)
        [(body,)] = await self.sql("SELECT convert_from(body, 'UTF8')::jsonb FROM messages")
        named, unnamed = body["attachments"]
        self.assertEqual((named["filename"], named["content_type"],
                          base64.b64decode(named["data"])), ("pdf1.pdf", "application/pdf", pdf))
        self.assertRegex(unnamed["filename"], r"^attachment-[0-9a-f]{8}\.png$")


class AttachmentURLTests(AldeamoTestCase):
    async def setUp(self):
        files = resource.Resource()
        files.putChild(b"HEAD02.gif", static.Data(b"GIF89a", "image/gif"))
        port = reactor.listenTCP(0, server.Site(files), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.dns = LocalDNS({"cms.example": {"A": ["127.0.0.1"]}})
        _, dns_port = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.url = f"http://cms.example:{port.getHost().port}/HEAD02.gif"
        self.dns_port = dns_port
        await super().setUp()

    async def start(self, allow):
        config = gateway_config(self, self.dsn,
                                http=HTTPConfig(listener=LOOPBACK_PORT,
                                                fetch_allow_networks=allow))
        config = config.replace(delivery=config.delivery.__class__(
            enabled=False, dns_servers=[f"127.0.0.1:{self.dns_port}"]))
        gateway = await start_gateway(self, config)
        self.base = f"http://127.0.0.1:{gateway.port_for('http.listener')}"

    async def test_fetched_with_the_configured_dns_when_the_network_is_allowed(self):
        await self.start(["127.0.0.0/8"])
        code, _ = await self.post(request_body(attachments=[{"path": self.url}]))
        self.assertEqual(code, 200)
        [(body,)] = await self.sql("SELECT convert_from(body, 'UTF8')::jsonb FROM messages")
        [attachment] = body["attachments"]
        self.assertEqual((attachment["filename"], attachment["content_type"]),
                         ("HEAD02.gif", "image/gif"))

    async def test_a_loopback_address_is_refused(self):
        await self.start([])
        code, answer = await self.post(request_body(attachments=[{"path": self.url}]))
        self.assertEqual((code, answer["error"]), (400, "Attachment_not_fetched"))
        self.assertIn("attachments[0].path: cms.example is at 127.0.0.1", answer["message"])
        self.assertEqual(await self.sql("SELECT count(*) FROM messages"), [(0,)])


class ErrorNameTests(AldeamoTestCase):
    # The tests change keys and accounts in the database directly.
    http_config = HTTPConfig(listener=LOOPBACK_PORT, key_cache_seconds=0)

    async def test_key_errors_are_403(self):
        self.assertEqual(await self.error(request_body(), authorization=""),
                         (403, "Invalid_API_Key"))
        self.assertEqual(await self.error(request_body(), key="mgw_wrong"),
                         (403, "Invalid_API_Key"))
        await self.sql("INSERT INTO campaigns (account_id, type, numid) VALUES (%s, 'api', 77)",
                       self.account.id)
        _, campaign_key = await admin.create_api_key(self.stores, self.account.id, "c",
                                                     "campaign", 77)
        self.assertEqual(await self.error(request_body(), key=campaign_key),
                         (403, "API_key_not_authorized"))
        await self.sql("UPDATE api_keys SET can_send = false WHERE name = 'k'")
        self.assertEqual(await self.error(request_body()), (403, "API_key_not_authorized"))
        await self.stores.accounts.update_account("acme", {}, {"active": False})
        self.assertEqual(await self.error(request_body()),
                         (403, "Current_service_is_not_active"))

    async def test_every_seed_error_name_for_its_situation(self):
        await self.stores.templates.put(self.account.id, Template("t1", "", "s", "<p>x</p>",
                                                                  None))
        cases = [
            (request_body(template_id="nope", body=None), "Could_not_find_template"),
            (request_body(template_id=["t1"], body=None), "Error_Fetching_Template"),
            (request_body(template_id="", body=None), "Error_Fetching_Template"),
            (request_body(template_id="t1", variables={"a b": "x"}), "Incorrect_variable_syntax"),
            (request_body(template_id="t1", variables=["x"]), "Incorrect_variable_syntax"),
            (request_body(template_id="t1", variables={"a": {"b": 1}}),
             "Incorrect_variable_syntax"),
            (request_body(**{"from": {"email": "x@gmail.com"}}), "Domain_not_permitted_err_1"),
            (request_body(replyTo={"email": "x@gmail.com", "name": "X"}),
             "Domain_not_permitted_err_1"),
            (request_body(**{"from": None}), "Invalid_request_missing_parameters_err_1"),
            (request_body(**{"from": {"name": "x"}}), "Invalid_request_missing_parameters_err_1"),
            (request_body(options=[]), "Invalid_request_missing_parameters_err_2"),
            (request_body(attachments={}), "Invalid_request_missing_parameters_err_2"),
            ([1, 2], "Invalid_request_missing_parameters_err_2"),
            (request_body(replyTo="a@dominio.com"), "Missing_replyTo"),
            (request_body(replyTo={"name": "x"}), "Missing_replyTo_email"),
            (request_body(replyTo={"email": "not an address", "name": "x"}),
             "Missing_replyTo_email"),
            (request_body(replyTo={"email": SENDER}), "Missing_replyTo_name"),
            (request_body(subject=None), "Subject_missing_or_empty"),
            (request_body(subject="  "), "Subject_missing_or_empty"),
            (request_body(subject=7), "Subject_missing_or_empty"),
            (request_body(body=None), "Body_missing_or_empty"),
            (request_body(body=""), "Body_missing_or_empty"),
            (request_body(to=None), "Recipient_missing_or_empty"),
            (request_body(to=[]), "Recipient_missing_or_empty"),
            (request_body(to={"email": "a@example.com"}), "Recipient_missing_or_empty"),
            (request_body(to=[{"email": "a@example.com"}, {}]), "A_Recipient_address_is_empty"),
            (request_body(to=[{"email": ""}]), "A_Recipient_address_is_empty"),
            (request_body(to=["a@example.com"]), "A_Recipient_address_is_empty"),
            (request_body(options={"cc": [{"email": "nope"}]}), "A_Recipient_address_is_empty"),
        ]
        for body, name in cases:
            self.assertEqual(await self.error(body), (400, name), body)
        await self.stores.accounts.update_account("acme", {}, {"sends_per_month": 2})
        self.assertEqual(await self.error(request_body()), (400, "No_Messages_left"))
        self.assertEqual(await self.sql("SELECT count(*) FROM messages"), [(0,)])


class BadInputTests(AldeamoTestCase):
    async def test_header_injection_names_the_field(self):
        bcc = "x\r\nBcc: victim@example.org"
        for body, field in (
                (request_body(subject="Hi" + bcc), "subject"),
                (request_body(**{"from": {"email": SENDER, "name": "J" + bcc}}), "from.name"),
                (request_body(**{"from": {"email": SENDER + "\n"}}), "from.email"),
                (request_body(replyTo={"email": SENDER, "name": "a\x00"}), "replyTo.name"),
                (request_body(to=[{"email": "a@example.com", "name": "A\nB"}]), "to[0].name"),
                (request_body(options={"cc": [{"email": "a@example.com\r"}]}),
                 "options.cc[0].email"),
                (request_body(attachments=[{"filename": "a\r\n.pdf",
                                            "path": "data:text/plain;base64,eA=="}]),
                 "attachments[0].filename")):
            code, answer = await self.post(body)
            self.assertEqual((code, answer["error"], answer["field"]),
                             (400, "Header_injection", field))
            self.assertEqual(answer["message"],
                             f"{field} must not contain CR, LF or NUL characters")
        self.assertEqual(await self.sql("SELECT count(*) FROM messages"), [(0,)])

    async def test_invalid_json_and_text(self):
        for raw in (b"{", b"", b"\xff\xfe", b'{"subject": "\\ud800"}', b"[" * 100000):
            code, answer = await self.post(None, raw=raw)
            self.assertEqual((code, answer["error"]), (400, "Invalid_JSON"), raw[:20])
        code, answer = await self.post(request_body(body="<p>\x00</p>"))
        self.assertEqual((code, answer["error"]), (400, "Content_not_accepted"))

    async def test_wrong_types(self):
        for body in (request_body(**{"from": {"email": SENDER, "name": 5}}),
                     request_body(to=[{"email": "a@example.com", "name": []}]),
                     request_body(options={"bcc": "a@example.com"})):
            code, answer = await self.post(body)
            self.assertEqual((code, answer["error"]),
                             (400, "Invalid_request_missing_parameters_err_2"))

    async def test_unknown_routes_and_methods_answer_json(self):
        response = await treq.get(self.base + "/v1/email", persistent=False)
        self.assertEqual((response.code, (await response.json())["error"]),
                         (405, "Method_not_allowed"))
        response = await treq.post(self.base + "/v1/email/x", persistent=False)
        self.assertEqual((response.code, (await response.json())["error"]), (404, "Not_found"))


class RateLimitTests(AldeamoTestCase):
    http_config = HTTPConfig(listener=LOOPBACK_PORT, requests_per_second_per_key=0.001,
                             request_burst_per_key=2)

    async def test_past_the_burst_429_per_key(self):
        for _ in range(2):
            self.assertEqual((await self.post(request_body()))[0], 200)
        code, answer = await self.post(request_body())
        self.assertEqual((code, answer["error"]), (429, "Too_many_requests"))
        _, other = await admin.create_api_key(self.stores, self.account.id, "other")
        self.assertEqual((await self.post(request_body(), key=other))[0], 200)


class DeliveredTests(AldeamoTestCase):
    """A message sent over HTTP is delivered like one sent over SMTP."""

    async def setUp(self):
        self.sink = SMTPSink()
        sink_port = self.sink.start()
        self.addCleanup(self.sink.stop)
        self.dns = LocalDNS({"example.com": {"MX": [(10, "mx.example.com")]},
                             "mx.example.com": {"A": ["127.0.0.1"]}})
        _, dns_port = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.delivery = DeliveryConfig(dns_servers=[f"127.0.0.1:{dns_port}"],
                                       remote_smtp_port=sink_port, poll_interval=0.05,
                                       connect_timeout=5, reply_timeout=10)
        await super().setUp()

    async def test_each_recipient_gets_it_with_copies_text_and_tracking(self):
        code, _ = await self.post(request_body(attachments=[
            {"filename": "nota.txt", "path": "data:text/plain;base64,aG9sYQ=="}]))
        self.assertEqual(code, 200)
        received = sorted(await self.sink.wait_for(3), key=lambda r: r.recipient)
        self.assertEqual([r.recipient for r in received],
                         ["bcc@example.com", "cc@example.com", "recipient@example.com"])
        message = email.message_from_bytes(received[2].data, policy=email.policy.default)
        self.assertEqual((message["To"], message["Cc"], message["Subject"]),
                         ("recipient@example.com", "cc@example.com", "Hello World"))
        self.assertEqual(message["From"], f"John Doe <{SENDER}>")
        self.assertIsNone(message["Bcc"])
        self.assertIn("la oferta", message.get_body(("plain",)).get_content())
        self.assertIn("/t/c/", message.get_body(("html",)).get_content())
        [attachment] = message.iter_attachments()
        self.assertEqual((attachment.get_filename(), attachment.get_content()),
                         ("nota.txt", "hola"))


class DemoTests(unittest.TestCase):
    async def test_the_curl_line_of_mailgw_init_demo_sends(self):
        """The README's promise: the printed curl line works as it is."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        config = gateway_config(self, fresh_database(), http=HTTPConfig(
            listener=f"tcp:{port}:interface=127.0.0.1"))
        out = io.StringIO()
        await run_command(build_parser().parse_args(["init", "--demo"]), config, reactor, out)
        printed = out.getvalue()
        curl = printed[printed.index("  curl "):printed.index("/v1/email") + len("/v1/email")]
        await start_gateway(self, config)
        output, errors, status = await utils.getProcessOutputAndValue(
            "/bin/sh", ["-c", curl + " --silent --show-error"], env=dict(os.environ))
        self.assertEqual(status, 0, errors)
        answer = json.loads(output)
        self.assertEqual(answer["message"], "Messages sent!")
        self.assertEqual([r["email"] for r in answer["to"]], ["someone@example.net"])
