"""The DMDS API v1.5 (H-2) on a running Gateway, without delivery: every endpoint, its
answers and errors in the seed's words, contacts, the whitelist, groups, filters,
variables, campaigns and their keys, sends, batches and event ranges, bad input
(R-3). Delivery is in test_dmds_flow.py."""

import hashlib
import json
import os
import uuid

import treq
from twisted.internet import protocol, reactor, utils
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web import resource, server, static

from mailgw import admin, credentials
from mailgw.config import DeliveryConfig, HTTPConfig, SMTPConfig
from mailgw.http.dmds import DMDSApp
from tests.dns_server import LocalDNS
from tests.harness import (
    LOOPBACK_PORT,
    Client,
    QueriesDatabase,
    fresh_database,
    gateway_config,
    smtp_client,
    start_with_account,
)

SENDER = "news@dominio.com"
# The seed's contact fields (contacto/<email>), in its order; mailgw adds `whitelist`.
SEED_CONTACT_KEYS = [
    "numid", "email", "nombre", "apellido", "edad", "sexo", "profesion", "localidad",
    "operacion", "actualizado", "origenes", "codigo_pais", "codigo_region", "ciudad",
    "dispositivo", "subtipo_dispositivo_id", "grupo_de_dominio_id", "invalido", "whitelist",
    "campos", "eventos", "grupos", "campanias", "campanias_desusc"]


def dmds_routes():
    """(method, path) of every route of the DMDS app, variables filled in."""
    routes = []
    for rule in DMDSApp.app.url_map.iter_rules():
        path = (rule.rule.replace("<email>", "ana@example.net")
                .replace("<int(max=9223372036854775807):numid>", "1")
                .replace("<eeid>", str(uuid.uuid4())))
        routes.extend((method, path) for method in sorted(rule.methods - {"HEAD", "OPTIONS"}))
    return routes


class DMDSTestCase(QueriesDatabase, unittest.TestCase):
    http_config = HTTPConfig(listener=LOOPBACK_PORT)
    smtp_config: SMTPConfig | None = None

    async def setUp(self):
        self.dns = LocalDNS({"gmail.com": {"MX": [(10, "mx.gmail.com")]},
                             "example.net": {"MX": [(10, "mx.example.net")]}})
        _, dns_port = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        config = gateway_config(self, fresh_database(), http=self.http_config,
                                delivery=DeliveryConfig(enabled=False,
                                                        dns_servers=[f"127.0.0.1:{dns_port}"]))
        if self.smtp_config is not None:
            config = config.replace(smtp=self.smtp_config)
        await start_with_account(self, config)

    async def call(self, method, path, body=None, key=None, raw=None):
        """(status, JSON answer) of a request with the account's key (bare, as the seed's
        clients send it)."""
        headers = {"Authorization": [key or self.key], "Content-Type": ["application/json"]}
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                            else None)
        response = await treq.request(method, self.base + path, data=data, headers=headers,
                                      persistent=False)
        content = await response.content()
        if response.headers.getRawHeaders(b"content-type", [b""])[0].startswith(
                b"application/json"):
            return response.code, json.loads(content)
        return response.code, content

    async def ok(self, method, path, body=None, key=None):
        code, answer = await self.call(method, path, body, key)
        self.assertEqual((code, answer["status"]), (200, "ok"), answer)
        return answer

    async def err(self, method, path, body=None, key=None, raw=None):
        """(status, on) of an error answer, which must be the DMDS error body exactly."""
        code, answer = await self.call(method, path, body, key, raw)
        self.assertEqual(set(answer), {"status", "on"}, answer)
        self.assertEqual(answer["status"], "err")
        return code, answer["on"]

    async def campaign(self, **fields):
        body = {"nombre": "VIMS ", "tipo": "api", "remitente": SENDER,
                "remitente_nombre": "Noticias", "asunto": "Hola XYZNOMBREXYZ",
                "html_uri": "http://cms.example/pieza.html", **fields}
        return await self.ok("POST", "/v1/campania/", body)

    async def send_one(self, email="ana@example.net", **fields):
        body = {"contacto": {"email": email}, "remitente": SENDER, "asunto": "Hola",
                "html": "<p>Hola XYZNOMBREXYZ</p>", **fields}
        return await self.ok("POST", "/v1/send_one_inline/", body)


class EndpointTests(DMDSTestCase):
    async def test_every_endpoint_refuses_a_wrong_key_with_403(self):
        routes = dmds_routes()
        self.assertEqual(len(routes), 39)
        for method, path in routes:
            self.assertEqual(await self.err(method, path, key="mgw_wrong"),
                             (403, "invalid API key"), (method, path))

    async def test_a_campaign_key_only_sends_for_its_campaign(self):
        campaign = await self.campaign()
        other = await self.campaign(nombre="otra")
        for method, path in dmds_routes():
            if "/send_" not in path:
                self.assertEqual(await self.err(method, path, key=campaign["camp_apikey"]),
                                 (403, "this API key may not do this"), (method, path))
        body = {"contacto": {"email": "ana@example.net"}, "html": "<p>x</p>"}
        self.assertEqual(await self.err("POST", "/v1/send_one_inline/",
                                        {**body, "numid": other["numid"]},
                                        key=campaign["camp_apikey"]),
                         (403, "this API key may not do this"))
        answer = await self.ok("POST", "/v1/send_one_inline/", body,
                               key=campaign["camp_apikey"])
        self.assertEqual(await self.sql("SELECT s.eeid::text, c.numid, s.subject, s.sender"
                                        " FROM sends s JOIN campaigns c ON c.id = s.campaign_id"),
                         [(answer["eeid"], campaign["numid"], "Hola XYZNOMBREXYZ", SENDER)])

    async def test_version(self):
        self.assertEqual(await self.ok("GET", "/v1/version"),
                         {"status": "ok", "version": "1.5"})

    async def test_paths_answer_with_and_without_the_trailing_slash(self):
        for path in ("/v1/version", "/v1/version/", "/v1/variables", "/v1/variables/",
                     "/v1/whitelist/ana@example.net", "/v1/whitelist/ana@example.net/"):
            await self.ok("GET", path)

    async def test_parameters_in_a_json_body_on_get_and_in_the_query_string(self):
        """The seed's own curl lines (-X GET with -d '{...}'), run as written but for the
        host and the key; and the same filters as query parameters."""
        api = await self.campaign()
        await self.campaign(nombre="otra")
        await self.ok("POST", "/v1/campania/", {"nombre": "n", "tipo": "normal"})
        lines = [
            """curl -X GET "https://api-dmds-host/v1/campania/" -H "accept: application/json" -H 'Authorization: xxxxxxxx' -d '{"tipo":"api"}'""",  # noqa: E501
            """curl -X GET "https://api-dmds-host/v1/campania/" -H "accept: application/json" -H 'Authorization: xxxxxxxx' -d '{"tipo":"api", "numid":1234}'"""]  # noqa: E501
        answers = []
        for line in lines:
            line = (line.replace("https://api-dmds-host", self.base)
                    .replace("xxxxxxxx", self.key).replace("1234", str(api["numid"])))
            answers.append(json.loads(await _curl(line)))
        self.assertEqual([[c["nombre"] for c in a["campanias"]] for a in answers],
                         [["VIMS ", "otra"], ["VIMS "]])
        found = await self.ok("GET", f"/v1/campania/?tipo=api&numid={api['numid']}")
        self.assertEqual([c["numid"] for c in found["campanias"]], [api["numid"]])
        found = await self.ok("GET", "/v1/campania/?tipo=normal")
        self.assertEqual([c["tipo"] for c in found["campanias"]], ["normal"])


