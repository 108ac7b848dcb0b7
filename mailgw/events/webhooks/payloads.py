"""The Aldeamo view of the event log (E-2, W-1): the one place where mailgw's events
become the JSON bodies posted to webhook endpoints.

| mailgw (E-1)              | Aldeamo webhook (W-1)                                 |
|---------------------------|-------------------------------------------------------|
| sent                      | sent                                                  |
| bounced, type hard        | bounce (soft bounces: none, the seed's "rebotes duros") |
| open, click               | open, click (a machine's, T-6: none)                  |
| complaint                 | complaint                                             |
| unsubscribed              | unsubscribed                                          |
| resubscribed              | unsubscribed, "domain subscription reactivated"       |

Each payload is a list of fields (`_PAYLOADS`, per webhook and per type: "Email
marketing" for campaign sends, "SMTP" for SMTP and API ones) and each field one rule
(`_FIELDS`); docs/webhook-payloads.md is the same table for receivers, with where it
departs from the seed's examples. Text fields are always strings ("" when mailgw does not
know the value: a deleted contact, a place GeoIP does not know) so that a receiver never
meets a null where the seed promises a String; only latitude and longitude are null,
for a place without coordinates.

An endpoint may also ask for E-1 types that have no Aldeamo webhook (queued, deferred,
bounced, not_sent, resubscribed, invalidated, revalidated): those get mailgw's own
compact payload, with the event's details as recorded.

The input, `EventFacts` (an event and what it is about), is defined by the webhook
queue (mailgw/store/webhook_queue.py), which reads it from the database: the store
cannot import this layer. It is importable from here too.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection
from typing import Any

from mailgw.store.events import EventType
from mailgw.store.statistics import account_zone
from mailgw.store.tracking import CATEGORY_UPDATE, DOMAIN_CANCELLED, DOMAIN_REACTIVATED
from mailgw.store.webhook_queue import EventFacts
from mailgw.store.webhooks import WEBHOOK_NAMES

MARKETING, SMTP = "Email marketing", "SMTP"
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"

_W1_NAMES = {EventType.SENT: "sent", EventType.OPEN: "open", EventType.CLICK: "click",
             EventType.COMPLAINT: "complaint", EventType.UNSUBSCRIBED: "unsubscribed",
             EventType.RESUBSCRIBED: "unsubscribed"}
_PEOPLE_ONLY = (EventType.OPEN, EventType.CLICK)
# What a send's origin is called in "origin"; a campaign's is "Web" whatever its origin.
_ORIGINS = {"smtp": "SMTP", "api": "API", "dmds": "API"}
_STATUS = {"sent": "Entregado", "bounce": "Rebote duro"}
# Open and click details (mailgw/events/recorder.py) under the seed's names.
_PLACE = {"cityName": "city", "regionName": "region", "countryName": "country"}
_AGENT = ("device_type", "browser")


def webhook_name(event: EventFacts) -> str | None:
    """The W-1 webhook the event is posted as, or None when Aldeamo has none for it."""
    if event.machine and event.type in _PEOPLE_ONLY:
        return None  # T-6: a proxy's or a scanner's, not the recipient's
    if event.type == EventType.BOUNCED:
        return "bounce" if event.details.get("type") == "hard" else None
    return _W1_NAMES.get(event.type)


def payload_for(event: EventFacts, wanted: Collection[str]) -> dict[str, Any] | None:
    """The JSON body posted for `event` to an endpoint whose event_types are `wanted`,
    or None when that endpoint gets no post for it."""
    name = webhook_name(event)
    if name is not None and name in wanted:
        return aldeamo_payload(event, name)
    # An E-1 name that is also a W-1 name (sent, open ...) asks for the Aldeamo post only.
    if event.type not in WEBHOOK_NAMES and event.type in wanted:
        return own_payload(event)
    return None


def aldeamo_payload(event: EventFacts, name: str) -> dict[str, Any]:
    """The seed's payload of webhook `name` (see webhook_name) for the event."""
    fields = _PAYLOADS[name, event_kind(event)]
    values = ((key, _FIELDS[key](event, name)) for key in fields)
    return {key: value for key, value in values if value is not _ABSENT}


def own_payload(event: EventFacts) -> dict[str, Any]:
    """mailgw's compact payload of an E-1 event: what it is about and its details."""
    payload: dict[str, Any] = {"type": event_kind(event), "event": str(event.type),
                               "relid": str(event.account_id)}
    if event.campaign_numid is not None:
        payload["campid"] = str(event.campaign_numid)
    payload.update(msgid=message_id(event), email=event.recipient,
                   timestamp=timestamp(event))
    payload["details"] = dict(event.details)
    return payload


def event_kind(event: EventFacts) -> str:
    """The seed's `type`: campaign sends are Email marketing, every other one SMTP."""
    return MARKETING if event.campaign_numid is not None else SMTP


def message_id(event: EventFacts) -> str | None:
    """`msgid`: what the sender was answered for the message, so that both name it the
    same: the per-recipient msgid of an HTTP API send, else the SMTP reply's 32-hex id
    in UUID form (the seed writes msgid as a UUID)."""
    if event.origin == "api" and event.api_msgid:
        return str(event.api_msgid)
    if event.message_uid:
        return str(uuid.UUID(hex=event.message_uid))
    return None


def timestamp(event: EventFacts) -> str:
    """The event's time in the account's zone, as the seed's tables give it."""
    return event.occurred_at.astimezone(account_zone(event.timezone)).strftime(TIMESTAMP_FORMAT)


