"""MX resolution (D-3) against a local DNS server on loopback; cache time from a task.Clock."""

import contextlib
import time

from twisted.internet import defer, protocol, reactor, task
from twisted.names import client, dns
from twisted.trial import unittest

from mailgw.delivery.mx import (
    MailServer,
    MXResolver,
    NullMX,
    PermanentDNSFailure,
    Smarthost,
    TemporaryDNSFailure,
)
from tests.dns_server import LocalDNS

ZONE = {
    "example.net": {"MX": [(20, "mx2.example.net"), (10, "mx1.example.net"),
                           (30, "mx3.example.net")], "TTL": 60},
    "mx1.example.net": {"A": ["127.0.0.1"], "TTL": 120},
    "mx2.example.net": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
    "mx3.example.net": {"AAAA": ["2001:db8::25"]},
    "noaddr.example.net": {"TXT": "v=spf1 -all"},
    "aonly.example": {"A": ["127.0.0.3"], "TTL": 90},
    "nullmx.example": {"MX": [(0, ".")]},
    "nothing.example": {"TXT": "hello", "TTL": 40},
    "broken.example": {"SERVFAIL": True},
    "ties.example": {"MX": [(10, f"mx{i}.ties.example") for i in range(6)]},
    "alias.example": {"CNAME": "mx1.example.net"},
}


class Blackhole(protocol.DatagramProtocol):
    """A DNS server that never answers."""

    def datagramReceived(self, data, addr):
        pass


