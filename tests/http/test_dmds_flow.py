"""The DMDS API with delivery to a local receiver (H-2, D-6, D-7): whitelisted contacts
are never invalidated by bounces, campos and global variables reach the copy sent, and
the end-to-end flow of issue 17: an api campaign, send_many_uri with a copy and a blind
copy, delivery, an open and a click, the batch's events and each recipient's EML exactly
as received."""

import email
import email.policy
import json
import re

import treq
from twisted.internet import reactor, task
from twisted.trial import unittest
from twisted.web import resource, server, static

from mailgw.config import DeliveryConfig, HTTPConfig
from tests.dns_server import LocalDNS
from tests.harness import (
    LOOPBACK_PORT,
    QueriesDatabase,
    fresh_database,
    gateway_config,
    start_with_account,
)
from tests.smtp_sink import SMTPSink

SENDER = "news@dominio.com"
PIECE = ('<html><body><p>Hola XYZNOMBREXYZ, tu DNI es XYZDNIXYZ.</p>'
         '<p><a href="https://shop.example.com/oferta">Ver la oferta</a></p></body></html>')
class DeliveredTestCase(QueriesDatabase, unittest.TestCase):
    async def setUp(self):
        self.sink = SMTPSink()
        sink_port = self.sink.start()
        self.addCleanup(self.sink.stop)
        files = resource.Resource()
        files.putChild(b"pieza.html", static.Data(PIECE.encode(), "text/html; charset=utf-8"))
        web = reactor.listenTCP(0, server.Site(files), interface="127.0.0.1")
        self.addCleanup(web.stopListening)
        self.piece_url = f"http://cms.example:{web.getHost().port}/pieza.html"
        self.dns = LocalDNS({"example.net": {"MX": [(10, "mx.example.net")]},
                             "mx.example.net": {"A": ["127.0.0.1"]},
                             "cms.example": {"A": ["127.0.0.1"]}})
        _, dns_port = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        config = gateway_config(
            self, fresh_database(),
            http=HTTPConfig(listener=LOOPBACK_PORT, fetch_allow_networks=["127.0.0.0/8"]),
            delivery=DeliveryConfig(dns_servers=[f"127.0.0.1:{dns_port}"],
                                    remote_smtp_port=sink_port, poll_interval=0.05,
                                    connect_timeout=5, reply_timeout=10,
                                    hard_bounce_limit=1))
        await start_with_account(self, config)

    async def call(self, method, path, body=None, key=None):
        response = await treq.request(
            method, self.base + path, data=json.dumps(body).encode() if body else None,
            headers={"Authorization": [key or self.key]}, persistent=False)
        content = await response.content()
        if response.headers.getRawHeaders(b"content-type", [b""])[0].startswith(
                b"application/json"):
            content = json.loads(content)
            self.assertEqual((response.code, content["status"]), (200, "ok"), content)
        return content

    async def settled(self, count, seconds=20):
        """Until `count` deliveries have their final state (a bound for a broken build)."""
        deadline = reactor.seconds() + seconds
        while (await self.sql("SELECT count(*) FROM deliveries WHERE state IN"
                              " ('sent', 'bounced', 'not_sent')"))[0][0] < count:
            if reactor.seconds() > deadline:
                raise AssertionError(f"{count} deliveries still not settled")
            await task.deferLater(reactor, 0.05, lambda: None)


class WhitelistTests(DeliveredTestCase):
    async def test_whitelisted_contacts_are_never_invalidated_by_bounces(self):
        """D-7 with a limit of one hard bounce: the contact the API whitelisted stays
        valid, the other is invalidated (and both bounces are shown)."""
        await self.call("POST", "/v1/whitelist/bounce-a@example.net")
        answer = await self.call("POST", "/v1/send_many_inline/", {
            "contactos": [{"email": "bounce-a@example.net"}, {"email": "bounce-b@example.net"}],
            "remitente": SENDER, "asunto": "s", "html": "<p>x</p>"})
        self.assertEqual(answer["sent"], 2)
        await self.settled(2)
        kept = (await self.call("GET", "/v1/contacto/bounce-a@example.net"))["contacto"]
        gone = (await self.call("GET", "/v1/contacto/bounce-b@example.net"))["contacto"]
        self.assertEqual((kept["invalido"], kept["whitelist"], gone["invalido"]),
                         (False, True, True))
        self.assertEqual([e["evento"] for e in kept["eventos"]], ["rebote_hard"])
        self.assertEqual([e["evento"] for e in gone["eventos"]],
                         ["rebote_hard", "invalidacion"])
        invalid = await self.call("GET", "/v1/invalidos/")
        self.assertEqual([c["email"] for c in invalid["invalidos"]], ["bounce-b@example.net"])


