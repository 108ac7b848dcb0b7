"""The event log as the DMDS API reads it (H-2, E-2): a batch's (eeid's) events, its
recipients' trace and the copies kept of an archived batch, and an account's events
between two times, page by page. The DMDS names of the events are a projection made
in one place, mailgw.events.dmds; here they are rows of the log, with the batch
(eeid) and the campaign each belongs to.

Events are ordered by their time and then their id, an order that does not change
as events are added after the last page, so that pages do not overlap or skip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mailgw.store.database import Database


@dataclass(frozen=True)
class LoggedEvent:
    """An event of the log, with the eeid of its send and its campaign's name."""

    type: str
    details: dict[str, Any]
    occurred_at: datetime
    recipient: str | None
    eeid: str | None
    campaign: str | None
    # T-6: a mail privacy proxy's open or a link scanner's click, not a person's.
    machine: bool = False


@dataclass(frozen=True)
class Batch:
    """A send as DMDS sees it: an eeid (envío efectivo)."""

    send_id: int
    eeid: str
    created_at: datetime
    sender: str | None
    subject: str | None
    archive: bool
    campaign_numid: int | None
    campaign: str | None


@dataclass(frozen=True)
class BatchCounts:
    messages: int
    # Deliveries (one per recipient, copies included) by state.
    states: dict[str, int]


@dataclass(frozen=True)
class TracedDelivery:
    """One recipient of a batch as its archive section lists it."""

    recipient: str
    kind: str
    state: str
    last_reply: str | None
    attempts: int
    last_attempt_at: datetime | None
    eml_kept: bool


_EVENTS = ("SELECT e.type, e.details, e.occurred_at, e.recipient, s.eeid::text, c.name,"
           " e.machine"
           " FROM events e LEFT JOIN sends s ON s.id = e.send_id"
           " LEFT JOIN campaigns c ON c.id = s.campaign_id")
_ORDER = " ORDER BY e.occurred_at, e.id"


def _events(rows) -> list[LoggedEvent]:
    return [LoggedEvent(*row) for row in rows]


class DMDSEventStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    async def batch(self, account_id: int, eeid: str) -> Batch | None:
        """The account's send with this eeid; None for another account's (or none)."""
        return await self.db.run_interaction("dmds_batch", _batch_txn, account_id, eeid)

    async def batch_counts(self, send_id: int) -> BatchCounts:
        return await self.db.run_interaction("dmds_batch_counts", _batch_counts_txn, send_id)

    async def batch_events(self, send_id: int, types: Sequence[str], offset: int,
                           limit: int) -> list[LoggedEvent]:
        return await self.db.run_interaction("dmds_batch_events", _batch_events_txn,
                                             send_id, list(types), offset, limit)

    async def trace(self, send_id: int) -> list[TracedDelivery]:
        """Every recipient of the batch, in the order they were queued."""
        return await self.db.run_interaction("dmds_trace", _trace_txn, send_id)

    async def sent_copy(self, send_id: int, email: str) -> tuple[str | None, bytes | None]:
        """The state of the delivery to `email` in the batch (None: not a recipient), and
        the copy it was sent when it was kept (the latest, if it was sent several)."""
        return await self.db.run_interaction("dmds_sent_copy", _sent_copy_txn, send_id,
                                             email.lower())

    async def events_between(self, account_id: int, types: Sequence[str], start: datetime,
                             end: datetime, offset: int, limit: int) -> list[LoggedEvent]:
        """The account's events of `types` from `start` to `end` (both included)."""
        return await self.db.run_interaction("dmds_events_between", _events_between_txn,
                                             account_id, list(types), start, end, offset,
                                             limit)

    async def count_between(self, account_id: int, types: Sequence[str], start: datetime,
                            end: datetime) -> int:
        return await self.db.run_interaction("dmds_count_between", _count_between_txn,
                                             account_id, list(types), start, end)


async def _batch_txn(cursor, account_id: int, eeid: str) -> Batch | None:
    await cursor.execute(
        "SELECT s.id, s.eeid::text, s.created_at, s.sender, s.subject, s.archive, c.numid,"
        " c.name FROM sends s LEFT JOIN campaigns c ON c.id = s.campaign_id"
        " WHERE s.account_id = %s AND s.eeid = %s::uuid", (account_id, eeid))
    row = cursor.fetchone()
    return Batch(*row) if row else None


async def _batch_counts_txn(cursor, send_id: int) -> BatchCounts:
    await cursor.execute("SELECT count(*) FROM messages WHERE send_id = %s", (send_id,))
    messages = cursor.fetchone()[0]
    await cursor.execute(
        "SELECT d.state, count(*) FROM deliveries d JOIN messages m ON m.id = d.message_id"
        " WHERE m.send_id = %s GROUP BY d.state", (send_id,))
    return BatchCounts(messages, dict(cursor.fetchall()))


async def _batch_events_txn(cursor, send_id: int, types: list[str], offset: int,
                            limit: int) -> list[LoggedEvent]:
    await cursor.execute(
        f"{_EVENTS} WHERE e.send_id = %s AND e.type = ANY(%s){_ORDER} OFFSET %s LIMIT %s",
        (send_id, types, offset, limit))
    return _events(cursor.fetchall())


async def contact_events_txn(cursor, account_id: int, contact_id: int, types: list[str],
                             limit: int) -> list[LoggedEvent]:
    """A contact's last `limit` events of `types`, oldest first."""
    await cursor.execute(
        f"{_EVENTS} WHERE e.id IN (SELECT id FROM events WHERE contact_id = %s"
        "  AND account_id = %s AND type = ANY(%s) ORDER BY occurred_at DESC, id DESC"
        f"  LIMIT %s){_ORDER}", (contact_id, account_id, types, limit))
    return _events(cursor.fetchall())


async def _trace_txn(cursor, send_id: int) -> list[TracedDelivery]:
    await cursor.execute(
        "SELECT d.recipient, d.kind, d.state, d.last_reply, d.attempts, d.last_attempt_at,"
        " d.sent_eml IS NOT NULL FROM deliveries d JOIN messages m ON m.id = d.message_id"
        " WHERE m.send_id = %s ORDER BY d.id", (send_id,))
    return [TracedDelivery(*row) for row in cursor.fetchall()]


async def _sent_copy_txn(cursor, send_id: int, email: str
                        ) -> tuple[str | None, bytes | None]:
    await cursor.execute(
        "SELECT d.state, d.sent_eml FROM deliveries d JOIN messages m ON m.id = d.message_id"
        " WHERE m.send_id = %s AND lower(d.recipient) = %s"
        " ORDER BY d.sent_eml IS NOT NULL DESC, d.id DESC LIMIT 1", (send_id, email))
    row = cursor.fetchone()
    if row is None:
        return None, None
    return row[0], bytes(row[1]) if row[1] is not None else None


async def _events_between_txn(cursor, account_id: int, types: list[str], start: datetime,
                              end: datetime, offset: int, limit: int) -> list[LoggedEvent]:
    await cursor.execute(
        f"{_EVENTS} WHERE e.account_id = %s AND e.occurred_at BETWEEN %s AND %s"
        f" AND e.type = ANY(%s){_ORDER} OFFSET %s LIMIT %s",
        (account_id, start, end, types, offset, limit))
    return _events(cursor.fetchall())


async def _count_between_txn(cursor, account_id: int, types: list[str], start: datetime,
                             end: datetime) -> int:
    await cursor.execute(
        "SELECT count(*) FROM events WHERE account_id = %s AND occurred_at BETWEEN %s AND %s"
        " AND type = ANY(%s)", (account_id, start, end, types))
    return cursor.fetchone()[0]
