"""API keys on the HTTP listener (H-): who is calling, for every app that needs to know.

A key comes as `Authorization: Bearer <key>` or as the bare `Authorization: <key>`
(both work, as the vendors' clients send either).  The portal's API key checker
and the realm turn it into the account's avatar; each app maps the two refusals
to its dialect's answer (403 with `Invalid_API_Key`, `Current_service_is_not_active`,
or a DMDS error body).
"""

from __future__ import annotations

from twisted.cred import error
from twisted.cred.portal import Portal

from mailgw.accounts.avatar import AccountInactive, ISubmissionAccount, SubmissionAccount
from mailgw.accounts.checkers import APIKey

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


class KeyAuthenticator:
    """The account behind a request's API key, through the cred portal."""

    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    async def account(self, request) -> SubmissionAccount:
        key = presented_key(request)
        if key is None:
            raise InvalidAPIKey()
        try:
            _, avatar, _ = await self.portal.login(APIKey(key), None, ISubmissionAccount)
        except AccountInactive:
            raise InactiveAccount() from None
        except error.UnauthorizedLogin:
            raise InvalidAPIKey() from None
        return avatar