class MergeTests(DeliveredTestCase):
    async def test_campos_and_global_variables_reach_the_copy_sent(self):
        """A campo stored as XYZDNIXYZ through the API fills the tag XYZDNIXYZ; a global
        variable fills the tags no field or campo of the contact fills."""
        await self.call("POST", "/v1/contacto/", {
            "email": "ana@example.net", "nombre": "Ana",
            "campos": [{"nombre": "XYZDNIXYZ", "valor": "21232421"}]})
        await self.call("POST", "/v1/variables/", {"variable": "XYZEMPRESAXYZ",
                                                   "valor": "Planisys"})
        await self.call("POST", "/v1/variables/", {"variable": "XYZDNIXYZ", "valor": "none"})
        await self.call("POST", "/v1/send_one_inline/", {
            "contacto": {"email": "ana@example.net"}, "remitente": SENDER,
            "asunto": "Hola XYZNOMBREXYZ de XYZEMPRESAXYZ",
            "html": "<p>XYZNOMBREXYZ XYZDNIXYZ XYZEMPRESAXYZ</p>"})
        [received] = await self.sink.wait_for(1)
        message = email.message_from_bytes(received.data, policy=email.policy.default)
        self.assertEqual(message["Subject"], "Hola Ana de Planisys")
        html = message.get_body(("html",)).get_content()
        self.assertIn("<p>Ana 21232421 Planisys</p>", html)
        # The web version (T-4) shows what the recipient received.
        web = re.search(r'href="https?://[^/"]+(/t/w/[^"]+)"', html).group(1)
        response = await treq.get(self.base + web, persistent=False)
        self.assertIn("<p>Ana 21232421 Planisys</p>", (await response.content()).decode())


class EndToEndTests(DeliveredTestCase):
    async def test_campaign_send_many_uri_delivery_open_click_events_and_eml(self):
        """Issue 17 point 10: an api campaign whose piece is on a local web server;
        send_many_uri to three contacts with a copy and a blind copy, archived; delivered
        to the local receiver; one message opened and clicked; then eeid/ lists envio,
        view and click, and eeid_eml gives each recipient's EML exactly as received."""
        campaign = await self.call("POST", "/v1/campania/", {
            "nombre": "Bienvenida", "tipo": "api", "remitente": SENDER,
            "remitente_nombre": "Noticias", "asunto": "Hola XYZNOMBREXYZ",
            "html_uri": self.piece_url})
        contacts = [{"email": f"c{n}@example.net", "nombre": name}
                    for n, name in enumerate(("Ana", "Beto", "Carla"))]
        answer = await self.call("POST", "/v1/send_many_uri/", {
            "numid": campaign["numid"], "contactos": contacts, "archive": True,
            "copia": [{"cc_email": "copia@example.net", "cc_nombre": "Copia"}],
            "copia_oculta": [{"bcc_email": "oculta@example.net"}]})
        self.assertEqual(answer["sent"], 5)
        eeid = answer["eeid"]
        received = {r.recipient: r for r in await self.sink.wait_for(5)}
        await self.settled(5)
        self.assertEqual(sorted(received), [
            "c0@example.net", "c1@example.net", "c2@example.net", "copia@example.net",
            "oculta@example.net"])
        beto = email.message_from_bytes(received["c1@example.net"].data,
                                        policy=email.policy.default)
        self.assertEqual((beto["Subject"], beto["From"], beto["Cc"]),
                         ("Hola Beto", f"Noticias <{SENDER}>", "Copia <copia@example.net>"))
        html = beto.get_body(("html",)).get_content()
        self.assertIn("Hola Beto, tu DNI es XYZDNIXYZ.", html)

        pixel = re.search(r'src="https?://[^/"]+(/t/o/[^"]+)"', html).group(1)
        click = re.search(r'href="https?://[^/"]+(/t/c/[^"]+)"', html).group(1)
        opened = await treq.get(self.base + pixel, persistent=False)
        await opened.content()
        self.assertEqual(opened.code, 200)
        clicked = await treq.get(self.base + click, persistent=False, allow_redirects=False)
        await clicked.content()
        self.assertEqual((clicked.code, clicked.headers.getRawHeaders(b"location")),
                         (302, [b"https://shop.example.com/oferta"]))

        batch = await self.call("GET", f"/v1/eeid/{eeid}")
        self.assertEqual(batch["campania"], "Bienvenida")
        self.assertEqual(sorted((e["evento"], e["email"]) for e in batch["eventos"]), sorted(
            [("envio", address) for address in received]
            + [("view", "c1@example.net"), ("click", "c1@example.net")]))
        [clicked_event] = [e for e in batch["eventos"] if e["evento"] == "click"]
        self.assertEqual(clicked_event["detalle"], "https://shop.example.com/oferta")
        self.assertEqual({d["email"]: (d["tipo"], d["estado"], d["eml"])
                          for d in batch["archive"]["destinatarios"]}, {
            "c0@example.net": ("to", "sent", True), "c1@example.net": ("to", "sent", True),
            "c2@example.net": ("to", "sent", True),
            "copia@example.net": ("cc", "sent", True),
            "oculta@example.net": ("bcc", "sent", True)})
        for address, message in received.items():
            eml = await self.call("GET", f"/v1/eeid_eml/{eeid}/{address}")
            # The receiver keeps the lines it got, without the CRLF that ends the last.
            self.assertEqual(eml, message.data + b"\r\n", address)
        info = await self.call("GET", f"/v1/eeid_info/{eeid}")
        self.assertEqual((info["destinatarios"], info["enviados"], info["numid"]),
                         (5, 5, campaign["numid"]))
