"""The Aldeamo webhook payloads (W-1, E-2): every payload of seed 001 section 8 against
the normalised table of docs/webhook-payloads.md, field names and JSON types, and the
rules that choose a payload (or none) and fill its values."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any

from twisted.trial import unittest

from mailgw.events.webhooks.payloads import EventFacts, payload_for
from mailgw.http.tracking import ONE_CLICK_REASON
from mailgw.inbound.processor import MAILTO_REASON
from mailgw.store.events import EventType
from mailgw.store.webhooks import WEBHOOK_EVENT_TYPES, WEBHOOK_NAMES

# 2020-10-02 23:03:16 UTC, 18:03:16 in Bogota (GMT-5), as the seed's complaint example.
MOMENT = datetime(2020, 10, 2, 23, 3, 16, tzinfo=UTC)
SMTP_ID = "d3f26a70075b11ebb547478382137ef6"
API_MSGID = "fd7a40e0-075e-11eb-b547-478382137ef6"
CLIENT = {"ip": "198.51.100.7", "user_agent": "Mozilla/5.0", "device_type": "mobile",
          "os": "Android", "browser": "Chrome", "city": "Bogota",
          "region": "Distrito Capital de Bogota", "country": "Colombia",
          "country_code": "CO", "latitude": 4.60971, "longitude": -74.081749}
CATEGORIES = {"Category1": "cancelled", "Category2": "cancelled", "Category3": "active"}

# The normalised table (docs/webhook-payloads.md), one entry per payload of the seed:
# field -> JSON type ("a|b": either). Built from the seed's field lists and examples.
_GEO = {"cityName": "string", "regionName": "string", "countryName": "string",
        "latitude": "number|null", "longitude": "number|null", "device_type": "string",
        "browser": "string"}
_DELIVERY_MARKETING = {"type": "string", "event": "string", "campid": "string",
                       "relid": "string", "to": "string", "contactid": "string",
                       "origin": "string", "timestamp": "string", "status": "string",
                       "response": "string"}
_DELIVERY_SMTP = {"type": "string", "event": "string", "relid": "string", "to": "string",
                  "ip": "string", "subject": "string", "sender": "string", "origin": "string",
                  "msgid": "string", "custom_headers": "object", "timestamp": "string",
                  "status": "string", "response": "string"}
_TRACKING_MARKETING = {"type": "string", "event": "string", "campid": "string",
                       "relid": "string", **_GEO, "timestamp": "string", "email": "string",
                       "campaignName": "string", "subject": "string", "contactId": "string"}
_TRACKING_SMTP = {"type": "string", "event": "string", "relid": "string", "msgid": "string",
                  "subject": "string", "email": "string", "custom_headers": "object", **_GEO,
                  "timestamp": "string"}
_UNSUBSCRIBED_SMTP = {"subscription_type": "string", "type": "string", "event": "string",
                      "relid": "string", "msgid": "string", "email": "string",
                      "domain": "string", "timestamp": "string"}
_UNSUBSCRIBED_MARKETING = {**{k: v for k, v in _UNSUBSCRIBED_SMTP.items() if k != "msgid"},
                           "campid": "string", "campaignName": "string", "subject": "string"}
TABLE: dict[str, dict[str, str]] = {
    "8.1": _DELIVERY_MARKETING,
    "8.2": {**_TRACKING_MARKETING, "destination": "string"},
    "8.3": {"type": "string", "event": "string", "campid": "string", "campaignName": "string",
            "subject": "string", "relid": "string", "email": "string", "timestamp": "string"},
    "8.3 SMTP": {"type": "string", "event": "string", "campid": "string", "subject": "string",
                 "relid": "string", "msgid": "string", "email": "string",
                 "timestamp": "string"},
    "8.4": _TRACKING_MARKETING,
    "8.5": _DELIVERY_MARKETING,
    "8.6 cancelled": {**_UNSUBSCRIBED_MARKETING, "reason": "string"},
    "8.6 reactivated": _UNSUBSCRIBED_MARKETING,
    "8.6 categories": {**_UNSUBSCRIBED_MARKETING, "reason": "string", "categories": "object"},
    "8.7": _DELIVERY_SMTP,
    "8.8": {**_TRACKING_SMTP, "destination": "string"},
    "8.9": _TRACKING_SMTP,
    "8.10": _DELIVERY_SMTP,
    "8.11 cancelled": {**_UNSUBSCRIBED_SMTP, "reason": "string"},
    "8.11 reactivated": _UNSUBSCRIBED_SMTP,
    "8.11 categories": {**_UNSUBSCRIBED_SMTP, "reason": "string", "categories": "object"},
}


def facts(type_: EventType = EventType.SENT, details: dict[str, Any] | None = None,
          campaign: bool = False, **changes: Any) -> EventFacts:
    """An event about a message sent by SMTP (or, `campaign`, by DMDS campaign 1234)."""
    event = EventFacts(type_, {"reply": "250 2.0.0 Ok: queued"} if details is None else details,
                       MOMENT, 123, "America/Bogota", recipient="test@testdomain.com",
                       contact_id=112528991, origin="smtp", message_uid=SMTP_ID,
                       subject="Test message subject", sender="sender@testdomain.com",
                       client_ip="178.12.123.32",
                       custom_headers={"X-Test-Header": "test Value"})
    if campaign:
        event = dataclasses.replace(event, origin="dmds", campaign_numid=1234,
                                    campaign_name="Test campaign name",
                                    campaign_subject="Test campaign subject",
                                    custom_headers={})
    return dataclasses.replace(event, **changes)


def json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", dict: "object", list: "array"}[type(value)]


HARD = {"type": "hard", "reply": "550 5.5.0 Requested action not taken: mailbox unavailable."}
UNSUBSCRIBED = {"subscription_type": "domain subscription cancelled", "domain": "testdomain.com",
                "method": "page", "reason": "test reason", **CLIENT}
REACTIVATED = {"subscription_type": "domain subscription reactivated",
               "domain": "testdomain.com", "method": "page", **CLIENT}
CATEGORY_UPDATE = {**UNSUBSCRIBED, "subscription_type": "domain category update",
                   "categories": CATEGORIES}


class SeedPayloadTests(unittest.TestCase):
    """One test per payload of the seed: the fields of the table, each of its type."""

    def check(self, key: str, event: EventFacts, webhook: str) -> dict[str, Any]:
        payload = payload_for(event, [webhook])
        self.assertIsNotNone(payload)
        payload = json.loads(json.dumps(payload))  # what is posted
        expected = TABLE[key]
        self.assertEqual(set(payload), set(expected), key)
        for name, value in payload.items():
            self.assertIn(json_type(value), expected[name].split("|"), f"{key} {name}")
        self.assertEqual(payload["event"], webhook)
        self.assertEqual(payload["relid"], "123")
        self.assertEqual(payload["timestamp"], "2020-10-02 18:03:16")
        self.assertEqual(payload["type"], "SMTP" if event.campaign_numid is None
                         else "Email marketing")
        return payload

    def test_8_1_marketing_bounce(self):
        payload = self.check("8.1", facts(EventType.BOUNCED, HARD, campaign=True), "bounce")
        self.assertEqual(payload["campid"], "1234")
        self.assertEqual(payload["contactid"], "112528991")
        self.assertEqual(payload["origin"], "Web")
        self.assertEqual(payload["status"], "Rebote duro")
        self.assertEqual(payload["response"], HARD["reply"])

    def test_8_2_marketing_click(self):
        payload = self.check("8.2", facts(EventType.CLICK, {"url": "https://www.testdomain.com/",
                                                            **CLIENT}, campaign=True), "click")
        self.assertEqual(payload["destination"], "https://www.testdomain.com/")
        self.assertEqual(payload["contactId"], "112528991")
        self.assertEqual(payload["subject"], "Test campaign subject")
        self.assertEqual(payload["campaignName"], "Test campaign name")
        self.assertEqual((payload["cityName"], payload["regionName"], payload["countryName"]),
                         ("Bogota", "Distrito Capital de Bogota", "Colombia"))
        self.assertEqual((payload["latitude"], payload["longitude"]), (4.60971, -74.081749))
        self.assertEqual((payload["device_type"], payload["browser"]), ("mobile", "Chrome"))

    def test_8_3_marketing_complaint(self):
        payload = self.check("8.3", facts(EventType.COMPLAINT, {"source": "arf",
                                                                "feedback_type": "abuse"},
                                          campaign=True), "complaint")
        self.assertEqual(payload["campid"], "1234")
        self.assertEqual(payload["email"], "test@testdomain.com")

    def test_8_3_smtp_complaint(self):
        """The seed's table: "para los mensajes de SMTP se mostrará SMTP"."""
        payload = self.check("8.3 SMTP", facts(EventType.COMPLAINT, {"source": "arf"}),
                             "complaint")
        self.assertEqual(payload["campid"], "SMTP")
        self.assertEqual(payload["msgid"], "d3f26a70-075b-11eb-b547-478382137ef6")

    def test_8_4_marketing_open(self):
        payload = self.check("8.4", facts(EventType.OPEN, CLIENT, campaign=True), "open")
        self.assertEqual(payload["email"], "test@testdomain.com")

    def test_8_5_marketing_sent(self):
        payload = self.check("8.5", facts(campaign=True), "sent")
        self.assertEqual(payload["status"], "Entregado")
        self.assertEqual(payload["response"], "OK")
        self.assertEqual(payload["to"], "test@testdomain.com")

    def test_8_6_marketing_unsubscribed(self):
        payload = self.check("8.6 cancelled", facts(EventType.UNSUBSCRIBED, UNSUBSCRIBED,
                                                    campaign=True), "unsubscribed")
        self.assertEqual(payload["subscription_type"], "domain subscription cancelled")
        self.assertEqual(payload["reason"], "test reason")
        self.assertEqual(payload["domain"], "testdomain.com")

    def test_8_6_marketing_reactivated(self):
        payload = self.check("8.6 reactivated", facts(EventType.RESUBSCRIBED, REACTIVATED,
                                                      campaign=True), "unsubscribed")
        self.assertEqual(payload["subscription_type"], "domain subscription reactivated")

    def test_8_6_marketing_categories(self):
        payload = self.check("8.6 categories", facts(EventType.UNSUBSCRIBED, CATEGORY_UPDATE,
                                                     campaign=True), "unsubscribed")
        self.assertEqual(payload["categories"], CATEGORIES)
        self.assertEqual(payload["subscription_type"], "domain category update")

    def test_8_7_smtp_bounce(self):
        payload = self.check("8.7", facts(EventType.BOUNCED, HARD), "bounce")
        self.assertEqual(payload["status"], "Rebote duro")
        self.assertEqual(payload["response"], HARD["reply"])
        self.assertEqual(payload["ip"], "178.12.123.32")
        self.assertEqual(payload["origin"], "SMTP")
        self.assertEqual(payload["sender"], "sender@testdomain.com")

    def test_8_8_smtp_click(self):
        payload = self.check("8.8", facts(EventType.CLICK, {"url": "https://testdestination.com",
                                                            **CLIENT}), "click")
        self.assertEqual(payload["destination"], "https://testdestination.com")
        self.assertEqual(payload["subject"], "Test message subject")

    def test_8_9_smtp_open(self):
        payload = self.check("8.9", facts(EventType.OPEN, CLIENT), "open")
        self.assertEqual(payload["custom_headers"], {"x-test-header": "test Value"})

    def test_8_10_smtp_sent(self):
        payload = self.check("8.10", facts(origin="api", api_msgid=API_MSGID), "sent")
        self.assertEqual(payload["origin"], "API")
        self.assertEqual((payload["status"], payload["response"]), ("Entregado", "OK"))

    def test_8_11_smtp_unsubscribed(self):
        payload = self.check("8.11 cancelled", facts(EventType.UNSUBSCRIBED, UNSUBSCRIBED),
                             "unsubscribed")
        self.assertEqual(payload["msgid"], "d3f26a70-075b-11eb-b547-478382137ef6")

    def test_8_11_smtp_reactivated(self):
        self.check("8.11 reactivated", facts(EventType.RESUBSCRIBED, REACTIVATED), "unsubscribed")

    def test_8_11_smtp_categories(self):
        payload = self.check("8.11 categories", facts(EventType.UNSUBSCRIBED, CATEGORY_UPDATE),
                             "unsubscribed")
        self.assertEqual(payload["categories"], CATEGORIES)


