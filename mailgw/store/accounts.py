"""Accounts, their users (SMTP/login credentials) and their API keys."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg2 import errors as pg_errors
from psycopg2.extras import Json

from mailgw.accounts.settings import AccountSettings
from mailgw.errors import AlreadyExists, NotFound
from mailgw.store.database import Database


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    plan: str
    timezone: str
    active: bool
    created_at: datetime


@dataclass(frozen=True)
class AccountProfile:
    """What logging in and submitting need of an account (S-4, S-8, S-15)."""

    id: int
    name: str
    active: bool
    settings: AccountSettings
    # CIDR texts; None: clients from anywhere (S-4).
    allowed_networks: list[str] | None
    max_contacts: int | None
    sends_per_month: int | None


_ACCOUNT_COLUMNS = "id, name, plan, timezone, active, created_at"
# Columns an operator may change (S-4 allow-list, S-15 quotas, H-1 active).
ACCOUNT_COLUMNS = frozenset({"plan", "timezone", "active", "allowed_networks",
                             "sends_per_month", "max_contacts"})


class AccountStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    async def create_account(self, name: str, plan: str = "default",
                             timezone: str = "America/Bogota") -> Account:
        try:
            return await self.db.run_interaction("create_account", _insert_account_txn, name,
                                                 plan, timezone)
        except pg_errors.UniqueViolation:
            raise AlreadyExists(f"account {name!r} already exists") from None

    async def get_account(self, name: str) -> Account:
        account = await self.db.run_interaction("get_account", _select_account_txn, name)
        if account is None:
            raise NotFound(f"no account named {name!r}")
        return account

    async def update_account(self, name: str, settings: dict, columns: dict) -> None:
        """Merge `settings` (from AccountSettings.changes) into the account's settings and
        set the given columns (from `ACCOUNT_COLUMNS` only)."""
        unknown = set(columns) - ACCOUNT_COLUMNS
        if unknown:
            raise ValueError(f"not account columns: {sorted(unknown)}")
        found = await self.db.run_interaction("update_account", _update_account_txn, name,
                                              settings, columns)
        if not found:
            raise NotFound(f"no account named {name!r}")

    async def list_accounts(self) -> list[Account]:
        return await self.db.run_interaction("list_accounts", _select_accounts_txn)

    async def create_user(self, account_id: int, username: str, password_hash: str) -> int:
        try:
            return await self.db.run_interaction("create_user", _insert_user_txn, account_id,
                                                 username, password_hash)
        except pg_errors.UniqueViolation:
            raise AlreadyExists(f"user {username!r} already exists") from None

    async def set_password(self, account_id: int, username: str, password_hash: str) -> None:
        """Create the user, or give an existing user of this account a new password."""
        updated = await self.db.run_interaction("set_password", _upsert_user_txn, account_id,
                                                username, password_hash)
        if not updated:
            raise AlreadyExists(f"user {username!r} belongs to another account")

    async def password_hash_for(self, username: str) -> tuple[int, str] | None:
        """(account id, stored hash) of an active account's user, for AUTH."""
        return await self.db.run_interaction("password_hash_for", _select_user_hash_txn,
                                             username)

    async def campaign_key_hash(self, numid: int) -> tuple[int, str] | None:
        """(account id, API key digest) of a DMDS campaign, for `dmdsid-<numid>` logins."""
        return await self.db.run_interaction("campaign_key_hash", _select_campaign_key_txn,
                                             numid)

    async def profile(self, account_id: int) -> AccountProfile | None:
        """The account's profile, or None if there is no such account."""
        return await self.db.run_interaction("account_profile", _select_profile_txn,
                                             account_id)

    async def create_api_key(self, account_id: int, name: str, key_hash: str,
                             key_prefix: str) -> int:
        return await self.db.run_interaction("create_api_key", _insert_api_key_txn, account_id,
                                             name, key_hash, key_prefix)

    async def account_for_api_key(self, key_hash: str) -> Account | None:
        """The account of a key that is not revoked, active or not."""
        return await self.db.run_interaction("account_for_api_key", _select_key_account_txn,
                                             key_hash)


