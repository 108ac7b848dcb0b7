"""A receiving SMTP server for tests: accepts mail on loopback and keeps it.

Recipients whose local part starts with "bounce" are refused with 550 and
those starting with "defer" with 451, and senders whose local part starts with
"refused" with 550, so delivery outcomes can be provoked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from twisted.cred import checkers, portal
from twisted.internet import defer, protocol, reactor
from twisted.mail import smtp
from twisted.mail._cred import PLAINCredentials
from twisted.protocols import basic
from twisted.trial import unittest
from zope.interface import implementer

from mailgw.tlscert import ensure_self_signed, server_tls_options

REFUSALS = {"bounce": (550, "5.1.1 No such user here"), "defer": (451, "4.3.0 Try later")}


@dataclass
class Received:
    sender: str
    recipient: str
    data: bytes


@dataclass
class SMTPSink:
    tls_options: object = None
    # username -> password: AUTH PLAIN is then required (a smarthost).
    users: dict[bytes, bytes] | None = None
    # Offer PIPELINING (RFC 2920) in the EHLO reply.
    pipelining: bool = False
    messages: list[Received] = field(default_factory=list)
    connections: int = 0
    commands: list[bytes] = field(default_factory=list)
    # The command verbs of each read from the socket: what the client sent together.
    segments: list[list[bytes]] = field(default_factory=list)
    arrived: list[defer.Deferred] = field(default_factory=list)
    open_sessions: int = 0
    closed_waiters: list[defer.Deferred] = field(default_factory=list)

    def start(self) -> int:
        sink = self

        class Factory(smtp.SMTPFactory):
            def buildProtocol(self, addr):
                sink.connections += 1
                challengers = {b"PLAIN": PLAINCredentials} if sink.users else None
                p = _RecordingESMTP(sink, chal=challengers, contextFactory=sink.tls_options)
                p.factory = self
                p.host = b"sink.test"
                if sink.users:
                    p.portal = portal.Portal(_Realm(sink), [
                        checkers.InMemoryUsernamePasswordDatabaseDontUse(**{
                            user.decode(): password for user, password in sink.users.items()})])
                else:
                    p.delivery = _Delivery(sink)
                return p

        self.port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        return self.port.getHost().port

    async def stop(self) -> None:
        """Stop listening once every session has ended."""
        if self.open_sessions:
            d = defer.Deferred()
            self.closed_waiters.append(d)
            await d
        await self.port.stopListening()

    def _session_ended(self) -> None:
        self.open_sessions -= 1
        if self.open_sessions == 0:
            waiters, self.closed_waiters = self.closed_waiters, []
            for d in waiters:
                d.callback(None)

    def wait_for(self, count: int) -> defer.Deferred:
        """Fires once `count` messages have arrived."""
        if len(self.messages) >= count:
            return defer.succeed(self.messages)
        d = defer.Deferred()
        d.count = count
        self.arrived.append(d)
        return d

    def _got(self, message: Received) -> None:
        self.messages.append(message)
        for d in list(self.arrived):
            if len(self.messages) >= d.count:
                self.arrived.remove(d)
                d.callback(self.messages)


def tls_sink(test: unittest.TestCase, **options) -> tuple[SMTPSink, int]:
    """A started SMTPSink offering STARTTLS, with a self-signed certificate for sink.test,
    and its port."""
    base = Path(test.mktemp())
    ensure_self_signed(base / "cert.pem", base / "key.pem", "sink.test")
    sink = SMTPSink(tls_options=server_tls_options(base / "cert.pem", base / "key.pem"),
                    **options)
    port = sink.start()
    test.addCleanup(sink.stop)
    return sink, port


class _RecordingESMTP(smtp.ESMTP):
    def __init__(self, sink, chal=None, contextFactory=None):
        super().__init__(chal=chal, contextFactory=contextFactory)
        self.sink = sink

    def connectionMade(self):
        self.sink.open_sessions += 1
        super().connectionMade()

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.sink._session_ended()

    def extensions(self):
        extensions = super().extensions()
        if self.sink.pipelining:
            extensions[b"PIPELINING"] = None
        return extensions

    def dataReceived(self, data):
        if self.mode == "COMMAND":
            self.sink.segments.append([line.split(b" ")[0].upper()
                                       for line in data.split(b"\r\n") if line])
        return super().dataReceived(data)

    def lineReceived(self, line):
        if self.mode == "COMMAND":
            self.sink.commands.append(line.split(b" ")[0].upper())
        return super().lineReceived(line)


@implementer(portal.IRealm)
class _Realm:
    def __init__(self, sink: SMTPSink) -> None:
        self.sink = sink

    def requestAvatar(self, avatar_id, mind, *interfaces):
        return smtp.IMessageDelivery, _Delivery(self.sink), lambda: None


@implementer(smtp.IMessageDelivery)
class _Delivery:
    def __init__(self, sink: SMTPSink) -> None:
        self.sink = sink

    def receivedHeader(self, helo, origin, recipients):
        return None

    def validateFrom(self, helo, origin):
        if origin.local.startswith(b"refused"):
            raise smtp.SMTPBadSender(origin, 550, "5.7.1 Sender refused")
        return origin

    def validateTo(self, user):
        local = user.dest.local.decode()
        for prefix, (code, text) in REFUSALS.items():
            if local.startswith(prefix):
                raise smtp.SMTPBadRcpt(user.dest, code=code, resp=text)
        return lambda: _Message(self.sink, str(user.orig), str(user.dest))


@implementer(smtp.IMessage)
class _Message:
    def __init__(self, sink, sender, recipient):
        self.sink, self.sender, self.recipient = sink, sender, recipient
        self.lines = []

    def lineReceived(self, line):
        self.lines.append(line)

    def eomReceived(self):
        self.sink._got(Received(self.sender, self.recipient, b"\r\n".join(self.lines)))
        return defer.succeed(None)

    def connectionLost(self):
        self.lines = []


class ScriptedServer:
    """A server that answers each command verb with a fixed reply, for replies and
    misbehaviour SMTPSink cannot give; it records every line, by connection.
    A STARTTLS it accepts is followed by a broken TLS handshake.

    A reply may be a function of the session's lines so far; None hangs up.
    """

    DEFAULT_REPLIES = {b"EHLO": b"250-script.test\r\n250 PIPELINING", b"MAIL": b"250 2.1.0 Ok",
                       b"RCPT": b"250 2.1.5 Ok", b"DATA": b"354 Go ahead",
                       b".": b"250 2.0.0 Queued", b"RSET": b"250 2.0.0 Ok",
                       b"QUIT": b"221 2.0.0 Bye"}

    def __init__(self, replies: dict[bytes, bytes] | None = None) -> None:
        self.replies = {**self.DEFAULT_REPLIES, **(replies or {})}
        # The lines each connection received, data lines included.
        self.sessions: list[list[bytes]] = []

    def start(self) -> int:
        server = self

        class Session(basic.LineReceiver):
            def connectionMade(self):
                self.lines = []
                self.in_data = False
                server.sessions.append(self.lines)
                self.sendLine(b"220 script.test ESMTP")

            def lineReceived(self, line):
                self.lines.append(line)
                if self.in_data:
                    if line != b".":
                        return
                    self.in_data = False
                verb = line.split(b" ")[0].upper()
                reply = server.replies.get(verb, b"502 5.5.1 Unknown command")
                if callable(reply):
                    reply = reply(self.lines)
                if reply is None:
                    self.transport.loseConnection()
                    return
                self.transport.write(reply + b"\r\n")
                self.in_data = verb == b"DATA" and reply.startswith(b"354")
                if verb == b"STARTTLS" and reply.startswith(b"220"):
                    self.setRawMode()  # and answer the client's TLS hello with nonsense
                elif verb == b"QUIT":
                    self.transport.loseConnection()

            def rawDataReceived(self, data):
                self.transport.write(b"this is not a TLS handshake\r\n")
                self.transport.loseConnection()

        self.port = reactor.listenTCP(0, protocol.Factory.forProtocol(Session),
                                      interface="127.0.0.1")
        return self.port.getHost().port

    def stop(self) -> defer.Deferred:
        return self.port.stopListening()
