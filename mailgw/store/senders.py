"""Sender domains (DKIM key, return-path) and verified sender addresses (S-6)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg2 import errors as pg_errors

from mailgw.errors import AlreadyExists, NotFound
from mailgw.store.database import Database


@dataclass(frozen=True)
class SenderDomain:
    id: int
    account_id: int
    domain: str
    dkim_selector: str
    dkim_algorithm: str
    dkim_public_key: str
    return_path_domain: str
    verified_at: datetime | None


@dataclass(frozen=True)
class Sender:
    id: int
    account_id: int
    address: str
    verified_at: datetime | None


_DOMAIN_COLUMNS = ("id, account_id, domain, dkim_selector, dkim_algorithm, dkim_public_key,"
                   " return_path_domain, verified_at")
_SENDER_COLUMNS = "id, account_id, address, verified_at"


class SenderStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    async def add_domain(self, account_id: int, domain: str, selector: str, algorithm: str,
                         private_key_pem: str, public_key: str,
                         return_path_domain: str) -> SenderDomain:
        try:
            return await self.db.run_interaction(
                "add_domain", _insert_domain_txn, account_id, domain.lower(), selector,
                algorithm, private_key_pem, public_key, return_path_domain.lower())
        except pg_errors.UniqueViolation:
            raise AlreadyExists(f"domain {domain} is already registered") from None

    async def verify_domain(self, account_id: int, domain: str) -> SenderDomain:
        row = await self.db.run_interaction("verify_domain", _verify_domain_txn, account_id,
                                            domain.lower())
        if row is None:
            raise NotFound(f"domain {domain} is not registered for this account")
        return row

    async def add_sender(self, account_id: int, address: str, verified: bool) -> Sender:
        try:
            return await self.db.run_interaction("add_sender", _insert_sender_txn, account_id,
                                                 address.lower(), verified)
        except pg_errors.UniqueViolation:
            raise AlreadyExists(f"sender {address} is already registered") from None

    async def verify_sender(self, account_id: int, address: str) -> Sender:
        row = await self.db.run_interaction("verify_sender", _verify_sender_txn, account_id,
                                            address.lower())
        if row is None:
            raise NotFound(f"sender {address} is not registered for this account")
        return row

    async def sender_allowed(self, account_id: int, address: str) -> bool:
        """S-6: a verified sender address, or any address in a verified domain."""
        return await self.db.run_interaction("sender_allowed", _sender_allowed_txn, account_id,
                                             address.lower())

    async def list_senders(self, account_id: int, after: str = "",
                           limit: int | None = None) -> list[Sender]:
        """The account's senders by address (a page: those after `after`)."""
        return await self.db.run_interaction("list_senders", _select_senders_txn, account_id,
                                             after, limit)

    async def delete_sender(self, account_id: int, address: str) -> None:
        if not await self.db.run_interaction("delete_sender", _delete_txn, "senders",
                                             "address", account_id, address.lower()):
            raise NotFound(f"sender {address} is not registered for this account")

    async def list_domains(self, account_id: int, after_id: int = 0,
                           limit: int | None = None) -> list[SenderDomain]:
        return await self.db.run_interaction("list_domains", _select_domains_txn, account_id,
                                             after_id, limit)

    async def get_domain(self, account_id: int, domain: str) -> SenderDomain:
        found = await self.db.run_interaction("get_domain", _select_domains_txn, account_id,
                                              0, 1, domain.lower())
        if not found:
            raise NotFound(f"domain {domain} is not registered for this account")
        return found[0]

    async def delete_domain(self, account_id: int, domain: str) -> None:
        if not await self.db.run_interaction("delete_domain", _delete_txn, "sender_domains",
                                             "domain", account_id, domain.lower()):
            raise NotFound(f"domain {domain} is not registered for this account")


async def _insert_domain_txn(cursor, account_id, domain, selector, algorithm, private_key_pem,
                             public_key, return_path_domain) -> SenderDomain:
    await cursor.execute(
        "INSERT INTO sender_domains (account_id, domain, dkim_selector, dkim_algorithm,"
        " dkim_private_key, dkim_public_key, return_path_domain)"
        f" VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING {_DOMAIN_COLUMNS}",
        (account_id, domain, selector, algorithm, private_key_pem, public_key,
         return_path_domain))
    return SenderDomain(*cursor.fetchone())


async def _verify_domain_txn(cursor, account_id: int, domain: str) -> SenderDomain | None:
    await cursor.execute(
        "UPDATE sender_domains SET verified_at = coalesce(verified_at, now())"
        f" WHERE account_id = %s AND domain = %s RETURNING {_DOMAIN_COLUMNS}",
        (account_id, domain))
    row = cursor.fetchone()
    return SenderDomain(*row) if row else None


async def _insert_sender_txn(cursor, account_id: int, address: str, verified: bool) -> Sender:
    await cursor.execute(
        "INSERT INTO senders (account_id, address, verified_at)"
        " VALUES (%s, %s, CASE WHEN %s THEN now() END)"
        f" RETURNING {_SENDER_COLUMNS}", (account_id, address, verified))
    return Sender(*cursor.fetchone())


async def _verify_sender_txn(cursor, account_id: int, address: str) -> Sender | None:
    await cursor.execute(
        "UPDATE senders SET verified_at = coalesce(verified_at, now())"
        f" WHERE account_id = %s AND address = %s RETURNING {_SENDER_COLUMNS}",
        (account_id, address))
    row = cursor.fetchone()
    return Sender(*row) if row else None


async def _select_senders_txn(cursor, account_id: int, after: str,
                              limit: int | None) -> list[Sender]:
    await cursor.execute(
        f"SELECT {_SENDER_COLUMNS} FROM senders WHERE account_id = %s AND address > %s"
        " ORDER BY address LIMIT %s", (account_id, after, limit))
    return [Sender(*row) for row in cursor.fetchall()]


async def _select_domains_txn(cursor, account_id: int, after_id: int, limit: int | None,
                              domain: str | None = None) -> list[SenderDomain]:
    await cursor.execute(
        f"SELECT {_DOMAIN_COLUMNS} FROM sender_domains WHERE account_id = %s AND id > %s"
        " AND (%s::text IS NULL OR domain = %s) ORDER BY id LIMIT %s",
        (account_id, after_id, domain, domain, limit))
    return [SenderDomain(*row) for row in cursor.fetchall()]


async def _delete_txn(cursor, table: str, column: str, account_id: int, value: str) -> bool:
    """Delete the account's row of `table` (a constant of this module) whose `column` is
    `value`; whether there was one."""
    await cursor.execute(f"DELETE FROM {table} WHERE account_id = %s AND {column} = %s"
                         " RETURNING id", (account_id, value))
    return cursor.fetchone() is not None


async def _sender_allowed_txn(cursor, account_id: int, address: str) -> bool:
    domain = address.rpartition("@")[2]
    await cursor.execute(
        "SELECT EXISTS (SELECT 1 FROM senders WHERE account_id = %s AND address = %s"
        "               AND verified_at IS NOT NULL)"
        " OR EXISTS (SELECT 1 FROM sender_domains WHERE account_id = %s AND domain = %s"
        "            AND verified_at IS NOT NULL)", (account_id, address, account_id, domain))
    return cursor.fetchone()[0]