async def _curl(line: str) -> bytes:
    output, errors, status = await utils.getProcessOutputAndValue(
        "/bin/sh", ["-c", line + " --silent --show-error"], env=dict(os.environ))
    if status:
        raise AssertionError(errors)
    return output


class AddressTests(DMDSTestCase):
    async def test_the_seeds_curl_examples_give_the_seeds_answers(self):
        """Section "Mensajes de respuesta JSON": every curl line as the seed writes it (the
        host and key replaced), answered with the seed's JSON, byte for byte."""
        examples = [
            ("""curl -X POST 'https://api-dmds-dmdsid.planisys.net/v1/contacto/' --header 'accept: application/json' --header 'Authorization: 11111111111113243433' --header 'Content-Type: application/json' --data '{"email": "ifdjsahfjdsaf@gmail"}'""",  # noqa: E501
             '{"status":"err","on":"invalid email The domain name gmail is not valid. It should have a period."}'),  # noqa: E501
            ("""curl -X POST 'https://api-dmds-dmdsid.planisys.net/v1/contacto/' --header 'accept: application/json' --header 'Authorization: 11111111111113243433' --header 'Content-Type: application/json' --data '{"email": "@-@gmail"}'""",  # noqa: E501
             '{"status":"err","on":"invalid email The email address is not valid. It must have exactly one @-sign."}'),  # noqa: E501
            ("""curl -X POST 'https://api-dmds-dmdsid.planisys.net/v1/contacto/' --header 'accept: application/json' --header 'Authorization: 11111111111113243433' --header 'Content-Type: application/json' --data '{"email": "josépérez@gmail.com"}'""",  # noqa: E501
             '{"status":"err","on":"invalid email Internationalized characters before the @-sign are not supported."}'),  # noqa: E501
            ("""curl -X POST 'https://api-dmds-dmdsid.planisys.net/v1/contacto/' --header 'accept: application/json' --header 'Authorization: 11111111111113243433' --header 'Content-Type: application/json' --data '{"email": "juanperez@gmail.com", "remitente":"jose@escuelaxyz.com", "remitente_nombre":"PLANICóRP"}'""",  # noqa: E501
             '{"status":"err","on":"remitente invalido The domain name escuelaxyz.com does not exist."}'),  # noqa: E501
            ("""curl -X POST 'https://api-dmds-dmdsid.planisys.net/v1/contacto/' --header 'accept: application/json' --header 'Authorization: 11111111111113243433' --header 'Content-Type: application/json' --data '{"email": "juanperez@gmail.com", "remitente":"jose@gmail.com", "remitente_nombre":"PLANICóRP"}'""",  # noqa: E501
             '{"status":"err","on":"dominio remitente no permitido"}'),
        ]
        for line, answer in examples:
            line = line.replace("https://api-dmds-dmdsid.planisys.net", self.base).replace(
                "11111111111113243433", self.key)
            self.assertEqual((await _curl(line)).decode("utf-8"), answer)
        self.assertEqual(await self.sql("SELECT count(*) FROM contacts"), [(0,)])

    async def test_the_sender_domain_is_looked_up_unless_the_account_may_send_from_it(self):
        """The lookup goes to delivery.dns_servers (non-blocking, twisted.names); the
        account's verified domains and senders need none."""
        await self.ok("POST", "/v1/contacto/", {"email": "a@gmail.com", "remitente": SENDER})
        await admin.add_sender(self.stores, self.account.id, "yo@gmail.com", verified=True)
        await self.ok("POST", "/v1/contacto/", {"email": "a@gmail.com",
                                                "remitente": "yo@gmail.com"})
        self.assertEqual(self.dns.queries, [])
        self.assertEqual(await self.err("POST", "/v1/contacto/", {
            "email": "a@gmail.com", "remitente": "otro@gmail.com"}),
            (400, "dominio remitente no permitido"))
        self.assertIn(("gmail.com", "MX"), self.dns.queries)
        self.assertEqual(await self.err("POST", "/v1/send_one_inline/", {
            "contacto": {"email": "a@gmail.com"}, "remitente": "jose@escuelaxyz.com",
            "asunto": "s", "html": "<p>x</p>"}),
            (400, "remitente invalido The domain name escuelaxyz.com does not exist."))
        self.assertEqual(await self.err("POST", "/v1/send_one_inline/", {
            "contacto": {"email": "a@gmail"}, "remitente": SENDER, "asunto": "s",
            "html": "<p>x</p>"}),
            (400, "invalid email The domain name gmail is not valid. It should have a "
                  "period."))
        self.assertEqual(await self.err("POST", "/v1/send_one_inline/", {
            "contacto": {"email": "a@gmail.com"}, "remitente": "jose@@dominio.com",
            "asunto": "s", "html": "<p>x</p>"}),
            (400, "remitente invalido The email address is not valid. It must have exactly "
                  "one @-sign."))


