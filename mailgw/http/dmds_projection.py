"""The DMDS view of the event log (E-2): the one place where mailgw's events become the
events a DMDS client reads (`envio`, `rebote_soft`, `rebote_hard`, `view`, `click`,
`unknown` ...), and its times the account's local `YYYY-MM-DDTHH:MM:SS`.

| mailgw (E-1)            | DMDS            |
|-------------------------|-----------------|
| sent                    | envio           |
| bounced, soft / hard    | rebote_soft / rebote_hard |
| deferred                | demorado        |
| open                    | view            |
| click                   | click           |
| not_sent                | unknown (the seed: Not-Sent is shown as unknown) |
| unsubscribed            | desuscripcion   |
| resubscribed            | resuscripcion   |
| complaint               | spam            |
| invalidated             | invalidacion    |
| revalidated             | revalidacion    |

`queued` is not shown: every recipient has one, and its `envio` (or `unknown`)
follows.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from mailgw.store.dmds_events import LoggedEvent
from mailgw.store.events import EventType

_NAMES = {
    EventType.SENT: "envio",
    EventType.DEFERRED: "demorado",
    EventType.OPEN: "view",
    EventType.CLICK: "click",
    EventType.NOT_SENT: "unknown",
    EventType.UNSUBSCRIBED: "desuscripcion",
    EventType.RESUBSCRIBED: "resuscripcion",
    EventType.COMPLAINT: "spam",
    EventType.INVALIDATED: "invalidacion",
    EventType.REVALIDATED: "revalidacion",
}
_BOUNCES = {"hard": "rebote_hard", "soft": "rebote_soft"}
# The event types a DMDS client sees, for the queries that select and count them.
PROJECTED_TYPES = tuple(str(t) for t in (*_NAMES, EventType.BOUNCED))
# What an event's `detalle` says, by type: the remote reply, the reason, the link.
_DETAIL_KEYS = {EventType.SENT: "reply", EventType.DEFERRED: "reply",
                EventType.BOUNCED: "reply", EventType.NOT_SENT: "reason",
                EventType.INVALIDATED: "reason", EventType.REVALIDATED: "reason",
                EventType.UNSUBSCRIBED: "reason", EventType.CLICK: "url"}
# DMDS devices (`dispositivo`) from the device type tracking records; "web" otherwise.
_DEVICES = {"mobile": "mobile", "tablet": "tablet"}


def event_name(event: LoggedEvent) -> str:
    if event.type == EventType.BOUNCED:
        return _BOUNCES.get(event.details.get("type"), "rebote_soft")
    return _NAMES[EventType(event.type)]


def local_time(moment: datetime | None, tz: ZoneInfo) -> str | None:
    """A time as DMDS writes it: the account's local time, to the second, no offset."""
    if moment is None:
        return None
    return moment.astimezone(tz).strftime("%Y-%m-%dT%H:%M:%S")


def contact_event(event: LoggedEvent, tz: ZoneInfo) -> dict[str, Any]:
    """An event in `contacto/<email>`'s `eventos`, as the seed shows them."""
    return {"evento": event_name(event), "timestamp": local_time(event.occurred_at, tz),
            "campania": event.campaign or ""}


def batch_event(event: LoggedEvent, tz: ZoneInfo) -> dict[str, Any]:
    """An event of `eeid/` and `ver_eventos/`: the contact's fields and whom, which batch,
    what the remote server replied (or why not sent, or the link clicked), and
    `maquina: true` for a machine's open or click (T-6: privacy proxies, link
    scanners), which tracking counts apart from people's."""
    answer = {**contact_event(event, tz), "email": event.recipient, "eeid": event.eeid}
    key = _DETAIL_KEYS.get(EventType(event.type))
    detail = event.details.get(key) if key else None
    if isinstance(detail, str):
        answer["detalle"] = detail
    if event.machine:
        answer["maquina"] = True
    return answer


def device(device_type: str | None) -> str:
    return _DEVICES.get(device_type or "", "web")
