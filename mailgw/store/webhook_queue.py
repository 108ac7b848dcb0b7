"""The webhook queue (W-2): events become posts, posts are claimed, retried and dropped.

The feed takes events that migration 010's trigger put in `webhook_outbox`, reads
what each is about (its message, send, campaign, account), asks the projection for
each endpoint's body and queues one `webhook_deliveries` row per post, all in one
transaction. Posts are claimed with FOR UPDATE SKIP LOCKED, as deliveries are, so
several nodes share the queue; a claim moves `next_attempt_at` past the attempt's
time (the lease: a node that dies leaves the row claimable again) and counts the
attempt, and an outcome is written only while `attempts` is still the claim's. A
delivered post's row is deleted; one given up after `webhooks.max_retry_seconds`
stays, `failed`, with its last error. Times come from the caller's clock (the tests'
`task.Clock`), not the database's.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from psycopg2.extras import Json

from mailgw.store.database import Database, PreparedStatement
from mailgw.store.events import EventType
from mailgw.store.group_commit import GroupCommitter


@dataclass(frozen=True)
class EventFacts:
    """One event and what it is about, as the webhook feed reads it from the database."""

    type: EventType
    details: dict[str, Any]
    occurred_at: datetime
    account_id: int
    # accounts.timezone: the payloads' timestamps are local to it (W-1).
    timezone: str
    recipient: str | None = None
    contact_id: int | None = None
    # sends.origin: 'smtp', 'api' or 'dmds'; None for an event about no send.
    origin: str | None = None
    # messages.message_uid: the 32 hex of the SMTP reply.
    message_uid: str | None = None
    # deliveries.msgid: what POST /v1/email answered for this recipient.
    api_msgid: str | None = None
    subject: str | None = None
    sender: str | None = None
    client_ip: str | None = None
    custom_headers: dict[str, str] = field(default_factory=dict)
    # The DMDS campaign of the send, if any.
    campaign_numid: int | None = None
    campaign_name: str | None = None
    campaign_subject: str | None = None
    machine: bool = False


# The body for an event and an endpoint's event types, or None: no post.
Projection = Callable[[EventFacts, Collection[str]], "dict[str, Any] | None"]


@dataclass(frozen=True)
class Fed:
    """What one feed transaction did."""

    # Outbox events taken.
    events: int
    # Posts queued.
    queued: int
    # Pending posts dropped past the cap, by endpoint id.
    dropped: dict[int, int]


@dataclass(frozen=True)
class ClaimedPost:
    id: int
    endpoint_id: int
    url: str
    secret: str
    # The JSON body to post, as PostgreSQL writes the stored payload: what is signed
    # and sent, without parsing it into Python and writing it again.
    body: str
    # This attempt's number, from 1.
    attempt: int
    created_at: datetime


@dataclass(frozen=True)
class PostOutcome:
    id: int
    attempt: int
    # 'delivered', 'pending' (to be retried at next_attempt_at) or 'failed' (given up).
    state: str
    next_attempt_at: datetime | None = None
    error: str | None = None


class WebhookQueueStore:
    def __init__(self, database: Database, committer: GroupCommitter) -> None:
        self.db = database
        self.committer = committer

    async def feed(self, limit: int, project: Projection, now: datetime,
                   max_per_endpoint: int) -> Fed:
        """Up to `limit` outbox events turned into posts due `now`, and each endpoint
        that got some cut back to its newest `max_per_endpoint` pending posts."""
        return await self.db.run_interaction("feed_webhooks", _feed_txn, limit, project,
                                             now, max_per_endpoint)

    async def claim(self, now: datetime, lease_until: datetime, limit: int,
                    per_endpoint: int, room: dict[int, int]) -> list[ClaimedPost]:
        """Due posts of active endpoints, at most `per_endpoint` of each (`room[id]` for an
        endpoint with posts already running here, or failing), leased until
        `lease_until`."""
        return await self.db.run_interaction("claim_webhooks", _claim_txn, now, lease_until,
                                             limit, per_endpoint, room)

    async def record(self, outcome: PostOutcome) -> bool:
        """Write an attempt's outcome (group-committed); False if the post is no longer
        this attempt's: dropped past the cap, its endpoint deleted, or claimed again
        after the lease ran out."""
        return await self.committer.run("record_webhook_outcomes", _record_txn, outcome)


# Posts given up are kept this long (their last error, for the operator), then
# deleted a batch at a time by the feed.
FAILED_KEPT = timedelta(days=7)
_FORGET_FAILED = (
    "WITH old AS MATERIALIZED ("
    "  SELECT id FROM webhook_deliveries WHERE state = 'failed'"
    "  AND last_attempt_at < %(before)s LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
    " DELETE FROM webhook_deliveries w USING old WHERE w.id = old.id")

# The statements that read the queue's tables are planned at each run, never prepared:
# the outbox and the queue go from empty to tens of thousands of rows within seconds,
# and a plan cached while they were empty reads every row (a semi-join that runs the
# LIMIT ... SKIP LOCKED subquery once per outbox row took 30 s for 20,000 events).
# MATERIALIZED: the rows picked are picked once, at most `limit` of them, whatever plan.
_TAKE_OUTBOX = (
    "WITH picked AS MATERIALIZED ("
    "  SELECT event_id FROM webhook_outbox ORDER BY event_id LIMIT %(limit)s"
    "  FOR UPDATE SKIP LOCKED),"
    " taken AS ("
    "  DELETE FROM webhook_outbox o USING picked p WHERE o.event_id = p.event_id"
    "  RETURNING o.event_id)"
    " SELECT e.id, e.type, e.details, e.occurred_at, e.account_id, a.timezone,"
    "  e.recipient, e.contact_id, s.origin, m.message_uid, d.msgid::text,"
    "  coalesce(m.subject, s.subject), m.sender, host(m.client_ip),"
    "  coalesce(m.custom_headers, '{}'),"
    "  c.numid, c.name, c.subject, e.machine"
    " FROM taken t JOIN events e ON e.id = t.event_id JOIN accounts a ON a.id = e.account_id"
    " LEFT JOIN deliveries d ON d.id = e.delivery_id"
    " LEFT JOIN messages m ON m.id = coalesce(e.message_id, d.message_id)"
    " LEFT JOIN sends s ON s.id = coalesce(e.send_id, m.send_id)"
    " LEFT JOIN campaigns c ON c.id = s.campaign_id"
    " ORDER BY e.id")

_QUEUE_POSTS = PreparedStatement(
    "queue_webhook_posts",
    "INSERT INTO webhook_deliveries (endpoint_id, event_id, payload, next_attempt_at,"
    " created_at)"
    " SELECT endpoint_id, event_id, payload, %(now)s::timestamptz, %(now)s::timestamptz"
    " FROM unnest(%(endpoints)s::bigint[], %(events)s::bigint[], %(payloads)s::jsonb[])"
    "  AS i(endpoint_id, event_id, payload)")

# The cap: for each endpoint that just got posts, its pending rows older than its
# newest `cap` are deleted and counted in dropped_count. Only an endpoint whose pending
# ids span more than `cap` can hold more than `cap` (two index probes): the others,
# every endpoint that keeps up, cost no scan of their rows.
_DROP_PAST_CAP = (
    "WITH spread AS ("
    "  SELECT e.id AS endpoint_id FROM unnest(%(endpoints)s::bigint[]) AS e(id)"
    "  WHERE (SELECT max(w.id) FROM webhook_deliveries w"
    "         WHERE w.endpoint_id = e.id AND w.state = 'pending')"
    "      - (SELECT min(w.id) FROM webhook_deliveries w"
    "         WHERE w.endpoint_id = e.id AND w.state = 'pending') >= %(cap)s),"
    " edge AS ("
    "  SELECT s.endpoint_id, (SELECT w.id FROM webhook_deliveries w"
    "   WHERE w.endpoint_id = s.endpoint_id AND w.state = 'pending'"
    "   ORDER BY w.id DESC OFFSET %(cap)s LIMIT 1) AS newest_dropped"
    "  FROM spread s),"
    " gone AS ("
    "  DELETE FROM webhook_deliveries w USING edge"
    "  WHERE w.endpoint_id = edge.endpoint_id AND w.state = 'pending'"
    "   AND w.id <= edge.newest_dropped"
    "  RETURNING w.endpoint_id),"
    " counted AS (SELECT endpoint_id, count(*) AS n FROM gone GROUP BY endpoint_id)"
    " UPDATE webhook_endpoints e SET dropped_count = e.dropped_count + c.n"
    " FROM counted c WHERE e.id = c.endpoint_id RETURNING e.id, c.n")


async def _feed_txn(cursor, limit: int, project: Projection, now: datetime,
                    cap: int) -> Fed:
    await cursor.execute(_FORGET_FAILED, {"before": now - FAILED_KEPT, "limit": limit})
    await cursor.execute(_TAKE_OUTBOX, {"limit": limit})
    rows = cursor.fetchall()
    if not rows:
        return Fed(0, 0, {})
    # The columns are EventFacts' fields, in order.
    events = [(row[0], EventFacts(EventType(row[1]), *row[2:])) for row in rows]
    await cursor.execute(
        "SELECT id, account_id, event_types FROM webhook_endpoints"
        " WHERE active AND account_id = ANY(%s) ORDER BY id",
        (sorted({facts.account_id for _, facts in events}),))
    endpoints: dict[int, list[tuple[int, list[str]]]] = {}
    for endpoint_id, account_id, event_types in cursor.fetchall():
        endpoints.setdefault(account_id, []).append((endpoint_id, event_types))
    posts = [(endpoint_id, event_id, payload)
             for event_id, facts in events
             for endpoint_id, event_types in endpoints.get(facts.account_id, ())
             if (payload := project(facts, event_types)) is not None]
    if not posts:
        return Fed(len(events), 0, {})
    await _QUEUE_POSTS.execute(cursor, {
        "now": now, "endpoints": [p[0] for p in posts], "events": [p[1] for p in posts],
        "payloads": [Json(p[2]) for p in posts]})
    await cursor.execute(_DROP_PAST_CAP, {"cap": cap,
                                          "endpoints": sorted({p[0] for p in posts})})
    return Fed(len(events), len(posts), dict(cursor.fetchall()))


# Each active endpoint's due posts, oldest due first, as many as it has room for here;
# the endpoints with nothing under way here first, in a random order, so that no
# endpoint is always the last served when the node's room runs out. The rows updated
# by primary key (an UPDATE ... FROM the picked rows may be planned as a scan of the
# whole queue).
_CLAIM_POSTS = (
    "WITH due AS MATERIALIZED ("
    "  SELECT w.id FROM ("
    "   SELECT e.id, b.room FROM webhook_endpoints e"
    "   LEFT JOIN unnest(%(busy)s::bigint[], %(room)s::integer[]) AS b(id, room)"
    "    ON b.id = e.id"
    "   WHERE e.active ORDER BY b.id IS NOT NULL, random()) e"
    "  CROSS JOIN LATERAL ("
    "   SELECT w.id FROM webhook_deliveries w"
    "   WHERE w.endpoint_id = e.id AND w.state = 'pending'"
    "    AND w.next_attempt_at <= %(now)s"
    "   ORDER BY w.next_attempt_at"
    "   LIMIT coalesce(e.room, %(per_endpoint)s) FOR UPDATE SKIP LOCKED) w"
    "  LIMIT %(limit)s)"
    " UPDATE webhook_deliveries w SET attempts = w.attempts + 1,"
    "  next_attempt_at = %(lease_until)s, last_attempt_at = %(now)s"
    " FROM webhook_endpoints e"
    " WHERE w.id = ANY(ARRAY(SELECT id FROM due)) AND e.id = w.endpoint_id"
    " RETURNING w.id, w.endpoint_id, e.url, e.secret, w.payload::text, w.attempts,"
    "  w.created_at")


async def _claim_txn(cursor, now: datetime, lease_until: datetime, limit: int,
                     per_endpoint: int, room: dict[int, int]) -> list[ClaimedPost]:
    await cursor.execute(_CLAIM_POSTS, {
        "now": now, "lease_until": lease_until, "limit": limit,
        "per_endpoint": per_endpoint, "busy": list(room), "room": list(room.values())})
    return sorted((ClaimedPost(*row) for row in cursor.fetchall()), key=lambda p: p.id)


_RECORD_OUTCOMES = PreparedStatement(
    "record_webhook_outcomes",
    "WITH input AS ("
    "  SELECT * FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[], %(states)s::text[],"
    "   %(next)s::timestamptz[], %(errors)s::text[]) AS i(id, attempt, state, next_at, error)),"
    " delivered AS ("
    "  DELETE FROM webhook_deliveries w USING input i"
    "  WHERE w.id = i.id AND w.attempts = i.attempt AND i.state = 'delivered'"
    "  RETURNING w.id),"
    " retried AS ("
    "  UPDATE webhook_deliveries w SET state = i.state,"
    "   next_attempt_at = coalesce(i.next_at, w.next_attempt_at), last_error = i.error"
    "  FROM input i WHERE w.id = i.id AND w.attempts = i.attempt AND i.state <> 'delivered'"
    "  RETURNING w.id)"
    " SELECT id FROM delivered UNION ALL SELECT id FROM retried")


async def _record_txn(cursor, outcomes: list[PostOutcome]) -> list[bool]:
    await _RECORD_OUTCOMES.execute(cursor, {
        "ids": [o.id for o in outcomes], "attempts": [o.attempt for o in outcomes],
        "states": [o.state for o in outcomes],
        "next": [o.next_attempt_at for o in outcomes], "errors": [o.error for o in outcomes]})
    written = {row[0] for row in cursor.fetchall()}
    return [o.id in written for o in outcomes]

