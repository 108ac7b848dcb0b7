"""The delivery queue against a real PostgreSQL: claims, leases, outcomes (D-1, D-5, D-7)."""

import uuid

import psycopg2
from twisted.internet import defer, reactor

from mailgw.errors import NotFound
from mailgw.store import Stores
from mailgw.store.database import Database
from mailgw.store.queue import Outcome
from mailgw.store.queue_admin import (
    MAX_LISTED,
    MAX_REASON_LENGTH,
    BadQueueRequest,
    QueueActionRefused,
    QueueFilter,
)
from mailgw.store.submissions import QueuedRecipient, SubmissionRecord
from tests.harness import DatabaseTestCase


class QueueTestCase(DatabaseTestCase):
    """The account acme with a sender domain, and deliveries to submit."""

    async def setUp(self):
        await super().setUp()
        self.account = await self.stores.accounts.create_account("acme")
        await self.stores.senders.add_domain(self.account.id, "example.org", "s1", "rsa", "PEM",
                                             "PUB", "bounces.example.org")
        self.queue = self.stores.queue

    async def submit(self, *emails, options=None):
        recipients = []
        for email in emails:
            contact = await self.sql("INSERT INTO contacts (account_id, email) VALUES (%s, %s)"
                                     " ON CONFLICT (account_id, email) DO UPDATE"
                                     " SET email = EXCLUDED.email RETURNING id",
                                     self.account.id, email)
            recipients.append(QueuedRecipient(email, contact[0][0]))
        return await self.stores.submissions.store(SubmissionRecord(
            account_id=self.account.id, origin="smtp", message_uid=uuid.uuid4().hex,
            sender="news@example.org", subject="s", html="<p>x</p>",
            body={"subject": "s", "html": "<p>x</p>", "text": "x"},
            options=options or {}, recipients=tuple(recipients)))


