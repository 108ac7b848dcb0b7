"""What every SMTP server of mailgw shares: the session's hardening and its caps (R-6).

The submission server (`mailgw.smtp.protocol`, S-1 to S-15) and the inbound listener
for bounces and complaints (`mailgw.inbound`, D-7) are both an `SMTPSession` served by
a `SessionFactory`. Each adds its own commands; what no client of either may get
around lives here once:

- a command that waits (for the database) pauses the input until its reply is sent,
  so pipelined commands are answered in order (PIPELINING);
- so do replies the client does not read (backpressure): more than the transport's
  buffer (64 KiB) of them unsent pauses the input until they are sent, so a client that
  pipelines without reading fills its own socket, not this process;
- DATA is read in raw mode and scanned for the final dot in whole chunks, never kept
  past the size limit, instead of one Python call per line;
- no client keeps a session, or a socket, for ever: besides the idle timeout, a TLS
  handshake timeout, a time limit on DATA and a cap on commands without a message; a
  close the client does not let finish ends in an abort; and the factory caps sessions
  in all and per client address.
"""

from __future__ import annotations

import re
import time
from collections import Counter

from prometheus_client import Counter as MetricCounter
from twisted.internet import defer, interfaces, protocol
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.protocols import basic
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.errors import DatabaseUnavailable
from mailgw.smtp import replies

_PATH = re.compile(rb"^(?P<verb>FROM|TO):\s*(?:<(?P<bracketed>[^<>]*)>|(?P<bare>[^\s<>]+))"
                   rb"(?P<params>(?:\s+\S+)*)\s*$", re.IGNORECASE)
# The end of DATA: CRLF.CRLF for clients that end their lines with CRLF, so that a
# bare "\n.\n" in a message a relay passes on is text, not the end of it followed by
# commands of the relay's session (SMTP smuggling); LF.LF for bare-LF clients.
_DATA_END = re.compile(rb"\r\n\.\r\n")
_BARE_LF_DATA_END = re.compile(rb"\n\.\r?\n")
COMMAND, QUIT = "COMMAND", "QUIT"
# Once mailgw closes a session, how long the client gets to let the close finish (take
# the last reply and, over TLS, answer the close_notify) before the connection is
# aborted, so that no client can keep a closed session's socket.
CLOSE_GRACE_SECONDS = 5


@implementer(interfaces.IPushProducer)
class _UnsentReplies:
    """The session's producer on its transport: the transport pauses it while more
    than its buffer of replies is unsent, and resumes it once they are all sent."""

    def __init__(self, session: SMTPSession) -> None:
        self._session = session

    def pauseProducing(self) -> None:
        self._session.replies_waiting(True)

    def resumeProducing(self) -> None:
        self._session.replies_waiting(False)

    def stopProducing(self) -> None:
        pass  # the connection is lost: nothing to stop


class DataCollector:
    """The message text of one DATA: up to the line holding only a dot.

    The line ends the way the client ended its DATA command: CRLF, or a bare LF.
    Past `limit` bytes the text is dropped (the reply will be 552), or with
    `keep_head` only its first `limit` bytes are kept; the final dot is still looked
    for.
    """

    def __init__(self, limit: int, bare_lf: bool = False, keep_head: bool = False) -> None:
        self.limit = limit
        self.size = 0
        self._keep_head = keep_head
        self._chunks: list[bytes] = []
        self._line_end = b"\n" if bare_lf else b"\r\n"
        self._end = _BARE_LF_DATA_END if bare_lf else _DATA_END
        # The last bytes kept: the terminator starts with the end of the previous line,
        # and the start of DATA counts as one.
        self._last = self._line_end
        # Received but not kept yet: "." or ".\r" that may begin the terminator.
        self._pending = b""

    @property
    def overflowed(self) -> bool:
        return self.size > self.limit

    def feed(self, data: bytes) -> bytes | None:
        """Take more data; once the final dot is seen, returns what follows it."""
        region = self._last + self._pending + data
        start, line_end = len(self._last), len(self._line_end)
        match = self._end.search(region)
        if match is not None:
            self._keep(region[start:match.start() + line_end])
            return region[match.end():]
        hold = (2 if region.endswith(self._line_end + b".\r")
                else 1 if region.endswith(self._line_end + b".") else 0)
        kept = len(region) - hold
        self._keep(region[start:kept])
        self._pending = region[kept:]
        self._last = region[kept - line_end:kept]
        return None

    def _keep(self, data: bytes) -> None:
        room = self.limit - self.size
        self.size += len(data)
        if self._keep_head:
            if room > 0 and data:
                self._chunks.append(data[:room])
        elif self.overflowed:
            self._chunks = []
        elif data:
            self._chunks.append(data)

    def message(self) -> bytes:
        """The text with the transparency dots taken out (RFC 5321 4.5.2): a line that
        starts with a dot lost its first one."""
        text = b"".join(self._chunks).replace(b"\n.", b"\n")
        return text[1:] if text.startswith(b".") else text


