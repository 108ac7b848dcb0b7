"""The account avatar and the realm that makes it (S-4), for the SMTP and HTTP doors.

A checker (checkers.py) turns credentials into an avatar id, (account id,
username), and for an API key (account id, username, what the key may do); the
realm loads the account and returns its `SubmissionAccount`.
A login to a disabled account fails with `AccountInactive`, an UnauthorizedLogin
that a door can tell from wrong credentials (H-1: Current_service_is_not_active
against Invalid_API_Key).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from twisted.cred import error, portal
from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer

from mailgw.accounts.settings import AccountSettings
from mailgw.store.accounts import AccountStore, KeyGrant


class AccountInactive(error.UnauthorizedLogin):
    """The credentials are an account's, but the account is disabled."""


class ISubmissionAccount(Interface):
    account_id = Attribute("the account's id")


@implementer(ISubmissionAccount)
@dataclass(frozen=True)
class SubmissionAccount:
    """Who is sending: what the submission path needs to know about the account."""

    account_id: int
    name: str
    username: str
    settings: AccountSettings = field(default_factory=AccountSettings)
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None
    max_contacts: int | None = None
    sends_per_month: int | None = None
    # The API key it logged in with (kind, campaign); None for SMTP logins.
    key: KeyGrant | None = None

    def allows_client(self, address: str) -> bool:
        """S-4: an account with an allow-list accepts only clients inside it."""
        return self.allowed_networks is None or address_in(address, self.allowed_networks)


def address_in(address: str, networks) -> bool:
    """Whether the client address `address` lies in one of `networks` (S-4)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


@implementer(portal.IRealm)
class SubmissionRealm:
    def __init__(self, accounts: AccountStore) -> None:
        self.accounts = accounts

    def requestAvatar(self, avatar_id, mind, *interfaces):
        if ISubmissionAccount not in interfaces:
            raise NotImplementedError("only ISubmissionAccount avatars")
        return defer.ensureDeferred(self._avatar(*avatar_id))

    async def account_named(self, name: str, username: str) -> SubmissionAccount:
        """The avatar of a named account, for clients on trusted networks (S-4)."""
        account = await self.accounts.get_account(name)
        _, avatar, _ = await self._avatar(account.id, username)
        return avatar

    async def _avatar(self, account_id: int, username: str, key: KeyGrant | None = None):
        profile = await self.accounts.profile(account_id)
        if profile is None:
            raise error.UnauthorizedLogin()
        if not profile.active:
            raise AccountInactive()
        networks = profile.allowed_networks
        allowed = None if networks is None else tuple(
            ipaddress.ip_network(n, strict=False) for n in networks)
        avatar = SubmissionAccount(account_id, profile.name, username, profile.settings,
                                   allowed, profile.max_contacts, profile.sends_per_month, key)
        return ISubmissionAccount, avatar, lambda: None
