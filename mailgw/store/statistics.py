"""Statistics per send and per account (H-4), counted from the event log.

`deferred` counts the deliveries waiting now (feedback notices to senders aside, D-7);
every other counter counts events: `recipients` the queued ones and those not sent at
submission (each recipient has one of the two), `opens_*` and `clicks_*` people's events
(`*_total`), the deliveries they are about (`*_unique`: a person opening twice is one),
and machines' events apart (`*_machine`, T-6). A bounce that comes back later by mail
(a DSN, D-7) adds a `bounced` event to a delivery whose `sent` event stays: its server
had accepted the message, so it counts in `sent` and in `bounced_*`. A send's counters
come from one index of the events (migration 006) without touching the table; an
account's per day, in its time zone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from mailgw.store.database import Database
from mailgw.store.events import EventType
from mailgw.store.notices import NOTICE

COUNTERS = ("recipients", "sent", "deferred", "bounced_soft", "bounced_hard", "not_sent",
            "opens_unique", "opens_total", "opens_machine", "clicks_unique", "clicks_total",
            "clicks_machine", "unsubscribes", "complaints")


# An account's statistics cover at most this long, and by default the last 30 days.
MAX_RANGE = timedelta(days=366)
DEFAULT_RANGE = timedelta(days=30)


def account_zone(name: str) -> ZoneInfo:
    """The account's time zone (accounts.timezone); UTC when it names none."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def time_range(start: str | None, end: str | None, zone: ZoneInfo, now: datetime
               ) -> tuple[datetime, datetime]:
    """[start, end) from ISO 8601 texts (H-4 `from` and `to`): a date is that day in the
    account's time zone (`to` included), a time without an offset is in it too. No
    `to`: now; no `from`: 30 days before `to`. ValueError says what is wrong."""
    upper = _instant("to", end, zone, next_day=True) if end else now
    lower = _instant("from", start, zone, next_day=False) if start else upper - DEFAULT_RANGE
    if lower >= upper:
        raise ValueError("from must be before to")
    if upper - lower > MAX_RANGE:
        raise ValueError(f"at most {MAX_RANGE.days} days from from to to")
    return lower, upper


def _instant(name: str, text: str, zone: ZoneInfo, next_day: bool) -> datetime:
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            if next_day:
                day += timedelta(days=1)
            return datetime(day.year, day.month, day.day, tzinfo=zone)
        moment = datetime.fromisoformat(text)
    except (ValueError, OverflowError):
        raise ValueError(f"{name}: not an ISO 8601 date or time: {text[:40]!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=zone)


@dataclass(frozen=True)
class Counters:
    recipients: int = 0
    sent: int = 0
    deferred: int = 0
    bounced_soft: int = 0
    bounced_hard: int = 0
    not_sent: int = 0
    opens_unique: int = 0
    opens_total: int = 0
    opens_machine: int = 0
    clicks_unique: int = 0
    clicks_total: int = 0
    clicks_machine: int = 0
    unsubscribes: int = 0
    complaints: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}


@dataclass(frozen=True)
class SendStatistics:
    send_id: int
    subject: str | None
    created_at: datetime
    counters: Counters


@dataclass(frozen=True)
class AccountStatistics:
    start: datetime
    end: datetime
    totals: Counters
    # Every day of the range, in the account's time zone, oldest first.
    days: list[tuple[date, Counters]]


class StatisticsStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    async def send(self, send_id: int, account_id: int | None = None
                   ) -> SendStatistics | None:
        """The send's counters; None when there is no such send (of that account)."""
        return await self.db.run_interaction("send_statistics", _send_txn, send_id,
                                             account_id)

    async def account(self, account_id: int, start: datetime, end: datetime,
                      timezone: str) -> AccountStatistics:
        """The account's counters over [start, end), in total and per day of `timezone`
        (an IANA name PostgreSQL knows)."""
        return await self.db.run_interaction("account_statistics", _account_txn, account_id,
                                             start, end, timezone)

    async def timezone(self, account_id: int) -> str | None:
        """The account's time zone (accounts.timezone), None when there is no account."""
        return await self.db.run_interaction("account_timezone", _timezone_txn, account_id)


# The counters' parts, per (type, machine): events, and distinct deliveries of opens and
# clicks. The GROUP BY follows the index's order.
_TALLY = ("type, machine, count(*), count(DISTINCT delivery_id)"
          f" FILTER (WHERE type IN ('{EventType.OPEN}', '{EventType.CLICK}'))")
# Not sent at submission: a not_sent event whose delivery was never queued.
_NOT_QUEUED = (f"type = '{EventType.NOT_SENT}' AND NOT EXISTS (SELECT 1 FROM events q"
               f" WHERE q.delivery_id = events.delivery_id AND q.type = '{EventType.QUEUED}')")
_HARD_BOUNCE = f"type = '{EventType.BOUNCED}' AND details->>'type' = 'hard'"


