"""The running Gateway: listeners, /healthz, database outages, start-up errors."""

import http.client
import smtplib
import ssl

import psycopg2
import treq
from twisted.internet import defer, endpoints, reactor, task
from twisted.internet import ssl as twisted_ssl
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mailgw.config import (
    Config,
    DatabaseConfig,
    DeliveryConfig,
    HTTPConfig,
    SMTPConfig,
    TLSConfig,
    TrackingConfig,
)
from mailgw.content.links import LinkSigner
from mailgw.errors import StartupError
from mailgw.gateway import Gateway, http_listener, public_url_warnings, with_backlog
from mailgw.smtp.protocol import CLOSE_GRACE_SECONDS
from mailgw.store.contacts import RecipientImport
from tests.harness import (
    LOOPBACK_PORT,
    Client,
    fresh_database,
    gateway_config,
    log_lines,
    new_cluster,
    reactor_turns,
    start_gateway,
    until,
)

BANNER = "mx.test.example ESMTP mailgw"


def _client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _connect(port: int, smtp_class=smtplib.SMTP, **options) -> tuple[smtplib.SMTP, str]:
    """A connected smtplib client and the banner it read."""
    client = smtp_class(timeout=10, **options)
    client._host = "127.0.0.1"  # TLS's server_hostname; smtplib sets it only in __init__
    return client, client.connect("127.0.0.1", port)[1].decode()


def _plain_session(port: int) -> dict:
    """Banner, EHLO, STARTTLS, EHLO again and QUIT, as a real client does them."""
    client, banner = _connect(port)
    client.ehlo("client.example")
    before_tls = dict(client.esmtp_features)
    client.starttls(context=_client_tls())
    client.ehlo("client.example")
    after_tls = dict(client.esmtp_features)
    quit_code = client.quit()[0]
    return {"banner": banner, "before": before_tls, "after": after_tls, "quit": quit_code}


def _implicit_tls_session(port: int, context: ssl.SSLContext) -> tuple[str, int]:
    client, banner = _connect(port, smtplib.SMTP_SSL, context=context)
    return banner, client.quit()[0]


async def _get(url: str):
    response = await treq.get(url, persistent=False)
    return response.code, await response.json()


class ListenerTests(unittest.TestCase):
    async def setUp(self):
        self.dsn = fresh_database()
        self.gateway = await start_gateway(self, gateway_config(self, self.dsn))

    async def test_starttls_listeners_greet_and_quit(self):
        for key in ("smtp.starttls_listeners[0]", "smtp.starttls_listeners[1]"):
            session = await deferToThread(_plain_session, self.gateway.port_for(key))
            self.assertEqual(session["banner"], BANNER)
            self.assertIn("starttls", session["before"])
            self.assertNotIn("starttls", session["after"])
            self.assertEqual(session["quit"], 221)

    async def test_implicit_tls_listener_greets_and_quits(self):
        port = self.gateway.port_for("smtp.implicit_tls_listeners[0]")
        banner, quit_code = await deferToThread(_implicit_tls_session, port, _client_tls())
        self.assertEqual(banner, BANNER)
        self.assertEqual(quit_code, 221)

    async def test_listen_backlog(self):
        """Twisted's 50 would drop connections that come in a burst."""
        self.assertEqual({listener.port.backlog for listener in self.gateway.listeners},
                         {1024})

    async def test_healthz_reports_the_database(self):
        port = self.gateway.port_for("http.listener")
        code, body = await _get(f"http://127.0.0.1:{port}/healthz")
        self.assertEqual(code, 200)
        self.assertEqual(body, {"status": "ok", "database": "ok"})

    async def test_links_are_signed_with_delivery_off(self):
        """Every node has the link signer, with the installation's key: a node that only
        serves the tracking endpoints verifies the links another node sent."""
        secret = await self.gateway.stores.keys.signing_key("links")
        sent = LinkSigner(secret, "http://other-node.example").unsubscribe_url(5)
        self.assertIsNone(self.gateway.runner)
        self.assertEqual(self.gateway.link_signer.verify("u", sent.rpartition("/")[2]),
                         (5, None))

    async def test_stop_closes_the_listeners(self):
        port = self.gateway.port_for("smtp.starttls_listeners[0]")
        await self.gateway.stopService()
        with self.assertRaises(OSError):
            await deferToThread(smtplib.SMTP, "127.0.0.1", port, timeout=5)


    async def test_stop_commits_the_imports_already_answered_for(self):
        account = await self.gateway.stores.accounts.create_account("acme")
        importing = defer.ensureDeferred(self.gateway.stores.contacts.import_recipient(
            RecipientImport(account.id, "SMTP group", "smtp", "ana@example.net",
                            "example.org", None)))
        await self.gateway.stopService()
        self.assertTrue(importing.called)
        connection = psycopg2.connect(self.dsn)
        self.addCleanup(connection.close)
        with connection.cursor() as cursor:
            cursor.execute("SELECT email FROM contacts")
            self.assertEqual(cursor.fetchall(), [("ana@example.net",)])


