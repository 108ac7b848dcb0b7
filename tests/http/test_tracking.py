"""The tracking endpoints on a running Gateway, over HTTP, against a real PostgreSQL
(T-1 to T-6, R-3)."""

import time
import uuid
from urllib.parse import urlsplit

import psycopg2
import treq
from treq.client import HTTPClient
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from mailgw.config import DatabaseConfig, TrackingConfig
from mailgw.content.body import StoredBody
from mailgw.content.contexts import recipient_context, sender_context
from mailgw.content.render import PreparedMessage
from mailgw.http.tracking import ONE_CLICK_REASON, PIXEL
from mailgw.store.submissions import QueuedRecipient, SubmissionRecord
from tests.events.test_agents import IPHONE, WINDOWS
from tests.geoip import BERLIN, BOGOTA, city_database
from tests.harness import (
    QueriesDatabase,
    fresh_database,
    gateway_config,
    new_cluster,
    reactor_turns,
    start_gateway,
    until,
)

HTML = ('<html><body><p>Hola XYZNOMBREXYZ</p><a href="https://shop.example.com/sale?x=1">'
        'sale</a> <a href="[Unsubscribe]">baja</a></body></html>')
SALE = "https://shop.example.com/sale?x=1"


def http_client() -> HTTPClient:
    """A client whose connections end with their request (nothing left open after a
    test)."""
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


class TrackingTestCase(QueriesDatabase, unittest.TestCase):
    """A Gateway with a GeoIP file and loopback as its trusted proxy, a clock the tests
    set, and an account with a message to three recipients."""

    tracking = TrackingConfig()
    options: dict = {}

    async def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(time.time())
        self.dsn = fresh_database()
        config = gateway_config(self, self.dsn).replace(tracking=self.tracking)
        self.gateway = await start_gateway(self, config, self.clock)
        self.database = self.gateway.database
        self.signer = self.gateway.link_signer
        self.base = f"http://127.0.0.1:{self.gateway.port_for('http.listener')}"
        self.http = http_client()
        stores = self.gateway.stores
        self.account = (await stores.accounts.create_account("acme")).id
        contact = (await self.sql("INSERT INTO contacts (account_id, email, fields) VALUES"
                                  " (%s, 'ana@example.net', '{\"nombre\": \"Ana <3\"}')"
                                  " RETURNING id", self.account))[0][0]
        body = {"subject": "Hola", "html": HTML, "text": "Hola"}
        stored = await stores.submissions.store(SubmissionRecord(
            account_id=self.account, origin="smtp", message_uid=uuid.uuid4().hex,
            sender="news@example.org", subject="Hola", html=HTML, body=body,
            options={"language": 4, **self.options},
            recipients=(QueuedRecipient("ana@example.net", contact),
                        QueuedRecipient("bob@example.net", None),
                        QueuedRecipient("cy@example.net", None))))
        self.send_id, self.message_id = stored.send_id, stored.message_id
        rows = await self.sql("SELECT id FROM deliveries ORDER BY id")
        self.ana, self.bob, self.cy = (row[0] for row in rows)
        # Delivered an hour ago; cy's outcome is not recorded yet.
        await self.sql("UPDATE deliveries SET state = 'sent', updated_at = now() - interval"
                       " '1 hour' WHERE id <> %s", self.cy)

    def path(self, url: str) -> str:
        return self.base + urlsplit(url).path

    async def request(self, method: str, url: str, headers: dict | None = None,
                      data: bytes | None = None, user_agent: bytes | None = IPHONE):
        """The response and its body."""
        sent = dict(headers or {})
        if user_agent is not None:
            sent.setdefault(b"User-Agent", [user_agent])
        response = await self.http.request(method, self.path(url), headers=Headers(sent),
                                           data=data, allow_redirects=False)
        return response, await treq.content(response)

    async def events(self, *types):
        return await self.sql("SELECT type, delivery_id, machine, details FROM events"
                              " WHERE type = ANY(%s) ORDER BY id", list(types))


