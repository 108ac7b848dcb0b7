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


@dataclass(frozen=True)
class User:
    id: int
    username: str
    created_at: datetime


# API key kinds (H-1, H-3): what each may do is the HTTP door's business (http/auth.py).
KEY_KINDS = ("account", "admin", "campaign")


@dataclass(frozen=True)
class KeyGrant:
    """What an API key is allowed: its kind, its campaign (campaign keys), and whether it is
    the installation's operator key (an admin key over every account)."""

    key_id: int
    kind: str = "account"
    campaign_id: int | None = None
    campaign_numid: int | None = None
    operator: bool = False
    # api_keys.can_send: false keeps a key from sending (API_key_not_authorized).
    can_send: bool = True


@dataclass(frozen=True)
class APIKeyInfo:
    """An API key as listed (never the key itself, which is shown once)."""

    id: int
    name: str
    prefix: str
    kind: str
    campaign_numid: int | None
    operator: bool
    created_at: datetime
    revoked_at: datetime | None


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

    async def accounts_page(self, after_id: int = 0, limit: int | None = 100) -> list[Account]:
        """Accounts in the order of their ids, after `after_id` (a page of H-3's list)."""
        return await self.db.run_interaction("accounts_page", _select_accounts_page_txn,
                                             after_id, limit)

    async def list_users(self, account_id: int, after_id: int = 0,
                         limit: int | None = 100) -> list[User]:
        return await self.db.run_interaction("list_users", _select_users_txn, account_id,
                                             after_id, limit)

    async def delete_user(self, account_id: int, username: str) -> None:
        if not await self.db.run_interaction("delete_user", _delete_user_txn, account_id,
                                             username):
            raise NotFound(f"no user {username!r} in this account")

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

    async def profile(self, account_id: int) -> AccountProfile | None:
        """The account's profile, or None if there is no such account."""
        return await self.db.run_interaction("account_profile", _select_profile_txn,
                                             account_id)

    async def create_api_key(self, account_id: int, name: str, key_hash: str,
                             key_prefix: str, kind: str = "account",
                             campaign_numid: int | None = None,
                             operator: bool = False) -> APIKeyInfo:
        """A new key of `kind`; a campaign key names a campaign of the account by its
        numid (NotFound otherwise)."""
        if kind not in KEY_KINDS or (kind == "campaign") != (campaign_numid is not None):
            raise ValueError(f"a {kind} key {'needs' if kind == 'campaign' else 'takes no'}"
                             " campaign")
        if operator and kind != "admin":
            raise ValueError("an operator key is an admin key")
        created = await self.db.run_interaction(
            "create_api_key", _insert_api_key_txn, account_id, name, key_hash, key_prefix,
            kind, campaign_numid, operator)
        if created is None:
            raise NotFound(f"no campaign {campaign_numid} in this account")
        return created

    async def api_key(self, key_hash: str) -> tuple[Account, KeyGrant] | None:
        """The account of a key that is not revoked (active or not) and what the key may do."""
        return await self.db.run_interaction("api_key", _select_api_key_txn, key_hash)

    async def list_api_keys(self, account_id: int, after_id: int = 0,
                            limit: int | None = 100) -> list[APIKeyInfo]:
        return await self.db.run_interaction("list_api_keys", _select_api_keys_txn,
                                             account_id, after_id, limit)

    async def revoke_api_key(self, account_id: int, key_id: int) -> None:
        if not await self.db.run_interaction("revoke_api_key", _revoke_api_key_txn,
                                             account_id, key_id):
            raise NotFound(f"no API key {key_id} in this account")


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


async def _select_accounts_page_txn(cursor, after_id: int,
                                    limit: int | None) -> list[Account]:
    await cursor.execute(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE id > %s"
                         " ORDER BY id LIMIT %s", (after_id, limit))
    return [Account(*row) for row in cursor.fetchall()]


async def _select_users_txn(cursor, account_id: int, after_id: int,
                            limit: int | None) -> list[User]:
    await cursor.execute("SELECT id, username, created_at FROM users WHERE account_id = %s"
                         " AND id > %s ORDER BY id LIMIT %s", (account_id, after_id, limit))
    return [User(*row) for row in cursor.fetchall()]


async def _delete_user_txn(cursor, account_id: int, username: str) -> bool:
    await cursor.execute("DELETE FROM users WHERE account_id = %s AND username = %s"
                         " RETURNING id", (account_id, username))
    return cursor.fetchone() is not None


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


_KEY_INFO_COLUMNS = ("k.id, k.name, k.key_prefix, k.kind, c.numid, k.operator, k.created_at,"
                     " k.revoked_at")


async def _insert_api_key_txn(cursor, account_id: int, name: str, key_hash: str,
                              key_prefix: str, kind: str, campaign_numid: int | None,
                              operator: bool) -> APIKeyInfo | None:
    campaign_id = None
    if campaign_numid is not None:
        await cursor.execute("SELECT id FROM campaigns WHERE account_id = %s AND numid = %s",
                             (account_id, campaign_numid))
        row = cursor.fetchone()
        if row is None:
            return None
        campaign_id = row[0]
    await cursor.execute(
        "WITH k AS (INSERT INTO api_keys (account_id, name, key_hash, key_prefix, kind,"
        " campaign_id, operator) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING *)"
        f" SELECT {_KEY_INFO_COLUMNS} FROM k LEFT JOIN campaigns c ON c.id = k.campaign_id",
        (account_id, name, key_hash, key_prefix, kind, campaign_id, operator))
    return APIKeyInfo(*cursor.fetchone())


async def _select_api_key_txn(cursor, key_hash: str) -> tuple[Account, KeyGrant] | None:
    await cursor.execute(
        "SELECT " + ", ".join(f"a.{c.strip()}" for c in _ACCOUNT_COLUMNS.split(",")) +
        ", k.id, k.kind, k.campaign_id, c.numid, k.operator, k.can_send"
        " FROM api_keys k JOIN accounts a ON a.id = k.account_id"
        " LEFT JOIN campaigns c ON c.id = k.campaign_id"
        " WHERE k.key_hash = %s AND k.revoked_at IS NULL", (key_hash,))
    row = cursor.fetchone()
    return (Account(*row[:6]), KeyGrant(*row[6:])) if row else None


async def _select_api_keys_txn(cursor, account_id: int, after_id: int,
                               limit: int | None) -> list[APIKeyInfo]:
    await cursor.execute(
        f"SELECT {_KEY_INFO_COLUMNS} FROM api_keys k LEFT JOIN campaigns c"
        " ON c.id = k.campaign_id WHERE k.account_id = %s AND k.id > %s ORDER BY k.id LIMIT %s",
        (account_id, after_id, limit))
    return [APIKeyInfo(*row) for row in cursor.fetchall()]


async def _revoke_api_key_txn(cursor, account_id: int, key_id: int) -> bool:
    await cursor.execute(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())"
        " WHERE account_id = %s AND id = %s RETURNING id", (account_id, key_id))
    return cursor.fetchone() is not None


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
