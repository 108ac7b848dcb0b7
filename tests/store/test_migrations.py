"""Schema migrations (O-3) against a real, empty PostgreSQL database."""

from pathlib import Path

from twisted.internet import reactor
from twisted.trial import unittest

from mailgw.store.database import Database
from mailgw.store.migrations import available_migrations, migrate_txn
from tests.harness import empty_database, run_sql

DATA_MODEL = {
    "accounts", "users", "api_keys", "sender_domains", "senders", "contacts", "groups",
    "group_members", "campaigns", "templates", "contents", "sends", "messages", "deliveries",
    "events", "suppressions", "webhook_endpoints", "webhook_deliveries", "global_variables",
    "filters",
}


async def _tables_txn(cursor):
    await cursor.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {row[0] for row in cursor.fetchall()}


async def _applied_txn(cursor):
    await cursor.execute("SELECT version, name FROM schema_migrations ORDER BY version")
    return cursor.fetchall()


async def _queue_plan_txn(cursor):
    await cursor.execute("SET LOCAL enable_seqscan = off")
    await cursor.execute(
        "EXPLAIN SELECT id FROM deliveries WHERE state IN ('queued', 'deferred')"
        " AND next_attempt_at <= now() ORDER BY next_attempt_at LIMIT 100"
        " FOR UPDATE SKIP LOCKED")
    return "\n".join(row[0] for row in cursor.fetchall())


async def _compression_txn(cursor):
    await cursor.execute(
        "SELECT attrelid::regclass::text || '.' || attname, attcompression FROM pg_attribute"
        " WHERE (attrelid, attname) IN (('messages'::regclass, 'body'),"
        "  ('messages'::regclass, 'raw'), ('contents'::regclass, 'html'),"
        "  ('attachments'::regclass, 'data'), ('deliveries'::regclass, 'sent_eml'))")
    return dict(cursor.fetchall())


class MigrateTests(unittest.TestCase):
    async def setUp(self):
        self.database = Database(empty_database(), 1, reactor)
        await self.database.start()
        self.addCleanup(self.database.close)

    async def migrate(self, migrations=None):
        return await self.database.run_interaction(
            "migrate", migrate_txn, migrations or available_migrations())

    async def test_creates_the_data_model_once(self):
        applied = await self.migrate()
        self.assertEqual([m.version for m in applied],
                         [m.version for m in available_migrations()])
        tables = await self.database.run_interaction("tables", _tables_txn)
        self.assertTrue(tables >= DATA_MODEL, DATA_MODEL - tables)
        recorded = await self.database.run_interaction("applied", _applied_txn)
        self.assertEqual(recorded[0], (1, "initial"))
        self.assertEqual(await self.migrate(), [])

    async def test_new_file_applied_after_old_ones(self):
        await self.migrate()
        directory = Path(self.mktemp())
        directory.mkdir()
        for m in available_migrations():
            (directory / m.path.name).write_text(m.sql())
        (directory / "999_extra.sql").write_text("CREATE TABLE extra (id integer);")
        applied = await self.migrate(available_migrations(directory))
        self.assertEqual([(m.version, m.name) for m in applied], [(999, "extra")])

    async def test_campaign_digests_become_campaign_keys(self):
        """009: a campaign's key digest kept before moves to api_keys as a key of kind
        campaign of that campaign, so that its dmdsid-<numid> login keeps working."""
        before = [m for m in available_migrations() if m.version < 9]
        await self.migrate(before)
        digest = "ab" * 32
        await run_sql(self.database, "INSERT INTO accounts (name) VALUES ('a')")
        await run_sql(self.database, "INSERT INTO campaigns (account_id, type, numid,"
                      " api_key_hash) SELECT id, 'api', 41, %s FROM accounts", digest)
        await self.migrate()
        self.assertEqual(await run_sql(
            self.database, "SELECT k.kind, k.key_hash, c.numid, c.api_key_id = k.id"
            " FROM api_keys k JOIN campaigns c ON c.id = k.campaign_id"),
            [("campaign", digest, 41, True)])

    async def test_queue_claim_uses_an_index(self):
        await self.migrate()
        plan = await self.database.run_interaction("plan", _queue_plan_txn)
        self.assertIn("Index", plan)

    async def test_large_values_compressed_with_lz4(self):
        await self.migrate()
        compression = await self.database.run_interaction("compression", _compression_txn)
        self.assertEqual(compression, dict.fromkeys(
            ["messages.body", "messages.raw", "contents.html", "attachments.data",
             "deliveries.sent_eml"], "l"))


class MigrationFilesTests(unittest.TestCase):
    def test_files_are_numbered_from_one(self):
        versions = [m.version for m in available_migrations()]
        self.assertEqual(versions, list(range(1, len(versions) + 1)))

    def test_misnamed_file_is_refused(self):
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "1_initial.sql").write_text("")
        self.assertRaises(ValueError, available_migrations, directory)

    def test_duplicate_number_is_refused(self):
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "001_a.sql").write_text("")
        (directory / "001_b.sql").write_text("")
        self.assertRaises(ValueError, available_migrations, directory)
