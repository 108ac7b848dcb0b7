"""Queue administration (O-7): what an operator sees and steers in the delivery queue.

The `mailgw queue` commands and the management API call the same methods, which
return dataclasses and raise `NotFound` for a delivery or account that does not
exist, `BadQueueRequest` for input that names nothing sensible (an unknown
state, a domain that is no domain) and `QueueActionRefused` for an action that
would change nothing or must not change what it names (retrying a delivery
already sent, suspending a domain twice). Either way nothing is changed; the
message is the operator's explanation (over HTTP: 404, 400 and 409).

    counts(QueueFilter(state, account, domain)) -> [QueueCount]
    deliveries(QueueFilter(...), limit)         -> [DeliverySummary]
    show(delivery_id)                           -> DeliveryDetails (events: attempts, replies)
    retry(delivery_id)                          -> DeliverySummary
    retry_domain(domain)                        -> how many deferred deliveries are due now
    cancel(delivery_id, reason)                 -> DeliverySummary (not_sent)
    suspend(domain, reason)                     -> SuspendedDomain (held now)
    resume(domain)                              -> how many held deliveries are due now
    suspended()                                 -> [SuspendedDomain]
    depth()                                     -> metrics.QueueDepth (for /metrics)

A suspended recipient domain (table `suspended_domains`) holds its deliveries on
every node, across restarts: they wait with next_attempt_at 'infinity' and are
neither attempted nor bounced (see schema/008_operator.sql and the claim in
queue.py). Resuming makes them due at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg2.extras import Json

from mailgw.errors import NotFound
from mailgw.metrics import QueueDepth
from mailgw.store.database import Database
from mailgw.store.events import EventType
from mailgw.text import one_line

# Deliveries still to be sent (the queue proper), and every state a delivery can have.
WAITING_STATES = ("queued", "deferred")
DELIVERY_STATES = ("queued", "deferred", "sent", "bounced", "not_sent")
# Deliveries listed at most at once: a listing is for reading, not for export.
MAX_LISTED = 1000
MAX_REASON_LENGTH = 200
# A scrape waits for the queue's depth (metrics.QUEUE_READ_SECONDS); the query itself
# stops soon after, rather than go on loading the database for nobody.
DEPTH_QUERY_SECONDS = 5
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# The recipient domain of a delivery, as the claim reads it (the last "@" separates it).
_DOMAIN_OF_RECIPIENT = "split_part(d.recipient, '@', -1)"


class BadQueueRequest(ValueError):
    """Input that names nothing sensible; str() says what is wrong."""


class QueueActionRefused(Exception):
    """The action would change nothing, or what it names must not change; str() says
    why. Nothing was changed."""


@dataclass(frozen=True)
class QueueFilter:
    """Which deliveries: a state (default: the waiting ones, queued and deferred), an
    account name and a recipient domain; None means any."""

    state: str | None = None
    account: str | None = None
    domain: str | None = None

    def checked(self) -> QueueFilter:
        """The filter with its domain in the form deliveries hold; BadQueueRequest for a
        state or domain that cannot match anything."""
        if self.state is not None and self.state not in DELIVERY_STATES:
            raise BadQueueRequest(f"state must be one of {', '.join(DELIVERY_STATES)}, not "
                                  f"{one_line(self.state)[:40]!r}")
        if self.account is not None and not self.account.strip():
            raise BadQueueRequest("account must be an account name, not empty")
        domain = None if self.domain is None else recipient_domain(self.domain)
        return QueueFilter(self.state, self.account, domain)


@dataclass(frozen=True)
class QueueCount:
    """How many deliveries share a state, an account and a recipient domain."""

    state: str
    account: str
    domain: str
    deliveries: int
    # Of them, held by the domain's suspension.
    held: int
    # When the oldest of them was queued.
    oldest: datetime


@dataclass(frozen=True)
class DeliverySummary:
    id: int
    account: str
    recipient: str
    state: str
    attempts: int
    # When it is tried next; None when it is not waiting, or held.
    next_attempt_at: datetime | None
    # Held by its domain's suspension.
    held: bool
    # A node holds its lease: an attempt is under way.
    sending: bool
    last_reply: str | None
    created_at: datetime


@dataclass(frozen=True)
class DeliveryEvent:
    """A line of a delivery's history: its event type and what the event says (the
    remote reply of an attempt, the reason it was not sent)."""

    occurred_at: datetime
    type: EventType
    details: dict[str, Any]


@dataclass(frozen=True)
class DeliveryDetails:
    delivery: DeliverySummary
    send_id: int
    message_id: int
    sender: str
    # The header From when the client's was kept, else None (the sender).
    from_address: str | None
    subject: str | None
    first_attempt_at: datetime | None
    last_attempt_at: datetime | None
    # Oldest first: queued, then each attempt's outcome with the remote reply.
    events: tuple[DeliveryEvent, ...]


@dataclass(frozen=True)
class SuspendedDomain:
    domain: str
    reason: str
    suspended_at: datetime
    # Deliveries held for it now.
    held: int


def recipient_domain(value: str) -> str:
    """A domain as recipients' addresses hold it: lowercased, an IDN in Unicode (as
    email-validator writes it); BadQueueRequest when it is not a domain name."""
    domain = value.strip().lower().rstrip(".")
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        ascii_domain = ""
    labels = ascii_domain.split(".")
    if (len(labels) < 2 or len(ascii_domain) > 253
            or not all(_LABEL.fullmatch(label) for label in labels)):
        raise BadQueueRequest(f"not a domain name: {one_line(value)[:80]!r}")
    return ascii_domain.encode("ascii").decode("idna")


def _reason(text: str) -> str:
    reason = one_line(text)
    if len(reason) > MAX_REASON_LENGTH:
        raise BadQueueRequest(f"a reason is at most {MAX_REASON_LENGTH} characters")
    return reason


class QueueAdminStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    async def counts(self, which: QueueFilter = QueueFilter()) -> list[QueueCount]:
        """The deliveries `which` selects, counted by state, account and domain."""
        return await self.db.run_interaction("queue_counts", _counts_txn, which.checked())

    async def deliveries(self, which: QueueFilter = QueueFilter(),
                         limit: int = 100) -> list[DeliverySummary]:
        """Up to `limit` of the deliveries `which` selects, the next due first."""
        if not 0 < limit <= MAX_LISTED:
            raise BadQueueRequest(f"a listing holds 1 to {MAX_LISTED} deliveries, not "
                                  f"{limit}")
        return await self.db.run_interaction("queue_deliveries", _deliveries_txn,
                                             which.checked(), limit)

    async def show(self, delivery_id: int) -> DeliveryDetails:
        """One delivery with its message and its history from the event log."""
        found = await self.db.run_interaction("queue_show", _show_txn, delivery_id)
        if found is None:
            raise _no_delivery(delivery_id)
        return found

    async def retry(self, delivery_id: int) -> DeliverySummary:
        """Try a waiting delivery now, whenever its retry was due."""
        return await self.db.run_interaction("queue_retry", _retry_txn, delivery_id)

    async def retry_domain(self, domain: str) -> int:
        """Try every deferred delivery to `domain` now; how many there were."""
        return await self.db.run_interaction("queue_retry_domain", _retry_domain_txn,
                                             recipient_domain(domain))

    async def cancel(self, delivery_id: int, reason: str = "") -> DeliverySummary:
        """Never send a waiting delivery: it becomes not_sent, with a not_sent event
        giving the reason (D-6, E-1)."""
        given = _reason(reason)
        text = f"cancelled by the operator: {given}" if given else "cancelled by the operator"
        return await self.db.run_interaction("queue_cancel", _cancel_txn, delivery_id, text)

    async def suspend(self, domain: str, reason: str = "") -> SuspendedDomain:
        """Hold every delivery to `domain`, on every node, until resume()."""
        return await self.db.run_interaction("queue_suspend", _suspend_txn,
                                             recipient_domain(domain), _reason(reason))

    async def resume(self, domain: str) -> int:
        """End `domain`'s suspension; its held deliveries are due now (how many)."""
        return await self.db.run_interaction("queue_resume", _resume_txn,
                                             recipient_domain(domain))

    async def suspended(self) -> list[SuspendedDomain]:
        return await self.db.run_interaction("queue_suspended", _suspended_txn)

    async def depth(self) -> QueueDepth:
        """The waiting deliveries by where they are, and how late the earliest due one
        is (O-5, /metrics): one query over the queue's rows (the partial index of the
        waiting ones), which PostgreSQL stops after DEPTH_QUERY_SECONDS."""
        return await self.db.run_interaction("queue_depth", _depth_txn)


