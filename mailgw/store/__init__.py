"""PostgreSQL storage: the pool, the migrations and one *Store per table group."""

from __future__ import annotations

from dataclasses import dataclass

from mailgw.store.accounts import AccountStore
from mailgw.store.database import Database
from mailgw.store.senders import SenderStore


@dataclass(frozen=True)
class Stores:
    """Every store over one Database; built once by the Gateway (or the CLI)."""

    database: Database
    accounts: AccountStore
    senders: SenderStore

    @classmethod
    def on(cls, database: Database) -> Stores:
        return cls(database=database, accounts=AccountStore(database),
                   senders=SenderStore(database))
