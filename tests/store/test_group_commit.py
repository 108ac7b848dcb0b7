"""Group commit: concurrent callers share transactions and batch-function calls, each
waits for its own commit."""

from twisted.internet import defer

from mailgw.store.group_commit import GroupCommitter
from tests.harness import DatabaseTestCase


async def _insert_txn(cursor, names):
    """One INSERT per batch; each name's result is (txid, how many names came with it)."""
    if "bad" in names:
        raise ValueError("refused")
    await cursor.execute("INSERT INTO accounts (name) SELECT unnest(%s::text[])", (names,))
    await cursor.execute("SELECT txid_current()")
    txid = cursor.fetchone()[0]
    return [(txid, len(names))] * len(names)


async def _tag_txn(cursor, tags):
    await cursor.execute("SELECT txid_current()")
    txid = cursor.fetchone()[0]
    return [(f"tag {tag}", txid) for tag in tags]


async def _names_txn(cursor):
    await cursor.execute("SELECT name FROM accounts ORDER BY name")
    return [row[0] for row in cursor.fetchall()]


class GroupCommitterTests(DatabaseTestCase):
    async def test_concurrent_calls_share_transactions(self):
        committer = GroupCommitter(self.database, max_in_flight=1)
        calls = [committer.run("insert", _insert_txn, f"a{i:02}") for i in range(20)]
        results = await defer.gatherResults(calls)
        # The first call runs alone; the other 19 queue behind it and are written by one
        # call of the batch function, in one transaction.
        self.assertEqual(len({txid for txid, _ in results}), 2)
        self.assertEqual(sorted({size for _, size in results}), [1, 19])
        self.assertEqual(len(await self.database.run_interaction("names", _names_txn)), 20)

    async def test_batch_sizes_and_commit_times_are_measured(self):
        """O-5: mailgw_group_commit_batch_size and _seconds, by batch."""
        committer = GroupCommitter(self.database, max_in_flight=1)
        await defer.gatherResults([committer.run("insert", _insert_txn, f"a{i:02}")
                                   for i in range(20)])
        registry = self.database.metrics.registry
        labels = {"batch": "insert"}
        self.assertEqual(registry.get_sample_value("mailgw_group_commit_batch_size_count",
                                                   labels), 2)
        self.assertEqual(registry.get_sample_value("mailgw_group_commit_batch_size_sum",
                                                   labels), 20)
        self.assertEqual(registry.get_sample_value("mailgw_group_commit_batch_size_bucket",
                                                   {**labels, "le": "1.0"}), 1)
        self.assertEqual(registry.get_sample_value("mailgw_group_commit_seconds_count",
                                                   labels), 2)
        self.assertGreater(registry.get_sample_value("mailgw_group_commit_seconds_sum",
                                                     labels), 0)

    async def test_each_batch_function_gets_its_own_items(self):
        committer = GroupCommitter(self.database, max_in_flight=1)
        calls = [committer.run("insert", _insert_txn, "first"),
                 committer.run("insert", _insert_txn, "x1"),
                 committer.run("tag", _tag_txn, 1),
                 committer.run("insert", _insert_txn, "x2"),
                 committer.run("tag", _tag_txn, 2)]
        results = await defer.gatherResults(calls)
        self.assertEqual([tag for tag, _ in results[2:5:2]], ["tag 1", "tag 2"])
        self.assertEqual(results[1], results[3])
        self.assertEqual(results[1][1], 2)

    async def test_a_transaction_holds_one_batch_function(self):
        """Functions that came mixed are written in one transaction each, the oldest
        first: each takes its row locks in its own order, and two in one transaction
        could deadlock against another batch that took them the other way round."""
        committer = GroupCommitter(self.database, max_in_flight=1)
        calls = [committer.run("insert", _insert_txn, "first"),
                 committer.run("tag", _tag_txn, 1),
                 committer.run("insert", _insert_txn, "x1"),
                 committer.run("tag", _tag_txn, 2),
                 committer.run("insert", _insert_txn, "x2")]
        first, tag1, x1, tag2, x2 = await defer.gatherResults(calls)
        self.assertEqual(tag1[1], tag2[1])
        self.assertEqual((x1, x2), (x2, (x2[0], 2)))
        self.assertLess(first[0], tag1[1])
        self.assertLess(tag1[1], x1[0])

    async def test_one_failing_call_does_not_fail_its_batch(self):
        committer = GroupCommitter(self.database, max_in_flight=1)
        calls = [committer.run("insert", _insert_txn, name)
                 for name in ("first", "ok1", "bad", "ok2")]
        results = await defer.DeferredList(calls, consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True, True, False, True])
        self.assertTrue(results[2][1].check(ValueError))
        self.assertEqual(await self.database.run_interaction("names", _names_txn),
                         ["first", "ok1", "ok2"])

    async def test_idle_fires_once_everything_is_committed(self):
        committer = GroupCommitter(self.database, max_in_flight=1)
        self.assertTrue(committer.idle().called)
        calls = [committer.run("insert", _insert_txn, name) for name in ("a", "b", "c")]
        idle = committer.idle()
        self.assertFalse(idle.called)
        await idle
        self.assertTrue(all(call.called for call in calls))
        self.assertEqual(await self.database.run_interaction("names", _names_txn),
                         ["a", "b", "c"])
