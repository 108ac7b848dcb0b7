"""The webhook dispatcher (W-2): feeds events into the queue and posts what is due.

Two loops on the reactor. The feed turns the events noted in `webhook_outbox` into
queued posts, a batch per transaction, at once again while batches come full, else
every `poll_interval`. The poster claims due posts, as many as there is room for:
at most `max_in_flight` on this node, and at most `connections_per_endpoint` of any
one endpoint, so that a receiver that hangs, fails or refuses holds only its own
slots and its own retries while deliveries and other endpoints go on. Each post is
signed at the time it is sent (signing.py) and carries `X-Mailgw-Webhook-Id`, the
same for every attempt, for receivers that want to drop a post they already have
(a post whose answer was lost is posted again).

A failed attempt is logged once and retried after 10 s, then three times as long
each time (at most 6 h apart), while the next try falls within
`webhooks.max_retry_seconds` (24 h) of the post's queueing; then the post is given
up (`failed`, with its last error). An endpoint's pending posts beyond
`webhooks.max_queue_per_endpoint` are dropped, the oldest first, and counted in its
`dropped_count`.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer, task
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from mailgw.config import WebhookConfig
from mailgw.errors import DatabaseUnavailable, TransientDatabaseError
from mailgw.events.webhooks.poster import PostFailed, WebhookPoster
from mailgw.events.webhooks.signing import SIGNATURE_HEADER, sign
from mailgw.idle import IdleWaiters, Nap
from mailgw.metrics import Metrics
from mailgw.store.webhook_queue import (
    ClaimedPost,
    EventFacts,
    PostOutcome,
    Projection,
    WebhookQueueStore,
)

FIRST_RETRY_SECONDS = 10.0
RETRY_FACTOR = 3
MAX_RETRY_INTERVAL = 6 * 3600
# Outbox events turned into posts per transaction.
FEED_BATCH = 500
# A claimed post's row is not claimed again (by any node) for this long past its
# time limit: the lease that a node which dies in the middle of a post lets run out.
LEASE_MARGIN_SECONDS = 60
# A graceful stop waits this long for posts under way; the others' leases run out.
STOP_SECONDS = 5.0
# How many times an outcome the database could not take is written again.
RECORD_TRIES = 3
# An endpoint whose last attempts on this node all failed, this many or more, gets one
# connection until a post succeeds: many receivers down at once hold one slot each,
# not ten, and the node's other slots stay free for the endpoints that answer.
FAILING_AFTER = 3


def retry_delay(attempt: int) -> float:
    """Seconds before the try after failed attempt number `attempt` (from 1)."""
    return min(FIRST_RETRY_SECONDS * RETRY_FACTOR ** min(attempt - 1, 20),
               MAX_RETRY_INTERVAL)


def next_try(queued_at: datetime, attempt: int, now: datetime,
             max_retry_seconds: float) -> datetime | None:
    """When to try again after failed attempt `attempt`, or None: given up. The last
    try is at the end of the `max_retry_seconds` after the post was queued."""
    deadline = queued_at + timedelta(seconds=max_retry_seconds)
    if now >= deadline:
        return None
    return min(now + timedelta(seconds=retry_delay(attempt)), deadline)


class WebhookDispatcher:
    log = Logger()

    def __init__(self, queue: WebhookQueueStore, poster: WebhookPoster, project: Projection,
                 clock, config: WebhookConfig, metrics: Metrics | None = None) -> None:
        self.queue = queue
        self.poster = poster
        self.project = project
        self.clock = clock
        self.config = config
        self.metrics = metrics or Metrics()
        self.running = False
        self._feed_nap = Nap(clock)
        self._post_nap = Nap(clock)
        self._loops: list[defer.Deferred[None]] = []
        # Posts under way here, by endpoint id.
        self._in_flight: dict[int, int] = {}
        # Failed attempts in a row here, by endpoint id (none since its last success).
        self._failing: dict[int, int] = {}
        # Outcomes being written.
        self._recording: set[defer.Deferred[None]] = set()
        self._drained = IdleWaiters()

    @property
    def in_flight(self) -> int:
        return sum(self._in_flight.values())

    @property
    def resting(self) -> bool:
        """Both loops wait for their time and no post is under way: nothing happens
        until the clock moves or work is handed in (the tests' moment to move it)."""
        return (self._feed_nap.napping and self._post_nap.napping and not self._in_flight
                and not self._recording)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), UTC)

    def start(self) -> None:
        self.running = True
        for name, loop in (("feed", self._feed_loop), ("post", self._post_loop)):
            d = defer.ensureDeferred(loop())
            d.addErrback(lambda f, name=name: self.log.failure(
                "webhook {name} loop stopped", f, name=name))
            self._loops.append(d)

    async def stop(self) -> None:
        """No more feeding or claiming; posts under way get STOP_SECONDS to finish."""
        self.running = False
        self._feed_nap.wake()
        self._post_nap.wake()
        await defer.gatherResults(self._loops, consumeErrors=True)
        try:
            await self._drained.wait(not self._in_flight).addTimeout(STOP_SECONDS, self.clock)
            await defer.DeferredList(list(self._recording)).addTimeout(STOP_SECONDS,
                                                                       self.clock)
        except defer.TimeoutError:
            self.log.warn("stopping with {count} webhook posts under way; they are posted "
                          "again once their lease runs out", count=self.in_flight)
        await self.poster.close()

    def _project(self, facts: EventFacts, wanted: Collection[str]) -> dict[str, Any] | None:
        """The projection, kept from stopping the feed: an event whose payload cannot be
        made is logged and skipped, never retried for ever with its batch."""
        try:
            return self.project(facts, wanted)
        except Exception:
            self.log.failure("webhook payload of a {type} event of account {account} not "
                             "made; skipped", Failure(), LogLevel.error, type=facts.type,
                             account=facts.account_id)
            return None

    async def _feed_loop(self) -> None:
        while self.running:
            full = False
            try:
                fed = await self.queue.feed(FEED_BATCH, self._project, self._now(),
                                            self.config.max_queue_per_endpoint)
            except DatabaseUnavailable:
                pass  # the pool logs it; the next round tries again
            except Exception:
                self.log.failure("feeding webhooks failed", Failure(), LogLevel.error)
            else:
                full = fed.events == FEED_BATCH
                if fed.queued:
                    self._post_nap.wake()
                for endpoint_id, count in fed.dropped.items():
                    self.metrics.webhooks_dropped.inc(count)
                    self.log.warn("webhook endpoint {endpoint}: {count} oldest posts dropped,"
                                  " over the queue cap of {cap}", endpoint=endpoint_id,
                                  count=count, cap=self.config.max_queue_per_endpoint)
            if not full:
                await self._feed_nap.take(self.config.poll_interval)

    async def _post_loop(self) -> None:
        while self.running:
            room = self.config.max_in_flight - self.in_flight
            if room <= 0:
                await self._post_nap.take(None)
                continue
            now = self._now()
            per_endpoint = self.config.connections_per_endpoint
            lease = timedelta(seconds=self.config.timeout_seconds + LEASE_MARGIN_SECONDS)
            try:
                claimed = await self.queue.claim(now, now + lease, room, per_endpoint,
                                                 self._room())
            except DatabaseUnavailable:
                claimed = []
            except Exception:
                self.log.failure("claiming webhook posts failed", Failure(), LogLevel.error)
                claimed = []
            if not self.running:
                break  # a stop came during the claim: its posts wait out their lease
            if not claimed:
                await self._post_nap.take(self.config.poll_interval)
                continue
            for post in claimed:
                self._in_flight[post.endpoint_id] = self._in_flight.get(post.endpoint_id, 0) + 1
                d = defer.ensureDeferred(self._attempt(post))
                d.addErrback(lambda f: self.log.failure("webhook post failed unexpectedly", f))
            if len(claimed) < room:
                # Nothing more is due, or the endpoints with posts due are at their
                # limit: wait for a slot to free (or new posts, or retries due).
                await self._post_nap.take(self.config.poll_interval)

    def _room(self) -> dict[int, int]:
        """The room of the endpoints that have posts under way here or keep failing
        (the others have connections_per_endpoint)."""
        room = {}
        for endpoint in self._in_flight.keys() | self._failing.keys():
            failing = self._failing.get(endpoint, 0) >= FAILING_AFTER
            limit = 1 if failing else self.config.connections_per_endpoint
            room[endpoint] = max(0, limit - self._in_flight.get(endpoint, 0))
        return room

    def _slot_freed(self, endpoint_id: int) -> None:
        """A post has its answer. The loop claims again once half an endpoint's slots,
        or half the node's, are free: one claim for several posts, not one each."""
        count = self._in_flight.pop(endpoint_id) - 1
        if count:
            self._in_flight[endpoint_id] = count
        if (count <= self.config.connections_per_endpoint // 2
                or self.in_flight <= self.config.max_in_flight // 2):
            self._post_nap.wake()
        if not self._in_flight:
            self._drained.fire()

    async def _attempt(self, post: ClaimedPost) -> None:
        """Post, free the slot as soon as the answer is in (the lease keeps the row from
        other claims until the outcome is written), then write the outcome."""
        try:
            recording = defer.ensureDeferred(self._record(await self._post(post)))
            self._recording.add(recording)
            recording.addBoth(self._recorded, recording)
        finally:
            self._slot_freed(post.endpoint_id)
        await recording

    def _recorded(self, result: object, recording: defer.Deferred[None]) -> object:
        self._recording.discard(recording)
        return result

    async def _post(self, post: ClaimedPost) -> PostOutcome:
        body = post.body.encode()
        headers = {SIGNATURE_HEADER: sign(post.secret, int(self.clock.seconds()), body),
                   "X-Mailgw-Webhook-Id": str(post.id)}
        try:
            await self.poster.post(post.url, body, headers)
        except PostFailed as failure:
            self._failing[post.endpoint_id] = self._failing.get(post.endpoint_id, 0) + 1
            return self._failed(post, str(failure))
        self._failing.pop(post.endpoint_id, None)
        self.metrics.webhook_posts.labels("delivered").inc()
        return PostOutcome(post.id, post.attempt, "delivered")

    def _failed(self, post: ClaimedPost, error: str) -> PostOutcome:
        """The outcome of a failed attempt, logged once."""
        again = next_try(post.created_at, post.attempt, self._now(),
                         self.config.max_retry_seconds)
        host = urlsplit(post.url).hostname
        if again is None:
            self.metrics.webhook_posts.labels("given_up").inc()
            self.log.warn("webhook {id} to endpoint {endpoint} ({host}) failed, attempt "
                          "{attempt}: {error}; given up", id=post.id, endpoint=post.endpoint_id,
                          host=host, attempt=post.attempt, error=error)
            return PostOutcome(post.id, post.attempt, "failed", None, error)
        self.metrics.webhook_posts.labels("failed").inc()
        self.log.warn("webhook {id} to endpoint {endpoint} ({host}) failed, attempt "
                      "{attempt}: {error}; next try in {delay:g} s", id=post.id,
                      endpoint=post.endpoint_id, host=host, attempt=post.attempt, error=error,
                      delay=retry_delay(post.attempt))
        return PostOutcome(post.id, post.attempt, "pending", again, error)

    async def _record(self, outcome: PostOutcome) -> None:
        """Write the outcome, again after a second if the database could not take it
        (out of reach, a deadlock); if it still cannot, the lease runs out and the post
        is tried again (a receiver may then see it twice: the webhook id says so)."""
        for _ in range(RECORD_TRIES):
            try:
                await self.queue.record(outcome)
                return
            except TransientDatabaseError:
                await task.deferLater(self.clock, 1.0, lambda: None)
            except Exception:
                self.log.failure("webhook outcome not recorded", Failure(), LogLevel.error)
                return
