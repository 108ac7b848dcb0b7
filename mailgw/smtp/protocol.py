"""The ESMTP submission server (S-1 to S-15): one factory serves every listener.

`SubmissionProtocol` is an `SMTPSession` (mailgw/smtp/session.py: pipelining in order,
backpressure, DATA read in raw mode within its size and time limits, the timeouts and
connection caps of R-6) with the submission's commands:

- AUTH (S-3) through the cred portal, throttled per client address and username;
- MAIL, RCPT and DATA hand the transaction to the submission path, and the end of DATA
  answers with the send id (S-12) only after the submission is committed;
- every reply comes from `replies`.
"""

from __future__ import annotations

import base64
import ipaddress

from twisted.cred import error as cred_error
from twisted.internet import defer

from mailgw.accounts.avatar import ISubmissionAccount, SubmissionAccount, address_in
from mailgw.errors import DatabaseUnavailable
from mailgw.metrics import Metrics
from mailgw.smtp import replies
from mailgw.smtp.auth import MECHANISMS, AuthThrottle, decode_response
from mailgw.smtp.session import (
    CLOSE_GRACE_SECONDS,
    COMMAND,
    QUIT,
    DataCollector,
    SessionFactory,
    SMTPSession,
)
from mailgw.submit.addresses import InvalidAddress
from mailgw.submit.errors import DisallowedSender, SubmissionRefused
from mailgw.submit.recipients import Recipient, RecipientImports, submission_group_name
from mailgw.submit.service import Submission, SubmissionService

__all__ = ["CLOSE_GRACE_SECONDS", "DataCollector", "SubmissionFactory", "SubmissionProtocol"]

_AUTH = "AUTH"


class SubmissionProtocol(SMTPSession):
    """The submission's session: AUTH, and MAIL, RCPT and DATA into the submission
    path."""

    def __init__(self) -> None:
        super().__init__()
        self.account: SubmissionAccount | None = None
        self._exchange = None
        self._imports: RecipientImports | None = None
        self._reset_transaction()

    def _session_ended(self) -> None:
        self.log.info(
            "smtp session from {ip}: user={user} messages={messages} recipients={recipients}"
            " errors={errors} {seconds:.1f}s", ip=self.peer_ip,
            user=self.account.username if self.account else "-", messages=self.messages,
            recipients=self.recipients_total, errors=self.errors, seconds=self.duration)

    def _auth_allowed(self) -> bool:
        """S-2: AUTH only over TLS, unless on loopback or allowed by the operator."""
        return self.secure or self.factory.allow_plaintext_auth or _is_loopback(self.peer_ip)

    def lineReceived(self, line: bytes) -> None:
        if self.mode == _AUTH:
            self.resetTimeout()
            self._bare_lf = not line.endswith(b"\r")
            self._auth_response(line.rstrip(b"\r"))
            return
        super().lineReceived(line)

    # -- commands ---------------------------------------------------------------------

    def _reset_transaction(self) -> None:
        """Forget the transaction; its recipients' imports commit all the same (S-7)."""
        if self._imports is not None:
            self._imports.close()
        self._sender = None
        # The accepted RCPTs, from the MAIL on.
        self._imports = None

    def _extensions(self) -> list[bytes]:
        keywords = super()._extensions()
        if self._auth_allowed() and self.account is None:
            keywords.append(b"AUTH LOGIN PLAIN")
        return keywords

    def _forget_before_tls(self) -> None:
        # RFC 3207 4.2: a (loopback) login made before TLS no longer counts.
        self.account = None
        super()._forget_before_tls()

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
            self.mode = COMMAND
            self.reply(replies.AUTH_ABORTED)
            return
        decoded = decode_response(line.strip())
        if decoded is None:
            self.mode = COMMAND
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
        self.mode = COMMAND
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
        parsed = self._mail_path(rest)
        if parsed is None:
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
        address = self._rcpt_path(rest, len(self._imports or ()))
        if address is None:
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
        if self._data_allowed(rest, len(self._imports or ())):
            self._start_data(DataCollector(self.factory.max_message_size, self._bare_lf))

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
            self._message_accepted()
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
            self._message_accepted()
            self.reply(replies.accepted(stored.send_id, stored.message_uid))

    def do_QUIT(self, rest: bytes) -> None:
        """Close once this transaction's imports are committed, so that a client that
        quits after RCPT finds its contacts stored (S-7). Reading goes on meanwhile (a
        TLS shutdown needs it), but nothing after QUIT is a command."""
        imports, self._imports = self._imports, None
        self.mode = QUIT
        if imports is None:
            self._close(replies.CLOSING)
            return
        defer.ensureDeferred(imports.settled()).addCallback(
            lambda _: self._close(replies.CLOSING))

    _COMMANDS = {
        **SMTPSession.COMMON_COMMANDS, b"AUTH": ext_AUTH, b"MAIL": do_MAIL,
        b"RCPT": do_RCPT, b"DATA": do_DATA, b"QUIT": do_QUIT,
    }


def _refusal_reply(refusal: SubmissionRefused) -> replies.Reply:
    """The reply to a refusal of the submission path (S-13)."""
    if isinstance(refusal, DisallowedSender):
        return replies.disallowed_sender(refusal.address)
    return replies.transaction_failed(str(refusal))


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _sleep(clock, seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    clock.callLater(seconds, d.callback, None)
    return d


class SubmissionFactory(SessionFactory):
    protocol = SubmissionProtocol

    def __init__(self, hostname: str, tls_options, clock, idle_timeout: int,
                 portal=None, service: SubmissionService | None = None,
                 throttle: AuthThrottle | None = None, max_message_size: int = 512000,
                 max_recipients: int = 1000, allow_plaintext_auth: bool = False,
                 trusted_networks: tuple = (), trusted_account=None,
                 tls_handshake_timeout: int = 30, max_connections: int = 1000,
                 max_connections_per_address: int = 100, data_timeout: int = 600,
                 max_commands_without_message: int = 100, metrics: Metrics | None = None
                 ) -> None:
        self.metrics = metrics or Metrics()
        super().__init__(
            hostname, tls_options, clock, idle_timeout, self.metrics.smtp_sessions,
            self.metrics.smtp_replies, portal=portal, max_message_size=max_message_size,
            tls_handshake_timeout=tls_handshake_timeout, max_connections=max_connections,
            max_connections_per_address=max_connections_per_address,
            data_timeout=data_timeout,
            max_commands_without_message=max_commands_without_message)
        self.metrics.smtp_sessions_open.set_function(lambda: len(self.sessions))
        self.service = service
        self.throttle = throttle or AuthThrottle(clock)
        self.max_recipients = max_recipients
        self.allow_plaintext_auth = allow_plaintext_auth
        self.trusted_networks = tuple(ipaddress.ip_network(n, strict=False)
                                      for n in trusted_networks)
        # Loads the account that trusted networks' mail is sent as: (username) -> avatar.
        self.trusted_account = trusted_account

    def is_trusted(self, address: str) -> bool:
        """S-4: no AUTH needed from the operator's trusted networks (Postfix's mynetworks)."""
        return address_in(address, self.trusted_networks)
