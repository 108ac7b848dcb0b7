"""Prometheus metrics (O-5): what a running Gateway counts, who may read /metrics, and a
scrape that the database cannot fail."""

import base64
import re
from pathlib import Path

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mailgw import credentials
from mailgw.config import HTTPConfig
from mailgw.errors import DatabaseUnavailable
from mailgw.metrics import Metrics, QueueDepth, QueueDepthProbe
from tests.harness import LOOPBACK_PORT, fresh_database, gateway_config, smtp_client, start_gateway

README = Path(__file__).parent.parent / "README.md"
DEPTH = QueueDepth({"queued": 3, "deferred": 2, "sending": 1, "held": 0}, 12.5)
USER, PASSWORD, SENDER = "ops.pro", "metrics-pass", "ops@example.org"
MESSAGE = b"Subject: hi\r\nContent-Type: text/plain\r\n\r\nHello\r\n"


def samples(exposition: bytes) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from Prometheus' text format."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(exposition.decode())
            for sample in family.samples}


def _sessions(port: int) -> None:
    """A login with the wrong password, then a message."""
    client = smtp_client(port)
    try:
        client.ehlo("app")
        wrong = base64.b64encode(f"\0{USER}\0wrong".encode()).decode()
        assert client.docmd("AUTH", f"PLAIN {wrong}")[0] == 535
    finally:
        client.close()
    client = smtp_client(port)
    try:
        client.ehlo("app")
        client.login(USER, PASSWORD)
        client.sendmail(SENDER, ["a@example.net"], MESSAGE)
        client.quit()
    finally:
        client.close()


class GatewayMetricsTests(unittest.TestCase):
    async def start(self, **http):
        self.gateway = await start_gateway(self, gateway_config(
            self, fresh_database(), http=HTTPConfig(listener=LOOPBACK_PORT, **http)))
        self.base = f"http://127.0.0.1:{self.gateway.port_for('http.listener')}"
        stores = self.gateway.stores
        account = await stores.accounts.create_account("acme")
        await stores.accounts.create_user(account.id, USER,
                                          credentials.hash_password(PASSWORD))
        await stores.senders.add_sender(account.id, SENDER, verified=True)

    async def get(self, path: str, **headers: str) -> tuple[int, bytes]:
        response = await treq.get(self.base + path, persistent=False,
                                  headers={k.replace("_", "-"): [v] for k, v in headers.items()})
        return response.code, await response.content()

    async def test_what_a_scrape_shows(self):
        await self.start()
        await deferToThread(_sessions, self.gateway.port_for("smtp.starttls_listeners[0]"))
        self.assertEqual((await self.get("/healthz"))[0], 200)
        self.assertEqual((await self.get("/a/no-such-token"))[0], 404)
        code, body = await self.get("/metrics")
        self.assertEqual(code, 200)
        found = samples(body)
        for (name, labels), value in {
                ("mailgw_smtp_sessions_total", ()): 2,
                ("mailgw_smtp_auth_failures_total", ()): 1,
                ("mailgw_smtp_messages_total", ()): 1,
                ("mailgw_smtp_recipients_total", ()): 1,
                ("mailgw_smtp_replies_total", (("class", "5xx"),)): 1,
                ("mailgw_smtp_replies_total", (("class", "3xx"),)): 1,
                ("mailgw_queue_deliveries", (("state", "queued"),)): 1,
                ("mailgw_queue_deliveries", (("state", "deferred"),)): 0,
                ("mailgw_queue_deliveries", (("state", "held"),)): 0,
                ("mailgw_http_requests_total", (("route", "/"), ("status", "200"))): 1,
                ("mailgw_http_requests_total", (("route", "/a"), ("status", "404"))): 1,
                ("mailgw_database_connections", ()): 2,
                ("mailgw_database_available", ()): 1,
                ("mailgw_database_outages_total", ()): 0,
                ("mailgw_outbound_connections_open", ()): 0}.items():
            self.assertEqual(found.get((name, labels)), value, (name, labels))
        self.assertGreaterEqual(found[("mailgw_smtp_replies_total", (("class", "2xx"),))], 6)
        self.assertGreaterEqual(found[("mailgw_queue_oldest_due_seconds", ())], 0)
        self.assertGreaterEqual(found[("mailgw_group_commit_batch_size_count",
                                       (("batch", "import_recipients"),))], 1)
        self.assertIn(b"text/plain; version=0.0.4", (await treq.get(
            self.base + "/metrics", persistent=False)).headers.getRawHeaders(
                b"content-type")[0])

    async def test_only_metrics_networks_read_it(self):
        """Loopback by default; behind a reverse proxy on this host the client is the
        last X-Forwarded-For address, which must be on the networks as well."""
        await self.start()
        self.assertEqual((await self.get("/metrics", x_forwarded_for="203.0.113.7"))[0], 403)
        self.assertEqual((await self.get("/metrics", x_forwarded_for="nonsense"))[0], 403)
        self.assertEqual((await self.get(
            "/metrics", x_forwarded_for="203.0.113.7, 127.0.0.1"))[0], 200)
        self.assertEqual((await self.get("/metrics", x_forwarded_for="::1"))[0], 200)

    async def test_a_client_off_the_networks_is_refused_whatever_it_forwards(self):
        await self.start(metrics_networks=["192.0.2.0/24"])
        code, body = await self.get("/metrics")
        self.assertEqual((code, body), (403, b"/metrics is served only to the networks in "
                                             b"http.metrics_networks\n"))
        self.assertEqual((await self.get("/metrics", x_forwarded_for="192.0.2.5"))[0], 403)
        self.assertEqual((await self.get("/healthz"))[0], 200)


class QueueDepthProbeTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.reads = []

    def read(self):
        d = defer.Deferred()
        self.reads.append(d)
        return d

    def test_a_late_database_gives_no_queue_figures_in_time(self):
        """A scrape waits QUEUE_READ_SECONDS at most; the query still running is shared
        by the next scrape rather than started again."""
        probe = QueueDepthProbe(self.read, self.clock, timeout=2)
        first = defer.ensureDeferred(probe.depth())
        self.clock.advance(2)
        self.assertIsNone(self.successResultOf(first))
        second = defer.ensureDeferred(probe.depth())
        self.assertEqual(len(self.reads), 1)
        self.reads[0].callback(DEPTH)
        self.assertEqual(self.successResultOf(second), DEPTH)
        third = defer.ensureDeferred(probe.depth())
        self.assertEqual(len(self.reads), 2)
        self.reads[1].callback(DEPTH)
        self.assertEqual(self.successResultOf(third), DEPTH)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_failed_read_gives_none(self):
        for error in (DatabaseUnavailable("queue_depth"), ValueError("odd")):
            probe = QueueDepthProbe(lambda error=error: defer.fail(error), self.clock)
            self.assertIsNone(self.successResultOf(defer.ensureDeferred(probe.depth())))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_exposition_leaves_the_queue_out_without_its_depth(self):
        metrics = Metrics()
        names = {name for name, _ in samples(metrics.exposition(None))}
        self.assertNotIn("mailgw_queue_deliveries", names)
        found = samples(metrics.exposition(DEPTH))
        self.assertEqual(found[("mailgw_queue_deliveries", (("state", "deferred"),))], 2)
        self.assertEqual(found[("mailgw_queue_oldest_due_seconds", ())], 12.5)


class NamingTests(unittest.TestCase):
    def test_names_follow_prometheus_conventions_and_the_readme_lists_them(self):
        """mailgw_ first, counters in _total, durations in _seconds; the README's list
        of metrics is the list of metrics."""
        metrics = Metrics()
        metrics.http_requests.labels("/", "200").inc()
        families = list(text_string_to_metric_families(metrics.exposition(DEPTH).decode()))
        exposed = set()
        for family in families:
            if family.name.endswith("_created"):
                continue  # the client library's creation time of each counter
            self.assertTrue(family.name.startswith("mailgw_"), family.name)
            self.assertNotIn("milliseconds", family.name)
            exposed.add(family.name + "_total" if family.type == "counter" else family.name)
        section = README.read_text().split("### Metrics", 1)[1].split("\n## ", 1)[0]
        self.assertEqual(set(re.findall(r"`(mailgw_[a-z_]+)", section)), exposed)