class ContactTests(DMDSTestCase):
    async def test_upsert_by_email_and_the_seeds_full_shape(self):
        await self.ok("POST", "/v1/grupo/", {"nombre": "Origen API"})
        created = await self.ok("POST", "/v1/contacto/", {
            "email": "FdksLa@Hotmail.com", "nombre": "Juan", "apellido": "Pérez",
            "sexo": "M", "edad": 40, "grupos": ["Origen API"],
            "campos": [{"nombre": "XYZDNIXYZ", "valor": "21232421"},
                       {"nombre": "XYZEMPLEADORXYZ", "valor": "Planisys"}]})
        self.assertEqual((created["email"], created["operacion"]),
                         ("fdksla@hotmail.com", "Alta"))
        updated = await self.ok("PUT", "/v1/contacto/", {
            "email": "fdksla@hotmail.com", "edad": None,
            "campos": [{"nombre": "XYZEMPLEADORXYZ", "valor": "AvasCloud"},
                       {"nombre": "XYZTELCELXYZ", "valor": "+34999111333"}]})
        self.assertEqual((updated["numid"], updated["operacion"]),
                         (created["numid"], "Modificacion"))
        contact = (await self.ok("GET", "/v1/contacto/fdksla@hotmail.com"))["contacto"]
        self.assertEqual(list(contact), SEED_CONTACT_KEYS)
        self.assertEqual({key: contact[key] for key in (
            "numid", "email", "nombre", "apellido", "edad", "sexo", "profesion", "operacion",
            "origenes", "dispositivo", "subtipo_dispositivo_id", "grupo_de_dominio_id",
            "invalido", "whitelist", "grupos", "campanias", "campanias_desusc", "eventos")}, {
            "numid": created["numid"], "email": "fdksla@hotmail.com", "nombre": "Juan",
            "apellido": "Pérez", "edad": None, "sexo": "M", "profesion": "",
            "operacion": "Modificacion", "origenes": "manual", "dispositivo": "web",
            "subtipo_dispositivo_id": None, "grupo_de_dominio_id": 0, "invalido": False,
            "whitelist": False, "grupos": ["Origen API"], "campanias": [],
            "campanias_desusc": [], "eventos": []})
        self.assertEqual(contact["campos"], [
            {"nombre": "XYZDNIXYZ", "valor": "21232421"},
            {"nombre": "XYZEMPLEADORXYZ", "valor": "AvasCloud"},
            {"nombre": "XYZTELCELXYZ", "valor": "+34999111333"}])

    async def test_events_and_campaigns_from_the_event_log_in_the_accounts_time(self):
        """The seed's example: four envio then two rebote_hard, in campaign "VIMS ", the
        times in the account's zone (America/Bogota, UTC-5)."""
        campaign = await self.campaign()
        answer = await self.ok("POST", "/v1/send_one_uri/", {
            "numid": campaign["numid"], "contacto": {"email": "x@hotmail.com"},
            "html_uri": "data:text/html;base64,PHA+eDwvcD4="})
        [(send_id, contact_id)] = await self.sql(
            "SELECT s.id, d.contact_id FROM sends s JOIN messages m ON m.send_id = s.id"
            " JOIN deliveries d ON d.message_id = m.id WHERE s.eeid = %s", answer["eeid"])
        for at, kind, details in (("13:25:11", "sent", {}), ("13:25:32", "bounced",
                                                            {"type": "hard"})):
            await self.sql("INSERT INTO events (account_id, send_id, contact_id, recipient,"
                           " type, details, occurred_at) VALUES (%s, %s, %s, 'x@hotmail.com',"
                           " %s, %s, %s)", self.account.id, send_id, contact_id, kind,
                           json.dumps(details), f"2020-10-15 {at}+00")
        contact = (await self.ok("GET", "/v1/contacto/x@hotmail.com"))["contacto"]
        self.assertEqual(contact["eventos"], [
            {"evento": "envio", "timestamp": "2020-10-15T08:25:11", "campania": "VIMS "},
            {"evento": "rebote_hard", "timestamp": "2020-10-15T08:25:32",
             "campania": "VIMS "}])
        self.assertEqual((contact["campanias"], contact["origenes"]), (["VIMS "], "dmds"))
        self.assertEqual(contact_id, contact["numid"])

    async def test_the_contacts_smtp_imports_are_the_same_contacts(self):
        """S-7: a recipient of an SMTP message is a DMDS contact, in its SMTP group."""
        await self.stores.accounts.create_user(self.account.id, "acme.u",
                                               credentials.hash_password("pw-123456"))
        port = self.gateway.port_for("smtp.starttls_listeners[0]")

        def send():
            client = smtp_client(port)
            client.login("acme.u", "pw-123456")
            client.sendmail(SENDER, ["Ana@Example.net"],
                            b"Subject: s\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n")
            client.quit()

        await deferToThread(send)
        contact = (await self.ok("GET", "/v1/contacto/ana@example.net"))["contacto"]
        self.assertEqual(contact["origenes"], "smtp")
        self.assertRegex(contact["grupos"][0], r"^SMTP \d{4}-")
        await self.ok("POST", "/v1/contacto/", {"email": "ana@example.net", "nombre": "Ana"})
        self.assertEqual(await self.sql("SELECT email, fields->>'nombre' FROM contacts"),
                         [("ana@example.net", "Ana")])

    async def test_unknown_contacts_and_groups(self):
        self.assertEqual(await self.err("GET", "/v1/contacto/nadie@example.net"),
                         (404, "contacto nadie@example.net not found"))
        self.assertEqual(await self.err("POST", "/v1/contacto/", {
            "email": "a@example.net", "grupos": ["Nope"]}),
            (400, "grupo Nope does not exist (create it with grupo/)"))
        self.assertEqual(await self.sql("SELECT count(*) FROM contacts"), [(0,)])

    async def test_the_contact_limit(self):
        await self.stores.accounts.update_account("acme", {}, {"max_contacts": 1})
        await self.ok("POST", "/v1/contacto/", {"email": "a@example.net"})
        await self.ok("POST", "/v1/contacto/", {"email": "a@example.net", "nombre": "A"})
        self.assertEqual(await self.err("POST", "/v1/contacto/", {"email": "b@example.net"}),
                         (400, "contact limit reached"))
        self.assertEqual(await self.err("POST", "/v1/whitelist/c@example.net"),
                         (400, "contact limit reached"))


