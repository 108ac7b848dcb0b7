"""Group commit (ARCHITECTURE principle 3): many callers, one transaction.

Hot paths (RCPT imports, message submissions) hand their `*_txn` function to
`GroupCommitter.run`.  Calls that arrive while earlier batches are in flight
queue up and are written together in the next transaction, so a burst of
sessions pays for one commit (one WAL flush) instead of one each.  Every
caller still gets its own result only after its rows are committed.  If one
call in a batch fails, the batch is rolled back and its calls are retried one
transaction each, so a single bad call never fails its neighbours.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from mailgw.errors import DatabaseUnavailable
from mailgw.store.database import Database, Interaction


class GroupCommitter:
    def __init__(self, database: Database, max_batch: int = 200, max_in_flight: int = 2) -> None:
        self.db = database
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._queue: deque[tuple[str, Interaction[Any], tuple, defer.Deferred]] = deque()
        self._in_flight = 0

    def run(self, desc: str, fn: Interaction[Any], *args: Any) -> defer.Deferred[Any]:
        """Run `fn(cursor, *args)` in a shared transaction; fires after its commit."""
        d: defer.Deferred[Any] = defer.Deferred()
        self._queue.append((desc, fn, args, d))
        self._start_batches()
        return d

    def _start_batches(self) -> None:
        while self._queue and self._in_flight < self.max_in_flight:
            batch = [self._queue.popleft()
                     for _ in range(min(self.max_batch, len(self._queue)))]
            self._in_flight += 1
            defer.ensureDeferred(self._run_batch(batch)).addBoth(self._batch_done)

    def _batch_done(self, _: object) -> None:
        self._in_flight -= 1
        self._start_batches()

    async def _run_batch(self, batch: list) -> None:
        if len(batch) > 1:
            try:
                results = await self.db.run_interaction(
                    f"group_commit[{len(batch)}]", _batch_txn, [(fn, args) for _, fn, args, _ in
                                                                batch])
            except DatabaseUnavailable:
                failure = Failure()
                for *_, d in batch:
                    d.errback(failure)
                return
            except Exception:
                pass  # one call failed: retry each in its own transaction below
            else:
                for (*_, d), result in zip(batch, results, strict=True):
                    d.callback(result)
                return
        for desc, fn, args, d in batch:
            try:
                result = await self.db.run_interaction(desc, fn, *args)
            except Exception:
                d.errback(Failure())
            else:
                d.callback(result)


async def _batch_txn(cursor, calls: list[tuple[Interaction[Any], tuple]]) -> list[Any]:
    return [await fn(cursor, *args) for fn, args in calls]