class ValueTests(unittest.TestCase):
    def test_msgid_is_the_smtp_id_in_uuid_form(self):
        msgid = payload_for(facts(), ["sent"])["msgid"]
        self.assertEqual(msgid, "d3f26a70-075b-11eb-b547-478382137ef6")
        self.assertEqual(msgid.replace("-", ""), SMTP_ID)

    def test_api_sends_answer_the_api_msgid(self):
        self.assertEqual(payload_for(facts(origin="api", api_msgid=API_MSGID), ["sent"])["msgid"],
                         API_MSGID)
        # The DMDS API answers no per-recipient msgid: its sends name the message.
        payload = payload_for(facts(origin="dmds", api_msgid=API_MSGID), ["sent"])
        self.assertEqual((payload["msgid"], payload["origin"]),
                         ("d3f26a70-075b-11eb-b547-478382137ef6", "API"))

    def test_timestamp_in_the_account_zone(self):
        at = datetime(2020, 10, 5, 22, 40, 54, 987000, tzinfo=UTC)
        for zone, expected in (("America/Bogota", "2020-10-05 17:40:54"),
                               ("Europe/Madrid", "2020-10-06 00:40:54"),
                               ("Nowhere/Unknown", "2020-10-05 22:40:54")):
            payload = payload_for(facts(occurred_at=at, timezone=zone), ["sent"])
            self.assertEqual(payload["timestamp"], expected, zone)

    def test_custom_header_keys_in_lower_case(self):
        event = facts(custom_headers={"X-Test-Header": "test Value", "X-CAMPAIGN": "Fall"})
        self.assertEqual(payload_for(event, ["sent"])["custom_headers"],
                         {"x-test-header": "test Value", "x-campaign": "Fall"})

    def test_unknown_place_and_agent(self):
        details = {**CLIENT, "city": "", "region": "", "country": "", "latitude": None,
                   "longitude": None, "device_type": "unknown", "browser": "unknown"}
        payload = payload_for(facts(EventType.OPEN, details), ["open"])
        self.assertEqual([payload[k] for k in ("cityName", "regionName", "countryName",
                                               "latitude", "longitude", "device_type",
                                               "browser")],
                         ["", "", "", None, None, "unknown", "unknown"])
        # Details without the keys (an event recorded before geo was known) alike.
        payload = payload_for(facts(EventType.OPEN, {}), ["open"])
        self.assertEqual((payload["cityName"], payload["latitude"]), ("", None))

    def test_unknown_values_are_empty_strings(self):
        event = facts(campaign=True, contact_id=None, recipient=None)
        payload = payload_for(event, ["sent"])
        self.assertEqual((payload["contactid"], payload["to"]), ("", ""))

    def test_fixed_unsubscribe_reasons(self):
        """The reasons the tracking endpoints and the inbound listener record are the
        seed's, and posted as recorded."""
        self.assertEqual(ONE_CLICK_REASON, "Cancelación de suscripción en un clic")
        self.assertEqual(MAILTO_REASON, "Cancelación por correo electrónico")
        for method, reason in (("one-click", ONE_CLICK_REASON), ("mailto", MAILTO_REASON),
                               ("complaint", "Queja por correo no deseado")):
            details = {"subscription_type": "domain subscription cancelled",
                       "domain": "testdomain.com", "method": method, "reason": reason}
            payload = payload_for(facts(EventType.UNSUBSCRIBED, details), ["unsubscribed"])
            self.assertEqual(payload["reason"], reason, method)


