"""What the tracking endpoints read and write (T-1 to T-4, D-6).

A tracking token carries its delivery's id; the delivery is looked up with its message
and account in one query, batched with the other hits that arrive meanwhile (the
pixels of a campaign come in bursts). Unsubscribes and resubscribes change the
recipient's `suppressions` rows for the sender's domain (which every later send
honours, D-6) and write their event in the same transaction, group-committed; a change
that changes nothing (a mail client posting the one-click unsubscribe twice) writes no
event.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mailgw.accounts.settings import AccountSettings
from mailgw.store.database import Database
from mailgw.store.events import Event, EventType, insert_events
from mailgw.store.group_commit import GroupCommitter

# Aldeamo's subscription_type values (seed 001, 8.6 and 8.11).
DOMAIN_CANCELLED = "domain subscription cancelled"
DOMAIN_REACTIVATED = "domain subscription reactivated"
CATEGORY_UPDATE = "domain category update"
UNSUBSCRIBE, RESUBSCRIBE, CATEGORIES = "unsubscribe", "resubscribe", "categories"


@dataclass(frozen=True)
class TrackedDelivery:
    """A delivery as the tracking endpoints need it."""

    id: int
    account_id: int
    send_id: int
    message_id: int
    contact_id: int | None
    recipient: str
    state: str
    # When it was recorded sent (seconds since the epoch, by the database's clock).
    sent_at: float | None
    # The domain of the message's sender, which unsubscribes are for (D-6).
    sender_domain: str
    # The message's S-9 options (MessageOptions as stored).
    options: dict[str, Any]
    settings: AccountSettings
    # A person's open of it is recorded already (T-2: a click implies one otherwise).
    opened: bool

    @property
    def tracks_opens(self) -> bool:
        """T-5: the message had a pixel, and the account still tracks opens."""
        return bool(self.options.get("track_opens", True)) and self.settings.track_opens

    @property
    def tracks_clicks(self) -> bool:
        return bool(self.options.get("track_clicks", True)) and self.settings.track_clicks

    def event(self, type_: EventType, details: dict[str, Any], occurred_at: datetime,
              machine: bool = False) -> Event:
        return Event(self.account_id, type_, details, self.send_id, self.message_id,
                     self.id, self.contact_id, self.recipient, occurred_at, machine)


@dataclass(frozen=True)
class Subscription:
    """The recipient's unsubscribes for a delivery's sender domain."""

    # From all its mail.
    unsubscribed: bool
    # From these of the account's categories.
    cancelled: frozenset[str]


@dataclass(frozen=True)
class SubscriptionChange:
    delivery: TrackedDelivery
    # UNSUBSCRIBE (the whole sender domain), RESUBSCRIBE (to all of it again) or
    # CATEGORIES (the account's categories not in `keep` cancelled, the others active).
    action: str
    occurred_at: datetime
    # The event's details besides subscription_type, domain and categories (method,
    # reason, client).
    details: dict[str, Any] = field(default_factory=dict)
    keep: frozenset[str] = frozenset()


class TrackingStore:
    def __init__(self, database: Database, committer: GroupCommitter) -> None:
        self.db = database
        self.committer = committer
        # Lookups batched like writes: one query for the hits that arrive together.
        self._lookups = GroupCommitter(database)

    async def delivery(self, delivery_id: int) -> TrackedDelivery | None:
        """The delivery, or None when it is gone (its message or account deleted)."""
        return await self._lookups.run("tracked_deliveries", _deliveries_txn, delivery_id)

    async def subscription(self, delivery: TrackedDelivery) -> Subscription:
        return await self.db.run_interaction("subscription", _subscription_txn,
                                             delivery.account_id, delivery.recipient.lower(),
                                             delivery.sender_domain)

    async def change_subscription(self, change: SubscriptionChange) -> bool:
        """Carry out the change and write its event, once committed; False when it
        changed nothing (and wrote no event)."""
        return await self.committer.run("change_subscriptions", _change_subscriptions_txn,
                                        change)

    async def contact_fields(self, contact_id: int | None) -> dict[str, Any]:
        """The contact's fields (the merge tags' values), {} when there is none."""
        if contact_id is None:
            return {}
        return await self.db.run_interaction("contact_fields", _contact_fields_txn,
                                             contact_id)


# Planned at each run, not prepared: a plan made while `events` was small (a new
# installation) would scan it whole for every batch, for as long as the plan lived. The
# person's open is looked for with a subquery of its own (LIMIT 1), one index probe per
# delivery: as an EXISTS, PostgreSQL may turn it into a hashed scan of every event when
# its statistics lag behind a quickly growing table.
_TRACKED_DELIVERIES = (
    "SELECT d.id, d.account_id, m.send_id, d.message_id, d.contact_id, d.recipient,"
    " d.state, CASE WHEN d.state = 'sent' THEN extract(epoch FROM d.updated_at)::float8 END,"
    " split_part(m.sender, '@', 2), m.options, a.settings::text,"
    f" (SELECT true FROM events e WHERE e.delivery_id = d.id AND e.type = '{EventType.OPEN}'"
    "  AND NOT e.machine LIMIT 1) IS NOT NULL"
    " FROM deliveries d JOIN messages m ON m.id = d.message_id"
    " JOIN accounts a ON a.id = d.account_id"
    " WHERE d.id = ANY(%s)")


async def _deliveries_txn(cursor, delivery_ids: list[int]) -> list[TrackedDelivery | None]:
    await cursor.execute(_TRACKED_DELIVERIES, (delivery_ids,))
    found = {}
    for row in cursor.fetchall():
        found[row[0]] = TrackedDelivery(*row[:9], row[9] or {}, _settings(row[10]), row[11])
    return [found.get(delivery_id) for delivery_id in delivery_ids]


@functools.lru_cache(maxsize=1024)
def _settings(stored: str) -> AccountSettings:
    """An account's settings, read once per text: every hit of a campaign has the same."""
    return AccountSettings.from_json(json.loads(stored))