def _no_delivery(delivery_id: int) -> NotFound:
    return NotFound(f"no delivery {delivery_id}")


def _where(which: QueueFilter) -> tuple[str, list[Any]]:
    """The WHERE clause over deliveries d and accounts a, and its parameters."""
    conditions, params = [], []
    if which.state is None:
        conditions.append("d.state IN ('queued', 'deferred')")
    else:
        conditions.append("d.state = %s")
        params.append(which.state)
    if which.account is not None:
        conditions.append("a.name = %s")
        params.append(which.account)
    if which.domain is not None:
        conditions.append(f"{_DOMAIN_OF_RECIPIENT} = %s")
        params.append(which.domain)
    return " AND ".join(conditions), params


async def _check_account(cursor, which: QueueFilter) -> None:
    if which.account is not None:
        await cursor.execute("SELECT 1 FROM accounts WHERE name = %s", (which.account,))
        if cursor.fetchone() is None:
            raise NotFound(f"no account named {which.account!r}")


async def _counts_txn(cursor, which: QueueFilter) -> list[QueueCount]:
    await _check_account(cursor, which)
    where, params = _where(which)
    await cursor.execute(
        f"SELECT d.state, a.name, {_DOMAIN_OF_RECIPIENT} AS domain, count(*),"
        "  count(*) FILTER (WHERE d.next_attempt_at = 'infinity'), min(d.created_at)"
        " FROM deliveries d JOIN accounts a ON a.id = d.account_id"
        f" WHERE {where} GROUP BY 1, 2, 3 ORDER BY 4 DESC, 1, 2, 3", params)
    return [QueueCount(*row) for row in cursor.fetchall()]