class PixelAndClickTests(TrackingTestCase):
    tracking = TrackingConfig(trusted_proxies=["127.0.0.0/8"])

    async def setUp(self):
        self.tracking = TrackingConfig(geoip_database=city_database(self.mktemp()),
                                       trusted_proxies=["127.0.0.0/8"])
        await super().setUp()

    async def test_open_pixel(self):
        """T-1: a GIF that no cache keeps, and an open with the client's address (as the
        trusted proxy forwarded it), device, OS, browser and place."""
        response, body = await self.request("GET", self.signer.open_url(self.ana),
                                            {b"X-Forwarded-For": [f"10.9.9.9, {BOGOTA}"]})
        self.assertEqual(response.code, 200)
        self.assertEqual(body, PIXEL)
        self.assertEqual((body[:6], body[6:10]), (b"GIF89a", b"\x01\x00\x01\x00"))
        headers = response.headers
        self.assertEqual(headers.getRawHeaders(b"Content-Type"), [b"image/gif"])
        self.assertIn(b"no-store", headers.getRawHeaders(b"Cache-Control")[0])
        self.assertEqual(headers.getRawHeaders(b"Pragma"), [b"no-cache"])
        [(type_, delivery, machine, details)] = await self.events("open")
        self.assertEqual((type_, delivery, machine), ("open", self.ana, False))
        self.assertEqual(details, {
            "ip": BOGOTA, "user_agent": IPHONE.decode(), "device_type": "mobile", "os": "iOS",
            "browser": "Mobile Safari", "city": "Bogota", "region": "Bogota D.C.",
            "country": "Colombia", "country_code": "CO", "latitude": 4.6097,
            "longitude": -74.0817})
        [(occurred,)] = await self.sql("SELECT extract(epoch FROM occurred_at)::float8"
                                       " FROM events WHERE type = 'open'")
        self.assertAlmostEqual(occurred, self.clock.seconds(), places=3)

    async def test_click_redirects_and_implies_an_open(self):
        """T-2: 302 to the destination; the first click of a message whose pixel was
        never fetched (images blocked) is an open too, once."""
        for _ in range(2):
            response, _ = await self.request("GET", self.signer.click_url(self.ana, SALE),
                                             {b"X-Forwarded-For": [BERLIN]},
                                             user_agent=WINDOWS)
            self.assertEqual(response.code, 302)
            self.assertEqual(response.headers.getRawHeaders(b"Location"), [SALE.encode()])
            self.assertIn(b"no-store", response.headers.getRawHeaders(b"Cache-Control")[0])
        events = await self.events("open", "click")
        self.assertEqual([(t, d, m) for t, d, m, _ in events],
                         [("open", self.ana, False), ("click", self.ana, False),
                          ("click", self.ana, False)])
        self.assertEqual(events[0][3]["implied_by"], "click")
        self.assertEqual(events[1][3]["url"], SALE)
        self.assertEqual((events[1][3]["city"], events[1][3]["device_type"]),
                         ("Berlin", "desktop"))

    async def test_click_after_an_open_implies_nothing(self):
        await self.request("GET", self.signer.open_url(self.bob))
        await self.request("GET", self.signer.click_url(self.bob, SALE))
        self.assertEqual([t for t, *_ in await self.events("open", "click")],
                         ["open", "click"])

    async def test_destination_with_non_ascii_and_escapes(self):
        url = "https://shop.example.com/ñandú?q=a%20b&x=<1>"
        response, _ = await self.request("GET", self.signer.click_url(self.ana, url))
        self.assertEqual(response.headers.getRawHeaders(b"Location"),
                         [b"https://shop.example.com/%C3%B1and%C3%BA?q=a%20b&x=%3C1%3E"])

    async def test_tokens_that_are_not_ours(self):
        """R-3, T-2: forged, cut, altered, another kind's, empty, huge, not base64: a
        plain 404, never a redirect, never an event."""
        click = urlsplit(self.signer.click_url(self.ana, SALE)).path
        token = click.rpartition("/")[2]
        altered = token[:5] + ("A" if token[5] != "A" else "B") + token[6:]
        opening = urlsplit(self.signer.open_url(self.ana)).path.rpartition("/")[2]
        paths = [f"/t/c/{token[:-3]}", f"/t/c/{altered}", f"/t/c/{opening}",
                 f"/t/c/{opening.removesuffix('.gif')}", "/t/c/", "/t/c", f"/t/c/{'A' * 8000}",
                 "/t/c/!!!not-base64", "/t/c/%00", f"/t/o/{token}",
                 f"/t/o/{opening.removesuffix('.gif')}", f"/t/o/{token}.gif",
                 f"/t/w/{token}", f"/t/u/{token}", "/t/x/abc", "/t/", "/t", "/a/nothing",
                 "/t/o/" + "%" * 50]
        for path in paths:
            response, body = await self.request("GET", self.base + path)
            self.assertEqual(response.code, 404, path)
            self.assertEqual(body, b"Not found\n", path)
            self.assertIsNone(response.headers.getRawHeaders(b"Location"), path)
        response, _ = await self.request("POST", self.signer.open_url(self.ana))
        self.assertEqual(response.code, 404)
        response, _ = await self.request("GET", self.base + "/t/c/%ff%fe")
        self.assertEqual(response.code, 400)  # not UTF-8: refused by the HTTP root
        self.assertEqual(await self.events("open", "click"), [])

    async def test_absurd_headers(self):
        """R-3: a User-Agent of 8 KiB, garbage forwarded headers, no User-Agent at all."""
        response, _ = await self.request(
            "GET", self.signer.open_url(self.ana),
            {b"X-Forwarded-For": [b"unknown, <script>, 999.1.1.1, \xff\xfe"]},
            user_agent=IPHONE + b"\xff" * 8000)
        self.assertEqual(response.code, 200)
        response, _ = await self.request("GET", self.signer.click_url(self.bob, SALE),
                                         {b"X-Forwarded-For": [b"," * 3000]}, user_agent=None)
        self.assertEqual(response.code, 302)
        (_, _, _, first), (_, _, machine, second) = await self.events("open", "click")
        self.assertEqual(first["ip"], "127.0.0.1")
        self.assertEqual(len(first["user_agent"]), 512)
        self.assertEqual(first["browser"], "Mobile Safari")
        self.assertTrue(machine)
        self.assertEqual((second["user_agent"], second["machine_reason"]), ("", "no_user_agent"))


