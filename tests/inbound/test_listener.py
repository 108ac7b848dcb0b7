"""The inbound listener's dialogue (D-7), on a StringTransport and a task.Clock."""

from twisted.internet import address, defer, task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailgw.config import InboundConfig
from mailgw.content.links import LinkSigner
from mailgw.errors import DatabaseUnavailable
from mailgw.inbound.listener import InboundFactory
from mailgw.inbound.processor import FeedbackProcessor, ReturnPathDomains
from mailgw.inbound.reports import read_report
from mailgw.metrics import Metrics
from mailgw.smtp.session import CLOSE_GRACE_SECONDS
from mailgw.store.inbound import RECORDED
from tests.harness import log_lines
from tests.inbound import samples
from tests.smtp.test_protocol import StartTLSTransport

SIGNER = LinkSigner(b"k" * 32, "https://t.example")
VERP = SIGNER.bounce_address(42, "bounces.example.org")


class StubInbound:
    """Stands in for InboundStore: the return-path domains, and what was recorded."""

    def __init__(self):
        self.domains = frozenset({"bounces.example.org"})
        self.reads = 0
        self.bounces = []
        self.complaints = []
        self.down = False

    async def return_path_domains(self):
        self.reads += 1
        if self.down:
            raise DatabaseUnavailable("return_path_domains")
        return self.domains

    async def record_bounce(self, bounce):
        if self.down:
            raise DatabaseUnavailable("record_async_bounce")
        self.bounces.append(bounce)
        return RECORDED

    async def record_complaint(self, complaint):
        self.complaints.append(complaint)
        return RECORDED


class Session:
    def __init__(self, peer="192.0.2.7", config=None, starttls=False):
        self.clock = task.Clock()
        self.inbound = StubInbound()
        self.metrics = Metrics()
        config = config or InboundConfig()
        self.processor = FeedbackProcessor(
            self.inbound, None, SIGNER,
            ReturnPathDomains(self.inbound.return_path_domains, "mx.example.org", self.clock),
            lambda raw: defer.succeed(read_report(raw)), self.clock, 2, self.metrics)
        self.factory = InboundFactory("mx.example.org", object() if starttls else None,
                                      self.clock, config, self.processor, self.metrics)
        self.connect(peer, starttls)

    def connect(self, peer="192.0.2.7", starttls=False):
        peer_address = address.IPv4Address("TCP", peer, 40000)
        self.protocol = self.factory.buildProtocol(peer_address)
        self.transport = (StartTLSTransport if starttls else StringTransport)(
            peerAddress=peer_address)
        self.protocol.makeConnection(self.transport)
        self.banner = self.take()
        return self

    def take(self):
        data = self.transport.value()
        self.transport.clear()
        return data.split(b"\r\n")[:-1]

    def send(self, *lines, end=b"\r\n"):
        self.protocol.dataReceived(b"".join(line + end for line in lines))
        return self.take()

    def deliver(self, recipient: bytes, message: bytes, sender=b"<>"):
        self.send(b"EHLO mx1.example.net", b"MAIL FROM:" + sender, b"RCPT TO:<" + recipient
                  + b">", b"DATA")
        return self.send(message + b".")


