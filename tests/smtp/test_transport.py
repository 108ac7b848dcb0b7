"""R-6 on real sockets: a client cannot keep a socket, or the process's memory, for
itself. The submission factory listens on loopback (plain and implicit TLS) with its
timers on a task.Clock; the clients are Twisted protocols that misbehave on purpose.
No database: the sessions never get past what the transport decides."""

from pathlib import Path

from twisted.internet import defer, endpoints, reactor, ssl, task
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from mailgw.smtp.protocol import CLOSE_GRACE_SECONDS, SubmissionFactory
from mailgw.tlscert import ensure_self_signed, server_tls_options
from tests.harness import Client, reactor_turns, until

IDLE_TIMEOUT = 300
HANDSHAKE_TIMEOUT = 30


class Server:
    """A SubmissionFactory on two loopback listeners: `plain` (STARTTLS) and `implicit`
    (TLS from the first byte)."""

    def __init__(self, test: unittest.TestCase, **options) -> None:
        self.test = test
        self.clock = task.Clock()
        base = Path(test.mktemp())
        cert, key = base / "cert.pem", base / "key.pem"
        ensure_self_signed(cert, key, "localhost")
        self.trust = ssl.Certificate.loadPEM(cert.read_bytes())
        tls_options = server_tls_options(cert, key)
        self.factory = SubmissionFactory("mx.test.example", tls_options, self.clock,
                                         IDLE_TIMEOUT, tls_handshake_timeout=HANDSHAKE_TIMEOUT,
                                         **options)
        self.plain = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.implicit = reactor.listenTCP(0, TLSMemoryBIOFactory(tls_options, False,
                                                                 self.factory),
                                          interface="127.0.0.1")
        test.addCleanup(self.stop)

    async def stop(self) -> None:
        await defer.gatherResults([defer.maybeDeferred(port.stopListening)
                                   for port in (self.plain, self.implicit)])
        sessions = list(self.factory.sessions)
        for session in sessions:
            session.transport.abortConnection()
        await defer.DeferredList([session.closed for session in sessions])

    def client_tls(self):
        return ssl.optionsForClientTLS("localhost", trustRoot=self.trust)

    async def connect(self, port, tls: bool = False, source: str = "127.0.0.1",
                      session: bool = True) -> Client:
        """A client connected to `port` from `source` (with TLS on top when `tls`); with
        `session`, once its session has started."""
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port,
                                                bindAddress=(source, 0))
        if tls:
            endpoint = endpoints.wrapClientTLS(self.client_tls(), endpoint)
        client = Client()
        before = len(self.factory.sessions)
        await endpoints.connectProtocol(endpoint, client)
        self.test.addCleanup(client.close)
        if session:
            await until(lambda: len(self.factory.sessions) > before, "the session to start")
        return client

    async def refused(self, client: Client) -> bytes:
        """What the server sent a connection it refused, once it is closed."""
        await until(lambda: client.lost.called, "the refused connection to close")
        return client.received

    async def starttls(self, client: Client, handshake: bool) -> None:
        """EHLO and STARTTLS; then the handshake when `handshake`, else silence."""
        await until(lambda: b"\r\n" in client.received, "the banner")
        client.transport.write(b"EHLO client\r\nSTARTTLS\r\n")
        await until(lambda: b"220 2.0.0 Ready" in client.received, "the 220 to STARTTLS")
        if handshake:
            client.transport.startTLS(self.client_tls())
            await until(lambda: client.handshake_done, "the handshake")

    async def banner(self, client: Client) -> None:
        await until(lambda: b"\r\n" in client.received, "the banner")

    async def outlives(self, seconds: float) -> bool:
        """Whether every session is still open `seconds` later (on the clock)."""
        sessions = set(self.factory.sessions)
        self.clock.advance(seconds)
        await reactor_turns()
        return self.factory.sessions == sessions


class CloseTests(unittest.TestCase):
    async def test_tls_close_not_answered_ends_in_an_abort(self):
        """The idle timeout's close waits for the client's close_notify; a client that
        never reads does not send one, and is cut CLOSE_GRACE_SECONDS later."""
        server = Server(self)
        client = await server.connect(server.implicit, tls=True)
        await server.banner(client)
        client.transport.pauseProducing()  # reads nothing more
        server.clock.advance(IDLE_TIMEOUT)
        await reactor_turns()
        self.assertEqual(len(server.factory.sessions), 1)  # the close cannot finish
        server.clock.advance(CLOSE_GRACE_SECONDS)
        await until(lambda: not server.factory.sessions, "the session to end")


    async def test_nothing_read_after_a_close_is_a_command(self):
        """After STARTTLS the TCP transport does not know of the TLS layer's close and
        would hand on what follows: here, errors past the one that closed."""
        server = Server(self)
        client = await server.connect(server.plain)
        await server.starttls(client, handshake=True)
        (session,) = server.factory.sessions
        client.transport.write(b"FROB\r\n" * (session.max_errors + 10))
        await until(lambda: client.lost.called, "the connection to close")
        self.assertEqual(session.errors, session.max_errors + 1)


