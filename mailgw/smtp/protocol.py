"""The ESMTP submission server (S-1 to S-15): one factory serves every listener.

`SubmissionProtocol` keeps twisted.mail's ESMTP for the greeting, replies,
STARTTLS and the idle timeout, and replaces the command handling:

- a command that waits for the database (AUTH, MAIL, RCPT, end of DATA)
  pauses the input until its reply is sent, so pipelined commands are
  answered in order (PIPELINING);
- so do replies the client does not read (R-6, backpressure): more than
  the transport's buffer (64 KiB) of them unsent pauses the input until they
  are sent, so a client that pipelines without reading fills its own socket,
  not this process;
- DATA is read in raw mode and scanned for the final dot in whole chunks,
  never kept past the size limit (S-5), instead of one Python call per line;
- every reply comes from `replies`, and the end of DATA answers with the
  send id (S-12) only after the submission is committed;
- no client keeps a session, or a socket, for ever (R-6): besides the idle
  timeout, a TLS handshake timeout, a time limit on DATA and a cap on
  commands without a message; a close the client does not let finish ends
  in an abort; and the factory caps sessions in all and per client address.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import time
from collections import Counter

from twisted.cred import error as cred_error
from twisted.internet import defer, interfaces, protocol
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.protocols import basic
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.accounts.avatar import ISubmissionAccount, SubmissionAccount, address_in
from mailgw.errors import DatabaseUnavailable
from mailgw.metrics import Metrics
from mailgw.smtp import replies
from mailgw.smtp.auth import MECHANISMS, AuthThrottle, decode_response
from mailgw.submit.addresses import InvalidAddress
from mailgw.submit.errors import DisallowedSender, SubmissionRefused
from mailgw.submit.recipients import Recipient, RecipientImports, submission_group_name
from mailgw.submit.service import Submission, SubmissionService

_PATH = re.compile(rb"^(?P<verb>FROM|TO):\s*(?:<(?P<bracketed>[^<>]*)>|(?P<bare>[^\s<>]+))"
                   rb"(?P<params>(?:\s+\S+)*)\s*$", re.IGNORECASE)
# The end of DATA: CRLF.CRLF for clients that end their lines with CRLF, so that a
# bare "\n.\n" in a message a relay passes on is text, not the end of it followed by
# commands of the relay's session (SMTP smuggling); LF.LF for bare-LF clients.
_DATA_END = re.compile(rb"\r\n\.\r\n")
_BARE_LF_DATA_END = re.compile(rb"\n\.\r?\n")
_COMMAND, _AUTH, _QUIT = "COMMAND", "AUTH", "QUIT"
# Once mailgw closes a session, how long the client gets to let the close finish (take
# the last reply and, over TLS, answer the close_notify) before the connection is
# aborted, so that no client can keep a closed session's socket.
CLOSE_GRACE_SECONDS = 5


@implementer(interfaces.IPushProducer)
class _UnsentReplies:
    """The session's producer on its transport: the transport pauses it while more
    than its buffer of replies is unsent, and resumes it once they are all sent."""

    def __init__(self, session: SubmissionProtocol) -> None:
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
    Past `limit` bytes the text is dropped (the reply will be 552) but the final
    dot is still looked for.
    """

    def __init__(self, limit: int, bare_lf: bool = False) -> None:
        self.limit = limit
        self.size = 0
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
        self.size += len(data)
        if self.overflowed:
            self._chunks = []
        elif data:
            self._chunks.append(data)

    def message(self) -> bytes:
        """The text with the transparency dots taken out (RFC 5321 4.5.2): a line that
        starts with a dot lost its first one."""
        text = b"".join(self._chunks).replace(b"\n.", b"\n")
        return text[1:] if text.startswith(b".") else text