async def _subscription_txn(cursor, account_id: int, address: str, domain: str
                            ) -> Subscription:
    await cursor.execute(
        "SELECT category FROM suppressions WHERE account_id = %s AND address = %s"
        " AND scope_domain = %s AND reason = 'unsubscribed'", (account_id, address, domain))
    categories = [row[0] for row in cursor.fetchall()]
    return Subscription(None in categories, frozenset(c for c in categories if c is not None))


async def _change_subscriptions_txn(cursor, changes: list[SubscriptionChange]) -> list[bool]:
    """Each change in turn, in the order of (account, address), so that two batches
    changing the same rows never wait for each other in a cycle."""
    changed = [False] * len(changes)
    order = sorted(range(len(changes)), key=lambda i: (changes[i].delivery.account_id,
                                                       changes[i].delivery.recipient))
    for i in order:
        changed[i] = await _change_subscription(cursor, changes[i])
    return changed


# The unsubscribe from a whole sender domain, and the way back: (statement, Aldeamo's
# subscription_type, event type).
_DOMAIN_CHANGES = {
    UNSUBSCRIBE: ("INSERT INTO suppressions (account_id, address, scope_domain, reason)"
                  " VALUES (%s, %s, %s, 'unsubscribed') ON CONFLICT DO NOTHING",
                  DOMAIN_CANCELLED, EventType.UNSUBSCRIBED),
    RESUBSCRIBE: ("DELETE FROM suppressions WHERE account_id = %s AND address = %s"
                  " AND scope_domain = %s AND reason = 'unsubscribed'",
                  DOMAIN_REACTIVATED, EventType.RESUBSCRIBED),
}


async def _change_subscription(cursor, change: SubscriptionChange) -> bool:
    delivery = change.delivery
    # Suppressions hold addresses in lower case (D-6 compares with lower(recipient)).
    where = (delivery.account_id, delivery.recipient.lower(), delivery.sender_domain)
    details: dict[str, Any] = {"domain": delivery.sender_domain, **change.details}
    event_type = EventType.UNSUBSCRIBED
    if change.action in _DOMAIN_CHANGES:
        statement, details["subscription_type"], event_type = _DOMAIN_CHANGES[change.action]
        await cursor.execute(statement, where)
        changed = cursor.rowcount > 0
    elif change.action == CATEGORIES:
        categories = delivery.settings.categories
        cancelled = [c for c in categories if c not in change.keep]
        # The domain's own unsubscribe goes too: the recipient has chosen category by
        # category.
        await cursor.execute(
            "DELETE FROM suppressions WHERE account_id = %s AND address = %s"
            " AND scope_domain = %s AND reason = 'unsubscribed'"
            " AND (category IS NULL OR NOT category = ANY(%s))", (*where, cancelled))
        changed = cursor.rowcount > 0
        await cursor.execute(
            "INSERT INTO suppressions (account_id, address, scope_domain, category, reason)"
            " SELECT %s, %s, %s, c, 'unsubscribed' FROM unnest(%s::text[]) AS c"
            " ON CONFLICT DO NOTHING", (*where, cancelled))
        changed = changed or cursor.rowcount > 0
        details["subscription_type"] = CATEGORY_UPDATE
        details["categories"] = {c: "cancelled" if c in cancelled else "active"
                                 for c in categories}
    else:
        raise ValueError(f"not a subscription change: {change.action!r}")
    if changed:
        await insert_events(cursor, [delivery.event(event_type, details, change.occurred_at)])
    return changed


async def _contact_fields_txn(cursor, contact_id: int) -> dict[str, Any]:
    await cursor.execute("SELECT fields FROM contacts WHERE id = %s", (contact_id,))
    row = cursor.fetchone()
    return row[0] if row else {}
