"""The webhook dispatcher on a task.Clock, over a real PostgreSQL, with a poster that
answers as each test says (W-2): signing, retries for up to 24 h, endpoints that hang
or fail slowing nothing else, the cap, one log line per failed attempt."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from itertools import pairwise

from twisted.internet import defer, task

from mailgw import admin
from mailgw.config import WebhookConfig
from mailgw.events.webhooks.dispatcher import (
    FAILING_AFTER,
    LEASE_MARGIN_SECONDS,
    STOP_SECONDS,
    WebhookDispatcher,
)
from mailgw.events.webhooks.poster import PostFailed
from mailgw.events.webhooks.signing import SIGNATURE_HEADER, verify
from mailgw.metrics import Metrics
from mailgw.store.events import Event, EventType
from mailgw.store.webhook_queue import EventFacts
from tests.harness import DatabaseTestCase, log_lines, until

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC).timestamp()
DAY = 24 * 3600


def project(facts: EventFacts, wanted) -> dict | None:
    if str(facts.type) not in wanted:
        return None
    return {"event": str(facts.type), "email": facts.recipient}


class ScriptedPoster:
    """Answers each URL as `behaviour[url]` says: "ok", "fail" or "hang" (until
    `release()`); remembers every post."""

    def __init__(self, clock: task.Clock, behaviour: dict[str, str]) -> None:
        self.clock = clock
        self.behaviour = behaviour
        self.posts: list[tuple[float, str, bytes, dict]] = []
        self.hanging: list[defer.Deferred] = []

    def post(self, url: str, body: bytes, headers) -> defer.Deferred:
        self.posts.append((self.clock.seconds(), url, body, dict(headers)))
        what = self.behaviour[url]
        if what == "hang":
            d = defer.Deferred()
            self.hanging.append(d)
            return d
        if what == "fail":
            return defer.fail(PostFailed("answered 500"))
        return defer.succeed(None)

    def release(self) -> None:
        hanging, self.hanging = self.hanging, []
        for d in hanging:
            d.errback(PostFailed("no answer within 5 s"))

    def to(self, url: str) -> list[tuple[float, str, bytes, dict]]:
        return [post for post in self.posts if post[1] == url]

    async def close(self) -> None:
        pass


class DispatcherTests(DatabaseTestCase):
    async def setUp(self):
        await super().setUp()
        self.account = (await self.stores.accounts.create_account("acme")).id
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.metrics = Metrics()
        self.lines = log_lines(self)

    async def endpoint(self, url: str) -> tuple[int, str]:
        endpoint, secret = await admin.add_webhook(self.stores, self.account, url, ["sent"],
                                                   [])
        return endpoint.id, secret

    def start(self, behaviour: dict[str, str], projection=project,
              **config) -> ScriptedPoster:
        poster = ScriptedPoster(self.clock, behaviour)
        dispatcher = self.dispatcher = WebhookDispatcher(
            self.stores.webhook_queue, poster, projection, self.clock,
            WebhookConfig(**config), self.metrics)
        dispatcher.start()

        async def stop():
            poster.release()
            await dispatcher.stop()

        self.addCleanup(lambda: defer.ensureDeferred(stop()))
        return poster

    async def sent(self, count: int = 1) -> None:
        await self.stores.events.record_many(
            [Event(self.account, EventType.SENT, recipient=f"r{i}@example.net")
             for i in range(count)])

    async def idle(self) -> None:
        """Until the dispatcher rests: posts finished, outcomes written, both loops
        waiting for the clock."""
        await until(lambda: self.dispatcher.resting, "the dispatcher to rest")
        await self.stores.committer.idle()

    def poke(self) -> None:
        """A poll interval passes: the loops look for work."""
        self.clock.advance(1)

    async def test_post_is_signed_and_sent_once(self):
        url = "https://a.example/hook"
        endpoint, secret = await self.endpoint(url)
        poster = self.start({url: "ok"})
        await self.sent()
        self.poke()
        await until(lambda: poster.posts, "the post")
        await self.idle()
        [(when, _, body, headers)] = poster.posts
        self.assertEqual(json.loads(body), {"event": "sent", "email": "r0@example.net"})
        self.assertTrue(verify(secret, headers[SIGNATURE_HEADER], body, when))
        self.assertFalse(verify("another secret", headers[SIGNATURE_HEADER], body, when))
        self.assertFalse(verify(secret, headers[SIGNATURE_HEADER], body + b" ", when))
        self.assertFalse(verify(secret, headers[SIGNATURE_HEADER], body, when + 600))
        self.assertTrue(headers["X-Mailgw-Webhook-Id"].isdigit())
        for _ in range(3):
            self.poke()
        await self.idle()
        self.assertEqual(len(poster.posts), 1)
        self.assertEqual(await self.sql("SELECT count(*) FROM webhook_deliveries"
                                        " WHERE endpoint_id = %s AND state = 'pending'",
                                        endpoint), [(0,)])
        self.assertEqual(self.metrics.webhook_posts.labels("delivered")._value.get(), 1)

    async def test_retries_grow_for_24_hours_then_give_up(self):
        url = "https://down.example/hook"
        endpoint, _ = await self.endpoint(url)
        poster = self.start({url: "fail"})
        await self.sent()
        self.poke()
        # From its queueing: 10 s, then three times as long each time, at most 6 h
        # apart, and a last try at 24 h.
        expected = [0, 10, 40, 130, 400, 1210, 3640, 10930, 32530, 54130, 75730, DAY]
        for attempt, (at, following) in enumerate(pairwise(expected), start=1):
            await until(lambda: len(poster.posts) == attempt, f"attempt {attempt}")  # noqa: B023
            await self.idle()
            self.clock.advance(following - at - 1)
            await self.idle()
            self.assertEqual(len(poster.posts), attempt, "tried before its time")
            self.clock.advance(1)
        await until(lambda: len(poster.posts) == len(expected), "the last attempt")
        await self.idle()
        times = [when - NOW - 1 for when, *_ in poster.posts]
        self.assertEqual(times, expected)
        [(state, error)] = await self.sql("SELECT state, last_error FROM webhook_deliveries")
        self.assertEqual((state, error), ("failed", "answered 500"))
        self.clock.advance(DAY)
        await self.idle()
        self.assertEqual(len(poster.posts), 12)
        failures = [line for line in self.lines if "failed, attempt" in line]
        self.assertEqual(len(failures), 12)
        self.assertIn("answered 500; next try in 10 s", failures[0])
        self.assertIn("given up", failures[-1])
        self.assertEqual(self.metrics.webhook_posts.labels("failed")._value.get(), 11)
        self.assertEqual(self.metrics.webhook_posts.labels("given_up")._value.get(), 1)

    async def test_a_hanging_endpoint_holds_only_its_own_connections(self):
        hung, fine, failing = ("https://hung.example/", "https://fine.example/",
                               "https://failing.example/")
        for url in (hung, fine, failing):
            await self.endpoint(url)
        poster = self.start({hung: "hang", fine: "ok", failing: "fail"},
                            connections_per_endpoint=2, max_in_flight=10)
        await self.sent(20)
        self.poke()
        await until(lambda: len(poster.to(fine)) == len(poster.to(failing)) == 20,
                    "every first attempt to the endpoints that answer")
        self.assertEqual(len(poster.to(hung)), 2)
        self.assertEqual(self.dispatcher.in_flight, 2)
        poster.behaviour[hung] = "ok"  # it comes back: the rest of its posts go
        poster.release()
        await until(lambda: len(poster.to(hung)) == 20, "the hung endpoint's other posts")
        await self.idle()

    async def test_cap_drops_the_oldest_of_an_endpoint_that_is_down(self):
        url = "https://down.example/hook"
        endpoint, _ = await self.endpoint(url)
        self.start({url: "hang"}, max_queue_per_endpoint=5, connections_per_endpoint=1)
        await self.sent(8)
        self.poke()
        await until(lambda: self.dispatcher.in_flight == 1, "one post under way")
        [(pending, dropped)] = await self.sql(
            "SELECT (SELECT count(*) FROM webhook_deliveries), dropped_count"
            " FROM webhook_endpoints WHERE id = %s", endpoint)
        self.assertEqual(pending + dropped, 8)
        self.assertEqual((pending, dropped), (5, 3))
        self.assertEqual(self.metrics.webhooks_dropped._value.get(), 3)
        self.assertTrue(any("3 oldest posts dropped" in line for line in self.lines))

    async def test_a_post_under_way_at_a_stop_is_posted_after_a_restart(self):
        """The queue is the database: a post whose node stopped (or died) in the middle
        is posted by the next dispatcher once its lease runs out, and only then."""
        url = "https://slow.example/hook"
        await self.endpoint(url)
        first = self.start({url: "hang"})
        await self.sent()
        self.poke()
        await until(lambda: self.dispatcher.in_flight == 1, "the post under way")
        stopping = defer.ensureDeferred(self.dispatcher.stop())
        self.clock.advance(STOP_SECONDS)
        await stopping
        second = self.start({url: "ok"})
        lease = WebhookConfig().timeout_seconds + LEASE_MARGIN_SECONDS
        self.clock.advance(lease - STOP_SECONDS - 1)
        await self.idle()
        self.assertEqual(second.posts, [])
        self.clock.advance(1)
        await until(lambda: second.posts, "the post, by the second dispatcher")
        await self.idle()
        self.assertEqual(len(first.posts) + len(second.posts), 2)
        self.assertEqual(await self.sql("SELECT count(*) FROM webhook_deliveries"), [(0,)])

    async def test_an_endpoint_that_keeps_failing_gets_one_connection(self):
        """Receivers down at once must not hold every slot of the node: after
        FAILING_AFTER failures in a row an endpoint gets one connection, until a post
        to it succeeds."""
        url = "https://flaky.example/hook"
        await self.endpoint(url)
        poster = self.start({url: "fail"}, connections_per_endpoint=5)
        await self.sent(FAILING_AFTER)
        self.poke()
        await until(lambda: len(poster.posts) == FAILING_AFTER, "the failures")
        await self.idle()
        poster.behaviour[url] = "hang"
        await self.sent(10)
        self.poke()
        await until(lambda: self.dispatcher.in_flight == 1, "one post under way")
        await self.idle_but_posting()
        self.assertEqual(self.dispatcher.in_flight, 1)
        poster.behaviour[url] = "ok"
        poster.release()  # that one fails (no answer); the next ones succeed
        await until(lambda: self.dispatcher.in_flight == 0 and len(poster.posts) == 13,
                    "the other posts")

    async def idle_but_posting(self) -> None:
        """Until both loops wait (posts may be under way)."""
        await until(lambda: self.dispatcher._feed_nap.napping
                    and self.dispatcher._post_nap.napping, "the loops to wait")

    async def test_an_event_whose_payload_fails_is_skipped_not_retried_for_ever(self):
        def breaks_on_r1(facts, wanted):
            if facts.recipient == "r1@example.net":
                raise ValueError("a field the projection does not know")
            return project(facts, wanted)

        url = "https://a.example/hook"
        await self.endpoint(url)
        poster = self.start({url: "ok"}, projection=breaks_on_r1)
        await self.sent(3)
        self.poke()
        await until(lambda: len(poster.posts) == 2, "the other events' posts")
        await self.idle()
        self.assertEqual(sorted(json.loads(body)["email"] for _, _, body, _ in poster.posts),
                         ["r0@example.net", "r2@example.net"])
        self.assertEqual(await self.sql("SELECT count(*) FROM webhook_outbox"), [(0,)])
        self.assertTrue(any("not made; skipped" in line for line in self.lines))
        self.flushLoggedErrors(ValueError)
