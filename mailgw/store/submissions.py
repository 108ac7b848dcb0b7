"""One submission, stored in one transaction: send, content piece, message,
queue rows and their first events (S-12, S-14, D-1)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from psycopg2.extras import Json

from mailgw.store.database import Database
from mailgw.store.group_commit import GroupCommitter


class QuotaExceeded(Exception):
    """S-15: the account's plan has no sends left this month."""


@dataclass(frozen=True)
class QueuedRecipient:
    email: str
    contact_id: int | None
    kind: str = "to"
    # Why it is not sent (D-6), or None to queue it.
    suppressed: str | None = None


@dataclass(frozen=True)
class StoredAttachment:
    token: str
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class SubmissionRecord:
    account_id: int
    origin: str
    message_uid: str
    sender: str
    subject: str
    html: str | None
    # The prepared content the delivery engine renders from (JSON, UTF-8).
    body: dict[str, Any]
    recipients: tuple[QueuedRecipient, ...]
    group_id: int | None = None
    reply_to: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    custom_headers: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    client_ip: str | None = None
    raw: bytes | None = None
    size: int = 0
    archive: bool = False
    sends_per_month: int | None = None
    attachments: tuple[StoredAttachment, ...] = ()


@dataclass(frozen=True)
class StoredSubmission:
    send_id: int
    message_id: int
    message_uid: str
    queued: int
    not_sent: int


class SubmissionStore:
    def __init__(self, database: Database, committer: GroupCommitter) -> None:
        self.db = database
        self.committer = committer

    async def store(self, record: SubmissionRecord) -> StoredSubmission:
        return await self.committer.run("store_submission", _store_submission_txn, record)

    async def attachment(self, token: str) -> tuple[str, str, bytes] | None:
        """(filename, content type, data) of a linked attachment (S-8 `links`)."""
        return await self.db.run_interaction("attachment", _select_attachment_txn, token)



async def _store_submission_txn(cursor, record: SubmissionRecord) -> StoredSubmission:
    queued = sum(1 for r in record.recipients if r.suppressed is None)
    if record.sends_per_month is not None:
        await cursor.execute(
            "SELECT count(*) FROM deliveries WHERE account_id = %s"
            " AND created_at >= date_trunc('month', now()) AND state <> 'not_sent'",
            (record.account_id,))
        if cursor.fetchone()[0] + queued > record.sends_per_month:
            raise QuotaExceeded()
    content_id = None
    if record.html is not None:
        await cursor.execute(
            "INSERT INTO contents (account_id, name, html) VALUES (%s, %s, %s) RETURNING id",
            (record.account_id, f"{record.origin.upper()}: {record.subject}"[:200],
             record.html))
        content_id = cursor.fetchone()[0]
    await cursor.execute(
        "INSERT INTO sends (account_id, origin, subject, sender, group_id, content_id, archive)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (record.account_id, record.origin, record.subject, record.sender, record.group_id,
         content_id, record.archive))
    send_id = cursor.fetchone()[0]
    body = json.dumps(record.body, separators=(",", ":")).encode("utf-8")
    await cursor.execute(
        "INSERT INTO messages (account_id, send_id, message_uid, sender, reply_to, subject,"
        " headers, custom_headers, options, client_ip, body, raw, size)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (record.account_id, send_id, record.message_uid, record.sender, record.reply_to,
         record.subject, Json(record.headers), Json(record.custom_headers),
         Json(record.options), record.client_ip, body,
         record.raw if record.archive else None, record.size))
    message_id = cursor.fetchone()[0]
    recipients = record.recipients
    # One statement for all queue rows and one for all their events, however many recipients.
    await cursor.execute(
        "INSERT INTO deliveries (message_id, account_id, contact_id, recipient, kind, state,"
        " last_reply)"
        " SELECT %s, %s, r.contact_id, r.email, r.kind,"
        "  CASE WHEN r.reason IS NULL THEN 'queued' ELSE 'not_sent' END, r.reason"
        " FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::text[])"
        "  AS r(email, contact_id, kind, reason)",
        (message_id, record.account_id, [r.email for r in recipients],
         [r.contact_id for r in recipients], [r.kind for r in recipients],
         [r.suppressed for r in recipients]))
    await cursor.execute(
        "INSERT INTO events (account_id, send_id, message_id, delivery_id, contact_id,"
        " recipient, type, details)"
        " SELECT account_id, %s, message_id, id, contact_id, recipient,"
        "  CASE WHEN state = 'queued' THEN 'queued' ELSE 'not_sent' END,"
        "  CASE WHEN state = 'queued' THEN '{}'::jsonb"
        "   ELSE jsonb_build_object('reason', last_reply) END"
        " FROM deliveries WHERE message_id = %s", (send_id, message_id))
    for attachment in record.attachments:
        await cursor.execute(
            "INSERT INTO attachments (account_id, message_id, token, filename, content_type,"
            " data) VALUES (%s, %s, %s, %s, %s, %s)",
            (record.account_id, message_id, attachment.token, attachment.filename,
             attachment.content_type, attachment.data))
    return StoredSubmission(send_id, message_id, record.message_uid, queued,
                            len(recipients) - queued)


async def _select_attachment_txn(cursor, token: str) -> tuple[str, str, bytes] | None:
    await cursor.execute(
        "SELECT filename, content_type, data FROM attachments WHERE token = %s", (token,))
    row = cursor.fetchone()
    return (row[0], row[1], bytes(row[2])) if row else None
