"""Contacts and groups as the SMTP door sees them: upserted at RCPT time (S-7)."""

from __future__ import annotations

from dataclasses import dataclass

from mailgw.store.group_commit import GroupCommitter


class ContactLimitReached(Exception):
    """S-15: the account's plan allows no more contacts."""


@dataclass(frozen=True)
class ImportedRecipient:
    group_id: int
    contact_id: int
    # Why this recipient must not be sent to (D-6), or None.
    suppressed: str | None


class ContactStore:
    def __init__(self, committer: GroupCommitter) -> None:
        self.committer = committer

    async def import_recipient(self, account_id: int, group_id: int | None, group_name: str,
                               group_origin: str, email: str, sender_domain: str,
                               max_contacts: int | None) -> ImportedRecipient:
        """Upsert the contact, add it to the submission's group (created on first use) and
        look up whether it is suppressed for this sender domain; committed at once."""
        return await self.committer.run(
            "import_recipient", _import_recipient_txn, account_id, group_id, group_name,
            group_origin, email, sender_domain, max_contacts)


async def _import_recipient_txn(cursor, account_id, group_id, group_name, group_origin, email,
                                sender_domain, max_contacts) -> ImportedRecipient:
    if max_contacts is not None:
        await cursor.execute(
            "SELECT count(*), bool_or(email = %s) FROM contacts WHERE account_id = %s",
            (email, account_id))
        count, exists = cursor.fetchone()
        if not exists and count >= max_contacts:
            raise ContactLimitReached()
    if group_id is None:
        await cursor.execute(
            "INSERT INTO groups (account_id, name, origin) VALUES (%s, %s, %s) RETURNING id",
            (account_id, group_name, group_origin))
        group_id = cursor.fetchone()[0]
    # One round trip: upsert (DO UPDATE, so that RETURNING also gives an existing
    # contact's id), group membership, and the suppression that applies to this sender
    # domain, the broadest scope first.
    await cursor.execute(
        "WITH contact AS ("
        "  INSERT INTO contacts (account_id, email) VALUES (%(account)s, %(email)s)"
        "  ON CONFLICT (account_id, email) DO UPDATE SET updated_at = now()"
        "  RETURNING id, invalid),"
        " member AS ("
        "  INSERT INTO group_members (group_id, contact_id)"
        "  SELECT %(group)s, id FROM contact ON CONFLICT DO NOTHING)"
        " SELECT id, CASE WHEN invalid THEN 'invalid' ELSE ("
        "  SELECT reason FROM suppressions WHERE account_id = %(account)s"
        "  AND address = %(email)s AND category IS NULL"
        "  AND (scope_domain IS NULL OR scope_domain = %(domain)s)"
        "  ORDER BY scope_domain NULLS FIRST LIMIT 1) END"
        " FROM contact",
        {"account": account_id, "email": email, "group": group_id, "domain": sender_domain})
    contact_id, suppressed = cursor.fetchone()
    return ImportedRecipient(group_id, contact_id, suppressed)
