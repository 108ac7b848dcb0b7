"""What the tracking endpoints read and write, against a real PostgreSQL (T-1 to T-3, D-6)."""

import uuid
from datetime import UTC, datetime

from twisted.internet import defer

from mailgw.store.events import Event, EventType
from mailgw.store.submissions import QueuedRecipient, SubmissionRecord
from mailgw.store.tracking import (
    _TRACKED_DELIVERIES,
    CATEGORIES,
    RESUBSCRIBE,
    UNSUBSCRIBE,
    Subscription,
    SubscriptionChange,
)
from tests.harness import DatabaseTestCase

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class TrackingStoreTests(DatabaseTestCase):
    async def setUp(self):
        await super().setUp()
        self.account = (await self.stores.accounts.create_account("acme")).id
        await self.stores.accounts.update_account(
            "acme", {"categories": ["News", "Offers"], "track_clicks": False}, {})
        stored = await self.stores.submissions.store(SubmissionRecord(
            account_id=self.account, origin="smtp", message_uid=uuid.uuid4().hex,
            sender="news@example.org", subject="s", html=None, body={"subject": "s"},
            options={"language": 4, "track_opens": False},
            recipients=(QueuedRecipient("ana@example.net", None),
                        QueuedRecipient("bob@example.net", None))))
        self.send_id, self.message_id = stored.send_id, stored.message_id
        rows = await self.sql("SELECT id FROM deliveries ORDER BY id")
        self.ana, self.bob = (row[0] for row in rows)
        await self.sql("UPDATE deliveries SET state = 'sent',"
                       " updated_at = '2026-03-01 11:00+00' WHERE id = %s", self.ana)
        self.tracking = self.stores.tracking

    async def test_delivery_looked_up_with_its_message_and_account(self):
        ana, bob, gone = await defer.gatherResults([
            defer.ensureDeferred(self.tracking.delivery(i))
            for i in (self.ana, self.bob, self.bob + 100)])
        self.assertIsNone(gone)
        self.assertEqual((ana.account_id, ana.send_id, ana.message_id, ana.recipient),
                         (self.account, self.send_id, self.message_id, "ana@example.net"))
        self.assertEqual((ana.state, ana.sent_at), ("sent", NOW.timestamp() - 3600))
        self.assertEqual((bob.state, bob.sent_at), ("queued", None))
        self.assertEqual(ana.sender_domain, "example.org")
        self.assertEqual(ana.settings.categories, ("News", "Offers"))
        # T-5: the message's switch and the account's.
        self.assertFalse(ana.tracks_opens)
        self.assertFalse(ana.tracks_clicks)
        self.assertFalse(ana.opened)

    async def test_lookup_probes_the_index_whatever_the_statistics(self):
        """A person's open is looked for delivery by delivery: with statistics taken when
        `events` was small (a new installation), PostgreSQL once hashed every event of the
        table for each batch of hits."""
        await self.sql("INSERT INTO deliveries (message_id, account_id, recipient)"
                       " SELECT %s, %s, g || '@example.net' FROM generate_series(1, 10000) g",
                       self.message_id, self.account)
        await self.sql("INSERT INTO events (account_id, delivery_id, type)"
                       " SELECT %s, g %% 10000, 'open' FROM generate_series(1, 20000) g",
                       self.account)
        plan = "\n".join(row[0] for row in await self.sql(
            "EXPLAIN " + _TRACKED_DELIVERIES, list(range(self.ana, self.ana + 8))))
        self.assertIn("events_delivery_id_idx", plan)
        self.assertNotIn("Seq Scan on events", plan)

    async def test_opened_means_a_persons_open(self):
        ana = await self.tracking.delivery(self.ana)
        await self.stores.events.record(ana.event(EventType.OPEN, {}, NOW, machine=True))
        self.assertFalse((await self.tracking.delivery(self.ana)).opened)
        await self.stores.events.record(ana.event(EventType.OPEN, {}, NOW))
        self.assertTrue((await self.tracking.delivery(self.ana)).opened)

    async def change(self, action, keep=(), recipient=None):
        delivery = await self.tracking.delivery(recipient or self.ana)
        return await self.tracking.change_subscription(SubscriptionChange(
            delivery, action, NOW, {"method": "page", "reason": "too many"}, frozenset(keep)))

    async def suppressions(self):
        return await self.sql("SELECT address, scope_domain, category, reason"
                              " FROM suppressions ORDER BY category NULLS FIRST")

    async def subscription_events(self):
        return [(e.type, e.details) for e in await self.stores.events.events_for_delivery(
            self.ana) if e.type in (EventType.UNSUBSCRIBED, EventType.RESUBSCRIBED)]

    async def test_unsubscribe_once(self):
        self.assertTrue(await self.change(UNSUBSCRIBE))
        self.assertEqual(await self.suppressions(),
                         [("ana@example.net", "example.org", None, "unsubscribed")])
        # A second one (a mail client posting twice) changes nothing and writes nothing.
        self.assertFalse(await self.change(UNSUBSCRIBE))
        [(event_type, details)] = await self.subscription_events()
        self.assertEqual(event_type, EventType.UNSUBSCRIBED)
        self.assertEqual(details, {"subscription_type": "domain subscription cancelled",
                                   "domain": "example.org", "method": "page",
                                   "reason": "too many"})
        ana = await self.tracking.delivery(self.ana)
        self.assertEqual(await self.tracking.subscription(ana), Subscription(True, frozenset()))
        [event] = [e for e in await self.stores.events.events_for_delivery(self.ana)
                   if e.type == EventType.UNSUBSCRIBED]
        self.assertEqual(event, Event(self.account, EventType.UNSUBSCRIBED, details,
                                      self.send_id, self.message_id, self.ana, None,
                                      "ana@example.net", NOW))

    async def test_categories_then_resubscribe(self):
        await self.change(UNSUBSCRIBE)
        self.assertTrue(await self.change(CATEGORIES, keep={"News"}))
        # The domain's own unsubscribe is replaced by the category chosen.
        self.assertEqual(await self.suppressions(),
                         [("ana@example.net", "example.org", "Offers", "unsubscribed")])
        ana = await self.tracking.delivery(self.ana)
        self.assertEqual(await self.tracking.subscription(ana),
                         Subscription(False, frozenset({"Offers"})))
        self.assertFalse(await self.change(CATEGORIES, keep={"News"}))
        self.assertTrue(await self.change(RESUBSCRIBE))
        self.assertEqual(await self.suppressions(), [])
        self.assertFalse(await self.change(RESUBSCRIBE))
        events = await self.subscription_events()
        self.assertEqual([t for t, _ in events], [EventType.UNSUBSCRIBED] * 2
                         + [EventType.RESUBSCRIBED])
        self.assertEqual(events[1][1]["subscription_type"], "domain category update")
        self.assertEqual(events[1][1]["categories"], {"News": "active", "Offers": "cancelled"})
        self.assertEqual(events[2][1], {"subscription_type": "domain subscription reactivated",
                                        "domain": "example.org", "method": "page",
                                        "reason": "too many"})

    async def test_resubscribe_leaves_complaints_and_other_domains(self):
        await self.sql("INSERT INTO suppressions (account_id, address, scope_domain, reason)"
                       " VALUES (%s, 'ana@example.net', NULL, 'complaint'),"
                       " (%s, 'ana@example.net', 'other.example', 'unsubscribed')",
                       self.account, self.account)
        await self.change(UNSUBSCRIBE)
        await self.change(RESUBSCRIBE)
        self.assertEqual(await self.sql("SELECT scope_domain, reason FROM suppressions"
                                        " ORDER BY id"),
                         [(None, "complaint"), ("other.example", "unsubscribed")])

    async def test_queue_honours_the_unsubscribe(self):
        """D-6: a delivery claimed after the unsubscribe is not sent, its local part
        written in capitals or not (suppressions hold addresses in lower case)."""
        await self.sql("UPDATE deliveries SET recipient = 'Bob@example.net' WHERE id = %s",
                       self.bob)
        await self.change(UNSUBSCRIBE, recipient=self.bob)
        self.assertEqual(await self.sql("SELECT address FROM suppressions"),
                         [("bob@example.net",)])
        claimed = await self.stores.queue.claim("node", 10, 60)
        self.assertEqual([(d.recipient, d.suppressed) for d in claimed],
                         [("Bob@example.net", "unsubscribed")])

    async def test_concurrent_changes_of_one_address(self):
        results = await defer.gatherResults([
            defer.ensureDeferred(self.change(UNSUBSCRIBE)) for _ in range(6)])
        self.assertEqual(sorted(results), [False] * 5 + [True])
        self.assertEqual(len(await self.subscription_events()), 1)

    async def test_contact_fields(self):
        self.assertEqual(await self.tracking.contact_fields(None), {})
        contact = (await self.sql("INSERT INTO contacts (account_id, email, fields)"
                                  " VALUES (%s, 'c@example.net', '{\"nombre\": \"Ana\"}')"
                                  " RETURNING id", self.account))[0][0]
        self.assertEqual(await self.tracking.contact_fields(contact), {"nombre": "Ana"})