class ValidityTests(DMDSTestCase):
    async def test_invalidar_revalidar_with_their_events_and_invalidos(self):
        await self.ok("POST", "/v1/contacto/", {"email": "a@example.net"})
        await self.ok("POST", "/v1/contacto/", {"email": "b@example.net"})
        self.assertEqual(await self.ok("GET", "/v1/invalidar/a@example.net"),
                         {"status": "ok", "msg": "a@example.net invalidado"})
        invalid = await self.ok("GET", "/v1/invalidos/")
        self.assertEqual([c["email"] for c in invalid["invalidos"]], ["a@example.net"])
        self.assertEqual(await self.ok("GET", "/v1/revalidar/a@example.net"),
                         {"status": "ok", "msg": "a@example.net revalidado"})
        self.assertEqual((await self.ok("GET", "/v1/invalidos"))["invalidos"], [])
        contact = (await self.ok("GET", "/v1/contacto/a@example.net"))["contacto"]
        self.assertEqual([e["evento"] for e in contact["eventos"]],
                         ["invalidacion", "revalidacion"])
        self.assertFalse(contact["invalido"])
        self.assertEqual(await self.err("GET", "/v1/invalidar/nadie@example.net"),
                         (404, "contacto nadie@example.net not found"))

    async def test_a_whitelisted_contact_is_left_alone(self):
        self.assertEqual(await self.ok("GET", "/v1/whitelist/a@example.net"),
                         {"status": "ok", "msg": "a@example.net not whitelisted"})
        self.assertEqual(await self.ok("POST", "/v1/whitelist/A@example.net"),
                         {"status": "ok", "msg": "a@example.net whitelisted"})
        self.assertEqual(await self.ok("GET", "/v1/whitelist/a@example.net"),
                         {"status": "ok", "msg": "a@example.net whitelisted"})
        for action in ("invalidar", "revalidar"):
            self.assertEqual(await self.ok("GET", f"/v1/{action}/a@example.net"),
                             {"status": "ok", "msg": "whitelisted"})
        self.assertEqual(await self.sql("SELECT invalid FROM contacts"), [(False,)])
        self.assertEqual(await self.sql("SELECT count(*) FROM events"), [(0,)])
        self.assertEqual(await self.ok("DELETE", "/v1/whitelist/a@example.net"),
                         {"status": "ok", "msg": "a@example.net not whitelisted"})
        self.assertEqual(await self.ok("PUT", "/v1/whitelist/a@example.net"),
                         {"status": "ok", "msg": "a@example.net whitelisted"})

    async def test_invalid_and_unsubscribed_contacts_are_not_sent_and_shown_unknown(self):
        """The seed (v1.1): sending to an invalid contact, directly or in copy, makes a
        Not-Sent event, shown as unknown; `sent` counts only the copies queued."""
        await self.ok("POST", "/v1/contacto/", {"email": "inv@example.net"})
        await self.ok("GET", "/v1/invalidar/inv@example.net")
        await self.stores.suppressions.add(self.account.id, "baja@example.net")
        answer = await self.send_one(
            "ana@example.net", copia=[{"cc_email": "inv@example.net"}],
            copia_oculta=[{"bcc_email": "baja@example.net"}, {"bcc_email": "b@example.net"}])
        self.assertEqual(answer["sent"], 2)
        events = (await self.ok("GET", f"/v1/eeid/{answer['eeid']}"))["eventos"]
        self.assertEqual(sorted((e["evento"], e["email"], e.get("detalle")) for e in events),
                         [("unknown", "baja@example.net", "manual"),
                          ("unknown", "inv@example.net", "invalid")])


class GroupFilterVariableTests(DMDSTestCase):
    async def test_groups(self):
        created = await self.ok("POST", "/v1/grupo/", {"nombre": "Clientes"})
        again = await self.ok("PUT", "/v1/grupo", {"nombre": "Clientes"})
        self.assertEqual((again["id"], created["msg"], again["msg"]),
                         (created["id"], "creado", "ya existe"))
        await self.ok("POST", "/v1/contacto/", {"email": "a@example.net",
                                                "grupos": "Clientes"})
        groups = (await self.ok("GET", "/v1/grupo/"))["grupos"]
        self.assertEqual([(g["nombre"], g["origen"]) for g in groups], [("Clientes", "manual")])
        await self.ok("DELETE", "/v1/grupo/", {"nombre": "Clientes"})
        self.assertEqual(await self.err("DELETE", "/v1/grupo/?nombre=Clientes"),
                         (404, "grupo Clientes not found"))
        self.assertEqual(await self.sql("SELECT count(*) FROM contacts"), [(1,)])

    async def test_filters(self):
        await self.ok("POST", "/v1/grupo/", {"nombre": "Clientes"})
        await self.ok("POST", "/v1/filtros/", {
            "nombre": "Madrid", "grupos": ["Clientes"],
            "campos": [{"nombre": "XYZCIUDADXYZ", "valor": "Madrid"}]})
        await self.ok("PUT", "/v1/filtros/", {"nombre": "Todos"})
        self.assertEqual([(f["nombre"], f["grupos"], f["campos"]) for f in
                          (await self.ok("GET", "/v1/filtros/"))["filtros"]],
                         [("Madrid", ["Clientes"], [{"nombre": "XYZCIUDADXYZ",
                                                     "valor": "Madrid"}]),
                          ("Todos", [], [])])
        self.assertEqual(await self.err("POST", "/v1/filtros/", {"nombre": "x",
                                                                 "grupos": ["Nope"]}),
                         (400, "grupo Nope does not exist"))
        await self.ok("DELETE", "/v1/filtros/", {"nombre": "Todos"})
        self.assertEqual(await self.err("DELETE", "/v1/filtros/", {"nombre": "Todos"}),
                         (404, "filtro Todos not found"))

    async def test_global_variables(self):
        await self.ok("POST", "/v1/variables/", {"variable": "XYZEMPRESAXYZ",
                                                 "valor": "Planisys"})
        await self.ok("POST", "/v1/variables/", {"variable": "ANIO", "valor": 2024})
        await self.ok("PUT", "/v1/variables/", {"variable": "XYZEMPRESAXYZ", "valor": "P2"})
        self.assertEqual((await self.ok("GET", "/v1/variables/"))["variables"],
                         [{"variable": "ANIO", "valor": "2024"},
                          {"variable": "XYZEMPRESAXYZ", "valor": "P2"}])
        await self.ok("DELETE", "/v1/variables/", {"variable": "ANIO"})
        self.assertEqual(await self.err("DELETE", "/v1/variables/", {"variable": "ANIO"}),
                         (404, "variable ANIO not found"))
        self.assertEqual(await self.err("POST", "/v1/variables/", {"variable": "a b"}),
                         (400, "variable must be a name of letters, digits, '_' and '-' "
                               "(at most 70)"))


