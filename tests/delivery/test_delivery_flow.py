"""Delivery end to end: SMTP in, MX through a local DNS server, a local receiver out."""

import dataclasses
import email
import email.policy
import uuid

import dkim
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mailgw import credentials
from mailgw.config import DeliveryConfig
from mailgw.content.dkim import generate_dkim_key
from mailgw.store.submissions import QueuedRecipient, SubmissionRecord
from tests.dns_server import LocalDNS
from tests.harness import (
    PASSWORD,
    USER,
    QueriesDatabase,
    fresh_database,
    gateway_config,
    insecure_tls,
    run_sql,
    smtp_client,
    start_gateway,
)
from tests.smtp_sink import SMTPSink, tls_sink

SENDER = "news@example.org"
HTML_MESSAGE = (
    b"From: News <news@example.org>\r\nTo: someone\r\nSubject: Hello {nombre}\r\n"
    b"Reply-To: help@example.org\r\n"
    b"X-Campaign: spring\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n\r\n"
    b"<html><body><p>Hi, see <a href=\"https://shop.example.com/sale?x=1\">the sale</a>."
    b" <a href=\"[Unsubscribe]\">unsubscribe</a></p></body></html>\r\n")


def _send(port: int, recipients: list[str], sender: str = SENDER,
          message: bytes = HTML_MESSAGE) -> None:
    client = smtp_client(port)
    try:
        client.ehlo("app")
        client.starttls(context=insecure_tls())
        client.ehlo("app")
        client.login(USER, PASSWORD)
        client.sendmail(sender, recipients, message)
    finally:
        client.close()


def _zone(sink_port: int) -> dict:
    return {
        "example.net": {"MX": [(10, "mx1.example.net"), (20, "mx2.example.net")]},
        "mx1.example.net": {"A": ["127.0.0.1"]},
        "mx2.example.net": {"A": ["127.0.0.1"]},
        "nullmx.example": {"MX": [(0, ".")]},
    }


def local_delivery(test: unittest.TestCase) -> tuple[SMTPSink, LocalDNS, DeliveryConfig]:
    """A local receiver and DNS server (_zone), stopped when `test` ends, and the
    delivery config that reaches them."""
    sink = SMTPSink()
    sink_port = sink.start()
    test.addCleanup(sink.stop)
    dns = LocalDNS(_zone(sink_port))
    _, dns_port = dns.start(reactor)
    test.addCleanup(dns.stop)
    return sink, dns, DeliveryConfig(dns_servers=[f"127.0.0.1:{dns_port}"],
                                     remote_smtp_port=sink_port, poll_interval=0.05,
                                     connect_timeout=5, reply_timeout=10)


async def sending_account(stores):
    """The account acme, its SMTP user, and example.org verified with a DKIM key (the
    key returned) and bounces.example.org as return-path domain."""
    account = await stores.accounts.create_account("acme")
    await stores.accounts.create_user(account.id, USER, credentials.hash_password(PASSWORD))
    key = generate_dkim_key("rsa")
    await stores.senders.add_domain(account.id, "example.org", "mg1", "rsa",
                                    key.private_key_pem, key.public_key, "bounces.example.org")
    await stores.senders.verify_domain(account.id, "example.org")
    return account, key


