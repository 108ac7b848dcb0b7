"""Content fetched from URLs for the APIs (R-4): attachments now, DMDS content URIs later.

A fetch is bounded: `http` and `https` only (and `data:<mime>;base64,` URIs, decoded
without any network), one time limit for the whole fetch, redirects included, a
size limit checked against `Content-Length` and again while the body streams in
(the download is aborted past it), and at most `MAX_REDIRECTS` redirects.

Names are resolved with twisted.names (the resolver of `delivery.dns_servers`), and
every address found must be public (`is_global`, not multicast) unless it lies in a
network the operator allows (`http.fetch_allow_networks`). The connection then goes
to the address that was checked, with the URL's host in the `Host` header and in
TLS's server name: no second lookup between the check and the connection, so a
name that answers differently the second time (DNS rebinding) cannot lead the
fetch to a private address.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urljoin, urlsplit

import treq
from twisted.internet import defer, endpoints, protocol, ssl
from twisted.internet.protocol import connectionDone
from twisted.names import dns
from twisted.names import error as dns_error
from twisted.web.client import Agent, HTTPConnectionPool, PotentialDataLoss, ResponseDone
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from mailgw.delivery.mx import dns_resolver

MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
# A MIME type as RFC 2045 writes one: type "/" subtype, tokens.
_MIME_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+-]{1,64}")
_DATA_URI = re.compile(r"data:([^;,]*)((?:;[^;,]*)*);base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")

T = TypeVar("T")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class FetchRefused(Exception):
    """The content cannot be fetched; str() says why, for the caller's answer."""


@dataclass(frozen=True)
class Fetched:
    data: bytes
    # The type the server (or the data: URI) gave, without parameters; None if none.
    content_type: str | None
    # The last path segment of the URL fetched (after redirects), if it names a file.
    filename: str | None


def decode_data_uri(uri: str, max_bytes: int) -> Fetched:
    """A `data:<mime>;base64,<data>` URI; FetchRefused for any other form."""
    match = _DATA_URI.match(uri)
    if match is None:
        raise FetchRefused("a data: URI must be data:<type>;base64,<data>")
    mime_type = match.group(1).strip().lower()
    if mime_type and not _MIME_TYPE.fullmatch(mime_type):
        raise FetchRefused(f"not a MIME type in the data: URI: {mime_type[:40]!a}")
    encoded = _WHITESPACE.sub("", uri[match.end():])
    if len(encoded) * 3 // 4 > max_bytes:
        raise FetchRefused(f"the data: URI holds more than {max_bytes} bytes")
    try:
        data = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise FetchRefused("the data: URI is not valid base64") from None
    return Fetched(data, mime_type or None, None)


def address_allowed(address: Address, allowed: Sequence[Network]) -> bool:
    """A public unicast address, or one inside a network the operator allows."""
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    if any(address in network for network in allowed):
        return True
    return address.is_global and not address.is_multicast


@implementer(IAgentEndpointFactory)
class _PinnedEndpoints:
    """Connects to the one address already checked, whatever the URL's host says."""

    def __init__(self, reactor, address: Address, trust_root, timeout: float) -> None:
        self.reactor = reactor
        self.address = address
        self.trust_root = trust_root
        self.timeout = timeout

    def endpointForURI(self, uri):
        endpoint = endpoints.HostnameEndpoint(self.reactor, str(self.address), uri.port,
                                              timeout=self.timeout)
        if uri.scheme == b"https":
            options = ssl.optionsForClientTLS(uri.host.decode("idna"),
                                              trustRoot=self.trust_root)
            return endpoints.wrapClientTLS(options, endpoint)
        return endpoint