async def _send_txn(cursor, send_id: int, account_id: int | None) -> SendStatistics | None:
    await cursor.execute("SELECT subject, created_at FROM sends WHERE id = %s"
                         " AND (%s::bigint IS NULL OR account_id = %s)",
                         (send_id, account_id, account_id))
    send = cursor.fetchone()
    if send is None:
        return None
    await cursor.execute(f"SELECT {_TALLY} FROM events WHERE send_id = %s"
                         " GROUP BY type, machine", (send_id,))
    tally = cursor.fetchall()
    extra = {}
    for name, condition in (("not_queued", _NOT_QUEUED), ("hard", _HARD_BOUNCE)):
        await cursor.execute(f"SELECT count(*) FROM events WHERE send_id = %s AND {condition}",
                             (send_id,))
        extra[name] = cursor.fetchone()[0]
    await cursor.execute(
        "SELECT count(*) FROM deliveries d JOIN messages m ON m.id = d.message_id"
        " WHERE m.send_id = %s AND d.state = 'deferred'", (send_id,))
    deferred = cursor.fetchone()[0]
    return SendStatistics(send_id, send[0], send[1],
                          _counters(tally, extra["not_queued"], extra["hard"], deferred))


def _counters(tally: list[tuple], not_queued: int, hard_bounces: int, deferred: int,
              unique: dict[str, int] | None = None) -> Counters:
    """Counters from _TALLY rows (type, machine, events, distinct deliveries); `unique`
    overrides the distinct deliveries of opens and clicks (over several days)."""
    events: dict[tuple[str, bool], int] = {}
    deliveries: dict[str, int] = {}
    for type_, machine, count, distinct in tally:
        events[type_, machine] = events.get((type_, machine), 0) + count
        if not machine:
            deliveries[type_] = deliveries.get(type_, 0) + (distinct or 0)
    if unique is not None:
        deliveries = unique

    def people(type_: EventType) -> int:
        return events.get((type_, False), 0)

    def every(type_: EventType) -> int:
        return people(type_) + events.get((type_, True), 0)

    return Counters(
        recipients=every(EventType.QUEUED) + not_queued, sent=every(EventType.SENT),
        deferred=deferred, bounced_soft=every(EventType.BOUNCED) - hard_bounces,
        bounced_hard=hard_bounces, not_sent=every(EventType.NOT_SENT),
        opens_unique=deliveries.get(EventType.OPEN, 0), opens_total=people(EventType.OPEN),
        opens_machine=events.get((EventType.OPEN, True), 0),
        clicks_unique=deliveries.get(EventType.CLICK, 0), clicks_total=people(EventType.CLICK),
        clicks_machine=events.get((EventType.CLICK, True), 0),
        unsubscribes=every(EventType.UNSUBSCRIBED), complaints=every(EventType.COMPLAINT))


async def _account_txn(cursor, account_id: int, start: datetime, end: datetime,
                       timezone: str) -> AccountStatistics:
    params: dict[str, Any] = {"account": account_id, "start": start, "end": end,
                              "tz": timezone}
    in_range = ("account_id = %(account)s AND occurred_at >= %(start)s"
                " AND occurred_at < %(end)s")
    day = "(occurred_at AT TIME ZONE %(tz)s)::date"
    await cursor.execute(f"SELECT {day}, {_TALLY} FROM events WHERE {in_range}"
                         " GROUP BY 1, type, machine", params)
    tally: dict[date, list[tuple]] = {}
    for row in cursor.fetchall():
        tally.setdefault(row[0], []).append(row[1:])
    per_day: dict[str, dict[date, int]] = {}
    for name, condition in (("not_queued", _NOT_QUEUED), ("hard", _HARD_BOUNCE)):
        await cursor.execute(f"SELECT {day}, count(*) FROM events WHERE {in_range}"
                             f" AND {condition} GROUP BY 1", params)
        per_day[name] = dict(cursor.fetchall())
    await cursor.execute(
        "SELECT (created_at AT TIME ZONE %(tz)s)::date, count(*) FROM deliveries"
        " WHERE account_id = %(account)s AND created_at >= %(start)s AND created_at < %(end)s"
        f" AND state = 'deferred' AND kind <> '{NOTICE}' GROUP BY 1", params)
    per_day["deferred"] = dict(cursor.fetchall())
    await cursor.execute(
        f"SELECT type, count(DISTINCT delivery_id) FROM events WHERE {in_range}"
        f" AND type IN ('{EventType.OPEN}', '{EventType.CLICK}') AND NOT machine"
        " GROUP BY type", params)
    unique = dict(cursor.fetchall())
    await cursor.execute("SELECT (%(start)s::timestamptz AT TIME ZONE %(tz)s)::date,"
                         " ((%(end)s::timestamptz - interval '1 microsecond')"
                         " AT TIME ZONE %(tz)s)::date", params)
    first, last = cursor.fetchone()
    days = []
    for ordinal in range(first.toordinal(), last.toordinal() + 1):
        today = date.fromordinal(ordinal)
        days.append((today, _counters(tally.get(today, []), per_day["not_queued"].get(today, 0),
                                      per_day["hard"].get(today, 0),
                                      per_day["deferred"].get(today, 0))))
    totals = Counters(**{name: sum(getattr(c, name) for _, c in days) for name in COUNTERS})
    totals = dataclasses.replace(totals, opens_unique=unique.get(EventType.OPEN, 0),
                                 clicks_unique=unique.get(EventType.CLICK, 0))
    return AccountStatistics(start, end, totals, days)


async def _timezone_txn(cursor, account_id: int) -> str | None:
    await cursor.execute("SELECT timezone FROM accounts WHERE id = %s", (account_id,))
    row = cursor.fetchone()
    return row[0] if row else None
