"""API keys on the HTTP listener: Bearer or bare, wrong, revoked, a disabled account's."""

from twisted.cred.portal import Portal
from twisted.internet import task
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from mailgw import credentials
from mailgw.accounts.avatar import SubmissionAccount, SubmissionRealm
from mailgw.accounts.checkers import APIKeyChecker
from mailgw.http.auth import (
    MANAGE,
    READ,
    SEND,
    InactiveAccount,
    InvalidAPIKey,
    KeyAuthenticator,
    KeyNotAuthorized,
    authorize,
    presented_key,
)
from mailgw.store.accounts import KeyGrant
from tests.harness import DatabaseTestCase


def request_with(authorization: bytes | None) -> DummyRequest:
    request = DummyRequest([b"v1"])
    if authorization is not None:
        request.requestHeaders.setRawHeaders(b"authorization", [authorization])
    return request


class PresentedKeyTests(unittest.TestCase):
    def test_bearer_and_bare(self):
        for header in (b"Bearer mgw_abc", b"bearer  mgw_abc ", b"mgw_abc", b" mgw_abc"):
            self.assertEqual(presented_key(request_with(header)), "mgw_abc", header)

    def test_no_key(self):
        for header in (None, b"", b"Bearer", b"Bearer   ", b"\xff\xfe", b"k" * 600):
            self.assertIsNone(presented_key(request_with(header)), header)


class KeyAuthenticatorTests(DatabaseTestCase):
    async def setUp(self):
        await super().setUp()
        accounts = self.stores.accounts
        self.account = await accounts.create_account("acme")
        self.key = credentials.new_api_key()
        await accounts.create_api_key(self.account.id, "k", credentials.hash_api_key(self.key),
                                      credentials.api_key_prefix(self.key))
        self.authenticator = KeyAuthenticator(Portal(SubmissionRealm(accounts),
                                                     [APIKeyChecker(accounts)]))

    async def test_the_key_of_an_account(self):
        for header in (b"Bearer " + self.key.encode(), self.key.encode()):
            account = await self.authenticator.account(request_with(header))
            self.assertEqual((account.account_id, account.name), (self.account.id, "acme"))

    async def test_wrong_missing_and_revoked_keys(self):
        for header in (None, b"Bearer mgw_wrong", b"Bearer " + self.key.encode() + b"x"):
            with self.assertRaises(InvalidAPIKey):
                await self.authenticator.account(request_with(header))
        await self.sql("UPDATE api_keys SET revoked_at = now()")
        with self.assertRaises(InvalidAPIKey):
            await self.authenticator.account(request_with(self.key.encode()))

    async def test_a_disabled_accounts_key(self):
        await self.stores.accounts.update_account("acme", {}, {"active": False})
        with self.assertRaises(InactiveAccount):
            await self.authenticator.account(request_with(self.key.encode()))


class AuthorizeTests(unittest.TestCase):
    """H-1, H-3: what each key kind may do."""

    def account(self, kind, numid=None, can_send=True):
        return SubmissionAccount(1, "acme", "mgw_x", key=KeyGrant(
            1, kind, 9 if numid else None, numid, False, can_send))

    def test_kinds(self):
        allowed = {("account", SEND), ("account", READ), ("admin", SEND), ("admin", READ),
                   ("admin", MANAGE)}
        for kind in ("account", "admin"):
            for action in (SEND, READ, MANAGE):
                if (kind, action) in allowed:
                    authorize(self.account(kind), action)
                else:
                    self.assertRaises(KeyNotAuthorized, authorize, self.account(kind), action)

    def test_a_campaign_key_sends_for_its_campaign_only(self):
        key = self.account("campaign", numid=7)
        authorize(key, SEND, campaign_numid=7)
        for numid in (None, 8):
            self.assertRaises(KeyNotAuthorized, authorize, key, SEND, numid)
        for action in (READ, MANAGE):
            self.assertRaises(KeyNotAuthorized, authorize, key, action, 7)

    def test_a_key_that_may_not_send(self):
        self.assertRaises(KeyNotAuthorized, authorize, self.account("admin", can_send=False),
                          SEND)
        authorize(self.account("admin", can_send=False), MANAGE)

    def test_an_smtp_login_has_no_key(self):
        self.assertRaises(KeyNotAuthorized, authorize, SubmissionAccount(1, "acme", "u"), SEND)


class KeyCacheTests(DatabaseTestCase):
    async def setUp(self):
        await super().setUp()
        accounts = self.stores.accounts
        account = await accounts.create_account("acme")
        self.key = credentials.new_api_key()
        await accounts.create_api_key(account.id, "k", credentials.hash_api_key(self.key),
                                      credentials.api_key_prefix(self.key))
        self.clock = task.Clock()
        self.authenticator = KeyAuthenticator(
            Portal(SubmissionRealm(accounts), [APIKeyChecker(accounts)]), None, self.clock, 10)

    async def test_an_account_remembered_for_a_while(self):
        request = request_with(self.key.encode())
        await self.authenticator.account(request)
        await self.sql("UPDATE api_keys SET revoked_at = now()")
        self.clock.advance(9)
        self.assertEqual((await self.authenticator.account(request)).name, "acme")
        self.clock.advance(1)
        with self.assertRaises(InvalidAPIKey):
            await self.authenticator.account(request)

    async def test_forgotten_at_once_when_asked(self):
        request = request_with(self.key.encode())
        await self.authenticator.account(request)
        await self.sql("UPDATE api_keys SET revoked_at = now()")
        self.authenticator.forget_keys()
        with self.assertRaises(InvalidAPIKey):
            await self.authenticator.account(request)