class MachineActivityTests(TrackingTestCase):
    """T-6: machines' opens and clicks are recorded with machine set, and why."""

    tracking = TrackingConfig(trusted_proxies=["127.0.0.0/8"], machine_networks=["192.0.2.0/24"])

    async def reasons(self):
        return [(t, m, d.get("machine_reason")) for t, _, m, d in
                await self.events("open", "click")]

    async def test_head_request(self):
        response, _ = await self.request("HEAD", self.signer.click_url(self.ana, SALE))
        self.assertEqual(response.code, 302)
        self.assertEqual(await self.reasons(), [("click", True, "head")])

    async def test_scanner_agent(self):
        await self.request("GET", self.signer.click_url(self.ana, SALE),
                           user_agent=b"Mozilla/5.0 (compatible; Barracuda Sentinel)")
        self.assertEqual(await self.reasons(), [("click", True, "scanner_agent")])

    async def test_privacy_proxies(self):
        gmail = b"Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com " \
                b"GoogleImageProxy)"
        await self.request("GET", self.signer.open_url(self.ana), user_agent=gmail)
        for address in ("17.58.1.2", "192.0.2.9"):  # Apple's network; one from the config
            await self.request("GET", self.signer.open_url(self.bob),
                               {b"X-Forwarded-For": [address]}, user_agent=b"Mozilla/5.0")
        self.assertEqual(await self.reasons(), [("open", True, "privacy_proxy")] * 3)

    async def test_soon_after_delivery(self):
        """Within scanner_seconds (5) of the recorded delivery, or before its outcome is
        recorded at all; later, a person."""
        [(sent_at,)] = await self.sql("SELECT extract(epoch FROM now())::float8")
        await self.sql("UPDATE deliveries SET updated_at = to_timestamp(%s) WHERE id = %s",
                       sent_at, self.ana)
        self.clock.advance(sent_at + 4 - self.clock.seconds())
        await self.request("GET", self.signer.click_url(self.ana, SALE))
        await self.request("GET", self.signer.click_url(self.cy, SALE))
        self.clock.advance(2)
        await self.request("GET", self.signer.click_url(self.ana, SALE))
        self.assertEqual(await self.reasons(), [
            ("click", True, "soon_after_delivery"), ("click", True, "soon_after_delivery"),
            ("open", False, None), ("click", False, None)])


