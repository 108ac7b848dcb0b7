"""Prometheus metrics (O-5): what the components count, served at /metrics.

The Gateway builds one `Metrics`, with a registry of its own (not the client
library's global one: several Gateways in one process, as in the tests, each
count their own), and hands it to the components that count: the SMTP
factories and their sessions, the queue runner, the database pool and its group
committer, the HTTP site. Figures that are a state rather than events (sessions
and connections open, connections in use) are read from the components when
scraped. The depth of the queue is read from PostgreSQL at scrape time, by one
query (`QueueDepthProbe`) whose wait is bounded, so that a database that does
not answer never fails or stalls a scrape: the queue's figures are then left out.

Names follow Prometheus' conventions: `mailgw_` first, counters end in `_total`,
durations are `_seconds`. The README lists every metric.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from mailgw.errors import DatabaseUnavailable

# The exposition's content type: the text format every Prometheus reads (the names
# here need none of the newer format's escaping, so the text is the same).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# How long a scrape waits for the queue's depth before it answers without it.
QUEUE_READ_SECONDS = 2.0
# Where delivery attempts end: a reply in milliseconds to a server's reply_timeout.
_ATTEMPT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200)
_COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class QueueDepth:
    """The delivery queue at one moment (QueueAdminStore.depth)."""

    # Waiting deliveries by where they are: queued (never attempted) and deferred (to
    # be retried), neither held nor being attempted; sending (a node holds its lease);
    # held (its recipient domain is suspended).
    deliveries: Mapping[str, int]
    # Seconds since the earliest due delivery became due (0 when none is due): how far
    # behind the queue runners are.
    oldest_due_seconds: float
    # Webhook posts waiting (W-2): events not yet fed (webhook_outbox), posts queued,
    # to be retried, or being posted.
    webhooks_pending: int = 0


class Metrics:
    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry()

        def counter(name: str, text: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, text, labels, registry=registry)

        def gauge(name: str, text: str) -> Gauge:
            return Gauge(name, text, registry=registry)

        # SMTP submission.
        self.smtp_sessions = counter("mailgw_smtp_sessions",
                                     "SMTP sessions accepted (over the caps: see replies)")
        self.smtp_sessions_open = gauge("mailgw_smtp_sessions_open", "SMTP sessions open")
        self.smtp_messages = counter("mailgw_smtp_messages",
                                     "Messages accepted over SMTP (250 after DATA)")
        self.smtp_recipients = counter("mailgw_smtp_recipients",
                                       "Recipients of the messages accepted over SMTP")
        self.smtp_replies = counter("mailgw_smtp_replies", "SMTP replies sent, by code class "
                                    "(2xx, 3xx, 4xx, 5xx)", ("class",))
        self.smtp_auth_failures = counter(
            "mailgw_smtp_auth_failures", "SMTP AUTH attempts refused for their credentials "
            "(or for a client outside the account's networks)")
        # The inbound listener for bounces and complaints (D-7).
        self.inbound_sessions = counter("mailgw_inbound_sessions", "Inbound SMTP sessions "
                                        "accepted (bounces and complaints)")
        self.inbound_replies = counter("mailgw_inbound_replies", "Inbound SMTP replies sent, "
                                       "by code class (2xx, 3xx, 4xx, 5xx)", ("class",))
        self.inbound_messages = counter(
            "mailgw_inbound_messages", "Mail to the bounce domains by outcome: bounce, "
            "complaint, unsubscribe (recorded), ignored (names a delivery but has nothing to "
            "record), unmatched (names no delivery: dropped)", ("outcome",))
        # Delivery.
        self.delivery_attempts = counter("mailgw_delivery_attempts", "Delivery attempts by "
                                         "outcome (sent, deferred, bounced, not_sent)",
                                         ("outcome",))
        self.delivery_attempt_seconds = Histogram(
            "mailgw_delivery_attempt_seconds", "How long delivery attempts took, from the "
            "claim to the outcome (DNS, connection, SMTP)", buckets=_ATTEMPT_BUCKETS,
            registry=registry)
        self.outbound_connections_open = gauge("mailgw_outbound_connections_open",
                                               "Outbound SMTP connections open, idle ones "
                                               "included")
        # Database.
        self.group_commit_batch_size = Histogram(
            "mailgw_group_commit_batch_size", "Items written per group-commit transaction, "
            "by batch (import_recipients, record_outcomes, record_events ...)", ("batch",),
            buckets=_BATCH_BUCKETS, registry=registry)
        self.group_commit_seconds = Histogram(
            "mailgw_group_commit_seconds", "How long a group-commit transaction took, its "
            "commit included, by batch", ("batch",), buckets=_COMMIT_BUCKETS,
            registry=registry)
        self.database_connections = gauge("mailgw_database_connections",
                                          "Connections of the database pool")
        self.database_connections_in_use = gauge("mailgw_database_connections_in_use",
                                                 "Connections of the pool running a "
                                                 "transaction now")
        self.database_available = gauge("mailgw_database_available",
                                        "1 while the pool has a live connection, 0 while "
                                        "PostgreSQL is out of reach")
        self.database_outages = counter("mailgw_database_outages",
                                        "Times PostgreSQL went out of reach (a lost session "
                                        "after a working one)")
        # HTTP.
        self.http_requests = counter("mailgw_http_requests", "HTTP requests answered, by "
                                     "route (the mount point: /t, /a, /v1/email, /v1/admin, "
                                     "... or / for the rest) and status", ("route", "status"))
        self.tracking_events_lost = counter("mailgw_tracking_events_lost",
                                            "Tracking events (opens, clicks) not recorded: "
                                            "the database was out of reach")
        # Webhooks (W-2).
        self.webhook_posts = counter("mailgw_webhook_posts", "Webhook post attempts by "
                                     "outcome: delivered (2xx), failed (to be retried), "
                                     "given_up (failed past webhooks.max_retry_seconds)",
                                     ("outcome",))
        for outcome in ("delivered", "failed", "given_up"):
            self.webhook_posts.labels(outcome)
        self.webhooks_dropped = counter("mailgw_webhooks_dropped", "Webhook posts dropped "
                                        "unsent: the oldest of an endpoint past "
                                        "webhooks.max_queue_per_endpoint")
        self.webhook_posts_in_flight = gauge("mailgw_webhook_posts_in_flight",
                                             "Webhook posts under way on this node")
        # Read at scrape time (QueueDepthProbe), shown while it is set.
        self._queue_depth: QueueDepth | None = None
        registry.register(_QueueCollector(self))

    def exposition(self, queue_depth: QueueDepth | None) -> bytes:
        """Every metric in Prometheus' text format, the queue's figures from
        `queue_depth` (None: left out)."""
        self._queue_depth = queue_depth
        try:
            return generate_latest(self.registry)
        finally:
            self._queue_depth = None


class _QueueCollector:
    """The queue's figures of the scrape under way."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        depth = self._metrics._queue_depth
        if depth is None:
            return
        deliveries = GaugeMetricFamily(
            "mailgw_queue_deliveries", "Deliveries waiting, by state: queued, deferred, "
            "sending (an attempt under way), held (recipient domain suspended)",
            labels=("state",))
        for state, count in sorted(depth.deliveries.items()):
            deliveries.add_metric((state,), count)
        yield deliveries
        yield GaugeMetricFamily("mailgw_queue_oldest_due_seconds",
                                "Seconds since the earliest due delivery became due (0: "
                                "none is due)", value=depth.oldest_due_seconds)
        yield GaugeMetricFamily("mailgw_webhook_queue_pending", "Webhook posts waiting: "
                                "events not yet fed, posts queued, to be retried or being "
                                "posted",
                                value=depth.webhooks_pending)


