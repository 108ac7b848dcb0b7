"""SubmissionService against a real PostgreSQL."""

import dataclasses

from twisted.internet import task, threads

from mailgw.accounts.avatar import SubmissionAccount
from mailgw.accounts.settings import AccountSettings
from mailgw.content.message import parse_message
from mailgw.submit.errors import (
    BadTemplateVariables,
    ContactQuotaExhausted,
    ContentNotAccepted,
    DisallowedSender,
    SendQuotaExhausted,
    UnknownTemplate,
)
from mailgw.submit.recipients import Recipient
from mailgw.submit.service import (
    SENDER_CACHE_SECONDS,
    THREADED_HTML_CHARS,
    Submission,
    SubmissionService,
)
from tests.harness import DatabaseTestCase, log_lines

PLAIN = b"From: a@example.org\r\nSubject: s\r\nContent-Type: text/plain\r\n\r\nHello\r\n"


async def _unverify_txn(cursor, account_id):
    await cursor.execute("UPDATE senders SET verified_at = NULL WHERE account_id = %s",
                         (account_id,))


class ServiceTestCase(DatabaseTestCase):
    """The service, for the account acme."""

    async def setUp(self):
        await super().setUp()
        account = await self.stores.accounts.create_account("acme")
        self.account = SubmissionAccount(account.id, "acme", "u")
        self.clock = task.Clock()
        self.service = SubmissionService(self.stores, "http://localhost:8080", self.clock,
                                         self.run_in_thread)

    def run_in_thread(self, fn, *args):
        return threads.deferToThread(fn, *args)


class CheckSenderTests(ServiceTestCase):
    async def setUp(self):
        self.in_threads = []
        await super().setUp()

    def run_in_thread(self, fn, *args):
        self.in_threads.append(fn.__name__)
        return super().run_in_thread(fn, *args)

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
                (Recipient("r@example.net"),), parse_message(raw)))
            self.assertEqual(self.in_threads, threaded)
        context = (await self.stores.queue.messages([stored.message_id]))[stored.message_id]
        self.assertTrue(context.body["text"].startswith("Oferta de **primavera**\n\nOferta"))


class RefusalTests(ServiceTestCase):
    """The doors see only the submission path's refusals, whichever layer refused."""

    def from_mime(self, raw, account=None):
        imports = self.service.recipient_imports(account or self.account, "g", "smtp",
                                                 "a@example.org")
        self.addCleanup(imports.close)
        return Submission.from_mime(account or self.account, "smtp", "a@example.org", raw,
                                    imports, "192.0.2.7")

    async def test_content(self):
        with self.assertRaises(ContentNotAccepted) as refused:
            self.from_mime(b"Subject: s\r\nX-Mailgw-Category: \x01\r\n\r\nx")
        self.assertIn("Category must be a category name", str(refused.exception))
        strict = dataclasses.replace(self.account, settings=AccountSettings(multipart="strict"))
        with self.assertRaises(ContentNotAccepted) as refused:
            await self.service.submit(self.from_mime(PLAIN, strict))
        self.assertEqual(str(refused.exception),
                         "message needs a text/plain and a text/html part")

    async def test_switch_value_it_does_not_take_is_logged_not_refused(self):
        """S-9 (Teenvio): `X-Teenvio-TrackingOpening: off` is no reason for a 554; the
        default applies and the operator reads why."""
        lines = log_lines(self)
        submission = self.from_mime(b"Subject: s\r\nX-Teenvio-TrackingOpening: off\r\n"
                                    b"X-Teenvio-Language: 99\r\n\r\nHello\r\n")
        submission.imports.add(Recipient("r@example.net"))
        stored = await self.service.submit(submission)
        options = await self.sql("SELECT options FROM messages WHERE id = %s",
                                 stored.message_id)
        self.assertEqual((options[0][0]["track_opens"], options[0][0]["language"]),
                         (True, None))
        self.assertIn("message of account acme (smtp): X-Teenvio-TrackingOpening: 'off' is "
                      "not a value it takes; the default applies", lines)
        self.assertIn("message of account acme (smtp): X-Teenvio-Language: '99' is not a "
                      "value it takes; the default applies", lines)

    async def test_templates(self):
        with self.assertRaises(BadTemplateVariables) as refused:
            self.from_mime(b"Subject: *|tid:t1|* s\r\n\r\n[1]")
        self.assertTrue(str(refused.exception).startswith(
            "template variables are not a valid JSON object"))
        with self.assertRaises(UnknownTemplate) as refused:
            await self.service.submit(self.from_mime(b"Subject: *|tid:nope|* s\r\n\r\nnull"))
        self.assertEqual(str(refused.exception), "unknown template nope")

    async def test_quotas(self):
        for limits, refusal in (({"sends_per_month": 0}, SendQuotaExhausted),
                                ({"max_contacts": 0}, ContactQuotaExhausted)):
            submission = self.from_mime(PLAIN, dataclasses.replace(self.account, **limits))
            submission.imports.add(Recipient("r@example.net"))
            with self.assertRaises(refusal):
                await self.service.submit(submission)
        full = dataclasses.replace(self.account, max_contacts=0)
        with self.assertRaises(ContactQuotaExhausted):
            await self.service.recipient_imports(full, "g", "smtp", "a@example.org").add_now(
                Recipient("s@example.net"))


