"""DKIM for sender domains: their keys, the DNS records an operator publishes (O-4), and
the signature of each message sent (D-2).

`DKIMSigner.prepare` computes everything of a signature but the key operation, which
`PendingSignature.key_signature` runs (in a thread, in the delivery engine); relaxed
canonicalization is done here, in linear time, rather than by dkimpy.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from dataclasses import dataclass
from functools import cached_property

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import correct_empty_body, strip_trailing_lines

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


# Signed when present (RFC 6376 5.4.1's list, narrowed to what mailgw writes); RFC 8058
# requires List-Unsubscribe and List-Unsubscribe-Post to be signed for one-click.
_DKIM_HEADERS = (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"mime-version",
                 b"content-type", b"reply-to", b"in-reply-to", b"references",
                 b"list-unsubscribe", b"list-unsubscribe-post")
# Header fields end at a line end not followed by white space (folding).
_HEADER_FIELDS = re.compile(rb"\r\n(?![ \t])")
_WSP_RUN = re.compile(rb"[ \t]+")


@dataclass(frozen=True)
class DKIMSigner:
    """The DKIM key of a sender domain, parsed on first use and reused for every message."""

    domain: str
    selector: str
    algorithm: str  # "rsa" or "ed25519"
    private_key_pem: str  # PKCS#8 PEM, as made by generate_dkim_key

    def __post_init__(self) -> None:
        if self.algorithm not in DKIM_ALGORITHMS:
            raise ValueError(f"DKIM algorithm must be one of {', '.join(DKIM_ALGORITHMS)}")

    def sign(self, message: bytes) -> bytes:
        """The `DKIM-Signature: ...\r\n` header field for `message` (CRLF line endings)."""
        pending = self.prepare(message)
        return pending.header(pending.key_signature())

    def prepare(self, message: bytes) -> PendingSignature:
        """Everything of the signature but the key operation: relaxed/relaxed, over the
        headers of _DKIM_HEADERS the message has.

        dkimpy folds the DKIM-Signature field; the rest is done here, because dkimpy's
        `sign()` would parse the PEM key again (pure Python, ~0.13 ms), split the whole
        message into lines, run three regular expressions over every header field and two
        over every body (~0.35 ms) and, for RSA, compute the signature in pure Python
        (~8 ms); OpenSSL does it in ~1 ms, with the same bytes (RSASSA-PKCS1-v1_5 is
        deterministic), and without holding the GIL, so that the delivery engine runs it
        in a thread. The tests verify every signature with dkimpy."""
        head, _, body = message.partition(b"\r\n\r\n")
        # Each header field by its lowercased name; the last one of a name is signed
        # (RFC 6376 5.4.2).
        present = {}
        for header in _HEADER_FIELDS.split(head):
            name, colon, value = header.partition(b":")
            if colon:
                present[name.rstrip().lower()] = value
        include = [name for name in _DKIM_HEADERS if name in present]
        domain = self.domain.encode("idna")
        fields = [
            (b"v", b"1"), (b"a", _DKIM_A_TAGS[self.algorithm]), (b"c", b"relaxed/relaxed"),
            (b"d", domain), (b"i", b"@" + domain), (b"q", b"dns/txt"),
            (b"s", self.selector.encode("ascii")),
            (b"t", str(int(time.time())).encode("ascii")), (b"h", b" : ".join(include)),
            (b"bh", base64.b64encode(hashlib.sha256(_relaxed_body(body)).digest())),
            (b"b", b"0" * 60),  # dkimpy's placeholder: it makes b= fold onto its own line
        ]
        # The header hash as dkimpy's gen_header computes it: the signed fields, then the
        # DKIM-Signature field as it will be folded, with an empty b=, and no line end.
        signature = dkim.RE_BTAG.sub(b"\\1", dkim.fold(
            b"; ".join(name + b"=" + value for name, value in fields),
            namelen=len(b"DKIM-Signature"), linesep=b"\r\n"))
        digest = hashlib.sha256()
        for name in include:
            digest.update(name + b":" + _relaxed_value(present[name]) + b"\r\n")
        digest.update(b"dkim-signature:" + _relaxed_value(b" " + signature))
        return PendingSignature(self, digest.digest(), tuple(fields))

    def key_signature(self, digest: bytes) -> bytes:
        """The RSA or Ed25519 signature of a header hash: OpenSSL, the GIL released."""
        key = self._key
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        return key.sign(digest)  # RFC 8463: Ed25519 over the SHA-256 of the header fields

    @cached_property
    def _key(self) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
        # Our own keys, from our own database: skipping OpenSSL's RSA consistency check
        # makes loading take microseconds instead of ~40 ms.
        private = serialization.load_pem_private_key(self.private_key_pem.encode("ascii"), None,
                                                     unsafe_skip_rsa_key_validation=True)
        wanted = rsa.RSAPrivateKey if self.algorithm == "rsa" else ed25519.Ed25519PrivateKey
        if not isinstance(private, wanted):
            raise ValueError(f"the DKIM key of {self.domain} is not an {self.algorithm} key")
        return private


@dataclass(frozen=True)
class PendingSignature:
    """A DKIM-Signature waiting for its key operation, the one slow step (~1 ms for
    RSA-2048), which `key_signature` may run in another thread."""

    signer: DKIMSigner
    digest: bytes
    fields: tuple[tuple[bytes, bytes], ...]

    def key_signature(self) -> bytes:
        return self.signer.key_signature(self.digest)

    def header(self, signature: bytes) -> bytes:
        """The header field, folded as dkimpy's gen_header folds it."""
        value = b"; ".join(name + b"=" + (base64.b64encode(signature) if name == b"b" else v)
                           for name, v in self.fields)
        return b"DKIM-Signature: " + dkim.fold(value + b"\r\n", namelen=len(b"DKIM-Signature"),
                                               linesep=b"\r\n")


_DKIM_A_TAGS = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}


def _relaxed_value(value: bytes) -> bytes:
    """RFC 6376 3.4.2 relaxed canonicalization of a header field value, as dkimpy does it:
    unfolded, runs of white space made one space, stripped."""
    return _WSP_RUN.sub(b" ", value.replace(b"\r\n", b"").replace(b"\n", b"")).strip()


def _relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4 relaxed body canonicalization, as dkimpy computes it, in one pass:
    dkimpy drops the white space before line ends with `[\\t ]+\\r\\n` first, which is
    tried from every blank of a run that no line end follows, quadratic in the run (0.4 s
    a recipient for an attached message of 400 lines of 990 blanks); runs made one space
    first, the same spaces go. Rendered bodies (QP or base64) rarely hold a tab, a run of
    spaces or a space before a line end: then only the empty lines at the end change."""
    if b"\t" in body or b"  " in body or b" \r\n" in body:
        body = _WSP_RUN.sub(b" ", body).replace(b" \r\n", b"\r\n")
    return correct_empty_body(strip_trailing_lines(body))