# A field left out of this payload (a reactivation's reason, the categories of anything
# but a category update).
_ABSENT = object()
_Rule = Callable[[EventFacts, str], Any]


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _subject(event: EventFacts, name: str) -> str:
    """A campaign's subject for Email marketing ("Asunto de la campaña", the message's
    when the campaign has none), the message's for SMTP."""
    if event.campaign_numid is not None and event.campaign_subject:
        return event.campaign_subject
    return _text(event.subject)


def _campid(event: EventFacts, name: str) -> str:
    """The campaign; "SMTP" for a complaint about an SMTP or API send (the seed's 8.3)."""
    return SMTP if event.campaign_numid is None else str(event.campaign_numid)


def _origin(event: EventFacts, name: str) -> str:
    if event.campaign_numid is not None:
        return "Web"
    return _ORIGINS.get(event.origin or "", "SMTP")


def _response(event: EventFacts, name: str) -> str:
    """"OK" for a delivery (the seed: always OK), the remote server's reply for a bounce."""
    return "OK" if name == "sent" else _text(event.details.get("reply"))


def _subscription_type(event: EventFacts, name: str) -> str:
    if event.type == EventType.RESUBSCRIBED:
        return DOMAIN_REACTIVATED
    return event.details.get("subscription_type") or DOMAIN_CANCELLED


def _reason(event: EventFacts, name: str) -> object:
    """As recorded: the seed's fixed reasons of one-click and mail unsubscribes (the
    tracking endpoints and the inbound listener write them), the recipient's words
    from the page, a complaint's; a reactivation has none."""
    if _subscription_type(event, name) == DOMAIN_REACTIVATED:
        return _ABSENT
    return _text(event.details.get("reason"))


def _categories(event: EventFacts, name: str) -> object:
    if _subscription_type(event, name) != CATEGORY_UPDATE:
        return _ABSENT
    return {str(k): str(v) for k, v in (event.details.get("categories") or {}).items()}


def _coordinate(key: str) -> _Rule:
    def rule(event: EventFacts, name: str) -> float | None:
        value = event.details.get(key)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return float(value) if number else None
    return rule


def _detail(key: str) -> _Rule:
    return lambda event, name: _text(event.details.get(key))


def _contact(event: EventFacts, name: str) -> str:
    return _text(event.contact_id)


_FIELDS: dict[str, _Rule] = {
    "subscription_type": _subscription_type,
    "categories": _categories,
    "type": lambda event, name: event_kind(event),
    "event": lambda event, name: name,
    "campid": _campid,
    "campaignName": lambda event, name: _text(event.campaign_name),
    "relid": lambda event, name: str(event.account_id),
    "to": lambda event, name: _text(event.recipient),
    "email": lambda event, name: _text(event.recipient),
    "contactid": _contact,
    "contactId": _contact,
    "ip": lambda event, name: _text(event.client_ip),
    "subject": _subject,
    "sender": lambda event, name: _text(event.sender),
    "origin": _origin,
    "msgid": lambda event, name: _text(message_id(event)),
    "custom_headers": lambda event, name: {k.lower(): _text(v)
                                           for k, v in event.custom_headers.items()},
    "destination": _detail("url"),
    **{seed: _detail(key) for seed, key in _PLACE.items()},
    "latitude": _coordinate("latitude"),
    "longitude": _coordinate("longitude"),
    **{key: _detail(key) for key in _AGENT},
    "domain": _detail("domain"),
    "reason": _reason,
    "timestamp": lambda event, name: timestamp(event),
    "status": lambda event, name: _STATUS[name],
    "response": _response,
}

_GEO = (*_PLACE, "latitude", "longitude", *_AGENT)
_DELIVERY_MARKETING = ("type", "event", "campid", "relid", "to", "contactid", "origin",
                       "timestamp", "status", "response")
_DELIVERY_SMTP = ("type", "event", "relid", "to", "ip", "subject", "sender", "origin",
                  "msgid", "custom_headers", "timestamp", "status", "response")
_TRACKING_MARKETING = ("type", "event", "campid", "relid", *_GEO, "timestamp", "email",
                       "campaignName", "subject", "contactId")
_UNSUBSCRIBED = ("subscription_type", "categories", "type", "campid", "campaignName",
                 "subject", "event", "relid", "msgid", "email", "domain", "reason", "timestamp")
_MARKETING_ONLY = ("campid", "campaignName")

# Every payload's fields, in the seed's order, by (webhook, type).
_PAYLOADS: dict[tuple[str, str], tuple[str, ...]] = {
    ("sent", MARKETING): _DELIVERY_MARKETING,
    ("sent", SMTP): _DELIVERY_SMTP,
    ("bounce", MARKETING): _DELIVERY_MARKETING,
    ("bounce", SMTP): _DELIVERY_SMTP,
    ("open", MARKETING): _TRACKING_MARKETING,
    ("open", SMTP): ("type", "event", "relid", "msgid", "subject", "email", "custom_headers",
                     *_GEO, "timestamp"),
    ("click", MARKETING): (*_TRACKING_MARKETING, "destination"),
    ("click", SMTP): ("type", "event", "relid", "subject", "email", "destination", "msgid",
                      "custom_headers", *_GEO, "timestamp"),
    ("complaint", MARKETING): ("type", "event", "campid", "campaignName", "subject", "relid",
                               "email", "timestamp"),
    ("complaint", SMTP): ("type", "event", "campid", "subject", "relid", "msgid", "email",
                          "timestamp"),
    ("unsubscribed", MARKETING): tuple(key for key in _UNSUBSCRIBED if key != "msgid"),
    ("unsubscribed", SMTP): tuple(key for key in _UNSUBSCRIBED
                                  if key not in (*_MARKETING_ONLY, "subject")),
}