class QueueTests(QueueTestCase):
    async def test_concurrent_claims_never_share_a_row(self):
        await self.submit(*[f"r{i}@example.net" for i in range(30)])
        first, second = await defer.gatherResults([
            defer.ensureDeferred(self.queue.claim("node-a", 20, 300)),
            defer.ensureDeferred(self.queue.claim("node-b", 20, 300))])
        ids_a, ids_b = {d.id for d in first}, {d.id for d in second}
        self.assertEqual(len(ids_a) + len(ids_b), 30)
        self.assertEqual(ids_a & ids_b, set())
        self.assertEqual(await self.queue.claim("node-c", 20, 300), [])

    async def test_claim_carries_what_rendering_needs(self):
        stored = await self.submit("a@example.net")
        (claimed,) = await self.queue.claim("node-a", 10, 300)
        self.assertEqual((claimed.recipient, claimed.attempts, claimed.send_id),
                         ("a@example.net", 1, stored.send_id))
        self.assertIsNone(claimed.suppressed)
        contexts = await self.queue.messages([claimed.message_id])
        context = contexts[claimed.message_id]
        self.assertEqual(context.body["html"], "<p>x</p>")
        self.assertEqual((context.dkim_domain, context.dkim_selector, context.return_path_domain),
                         ("example.org", "s1", "bounces.example.org"))

    async def test_expired_lease_is_claimed_again(self):
        await self.submit("a@example.net")
        (first,) = await self.queue.claim("node-a", 10, 300)
        await self.sql("UPDATE deliveries SET lease_expires_at = now() - interval '1 second'")
        (again,) = await self.queue.claim("node-b", 10, 300)
        self.assertEqual((again.id, again.attempts), (first.id, 2))
        # node-a's late result no longer counts.
        self.assertFalse(await self.queue.record("node-a", Outcome(first.id, "sent", "250"), 2))
        self.assertTrue(await self.queue.record("node-b", Outcome(first.id, "sent", "250 ok"),
                                                2))
        rows = await self.sql("SELECT state, last_reply, lease_owner FROM deliveries")
        self.assertEqual(rows, [("sent", "250 ok", None)])
        events = await self.sql("SELECT type, details FROM events WHERE type = 'sent'")
        self.assertEqual(events, [("sent", {"reply": "250 ok"})])

    async def test_an_outcome_with_a_nul_is_recorded(self):
        """Not only remote replies: our own texts (a host name from DNS in a connection
        error) may carry a NUL, which PostgreSQL refuses in text and in jsonb."""
        await self.submit("a@example.net")
        (claimed,) = await self.queue.claim("node-a", 10, 300)
        self.assertTrue(await self.queue.record("node-a", Outcome(
            claimed.id, "deferred", "cannot connect to mx\x00.example.net", retry_in=60.0), 2))
        rows = await self.sql("SELECT state, last_reply FROM deliveries")
        self.assertEqual(rows, [("deferred", "cannot connect to mx .example.net")])
        events = await self.sql("SELECT details FROM events WHERE type = 'deferred'")
        self.assertEqual(events, [({"reply": "cannot connect to mx .example.net"},)])

    async def test_deferred_waits_for_its_retry_time(self):
        await self.submit("a@example.net")
        (claimed,) = await self.queue.claim("node-a", 10, 300)
        await self.queue.record("node-a", Outcome(claimed.id, "deferred", "451 later",
                                                  retry_in=300.0), 2)
        self.assertEqual(await self.queue.claim("node-a", 10, 300), [])
        await self.sql("UPDATE deliveries SET next_attempt_at = now()")
        (retry,) = await self.queue.claim("node-a", 10, 300)
        self.assertEqual(retry.attempts, 2)

    async def test_hard_bounces_invalidate_unless_whitelisted(self):
        for _ in range(2):
            await self.submit("gone@example.net", "kept@example.net")
        await self.sql("UPDATE contacts SET whitelisted = true WHERE email = 'kept@example.net'")
        for claimed in await self.queue.claim("node-a", 10, 300):
            await self.queue.record("node-a", Outcome(claimed.id, "bounced", "550 no such user",
                                                      bounce_type="hard"), 2)
        rows = await self.sql("SELECT email, hard_bounces, invalid FROM contacts ORDER BY email")
        self.assertEqual(rows, [("gone@example.net", 2, True), ("kept@example.net", 2, False)])
        invalidated = await self.sql("SELECT recipient FROM events WHERE type = 'invalidated'")
        self.assertEqual(invalidated, [("gone@example.net",)])
        # The next message to the invalidated contact is not sent (D-6).
        await self.submit("gone@example.net")
        (claimed,) = await self.queue.claim("node-a", 10, 300)
        self.assertEqual(claimed.suppressed, "invalid")

    async def test_suppression_added_after_submission(self):
        await self.submit("a@example.net")
        await self.sql("INSERT INTO suppressions (account_id, address, scope_domain, reason)"
                       " VALUES (%s, 'a@example.net', 'example.org', 'unsubscribed')",
                       self.account.id)
        (claimed,) = await self.queue.claim("node-a", 10, 300)
        self.assertEqual(claimed.suppressed, "unsubscribed")

    async def test_suppression_matches_a_recipient_written_in_capitals(self):
        """Recipients are queued as written (RFC 5321 2.4); suppressions are keyed, as
        contacts, by the lowercased address."""
        (contact,) = await self.sql("INSERT INTO contacts (account_id, email)"
                                    " VALUES (%s, 'ana@example.net') RETURNING id",
                                    self.account.id)
        await self.stores.submissions.store(SubmissionRecord(
            account_id=self.account.id, origin="smtp", message_uid=uuid.uuid4().hex,
            sender="news@example.org", subject="s", html=None, body={"text": "x"},
            recipients=(QueuedRecipient("Ana@example.net", contact[0]),)))
        await self.sql("INSERT INTO suppressions (account_id, address, reason)"
                       " VALUES (%s, 'ana@example.net', 'unsubscribed')", self.account.id)
        (claimed,) = await self.queue.claim("node-a", 10, 300)
        self.assertEqual((claimed.recipient, claimed.suppressed),
                         ("Ana@example.net", "unsubscribed"))

    async def test_suppressions_by_sender_domain_and_category(self):
        """D-6: an unsubscribe counts for its sender domain (or all of them) and its
        category (or all of them), nothing wider."""
        for scope_domain, category, address in (
                ("example.org", "Ofertas", "cat@example.net"),
                ("other.example", None, "elsewhere@example.net"),
                ("example.org", None, "domain@example.net")):
            await self.sql("INSERT INTO suppressions (account_id, address, scope_domain,"
                           " category, reason) VALUES (%s, %s, %s, %s, 'unsubscribed')",
                           self.account.id, address, scope_domain, category)
        addresses = ("cat@example.net", "elsewhere@example.net", "domain@example.net")
        for category in ("Ofertas", "Noticias", None):
            await self.submit(*addresses, options={"category": category} if category else {})
        claimed = await self.queue.claim("node-a", 20, 300)
        suppressed = {(d.recipient, d.message_id): d.suppressed for d in claimed}
        offers, news, plain = sorted({d.message_id for d in claimed})
        self.assertEqual(
            [suppressed[(address, message)] for message in (offers, news, plain)
             for address in addresses],
            ["unsubscribed", None, "unsubscribed"] + [None, None, "unsubscribed"] * 2)

    async def test_release_gives_leases_back(self):
        await self.submit("a@example.net", "b@example.net")
        await self.queue.claim("node-a", 10, 300)
        self.assertEqual(await self.queue.release("node-a"), 2)
        again = await self.queue.claim("node-b", 10, 300)
        self.assertEqual([d.attempts for d in again], [1, 1])

    async def test_release_keeps_the_leases_asked_for(self):
        await self.submit("a@example.net", "b@example.net")
        sending, _ = await self.queue.claim("node-a", 10, 300)
        self.assertEqual(await self.queue.release("node-a", [sending.id]), 1)
        (again,) = await self.queue.claim("node-b", 10, 300)
        self.assertNotEqual(again.id, sending.id)

    async def test_renewal_extends_only_the_owners_leases(self):
        await self.submit("a@example.net", "b@example.net")
        mine, lost = await self.queue.claim("node-a", 10, 30)
        await self.sql("UPDATE deliveries SET lease_owner = 'node-b' WHERE id = %s", lost.id)
        await self.sql("UPDATE deliveries SET lease_expires_at = now() + interval '1 second'")
        self.assertEqual(await self.queue.renew("node-a", [mine.id, lost.id], 30), 1)
        rows = await self.sql("SELECT id, lease_expires_at > now() + interval '29 seconds'"
                              " FROM deliveries ORDER BY id")
        self.assertEqual(rows, [(mine.id, True), (lost.id, False)])

    async def with_one_row_locked(self, leases):
        """`leases(locked, free)` while another transaction holds the first of two claimed
        deliveries, as a batch writing its outcome would; its result."""
        await self.submit("a@example.net", "b@example.net")
        locked, free = await self.queue.claim("node-a", 10, 30)
        other = psycopg2.connect(self.dsn)
        self.addCleanup(other.close)
        with other.cursor() as cursor:
            cursor.execute("SELECT id FROM deliveries WHERE id = %s FOR UPDATE", (locked.id,))
            result = await leases(locked, free)
        other.rollback()
        return result

    # Without SKIP LOCKED these wait for the other transaction, which the test holds.
    async def test_renewal_skips_a_row_being_recorded(self):
        """Its outcome ends the lease anyway; waiting for it could deadlock."""
        renewed = await self.with_one_row_locked(
            lambda locked, free: self.queue.renew("node-a", [locked.id, free.id], 30))
        self.assertEqual(renewed, 1)

    test_renewal_skips_a_row_being_recorded.timeout = 15  # type: ignore[attr-defined]

    async def test_release_skips_a_row_being_recorded(self):
        """A graceful stop releases its leases while outcomes may still be written."""
        released = await self.with_one_row_locked(
            lambda locked, free: self.queue.release("node-a"))
        self.assertEqual(released, 1)

    test_release_skips_a_row_being_recorded.timeout = 15  # type: ignore[attr-defined]

    async def test_age_counts_from_queueing(self):
        """Like Postfix's maximal_queue_lifetime: time waiting for a first attempt counts."""
        await self.submit("a@example.net")
        await self.sql("UPDATE deliveries SET created_at = now() - interval '1 day'")
        (first,) = await self.queue.claim("node-a", 10, 300)
        await self.queue.record("node-a", Outcome(first.id, "deferred", "451 later",
                                                  retry_in=0.0), 2)
        (retry,) = await self.queue.claim("node-a", 10, 300)
        for claimed in (first, retry):
            self.assertGreaterEqual(claimed.age, 24 * 3600)
            self.assertLess(claimed.age, 24 * 3600 + 60)


