"""Secrets at rest (R-5): passwords as slow salted hashes, API keys as digests.

Passwords are short and guessable, so they get scrypt (memory-hard, in the
standard library).  API keys are 256-bit random strings: a single SHA-256 is
enough and lets the key be found by an indexed lookup of its digest.  A DMDS
campaign key must be shown again (H-2 `campania_apikey`), so besides its digest
it is kept sealed (`Sealer`) under a secret of the installation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from nacl import exceptions as nacl_exceptions
from nacl import secret as nacl_secret

# ~50 ms and 16 MiB per hash on this class of machine (OWASP's scrypt minimum is n=2**17
# with r=8 for interactive logins at 128 MiB; 2**14 keeps SMTP AUTH bursts affordable).
_SCRYPT_N = 2**14
_SCRYPT_R = 8
_SCRYPT_P = 1
API_KEY_PREFIX = "mgw_"


def hash_password(password: str) -> str:
    """`scrypt$n$r$p$salt$hash`, all parameters kept so they can grow later."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)
    return "$".join(["scrypt", str(_SCRYPT_N), str(_SCRYPT_R), str(_SCRYPT_P),
                     _b64(salt), _b64(digest)])


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                          maxmem=256 * 1024 * 1024, dklen=32)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def new_password() -> str:
    return secrets.token_urlsafe(18)


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def api_key_prefix(key: str) -> str:
    """The first characters of a key, kept in clear to tell keys apart (never enough to
    guess it: 4 of its 43 random characters)."""
    return key[:8]


class Sealer:
    """Secrets that must be read back, encrypted and authenticated (XSalsa20-Poly1305)
    under a 32-byte key of the installation (KeyStore)."""

    def __init__(self, key: bytes) -> None:
        self._box = nacl_secret.SecretBox(key[:nacl_secret.SecretBox.KEY_SIZE])

    def seal(self, text: str) -> bytes:
        return bytes(self._box.encrypt(text.encode("utf-8")))

    def open(self, sealed: bytes) -> str:
        """The text; ValueError when `sealed` was not sealed with this key."""
        try:
            return self._box.decrypt(sealed).decode("utf-8")
        except (nacl_exceptions.CryptoError, UnicodeDecodeError):
            raise ValueError("not sealed with this installation's key") from None
