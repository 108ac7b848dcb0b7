"""The outbound SMTP client pool (D-4, D-5).

Connections are shared per destination: the mail servers a domain resolved
to, preference by preference, so that domains with the same MX hosts at the
same preferences, and every domain in smarthost mode, share them.  Each
connection takes the next waiting message as soon as the previous one is
answered (RSET only after a refused envelope).
When none is left it stays open for `idle_seconds`, so that a steady flow to a
destination does not open a connection per queue poll, then QUITs.  When the
server offers PIPELINING (RFC 2920), MAIL, RCPT and DATA go out in one write,
saving two round trips a message.  A destination gets at most
`per_destination` connections at once and the pool at most `max_connections`,
idle ones included; a destination waiting for a slot makes the oldest idle
connection of another destination quit.  The rate limit stays per recipient
domain: it is the receiving domain's policy, whoever hosts it.
STARTTLS is used whenever the server offers it; with the "verify" policy it
is required and the certificate must match the MX host name.  With the
"opportunistic" policy a STARTTLS that fails (refused, or a handshake that
breaks) is followed by a new connection in clear text, and that server is not
offered STARTTLS again for TLS_FALLBACK_SECONDS.  With credentials (AUTH to a
smarthost) TLS is required whatever the policy: they never go in clear text.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import NamedTuple

from twisted.internet import defer, endpoints, error, interfaces, protocol, ssl
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from mailgw.idle import IdleWaiters
from mailgw.store.queue import Outcome
from mailgw.text import one_line

TLS_OPPORTUNISTIC, TLS_VERIFY = "opportunistic", "verify"
# After STARTTLS to a server failed under the opportunistic policy, connections to it
# skip STARTTLS this long instead of failing the handshake first each time.
TLS_FALLBACK_SECONDS = 3600.0


@dataclass
class OutgoingMessage:
    delivery_id: int
    sender: str
    recipient: str
    # Makes the message text; called once the server has accepted the recipient and
    # DATA, so that a refused or deferred RCPT costs no rendering or DKIM signature,
    # and a message waiting for a connection holds no rendered copy.
    render: Callable[[], Awaitable[bytes]]
    done: defer.Deferred = field(default_factory=defer.Deferred)


def wire_format(data: bytes) -> bytes:
    """CRLF line ends, dot-stuffed (RFC 5321 4.5.2), ending in CRLF before the final dot.
    Plain bytes operations: rendered messages already have CRLF line ends, and regular
    expressions over a whole message cost ~0.1 ms each."""
    if data.count(b"\n") != data.count(b"\r\n"):  # some bare LF
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    data = data.replace(b"\r\n.", b"\r\n..")
    return b"." + data if data.startswith(b".") else data


def classify(delivery_id: int, code: int, reply: bytes | str,
             bounce_type: str = "hard") -> Outcome:
    """D-5: 2xx sent, 5xx a bounce (hard unless the reply says nothing about the
    recipient), anything else (4xx, no answer) deferred."""
    text = _reply_line(code, reply)
    if 200 <= code < 300:
        return Outcome(delivery_id, "sent", text)
    if 500 <= code < 600:
        return Outcome(delivery_id, "bounced", text, bounce_type=bounce_type)
    return Outcome(delivery_id, "deferred", text)


def _reply_line(code: int, reply: bytes | str) -> str:
    """A reply as one line ("550 5.1.1 No such user"); without a code, the text alone."""
    text = one_line(reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply)
    return f"{code} {text}" if code > 0 else text


# twisted.mail's errors for what the server lacks: their 502 is made up, not a reply.
_LOCAL_ERRORS = (smtp.EHLORequiredError, smtp.AUTHRequiredError, smtp.TLSRequiredError)


def _error_reply(exc: BaseException) -> tuple[int, bytes | str]:
    """The code and text of a server's error reply; -1 and a description for others."""
    code = -1 if isinstance(exc, _LOCAL_ERRORS) else getattr(exc, "code", -1)
    reply = getattr(exc, "resp", None) or str(exc) or type(exc).__name__
    return (code if isinstance(code, int) else -1), reply


