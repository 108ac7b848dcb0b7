"""The outbound SMTP client pool (D-4, D-5).

Messages for one destination domain share connections: each connection
takes the next waiting message after the previous one (RSET between, by
twisted.mail's SMTPClient), and quits when none is left.  A domain gets at
most `per_domain` connections at once and the pool at most `max_connections`.
STARTTLS is used whenever the server offers it; with the "verify" policy it
is required and the certificate must match the MX host name.
"""

from __future__ import annotations

import io
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet import defer, endpoints, error, interfaces, protocol, ssl
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from mailgw.store.queue import Outcome

TLS_OPPORTUNISTIC, TLS_VERIFY = "opportunistic", "verify"


@dataclass
class OutgoingMessage:
    delivery_id: int
    sender: str
    recipient: str
    data: bytes
    done: defer.Deferred = field(default_factory=defer.Deferred)


_LINE_END = re.compile(rb"\r?\n")
_LEADING_DOT = re.compile(rb"(^|\r\n)\.")


def wire_format(data: bytes) -> bytes:
    """CRLF line ends, dot-stuffed (RFC 5321 4.5.2), ending in CRLF before the final dot."""
    data = _LINE_END.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return _LEADING_DOT.sub(rb"\1..", data)


def classify(delivery_id: int, code: int, reply: bytes | str) -> Outcome:
    """D-5: 2xx sent, 5xx a hard bounce, anything else (4xx, no answer) deferred."""
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    text = " ".join(f"{code} {text}".split()) if code > 0 else " ".join(text.split())
    if 200 <= code < 300:
        return Outcome(delivery_id, "sent", text)
    if 500 <= code < 600:
        return Outcome(delivery_id, "bounced", text, bounce_type="hard")
    return Outcome(delivery_id, "deferred", text)


class _DomainQueue:
    def __init__(self, servers: list[tuple[str, str, int]]) -> None:
        # (MX host name, address, port) in the order to try.
        self.servers = servers
        self.waiting: deque[OutgoingMessage] = deque()
        self.connections = 0


class _Connection(smtp.ESMTPClient):
    """One outbound connection, fed from its domain's queue until it is empty."""

    log = Logger()

    def __init__(self, queue: _DomainQueue, identity: bytes, tls_options, require_tls: bool,
                 reply_timeout: float, clock, authenticate: tuple[str, str] | None) -> None:
        secret = authenticate[1].encode() if authenticate else None
        super().__init__(secret, tls_options, identity)
        self.queue = queue
        self.timeout = reply_timeout
        self.callLater = clock.callLater
        self.requireTransportSecurity = require_tls
        self.heloFallback = not require_tls
        self.current: OutgoingMessage | None = None
        self.sent = 0
        self.finished: defer.Deferred[None] = defer.Deferred()
        if authenticate:
            self.registerAuthenticator(smtp.PLAINAuthenticator(authenticate[0].encode()))
            self.requireAuthentication = True

    def connectionMade(self) -> None:  # noqa: N802
        # Each command waits for its reply: without NODELAY, Nagle holds the next one
        # behind the server's delayed ACK (40 ms a message).
        if interfaces.ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        super().connectionMade()

    def getMailFrom(self):  # noqa: N802 (Twisted's name)
        if not self.queue.waiting:
            self.current = None
            return None
        self.current = self.queue.waiting.popleft()
        return self.current.sender.encode()

    def getMailTo(self):  # noqa: N802
        return [self.current.recipient.encode()]

    def getMailData(self):  # noqa: N802
        return io.BytesIO(wire_format(self.current.data))

    def transformChunk(self, chunk: bytes) -> bytes:  # noqa: N802
        """The data is already in wire format: twisted.mail's own conversion assumes LF
        line ends and misses a dot at a chunk boundary."""
        self.resetTimeout()
        return chunk

    def sentMail(self, code, resp, num_ok, addresses, log) -> None:  # noqa: N802
        message, self.current = self.current, None
        if num_ok == 0 and addresses:
            # The RCPT was refused: its reply, not the generic "no recipients" one, counts.
            _, code, resp = addresses[0]
        message.done.callback(classify(message.delivery_id, code, resp))
        self.sent += 1

    def sendError(self, exc) -> None:  # noqa: N802
        self._fail_current(exc)
        super().sendError(exc)

    def connectionLost(self, reason=protocol.connectionDone) -> None:  # noqa: N802
        self._fail_current(reason.value)
        super().connectionLost(reason)
        self.finished.callback(None)

    def _fail_current(self, exc) -> None:
        message, self.current = self.current, None
        if message is not None:
            code = getattr(exc, "code", -1)
            reply = getattr(exc, "resp", None) or str(exc) or type(exc).__name__
            outcome = classify(message.delivery_id, code if isinstance(code, int) else -1,
                               reply)
            if outcome.state == "sent":  # an error is never a success
                outcome = Outcome(message.delivery_id, "deferred", outcome.reply)
            message.done.callback(outcome)