_SUMMARY_COLUMNS = (
    "d.id, a.name, d.recipient, d.state, d.attempts,"
    " CASE WHEN d.state IN ('queued', 'deferred') AND d.next_attempt_at <> 'infinity'"
    "  THEN d.next_attempt_at END,"
    " d.state IN ('queued', 'deferred') AND d.next_attempt_at = 'infinity',"
    " coalesce(d.lease_expires_at > now(), false), d.last_reply, d.created_at")


async def _deliveries_txn(cursor, which: QueueFilter, limit: int) -> list[DeliverySummary]:
    await _check_account(cursor, which)
    where, params = _where(which)
    await cursor.execute(
        f"SELECT {_SUMMARY_COLUMNS} FROM deliveries d JOIN accounts a ON a.id = d.account_id"
        f" WHERE {where} ORDER BY d.next_attempt_at, d.id LIMIT %s", [*params, limit])
    return [DeliverySummary(*row) for row in cursor.fetchall()]


async def _summary(cursor, delivery_id: int, lock: bool = False) -> DeliverySummary | None:
    await cursor.execute(
        f"SELECT {_SUMMARY_COLUMNS} FROM deliveries d JOIN accounts a ON a.id = d.account_id"
        f" WHERE d.id = %s{' FOR UPDATE OF d' if lock else ''}", (delivery_id,))
    row = cursor.fetchone()
    return None if row is None else DeliverySummary(*row)