class ChoiceTests(unittest.TestCase):
    """Which payload, if any, an endpoint gets for an event."""

    def test_soft_bounces_are_no_aldeamo_bounce(self):
        soft = facts(EventType.BOUNCED, {"type": "soft", "reply": "452 4.2.2 Mailbox full"})
        self.assertIsNone(payload_for(soft, ["bounce"]))
        self.assertIsNone(payload_for(soft, WEBHOOK_NAMES))
        own = payload_for(soft, ["bounce", "bounced"])
        self.assertEqual(own["event"], "bounced")
        self.assertEqual(own["details"], {"type": "soft", "reply": "452 4.2.2 Mailbox full"})

    def test_hard_bounce_prefers_the_aldeamo_payload(self):
        hard = facts(EventType.BOUNCED, HARD)
        self.assertEqual(payload_for(hard, ["bounced", "bounce"])["event"], "bounce")
        self.assertEqual(payload_for(hard, ["bounced"])["event"], "bounced")

    def test_machine_opens_and_clicks_are_not_posted(self):
        for type_ in (EventType.OPEN, EventType.CLICK):
            event = facts(type_, {**CLIENT, "machine_reason": "privacy_proxy"}, machine=True)
            self.assertIsNone(payload_for(event, ["open", "click", "sent"]), type_)

    def test_nothing_wanted(self):
        self.assertIsNone(payload_for(facts(), ["open", "bounce", "queued"]))
        self.assertIsNone(payload_for(facts(), []))
        self.assertIsNone(payload_for(facts(EventType.QUEUED, {}), WEBHOOK_NAMES))

    def test_resubscribed_is_unsubscribed_reactivated(self):
        event = facts(EventType.RESUBSCRIBED, {"domain": "testdomain.com", "method": "page"})
        payload = payload_for(event, ["unsubscribed", "resubscribed"])
        self.assertEqual((payload["event"], payload["subscription_type"]),
                         ("unsubscribed", "domain subscription reactivated"))
        self.assertNotIn("reason", payload)
        self.assertEqual(payload_for(event, ["resubscribed"])["event"], "resubscribed")

    def test_own_payload(self):
        event = facts(EventType.DEFERRED, {"reply": "421 try later"}, campaign=True)
        self.assertEqual(payload_for(event, ["deferred"]), {
            "type": "Email marketing", "event": "deferred", "relid": "123", "campid": "1234",
            "msgid": "d3f26a70-075b-11eb-b547-478382137ef6", "email": "test@testdomain.com",
            "timestamp": "2020-10-02 18:03:16", "details": {"reply": "421 try later"}})

    def test_own_payload_of_a_contact_event(self):
        """An invalidation knows its contact only: no message, no send."""
        event = facts(EventType.INVALIDATED, {"reason": "2 hard bounces"}, origin=None,
                      message_uid=None, subject=None, sender=None, client_ip=None,
                      custom_headers={})
        payload = json.loads(json.dumps(payload_for(event, ["invalidated"])))
        self.assertEqual(payload, {
            "type": "SMTP", "event": "invalidated", "relid": "123", "msgid": None,
            "email": "test@testdomain.com", "timestamp": "2020-10-02 18:03:16",
            "details": {"reason": "2 hard bounces"}})

    def test_a_post_is_what_the_endpoint_asked_for(self):
        """Whatever the event and the endpoint's one type, the post (if any) is of that
        type, and valid JSON; E-1 names that are W-1 names only mean the Aldeamo post."""
        own = {"queued", "deferred", "bounced", "not_sent", "resubscribed", "invalidated",
               "revalidated"}
        for type_ in EventType:
            for details in ({}, HARD, CATEGORY_UPDATE):
                for wanted in WEBHOOK_EVENT_TYPES:
                    payload = payload_for(facts(type_, details), [wanted])
                    if payload is None:
                        continue
                    self.assertEqual(json.loads(json.dumps(payload))["event"], wanted)
                    self.assertEqual("details" in payload, wanted in own, (type_, wanted))