class OutboundPool:
    log = Logger()

    def __init__(self, reactor, clock, hostname: str, tls_policy: str = TLS_OPPORTUNISTIC,
                 connect_timeout: float = 30, reply_timeout: float = 300,
                 per_domain: int = 10, max_connections: int = 200,
                 authenticate: tuple[str, str] | None = None,
                 per_domain_rate: float = 0.0) -> None:
        self.reactor = reactor
        self.clock = clock
        self.identity = hostname.encode("idna")
        self.tls_policy = tls_policy
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self.per_domain = per_domain
        self.max_connections = max_connections
        self.authenticate = authenticate
        # Messages per second per destination domain; 0: as fast as connections allow.
        self.per_domain_rate = per_domain_rate
        self._next_start: dict[str, float] = {}
        self.open_connections = 0
        self.connections_made = 0
        self._queues: dict[str, _DomainQueue] = {}
        self._blocked: deque[str] = deque()  # domains waiting for a free connection
        self._idle_waiters: list[defer.Deferred[None]] = []
        # Tests replace this to connect somewhere else; (address, port) -> endpoint.
        self.endpoint_for: Callable[[str, int], object] = self._tcp_endpoint

    def deliver(self, domain: str, servers: list[tuple[str, str, int]],
                message: OutgoingMessage) -> defer.Deferred[Outcome]:
        """Queue `message` for `domain`, reachable at `servers` (name, address, port)."""
        delay = self._rate_delay(domain)
        if delay > 0:
            self.clock.callLater(delay, self._enqueue, domain, servers, message)
        else:
            self._enqueue(domain, servers, message)
        return message.done

    def _rate_delay(self, domain: str) -> float:
        """How long `domain`'s rate limit holds the next message back (D-4)."""
        if not self.per_domain_rate:
            return 0.0
        now = self.clock.seconds()
        if len(self._next_start) > 10_000:  # forget domains whose limit has passed
            self._next_start = {d: t for d, t in self._next_start.items() if t > now}
        start = max(now, self._next_start.get(domain, now))
        self._next_start[domain] = start + 1.0 / self.per_domain_rate
        return start - now

    def _enqueue(self, domain: str, servers: list[tuple[str, str, int]],
                 message: OutgoingMessage) -> None:
        queue = self._queues.get(domain)
        if queue is None:
            queue = self._queues[domain] = _DomainQueue(servers)
        queue.waiting.append(message)
        self._connect(domain, queue)

    def idle(self) -> defer.Deferred[None]:
        """Fires once no connection is open (graceful stop, tests)."""
        if self.open_connections == 0:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    def _tcp_endpoint(self, address: str, port: int):
        if ":" in address:
            return endpoints.TCP6ClientEndpoint(self.reactor, address, port,
                                                timeout=self.connect_timeout)
        return endpoints.TCP4ClientEndpoint(self.reactor, address, port,
                                            timeout=self.connect_timeout)

    def _connect(self, domain: str, queue: _DomainQueue) -> None:
        """As many connections as messages waiting, within the per-domain and total caps."""
        while (len(queue.waiting) > queue.connections and queue.connections < self.per_domain
               and self.open_connections < self.max_connections):
            queue.connections += 1
            self.open_connections += 1
            defer.ensureDeferred(self._run_connection(domain, queue)).addErrback(
                self._unexpected)
        if (len(queue.waiting) > queue.connections and queue.connections < self.per_domain
                and domain not in self._blocked):
            self._blocked.append(domain)

    async def _run_connection(self, domain: str, queue: _DomainQueue) -> None:
        try:
            last_error = "no mail server"
            for host, address, port in queue.servers:
                if not queue.waiting:
                    return
                client = _Connection(queue, self.identity, self._tls_options(host),
                                     self.tls_policy == TLS_VERIFY, self.reply_timeout,
                                     self.clock, self.authenticate)
                try:
                    await endpoints.connectProtocol(self.endpoint_for(address, port), client)
                except (error.ConnectError, error.DNSLookupError, OSError) as e:
                    last_error = f"cannot connect to {host} [{address}]:{port}: {e}"
                    continue
                self.connections_made += 1
                await client.finished
                if client.sent:
                    return  # it worked; a later connection picks up what is left
            self._fail_waiting(queue, last_error)
        finally:
            queue.connections -= 1
            self.open_connections -= 1
            if queue.waiting:
                self._connect(domain, queue)
            elif queue.connections == 0:
                self._queues.pop(domain, None)
            self._unblock()
            if self.open_connections == 0:
                waiters, self._idle_waiters = self._idle_waiters, []
                for d in waiters:
                    d.callback(None)

    def _fail_waiting(self, queue: _DomainQueue, reason: str) -> None:
        """No server of the domain could be reached: everything waiting is deferred."""
        while queue.waiting:
            message = queue.waiting.popleft()
            message.done.callback(Outcome(message.delivery_id, "deferred", reason))

    def _unblock(self) -> None:
        while self._blocked and self.open_connections < self.max_connections:
            domain = self._blocked.popleft()
            queue = self._queues.get(domain)
            if queue is not None:
                self._connect(domain, queue)

    def _tls_options(self, host: str):
        if self.tls_policy == TLS_VERIFY:
            return ssl.optionsForClientTLS(host)
        return ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_2)

    def _unexpected(self, failure: Failure) -> None:
        self.log.failure("outbound connection failed unexpectedly", failure)
