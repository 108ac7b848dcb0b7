"""The pool and its helpers against a real PostgreSQL.

Statements are prepared once per connection. When PostgreSQL ends a session under
the pool (a restart, an operator's pg_terminate_backend), the caller gets
DatabaseUnavailable, nothing is logged as an unhandled error (trial turns such a log
entry into a test error), the pool recovers, and it closes cleanly even while it is
reconnecting."""

import psycopg2
from twisted.internet import reactor, task
from twisted.trial import unittest

from mailgw.errors import DatabaseUnavailable, TransientDatabaseError
from mailgw.store.database import Database, PreparedStatement, with_keepalives
from tests.harness import DatabaseTestCase, fresh_database

_ADD = PreparedStatement("test_add", "SELECT %(a)s::integer + %(b)s::integer, %(a)s::integer")


async def _add_txn(cursor, a, b):
    await _ADD.execute(cursor, {"a": a, "b": b})
    return cursor.fetchone()


async def _prepared_txn(cursor):
    await cursor.execute("SELECT name, generic_plans + custom_plans FROM pg_prepared_statements")
    return cursor.fetchall()


class PreparedStatementTests(unittest.TestCase):
    async def setUp(self):
        self.dsn = fresh_database()

    async def database(self) -> Database:
        database = Database(self.dsn, 1, reactor)
        await database.start()
        self.addCleanup(database.close)
        return database

    async def test_prepared_once_then_executed(self):
        database = await self.database()
        for a in range(3):
            self.assertEqual(await database.run_interaction("add", _add_txn, a, 10),
                             (a + 10, a))
        # One statement, planned from the first call and run three times.
        self.assertEqual(await database.run_interaction("prepared", _prepared_txn),
                         [("test_add", 3)])

    async def test_each_connection_prepares_its_own(self):
        first, second = await self.database(), await self.database()
        self.assertEqual(await first.run_interaction("add", _add_txn, 1, 2), (3, 1))
        self.assertEqual(await second.run_interaction("add", _add_txn, 2, 2), (4, 2))
        self.assertEqual(await second.run_interaction("prepared", _prepared_txn),
                         [("test_add", 1)])

    def test_every_parameter_needs_a_type(self):
        with self.assertRaisesRegex(ValueError, "untyped: every parameter needs a ::type"):
            PreparedStatement("untyped", "SELECT %(a)s + 1")


async def _session_ended_txn(cursor):
    """What a fast shutdown of PostgreSQL does to a busy backend, to our own."""
    await cursor.execute("SELECT 1")
    await cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    await cursor.execute("SELECT 2")


async def _select_one_txn(cursor):
    await cursor.execute("SELECT 1")
    return cursor.fetchone()[0]


async def _lock_timed_out_txn(cursor):
    await cursor.execute("SET LOCAL lock_timeout = '10ms'")
    await cursor.execute("LOCK TABLE accounts")


async def _refused_txn(cursor, sqlstate):
    """A statement that PostgreSQL refuses with `sqlstate`, as a conflict would."""
    await cursor.execute("SELECT 1")
    await cursor.execute(
        f"DO $$ BEGIN RAISE EXCEPTION 'refused' USING ERRCODE = '{sqlstate}'; END $$")


async def _backend_pid_txn(cursor):
    await cursor.execute("SELECT pg_backend_pid()")
    return cursor.fetchone()[0]


async def _recovered(database: Database) -> None:
    """Once the pool answers again (its first reconnection attempt is immediate)."""
    for _ in range(100):
        try:
            if await database.run_interaction("select_one", _select_one_txn) == 1:
                return
        except DatabaseUnavailable:
            await task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("the pool did not recover")


class KeepaliveTests(DatabaseTestCase):
    async def test_keepalives_unless_the_dsn_sets_them(self):
        """A vanished database host is noticed within about a minute (R-2)."""
        connection = next(iter(self.database._pool.every_connection))
        parameters = connection._connection.get_dsn_parameters()
        self.assertEqual((parameters["keepalives_idle"], parameters["keepalives_count"]),
                         ("30", "3"))
        own = psycopg2.extensions.parse_dsn(with_keepalives(
            "postgresql://u@db.example/mail?keepalives_idle=5"))
        self.assertEqual((own["keepalives_idle"], own["keepalives_interval"], own["host"]),
                         ("5", "10", "db.example"))
        for left_alone in ("service=mail", "not a dsn"):
            self.assertEqual(with_keepalives(left_alone), left_alone)


