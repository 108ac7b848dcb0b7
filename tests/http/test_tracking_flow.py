"""Tracking end to end (issue 14, point 9): a message submitted over SMTP and delivered to
a local receiver; its pixel, a link, its web version and its one-click unsubscribe
followed over HTTP; the statistics read with an API key; and the next send to the same
contact not sent."""

import email
import email.policy
import json
import re
from urllib.parse import urlsplit

import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mailgw import credentials
from mailgw.config import DeliveryConfig, TrackingConfig
from mailgw.content.dkim import generate_dkim_key
from mailgw.http.tracking import PIXEL
from tests.delivery.test_delivery_flow import _send, _settled, _zone
from tests.dns_server import LocalDNS
from tests.events.test_agents import IPHONE
from tests.harness import (
    PASSWORD,
    USER,
    QueriesDatabase,
    fresh_database,
    gateway_config,
    start_gateway,
)
from tests.http.test_tracking import http_client
from tests.smtp_sink import SMTPSink

TRACKING_URL = re.compile(r'http://localhost:8080/t/[a-z]/[A-Za-z0-9_-]+(?:\.gif)?')


class TrackingFlowTests(QueriesDatabase, unittest.TestCase):
    async def setUp(self):
        self.sink = SMTPSink()
        sink_port = self.sink.start()
        self.addCleanup(self.sink.stop)
        dns = LocalDNS(_zone(sink_port))
        _, dns_port = dns.start(reactor)
        self.addCleanup(dns.stop)
        delivery = DeliveryConfig(dns_servers=[f"127.0.0.1:{dns_port}"],
                                  remote_smtp_port=sink_port, poll_interval=0.05)
        # A person here acts within milliseconds of the delivery: no scanner window.
        config = gateway_config(self, fresh_database(), delivery=delivery,
                                tracking=TrackingConfig(scanner_seconds=0))
        self.gateway = await start_gateway(self, config)
        self.database = self.gateway.database
        stores = self.gateway.stores
        account = await stores.accounts.create_account("acme")
        await stores.accounts.create_user(account.id, USER, credentials.hash_password(PASSWORD))
        key = generate_dkim_key("rsa")
        await stores.senders.add_domain(account.id, "example.org", "mg1", "rsa",
                                        key.private_key_pem, key.public_key,
                                        "bounces.example.org")
        await stores.senders.verify_domain(account.id, "example.org")
        self.api_key = credentials.new_api_key()
        await stores.accounts.create_api_key(account.id, "stats",
                                             credentials.hash_api_key(self.api_key),
                                             credentials.api_key_prefix(self.api_key))
        self.base = f"http://127.0.0.1:{self.gateway.port_for('http.listener')}"
        self.smtp_port = self.gateway.port_for("smtp.starttls_listeners[0]")
        self.http = http_client()

    def local(self, url: str) -> str:
        return self.base + urlsplit(url).path

    async def stats(self, send_id: int) -> dict:
        response = await self.http.get(f"{self.base}/v1/stats/sends/{send_id}", headers={
            b"Authorization": [f"Bearer {self.api_key}".encode()]})
        self.assertEqual(response.code, 200)
        return json.loads(await treq.content(response))["counters"]

    async def test_pixel_click_unsubscribe_statistics_and_the_next_send(self):
        await deferToThread(_send, self.smtp_port, ["ana@example.net"])
        (received,) = await self.sink.wait_for(1)
        await _settled(self.gateway, 1)
        message = email.message_from_bytes(received.data, policy=email.policy.default)
        html = message.get_body(("html",)).get_content()
        urls = TRACKING_URL.findall(html)
        [pixel] = [u for u in urls if "/t/o/" in u]
        [click] = [u for u in urls if "/t/c/" in u]
        [unsubscribe] = re.findall(r"<(http://[^>]+/t/u/[^>]+)>", message["List-Unsubscribe"])

        # As a person's mail client and browser (no User-Agent would be a machine).
        browser = {b"User-Agent": [IPHONE]}
        response = await self.http.get(self.local(pixel), headers=browser)
        self.assertEqual((response.code, await treq.content(response)), (200, PIXEL))
        response = await self.http.get(self.local(click), headers=browser,
                                       allow_redirects=False)
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders(b"Location"),
                         [b"https://shop.example.com/sale?x=1"])
        # The web version (its link on top, S-9) is the HTML the recipient received, but
        # for SMTP's CRLF line ends and the final one the MIME part adds.
        [web] = [u for u in urls if "/t/w/" in u]
        response = await self.http.get(self.local(web), headers=browser)
        self.assertEqual((await treq.content(response)).decode().rstrip("\n"),
                         html.replace("\r\n", "\n").rstrip("\n"))
        response = await self.http.post(
            self.local(unsubscribe), data=b"List-Unsubscribe=One-Click",
            headers={b"Content-Type": [b"application/x-www-form-urlencoded"]})
        self.assertEqual(response.code, 200)

        [(send_id,)] = await self.sql("SELECT id FROM sends")
        counters = await self.stats(send_id)
        self.assertEqual({k: v for k, v in counters.items() if v},
                         {"recipients": 1, "sent": 1, "opens_unique": 1, "opens_total": 1,
                          "clicks_unique": 1, "clicks_total": 1, "unsubscribes": 1})

        # D-6: the next send to that contact from that domain is not sent.
        await deferToThread(_send, self.smtp_port, ["ana@example.net"])
        [(second,)] = await self.sql("SELECT max(id) FROM sends")
        self.assertEqual(await self.sql(
            "SELECT d.state, d.last_reply FROM deliveries d JOIN messages m"
            " ON m.id = d.message_id WHERE m.send_id = %s", second),
            [("not_sent", "unsubscribed")])
        counters = await self.stats(second)
        self.assertEqual({k: v for k, v in counters.items() if v},
                         {"recipients": 1, "not_sent": 1})
        self.assertEqual(len(self.sink.messages), 1)
