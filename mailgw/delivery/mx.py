"""Where to deliver a domain's mail (D-3): MX records, or one smarthost for everything.

`MXResolver` asks DNS with twisted.names (the configured servers, else
/etc/resolv.conf) and keeps answers for their TTL, so a batch of messages to
one domain costs one query.  Its two failures tell the runner what to do:
`PermanentDNSFailure` means the domain can never receive mail (bounce), and
`TemporaryDNSFailure` means DNS could not answer now (defer and retry).
"""

from __future__ import annotations

import ipaddress
import random
import socket
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.names import client, dns, error

# Permanent failures are cached at most this long, so a domain fixed by its owner
# is not bounced for long (RFC 2308 would allow the SOA minimum, often hours).
NEGATIVE_TTL = 300
# Positive answers are never kept longer than this, whatever their TTL says.
MAX_TTL = 86400
# Smarthost addresses come from getaddrinfo, which gives no TTL.
SMARTHOST_CACHE_SECONDS = 60.0


class PermanentDNSFailure(Exception):
    """The domain cannot receive mail: it does not exist, has a null MX or no server.

    `ttl` is how long the answer may be cached.
    """

    def __init__(self, reason: str, ttl: float = NEGATIVE_TTL) -> None:
        super().__init__(reason)
        self.ttl = ttl


class NullMX(PermanentDNSFailure):
    """The domain publishes a null MX (RFC 7505): it accepts no mail at all."""


class TemporaryDNSFailure(Exception):
    """DNS did not answer usefully now (SERVFAIL, timeout, refused): retry later."""


@dataclass(frozen=True)
class MailServer:
    host: str
    port: int
    preference: int


