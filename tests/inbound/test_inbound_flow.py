"""Bounces, complaints and unsubscribes that come back by mail, end to end (D-7, T-3):
a message submitted over SMTP and delivered to a local receiver, then a DSN, an ARF
report or a List-Unsubscribe mail sent to the inbound listener with smtplib."""

import email
import email.policy
import re
import smtplib

from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mailgw.config import InboundConfig
from mailgw.store.events import EventType
from tests.delivery.test_delivery_flow import (
    _send,
    _settled,
    local_delivery,
    sending_account,
)
from tests.harness import (
    LOOPBACK_PORT,
    QueriesDatabase,
    fresh_database,
    gateway_config,
    insecure_tls,
    log_lines,
    start_gateway,
)
from tests.inbound import samples

SENDER = "news@example.org"


def _mail(port: int, sender: str, recipients: list[str], message: bytes,
          starttls: bool = False) -> None:
    """As a remote mail server sends a DSN: MAIL FROM:<> when `sender` is empty."""
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    try:
        client.ehlo("mx1.example.net")
        if starttls:
            client.starttls(context=insecure_tls())
            client.ehlo("mx1.example.net")
        client.sendmail(sender, recipients, message)
    finally:
        client.close()


class InboundFlowTests(QueriesDatabase, unittest.TestCase):
    async def setUp(self):
        self.sink, self.dns, delivery = local_delivery(self)
        self.gateway = await start_gateway(self, gateway_config(
            self, fresh_database(), delivery=delivery,
            inbound=InboundConfig(listeners=[LOOPBACK_PORT])))
        self.database = self.gateway.database
        self.inbound_port = self.gateway.port_for("inbound.listeners[0]")
        self.account, _ = await sending_account(self.gateway.stores)

    async def deliver(self, recipient: str = "ana@example.net", count: int = 1):
        """Submit and deliver one message; the copy the receiver got."""
        port = self.gateway.port_for("smtp.starttls_listeners[0]")
        await deferToThread(_send, port, [recipient])
        received = await self.sink.wait_for(count)
        await _settled(self.gateway, count)
        return received[-1]

    async def mail(self, sender: str, recipients: list[str], message: bytes,
                   starttls: bool = False) -> None:
        await deferToThread(_mail, self.inbound_port, sender, recipients, message, starttls)

    async def events(self, *types: EventType) -> list[tuple]:
        return await self.sql("SELECT type, details FROM events WHERE type = ANY(%s)"
                              " ORDER BY id", list(types))

    def inbound_count(self, outcome: str) -> float:
        return self.gateway.metrics.registry.get_sample_value(
            "mailgw_inbound_messages_total", {"outcome": outcome}) or 0

    async def test_dsn_bounces_and_invalidates_after_two(self):
        """A DSN to the VERP return path is the delivery's hard bounce, with the ids and
        the reply; the second hard bounce invalidates the contact (delivery's limit)."""
        received = await self.deliver()
        await self.mail("", [received.sender], samples.dsn(received.sender))
        [(state, reply)] = await self.sql("SELECT state, last_reply FROM deliveries")
        self.assertEqual(state, "bounced")
        self.assertIn("550 5.1.1", reply)
        rows = await self.sql(
            "SELECT e.account_id, e.send_id, e.message_id, e.delivery_id, e.contact_id,"
            " e.recipient, e.details, d.account_id, m.send_id, d.message_id, d.id,"
            " d.contact_id, d.recipient FROM events e JOIN deliveries d ON d.id = e.delivery_id"
            " JOIN messages m ON m.id = d.message_id WHERE e.type = 'bounced'")
        [row] = rows
        self.assertEqual(row[:6], row[7:])
        self.assertEqual(row[6], {
            "type": "hard", "source": "dsn", "status": "5.1.1",
            "reply": "550 5.1.1 <ana@example.net>: Recipient address rejected: User unknown"
                     " in virtual mailbox table"})
        self.assertEqual(await self.sql("SELECT hard_bounces, invalid FROM contacts"),
                         [(1, False)])
        # The same DSN again (mail servers send duplicates) counts nothing.
        await self.mail("", [received.sender], samples.dsn(received.sender))
        self.assertEqual(len(await self.events(EventType.BOUNCED)), 1)
        self.assertEqual(self.inbound_count("ignored"), 1)

        second = await self.deliver(count=2)
        await self.mail("", [second.sender], samples.dsn(second.sender))
        self.assertEqual(await self.sql("SELECT hard_bounces, invalid FROM contacts"),
                         [(2, True)])
        self.assertEqual([d for _, d in await self.events(EventType.INVALIDATED)],
                         [{"reason": "2 hard bounces"}])
        self.assertEqual(self.inbound_count("bounce"), 2)
        # H-4: the DSN's bounce counts once, and the message still counts as sent.
        stats = await self.gateway.stores.statistics.send(
            (await self.sql("SELECT min(send_id) FROM messages"))[0][0])
        self.assertEqual((stats.counters.sent, stats.counters.bounced_hard,
                          stats.counters.bounced_soft), (1, 1, 0))

    async def test_soft_and_delayed_dsns(self):
        """4.x.x failed is a soft bounce (no invalidation count); a delayed DSN is not a
        bounce: logged and dropped."""
        received = await self.deliver()
        await self.mail("", [received.sender],
                        samples.dsn(received.sender, action="delayed", status="4.4.7"))
        self.assertEqual(await self.sql("SELECT state FROM deliveries"), [("sent",)])
        await self.mail("", [received.sender], samples.dsn(
            received.sender, status="4.2.2", diagnostic="smtp; 452 4.2.2 Mailbox full"))
        [(_, details)] = await self.events(EventType.BOUNCED)
        self.assertEqual((details["type"], details["reply"]), ("soft", "452 4.2.2 Mailbox full"))
        self.assertEqual(await self.sql("SELECT hard_bounces FROM contacts"), [(0,)])

    async def test_non_standard_bounce_over_starttls(self):
        received = await self.deliver()
        await self.mail("", [received.sender], samples.exim_bounce(received.sender),
                        starttls=True)
        [(_, details)] = await self.events(EventType.BOUNCED)
        self.assertEqual(details["type"], "hard")
        self.assertIn("550 5.1.1", details["reply"])

    async def test_arf_complaint_unsubscribes_and_invalidates(self):
        """An ARF report to a feedback-loop address, matched by the original's
        Message-ID alone (the rest redacted): complaint, unsubscribe for the sender's
        domain, invalidation; the next send to the contact is not sent."""
        received = await self.deliver()
        message_id = email.message_from_bytes(received.data)["Message-ID"]
        report = samples.arf(return_path="", message_id=message_id,
                             recipient="redacted@example.net")
        await self.mail("fbl@hotmail.example", ["fbl@bounces.example.org"], report)
        types = [t for (t,) in await self.sql("SELECT type FROM events ORDER BY id")]
        self.assertEqual(types, ["queued", "sent", "complaint", "unsubscribed", "invalidated"])
        [(_, details)] = await self.events(EventType.COMPLAINT)
        self.assertEqual(details, {"source": "arf", "feedback_type": "abuse",
                                   "user_agent": "SomeGenerator/1.0"})
        self.assertEqual(await self.sql("SELECT address, scope_domain, reason FROM suppressions"),
                         [("ana@example.net", "example.org", "complaint")])
        self.assertEqual(await self.sql("SELECT invalid FROM contacts"), [(True,)])
        self.assertEqual(self.inbound_count("complaint"), 1)

        port = self.gateway.port_for("smtp.starttls_listeners[0]")
        await deferToThread(_send, port, ["ana@example.net"])
        await _settled(self.gateway, 2)
        self.assertEqual((await self.sql("SELECT state FROM deliveries ORDER BY id"))[-1],
                         ("not_sent",))

    async def test_whitelisted_contact_is_not_invalidated_by_a_complaint(self):
        received = await self.deliver()
        await self.sql("UPDATE contacts SET whitelisted = true")
        await self.mail("", [received.sender], samples.arf(received.sender))
        self.assertEqual(await self.sql("SELECT invalid FROM contacts"), [(False,)])
        self.assertEqual(len(await self.events(EventType.COMPLAINT)), 1)

    async def test_mailto_unsubscribe(self):
        """T-3: the List-Unsubscribe mailto: unsubscribes the recipient it names, as the
        one-click POST does, with Aldeamo's reason for mail."""
        received = await self.deliver()
        header = email.message_from_bytes(received.data, policy=email.policy.default)[
            "List-Unsubscribe"]
        address, subject = re.search(r"<mailto:([^?]+)\?subject=([^>]+)>", header).groups()
        self.assertEqual(address, "unsubscribe@bounces.example.org")
        message = (f"From: ana@example.net\r\nTo: {address}\r\nSubject: {subject}\r\n\r\n"
                   "unsubscribe\r\n").encode()
        await self.mail("ana@example.net", [address], message)
        [(_, details)] = await self.events(EventType.UNSUBSCRIBED)
        self.assertEqual(details, {"subscription_type": "domain subscription cancelled",
                                   "domain": "example.org", "method": "mailto",
                                   "reason": "Cancelación por correo electrónico"})
        self.assertEqual(await self.sql("SELECT reason FROM suppressions"), [("unsubscribed",)])
        self.assertEqual(self.inbound_count("unsubscribe"), 1)

    async def test_unmatched_mail_is_dropped_without_reply_traffic(self):
        """No backscatter: mail that names no delivery (a forged tag, a stranger's
        message) is accepted and dropped; nothing is sent back."""
        received = await self.deliver()
        lines = log_lines(self)
        forged = re.sub(r"-[a-z2-7]{16}@", "-aaaaaaaaaaaaaaaa@", received.sender)
        await self.mail("", [forged], samples.dsn(forged))
        await self.mail("someone@example.com", ["postmaster@bounces.example.org"],
                        b"Subject: hello\r\n\r\nhi\r\n")
        await self.mail("someone@example.com", ["unsubscribe@bounces.example.org"],
                        b"Subject: unsubscribe-forged\r\n\r\nhi\r\n")
        self.assertEqual(self.inbound_count("unmatched"), 3)
        self.assertEqual(await self.events(EventType.BOUNCED, EventType.UNSUBSCRIBED), [])
        self.assertEqual(await self.sql("SELECT count(*) FROM deliveries"), [(1,)])
        self.assertEqual(len(self.sink.messages), 1)
        self.assertTrue(any("names no delivery of ours; dropped" in line for line in lines))

    async def test_relay_denied_and_other_domains(self):
        def attempt():
            client = smtplib.SMTP("127.0.0.1", self.inbound_port, timeout=30)
            try:
                client.ehlo("mx1.example.net")
                client.mail("")
                return [client.rcpt(address)[0] for address in (
                    "x@example.net", "x@bounces.example.org", "x@mx.test.example",
                    "x@BOUNCES.EXAMPLE.ORG")]
            finally:
                client.close()

        self.assertEqual(await deferToThread(attempt), [550, 250, 250, 250])

    async def test_feedback_forwarded_to_the_envelope_sender(self):
        """Aldeamo: with --forward-feedback, a bounce (synchronous or from a DSN) and a
        complaint each send a notice to the message's MAIL FROM, delivered by the
        delivery engine; the notices write no events."""
        await self.gateway.stores.accounts.update_account(
            "acme", {"forward_feedback": True}, {})
        self.dns.add("example.org", "MX", (10, "mx1.example.net"))
        received = await self.deliver()
        await self.mail("", [received.sender], samples.dsn(received.sender))
        notice = (await self.sink.wait_for(2))[-1]
        self.assertEqual(notice.recipient, SENDER)
        parsed = email.message_from_bytes(notice.data, policy=email.policy.default)
        self.assertEqual(parsed["Subject"],
                         "Delivery Status Notification (Failure): ana@example.net")
        self.assertIn("550 5.1.1", parsed.get_body(("plain",)).get_content())
        self.assertIsNone(parsed["List-Unsubscribe"])
        self.assertEqual(parsed["Auto-Submitted"], "auto-generated")
        # A synchronous bounce too.
        port = self.gateway.port_for("smtp.starttls_listeners[0]")
        await deferToThread(_send, port, ["bounce-me@example.net"])
        notice = (await self.sink.wait_for(3))[-1]
        self.assertEqual(notice.recipient, SENDER)
        self.assertIn("bounce-me@example.net", notice.data.decode())
        await _settled(self.gateway, 4)
        self.assertEqual(await self.sql("SELECT count(*) FROM events WHERE delivery_id IN"
                                        " (SELECT id FROM deliveries WHERE kind = 'notice')"),
                         [(0,)])
