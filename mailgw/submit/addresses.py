"""Address checks shared by every door (S-6, S-7)."""

from __future__ import annotations

import re
from functools import lru_cache

from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email

# The plain ASCII addresses that nearly all recipients have: a dot-atom local part and a
# domain of letter-digit-hyphen labels ending in a letter (RFC 5321, RFC 1035), checked
# here in a few microseconds; email-validator still decides every other address.
_PLAIN_ADDRESS = re.compile(
    r"(?P<local>[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*)"
    r"@(?P<domain>(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z](?:[a-z0-9-]{0,61}[a-z])?)",
    re.ASCII)
_SPECIAL_USE_SUFFIXES = tuple(f".{name}" for name in SPECIAL_USE_DOMAIN_NAMES)


class InvalidAddress(Exception):
    """Not a deliverable mailbox address; args[0] is the address as given."""


@lru_cache(maxsize=8192)
def normalize_address(address: str) -> str:
    """The address in the form contacts are keyed by (lowercase), or InvalidAddress.

    Syntax only: whether the domain exists is the delivery engine's business,
    and a DNS lookup per RCPT would make submission as slow as the resolver.
    A local part is at most 64 octets (RFC 5321 4.5.3.1.1): email-validator
    checks that only when strict.
    Cached: email-validator takes ~70 us an address, and a sender's address comes
    back with every message (refusals are not cached: they raise).
    """
    lowered = address.lower()
    plain = _PLAIN_ADDRESS.fullmatch(lowered) if address.isascii() else None
    if (plain is not None and len(lowered) <= 254 and len(plain["local"]) <= 64
            and "--" not in plain["domain"]  # Punycode and its look-alikes
            and not f".{plain['domain']}".endswith(_SPECIAL_USE_SUFFIXES)):
        return lowered
    try:
        valid = validate_email(address, check_deliverability=False, allow_smtputf8=False,
                               strict=True)
    except EmailNotValidError:
        raise InvalidAddress(address) from None
    return valid.normalized.lower()


def delivery_address(address: str, normalized: str) -> str:
    """`address` as mail is delivered to it, `normalized` being normalize_address(address):
    the local part as written, since the receiving server may tell its case apart
    (RFC 5321 2.4), and the domain lowercased. A local part that normalizing changed
    beyond its case (a quoted one written anew) is taken as normalized."""
    local = address.rpartition("@")[0]
    normalized_local, _, domain = normalized.rpartition("@")
    if local.lower() != normalized_local:
        return normalized
    return f"{local}@{domain}"