class MXResolverTests(unittest.TestCase):
    def setUp(self):
        self.dns = LocalDNS(ZONE)
        self.server = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.clock = task.Clock()
        self.resolver = self.make_resolver()

    def make_resolver(self, **kwargs):
        kwargs.setdefault("timeout", 2.0)
        return MXResolver(reactor, self.clock, [self.server], port=2525, **kwargs)

    async def test_mx_sorted_by_preference_with_configured_port(self):
        servers = await self.resolver.mail_servers("Example.NET.")
        self.assertEqual(servers, [MailServer("mx1.example.net", 2525, 10),
                                   MailServer("mx2.example.net", 2525, 20),
                                   MailServer("mx3.example.net", 2525, 30)])

    async def test_equal_preferences_keep_their_order_while_cached(self):
        first = await self.resolver.mail_servers("ties.example")
        self.assertEqual(sorted(s.host for s in first),
                         [f"mx{i}.ties.example" for i in range(6)])
        self.assertEqual(await self.resolver.mail_servers("ties.example"), first)

    async def test_address_fallback_without_mx(self):
        servers = await self.resolver.mail_servers("aonly.example")
        self.assertEqual(servers, [MailServer("aonly.example", 2525, 0)])
        # The fallback's address lookup is cached for the runner's next question.
        queries = len(self.dns.queries)
        self.assertEqual(await self.resolver.addresses("aonly.example"), ["127.0.0.3"])
        self.assertEqual(len(self.dns.queries), queries)

    async def test_no_mx_and_no_address_is_permanent(self):
        e = await self.assertFailure(
            defer.ensureDeferred(self.resolver.mail_servers("nothing.example")),
            PermanentDNSFailure)
        self.assertIn("nothing.example accepts no mail", str(e))

    async def test_null_mx_is_permanent(self):
        e = await self.assertFailure(
            defer.ensureDeferred(self.resolver.mail_servers("nullmx.example")),
            PermanentDNSFailure)
        self.assertEqual(str(e), "domain nullmx.example accepts no mail (null MX)")

    async def test_null_mx_is_told_apart_also_from_the_cache(self):
        """The runner bounces a null MX with its own codes (RFC 7505: 556 5.1.10)."""
        for _ in range(2):
            await self.assertFailure(
                defer.ensureDeferred(self.resolver.mail_servers("nullmx.example")), NullMX)
        self.assertEqual(self.dns.count("nullmx.example"), 1)

    async def test_nxdomain_is_permanent_and_cached_briefly(self):
        e = await self.assertFailure(
            defer.ensureDeferred(self.resolver.mail_servers("example.invalid")),
            PermanentDNSFailure)
        self.assertEqual(str(e), "domain example.invalid does not exist")
        self.clock.advance(299)
        await self.assertFailure(
            defer.ensureDeferred(self.resolver.mail_servers("example.invalid")),
            PermanentDNSFailure)
        self.assertEqual(self.dns.count("example.invalid"), 1)
        self.clock.advance(2)
        self.dns.add("example.invalid", "MX", (5, "mx1.example.net"))
        servers = await self.resolver.mail_servers("example.invalid")
        self.assertEqual([s.host for s in servers], ["mx1.example.net"])

    async def test_nodata_negative_answer_cached_by_soa_minimum(self):
        await self.assertFailure(
            defer.ensureDeferred(self.resolver.mail_servers("nothing.example")),
            PermanentDNSFailure)
        self.clock.advance(39)
        await self.assertFailure(
            defer.ensureDeferred(self.resolver.mail_servers("nothing.example")),
            PermanentDNSFailure)
        self.assertEqual(self.dns.count("nothing.example", "MX"), 1)
        self.clock.advance(2)
        self.dns.add("nothing.example", "A", "127.0.0.9")
        self.assertEqual(await self.resolver.mail_servers("nothing.example"),
                         [MailServer("nothing.example", 2525, 0)])

    async def test_servfail_is_temporary_and_not_cached(self):
        for _ in range(2):
            e = await self.assertFailure(
                defer.ensureDeferred(self.resolver.mail_servers("broken.example")),
                TemporaryDNSFailure)
        self.assertIn("SERVFAIL", str(e))
        self.assertEqual(self.dns.count("broken.example", "MX"), 2)

    async def test_timeout_is_temporary(self):
        silent = reactor.listenUDP(0, Blackhole(), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        resolver = MXResolver(reactor, self.clock, [("127.0.0.1", silent.getHost().port)],
                              timeout=0.3)
        started = time.monotonic()
        e = await self.assertFailure(
            defer.ensureDeferred(resolver.mail_servers("example.net")), TemporaryDNSFailure)
        self.assertIn("timeout", str(e))
        self.assertLess(time.monotonic() - started, 1.5)

    async def test_second_dns_server_used_when_first_is_silent(self):
        silent = reactor.listenUDP(0, Blackhole(), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        resolver = MXResolver(reactor, self.clock,
                              [("127.0.0.1", silent.getHost().port), self.server], timeout=0.7)
        servers = await resolver.mail_servers("example.net")
        self.assertEqual(servers[0].host, "mx1.example.net")

    async def test_cache_hit_then_expiry_by_smallest_ttl(self):
        await self.resolver.mail_servers("example.net")
        self.clock.advance(59)
        await self.resolver.mail_servers("example.net")
        self.assertEqual(self.dns.count("example.net", "MX"), 1)
        self.clock.advance(2)
        self.dns.records["example.net"]["MX"] = [(5, "mx9.example.net")]
        servers = await self.resolver.mail_servers("example.net")
        self.assertEqual(servers, [MailServer("mx9.example.net", 2525, 5)])
        self.assertEqual(self.dns.count("example.net", "MX"), 2)

    async def test_cache_is_bounded(self):
        resolver = self.make_resolver(max_cache_entries=2)
        for domain in ("example.net", "nullmx.example", "ties.example"):
            with contextlib.suppress(PermanentDNSFailure):
                await resolver.mail_servers(domain)
        await resolver.mail_servers("ties.example")
        self.assertEqual(self.dns.count("ties.example"), 1)
        await resolver.mail_servers("example.net")
        self.assertEqual(self.dns.count("example.net"), 2)

    async def test_addresses_a_then_aaaa(self):
        self.assertEqual(await self.resolver.addresses("mx2.example.net"),
                         ["127.0.0.2", "::1"])
        self.assertEqual(await self.resolver.addresses("mx3.example.net"), ["2001:db8::25"])
        self.assertEqual(await self.resolver.addresses("mx1.example.net"), ["127.0.0.1"])

    async def test_addresses_cached_by_ttl(self):
        await self.resolver.addresses("mx1.example.net")
        self.clock.advance(119)
        await self.resolver.addresses("mx1.example.net")
        self.assertEqual(self.dns.count("mx1.example.net", "A"), 1)
        self.clock.advance(2)
        await self.resolver.addresses("mx1.example.net")
        self.assertEqual(self.dns.count("mx1.example.net", "A"), 2)

    async def test_addresses_through_cname(self):
        self.assertEqual(await self.resolver.addresses("alias.example"), ["127.0.0.1"])

    async def test_host_without_address_is_temporary(self):
        for host in ("noaddr.example.net", "gone.example.net", "bad..name"):
            e = await self.assertFailure(
                defer.ensureDeferred(self.resolver.addresses(host)), TemporaryDNSFailure)
        self.assertIn("bad..name", str(e))
        e = await self.assertFailure(
            defer.ensureDeferred(self.resolver.addresses("broken.example")), TemporaryDNSFailure)
        self.assertIn("SERVFAIL", str(e))

    async def test_ip_literals_need_no_dns(self):
        self.assertEqual(await self.resolver.addresses("192.0.2.7"), ["192.0.2.7"])
        servers = await self.resolver.mail_servers("[127.0.0.1]")
        self.assertEqual(servers, [MailServer("[127.0.0.1]", 2525, 0)])
        self.assertEqual(await self.resolver.addresses(servers[0].host), ["127.0.0.1"])
        self.assertEqual(await self.resolver.addresses("[IPv6:2001:DB8::1]"), ["2001:db8::1"])
        self.assertEqual(self.dns.queries, [])

    async def test_invalid_domain_is_permanent(self):
        await self.assertFailure(
            defer.ensureDeferred(self.resolver.mail_servers("a..b")), PermanentDNSFailure)

    def test_dns_servers_must_be_addresses(self):
        self.assertRaises(ValueError, MXResolver, reactor, self.clock, [("dns.example", 53)])


class LocalDNSTests(unittest.TestCase):
    async def test_tcp_on_the_same_port(self):
        local = LocalDNS({"example.net": {"MX": [(10, "mx1.example.net")]}})
        host, port = local.start(reactor)
        self.addCleanup(local.stop)
        resolver = client.Resolver(servers=[(host, port)], reactor=reactor)
        message = await resolver.queryTCP([dns.Query("example.net", dns.MX)])
        for connection in list(resolver.connections):
            connection.transport.loseConnection()
        self.assertEqual([str(a.payload.name) for a in message.answers], ["mx1.example.net"])
        self.assertEqual(local.queries, [("example.net", "MX")])


class SmarthostTests(unittest.TestCase):
    async def test_everything_goes_to_the_smarthost(self):
        smarthost = Smarthost("relay.example.org", 587)
        for domain in ("example.net", "nullmx.example"):
            self.assertEqual(await smarthost.mail_servers(domain),
                             [MailServer("relay.example.org", 587, 0)])

    async def test_ip_literal_and_system_resolver(self):
        smarthost = Smarthost("127.0.0.1", 587)
        self.assertEqual(await smarthost.addresses("127.0.0.1"), ["127.0.0.1"])
        smarthost = Smarthost("localhost", 587, clock=task.Clock())
        found = await smarthost.addresses("localhost")
        self.assertTrue(set(found) & {"127.0.0.1", "::1"}, found)
        self.assertEqual(await smarthost.addresses("localhost"), found)