class RecipientKindTests(ServiceTestCase):
    async def kinds(self, stored):
        return await self.sql("SELECT recipient, kind FROM deliveries WHERE message_id = %s"
                              " ORDER BY recipient", stored.message_id)

    async def test_each_recipient_sent_as_its_kind(self):
        """Copies and blind copies (the HTTP dialects) reach the queue as such."""
        recipients = (Recipient("a@example.net"), Recipient("b@example.net", "cc"),
                      Recipient("c@example.net", "bcc"))
        stored = await self.service.submit(Submission(
            self.account, "api", "a@example.org", recipients, parse_message(PLAIN)))
        self.assertEqual(await self.kinds(stored), [
            ("a@example.net", "to"), ("b@example.net", "cc"), ("c@example.net", "bcc")])

    async def test_imported_recipients_keep_their_kind(self):
        for hold_seconds in (60, 0):  # committed with the message, or on their own first
            imports = self.service.recipient_imports(self.account, f"g{hold_seconds}",
                                                     "smtp", "a@example.org")
            imports.add(Recipient("a@example.net"))
            imports.add(Recipient("b@example.net", "cc"))
            if not hold_seconds:
                imports.flush()
            stored = await self.service.submit(Submission.from_mime(
                self.account, "smtp", "a@example.org", PLAIN, imports, "192.0.2.7"))
            self.assertEqual(await self.kinds(stored), [("a@example.net", "to"),
                                                        ("b@example.net", "cc")])

    async def test_given_recipients_become_contacts_of_a_group_with_the_message(self):
        """The HTTP doors give recipients, not imports: they are imported in the message's
        own transaction, into a group of the door's origin, suppressions looked up."""
        await self.stores.suppressions.add(self.account.account_id, "b@example.net")
        stored = await self.service.submit(Submission(
            self.account, "api", "a@example.org",
            (Recipient("a@example.net"), Recipient("b@example.net", "cc")),
            parse_message(PLAIN), msgids=True))
        rows = await self.sql(
            "SELECT d.recipient, d.state, d.msgid::text, g.name LIKE 'API %%', g.origin"
            " FROM deliveries d JOIN group_members m ON m.contact_id = d.contact_id"
            " JOIN groups g ON g.id = m.group_id ORDER BY d.recipient")
        self.assertEqual(rows, [
            ("a@example.net", "queued", stored.msgids[0][1], True, "api"),
            ("b@example.net", "not_sent", stored.msgids[1][1], True, "api")])
        self.assertEqual([email for email, _ in stored.msgids], ["a@example.net",
                                                                  "b@example.net"])
        smtp = await self.service.submit(Submission(
            self.account, "smtp", "a@example.org", (Recipient("c@example.net"),),
            parse_message(PLAIN)))
        self.assertEqual(smtp.msgids, ())
        self.assertEqual(await self.sql("SELECT msgid FROM deliveries WHERE recipient ="
                                        " 'c@example.net'"), [(None,)])


class DMDSBatchTests(ServiceTestCase):
    """What the DMDS door asks of a submission (H-2): its campaign, a send (eeid) it
    joins, one group for several submissions, and archiving whatever the account says."""

    async def test_a_second_submission_joins_the_first_ones_send_and_group(self):
        (campaign_id,) = (await self.sql(
            "INSERT INTO campaigns (account_id, type) VALUES (%s, 'api') RETURNING id",
            self.account.account_id))[0]
        first = await self.service.submit(Submission(
            self.account, "dmds", "a@example.org", (Recipient("a@example.net"),),
            parse_message(PLAIN), campaign_id=campaign_id, group_name="DMDS call 1"))
        [(send_id, eeid, archive)] = await self.sql(
            "SELECT id, eeid::text, archive FROM sends WHERE campaign_id = %s", campaign_id)
        self.assertEqual((first.eeid, archive), (eeid, False))
        second = await self.service.submit(Submission(
            self.account, "dmds", "a@example.org", (Recipient("b@example.net"),),
            parse_message(PLAIN), campaign_id=campaign_id, group_name="DMDS call 1",
            send_id=send_id, eeid=eeid, archive=True))
        self.assertEqual((second.send_id, second.eeid), (send_id, eeid))
        self.assertEqual(await self.sql("SELECT count(*), bool_and(archive) FROM sends"),
                         [(1, True)])
        self.assertEqual(await self.sql(
            "SELECT g.name, count(*) FROM groups g JOIN group_members m ON m.group_id = g.id"
            " GROUP BY g.name"), [("DMDS call 1", 2)])