class DeliveryFlowTests(QueriesDatabase, unittest.TestCase):
    async def setUp(self):
        self.sink, self.dns, self.delivery = local_delivery(self)
        self.dsn = fresh_database()
        self.gateway = await start_gateway(self, gateway_config(self, self.dsn,
                                                                delivery=self.delivery))
        self.database = self.gateway.database
        self.account, self.key = await sending_account(self.gateway.stores)

    async def test_message_arrives_signed_with_tracking_and_unsubscribe(self):
        port = self.gateway.port_for("smtp.starttls_listeners[0]")
        await deferToThread(_send, port, ["ana@example.net"])
        (received,) = await self.sink.wait_for(1)
        # The message is arriving (the sink runs on this reactor): its connection is open.
        self.assertEqual(self.gateway.metrics.registry.get_sample_value(
            "mailgw_outbound_connections_open"), 1)
        self.assertEqual(received.recipient, "ana@example.net")
        self.assertRegex(received.sender, r"^b-\d+-[a-z0-9]+@bounces\.example\.org$")

        public = f"v=DKIM1; k=rsa; p={self.key.public_key}".encode()
        self.assertTrue(dkim.verify(received.data, dnsfunc=lambda name, timeout=5: public))

        message = email.message_from_bytes(received.data, policy=email.policy.default)
        self.assertEqual(message["To"], "ana@example.net")
        self.assertEqual(message["X-Campaign"], "spring")
        self.assertEqual(message["Reply-To"], "help@example.org")
        self.assertIn("<mailto:", message["List-Unsubscribe"])
        self.assertIn("/t/u/", message["List-Unsubscribe"])
        self.assertEqual(message["List-Unsubscribe-Post"], "List-Unsubscribe=One-Click")
        html = message.get_body(("html",)).get_content()
        self.assertIn("http://localhost:8080/t/c/", html)
        self.assertNotIn("https://shop.example.com/sale", html)
        self.assertIn("http://localhost:8080/t/o/", html)
        self.assertNotIn("[Unsubscribe]", html)
        self.assertIsNotNone(message.get_body(("plain",)))

        await _settled(self.gateway, 1)
        rows = await self.sql("SELECT state, attempts FROM deliveries")
        self.assertEqual(rows, [("sent", 1)])
        events = await self.sql("SELECT type FROM events ORDER BY id")
        self.assertEqual(events, [("queued",), ("sent",)])
        # O-5, as the Gateway wires it.
        self.assertEqual(self.gateway.metrics.registry.get_sample_value(
            "mailgw_delivery_attempts_total", {"outcome": "sent"}), 1)

    async def test_local_part_keeps_its_case_and_the_contact_is_one(self):
        """RFC 5321 2.4: the receiving server may tell the local part's case apart, so it
        is delivered, and shown in To, as the client wrote it; only the domain is
        lowered. Contacts match whatever the case."""
        port = self.gateway.port_for("smtp.starttls_listeners[0]")
        await deferToThread(_send, port, ["Ana.Perez@Example.NET"])
        (received,) = await self.sink.wait_for(1)
        self.assertEqual(received.recipient, "Ana.Perez@example.net")
        message = email.message_from_bytes(received.data, policy=email.policy.default)
        self.assertEqual(message["To"], "Ana.Perez@example.net")
        await deferToThread(_send, port, ["ana.perez@example.net"])
        await self.sink.wait_for(2)
        self.assertEqual(await self.sql("SELECT email FROM contacts"),
                         [("ana.perez@example.net",)])
        self.assertEqual(await self.sql("SELECT recipient FROM deliveries ORDER BY id"),
                         [("Ana.Perez@example.net",), ("ana.perez@example.net",)])

    async def test_header_from_of_a_verified_sender_is_kept_and_aligned(self):
        """Aldeamo and Devino clients write From themselves: when it is a verified sender
        of the account it is kept, display name and address, whatever the envelope
        sender; the DKIM signature and the return path are its domain's (DMARC). A From
        the account may not use becomes the envelope sender, its display name kept."""
        stores = self.gateway.stores
        shop_key = generate_dkim_key("rsa")
        await stores.senders.add_domain(self.account.id, "shop.example.com", "mg2", "rsa",
                                        shop_key.private_key_pem, shop_key.public_key,
                                        "bounces.shop.example.com")
        await stores.senders.verify_domain(self.account.id, "shop.example.com")
        port = self.gateway.port_for("smtp.starttls_listeners[0]")
        kept = HTML_MESSAGE.replace(b"From: News <news@example.org>",
                                    b'From: "Tienda Acme" <Ventas@Shop.Example.COM>')
        await deferToThread(_send, port, ["ana@example.net"], "mailer@example.org", kept)
        (received,) = await self.sink.wait_for(1)
        message = email.message_from_bytes(received.data, policy=email.policy.default)
        self.assertEqual(message["From"], "Tienda Acme <Ventas@shop.example.com>")
        self.assertRegex(received.sender, r"^b-\d+-[a-z0-9]+@bounces\.shop\.example\.com$")
        self.assertIn("d=shop.example.com", message["DKIM-Signature"])
        records = {b"mg2._domainkey.shop.example.com.": shop_key,
                   b"mg1._domainkey.example.org.": self.key}

        def lookup(name, timeout=5):
            key = records.get(name)
            return key and f"v=DKIM1; k=rsa; p={key.public_key}".encode()
        self.assertTrue(dkim.verify(received.data, dnsfunc=lookup))

        foreign = HTML_MESSAGE.replace(b"From: News <news@example.org>",
                                       b"From: Someone <someone@elsewhere.example>")
        await deferToThread(_send, port, ["bea@example.net"], "mailer@example.org", foreign)
        received = (await self.sink.wait_for(2))[1]
        message = email.message_from_bytes(received.data, policy=email.policy.default)
        self.assertEqual(message["From"], "Someone <mailer@example.org>")
        self.assertIn("d=example.org", message["DKIM-Signature"])
        self.assertTrue(dkim.verify(received.data, dnsfunc=lookup))

    async def test_unusable_dkim_key_sends_unsigned(self):
        await self.sql("UPDATE sender_domains SET dkim_private_key = 'garbage'"
                    " RETURNING id")
        port = self.gateway.port_for("smtp.starttls_listeners[0]")
        await deferToThread(_send, port, ["ana@example.net"])
        (received,) = await self.sink.wait_for(1)
        self.assertNotIn(b"DKIM-Signature", received.data)
        self.flushLoggedErrors()

    async def test_refused_deferred_and_null_mx(self):
        port = self.gateway.port_for("smtp.starttls_listeners[0]")
        await deferToThread(_send, port, ["bounce@example.net", "defer@example.net",
                                          "someone@nullmx.example", "ok@example.net"])
        await _settled(self.gateway, 4)
        rows = await self.sql("SELECT recipient, state, last_reply FROM deliveries")
        states = {recipient: (state, reply) for recipient, state, reply in rows}
        self.assertEqual(states["bounce@example.net"][0], "bounced")
        self.assertIn("550 5.1.1", states["bounce@example.net"][1])
        self.assertEqual(states["defer@example.net"][0], "deferred")
        self.assertEqual(states["someone@nullmx.example"][0], "bounced")
        self.assertIn("null MX", states["someone@nullmx.example"][1])
        self.assertEqual(states["ok@example.net"][0], "sent")
        (retry,) = await self.sql("SELECT next_attempt_at > now() + interval '4 min'"
                               " FROM deliveries WHERE recipient = 'defer@example.net'")
        self.assertEqual(retry, (True,))
        bounces = await self.sql("SELECT recipient, details->>'type' FROM events"
                              " WHERE type = 'bounced' ORDER BY recipient")
        self.assertEqual(bounces, [("bounce@example.net", "hard"),
                                   ("someone@nullmx.example", "hard")])