class ContentFetcher:
    """Fetches URLs within the bounds above; one per Gateway."""

    def __init__(self, reactor, dns_servers: Sequence[tuple[str, int]],
                 allow_networks: Sequence[str], timeout: float, max_bytes: int,
                 trust_root=None) -> None:
        self.reactor = reactor
        self.dns_servers = list(dns_servers)
        self._resolver = None
        self.allowed = tuple(ipaddress.ip_network(n, strict=False) for n in allow_networks)
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.trust_root = trust_root or ssl.platformTrust()
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    async def fetch(self, url: str) -> Fetched:
        """The content at `url`; FetchRefused says why not."""
        if url[:5].lower() == "data:":
            return decode_data_uri(url, self.max_bytes)
        try:
            return await within(self._fetch(url), self.timeout, self.reactor)
        except TimedOut:
            raise FetchRefused(f"no answer within {self.timeout:g} s") from None

    async def _fetch(self, url: str) -> Fetched:
        for _ in range(MAX_REDIRECTS + 1):
            parts = _checked_url(url)
            address = await self._address(parts.hostname)
            agent = Agent.usingEndpointFactory(
                self.reactor, _PinnedEndpoints(self.reactor, address, self.trust_root,
                                               self.timeout), pool=self.pool)
            try:
                response = await treq.request("GET", url, agent=agent, allow_redirects=False,
                                              unbuffered=True,
                                              headers={"User-Agent": ["mailgw"]})
            except Exception as error:
                raise FetchRefused(f"{parts.hostname}: {error_reason(error)}") from None
            if response.code in _REDIRECTS:
                location = response.headers.getRawHeaders(b"location", [b""])[0]
                await discard_body(response)
                if not location:
                    raise FetchRefused(f"redirect without a Location from {parts.hostname}")
                url = urljoin(url, location.decode("latin-1"))
                continue
            if response.code != 200:
                await discard_body(response)
                raise FetchRefused(f"{parts.hostname} answered {response.code}")
            data = await self._body(response)
            content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
            mime_type = content_type.decode("latin-1").partition(";")[0].strip().lower()
            return Fetched(data, mime_type if _MIME_TYPE.fullmatch(mime_type) else None,
                           _filename(urlsplit(url).path))
        raise FetchRefused(f"more than {MAX_REDIRECTS} redirects")

    async def _address(self, host: str) -> Address:
        """The first address of `host` (a name or an IP literal) that may be fetched from."""
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            addresses = await self._resolve(host)
        for address in addresses:
            if address_allowed(address, self.allowed):
                return address
        raise FetchRefused(f"{host} is at {addresses[0]}, a private, loopback or "
                           "link-local address")

    async def _resolve(self, host: str) -> list[Address]:
        if self._resolver is None:  # made on first use: the system's re-reads its files
            self._resolver = dns_resolver(self.reactor, self.dns_servers)
        found: list[Address] = []
        for lookup, record_type in ((self._resolver.lookupAddress, dns.A),
                                    (self._resolver.lookupIPV6Address, dns.AAAA)):
            try:
                answers, _, _ = await lookup(host)
            except (dns_error.DomainError, dns_error.DNSNameError):
                continue
            except Exception as error:
                raise FetchRefused(f"{host} could not be resolved: {error_reason(error)}") from None
            found.extend(ipaddress.ip_address(answer.payload.dottedQuad()
                                              if record_type == dns.A
                                              else _ipv6(answer.payload.address))
                         for answer in answers if answer.type == record_type)
        if not found:
            raise FetchRefused(f"{host} does not exist")
        return found

    async def _body(self, response) -> bytes:
        declared = response.headers.getRawHeaders(b"content-length", [b""])[0]
        if declared.isdigit() and int(declared) > self.max_bytes:
            await discard_body(response)
            raise FetchRefused(f"larger than {self.max_bytes} bytes")
        try:
            return await read_body(response, self.max_bytes)
        except BodyTooLarge:
            raise FetchRefused(f"larger than {self.max_bytes} bytes") from None
        except Exception as error:
            raise FetchRefused(f"the download broke off: {error_reason(error)}") from None


def _checked_url(url: str):
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - ValueError for a port that is no number
    except ValueError:
        raise FetchRefused(f"not a URL: {url[:80]!a}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise FetchRefused(f"only http and https URLs can be fetched, not {url[:80]!a}")
    if not parts.hostname:
        raise FetchRefused(f"no host in {url[:80]!a}")
    return parts


class TimedOut(Exception):
    """`within`'s time limit passed."""


async def within(work: Coroutine[Any, Any, T], seconds: float, clock) -> T:
    """`work`'s result, or TimedOut once `seconds` pass: the work is cancelled wherever
    it is (a lookup, a connection, a body being read), and whichever layer that was
    says so in its own words; the time limit is the reason, and TimedOut says it."""
    timed_out = []
    d = defer.ensureDeferred(work)
    d.addTimeout(seconds, clock,
                 onTimeoutCancel=lambda result, _: timed_out.append(True) or result)
    try:
        return await d
    except Exception:
        if timed_out:
            raise TimedOut(seconds) from None
        raise


class BodyTooLarge(Exception):
    """The body went past the bound `read_body` was given; its connection is closed."""


async def read_body(response, max_bytes: int) -> bytes:
    """A response's body, at most `max_bytes` of it (BodyTooLarge past that). Cancelling
    the read (a time limit) closes the connection, so a server that sends its body a
    byte at a time keeps no socket past the limit (treq.collect's read cannot be
    cancelled)."""
    reader = _BoundedBody(max_bytes)
    response.deliverBody(reader)
    return await reader.done


class _BoundedBody(protocol.Protocol):
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.chunks: list[bytes] = []
        self.received = 0
        self.done: defer.Deferred[bytes] = defer.Deferred(canceller=self._close)

    def _close(self, _: defer.Deferred) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        if self.done.called:
            return
        self.received += len(data)
        if self.received > self.max_bytes:
            self.transport.stopProducing()
            self.done.errback(BodyTooLarge(self.max_bytes))
            return
        self.chunks.append(data)

    def connectionLost(self, reason=connectionDone) -> None:  # noqa: N802 - Twisted's name
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


async def discard_body(response) -> None:
    """Let the connection go without reading a body mailgw does not want."""
    response.deliverBody(_Discard())


class _Discard(protocol.Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()


def _filename(path: str) -> str | None:
    name = unquote(path.rpartition("/")[2])
    name = "".join(char for char in name if char.isprintable()).strip()
    return name or None


def _ipv6(packed: bytes) -> str:
    return str(ipaddress.IPv6Address(packed))


def error_reason(error: BaseException) -> str:
    """The error in words; twisted.web's client errors hold the failures that made them."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(error_reason(reason.value) for reason in reasons)
    return str(error) or type(error).__name__