async def _insert_account_txn(cursor, name: str, plan: str, timezone: str) -> Account:
    await cursor.execute(
        f"INSERT INTO accounts (name, plan, timezone) VALUES (%s, %s, %s)"
        f" RETURNING {_ACCOUNT_COLUMNS}", (name, plan, timezone))
    return Account(*cursor.fetchone())


async def _update_account_txn(cursor, name: str, settings: dict, columns: dict) -> bool:
    assignments = ["settings = settings || %s"] + [
        f"{column} = %s{'::cidr[]' if column == 'allowed_networks' else ''}"
        for column in columns]
    await cursor.execute(
        f"UPDATE accounts SET {', '.join(assignments)} WHERE name = %s RETURNING id",
        (Json(settings), *columns.values(), name))
    return cursor.fetchone() is not None


async def _select_account_txn(cursor, name: str) -> Account | None:
    await cursor.execute(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE name = %s", (name,))
    row = cursor.fetchone()
    return Account(*row) if row else None


async def _select_accounts_txn(cursor) -> list[Account]:
    await cursor.execute(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts ORDER BY name")
    return [Account(*row) for row in cursor.fetchall()]


async def _insert_user_txn(cursor, account_id: int, username: str, password_hash: str) -> int:
    await cursor.execute(
        "INSERT INTO users (account_id, username, password_hash) VALUES (%s, %s, %s)"
        " RETURNING id", (account_id, username, password_hash))
    return cursor.fetchone()[0]


async def _upsert_user_txn(cursor, account_id: int, username: str, password_hash: str) -> bool:
    await cursor.execute(
        "INSERT INTO users (account_id, username, password_hash) VALUES (%s, %s, %s)"
        " ON CONFLICT (username) DO UPDATE SET password_hash = EXCLUDED.password_hash"
        " WHERE users.account_id = EXCLUDED.account_id RETURNING id",
        (account_id, username, password_hash))
    return cursor.fetchone() is not None


async def _select_user_hash_txn(cursor, username: str) -> tuple[int, str] | None:
    await cursor.execute(
        "SELECT u.account_id, u.password_hash FROM users u"
        " JOIN accounts a ON a.id = u.account_id WHERE u.username = %s AND a.active",
        (username,))
    row = cursor.fetchone()
    return (row[0], row[1]) if row else None


async def _insert_api_key_txn(cursor, account_id: int, name: str, key_hash: str,
                              key_prefix: str) -> int:
    await cursor.execute(
        "INSERT INTO api_keys (account_id, name, key_hash, key_prefix) VALUES (%s, %s, %s, %s)"
        " RETURNING id", (account_id, name, key_hash, key_prefix))
    return cursor.fetchone()[0]


async def _select_key_account_txn(cursor, key_hash: str) -> Account | None:
    await cursor.execute(
        "SELECT " + ", ".join(f"a.{c.strip()}" for c in _ACCOUNT_COLUMNS.split(",")) +
        " FROM api_keys k JOIN accounts a ON a.id = k.account_id"
        " WHERE k.key_hash = %s AND k.revoked_at IS NULL", (key_hash,))
    row = cursor.fetchone()
    return Account(*row) if row else None


async def _select_campaign_key_txn(cursor, numid: int) -> tuple[int, str] | None:
    await cursor.execute(
        "SELECT c.account_id, c.api_key_hash FROM campaigns c"
        " JOIN accounts a ON a.id = c.account_id"
        " WHERE c.numid = %s AND c.api_key_hash IS NOT NULL AND a.active", (numid,))
    row = cursor.fetchone()
    return (row[0], row[1]) if row else None


async def _select_profile_txn(cursor, account_id: int) -> AccountProfile | None:
    await cursor.execute(
        "SELECT id, name, active, settings, allowed_networks::text[], max_contacts,"
        " sends_per_month FROM accounts WHERE id = %s", (account_id,))
    row = cursor.fetchone()
    if row is None:
        return None
    account_id, name, active, settings, *rest = row
    return AccountProfile(account_id, name, active, AccountSettings.from_json(settings),
                          *rest)
