"""Webhook endpoints per account (W-1): stored through the management API and the CLI;
delivering events to them is the webhooks' own work."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from mailgw.errors import NotFound
from mailgw.store.database import Database

# The webhooks an endpoint can ask for (W-1, the seed's "Enviar notificación en").
WEBHOOK_NAMES = ("sent", "click", "complaint", "open", "unsubscribed", "bounce")
# The event types an endpoint may ask for: W-1's names, and E-1's for mailgw's own use
# (the CHECK of webhook_endpoints.event_types lists the same).
WEBHOOK_EVENT_TYPES = (*WEBHOOK_NAMES, "queued", "deferred", "bounced", "not_sent",
                       "resubscribed", "invalidated", "revalidated")


@dataclass(frozen=True)
class WebhookEndpoint:
    id: int
    url: str
    event_types: list[str]
    active: bool
    dropped_count: int
    created_at: datetime


_COLUMNS = "id, url, event_types, active, dropped_count, created_at"


class WebhookStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    async def create(self, account_id: int, url: str, secret: str,
                     event_types: list[str]) -> WebhookEndpoint:
        return await self.db.run_interaction("create_webhook", _insert_txn, account_id, url,
                                             secret, event_types)

    async def list(self, account_id: int, after_id: int = 0,
                   limit: int | None = 100) -> list[WebhookEndpoint]:
        return await self.db.run_interaction("list_webhooks", _select_txn, account_id,
                                             after_id, limit)

    async def delete(self, account_id: int, endpoint_id: int) -> None:
        if not await self.db.run_interaction("delete_webhook", _delete_txn, account_id,
                                             endpoint_id):
            raise NotFound(f"no webhook endpoint {endpoint_id} in this account")


async def _insert_txn(cursor, account_id: int, url: str, secret: str,
                      event_types: list[str]) -> WebhookEndpoint:
    await cursor.execute(
        "INSERT INTO webhook_endpoints (account_id, url, secret, event_types)"
        f" VALUES (%s, %s, %s, %s) RETURNING {_COLUMNS}", (account_id, url, secret, event_types))
    return WebhookEndpoint(*cursor.fetchone())


async def _select_txn(cursor, account_id: int, after_id: int,
                      limit: int | None) -> list[WebhookEndpoint]:
    await cursor.execute(
        f"SELECT {_COLUMNS} FROM webhook_endpoints WHERE account_id = %s AND id > %s"
        " ORDER BY id LIMIT %s", (account_id, after_id, limit))
    return [WebhookEndpoint(*row) for row in cursor.fetchall()]


async def _delete_txn(cursor, account_id: int, endpoint_id: int) -> bool:
    await cursor.execute("DELETE FROM webhook_endpoints WHERE account_id = %s AND id = %s"
                         " RETURNING id", (account_id, endpoint_id))
    return cursor.fetchone() is not None
