"""The inbound SMTP listener of the bounce domains (D-7): where DSNs, complaints and
List-Unsubscribe mail come back.

An `SMTPSession` (mailgw/smtp/session.py: the submission server's backpressure, DATA
and time limits, idle and handshake timeouts, connection caps), with no AUTH and no
relaying: RCPT takes only addresses of the return-path domains (`550 5.7.1` for the
rest). STARTTLS is offered with the gateway's certificate. Of a message, the first
`inbound.max_message_size` bytes are kept and the rest is read and dropped (a report
says what it has to say at its start; what follows is the returned original), so SIZE
is advertised with no limit. The reply to the end of DATA comes once what the message
reports is recorded (a database out of reach: `451`, and the sender's server tries
again); a message that reports nothing, or names no delivery, is accepted and dropped,
never bounced back.
"""

from __future__ import annotations

from mailgw.config import InboundConfig
from mailgw.inbound.processor import Envelope, FeedbackProcessor
from mailgw.metrics import Metrics
from mailgw.smtp import replies
from mailgw.smtp.session import QUIT, DataCollector, SessionFactory, SMTPSession

# MAIL FROM parameters taken (and ignored): SIZE is not a limit here.
_MAIL_PARAMETERS = (b"SIZE", b"BODY", b"AUTH", b"SMTPUTF8")


class InboundSession(SMTPSession):
    help_reply = replies.INBOUND_HELP

    def __init__(self) -> None:
        super().__init__()
        self._reset_transaction()

    def _reset_transaction(self) -> None:
        self._sender = None
        self._recipients: list[str] = []

    def _session_ended(self) -> None:
        self.log.info("inbound session from {ip}: messages={messages} errors={errors} "
                      "{seconds:.1f}s", ip=self.peer_ip, messages=self.messages,
                      errors=self.errors, seconds=self.duration)

    def _extensions(self) -> list[bytes]:
        return [b"SIZE" if keyword.startswith(b"SIZE ") else keyword
                for keyword in super()._extensions()]

    def do_MAIL(self, rest: bytes) -> None:
        parsed = self._mail_path(rest)
        if parsed is None:
            return
        address, params = parsed
        if any(name not in _MAIL_PARAMETERS for name, _ in params):
            self._error(replies.PARAMETER_NOT_IMPLEMENTED)
            return
        self._sender = address  # "" for a DSN (the null reverse-path)
        self.reply(replies.SENDER_OK)

    def do_RCPT(self, rest: bytes) -> None:
        address = self._rcpt_path(rest, len(self._recipients))
        if address is None:
            return
        local, at, domain = address.rpartition("@")
        if not (local and at and domain) or len(address) > 320:
            self._error(replies.invalid_recipient(address))
            return
        self._run(self._accept_recipient(address, domain))

    async def _accept_recipient(self, address: str, domain: str) -> None:
        if not await self.factory.processor.accepts(domain):
            self._error(replies.RELAY_DENIED)
            return
        self._recipients.append(address)
        # Progress, as for the submission: recipients may come before their message.
        self._commands_without_message -= 1
        self.reply(replies.RECIPIENT_OK)

    def do_DATA(self, rest: bytes) -> None:
        if self._data_allowed(rest, len(self._recipients)):
            self._start_data(DataCollector(self.factory.max_message_size, self._bare_lf,
                                           keep_head=True))

    async def _end_of_data(self, collector: DataCollector) -> None:
        envelope = Envelope(self.peer_ip, self._sender, tuple(self._recipients),
                            collector.message())
        self._reset_transaction()
        await self.factory.processor.process(envelope)
        self.messages += 1
        self._message_accepted()
        self.reply(replies.OK)

    def do_QUIT(self, rest: bytes) -> None:
        self.mode = QUIT
        self._close(replies.CLOSING)

    _COMMANDS = {
        **SMTPSession.COMMON_COMMANDS, b"MAIL": do_MAIL, b"RCPT": do_RCPT, b"DATA": do_DATA,
        b"QUIT": do_QUIT,
    }


class InboundFactory(SessionFactory):
    protocol = InboundSession
    kind = "inbound"

    def __init__(self, hostname: str, tls_options, clock, config: InboundConfig,
                 processor: FeedbackProcessor, metrics: Metrics) -> None:
        super().__init__(
            hostname, tls_options, clock, config.idle_timeout, metrics.inbound_sessions,
            metrics.inbound_replies, max_message_size=config.max_message_size,
            tls_handshake_timeout=config.tls_handshake_timeout,
            max_connections=config.max_connections,
            max_connections_per_address=config.max_connections_per_address,
            data_timeout=config.data_timeout,
            max_commands_without_message=config.max_commands_without_message)
        self.processor = processor
        self.max_recipients = config.max_recipients

