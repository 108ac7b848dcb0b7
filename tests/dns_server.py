"""A small authoritative DNS server on loopback, so tests can resolve made-up domains.

Zone data is a dict of names to record types:

    LocalDNS({
        "example.net": {"MX": [(10, "mx1.example.net")], "TTL": 60},
        "mx1.example.net": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
        "nullmx.example": {"MX": [(0, ".")]},
        "broken.example": {"SERVFAIL": True},
        "alias.example": {"CNAME": "mx1.example.net"},
    })

A name that is not listed is NXDOMAIN; a listed name without the asked type
gives an empty answer (NODATA) with an SOA whose minimum is the name's TTL.
Every query is recorded in `queries` as (name, type), so tests can count them.
The data may be changed while the server runs (`add`, or `records` directly).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, error
from twisted.names import common, dns, server
from twisted.names import error as dns_error

DEFAULT_TTL = 300
_RECORDS = {
    "A": (dns.A, lambda v, ttl: dns.Record_A(v, ttl)),
    "AAAA": (dns.AAAA, lambda v, ttl: dns.Record_AAAA(v, ttl)),
    "MX": (dns.MX, lambda v, ttl: dns.Record_MX(v[0], _wire_name(v[1]), ttl)),
    "CNAME": (dns.CNAME, lambda v, ttl: dns.Record_CNAME(_wire_name(v), ttl)),
    "TXT": (dns.TXT, lambda v, ttl: dns.Record_TXT(v.encode(), ttl=ttl)),
}


class _ServerFailure(Exception):
    """Answer this query with SERVFAIL."""


class LocalDNS:
    def __init__(self, records: dict[str, dict[str, Any]] | None = None) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self.queries: list[tuple[str, str]] = []
        for name, entry in (records or {}).items():
            self.records[_key(name)] = dict(entry)
        self._ports: list[Any] = []
        self._factory: server.DNSServerFactory | None = None

    def add(self, name: str, rtype: str, value: Any) -> None:
        """Add one record (for "TTL" or "SERVFAIL", set that flag) to a name."""
        entry = self.records.setdefault(_key(name), {})
        if rtype in ("TTL", "SERVFAIL", "CNAME"):
            entry[rtype] = value
        else:
            entry.setdefault(rtype, []).append(value)

    def remove(self, name: str) -> None:
        """Forget a name, so it becomes NXDOMAIN."""
        self.records.pop(_key(name), None)

    def count(self, name: str, rtype: str | None = None) -> int:
        """How many queries for `name` (of `rtype`, if given) arrived."""
        name = _key(name)
        return sum(1 for n, t in self.queries if n == name and rtype in (None, t))

    def start(self, reactor: Any) -> tuple[str, int]:
        """Listen on 127.0.0.1, UDP and TCP on the same ephemeral port."""
        self._factory = _Factory(authorities=[_ZoneResolver(self)])
        for _attempt in range(10):
            udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(controller=self._factory),
                                    interface="127.0.0.1")
            port = udp.getHost().port
            try:
                tcp = reactor.listenTCP(port, self._factory, interface="127.0.0.1")
            except error.CannotListenError:
                udp.stopListening()
                continue
            self._ports = [udp, tcp]
            return "127.0.0.1", port
        raise RuntimeError("no free port for both UDP and TCP on 127.0.0.1")

    def stop(self) -> defer.Deferred:
        """Stop listening and drop TCP connections still open."""
        waits = [defer.maybeDeferred(p.stopListening) for p in self._ports]
        self._ports = []
        if self._factory is not None:
            for protocol in list(self._factory.connections):
                protocol.transport.abortConnection()
        return defer.gatherResults(waits)

    def answer(self, name: str, rtype: int) -> tuple[list, list, list]:
        """The sections for one query, or a failure for NXDOMAIN and SERVFAIL."""
        self.queries.append((name, dns.QUERY_TYPES.get(rtype, str(rtype))))
        entry = self.records.get(name)
        if entry is None:
            raise dns_error.AuthoritativeDomainError(name)
        if entry.get("SERVFAIL"):
            raise _ServerFailure(name)
        ttl = int(entry.get("TTL", DEFAULT_TTL))
        target = entry.get("CNAME")
        if target and rtype != dns.CNAME:
            # Like a recursive server: the alias, then the target's records of the type.
            answers = _records(name, {"CNAME": [target]}, dns.CNAME, ttl)
            target_entry = self.records.get(_key(target))
            if target_entry and not target_entry.get("SERVFAIL"):
                answers += _records(_key(target), target_entry, rtype,
                                    int(target_entry.get("TTL", DEFAULT_TTL)))
            return answers, [], []
        answers = _records(name, entry, rtype, ttl)
        if answers:
            return answers, [], []
        soa = dns.Record_SOA(mname="ns.localdns.test", rname="hostmaster.localdns.test",
                             serial=1, minimum=ttl, ttl=ttl)
        return [], [dns.RRHeader(name, dns.SOA, dns.IN, ttl, soa, auth=True)], []


class _ZoneResolver(common.ResolverBase):
    def __init__(self, zone: LocalDNS) -> None:
        super().__init__()
        self.zone = zone

    def _lookup(self, name, cls, type, timeout):
        try:
            return defer.succeed(self.zone.answer(_key(name), type))
        except Exception as e:
            return defer.fail(e)


class _Factory(server.DNSServerFactory):
    def gotResolverError(self, failure, protocol, message, address):
        # A SERVFAIL asked for by the test is not an error worth logging (trial
        # fails tests that log errors).
        if failure.check(_ServerFailure):
            response = self._responseFromMessage(message=message, rCode=dns.ESERVER)
            self.sendReply(protocol, response, address)
            return None
        return super().gotResolverError(failure, protocol, message, address)


def _records(name: str, entry: dict[str, Any], rtype: int, ttl: int) -> list:
    type_name = dns.QUERY_TYPES.get(rtype)
    if type_name not in _RECORDS or type_name not in entry:
        return []
    type_code, build = _RECORDS[type_name]
    values = entry[type_name]
    if isinstance(values, str | tuple):
        values = [values]
    return [dns.RRHeader(name, type_code, dns.IN, ttl, build(v, ttl), auth=True) for v in values]


def _key(name: str | bytes) -> str:
    if isinstance(name, bytes):
        name = name.decode("ascii")
    return name.rstrip(".").lower()


def _wire_name(name: str) -> bytes:
    """A domain name for a record; "." is the root (the null MX exchange)."""
    return b"" if name in (".", "") else name.rstrip(".").encode("idna")
