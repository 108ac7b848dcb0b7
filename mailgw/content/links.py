"""Signed tracking URLs and VERP bounce addresses (T-1 to T-4, D-2, D-7).

A tracking URL carries what it points at, signed: the tracking endpoints need no database
lookup to redirect and cannot be turned into an open redirect (T-2). A bounce address
and a Message-ID carry their delivery id, signed, so that a DSN or a complaint names the
delivery it is about (D-7).
Only the standard library: the tracking endpoints and the inbound bounce listener verify
tokens without loading the MIME and DKIM code of rendering.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

__all__ = ["LinkSigner"]

LINK_KINDS = frozenset({"c", "o", "u", "w"})  # click, open, unsubscribe, web version
# Truncated HMAC-SHA256: forging a token takes 2**96 tries per guess, each one a request.
_LINK_TAG_BYTES = 12
# Bounce addresses carry 80 bits: short enough for a local part, too many to guess.
_BOUNCE_TAG_BYTES = 10
_MAX_TOKEN_LENGTH = 16_384
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_BOUNCE_LOCAL_PART = re.compile(r"b-(0|[1-9][0-9]{0,19})-([a-z2-7]{16})")
_MESSAGE_ID = re.compile(r"<?(0|[1-9][0-9]{0,19})\.([a-z2-7]{16})@[^<>@\s]+>?")


class LinkSigner:
    """Signed, unguessable tracking URLs under the public base URL (T-1 to T-4).

    A token is the urlsafe base64 (unpadded) of a payload — the delivery id as a varint,
    then for clicks the destination URL in UTF-8 — followed by a 96-bit truncated
    HMAC-SHA256 over the link kind and the payload, so a token of one kind is worthless as
    another. Tokens are deterministic: the same delivery always gets the same URLs, so the
    web version (T-4) shows exactly the HTML that was sent.
    """

    def __init__(self, secret: bytes, base_url: str) -> None:
        if not secret:
            raise ValueError("LinkSigner needs a non-empty secret")
        self.base_url = base_url.rstrip("/")
        # Keyed once; each token copies the state instead of keying HMAC again.
        self._links = hmac.new(secret, b"mailgw link v1\x00", hashlib.sha256)
        self._bounces = hmac.new(secret, b"mailgw bounce v1\x00", hashlib.sha256)

    def click_url(self, delivery_id: int, url: str) -> str:
        return f"{self.base_url}/t/c/{self._token('c', delivery_id, url)}"

    def open_url(self, delivery_id: int) -> str:
        return f"{self.base_url}/t/o/{self._token('o', delivery_id)}.gif"

    def unsubscribe_url(self, delivery_id: int) -> str:
        return f"{self.base_url}/t/u/{self._token('u', delivery_id)}"

    def web_version_url(self, delivery_id: int) -> str:
        return f"{self.base_url}/t/w/{self._token('w', delivery_id)}"

    def verify(self, kind: str, token: str) -> tuple[int, str | None] | None:
        """(delivery id, destination URL for clicks else None), or None for anything that is
        not a token of this kind signed with our secret. Never raises."""
        try:
            return self._verify(kind, token)
        except Exception:  # garbage in any shape is a 404, not a crash
            return None

    def bounce_address(self, delivery_id: int, domain: str) -> str:
        """The VERP envelope sender (Return-Path) of one delivery: b-<id>-<mac>@domain."""
        return f"b-{delivery_id}-{self._bounce_tag(delivery_id)}@{domain.strip().lower()}"

    def parse_bounce_address(self, address: str) -> int | None:
        """The delivery id of a bounce address we made (with or without <> and domain)."""
        try:
            local = address.strip().strip("<>").rpartition("@")
            return self._signed_id(_BOUNCE_LOCAL_PART, local[0] if local[1] else local[2])
        except Exception:
            return None

    def message_id(self, delivery_id: int, hostname: str) -> str:
        """The Message-ID of one delivery's copy, <id.tag@hostname>: the same on every
        attempt (a copy sent again after a crash is the same message, RFC 5322 3.6.4),
        and signed like its bounce address, so that a complaint that kept only the
        Message-ID still names its delivery (D-7)."""
        return f"<{delivery_id}.{self._bounce_tag(delivery_id)}@{hostname}>"

    def parse_message_id(self, value: str) -> int | None:
        """The delivery id of a Message-ID we made, or None. Never raises."""
        try:
            return self._signed_id(_MESSAGE_ID, value.strip())
        except Exception:
            return None

    def _signed_id(self, pattern: re.Pattern[str], text: str) -> int | None:
        """The delivery id that `text` (matched whole by `pattern`: the id, then its tag)
        carries, when its tag is ours."""
        found = pattern.fullmatch(text.lower())
        if found is None:
            return None
        delivery_id = int(found.group(1))
        if hmac.compare_digest(self._bounce_tag(delivery_id), found.group(2)):
            return delivery_id
        return None

    def _token(self, kind: str, delivery_id: int, url: str | None = None) -> str:
        payload = _varint(delivery_id)
        if url is not None:
            payload += url.encode("utf-8", "replace")
        mac = self._links.copy()
        mac.update(kind.encode("ascii"))
        mac.update(payload)
        token = base64.urlsafe_b64encode(payload + mac.digest()[:_LINK_TAG_BYTES])
        return token.rstrip(b"=").decode("ascii")

    def _verify(self, kind: str, token: str) -> tuple[int, str | None] | None:
        if not isinstance(kind, str) or kind not in LINK_KINDS or not isinstance(token, str):
            return None
        if kind == "o":
            token = token.removesuffix(".gif")
        if len(token) > _MAX_TOKEN_LENGTH or not _TOKEN.fullmatch(token):
            return None
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload, tag = raw[:-_LINK_TAG_BYTES], raw[-_LINK_TAG_BYTES:]
        if not payload:
            return None
        mac = self._links.copy()
        mac.update(kind.encode("ascii"))
        mac.update(payload)
        if not hmac.compare_digest(mac.digest()[:_LINK_TAG_BYTES], tag):
            return None
        delivery_id, end = _read_varint(payload)
        rest = payload[end:]
        if kind == "c":
            return (delivery_id, rest.decode("utf-8")) if rest else None
        return None if rest else (delivery_id, None)

    def _bounce_tag(self, delivery_id: int) -> str:
        if delivery_id < 0:
            raise ValueError("delivery ids are not negative")
        mac = self._bounces.copy()
        mac.update(str(delivery_id).encode("ascii"))
        return base64.b32encode(mac.digest()[:_BOUNCE_TAG_BYTES]).decode("ascii").lower()


def _varint(number: int) -> bytes:
    if number < 0:
        raise ValueError("delivery ids are not negative")
    out = bytearray()
    while number > 0x7F:
        out.append(number & 0x7F | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


def _read_varint(data: bytes) -> tuple[int, int]:
    number = shift = 0
    for index, byte in enumerate(data[:10]):
        number |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return number, index + 1
        shift += 7
    raise ValueError("bad varint")
