"""The outbound client pool against a real receiving SMTP server on loopback."""


from twisted.internet import defer, error, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailgw.delivery.client import (
    MailHost,
    OutboundPool,
    OutgoingMessage,
    classify,
    wire_format,
)
from tests.smtp_sink import ScriptedServer, SMTPSink, tls_sink

DATA = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nHello\r\n"


def _text(data, rendered=None):
    """A message's render function giving `data`; it appends to `rendered` each time."""
    def render():
        if rendered is not None:
            rendered.append(data)
        return defer.succeed(data)
    return render


class PoolTests(unittest.TestCase):
    def setUp(self):
        self.sink = SMTPSink()
        self.port = self.sink.start()
        self.addCleanup(self.sink.stop)
        self.pool = OutboundPool(reactor, reactor, "gw.example.org", connect_timeout=5,
                                 reply_timeout=10)

    def send(self, *recipients, servers=None, pool=None):
        servers = servers or [MailHost("mx.example.net", "127.0.0.1", self.port)]
        pool = pool or self.pool
        self.addCleanup(pool.close_idle)
        return defer.gatherResults([
            pool.deliver(rcpt.rpartition("@")[2], servers,
                         OutgoingMessage(i, "b-1@bounces.example.org", rcpt, _text(DATA)))
            for i, rcpt in enumerate(recipients)])

    async def test_withdrawn_messages_never_start(self):
        """A graceful stop gives up what no connection has started: waiting messages and
        one held by the rate limit are answered deferred, and no server sees them."""
        clock = task.Clock()
        pool = OutboundPool(reactor, clock, "gw.example.org", per_destination=1,
                            per_domain_rate=1.0)
        sends = self.send("r0@example.net", "r1@example.com", "r2@example.com",
                          "r3@example.com", pool=pool)  # r2 and r3 wait for the rate limit
        pool.withdraw({1, 2})
        clock.advance(2)
        await self.sink.wait_for(2)
        clock.advance(1)
        outcomes = await sends
        self.assertEqual([o.state for o in outcomes], ["sent", "deferred", "deferred", "sent"])
        self.assertEqual(outcomes[1].reply, "withdrawn: mailgw is stopping")
        self.assertEqual(sorted(m.recipient for m in self.sink.messages),
                         ["r0@example.net", "r3@example.com"])
        self.assertEqual(self.sink.commands.count(b"RCPT"), 2)  # no transaction begun for nothing

    async def test_messages_share_one_connection(self):
        pool = OutboundPool(reactor, reactor, "gw.example.org", per_destination=1)
        outcomes = await self.send(*[f"r{i}@example.net" for i in range(5)], pool=pool)
        self.assertEqual([o.state for o in outcomes], ["sent"] * 5)
        self.assertEqual(self.sink.connections, 1)
        self.assertEqual(len(self.sink.messages), 5)
        # A transaction ended by the reply to its text needs no RSET before the next.
        self.assertEqual(self.sink.commands, [b"EHLO"] + [b"MAIL", b"RCPT", b"DATA"] * 5)
        self.assertEqual(self.sink.messages[0].sender, "b-1@bounces.example.org")
        self.assertTrue(outcomes[0].reply.startswith("250 "))

    async def test_per_destination_concurrency(self):
        pool = OutboundPool(reactor, reactor, "gw.example.org", per_destination=2)
        await self.send(*[f"r{i}@example.net" for i in range(6)], pool=pool)
        self.assertEqual(self.sink.connections, 2)

    async def test_smarthost_connection_serves_every_recipient_domain(self):
        """D-4: connections are per destination host, and a smarthost is one, whatever
        the recipients' domains."""
        pool = OutboundPool(reactor, reactor, "gw.example.org", per_destination=1)
        relay = [MailHost("relay.example.org", "127.0.0.1", self.port)]
        outcomes = await self.send(*[f"r@example{i}.net" for i in range(4)], servers=relay,
                                   pool=pool)
        self.assertEqual([o.state for o in outcomes], ["sent"] * 4)
        self.assertEqual(self.sink.connections, 1)

    async def test_domains_with_the_same_mail_servers_share_connections(self):
        pool = OutboundPool(reactor, task.Clock(), "gw.example.org")  # idle until closed
        hosted = [MailHost("mx1.hosting.example", "127.0.0.1", self.port, 10),
                  MailHost("mx2.hosting.example", "127.0.0.1", self.port, 10)]
        await self.send("a@example.net", servers=hosted, pool=pool)
        # Equal preferences come in any order: the same servers all the same.
        await self.send("b@example.com", servers=hosted[::-1], pool=pool)
        self.assertEqual(self.sink.connections, 1)
        await self.send("c@example.org", pool=pool,
                        servers=[MailHost("mx.example.org", "127.0.0.1", self.port)])
        self.assertEqual(self.sink.connections, 2)

    async def test_domains_whose_backup_is_the_others_primary_do_not_share(self):
        """RFC 5321 5.1: each domain's mail goes to its own most preferred server first, so
        the same servers at other preferences are another destination."""
        pool = OutboundPool(reactor, task.Clock(), "gw.example.org")  # idle until closed
        first = [MailHost("mx1.hosting.example", "127.0.0.1", self.port, 10),
                 MailHost("mx2.hosting.example", "127.0.0.1", self.port, 20)]
        second = [first[1]._replace(preference=10), first[0]._replace(preference=20)]
        await self.send("a@example.net", servers=first, pool=pool)
        await self.send("b@example.com", servers=second, pool=pool)
        self.assertEqual(self.sink.connections, 2)

    async def test_rate_limit_stays_per_recipient_domain(self):
        """Domains served by the same servers do not share one domain's rate limit."""
        pool = OutboundPool(reactor, task.Clock(), "gw.example.org", per_domain_rate=1.0)
        # The clock never moves: a message held back by the other's limit would time out.
        outcomes = await self.send("a@example.net", "b@example.com", pool=pool).addTimeout(
            5, reactor)
        self.assertEqual([o.state for o in outcomes], ["sent"] * 2)

    async def test_per_domain_rate_limit(self):
        clock = task.Clock()
        pool = OutboundPool(reactor, clock, "gw.example.org", per_domain_rate=1.0)
        sends = self.send("a@example.net", "b@example.net", "c@example.net", pool=pool)
        while not self.sink.messages:
            await task.deferLater(reactor, 0.01, lambda: None)
        for expected in (2, 3):
            await task.deferLater(reactor, 0.1, lambda: None)
            self.assertEqual(len(self.sink.messages), expected - 1)  # held back
            clock.advance(1)
            await self.sink.wait_for(expected)
        self.assertEqual([o.state for o in await sends], ["sent"] * 3)

    async def test_refusals_classified(self):
        outcomes = await self.send("bounce@example.net", "defer@example.net", "ok@example.net")
        self.assertEqual([(o.state, o.bounce_type) for o in outcomes],
                         [("bounced", "hard"), ("deferred", None), ("sent", None)])
        self.assertIn("550 5.1.1 No such user here", outcomes[0].reply)

    async def test_next_mx_when_first_refuses_connection(self):
        servers = [MailHost("mx1.example.net", "127.0.0.1", 1, 10),
                   MailHost("mx2.example.net", "127.0.0.1", self.port, 20)]
        (outcome,) = await self.send("ok@example.net", servers=servers)
        self.assertEqual(outcome.state, "sent")

    async def test_unreachable_domain_deferred(self):
        (outcome,) = await self.send("ok@example.net",
                                     servers=[MailHost("mx1.example.net", "127.0.0.1", 1)])
        self.assertEqual(outcome.state, "deferred")
        self.assertIn("cannot connect to mx1.example.net", outcome.reply)

    async def test_starttls_used_when_offered(self):
        sink, port = tls_sink(self)
        (outcome,) = await self.send("ok@example.net",
                                     servers=[MailHost("sink.test", "127.0.0.1", port)])
        self.assertEqual(outcome.state, "sent")
        self.assertIn(b"STARTTLS", sink.commands)

    async def test_smarthost_with_auth(self):
        relay, port = tls_sink(self, users={b"gw": b"relay-secret"})
        servers = [MailHost("relay.example.org", "127.0.0.1", port)]
        pool = OutboundPool(reactor, reactor, "gw.example.org", authenticate=("gw",
                                                                             "relay-secret"))
        (outcome,) = await self.send("ok@example.net", servers=servers, pool=pool)
        self.assertEqual(outcome.state, "sent")
        # The credentials went through TLS: AUTH after STARTTLS and the new EHLO.
        self.assertEqual(relay.commands[:4], [b"EHLO", b"STARTTLS", b"EHLO", b"AUTH"])

    async def test_smarthost_refusing_auth_defers_with_its_reply(self):
        relay, port = tls_sink(self, users={b"gw": b"relay-secret"})
        servers = [MailHost("relay.example.org", "127.0.0.1", port)]
        pool = OutboundPool(reactor, reactor, "gw.example.org", authenticate=("gw", "nope"))
        outcomes = await self.send("a@example.net", "b@example.net", servers=servers,
                                   pool=pool)
        self.assertEqual([(o.state, o.reply) for o in outcomes],
                         [("deferred", "535 Authentication failed")] * 2)
        self.assertNotIn(b"MAIL", relay.commands)

    async def test_verify_policy_refuses_an_unverifiable_certificate(self):
        sink, port = tls_sink(self)
        pool = OutboundPool(reactor, reactor, "gw.example.org", tls_policy="verify")
        (outcome,) = await self.send("ok@example.net", pool=pool,
                                     servers=[MailHost("sink.test", "127.0.0.1", port)])
        self.assertEqual(outcome.state, "deferred")
        self.assertIn("sink.test: STARTTLS failed", outcome.reply)
        self.assertIn("certificate verify failed", outcome.reply)
        self.assertEqual(sink.messages, [])
        plain = OutboundPool(reactor, reactor, "gw.example.org", tls_policy="verify")
        (outcome,) = await self.send("ok@example.net", pool=plain)  # no STARTTLS offered
        self.assertEqual(outcome.state, "deferred")
        self.assertEqual(outcome.reply, "mx.example.net: Server does not support secure "
                                        "communication via TLS / SSL")
        self.assertEqual(self.sink.messages, [])

    async def test_silent_server_times_out(self):
        from twisted.internet import protocol

        silent = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol),
                                   interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        clock = task.Clock()
        pool = OutboundPool(reactor, clock, "gw.example.org", reply_timeout=30)
        d = self.send("ok@example.net", pool=pool,
                      servers=[MailHost("mx.example.net", "127.0.0.1", silent.getHost().port)])
        while pool.connections_made == 0:
            await task.deferLater(reactor, 0.01, lambda: None)
        clock.advance(31)
        (outcome,) = await d
        self.assertEqual(outcome.state, "deferred")


