"""What comes back by mail, recorded (D-7): asynchronous bounces and complaints.

Each is written in one transaction with everything it changes, as the delivery engine
writes a synchronous bounce: its event with the delivery's ids, the delivery's state,
the hard-bounce count towards invalidation (the queue's own statement), the complaint's
unsubscribe (the tracking store's) and invalidation, and the feedback notice to the
sender when the account forwards feedback. A report about a delivery that cannot have
one (never sent, already bounced or complained about, a feedback notice) changes
nothing: mail servers send duplicates, and nothing counts twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mailgw.store.database import Database
from mailgw.store.events import Event, EventType, insert_events
from mailgw.store.notices import NOTICE, FeedbackNotice, queue_notices_txn
from mailgw.store.queue import HardBounces, count_hard_bounces
from mailgw.store.tracking import (
    COMPLAINT,
    SubscriptionChange,
    TrackedDelivery,
    change_subscription_txn,
    tracked_deliveries_txn,
)

# What a report did (the listener's log line and metric).
RECORDED = "recorded"
GONE = "gone"  # its delivery (its message, its account) was deleted
NOT_SENT = "not sent"  # mailgw has not recorded the delivery as sent
ALREADY = "already recorded"  # a bounce of a bounced delivery, a second complaint
OF_A_NOTICE = "about a feedback notice"

# The unsubscribed event's reason for a complaint (Aldeamo's reasons are in Spanish).
COMPLAINT_REASON = "Queja por correo no deseado"


@dataclass(frozen=True)
class AsyncBounce:
    delivery_id: int
    bounce_type: str  # "hard" or "soft"
    reply: str
    # The RFC 3463 status when the report gives one.
    status: str | None
    hard_bounce_limit: int
    occurred_at: datetime


@dataclass(frozen=True)
class Complaint:
    delivery_id: int
    feedback_type: str | None
    user_agent: str | None
    occurred_at: datetime


class InboundStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    async def return_path_domains(self) -> frozenset[str]:
        """Every account's return-path domains: where bounces come back to."""
        return await self.db.run_interaction("return_path_domains", _domains_txn)

    async def record_bounce(self, bounce: AsyncBounce) -> str:
        return await self.db.run_interaction("record_async_bounce", _bounce_txn, bounce)

    async def record_complaint(self, complaint: Complaint) -> str:
        return await self.db.run_interaction("record_complaint", _complaint_txn, complaint)


async def _domains_txn(cursor) -> frozenset[str]:
    await cursor.execute("SELECT DISTINCT lower(return_path_domain) FROM sender_domains")
    return frozenset(row[0] for row in cursor.fetchall())


async def _delivery(cursor, delivery_id: int) -> tuple[TrackedDelivery | None, str | None]:
    """The delivery, locked until the transaction ends (two reports about it at once are
    recorded one after the other, and the second finds the first); or None and why it
    cannot have a report."""
    await cursor.execute("SELECT kind FROM deliveries WHERE id = %s FOR NO KEY UPDATE",
                         (delivery_id,))
    row = cursor.fetchone()
    if row is None:
        return None, GONE
    if row[0] == NOTICE:
        return None, OF_A_NOTICE
    [delivery] = await tracked_deliveries_txn(cursor, [delivery_id])
    return delivery, None if delivery is not None else GONE


async def _bounce_txn(cursor, bounce: AsyncBounce) -> str:
    """A delivery recorded `sent` becomes `bounced`; its `sent` event stays (its server
    had taken the message), and a `bounced` event like the delivery engine's is added,
    with `source: "dsn"`."""
    delivery, refused = await _delivery(cursor, bounce.delivery_id)
    if delivery is None:
        return refused
    if delivery.state != "sent":
        return ALREADY if delivery.state == "bounced" else NOT_SENT
    await cursor.execute("UPDATE deliveries SET state = 'bounced', last_reply = %s,"
                         " updated_at = now() WHERE id = %s", (bounce.reply, delivery.id))
    details: dict[str, Any] = {"type": bounce.bounce_type, "reply": bounce.reply,
                               "source": "dsn"}
    if bounce.status is not None:
        details["status"] = bounce.status
    await insert_events(cursor, [delivery.event(EventType.BOUNCED, details,
                                                bounce.occurred_at)])
    if bounce.bounce_type == "hard" and delivery.contact_id is not None:
        await count_hard_bounces(cursor, [HardBounces(
            delivery.contact_id, delivery.account_id, delivery.send_id, delivery.recipient,
            bounce.hard_bounce_limit, 1)])
    await queue_notices_txn(cursor, [FeedbackNotice(delivery.id, "bounce",
                                                    bounce.bounce_type, bounce.reply)])
    return RECORDED


async def _complaint_txn(cursor, complaint: Complaint) -> str:
    """The `complaint` event; the recipient unsubscribed from the sender's domain (the
    suppression's reason `complaint`, with its `unsubscribed` event unless they were
    already); the contact invalidated (with its `invalidated` event) unless whitelisted
    (D-6)."""
    delivery, refused = await _delivery(cursor, complaint.delivery_id)
    if delivery is None:
        return refused
    await cursor.execute("SELECT 1 FROM events WHERE delivery_id = %s AND type = %s LIMIT 1",
                         (delivery.id, EventType.COMPLAINT))
    if cursor.fetchone() is not None:
        return ALREADY
    if delivery.state not in ("sent", "bounced"):
        return NOT_SENT
    details: dict[str, Any] = {"source": "arf",
                               "feedback_type": complaint.feedback_type or "abuse"}
    if complaint.user_agent:
        details["user_agent"] = complaint.user_agent
    await insert_events(cursor, [delivery.event(EventType.COMPLAINT, details,
                                                complaint.occurred_at)])
    await change_subscription_txn(cursor, SubscriptionChange(
        delivery, COMPLAINT, complaint.occurred_at,
        {"method": "complaint", "reason": COMPLAINT_REASON}))
    if delivery.contact_id is not None:
        await cursor.execute("UPDATE contacts SET invalid = true, updated_at = now()"
                             " WHERE id = %s AND NOT invalid AND NOT whitelisted",
                             (delivery.contact_id,))
        if cursor.rowcount:
            await insert_events(cursor, [Event(
                delivery.account_id, EventType.INVALIDATED, {"reason": "complaint"},
                delivery.send_id, contact_id=delivery.contact_id,
                recipient=delivery.recipient)])
    await queue_notices_txn(cursor, [FeedbackNotice(
        delivery.id, "complaint", feedback_type=complaint.feedback_type)])
    return RECORDED
