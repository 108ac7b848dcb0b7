"""The group-committed writes of the hot paths, many callers at once: each batch is one
statement, and every caller still gets exactly its own rows (S-7, S-12, S-15, D-5)."""

import uuid

from twisted.internet import defer
from txpostgres import txpostgres

from mailgw.store import GROUP_COMMIT_IN_FLIGHT
from mailgw.store.contacts import ContactLimitReached, RecipientImport
from mailgw.store.queue import Outcome
from mailgw.store.submissions import QueuedRecipient, QuotaExceeded, SubmissionRecord
from tests.harness import DatabaseTestCase


def _record(account_id, subject, *emails, contact_ids=(), suppressed=None, quota=None):
    contact_ids = contact_ids or [None] * len(emails)
    return SubmissionRecord(
        account_id=account_id, origin="smtp", message_uid=uuid.uuid4().hex,
        sender="news@example.org", subject=subject, html=f"<p>{subject}</p>",
        body={"subject": subject}, client_ip="192.0.2.7", sends_per_month=quota,
        recipients=tuple(QueuedRecipient(e, c, suppressed=suppressed)
                         for e, c in zip(emails, contact_ids, strict=True)))


def _import(account_id, group_name, email, max_contacts=None):
    return RecipientImport(account_id, group_name, "smtp", email, "example.org", max_contacts)


