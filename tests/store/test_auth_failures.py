"""Failed AUTH counts shared through PostgreSQL (issue 12 point 9): two throttles on
one database, each with a pool of its own, are two nodes."""

import psycopg2
from twisted.internet import defer, reactor, task

from mailgw.smtp.auth import SHARED_REFRESH_SECONDS, AuthThrottle
from mailgw.store.auth_failures import AuthFailureStore
from mailgw.store.database import Database
from tests.harness import DatabaseTestCase

OWNER = "198.51.100.7"


class CountingStore(AuthFailureStore):
    """The real store, noting each call it gets."""

    def __init__(self, database):
        super().__init__(database)
        self.calls = []

    async def record(self, *args):
        self.calls.append("record")
        return await super().record(*args)

    async def reset(self, *args):
        self.calls.append("reset")
        return await super().reset(*args)

    async def changed_since(self, *args):
        self.calls.append("changed_since")
        return await super().changed_since(*args)


class SharedThrottleTests(DatabaseTestCase):
    async def setUp(self):
        await super().setUp()
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        second_database = Database(self.dsn, 1, reactor)
        await second_database.start()
        self.addCleanup(second_database.close)
        self.first = self.node(AuthFailureStore(self.database))
        self.second = self.node(AuthFailureStore(second_database))

    def node(self, store) -> AuthThrottle:
        return AuthThrottle(self.clock, shared=store)

    async def test_nodes_share_the_address_cap(self):
        """15 failures on each node cut the address off on both: on the one that wrote
        the 30th at once, on the other once its cache is read again."""
        await self.first.refresh()
        for n in range(15):
            await self.first.record_failure("192.0.2.1", f"guess{n}")
            await self.second.record_failure("192.0.2.1", f"other{n}")
        self.assertTrue(self.second.ip_blocked("192.0.2.1"))
        await self.first.refresh()
        self.assertFalse(self.first.ip_blocked("192.0.2.1"))  # 29, as of its last write
        self.clock.advance(SHARED_REFRESH_SECONDS)
        await self.first.refresh()
        self.assertTrue(self.first.ip_blocked("192.0.2.1"))

    async def test_a_login_clears_the_username_at_its_address_on_every_node(self):
        """The owner's typos, then a login on one node: the other node does not count
        those typos against the owner's address, even once guesses from elsewhere make
        the username's total ten."""
        for _ in range(3):
            await self.first.record_failure(OWNER, "user.plan")
        await self.second.refresh()
        await self.first.record_success(OWNER, "user.plan")
        for n in range(7):
            await self.first.record_failure(f"192.0.2.{n}", "user.plan")
        self.clock.advance(SHARED_REFRESH_SECONDS)
        await self.second.refresh()
        self.assertEqual(self.second.user_failures("user.plan"), 10)
        self.assertFalse(self.second.user_blocked(OWNER, "user.plan"))

    async def test_checks_and_logins_wait_for_no_query_within_the_cache_period(self):
        store = CountingStore(self.database)
        throttle = self.node(store)
        await defer.gatherResults([defer.ensureDeferred(throttle.refresh())
                                   for _ in range(20)])
        await throttle.refresh()
        await throttle.record_success(OWNER, "user.plan")  # no failures to clear
        self.assertEqual(store.calls, ["changed_since"])
        self.clock.advance(SHARED_REFRESH_SECONDS)
        await throttle.refresh()
        self.assertEqual(store.calls, ["changed_since"] * 2)

    async def test_counts_are_forgotten_and_their_rows_deleted(self):
        """A quarter of an hour without failures forgets a count, on every node; the next
        failure starts it again and deletes the rows no longer counted. Any username fits
        (a NUL, thousands of characters)."""
        odd = "a\0b" + "x" * 5000
        await self.first.record_failure("192.0.2.1", odd)
        self.clock.advance(901)
        await self.second.record_failure("192.0.2.1", odd)
        self.assertEqual(await self.sql("SELECT failures, count(*) FROM auth_failures"
                                        " GROUP BY failures"), [(1, 3)])
        self.clock.advance(901)
        await self.first.record_failure("192.0.2.2", "user.plan")
        self.assertEqual(await self.sql("SELECT count(*) FROM auth_failures"), [(3,)])

    async def test_counts_stay_local_when_the_database_refuses(self):
        """A database that refuses the statements (here, the table is gone) logs an error;
        AUTH goes on with this node's counts."""
        await self.sql("DROP TABLE auth_failures")
        await self.first.refresh()
        for _ in range(10):
            await self.first.record_failure("192.0.2.1", "user.plan")
        self.assertTrue(self.first.user_blocked("192.0.2.1", "user.plan"))
        self.assertEqual(len(self.flushLoggedErrors(psycopg2.errors.UndefinedTable)), 11)
