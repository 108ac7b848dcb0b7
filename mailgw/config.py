"""TOML configuration read into typed, validated sections.

Every key has a default, so an empty file (or no file) is a working
configuration.  Unknown keys and values of the wrong type stop start-up with
a `ConfigError` that names the key, because a typo in a mail server's config
should never be silently ignored.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key or file."""


@dataclass(frozen=True)
class SMTPConfig:
    # Plain listeners that offer STARTTLS (S-1): legacy 2500 and submission 58700.
    starttls_listeners: list[str] = field(default_factory=lambda: ["tcp:2500", "tcp:58700"])
    # Listeners that speak TLS from the first byte (S-1): 46500.
    implicit_tls_listeners: list[str] = field(default_factory=lambda: ["tcp:46500"])
    max_message_size: int = 512000
    # Recipients accepted in one transaction (more get 452 4.5.3).
    max_recipients: int = 1000
    # Sessions open at once, in all and from one client address; connections over
    # either cap get 421 4.7.0 and are closed.
    max_connections: int = 1000
    max_connections_per_address: int = 100
    # Connections waiting to be accepted, per listener (the kernel caps it at
    # net.core.somaxconn); an endpoint string's own backlog= wins.
    listen_backlog: int = 1024
    # Seconds an idle session may stay open before it is closed.
    idle_timeout: int = 300
    # Seconds a client gets for the TLS handshake (implicit TLS, or after STARTTLS).
    tls_handshake_timeout: int = 30
    # Seconds a message may take from DATA to its final dot, however steadily it comes.
    data_timeout: int = 600
    # Commands a session may send without a message being accepted (accepted RCPTs
    # aside): a session of NOOPs never goes idle.
    max_commands_without_message: int = 100
    # Allow AUTH on a plain connection from anywhere (S-2); loopback always may.
    allow_plaintext_auth: bool = False
    # Networks that may submit without AUTH (like Postfix's mynetworks), as this account.
    trusted_networks: list[str] = field(default_factory=list)
    trusted_account: str = ""


@dataclass(frozen=True)
class HTTPConfig:
    listener: str = "tcp:8080"
    # As smtp.listen_backlog: tracking hits come in bursts after a campaign goes out.
    listen_backlog: int = 1024
    # Base of every tracking, unsubscribe and web-version link (T-).
    public_base_url: str = "http://localhost:8080"
    # Clients that may read /metrics (O-5): its figures describe customers' traffic.
    metrics_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # Largest request body: a longer one is refused with 413 while it arrives.
    max_body_size: int = 2 * 1024 * 1024
    # Seconds a request (its headers and body) may take to arrive (slow clients: 408).
    request_timeout: float = 30.0
    # Seconds an idle keep-alive connection stays open.
    idle_timeout: float = 60.0
    # Requests a second per API key, and how many may come at once (429 past them).
    requests_per_second_per_key: float = 50.0
    request_burst_per_key: int = 100
    # Seconds a key's account is remembered without asking the database; a revoked key
    # or a disabled account is refused within this time (0: asked every request).
    key_cache_seconds: float = 10.0
    # Fetching content and attachments from URLs: seconds per fetch, largest
    # body, and networks allowed although private, loopback or link-local.
    fetch_timeout: float = 10.0
    fetch_max_bytes: int = 10 * 1024 * 1024
    fetch_allow_networks: list[str] = field(default_factory=list)
    # Contacts one DMDS send_many_* call may name (413 past it); the message is stored in
    # batches of smtp.max_recipients, all in the call's one eeid (H-2).
    dmds_max_recipients: int = 10_000


@dataclass(frozen=True)
class TLSConfig:
    # Empty: <state_dir>/tls/cert.pem and key.pem (created by `mailgw init`).
    certificate: str = ""
    private_key: str = ""


@dataclass(frozen=True)
class DatabaseConfig:
    # libpq connection string; empty runs the embedded cluster under state_dir (O-2).
    dsn: str = ""
    pool_size: int = 5
    # Unprivileged system user that runs the embedded cluster when mailgw runs as root.
    embedded_user: str = "mailgw"
    # Seconds mailgw keeps restarting an embedded PostgreSQL that exited before it gives
    # up and exits with status 1 (for systemd to restart it); 0 exits at once.
    embedded_restart_seconds: float = 300.0


