"""API keys on the HTTP listener (H-): who is calling, and what the key may do, for
every app that needs to know.

A key comes as `Authorization: Bearer <key>` or as the bare `Authorization: <key>`
(both work, as the vendors' clients send either).  The portal's API key checker
and the realm turn it into the account's avatar, which carries the key's kind
(`SubmissionAccount.key`); each app maps the refusals to its dialect's answer
(403 with `Invalid_API_Key`, `Current_service_is_not_active`,
`API_key_not_authorized`, or a DMDS error body; 429 past the key's rate).

Key kinds (H-1, H-3): `account` keys send and read (statistics, events, DMDS);
`admin` keys also manage their account under /v1/admin/ (an operator's admin key,
every account); `campaign` keys send for their campaign only.
"""

from __future__ import annotations

import hashlib

from twisted.cred import error
from twisted.cred.portal import Portal

from mailgw.accounts.avatar import AccountInactive, ISubmissionAccount, SubmissionAccount
from mailgw.accounts.checkers import APIKey
from mailgw.http.api import APIError, RateLimiter

# The seed's names for the key refusals (Aldeamo, H-1).
INVALID_API_KEY = "Invalid_API_Key"
SERVICE_NOT_ACTIVE = "Current_service_is_not_active"
KEY_NOT_AUTHORIZED = "API_key_not_authorized"

# Longer than any key mailgw makes (mgw_ and 43 characters); a longer header is no key.
MAX_KEY_LENGTH = 512


class InvalidAPIKey(Exception):
    """No key, or one that belongs to no account (or is revoked): 403."""


class InactiveAccount(Exception):
    """The key is an account's, but the account is disabled: 403, said differently."""


def presented_key(request) -> str | None:
    """The key of `Authorization: Bearer <key>` or `Authorization: <key>`, or None."""
    raw = request.getHeader(b"authorization")
    if raw is None or len(raw) > MAX_KEY_LENGTH:
        return None
    try:
        header = raw.decode("ascii") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        return None
    scheme, _, rest = header.strip().partition(" ")
    key = rest.strip() if scheme.lower() == "bearer" else header.strip()
    return key or None


class KeyNotAuthorized(Exception):
    """The key is an active account's, but not for this (its kind, its campaign)."""


# What a request does, and the key kinds that may do it.
SEND, READ, MANAGE = "send", "read", "manage"
_KINDS_FOR = {SEND: ("account", "admin", "campaign"), READ: ("account", "admin"),
              MANAGE: ("admin",)}


def authorize(account: SubmissionAccount, action: str,
              campaign_numid: int | None = None) -> None:
    """KeyNotAuthorized unless the account's key may do `action` (for the campaign
    `campaign_numid`, when a send is one of a campaign's)."""
    key = account.key
    if key is None or key.kind not in _KINDS_FOR[action]:
        raise KeyNotAuthorized()
    if action == SEND and not key.can_send:
        raise KeyNotAuthorized()
    if key.kind == "campaign" and (campaign_numid is None
                                   or campaign_numid != key.campaign_numid):
        raise KeyNotAuthorized()


KEY_CACHE_SIZE = 10_000


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyAuthenticator:
    """The account behind a request's API key, through the cred portal; with a limiter,
    `authorized` also holds each key to its request rate.

    A key's account is remembered for `cache_seconds` (`http.key_cache_seconds`): two
    queries per request (the key, the account's profile) would cost an API client as
    much as its message. Revoking a key or disabling an account takes effect within
    that time on every node, at once on the node whose management API did it."""

    def __init__(self, portal: Portal, limiter: RateLimiter | None = None,
                 clock=None, cache_seconds: float = 0.0) -> None:
        self.portal = portal
        self.limiter = limiter
        self.clock = clock
        self.cache_seconds = cache_seconds
        self._known: dict[str, tuple[SubmissionAccount, float]] = {}

    def forget_keys(self) -> None:
        """Ask the database again for every key (a key was revoked, an account changed)."""
        self._known.clear()

    async def authorized(self, request, action: str,
                         campaign_numid: int | None = None) -> SubmissionAccount:
        """The account, once its key is known to be under its rate (APIError 429 if not:
        counted by the key's digest before any lookup, so that a flood of requests costs
        no query each) and allowed `action` (KeyNotAuthorized)."""
        key = presented_key(request)
        if key is not None and self.limiter is not None:
            self.limiter.check(_digest(key))
        account = await self.account(request)
        authorize(account, action, campaign_numid)
        return account

    async def account(self, request) -> SubmissionAccount:
        key = presented_key(request)
        if key is None:
            raise InvalidAPIKey()
        digest = _digest(key) if self.cache_seconds else None
        known = self._known.get(digest) if digest is not None else None
        if known is not None and known[1] > self.clock.seconds():
            return known[0]
        try:
            _, avatar, _ = await self.portal.login(APIKey(key), None, ISubmissionAccount)
        except AccountInactive:
            raise InactiveAccount() from None
        except error.UnauthorizedLogin:
            raise InvalidAPIKey() from None
        if digest is not None:
            if len(self._known) >= KEY_CACHE_SIZE:
                self._known.clear()
            self._known[digest] = (avatar, self.clock.seconds() + self.cache_seconds)
        return avatar

    async def caller(self, request, action: str,
                     campaign_numid: int | None = None) -> SubmissionAccount:
        """`authorized`, its refusals as the error bodies of the Aldeamo dialect (which the
        management API shares): 403 with the seed's names."""
        try:
            return await self.authorized(request, action, campaign_numid)
        except InvalidAPIKey:
            raise APIError(403, INVALID_API_KEY) from None
        except InactiveAccount:
            raise APIError(403, SERVICE_NOT_ACTIVE) from None
        except KeyNotAuthorized:
            raise APIError(403, KEY_NOT_AUTHORIZED) from None
