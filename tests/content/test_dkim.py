"""DKIM key generation and the DNS records printed by `mailgw domain add`."""

import base64

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.trial import unittest

from mailgw.content.dkim import domain_dns_records, generate_dkim_key


class KeyTests(unittest.TestCase):
    def test_rsa_2048(self):
        key = generate_dkim_key("rsa")
        private = serialization.load_pem_private_key(key.private_key_pem.encode(), None)
        self.assertIsInstance(private, rsa.RSAPrivateKey)
        self.assertEqual(private.key_size, 2048)
        public = serialization.load_der_public_key(base64.b64decode(key.public_key))
        self.assertEqual(public.public_numbers(), private.public_key().public_numbers())

    def test_ed25519(self):
        key = generate_dkim_key("ed25519")
        private = serialization.load_pem_private_key(key.private_key_pem.encode(), None)
        self.assertIsInstance(private, ed25519.Ed25519PrivateKey)
        raw = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                serialization.PublicFormat.Raw)
        self.assertEqual(base64.b64decode(key.public_key), raw)

    def test_unknown_algorithm(self):
        self.assertRaises(ValueError, generate_dkim_key, "dsa")


class RecordTests(unittest.TestCase):
    def test_records(self):
        records = domain_dns_records("example.org", "s1", "rsa", "PUB", "bounces.example.org",
                                     "mx.gw.example")
        lines = [r.zone_line() for r in records]
        self.assertIn('s1._domainkey.example.org. IN TXT "v=DKIM1; k=rsa; p=PUB"', lines)
        self.assertIn('example.org. IN TXT "v=spf1 include:_spf.mx.gw.example ~all"', lines)
        self.assertIn("bounces.example.org. IN MX 10 mx.gw.example.", lines)
        self.assertIn('_spf.mx.gw.example. IN TXT "v=spf1 a:mx.gw.example -all"', lines)
