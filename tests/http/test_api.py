"""The HTTP listener's bounds (R-3): oversized bodies refused while they arrive, slow
requests cut, the rate limiter; and R-2, the API's 503 while PostgreSQL is away."""

import json

import treq
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web import resource
from twisted.web.test.requesthelper import DummyRequest

from mailgw import admin
from mailgw.config import HTTPConfig
from mailgw.http.api import APIError, BoundedSite, RateLimiter, json_endpoint
from tests.harness import (
    LOOPBACK_PORT,
    Client,
    gateway_config,
    new_cluster,
    start_gateway,
)


class BodyLength(resource.Resource):
    """Answers how many body bytes it was given."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.rendered = []

    def render_POST(self, request):  # noqa: N802 - twisted.web's name
        self.rendered.append(request)
        request.content.seek(0)
        return str(len(request.content.read())).encode()


class BoundedSiteTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.app = BodyLength()
        site = BoundedSite(self.app, max_body_size=100, request_timeout=30, idle_timeout=60,
                           reactor=self.clock)
        self.channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def answer(self) -> tuple[int, dict]:
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), json.loads(body)

    def test_a_body_within_the_limit_reaches_the_app(self):
        self.channel.dataReceived(b"POST /v1/email HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 100\r\n\r\n" + b"x" * 100)
        self.assertTrue(self.transport.value().endswith(b"\r\n\r\n100"))

    def test_a_declared_length_past_the_limit_is_refused_before_the_body(self):
        self.channel.dataReceived(b"POST /v1/email HTTP/1.1\r\nHost: x\r\n"
                                  b"Expect: 100-continue\r\nContent-Length: 1000000000\r\n\r\n")
        self.assertEqual(self.answer(), (413, {
            "error": "Request_too_large",
            "message": "the request body is larger than 100 bytes"}))
        self.assertNotIn(b"100 Continue", self.transport.value())
        # What still comes is read and dropped, never kept nor rendered.
        self.channel.dataReceived(b"x" * 100000)
        self.assertEqual(self.app.rendered, [])
        self.assertIsNone(self.channel._channel.requests[0].content)

    def test_a_chunked_body_is_refused_when_it_passes_the_limit(self):
        self.channel.dataReceived(b"POST /v1/email HTTP/1.1\r\nHost: x\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n")
        self.channel.dataReceived(b"40\r\n" + b"x" * 64 + b"\r\n")
        self.assertEqual(self.transport.value(), b"")
        self.channel.dataReceived(b"40\r\n" + b"x" * 64 + b"\r\n")
        self.assertEqual(self.answer()[0], 413)
        request = self.channel._channel.requests[0]
        self.assertIsNone(request.content)
        for _ in range(100):
            self.channel.dataReceived(b"400\r\n" + b"x" * 1024 + b"\r\n")
        self.assertFalse(self.transport.disconnecting)
        # Once the body ends, the connection is closed: nothing was rendered.
        self.channel.dataReceived(b"0\r\n\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.app.rendered, [])

    def test_a_request_not_complete_in_time_gets_408(self):
        self.channel.dataReceived(b"POST /v1/email HTTP/1.1\r\nHost: x\r\nContent-Length: 50"
                                  b"\r\n\r\nxx")
        self.clock.advance(29)
        self.channel.dataReceived(b"x")  # trickling resets no idle timer: the request's ends
        self.clock.advance(1)
        self.assertEqual(self.answer(), (408, {
            "error": "Request_timeout", "message": "the request was not complete within 30 s"}))
        self.assertTrue(self.transport.disconnecting)

    def test_a_refused_body_that_never_ends_is_cut_at_the_deadline(self):
        self.channel.dataReceived(b"POST /v1/email HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 1000\r\n\r\n")
        self.clock.advance(30)
        self.assertTrue(self.transport.disconnected)

    def test_the_deadline_stops_with_the_request(self):
        self.channel.dataReceived(b"POST /v1/email HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 2\r\n\r\nxx")
        self.assertNotIn("_too_slow", [call.func.__name__
                                       for call in self.clock.getDelayedCalls()])


class RateLimiterTests(unittest.TestCase):
    def test_a_bucket_per_key(self):
        clock = task.Clock()
        limiter = RateLimiter(clock, rate=2, burst=3)
        for _ in range(3):
            limiter.check("a")
        with self.assertRaises(APIError) as refused:
            limiter.check("a")
        self.assertEqual((refused.exception.status, refused.exception.headers),
                         (429, {b"Retry-After": b"1"}))
        limiter.check("b")
        clock.advance(0.5)
        limiter.check("a")

    def test_quiet_keys_are_forgotten(self):
        clock = task.Clock()
        limiter = RateLimiter(clock, rate=10, burst=10, max_keys=4)
        for key in "abcd":
            limiter.check(key)
        clock.advance(2)
        limiter.check("e")
        self.assertEqual(set(limiter._buckets), {"e"})


class _Sender(Client):
    """Sends a huge chunked body as fast as the connection takes it."""

    def connectionMade(self) -> None:
        self.transport.write(b"POST /v1/email HTTP/1.1\r\nHost: x\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
        for _ in range(200):  # 13 MB
            self.transport.write(chunk)
        self.transport.write(b"0\r\n\r\n")


class GatewayBoundsTests(unittest.TestCase):
    async def test_a_huge_body_over_a_real_socket(self):
        cluster_dsn = new_cluster("mailgw-test-bounds-").dsn
        gateway = await start_gateway(self, gateway_config(
            self, cluster_dsn, http=HTTPConfig(listener=LOOPBACK_PORT, max_body_size=1000)))
        client = await protocol.ClientCreator(reactor, _Sender).connectTCP(
            "127.0.0.1", gateway.port_for("http.listener"))
        received = await client.lost
        head, _, body = received.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head)
        self.assertEqual(json.loads(body)["error"], "Request_too_large")


class DatabaseOutageTests(unittest.TestCase):
    async def test_503_while_down_and_sends_again_once_back(self):
        cluster = new_cluster("mailgw-test-api-outage-")
        gateway = await start_gateway(self, gateway_config(self, cluster.dsn))
        account = await gateway.stores.accounts.create_account("acme")
        await admin.add_domain(gateway.stores, account.id, "dominio.com", verified=True)
        _, key = await admin.create_api_key(gateway.stores, account.id, "k")
        url = f"http://127.0.0.1:{gateway.port_for('http.listener')}/v1/email"
        body = json.dumps({"from": {"email": "a@dominio.com"}, "to": [{"email": "b@x.org"}],
                           "subject": "s", "body": "<p>b</p>"}).encode()

        async def post():
            response = await treq.post(url, data=body, headers={"Authorization": [key]},
                                       persistent=False)
            return response.code, await response.json()

        self.assertEqual((await post())[0], 200)
        cluster.stop()
        self.assertEqual(await post(), (503, {
            "error": "Service_unavailable",
            "message": "the database is unavailable, try again later"}))
        cluster.start()
        answers = []

        async def sent() -> bool:
            answers.append(await post())
            return answers[-1][0] == 200

        await until_async(sent, "a send once PostgreSQL is back")
        self.assertTrue(all(code in (200, 503) for code, _ in answers))


async def until_async(check, what: str, attempts: int = 100) -> None:
    """Ask `check()` again every 0.1 s until it holds (reconnecting backs off to 2 s)."""
    for _ in range(attempts):
        if await check():
            return
        await task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"still waiting for {what}")



class ClientGoneTests(unittest.TestCase):
    def test_the_work_goes_on_when_the_client_goes(self):
        """Klein cancels a handler whose client went away: its transaction must not be
        cancelled half-way (that would cost the pooled connection, or a whole group
        commit)."""
        cancelled = []
        work = defer.Deferred(lambda _: cancelled.append(True))

        class App:
            @json_endpoint
            async def handler(self, request):
                return 200, await work

        answer = defer.ensureDeferred(App().handler(DummyRequest([b"v1"])))
        answer.cancel()
        self.assertEqual((self.successResultOf(answer), cancelled), (b"", []))
        work.callback({"stored": True})  # finishes unobserved, without an error