class MailHost(NamedTuple):
    """One address of a recipient's mail server (or the smarthost), in the order to try."""

    host: str
    address: str
    port: int
    # The MX preference: a lower one is tried first (RFC 5321 5.1).
    preference: int = 0


# What connections are shared by (D-4): the mail servers as (host name, port), one set per
# preference, lowest first. Sets, as MX hosts of equal preference come in a random order;
# levels, so that domains whose backup is another's primary do not share.
_Destination = tuple[frozenset[tuple[str, int]], ...]


def _destination(servers: list[MailHost]) -> _Destination:
    levels: dict[int, set[tuple[str, int]]] = {}
    for server in servers:
        levels.setdefault(server.preference, set()).add((server.host, server.port))
    return tuple(frozenset(levels[preference]) for preference in sorted(levels))


class _DestinationQueue:
    """The messages waiting for one destination, whatever their recipient domains, and
    its connections."""

    def __init__(self, servers: list[MailHost]) -> None:
        # In the order to try.
        self.servers = servers
        self.waiting: deque[OutgoingMessage] = deque()
        self.connections = 0  # open, idle ones included
        self.idle: list[_Connection] = []  # most recently parked last


class _Connection(smtp.ESMTPClient):
    """One outbound connection, fed from its destination's queue; when the queue is empty the
    pool parks it for a while (idle) or lets it QUIT.

    twisted.mail's ESMTPClient does EHLO, STARTTLS and AUTH; the mail transaction is
    ours, so that the envelope can be pipelined (RFC 2920) and a refusal reported
    with the server's own reply.
    """

    # twisted.mail's log of the last lines: outcomes carry the replies themselves.
    debug = False

    def __init__(self, pool: OutboundPool, queue: _DestinationQueue, host: str,
                 tls_options) -> None:
        authenticate = pool.authenticate
        secret = authenticate[1].encode() if authenticate else None
        super().__init__(secret, tls_options, pool.identity)
        self.pool = pool
        self.queue = queue
        self.host = host
        self.timeout = pool.reply_timeout
        self.callLater = pool.clock.callLater
        self.requireTransportSecurity = pool.require_tls
        self.heloFallback = not pool.require_tls
        self.current: OutgoingMessage | None = None
        self.sent = 0
        # The first error (a server's reply when there was one): why messages still
        # waiting could not go, instead of a generic "no mail server".
        self.failure: str | None = None
        # It found the queue empty at least once: the server works, even if it sent nothing.
        self.ran_dry = False
        # The current message is the first after a wait in the pool's idle list.
        self._resumed = False
        self.pipelining = False
        # STARTTLS was accepted but no reply has come through TLS yet.
        self._tls_pending = False
        # STARTTLS was refused or the TLS session never worked.
        self.tls_failed = False
        # Replies to the current envelope (MAIL, RCPT, DATA), and the commands not sent yet.
        self._replies: list[tuple[int, bytes]] = []
        self._unsent: list[bytes] = []
        self.finished: defer.Deferred[None] = defer.Deferred()
        if authenticate:
            self.registerAuthenticator(smtp.PLAINAuthenticator(authenticate[0].encode()))
            self.requireAuthentication = True

    def connectionMade(self) -> None:
        # Each command waits for its reply: without NODELAY, Nagle holds the next one
        # behind the server's delayed ACK (40 ms a message).
        if interfaces.ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        super().connectionMade()

    def lineReceived(self, line: bytes) -> None:
        self._tls_pending = False  # whatever it says, TLS carried it
        super().lineReceived(line)

    def esmtpState_starttls(self, code, resp) -> None:
        self._tls_pending = True
        super().esmtpState_starttls(code, resp)

    def esmtpTLSFailed(self, code=-1, resp=None) -> None:
        # STARTTLS refused (or the TLS layer could not start): keep the server's reply.
        self._tls_failure(_reply_line(code, resp or b"TLS could not start"))
        super().esmtpTLSFailed(code, resp)

    def _tls_failure(self, text: str) -> None:
        self.tls_failed = True
        if self.failure is None:
            self.failure = f"{self.host}: STARTTLS failed: {text}"

    def esmtpState_serverConfig(self, code, resp) -> None:
        # The last EHLO counts: after STARTTLS the server lists its extensions again.
        keywords = {line.split(None, 1)[0].upper()
                    for line in resp.splitlines()[1:] if line.strip()}
        self.pipelining = b"PIPELINING" in keywords
        super().esmtpState_serverConfig(code, resp)

    def smtpState_from(self, code, resp) -> None:
        """Start the next waiting message: after EHLO (or AUTH), after the previous one
        and after RSET."""
        if not self.queue.waiting:
            self.ran_dry = True
            self.pool._connection_free(self)
            return
        self.current = message = self.queue.waiting.popleft()
        commands = [b"MAIL FROM:" + smtp.quoteaddr(message.sender.encode()),
                    b"RCPT TO:" + smtp.quoteaddr(message.recipient.encode()), b"DATA"]
        self._replies = []
        self._expected = range(1000)  # every reply goes to _envelope_reply
        self._okresponse = self._envelope_reply
        if self.pipelining:
            # RFC 2920: the whole envelope in one write, its replies read in order.
            self._unsent = []
            self.transport.write(b"".join(command + b"\r\n" for command in commands))
        else:
            self._unsent = commands[1:]
            self.sendLine(commands[0])

    def park(self) -> None:
        """Wait for the pool to resume it (a message came) or to let it quit."""
        self.setTimeout(None)  # no reply is due
        self._expected = ()
        self._failresponse = self._reply_while_idle

    def resume(self) -> None:
        self._resumed = True
        self.setTimeout(self.timeout)
        self.smtpState_from(-1, b"")

    def quit(self) -> None:
        self.setTimeout(self.timeout)
        self._disconnectFromServer()

    def _reply_while_idle(self, code: int, resp: bytes) -> None:
        # Nothing was asked: most likely a 421 before the server closes an idle session.
        self.transport.loseConnection()

    def _envelope_reply(self, code: int, resp: bytes) -> None:
        self._replies.append((code, resp))
        if len(self._replies) < 3 - len(self._unsent):
            return  # more pipelined replies to come
        refusal = self._refusal(self.current.delivery_id)
        if refusal is None and self._unsent:
            self.sendLine(self._unsent.pop(0))
        elif refusal is None:
            self._send_body()
        elif code == 354:
            # RFC 2920 3.1: a DATA accepted after a refusal gets an empty message; the
            # refusal stays the outcome.
            self._okresponse = lambda *_: self._finish(refusal)
            self.sendLine(b".")
        else:
            self._finish(refusal, transaction_open=True)

    def _refusal(self, delivery_id: int) -> Outcome | None:
        """The outcome of a message whose envelope was refused: its first negative reply.
        A 5xx to MAIL FROM refuses our sender (reputation, policy), not the recipient:
        a soft bounce, which does not count towards invalidating the contact."""
        for i, (code, resp) in enumerate(self._replies):
            if not (code == 354 if i == 2 else 200 <= code < 300):
                return _refused(delivery_id, code, resp, "soft" if i == 0 else "hard")
        return None

    def _send_body(self) -> None:
        self._okresponse = self._data_reply
        message = self.current
        rendering = defer.maybeDeferred(message.render)
        rendering.addCallbacks(lambda data: self._write_body(message, data),
                               lambda failure: self._render_failed(message, failure))

    def _write_body(self, message: OutgoingMessage, data: bytes) -> None:
        """The whole message in one write (at most smtp.max_message_size): the transport
        buffers it, with no producer round trips per chunk."""
        if self.current is message:  # else the connection was lost meanwhile
            self.transport.write(wire_format(data) + b".\r\n")

    def _render_failed(self, message: OutgoingMessage, failure: Failure) -> None:
        """No message text to send after DATA: the server must not get a partial one, so
        the connection is dropped and the delivery deferred with the reason. A delivery
        withdrawn by a graceful stop while its envelope was under way ends the same way,
        which is no error."""
        if message.delivery_id in self.pool._withdrawn:
            self.pool.log.info("delivery {id} withdrawn after its envelope: connection "
                               "dropped before the text", id=message.delivery_id)
        else:
            self.pool.log.failure("rendering delivery {id} failed", failure,
                                  id=message.delivery_id)
        if self.current is message:
            self.current = None
            self.sent += 1  # answered: the server is fine, the others may go on a new connection
            message.done.callback(Outcome(message.delivery_id, "deferred",
                                          f"message could not be rendered: "
                                          f"{failure.getErrorMessage()}"))
            self.transport.abortConnection()

    def _data_reply(self, code: int, resp: bytes) -> None:
        self._finish(classify(self.current.delivery_id, code, resp))

    def _finish(self, outcome: Outcome, transaction_open: bool = False) -> None:
        """The current message has its answer: report it and go on with the next one.
        A reply to the message text ends the transaction (RFC 5321 4.1.1.4), so the next
        MAIL follows at once; a refused envelope is cleared with RSET first."""
        message, self.current = self.current, None
        self.sent += 1
        self._resumed = False
        if transaction_open:
            self._expected = smtp.SUCCESS
            self._okresponse = self.smtpState_from
            self._failresponse = lambda *_: self.pool._release(self)  # start afresh
            self.sendLine(b"RSET")
        else:
            self.smtpState_from(-1, b"")
        message.done.callback(outcome)

    def sendError(self, exc) -> None:
        self._failed(exc)
        self._fail_current(exc)
        super().sendError(exc)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self._failed(reason.value)
        self._fail_current(reason.value)
        super().connectionLost(reason)
        self.pool._connection_lost(self)
        self.finished.callback(None)

    def _failed(self, exc: BaseException) -> None:
        code, reply = _error_reply(exc)
        text = _reply_line(code, reply)
        if self._tls_pending:  # the handshake failed (or hung), or TLS never carried a reply
            self._tls_failure(text)
        elif self.failure is None:
            self.failure = text if code > 0 else f"{self.host}: {text}"

    def _fail_current(self, exc) -> None:
        message, self.current = self.current, None
        if message is None:
            return
        if self._resumed and not self._replies:
            # No answer at all on a reused connection: the server most likely closed it
            # while it was idle, and nothing was accepted. Another connection takes it.
            self.queue.waiting.appendleft(message)
            return
        # A pipelined refusal (a 421, say) read before the server hung up says more.
        message.done.callback(self._refusal(message.delivery_id)
                              or _refused(message.delivery_id, *_error_reply(exc)))


