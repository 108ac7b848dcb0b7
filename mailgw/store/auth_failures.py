"""Failed SMTP AUTH counts shared by every node (S-3, R-6).

Written only when an attempt fails, and read by each node at most every few
seconds (the rows changed since its last read), so that N nodes do not allow
N times the guesses, and a login waits for no extra query.  Times are the
nodes' clocks, in seconds since the epoch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from mailgw.store.database import Database

# Expired rows deleted by one failure at most: the work of a failure stays bounded,
# and failures (which create the rows) delete them faster than they come.
_EXPIRED_PER_FAILURE = 100


class FailureCount(NamedTuple):
    key: bytes
    failures: int
    last_failure: float


class AuthFailureStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    async def record(self, keys: Iterable[bytes], now: float,
                     forget_after: float) -> list[FailureCount]:
        """One more failure for each key, a count whose last failure is more than
        `forget_after` seconds old starting again at one; the counts after it."""
        return await self.db.run_interaction("record_auth_failure", _record_txn,
                                             list(keys), now, forget_after)

    async def reset(self, key: bytes, now: float) -> None:
        """The key's count back to zero (a login with its username at its address)."""
        await self.db.run_interaction("reset_auth_failures", _reset_txn, key, now)

    async def changed_since(self, moment: float, limit: int) -> list[FailureCount]:
        """The counts changed at or after `moment`, the latest `limit` of them."""
        return await self.db.run_interaction("auth_failures_since", _since_txn, moment,
                                             limit)


_COUNT = "key, failures, extract(epoch FROM last_failure)::float8"


async def _record_txn(cursor, keys: list[bytes], now: float,
                      forget_after: float) -> list[FailureCount]:
    # Keys in order: concurrent failures lock their rows in one order, never a deadlock.
    await cursor.execute(
        "INSERT INTO auth_failures AS f (key, failures, last_failure)"
        " SELECT key, 1, to_timestamp(%(now)s) FROM unnest(%(keys)s::bytea[]) AS key"
        "  ORDER BY key"
        " ON CONFLICT (key) DO UPDATE SET"
        "   failures = CASE WHEN f.last_failure < to_timestamp(%(expired)s) THEN 1"
        "                   ELSE f.failures + 1 END,"
        "   last_failure = greatest(f.last_failure, excluded.last_failure)"
        f" RETURNING {_COUNT}",
        {"keys": keys, "now": now, "expired": now - forget_after})
    counts = [_count(row) for row in cursor.fetchall()]
    # SKIP LOCKED: rows another failure is counting are left alone, never waited for.
    # MATERIALIZED: the rows are picked once, whatever the plan (as IN (... LIMIT), a
    # plan may run the subquery again for every row of the table).
    await cursor.execute(
        "WITH expired AS MATERIALIZED ("
        " SELECT key FROM auth_failures WHERE last_failure < to_timestamp(%s)"
        " LIMIT %s FOR UPDATE SKIP LOCKED)"
        " DELETE FROM auth_failures f USING expired e WHERE f.key = e.key",
        (now - forget_after, _EXPIRED_PER_FAILURE))
    return counts


async def _reset_txn(cursor, key: bytes, now: float) -> None:
    # A change the other nodes' next read brings in, as a failure would be.
    await cursor.execute(
        "UPDATE auth_failures SET failures = 0,"
        " last_failure = greatest(last_failure, to_timestamp(%s)) WHERE key = %s",
        (now, key))


async def _since_txn(cursor, moment: float, limit: int) -> list[FailureCount]:
    await cursor.execute(
        f"SELECT {_COUNT} FROM auth_failures WHERE last_failure >= to_timestamp(%s)"
        " ORDER BY last_failure DESC LIMIT %s", (moment, limit))
    return [_count(row) for row in cursor.fetchall()]


def _count(row: tuple) -> FailureCount:
    key, failures, last_failure = row
    return FailureCount(bytes(key), failures, last_failure)
