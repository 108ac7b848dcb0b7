"""R-3 against a running Gateway: many idle connections, clients that vanish."""

import dataclasses
import resource
import smtplib

from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mailgw import credentials
from tests.harness import (
    PASSWORD,
    SENDER,
    SIMPLE,
    USER,
    fresh_database,
    gateway_config,
    insecure_tls,
    run_sql,
    smtp_client,
    start_gateway,
)


class _Idle(protocol.Protocol):
    """A client that reads the banner and then says nothing."""

    def __init__(self):
        self.banner = defer.Deferred()
        self.lost = defer.Deferred()
        self.received = b""

    def dataReceived(self, data):
        self.received += data
        if b"\r\n" in self.received and not self.banner.called:
            self.banner.callback(self.received)

    def connectionLost(self, reason):
        self.lost.callback(self.received)


def _ehlo(port: int) -> int:
    client = smtplib.SMTP(timeout=10)
    client.connect("127.0.0.1", port)
    code = client.ehlo("c")[0]
    client.quit()
    return code


def _vanish_mid_data(port: int) -> None:
    client = smtp_client(port)
    client.ehlo("c")
    client.starttls(context=insecure_tls())
    client.ehlo("c")
    client.login(USER, PASSWORD)
    client.docmd(f"MAIL FROM:<{SENDER}>")
    client.docmd("RCPT TO:<half@example.net>")
    client.docmd("DATA")
    client.send(SIMPLE[:40])
    client.sock.close()  # no final dot, no QUIT


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _with_smtp(config, **changes):
    return config.replace(smtp=dataclasses.replace(config.smtp, **changes))


class ManyConnectionsTests(unittest.TestCase):
    async def test_thousand_idle_connections_then_timeout(self):
        clock = task.Clock()
        # All from loopback: caps above the 1000 and the one that follows.
        config = _with_smtp(gateway_config(self, fresh_database()), max_connections=1001,
                            max_connections_per_address=1001)
        gateway = await start_gateway(self, config, clock)
        port = gateway.port_for("smtp.starttls_listeners[0]")
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        before = _rss_kib()
        clients = []
        for _ in range(1000):
            client = _Idle()
            await endpoints.connectProtocol(endpoint, client)
            clients.append(client)
        await defer.gatherResults([c.banner for c in clients])
        self.assertEqual(len(gateway.smtp_factory.sessions), 1000)
        # Still serving new sessions.
        self.assertEqual(await deferToThread(_ehlo, port), 250)
        # Memory bounded: well under 100 KiB per idle session (client side included).
        self.assertLess(_rss_kib() - before, 100 * 1000)
        clock.advance(gateway.config.smtp.idle_timeout + 1)
        closing = await defer.gatherResults([c.lost for c in clients])
        self.assertTrue(all(b"421 4.4.2 Idle timeout" in data for data in closing))
        self.assertEqual(gateway.smtp_factory.sessions, set())


    async def test_connection_caps_from_the_config(self):
        config = _with_smtp(gateway_config(self, fresh_database()),
                            max_connections_per_address=1)
        gateway = await start_gateway(self, config)
        port = gateway.port_for("smtp.starttls_listeners[0]")
        first = _Idle()
        await endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), first)
        await first.banner
        with self.assertRaises(smtplib.SMTPConnectError) as refused:
            await deferToThread(smtplib.SMTP, "127.0.0.1", port, timeout=10)
        self.assertEqual(refused.exception.smtp_code, 421)
        first.transport.loseConnection()
        await first.lost


class VanishingClientTests(unittest.TestCase):
    async def test_client_gone_mid_data(self):
        gateway = await start_gateway(self, gateway_config(self, fresh_database()))
        account = await gateway.stores.accounts.create_account("acme")
        await gateway.stores.accounts.create_user(account.id, USER,
                                                  credentials.hash_password(PASSWORD))
        await gateway.stores.senders.add_sender(account.id, SENDER, verified=True)
        port = gateway.port_for("smtp.starttls_listeners[0]")
        await deferToThread(_vanish_mid_data, port)
        self.assertEqual(await deferToThread(_ehlo, port), 250)
        await gateway.stores.committer.idle()  # the RCPT's import, answered before DATA
        self.assertEqual(await run_sql(gateway.database, "SELECT count(*) FROM messages"), [(0,)])
        self.assertEqual(await run_sql(gateway.database, "SELECT email FROM contacts"),
                         [("half@example.net",)])