class SwitchedOffTests(TrackingTestCase):
    """T-5: no pixel or no rewriting means no event of that kind for that message, even
    for a token signed for it (the account turned tracking off since, say)."""

    options = {"track_opens": False}

    async def test_message_without_pixel(self):
        response, _ = await self.request("GET", self.signer.open_url(self.ana))
        self.assertEqual(response.code, 200)
        await self.request("GET", self.signer.click_url(self.ana, SALE))
        # The click is recorded, but implies no open: the message had no pixel.
        self.assertEqual([t for t, *_ in await self.events("open", "click")], ["click"])

    async def test_account_without_click_tracking(self):
        await self.gateway.stores.accounts.update_account("acme", {"track_clicks": False}, {})
        response, _ = await self.request("GET", self.signer.click_url(self.ana, SALE))
        self.assertEqual((response.code, response.headers.getRawHeaders(b"Location")),
                         (302, [SALE.encode()]))
        self.assertEqual(await self.events("open", "click"), [])


class UnsubscribeTests(TrackingTestCase):
    async def suppressions(self):
        return await self.sql("SELECT address, scope_domain, category FROM suppressions"
                              " ORDER BY category NULLS FIRST")

    async def test_page_changes_nothing(self):
        """T-3: the page, in the message's language (English here); a GET (a link
        scanner's too) unsubscribes no one."""
        for method in ("GET", "HEAD"):
            response, body = await self.request(method, self.signer.unsubscribe_url(self.ana))
            self.assertEqual(response.code, 200)
        response, body = await self.request("GET", self.signer.unsubscribe_url(self.ana))
        self.assertEqual(response.headers.getRawHeaders(b"Content-Type"),
                         [b"text/html; charset=utf-8"])
        self.assertIn(b"noindex", response.headers.getRawHeaders(b"X-Robots-Tag")[0])
        page = body.decode()
        self.assertTrue(page.startswith("<!DOCTYPE html>"))
        self.assertIn('lang="en"', page)
        self.assertIn("ana@example.net receives mail from example.org.", page)
        self.assertIn('<form method="post">', page)
        self.assertIn('value="unsubscribe"', page)
        self.assertNotIn('type="checkbox"', page)
        self.assertEqual(await self.suppressions(), [])
        self.assertEqual(await self.events("unsubscribed"), [])

    async def test_one_click(self):
        """RFC 8058: unsubscribed at once, no page; a mail client posting twice writes
        one event. Both form encodings mail providers use."""
        bodies = [({b"Content-Type": [b"application/x-www-form-urlencoded"]},
                   b"List-Unsubscribe=One-Click"),
                  ({b"Content-Type": [b"multipart/form-data; boundary=xyz"]},
                   b'--xyz\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\n'
                   b"One-Click\r\n--xyz--\r\n")]
        for headers, data in bodies:
            response, body = await self.request("POST", self.signer.unsubscribe_url(self.ana),
                                                headers, data)
            self.assertEqual((response.code, body), (200, b"Unsubscribed\n"))
        self.assertEqual(await self.suppressions(), [("ana@example.net", "example.org", None)])
        [(_, delivery, _, details)] = await self.events("unsubscribed")
        self.assertEqual(delivery, self.ana)
        self.assertEqual({k: details[k] for k in ("subscription_type", "domain", "reason",
                                                  "method")},
                         {"subscription_type": "domain subscription cancelled",
                          "domain": "example.org", "reason": ONE_CLICK_REASON,
                          "method": "one-click"})

    async def test_form_unsubscribe_and_resubscribe(self):
        url = self.signer.unsubscribe_url(self.ana)
        form = {b"Content-Type": [b"application/x-www-form-urlencoded"]}
        response, body = await self.request("POST", url, form,
                                            b"action=unsubscribe&reason=Too+many%0A+mails")
        self.assertEqual(response.code, 200)
        self.assertIn("ana@example.net no longer receives mail from example.org.",
                      body.decode())
        self.assertIn('value="resubscribe"', body.decode())
        self.assertEqual(await self.suppressions(), [("ana@example.net", "example.org", None)])
        response, body = await self.request("POST", url, form, b"action=resubscribe")
        self.assertIn("ana@example.net receives mail from example.org again.", body.decode())
        self.assertEqual(await self.suppressions(), [])
        events = await self.events("unsubscribed", "resubscribed")
        self.assertEqual([(t, d["subscription_type"], d.get("reason")) for t, _, _, d in events],
                         [("unsubscribed", "domain subscription cancelled", "Too many mails"),
                          ("resubscribed", "domain subscription reactivated", None)])

    async def test_categories(self):
        """The account's categories as checkboxes; unticked ones are cancelled."""
        await self.gateway.stores.accounts.update_account(
            "acme", {"categories": ["News", "Offers", "Events"]}, {})
        url = self.signer.unsubscribe_url(self.ana)
        _, body = await self.request("GET", url)
        for category in ("News", "Offers", "Events"):
            self.assertIn(f'type="checkbox" name="category" value="{category}" '
                          f'checked="checked"', body.decode())
        response, body = await self.request(
            "POST", url, {b"Content-Type": [b"application/x-www-form-urlencoded"]},
            b"action=categories&category=News&category=Events")
        self.assertEqual(response.code, 200)
        page = body.decode()
        self.assertIn("Your choices are saved.", page)
        self.assertIn('value="Offers"> Offers</label>', page.replace(" />", ">"))
        self.assertEqual(await self.suppressions(),
                         [("ana@example.net", "example.org", "Offers")])
        [(_, _, _, details)] = await self.events("unsubscribed")
        self.assertEqual((details["subscription_type"], details["categories"]),
                         ("domain category update",
                          {"News": "active", "Offers": "cancelled", "Events": "active"}))

    async def test_bad_posts(self):
        url = self.signer.unsubscribe_url(self.ana)
        form = {b"Content-Type": [b"application/x-www-form-urlencoded"]}
        for data in (b"", b"action=delete", b"action=categories", b"\xff\xfe=\x00"):
            response, _ = await self.request("POST", url, form, data)
            self.assertEqual(response.code, 400, data)
        response, _ = await self.request("POST", url, {b"Content-Type": [
            b"multipart/form-data; boundary=xyz"]}, b"--xyz\r\ngarbage")
        self.assertEqual(response.code, 400)
        self.assertEqual(await self.suppressions(), [])


