"""Webhooks end to end (issue 18 point 7): messages submitted over SMTP and delivered to a
local receiver; a DSN refusing one later and an ARF complaint about another, sent to
the inbound listener; every event reaches a local webhook receiver as a signed Aldeamo
payload, the statistics count them, and a later send to the complained contact is
not sent."""

from __future__ import annotations

import email
import json

import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web import resource, server

from mailgw import admin
from mailgw.config import InboundConfig, WebhookConfig
from mailgw.events.webhooks.signing import SIGNATURE_HEADER, verify
from tests.delivery.test_delivery_flow import _send, _settled, local_delivery, sending_account
from tests.harness import (
    LOOPBACK_PORT,
    QueriesDatabase,
    fresh_database,
    gateway_config,
    start_gateway,
    until,
)
from tests.inbound import samples
from tests.inbound.test_inbound_flow import _mail


class WebhookReceiver(resource.Resource):
    """Keeps every post: its body, its signature header and the time it came."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[tuple[bytes, str, float]] = []

    def render_POST(self, request):  # noqa: N802 - twisted.web's name
        signature = request.getHeader(SIGNATURE_HEADER) or ""
        self.posts.append((request.content.read(), signature, reactor.seconds()))
        return b""

    def events(self) -> list[str]:
        return sorted(json.loads(body)["event"] for body, _, _ in self.posts)

    def payload(self, event: str, **match) -> dict:
        [found] = [p for p in (json.loads(body) for body, _, _ in self.posts)
                   if p["event"] == event and all(p.get(k) == v for k, v in match.items())]
        return found


class WebhookFlowTests(QueriesDatabase, unittest.TestCase):
    async def setUp(self):
        self.sink, self.dns, delivery = local_delivery(self)
        self.receiver = WebhookReceiver()
        port = reactor.listenTCP(0, server.Site(self.receiver), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.gateway = await start_gateway(self, gateway_config(
            self, fresh_database(), delivery=delivery,
            inbound=InboundConfig(listeners=[LOOPBACK_PORT]),
            webhooks=WebhookConfig(poll_interval=0.05, allow_http_hosts=["127.0.0.1"])))
        self.database = self.gateway.database
        stores = self.gateway.stores
        self.account, _ = await sending_account(stores)
        _, self.secret = await admin.add_webhook(
            stores, self.account.id, f"http://127.0.0.1:{port.getHost().port}/hook",
            ["sent", "bounce", "complaint", "unsubscribed"],
            self.gateway.config.webhooks.allow_http_hosts)

    async def deliver(self, recipient: str, count: int):
        port = self.gateway.port_for("smtp.starttls_listeners[0]")
        await deferToThread(_send, port, [recipient])
        received = await self.sink.wait_for(count)
        await _settled(self.gateway, count)
        return received[-1]

    async def inbound(self, sender: str, recipients: list[str], message: bytes) -> None:
        await deferToThread(_mail, self.gateway.port_for("inbound.listeners[0]"), sender,
                            recipients, message)

    async def test_dsn_and_complaint_reach_the_receiver_signed(self):
        ana = await self.deliver("ana@example.net", 1)
        bea = await self.deliver("bea@example.net", 2)
        await self.inbound("", [ana.sender], samples.dsn(ana.sender))
        message_id = email.message_from_bytes(bea.data)["Message-ID"]
        await self.inbound("fbl@hotmail.example", ["fbl@bounces.example.org"],
                           samples.arf(message_id=message_id, recipient="bea@example.net"))

        await until(lambda: len(self.receiver.posts) == 5, "five webhooks", seconds=30)
        self.assertEqual(self.receiver.events(),
                         ["bounce", "complaint", "sent", "sent", "unsubscribed"])
        for body, signature, when in self.receiver.posts:
            self.assertTrue(verify(self.secret, signature, body, when), body)

        uids = dict(await self.sql("SELECT d.recipient, m.message_uid FROM deliveries d"
                                   " JOIN messages m ON m.id = d.message_id"))
        sent = self.receiver.payload("sent", to="ana@example.net")
        self.assertEqual(sent["msgid"].replace("-", ""), uids["ana@example.net"])
        self.assertEqual((sent["type"], sent["origin"], sent["status"], sent["response"]),
                         ("SMTP", "SMTP", "Entregado", "OK"))
        self.assertEqual(sent["custom_headers"], {"x-campaign": "spring"})
        bounce = self.receiver.payload("bounce")
        self.assertEqual((bounce["to"], bounce["status"]), ("ana@example.net", "Rebote duro"))
        self.assertIn("550 5.1.1", bounce["response"])
        self.assertEqual(bounce["msgid"], sent["msgid"])
        complaint = self.receiver.payload("complaint")
        self.assertEqual((complaint["email"], complaint["campid"]), ("bea@example.net", "SMTP"))
        self.assertEqual(complaint["msgid"].replace("-", ""), uids["bea@example.net"])
        unsubscribed = self.receiver.payload("unsubscribed")
        self.assertEqual((unsubscribed["email"], unsubscribed["domain"],
                          unsubscribed["subscription_type"]),
                         ("bea@example.net", "example.org", "domain subscription cancelled"))

        statistics = self.gateway.stores.statistics
        totals = [(await statistics.send(send_id)).counters for (send_id,) in
                  await self.sql("SELECT DISTINCT send_id FROM messages ORDER BY 1")]
        self.assertEqual([(c.sent, c.bounced_hard, c.complaints, c.unsubscribes)
                          for c in totals], [(1, 1, 0, 0), (1, 0, 1, 1)])

        port = self.gateway.port_for("smtp.starttls_listeners[0]")
        await deferToThread(_send, port, ["bea@example.net"])
        await _settled(self.gateway, 3)
        self.assertEqual((await self.sql("SELECT state FROM deliveries ORDER BY id"))[-1],
                         ("not_sent",))
        self.assertEqual(await self.sql("SELECT count(*) FROM webhook_deliveries"), [(0,)])

    async def test_http_send_posts_the_msgid_the_api_answered(self):
        _, key = await admin.create_api_key(self.gateway.stores, self.account.id, "app")
        response = await treq.post(
            f"http://127.0.0.1:{self.gateway.port_for('http.listener')}/v1/email",
            json={"to": [{"email": "cid@example.net"}], "subject": "Hola",
                  "from": {"email": "news@example.org", "name": "News"},
                  "body": "<p>Hola</p>"},
            headers={"Authorization": [f"Bearer {key}"]}, persistent=False)
        answer = json.loads(await response.content())
        self.assertEqual(response.code, 200, answer)
        await until(lambda: self.receiver.posts, "the sent webhook", seconds=30)
        sent = self.receiver.payload("sent")
        self.assertEqual((sent["to"], sent["msgid"], sent["origin"], sent["ip"]),
                         ("cid@example.net", answer["to"][0]["msgid"], "API", "127.0.0.1"))
