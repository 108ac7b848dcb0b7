"""The event log (E-1): the one list of event types, and the store that writes events.

Everything that happens to a message after it is submitted is a row in `events`,
which the statistics, the API views and the webhooks read. The hot batch
statements of the submissions and the delivery queue write their events inside
their own statement (one statement per batch), with the types taken from
`EventType`; every other writer (tracking, inbound, the APIs) goes through
`EventStore`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from psycopg2.extras import Json

from mailgw.store.database import Database, PreparedStatement
from mailgw.store.group_commit import GroupCommitter


class EventType(StrEnum):
    """Every type of event; the CHECK of `events.type` lists the same (a test compares
    them). Each line says what the event means, who writes it and its `details`."""

    # A recipient's copy entered the delivery queue (S-12). SubmissionStore.
    QUEUED = "queued"
    # The recipient's MX accepted it (D-5); details: reply. QueueStore.
    SENT = "sent"
    # A 4xx or connection trouble; it is retried (D-5); details: reply. QueueStore.
    DEFERRED = "deferred"
    # A 5xx, or retried past the maximum age (D-5); details: type (hard or soft),
    # reply. QueueStore; later also the inbound DSNs (D-7).
    BOUNCED = "bounced"
    # Not sent to a suppressed or invalid recipient, or a deleted message (D-6);
    # details: reason. SubmissionStore at submission, QueueStore at delivery.
    NOT_SENT = "not_sent"
    # The open pixel was fetched (T-1), or a person followed a link of a message whose
    # pixel they had not fetched (images blocked). The tracking endpoints, through
    # EventStore; `machine` set for privacy proxies and scanners (T-6). details: ip,
    # user_agent, device_type, os, browser, city, region, country, country_code,
    # latitude, longitude (mailgw/events/recorder.py), machine_reason when `machine`,
    # implied_by: "click" for an open a click implied.
    OPEN = "open"
    # A tracked link was followed (T-2). The tracking endpoints, through EventStore;
    # details: url (the destination) and what an open's say.
    CLICK = "click"
    # The recipient unsubscribed from the sender's domain, or changed which of the
    # account's categories they receive (T-3). The tracking endpoints, through
    # TrackingStore; details: subscription_type ("domain subscription cancelled" or
    # "domain category update"), domain, reason, method ("one-click" or "page"),
    # categories ({name: "cancelled" or "active"}, category updates only), and the
    # client fields of opens.
    UNSUBSCRIBED = "unsubscribed"
    # A contact was subscribed again: from the unsubscribe page (T-3), through
    # TrackingStore, with subscription_type "domain subscription reactivated", domain,
    # method and client fields; or by the APIs (H-2), through EventStore.
    RESUBSCRIBED = "resubscribed"
    # A complaint (ARF) arrived (D-7). The inbound processing, through EventStore.
    COMPLAINT = "complaint"
    # A contact reached the hard-bounce limit and is no longer sent to (D-7);
    # details: reason. QueueStore.
    INVALIDATED = "invalidated"
    # An invalid contact was made valid again (H-2). The APIs, through EventStore.
    REVALIDATED = "revalidated"


@dataclass(frozen=True)
class Event:
    """One event of an account, about a send, message, delivery or contact."""

    account_id: int
    type: EventType
    # What the type's comment says (a reply, a reason, a URL ...).
    details: dict[str, Any] = field(default_factory=dict)
    # What it is about, as far as known: an open knows its delivery, and so its
    # message and send; an invalidation knows only its contact and send.
    send_id: int | None = None
    message_id: int | None = None
    delivery_id: int | None = None
    contact_id: int | None = None
    # The address, kept when the contact is deleted.
    recipient: str | None = None
    # None when writing: the time of the transaction that writes it.
    occurred_at: datetime | None = None
    # T-6: a mail privacy proxy's open or a link scanner's click, not a person's.
    machine: bool = False


class EventStore:
    def __init__(self, database: Database, committer: GroupCommitter) -> None:
        self.db = database
        self.committer = committer

    async def record(self, event: Event) -> int:
        """Write one event, group-committed with other callers' (principle 3); its id
        once committed."""
        [event_id] = await self.record_many([event])
        return event_id

    async def record_many(self, events: Sequence[Event]) -> list[int]:
        """Write the events in one transaction (shared with other callers'); their ids,
        in order, once committed."""
        if not events:
            return []
        return await self.committer.run("record_events", _record_events_txn, tuple(events))

    async def events_for_delivery(self, delivery_id: int) -> list[Event]:
        """A delivery's events, oldest first."""
        return await self.db.run_interaction("events_for_delivery",
                                             _events_for_delivery_txn, delivery_id)


async def insert_events(cursor, events: Sequence[Event]) -> list[int]:
    """Write events in the caller's transaction, with the rows they are about (an
    unsubscribe's suppressions): their ids, in order."""
    [ids] = await _record_events_txn(cursor, [tuple(events)])
    return ids


# The ids are drawn first, so that each caller gets its own whatever order the rows
# are inserted in.
_RECORD_EVENTS = PreparedStatement(
    "record_events",
    "WITH input AS ("
    "  SELECT nextval('events_id_seq') AS id, i.*"
    "  FROM unnest(%(accounts)s::bigint[], %(types)s::text[], %(sends)s::bigint[],"
    "   %(messages)s::bigint[], %(deliveries)s::bigint[], %(contacts)s::bigint[],"
    "   %(recipients)s::text[], %(details)s::jsonb[], %(occurred)s::timestamptz[],"
    "   %(machine)s::boolean[])"
    "  WITH ORDINALITY AS i(account_id, type, send_id, message_id, delivery_id,"
    "   contact_id, recipient, details, occurred_at, machine, n)),"
    " event AS ("
    "  INSERT INTO events (id, account_id, type, send_id, message_id, delivery_id,"
    "   contact_id, recipient, details, occurred_at, machine) OVERRIDING SYSTEM VALUE"
    "  SELECT id, account_id, type, send_id, message_id, delivery_id, contact_id,"
    "   recipient, details, coalesce(occurred_at, now()), machine FROM input)"
    " SELECT id FROM input ORDER BY n")


async def _record_events_txn(cursor, batches: list[tuple[Event, ...]]) -> list[list[int]]:
    """Every caller's events in one statement; each caller's ids back."""
    events = [event for batch in batches for event in batch]
    await _RECORD_EVENTS.execute(cursor, {
        "accounts": [e.account_id for e in events], "types": [e.type for e in events],
        "sends": [e.send_id for e in events], "messages": [e.message_id for e in events],
        "deliveries": [e.delivery_id for e in events],
        "contacts": [e.contact_id for e in events],
        "recipients": [e.recipient for e in events],
        "details": [Json(e.details) for e in events],
        "occurred": [e.occurred_at for e in events],
        "machine": [e.machine for e in events]})
    ids = iter(row[0] for row in cursor.fetchall())
    return [[next(ids) for _ in batch] for batch in batches]


async def _events_for_delivery_txn(cursor, delivery_id: int) -> list[Event]:
    await cursor.execute(
        "SELECT account_id, type, details, send_id, message_id, delivery_id, contact_id,"
        " recipient, occurred_at, machine FROM events WHERE delivery_id = %s ORDER BY id",
        (delivery_id,))
    return [Event(row[0], EventType(row[1]), *row[2:]) for row in cursor.fetchall()]