class WebVersionTests(TrackingTestCase):
    async def test_html_as_received(self):
        """T-4: the recipient's HTML, merge tags and signed links as in their copy."""
        response, body = await self.request("GET", self.signer.web_version_url(self.ana))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"X-Robots-Tag"), [b"noindex, nofollow"])
        html = body.decode()
        [message] = (await self.gateway.stores.queue.messages([self.message_id])).values()
        stored = StoredBody.from_json(message.body)
        prepared = PreparedMessage(stored, message.options,
                                   sender_context(message, stored, "h", "b", None), self.signer)
        expected = prepared.render_html(recipient_context(self.ana, "ana@example.net",
                                                          {"nombre": "Ana <3"}))
        self.assertEqual(html, expected)
        self.assertIn("Hola Ana &lt;3", html)
        self.assertIn(self.signer.click_url(self.ana, SALE).replace("&", "&amp;"), html)
        self.assertIn(self.signer.unsubscribe_url(self.ana), html)
        self.assertIn(self.signer.open_url(self.ana), html)


class CommitTests(TrackingTestCase):
    """Point 7: a hit is answered once its event is committed, or after
    commit_wait_seconds whatever became of it; an unsubscribe that cannot be committed
    in time is a 503."""

    def hold(self, table: str):
        """A transaction of its own that keeps `table` locked until released, and a
        predicate that holds once a writer waits for it."""
        conn = psycopg2.connect(self.dsn)
        self.addCleanup(conn.close)
        cursor = conn.cursor()
        cursor.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
        watcher = psycopg2.connect(self.dsn)
        watcher.autocommit = True
        self.addCleanup(watcher.close)

        def waiting() -> bool:
            with watcher.cursor() as look:
                look.execute("SELECT count(*) FROM pg_stat_activity"
                             " WHERE wait_event_type = 'Lock' AND datname = current_database()")
                return look.fetchone()[0] > 0

        return conn, waiting

    async def test_pixel_waits_for_the_commit_then_answers_anyway(self):
        lock, waiting = self.hold("events")
        answered = defer.ensureDeferred(self.request("GET", self.signer.open_url(self.ana)))
        await until(waiting, "the event's insert to wait for the lock")
        await reactor_turns(10)
        self.assertFalse(answered.called)  # waiting for the commit
        self.clock.advance(TrackingConfig().commit_wait_seconds)
        response, body = await answered
        self.assertEqual((response.code, body), (200, PIXEL))
        lock.commit()  # the event is written after all
        await until(lambda: self.gateway.stores.committer._in_flight == 0, "the commit")
        self.assertEqual(len(await self.events("open")), 1)

    async def test_unsubscribe_not_committed_in_time_is_503(self):
        lock, waiting = self.hold("suppressions")
        answered = defer.ensureDeferred(self.request(
            "POST", self.signer.unsubscribe_url(self.ana),
            {b"Content-Type": [b"application/x-www-form-urlencoded"]},
            b"List-Unsubscribe=One-Click"))
        await until(waiting, "the unsubscribe to wait for the lock")
        await reactor_turns(10)
        self.assertFalse(answered.called)
        self.clock.advance(TrackingConfig().commit_wait_seconds)
        response, _ = await answered
        self.assertEqual(response.code, 503)
        lock.rollback()


