"""Feedback notices to the sender (D-7, Aldeamo's feedback forwarding).

When an account asks for it (`forward_feedback`), each bounce (synchronous or from a DSN)
and each complaint of its mail is told to the envelope sender of the message (its MAIL
FROM, never a Reply-To, as Aldeamo words it). A notice is a message of its own, queued in
the transaction that records the bounce or complaint: a text-only message of the same
account, in a send of its own (so that no view of the original's send shows it), from
the original's sender (signed by its domain's key, so that it
reaches that mailbox), in one delivery of kind `notice`. The delivery engine sends it
like any mail, retried and kept across restarts; but a notice writes no events (it is
not the account's mail: no statistics, no webhooks), carries no tracking and no
List-Unsubscribe, and what befalls it never makes a notice of its own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from psycopg2.extras import Json

from mailgw.randomness import random_hex

NOTICE = "notice"  # deliveries.kind of a notice
_FROM_NAME = "Mail Delivery System"
# The S-9 options of a notice: nothing added to its text, nothing tracked (and, for the
# renderer, no List-Unsubscribe).
_OPTIONS = {"notice": True, "show_cab": False, "social_links": False,
            "track_opens": False, "track_clicks": False}


@dataclass(frozen=True)
class FeedbackNotice:
    """What happened to one delivery, for its sender."""

    delivery_id: int
    # "bounce" or "complaint".
    kind: str
    # Bounces: "hard" or "soft", and the remote server's words.
    bounce_type: str | None = None
    reply: str = ""
    # Complaints: the report's Feedback-Type.
    feedback_type: str | None = None


_ORIGINALS = (
    "SELECT d.id, d.account_id, d.recipient, m.send_id, m.sender, m.from_address,"
    " coalesce(m.subject, ''), m.message_uid, split_part(m.sender, '@', 2)"
    " FROM deliveries d JOIN messages m ON m.id = d.message_id"
    " JOIN accounts a ON a.id = d.account_id"
    f" WHERE d.id = ANY(%s) AND d.kind <> '{NOTICE}' AND m.sender LIKE '%%@%%'"
    " AND a.settings->'forward_feedback' = 'true'::jsonb")

_QUEUE_NOTICE = (
    "WITH send AS ("
    "  INSERT INTO sends (account_id, origin, subject, sender)"
    "  SELECT account_id, origin, %(subject)s, %(sender)s FROM sends WHERE id = %(send)s"
    "  RETURNING id, account_id),"
    " message AS ("
    "  INSERT INTO messages (account_id, send_id, message_uid, sender, from_address,"
    "   subject, body, options)"
    "  SELECT account_id, id, %(uid)s, %(sender)s, %(from_address)s, %(subject)s,"
    "   %(body)s, %(options)s FROM send RETURNING id, account_id)"
    " INSERT INTO deliveries (message_id, account_id, recipient, kind)"
    f" SELECT id, account_id, %(sender)s, '{NOTICE}' FROM message")


async def queue_notices_txn(cursor, notices: Sequence[FeedbackNotice]) -> int:
    """Queue a notice for each of `notices` whose account forwards feedback (none for a
    notice's own delivery), in the caller's transaction; how many were queued."""
    if not notices:
        return 0
    await cursor.execute(_ORIGINALS, ([n.delivery_id for n in notices],))
    originals = {row[0]: row for row in cursor.fetchall()}
    queued = 0
    for notice in notices:
        original = originals.get(notice.delivery_id)
        if original is None:
            continue
        _, _, recipient, send_id, sender, from_address, subject, uid, domain = original
        title, text = _wording(notice, recipient, subject, uid, send_id, domain)
        body = {"subject": title, "from_name": _FROM_NAME, "html": None, "text": text,
                "headers": [["Auto-Submitted", "auto-generated"]], "attachments": []}
        await cursor.execute(_QUEUE_NOTICE, {
            "send": send_id, "uid": random_hex(), "sender": sender,
            "from_address": from_address, "subject": title,
            "body": json.dumps(body, separators=(",", ":")).encode("utf-8"),
            "options": Json(_OPTIONS)})
        queued += 1
    return queued


def _wording(notice: FeedbackNotice, recipient: str, subject: str, uid: str, send_id: int,
             domain: str) -> tuple[str, str]:
    """The notice's subject and text."""
    about = (f"Subject: {subject}\n"
             f"Message: {uid} (send {send_id})\n")
    if notice.kind == "complaint":
        return (f"Complaint: {recipient} reported your message as spam",
                f"{recipient} reported your message as spam (feedback type: "
                f"{notice.feedback_type or 'abuse'}). They are unsubscribed from the mail "
                f"of {domain}, and no mail of this account is sent to them any more.\n\n"
                + about)
    return (f"Delivery Status Notification (Failure): {recipient}",
            f"Your message to {recipient} could not be delivered ({notice.bounce_type} "
            f"bounce).\n\n" + about + f"The recipient's server said: {notice.reply}\n")
