"""Asynchronous bounces, complaints and feedback notices in the database (D-7)."""

from datetime import UTC, datetime, timedelta

from mailgw.store.inbound import (
    ALREADY,
    GONE,
    NOT_SENT,
    OF_A_NOTICE,
    RECORDED,
    AsyncBounce,
    Complaint,
)
from mailgw.store.queue import Outcome
from mailgw.store.tracking import RESUBSCRIBE, SubscriptionChange
from tests.store.test_queue import QueueTestCase

NOW = datetime(2026, 3, 1, tzinfo=UTC)


class InboundStoreTests(QueueTestCase):
    async def sent(self, email="ana@example.net") -> int:
        """A delivery recorded sent, as the delivery engine records it."""
        await self.submit(email)
        [claimed] = await self.queue.claim("node", 10, 300)
        await self.queue.record("node", Outcome(claimed.id, "sent", "250 OK"), 2)
        return claimed.id

    def bounce(self, delivery_id, bounce_type="hard") -> AsyncBounce:
        return AsyncBounce(delivery_id, bounce_type, "550 5.1.1 unknown", "5.1.1", 2, NOW)

    async def types(self):
        return [t for (t,) in await self.sql("SELECT type FROM events ORDER BY id")]

    async def test_bounce_of_what_was_never_sent(self):
        await self.submit("ana@example.net")
        [(queued,)] = await self.sql("SELECT id FROM deliveries")
        inbound = self.stores.inbound
        self.assertEqual(await inbound.record_bounce(self.bounce(queued)), NOT_SENT)
        self.assertEqual(await inbound.record_complaint(Complaint(queued, None, None, NOW)),
                         NOT_SENT)
        self.assertEqual(await inbound.record_bounce(self.bounce(queued + 100)), GONE)
        self.assertEqual(await self.types(), ["queued"])

    async def test_complaint_after_an_unsubscribe(self):
        """Already unsubscribed: the complaint is recorded and invalidates, but no second
        unsubscribe is counted; a second complaint changes nothing."""
        delivery_id = await self.sent()
        await self.sql("INSERT INTO suppressions (account_id, address, scope_domain, reason)"
                       " VALUES (%s, 'ana@example.net', 'example.org', 'unsubscribed')",
                       self.account.id)
        complaint = Complaint(delivery_id, "abuse", None, NOW)
        self.assertEqual(await self.stores.inbound.record_complaint(complaint), RECORDED)
        self.assertEqual(await self.stores.inbound.record_complaint(complaint), ALREADY)
        self.assertEqual(await self.types(), ["queued", "sent", "complaint", "invalidated"])

    async def test_complaint_shown_on_the_unsubscribe_page(self):
        """The page shows a complaint's recipient unsubscribed, and its resubscribe
        cannot lift a complaint's suppression."""
        delivery_id = await self.sent()
        await self.stores.inbound.record_complaint(Complaint(delivery_id, None, None, NOW))
        delivery = await self.stores.tracking.delivery(delivery_id)
        self.assertTrue((await self.stores.tracking.subscription(delivery)).unsubscribed)
        self.assertFalse(await self.stores.tracking.change_subscription(
            SubscriptionChange(delivery, RESUBSCRIBE, NOW)))
        self.assertEqual(await self.sql("SELECT reason FROM suppressions"), [("complaint",)])

    async def test_complaint_after_a_bounce_is_recorded(self):
        delivery_id = await self.sent()
        await self.stores.inbound.record_bounce(self.bounce(delivery_id, "soft"))
        self.assertEqual(await self.stores.inbound.record_complaint(
            Complaint(delivery_id, "abuse", None, NOW)), RECORDED)

    async def test_notices_only_when_asked_and_never_of_a_notice(self):
        delivery_id = await self.sent()
        await self.stores.inbound.record_bounce(self.bounce(delivery_id))
        self.assertEqual(await self.sql("SELECT count(*) FROM deliveries"), [(1,)])

        await self.stores.accounts.update_account("acme", {"forward_feedback": True}, {})
        other = await self.sent("bea@example.net")
        self.assertEqual(await self.stores.inbound.record_complaint(
            Complaint(other, "abuse", None, NOW)), RECORDED)
        [(notice_id, recipient, kind, send_id)] = await self.sql(
            "SELECT d.id, d.recipient, d.kind, m.send_id FROM deliveries d"
            " JOIN messages m ON m.id = d.message_id WHERE d.kind = 'notice'")
        self.assertEqual((recipient, kind), ("news@example.org", "notice"))
        [(subject, options)] = await self.sql(
            "SELECT subject, options FROM messages m JOIN deliveries d ON d.message_id = m.id"
            " WHERE d.id = %s", notice_id)
        self.assertEqual(subject, "Complaint: bea@example.net reported your message as spam")
        self.assertTrue(options["notice"])
        # The notice's own outcomes write no events and make no notice.
        before = await self.types()
        [claimed] = await self.queue.claim("node", 10, 300)
        await self.queue.record("node", Outcome(claimed.id, "bounced", "550 no",
                                                bounce_type="hard"), 2)
        self.assertEqual(await self.types(), before)
        self.assertEqual(await self.stores.inbound.record_bounce(self.bounce(notice_id)),
                         OF_A_NOTICE)
        self.assertEqual(await self.sql("SELECT count(*) FROM deliveries WHERE kind = 'notice'"),
                         [(1,)])
        # A send of its own (no view of the original's shows it), and H-4: a deferred
        # notice is no deferred delivery of the account.
        [(original_send,)] = await self.sql("SELECT send_id FROM events WHERE delivery_id"
                                            " = %s LIMIT 1", other)
        self.assertNotEqual(send_id, original_send)
        await self.sql("UPDATE deliveries SET state = 'deferred' WHERE id = %s", notice_id)
        now = datetime.now(UTC)
        stats = await self.stores.statistics.account(
            self.account.id, now - timedelta(days=1), now + timedelta(days=1), "UTC")
        self.assertEqual(stats.totals.deferred, 0)
