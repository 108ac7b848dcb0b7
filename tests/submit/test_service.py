"""SubmissionService against a real PostgreSQL."""

from twisted.internet import task

from mailgw.smtp.auth import SubmissionAccount
from mailgw.submit.service import SENDER_CACHE_SECONDS, DisallowedSender, SubmissionService
from tests.harness import DatabaseTestCase


async def _unverify_txn(cursor, account_id):
    await cursor.execute("UPDATE senders SET verified_at = NULL WHERE account_id = %s",
                         (account_id,))


class CheckSenderTests(DatabaseTestCase):
    async def setUp(self):
        await super().setUp()
        account = await self.stores.accounts.create_account("acme")
        self.account = SubmissionAccount(account.id, "acme", "u")
        self.clock = task.Clock()
        self.service = SubmissionService(self.stores, "http://localhost:8080", self.clock)

    async def test_verified_sender_cached_for_a_while(self):
        await self.stores.senders.add_sender(self.account.account_id, "a@example.org", True)
        self.assertEqual(await self.service.check_sender(self.account, "A@example.org"),
                         "a@example.org")
        await self.database.run_interaction("unverify", _unverify_txn, self.account.account_id)
        # Within the cache time the answer comes without asking the database...
        self.assertEqual(await self.service.check_sender(self.account, "a@example.org"),
                         "a@example.org")
        # ...after it, the withdrawn verification counts.
        self.clock.advance(SENDER_CACHE_SECONDS + 1)
        with self.assertRaises(DisallowedSender):
            await self.service.check_sender(self.account, "a@example.org")

    async def test_refusals_are_not_cached(self):
        with self.assertRaises(DisallowedSender):
            await self.service.check_sender(self.account, "a@example.org")
        await self.stores.senders.add_sender(self.account.account_id, "a@example.org", True)
        self.assertEqual(await self.service.check_sender(self.account, "a@example.org"),
                         "a@example.org")

    async def test_not_an_address(self):
        with self.assertRaises(DisallowedSender):
            await self.service.check_sender(self.account, "not an address")