class CampaignTests(DMDSTestCase):
    async def test_api_campaign_answer_and_its_key_shown_again(self):
        created = await self.campaign(replyto=SENDER)
        self.assertEqual(list(created), ["status", "id", "numid", "camp_apikey"])
        self.assertEqual(uuid.UUID(created["id"]).version, 4)
        key = created["camp_apikey"]
        numid = created["numid"]
        self.assertEqual(await self.ok("GET", f"/v1/campania_apikey/{numid}"),
                         {"status": "ok", "numid": numid, "apikey": key})
        # Kept sealed and as a digest, never in clear.
        [(sealed, digest)] = await self.sql(
            "SELECT c.api_key_sealed, k.key_hash FROM campaigns c"
            " JOIN api_keys k ON k.id = c.api_key_id")
        self.assertNotIn(key.encode(), bytes(sealed))
        self.assertEqual(digest, hashlib.sha256(key.encode()).hexdigest())
        listed = (await self.ok("GET", "/v1/campania/"))["campanias"]
        self.assertEqual([(c["numid"], c["replyto"], c["html_uri"]) for c in listed],
                         [(numid, SENDER, "http://cms.example/pieza.html")])
        self.assertNotIn(key, json.dumps(listed))

    async def test_a_new_key_replaces_the_old_one_over_http_and_smtp(self):
        created = await self.campaign()
        numid = created["numid"]
        new_key = "a62d247c345fe31d0cda39ba1c3d3501"
        self.assertEqual(await self.ok("POST", f"/v1/campania_apikey/{numid}/",
                                       {"apikey": new_key}),
                         {"status": "ok", "numid": numid, "apikey": new_key})
        self.assertEqual((await self.ok("GET", f"/v1/campania_apikey/{numid}"))["apikey"],
                         new_key)
        body = {"contacto": {"email": "ana@example.net"}, "html": "<p>x</p>"}
        self.assertEqual(await self.err("POST", "/v1/send_one_inline/", body,
                                        key=created["camp_apikey"]),
                         (403, "invalid API key"))
        await self.ok("POST", "/v1/send_one_inline/", body, key=new_key)
        port = self.gateway.port_for("smtp.implicit_tls_listeners[0]")

        def login(password):
            client = smtp_client(port, implicit_tls=True)
            try:
                return client.login(f"dmdsid-{numid}", password)[0]
            except Exception as error:
                return type(error).__name__
            finally:
                client.close()

        self.assertEqual(await deferToThread(login, new_key), 235)
        self.assertEqual(await deferToThread(login, created["camp_apikey"]),
                         "SMTPAuthenticationError")
        self.assertEqual(await self.err("POST", f"/v1/campania_apikey/{numid}",
                                        {"apikey": "short"}),
                         (400, "apikey must be 16 to 128 printable ASCII characters without "
                               "blanks"))
        _, other = await admin.create_api_key(self.stores, self.account.id, "o")
        self.assertEqual(await self.err("POST", f"/v1/campania_apikey/{numid}",
                                        {"apikey": other}),
                         (409, "that apikey is already in use"))

    async def test_normal_campaigns_and_what_api_campaigns_require(self):
        normal = await self.ok("POST", "/v1/campania/", {"nombre": "n", "tipo": "normal"})
        self.assertEqual(list(normal), ["status", "id", "numid"])
        self.assertEqual(await self.err("GET", f"/v1/campania_apikey/{normal['numid']}"),
                         (400, f"campania {normal['numid']} is not of type api"))
        self.assertEqual(await self.err("GET", "/v1/campania_apikey/999999"),
                         (404, "campania 999999 not found"))
        required = {"nombre": "c", "tipo": "api", "remitente": SENDER,
                    "remitente_nombre": "N", "asunto": "s", "html_uri": "http://cms.example/"}
        for missing in ("nombre", "tipo", "remitente", "remitente_nombre", "asunto",
                        "html_uri"):
            code, _ = await self.err("POST", "/v1/campania/",
                                     {k: v for k, v in required.items() if k != missing})
            self.assertEqual(code, 400, missing)
        self.assertEqual(await self.err("POST", "/v1/campania/", {**required, "tipo": "bulk"}),
                         (400, "tipo must be api or normal"))
        self.assertEqual(await self.err("POST", "/v1/campania/",
                                        {**required, "asunto": "XYZTAG-CURLXYZ"}),
                         (400, "asunto_uri is required"))
        self.assertEqual(await self.err("POST", "/v1/campania/",
                                        {**required, "remitente": "x@gmail.com"}),
                         (400, "dominio remitente no permitido"))
        self.assertEqual(await self.err("POST", "/v1/campania/",
                                        {**required, "html_uri": "ftp://x"}),
                         (400, "html_uri must be an http or https URL"))


class Pages(resource.Resource):
    """Content for sends by URI: a page behind a 301 and a 302, and a subject that
    changes."""

    def __init__(self):
        super().__init__()
        self.subject = "Primero"
        self.putChild(b"pieza.html", static.Data("<p>Año XYZNOMBREXYZ</p>".encode(),
                                                 "text/html; charset=utf-8"))
        self.putChild(b"moved", _Leaf(lambda request: _redirect(request, 301, b"/moved2")))
        self.putChild(b"moved2", _Leaf(lambda request: _redirect(request, 302,
                                                                 b"/pieza.html")))
        self.putChild(b"asunto", _Leaf(
            lambda request: f"\n  {self.subject}  \nsegunda línea".encode()))


