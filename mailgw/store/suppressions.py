"""The suppression list as operators and the management API see it (D-6, H-3): list,
add and remove, by address and by domain. Unsubscribes and complaints are written by
tracking and inbound processing; the submission path and the queue read the rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg2 import errors as pg_errors

from mailgw.errors import AlreadyExists
from mailgw.store.database import Database


@dataclass(frozen=True)
class Suppression:
    id: int
    address: str
    # The sender domain it is limited to (None: every sender domain), and the category.
    scope_domain: str | None
    category: str | None
    reason: str
    created_at: datetime


@dataclass(frozen=True)
class SuppressionFilter:
    """Which suppressions: of one address, of the addresses at one domain (or both)."""

    address: str | None = None
    domain: str | None = None


_COLUMNS = "id, address, scope_domain, category, reason, created_at"
_MATCHING = ("account_id = %s AND (%s::text IS NULL OR address = %s)"
             " AND (%s::text IS NULL OR split_part(address, '@', 2) = %s)")


def _matching(account_id: int, which: SuppressionFilter) -> tuple:
    return (account_id, which.address, which.address, which.domain, which.domain)


class SuppressionStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    async def list(self, account_id: int, which: SuppressionFilter, after_id: int = 0,
                   limit: int | None = 100) -> list[Suppression]:
        return await self.db.run_interaction("list_suppressions", _select_txn, account_id,
                                             which, after_id, limit)

    async def add(self, account_id: int, address: str, scope_domain: str | None = None,
                  category: str | None = None) -> Suppression:
        """A manual suppression (reason `manual`): the address is not sent to (from the
        sender domain `scope_domain`, in `category`; None: all)."""
        try:
            return await self.db.run_interaction("add_suppression", _insert_txn, account_id,
                                                 address.lower(), scope_domain, category)
        except pg_errors.UniqueViolation:
            raise AlreadyExists(f"{address} is already suppressed there") from None

    async def remove(self, account_id: int, which: SuppressionFilter) -> int:
        """Remove the suppressions that match; how many there were."""
        return await self.db.run_interaction("remove_suppressions", _delete_txn, account_id,
                                             which)


async def _select_txn(cursor, account_id: int, which: SuppressionFilter, after_id: int,
                      limit: int | None) -> list[Suppression]:
    await cursor.execute(f"SELECT {_COLUMNS} FROM suppressions WHERE {_MATCHING}"
                         " AND id > %s ORDER BY id LIMIT %s",
                         (*_matching(account_id, which), after_id, limit))
    return [Suppression(*row) for row in cursor.fetchall()]


async def _insert_txn(cursor, account_id: int, address: str, scope_domain: str | None,
                      category: str | None) -> Suppression:
    await cursor.execute(
        "INSERT INTO suppressions (account_id, address, scope_domain, category, reason)"
        f" VALUES (%s, %s, %s, %s, 'manual') RETURNING {_COLUMNS}",
        (account_id, address, scope_domain, category))
    return Suppression(*cursor.fetchone())


async def _delete_txn(cursor, account_id: int, which: SuppressionFilter) -> int:
    await cursor.execute(f"DELETE FROM suppressions WHERE {_MATCHING}",
                         _matching(account_id, which))
    return cursor.rowcount
