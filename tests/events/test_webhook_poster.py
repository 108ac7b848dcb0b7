"""One webhook post against real local HTTP receivers (W-2): what counts as accepted, and
receivers that fail, redirect, hang, refuse or answer too much."""

from __future__ import annotations

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web import resource, server

from mailgw.events.webhooks import poster
from mailgw.events.webhooks.poster import MAX_ANSWER_BYTES, PostFailed, WebhookPoster
from tests.harness import until


class Receiver(resource.Resource):
    isLeaf = True

    def __init__(self, code: int = 200, answer: bytes = b"ok", hang: bool = False,
                 location: bytes | None = None) -> None:
        super().__init__()
        self.code, self.answer, self.hang, self.location = code, answer, hang, location
        self.requests: list[tuple[bytes, bytes, dict]] = []
        self.waiting: list = []

    def render_POST(self, request):  # noqa: N802 - twisted.web's name
        self.requests.append((request.path, request.content.read(), {
            name.decode(): values[0].decode()
            for name, values in request.requestHeaders.getAllRawHeaders()}))
        if self.hang:
            self.waiting.append(request)
            return server.NOT_DONE_YET
        request.setResponseCode(self.code)
        if self.location:
            request.setHeader(b"location", self.location)
        return self.answer


class PosterTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.poster = WebhookPoster(reactor, self.clock, 5, 2, ["127.0.0.1"])
        self.addCleanup(lambda: defer.ensureDeferred(self.poster.close()))

    def serve(self, receiver: Receiver) -> str:
        site = server.Site(receiver, timeout=None)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/hook"

    async def post(self, url: str) -> None:
        await self.poster.post(url, b'{"event":"sent"}', {"X-Mailgw-Signature": "t=1,v1=ab"})

    async def refused(self, url: str) -> str:
        with self.assertRaises(PostFailed) as caught:
            await self.post(url)
        return str(caught.exception)

    async def test_accepted_on_2xx_with_json_and_headers(self):
        receiver = Receiver(code=204, answer=b"")
        await self.post(self.serve(receiver))
        [(path, body, headers)] = receiver.requests
        self.assertEqual((path, body), (b"/hook", b'{"event":"sent"}'))
        self.assertEqual(headers["Content-Type"], "application/json")
        self.assertEqual(headers["X-Mailgw-Signature"], "t=1,v1=ab")

    async def test_error_status(self):
        self.assertEqual(await self.refused(self.serve(Receiver(code=500))), "answered 500")

    async def test_redirect_is_not_followed(self):
        receiver = Receiver(code=307, location=b"https://elsewhere.example/")
        reason = await self.refused(self.serve(receiver))
        self.assertEqual(reason, "answered 307, a redirect to 'https://elsewhere.example/' "
                                 "(not followed)")
        self.assertEqual(len(receiver.requests), 1)

    async def test_receiver_that_never_answers_costs_the_time_limit(self):
        receiver = Receiver(hang=True)
        d = defer.ensureDeferred(self.refused(self.serve(receiver)))
        await until(lambda: receiver.requests, "the request to arrive")
        self.clock.advance(5)
        self.assertEqual(await d, "no answer within 5 s")
        for request in receiver.waiting:  # the server side lets go too
            request.transport.abortConnection()

    async def test_connection_refused(self):
        port = reactor.listenTCP(0, server.Site(Receiver()), interface="127.0.0.1")
        number = port.getHost().port
        await port.stopListening()
        reason = await self.refused(f"http://127.0.0.1:{number}/hook")
        self.assertIn("refused", reason.lower())

    async def test_plain_http_only_to_allowed_hosts(self):
        reason = await self.refused("http://hooks.example.org/x")
        self.assertEqual(reason, "plain http to hooks.example.org is not allowed "
                                 "(webhooks.allow_http_hosts)")

    async def test_endless_answer_is_not_read_whole(self):
        """A 200 whose body never ends: accepted once past the bound, connection closed."""
        receiver = Receiver(hang=True)
        d = defer.ensureDeferred(self.post(self.serve(receiver)))
        await until(lambda: receiver.waiting, "the request to arrive")
        [request] = receiver.waiting
        for _ in range(MAX_ANSWER_BYTES // 4096 + 2):
            request.write(b"x" * 4096)
        await d  # accepted: the status decides
        await until(lambda: request.channel is None or request.channel.transport is None
                    or request.channel.transport.disconnected, "the connection to close")

    async def test_answer_trickling_past_the_time_limit_closes_the_connection(self):
        """A 200 whose body comes a byte at a time: refused at the time limit, and the
        socket closed then, not kept for as long as the receiver likes."""
        reading = []
        read = poster.read_body
        self.patch(poster, "read_body",
                   lambda response, limit: reading.append(1) or read(response, limit))
        receiver = Receiver(hang=True)
        d = defer.ensureDeferred(self.refused(self.serve(receiver)))
        await until(lambda: receiver.waiting, "the request to arrive")
        [request] = receiver.waiting
        request.write(b"x")
        lost = defer.Deferred()
        request.notifyFinish().addBoth(lambda _: lost.callback(None))
        await until(lambda: reading, "the answer's body to be read")
        self.clock.advance(5)
        self.assertEqual(await d, "no answer within 5 s")
        await until(lambda: lost.called, "the server to see the connection go")
