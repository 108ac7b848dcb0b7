"""The management API (H-3) on a running Gateway: admin and operator keys, every kind
of object, pagination by cursor, and 404 for another account's objects."""

import json

import treq
from twisted.trial import unittest

from mailgw import admin
from mailgw.store.submissions import QueuedRecipient, SubmissionRecord
from tests.harness import QueriesDatabase, fresh_database, gateway_config, start_gateway


class ManagementTests(QueriesDatabase, unittest.TestCase):
    async def setUp(self):
        self.gateway = await start_gateway(self, gateway_config(self, fresh_database()))
        self.database = self.gateway.database
        self.stores = self.gateway.stores
        self.acme = await self.stores.accounts.create_account("acme")
        self.other = await self.stores.accounts.create_account("other")
        _, self.admin_key = await admin.create_api_key(self.stores, self.acme.id, "a", "admin")
        _, self.account_key = await admin.create_api_key(self.stores, self.acme.id, "s")
        _, self.operator_key = await admin.create_api_key(self.stores, self.other.id, "op",
                                                          "admin", operator=True)
        self.base = f"http://127.0.0.1:{self.gateway.port_for('http.listener')}/v1/admin"

    async def call(self, method, path, body=None, key=None):
        response = await treq.request(
            method, self.base + path, headers={"Authorization": [key or self.admin_key]},
            data=None if body is None else json.dumps(body).encode(), persistent=False)
        return response.code, await response.json()

    async def test_keys_that_may_manage(self):
        self.assertEqual(await self.call("GET", "/accounts", key=self.account_key),
                         (403, {"error": "API_key_not_authorized"}))
        self.assertEqual((await self.call("GET", "/accounts", key="mgw_nope"))[0], 403)
        code, page = await self.call("GET", "/accounts")
        self.assertEqual([a["name"] for a in page["items"]], ["acme"])
        code, page = await self.call("GET", "/accounts", key=self.operator_key)
        self.assertEqual([a["name"] for a in page["items"]], ["acme", "other"])

    async def test_another_accounts_objects_are_404(self):
        for path in ("/accounts/other", "/accounts/other/users", "/accounts/other/keys",
                     "/accounts/nobody"):
            self.assertEqual((await self.call("GET", path))[0], 404, path)
        self.assertEqual((await self.call("GET", "/accounts/acme"))[0], 200)
        self.assertEqual((await self.call("GET", "/accounts/acme/users",
                                          key=self.operator_key))[0], 200)
        endpoint, _ = await admin.add_webhook(self.stores, self.other.id,
                                              "https://hooks.example/x", ["sent"], [])
        self.assertEqual((await self.call("DELETE", f"/accounts/acme/webhooks/{endpoint.id}"))[0],
                         404)

    async def test_accounts_and_what_only_the_operator_changes(self):
        self.assertEqual((await self.call("POST", "/accounts", {"name": "new"}))[0], 403)
        code, created = await self.call("POST", "/accounts", {"name": "new"},
                                        key=self.operator_key)
        self.assertEqual((code, created["name"]), (201, "new"))
        self.assertEqual((await self.call("POST", "/accounts", {"name": "new"},
                                          key=self.operator_key))[0], 409)
        code, answer = await self.call("PATCH", "/accounts/acme", {"sends_per_month": 10})
        self.assertEqual((code, answer["error"]), (403, "Operator_only"))
        code, account = await self.call("PATCH", "/accounts/acme",
                                        {"archive": True, "timezone": "UTC"})
        self.assertEqual((code, account["settings"]["archive"], account["timezone"]),
                         (200, True, "UTC"))
        code, account = await self.call("PATCH", "/accounts/acme",
                                        {"sends_per_month": 10, "active": False,
                                         "allowed_networks": ["10.0.0.0/8"]},
                                        key=self.operator_key)
        self.assertEqual((account["sends_per_month"], account["active"],
                          account["allowed_networks"]), (10, False, ["10.0.0.0/8"]))
        self.assertEqual((await self.call("GET", "/accounts"))[1]["error"],
                         "Current_service_is_not_active")

    async def test_users_and_keys_shown_once(self):
        code, user = await self.call("POST", "/accounts/acme/users", {"username": "acme.pro"})
        self.assertEqual((code, user["username"]), (201, "acme.pro"))
        self.assertEqual(len(user["password"]), 24)
        self.assertEqual((await self.call("POST", "/accounts/acme/users",
                                          {"username": "acme.pro"}))[0], 409)
        code, page = await self.call("GET", "/accounts/acme/users")
        self.assertEqual(page["items"][0].keys(), {"username", "created_at"})
        self.assertEqual((await self.call("DELETE", "/accounts/acme/users/acme.pro"))[0], 200)
        self.assertEqual((await self.call("DELETE", "/accounts/acme/users/acme.pro"))[0], 404)

        code, created = await self.call("POST", "/accounts/acme/keys",
                                        {"name": "ci", "kind": "admin"})
        self.assertEqual((code, created["kind"]), (201, "admin"))
        self.assertEqual((await self.call("GET", "/accounts", key=created["key"]))[0], 200)
        code, page = await self.call("GET", "/accounts/acme/keys")
        self.assertTrue(all("key" not in item for item in page["items"]))
        self.assertIn(created["prefix"], created["key"])
        self.assertEqual((await self.call("DELETE", f"/accounts/acme/keys/{created['id']}"))[0],
                         200)
        self.assertEqual((await self.call("GET", "/accounts", key=created["key"]))[0], 403)
        self.assertEqual((await self.call("POST", "/accounts/acme/keys",
                                          {"kind": "campaign", "campaign": 99}))[0], 404)
        self.assertEqual((await self.call("POST", "/accounts/acme/keys", {"kind": "root"}))[0],
                         400)

    async def test_domains_with_their_records_and_senders(self):
        code, domain = await self.call("POST", "/accounts/acme/domains",
                                       {"domain": "Example.org", "algorithm": "ed25519"})
        self.assertEqual((code, domain["domain"], domain["verified"]),
                         (201, "example.org", False))
        self.assertEqual([r["name"] for r in domain["dns_records"]],
                         ["mailgw._domainkey.example.org", "example.org",
                          "bounces.example.org", "bounces.example.org", "_dmarc.example.org",
                          "_spf.mx.test.example"])
        self.assertEqual((await self.call("POST", "/accounts/acme/domains/example.org/verify")
                          )[0], 403)
        code, domain = await self.call("POST", "/accounts/acme/domains/example.org/verify",
                                       key=self.operator_key)
        self.assertTrue(domain["verified"])
        self.assertEqual((await self.call("GET", "/accounts/acme/domains/example.org"))[0], 200)
        self.assertEqual((await self.call("POST", "/accounts/acme/domains",
                                          {"domain": "not a domain"}))[0], 400)
        code, sender = await self.call("POST", "/accounts/acme/senders",
                                       {"address": "News@example.net"})
        self.assertEqual((code, sender), (201, {"address": "news@example.net",
                                                "verified": False}))
        self.assertEqual((await self.call("POST", "/accounts/acme/senders",
                                          {"address": "x", "verified": True}))[0], 403)
        self.assertEqual((await self.call("DELETE", "/accounts/acme/senders/news@example.net")
                          )[0], 200)
        self.assertEqual((await self.call("DELETE", "/accounts/acme/domains/example.org"))[0],
                         200)
        self.assertEqual((await self.call("GET", "/accounts/acme/domains"))[1]["items"], [])

    async def test_templates_webhooks_and_suppressions(self):
        code, _ = await self.call("PUT", "/accounts/acme/templates/welcome1",
                                  {"subject": "Hola {nombre}", "html": "<p>{nombre}</p>"})
        self.assertEqual(code, 200)
        self.assertEqual((await self.call("GET", "/accounts/acme/templates/welcome1"))[1]
                         ["subject"], "Hola {nombre}")
        self.assertEqual((await self.stores.templates.get(self.acme.id, "welcome1")).html,
                         "<p>{nombre}</p>")
        self.assertEqual((await self.call("PUT", "/accounts/acme/templates/x", {}))[0], 400)
        self.assertEqual((await self.call("DELETE", "/accounts/acme/templates/welcome1"))[0],
                         200)

        code, hook = await self.call("POST", "/accounts/acme/webhooks",
                                     {"url": "https://hooks.example/in",
                                      "event_types": ["sent", "open"]})
        self.assertEqual((code, hook["event_types"]), (201, ["sent", "open"]))
        self.assertEqual(len(hook["secret"]), 43)
        for refused in ({"url": "http://hooks.example/in", "event_types": ["sent"]},
                        {"url": "https://hooks.example/in", "event_types": ["nope"]},
                        {"url": "https://hooks.example/in"}):
            self.assertEqual((await self.call("POST", "/accounts/acme/webhooks", refused))[0],
                             400, refused)
        self.assertEqual([h["id"] for h in (await self.call(
            "GET", "/accounts/acme/webhooks"))[1]["items"]], [hook["id"]])

        for address in ("a@example.net", "b@example.net", "a@example.org"):
            code, _ = await self.call("POST", "/accounts/acme/suppressions",
                                      {"address": address})
            self.assertEqual(code, 201)
        listed = await self.call("GET", "/accounts/acme/suppressions?domain=example.net")
        self.assertEqual([s["address"] for s in listed[1]["items"]],
                         ["a@example.net", "b@example.net"])
        listed = await self.call("GET", "/accounts/acme/suppressions?address=a@example.org")
        self.assertEqual([s["reason"] for s in listed[1]["items"]], ["manual"])
        self.assertEqual(await self.call("DELETE",
                                         "/accounts/acme/suppressions?domain=example.net"),
                         (200, {"removed": 2}))
        self.assertEqual((await self.call("DELETE", "/accounts/acme/suppressions"))[0], 400)

    async def test_pages_by_cursor(self):
        for n in range(5):
            await self.call("POST", "/accounts/acme/users", {"username": f"u{n}"})
        names, cursor = [], ""
        while True:
            code, page = await self.call("GET", f"/accounts/acme/users?limit=2{cursor}")
            names += [u["username"] for u in page["items"]]
            if page["next_cursor"] is None:
                break
            cursor = f"&cursor={page['next_cursor']}"
        self.assertEqual(names, ["u0", "u1", "u2", "u3", "u4"])
        for query in ("?limit=0", "?limit=501", "?limit=x", "?cursor=%%%", "?cursor=InUwIg"):
            code, answer = await self.call("GET", "/accounts/acme/users" + query)
            self.assertEqual((code, answer["error"]), (400, "Bad_request"), query)

    async def test_bad_bodies(self):
        for body in (None, [], {"username": 5}, {"username": ""}):
            code, answer = await self.call("POST", "/accounts/acme/users", body)
            self.assertEqual(code, 400, body)

    async def test_values_too_long_for_an_index_are_400(self):
        """Unique indexes hold at most ~2.7 KB a row: longer values are refused, not a
        database error."""
        long = "x" * 5000
        for path, body in (("/accounts/acme/users", {"username": long}),
                           ("/accounts/acme/suppressions",
                            {"address": "a@example.net", "category": long}),
                           ("/accounts/acme/suppressions",
                            {"address": "a@example.net", "sender_domain": long + ".com"})):
            self.assertEqual((await self.call("POST", path, body))[0], 400, path)
        self.assertEqual((await self.call("PUT", f"/accounts/acme/templates/{long}",
                                          {"html": "<p>x</p>"}))[0], 400)


