"""The client address of a hit: X-Forwarded-For only from trusted proxies (T-1, R-3)."""

from twisted.trial import unittest

from mailgw.events.client import client_address, networks, normal_address

PROXIES = networks(["10.0.0.0/8", "2001:db8:1::/48"])


class ClientAddressTests(unittest.TestCase):
    def test_peer_without_trusted_proxies(self):
        """A header from anyone but our proxies is a client's own invention."""
        forged = [b"203.0.113.7"]
        self.assertEqual(client_address("192.0.2.1", forged, ()), "192.0.2.1")
        self.assertEqual(client_address("192.0.2.1", forged, PROXIES), "192.0.2.1")

    def test_forwarded_by_a_trusted_proxy(self):
        self.assertEqual(client_address("10.1.2.3", [b"203.0.113.7"], PROXIES), "203.0.113.7")

    def test_chain_read_from_the_right(self):
        """The client's own entries (left) are not believed past the first untrusted hop."""
        header = [b"198.51.100.1, 203.0.113.7, 10.9.9.9"]
        self.assertEqual(client_address("10.1.2.3", header, PROXIES), "203.0.113.7")
        # Several headers are one list.
        self.assertEqual(client_address("10.1.2.3", [b"198.51.100.1", b"203.0.113.7"],
                                        PROXIES), "203.0.113.7")

    def test_ports_brackets_and_mapped_addresses(self):
        self.assertEqual(normal_address("203.0.113.7:4431"), "203.0.113.7")
        self.assertEqual(normal_address("[2001:db8::7]:443"), "2001:db8::7")
        self.assertEqual(normal_address("::ffff:203.0.113.7"), "203.0.113.7")
        self.assertEqual(client_address("::ffff:10.0.0.1", [b"[2001:db8::7]:80"], PROXIES),
                         "2001:db8::7")

    def test_absurd_headers_end_at_the_last_good_address(self):
        for header in ([b"unknown"], [b"<script>"], [b"999.1.1.1"], [b""], [b","],
                       [b"\xff\xfe\x00"], [b"1.2.3.4, " * 100_000], [b"x" * 1_000_000]):
            self.assertIn(client_address("10.1.2.3", header, PROXIES),
                          ("10.1.2.3", "1.2.3.4"))
        self.assertEqual(client_address("10.1.2.3", [b"203.0.113.7, garbage"], PROXIES),
                         "10.1.2.3")

    def test_only_trusted_hops(self):
        """Every entry one of our proxies: the leftmost is as far as we can see."""
        self.assertEqual(client_address("10.1.2.3", [b"10.0.0.5, 10.0.0.6"], PROXIES),
                         "10.0.0.5")

    def test_peer_that_is_no_address(self):
        """A UNIX socket listener has no peer address."""
        self.assertEqual(client_address("", [b"203.0.113.7"], PROXIES), "")