class QueueAdminTests(QueueTestCase):
    """O-7: what `mailgw queue` and the management API do, against the queue itself."""

    async def setUp(self):
        await super().setUp()
        self.admin = self.stores.queue_admin

    async def deferred(self, *emails, retry_in=3600.0):
        """Deliveries to `emails`, each attempted once and deferred for `retry_in`."""
        await self.submit(*emails)
        claimed = await self.queue.claim("node-a", 100, 300)
        for delivery in claimed:
            await self.queue.record("node-a", Outcome(delivery.id, "deferred",
                                                      "451 4.7.1 try later",
                                                      retry_in=retry_in), 2)
        return sorted(claimed, key=lambda d: d.recipient)

    async def test_counts_by_state_account_and_domain(self):
        await self.deferred("a@example.net", "b@example.net", "c@other.example")
        await self.submit("d@example.net")
        beta = await self.stores.accounts.create_account("beta")
        await self.sql("UPDATE deliveries SET account_id = %s WHERE recipient = 'c@other.example'",
                       beta.id)
        await self.sql("UPDATE deliveries SET state = 'sent' WHERE recipient = 'b@example.net'")
        counts = await self.admin.counts()
        self.assertEqual([(c.state, c.account, c.domain, c.deliveries) for c in counts],
                         [("deferred", "acme", "example.net", 1),
                          ("deferred", "beta", "other.example", 1),
                          ("queued", "acme", "example.net", 1)])
        self.assertEqual([(c.account, c.deliveries) for c in await self.admin.counts(
            QueueFilter(state="sent"))], [("acme", 1)])
        self.assertEqual([c.domain for c in await self.admin.counts(
            QueueFilter(account="beta"))], ["other.example"])
        self.assertEqual([c.state for c in await self.admin.counts(
            QueueFilter(domain="EXAMPLE.NET."))], ["deferred", "queued"])
        self.assertEqual(await self.admin.counts(QueueFilter(domain="nowhere.example")), [])
        listed = await self.admin.deliveries(QueueFilter(domain="example.net"), limit=10)
        self.assertEqual([d.recipient for d in listed], ["d@example.net", "a@example.net"])

    async def test_filters_that_can_match_nothing_are_refused(self):
        """Issue 16, point 6: a clear message, not an empty answer to a typo."""
        for which, message in ((QueueFilter(state="failed"), "state must be one of"),
                               (QueueFilter(domain="*"), "not a domain name: '*'"),
                               (QueueFilter(domain="example"), "not a domain name"),
                               (QueueFilter(domain="a..example"), "not a domain name"),
                               (QueueFilter(domain="-a.example"), "not a domain name"),
                               (QueueFilter(account=" "), "account must be")):
            error = await self.assertFailure(defer.ensureDeferred(self.admin.counts(which)),
                                             BadQueueRequest)
            self.assertIn(message, str(error))
        with self.assertRaises(NotFound) as caught:
            await self.admin.counts(QueueFilter(account="nobody"))
        self.assertEqual(str(caught.exception), "no account named 'nobody'")
        for limit in (0, -5, MAX_LISTED + 1):
            with self.assertRaises(BadQueueRequest):
                await self.admin.deliveries(limit=limit)

    async def test_show_has_every_attempt_with_its_reply(self):
        (first,) = await self.deferred("a@example.net")
        await self.admin.retry(first.id)
        (second,) = await self.queue.claim("node-a", 10, 300)
        await self.queue.record("node-a", Outcome(second.id, "sent", "250 2.0.0 queued as X"),
                                2)
        shown = await self.admin.show(first.id)
        self.assertEqual((shown.delivery.state, shown.delivery.attempts, shown.sender,
                          shown.delivery.account), ("sent", 2, "news@example.org", "acme"))
        self.assertEqual([(e.type, e.details) for e in shown.events],
                         [("queued", {}), ("deferred", {"reply": "451 4.7.1 try later"}),
                          ("sent", {"reply": "250 2.0.0 queued as X"})])
        with self.assertRaises(NotFound):
            await self.admin.show(first.id + 100)

    async def test_retry_one_now(self):
        (delivery,) = await self.deferred("a@example.net")
        self.assertEqual(await self.queue.claim("node-a", 10, 300), [])
        retried = await self.admin.retry(delivery.id)
        self.assertEqual((retried.state, retried.held, retried.sending), ("deferred", False,
                                                                         False))
        (again,) = await self.queue.claim("node-a", 10, 300)
        self.assertEqual((again.id, again.attempts), (delivery.id, 2))

    async def test_retry_of_what_is_not_waiting_changes_nothing(self):
        (sent,) = await self.deferred("a@example.net")
        await self.sql("UPDATE deliveries SET state = 'sent', last_reply = '250 ok'")
        before = await self.sql("SELECT * FROM deliveries")
        with self.assertRaises(QueueActionRefused) as caught:
            await self.admin.retry(sent.id)
        self.assertEqual(str(caught.exception), f"delivery {sent.id} is sent (250 ok): it is "
                         "not in the queue, nothing to retry")
        self.assertEqual(await self.sql("SELECT * FROM deliveries"), before)
        await self.submit("b@example.net")
        (sending,) = await self.queue.claim("node-a", 10, 300)
        with self.assertRaises(QueueActionRefused) as caught:
            await self.admin.retry(sending.id)
        self.assertIn("is being attempted now", str(caught.exception))
        with self.assertRaises(NotFound):
            await self.admin.retry(sending.id + 100)

    async def test_retry_everything_deferred_for_a_domain(self):
        await self.deferred("a@example.net", "b@example.net", "c@other.example")
        self.assertEqual(await self.admin.retry_domain("Example.NET"), 2)
        self.assertEqual(sorted(d.recipient for d in await self.queue.claim("node-a", 10, 300)),
                         ["a@example.net", "b@example.net"])
        with self.assertRaises(QueueActionRefused) as caught:
            await self.admin.retry_domain("nowhere.example")
        self.assertEqual(str(caught.exception),
                         "no deferred deliveries to nowhere.example: nothing to retry")
        with self.assertRaises(BadQueueRequest):
            await self.admin.retry_domain("not a domain")

    async def test_cancel_records_not_sent_with_the_reason(self):
        (delivery,) = await self.deferred("a@example.net")
        cancelled = await self.admin.cancel(delivery.id, "customer asked\nto stop")
        self.assertEqual((cancelled.state, cancelled.last_reply),
                         ("not_sent", "cancelled by the operator: customer asked to stop"))
        events = await self.sql("SELECT type, details, recipient FROM events"
                                " WHERE delivery_id = %s ORDER BY id DESC LIMIT 1", delivery.id)
        self.assertEqual(events, [("not_sent", {"reason": "cancelled by the operator: customer"
                                                " asked to stop"}, "a@example.net")])
        await self.sql("UPDATE deliveries SET next_attempt_at = now()")
        self.assertEqual(await self.queue.claim("node-a", 10, 300), [])
        with self.assertRaises(QueueActionRefused) as caught:
            await self.admin.cancel(delivery.id)
        self.assertIn("is not_sent (cancelled by the operator: customer asked to stop)",
                      str(caught.exception))
        await self.submit("b@example.net")
        (sending,) = await self.queue.claim("node-a", 10, 300)
        with self.assertRaises(QueueActionRefused):
            await self.admin.cancel(sending.id, "x")
        with self.assertRaises(BadQueueRequest):
            await self.admin.cancel(sending.id, "x" * (MAX_REASON_LENGTH + 1))
        self.assertEqual(await self.sql("SELECT state FROM deliveries WHERE id = %s",
                                        sending.id), [("queued",)])

    async def test_suspended_domain_is_held_on_every_node_until_resumed(self):
        """Held, not bounced: not claimed, no attempt counted, whatever its age; a node
        on its own pool (another node, or after a restart) holds it too; a message
        queued during the suspension is held as well."""
        await self.deferred("a@example.net", retry_in=0.0)
        await self.submit("b@example.net", "c@other.example")
        await self.sql("UPDATE deliveries SET created_at = now() - interval '30 days'")
        suspended = await self.admin.suspend("example.net", "their MX is down")
        self.assertEqual((suspended.domain, suspended.reason, suspended.held),
                         ("example.net", "their MX is down", 2))
        other_node = Database(self.dsn, 1, reactor)
        await other_node.start()
        self.addCleanup(other_node.close)
        other_queue = Stores.on(other_node).queue
        self.assertEqual([d.recipient for d in await other_queue.claim("node-b", 10, 300)],
                         ["c@other.example"])
        await self.submit("d@example.net")
        self.assertEqual(await self.queue.claim("node-a", 10, 300), [])
        rows = await self.sql("SELECT recipient, attempts, next_attempt_at = 'infinity'"
                              " FROM deliveries WHERE recipient LIKE '%%@example.net'"
                              " ORDER BY recipient")
        self.assertEqual(rows, [("a@example.net", 1, True), ("b@example.net", 0, True),
                                ("d@example.net", 0, True)])
        (listed,) = await self.admin.suspended()
        self.assertEqual((listed.domain, listed.held), ("example.net", 3))
        self.assertEqual(await self.admin.resume("example.net"), 3)
        resumed = await other_queue.claim("node-b", 10, 300)
        self.assertEqual(sorted((d.recipient, d.attempts) for d in resumed),
                         [("a@example.net", 2), ("b@example.net", 1), ("d@example.net", 1)])

    async def test_suspend_and_resume_refuse_what_changes_nothing(self):
        await self.submit("a@example.net")
        await self.admin.suspend("example.net")
        with self.assertRaises(QueueActionRefused) as caught:
            await self.admin.suspend("EXAMPLE.net")
        self.assertIn("example.net is already suspended (since ", str(caught.exception))
        (delivery_id,) = (await self.sql("SELECT id FROM deliveries"))[0]
        with self.assertRaises(QueueActionRefused) as caught:
            await self.admin.retry(delivery_id)
        self.assertIn("is held: example.net is suspended", str(caught.exception))
        with self.assertRaises(QueueActionRefused):
            await self.admin.retry_domain("example.net")
        self.assertEqual(await self.admin.resume("example.net"), 1)
        with self.assertRaises(QueueActionRefused) as caught:
            await self.admin.resume("example.net")
        self.assertEqual(str(caught.exception), "example.net is not suspended")
        for bad in ("", "example", "ex ample.net", "a@example.net"):
            with self.assertRaises(BadQueueRequest):
                await self.admin.suspend(bad)
        self.assertEqual(await self.admin.suspended(), [])