class OutageTests(unittest.TestCase):
    """Point 7, R-2: with PostgreSQL gone, the pixel and the redirect answer at once and
    the lost events are logged and counted; the unsubscribe page and POST answer 503."""

    async def setUp(self):
        self.cluster = new_cluster("mailgw-test-tracking-outage-")
        config = gateway_config(self, self.cluster.dsn).replace(
            database=DatabaseConfig(dsn=self.cluster.dsn, pool_size=2))
        self.gateway = await start_gateway(self, config)
        self.addCleanup(self.cluster.start)  # cleanups run last first: back before the stop
        self.base = f"http://127.0.0.1:{self.gateway.port_for('http.listener')}"

    async def test_answers_during_an_outage(self):
        signer, http = self.gateway.link_signer, http_client()
        self.cluster.stop()
        paths = {"open": urlsplit(signer.open_url(7)).path,
                 "click": urlsplit(signer.click_url(7, SALE)).path}
        response = await http.get(self.base + paths["open"])
        self.assertEqual((response.code, await treq.content(response)), (200, PIXEL))
        response = await http.get(self.base + paths["click"], allow_redirects=False)
        self.assertEqual(response.code, 302)
        self.assertEqual(self.gateway.tracking_recorder.lost, {"open": 1, "click": 1})
        unsubscribe = self.base + urlsplit(signer.unsubscribe_url(7)).path
        response = await http.get(unsubscribe)
        self.assertEqual(response.code, 503)
        # The message's language is in the database: the default's (S-9), Spanish.
        self.assertIn("Inténtalo de nuevo", (await treq.content(response)).decode())
        response = await http.post(unsubscribe, data=b"List-Unsubscribe=One-Click", headers={
            b"Content-Type": [b"application/x-www-form-urlencoded"]})
        self.assertEqual(response.code, 503)
        self.assertEqual(response.headers.getRawHeaders(b"Retry-After"), [b"60"])
        self.assertEqual(dict(self.gateway.tracking_recorder.lost), {"open": 1, "click": 1})
        [lost] = [sample.value for family in self.gateway.metrics.registry.collect()
                  for sample in family.samples
                  if sample.name == "mailgw_tracking_events_lost_total"]
        self.assertEqual(lost, 2)
