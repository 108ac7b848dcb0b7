"""Signed tracking URLs and VERP bounce addresses (T-1 to T-4, D-7)."""

import random

from twisted.trial import unittest

from mailgw.content.links import LinkSigner

BASE = "https://mx.example.org"
SECRET = b"s" * 32
SIGNER = LinkSigner(SECRET, BASE + "/")


class LinkSignerTests(unittest.TestCase):
    def test_round_trips(self):
        click = SIGNER.click_url(7, "https://example.com/ñ?a=1&b=2#x")
        self.assertTrue(click.startswith(BASE + "/t/c/"))
        self.assertEqual(SIGNER.verify("c", click.rpartition("/")[2]),
                         (7, "https://example.com/ñ?a=1&b=2#x"))
        opened = SIGNER.open_url(2**63)
        self.assertTrue(opened.startswith(BASE + "/t/o/") and opened.endswith(".gif"))
        token = opened.rpartition("/")[2]
        self.assertEqual(SIGNER.verify("o", token), (2**63, None))
        self.assertEqual(SIGNER.verify("o", token.removesuffix(".gif")), (2**63, None))
        for kind, url in (("u", SIGNER.unsubscribe_url(0)), ("w", SIGNER.web_version_url(0))):
            self.assertTrue(url.startswith(f"{BASE}/t/{kind}/"))
            self.assertEqual(SIGNER.verify(kind, url.rpartition("/")[2]), (0, None))

    def test_tokens_are_deterministic_and_url_safe(self):
        self.assertEqual(SIGNER.click_url(1, "https://a.example/"),
                         LinkSigner(SECRET, BASE).click_url(1, "https://a.example/"))
        self.assertNotEqual(SIGNER.unsubscribe_url(1), SIGNER.unsubscribe_url(2))
        token = SIGNER.click_url(1, "https://a.example/?q=" + "x" * 500).rpartition("/")[2]
        self.assertRegex(token, r"^[A-Za-z0-9_-]+$")

    def test_wrong_kind(self):
        token = SIGNER.unsubscribe_url(5).rpartition("/")[2]
        self.assertEqual(SIGNER.verify("u", token), (5, None))
        for kind in ("w", "o", "c", "x", "", "uu", None):
            self.assertIsNone(SIGNER.verify(kind, token))
        click = SIGNER.click_url(5, "https://a.example/").rpartition("/")[2]
        self.assertIsNone(SIGNER.verify("u", click))
        self.assertIsNone(SIGNER.verify("o", click))

    def test_tampered(self):
        token = SIGNER.click_url(9, "https://good.example/").rpartition("/")[2]
        for index in range(len(token)):
            changed = token[:index] + ("A" if token[index] != "A" else "B") + token[index + 1:]
            verified = SIGNER.verify("c", changed)
            self.assertTrue(verified is None or verified == (9, "https://good.example/"),
                            changed)
        self.assertIsNone(SIGNER.verify("c", token[:-1]))
        self.assertIsNone(SIGNER.verify("c", token[1:]))
        self.assertIsNone(LinkSigner(b"other", BASE).verify("c", token))
        # A token for another destination with the signature of this one.
        forged = SIGNER.click_url(9, "https://evil.example/").rpartition("/")[2]
        self.assertIsNone(SIGNER.verify("c", forged[:-16] + token[-16:]))

    def test_garbage_never_raises(self):
        for garbage in ("", "=", "====", "a", "ab", "abc", "!!!!", "é", "a.gif", ".gif",
                        "A" * 100_000, "AAAA" * 5, "\x00", "a b", None, b"abcd", 12, ["a"]):
            for kind in ("c", "o", "u", "w"):
                self.assertIsNone(SIGNER.verify(kind, garbage), (kind, garbage))
        generator = random.Random(4)
        alphabet = "ABCabc019_-=.é/+"
        for _ in range(2000):
            token = "".join(generator.choice(alphabet) for _ in range(generator.randrange(40)))
            self.assertIsNone(SIGNER.verify(generator.choice("couw"), token))

    def test_bounce_address(self):
        address = SIGNER.bounce_address(12345, "Bounces.Example.ORG")
        self.assertRegex(address, r"^b-12345-[a-z0-9]+@bounces\.example\.org$")
        local = address.partition("@")[0]
        self.assertRegex(local, r"^[a-z0-9-]+$")
        self.assertLessEqual(len(local), 64)
        self.assertEqual(SIGNER.parse_bounce_address(address), 12345)
        self.assertEqual(SIGNER.parse_bounce_address(f"<{address.upper()}>"), 12345)
        self.assertEqual(SIGNER.parse_bounce_address(local), 12345)
        self.assertEqual(SIGNER.parse_bounce_address(SIGNER.bounce_address(0, "b.example")), 0)

    def test_bounce_address_tampered(self):
        address = SIGNER.bounce_address(12345, "bounces.example.org")
        mac = address.split("-")[2].partition("@")[0]
        other = SIGNER.bounce_address(12346, "bounces.example.org")
        for bad in (address.replace("12345", "12346"), address.replace("12345", "012345"),
                    f"b-12346-{mac}@bounces.example.org", other.replace("12346", "12345"),
                    address.replace(mac, mac[:-1]), address.replace(mac, mac[:-1] + "x"),
                    "", "@", "postmaster@example.org", "b--@x", "b-1-@x", "b-x-abc@x",
                    "b-1-" + "a" * 16 + "@x", None, 5):
            self.assertIsNone(SIGNER.parse_bounce_address(bad), bad)
        self.assertIsNone(LinkSigner(b"other", BASE).parse_bounce_address(address))

    def test_message_id(self):
        """D-7: a complaint that kept only the Message-ID names its delivery."""
        message_id = SIGNER.message_id(12345, "gw.example.net")
        self.assertRegex(message_id, r"^<12345\.[a-z2-7]{16}@gw\.example\.net>$")
        self.assertEqual(SIGNER.message_id(12345, "gw.example.net"), message_id)
        self.assertEqual(SIGNER.parse_message_id(message_id), 12345)
        self.assertEqual(SIGNER.parse_message_id(f" {message_id.upper()} "), 12345)
        self.assertEqual(SIGNER.parse_message_id(message_id.strip("<>")), 12345)
        tag = message_id.split(".")[1].partition("@")[0]
        for bad in (message_id.replace("12345", "12346"), message_id.replace(tag, tag[:-1]),
                    message_id.replace("@gw", "gw"), "<5231AC96.9010208@dominio.com>", "",
                    SIGNER.bounce_address(12345, "gw.example.net"), None, 5):
            self.assertIsNone(SIGNER.parse_message_id(bad), bad)
        self.assertIsNone(LinkSigner(b"other", BASE).parse_message_id(message_id))
