"""The cred checkers that say which account credentials belong to (S-3, H-1).

One checker takes both kinds of username and password: an account user with
a password (Teenvio's `user.plan`), and a DMDS campaign credential
`dmdsid-<numid>` whose password is a campaign key of that campaign (an API key of
kind `campaign`).  Another takes the
account API keys of the HTTP API and the tracking statistics.  Each answers an
avatar id, (account id, username), for the realm (avatar.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from zope.interface import Attribute, implementer

from mailgw.accounts.avatar import AccountInactive
from mailgw.credentials import api_key_prefix, hash_api_key, verify_password
from mailgw.store.accounts import AccountStore, KeyGrant

CAMPAIGN_USER_PREFIX = "dmdsid-"


@implementer(ICredentialsChecker)
class AccountCredentialsChecker:
    """Checks users' passwords (scrypt, off the reactor) and campaign API keys."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, accounts: AccountStore,
                 run_in_thread: Callable[..., defer.Deferred[Any]]) -> None:
        self.accounts = accounts
        self.run_in_thread = run_in_thread

    def requestAvatarId(self, creds) -> defer.Deferred[tuple[int, str]]:
        return defer.ensureDeferred(self._check(creds))

    async def _check(self, creds) -> tuple[int, str]:
        username = _text(creds.username)
        password = _text(creds.password)
        if username is None or password is None:
            raise error.UnauthorizedLogin()
        if username.startswith(CAMPAIGN_USER_PREFIX):
            numid = username[len(CAMPAIGN_USER_PREFIX):]
            # ASCII digits only: int() reads "٣" as 3 and str.isdigit() takes "²", which
            # int() refuses.
            if numid.isascii() and numid.isdigit():
                # The password is one of the campaign's keys (H-2: its camp_apikey, or
                # another campaign key of it), found by its digest like any API key.
                found = await self.accounts.api_key(hash_api_key(password))
                if found is not None:
                    account, grant = found
                    if (account.active and grant.kind == "campaign"
                            and grant.campaign_numid == int(numid)):
                        return account.id, username
            raise error.UnauthorizedLogin()
        found = await self.accounts.password_hash_for(username)
        stored = found[1] if found else _DUMMY_HASH  # same work for unknown users
        if await self.run_in_thread(verify_password, password, stored) and found:
            return found[0], username
        raise error.UnauthorizedLogin()


class IAPIKey(credentials.ICredentials):
    key = Attribute("the API key the caller presented (text, or UTF-8 bytes)")


@implementer(IAPIKey)
@dataclass(frozen=True)
class APIKey:
    key: bytes | str


@implementer(ICredentialsChecker)
class APIKeyChecker:
    """Checks API keys of every kind: the key is found by its SHA-256 digest (an indexed
    lookup that compares no secret byte by byte, so its time tells nothing of the
    key).  An unknown or revoked key is UnauthorizedLogin; the key of a disabled
    account, AccountInactive."""

    credentialInterfaces = (IAPIKey,)

    def __init__(self, accounts: AccountStore) -> None:
        self.accounts = accounts

    def requestAvatarId(self, creds) -> defer.Deferred[tuple[int, str, KeyGrant]]:
        return defer.ensureDeferred(self._check(creds))

    async def _check(self, creds) -> tuple[int, str, KeyGrant]:
        key = _text(creds.key)
        if not key:
            raise error.UnauthorizedLogin()
        found = await self.accounts.api_key(hash_api_key(key))
        if found is None:
            raise error.UnauthorizedLogin()
        account, grant = found
        if not account.active:
            raise AccountInactive()
        # No username: the key's first characters name it, as in api_keys.key_prefix; and
        # what the key may do, which the HTTP apps check (http/auth.py).
        return account.id, api_key_prefix(key), grant


# A real scrypt hash of a random password: unknown users cost as much as known ones.
_DUMMY_HASH = ("scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$"
               "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")


def _text(value: bytes | str | None) -> str | None:
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8") if value is not None else None
    except UnicodeDecodeError:
        return None
