"""Statistics per send and per account (H-4), counted from the event log of a real
PostgreSQL."""

import uuid
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from twisted.trial import unittest

from mailgw.store.events import Event, EventType
from mailgw.store.statistics import COUNTERS, Counters, account_zone, time_range
from mailgw.store.submissions import QueuedRecipient, SubmissionRecord
from tests.harness import DatabaseTestCase

BOGOTA = ZoneInfo("America/Bogota")


class StatisticsTests(DatabaseTestCase):
    async def setUp(self):
        await super().setUp()
        self.account = (await self.stores.accounts.create_account("acme")).id
        self.other = (await self.stores.accounts.create_account("other")).id
        self.send_id, self.deliveries = await self.send(
            ["a", "b", "c", "d", "e", "f", "g"], suppressed={"g"})

    async def send(self, names, suppressed=(), account=None):
        stored = await self.stores.submissions.store(SubmissionRecord(
            account_id=account or self.account, origin="smtp", message_uid=uuid.uuid4().hex,
            sender="news@example.org", subject="Spring", html=None, body={"subject": "s"},
            recipients=tuple(QueuedRecipient(f"{n}@example.net", None,
                                             suppressed="invalid" if n in suppressed else None)
                             for n in names)))
        rows = await self.sql("SELECT recipient, id FROM deliveries WHERE message_id = %s",
                              stored.message_id)
        return stored.send_id, {r.partition("@")[0]: (i, stored.message_id) for r, i in rows}

    async def record(self, name, type_, machine=False, details=None, at=None, deliveries=None,
                     send_id=None, account=None):
        delivery_id, message_id = (deliveries or self.deliveries)[name]
        await self.stores.events.record(Event(
            account or self.account, type_, details or {}, send_id or self.send_id, message_id,
            delivery_id, None, f"{name}@example.net", at, machine))

    async def test_send_counters(self):
        for name in "abcd":
            await self.record(name, EventType.SENT)
        await self.record("e", EventType.BOUNCED, details={"type": "hard"})
        await self.record("f", EventType.BOUNCED, details={"type": "soft"})
        await self.record("d", EventType.NOT_SENT, details={"reason": "unsubscribed"})
        await self.sql("UPDATE deliveries SET state = 'deferred' WHERE id = %s",
                       self.deliveries["c"][0])
        for name, machine in (("a", False), ("a", False), ("b", False), ("c", True),
                              ("a", True)):
            await self.record(name, EventType.OPEN, machine)
        for name, machine in (("a", False), ("a", False), ("b", True)):
            await self.record(name, EventType.CLICK, machine)
        await self.record("a", EventType.UNSUBSCRIBED)
        await self.record("b", EventType.COMPLAINT)

        stats = await self.stores.statistics.send(self.send_id, self.account)
        self.assertEqual(stats.subject, "Spring")
        self.assertEqual(stats.counters, Counters(
            recipients=7, sent=4, deferred=1, bounced_soft=1, bounced_hard=1, not_sent=2,
            opens_unique=2, opens_total=3, opens_machine=2, clicks_unique=1, clicks_total=2,
            clicks_machine=1, unsubscribes=1, complaints=1))
        self.assertEqual(list(stats.counters.as_dict()), list(COUNTERS))

    async def test_another_accounts_send_is_not_found(self):
        self.assertIsNone(await self.stores.statistics.send(self.send_id, self.other))
        self.assertIsNone(await self.stores.statistics.send(self.send_id + 100, self.account))
        self.assertIsNotNone(await self.stores.statistics.send(self.send_id))

    async def test_account_counters_per_day_in_its_time_zone(self):
        """Bogota is UTC-5: 03:00 UTC on 2 March is still 1 March there."""
        late_first = datetime(2026, 3, 2, 3, 0, tzinfo=UTC)
        second = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)
        await self.sql("UPDATE events SET occurred_at = %s", late_first)
        await self.record("a", EventType.OPEN, at=late_first)
        await self.record("a", EventType.OPEN, at=second)
        await self.record("b", EventType.OPEN, at=second)
        await self.record("b", EventType.CLICK, machine=True, at=second)
        await self.record("c", EventType.BOUNCED, details={"type": "hard"}, at=second)
        other_send, other = await self.send(["z"], account=self.other)
        await self.record("z", EventType.OPEN, at=second, deliveries=other, send_id=other_send,
                          account=self.other)

        start, end = time_range("2026-03-01", "2026-03-03", BOGOTA, datetime.now(UTC))
        stats = await self.stores.statistics.account(self.account, start, end,
                                                     "America/Bogota")
        self.assertEqual([day for day, _ in stats.days],
                         [date(2026, 3, 1), date(2026, 3, 2), date(2026, 3, 3)])
        first, second_day, third = (counters for _, counters in stats.days)
        self.assertEqual(first, Counters(recipients=7, not_sent=1, opens_unique=1,
                                         opens_total=1))
        self.assertEqual(second_day, Counters(opens_unique=2, opens_total=2, clicks_machine=1,
                                              bounced_hard=1))
        self.assertEqual(third, Counters())
        # Unique over the range: "a" opened on both days, one person.
        self.assertEqual(stats.totals, Counters(recipients=7, not_sent=1, opens_unique=2,
                                                opens_total=3, clicks_machine=1,
                                                bounced_hard=1))

    async def test_account_deferred_by_day_queued(self):
        await self.sql("UPDATE deliveries SET state = 'deferred',"
                       " created_at = '2026-03-02 12:00+00' WHERE id = %s",
                       self.deliveries["a"][0])
        start, end = time_range("2026-03-02", "2026-03-02", BOGOTA, datetime.now(UTC))
        stats = await self.stores.statistics.account(self.account, start, end,
                                                     "America/Bogota")
        self.assertEqual([(d, c.deferred) for d, c in stats.days], [(date(2026, 3, 2), 1)])

    async def test_timezone(self):
        self.assertEqual(await self.stores.statistics.timezone(self.account), "America/Bogota")
        self.assertIsNone(await self.stores.statistics.timezone(self.other + 100))