def _refused(delivery_id: int, code: int, reply: bytes | str,
             bounce_type: str = "hard") -> Outcome:
    """classify() for a reply or error that ends a transaction early: never `sent`."""
    outcome = classify(delivery_id, code, reply, bounce_type)
    if outcome.state == "sent":
        return Outcome(delivery_id, "deferred", outcome.reply)
    return outcome


class OutboundPool:
    log = Logger()

    def __init__(self, reactor, clock, hostname: str, tls_policy: str = TLS_OPPORTUNISTIC,
                 connect_timeout: float = 30, reply_timeout: float = 300,
                 per_destination: int = 10, max_connections: int = 200,
                 authenticate: tuple[str, str] | None = None,
                 per_domain_rate: float = 0.0, idle_seconds: float = 2.0) -> None:
        self.reactor = reactor
        self.clock = clock
        self.identity = hostname.encode("idna")
        self.tls_policy = tls_policy
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self.per_destination = per_destination
        self.max_connections = max_connections
        self.authenticate = authenticate
        # Credentials never go in clear text: with them TLS is required, as with "verify".
        self.require_tls = tls_policy == TLS_VERIFY or authenticate is not None
        # Messages per second per recipient domain; 0: as fast as connections allow.
        self.per_domain_rate = per_domain_rate
        self._next_start: dict[str, float] = {}
        # (address, port) -> until when STARTTLS is skipped (opportunistic policy).
        self._tls_failed_until: dict[tuple[str, int], float] = {}
        self.open_connections = 0
        self.connections_made = 0
        self._queues: dict[_Destination, _DestinationQueue] = {}
        self._blocked: deque[_Destination] = deque()  # waiting for a free connection
        # Deliveries given up by a graceful stop (withdraw).
        self._withdrawn: set[int] = set()
        self._no_connections = IdleWaiters()
        # A connection whose queue is empty stays open this long for the next message.
        self.idle_seconds = idle_seconds
        self._idle: dict[_Connection, interfaces.IDelayedCall] = {}  # oldest first
        self._leaving: set[_Connection] = set()  # sent (or sending) QUIT
        self._closing_idle = False  # close_idle() waits: no connection may stay idle
        # Tests replace this to connect somewhere else; (address, port) -> endpoint.
        self.endpoint_for: Callable[[str, int], object] = self._tcp_endpoint

    def deliver(self, domain: str, servers: list[MailHost],
                message: OutgoingMessage) -> defer.Deferred[Outcome]:
        """Queue `message` for `domain`, reachable at `servers` (in preference order);
        it goes on a connection to those servers, shared with other domains they serve."""
        delay = self._rate_delay(domain)
        if delay > 0:
            self.clock.callLater(delay, self._enqueue, servers, message)
        else:
            self._enqueue(servers, message)
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

    def withdraw(self, delivery_ids: Collection[int]) -> None:
        """Give up the messages of `delivery_ids` that no connection has started (a
        graceful stop gave their leases back): those waiting leave their queues at once,
        those held by the rate limit when their time comes; each is answered deferred
        without a command sent, so no server sees a transaction begun for nothing."""
        self._withdrawn.update(delivery_ids)
        given_up = []
        for queue in self._queues.values():
            kept: deque[OutgoingMessage] = deque()
            for message in queue.waiting:
                (given_up if message.delivery_id in self._withdrawn else kept).append(message)
            queue.waiting = kept
        for message in given_up:  # answered once the queues are consistent again
            self._answer_withdrawn(message)

    def _enqueue(self, servers: list[MailHost], message: OutgoingMessage) -> None:
        if message.delivery_id in self._withdrawn:
            self._answer_withdrawn(message)
            return
        destination = _destination(servers)
        queue = self._queues.get(destination)
        if queue is None:
            queue = self._queues[destination] = _DestinationQueue(servers)
        else:
            queue.servers = servers  # the latest addresses and order, for new connections
        queue.waiting.append(message)
        self._connect(destination, queue)

    @staticmethod
    def _answer_withdrawn(message: OutgoingMessage) -> None:
        message.done.callback(Outcome(message.delivery_id, "deferred",
                                      "withdrawn: mailgw is stopping"))

    def idle(self) -> defer.Deferred[None]:
        """Fires once no connection is open (graceful stop, tests)."""
        return self._no_connections.wait(self.open_connections == 0)

    def close_idle(self) -> defer.Deferred[None]:
        """Graceful stop: idle connections QUIT now, busy ones as soon as their queue is
        empty instead of waiting for more; fires once no connection is open."""
        if self.open_connections == 0:
            return defer.succeed(None)
        self._closing_idle = True
        for connection in list(self._idle):
            self._release(connection)
        return self.idle()

    def _connection_free(self, connection: _Connection) -> None:
        """`connection` found its queue empty: park it for the next message, or let it go
        when idling is off, the pool is stopping or a blocked destination wants the slot."""
        if (self.idle_seconds and not self._closing_idle
                and self._slots_wanted() <= len(self._leaving)):
            self._idle[connection] = self.clock.callLater(self.idle_seconds, self._release,
                                                          connection)
            connection.queue.idle.append(connection)
            connection.park()
        else:
            self._release(connection)

    def _release(self, connection: _Connection) -> None:
        """QUIT `connection`; its slot is free once the server has closed it."""
        self._unpark(connection)
        self._leaving.add(connection)
        connection.quit()

    def _unpark(self, connection: _Connection) -> None:
        timer = self._idle.pop(connection, None)
        if timer is not None:
            connection.queue.idle.remove(connection)
            if timer.active():
                timer.cancel()

    def _connection_lost(self, connection: _Connection) -> None:
        self._unpark(connection)
        self._leaving.discard(connection)

    def _slots_wanted(self) -> int:
        """Connections that destinations blocked by max_connections would open now."""
        wanted = 0
        for destination in self._blocked:
            queue = self._queues.get(destination)
            if queue is not None:
                wanted += max(0, min(len(queue.waiting), self.per_destination)
                              - queue.connections)
        return wanted

    def _free_slots(self) -> None:
        """Close idle connections, oldest first, while blocked destinations want slots."""
        wanted = self._slots_wanted()
        while self._idle and len(self._leaving) < wanted:
            self._release(next(iter(self._idle)))

    def _tcp_endpoint(self, address: str, port: int):
        if ":" in address:
            return endpoints.TCP6ClientEndpoint(self.reactor, address, port,
                                                timeout=self.connect_timeout)
        return endpoints.TCP4ClientEndpoint(self.reactor, address, port,
                                            timeout=self.connect_timeout)

    def _connect(self, destination: _Destination, queue: _DestinationQueue) -> None:
        """Idle connections take waiting messages first; then as many new connections as
        messages waiting, within the per-destination and total caps."""
        while queue.waiting and queue.idle:
            connection = queue.idle[-1]  # the most recent: older ones may time out
            self._unpark(connection)
            connection.resume()
        while (len(queue.waiting) > queue.connections
               and queue.connections < self.per_destination
               and self.open_connections < self.max_connections):
            queue.connections += 1
            self.open_connections += 1
            defer.ensureDeferred(self._run_connection(destination, queue)).addErrback(
                self._unexpected)
        if len(queue.waiting) > queue.connections and queue.connections < self.per_destination:
            if destination not in self._blocked:
                self._blocked.append(destination)
            self._free_slots()

    async def _run_connection(self, destination: _Destination,
                              queue: _DestinationQueue) -> None:
        try:
            last_error = "no mail server"
            for host, address, port, _ in queue.servers:
                for starttls in self._starttls_attempts(address, port):
                    if not queue.waiting:
                        return
                    client = _Connection(self, queue, host,
                                         self._tls_options(host) if starttls else None)
                    try:
                        await endpoints.connectProtocol(self.endpoint_for(address, port),
                                                        client)
                    except (error.ConnectError, error.DNSLookupError, OSError) as e:
                        last_error = f"cannot connect to {host} [{address}]:{port}: {e}"
                        break
                    self.connections_made += 1
                    await client.finished
                    if client.sent or client.ran_dry:
                        return  # it worked; a later connection picks up what is left
                    last_error = client.failure or last_error
                    if not client.tls_failed:
                        break
                    if not self.require_tls:
                        self._remember_tls_failure(address, port)
            self._fail_waiting(queue, last_error)
        finally:
            queue.connections -= 1
            self.open_connections -= 1
            if queue.waiting:
                self._connect(destination, queue)
            elif queue.connections == 0:
                self._queues.pop(destination, None)
            self._unblock()
            if self.open_connections == 0:
                self._closing_idle = False
                self._no_connections.fire()

    def _fail_waiting(self, queue: _DestinationQueue, reason: str) -> None:
        """No server of the destination could be reached: everything waiting is deferred."""
        while queue.waiting:
            message = queue.waiting.popleft()
            message.done.callback(Outcome(message.delivery_id, "deferred", reason))

    def _unblock(self) -> None:
        while self._blocked and self.open_connections < self.max_connections:
            destination = self._blocked.popleft()
            queue = self._queues.get(destination)
            if queue is not None:
                self._connect(destination, queue)

    def _starttls_attempts(self, address: str, port: int) -> tuple[bool, ...]:
        """Whether to use STARTTLS, per attempt: "opportunistic" tries again in clear text
        when TLS fails (better than not delivering), straight away for a server whose TLS
        failed lately; "verify", and credentials, never go without."""
        if self.require_tls:
            return (True,)
        if self._tls_failed_until.get((address, port), 0.0) > self.clock.seconds():
            return (False,)
        return (True, False)

    def _remember_tls_failure(self, address: str, port: int) -> None:
        now = self.clock.seconds()
        if len(self._tls_failed_until) > 10_000:  # forget servers whose time has passed
            self._tls_failed_until = {k: t for k, t in self._tls_failed_until.items()
                                      if t > now}
        self._tls_failed_until[(address, port)] = now + TLS_FALLBACK_SECONDS

    def _tls_options(self, host: str):
        if self.tls_policy == TLS_VERIFY:
            return ssl.optionsForClientTLS(host)
        return ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_2)

    def _unexpected(self, failure: Failure) -> None:
        self.log.failure("outbound connection failed unexpectedly", failure)