class MXResolver:
    """MX lookups with the RFC 5321 5.1 address fallback and a bounded TTL cache.

    Cache expiry uses `clock` (tests pass a task.Clock); queries use `reactor`.
    `timeout` is the time given to each DNS server before a query fails, spread
    over three retransmissions.
    """

    def __init__(self, reactor: Any, clock: Any, servers: list[tuple[str, int]] | None = None,
                 port: int = 25, timeout: float = 10.0, max_cache_entries: int = 10000) -> None:
        self._resolver = dns_resolver(reactor, servers)
        self.port = port
        self._timeouts = (timeout / 7, 2 * timeout / 7, 4 * timeout / 7)
        self._max_entries = max_cache_entries
        self._clock = clock
        self._cache: OrderedDict[tuple[str, str], tuple[float, Any]] = OrderedDict()

    async def mail_servers(self, domain: str) -> list[MailServer]:
        """The domain's mail servers, most preferred first (one per MX host)."""
        name = _domain_name(domain)
        if name.startswith("["):
            # An address literal (RFC 5321 4.1.3) names its server directly.
            return [MailServer(name, self.port, 0)]
        key = ("mx", name)
        cached = self._cached(key)
        if cached is not _MISS:
            return list(cached)
        try:
            servers, ttl = await self._lookup_mx(name)
        except PermanentDNSFailure as e:
            self._store(key, e, min(e.ttl, NEGATIVE_TTL))
            raise
        self._store(key, servers, ttl)
        return list(servers)

    async def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of a mail server host.

        A host without any address (or with an invalid name) raises
        TemporaryDNSFailure rather than a permanent one: it is one broken MX,
        and the caller tries the next.
        """
        literal = _ip_literal(host)
        if literal is not None:
            return [literal]
        try:
            name = _domain_name(host)
        except PermanentDNSFailure as e:
            raise TemporaryDNSFailure(str(e)) from None
        found = await self._host_addresses(name)
        if not found:
            raise TemporaryDNSFailure(f"mail server {name} has no address")
        return found

    async def _lookup_mx(self, name: str) -> tuple[list[MailServer], float]:
        try:
            answers, authority = await self._query(self._resolver.lookupMailExchange, name, "MX")
        except _NoSuchDomain as e:
            raise PermanentDNSFailure(f"domain {name} does not exist", e.ttl) from None
        records = [r for r in answers if r.type == dns.MX]
        if not records:
            # RFC 5321 5.1: no MX, the domain itself is the server if it has an address.
            nodata_ttl = _negative_ttl(authority)
            found = await self._host_addresses(name)
            if not found:
                raise PermanentDNSFailure(
                    f"domain {name} accepts no mail (no MX and no address)", nodata_ttl)
            return [MailServer(name, self.port, 0)], nodata_ttl
        ttl = min(r.ttl for r in records)
        exchanges = [(r.payload.preference, str(r.payload.name).rstrip(".").lower())
                     for r in records]
        # Hosts in a random order, then a stable sort: equal preferences are shared out.
        random.shuffle(exchanges)
        exchanges.sort(key=lambda e: e[0])
        servers: list[MailServer] = []
        seen = set()
        for preference, host in exchanges:
            if host and host not in seen:
                seen.add(host)
                servers.append(MailServer(host, self.port, preference))
        if not servers:
            raise NullMX(f"domain {name} accepts no mail (null MX)", ttl)
        return servers, ttl

    async def _host_addresses(self, name: str) -> list[str]:
        """A then AAAA addresses (possibly none), cached under their own key."""
        key = ("addr", name)
        cached = self._cached(key)
        if cached is not _MISS:
            return list(cached)
        # Both queries at once; each outcome is caught so neither failure goes unhandled.
        v4 = defer.ensureDeferred(self._settle(self._resolver.lookupAddress, name, "A"))
        v6 = defer.ensureDeferred(self._settle(self._resolver.lookupIPV6Address, name, "AAAA"))
        outcomes = [await v4, await v6]
        found: list[str] = []
        ttls: list[float] = []
        temporary = None
        for outcome in outcomes:
            if isinstance(outcome, TemporaryDNSFailure):
                temporary = temporary or outcome
            elif isinstance(outcome, _NoSuchDomain):
                ttls.append(outcome.ttl)
            else:
                answers, authority = outcome
                records = [r for r in answers if r.type in (dns.A, dns.AAAA)]
                for r in records:
                    address = _address_text(r)
                    if address not in found:
                        found.append(address)
                ttls.append(min(r.ttl for r in records) if records
                            else _negative_ttl(authority))
        if temporary is not None:
            if not found:
                raise temporary
            return found  # half an answer is usable now but not worth caching
        self._store(key, found, min(ttls))
        return list(found)

    async def _settle(self, lookup, name: str, rtype: str) -> Any:
        try:
            return await self._query(lookup, name, rtype)
        except (TemporaryDNSFailure, _NoSuchDomain) as e:
            return e

    async def _query(self, lookup, name: str, rtype: str) -> tuple[list, list]:
        """(answers, authority) of one query, with its errors as our two kinds."""
        try:
            answers, authority, _ = await lookup(name, timeout=self._timeouts)
        except (error.DNSNameError, error.AuthoritativeDomainError) as e:
            message = e.args[0] if e.args else None
            raise _NoSuchDomain(_negative_ttl(getattr(message, "authority", []))) from None
        except defer.TimeoutError:
            raise TemporaryDNSFailure(f"DNS timeout looking up {rtype} of {name}") from None
        except error.DNSServerError:
            raise TemporaryDNSFailure(
                f"DNS server failure (SERVFAIL) looking up {rtype} of {name}") from None
        except error.DNSQueryRefusedError:
            raise TemporaryDNSFailure(f"DNS query refused looking up {rtype} of {name}") from None
        except (error.DomainError, error.ResolverError, OSError) as e:
            raise TemporaryDNSFailure(
                f"DNS error looking up {rtype} of {name}: {type(e).__name__}") from None
        return answers, authority

    def _cached(self, key: tuple[str, str]) -> Any:
        """The live cached value (a cached permanent failure is raised), else _MISS."""
        entry = self._cache.get(key)
        if entry is None:
            return _MISS
        expires, value = entry
        if self._clock.seconds() >= expires:
            del self._cache[key]
            return _MISS
        self._cache.move_to_end(key)
        if isinstance(value, PermanentDNSFailure):
            raise type(value)(str(value), value.ttl)
        return value

    def _store(self, key: tuple[str, str], value: Any, ttl: float) -> None:
        ttl = min(ttl, MAX_TTL)
        if ttl <= 0:
            return
        self._cache[key] = (self._clock.seconds() + ttl, value)
        self._cache.move_to_end(key)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)


class Smarthost:
    """D-3 smarthost mode: every domain's mail goes to one upstream server."""

    def __init__(self, host: str, port: int, clock: Any = None) -> None:
        self.host = host.strip("[]")
        self.port = port
        self._clock = clock
        self._cached: tuple[float, list[str]] | None = None

    async def mail_servers(self, domain: str) -> list[MailServer]:
        """Always the smarthost, whatever the domain."""
        return [MailServer(self.host, self.port, 0)]

    async def addresses(self, host: str) -> list[str]:
        """The host itself if an IP literal, else its addresses from the system resolver."""
        literal = _ip_literal(host)
        if literal is not None:
            return [literal]
        clock = self._clock
        if clock is None:
            from twisted.internet import reactor as clock
        now = clock.seconds()
        if self._cached is not None and host == self.host and self._cached[0] > now:
            return list(self._cached[1])
        try:
            infos = await deferToThread(socket.getaddrinfo, host, self.port,
                                        type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise TemporaryDNSFailure(f"smarthost {host} cannot be resolved: {e}") from None
        found: list[str] = []
        for _family, _type, _proto, _name, sockaddr in infos:
            if sockaddr[0] not in found:
                found.append(sockaddr[0])
        if not found:
            raise TemporaryDNSFailure(f"smarthost {host} has no address")
        if host == self.host:
            self._cached = (now + SMARTHOST_CACHE_SECONDS, found)
        return list(found)


_MISS = object()


class _NoSuchDomain(Exception):
    """NXDOMAIN, with how long that may be cached."""

    def __init__(self, ttl: float) -> None:
        super().__init__(ttl)
        self.ttl = ttl


def dns_resolver(reactor: Any, servers: list[tuple[str, int]] | None):
    """A twisted.names resolver that asks `servers` (IP address, port), or else the
    system's (/etc/resolv.conf, /etc/hosts)."""
    if servers:
        return client.Resolver(servers=[_server(h, p) for h, p in servers], reactor=reactor)
    return client.createResolver()


def _server(host: str, port: int) -> tuple[str, int]:
    """A DNS server address; twisted.names sends UDP only to IP addresses."""
    address = _ip_literal(host)
    if address is None:
        raise ValueError(f"DNS server must be an IP address, got {host!r}")
    return address, port


def _ip_literal(host: str) -> str | None:
    """The address in "192.0.2.1", "[192.0.2.1]" or "[IPv6:2001:db8::1]", else None."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if text[:5].lower() == "ipv6:":
            text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _domain_name(domain: str) -> str:
    """The ASCII (IDNA) lower-case form without a trailing dot; address literals kept."""
    name = domain.strip().rstrip(".").lower()
    if name.startswith("[") and _ip_literal(name) is not None:
        return name
    try:
        ascii_name = name.encode("idna").decode("ascii")
    except UnicodeError:
        ascii_name = ""
    if not ascii_name or any(c.isspace() for c in ascii_name):
        raise PermanentDNSFailure(f"domain {domain!r} is not a valid domain name")
    return ascii_name


def _negative_ttl(authority: list) -> float:
    """RFC 2308: min(SOA TTL, SOA minimum) from the authority section, else the default."""
    for record in authority:
        if record.type == dns.SOA:
            return min(record.ttl, record.payload.minimum, NEGATIVE_TTL)
    return NEGATIVE_TTL


def _address_text(record: dns.RRHeader) -> str:
    if record.type == dns.A:
        return record.payload.dottedQuad()
    return str(ipaddress.IPv6Address(record.payload.address))
