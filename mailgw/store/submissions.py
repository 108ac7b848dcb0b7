"""One submission, stored in one transaction: send, content piece, message,
queue rows and their first events (S-12, S-14, D-1)."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg2.extras import Json

from mailgw.randomness import random_uuid
from mailgw.store.contacts import ContactStore, Imported, ImportedRecipient, RecipientImport
from mailgw.store.database import SEND_QUOTA_LOCK, Database, PreparedStatement, lock_account
from mailgw.store.events import EventType


class QuotaExceeded(Exception):
    """S-15: the account's plan has no sends left this month."""


class _Refused(enum.Enum):
    """A batch item's result when the submission is refused (store() raises for it)."""

    FOR_QUOTA = "refused for its send quota, its imports committed"


@dataclass(frozen=True)
class QueuedRecipient:
    email: str
    contact_id: int | None
    kind: str = "to"
    # Why it is not sent (D-6), or None to queue it.
    suppressed: str | None = None

    @classmethod
    def imported(cls, request: RecipientImport, imported: ImportedRecipient
                 ) -> QueuedRecipient:
        """A recipient imported as a contact (S-7), queued as the client wrote it."""
        return cls(request.address or request.email, imported.contact_id, request.kind,
                   imported.suppressed)


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
    # The header From's address when it is kept (a verified sender other than `sender`).
    from_address: str | None = None
    # Give each recipient's delivery a msgid (a UUID) of its own (H-1, W-1).
    msgids: bool = False
    # The DMDS campaign the send is made under (H-2), or None.
    campaign_id: int | None = None
    # An existing send (of the same account) the message joins, and its eeid (H-2
    # reuse_eeid); None: a new send, with a new eeid.
    send_id: int | None = None
    eeid: str | None = None


@dataclass(frozen=True)
class StoredSubmission:
    send_id: int
    message_id: int
    message_uid: str
    queued: int
    not_sent: int
    # (recipient, msgid) of each recipient, in order, when the record asked for msgids.
    msgids: tuple[tuple[str, str], ...] = ()
    # The send's DMDS batch id (sends.eeid).
    eeid: str = ""


class SubmissionStore:
    def __init__(self, database: Database, contacts: ContactStore) -> None:
        self.db = database
        # Submissions are committed through the imports' batch step (store()).
        self.contacts = contacts

    async def store(self, record: SubmissionRecord,
                    imports: Sequence[RecipientImport] = ()) -> StoredSubmission:
        """Commit the submission; with `imports`, the recipients' imports as well, in the
        same transaction, and the record's recipients are those imports' contacts. The
        imports are committed even when the submission is refused for its quota.

        Either way it goes through the batch step of the imports: a transaction then
        locks contacts (the imports) before an account's send quota (the messages), in
        every batch, so that two batches never wait for each other's locks."""
        result = await self.contacts.import_recipients(imports, _store_imported_txn, record)
        if result is _Refused.FOR_QUOTA:
            raise QuotaExceeded()
        return result

    async def attachment(self, token: str) -> tuple[str, str, bytes] | None:
        """(filename, content type, data) of a linked attachment (S-8 `links`)."""
        return await self.db.run_interaction("attachment", _select_attachment_txn, token)


def _queued(record: SubmissionRecord) -> int:
    return sum(1 for r in record.recipients if r.suppressed is None)