class DialogueTests(unittest.TestCase):
    def test_ehlo_has_no_auth_and_no_size_limit(self):
        session = Session(starttls=True)
        self.assertEqual(session.banner, [b"220 mx.example.org ESMTP mailgw"])
        self.assertEqual(session.send(b"EHLO mx1.example.net"), [
            b"250-mx.example.org Hello mx1.example.net", b"250-PIPELINING", b"250-SIZE",
            b"250-8BITMIME", b"250-ENHANCEDSTATUSCODES", b"250-STARTTLS", b"250 HELP"])
        self.assertEqual(session.send(b"AUTH PLAIN AHVzZXIAcGFzcw=="),
                         [b"500 5.5.1 Invalid command"])
        self.assertEqual(session.send(b"HELP"), [
            b"214 2.0.0 Commands: EHLO HELO STARTTLS MAIL RCPT DATA RSET NOOP VRFY HELP QUIT"])
        self.assertEqual(session.send(b"STARTTLS"), [b"220 2.0.0 Ready to start TLS"])
        self.assertTrue(session.protocol.startedTLS)

    def test_a_dsn_is_recorded_before_the_reply(self):
        session = Session()
        replies = session.send(b"EHLO mx1.example.net", b"MAIL FROM:<> SIZE=99999999",
                               b"RCPT TO:<" + VERP.encode() + b">", b"DATA")
        self.assertEqual(replies[-3:], [b"250 2.1.0 OK", b"250 2.1.5 Accepted",
                                        b'354 Enter message, ending with "." on a line by'
                                        b" itself"])
        self.assertEqual(session.send(samples.dsn(VERP) + b"."), [b"250 2.0.0 OK"])
        [bounce] = session.inbound.bounces
        self.assertEqual((bounce.delivery_id, bounce.bounce_type, bounce.status),
                         (42, "hard", "5.1.1"))
        self.assertEqual(session.metrics.registry.get_sample_value(
            "mailgw_inbound_messages_total", {"outcome": "bounce"}), 1)
        self.assertEqual(session.metrics.registry.get_sample_value(
            "mailgw_inbound_messages_total", {"outcome": "unmatched"}), 0)

    def test_no_relaying(self):
        session = Session()
        session.send(b"EHLO x", b"MAIL FROM:<spammer@example.com>")
        self.assertEqual(session.send(b"RCPT TO:<victim@example.net>"),
                         [b"550 5.7.1 Relay access denied"])
        self.assertEqual(session.send(b"RCPT TO:<x@bounces.example.org.>",
                                      b"RCPT TO:<postmaster@MX.example.org>"),
                         [b"250 2.1.5 Accepted", b"250 2.1.5 Accepted"])
        self.assertEqual(session.send(b"RCPT TO:<nodomain>", b"RCPT TO:<@x>"),
                         [b"553 5.1.3 Invalid recipient address: nodomain",
                          b"553 5.1.3 Invalid recipient address: @x"])

    def test_order_of_commands(self):
        session = Session()
        self.assertEqual(session.send(b"RCPT TO:<x@bounces.example.org>", b"DATA"),
                         [b"503 5.5.1 valid MAIL command must precede RCPT",
                          b"503 5.5.1 valid RCPT and MAIL command must precede DATA"])
        self.assertEqual(session.send(b"MAIL FROM:<>", b"MAIL FROM:<>"),
                         [b"250 2.1.0 OK", b"503 5.5.1 Sender already specified"])
        self.assertEqual(session.send(b"RSET", b"MAIL FROM:<> RET=HDRS"),
                         [b"250 2.0.0 OK", b"504 5.5.4 A command parameter is not implemented"])

    def test_domains_read_again_after_a_while(self):
        session = Session()
        session.send(b"EHLO x", b"MAIL FROM:<>", b"RCPT TO:<a@bounces.example.org>")
        session.inbound.domains = frozenset({"new.example.org"})
        self.assertEqual(session.send(b"RCPT TO:<a@new.example.org>"),
                         [b"550 5.7.1 Relay access denied"])
        session.clock.advance(31)
        self.assertEqual(session.send(b"RCPT TO:<a@new.example.org>"),
                         [b"250 2.1.5 Accepted"])
        self.assertEqual(session.inbound.reads, 2)

    def test_database_out_of_reach(self):
        """R-2: a 451, for the sender's server to try again; never a lost bounce. The
        domains last read still answer RCPT."""
        session = Session()
        session.send(b"EHLO x", b"MAIL FROM:<>", b"RCPT TO:<a@bounces.example.org>")
        session.inbound.down = True
        session.clock.advance(31)
        self.assertEqual(session.send(b"RCPT TO:<" + VERP.encode() + b">", b"DATA"),
                         [b"250 2.1.5 Accepted", b'354 Enter message, ending with "." on a '
                                                 b"line by itself"])
        self.assertEqual(session.send(samples.dsn(VERP) + b"."),
                         [b"451 4.3.0 Temporary failure, try again later"])
        fresh = Session()
        fresh.inbound.down = True
        fresh.send(b"EHLO x", b"MAIL FROM:<>")
        self.assertEqual(fresh.send(b"RCPT TO:<a@bounces.example.org>"),
                         [b"451 4.3.0 Temporary failure, try again later"])

    def test_unmatched_mail_accepted_and_logged(self):
        lines = log_lines(self)
        session = Session()
        forged = VERP.replace(VERP.split("-")[2][:16], "a" * 16)
        self.assertEqual(session.deliver(forged.encode(), samples.dsn(forged)),
                         [b"250 2.0.0 OK"])
        self.assertEqual(session.inbound.bounces, [])
        self.assertTrue(any(f"<{forged}>: unmatched (a bounce report that names no delivery"
                            in line for line in lines), lines)


