"""The webhook signature (W-2): `X-Mailgw-Signature: t=<unix seconds>,v1=<hex>`.

`v1` is the HMAC-SHA256, keyed with the endpoint's secret, of the time, a dot and
the body exactly as posted. The time is signed so that a receiver can refuse an old
post: without it, whoever once saw a signed body could post it again forever. The
README shows a receiver's check in Python and in Node; `verify` is the same check.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-Mailgw-Signature"
# What `verify` accepts by default: five minutes of clock skew and delay.
DEFAULT_TOLERANCE_SECONDS = 300


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), b"%d." % timestamp + body, hashlib.sha256).hexdigest()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The header's value for `body` posted at `timestamp`."""
    return f"t={timestamp},v1={_mac(secret, timestamp, body)}"


def verify(secret: str, header: str, body: bytes, now: float,
           tolerance: int = DEFAULT_TOLERANCE_SECONDS) -> bool:
    """Whether `header` signs `body` with `secret`, at a time within `tolerance` of `now`."""
    fields = dict(part.partition("=")[::2] for part in header.split(","))
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    return hmac.compare_digest(fields.get("v1", ""), _mac(secret, timestamp, body))
