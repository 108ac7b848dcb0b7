"""Statistics over HTTP with the account's API key (H-4), on a running Gateway."""

import json
import uuid
from datetime import UTC, datetime

import treq
from twisted.trial import unittest

from mailgw import credentials
from mailgw.store.events import Event, EventType
from mailgw.store.statistics import COUNTERS
from mailgw.store.submissions import QueuedRecipient, SubmissionRecord
from tests.harness import QueriesDatabase, fresh_database, gateway_config, start_gateway
from tests.http.test_tracking import http_client


class StatsTests(QueriesDatabase, unittest.TestCase):
    async def setUp(self):
        self.gateway = await start_gateway(self, gateway_config(self, fresh_database()))
        self.database = self.gateway.database
        self.base = f"http://127.0.0.1:{self.gateway.port_for('http.listener')}"
        self.http = http_client()
        stores = self.gateway.stores
        self.key = await self.account_with_key("acme")
        self.other_key = await self.account_with_key("other")
        self.account = (await stores.accounts.get_account("acme")).id
        stored = await stores.submissions.store(SubmissionRecord(
            account_id=self.account, origin="smtp", message_uid=uuid.uuid4().hex,
            sender="news@example.org", subject="Spring", html=None, body={"subject": "s"},
            recipients=(QueuedRecipient("ana@example.net", None),
                        QueuedRecipient("bob@example.net", None))))
        self.send_id = stored.send_id
        [(delivery,)] = await self.sql("SELECT min(id) FROM deliveries")
        at = datetime(2026, 3, 2, 3, 0, tzinfo=UTC)  # 1 March in Bogota
        await self.sql("UPDATE events SET occurred_at = %s", at)
        for machine in (False, False, True):
            await stores.events.record(Event(self.account, EventType.OPEN, {}, self.send_id,
                                             stored.message_id, delivery, None,
                                             "ana@example.net", at, machine))

    async def account_with_key(self, name):
        stores = self.gateway.stores
        account = await stores.accounts.create_account(name)
        key = credentials.new_api_key()
        await stores.accounts.create_api_key(account.id, "k", credentials.hash_api_key(key),
                                             credentials.api_key_prefix(key))
        return key

    async def get(self, path, key=None):
        headers = {b"Authorization": [f"Bearer {key or self.key}".encode()]}
        response = await self.http.get(self.base + path, headers=headers)
        return response.code, json.loads(await treq.content(response))

    async def test_send(self):
        code, body = await self.get(f"/v1/stats/sends/{self.send_id}")
        self.assertEqual(code, 200)
        self.assertEqual((body["send_id"], body["subject"]), (self.send_id, "Spring"))
        self.assertEqual(list(body["counters"]), list(COUNTERS))
        self.assertEqual({k: v for k, v in body["counters"].items() if v},
                         {"recipients": 2, "opens_unique": 1, "opens_total": 2,
                          "opens_machine": 1})

    async def test_another_accounts_send_and_unknown_sends(self):
        for path, key in ((f"/v1/stats/sends/{self.send_id}", self.other_key),
                          (f"/v1/stats/sends/{self.send_id + 1}", None),
                          ("/v1/stats/sends/abc", None), ("/v1/stats/sends/" + "9" * 40, None),
                          ("/v1/stats/sends/", None), ("/v1/stats/nothing", None),
                          ("/v1/stats/sends/%00", None)):
            code, body = await self.get(path, key)
            self.assertEqual((code, body["error"]), (404, "Not_found"), path)

    async def test_wrong_keys(self):
        response = await self.http.get(self.base + f"/v1/stats/sends/{self.send_id}")
        self.assertEqual(response.code, 403)
        self.assertEqual(json.loads(await treq.content(response))["error"], "Invalid_API_Key")
        for key in ("mgw_wrong", "x" * 600):
            code, body = await self.get("/v1/stats", key)
            self.assertEqual((code, body["error"]), (403, "Invalid_API_Key"))
        await self.gateway.stores.accounts.update_account("acme", {}, {"active": False})
        self.gateway.key_authenticator.forget_keys()
        code, body = await self.get("/v1/stats")
        self.assertEqual((code, body["error"]), (403, "Current_service_is_not_active"))

    async def test_account_per_day_in_its_time_zone(self):
        code, body = await self.get("/v1/stats?from=2026-03-01&to=2026-03-02")
        self.assertEqual(code, 200)
        self.assertEqual((body["account"], body["timezone"]), ("acme", "America/Bogota"))
        self.assertEqual((body["from"], body["to"]),
                         ("2026-03-01T00:00:00-05:00", "2026-03-03T00:00:00-05:00"))
        self.assertEqual([d["date"] for d in body["days"]], ["2026-03-01", "2026-03-02"])
        self.assertEqual(body["days"][0]["counters"]["opens_total"], 2)
        self.assertEqual(body["days"][1]["counters"], dict.fromkeys(COUNTERS, 0))
        self.assertEqual(list(body["totals"]), list(COUNTERS))
        self.assertEqual((body["totals"]["recipients"], body["totals"]["opens_unique"]), (2, 1))
        # The other account sees none of it.
        code, body = await self.get("/v1/stats?from=2026-03-01&to=2026-03-02", self.other_key)
        self.assertEqual(body["totals"], dict.fromkeys(COUNTERS, 0))

    async def test_bad_ranges(self):
        for query in ("from=yesterday", "to=2026-02-30", "from=2026-03-02&to=2026-03-01",
                      "from=2020-01-01&to=2026-01-01", "from=%ff"):
            code, body = await self.get(f"/v1/stats?{query}")
            self.assertEqual((code, body["error"]), (400, "Bad_request"), query)
