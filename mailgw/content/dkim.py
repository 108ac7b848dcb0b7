"""DKIM keys for sender domains and the DNS records an operator publishes (O-4)."""

from __future__ import annotations

import base64
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

DKIM_ALGORITHMS = ("rsa", "ed25519")


@dataclass(frozen=True)
class DKIMKey:
    algorithm: str
    private_key_pem: str
    # The p= value of the DKIM TXT record (RFC 6376, RFC 8463).
    public_key: str


def generate_dkim_key(algorithm: str = "rsa") -> DKIMKey:
    """RSA-2048 (what every receiver checks) or Ed25519 (RFC 8463)."""
    if algorithm == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    elif algorithm == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
        public = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raise ValueError(f"DKIM algorithm must be one of {', '.join(DKIM_ALGORITHMS)}")
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return DKIMKey(algorithm, pem.decode("ascii"), base64.b64encode(public).decode("ascii"))


@dataclass(frozen=True)
class DNSRecord:
    name: str
    type: str
    value: str

    def zone_line(self) -> str:
        value = f'"{self.value}"' if self.type == "TXT" else self.value
        return f"{self.name}. IN {self.type} {value}"


def domain_dns_records(domain: str, selector: str, algorithm: str, public_key: str,
                       return_path_domain: str, gateway_hostname: str) -> list[DNSRecord]:
    """What to publish so that mail from `domain` through this gateway authenticates.

    SPF names the gateway through one include (`_spf.<gateway>`), published
    once by the operator; the return-path domain gets an MX to the gateway so
    that asynchronous bounces come back to it (D-7).
    """
    spf = f"v=spf1 include:_spf.{gateway_hostname} ~all"
    return [
        DNSRecord(f"{selector}._domainkey.{domain}", "TXT",
                  f"v=DKIM1; k={algorithm}; p={public_key}"),
        DNSRecord(domain, "TXT", spf),
        DNSRecord(return_path_domain, "MX", f"10 {gateway_hostname}."),
        DNSRecord(return_path_domain, "TXT", spf),
        DNSRecord(f"_dmarc.{domain}", "TXT", f"v=DMARC1; p=none; rua=mailto:postmaster@{domain}"),
        DNSRecord(f"_spf.{gateway_hostname}", "TXT", f"v=spf1 a:{gateway_hostname} -all"),
    ]
