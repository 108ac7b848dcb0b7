"""Logging in to an account through the cred portal, against a real PostgreSQL."""

from twisted.cred import error
from twisted.cred.portal import Portal

from mailgw import credentials
from mailgw.accounts.avatar import AccountInactive, ISubmissionAccount, SubmissionRealm
from mailgw.accounts.checkers import APIKey, APIKeyChecker
from mailgw.accounts.settings import AccountSettings
from tests.harness import DatabaseTestCase


class APIKeyTests(DatabaseTestCase):
    async def setUp(self):
        await super().setUp()
        self.account = await self.stores.accounts.create_account("acme")
        await self.stores.accounts.update_account(
            "acme", AccountSettings.changes(archive=True), {"max_contacts": 50})
        self.key = credentials.new_api_key()
        await self.stores.accounts.create_api_key(self.account.id, "ci",
                                                  credentials.hash_api_key(self.key),
                                                  credentials.api_key_prefix(self.key))
        self.portal = Portal(SubmissionRealm(self.stores.accounts),
                             [APIKeyChecker(self.stores.accounts)])

    def login(self, key):
        return self.portal.login(APIKey(key), None, ISubmissionAccount)

    async def test_the_key_logs_in_as_its_account(self):
        for key in (self.key, self.key.encode()):
            interface, avatar, _ = await self.login(key)
            self.assertIs(interface, ISubmissionAccount)
            self.assertEqual((avatar.account_id, avatar.name, avatar.username),
                             (self.account.id, "acme", self.key[:8]))
            self.assertEqual((avatar.settings.archive, avatar.max_contacts), (True, 50))

    async def test_a_wrong_key_is_not_an_inactive_account(self):
        for key in (credentials.new_api_key(), self.key[:-1], "", b"\xff"):
            failure = await self.assertFailure(self.login(key), error.UnauthorizedLogin)
            self.assertNotIsInstance(failure, AccountInactive)

    async def test_a_revoked_key_is_a_wrong_key(self):
        await self.sql("UPDATE api_keys SET revoked_at = now()")
        failure = await self.assertFailure(self.login(self.key), error.UnauthorizedLogin)
        self.assertNotIsInstance(failure, AccountInactive)

    async def test_the_key_of_a_disabled_account(self):
        """H-1: the caller can answer Current_service_is_not_active, not Invalid_API_Key."""
        await self.stores.accounts.update_account("acme", {}, {"active": False})
        await self.assertFailure(self.login(self.key), AccountInactive)

    async def test_an_account_disabled_after_its_check(self):
        """The realm says so as well, when the account goes while its key is checked."""
        realm = SubmissionRealm(self.stores.accounts)
        await self.stores.accounts.update_account("acme", {}, {"active": False})
        await self.assertFailure(realm.requestAvatar((self.account.id, "k"), None,
                                                     ISubmissionAccount), AccountInactive)
        await self.assertFailure(realm.requestAvatar((self.account.id + 1, "k"), None,
                                                     ISubmissionAccount),
                                 error.UnauthorizedLogin)