@implementer(IHandshakeListener)
class SubmissionProtocol(basic.LineReceiver, smtp.ESMTP):
    """twisted.mail's SMTP reads with LineOnlyReceiver; LineReceiver adds the raw
    mode that DATA uses and the pausing that keeps pipelined replies in order."""

    log = Logger()
    # Bare LF ends a command as well as CRLF (clients such as the Teenvio PHP example).
    delimiter = b"\n"
    MAX_LENGTH = 4096
    max_errors = 20

    def __init__(self) -> None:
        super().__init__()
        self.mode = _COMMAND
        self.account: SubmissionAccount | None = None
        self.errors = 0
        self.messages = 0
        self.recipients_total = 0
        self._exchange = None
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
        self._imports: RecipientImports | None = None
        self._reset_transaction()

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
        self.log.info(
            "smtp session from {ip}: user={user} messages={messages} recipients={recipients}"
            " errors={errors} {seconds:.1f}s", ip=self.peer_ip,
            user=self.account.username if self.account else "-", messages=self.messages,
            recipients=self.recipients_total, errors=self.errors,
            seconds=time.monotonic() - self._started)

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
        self.log.info("smtp session from {ip}: no TLS handshake within {seconds} s",
                      ip=self.peer_ip, seconds=self.factory.tls_handshake_timeout)
        self.transport.abortConnection()

    def timeoutConnection(self) -> None:
        self._close(replies.IDLE_TIMEOUT)

    def _close(self, reply: replies.Reply) -> None:
        """Send the last reply and close; abort if the client has not let the close
        finish within CLOSE_GRACE_SECONDS. Reading goes on (a TLS close waits for the
        client's close_notify), but what is read is dropped."""
        if self._abort_call is not None:
            return
        self.mode = _QUIT
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

    def _auth_allowed(self) -> bool:
        """S-2: AUTH only over TLS, unless on loopback or allowed by the operator."""
        return self.secure or self.factory.allow_plaintext_auth or _is_loopback(self.peer_ip)

    def reply(self, reply: replies.Reply) -> None:
        self.sendCode(*reply)

    def sendCode(self, code: int, message: bytes = b"") -> None:
        """Every reply, the greeting included, goes through here: counted by class."""
        self.factory.metrics.smtp_replies.labels(f"{code // 100}xx").inc()
        super().sendCode(code, message)

    def sendLine(self, line: bytes) -> None:
        """Replies always end in CRLF, whatever ends the client's lines."""
        self.transport.write(line + b"\r\n")

    def shutdown(self) -> None:
        """Graceful stop: close now if idle, else right after the pending reply."""
        self._closing = True
        if not self._busy and self.mode == _COMMAND and self._collector is None:
            self._close_for_shutdown()

    def _close_for_shutdown(self) -> None:
        self._close(replies.SHUTTING_DOWN)

    # -- input ------------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        self.resetTimeout()
        self._bare_lf = not line.endswith(b"\r")
        line = line.rstrip(b"\r")
        if self.mode == _AUTH:
            self._auth_response(line)
            return
        if self.mode == _QUIT:
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
        if self.mode == _QUIT:  # closed (_close)
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
        if self.mode == _QUIT or self.transport.disconnecting:
            return
        if self._closing and self.mode == _COMMAND:
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
        self.mode = _COMMAND
        self.reply(replies.TEMPORARY_FAILURE)

    # -- commands ---------------------------------------------------------------------

    def _reset_transaction(self) -> None:
        """Forget the transaction; its recipients' imports commit all the same (S-7)."""
        if self._imports is not None:
            self._imports.close()
        self._sender: str | None = None
        # The accepted RCPTs, from the MAIL on.
        self._imports = None

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
        lines = [replies.hello(self.host, rest), b"PIPELINING",
                 b"SIZE %d" % self.factory.max_message_size, b"8BITMIME",
                 b"ENHANCEDSTATUSCODES"]
        if self.canStartTLS and not self.secure:
            lines.append(b"STARTTLS")
        if self._auth_allowed() and self.account is None:
            lines.append(b"AUTH LOGIN PLAIN")
        lines.append(b"HELP")
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
            # RFC 3207 4.2: nothing learnt before TLS counts, a (loopback) login included.
            self.account = None
            self._reset_transaction()

    def ext_AUTH(self, rest: bytes) -> None:
        if self.account is not None:
            self._error(replies.ALREADY_AUTHENTICATED)
            return
        if self._sender is not None:
            self._error(replies.AUTH_IN_TRANSACTION)
            return
        if not self._auth_allowed():
            self._error(replies.ENCRYPTION_REQUIRED)
            return
        if self.factory.throttle.ip_blocked(self.peer_ip):
            self._close(replies.TOO_MANY_FAILURES)
            return
        mechanism, _, initial = rest.partition(b" ")
        if not mechanism:
            self._error(replies.BAD_ARGUMENTS)  # RFC 4954 4: the mechanism is required
            return
        exchange_class = MECHANISMS.get(mechanism.upper())
        if exchange_class is None:
            self._error(replies.UNKNOWN_MECHANISM)
            return
        decoded = None
        if initial:
            decoded = decode_response(initial.strip())
            if decoded is None:
                self._error(replies.BAD_ARGUMENTS)
                return
        self._exchange = exchange_class(decoded)
        self._next_auth_step()

    def _auth_response(self, line: bytes) -> None:
        if line == b"*":
            self.mode = _COMMAND
            self.reply(replies.AUTH_ABORTED)
            return
        decoded = decode_response(line.strip())
        if decoded is None:
            self.mode = _COMMAND
            self._error(replies.BAD_ARGUMENTS)
            return
        self._exchange.answer(decoded)
        self._next_auth_step()

    def _next_auth_step(self) -> None:
        prompt = self._exchange.next_prompt()
        if prompt is not None:
            self.mode = _AUTH
            self.reply((334, base64.b64encode(prompt)))
            return
        self.mode = _COMMAND
        try:
            creds = self._exchange.credentials()
        except ValueError:
            self._error(replies.BAD_ARGUMENTS)
            return
        self._run(self._authenticate(creds))

    async def _authenticate(self, creds) -> None:
        username = creds.username.decode("utf-8", "replace")
        throttle: AuthThrottle = self.factory.throttle
        await throttle.refresh()
        # Again here: other attempts may have failed since this one's AUTH command.
        if throttle.ip_blocked(self.peer_ip):
            self._close(replies.TOO_MANY_FAILURES)
            return
        if throttle.user_blocked(self.peer_ip, username):
            self.reply(replies.AUTH_THROTTLED)
            return
        with throttle.checking(self.peer_ip):
            try:
                _, account, _ = await self.factory.portal.login(creds, None,
                                                                ISubmissionAccount)
            except cred_error.UnauthorizedLogin:
                account = None
            if account is not None and account.allows_client(self.peer_ip):
                await throttle.record_success(self.peer_ip, username)
                self.account = account
                self.reply(replies.AUTH_OK)
                return
            if account is not None:
                # S-4: the client hears what a wrong password gets, or it would learn that
                # a guess was right; the operator reads why here.
                self.log.warn("AUTH as {user} from {ip} refused: the right password, from"
                              " outside account {account}'s networks", user=username,
                              ip=self.peer_ip, account=account.name)
            delay = await throttle.record_failure(self.peer_ip, username)
            self.factory.metrics.smtp_auth_failures.inc()
        if delay:
            await _sleep(self.factory.clock, delay)
        self.reply(replies.BAD_CREDENTIALS)

    def do_MAIL(self, rest: bytes) -> None:
        if self.account is None and not self.factory.is_trusted(self.peer_ip):
            self._error(replies.AUTH_REQUIRED)
            return
        if self._sender is not None:
            self._error(replies.SENDER_ALREADY_GIVEN)
            return
        parsed = _parse_path(rest, b"FROM")
        if parsed is None:
            self._error(replies.BAD_ARGUMENTS)
            return
        address, params = parsed
        for name, value in params:
            if name == b"SIZE":
                if not value.isdigit():
                    self._error(replies.BAD_ARGUMENTS)
                    return
                if int(value) > self.factory.max_message_size:
                    self.reply(replies.too_big(self.factory.max_message_size))
                    return
            elif name == b"BODY":
                if value.upper() not in (b"7BIT", b"8BITMIME"):
                    self._error(replies.BAD_ARGUMENTS)
                    return
            elif name == b"AUTH":
                # RFC 4954 5: the original submitter of a relayed message; a server that
                # offers AUTH must take the parameter, and submission has no use for it.
                if not value:
                    self._error(replies.BAD_ARGUMENTS)
                    return
            else:
                self._error(replies.PARAMETER_NOT_IMPLEMENTED)
                return
        self._run(self._check_sender(address))

    async def _check_sender(self, address: str) -> None:
        if self.account is None:  # a trusted network's client (S-4)
            self.account = await self.factory.trusted_account(f"trusted:{self.peer_ip}")
        try:
            sender = await self.factory.service.check_sender(self.account, address)
        except SubmissionRefused as refusal:
            self.reply(_refusal_reply(refusal))
            return
        self._sender = sender
        self._imports = self.factory.service.recipient_imports(
            self.account, submission_group_name("smtp"), "smtp", sender)
        self.reply(replies.SENDER_OK)

    def do_RCPT(self, rest: bytes) -> None:
        if self.account is None:
            self._error(replies.AUTH_REQUIRED)
            return
        if self._sender is None:
            self._error(replies.NEED_MAIL)
            return
        parsed = _parse_path(rest, b"TO")
        if parsed is None:
            self._error(replies.BAD_ARGUMENTS)
            return
        address, params = parsed
        if params:
            self._error(replies.PARAMETER_NOT_IMPLEMENTED)
            return
        if len(self._imports) >= self.factory.max_recipients:
            self.reply(replies.TOO_MANY_RECIPIENTS)
            return
        try:
            recipient = Recipient.parse(address, "to")
        except InvalidAddress:
            self._error(replies.invalid_recipient(address))
            return
        if self.account.max_contacts is not None:
            # S-15: whether the contact fits under the cap is answered here.
            self._run(self._accept_when_imported(recipient))
            return
        # S-7: the import commits with the message or on its own, whether DATA follows
        # or not; the reply need not wait for it, the end of DATA does.
        try:
            self._imports.add(recipient)
        except DatabaseUnavailable:
            self.reply(replies.TEMPORARY_FAILURE)
            return
        self._accept_recipient()

    async def _accept_when_imported(self, recipient: Recipient) -> None:
        try:
            await self._imports.add_now(recipient)
        except SubmissionRefused as refusal:
            self.reply(_refusal_reply(refusal))
            return
        self._accept_recipient()

    def _accept_recipient(self) -> None:
        # Progress: up to max_recipients RCPTs may come before their message.
        self._commands_without_message -= 1
        self.reply(replies.RECIPIENT_OK)

    def do_DATA(self, rest: bytes) -> None:
        if self.account is None:
            self._error(replies.AUTH_REQUIRED)
            return
        if self._sender is None or not self._imports:
            self._error(replies.NEED_MAIL_RCPT)
            return
        if rest:
            self._error(replies.BAD_ARGUMENTS)
            return
        self._collector = DataCollector(self.factory.max_message_size, self._bare_lf)
        self.reply(replies.START_DATA)
        self.setRawMode()
        # The idle timeout restarts with every byte: a message sent a byte a minute
        # would hold the session forever.
        self._data_call = self.callLater(self.factory.data_timeout, self._close,
                                         replies.DATA_TOO_SLOW)

    async def _end_of_data(self, collector: DataCollector) -> None:
        sender, imports = self._sender, self._imports
        self._imports = None  # committed here, not abandoned
        self._reset_transaction()
        try:
            await self._submit(sender, imports, collector)
        finally:
            imports.close()

    async def _submit(self, sender: str, imports: RecipientImports,
                      collector: DataCollector) -> None:
        recipients = len(imports)
        if collector.overflowed:
            await imports.imported()
            self.reply(replies.too_big(self.factory.max_message_size))
            return
        raw = collector.message()
        if not raw:
            await imports.imported()
            self._commands_without_message = 0
            self.reply(replies.imported(recipients))
            return
        try:
            stored = await self.factory.service.submit(Submission.from_mime(
                account=self.account, origin="smtp", sender=sender, raw=raw,
                imports=imports, client_ip=self.peer_ip))
        except SubmissionRefused as refusal:
            self.reply(_refusal_reply(refusal))
        else:
            self.messages += 1
            self.recipients_total += recipients
            self.factory.metrics.smtp_messages.inc()
            self.factory.metrics.smtp_recipients.inc(recipients)
            self._commands_without_message = 0
            self.reply(replies.accepted(stored.send_id, stored.message_uid))

    def do_RSET(self, rest: bytes) -> None:
        self._reset_transaction()
        self.reply(replies.OK)

    def do_NOOP(self, rest: bytes) -> None:
        self.reply(replies.OK)

    def do_HELP(self, rest: bytes) -> None:
        self.reply(replies.HELP)

    def do_VRFY(self, rest: bytes) -> None:
        self.reply(replies.CANNOT_VRFY)

    def do_QUIT(self, rest: bytes) -> None:
        """Close once this transaction's imports are committed, so that a client that
        quits after RCPT finds its contacts stored (S-7). Reading goes on meanwhile (a
        TLS shutdown needs it), but nothing after QUIT is a command."""
        imports, self._imports = self._imports, None
        self.mode = _QUIT
        if imports is None:
            self._close(replies.CLOSING)
            return
        defer.ensureDeferred(imports.settled()).addCallback(
            lambda _: self._close(replies.CLOSING))

    _COMMANDS = {
        b"HELO": do_HELO, b"EHLO": do_EHLO, b"STARTTLS": ext_STARTTLS, b"AUTH": ext_AUTH,
        b"MAIL": do_MAIL, b"RCPT": do_RCPT, b"DATA": do_DATA, b"RSET": do_RSET,
        b"NOOP": do_NOOP, b"HELP": do_HELP, b"VRFY": do_VRFY, b"QUIT": do_QUIT,
    }


