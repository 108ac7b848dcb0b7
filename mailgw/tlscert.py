"""The listeners' TLS certificate: loaded from config, or self-signed on first start."""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.error import VerifyError

from mailgw.errors import StartupError

# TLS 1.2 suites: ECDHE with AES-GCM or ChaCha20-Poly1305, the AEAD suites of Mozilla's
# intermediate profile (its DHE ones need DH parameters, which mailgw does not set).
# CBC suites with their SHA-1 MAC are out. TLS 1.3 suites are OpenSSL's, all AEAD.
TLS12_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                 "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                 "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")


def ensure_self_signed(cert_path: Path, key_path: Path, hostname: str) -> bool:
    """Write a self-signed certificate for `hostname` unless one is there; True if written."""
    if cert_path.exists() and key_path.exists():
        return False
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(hostname), x509.DNSName("localhost"),
                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                         x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return True


def server_tls_options(cert_path: Path, key_path: Path) -> ssl.CertificateOptions:
    """TLS 1.2 or newer only, with AEAD suites only (R-5), for STARTTLS and implicit
    TLS alike."""
    try:
        pem = cert_path.read_bytes() + b"\n" + key_path.read_bytes()
        certificate = ssl.PrivateCertificate.loadPEM(pem)
    except OSError as e:
        raise StartupError(f"cannot read the TLS certificate or key: {e.filename}: "
                           f"{e.strerror}") from None
    except (SSL.Error, crypto.Error):
        raise StartupError(f"{cert_path} / {key_path} are not a PEM certificate and its "
                           f"private key") from None
    except VerifyError:
        raise StartupError(f"{key_path} is not the private key of the certificate in "
                           f"{cert_path}") from None
    return ssl.CertificateOptions(
        privateKey=certificate.privateKey.original, certificate=certificate.original,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS))
