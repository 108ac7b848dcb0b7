"""Database helpers: statements prepared once per connection."""

from twisted.internet import reactor
from twisted.trial import unittest

from mailgw.store.database import Database, PreparedStatement
from tests.harness import fresh_database

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