class BatchedWritesTests(DatabaseTestCase):
    async def setUp(self):
        await super().setUp()
        self.account = (await self.stores.accounts.create_account("acme")).id

    async def gather(self, calls):
        return await defer.gatherResults([defer.ensureDeferred(c) for c in calls])

    def record_queries(self, connections: dict | None = None) -> list[str]:
        """The SQL text of every statement sent from now on; with `connections`, also
        each connection's statements, by connection."""
        sent: list[str] = []
        real = txpostgres.Cursor.execute

        def execute(cursor, query, params=None):
            sent.append(query)
            if connections is not None:
                connections.setdefault(cursor.connection, []).append(query)
            return real(cursor, query, params)

        self.patch(txpostgres.Cursor, "execute", execute)
        return sent

    async def transactions(self, table):
        """How many transactions wrote the rows of `table`."""
        return (await self.sql(f"SELECT count(DISTINCT xmin::text) FROM {table}"))[0][0]

    async def test_submissions_written_together_keep_their_own_rows(self):
        records = [_record(self.account, f"s{i}", *[f"r{i}.{j}@example.net"
                                                    for j in range(i + 1)])
                   for i in range(6)]
        stored = await self.gather(self.stores.submissions.store(r) for r in records)
        # The first ones alone, one per batch in flight; the others in one statement of
        # one transaction.
        self.assertEqual(await self.transactions("messages"), GROUP_COMMIT_IN_FLIGHT + 1)
        for i, (record, result) in enumerate(zip(records, stored, strict=True)):
            self.assertEqual(result.queued, i + 1)
            rows = await self.sql(
                "SELECT s.subject, c.html, m.message_uid, host(m.client_ip),"
                " array_agg(d.recipient ORDER BY d.recipient), count(e.id)"
                " FROM sends s JOIN contents c ON c.id = s.content_id"
                " JOIN messages m ON m.send_id = s.id JOIN deliveries d ON d.message_id = m.id"
                " JOIN events e ON e.delivery_id = d.id AND e.send_id = s.id"
                "  AND e.type = 'queued'"
                " WHERE s.id = %s AND m.id = %s GROUP BY 1, 2, 3, 4",
                result.send_id, result.message_id)
            self.assertEqual(rows, [(f"s{i}", f"<p>s{i}</p>", record.message_uid,
                                     "192.0.2.7", sorted(r.email for r in record.recipients),
                                     i + 1)])

    async def test_monthly_quota_counts_the_whole_batch(self):
        records = [_record(self.account, f"s{i}", f"r{i}@example.net", quota=3)
                   for i in range(5)]
        results = await defer.DeferredList(
            [defer.ensureDeferred(self.stores.submissions.store(r)) for r in records],
            consumeErrors=True)
        self.assertEqual([ok for ok, _ in results].count(True), 3)
        for ok, failure in results:
            if not ok:
                self.assertTrue(failure.check(QuotaExceeded))
        self.assertEqual((await self.sql("SELECT count(*) FROM deliveries"))[0][0], 3)

    async def test_imports_written_together(self):
        contacts = self.stores.contacts
        # The first imports run alone, one per batch in flight; then two sessions (groups)
        # import the same address in one batch, with another.
        alone = [(f"a{i}", f"alone{i}@example.net") for i in range(GROUP_COMMIT_IN_FLIGHT)]
        imported = await self.gather(
            contacts.import_recipient(_import(self.account, name, email))
            for name, email in [*alone, ("g1", "same@example.net"), ("g2", "same@example.net"),
                                ("g3", "x@example.net")])
        self.assertEqual(await self.transactions("contacts"), GROUP_COMMIT_IN_FLIGHT + 1)
        same1, same2, other = imported[-3:]
        self.assertEqual(same1.contact_id, same2.contact_id)
        self.assertNotEqual(same1.contact_id, other.contact_id)
        self.assertEqual(len({i.group_id for i in imported}), len(imported))
        members = await self.sql(
            "SELECT g.name, c.email FROM group_members m JOIN groups g ON g.id = m.group_id"
            " JOIN contacts c ON c.id = m.contact_id WHERE g.name LIKE 'g%%' ORDER BY 1")
        self.assertEqual(members, [("g1", "same@example.net"), ("g2", "same@example.net"),
                                   ("g3", "x@example.net")])
        # A group that exists is reused, not created again.
        again = await contacts.import_recipient(_import(self.account, "g1", "y@example.net"))
        self.assertEqual(again.group_id, same1.group_id)
        self.assertEqual((await self.sql("SELECT count(*) FROM groups"))[0][0], len(imported))

    async def test_suppression_looked_up_per_recipient(self):
        await self.sql("INSERT INTO suppressions (account_id, address, reason)"
                       " VALUES (%s, 'gone@example.net', 'unsubscribed') RETURNING id",
                       self.account)
        imported = await self.gather(
            self.stores.contacts.import_recipient(_import(self.account, f"g{i}", email))
            for i, email in enumerate(["a@example.net", "gone@example.net", "b@example.net"]))
        self.assertEqual([i.suppressed for i in imported], [None, "unsubscribed", None])

    async def test_contact_cap_counts_the_whole_batch(self):
        results = await defer.DeferredList(
            [defer.ensureDeferred(self.stores.contacts.import_recipient(
                _import(self.account, f"g{i}", f"r{i}@example.net", max_contacts=2)))
             for i in range(4)], consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True, True, False, False])
        self.assertTrue(results[2][1].check(ContactLimitReached))
        self.assertEqual((await self.sql("SELECT count(*) FROM contacts"))[0][0], 2)

    async def test_imports_committed_with_their_submission(self):
        """S-7 and S-12 in one transaction: the recipients' contacts, their group and the
        message, the queue rows pointing at those contacts; a suppressed one not sent."""
        await self.sql("INSERT INTO suppressions (account_id, address, reason)"
                       " VALUES (%s, 'gone@example.net', 'unsubscribed') RETURNING id",
                       self.account)
        records = [_record(self.account, f"s{i}") for i in range(GROUP_COMMIT_IN_FLIGHT + 2)]
        imports = [[_import(self.account, f"g{i}", f"r{i}@example.net"),
                    _import(self.account, f"g{i}", "gone@example.net")]
                   for i in range(len(records))]
        stored = await self.gather(self.stores.submissions.store(r, i)
                                   for r, i in zip(records, imports, strict=True))
        self.assertEqual([(s.queued, s.not_sent) for s in stored], [(1, 1)] * len(records))
        # The contacts of each transaction were written with its messages.
        self.assertEqual(await self.transactions("contacts"),
                         await self.transactions("messages"))
        self.assertEqual(await self.transactions("messages"), GROUP_COMMIT_IN_FLIGHT + 1)
        for i, result in enumerate(stored):
            rows = await self.sql(
                "SELECT d.recipient, d.state, c.email, g.name FROM sends s"
                " JOIN messages m ON m.send_id = s.id JOIN deliveries d ON d.message_id = m.id"
                " JOIN contacts c ON c.id = d.contact_id JOIN groups g ON g.id = s.group_id"
                " JOIN group_members gm ON gm.group_id = g.id AND gm.contact_id = c.id"
                " WHERE s.id = %s ORDER BY 1", result.send_id)
            self.assertEqual(rows, [("gone@example.net", "not_sent", "gone@example.net", f"g{i}"),
                                    (f"r{i}@example.net", "queued", f"r{i}@example.net",
                                     f"g{i}")])

    async def test_a_batch_imports_in_one_statement(self):
        """Imports alone and imports with their message share one statement per batch:
        one order of row locks, so concurrent batches cannot deadlock on contacts."""
        sent = self.record_queries()
        contacts, submissions = self.stores.contacts, self.stores.submissions
        alone = [contacts.import_recipient(_import(self.account, f"w{i}", f"w{i}@example.net"))
                 for i in range(GROUP_COMMIT_IN_FLIGHT)]
        batch = [
            contacts.import_recipient(_import(self.account, "g1", "b@example.net")),
            submissions.store(_record(self.account, "s1"),
                              [_import(self.account, "g2", "a@example.net")]),
            contacts.import_recipient(_import(self.account, "g3", "a@example.net")),
            submissions.store(_record(self.account, "s2"),
                              [_import(self.account, "g4", "b@example.net")]),
        ]
        results = await self.gather([*alone, *batch])
        imports = [q for q in sent if q.startswith("EXECUTE import_recipients")]
        self.assertEqual(len(imports), GROUP_COMMIT_IN_FLIGHT + 1)
        b_alone, _, a_alone, _ = results[-4:]
        self.assertNotEqual(a_alone.contact_id, b_alone.contact_id)
        self.assertEqual([r.queued for r in (results[-3], results[-1])], [1, 1])
        rows = await self.sql("SELECT d.recipient, c.email FROM deliveries d"
                              " JOIN contacts c ON c.id = d.contact_id ORDER BY 1")
        self.assertEqual(rows, [("a@example.net", "a@example.net"),
                                ("b@example.net", "b@example.net")])

    async def test_contacts_locked_before_the_send_quota(self):
        """A message stored without imports (its recipients imported already) and imports
        in one batch: the imports run first whatever the order they came in, as in every
        batch, so that two batches take contact rows and the quota lock in one order."""
        by_connection: dict = {}
        self.record_queries(by_connection)
        contacts, submissions = self.stores.contacts, self.stores.submissions
        alone = [contacts.import_recipient(_import(self.account, f"w{i}", f"w{i}@example.net"))
                 for i in range(GROUP_COMMIT_IN_FLIGHT)]
        batch = [submissions.store(_record(self.account, "s1", "a@example.net", quota=10)),
                 contacts.import_recipient(_import(self.account, "g1", "a@example.net"))]
        stored, imported = (await self.gather([*alone, *batch]))[-2:]
        self.assertEqual((stored.queued, imported.group_id > 0), (1, True))
        # The transaction that stored the message, on its connection (the pool's other
        # connection may send a batch of its own meanwhile).
        [sent] = [queries for queries in by_connection.values()
                  if any(q.startswith("EXECUTE store_submissions") for q in queries)]
        stored_at = next(n for n, query in enumerate(sent)
                         if query.startswith("EXECUTE store_submissions"))
        began = max(n for n, query in enumerate(sent[:stored_at]) if query == "begin")
        transaction = [query.split(" (")[0] for query in sent[began:stored_at + 1]
                       if query.startswith("EXECUTE")]
        self.assertEqual(transaction,
                         ["EXECUTE import_recipients", "EXECUTE store_submissions"])

    async def test_submission_over_quota_keeps_its_imports(self):
        """A message refused for its quota (S-15) still leaves its RCPTs' contacts (S-7),
        alone or in a batch."""
        records = [_record(self.account, f"s{i}", quota=2) for i in range(4)]
        results = await defer.DeferredList(
            [defer.ensureDeferred(self.stores.submissions.store(
                r, [_import(self.account, f"g{i}", f"r{i}@example.net")]))
             for i, r in enumerate(records)], consumeErrors=True)
        self.assertEqual([ok for ok, _ in results].count(True), 2)
        for ok, failure in results:
            if not ok:
                self.assertTrue(failure.check(QuotaExceeded))
        self.assertEqual((await self.sql("SELECT count(*) FROM deliveries"))[0][0], 2)
        self.assertEqual(await self.sql("SELECT email FROM contacts ORDER BY 1"),
                         [(f"r{i}@example.net",) for i in range(4)])

    async def test_outcomes_recorded_together_with_leases_checked(self):
        await self.stores.submissions.store(
            _record(self.account, "s", *[f"r{i}@example.net" for i in range(4)]))
        claimed = await self.stores.queue.claim("node-a", 10, 300)
        outcomes = [Outcome(claimed[0].id, "sent", "250 ok"),
                    Outcome(claimed[1].id, "deferred", "451 later", retry_in=60.0),
                    Outcome(claimed[2].id, "bounced", "550 no", bounce_type="hard"),
                    Outcome(claimed[3].id, "not_sent", "invalid")]
        owners = ["node-a", "node-a", "node-a", "node-b"]  # the last lease is not node-b's
        results = await self.gather(self.stores.queue.record(owner, outcome, 2)
                                    for owner, outcome in zip(owners, outcomes, strict=True))
        self.assertEqual(results, [True, True, True, False])
        events = await self.sql(
            "SELECT d.recipient, d.state, e.type, e.details FROM deliveries d"
            " LEFT JOIN events e ON e.delivery_id = d.id AND e.type <> 'queued'"
            " ORDER BY d.recipient")
        self.assertEqual(events, [
            ("r0@example.net", "sent", "sent", {"reply": "250 ok"}),
            ("r1@example.net", "deferred", "deferred", {"reply": "451 later"}),
            ("r2@example.net", "bounced", "bounced", {"reply": "550 no", "type": "hard"}),
            ("r3@example.net", "queued", None, None)])

    async def test_hard_bounces_counted_together_in_address_order(self):
        """A batch's hard bounces (D-7) are counted by one statement, per contact, after
        their rows are locked in the order the RCPT imports lock them (account, then
        address; not id), so that outcomes and imports never deadlock."""
        emails = ["z@example.net", "a@example.net"]  # ids in the other order
        ids = [(await self.sql("INSERT INTO contacts (account_id, email) VALUES (%s, %s)"
                               " RETURNING id", self.account, email))[0][0]
               for email in emails]
        fillers = [f"f{i}@example.net" for i in range(GROUP_COMMIT_IN_FLIGHT)]
        await self.stores.submissions.store(_record(self.account, "f", *fillers))
        for _ in range(2):
            await self.stores.submissions.store(_record(self.account, "s", *emails,
                                                        contact_ids=ids))
        claimed = await self.stores.queue.claim("node-a", 10, 300)
        alone = [d for d in claimed if d.recipient in fillers]
        z1, a1, _, a2 = [d for d in claimed if d not in alone]
        sent = self.record_queries()
        await self.gather([
            *(self.stores.queue.record("node-a", Outcome(d.id, "sent", "250 ok"), 2)
              for d in alone),
            *(self.stores.queue.record(
                "node-a", Outcome(d.id, "bounced", "550 no", bounce_type="hard"), 2)
              for d in (a1, z1, a2))])
        self.assertEqual(await self.sql("SELECT email, hard_bounces, invalid FROM contacts"
                                        " WHERE id = ANY(%s) ORDER BY email", ids),
                         [("a@example.net", 2, True), ("z@example.net", 1, False)])
        self.assertEqual(await self.sql("SELECT recipient, details FROM events"
                                        " WHERE type = 'invalidated'"),
                         [("a@example.net", {"reason": "2 hard bounces"})])
        locks = [q for q in sent if "FOR NO KEY UPDATE" in q]
        self.assertEqual(len(locks), 1)
        self.assertIn("ORDER BY account_id, email", locks[0])
        counts = [q for q in sent if q.startswith("EXECUTE count_hard_bounces")]
        self.assertEqual(len(counts), 1)
