"""Group commit: concurrent callers share transactions, each waits for its own commit."""

from twisted.internet import defer

from mailgw.store.group_commit import GroupCommitter
from tests.harness import DatabaseTestCase


async def _insert_txn(cursor, name):
    if name == "bad":
        raise ValueError("refused")
    await cursor.execute("INSERT INTO accounts (name) VALUES (%s)", (name,))
    await cursor.execute("SELECT txid_current()")
    return cursor.fetchone()[0]


async def _names_txn(cursor):
    await cursor.execute("SELECT name FROM accounts ORDER BY name")
    return [row[0] for row in cursor.fetchall()]


class GroupCommitterTests(DatabaseTestCase):
    async def test_concurrent_calls_share_transactions(self):
        committer = GroupCommitter(self.database, max_in_flight=1)
        calls = [committer.run("insert", _insert_txn, f"a{i:02}") for i in range(20)]
        txids = await defer.gatherResults(calls)
        # The first call runs alone; the other 19 queue behind it and commit together.
        self.assertEqual(len(set(txids)), 2)
        self.assertEqual(len(await self.database.run_interaction("names", _names_txn)), 20)

    async def test_one_failing_call_does_not_fail_its_batch(self):
        committer = GroupCommitter(self.database, max_in_flight=1)
        calls = [committer.run("insert", _insert_txn, name)
                 for name in ("first", "ok1", "bad", "ok2")]
        results = await defer.DeferredList(calls, consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True, True, False, True])
        self.assertTrue(results[2][1].check(ValueError))
        self.assertEqual(await self.database.run_interaction("names", _names_txn),
                         ["first", "ok1", "ok2"])