@implementer(IHandshakeListener)
class SMTPSession(basic.LineReceiver, smtp.ESMTP):
    """twisted.mail's ESMTP for the greeting, replies, STARTTLS and the idle timeout;
    the commands are the subclass's (`_COMMANDS`: verb -> handler). twisted.mail's SMTP
    reads with LineOnlyReceiver; LineReceiver adds the raw mode that DATA uses and the
    pausing that keeps pipelined replies in order."""

    log = Logger()
    # Bare LF ends a command as well as CRLF (clients such as the Teenvio PHP example).
    delimiter = b"\n"
    MAX_LENGTH = 4096
    max_errors = 20
    _COMMANDS: dict = {}
    help_reply = replies.HELP

    def __init__(self) -> None:
        super().__init__()
        self.mode = COMMAND
        self.errors = 0
        self.messages = 0
        self.recipients_total = 0
        self._collector: DataCollector | None = None
        # How the client ended its last command line: DATA's text ends the same way.
        self._bare_lf = False
        self._started = time.monotonic()
        self._closing = False
        # Input is read while no command waits for its reply and no replies wait for
        # the client to read them.
        self._busy = False
        self._replies_waiting = False
        self._unsent_replies: _UnsentReplies | None = None
        self._abort_call: IDelayedCall | None = None
        self._handshake_call: IDelayedCall | None = None
        self._data_call: IDelayedCall | None = None
        # Commands since the last message accepted, accepted RCPTs aside.
        self._commands_without_message = 0
        self.closed: defer.Deferred[None] = defer.Deferred()
        # The transaction's reverse-path, from its MAIL on ("" for the null one).
        self._sender: str | None = None

    # -- what a kind of session adds ------------------------------------------------------

    def _reset_transaction(self) -> None:
        """Forget the mail transaction (MAIL, RCPT)."""
        raise NotImplementedError

    def _session_ended(self) -> None:
        """The session's log line, once its connection is gone."""
        raise NotImplementedError

    async def _end_of_data(self, collector: DataCollector) -> None:
        """The message's text has come: reply to it."""
        raise NotImplementedError

    def _extensions(self) -> list[bytes]:
        """The EHLO keywords, HELP aside."""
        keywords = [b"PIPELINING", b"SIZE %d" % self.factory.max_message_size, b"8BITMIME",
                    b"ENHANCEDSTATUSCODES"]
        if self.canStartTLS and not self.secure:
            keywords.append(b"STARTTLS")
        return keywords

    # -- connection -----------------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        # Pipelined replies go out one by one as the database answers: without
        # NODELAY, Nagle holds each behind the client's delayed ACK (40 ms).
        if interfaces.ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        self.peer_ip = getattr(self.transport.getPeer(), "host", "")
        self.factory.session_started(self)
        if self.secure:  # implicit TLS
            self._await_handshake()
        else:
            self._watch_unsent_replies()

    def connectionLost(self, reason=None) -> None:
        self.setTimeout(None)
        for call in (self._abort_call, self._handshake_call, self._data_call):
            if call is not None and call.active():
                call.cancel()
        self._reset_transaction()
        self.factory.session_ended(self)
        self.closed.callback(None)
        self._session_ended()

    @property
    def duration(self) -> float:
        """Seconds since the session began."""
        return time.monotonic() - self._started

    def greeting(self) -> bytes:
        return self.host + b" " + replies.BANNER

    def _await_handshake(self) -> None:
        """A TLS handshake gets `tls_handshake_timeout` seconds: a client that sends no
        ClientHello cannot even be told it is closed (R-6)."""
        self._handshake_call = self.callLater(self.factory.tls_handshake_timeout,
                                              self._handshake_timed_out)

    def handshakeCompleted(self) -> None:
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        if self._unsent_replies is None and self._abort_call is None:  # implicit TLS
            self._watch_unsent_replies()

    def _watch_unsent_replies(self) -> None:
        """Backpressure (R-6). Over TLS only once the handshake is done: until then the
        TLS layer holds the banner back and pauses its producer for it, which would stop
        the very reading the handshake needs. (STARTTLS keeps the producer registered.)"""
        self._unsent_replies = _UnsentReplies(self)
        self.transport.registerProducer(self._unsent_replies, True)

    def _handshake_timed_out(self) -> None:
        self.log.info("{kind} session from {ip}: no TLS handshake within {seconds} s",
                      kind=self.factory.kind, ip=self.peer_ip,
                      seconds=self.factory.tls_handshake_timeout)
        self.transport.abortConnection()

    def timeoutConnection(self) -> None:
        self._close(replies.IDLE_TIMEOUT)

    def _close(self, reply: replies.Reply) -> None:
        """Send the last reply and close; abort if the client has not let the close
        finish within CLOSE_GRACE_SECONDS. Reading goes on (a TLS close waits for the
        client's close_notify), but what is read is dropped."""
        if self._abort_call is not None:
            return
        self.mode = QUIT
        self._collector = None
        self.setRawMode()
        self.setTimeout(None)
        if self._unsent_replies is not None:
            # A transport with a producer registered waits for it before it closes.
            self.transport.unregisterProducer()
            self._unsent_replies = None
        self.reply(reply)
        self._abort_call = self.callLater(CLOSE_GRACE_SECONDS, self.transport.abortConnection)
        if self.paused:
            self.resumeProducing()
        self.transport.loseConnection()

    @property
    def secure(self) -> bool:
        return self.startedTLS or interfaces.ISSLTransport.providedBy(self.transport)

    def reply(self, reply: replies.Reply) -> None:
        self.sendCode(*reply)

    def sendCode(self, code: int, message: bytes = b"") -> None:
        """Every reply, the greeting included, goes through here: counted by class."""
        self.factory.replies_sent.labels(f"{code // 100}xx").inc()
        super().sendCode(code, message)

    def sendLine(self, line: bytes) -> None:
        """Replies always end in CRLF, whatever ends the client's lines."""
        self.transport.write(line + b"\r\n")

    def shutdown(self) -> None:
        """Graceful stop: close now if idle, else right after the pending reply."""
        self._closing = True
        if not self._busy and self.mode == COMMAND and self._collector is None:
            self._close_for_shutdown()

    def _close_for_shutdown(self) -> None:
        self._close(replies.SHUTTING_DOWN)

    # -- input ------------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        self.resetTimeout()
        self._bare_lf = not line.endswith(b"\r")
        line = line.rstrip(b"\r")
        if self.mode == QUIT:
            return
        self._commands_without_message += 1
        if self._commands_without_message > self.factory.max_commands_without_message:
            # A session that only sends NOOP, RSET and the like never goes idle.
            self._close(replies.TOO_MANY_COMMANDS)
            return
        verb, _, rest = line.strip().partition(b" ")
        if not verb:
            self._error(replies.SYNTAX_ERROR)
            return
        handler = self._COMMANDS.get(verb.upper())
        if handler is None:
            self._error(replies.INVALID_COMMAND)
            return
        handler(self, rest.strip())

    def lineLengthExceeded(self, line: bytes) -> None:
        self._error(replies.LINE_TOO_LONG)

    def rawDataReceived(self, data: bytes) -> None:
        if self.mode == QUIT:  # closed (_close)
            return
        self.resetTimeout()
        rest = self._collector.feed(data)
        if rest is not None:
            self._data_call.cancel()
            collector, self._collector = self._collector, None
            # Inside dataReceived this only queues `rest`; it is read once the reply is out.
            self.setLineMode(rest)
            self._run(self._end_of_data(collector))

    def _error(self, reply: replies.Reply) -> None:
        self.errors += 1
        if self.errors > self.max_errors:
            self._close(replies.TOO_MANY_ERRORS)
        else:
            self.reply(reply)

    def _run(self, work) -> None:
        """Run a command that waits: no further input is read until it has replied."""
        self._busy = True
        self._update_input()
        d = defer.ensureDeferred(work)
        d.addErrback(self._unexpected)
        d.addBoth(self._done)

    def _done(self, _: object) -> None:
        self._busy = False
        if self.mode == QUIT or self.transport.disconnecting:
            return
        if self._closing and self.mode == COMMAND:
            self._close_for_shutdown()
            return
        self._update_input()

    def replies_waiting(self, waiting: bool) -> None:
        """Backpressure (R-6): more replies unsent than the transport buffers, or none."""
        self._replies_waiting = waiting
        self._update_input()

    def _update_input(self) -> None:
        """Pause or resume reading for the two reasons to wait, so that neither resumes
        what the other still holds."""
        hold = self._busy or self._replies_waiting
        if hold and not self.paused:
            self.pauseProducing()
        elif not hold and self.paused:
            self.resumeProducing()

    def _unexpected(self, failure: Failure) -> None:
        if not failure.check(DatabaseUnavailable):
            self.log.failure("unexpected error in an SMTP session", failure)
        self.mode = COMMAND
        self.reply(replies.TEMPORARY_FAILURE)

    # -- commands every session has ---------------------------------------------------

    def do_HELO(self, rest: bytes) -> None:
        if not rest:
            self._error(replies.BAD_ARGUMENTS)
            return
        self._reset_transaction()
        self.reply((250, replies.hello(self.host, rest)))

    def do_EHLO(self, rest: bytes) -> None:
        if not rest:
            self._error(replies.BAD_ARGUMENTS)
            return
        self._reset_transaction()
        lines = [replies.hello(self.host, rest), *self._extensions(), b"HELP"]
        self.reply((250, b"\n".join(lines)))

    def ext_STARTTLS(self, rest: bytes) -> None:
        if rest:
            self._error(replies.BAD_ARGUMENTS)
        elif self.secure:
            self._error(replies.TLS_ALREADY_ACTIVE)
        elif not self.canStartTLS:
            self.reply(replies.TLS_NOT_AVAILABLE)
        else:
            self.reply(replies.READY_FOR_TLS)
            # Nothing sent before the handshake may count as a command (RFC 3207 5.2).
            self.clearLineBuffer()
            self.transport.startTLS(self.ctx)
            self._await_handshake()
            self.startedTLS = True
            # RFC 3207 4.2: nothing learnt before TLS counts.
            self._forget_before_tls()

    def _forget_before_tls(self) -> None:
        self._reset_transaction()

    def _mail_path(self, rest: bytes) -> tuple[str, list[tuple[bytes, bytes]]] | None:
        """MAIL's reverse-path and parameters, or None once refused (a sender given
        already, a malformed path). The subclass sets `_sender` when it takes it."""
        if self._sender is not None:
            self._error(replies.SENDER_ALREADY_GIVEN)
            return None
        return self._path(rest, b"FROM")

    def _rcpt_path(self, rest: bytes, recipients: int) -> str | None:
        """RCPT's forward-path, or None once refused: no MAIL before it, a malformed
        path, a parameter (none is taken), or `recipients` at max_recipients already."""
        if self._sender is None:
            self._error(replies.NEED_MAIL)
            return None
        parsed = self._path(rest, b"TO")
        if parsed is None:
            return None
        address, params = parsed
        if params:
            self._error(replies.PARAMETER_NOT_IMPLEMENTED)
            return None
        if recipients >= self.factory.max_recipients:
            self.reply(replies.TOO_MANY_RECIPIENTS)
            return None
        return address

    def _path(self, rest: bytes, verb: bytes) -> tuple[str, list[tuple[bytes, bytes]]] | None:
        """MAIL's or RCPT's path and parameters, or None once refused as malformed."""
        parsed = parse_path(rest, verb)
        if parsed is None:
            self._error(replies.BAD_ARGUMENTS)
        return parsed

    def _data_allowed(self, rest: bytes, recipients: int) -> bool:
        """Whether DATA may start: after MAIL and `recipients` accepted RCPTs, with no
        argument."""
        if self._sender is None or not recipients:
            self._error(replies.NEED_MAIL_RCPT)
            return False
        if rest:
            self._error(replies.BAD_ARGUMENTS)
            return False
        return True

    def _start_data(self, collector: DataCollector) -> None:
        """DATA accepted: the text is read into `collector`, within `data_timeout`."""
        self._collector = collector
        self.reply(replies.START_DATA)
        self.setRawMode()
        # The idle timeout restarts with every byte: a message sent a byte a minute
        # would hold the session forever.
        self._data_call = self.callLater(self.factory.data_timeout, self._close,
                                         replies.DATA_TOO_SLOW)

    def _message_accepted(self) -> None:
        """A message was taken: the commands before it were not idle talk."""
        self._commands_without_message = 0

    def do_RSET(self, rest: bytes) -> None:
        self._reset_transaction()
        self.reply(replies.OK)

    def do_NOOP(self, rest: bytes) -> None:
        self.reply(replies.OK)

    def do_HELP(self, rest: bytes) -> None:
        self.reply(self.help_reply)

    def do_VRFY(self, rest: bytes) -> None:
        self.reply(replies.CANNOT_VRFY)

    # A session's commands are these and its own (`_COMMANDS`).
    COMMON_COMMANDS = {
        b"HELO": do_HELO, b"EHLO": do_EHLO, b"STARTTLS": ext_STARTTLS, b"RSET": do_RSET,
        b"NOOP": do_NOOP, b"HELP": do_HELP, b"VRFY": do_VRFY,
    }