class QueueTests(QueriesDatabase, unittest.TestCase):
    """O-7 in the management API: the same operations as `mailgw queue`, each account's
    admin key on its own deliveries, the operator's on every account's and on domains."""

    async def setUp(self):
        self.gateway = await start_gateway(self, gateway_config(self, fresh_database()))
        self.database = self.gateway.database
        stores = self.gateway.stores
        acme = await stores.accounts.create_account("acme")
        other = await stores.accounts.create_account("other")
        _, self.admin_key = await admin.create_api_key(stores, acme.id, "a", "admin")
        _, self.operator_key = await admin.create_api_key(stores, other.id, "op", "admin",
                                                          operator=True)
        self.ids = {}
        for account, uid, recipient in ((acme, "a", "ana@example.net"),
                                        (other, "b", "bea@example.net")):
            await stores.submissions.store(SubmissionRecord(
                account_id=account.id, origin="smtp", message_uid=uid * 32,
                sender="news@example.org", subject="Ofertas", html=None, body={"text": "x"},
                recipients=(QueuedRecipient(recipient, None),)))
            [(self.ids[account.name],)] = await self.sql(
                "SELECT id FROM deliveries WHERE recipient = %s", recipient)
        self.base = f"http://127.0.0.1:{self.gateway.port_for('http.listener')}/v1/admin/queue"

    async def call(self, method, path, body=None, key=None):
        response = await treq.request(
            method, self.base + path, headers={"Authorization": [key or self.admin_key]},
            data=None if body is None else json.dumps(body).encode(), persistent=False)
        return response.code, await response.json()

    async def test_an_admin_key_sees_its_own_account(self):
        code, counts = await self.call("GET", "")
        self.assertEqual((code, [(c["state"], c["account"], c["domain"], c["deliveries"])
                                 for c in counts["items"]]),
                         (200, [("queued", "acme", "example.net", 1)]))
        code, listed = await self.call("GET", "/deliveries?domain=example.net")
        self.assertEqual([d["recipient"] for d in listed["items"]], ["ana@example.net"])
        self.assertEqual((await self.call("GET", "?account=other"))[0], 404)
        code, shown = await self.call("GET", f"/deliveries/{self.ids['acme']}")
        self.assertEqual((code, shown["state"], [e["type"] for e in shown["events"]]),
                         (200, "queued", ["queued"]))
        for method, path in (("GET", ""), ("POST", "/retry"), ("POST", "/cancel")):
            self.assertEqual((await self.call(method, f"/deliveries/{self.ids['other']}{path}",
                                              {}))[0], 404, path)
        code, counts = await self.call("GET", "", key=self.operator_key)
        self.assertEqual([c["account"] for c in counts["items"]], ["acme", "other"])

    async def test_retry_and_cancel(self):
        delivery = f"/deliveries/{self.ids['acme']}"
        code, retried = await self.call("POST", delivery + "/retry", {})
        self.assertEqual((code, retried["state"]), (200, "queued"))
        code, cancelled = await self.call("POST", delivery + "/cancel", {"reason": "typo"})
        self.assertEqual((code, cancelled["state"]), (200, "not_sent"))
        code, shown = await self.call("GET", delivery)
        self.assertEqual(shown["events"][-1]["type"], "not_sent")
        for action in ("/cancel", "/retry"):
            code, refused = await self.call("POST", delivery + action, {})
            self.assertEqual((code, refused["error"]), (409, "Queue_action_refused"), action)
        self.assertEqual((await self.call("POST", "/deliveries/999999/retry", {}))[0], 404)

    async def test_domains_are_the_operators(self):
        self.assertEqual((await self.call("PUT", "/suspended/example.net", {}))[0], 403)
        self.assertEqual((await self.call("POST", "/domains/example.net/retry", {}))[0], 403)
        code, held = await self.call("PUT", "/suspended/example.net", {"reason": "blocklisted"},
                                     key=self.operator_key)
        self.assertEqual((code, held["domain"], held["held"]), (200, "example.net", 2))
        self.assertEqual((await self.call("PUT", "/suspended/example.net", {},
                                          key=self.operator_key))[0], 409)
        code, listed = await self.call("GET", "/suspended", key=self.operator_key)
        self.assertEqual([h["domain"] for h in listed["items"]], ["example.net"])
        self.assertEqual((await self.call("PUT", "/suspended/not..a.domain", {},
                                          key=self.operator_key))[0], 400)
        code, resumed = await self.call("DELETE", "/suspended/example.net",
                                        key=self.operator_key)
        self.assertEqual((code, resumed), (200, {"due": 2}))
        self.assertEqual((await self.call("GET", "/deliveries?state=nonsense"))[0], 400)