@dataclass(frozen=True)
class DeliveryConfig:
    enabled: bool = True
    # Rows claimed per queue query (D-1).
    batch_size: int = 100
    lease_seconds: int = 300
    retry_base_seconds: int = 300
    max_age_seconds: int = 5 * 24 * 3600
    # DNS servers as "host:port"; empty uses /etc/resolv.conf (D-3).
    dns_servers: list[str] = field(default_factory=list)
    remote_smtp_port: int = 25
    # "host:port" of an upstream that relays everything; empty delivers by MX.
    smarthost: str = ""
    # With a username: AUTH PLAIN, only over TLS (STARTTLS required whatever tls_policy).
    smarthost_username: str = ""
    smarthost_password: str = ""
    max_connections: int = 200
    # Connections to one destination: a domain's MX hosts by preference (shared by the
    # domains that have the same ones), or the smarthost.
    per_domain_connections: int = 10
    # Messages per second to one recipient domain; 0 means no limit.
    per_domain_rate: float = 0.0
    connect_timeout: int = 30
    reply_timeout: int = 300
    # Seconds a connection stays open after its last message, for the next message to the
    # same domain; 0 quits at once.
    connection_idle_seconds: float = 2.0
    # STARTTLS to recipients' servers: "opportunistic" (when offered, certificate not
    # checked) or "verify" (required, certificate checked against the MX name).
    tls_policy: str = "opportunistic"
    # Hard bounces after which a contact is invalidated (D-7; whitelisted ones never are).
    hard_bounce_limit: int = 2
    # Domain of the return path and unsubscribe mailto: of senders whose domain has no
    # return-path domain of its own; empty: the hostname (Config.bounce_domain).
    bounce_domain: str = ""
    # Seconds between queue polls when nothing is due.
    poll_interval: float = 1.0


TLS_POLICIES = ("opportunistic", "verify")


@dataclass(frozen=True)
class InboundConfig:
    """The listener for bounces, complaints and List-Unsubscribe mail (D-7, T-3)."""

    # Twisted endpoint strings; empty: no listener. In production "tcp:25", the host the
    # MX records of the return-path domains name (`mailgw domain add` prints them).
    listeners: list[str] = field(default_factory=list)
    # Bytes of a message that are kept and read: a report says what it has to say at its
    # start, and the rest (the returned original) is read and dropped.
    max_message_size: int = 128 * 1024
    max_recipients: int = 100
    # As the [smtp] keys of the same names.
    max_connections: int = 100
    max_connections_per_address: int = 10
    idle_timeout: int = 300
    tls_handshake_timeout: int = 30
    data_timeout: int = 600
    max_commands_without_message: int = 100


@dataclass(frozen=True)
class WebhookConfig:
    """Webhook delivery (W-2, mailgw/events/webhooks/dispatcher.py)."""

    # False: this node neither feeds nor posts webhooks (another node sharing the
    # database does; with none, events wait in webhook_outbox).
    enabled: bool = True
    timeout_seconds: int = 5
    max_queue_per_endpoint: int = 10000
    max_retry_seconds: int = 24 * 3600
    # Posts under way on this node at once, and of any one endpoint (its connections).
    max_in_flight: int = 100
    connections_per_endpoint: int = 10
    # How often new events and due retries are looked for when there is nothing to do.
    poll_interval: float = 1.0
    # Hosts that may receive webhooks over plain http (W-2). None by default: with
    # loopback allowed, an account could make mailgw post to any local service.
    allow_http_hosts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TrackingConfig:
    """The open pixel, click redirects, unsubscribe page and web version (T-1 to T-6)."""

    # A GeoIP2 or GeoLite2 City (or Country) file; empty: events carry no place (T-1).
    geoip_database: str = ""
    # Proxies (load balancers) whose X-Forwarded-For is believed, as networks; the
    # client of any other connection is its peer address.
    trusted_proxies: list[str] = field(default_factory=list)
    # A click or open this soon after its message was delivered is a machine's: link
    # scanners and image prefetchers fetch within seconds of delivery (T-6).
    scanner_seconds: float = 5.0
    # Networks and user-agent words added to the built-in lists of mail privacy proxies
    # (opens) and link scanners (opens and clicks) (T-6, mailgw/events/machine.py).
    machine_networks: list[str] = field(default_factory=list)
    machine_agents: list[str] = field(default_factory=list)
    # The pixel and the redirect wait this long for their event's commit, then answer
    # anyway (the recipient never waits for our trouble); the unsubscribe POST answers
    # 503 instead, for the mail client to try again.
    commit_wait_seconds: float = 2.0