class TimeRangeTests(unittest.TestCase):
    now = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)

    def test_dates_are_whole_days_in_the_zone(self):
        start, end = time_range("2026-03-01", "2026-03-02", BOGOTA, self.now)
        self.assertEqual(start, datetime(2026, 3, 1, 5, 0, tzinfo=UTC))
        self.assertEqual(end, datetime(2026, 3, 3, 5, 0, tzinfo=UTC))

    def test_times_with_and_without_offsets(self):
        start, end = time_range("2026-03-01T10:00:00Z", "2026-03-01T12:00", BOGOTA, self.now)
        self.assertEqual(start, datetime(2026, 3, 1, 10, 0, tzinfo=UTC))
        self.assertEqual(end, datetime(2026, 3, 1, 17, 0, tzinfo=UTC))

    def test_defaults(self):
        self.assertEqual(time_range(None, None, BOGOTA, self.now),
                         (self.now - timedelta(days=30), self.now))

    def test_bad_ranges(self):
        for start, end, words in (("yesterday", None, "from: not an ISO 8601"),
                                  (None, "2026-13-01", "to: not an ISO 8601"),
                                  ("2026-03-02", "2026-03-01", "before"),
                                  ("2024-01-01", "2026-01-01", "at most 366 days"),
                                  ("x" * 10_000, None, "from")):
            error = self.assertRaises(ValueError, time_range, start, end, BOGOTA, self.now)
            self.assertIn(words, str(error))
            self.assertLess(len(str(error)), 120)

    def test_unknown_zone_is_utc(self):
        self.assertEqual(account_zone("Mars/Olympus").key, "UTC")
        self.assertEqual(account_zone("../etc/passwd").key, "UTC")
        self.assertEqual(account_zone("America/Bogota"), BOGOTA)