class PipeliningTests(unittest.TestCase):
    """RFC 2920: the envelope in one write when offered, one command at a time when not."""

    def sink(self, pipelining):
        sink = SMTPSink(pipelining=pipelining)
        self.servers = [MailHost("mx.example.net", "127.0.0.1", sink.start())]
        self.addCleanup(sink.stop)
        return sink

    def send(self, *envelopes):
        self.rendered = []
        self.pool = pool = OutboundPool(reactor, reactor, "gw.example.org", per_destination=1)
        self.addCleanup(pool.close_idle)
        return defer.gatherResults([
            pool.deliver("example.net", self.servers,
                         OutgoingMessage(i, sender, rcpt, _text(DATA, self.rendered)))
            for i, (sender, rcpt) in enumerate(envelopes)])

    async def test_envelope_sent_in_one_write(self):
        sink = self.sink(pipelining=True)
        outcomes = await self.send(("b-1@bounces.example.org", "a@example.net"),
                                   ("b-2@bounces.example.org", "b@example.net"))
        self.assertEqual([o.state for o in outcomes], ["sent", "sent"])
        envelopes = [s for s in sink.segments if s[0] == b"MAIL"]
        # Sent before the server answered MAIL: one read holds all three.
        self.assertEqual(envelopes, [[b"MAIL", b"RCPT", b"DATA"]] * 2)
        self.assertEqual([m.recipient for m in sink.messages], ["a@example.net",
                                                                 "b@example.net"])

    async def test_one_command_at_a_time_without_pipelining(self):
        sink = self.sink(pipelining=False)
        (outcome,) = await self.send(("b-1@bounces.example.org", "a@example.net"))
        self.assertEqual(outcome.state, "sent")
        self.assertIn([b"MAIL"], sink.segments)
        self.assertIn([b"RCPT"], sink.segments)
        self.assertIn([b"DATA"], sink.segments)

    async def test_refused_recipient_is_the_outcome_not_the_data_reply(self):
        sink = self.sink(pipelining=True)
        outcomes = await self.send(("b-1@bounces.example.org", "bounce@example.net"),
                                   ("b-1@bounces.example.org", "defer@example.net"),
                                   ("b-1@bounces.example.org", "ok@example.net"))
        self.assertEqual([(o.state, o.bounce_type) for o in outcomes],
                         [("bounced", "hard"), ("deferred", None), ("sent", None)])
        self.assertEqual(outcomes[0].reply, "550 5.1.1 No such user here")
        self.assertEqual(outcomes[1].reply, "451 4.3.0 Try later")
        self.assertEqual([m.recipient for m in sink.messages], ["ok@example.net"])
        # Only the accepted recipient's copy was rendered (and signed).
        self.assertEqual(len(self.rendered), 1)
        # A refused envelope leaves the transaction open: RSET clears it.
        self.assertEqual(sink.commands[1:], [b"MAIL", b"RCPT", b"DATA", b"RSET"] * 2
                         + [b"MAIL", b"RCPT", b"DATA"])

    async def test_failed_render_defers_and_sends_no_partial_message(self):
        sink = self.sink(pipelining=True)
        self.pool = pool = OutboundPool(reactor, reactor, "gw.example.org", per_destination=1)
        self.addCleanup(pool.close_idle)

        def broken():
            raise ValueError("no key")

        first = pool.deliver("example.net", self.servers, OutgoingMessage(
            1, "b-1@bounces.example.org", "a@example.net", broken))
        second = pool.deliver("example.net", self.servers, OutgoingMessage(
            2, "b-1@bounces.example.org", "b@example.net", _text(DATA)))
        outcomes = await defer.gatherResults([first, second])
        self.assertEqual((outcomes[0].state, outcomes[0].reply),
                         ("deferred", "message could not be rendered: no key"))
        self.assertEqual(outcomes[1].state, "sent")
        self.assertEqual([m.recipient for m in sink.messages], ["b@example.net"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    async def test_withdrawn_during_its_envelope_is_dropped_quietly(self):
        """A stop that gives up a delivery whose envelope is under way: at 354 its text is
        refused (the lease is back in the queue), so the connection is dropped with no
        text sent and no error logged."""
        sink = self.sink(pipelining=True)
        self.pool = pool = OutboundPool(reactor, reactor, "gw.example.org")
        self.addCleanup(pool.close_idle)

        def withdrawn_meanwhile():
            pool.withdraw({1})  # too late for the queue: it is the connection's message
            raise RuntimeError("delivery 1 was given back to the queue")

        outcome = await pool.deliver("example.net", self.servers, OutgoingMessage(
            1, "b-1@bounces.example.org", "a@example.net", withdrawn_meanwhile))
        self.assertEqual(outcome.state, "deferred")
        self.assertEqual(sink.messages, [])
        self.assertEqual(self.flushLoggedErrors(RuntimeError), [])

    async def test_refused_sender_is_the_outcome_and_a_soft_bounce(self):
        """A 5xx to MAIL FROM refuses our sender, not the recipient: it must not count
        towards invalidating the contact, as hard bounces do."""
        for pipelining in (True, False):
            sink = self.sink(pipelining=pipelining)
            (outcome,) = await self.send(("refused@bounces.example.org", "ok@example.net"))
            self.assertEqual((outcome.state, outcome.bounce_type), ("bounced", "soft"))
            self.assertTrue(outcome.reply.startswith("550 "), outcome.reply)
            self.assertIn("5.7.1 Sender refused", outcome.reply)
            self.assertEqual(sink.messages, [])

    async def test_refused_sender_then_hang_up_is_a_soft_bounce(self):
        server = ScriptedServer({b"MAIL": b"550 5.7.1 Sender IP listed", b"RCPT": None})
        self.servers = [MailHost("mx.example.net", "127.0.0.1", server.start())]
        self.addCleanup(server.stop)
        (outcome,) = await self.send(("b-1@bounces.example.org", "ok@example.net"))
        self.assertEqual((outcome.state, outcome.bounce_type, outcome.reply),
                         ("bounced", "soft", "550 5.7.1 Sender IP listed"))

    async def test_data_accepted_after_a_refusal_gets_an_empty_message(self):
        """RFC 2920 3.1: a server may take DATA with no recipient; the RCPT reply counts."""
        server = ScriptedServer({b"RCPT": b"550 5.1.1 Unknown user"})
        self.servers = [MailHost("mx.example.net", "127.0.0.1", server.start())]
        self.addCleanup(server.stop)
        (outcome,) = await self.send(("b-1@bounces.example.org", "nobody@example.net"))
        self.assertEqual((outcome.state, outcome.reply), ("bounced", "550 5.1.1 Unknown user"))
        await self.pool.close_idle()
        (session,) = server.sessions
        self.assertEqual(session[session.index(b"DATA"):], [b"DATA", b".", b"QUIT"])


async def until(condition, timeout=5.0):
    """Let the reactor run until `condition()` holds (socket I/O is real in these tests)."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"still not true after {timeout} s")
        await task.deferLater(reactor, 0.01, lambda: None)


class IdleConnectionTests(unittest.TestCase):
    """delivery.connection_idle_seconds: a connection waits for more mail before QUIT."""

    def setUp(self):
        self.sink = SMTPSink()
        self.port = self.sink.start()
        self.servers = [MailHost("mx.example.net", "127.0.0.1", self.port)]
        self.addCleanup(self.sink.stop)
        self.clock = task.Clock()

    def pool(self, **options):
        pool = OutboundPool(reactor, self.clock, "gw.example.org", idle_seconds=2.0, **options)
        self.addCleanup(pool.close_idle)
        return pool

    def send(self, pool, recipient, servers=None):
        d = pool.deliver(recipient.rpartition("@")[2], servers or self.servers,
                         OutgoingMessage(1, "b-1@bounces.example.org", recipient, _text(DATA)))
        return d.addTimeout(5, reactor)

    async def test_next_message_reuses_the_idle_connection_until_the_idle_time_ends(self):
        pool = self.pool()
        self.assertEqual((await self.send(pool, "a@example.net")).state, "sent")
        await until(lambda: pool._idle)
        self.clock.advance(1.5)
        self.assertEqual((await self.send(pool, "b@example.net")).state, "sent")
        await until(lambda: pool._idle)
        self.assertEqual(self.sink.connections, 1)
        self.assertEqual(self.sink.commands, [b"EHLO"] + [b"MAIL", b"RCPT", b"DATA"] * 2)
        self.clock.advance(1.9)  # counted from the last message
        self.assertEqual(self.sink.open_sessions, 1)
        self.clock.advance(0.2)
        await pool.idle().addTimeout(5, reactor)
        self.assertEqual(self.sink.commands[-1], b"QUIT")

    async def test_idle_connection_counts_against_max_connections(self):
        """Another destination needing the only slot makes the idle connection quit early."""
        pool = self.pool(max_connections=1)
        await self.send(pool, "a@example.net")
        await until(lambda: pool._idle)
        other = [MailHost("mx.example.com", "127.0.0.1", self.port)]
        outcome = await self.send(pool, "b@example.com", servers=other)
        self.assertEqual(outcome.state, "sent")
        self.assertEqual(self.sink.commands[:9], [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT"]
                         + [b"EHLO", b"MAIL", b"RCPT", b"DATA"])

    async def test_idle_connection_counts_against_per_destination(self):
        pool = self.pool(per_destination=1)
        await self.send(pool, "a@example.net")
        await until(lambda: pool._idle)
        outcomes = await defer.gatherResults([self.send(pool, f"r{i}@example.net")
                                              for i in range(3)])
        self.assertEqual([o.state for o in outcomes], ["sent"] * 3)
        self.assertEqual(self.sink.connections, 1)

    async def test_close_idle_quits_idle_and_finishing_connections_at_once(self):
        pool = self.pool()
        await self.send(pool, "a@example.net")
        await until(lambda: pool._idle)
        await pool.close_idle().addTimeout(5, reactor)
        self.assertEqual(self.sink.commands[-1], b"QUIT")
        # Asked while a message is under way: its connection quits once it is answered.
        sending = self.send(pool, "b@example.net")
        closing = pool.close_idle().addTimeout(5, reactor)
        self.assertEqual((await sending).state, "sent")
        await closing
        self.assertEqual((self.sink.connections, self.sink.commands[-2:]), (2, [b"DATA",
                                                                                b"QUIT"]))

    async def test_message_on_a_connection_the_server_closed_goes_on_a_new_one(self):
        """No reply at all after idling: nothing was accepted, so no deferral either."""
        server = ScriptedServer({b"MAIL": lambda lines: None if sum(
            line.startswith(b"MAIL") for line in lines) > 1 else b"250 2.1.0 Ok"})
        self.servers = [MailHost("mx.example.net", "127.0.0.1", server.start())]
        self.addCleanup(server.stop)
        pool = self.pool()
        await self.send(pool, "a@example.net")
        await until(lambda: pool._idle)
        self.assertEqual((await self.send(pool, "b@example.net")).state, "sent")
        self.assertEqual(len(server.sessions), 2)


class STARTTLSFallbackTests(unittest.TestCase):
    """Opportunistic TLS: when STARTTLS fails, deliver in clear text rather than not at all;
    but never with credentials, nor under the "verify" policy."""

    EHLO = b"250-script.test\r\n250-STARTTLS\r\n250-AUTH PLAIN\r\n250 PIPELINING"

    def server(self, starttls_reply: bytes | None) -> ScriptedServer:
        """A server offering AUTH, and STARTTLS answered with `starttls_reply` (None: not
        offered)."""
        replies = {b"EHLO": self.EHLO, b"AUTH": b"235 2.7.0 Authentication successful"}
        if starttls_reply is None:
            replies[b"EHLO"] = self.EHLO.replace(b"250-STARTTLS\r\n", b"")
        else:
            replies[b"STARTTLS"] = starttls_reply
        server = ScriptedServer(replies)
        self.servers = [MailHost("mx.example.net", "127.0.0.1", server.start())]
        self.addCleanup(server.stop)
        return server

    async def send(self, pool, recipient="ok@example.net"):
        outcome = await pool.deliver("example.net", self.servers, OutgoingMessage(
            1, "b-1@bounces.example.org", recipient, _text(DATA))).addTimeout(5, reactor)
        await pool.close_idle()
        return outcome

    async def assert_falls_back(self, starttls_reply):
        server = self.server(starttls_reply)
        pool = OutboundPool(reactor, reactor, "gw.example.org")
        self.assertEqual((await self.send(pool)).state, "sent")
        first, second = server.sessions
        self.assertIn(b"STARTTLS", first)
        self.assertNotIn(b"STARTTLS", second)
        self.assertIn(b"DATA", second)
        # Remembered: the next connection to that server goes straight to clear text.
        self.assertEqual((await self.send(pool)).state, "sent")
        self.assertEqual(len(server.sessions), 3)
        self.assertNotIn(b"STARTTLS", server.sessions[2])

    async def test_broken_handshake(self):
        await self.assert_falls_back(b"220 2.0.0 Ready to start TLS")

    async def test_starttls_refused(self):
        await self.assert_falls_back(b"454 4.7.0 TLS not available due to local problem")

    async def test_verify_policy_defers_saying_tls_failed(self):
        server = self.server(b"220 2.0.0 Ready to start TLS")
        pool = OutboundPool(reactor, reactor, "gw.example.org", tls_policy="verify")
        outcome = await self.send(pool)
        self.assertEqual(outcome.state, "deferred")
        self.assertIn("mx.example.net: STARTTLS failed", outcome.reply)
        self.assertEqual(len(server.sessions), 1)
        outcome = await self.send(pool)  # not remembered: "verify" never goes without
        self.assertEqual(outcome.state, "deferred")
        self.assertEqual([b"STARTTLS" in session for session in server.sessions], [True] * 2)
        self.assertNotIn(b"DATA", b"".join(b"".join(session) for session in server.sessions))

    async def assert_credentials_kept_from_clear_text(self, server: ScriptedServer) -> str:
        """Two messages in turn are deferred, each after one connection with no AUTH;
        the last one's reply."""
        pool = OutboundPool(reactor, reactor, "gw.example.org",
                            authenticate=("gw", "relay-secret"))
        for _ in range(2):  # the second is not sent in clear text as a known TLS failure
            outcome = await self.send(pool)
            self.assertEqual(outcome.state, "deferred")
        self.assertEqual(len(server.sessions), 2)
        lines = [line.upper() for session in server.sessions for line in session]
        self.assertEqual([line for line in lines if line.startswith((b"AUTH", b"MAIL"))], [])
        return outcome.reply

    async def test_credentials_not_sent_after_a_refused_starttls(self):
        reply = await self.assert_credentials_kept_from_clear_text(
            self.server(b"454 4.7.0 TLS not available due to local problem"))
        self.assertEqual(reply, "mx.example.net: STARTTLS failed: 454 4.7.0 TLS not available "
                                "due to local problem")

    async def test_credentials_not_sent_after_a_broken_handshake(self):
        reply = await self.assert_credentials_kept_from_clear_text(
            self.server(b"220 2.0.0 Ready to start TLS"))
        self.assertIn("mx.example.net: STARTTLS failed", reply)

    async def test_credentials_not_sent_without_starttls(self):
        reply = await self.assert_credentials_kept_from_clear_text(self.server(None))
        self.assertEqual(reply, "mx.example.net: Server does not support secure communication "
                                "via TLS / SSL")


class TimeoutTests(unittest.TestCase):
    """Timeouts on a MemoryReactorClock: the test answers for the server, and time moves
    only when it says so."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.pool = OutboundPool(self.reactor, self.reactor, "gw.example.org",
                                 connect_timeout=7, reply_timeout=30)

    def deliver(self, servers) -> defer.Deferred:
        return self.pool.deliver("example.net", servers, OutgoingMessage(
            1, "b-1@bounces.example.org", "ok@example.net", _text(DATA)))

    def test_connect_timeout_reaches_the_connection_attempts(self):
        outcome = self.deliver([MailHost("mx4.example.net", "192.0.2.1", 25),
                                MailHost("mx6.example.net", "2001:db8::1", 25)])
        for attempt, address in enumerate(("192.0.2.1", "2001:db8::1")):
            host, _, factory, timeout, _ = self.reactor.tcpClients[attempt]
            self.assertEqual((host, timeout), (address, 7))
            # What the reactor does when the timeout passes.
            factory.clientConnectionFailed(self.reactor.connectors[attempt],
                                           Failure(error.TimeoutError()))
        outcome = self.successResultOf(outcome)
        self.assertEqual(outcome.state, "deferred")
        self.assertIn("cannot connect to mx6.example.net [2001:db8::1]:25", outcome.reply)

    def test_silence_after_the_message_defers_it_and_closes_the_connection(self):
        outcome = self.deliver([MailHost("mx.example.net", "192.0.2.1", 25)])
        host, port, factory, _, _ = self.reactor.tcpClients[0]
        client = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransportWithDisconnection()
        transport.protocol = client
        client.makeConnection(transport)
        for reply in (b"220 mx.example.net ESMTP", b"250 mx.example.net", b"250 2.1.0 Ok",
                      b"250 2.1.5 Ok", b"354 Go ahead"):
            client.dataReceived(reply + b"\r\n")
        self.assertTrue(transport.value().endswith(b"\r\nHello\r\n.\r\n"))
        self.reactor.advance(29)
        self.assertNoResult(outcome)
        self.reactor.advance(1)
        outcome = self.successResultOf(outcome)
        self.assertEqual((outcome.state, outcome.reply),
                         ("deferred", "Timeout waiting for SMTP server response"))
        self.assertFalse(transport.connected)
        self.assertEqual(self.pool.open_connections, 0)


class ClassifyTests(unittest.TestCase):
    def test_codes(self):
        self.assertEqual(classify(1, 250, b"2.0.0 OK").state, "sent")
        self.assertEqual(classify(1, 421, b"4.7.0 later").state, "deferred")
        bounced = classify(1, 554, b"5.7.1 rejected\n  by policy")
        self.assertEqual((bounced.state, bounced.bounce_type, bounced.reply),
                         ("bounced", "hard", "554 5.7.1 rejected by policy"))
        self.assertEqual(classify(1, -1, "connection lost").state, "deferred")

    def test_control_characters_blanked(self):
        """A server may put a NUL in its reply, which PostgreSQL refuses in text: the
        outcome could never be recorded."""
        self.assertEqual(classify(1, 250, b"2.0.0 Ok\x00queued\x1b[0m").reply,
                         "250 2.0.0 Ok queued [0m")


class WireFormatTests(unittest.TestCase):
    def test_line_ends_and_dots(self):
        self.assertEqual(wire_format(b".first\nsecond\r\n.third\n..x"),
                         b"..first\r\nsecond\r\n..third\r\n...x\r\n")
        # A rendered message: CRLF already, a bare CR kept as it is.
        self.assertEqual(wire_format(b"a\r\n.b\r\nc\rd\r\n"), b"a\r\n..b\r\nc\rd\r\n")
        self.assertEqual(wire_format(b"plain\r\n"), b"plain\r\n")

    async def test_dot_lines_arrive_intact(self):
        sink = SMTPSink()
        port = sink.start()
        self.addCleanup(sink.stop)
        pool = OutboundPool(reactor, reactor, "gw.example.org")
        self.addCleanup(pool.close_idle)
        data = b"Subject: dots\r\n\r\n.\r\n..two\r\nend"
        await pool.deliver("example.net", [MailHost("mx", "127.0.0.1", port)],
                           OutgoingMessage(1, "a@example.org", "b@example.net", _text(data)))
        self.assertEqual(sink.messages[0].data, b"Subject: dots\r\n\r\n.\r\n..two\r\nend")
