"""Group commit (docs/architecture.md, principle 3): many callers, one transaction, one statement.

Hot paths (RCPT imports, message submissions, delivery outcomes) hand an item
and a batch function `fn(cursor, items) -> results` to `GroupCommitter.run`.
Items that arrive while earlier batches are in flight queue up; the next
transaction calls the function of the oldest waiting item once with all the
waiting items of that function, so a burst of sessions pays for one statement
and one commit (one WAL flush) instead of one each.  Every caller still gets
its own result only after its rows are committed.  If the batch fails, its
items are retried one transaction each, so a single bad item never fails its
neighbours.

A transaction holds one function's items only: each batch function takes its
row locks (contacts, by account and address) in one sorted sequence, and two
functions in one transaction would take two sequences, which can deadlock
against another transaction doing the same in the other order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from mailgw.errors import DatabaseUnavailable
from mailgw.idle import IdleWaiters
from mailgw.store.database import Database

# fn(cursor, items) -> one result per item, in order.
BatchInteraction = Callable[[Any, list[Any]], Awaitable[list[Any]]]
_Call = tuple[str, BatchInteraction, Any, defer.Deferred]


class GroupCommitter:
    def __init__(self, database: Database, max_batch: int = 200, max_in_flight: int = 2) -> None:
        self.db = database
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._queue: deque[_Call] = deque()
        self._in_flight = 0
        self._idle = IdleWaiters()

    def run(self, desc: str, fn: BatchInteraction, item: Any) -> defer.Deferred[Any]:
        """Run `fn(cursor, [item, ...])` in a shared transaction; fires with this item's
        result after the commit."""
        d: defer.Deferred[Any] = defer.Deferred()
        self._queue.append((desc, fn, item, d))
        self._start_batches()
        return d

    def idle(self) -> defer.Deferred[None]:
        """Fires once nothing is queued or being written: a graceful stop waits for this
        before closing the pool, so that work already answered for (a RCPT's import) is
        committed, not cut off."""
        return self._idle.wait(not self._queue and not self._in_flight)

    def _start_batches(self) -> None:
        while self._queue and self._in_flight < self.max_in_flight:
            batch = self._take_batch()
            self._in_flight += 1
            defer.ensureDeferred(self._run_batch(batch)).addBoth(self._batch_done)

    def _take_batch(self) -> list[_Call]:
        """The oldest waiting call and up to max_batch - 1 later ones of its function;
        the others keep their places."""
        fn = self._queue[0][1]
        batch: list[_Call] = []
        others: deque[_Call] = deque()
        while self._queue and len(batch) < self.max_batch:
            call = self._queue.popleft()
            (batch if call[1] is fn else others).append(call)
        others.extend(self._queue)
        self._queue = others
        return batch

    def _batch_done(self, _: object) -> None:
        self._in_flight -= 1
        self._start_batches()
        if not self._queue and not self._in_flight:
            self._idle.fire()

    async def _run_batch(self, batch: list[_Call]) -> None:
        desc, fn = batch[0][:2]
        started = self.db.reactor.seconds()
        try:
            results = await self.db.run_interaction(f"{desc}[{len(batch)}]", fn,
                                                    [item for _, _, item, _ in batch])
        except Exception:
            failure = Failure()
            if len(batch) > 1 and not failure.check(DatabaseUnavailable):
                # One item failed: retry each in its own transaction.
                for call in batch:
                    await self._run_batch([call])
                return
            for *_, d in batch:
                d.errback(failure)
            return
        metrics = self.db.metrics  # O-5: how well batching works, and what a commit costs
        metrics.group_commit_batch_size.labels(desc).observe(len(batch))
        metrics.group_commit_seconds.labels(desc).observe(self.db.reactor.seconds() - started)
        for (*_, d), result in zip(batch, results, strict=True):
            d.callback(result)
