"""The webhook queue against a real PostgreSQL (W-2): the outbox the events' trigger
fills, the feed, the cap, claims shared between nodes, outcomes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from twisted.internet import defer

from mailgw import admin
from mailgw.events.webhooks.payloads import payload_for
from mailgw.store.database import Database
from mailgw.store.events import Event, EventType
from mailgw.store.submissions import QueuedRecipient, SubmissionRecord
from mailgw.store.webhook_queue import FAILED_KEPT, EventFacts, PostOutcome
from mailgw.store.webhooks import WEBHOOK_EVENT_TYPES
from tests.harness import DatabaseTestCase

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=1)


def echo(facts: EventFacts, wanted) -> dict | None:
    """A projection for the store's tests: what the feed read, for endpoints that want
    the event's type."""
    if str(facts.type) not in wanted:
        return None
    return {"event": str(facts.type), "email": facts.recipient, "uid": facts.message_uid,
            "subject": facts.subject, "ip": facts.client_ip,
            "headers": facts.custom_headers, "tz": facts.timezone}


class WebhookQueueTests(DatabaseTestCase):
    async def setUp(self):
        await super().setUp()
        self.account = (await self.stores.accounts.create_account("acme")).id
        self.queue = self.stores.webhook_queue

    async def endpoint(self, *event_types: str, account: int | None = None) -> int:
        endpoint, _ = await admin.add_webhook(self.stores, account or self.account,
                                              "https://hooks.example.org/x",
                                              list(event_types), [])
        return endpoint.id

    async def submission(self, *emails: str):
        uid = uuid.uuid4().hex
        stored = await self.stores.submissions.store(SubmissionRecord(
            account_id=self.account, origin="smtp", message_uid=uid,
            sender="news@example.org", subject="Hola", html=None, body={"subject": "Hola"},
            recipients=tuple(QueuedRecipient(email, None) for email in emails),
            custom_headers={"x-campaign": "otoño"}, client_ip="192.0.2.7"))
        return stored, uid

    async def record(self, type_: EventType, stored=None, **changes) -> int:
        about = {} if stored is None else {"send_id": stored.send_id,
                                           "message_id": stored.message_id}
        return await self.stores.events.record(Event(self.account, type_, **about, **changes))

    async def outbox(self) -> list[int]:
        return [row[0] for row in await self.sql(
            "SELECT event_id FROM webhook_outbox ORDER BY event_id")]

    async def pending(self) -> list[tuple]:
        return await self.sql("SELECT endpoint_id, event_id, payload, attempts"
                              " FROM webhook_deliveries WHERE state = 'pending' ORDER BY id")

    async def test_events_that_an_endpoint_may_want_are_noted(self):
        """The trigger notes events of accounts with an endpoint wanting their type (or
        its W-1 name: a bounce for `bounced`), not a machine's opens, and nothing of
        accounts without endpoints: the hot paths pay nothing for webhooks nobody has."""
        stored, _ = await self.submission("a@example.net")  # 'queued': nobody wants it
        self.assertEqual(await self.outbox(), [])
        await self.endpoint("sent", "bounce", "open")
        other = (await self.stores.accounts.create_account("other")).id
        sent = await self.record(EventType.SENT, stored, recipient="a@example.net")
        bounced = await self.record(EventType.BOUNCED, stored, details={"type": "hard"})
        await self.record(EventType.OPEN, stored, machine=True)
        await self.record(EventType.CLICK, stored)
        await self.stores.events.record(Event(other, EventType.SENT))
        self.assertEqual(await self.outbox(), [sent, bounced])

    async def test_feed_queues_one_post_per_endpoint_that_wants_it(self):
        wants_sent = await self.endpoint("sent")
        wants_both = await self.endpoint("sent", "click")
        await self.endpoint("click")
        stored, uid = await self.submission("a@example.net")
        sent = await self.record(EventType.SENT, stored, recipient="a@example.net")
        fed = await self.queue.feed(100, echo, NOW, 10)
        self.assertEqual((fed.events, fed.queued, fed.dropped), (1, 2, {}))
        payload = {"event": "sent", "email": "a@example.net", "uid": uid, "subject": "Hola",
                   "ip": "192.0.2.7", "headers": {"x-campaign": "otoño"},
                   "tz": "America/Bogota"}
        self.assertEqual(await self.pending(), [(wants_sent, sent, payload, 0),
                                                (wants_both, sent, payload, 0)])
        self.assertEqual(await self.outbox(), [])
        self.assertEqual((await self.queue.feed(100, echo, NOW, 10)).events, 0)

    async def test_cap_drops_the_oldest_and_counts_them(self):
        endpoint = await self.endpoint("sent")
        events = [await self.record(EventType.SENT) for _ in range(5)]
        fed = await self.queue.feed(3, echo, NOW, 2)
        self.assertEqual(fed.dropped, {endpoint: 1})
        fed = await self.queue.feed(3, echo, NOW, 2)
        self.assertEqual(fed.dropped, {endpoint: 2})
        self.assertEqual([row[1] for row in await self.pending()], events[3:])
        [(dropped,)] = await self.sql("SELECT dropped_count FROM webhook_endpoints")
        self.assertEqual(dropped, 3)
        [listed] = await self.stores.webhooks.list(self.account)
        self.assertEqual(listed.dropped_count, 3)

    async def test_claim_is_bounded_per_endpoint_and_leased(self):
        busy, calm = await self.endpoint("sent"), await self.endpoint("sent")
        for _ in range(4):
            await self.record(EventType.SENT)
        await self.queue.feed(100, echo, NOW, 100)
        claimed = await self.queue.claim(NOW, LATER, 100, 3, {busy: 1})
        self.assertEqual(sorted(p.endpoint_id for p in claimed), [busy] + [calm] * 3)
        self.assertEqual({p.attempt for p in claimed}, {1})
        self.assertEqual({p.url for p in claimed}, {"https://hooks.example.org/x"})
        # Leased: not due again before the lease runs out, then due again.
        again = await self.queue.claim(NOW, LATER, 100, 10, {})
        self.assertEqual(sorted(p.endpoint_id for p in again), [busy] * 3 + [calm])
        self.assertEqual(await self.queue.claim(NOW, LATER, 100, 10, {}), [])
        expired = await self.queue.claim(LATER, LATER + timedelta(minutes=1), 100, 10, {})
        self.assertEqual(len(expired), 8)
        self.assertEqual({p.attempt for p in expired}, {2})

    async def test_inactive_endpoint_is_not_claimed(self):
        endpoint = await self.endpoint("sent")
        await self.record(EventType.SENT)
        await self.queue.feed(100, echo, NOW, 100)
        await self.sql("UPDATE webhook_endpoints SET active = false WHERE id = %s", endpoint)
        self.assertEqual(await self.queue.claim(NOW, LATER, 100, 10, {}), [])

    async def test_two_nodes_never_claim_the_same_post(self):
        await self.endpoint("sent")
        for _ in range(40):
            await self.record(EventType.SENT)
        await self.queue.feed(100, echo, NOW, 100)
        other = Database(self.dsn, 2, self.database.reactor)
        await other.start()
        self.addCleanup(other.close)
        other_queue = type(self.queue)(other, self.stores.committer)
        claims = await defer.gatherResults([
            defer.ensureDeferred(queue.claim(NOW, LATER, 10, 40, {}))
            for queue in (self.queue, other_queue, self.queue, other_queue)])
        ids = [post.id for claim in claims for post in claim]
        self.assertEqual(len(ids), 40)
        self.assertEqual(len(set(ids)), 40)

    async def test_outcomes(self):
        """Delivered: gone. Failed: due again when the dispatcher says, with the error.
        Given up: kept as failed. An attempt whose lease another claim took: not written."""
        await self.endpoint("sent")
        for _ in range(4):
            await self.record(EventType.SENT)
        await self.queue.feed(100, echo, NOW, 100)
        delivered, retried, given_up, stale = await self.queue.claim(NOW, NOW, 100, 10, {})
        self.assertTrue(await self.queue.record(PostOutcome(delivered.id, 1, "delivered")))
        self.assertTrue(await self.queue.record(PostOutcome(retried.id, 1, "pending", LATER,
                                                            "answered 500")))
        self.assertTrue(await self.queue.record(PostOutcome(given_up.id, 1, "failed", None,
                                                            "refused")))
        # The last one's lease ran out and another claim took it.
        [newer] = await self.queue.claim(LATER, LATER, 1, 10, {})
        self.assertEqual((newer.id, newer.attempt), (stale.id, 2))
        self.assertFalse(await self.queue.record(PostOutcome(stale.id, 1, "delivered")))
        self.assertTrue(await self.queue.record(PostOutcome(stale.id, 2, "delivered")))
        rows = await self.sql("SELECT id, state, next_attempt_at, last_error"
                              " FROM webhook_deliveries ORDER BY id")
        self.assertEqual(rows, [(retried.id, "pending", LATER, "answered 500"),
                                (given_up.id, "failed", NOW, "refused")])

    async def test_given_up_posts_are_kept_a_week(self):
        await self.endpoint("sent")
        await self.record(EventType.SENT)
        await self.queue.feed(100, echo, NOW, 100)
        [post] = await self.queue.claim(NOW, LATER, 100, 10, {})
        await self.queue.record(PostOutcome(post.id, 1, "failed", None, "refused"))
        await self.queue.feed(100, echo, NOW + FAILED_KEPT, 100)
        self.assertEqual(await self.sql("SELECT state FROM webhook_deliveries"), [("failed",)])
        await self.queue.feed(100, echo, NOW + FAILED_KEPT + timedelta(seconds=1), 100)
        self.assertEqual(await self.sql("SELECT state FROM webhook_deliveries"), [])

    async def test_depth_counts_events_not_yet_fed_and_posts_waiting(self):
        """/metrics' mailgw_webhook_queue_pending: a backlog shows before the feed runs
        (no node with webhooks enabled), and until each post is answered."""
        await self.endpoint("sent")
        for _ in range(2):
            await self.record(EventType.SENT)
        self.assertEqual((await self.stores.queue_admin.depth()).webhooks_pending, 2)
        await self.queue.feed(100, echo, NOW, 100)
        self.assertEqual((await self.stores.queue_admin.depth()).webhooks_pending, 2)
        first, _ = await self.queue.claim(NOW, LATER, 100, 10, {})
        await self.queue.record(PostOutcome(first.id, 1, "delivered"))
        self.assertEqual((await self.stores.queue_admin.depth()).webhooks_pending, 1)

    async def test_the_trigger_notes_every_event_the_projection_posts(self):
        """The trigger's filter (SQL) and payload_for (Python) each say which events an
        endpoint wants: whatever event types an endpoint asks for, no event that the
        projection would post is left out of the outbox. (Only opens and clicks are
        ever a machine's, T-6.)"""
        cases = [(EventType.BOUNCED, {"type": "hard"}, False),
                 (EventType.BOUNCED, {"type": "soft"}, False),
                 *((type_, {}, False) for type_ in EventType if type_ != EventType.BOUNCED),
                 (EventType.OPEN, {}, True), (EventType.CLICK, {}, True)]
        for wanted in WEBHOOK_EVENT_TYPES:
            account = (await self.stores.accounts.create_account(f"wants-{wanted}")).id
            await self.endpoint(wanted, account=account)
            events = [Event(account, type_, details, machine=machine)
                      for type_, details, machine in cases]
            ids = await self.stores.events.record_many(events)
            noted = set(await self.outbox())
            for event_id, event in zip(ids, events, strict=True):
                facts = EventFacts(event.type, event.details, NOW, account, "America/Bogota",
                                   machine=event.machine)
                if payload_for(facts, [wanted]) is not None:
                    self.assertIn(event_id, noted, (wanted, event))
