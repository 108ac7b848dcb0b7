"""Contacts and groups as the SMTP door sees them: upserted at RCPT time (S-7)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mailgw.store.database import CONTACT_LIMIT_LOCK, PreparedStatement, lock_account
from mailgw.store.group_commit import GroupCommitter


class ContactLimitReached(Exception):
    """S-15: the account's plan allows no more contacts."""


@dataclass(frozen=True)
class RecipientImport:
    account_id: int
    # The submission's group, created by its first recipient's import.
    group_name: str
    group_origin: str
    email: str
    # Suppressions scoped to this sender domain apply (D-6).
    sender_domain: str
    max_contacts: int | None
    # How the contact is sent the message: to, cc or bcc (deliveries.kind).
    kind: str = "to"
    # The address as delivered (its local part as written); None: `email`.
    address: str | None = None


@dataclass(frozen=True)
class ImportedRecipient:
    group_id: int
    contact_id: int
    # Why this recipient must not be sent to (D-6), or None.
    suppressed: str | None


# What a batch's transaction does after its imports, once for all the items that name
# it: called with each item's payload and its (request, imported recipient) pairs, it
# returns one result per item (the message stored with its recipients, for instance).
Imported = list[tuple[RecipientImport, ImportedRecipient]]
ThenTxn = Callable[[Any, list[tuple[Any, Imported]]], Awaitable[list[Any]]]


@dataclass(frozen=True)
class _Imports:
    requests: tuple[RecipientImport, ...]
    then: ThenTxn | None
    payload: Any


class ContactStore:
    def __init__(self, committer: GroupCommitter) -> None:
        self.committer = committer

    async def import_recipient(self, request: RecipientImport) -> ImportedRecipient:
        """Upsert the contact, add it to the submission's group (created on first use) and
        look up whether it is suppressed for this sender domain; fires once committed."""
        [imported] = await self.import_recipients([request])
        return imported

    async def import_recipients(self, requests: Sequence[RecipientImport],
                                then: ThenTxn | None = None, payload: Any = None) -> Any:
        """Import `requests` (maybe none) in the next group commit; with `then`, run it
        in the same transaction after the batch's imports and fire with its result for
        `payload`, else with the imported recipients. Every import of a batch goes in
        one statement, before any `then` (storing messages, which takes an account's
        send-quota lock): one order of locks in every batch, so concurrent batches never
        deadlock."""
        return await self.committer.run("import_recipients", _import_batch_txn,
                                        _Imports(tuple(requests), then, payload))


# One statement for the whole batch: the groups (DO UPDATE, so that RETURNING gives
# the id of a group an earlier recipient created, even one whose transaction commits
# while this one waits), the contacts (likewise; in a fixed order, so that concurrent
# batches lock rows alike and never deadlock), the memberships, and each recipient's
# suppression for its sender domain, the broadest scope first.
_IMPORT_RECIPIENTS = PreparedStatement(
    "import_recipients",
    "WITH input AS ("
    "  SELECT * FROM unnest(%(accounts)s::bigint[], %(names)s::text[],"
    "   %(origins)s::text[], %(emails)s::text[], %(domains)s::text[])"
    "  WITH ORDINALITY AS i(account_id, group_name, origin, email, domain, n)),"
    " grp AS ("
    "  INSERT INTO groups (account_id, name, origin)"
    "  SELECT DISTINCT ON (account_id, group_name) account_id, group_name, origin"
    "  FROM input ORDER BY account_id, group_name"
    "  ON CONFLICT (account_id, name) DO UPDATE SET name = EXCLUDED.name"
    "  RETURNING id, account_id, name),"
    " target AS ("
    "  SELECT i.*, g.id AS gid FROM input i"
    "  JOIN grp g ON g.account_id = i.account_id AND g.name = i.group_name),"
    " contact AS ("
    "  INSERT INTO contacts (account_id, email)"
    "  SELECT DISTINCT account_id, email FROM input ORDER BY account_id, email"
    "  ON CONFLICT (account_id, email) DO UPDATE SET updated_at = now()"
    "  RETURNING id, account_id, email, invalid),"
    " member AS ("
    "  INSERT INTO group_members (group_id, contact_id)"
    "  SELECT DISTINCT t.gid, c.id FROM target t"
    "  JOIN contact c ON c.account_id = t.account_id AND c.email = t.email"
    "  ON CONFLICT DO NOTHING)"
    " SELECT t.gid, c.id, CASE WHEN c.invalid THEN 'invalid' ELSE ("
    "  SELECT reason FROM suppressions s WHERE s.account_id = t.account_id"
    "  AND s.address = t.email AND s.category IS NULL"
    "  AND (s.scope_domain IS NULL OR s.scope_domain = t.domain)"
    "  ORDER BY s.scope_domain NULLS FIRST LIMIT 1) END"
    " FROM target t JOIN contact c ON c.account_id = t.account_id AND c.email = t.email"
    " ORDER BY t.n")


async def _import_batch_txn(cursor, items: list[_Imports]) -> list[Any]:
    requests = [request for item in items for request in item.requests]
    imported = iter(await _import_recipients_txn(cursor, requests) if requests else [])
    results: list[Any] = [[next(imported) for _ in item.requests] for item in items]
    continued: dict[ThenTxn, list[int]] = {}
    for position, item in enumerate(items):
        if item.then is not None:
            continued.setdefault(item.then, []).append(position)
    for then, positions in continued.items():
        done = await then(cursor, [(items[n].payload, list(zip(items[n].requests, results[n],
                                                                strict=True)))
                                   for n in positions])
        for position, result in zip(positions, done, strict=True):
            results[position] = result
    return results


async def _import_recipients_txn(cursor, requests: list[RecipientImport]
                                 ) -> list[ImportedRecipient]:
    await _check_contact_limits(cursor, requests)
    await _IMPORT_RECIPIENTS.execute(cursor, {
        "accounts": [r.account_id for r in requests], "names": [r.group_name for r in requests],
        "origins": [r.group_origin for r in requests],
        "emails": [r.email for r in requests], "domains": [r.sender_domain for r in requests]})
    return [ImportedRecipient(*row) for row in cursor.fetchall()]


async def _check_contact_limits(cursor, requests: list[RecipientImport]) -> None:
    """S-15: refuse the batch if it takes an account past its contact cap (its items are
    then retried alone, so only the one that does not fit is refused)."""
    emails_by_account: dict[tuple[int, int], set[str]] = defaultdict(set)
    for r in requests:
        if r.max_contacts is not None:
            emails_by_account[r.account_id, r.max_contacts].add(r.email)
    for (account_id, limit), emails in sorted(emails_by_account.items()):
        await check_contact_limit(cursor, account_id, limit, emails)


async def check_contact_limit(cursor, account_id: int, limit: int, emails: set[str]) -> None:
    """ContactLimitReached if adding the contacts `emails` (those not there yet) takes the
    account past `limit`; the account is locked first, so that concurrent transactions
    count each other's contacts."""
    await lock_account(cursor, CONTACT_LIMIT_LOCK, account_id)
    await cursor.execute(
        "SELECT count(*), count(*) FILTER (WHERE email = ANY(%s)) FROM contacts"
        " WHERE account_id = %s", (list(emails), account_id))
    count, existing = cursor.fetchone()
    if count + len(emails) - existing > limit:
        raise ContactLimitReached()
