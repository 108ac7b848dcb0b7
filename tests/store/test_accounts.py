"""AccountStore and SenderStore against a real PostgreSQL."""

from mailgw import credentials
from mailgw.errors import AlreadyExists, NotFound
from tests.harness import DatabaseTestCase


class AccountStoreTests(DatabaseTestCase):
    async def test_create_and_list(self):
        created = await self.stores.accounts.create_account("acme", plan="pro")
        await self.stores.accounts.create_account("beta")
        self.assertEqual(created.plan, "pro")
        self.assertEqual(created.timezone, "America/Bogota")
        self.assertTrue(created.active)
        names = [a.name for a in await self.stores.accounts.list_accounts()]
        self.assertEqual(names, ["acme", "beta"])
        self.assertEqual(await self.stores.accounts.get_account("acme"), created)

    async def test_duplicate_account(self):
        await self.stores.accounts.create_account("acme")
        with self.assertRaises(AlreadyExists):
            await self.stores.accounts.create_account("acme")

    async def test_unknown_account(self):
        with self.assertRaises(NotFound):
            await self.stores.accounts.get_account("nobody")

    async def test_user_password_hash(self):
        account = await self.stores.accounts.create_account("acme")
        stored = credentials.hash_password("pw")
        await self.stores.accounts.create_user(account.id, "acme.pro", stored)
        self.assertEqual(await self.stores.accounts.password_hash_for("acme.pro"),
                         (account.id, stored))
        self.assertIsNone(await self.stores.accounts.password_hash_for("other"))
        with self.assertRaises(AlreadyExists):
            await self.stores.accounts.create_user(account.id, "acme.pro", stored)

    async def test_set_password_upserts_within_the_account(self):
        acme = await self.stores.accounts.create_account("acme")
        other = await self.stores.accounts.create_account("other")
        await self.stores.accounts.set_password(acme.id, "u", "h1")
        await self.stores.accounts.set_password(acme.id, "u", "h2")
        self.assertEqual(await self.stores.accounts.password_hash_for("u"), (acme.id, "h2"))
        with self.assertRaises(AlreadyExists):
            await self.stores.accounts.set_password(other.id, "u", "h3")

    async def test_api_key_lookup_by_hash(self):
        account = await self.stores.accounts.create_account("acme")
        key = credentials.new_api_key()
        await self.stores.accounts.create_api_key(account.id, "ci",
                                                  credentials.hash_api_key(key), key[:8])
        found, grant = await self.stores.accounts.api_key(credentials.hash_api_key(key))
        self.assertEqual(found, account)
        self.assertEqual((grant.kind, grant.campaign_id, grant.operator), ("account", None, False))
        self.assertIsNone(await self.stores.accounts.api_key("0" * 64))


class SenderStoreTests(DatabaseTestCase):
    async def setUp(self):
        await super().setUp()
        self.account = await self.stores.accounts.create_account("acme")

    async def test_domain_add_and_verify(self):
        domain = await self.stores.senders.add_domain(
            self.account.id, "Example.ORG", "s1", "rsa", "PEM", "PUB", "bounces.example.org")
        self.assertEqual(domain.domain, "example.org")
        self.assertIsNone(domain.verified_at)
        verified = await self.stores.senders.verify_domain(self.account.id, "example.org")
        self.assertIsNotNone(verified.verified_at)
        with self.assertRaises(AlreadyExists):
            await self.stores.senders.add_domain(self.account.id, "example.org", "s1", "rsa",
                                                 "PEM", "PUB", "b.example.org")
        with self.assertRaises(NotFound):
            await self.stores.senders.verify_domain(self.account.id, "other.org")

    async def test_sender_add_and_verify(self):
        sender = await self.stores.senders.add_sender(self.account.id, "News@Example.org",
                                                      verified=False)
        self.assertEqual(sender.address, "news@example.org")
        self.assertIsNone(sender.verified_at)
        verified = await self.stores.senders.verify_sender(self.account.id, "news@example.org")
        self.assertIsNotNone(verified.verified_at)
        ready = await self.stores.senders.add_sender(self.account.id, "a@example.org", True)
        self.assertIsNotNone(ready.verified_at)
        self.assertEqual([s.address for s in await self.stores.senders.list_senders(
            self.account.id)], ["a@example.org", "news@example.org"])
        with self.assertRaises(NotFound):
            await self.stores.senders.verify_sender(self.account.id, "x@example.org")