class Refusal(protocol.Protocol):
    """A connection over the caps (R-6): one 421 and closed, no session. On implicit TLS
    the reply waits for the handshake; a client that has not let the close finish
    CLOSE_GRACE_SECONDS later is cut off."""

    def __init__(self, reply: replies.Reply, clock) -> None:
        self._reply = reply
        self._clock = clock
        self._abort_call: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.transport.write(b"%d %s\r\n" % self._reply)
        self._abort_call = self._clock.callLater(CLOSE_GRACE_SECONDS,
                                                 self.transport.abortConnection)
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        if self._abort_call.active():
            self._abort_call.cancel()


def parse_path(rest: bytes, verb: bytes) -> tuple[str, list[tuple[bytes, bytes]]] | None:
    """`FROM:<addr> SIZE=1307` -> ("addr", [(b"SIZE", b"1307")]); None if malformed."""
    match = _PATH.match(rest)
    if match is None or match["verb"].upper() != verb:
        return None
    path = match["bracketed"] if match["bracketed"] is not None else match["bare"]
    try:
        address = path.decode("ascii")
    except UnicodeDecodeError:
        return None
    params = []
    for param in match["params"].split():
        name, _, value = param.partition(b"=")
        params.append((name.upper(), value))
    return address, params


class SessionFactory(smtp.SMTPFactory):
    """Sessions of one kind of server (`kind` names them in the log), capped in all and
    per client address (R-6), and stopped gracefully together."""

    log = Logger()
    kind = "smtp"

    def __init__(self, hostname: str, tls_options, clock, idle_timeout: int,
                 sessions_total: MetricCounter, replies_sent: MetricCounter, portal=None,
                 max_message_size: int = 512000, tls_handshake_timeout: int = 30,
                 max_connections: int = 1000, max_connections_per_address: int = 100,
                 data_timeout: int = 600, max_commands_without_message: int = 100) -> None:
        super().__init__(portal=portal)
        self.sessions_total = sessions_total
        # Replies by class (`2xx` ...): labels of this counter.
        self.replies_sent = replies_sent
        self.domain = hostname.encode("idna")
        self.tls_options = tls_options
        self.clock = clock
        self.timeout = idle_timeout
        self.max_message_size = max_message_size
        self.tls_handshake_timeout = tls_handshake_timeout
        self.data_timeout = data_timeout
        self.max_commands_without_message = max_commands_without_message
        self.max_connections = max_connections
        self.max_connections_per_address = max_connections_per_address
        self.sessions: set[SMTPSession] = set()
        self._per_address: Counter[str] = Counter()

    def session_started(self, session: SMTPSession) -> None:
        self.sessions_total.inc()
        self.sessions.add(session)
        self._per_address[session.peer_ip] += 1

    def session_ended(self, session: SMTPSession) -> None:
        self.sessions.discard(session)
        self._per_address[session.peer_ip] -= 1
        if not self._per_address[session.peer_ip]:
            del self._per_address[session.peer_ip]

    def buildProtocol(self, addr):
        ip = getattr(addr, "host", "")
        if len(self.sessions) >= self.max_connections:
            return self._refuse(ip, replies.TOO_MANY_CONNECTIONS)
        if self._per_address[ip] >= self.max_connections_per_address:
            return self._refuse(ip, replies.TOO_MANY_CONNECTIONS_FROM_ADDRESS)
        p = super().buildProtocol(addr)
        p.factory = self
        p.ctx = self.tls_options
        p.timeout = self.timeout
        p.callLater = self.clock.callLater
        return p

    def _refuse(self, ip: str, reply: replies.Reply) -> Refusal:
        self.replies_sent.labels(f"{reply[0] // 100}xx").inc()
        self.log.info("{kind} connection from {ip} refused: {sessions} sessions, {from_ip} "
                      "from this address", kind=self.kind, ip=ip, sessions=len(self.sessions),
                      from_ip=self._per_address[ip])
        return Refusal(reply, self.clock)

    async def shutdown(self, grace_seconds: float) -> None:
        """Graceful stop (O-5): idle sessions close now, busy ones after their reply
        (each cut if its close does not finish, as any close); any still busy after
        `grace_seconds` are cut."""
        sessions = list(self.sessions)
        for session in sessions:
            session.shutdown()
        # Not a timeout on the wait: cancelling it would cancel the sessions' own
        # `closed` instead of closing them.
        deadline = self.clock.callLater(grace_seconds, self._abort_sessions)
        await defer.DeferredList([s.closed for s in sessions])
        if deadline.active():
            deadline.cancel()

    def _abort_sessions(self) -> None:
        for session in list(self.sessions):
            session.transport.abortConnection()
