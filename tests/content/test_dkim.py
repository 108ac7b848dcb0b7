"""DKIM key generation, the DNS records printed by `mailgw domain add`, and signing (D-2);
the signatures of rendered messages are tested in test_render."""

import base64

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.trial import unittest

from mailgw.content.dkim import DKIMSigner, domain_dns_records, generate_dkim_key
from tests.harness import published


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


class SignerTests(unittest.TestCase):
    def test_signer_is_reused(self):
        key = generate_dkim_key("rsa")
        signer = DKIMSigner("example.org", "s1", "rsa", key.private_key_pem)
        message = (b"From: a@example.org\r\nTo: b@example.com\r\nSubject: x\r\n\r\nbody\r\n")
        for _ in range(3):
            self.assertTrue(dkim.verify(signer.sign(message) + message, dnsfunc=published(key)))

    def test_body_whitespace_canonicalized(self):
        """Relaxed body canonicalization (RFC 6376 3.4.4) of bodies with and without the
        whitespace it changes: the signature must verify either way."""
        key = generate_dkim_key("rsa")
        signer = DKIMSigner("example.org", "s1", "rsa", key.private_key_pem)
        head = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: x\r\n\r\n"
        for body_text in (b"plain line\r\n", b"plain\r\n\r\n\r\n", b"", b"\r\n",
                          b"tab\there\r\n", b"two  spaces\r\n", b"trailing \r\n",
                          b"a\t \t\r\n\r\n", b"no line end", b"  lead  mid \t x \t \r\n \r\n",
                          b" " * 990 + b"x\r\n" + b"\t" * 990 + b"\r\n"):
            message = head + body_text
            self.assertTrue(dkim.verify(signer.sign(message) + message, dnsfunc=published(key)),
                            body_text)

    def test_header_fields_canonicalized(self):
        """Relaxed header canonicalization (RFC 6376 3.4.2) done without dkimpy: folded
        fields, tabs and runs of spaces, white space after the colon and at the end, a
        field that appears twice (the last is signed); dkimpy must verify each."""
        key = generate_dkim_key("rsa")
        signer = DKIMSigner("example.org", "s1", "rsa", key.private_key_pem)
        for head in (
                b"From: a@example.org\r\nTo: b@example.com\r\nSubject: x\r\n",
                b"From:a@example.org\r\nSubject:   spaced \t out\t \r\n",
                b"From: a@example.org\r\nSubject: folded\r\n \tonce\r\n  and twice\r\n",
                b"FROM: a@example.org\r\nsubject: lower\r\nX-Other: not signed\r\n",
                b"From: a@example.org\r\nTo: first@example.com\r\nTo: last@example.com\r\n",
                b"From: a@example.org\r\nSubject: " + b"long " * 40 + b"\r\n",
                b"From: a@example.org\r\nSubject:\r\n",
        ):
            message = head + b"\r\nbody\r\n"
            signed = signer.sign(message) + message
            self.assertTrue(dkim.verify(signed, dnsfunc=published(key)), head)
            self.assertFalse(dkim.verify(signed.replace(b"a@example.org", b"z@example.org"),
                                         dnsfunc=published(key)), head)