class _Leaf(resource.Resource):
    """Answers GET with what `answer(request)` says."""

    isLeaf = True

    def __init__(self, answer):
        super().__init__()
        self.answer = answer

    def render_GET(self, request):  # noqa: N802 - twisted.web's name
        return self.answer(request)


def _redirect(request, code, location):
    request.setResponseCode(code)
    request.setHeader(b"location", location)
    return b""


class SendTests(DMDSTestCase):
    http_config = HTTPConfig(listener=LOOPBACK_PORT, fetch_allow_networks=["127.0.0.0/8"],
                             dmds_max_recipients=8)
    smtp_config = SMTPConfig(starttls_listeners=[LOOPBACK_PORT],
                             implicit_tls_listeners=[LOOPBACK_PORT], max_recipients=3)

    async def setUp(self):
        await super().setUp()
        self.pages = Pages()
        port = reactor.listenTCP(0, server.Site(self.pages), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.dns.add("cms.example", "A", "127.0.0.1")
        self.cms = f"http://cms.example:{port.getHost().port}"

    async def test_send_one_with_copies_counted_and_names_kept(self):
        answer = await self.send_one(
            "Ana@Example.net", contacto={"email": "Ana@Example.net", "nombre": "Ana"},
            copia=[{"cc_email": "cc@example.net", "cc_nombre": "Carla", "cc_apellido": "Gil"},
                   {"cc_email": "ana@example.net"}],
            copia_oculta=[{"bcc_email": "bcc@example.net"}], **{"reply-to": SENDER})
        self.assertEqual(list(answer), ["status", "sent", "eeid"])
        self.assertEqual(answer["sent"], 3)
        rows = await self.sql(
            "SELECT d.recipient, d.kind, s.origin, s.eeid::text, g.origin FROM deliveries d"
            " JOIN messages m ON m.id = d.message_id JOIN sends s ON s.id = m.send_id"
            " JOIN group_members gm ON gm.contact_id = d.contact_id"
            " JOIN groups g ON g.id = gm.group_id ORDER BY d.id")
        self.assertEqual(rows, [("Ana@example.net", "to", "dmds", answer["eeid"], "dmds"),
                                ("cc@example.net", "cc", "dmds", answer["eeid"], "dmds"),
                                ("bcc@example.net", "bcc", "dmds", answer["eeid"], "dmds")])
        [(body, reply_to)] = await self.sql(
            "SELECT convert_from(body, 'UTF8')::jsonb, reply_to FROM messages")
        self.assertEqual(body["headers"], [["Cc", "Carla Gil <cc@example.net>, ana@example.net"]])
        self.assertEqual(reply_to, SENDER)
        self.assertEqual(await self.sql("SELECT email, fields->>'nombre' FROM contacts"
                                        " ORDER BY id"),
                         [("ana@example.net", "Ana"), ("cc@example.net", "Carla"),
                          ("bcc@example.net", None)])

    async def test_send_many_in_batches_under_one_eeid_with_invalid_addresses_skipped(self):
        contacts = [{"email": f"c{n}@example.net"} for n in range(7)]
        answer = await self.ok("POST", "/v1/send_many_inline/", {
            "contactos": [*contacts, {"email": "nope@gmail"}], "remitente": SENDER,
            "asunto": "s", "html": "<p>x</p>", "copia": [{"cc_email": "cc@example.net"}]})
        self.assertEqual((answer["sent"], answer["invalidos"]), (8, ["nope@gmail"]))
        self.assertEqual(await self.sql(
            "SELECT count(DISTINCT s.id), count(DISTINCT m.id), count(*),"
            " count(DISTINCT g.id) FROM deliveries d JOIN messages m ON m.id = d.message_id"
            " JOIN sends s ON s.id = m.send_id JOIN group_members gm"
            " ON gm.contact_id = d.contact_id JOIN groups g ON g.id = gm.group_id"),
            [(1, 3, 8, 1)])
        self.assertEqual(await self.err("POST", "/v1/send_many_inline/", {
            "contactos": [*contacts, *contacts[:2]], "remitente": SENDER, "asunto": "s",
            "html": "<p>x</p>"}), (413, "contactos holds more than 8 contacts"))

    async def test_reuse_eeid_joins_a_batch_of_the_account_only(self):
        first = await self.send_one("a@example.net")
        second = await self.send_one("b@example.net", reuse_eeid=True, eeid=first["eeid"])
        self.assertEqual(second["eeid"], first["eeid"])
        self.assertEqual(await self.sql("SELECT count(*), count(DISTINCT m.id) FROM sends s"
                                        " JOIN messages m ON m.send_id = s.id"), [(2, 2)])
        other = await self.stores.accounts.create_account("other")
        await admin.add_domain(self.stores, other.id, "otro.com", verified=True)
        _, other_key = await admin.create_api_key(self.stores, other.id, "k")
        unknown = str(uuid.uuid4())
        for eeid, key in ((unknown, None), (first["eeid"], other_key)):
            self.assertEqual(await self.err("POST", "/v1/send_one_inline/", {
                "contacto": {"email": "a@example.net"}, "remitente": "n@otro.com"
                if key else SENDER, "asunto": "s", "html": "<p>x</p>", "reuse_eeid": "true",
                "eeid": eeid}, key=key), (404, f"eeid {eeid} not found"))
        self.assertEqual(await self.sql("SELECT count(*) FROM messages"), [(2,)])

    async def test_content_by_uri_follows_redirects_and_is_read_as_utf8(self):
        answer = await self.ok("POST", "/v1/send_one_uri/", {
            "contacto": {"email": "a@example.net"}, "remitente": SENDER, "asunto": "s",
            "html_uri": f"{self.cms}/moved"})
        [(body,)] = await self.sql("SELECT convert_from(body, 'UTF8')::jsonb FROM messages")
        self.assertEqual(body["html"], "<p>Año XYZNOMBREXYZ</p>")
        self.assertEqual(answer["sent"], 1)
        self.assertEqual(await self.err("POST", "/v1/send_one_uri/", {
            "contacto": {"email": "a@example.net"}, "remitente": SENDER, "asunto": "s",
            "html_uri": f"{self.cms}/missing"}),
            (400, "html_uri: cms.example answered 404"))

    async def test_a_campaigns_defaults_and_its_subject_fetched_for_each_send(self):
        campaign = await self.campaign(asunto="Hoy: XYZTAG-CURLXYZ",
                                       asunto_uri=f"{self.cms}/asunto",
                                       html_uri=f"{self.cms}/pieza.html", replyto=SENDER)
        for subject in ("Primero", "Segundo"):
            self.pages.subject = subject
            await self.ok("POST", "/v1/send_one_uri/", {
                "numid": campaign["numid"], "contacto": {"email": "a@example.net"}})
        rows = await self.sql(
            "SELECT m.subject, m.sender, m.reply_to, c.numid FROM messages m"
            " JOIN sends s ON s.id = m.send_id JOIN campaigns c ON c.id = s.campaign_id"
            " ORDER BY m.id")
        self.assertEqual(rows, [("Hoy: Primero", SENDER, SENDER, campaign["numid"]),
                                ("Hoy: Segundo", SENDER, SENDER, campaign["numid"])])
        await self.ok("POST", "/v1/send_one_inline/", {
            "numid": campaign["numid"], "contacto": {"email": "a@example.net"},
            "asunto": "Propio", "html": "<p>x</p>"})
        self.assertEqual((await self.sql("SELECT subject FROM messages ORDER BY id DESC"
                                         " LIMIT 1")), [("Propio",)])
        self.assertEqual(await self.err("POST", "/v1/send_one_uri/", {
            "numid": 999999, "contacto": {"email": "a@example.net"}}),
            (404, "campania 999999 not found"))

    async def test_archive_as_the_seed_writes_it(self):
        archived = await self.send_one(archive="true")
        plain = await self.send_one(archive=False)
        self.assertEqual(dict(await self.sql("SELECT eeid::text, archive FROM sends")),
                         {archived["eeid"]: True, plain["eeid"]: False})


class BatchAndRangeTests(DMDSTestCase):
    async def test_eeid_info_and_events_of_another_account_are_404(self):
        answer = await self.send_one(archive=True)
        info = await self.ok("GET", f"/v1/eeid_info/{answer['eeid']}")
        self.assertEqual({k: info[k] for k in ("eeid", "remitente", "asunto", "archive",
                                                "mensajes", "destinatarios", "pendientes")},
                         {"eeid": answer["eeid"], "remitente": SENDER, "asunto": "Hola",
                          "archive": True, "mensajes": 1, "destinatarios": 1,
                          "pendientes": 1})
        batch = await self.ok("GET", f"/v1/eeid/{answer['eeid']}/")
        self.assertEqual(batch["eventos"], [])
        self.assertEqual([(d["email"], d["estado"], d["eml"]) for d in
                          batch["archive"]["destinatarios"]],
                         [("ana@example.net", "queued", False)])
        other = await self.stores.accounts.create_account("other")
        _, other_key = await admin.create_api_key(self.stores, other.id, "k")
        for path in (f"/v1/eeid/{answer['eeid']}", f"/v1/eeid_info/{answer['eeid']}",
                     f"/v1/eeid_eml/{answer['eeid']}/ana@example.net"):
            self.assertEqual(await self.err("GET", path, key=other_key),
                             (404, f"eeid {answer['eeid']} not found"))
        unknown = str(uuid.uuid4())
        self.assertEqual(await self.err("GET", f"/v1/eeid/{unknown}"),
                         (404, f"eeid {unknown} not found"))
        self.assertEqual(await self.err("GET", "/v1/eeid/nope"), (400, "eeid must be a UUID"))
        self.assertEqual(await self.err("GET", f"/v1/eeid_eml/{answer['eeid']}/x@example.net"),
                         (404, f"x@example.net is not a recipient of eeid {answer['eeid']}"))
        self.assertEqual(await self.err("GET", f"/v1/eeid_eml/{answer['eeid']}/ana@example.net"),
                         (404, "no copy was sent to ana@example.net (its delivery is queued)"))
        plain = await self.send_one()
        self.assertEqual(await self.err("GET", f"/v1/eeid_eml/{plain['eeid']}/ana@example.net"),
                         (404, f"eeid {plain['eeid']} is not archived (send with archive: "
                               "true)"))

    async def test_events_between_two_times_paged_in_a_stable_order(self):
        """25 events at the same second: pages of 10 neither overlap nor skip, whatever
        comes later; the range is the account's local time (UTC-5)."""
        answer = await self.send_one()
        [(send_id,)] = await self.sql("SELECT id FROM sends")
        await self.sql(
            "INSERT INTO events (account_id, send_id, recipient, type, occurred_at)"
            " SELECT %s, %s, 'n' || n || '@example.net', 'sent', '2024-05-01 15:00:00+00'"
            " FROM generate_series(1, 25) n", self.account.id, send_id)
        await self.sql(
            "INSERT INTO events (account_id, send_id, recipient, type, occurred_at)"
            " VALUES (%s, %s, 'late@example.net', 'open', '2024-05-01 16:00:01+00')",
            self.account.id, send_id)
        span = {"desde": "2024-05-01 10:00:00", "hasta": "2024-05-01 11:00:00"}
        self.assertEqual(await self.ok("GET", "/v1/cantidad_eventos/", span),
                         {"status": "ok", "desde": "2024-05-01T10:00:00",
                          "hasta": "2024-05-01T11:00:00", "cantidad": 25})
        pages = []
        for page in (1, 2, 3):
            found = await self.ok("POST", "/v1/ver_eventos", {**span, "pagina": page,
                                                              "cantidad": 10})
            pages.append([e["email"] for e in found["eventos"]])
            if page == 1:
                self.assertEqual(found["eventos"][0], {
                    "evento": "envio", "timestamp": "2024-05-01T10:00:00", "campania": "",
                    "email": "n1@example.net", "eeid": answer["eeid"]})
                await self.sql("INSERT INTO events (account_id, recipient, type,"
                               " occurred_at) VALUES (%s, 'new@example.net', 'sent',"
                               " '2024-05-01 15:00:00+00')", self.account.id)
        self.assertEqual([len(p) for p in pages], [10, 10, 6])
        self.assertEqual(pages[0] + pages[1] + pages[2][:5],
                         [f"n{n}@example.net" for n in range(1, 26)])
        query = await self.ok("GET", "/v1/ver_eventos/?desde=2024-05-01%2011:00:00"
                                     "&hasta=2024-05-01%2011:00:01&pagina=1&cantidad=10")
        self.assertEqual([(e["evento"], e["email"]) for e in query["eventos"]],
                         [("view", "late@example.net")])


class BadInputTests(DMDSTestCase):
    async def test_wrong_types_missing_fields_and_absurd_pages(self):
        span = {"desde": "2024-05-01 00:00:00", "hasta": "2024-05-02 00:00:00"}
        cases = [
            ("POST", "/v1/contacto/", {}, "email is required: an email address"),
            ("POST", "/v1/contacto/", {"email": 7}, "email is required: an email address"),
            ("POST", "/v1/contacto/", {"email": "a@example.net", "edad": "40"},
             "edad must be numeric (a JSON number)"),
            ("POST", "/v1/contacto/", {"email": "a@example.net", "nombre": ["x"]},
             "nombre must be a string"),
            ("POST", "/v1/contacto/", {"email": "a@example.net", "campos": "x"},
             'campos must be a list of {"nombre": ..., "valor": ...}'),
            ("POST", "/v1/contacto/", {"email": "a@example.net", "nombre": "A\r\nBcc: x"},
             "nombre must not contain CR, LF or NUL characters"),
            ("POST", "/v1/send_one_inline/", {"remitente": SENDER, "asunto": "s",
                                              "html": "x"},
             "contacto must be an object with an email"),
            ("POST", "/v1/send_one_inline/", {"contacto": {"email": "a@example.net"},
                                              "remitente": SENDER, "html": "x"},
             "asunto is required"),
            ("POST", "/v1/send_one_inline/", {"contacto": {"email": "a@example.net"},
                                              "remitente": SENDER, "asunto": "s"},
             "html is required"),
            ("POST", "/v1/send_one_inline/", {"contacto": {"email": "a@example.net"},
                                              "asunto": "s", "html": "x"},
             "remitente is required"),
            ("POST", "/v1/send_one_uri/", {"contacto": {"email": "a@example.net"},
                                           "remitente": SENDER, "asunto": "s"},
             "html_uri is required"),
            ("POST", "/v1/send_many_uri/", {"contactos": {"email": "a@example.net"}},
             "contactos must be a non-empty list"),
            ("POST", "/v1/send_many_uri/", {"contactos": []},
             "contactos must be a non-empty list"),
            ("POST", "/v1/send_many_inline/", {"contactos": ["a@example.net"]},
             "contactos[0] must be an object with an email"),
            ("POST", "/v1/send_many_inline/", {"contactos": [{"email": "x@y"}],
                                               "remitente": SENDER, "asunto": "s",
                                               "html": "x"},
             "contactos holds no valid address"),
            ("POST", "/v1/send_one_inline/", {"contacto": {"email": "a@example.net"},
                                              "remitente": SENDER, "asunto": "s",
                                              "html": "x", "copia": [{"cc_email": "x"}]},
             "invalid email The email address is not valid. It must have exactly one "
             "@-sign."),
            ("POST", "/v1/send_one_inline/", {"contacto": {"email": "a@example.net"},
                                              "remitente": SENDER, "asunto": "s",
                                              "html": "x", "archive": "yes"},
             "archive must be true or false"),
            ("POST", "/v1/send_one_inline/", {"contacto": {"email": "a@example.net"},
                                              "remitente": SENDER, "asunto": "s",
                                              "html": "x", "numid": "7"},
             "numid must be numeric (a JSON number)"),
            ("GET", "/v1/ver_eventos/", {**span, "pagina": "1"},
             "pagina must be numeric (a JSON number)"),
            ("GET", "/v1/ver_eventos/", {**span, "cantidad": 9},
             "cantidad must be a whole number from 10 to 10000"),
            ("GET", "/v1/ver_eventos/", {**span, "pagina": 0},
             "pagina must be a whole number from 1 to 1000000"),
            ("GET", "/v1/ver_eventos/", {**span, "pagina": 2**80},
             "pagina must be a whole number from 1 to 1000000"),
            ("GET", "/v1/ver_eventos/", {**span, "cantidad": 10.5},
             "cantidad must be numeric (a JSON number)"),
            ("GET", "/v1/ver_eventos/", {"desde": "ayer", "hasta": span["hasta"]},
             "desde must be a date and time as YYYY-MM-DD HH:MM:SS"),
            ("GET", "/v1/cantidad_eventos/", {"desde": span["hasta"],
                                              "hasta": span["desde"]},
             "hasta must not be before desde"),
            ("GET", "/v1/cantidad_eventos/", {}, "desde is required"),
            ("GET", "/v1/campania/", {"tipo": 1}, "tipo must be a string"),
            ("GET", "/v1/campania/", [1], "the body must be a JSON object"),
        ]
        for method, path, body, on in cases:
            self.assertEqual(await self.err(method, path, body), (400, on), body)
        self.assertEqual(await self.err("GET", "/v1/invalidos/", raw=b"{nope"),
                         (400, "the body is not JSON: Expecting property name enclosed in "
                               "double quotes at line 1 column 2"))
        self.assertEqual(await self.sql("SELECT count(*) FROM messages"), [(0,)])

    async def test_unknown_paths_methods_and_oversized_bodies_answer_dmds_errors(self):
        self.assertEqual(await self.err("GET", "/v1/nada"), (404, "not found"))
        self.assertEqual(await self.err("DELETE", "/v1/campania/"), (405, "method not allowed"))
        body = b"x" * (2 * 1024 * 1024 + 1)
        client = await protocol.ClientCreator(reactor, Client).connectTCP(
            "127.0.0.1", self.gateway.port_for("http.listener"))
        client.transport.write(b"POST /v1/contacto/ HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        head, _, answer = (await client.lost).partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head)
        self.assertEqual(json.loads(answer), {
            "status": "err", "on": "the request body is larger than 2097152 bytes"})