# One statement for the whole batch, however many submissions and recipients: the
# ids of content pieces, sends and messages are drawn first, so that each
# submission's rows can refer to each other; then a queue row per recipient and
# its first event (its type from EventType, written into the SQL once). A submission
# that joins an existing send (DMDS reuse_eeid) draws no send id and makes its send
# archived when it asks for archiving.
_STORE_SUBMISSIONS = PreparedStatement(
    "store_submissions",
    "WITH input AS ("
    "  SELECT i.*, CASE WHEN i.existing_send IS NULL THEN nextval('sends_id_seq')"
    "    ELSE i.existing_send END AS send_id,"
    "   nextval('messages_id_seq') AS message_id,"
    "   CASE WHEN i.html IS NULL THEN NULL ELSE nextval('contents_id_seq') END"
    "    AS content_id"
    "  FROM unnest(%(accounts)s::bigint[], %(origins)s::text[], %(html)s::text[],"
    "   %(content_names)s::text[], %(subjects)s::text[], %(senders)s::text[],"
    "   %(groups)s::bigint[], %(archive)s::boolean[], %(uids)s::text[],"
    "   %(reply_to)s::text[], %(headers)s::jsonb[], %(custom_headers)s::jsonb[],"
    "   %(options)s::jsonb[], %(client_ips)s::inet[], %(bodies)s::bytea[],"
    "   %(raws)s::bytea[], %(sizes)s::integer[], %(from_addresses)s::text[],"
    "   %(campaigns)s::bigint[], %(existing_sends)s::bigint[], %(eeids)s::uuid[])"
    "  WITH ORDINALITY AS i(account_id, origin, html, content_name, subject, sender,"
    "   group_id, archive, uid, reply_to, headers, custom_headers, options, client_ip,"
    "   body, raw, size, from_address, campaign_id, existing_send, eeid, n)),"
    " content AS ("
    "  INSERT INTO contents (id, account_id, name, html) OVERRIDING SYSTEM VALUE"
    "  SELECT content_id, account_id, content_name, html FROM input"
    "  WHERE content_id IS NOT NULL),"
    " send AS ("
    "  INSERT INTO sends (id, account_id, origin, subject, sender, group_id, content_id,"
    "   archive, campaign_id, eeid) OVERRIDING SYSTEM VALUE"
    "  SELECT send_id, account_id, origin, subject, sender, group_id, content_id, archive,"
    "   campaign_id, eeid FROM input WHERE existing_send IS NULL),"
    " archived AS ("
    "  UPDATE sends s SET archive = true FROM input i"
    "  WHERE s.id = i.existing_send AND i.archive AND NOT s.archive),"
    " message AS ("
    "  INSERT INTO messages (id, account_id, send_id, message_uid, sender, reply_to,"
    "   subject, headers, custom_headers, options, client_ip, body, raw, size, from_address)"
    "  OVERRIDING SYSTEM VALUE"
    "  SELECT message_id, account_id, send_id, uid, sender, reply_to, subject, headers,"
    "   custom_headers, options, client_ip, body, raw, size, from_address FROM input),"
    " delivery AS ("
    "  INSERT INTO deliveries (message_id, account_id, contact_id, recipient, kind, state,"
    "   last_reply, msgid)"
    "  SELECT i.message_id, i.account_id, r.contact_id, r.email, r.kind,"
    "   CASE WHEN r.reason IS NULL THEN 'queued' ELSE 'not_sent' END, r.reason, r.msgid"
    "  FROM unnest(%(rcpt_n)s::bigint[], %(emails)s::text[], %(contacts)s::bigint[],"
    "   %(kinds)s::text[], %(reasons)s::text[], %(msgids)s::uuid[])"
    "   AS r(n, email, contact_id, kind, reason, msgid)"
    "  JOIN input i ON i.n = r.n"
    "  RETURNING id, account_id, message_id, contact_id, recipient, state, last_reply),"
    " event AS ("
    "  INSERT INTO events (account_id, send_id, message_id, delivery_id, contact_id,"
    "   recipient, type, details)"
    "  SELECT d.account_id, i.send_id, d.message_id, d.id, d.contact_id, d.recipient,"
    f"   CASE WHEN d.state = 'queued' THEN '{EventType.QUEUED}'"
    f"    ELSE '{EventType.NOT_SENT}' END,"
    "   CASE WHEN d.state = 'queued' THEN '{}'::jsonb"
    "    ELSE jsonb_build_object('reason', d.last_reply) END"
    "  FROM delivery d JOIN input i ON i.message_id = d.message_id)"
    " SELECT send_id, message_id FROM input ORDER BY n")


