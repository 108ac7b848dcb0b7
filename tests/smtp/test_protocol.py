"""The SMTP session on a StringTransport and task.Clock: no sockets, no database."""

from twisted.internet import address, task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailgw.smtp.protocol import SubmissionFactory


def _session(clock: task.Clock, idle_timeout: int = 300):
    factory = SubmissionFactory("mx.example.org", tls_options=None, clock=clock,
                                idle_timeout=idle_timeout)
    peer = address.IPv4Address("TCP", "192.0.2.1", 40000)
    protocol = factory.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    protocol.makeConnection(transport)
    return protocol, transport


class GreetingTests(unittest.TestCase):
    def test_banner(self):
        _, transport = _session(task.Clock())
        self.assertEqual(transport.value(), b"220 mx.example.org ESMTP mailgw\r\n")


class QuitTests(unittest.TestCase):
    def test_quit_closes(self):
        protocol, transport = _session(task.Clock())
        transport.clear()
        protocol.dataReceived(b"QUIT\r\n")
        self.assertTrue(transport.value().startswith(b"221 "))
        self.assertTrue(transport.disconnecting)


class IdleTimeoutTests(unittest.TestCase):
    def test_idle_session_is_closed_after_the_configured_time(self):
        clock = task.Clock()
        protocol, transport = _session(clock, idle_timeout=60)
        clock.advance(59)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"NOOP\r\n")  # activity restarts the count
        clock.advance(59)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)