async def _show_txn(cursor, delivery_id: int) -> DeliveryDetails | None:
    summary = await _summary(cursor, delivery_id)
    if summary is None:
        return None
    await cursor.execute(
        "SELECT m.send_id, m.id, m.sender, m.from_address, m.subject, d.first_attempt_at,"
        " d.last_attempt_at FROM deliveries d JOIN messages m ON m.id = d.message_id"
        " WHERE d.id = %s", (delivery_id,))
    message = cursor.fetchone()
    await cursor.execute("SELECT occurred_at, type, details FROM events WHERE delivery_id = %s"
                         " ORDER BY id", (delivery_id,))
    events = tuple(DeliveryEvent(occurred_at, EventType(type_), details)
                   for occurred_at, type_, details in cursor.fetchall())
    return DeliveryDetails(summary, *message, events)


async def _waiting(cursor, delivery_id: int, action: str) -> DeliverySummary:
    """The delivery, locked, when it is waiting and no attempt is under way."""
    summary = await _summary(cursor, delivery_id, lock=True)
    if summary is None:
        raise _no_delivery(delivery_id)
    if summary.state not in WAITING_STATES:
        reply = f" ({summary.last_reply})" if summary.last_reply else ""
        raise QueueActionRefused(f"delivery {delivery_id} is {summary.state}{reply}: it is "
                                 f"not in the queue, nothing to {action}")
    if summary.sending:
        raise QueueActionRefused(f"delivery {delivery_id} is being attempted now: {action} "
                                 "it once the attempt has ended (mailgw queue show)")
    return summary


async def _retry_txn(cursor, delivery_id: int) -> DeliverySummary:
    summary = await _waiting(cursor, delivery_id, "retry")
    if summary.held:
        domain = summary.recipient.rpartition("@")[2]
        raise QueueActionRefused(f"delivery {delivery_id} is held: {domain} is suspended "
                                 f"(mailgw queue resume {domain} sends everything held)")
    await cursor.execute("UPDATE deliveries SET next_attempt_at = now(), updated_at = now()"
                         " WHERE id = %s", (delivery_id,))
    return await _summary(cursor, delivery_id)


async def _retry_domain_txn(cursor, domain: str) -> int:
    await cursor.execute("SELECT 1 FROM suspended_domains WHERE domain = %s", (domain,))
    if cursor.fetchone() is not None:
        raise QueueActionRefused(f"{domain} is suspended: mailgw queue resume {domain} "
                                 "sends everything held for it")
    await cursor.execute(
        "UPDATE deliveries d SET next_attempt_at = now(), updated_at = now()"
        f" WHERE d.state = 'deferred' AND {_DOMAIN_OF_RECIPIENT} = %s"
        " AND d.next_attempt_at <> 'infinity'"
        " AND (d.lease_expires_at IS NULL OR d.lease_expires_at < now())", (domain,))
    if cursor.rowcount == 0:
        raise QueueActionRefused(f"no deferred deliveries to {domain}: nothing to retry")
    return cursor.rowcount


async def _cancel_txn(cursor, delivery_id: int, reason: str) -> DeliverySummary:
    await _waiting(cursor, delivery_id, "cancel")
    await cursor.execute(
        "WITH cancelled AS ("
        "  UPDATE deliveries SET state = 'not_sent', last_reply = %(reason)s,"
        "   updated_at = now() WHERE id = %(id)s"
        "  RETURNING id, account_id, message_id, contact_id, recipient)"
        " INSERT INTO events (account_id, send_id, message_id, delivery_id, contact_id,"
        "  recipient, type, details)"
        " SELECT c.account_id, m.send_id, c.message_id, c.id, c.contact_id, c.recipient,"
        "  %(type)s, %(details)s FROM cancelled c JOIN messages m ON m.id = c.message_id",
        {"reason": reason, "id": delivery_id, "type": EventType.NOT_SENT,
         "details": Json({"reason": reason})})
    return await _summary(cursor, delivery_id)


