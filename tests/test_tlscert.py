"""The listeners' certificate: self-signed on first start, TLS 1.2+ with AEAD suites
only (R-5)."""

import socket
import ssl
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL
from twisted.internet import defer, protocol, reactor
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOFactory
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


class _Silent(protocol.Protocol):
    def __init__(self, lost: list[defer.Deferred]) -> None:
        self.lost = defer.Deferred()
        lost.append(self.lost)

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)


def _negotiated(port: int, ciphers: str, maximum: ssl.TLSVersion) -> str:
    """A handshake as `openssl s_client -cipher ...` does it: the suite agreed on."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = maximum
    context.set_ciphers(ciphers + ":@SECLEVEL=0")  # the client offers them, whatever
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
            context.wrap_socket(sock) as tls:
        return tls.cipher()[0]


class CipherTests(unittest.TestCase):
    """Real handshakes with a listener that uses server_tls_options."""

    def setUp(self):
        base = Path(self.mktemp())
        cert, key = base / "cert.pem", base / "key.pem"
        ensure_self_signed(cert, key, "mx.example.org")
        lost: list[defer.Deferred] = []
        factory = protocol.Factory.forProtocol(lambda: _Silent(lost))
        port = reactor.listenTCP(0, TLSMemoryBIOFactory(server_tls_options(cert, key), False,
                                                        factory), interface="127.0.0.1")
        self.port = port.getHost().port
        self.addCleanup(lambda: defer.DeferredList(lost))
        self.addCleanup(port.stopListening)

    async def test_cbc_with_sha1_refused(self):
        for suite in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA"):
            with self.assertRaises(ssl.SSLError):
                await deferToThread(_negotiated, self.port, suite, ssl.TLSVersion.TLSv1_2)

    async def test_aead_on_tls_1_2(self):
        for suite in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"):
            self.assertEqual(await deferToThread(_negotiated, self.port, suite,
                                                 ssl.TLSVersion.TLSv1_2), suite)

    async def test_tls_1_3(self):
        suite = await deferToThread(_negotiated, self.port, "DEFAULT",
                                    ssl.TLSVersion.MAXIMUM_SUPPORTED)
        self.assertTrue(suite.startswith("TLS_"), suite)