async def _later(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def _settled(gateway, count: int, state: str = "queued") -> None:
    """Wait (at most 30 s: a busy CI machine) until `count` deliveries have left `state`."""
    for _ in range(600):
        (done,) = await run_sql(gateway.database,
                                "SELECT count(*) FROM deliveries WHERE state <> %s", state)
        if done[0] >= count:
            return
        await _later(0.05)


class MultiNodeTests(unittest.TestCase):
    """D-1: two nodes on one database deliver 2,000 messages, each exactly once."""

    timeout = 300

    async def test_two_gateways_deliver_each_recipient_once(self):
        sink, _, local = local_delivery(self)
        dsn = fresh_database()
        disabled = await start_gateway(self, gateway_config(self, dsn))
        stores = disabled.stores
        account = await stores.accounts.create_account("acme")
        recipients = [f"r{i:04}@example.net" for i in range(2000)]
        for start in range(0, 2000, 200):
            await stores.submissions.store(SubmissionRecord(
                account_id=account.id, origin="api", message_uid=uuid.uuid4().hex,
                sender=SENDER, subject="s", html="<p>x</p>",
                body={"subject": "s", "html": "<p>x</p>", "text": "x"},
                recipients=tuple(QueuedRecipient(r, None) for r in recipients[start:start + 200])))
        delivery = dataclasses.replace(local, batch_size=50, connect_timeout=30,
                                       reply_timeout=300)
        for _ in range(2):
            await start_gateway(self, gateway_config(self, dsn, delivery=delivery))
        await sink.wait_for(2000)
        await _settled(disabled, 2000)  # every outcome written: nothing is in flight
        sent = await run_sql(disabled.database,
                             "SELECT count(*) FROM deliveries WHERE state = 'sent'")
        self.assertEqual(sent, [(2000,)])
        self.assertEqual(sorted(m.recipient for m in sink.messages), recipients)


class SmarthostFlowTests(unittest.TestCase):
    """D-3 smarthost mode as the Gateway wires it from the config: every recipient domain,
    none of them in DNS, goes through the one relay, over TLS, with AUTH; the relay is one
    destination, so one connection (its cap here) serves all three domains."""

    async def test_everything_through_the_relay(self):
        sink, sink_port = tls_sink(self, users={b"relay-user": b"relay-secret"})
        dsn = fresh_database()
        delivery = DeliveryConfig(smarthost=f"127.0.0.1:{sink_port}",
                                  smarthost_username="relay-user",
                                  smarthost_password="relay-secret", poll_interval=0.05,
                                  per_domain_connections=1)
        gateway = await start_gateway(self, gateway_config(self, dsn, delivery=delivery))
        account = await gateway.stores.accounts.create_account("acme")
        recipients = ("a@one.example.org", "b@two.example.org", "c@three.example.org")
        await gateway.stores.submissions.store(SubmissionRecord(
            account_id=account.id, origin="api", message_uid=uuid.uuid4().hex,
            sender=SENDER, subject="s", html="<p>x</p>",
            body={"subject": "s", "html": "<p>x</p>", "text": "x"},
            recipients=tuple(QueuedRecipient(r, None) for r in recipients)))
        await sink.wait_for(3)
        self.assertEqual(sorted(m.recipient for m in sink.messages), list(recipients))
        self.assertEqual(sink.connections, 1)
        self.assertLess(sink.commands.index(b"STARTTLS"),
                        next(i for i, c in enumerate(sink.commands) if c.startswith(b"AUTH")))
