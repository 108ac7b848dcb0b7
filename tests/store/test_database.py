"""The pool when PostgreSQL ends a session under it (a restart, an operator's
pg_terminate_backend): the caller gets DatabaseUnavailable, nothing is logged as an
unhandled error (trial turns such a log entry into a test error), the pool recovers,
and it closes cleanly even while it is reconnecting."""

from twisted.internet import reactor, task

from mailgw.errors import DatabaseUnavailable
from tests.harness import DatabaseTestCase


async def _session_ended_txn(cursor):
    """What a fast shutdown of PostgreSQL does to a busy backend, to our own."""
    await cursor.execute("SELECT 1")
    await cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    await cursor.execute("SELECT 2")


async def _select_one_txn(cursor):
    await cursor.execute("SELECT 1")
    return cursor.fetchone()[0]


class SessionEndedTests(DatabaseTestCase):
    async def test_session_ended_mid_transaction(self):
        # The transaction cannot be rolled back on a closed connection: that is part of
        # losing the connection, to reach the caller as DatabaseUnavailable, not an error
        # to log (txpostgres passes it to log.err).
        with self.assertRaises(DatabaseUnavailable):
            await self.database.run_interaction("session_ended", _session_ended_txn)
        self.assertEqual(self.flushLoggedErrors(), [])
        for _ in range(100):  # the first reconnection attempt is immediate
            try:
                self.assertEqual(
                    await self.database.run_interaction("select_one", _select_one_txn), 1)
            except DatabaseUnavailable:
                await task.deferLater(reactor, 0.05, lambda: None)
            else:
                break
        else:
            self.fail("the pool did not recover")
        self.assertEqual(self.flushLoggedErrors(), [])

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