class _Refusal(protocol.Protocol):
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


def _refusal_reply(refusal: SubmissionRefused) -> replies.Reply:
    """The reply to a refusal of the submission path (S-13)."""
    if isinstance(refusal, DisallowedSender):
        return replies.disallowed_sender(refusal.address)
    return replies.transaction_failed(str(refusal))


def _parse_path(rest: bytes, verb: bytes) -> tuple[str, list[tuple[bytes, bytes]]] | None:
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


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _sleep(clock, seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    clock.callLater(seconds, d.callback, None)
    return d


class SubmissionFactory(smtp.SMTPFactory):
    protocol = SubmissionProtocol
    log = Logger()

    def __init__(self, hostname: str, tls_options, clock, idle_timeout: int,
                 portal=None, service: SubmissionService | None = None,
                 throttle: AuthThrottle | None = None, max_message_size: int = 512000,
                 max_recipients: int = 1000, allow_plaintext_auth: bool = False,
                 trusted_networks: tuple = (), trusted_account=None,
                 tls_handshake_timeout: int = 30, max_connections: int = 1000,
                 max_connections_per_address: int = 100, data_timeout: int = 600,
                 max_commands_without_message: int = 100, metrics: Metrics | None = None
                 ) -> None:
        super().__init__(portal=portal)
        self.metrics = metrics or Metrics()
        self.metrics.smtp_sessions_open.set_function(lambda: len(self.sessions))
        self.domain = hostname.encode("idna")
        self.tls_options = tls_options
        self.clock = clock
        self.timeout = idle_timeout
        self.tls_handshake_timeout = tls_handshake_timeout
        self.data_timeout = data_timeout
        self.max_commands_without_message = max_commands_without_message
        self.service = service
        self.throttle = throttle or AuthThrottle(clock)
        self.max_message_size = max_message_size
        self.max_recipients = max_recipients
        self.allow_plaintext_auth = allow_plaintext_auth
        self.trusted_networks = tuple(ipaddress.ip_network(n, strict=False)
                                      for n in trusted_networks)
        # Loads the account that trusted networks' mail is sent as: (username) -> avatar.
        self.trusted_account = trusted_account
        self.max_connections = max_connections
        self.max_connections_per_address = max_connections_per_address
        self.sessions: set[SubmissionProtocol] = set()
        self._per_address: Counter[str] = Counter()

    def is_trusted(self, address: str) -> bool:
        """S-4: no AUTH needed from the operator's trusted networks (Postfix's mynetworks)."""
        return address_in(address, self.trusted_networks)

    def session_started(self, session: SubmissionProtocol) -> None:
        self.metrics.smtp_sessions.inc()
        self.sessions.add(session)
        self._per_address[session.peer_ip] += 1

    def session_ended(self, session: SubmissionProtocol) -> None:
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

    def _refuse(self, ip: str, reply: replies.Reply) -> _Refusal:
        self.metrics.smtp_replies.labels(f"{reply[0] // 100}xx").inc()
        self.log.info("smtp connection from {ip} refused: {sessions} sessions, {from_ip} from "
                      "this address", ip=ip, sessions=len(self.sessions),
                      from_ip=self._per_address[ip])
        return _Refusal(reply, self.clock)

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