class StatementRefusedTests(DatabaseTestCase):
    async def test_a_refused_statement_is_not_a_lost_database(self):
        """A timeout, a deadlock or a full disk fails one transaction on a live session
        (they are OperationalErrors too): the caller gets that error (a lock timeout as
        TransientDatabaseError), not DatabaseUnavailable (SMTP 451 for a whole commit
        batch), and the connection is kept, not renewed."""
        self.database = Database(self.dsn, 1, reactor)
        await self.database.start()
        self.addCleanup(self.database.close)
        before = await self.database.run_interaction("pid", _backend_pid_txn)
        other = psycopg2.connect(self.dsn)
        self.addCleanup(other.close)
        with other.cursor() as cursor:
            cursor.execute("LOCK TABLE accounts")
            with self.assertRaises(TransientDatabaseError) as refused:
                await self.database.run_interaction("lock_timed_out", _lock_timed_out_txn)
        self.assertIsInstance(refused.exception.__cause__, psycopg2.errors.LockNotAvailable)
        self.assertNotIsInstance(refused.exception, DatabaseUnavailable)
        other.rollback()
        self.assertTrue(self.database.available)
        self.assertEqual(await self.database.run_interaction("pid", _backend_pid_txn), before)


    async def test_conflicts_are_transient_errors(self):
        """A serialization failure or a deadlock may succeed if tried again: the caller
        gets mailgw's TransientDatabaseError, psycopg2's error as its cause, and the
        connection goes on; any other refusal stays psycopg2's own error."""
        for sqlstate, cause in (("40001", psycopg2.errors.SerializationFailure),
                                ("40P01", psycopg2.errors.DeadlockDetected)):
            with self.assertRaises(TransientDatabaseError) as refused:
                await self.database.run_interaction("conflict", _refused_txn, sqlstate)
            self.assertIsInstance(refused.exception.__cause__, cause)
            self.assertNotIsInstance(refused.exception, DatabaseUnavailable)
            self.assertIn("conflict: refused", str(refused.exception))
        with self.assertRaises(psycopg2.errors.DiskFull):
            await self.database.run_interaction("disk_full", _refused_txn, "53100")
        self.assertEqual(await self.database.run_interaction("select_one", _select_one_txn), 1)


class SessionEndedTests(DatabaseTestCase):
    async def test_session_ended_mid_transaction(self):
        # The transaction cannot be rolled back on a closed connection: that is part of
        # losing the connection, to reach the caller as DatabaseUnavailable, not an error
        # to log (txpostgres passes it to log.err).
        with self.assertRaises(DatabaseUnavailable):
            await self.database.run_interaction("session_ended", _session_ended_txn)
        self.assertEqual(self.flushLoggedErrors(), [])
        await _recovered(self.database)
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_outages_and_connections_in_use_are_counted(self):
        """O-5: a lost session after a working one is an outage (the failures that follow
        it until a success are the same outage); the pool's connections in use."""
        registry = self.database.metrics.registry
        self.assertEqual(registry.get_sample_value("mailgw_database_connections"), 2)

        async def in_use_txn(cursor):
            return registry.get_sample_value("mailgw_database_connections_in_use")

        self.assertEqual(await self.database.run_interaction("in_use", in_use_txn), 1)
        self.assertEqual(registry.get_sample_value("mailgw_database_connections_in_use"), 0)
        for _ in range(2):
            with self.assertRaises(DatabaseUnavailable):
                await self.database.run_interaction("session_ended", _session_ended_txn)
            self.assertEqual(registry.get_sample_value("mailgw_database_outages_total"), 1)
        await _recovered(self.database)
        self.assertEqual(registry.get_sample_value("mailgw_database_outages_total"), 1)
        with self.assertRaises(DatabaseUnavailable):
            await self.database.run_interaction("session_ended", _session_ended_txn)
        self.assertEqual(registry.get_sample_value("mailgw_database_outages_total"), 2)

    async def test_close_while_reconnecting(self):
        with self.assertRaises(DatabaseUnavailable):
            await self.database.run_interaction("session_ended", _session_ended_txn)
        # The detector has started reconnecting at once: a connection attempt is under
        # way, which psycopg2 cannot cancel.  Closing (the gateway stopping during a
        # PostgreSQL restart) must still stop and close every connection.
        self.database.close()
        await task.deferLater(reactor, 0.3, lambda: None)  # past the next retry's delay
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual([c for c in self.database._pool.every_connection
                          if c._connection is not None and not c._connection.closed], [])