class BacklogTests(unittest.TestCase):
    def test_added_to_endpoints_that_take_one(self):
        self.assertEqual(with_backlog("tcp:2500", 700), "tcp:2500:backlog=700")
        self.assertEqual(with_backlog("tcp6:587:interface=\\:\\:1", 700),
                         "tcp6:587:interface=\\:\\:1:backlog=700")

    def test_endpoint_string_wins(self):
        self.assertEqual(with_backlog("tcp:2500:backlog=10", 700), "tcp:2500:backlog=10")

    def test_endpoints_that_take_none(self):
        self.assertEqual(with_backlog("systemd:domain=INET:index=0", 700),
                         "systemd:domain=INET:index=0")


def _https_get(port: int, path: str) -> tuple[int, bytes]:
    """GET over TLS; the status and the certificate the server showed (DER)."""
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10,
                                             context=_client_tls())
    try:
        connection.request("GET", path)
        status = connection.getresponse().status
        return status, connection.sock.getpeercert(binary_form=True)
    finally:
        connection.close()


class HTTPSTests(unittest.TestCase):
    """Issue 16, point 5: tracking links must work for real recipients, https included."""

    async def test_ssl_listener_serves_the_configured_certificate(self):
        config = gateway_config(self, fresh_database(), http=HTTPConfig(
            listener="ssl:0:interface=127.0.0.1"))
        gateway = await start_gateway(self, config)
        status, certificate = await deferToThread(
            _https_get, gateway.port_for("http.listener"), "/healthz")
        self.assertEqual(status, 200)
        self.assertEqual(ssl.DER_cert_to_PEM_cert(certificate).strip(),
                         config.certificate_path.read_text().strip())

    def test_listener_strings(self):
        self.assertEqual(http_listener("ssl:8443"), ("tcp:8443", True))
        self.assertEqual(http_listener("SSL:443:interface=192.0.2.1"),
                         ("tcp:443:interface=192.0.2.1", True))
        own = "ssl:443:privateKey=/etc/k.pem:certKey=/etc/c.pem"
        self.assertEqual(http_listener(own), (own, False))
        self.assertEqual(http_listener("tcp:8080"), ("tcp:8080", False))