async def _store_submissions_txn(cursor, records: list[SubmissionRecord]
                                 ) -> list[StoredSubmission]:
    await _check_send_quotas(cursor, records)
    records = [record if record.eeid else dataclasses.replace(record, eeid=random_uuid())
               for record in records]
    recipients = [(n, r) for n, record in enumerate(records, 1) for r in record.recipients]
    msgids = [random_uuid() if records[n - 1].msgids else None for n, _ in recipients]
    await _STORE_SUBMISSIONS.execute(cursor, {
        "accounts": [r.account_id for r in records], "origins": [r.origin for r in records],
        "html": [r.html for r in records],
        "content_names": [f"{r.origin.upper()}: {r.subject}"[:200] for r in records],
        "subjects": [r.subject for r in records], "senders": [r.sender for r in records],
        "groups": [r.group_id for r in records], "archive": [r.archive for r in records],
        "uids": [r.message_uid for r in records], "reply_to": [r.reply_to for r in records],
        "headers": [Json(r.headers) for r in records],
        "custom_headers": [Json(r.custom_headers) for r in records],
        "options": [Json(r.options) for r in records],
        "client_ips": [r.client_ip for r in records],
        "bodies": [json.dumps(r.body, separators=(",", ":")).encode("utf-8")
                   for r in records],
        "raws": [r.raw if r.archive else None for r in records],
        "sizes": [r.size for r in records],
        "from_addresses": [r.from_address for r in records],
        "campaigns": [r.campaign_id for r in records],
        "existing_sends": [r.send_id for r in records], "eeids": [r.eeid for r in records],
        "rcpt_n": [n for n, _ in recipients], "emails": [r.email for _, r in recipients],
        "contacts": [r.contact_id for _, r in recipients],
        "kinds": [r.kind for _, r in recipients],
        "reasons": [r.suppressed for _, r in recipients], "msgids": msgids})
    stored = []
    answered = iter(msgids)
    for record, (send_id, message_id) in zip(records, cursor.fetchall(), strict=True):
        for attachment in record.attachments:
            await cursor.execute(
                "INSERT INTO attachments (account_id, message_id, token, filename,"
                " content_type, data) VALUES (%s, %s, %s, %s, %s, %s)",
                (record.account_id, message_id, attachment.token, attachment.filename,
                 attachment.content_type, attachment.data))
        queued = _queued(record)
        ids = [next(answered) for _ in record.recipients]
        stored.append(StoredSubmission(
            send_id, message_id, record.message_uid, queued, len(record.recipients) - queued,
            tuple(zip((r.email for r in record.recipients), ids, strict=True))
            if record.msgids else (), record.eeid))
    return stored


async def _store_imported_txn(cursor, items: list[tuple[SubmissionRecord, Imported]]
                             ) -> list[StoredSubmission | _Refused]:
    """After the batch's imports (ContactStore.import_recipients): each record, with its
    recipients' contacts when it came with imports, in the same transaction."""
    records = [dataclasses.replace(
        record, group_id=imported[-1][1].group_id,
        recipients=tuple(QueuedRecipient.imported(request, result)
                         for request, result in imported)) if imported else record
        for record, imported in items]
    try:
        return await _store_submissions_txn(cursor, records)
    except QuotaExceeded:
        # Raised before anything of the submissions is written: alone, its imports
        # still commit (S-7); in a batch, each item is retried alone.
        if len(items) > 1:
            raise
        return [_Refused.FOR_QUOTA]


async def _check_send_quotas(cursor, records: list[SubmissionRecord]) -> None:
    """S-15: refuse the batch if it takes an account past its monthly sends (its items
    are then retried alone, so only the one that does not fit is refused). The account
    is locked first, so that concurrent transactions, of this node or another, count
    each other's sends."""
    wanted: dict[tuple[int, int], int] = {}
    for record in records:
        if record.sends_per_month is not None:
            key = (record.account_id, record.sends_per_month)
            wanted[key] = wanted.get(key, 0) + _queued(record)
    for (account_id, limit), queued in sorted(wanted.items()):
        await lock_account(cursor, SEND_QUOTA_LOCK, account_id)
        await cursor.execute(
            "SELECT count(*) FROM deliveries WHERE account_id = %s"
            " AND created_at >= date_trunc('month', now()) AND state <> 'not_sent'",
            (account_id,))
        if cursor.fetchone()[0] + queued > limit:
            raise QuotaExceeded()


async def _select_attachment_txn(cursor, token: str) -> tuple[str, str, bytes] | None:
    await cursor.execute(
        "SELECT filename, content_type, data FROM attachments WHERE token = %s", (token,))
    row = cursor.fetchone()
    return (row[0], row[1], bytes(row[2])) if row else None