@dataclass(frozen=True)
class Config:
    hostname: str = "localhost"
    state_dir: str = "var"
    smtp: SMTPConfig = field(default_factory=SMTPConfig)
    http: HTTPConfig = field(default_factory=HTTPConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    webhooks: WebhookConfig = field(default_factory=WebhookConfig)
    inbound: InboundConfig = field(default_factory=InboundConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).resolve()

    @property
    def certificate_path(self) -> Path:
        if self.tls.certificate:
            return Path(self.tls.certificate)
        return self.state_path / "tls" / "cert.pem"

    @property
    def private_key_path(self) -> Path:
        if self.tls.private_key:
            return Path(self.tls.private_key)
        return self.state_path / "tls" / "key.pem"

    @property
    def bounce_domain(self) -> str:
        """delivery.bounce_domain; when empty, the hostname, which names this gateway."""
        return self.delivery.bounce_domain or self.hostname

    def replace(self, **changes: Any) -> Config:
        """A copy with top-level keys changed (tests and the CLI use it)."""
        return dataclasses.replace(self, **changes)


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and validate the TOML file at `path`; None gives the defaults."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    return parse_config(data)


def parse_config(data: dict[str, Any]) -> Config:
    """Build a Config from parsed TOML, naming the first bad key."""
    config = _build(Config, data, "")
    _check_values(config)
    return config


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key")
    values = {}
    for name in known & data.keys():
        values[name] = _convert(hints[name], data[name], prefix + name)
    return cls(**values)


def _convert(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if typing.get_origin(hint) is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {item_type.__name__}")
        return [_convert(item_type, item, f"{key}[{i}]") for i, item in enumerate(value)]
    # bool is a subclass of int: `port = true` must not pass as an integer.
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint in (str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {'a string' if hint is str else 'true or false'}, "
                          f"got {value!r}")
    return value


def _check_values(config: Config) -> None:
    positive = {
        "smtp.max_message_size": config.smtp.max_message_size,
        "smtp.max_recipients": config.smtp.max_recipients,
        "smtp.max_connections": config.smtp.max_connections,
        "smtp.max_connections_per_address": config.smtp.max_connections_per_address,
        "smtp.idle_timeout": config.smtp.idle_timeout,
        "smtp.listen_backlog": config.smtp.listen_backlog,
        "http.listen_backlog": config.http.listen_backlog,
        "http.max_body_size": config.http.max_body_size,
        "http.request_timeout": config.http.request_timeout,
        "http.idle_timeout": config.http.idle_timeout,
        "http.requests_per_second_per_key": config.http.requests_per_second_per_key,
        "http.request_burst_per_key": config.http.request_burst_per_key,
        "http.fetch_timeout": config.http.fetch_timeout,
        "http.fetch_max_bytes": config.http.fetch_max_bytes,
        "http.dmds_max_recipients": config.http.dmds_max_recipients,
        "smtp.tls_handshake_timeout": config.smtp.tls_handshake_timeout,
        "smtp.data_timeout": config.smtp.data_timeout,
        "smtp.max_commands_without_message": config.smtp.max_commands_without_message,
        "database.pool_size": config.database.pool_size,
        "delivery.batch_size": config.delivery.batch_size,
        "delivery.lease_seconds": config.delivery.lease_seconds,
        "delivery.retry_base_seconds": config.delivery.retry_base_seconds,
        "delivery.max_age_seconds": config.delivery.max_age_seconds,
        "delivery.max_connections": config.delivery.max_connections,
        "delivery.per_domain_connections": config.delivery.per_domain_connections,
        "delivery.connect_timeout": config.delivery.connect_timeout,
        "delivery.reply_timeout": config.delivery.reply_timeout,
        "delivery.hard_bounce_limit": config.delivery.hard_bounce_limit,
        "delivery.poll_interval": config.delivery.poll_interval,
        "inbound.max_message_size": config.inbound.max_message_size,
        "inbound.max_recipients": config.inbound.max_recipients,
        "inbound.max_connections": config.inbound.max_connections,
        "inbound.max_connections_per_address": config.inbound.max_connections_per_address,
        "inbound.idle_timeout": config.inbound.idle_timeout,
        "inbound.tls_handshake_timeout": config.inbound.tls_handshake_timeout,
        "inbound.data_timeout": config.inbound.data_timeout,
        "inbound.max_commands_without_message":
            config.inbound.max_commands_without_message,
        "webhooks.timeout_seconds": config.webhooks.timeout_seconds,
        "webhooks.max_queue_per_endpoint": config.webhooks.max_queue_per_endpoint,
        "webhooks.max_retry_seconds": config.webhooks.max_retry_seconds,
        "webhooks.max_in_flight": config.webhooks.max_in_flight,
        "webhooks.connections_per_endpoint": config.webhooks.connections_per_endpoint,
        "webhooks.poll_interval": config.webhooks.poll_interval,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be greater than 0, got {value}")
    if not 0 < config.delivery.remote_smtp_port < 65536:
        raise ConfigError(f"delivery.remote_smtp_port: not a port number: "
                          f"{config.delivery.remote_smtp_port}")
    if not config.hostname or any(c.isspace() for c in config.hostname):
        raise ConfigError(f"hostname: not a host name: {config.hostname!r}")
    if not config.state_dir:
        raise ConfigError("state_dir: must not be empty")
    if not config.http.public_base_url.startswith(("http://", "https://")):
        raise ConfigError(f"http.public_base_url: must start with http:// or https://, got "
                          f"{config.http.public_base_url!r}")
    if bool(config.tls.certificate) != bool(config.tls.private_key):
        raise ConfigError("tls.certificate and tls.private_key: set both or neither")
    _check_networks("smtp.trusted_networks", config.smtp.trusted_networks)
    _check_networks("tracking.trusted_proxies", config.tracking.trusted_proxies)
    _check_networks("tracking.machine_networks", config.tracking.machine_networks)
    _check_seconds("tracking.scanner_seconds", config.tracking.scanner_seconds)
    if not (math.isfinite(config.tracking.commit_wait_seconds)
            and config.tracking.commit_wait_seconds > 0):
        raise ConfigError("tracking.commit_wait_seconds: must be greater than 0, got "
                          f"{config.tracking.commit_wait_seconds}")
    for i, agent in enumerate(config.tracking.machine_agents):
        if not agent.strip():
            raise ConfigError(f"tracking.machine_agents[{i}]: must not be empty")
    _check_networks("http.metrics_networks", config.http.metrics_networks)
    _check_networks("http.fetch_allow_networks", config.http.fetch_allow_networks)
    if config.smtp.trusted_networks and not config.smtp.trusted_account:
        raise ConfigError("smtp.trusted_account: required when smtp.trusted_networks is set "
                          "(the account their mail is sent as)")
    _check_host_ports("delivery.dns_servers", config.delivery.dns_servers)
    for server in config.delivery.dns_servers:
        try:  # twisted.names sends queries to addresses only
            ipaddress.ip_address(server.rpartition(":")[0].strip("[]"))
        except ValueError:
            raise ConfigError(f"delivery.dns_servers: {server!r} is not an IP address and "
                              "port") from None
    _check_seconds("http.key_cache_seconds", config.http.key_cache_seconds)
    _check_seconds("database.embedded_restart_seconds",
                   config.database.embedded_restart_seconds)
    if config.delivery.per_domain_rate < 0:
        raise ConfigError("delivery.per_domain_rate: must not be negative")
    _check_seconds("delivery.connection_idle_seconds", config.delivery.connection_idle_seconds)
    if config.delivery.tls_policy not in TLS_POLICIES:
        raise ConfigError(f"delivery.tls_policy: must be one of {', '.join(TLS_POLICIES)}, got "
                          f"{config.delivery.tls_policy!r}")
    if config.delivery.smarthost:
        _check_host_ports("delivery.smarthost", [config.delivery.smarthost])
    bounce_domain = config.delivery.bounce_domain
    if bounce_domain and ("@" in bounce_domain or any(c.isspace() for c in bounce_domain)
                          or not all(bounce_domain.split("."))):
        raise ConfigError(f"delivery.bounce_domain: not a domain name: {bounce_domain!r}")


def _check_seconds(key: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{key}: must be a number of seconds, 0 or more, got {value}")


def _check_networks(key: str, networks: list[str]) -> None:
    for i, network in enumerate(networks):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"{key}[{i}]: not an IP network: {network!r}") from None


def _check_host_ports(key: str, values: list[str]) -> None:
    for value in values:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{key}: expected host:port, got {value!r}")
