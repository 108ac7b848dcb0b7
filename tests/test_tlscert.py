"""The listeners' certificate: self-signed on first start, TLS 1.2+ only (R-5)."""

from pathlib import Path

from cryptography import x509
from OpenSSL import SSL
from twisted.trial import unittest

from mailgw.errors import StartupError
from mailgw.tlscert import ensure_self_signed, server_tls_options


class TLSCertTests(unittest.TestCase):
    def setUp(self):
        base = Path(self.mktemp())
        self.cert, self.key = base / "tls" / "cert.pem", base / "tls" / "key.pem"

    def test_self_signed_once(self):
        self.assertTrue(ensure_self_signed(self.cert, self.key, "mx.example.org"))
        first = self.cert.read_bytes()
        self.assertFalse(ensure_self_signed(self.cert, self.key, "mx.example.org"))
        self.assertEqual(self.cert.read_bytes(), first)
        self.assertEqual(self.key.stat().st_mode & 0o777, 0o600)
        cert = x509.load_pem_x509_certificate(first)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertIn("mx.example.org", names.get_values_for_type(x509.DNSName))

    def test_tls_below_1_2_disabled(self):
        ensure_self_signed(self.cert, self.key, "mx.example.org")
        context = server_tls_options(self.cert, self.key).getContext()
        options = context.set_options(0)
        self.assertTrue(options & SSL.OP_NO_TLSv1)
        self.assertTrue(options & SSL.OP_NO_TLSv1_1)

    def test_key_of_another_certificate(self):
        ensure_self_signed(self.cert, self.key, "mx.example.org")
        other_cert, other_key = self.cert.with_name("other.pem"), self.key.with_name("other.key")
        ensure_self_signed(other_cert, other_key, "mx.example.org")
        with self.assertRaises(StartupError) as caught:
            server_tls_options(self.cert, other_key)
        message = str(caught.exception)
        self.assertEqual(len(message.splitlines()), 1)
        self.assertIn(str(self.cert), message)
        self.assertIn(str(other_key), message)

    def test_not_a_certificate(self):
        self.cert.parent.mkdir(parents=True)
        self.cert.write_text("junk")
        self.key.write_text("junk")
        with self.assertRaises(StartupError):
            server_tls_options(self.cert, self.key)