class PublicURLWarningTests(unittest.TestCase):
    def warnings(self, url: str, delivering: bool = True) -> list[str]:
        return public_url_warnings(Config(http=HTTPConfig(public_base_url=url),
                                          delivery=DeliveryConfig(enabled=delivering)))

    def test_loopback_or_plain_http_while_delivering(self):
        """RFC 8058 one-click needs https; mail clients will not call localhost."""
        (local, plain) = self.warnings("http://localhost:8080")
        self.assertIn("names this machine (localhost)", local)
        self.assertIn("is not https: one-click unsubscribe (RFC 8058)", plain)
        for url in ("https://127.0.0.1", "https://[::1]:8443/", "https://mail.localhost"):
            (warning,) = self.warnings(url)
            self.assertIn("names this machine", warning)
        (warning,) = self.warnings("http://links.example.com")
        self.assertIn("is not https", warning)
        self.assertEqual(self.warnings("https://links.example.com/mailgw"), [])
        self.assertEqual(self.warnings("http://localhost:8080", delivering=False), [])

    async def test_logged_at_start(self):
        lines = log_lines(self)
        await start_gateway(self, gateway_config(
            self, fresh_database(), delivery=DeliveryConfig(dns_servers=["127.0.0.1:53"])))
        self.assertEqual(len([line for line in lines
                              if line.startswith("http.public_base_url http://localhost:8080")]),
                         2)


class _Stopping:
    """Stands in for the SMTP factory or the queue runner: notes when its stop began,
    finishes when the test says."""

    def __init__(self, began):
        self.began = began
        self.done = defer.Deferred()

    async def shutdown(self, grace_seconds):
        self.began.append("smtp")
        await self.done

    async def stop(self):
        self.began.append("runner")
        await self.done


class StopTests(unittest.TestCase):
    def test_sessions_and_deliveries_stop_side_by_side(self):
        """Their waits (the SMTP grace, the runner's bounded stop) overlap instead of
        adding up, so that a stop stays within systemd's 90 s."""
        gateway = Gateway(gateway_config(self, "dbname=unused"), reactor)
        began = []
        gateway.smtp_factory, gateway.runner = _Stopping(began), _Stopping(began)
        smtp, runner = gateway.smtp_factory, gateway.runner
        stopping = defer.ensureDeferred(gateway._stop())
        self.assertEqual(began, ["smtp", "runner"])  # the runner did not wait for SMTP
        smtp.done.callback(None)
        self.assertFalse(stopping.called)
        runner.done.callback(None)
        self.successResultOf(stopping)


class GracefulStopTests(unittest.TestCase):
    async def test_lingering_tls_session_does_not_hold_up_the_stop(self):
        """A TLS client that reads nothing more never answers the 421's close_notify: it
        is cut after CLOSE_GRACE_SECONDS instead of holding the stop for the whole grace
        meant for sessions in the middle of a command."""
        clock = task.Clock()
        gateway = await start_gateway(self, gateway_config(self, fresh_database()), clock)
        trust = twisted_ssl.Certificate.loadPEM(gateway.config.certificate_path.read_bytes())
        endpoint = endpoints.wrapClientTLS(
            twisted_ssl.optionsForClientTLS("localhost", trustRoot=trust),
            endpoints.TCP4ClientEndpoint(
                reactor, "127.0.0.1", gateway.port_for("smtp.implicit_tls_listeners[0]")))
        client = Client()
        await endpoints.connectProtocol(endpoint, client)
        self.addCleanup(client.close)
        await until(lambda: b"\r\n" in client.received, "the banner")
        client.transport.pauseProducing()
        stopped = []
        gateway.stopService().addCallback(stopped.append)
        await reactor_turns()
        clock.advance(CLOSE_GRACE_SECONDS)
        await until(lambda: stopped, "the stop to finish")


class DatabaseOutageTests(unittest.TestCase):
    """R-2 and Foundation point 6: PostgreSQL restarts under a running Gateway."""

    async def test_healthz_503_while_down_and_pool_recovers(self):
        cluster = new_cluster("mailgw-test-outage-")
        gateway = await start_gateway(self, gateway_config(self, cluster.dsn))
        url = f"http://127.0.0.1:{gateway.port_for('http.listener')}/healthz"
        self.assertEqual((await _get(url))[0], 200)

        cluster.stop()
        code, body = await _get(url)
        self.assertEqual(code, 503)
        self.assertEqual(body["database"], "unreachable")
        # O-5: the scrape still answers, in time, without the queue's figures.
        response = await treq.get(url.replace("/healthz", "/metrics"), persistent=False)
        exposition = (await response.content()).decode()
        self.assertEqual(response.code, 200)
        self.assertIn("mailgw_database_available 0.0\n", exposition)
        self.assertIn("mailgw_database_outages_total 1.0\n", exposition)
        self.assertNotIn("mailgw_queue_deliveries", exposition)

        cluster.start()
        for _ in range(100):  # reconnection backs off to 2 s at most
            if (await _get(url))[0] == 200:
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        # Once one connection is back, every request gets it (the others may still be
        # reconnecting).
        for _ in range(5):
            self.assertEqual((await _get(url))[0], 200)
        accounts = await gateway.stores.accounts.list_accounts()
        self.assertEqual(accounts, [])