async def _suspend_txn(cursor, domain: str, reason: str) -> SuspendedDomain:
    await cursor.execute(
        "INSERT INTO suspended_domains (domain, reason) VALUES (%s, %s)"
        " ON CONFLICT (domain) DO NOTHING RETURNING suspended_at", (domain, reason))
    row = cursor.fetchone()
    if row is None:
        await cursor.execute("SELECT suspended_at FROM suspended_domains WHERE domain = %s",
                             (domain,))
        (since,) = cursor.fetchone()
        raise QueueActionRefused(f"{domain} is already suspended (since "
                                 f"{since.isoformat(' ', 'seconds')})")
    # Attempts under way (leased) end as they will; a deferral is parked by the next claim.
    await cursor.execute(
        "UPDATE deliveries d SET next_attempt_at = 'infinity', updated_at = now()"
        f" WHERE d.state IN ('queued', 'deferred') AND {_DOMAIN_OF_RECIPIENT} = %s"
        " AND d.next_attempt_at <> 'infinity'"
        " AND (d.lease_expires_at IS NULL OR d.lease_expires_at < now())", (domain,))
    return SuspendedDomain(domain, reason, row[0], cursor.rowcount)


async def _resume_txn(cursor, domain: str) -> int:
    await cursor.execute("DELETE FROM suspended_domains WHERE domain = %s RETURNING domain",
                         (domain,))
    if cursor.fetchone() is None:
        raise QueueActionRefused(f"{domain} is not suspended")
    await cursor.execute(
        "UPDATE deliveries d SET next_attempt_at = now(), updated_at = now()"
        f" WHERE d.state IN ('queued', 'deferred') AND d.next_attempt_at = 'infinity'"
        f" AND {_DOMAIN_OF_RECIPIENT} = %s", (domain,))
    return cursor.rowcount


async def _suspended_txn(cursor) -> list[SuspendedDomain]:
    await cursor.execute(
        "SELECT s.domain, s.reason, s.suspended_at, (SELECT count(*) FROM deliveries d"
        "  WHERE d.state IN ('queued', 'deferred') AND d.next_attempt_at = 'infinity'"
        f"  AND {_DOMAIN_OF_RECIPIENT} = s.domain)"
        " FROM suspended_domains s ORDER BY s.domain")
    return [SuspendedDomain(*row) for row in cursor.fetchall()]


async def _depth_txn(cursor) -> QueueDepth:
    await cursor.execute(f"SET LOCAL statement_timeout = '{DEPTH_QUERY_SECONDS}s'")
    await cursor.execute(
        "SELECT count(*) FILTER (WHERE sending),"
        " count(*) FILTER (WHERE held AND NOT sending),"
        " count(*) FILTER (WHERE state = 'queued' AND NOT held AND NOT sending),"
        " count(*) FILTER (WHERE state = 'deferred' AND NOT held AND NOT sending),"
        " coalesce(extract(epoch FROM now() - min(next_attempt_at)"
        "  FILTER (WHERE next_attempt_at <= now() AND NOT sending)), 0)::float8"
        " FROM (SELECT state, next_attempt_at, next_attempt_at = 'infinity' AS held,"
        "  coalesce(lease_expires_at > now(), false) AS sending FROM deliveries"
        "  WHERE state IN ('queued', 'deferred')) d")
    sending, held, queued, deferred, oldest = cursor.fetchone()
    await cursor.execute("SELECT (SELECT count(*) FROM webhook_deliveries"
                         "  WHERE state = 'pending') + (SELECT count(*) FROM webhook_outbox)")
    return QueueDepth({"queued": queued, "deferred": deferred, "sending": sending,
                       "held": held}, oldest, cursor.fetchone()[0])
