"""The container: the one place where config, pool, stores and services are wired.

`Gateway` is the MultiService that `twistd mailgw` runs.  Its start-up is a
sequence that has to wait (embedded PostgreSQL ready, pool connected,
migrations applied) before the listeners open, so it runs as one coroutine;
`ready` fires when everything listens, or fails with a `StartupError` whose
message is the one line the operator sees; `failed` fires if mailgw cannot go
on after that (the embedded PostgreSQL could not be restarted).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from twisted.application import service
from twisted.cred.portal import Portal
from twisted.internet import defer, endpoints, threads
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from mailgw.accounts.avatar import SubmissionRealm
from mailgw.accounts.checkers import AccountCredentialsChecker, APIKeyChecker
from mailgw.config import Config
from mailgw.content.links import LinkSigner
from mailgw.credentials import Sealer
from mailgw.delivery.client import OutboundPool
from mailgw.delivery.key_threads import KeyThreads
from mailgw.delivery.mx import MXResolver, Smarthost
from mailgw.delivery.runner import QueueRunner, node_name
from mailgw.embedded_pg import (
    Cluster,
    EmbeddedPostgresService,
    RestartPolicy,
    RunAs,
    cluster_root,
)
from mailgw.errors import NotFound, StartupError
from mailgw.events.agents import AgentParser
from mailgw.events.client import networks
from mailgw.events.geo import GeoLocator
from mailgw.events.machine import MachineRules
from mailgw.events.recorder import TrackingRecorder
from mailgw.events.webhooks.dispatcher import WebhookDispatcher
from mailgw.events.webhooks.payloads import payload_for
from mailgw.events.webhooks.poster import WebhookPoster
from mailgw.fetch import ContentFetcher
from mailgw.http.aldeamo import AldeamoApp
from mailgw.http.api import RateLimiter, error_body
from mailgw.http.auth import KeyAuthenticator
from mailgw.http.dmds import DMDSApp, dmds_error_body
from mailgw.http.dmds_input import SenderDomains
from mailgw.http.manage import ManagementApp
from mailgw.http.openapi import OpenAPIApp
from mailgw.http.ops import OperationsApp
from mailgw.http.root import HTTPRoot, ListenerSite
from mailgw.http.stats import StatsApp
from mailgw.http.tracking import TrackingApp
from mailgw.inbound.listener import InboundFactory
from mailgw.inbound.processor import FeedbackProcessor, ReturnPathDomains
from mailgw.inbound.reports import read_report
from mailgw.metrics import Metrics, QueueDepthProbe
from mailgw.smtp.auth import AuthThrottle
from mailgw.smtp.protocol import SubmissionFactory
from mailgw.store import Stores
from mailgw.store.database import Database
from mailgw.store.migrations import available_migrations, migrate_txn
from mailgw.submit.service import SubmissionService
from mailgw.tlscert import ensure_self_signed, server_tls_options

# How long a stop waits for SMTP sessions in the middle of a command.
SHUTDOWN_GRACE_SECONDS = 30
# Endpoint types whose string takes a listen queue length (`backlog=`).
_BACKLOG_ENDPOINTS = ("tcp", "tcp6", "ssl", "unix")
# After the sessions and deliveries, writes already answered for (RCPT imports) get this
# long to commit: with the SMTP grace, the queue runner's bounded stop running side by
# side, and the embedded PostgreSQL's shutdown, a stop stays within systemd's 90 s.
COMMIT_GRACE_SECONDS = 15
# The DMDS API's mount point: every /v1/ path the longer prefixes do not take (H-2).
DMDS_MOUNT = ("v1",)
# How long a DMDS sender's domain is looked up in DNS before it is taken as existing.
SENDER_LOOKUP_SECONDS = 5.0


@dataclass(frozen=True)
class Listener:
    """An open listening port and the config key that asked for it."""

    key: str
    description: str
    port: object  # IListeningPort

    @property
    def port_number(self) -> int:
        return self.port.getHost().port


def with_backlog(description: str, backlog: int) -> str:
    """The endpoint string with `backlog=` added, unless it names one already or its
    type takes none (systemd: the socket comes listening)."""
    kind, _, params = description.partition(":")
    if kind.lower() not in _BACKLOG_ENDPOINTS or "backlog=" in params:
        return description
    return f"{description}:backlog={backlog}"


def http_listener(description: str) -> tuple[str, bool]:
    """The endpoint string the HTTP listener listens on, and whether mailgw speaks TLS on
    it: an `ssl:` listener that names no certificate of its own (privateKey=) gets the
    [tls] one and the TLS options of the SMTP listeners, so that tracking links can be
    https without a proxy in front."""
    kind, _, params = description.partition(":")
    if kind.lower() == "ssl" and "privatekey=" not in params.lower():
        return f"tcp:{params}", True
    return description, False


def public_url_warnings(config: Config) -> list[str]:
    """What makes the links in delivered mail fail for real recipients: a loopback host
    (mail clients will not call it) or plain http (RFC 8058 one-click unsubscribe needs
    https). Only when this node delivers: a node that only accepts mail links nothing."""
    if not config.delivery.enabled:
        return []
    url = config.http.public_base_url
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    warnings = []
    if host == "localhost" or host.endswith(".localhost") or _is_loopback_address(host):
        warnings.append(
            f"http.public_base_url {url} names this machine ({host}): recipients' mail "
            "clients cannot reach it, so tracking links, the open pixel, the web version "
            "and List-Unsubscribe in delivered mail will not work; set it to the public "
            "name of the HTTP listener")
    if parts.scheme == "http":
        warnings.append(
            f"http.public_base_url {url} is not https: one-click unsubscribe (RFC 8058) "
            "needs an https URL, and mail clients warn about plain http links; serve "
            "https (http.listener = \"ssl:443\" uses the [tls] certificate, or put a TLS "
            "proxy in front) and set an https:// URL")
    return warnings


def _is_loopback_address(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def embedded_cluster(config: Config) -> Cluster:
    run_as = RunAs.for_cluster(config.database.embedded_user)
    return Cluster(cluster_root(config.state_path, run_as), run_as)


async def open_database(config: Config, reactor, metrics: Metrics | None = None) -> Database:
    """Connect the pool and bring the schema up to date."""
    database = Database(config.database.dsn or embedded_cluster(config).dsn,
                        config.database.pool_size, reactor, metrics)
    await database.start()
    try:
        await database.run_interaction("migrate", migrate_txn, available_migrations())
    except BaseException:
        database.close()
        raise
    return database


class Gateway(service.MultiService):
    log = Logger()

    def __init__(self, config: Config, reactor, clock=None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.clock = clock or reactor
        # What every component counts, served at /metrics (O-5).
        self.metrics = Metrics()
        self.embedded: EmbeddedPostgresService | None = None
        self.database: Database | None = None
        self.stores: Stores | None = None
        self.link_signer: LinkSigner | None = None
        # Seals the DMDS campaign keys, which must be shown again (H-2).
        self.campaign_sealer: Sealer | None = None
        # Shared by the doors: who an SMTP login or an HTTP API key is, and the one
        # submission path they both hand messages to.
        self.realm: SubmissionRealm | None = None
        self.portal: Portal | None = None
        self.key_authenticator: KeyAuthenticator | None = None
        self.submission_service: SubmissionService | None = None
        self.geo: GeoLocator | None = None
        # Records opens, clicks and unsubscribes; its `lost` counts events lost to
        # database trouble (T-1, T-2).
        self.tracking_recorder: TrackingRecorder | None = None
        # Content and attachments from URLs, for the API dialects.
        self.fetcher: ContentFetcher | None = None
        self.http_root: HTTPRoot | None = None
        self.listeners: list[Listener] = []
        self.smtp_factory: SubmissionFactory | None = None
        # The listener for bounces and complaints (D-7), when [inbound] listeners asks.
        self.inbound_factory: InboundFactory | None = None
        self.runner: QueueRunner | None = None
        self.key_threads: KeyThreads | None = None
        # Posts the accounts' events to their webhook endpoints (W-2).
        self.webhooks: WebhookDispatcher | None = None
        self.ready: defer.Deferred[Gateway] = defer.Deferred()
        # Fires if mailgw must stop after start-up: twistd then exits 1 (tap.py).
        self.failed: defer.Deferred[None] = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        d = defer.ensureDeferred(self._start())
        d.addCallbacks(lambda _: self.ready.callback(self), self._start_failed)

    def _start_failed(self, failure: Failure) -> None:
        # Leave nothing half-open behind (ports, pool, a child postgres).
        d = defer.ensureDeferred(self._stop())
        d.addBoth(lambda _: self.ready.errback(failure))

    async def _start(self) -> None:
        self._prepare_state_dir()
        tls_options = self._tls_options()
        # Before anything starts: a bad GeoIP file is a one-line start-up error.
        self.geo = GeoLocator.open(self.config.tracking.geoip_database)
        if not self.config.database.dsn:
            self.embedded = EmbeddedPostgresService(
                embedded_cluster(self.config), self.reactor, self._embedded_gave_up,
                clock=self.clock, restart_policy=RestartPolicy(
                    give_up_seconds=self.config.database.embedded_restart_seconds))
            await self.embedded.start()
        self.database = await open_database(self.config, self.reactor, self.metrics)
        self.stores = Stores.on(self.database)
        await self._check_trusted_account()
        # On every node, delivering or not: the tracking endpoints verify what it signs.
        self.link_signer = LinkSigner(await self.stores.keys.signing_key("links"),
                                      self.config.http.public_base_url)
        self.campaign_sealer = Sealer(await self.stores.keys.signing_key("campaign_keys"))
        self.realm = SubmissionRealm(self.stores.accounts)
        self.portal = Portal(self.realm, [
            AccountCredentialsChecker(self.stores.accounts, self._run_in_thread),
            APIKeyChecker(self.stores.accounts)])
        http = self.config.http
        self.key_authenticator = KeyAuthenticator(self.portal, RateLimiter(
            self.clock, http.requests_per_second_per_key, http.request_burst_per_key),
            self.clock, http.key_cache_seconds)
        self.submission_service = SubmissionService(
            self.stores, self.config.http.public_base_url, self.clock, self._run_in_thread)
        self.fetcher = ContentFetcher(self.reactor, self._dns_servers(),
                                      http.fetch_allow_networks, http.fetch_timeout,
                                      http.fetch_max_bytes)

        smtp_factory = self.smtp_factory = self._smtp_factory(tls_options)
        tls_factory = TLSMemoryBIOFactory(tls_options, False, smtp_factory)
        self.http_root = self._http_root()
        site = ListenerSite(self.http_root, self.metrics, max_body_size=http.max_body_size,
                            request_timeout=http.request_timeout,
                            idle_timeout=http.idle_timeout, reactor=self.clock,
                            error_body=self._error_body)
        smtp_backlog = self.config.smtp.listen_backlog
        http_description, http_tls = http_listener(self.config.http.listener)
        wanted = (
            [(f"smtp.starttls_listeners[{i}]", d, smtp_backlog, smtp_factory)
             for i, d in enumerate(self.config.smtp.starttls_listeners)]
            + [(f"smtp.implicit_tls_listeners[{i}]", d, smtp_backlog, tls_factory)
               for i, d in enumerate(self.config.smtp.implicit_tls_listeners)]
            + [("http.listener", http_description, self.config.http.listen_backlog,
                TLSMemoryBIOFactory(tls_options, False, site) if http_tls else site)])
        if self.config.inbound.listeners:
            self.inbound_factory = self._inbound_factory(tls_options)
            wanted += [(f"inbound.listeners[{i}]", d, smtp_backlog, self.inbound_factory)
                       for i, d in enumerate(self.config.inbound.listeners)]
        for key, description, backlog, factory in wanted:
            await self._listen(key, with_backlog(description, backlog), factory)
        if self.config.delivery.enabled:
            self.key_threads = KeyThreads(self.reactor)
            self.key_threads.start()
            self.runner = self._queue_runner()
            self.runner.start()
        if self.config.webhooks.enabled:
            self.webhooks = self._webhook_dispatcher()
            self.webhooks.start()
        for problem in public_url_warnings(self.config):  # ("warning" is a Python warning's key)
            self.log.warn("{problem}", problem=problem)
        self.log.info("mailgw ready: {listeners}", listeners=", ".join(
            f"{listener.key}={listener.port_number}" for listener in self.listeners))

    def _http_root(self) -> HTTPRoot:
        """Every app of the HTTP listener at its mount point (docs/architecture.md)."""
        tracking = self._tracking_app().resource()
        operations = OperationsApp(
            self.database, self.metrics,
            QueueDepthProbe(self.stores.queue_admin.depth, self.clock),
            self.config.http.metrics_networks)
        aldeamo = AldeamoApp(self.key_authenticator, self.submission_service, self.fetcher,
                             self.config.smtp.max_recipients,
                             self.config.smtp.max_message_size)
        management = ManagementApp(self.key_authenticator, self.stores, self.config,
                                   self._run_in_thread)
        return HTTPRoot({("a",): tracking, ("v1", "email"): aldeamo.app.resource(),
                         ("v1", "admin"): management.app.resource(),
                         ("v1", "openapi.json"): OpenAPIApp().app.resource(),
                         ("t",): tracking,
                         ("v1", "stats"): StatsApp(self.key_authenticator,
                                                   self.stores.statistics,
                                                   self.clock).app.resource(),
                         DMDS_MOUNT: self._dmds_app().app.resource()},
                        operations.app.resource())

    def _dmds_app(self) -> DMDSApp:
        """H-2: its sender domains looked up with the resolver of delivery.dns_servers."""
        domains = SenderDomains(lambda: MXResolver(self.reactor, self.clock,
                                                   self._dns_servers(),
                                                   timeout=SENDER_LOOKUP_SECONDS))
        return DMDSApp(self.key_authenticator, self.submission_service, self.stores,
                       self.fetcher, self.campaign_sealer, domains,
                       batch_size=self.config.smtp.max_recipients,
                       max_contacts=self.config.http.dmds_max_recipients,
                       max_message_size=self.config.smtp.max_message_size)

    def _error_body(self, path: bytes, name: str, message: str) -> dict:
        """The body of a request refused before any app sees it (413, 408), in the
        dialect of the app its path goes to."""
        if self.http_root.route_of(path) == "/" + "/".join(DMDS_MOUNT):
            return dmds_error_body(name, message)
        return error_body(name, message)

    def _dns_servers(self) -> list[tuple[str, int]]:
        """delivery.dns_servers as (address, port); empty: /etc/resolv.conf."""
        return [(host.strip("[]"), int(port)) for host, _, port in
                (server.rpartition(":") for server in self.config.delivery.dns_servers)]

    def _tracking_app(self) -> TrackingApp:
        """The tracking endpoints (T-) and the recorder of their events."""
        tracking = self.config.tracking
        self.tracking_recorder = TrackingRecorder(
            self.database, self.stores.tracking, self.stores.events, AgentParser(), self.geo,
            MachineRules(tracking.scanner_seconds, tracking.machine_networks,
                         tracking.machine_agents),
            networks(tracking.trusted_proxies), self.clock, self.metrics)
        return TrackingApp(self.stores.submissions, self.link_signer, self.tracking_recorder,
                           self.stores.tracking, self.stores.queue, self.clock,
                           tracking.commit_wait_seconds, self.config.hostname,
                           self.config.bounce_domain)

    def _embedded_gave_up(self) -> None:
        if self.running:  # a stop under way ends mailgw anyway (and stops the reactor)
            self.failed.callback(None)

    def _queue_runner(self) -> QueueRunner:
        delivery = self.config.delivery
        authenticate = None
        if delivery.smarthost:
            host, _, port = delivery.smarthost.rpartition(":")
            resolver = Smarthost(host, int(port))
            if delivery.smarthost_username:
                authenticate = (delivery.smarthost_username, delivery.smarthost_password)
        else:
            resolver = MXResolver(self.reactor, self.clock, self._dns_servers(),
                                  port=delivery.remote_smtp_port)
        pool = OutboundPool(self.reactor, self.clock, self.config.hostname,
                            tls_policy=delivery.tls_policy,
                            connect_timeout=delivery.connect_timeout,
                            reply_timeout=delivery.reply_timeout,
                            idle_seconds=delivery.connection_idle_seconds,
                            per_destination=delivery.per_domain_connections,
                            max_connections=delivery.max_connections, authenticate=authenticate,
                            per_domain_rate=delivery.per_domain_rate)
        self.metrics.outbound_connections_open.set_function(lambda: pool.open_connections)
        return QueueRunner(self.stores.queue, resolver, pool, self.link_signer, self.clock,
                           delivery, self.config.hostname, self.config.bounce_domain,
                           node_name(self.config.hostname), self.key_threads.run,
                           metrics=self.metrics)

    def _webhook_dispatcher(self) -> WebhookDispatcher:
        webhooks = self.config.webhooks
        poster = WebhookPoster(self.reactor, self.clock, webhooks.timeout_seconds,
                               webhooks.connections_per_endpoint, webhooks.allow_http_hosts)
        dispatcher = WebhookDispatcher(self.stores.webhook_queue, poster, payload_for,
                                       self.clock, webhooks, self.metrics)
        self.metrics.webhook_posts_in_flight.set_function(lambda: dispatcher.in_flight)
        return dispatcher

    async def _check_trusted_account(self) -> None:
        name = self.config.smtp.trusted_account
        if self.config.smtp.trusted_networks:
            try:
                await self.stores.accounts.get_account(name)
            except NotFound:
                raise StartupError(f"smtp.trusted_account: no account named {name!r}") from None

    def _smtp_factory(self, tls_options) -> SubmissionFactory:
        smtp = self.config.smtp
        realm = self.realm
        return SubmissionFactory(
            self.config.hostname, tls_options, self.clock, smtp.idle_timeout,
            portal=self.portal, service=self.submission_service,
            throttle=AuthThrottle(self.clock, shared=self.stores.auth_failures),
            max_message_size=smtp.max_message_size,
            max_recipients=smtp.max_recipients, allow_plaintext_auth=smtp.allow_plaintext_auth,
            trusted_networks=tuple(smtp.trusted_networks),
            trusted_account=lambda username: realm.account_named(smtp.trusted_account,
                                                                 username),
            tls_handshake_timeout=smtp.tls_handshake_timeout,
            max_connections=smtp.max_connections,
            max_connections_per_address=smtp.max_connections_per_address,
            data_timeout=smtp.data_timeout,
            max_commands_without_message=smtp.max_commands_without_message,
            metrics=self.metrics)

    def _inbound_factory(self, tls_options) -> InboundFactory:
        """D-7: DSNs, complaints and List-Unsubscribe mail, on the return-path domains."""
        processor = FeedbackProcessor(
            self.stores.inbound, self.stores.tracking, self.link_signer,
            ReturnPathDomains(self.stores.inbound.return_path_domains,
                              self.config.bounce_domain, self.clock),
            lambda raw: self._run_in_thread(read_report, raw), self.clock,
            self.config.delivery.hard_bounce_limit, self.metrics)
        return InboundFactory(self.config.hostname, tls_options, self.clock,
                              self.config.inbound, processor, self.metrics)

    def _run_in_thread(self, fn, *args):
        """CPU-heavy work (password hashing, text from big HTML) off the reactor thread."""
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)

    def _prepare_state_dir(self) -> None:
        state = self.config.state_path
        try:
            state.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StartupError(f"state_dir {state} cannot be created: {e.strerror}") from None
        if not os.access(state, os.W_OK | os.X_OK):
            raise StartupError(f"state_dir {state} is not writable")

    def _tls_options(self):
        cert, key = self.config.certificate_path, self.config.private_key_path
        if not self.config.tls.certificate and ensure_self_signed(cert, key,
                                                                  self.config.hostname):
            self.log.info("created a self-signed TLS certificate in {path}", path=cert)
        return server_tls_options(cert, key)

    async def _listen(self, key: str, description: str, factory) -> None:
        try:
            endpoint = endpoints.serverFromString(self.reactor, description)
        except (ValueError, TypeError, KeyError) as e:
            raise StartupError(f"{key}: not a valid endpoint {description!r} ({e})") from None
        try:
            port = await endpoint.listen(factory)
        except CannotListenError as e:
            raise StartupError(f"{key}: cannot listen on {description!r} "
                               f"({e.socketError})") from None
        self.listeners.append(Listener(key, description, port))

    def port_for(self, key: str) -> int:
        """The port number a listener got (tests listen on port 0)."""
        return next(listener.port_number for listener in self.listeners if listener.key == key)

    async def _stop(self) -> None:
        listeners, self.listeners = self.listeners, []
        await defer.gatherResults([defer.maybeDeferred(listener.port.stopListening)
                                   for listener in listeners])
        # Side by side: sessions finishing and deliveries finishing wait for different
        # things, so the slower of the two bounds the stop, not their sum.
        stopping = [defer.ensureDeferred(factory.shutdown(SHUTDOWN_GRACE_SECONDS))
                    for factory in (self.smtp_factory, self.inbound_factory)
                    if factory is not None]
        stopping += [defer.ensureDeferred(worker.stop())
                     for worker in (self.runner, self.webhooks) if worker is not None]
        await defer.gatherResults(stopping, consumeErrors=True)
        self.smtp_factory = self.inbound_factory = self.runner = self.webhooks = None
        if self.key_threads is not None:
            self.key_threads.stop()
            self.key_threads = None
        if self.stores is not None:  # answered-for writes (RCPT imports) still commit
            try:
                await self.stores.committer.idle().addTimeout(COMMIT_GRACE_SECONDS,
                                                              self.clock)
            except defer.TimeoutError:
                self.log.warn("stopping with database writes still under way")
        if self.database is not None:
            self.database.close()
            self.database = None
        if self.embedded is not None:
            await self.embedded.stop()
            self.embedded = None
        if self.geo is not None:
            self.geo.close()
            self.geo = None

    def stopService(self) -> defer.Deferred[None]:
        d = defer.maybeDeferred(super().stopService)
        d.addCallback(lambda _: defer.ensureDeferred(self._stop()))
        return d
