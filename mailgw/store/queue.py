"""The delivery queue (D-1): due rows claimed with FOR UPDATE SKIP LOCKED and a lease.

Several mailgw nodes share one database: a row is worked on only by the node
whose lease it holds, and an expired lease (a node that died) makes the row
claimable again.  Outcomes are written with the lease checked, so a node that
lost its lease cannot overwrite another's result.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg2.extras import Json

from mailgw.accounts.settings import AccountSettings
from mailgw.store.database import Database, PreparedStatement
from mailgw.store.events import EventType
from mailgw.store.group_commit import GroupCommitter
from mailgw.store.notices import NOTICE, FeedbackNotice, queue_notices_txn


@dataclass(frozen=True)
class ClaimedDelivery:
    id: int
    message_id: int
    account_id: int
    send_id: int
    contact_id: int | None
    recipient: str
    attempts: int
    # Seconds since the delivery was queued (by the database's clock, shared by all
    # nodes): the maximum age counts from arrival, as Postfix's maximal_queue_lifetime.
    age: float
    fields: dict[str, Any]
    # Set when the recipient became suppressed after submission (D-6).
    suppressed: str | None


@dataclass(frozen=True)
class MessageContext:
    """What rendering needs of a message, loaded once per message."""

    id: int
    account_id: int
    sender: str
    reply_to: str | None
    body: dict[str, Any]
    options: dict[str, Any]
    account_settings: AccountSettings
    # The header From's address when the client's is kept, else None (the sender).
    from_address: str | None
    # The DKIM key and bounce domain of the From's domain (DMARC alignment), else of the
    # envelope sender's, when the domain is registered.
    dkim_domain: str | None
    dkim_selector: str | None
    dkim_algorithm: str | None
    dkim_private_key: str | None
    return_path_domain: str | None
    # The send is archived (DMDS archive): each recipient's copy is kept as sent (H-2).
    archive: bool = False
    # The account's DMDS global variables, for XYZ<NAME>XYZ tags (H-2).
    global_variables: Mapping[str, str] = field(default_factory=dict)


_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Outcome:
    """The result of one delivery attempt (D-5)."""

    delivery_id: int
    state: str  # sent, deferred, bounced or not_sent
    # A remote reply, or our own words (a connection error, a DNS failure, a name from
    # DNS); its control characters become blanks, as PostgreSQL refuses a NUL in text
    # and in jsonb, and the outcome could then never be recorded.
    reply: str
    # When to try again (deferred only), in seconds from now.
    retry_in: float | None = None
    # "hard" or "soft" for bounces.
    bounce_type: str | None = None
    # The message as sent (signed), kept for archived sends (H-2 eeid_eml).
    sent_eml: bytes | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "reply", _CONTROLS.sub(" ", self.reply))


class QueueStore:
    def __init__(self, database: Database, committer: GroupCommitter) -> None:
        self.db = database
        self.committer = committer

    async def claim(self, owner: str, limit: int, lease_seconds: int) -> list[ClaimedDelivery]:
        """Lease up to `limit` due deliveries to `owner`, in one query."""
        return await self.db.run_interaction("claim_deliveries", _claim_txn, owner, limit,
                                             lease_seconds)

    async def messages(self, message_ids: list[int]) -> dict[int, MessageContext]:
        return await self.db.run_interaction("load_messages", _messages_txn, message_ids)

    async def record(self, owner: str, outcome: Outcome, hard_bounce_limit: int) -> bool:
        """Write an outcome and its event; False if the lease was lost meanwhile."""
        return await self.committer.run("record_outcomes", _record_outcomes_txn,
                                        _Recording(owner, outcome, hard_bounce_limit))

    async def renew(self, owner: str, delivery_ids: list[int], lease_seconds: int) -> int:
        """Extend `owner`'s leases of deliveries still being worked on, in one statement,
        so that they never become claimable while this node holds them."""
        return await self.db.run_interaction("renew_leases", _renew_txn, owner, delivery_ids,
                                             lease_seconds)

    async def release(self, owner: str, keep: Sequence[int] = ()) -> int:
        """Give back the leases of deliveries not attempted (graceful stop), except those
        in `keep` (being sent: they must not be claimed by another node meanwhile)."""
        return await self.db.run_interaction("release_leases", _release_txn, owner, list(keep))


# The due rows of a suspended recipient domain (O-7) are parked out of the way in the
# same statement (next_attempt_at 'infinity', no attempt counted: see
# schema/008_operator.sql) rather than claimed: each is touched once, however long the
# suspension lasts, and with no domain suspended the check is one probe of an empty
# table per claimed row.
_CLAIM_DELIVERIES = PreparedStatement(
    "claim_deliveries",
    "WITH due AS ("
    "  SELECT id, EXISTS (SELECT 1 FROM suspended_domains s"
    "   WHERE s.domain = split_part(recipient, '@', -1)) AS held FROM deliveries"
    "  WHERE state IN ('queued', 'deferred') AND next_attempt_at <= now()"
    "  AND (lease_expires_at IS NULL OR lease_expires_at < now())"
    "  ORDER BY next_attempt_at LIMIT %(limit)s::integer FOR UPDATE SKIP LOCKED),"
    " parked AS ("
    "  UPDATE deliveries d SET next_attempt_at = 'infinity', updated_at = now()"
    "  FROM due WHERE d.id = due.id AND due.held),"
    " claimed AS ("
    "  UPDATE deliveries d SET lease_owner = %(owner)s::text,"
    "   lease_expires_at = now() + make_interval(secs => %(lease)s::float8),"
    "   attempts = d.attempts + 1, first_attempt_at = coalesce(d.first_attempt_at, now()),"
    "   last_attempt_at = now(), updated_at = now()"
    "  FROM due WHERE d.id = due.id AND NOT due.held"
    "  RETURNING d.id, d.message_id, d.account_id, d.contact_id, d.recipient, d.attempts,"
    "   d.created_at)"
    " SELECT c.id, c.message_id, c.account_id, m.send_id, c.contact_id, c.recipient,"
    "  c.attempts, extract(epoch FROM now() - c.created_at)::float8,"
    "  coalesce(ct.fields, '{}'::jsonb),"
    "  CASE WHEN ct.invalid THEN 'invalid' ELSE ("
    "   SELECT reason FROM suppressions s WHERE s.account_id = c.account_id"
    "   AND s.address = lower(c.recipient)"
    "   AND (s.category IS NULL OR s.category = m.options->>'category')"
    "   AND (s.scope_domain IS NULL OR s.scope_domain = split_part(m.sender, '@', 2))"
    "   ORDER BY s.scope_domain NULLS FIRST, s.category NULLS FIRST LIMIT 1) END"
    " FROM claimed c JOIN messages m ON m.id = c.message_id"
    " LEFT JOIN contacts ct ON ct.id = c.contact_id"
    " ORDER BY c.message_id, c.id")


async def _claim_txn(cursor, owner: str, limit: int, lease_seconds: int
                     ) -> list[ClaimedDelivery]:
    await _CLAIM_DELIVERIES.execute(cursor, {
        "owner": owner, "limit": limit, "lease": lease_seconds})
    return [ClaimedDelivery(*row) for row in cursor.fetchall()]


async def _messages_txn(cursor, message_ids: list[int]) -> dict[int, MessageContext]:
    await cursor.execute(
        "SELECT m.id, m.account_id, m.sender, m.reply_to, m.body, m.options, a.settings,"
        " m.from_address, sd.domain,"
        " sd.dkim_selector, sd.dkim_algorithm, sd.dkim_private_key, sd.return_path_domain,"
        " s.archive, (SELECT coalesce(jsonb_object_agg(g.name, g.value), '{}')"
        "  FROM global_variables g WHERE g.account_id = m.account_id)"
        " FROM messages m JOIN accounts a ON a.id = m.account_id"
        " JOIN sends s ON s.id = m.send_id"
        " LEFT JOIN LATERAL (SELECT * FROM sender_domains sd"
        "  WHERE sd.account_id = m.account_id AND sd.domain IN ("
        "   split_part(coalesce(m.from_address, m.sender), '@', -1),"
        "   split_part(m.sender, '@', -1))"
        "  ORDER BY sd.domain = split_part(coalesce(m.from_address, m.sender), '@', -1) DESC"
        "  LIMIT 1) sd ON true"
        " WHERE m.id = ANY(%s)", (message_ids,))
    contexts = {}
    for row in cursor.fetchall():
        body = json.loads(bytes(row[4])) if row[4] is not None else {}
        contexts[row[0]] = MessageContext(row[0], row[1], row[2], row[3], body, row[5],
                                          AccountSettings.from_json(row[6]), *row[7:])
    return contexts


@dataclass(frozen=True)
class _Recording:
    owner: str
    outcome: Outcome
    hard_bounce_limit: int


def _event_details(outcome: Outcome) -> dict[str, Any]:
    if outcome.state == "not_sent":
        return {"reason": outcome.reply}
    details: dict[str, Any] = {"reply": outcome.reply[:1000]}
    if outcome.bounce_type:
        details["type"] = outcome.bounce_type
    return details


_RECORD_OUTCOMES = PreparedStatement(
    "record_outcomes",
    "WITH input AS ("
    "  SELECT * FROM unnest(%(ids)s::bigint[], %(owners)s::text[], %(states)s::text[],"
    "   %(replies)s::text[], %(retries)s::float8[], %(types)s::text[],"
    "   %(details)s::jsonb[], %(emls)s::bytea[])"
    "  AS i(id, owner, state, reply, retry, type, details, eml)),"
    " updated AS ("
    "  UPDATE deliveries d SET state = i.state, last_reply = i.reply,"
    "   sent_eml = coalesce(i.eml, d.sent_eml),"
    "   next_attempt_at = CASE WHEN i.retry IS NULL THEN d.next_attempt_at"
    "    ELSE now() + make_interval(secs => i.retry) END,"
    "   lease_owner = NULL, lease_expires_at = NULL, updated_at = now()"
    "  FROM input i WHERE d.id = i.id AND d.lease_owner = i.owner"
    "  RETURNING d.id, d.account_id, d.message_id, d.contact_id, d.recipient, d.kind,"
    "   (SELECT send_id FROM messages m WHERE m.id = d.message_id) AS send_id,"
    "   i.type, i.details),"
    " event AS ("
    "  INSERT INTO events (account_id, send_id, message_id, delivery_id, contact_id,"
    "   recipient, type, details)"
    "  SELECT account_id, send_id, message_id, id, contact_id, recipient, type, details"
    f"  FROM updated WHERE kind <> '{NOTICE}')"
    " SELECT id, account_id, send_id, contact_id, recipient FROM updated")


async def _record_outcomes_txn(cursor, recordings: list[_Recording]) -> list[bool]:
    """Outcomes and their events for a batch in one statement, each with its lease
    checked (a feedback notice's outcome writes no event); then the hard-bounce counts
    of the contacts that bounced hard, and the notices of the bounces (D-7)."""
    outcomes = [r.outcome for r in recordings]
    await _RECORD_OUTCOMES.execute(cursor, {
        "ids": [o.delivery_id for o in outcomes], "owners": [r.owner for r in recordings],
        "states": [o.state for o in outcomes], "replies": [o.reply[:1000] for o in outcomes],
        "retries": [o.retry_in for o in outcomes],
        "types": [EventType(o.state) for o in outcomes],
        "details": [Json(_event_details(o)) for o in outcomes],
        "emls": [o.sent_eml for o in outcomes]})
    recorded = {row[0]: row[1:] for row in cursor.fetchall()}
    hard_bounces: dict[int, HardBounces] = {}
    notices = []
    for recording in recordings:
        outcome = recording.outcome
        row = recorded.get(outcome.delivery_id)
        if row is None or outcome.state != "bounced":
            continue
        notices.append(FeedbackNotice(outcome.delivery_id, "bounce", outcome.bounce_type,
                                      outcome.reply[:1000]))
        if outcome.bounce_type == "hard" and row[2] is not None:
            account_id, send_id, contact_id, recipient = row
            previous = hard_bounces.get(contact_id)
            hard_bounces[contact_id] = HardBounces(
                contact_id, account_id, send_id, recipient, recording.hard_bounce_limit,
                1 + (previous.count if previous else 0))
    if hard_bounces:
        await count_hard_bounces(cursor, list(hard_bounces.values()))
    await queue_notices_txn(cursor, notices)
    return [r.outcome.delivery_id in recorded for r in recordings]


@dataclass(frozen=True)
class HardBounces:
    """A contact's hard bounces in one batch; the ids of the last one name its event."""

    contact_id: int
    account_id: int
    send_id: int
    recipient: str
    limit: int
    count: int


# D-7: a contact is invalidated after `limit` hard bounces, unless whitelisted; the
# event is written once, by the batch in which the count reaches the limit.
_COUNT_HARD_BOUNCES = PreparedStatement(
    "count_hard_bounces",
    "WITH input AS ("
    "  SELECT * FROM unnest(%(contacts)s::bigint[], %(accounts)s::bigint[],"
    "   %(sends)s::bigint[], %(recipients)s::text[], %(limits)s::integer[],"
    "   %(counts)s::integer[]) AS i(contact_id, account_id, send_id, recipient, lim, n)),"
    " counted AS ("
    "  UPDATE contacts c SET hard_bounces = c.hard_bounces + i.n,"
    "   invalid = c.invalid OR (NOT c.whitelisted AND c.hard_bounces + i.n >= i.lim),"
    "   updated_at = now()"
    "  FROM input i WHERE c.id = i.contact_id"
    "  RETURNING c.id, NOT c.whitelisted AND c.hard_bounces >= i.lim"
    "   AND c.hard_bounces - i.n < i.lim AS reached)"
    " INSERT INTO events (account_id, send_id, contact_id, recipient, type, details)"
    f" SELECT i.account_id, i.send_id, i.contact_id, i.recipient, '{EventType.INVALIDATED}',"
    "  jsonb_build_object('reason', i.lim || ' hard bounces')"
    " FROM counted JOIN input i ON i.contact_id = counted.id WHERE counted.reached")


async def count_hard_bounces(cursor, bounces: list[HardBounces]) -> None:
    """D-7: count the hard bounces (from the delivery engine, or from DSNs) towards the
    contacts' invalidation. The contacts are locked first, in the order the RCPT imports
    lock them (account,
    then address), so that a batch of outcomes and a batch of imports never wait for
    each other in a cycle. NO KEY UPDATE, like the UPDATE itself: the key-share locks
    of deliveries being stored for these contacts are not in its way."""
    contacts = [b.contact_id for b in bounces]
    await cursor.execute("SELECT id FROM contacts WHERE id = ANY(%s)"
                         " ORDER BY account_id, email FOR NO KEY UPDATE", (contacts,))
    await _COUNT_HARD_BOUNCES.execute(cursor, {
        "contacts": contacts, "accounts": [b.account_id for b in bounces],
        "sends": [b.send_id for b in bounces], "recipients": [b.recipient for b in bounces],
        "limits": [b.limit for b in bounces], "counts": [b.count for b in bounces]})


async def _renew_txn(cursor, owner: str, delivery_ids: list[int], lease_seconds: int) -> int:
    """SKIP LOCKED: a row locked now is having its outcome written, which ends its lease;
    waiting for it could deadlock against that batch, which locks its rows in its own
    order."""
    await cursor.execute(
        "UPDATE deliveries SET lease_expires_at = now() + make_interval(secs => %s)"
        " WHERE id IN (SELECT id FROM deliveries WHERE id = ANY(%s) AND lease_owner = %s"
        "  FOR NO KEY UPDATE SKIP LOCKED)", (lease_seconds, delivery_ids, owner))
    return cursor.rowcount


async def _release_txn(cursor, owner: str, keep: list[int]) -> int:
    """SKIP LOCKED, as a renewal: a row locked now is having its outcome written."""
    await cursor.execute(
        "UPDATE deliveries SET lease_owner = NULL, lease_expires_at = NULL,"
        " attempts = greatest(attempts - 1, 0), updated_at = now()"
        " WHERE id IN (SELECT id FROM deliveries WHERE lease_owner = %s"
        "  AND state IN ('queued', 'deferred') AND NOT id = ANY(%s::bigint[])"
        "  FOR NO KEY UPDATE SKIP LOCKED)", (owner, keep))
    return cursor.rowcount