class HardeningTests(unittest.TestCase):
    """R-6: the submission server's limits hold here too (mailgw/smtp/session.py)."""

    def test_message_head_kept(self):
        session = Session(config=InboundConfig(max_message_size=len(samples.dsn(VERP))))
        padding = b"x" * 998 + b"\r\n"
        message = samples.dsn(VERP) + padding * 1000
        self.assertEqual(session.deliver(VERP.encode(), message), [b"250 2.0.0 OK"])
        self.assertEqual(len(session.inbound.bounces), 1)

    def test_memory_bounded_while_a_large_message_comes(self):
        """A flood of text keeps max_message_size bytes of it, however much comes."""
        session = Session(config=InboundConfig(max_message_size=1000))
        session.send(b"EHLO x", b"MAIL FROM:<>", b"RCPT TO:<" + VERP.encode() + b">",
                     b"DATA")
        for _ in range(1000):
            session.send(b"x" * 998)
        collector = session.protocol._collector
        self.assertEqual(collector.size, 1000 * 1000)
        self.assertEqual(sum(len(chunk) for chunk in collector._chunks), 1000)
        self.assertEqual(session.send(b"."), [b"250 2.0.0 OK"])

    def test_long_line(self):
        session = Session()
        self.assertEqual(session.send(b"NOOP " + b"x" * 5000),
                         [b"500 5.5.2 Syntax error: line too long"])

    def test_idle_timeout(self):
        session = Session()
        session.clock.advance(300)
        self.assertEqual(session.take(), [b"421 4.4.2 Idle timeout, closing connection"])
        self.assertTrue(session.transport.disconnecting)

    def test_data_timeout(self):
        session = Session()
        session.send(b"EHLO x", b"MAIL FROM:<>", b"RCPT TO:<" + VERP.encode() + b">",
                     b"DATA")
        replies = []
        for _ in range(11):
            session.clock.advance(59)
            replies += session.send(b"x")
        self.assertEqual(replies,
                         [b"421 4.4.2 Message took too long to send, closing connection"])

    def test_commands_without_a_message(self):
        session = Session()
        replies = session.send(*[b"NOOP"] * 101)
        self.assertEqual(replies[-1],
                         b"421 4.7.0 Too many commands without a message, closing connection")

    def test_too_many_errors(self):
        session = Session()
        session.send(b"EHLO x", b"MAIL FROM:<>")
        replies = session.send(*[b"RCPT TO:<a@elsewhere.example>"] * 21)
        self.assertEqual(replies[-1], b"421 4.7.0 Too many errors, closing connection")

    def test_connections_per_address(self):
        session = Session(config=InboundConfig(max_connections_per_address=2))
        session.connect()
        session.connect()
        self.assertEqual(session.banner, [b"421 4.7.0 Too many connections from your "
                                          b"address, try again later"])
        session.clock.advance(CLOSE_GRACE_SECONDS)
        self.assertEqual(session.metrics.registry.get_sample_value(
            "mailgw_inbound_replies_total", {"class": "4xx"}), 1)

    def test_backpressure(self):
        """Replies the client does not read stop the reading."""
        session = Session()
        session.protocol._unsent_replies.pauseProducing()
        self.assertTrue(session.protocol.paused)
        session.protocol._unsent_replies.resumeProducing()
        self.assertFalse(session.protocol.paused)

    def test_graceful_stop(self):
        session = Session()
        stopped = defer.ensureDeferred(session.factory.shutdown(30))
        self.assertEqual(session.take(),
                         [b"421 4.3.2 Service shutting down, closing connection"])
        session.protocol.connectionLost(None)
        self.assertTrue(stopped.called)
