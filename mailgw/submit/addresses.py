"""Address checks shared by every door (S-6, S-7)."""

from __future__ import annotations

from functools import lru_cache

from email_validator import EmailNotValidError, validate_email


class InvalidAddress(Exception):
    """Not a deliverable mailbox address; args[0] is the address as given."""


@lru_cache(maxsize=8192)
def normalize_address(address: str) -> str:
    """The address in the form contacts are keyed by (lowercase), or InvalidAddress.

    Syntax only: whether the domain exists is the delivery engine's business,
    and a DNS lookup per RCPT would make submission as slow as the resolver.
    Cached: email-validator takes ~70 us an address, and a sender's address comes
    back with every message (refusals are not cached: they raise).
    """
    try:
        valid = validate_email(address, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError:
        raise InvalidAddress(address) from None
    return valid.normalized.lower()