class QueueDepthProbe:
    """The queue's depth for a scrape: one query at a time (a scrape that comes while
    one runs shares it), and a scrape waits at most `timeout` seconds for it; a query
    that fails or is late gives None, and the scrape goes on without it."""

    log = Logger()

    def __init__(self, read: Callable[[], Awaitable[QueueDepth]], clock,
                 timeout: float = QUEUE_READ_SECONDS) -> None:
        self._read = read
        self._clock = clock
        self._timeout = timeout
        self._reading: defer.Deferred[QueueDepth | None] | None = None

    async def depth(self) -> QueueDepth | None:
        reading = self._reading
        if reading is None:
            reading = self._reading = defer.ensureDeferred(self._read_once())

            def read(result: QueueDepth | None) -> QueueDepth | None:
                if self._reading is reading:
                    self._reading = None
                return result

            reading.addCallback(read)
        answer: defer.Deferred[QueueDepth | None] = defer.Deferred()

        def give(result: QueueDepth | None) -> QueueDepth | None:
            if not answer.called:
                answer.callback(result)
            return result

        reading.addCallback(give)
        late = self._clock.callLater(self._timeout, give, None)
        try:
            return await answer
        finally:
            if late.active():
                late.cancel()

    async def _read_once(self) -> QueueDepth | None:
        try:
            return await self._read()
        except DatabaseUnavailable:  # logged by the pool; /healthz says it too
            return None
        except Exception:
            self.log.failure("queue depth not read for /metrics", Failure(), LogLevel.warn)
            return None
