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
    recipients = record.recipients
    # One round trip for the whole submission: content piece, send, message, a
    # queue row per recipient and its first event, however many recipients.
    await cursor.execute(
        "WITH content AS ("
        "  INSERT INTO contents (account_id, name, html)"
        "  SELECT %(account)s, %(content_name)s, %(html)s WHERE %(html)s IS NOT NULL"
        "  RETURNING id),"
        " send AS ("
        "  INSERT INTO sends (account_id, origin, subject, sender, group_id, content_id,"
        "   archive)"
        "  VALUES (%(account)s, %(origin)s, %(subject)s, %(sender)s, %(group)s,"
        "   (SELECT id FROM content), %(archive)s)"
        "  RETURNING id),"
        " message AS ("
        "  INSERT INTO messages (account_id, send_id, message_uid, sender, reply_to, subject,"
        "   headers, custom_headers, options, client_ip, body, raw, size)"
        "  SELECT %(account)s, send.id, %(uid)s, %(sender)s, %(reply_to)s, %(subject)s,"
        "   %(headers)s, %(custom_headers)s, %(options)s, %(client_ip)s, %(body)s, %(raw)s,"
        "   %(size)s FROM send"
        "  RETURNING id, send_id),"
        " delivery AS ("
        "  INSERT INTO deliveries (message_id, account_id, contact_id, recipient, kind, state,"
        "   last_reply)"
        "  SELECT message.id, %(account)s, r.contact_id, r.email, r.kind,"
        "   CASE WHEN r.reason IS NULL THEN 'queued' ELSE 'not_sent' END, r.reason"
        "  FROM message, unnest(%(emails)s::text[], %(contacts)s::bigint[], %(kinds)s::text[],"
        "   %(reasons)s::text[]) AS r(email, contact_id, kind, reason)"
        "  RETURNING id, message_id, contact_id, recipient, state, last_reply),"
        " event AS ("
        "  INSERT INTO events (account_id, send_id, message_id, delivery_id, contact_id,"
        "   recipient, type, details)"
        "  SELECT %(account)s, message.send_id, delivery.message_id, delivery.id,"
        "   delivery.contact_id, delivery.recipient,"
        "   CASE WHEN delivery.state = 'queued' THEN 'queued' ELSE 'not_sent' END,"
        "   CASE WHEN delivery.state = 'queued' THEN '{}'::jsonb"
        "    ELSE jsonb_build_object('reason', delivery.last_reply) END"
        "  FROM delivery, message)"
        " SELECT send_id, id FROM message",
        {"account": record.account_id, "origin": record.origin, "html": record.html,
         "content_name": f"{record.origin.upper()}: {record.subject}"[:200],
         "subject": record.subject, "sender": record.sender, "group": record.group_id,
         "archive": record.archive, "uid": record.message_uid, "reply_to": record.reply_to,
         "headers": Json(record.headers), "custom_headers": Json(record.custom_headers),
         "options": Json(record.options), "client_ip": record.client_ip,
         "body": json.dumps(record.body, separators=(",", ":")).encode("utf-8"),
         "raw": record.raw if record.archive else None, "size": record.size,
         "emails": [r.email for r in recipients], "contacts": [r.contact_id for r in recipients],
         "kinds": [r.kind for r in recipients], "reasons": [r.suppressed for r in recipients]})
    send_id, message_id = cursor.fetchone()
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
