"""The event log against a real PostgreSQL: its types and its group-committed writes
(E-1, principle 3)."""

import dataclasses
import re
import uuid
from datetime import UTC, datetime

import psycopg2
from twisted.internet import defer

from mailgw.store import GROUP_COMMIT_IN_FLIGHT
from mailgw.store.events import Event, EventType
from mailgw.store.submissions import QueuedRecipient, SubmissionRecord
from tests.harness import DatabaseTestCase


class EventTypeTests(DatabaseTestCase):
    async def test_enumeration_matches_the_schema(self):
        """A type added to the schema's CHECK or to EventType alone fails here."""
        [(definition,)] = await self.sql(
            "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c"
            " JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY(c.conkey)"
            " WHERE c.conrelid = 'events'::regclass AND c.contype = 'c'"
            " AND a.attname = 'type'")
        allowed = re.findall(r"'(\w+)'::text", definition)
        self.assertEqual(sorted(allowed), sorted(t.value for t in EventType))
        self.assertEqual(len(set(allowed)), len(allowed))


class EventStoreTests(DatabaseTestCase):
    async def setUp(self):
        await super().setUp()
        self.account = (await self.stores.accounts.create_account("acme")).id
        self.events = self.stores.events

    async def deliveries(self, *emails):
        """A submission to `emails`: its send id and its delivery ids, in order."""
        stored = await self.stores.submissions.store(SubmissionRecord(
            account_id=self.account, origin="smtp", message_uid=uuid.uuid4().hex,
            sender="news@example.org", subject="s", html=None, body={"subject": "s"},
            recipients=tuple(QueuedRecipient(email, None) for email in emails)))
        rows = await self.sql("SELECT id FROM deliveries WHERE message_id = %s ORDER BY id",
                              stored.message_id)
        return stored, [row[0] for row in rows]

    def event(self, type_, stored, delivery_id, recipient, **changes):
        return Event(self.account, type_, send_id=stored.send_id,
                     message_id=stored.message_id, delivery_id=delivery_id,
                     recipient=recipient, **changes)

    async def transactions(self):
        """How many transactions wrote the events that no submission wrote."""
        return (await self.sql("SELECT count(DISTINCT xmin::text) FROM events"
                               " WHERE type <> 'queued'"))[0][0]

    async def test_batch_is_written_and_read_back(self):
        stored, (first, second) = await self.deliveries("a@example.net", "b@example.net")
        clicked = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
        batch = [self.event(EventType.OPEN, stored, first, "a@example.net",
                            details={"ip": "192.0.2.1"}),
                 self.event(EventType.CLICK, stored, first, "a@example.net",
                            details={"url": "https://example.org/"}, occurred_at=clicked,
                            machine=True),
                 self.event(EventType.OPEN, stored, second, "b@example.net")]
        ids = await self.events.record_many(batch)
        self.assertEqual(len(set(ids)), 3)
        self.assertEqual(await self.sql("SELECT id, recipient, type FROM events"
                                        " WHERE id = ANY(%s) ORDER BY id", ids),
                         [(ids[0], "a@example.net", "open"), (ids[1], "a@example.net", "click"),
                          (ids[2], "b@example.net", "open")])
        self.assertEqual(await self.transactions(), 1)
        read = await self.events.events_for_delivery(first)
        # The submission's own event first, written by its statement.
        self.assertEqual([e.type for e in read],
                         [EventType.QUEUED, EventType.OPEN, EventType.CLICK])
        # Written as given (a machine's click too, T-6); without a time, at the
        # transaction's.
        self.assertEqual(read[2], batch[1])
        self.assertEqual(await self.sql("SELECT machine FROM events WHERE id = ANY(%s)"
                                        " ORDER BY id", ids), [(False,), (True,), (False,)])
        self.assertEqual(read[1], dataclasses.replace(batch[0],
                                                      occurred_at=read[1].occurred_at))
        self.assertIsNotNone(read[1].occurred_at)
        self.assertEqual(await self.events.events_for_delivery(second), [
            self.event(EventType.QUEUED, stored, second, "b@example.net",
                       occurred_at=read[0].occurred_at),
            self.event(EventType.OPEN, stored, second, "b@example.net",
                       occurred_at=read[1].occurred_at)])

    async def test_concurrent_records_are_committed_together(self):
        stored, deliveries = await self.deliveries(*[f"r{i}@example.net" for i in range(8)])
        events = [self.event(EventType.CLICK, stored, delivery, f"r{i}@example.net",
                             details={"url": f"https://example.org/{i}"})
                  for i, delivery in enumerate(deliveries)]
        ids = await defer.gatherResults([defer.ensureDeferred(self.events.record(e))
                                         for e in events])
        # The first ones alone, one per batch in flight; the others in one statement of
        # one transaction.
        self.assertEqual(await self.transactions(), GROUP_COMMIT_IN_FLIGHT + 1)
        for event_id, event in zip(ids, events, strict=True):
            self.assertEqual(await self.sql("SELECT delivery_id, recipient, details"
                                            " FROM events WHERE id = %s", event_id),
                             [(event.delivery_id, event.recipient, event.details)])

    async def test_a_bad_event_fails_only_its_callers_events(self):
        stored, (first,) = await self.deliveries("a@example.net")
        good = self.event(EventType.OPEN, stored, first, "a@example.net")
        bad = Event(self.account + 1000, EventType.OPEN)  # no such account
        results = await defer.DeferredList([
            defer.ensureDeferred(self.events.record(good)) for _ in range(GROUP_COMMIT_IN_FLIGHT)
        ] + [defer.ensureDeferred(self.events.record_many([good, bad])),
             defer.ensureDeferred(self.events.record(good))], consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True] * GROUP_COMMIT_IN_FLIGHT
                         + [False, True])
        results[-2][1].trap(psycopg2.IntegrityError)
        # None of the failed call's events is written, every other one is.
        self.assertEqual(len(await self.events.events_for_delivery(first)),
                         1 + GROUP_COMMIT_IN_FLIGHT + 1)
