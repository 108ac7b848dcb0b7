"""SubmissionService against a real PostgreSQL."""

from twisted.internet import task, threads

from mailgw.accounts.avatar import SubmissionAccount
from mailgw.content.message import parse_message
from mailgw.store.submissions import QueuedRecipient
from mailgw.submit.service import (
    SENDER_CACHE_SECONDS,
    THREADED_HTML_CHARS,
    DisallowedSender,
    Submission,
    SubmissionService,
)
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
        self.in_threads = []
        self.service = SubmissionService(self.stores, "http://localhost:8080", self.clock,
                                         self.run_in_thread)

    def run_in_thread(self, fn, *args):
        self.in_threads.append(fn.__name__)
        return threads.deferToThread(fn, *args)

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

    async def test_text_from_big_html_written_in_a_thread(self):
        """html2text takes ~2 us a byte: the text part of a big HTML-only message is
        generated off the reactor, so that other sessions are served meanwhile."""
        paragraph = "<p>Oferta de <b>primavera</b></p>\n"
        for copies, threaded in ((10, []), (THREADED_HTML_CHARS // len(paragraph) + 1,
                                            ["apply_policy"])):
            del self.in_threads[:]
            raw = (b"From: a@example.org\r\nSubject: s\r\nContent-Type: text/html\r\n\r\n"
                   + paragraph.encode() * copies)
            stored = await self.service.submit(Submission(
                self.account, "smtp", "a@example.org",
                (QueuedRecipient("r@example.net", None),), parse_message(raw)))
            self.assertEqual(self.in_threads, threaded)
        context = (await self.stores.queue.messages([stored.message_id]))[stored.message_id]
        self.assertTrue(context.body["text"].startswith("Oferta de **primavera**\n\nOferta"))
