"""Installation-wide secrets shared by every node (the tracking link key)."""

from __future__ import annotations

import secrets

from mailgw.store.database import Database


class KeyStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    async def signing_key(self, name: str) -> bytes:
        """The secret named `name`, created on first use; every node gets the same."""
        return await self.db.run_interaction("signing_key", _signing_key_txn, name,
                                             secrets.token_bytes(32))


async def _signing_key_txn(cursor, name: str, candidate: bytes) -> bytes:
    await cursor.execute(
        "INSERT INTO signing_keys (name, secret) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
        (name, candidate))
    await cursor.execute("SELECT secret FROM signing_keys WHERE name = %s", (name,))
    return bytes(cursor.fetchone()[0])