class StartupErrorTests(unittest.TestCase):
    async def assertStartupError(self, config, *words):
        with self.assertRaises(StartupError) as caught:
            await start_gateway(self, config)
        message = str(caught.exception)
        self.assertEqual(len(message.splitlines()), 1)
        for word in words:
            self.assertIn(word, message)

    async def test_port_in_use(self):
        taken = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        port = taken.getHost().port
        config = gateway_config(self, fresh_database(), smtp=SMTPConfig(
            starttls_listeners=[f"tcp:{port}:interface=127.0.0.1"],
            implicit_tls_listeners=[LOOPBACK_PORT]))
        await self.assertStartupError(config, "smtp.starttls_listeners[0]", "cannot listen",
                                      "in use")

    async def test_bad_endpoint(self):
        config = gateway_config(self, fresh_database(), http=HTTPConfig(listener="bogus:80"))
        await self.assertStartupError(config, "http.listener", "bogus:80")

    async def test_unreachable_dsn(self):
        config = gateway_config(self, "host=/nonexistent dbname=mailgw user=mailgw")
        await self.assertStartupError(config, "cannot connect to the database")

    async def test_unreadable_dsn(self):
        config = gateway_config(self, "host=db.example port")
        await self.assertStartupError(config, "cannot connect to the database")

    async def test_state_dir_cannot_be_created(self):
        blocker = self.mktemp()
        with open(blocker, "w"):
            pass
        config = gateway_config(self, fresh_database()).replace(state_dir=f"{blocker}/state")
        await self.assertStartupError(config, "state_dir", "cannot be created")

    async def test_missing_certificate(self):
        config = gateway_config(self, fresh_database(), tls=TLSConfig(
            certificate="/nonexistent/cert.pem", private_key="/nonexistent/key.pem"))
        await self.assertStartupError(config, "/nonexistent/cert.pem")

    async def test_unknown_trusted_account(self):
        config = gateway_config(self, fresh_database(), smtp=SMTPConfig(
            starttls_listeners=[LOOPBACK_PORT], implicit_tls_listeners=[],
            trusted_networks=["10.0.0.0/8"], trusted_account="relay"))
        await self.assertStartupError(config, "smtp.trusted_account", "relay")

    async def test_geoip_database_missing_or_corrupt(self):
        """Point 10 of issue 14: a clear start-up error, not a crash at the first hit."""
        corrupt = self.mktemp()
        with open(corrupt, "wb") as f:
            f.write(b"not a MaxMind database" * 100)
        for path, words in (("/nonexistent/GeoLite2-City.mmdb", "cannot open"),
                            (corrupt, "not a MaxMind database")):
            config = gateway_config(self, fresh_database(),
                                    tracking=TrackingConfig(geoip_database=path))
            await self.assertStartupError(config, "tracking.geoip_database", path, words)

    async def test_failed_start_leaves_no_port_open(self):
        config = gateway_config(self, fresh_database(), http=HTTPConfig(listener="bogus:80"))
        gateway_ports = []
        with self.assertRaises(StartupError):
            gateway = await start_gateway(self, config)
            gateway_ports.append(gateway)
        self.assertEqual(gateway_ports, [])

    def test_database_config_default_is_embedded(self):
        self.assertEqual(DatabaseConfig().dsn, "")