class HandshakeTimeoutTests(unittest.TestCase):
    async def test_no_client_hello_on_implicit_tls(self):
        server = Server(self)
        await server.connect(server.implicit)  # plain TCP: it never starts TLS
        self.assertTrue(await server.outlives(HANDSHAKE_TIMEOUT - 1))
        server.clock.advance(1)
        await until(lambda: not server.factory.sessions, "the session to end")

    async def test_silence_after_starttls(self):
        server = Server(self)
        client = await server.connect(server.plain)
        await server.starttls(client, handshake=False)
        self.assertTrue(await server.outlives(HANDSHAKE_TIMEOUT - 1))
        server.clock.advance(1)
        await until(lambda: not server.factory.sessions, "the session to end")

    async def test_completed_handshakes_are_not_timed(self):
        server = Server(self)
        client = await server.connect(server.implicit, tls=True)
        await server.banner(client)
        starttls = await server.connect(server.plain)
        await server.starttls(starttls, handshake=True)
        self.assertTrue(await server.outlives(IDLE_TIMEOUT - 1))


def held_bytes(session) -> int:
    """What the process holds for `session`: its unread input and its unsent replies
    (FileDescriptor's buffers; over TLS, those of the TCP transport under it, plus the
    TLS layer's own, which are bounded by its record and aggregation sizes)."""
    transport = getattr(session.transport, "transport", session.transport)
    unsent = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    return len(session._buffer) + unsent


async def flood(client: Client) -> None:
    """3 MB of HELP, read by a client that reads none of the replies (each 15 times as
    long as its command)."""
    await until(lambda: b"\r\n" in client.received, "the banner")
    client.transport.pauseProducing()
    client.transport.write(b"HELP\r\n" * 500_000)


class BackpressureTests(unittest.TestCase):
    """The session stops reading, holds about the transport's 64 KiB buffer, and is cut
    when idle. (The command cap would close it first: it is lifted here.)"""

    async def _pipeline_without_reading(self, server: Server, client: Client) -> None:
        await flood(client)
        (session,) = server.factory.sessions
        # Until the kernel's buffers are full too, the session reads again each time
        # its replies drain into them; then it stays paused. Never more than about
        # twice the transport's buffer is held (one read's worth of unread commands,
        # and unsent replies).
        deadline, paused_turns = reactor.seconds() + 10, 0
        while paused_turns < 20:
            self.assertLess(held_bytes(session), 3 * 65536)
            self.assertLess(reactor.seconds(), deadline, "the session never stopped reading")
            paused_turns = paused_turns + 1 if session.paused else 0
            await reactor_turns(1)
        server.clock.advance(IDLE_TIMEOUT)  # no command read since the first ones
        server.clock.advance(CLOSE_GRACE_SECONDS)  # its 421 cannot be sent either
        await until(lambda: not server.factory.sessions, "the session to end")

    async def test_plain(self):
        server = Server(self, max_commands_without_message=10**9)
        await self._pipeline_without_reading(server, await server.connect(server.plain))

    async def test_tls(self):
        server = Server(self, max_commands_without_message=10**9)
        await self._pipeline_without_reading(server, await server.connect(server.implicit,
                                                                          tls=True))

    async def test_what_follows_a_close_is_dropped(self):
        """The command cap closes the session; over TLS the close reads on, for the
        client's close_notify, and must not keep what it reads."""
        server = Server(self)
        client = await server.connect(server.implicit, tls=True)
        await flood(client)
        (session,) = server.factory.sessions
        for _ in range(200):  # more than enough to read the 3 MB
            self.assertLess(held_bytes(session), 3 * 65536)
            await reactor_turns(1)
        server.clock.advance(CLOSE_GRACE_SECONDS)
        await until(lambda: not server.factory.sessions, "the session to end")


class ConnectionCapTests(unittest.TestCase):
    async def test_per_address(self):
        server = Server(self, max_connections_per_address=2)
        first = await server.connect(server.plain)
        await server.connect(server.implicit, tls=True)  # every listener counts
        refused = await server.connect(server.plain, session=False)
        self.assertEqual(await server.refused(refused), b"421 4.7.0 Too many connections from "
                                                       b"your address, try again later\r\n")
        await server.connect(server.plain, source="127.0.0.2")
        await first.close()
        await until(lambda: len(server.factory.sessions) == 2, "the first session to end")
        await server.connect(server.plain)  # its slot is free again

    async def test_total(self):
        server = Server(self, max_connections=2)
        await server.connect(server.plain)
        await server.connect(server.plain, source="127.0.0.2")
        refused = await server.connect(server.plain, source="127.0.0.3", session=False)
        self.assertEqual(await server.refused(refused),
                         b"421 4.7.0 Too many connections, try again later\r\n")

    async def test_implicit_tls_refused_after_the_handshake(self):
        server = Server(self, max_connections=1)
        await server.connect(server.plain)
        refused = await server.connect(server.implicit, tls=True, session=False)
        self.assertEqual(await server.refused(refused),
                         b"421 4.7.0 Too many connections, try again later\r\n")
        self.assertTrue(refused.handshake_done)

    async def test_refused_client_without_a_handshake_is_cut(self):
        server = Server(self, max_connections=1)
        await server.connect(server.plain)
        silent = await server.connect(server.implicit, session=False)  # no ClientHello
        await reactor_turns()
        self.assertFalse(silent.lost.called)
        server.clock.advance(CLOSE_GRACE_SECONDS)
        self.assertEqual(await server.refused(silent), b"")
