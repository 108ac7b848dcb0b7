"""The queue runner with a real queue and stand-ins for DNS and the outbound pool.

The runner's timers (polls, lease renewals, the stop's grace) run on a task.Clock;
its database work runs on the real reactor, and `NotingQueue.settle` waits for it.
"""

import binascii
import email
import email.policy
import re
import threading
import uuid

import dkim
import psycopg2
from psycopg2.extras import Json
from twisted.internet import defer, reactor, task, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from mailgw.accounts.settings import AccountSettings
from mailgw.config import DeliveryConfig
from mailgw.content.dkim import generate_dkim_key
from mailgw.content.links import LinkSigner
from mailgw.delivery import runner as runner_module
from mailgw.delivery.mx import MailServer, NullMX
from mailgw.delivery.runner import (
    MAX_RECORD_RETRY_SECONDS,
    MAX_RETRY_INTERVAL,
    STOP_DELIVERIES_SECONDS,
    LeaseReleased,
    QueueRunner,
)
from mailgw.errors import DatabaseUnavailable, TransientDatabaseError
from mailgw.store.queue import ClaimedDelivery, MessageContext, Outcome
from mailgw.store.submissions import QueuedRecipient, SubmissionRecord
from tests.harness import DatabaseTestCase

BODY = {"subject": "s", "html": "<p>x</p>", "text": "x"}
GATEWAY_BOUNCES = "bounces.gw.example.org"


class StubResolver:
    async def mail_servers(self, domain):
        if domain == "nullmx.example":
            raise NullMX("domain nullmx.example accepts no mail (null MX)")
        return [MailServer("mx." + domain, 25, 10)]

    async def addresses(self, host):
        return ["127.0.0.1"]


class HeldPool:
    """Holds every message until the test answers it."""

    def __init__(self):
        self.held = []
        self.closed = False
        self.withdrawn = []

    def deliver(self, domain, servers, message):
        self.held.append(message)
        return message.done

    def close_idle(self):
        self.closed = True
        return defer.succeed(None)

    def withdraw(self, delivery_ids):
        """As the real pool: the messages not started are answered, never sent."""
        self.withdrawn = sorted(delivery_ids)
        for message in self.held:
            if message.delivery_id in delivery_ids and not message.done.called:
                message.done.callback(Outcome(message.delivery_id, "deferred", "withdrawn"))

    def recipients(self):
        return sorted(message.recipient for message in self.held)


class NotingQueue:
    """The real queue, noting every call, so that a test can wait until the runner's
    database work is done and count what it asked for."""

    def __init__(self, queue):
        self._queue = queue
        self.calls = []

    def __getattr__(self, name):
        method = getattr(self._queue, name)

        def noted(*args):
            d = defer.ensureDeferred(method(*args))
            self.calls.append((name, d))
            return d
        return noted

    def count(self, name):
        return sum(1 for called, _ in self.calls if called == name)

    async def settle(self):
        """Until no call is under way (one that finishes may make the runner start more)."""
        while pending := [d for _, d in self.calls if not d.called]:
            await defer.DeferredList(pending)


def _inline(fn, *args):
    return defer.maybeDeferred(fn, *args)


class RunnerTests(DatabaseTestCase):
    async def setUp(self):
        await super().setUp()
        account = await self.stores.accounts.create_account("acme")
        self.account_id = account.id
        self.clock = task.Clock()
        self.queue = NotingQueue(self.stores.queue)
        self.pool = HeldPool()
        self.runner = self.make_runner()
        self.threads = []

    def make_runner(self, **config):
        return QueueRunner(
            self.queue, StubResolver(), self.pool, LinkSigner(b"k" * 32, "http://localhost:8080"),
            self.clock, DeliveryConfig(**{"batch_size": 2, **config}), "gw.example.org",
            GATEWAY_BOUNCES, "node-a", self.run_in_thread)

    def run_in_thread(self, fn, *args):
        """deferToThread, noting the function and the thread it ran in."""
        def noted():
            self.threads.append((fn.__name__, threading.get_ident()))
            return fn(*args)
        return threads.deferToThread(noted)

    async def submit(self, *emails, sender="news@example.org", body=BODY, options=None):
        recipients = []
        for address in emails:
            (contact,) = await self.sql(
                "INSERT INTO contacts (account_id, email) VALUES (%s, %s)"
                " ON CONFLICT (account_id, email) DO UPDATE SET email = EXCLUDED.email"
                " RETURNING id", self.account_id, address)
            recipients.append(QueuedRecipient(address, contact[0]))
        return await self.stores.submissions.store(SubmissionRecord(
            account_id=self.account_id, origin="api", message_uid=uuid.uuid4().hex,
            sender=sender, subject="s", html=body.get("html"), body=body,
            options=options or {}, recipients=tuple(recipients)))

    async def start(self):
        """Start the runner and wait for its first claims and what follows them."""
        self.runner.start()
        await self.queue.settle()

    def fail_once(self, method, error):
        """The queue's `method` raises `error` the first time it is called."""
        real = getattr(self.stores.queue, method)
        failures = [error]

        async def failing_once(*args):
            if failures:
                raise failures.pop()
            return await real(*args)

        self.patch(self.stores.queue, method, failing_once)

    async def advance(self, seconds):
        self.clock.advance(seconds)
        await self.queue.settle()

    async def age_leases(self, seconds):
        """What the database's clock moving on by `seconds` does to the leases."""
        await self.sql("UPDATE deliveries SET lease_expires_at = lease_expires_at"
                       " - make_interval(secs => %s)", seconds)

    async def answer_all(self, state="sent", reply="250 ok", **outcome):
        for message in self.pool.held:
            message.done.callback(Outcome(message.delivery_id, state, reply, **outcome))
        await self.queue.settle()

    async def test_stop_waits_for_running_deliveries_then_frees_leases(self):
        await self.submit("r0@example.net", "r1@example.net", "r2@example.net")
        await self.start()
        self.assertEqual(len(self.pool.held), 3)
        stopping = defer.ensureDeferred(self.runner.stop())
        await self.queue.settle()
        self.assertFalse(stopping.called)  # deliveries still running
        await self.answer_all()
        await stopping
        rows = await self.sql("SELECT state, lease_owner FROM deliveries")
        self.assertEqual(rows, [("sent", None)] * 3)
        self.assertFalse(self.runner.running)
        self.assertTrue(self.pool.closed)  # idle connections QUIT at once

    async def test_stop_gives_back_the_leases_of_held_deliveries(self):
        """Messages held in the pool (rate limits, slow connects) bound the stop: after
        STOP_DELIVERIES_SECONDS the deliveries whose text is not being sent yet go back
        to the queue, their attempt not counted, and are never sent by this node."""
        await self.submit("r0@example.net", "r1@example.net", "r2@example.net")
        await self.start()
        being_sent, *held = self.pool.held
        await being_sent.render()  # the server took its envelope
        stopping = defer.ensureDeferred(self.runner.stop())
        await self.queue.settle()
        self.assertFalse(stopping.called)
        self.clock.advance(STOP_DELIVERIES_SECONDS)
        await stopping
        self.assertTrue(self.pool.closed)
        self.assertEqual(self.pool.withdrawn, sorted(m.delivery_id for m in held))

        taken = await self.stores.queue.claim("node-b", 10, 300)
        self.assertEqual(sorted((d.recipient, d.attempts) for d in taken),
                         [("r1@example.net", 1), ("r2@example.net", 1)])
        for message in held:
            await self.assertFailure(defer.ensureDeferred(message.render()), LeaseReleased)
        # The one being sent kept its lease, and its result still counts.
        being_sent.done.callback(Outcome(being_sent.delivery_id, "sent", "250 ok"))
        await self.queue.settle()
        rows = await self.sql("SELECT state FROM deliveries WHERE id = %s",
                              being_sent.delivery_id)
        self.assertEqual(rows, [("sent",)])

    async def test_stop_goes_on_when_the_leases_cannot_be_released(self):
        """Whatever releasing fails with (a deadlock, say), the leases expire by themselves
        and the stop goes on: the Gateway still has to commit imports and close the pool."""
        await self.submit("r0@example.net")
        await self.start()
        await self.answer_all()

        async def release(*args):
            raise psycopg2.errors.DeadlockDetected("deadlock detected")

        self.patch(self.stores.queue, "release", release)
        await self.runner.stop()
        self.assertTrue(self.pool.closed)
        self.assertEqual(len(self.flushLoggedErrors(psycopg2.errors.DeadlockDetected)), 1)

    async def test_an_outcome_not_recorded_is_recorded_later_not_sent_again(self):
        """R-1, R-2: the server said 250, then PostgreSQL failed to take the outcome. The
        delivery stays this node's (lease renewed) and its outcome is written once the
        database is back; it is never claimed and sent a second time."""
        await self.submit("r0@example.net")
        self.runner = self.make_runner(lease_seconds=30)
        await self.start()
        self.fail_once("record", DatabaseUnavailable("record_outcomes"))
        await self.answer_all()
        for _ in range(4):  # twice the lease: renewed all along
            await self.age_leases(15)
            await self.advance(15)
        self.assertEqual(await self.stores.queue.claim("node-b", 10, 30), [])
        self.assertEqual(len(self.pool.held), 1)
        rows = await self.sql("SELECT state, lease_owner FROM deliveries")
        self.assertEqual(rows, [("sent", None)])

    async def test_an_outcome_that_lost_a_conflict_is_written_again(self):
        """A transaction that lost a deadlock or a serialization conflict may succeed if
        tried again: the outcome is written on the next try, not given up."""
        await self.submit("r0@example.net")
        await self.start()
        self.fail_once("record", TransientDatabaseError("record_outcomes: deadlock detected"))
        await self.answer_all()
        await self.advance(1)
        self.assertEqual(self.queue.count("record"), 2)
        self.assertEqual(await self.sql("SELECT state FROM deliveries"), [("sent",)])

    async def test_an_outcome_the_database_refuses_is_not_retried(self):
        """Retrying helps only while the database is out of reach or a transaction lost a
        conflict: an outcome refused for itself is logged and the delivery let go, not
        kept (its runner slot taken) forever."""
        await self.submit("r0@example.net")
        await self.start()
        self.fail_once("record", ValueError("A string literal cannot contain NUL"))
        await self.answer_all()
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        await self.advance(60)
        self.assertEqual((self.runner.in_flight, self.queue.count("record")), (0, 1))

    async def test_retries_end_with_the_stop(self):
        """Once stopped, an outcome the database cannot take is left to the lease, which
        runs out by itself: no retries go on in the background."""
        await self.submit("r0@example.net")
        await self.start()

        attempts = []

        async def record(*args):
            attempts.append(self.clock.seconds())
            raise DatabaseUnavailable("record_outcomes")

        self.patch(self.stores.queue, "record", record)
        (message,) = self.pool.held
        await message.render()  # its text was sent: the stop keeps its lease
        await self.answer_all()
        stopping = defer.ensureDeferred(self.runner.stop())
        await self.advance(STOP_DELIVERIES_SECONDS)
        await stopping
        await self.advance(MAX_RECORD_RETRY_SECONDS)  # the wait under way when it stopped
        stopped_after = len(attempts)
        await self.advance(10 * MAX_RECORD_RETRY_SECONDS)
        self.assertEqual(len(attempts), stopped_after)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_a_claim_never_restarts_a_delivery_still_running_here(self):
        """After an outage longer than a lease, this node's own running deliveries are
        claimable again: the claim may take them, the runner must not start them twice."""
        await self.submit("r0@example.net")
        self.runner = self.make_runner(lease_seconds=30)
        await self.start()
        await self.age_leases(31)  # the renewals could not reach the database
        await self.advance(self.runner.config.poll_interval)
        self.assertEqual(len(self.pool.held), 1)

    async def test_the_loop_survives_any_database_error(self):
        """A claim failing with something else than a lost connection (a read-only server
        after a failover) is logged; the next poll claims again."""
        await self.submit("r0@example.net")
        self.fail_once("claim", psycopg2.errors.ReadOnlySqlTransaction("read-only"))
        await self.start()
        self.assertEqual(self.pool.held, [])
        self.assertEqual(len(self.flushLoggedErrors(psycopg2.errors.ReadOnlySqlTransaction)),
                         1)
        await self.advance(self.runner.config.poll_interval)
        self.assertEqual(self.pool.recipients(), ["r0@example.net"])

    async def test_leases_renewed_while_held_and_expire_once_the_node_is_gone(self):
        await self.submit("r0@example.net", "r1@example.net", "r2@example.net")
        self.runner = self.make_runner(lease_seconds=30)  # renewed every 10 s
        await self.start()
        for _ in range(6):  # twice the lease, the messages still held by the pool
            await self.age_leases(10)
            await self.advance(10)
        self.assertEqual(await self.stores.queue.claim("node-b", 10, 30), [])
        self.assertEqual(len(self.pool.held), 3)  # not claimed again by this node either
        self.assertEqual(self.queue.count("renew"), 6)  # one statement for all, each time

        # The node dies: nothing renews its leases any more, and they run out.
        await self.age_leases(31)
        taken = await self.stores.queue.claim("node-b", 10, 30)
        self.assertEqual(len(taken), 3)

    async def test_a_failed_renewal_does_not_end_the_renewals(self):
        """A renewal that fails (a deadlock, a statement error) is logged and the next one
        comes on time: the loop that renews must never stop while deliveries run."""
        await self.submit("r0@example.net")
        self.runner = self.make_runner(lease_seconds=30)
        await self.start()
        self.fail_once("renew", psycopg2.errors.DeadlockDetected("deadlock detected"))
        await self.advance(10)
        self.assertEqual(len(self.flushLoggedErrors(psycopg2.errors.DeadlockDetected)), 1)
        await self.age_leases(25)
        await self.advance(10)
        rows = await self.sql("SELECT lease_expires_at > now() + interval '29 seconds'"
                              " FROM deliveries")
        self.assertEqual(rows, [(True,)])

    async def test_message_pushed_out_of_the_cache_by_its_batch_is_still_sent(self):
        """A batch larger than the cache: preparing its other messages must not make a
        message cached before the batch look deleted."""
        self.patch(runner_module, "PREPARED_CACHE_SIZE", 2)
        await self.submit("a@example.net")
        await self.submit("b@example.net")
        await self.submit("c1@example.net", "c2@example.net")
        await self.sql("UPDATE deliveries SET next_attempt_at = now() + interval '1 hour'"
                       " WHERE recipient <> 'c1@example.net'")
        self.runner = self.make_runner(batch_size=5)
        await self.start()  # the last message is prepared and cached
        self.assertEqual(self.pool.recipients(), ["c1@example.net"])
        await self.sql("UPDATE deliveries SET next_attempt_at = now()")
        await self.advance(self.runner.config.poll_interval)
        self.assertEqual(self.pool.recipients(), ["a@example.net", "b@example.net",
                                                  "c1@example.net", "c2@example.net"])
        self.assertEqual(await self.sql("SELECT state, count(*) FROM deliveries GROUP BY 1"),
                         [("queued", 4)])

    async def test_message_that_cannot_be_prepared_is_deferred_until_max_age(self):
        key = generate_dkim_key("ed25519")
        await self.stores.senders.add_domain(self.account_id, "example.org", "mg1", "ed25519",
                                             key.private_key_pem, key.public_key,
                                             "bounces.example.org")
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        broken = {**BODY, "attachments": [{"filename": "a.pdf", "content_type":
                                           "application/pdf", "data": "abc"}]}
        await self.submit("r0@example.net", "r1@example.net", "r2@example.net", body=broken)
        self.runner = self.make_runner(batch_size=5)
        await self.start()
        self.assertEqual(self.pool.held, [])
        rows = await self.sql("SELECT state, last_reply, next_attempt_at > now() + interval"
                              " '4 minutes' FROM deliveries")
        self.assertEqual(rows, [("deferred", "message could not be prepared: Incorrect padding",
                                 True)] * 3)
        self.assertEqual(len(self.flushLoggedErrors(binascii.Error)), 1)  # once, not each
        self.assertFalse([e for e in logged if "DKIM" in (e.get("log_format") or "")])

        # Retried on the normal schedule until the maximum age, counted from queueing.
        await self.sql("UPDATE deliveries SET next_attempt_at = now(),"
                       " created_at = now() - interval '5 days'")
        await self.advance(self.runner.config.poll_interval)
        rows = await self.sql("SELECT state, last_reply FROM deliveries")
        self.assertEqual(rows, [("bounced", "gave up after 2 attempts: message could not be "
                                 "prepared: Incorrect padding")] * 3)
        self.flushLoggedErrors(binascii.Error)

    async def test_null_mx_bounces_with_556_5_1_10(self):
        await self.submit("someone@nullmx.example")
        await self.start()
        self.assertEqual(self.pool.held, [])
        rows = await self.sql("SELECT state, last_reply FROM deliveries")
        self.assertEqual(rows, [("bounced", "556 5.1.10 domain nullmx.example accepts no mail"
                                 " (null MX)")])
        events = await self.sql("SELECT details->>'type' FROM events WHERE type = 'bounced'")
        self.assertEqual(events, [("hard",)])

    async def test_attempts_counted_by_outcome_with_their_duration(self):
        """O-5: mailgw_delivery_attempts_total{outcome} and the duration histogram, on
        the runner's clock (from the claim to the outcome)."""
        await self.submit("a@example.net", "b@example.net")
        await self.start()
        self.clock.advance(3)
        first, second = self.pool.held
        first.done.callback(Outcome(first.delivery_id, "sent", "250 ok"))
        second.done.callback(Outcome(second.delivery_id, "deferred", "451 later"))
        await self.queue.settle()
        registry = self.runner.metrics.registry
        for outcome, count in (("sent", 1), ("deferred", 1), ("bounced", None)):
            self.assertEqual(registry.get_sample_value("mailgw_delivery_attempts_total",
                                                       {"outcome": outcome}), count)
        self.assertEqual(registry.get_sample_value("mailgw_delivery_attempt_seconds_count"), 2)
        self.assertEqual(registry.get_sample_value("mailgw_delivery_attempt_seconds_sum"), 6)
        self.assertEqual(registry.get_sample_value("mailgw_delivery_attempt_seconds_bucket",
                                                   {"le": "2.5"}), 0)

    async def test_return_path_of_an_unregistered_sender_domain_is_the_gateways(self):
        """alice@gmail.com must not get b-N-...@gmail.com and unsubscribe@gmail.com:
        bounces and unsubscribes would never reach mailgw."""
        key = generate_dkim_key("ed25519")
        await self.stores.senders.add_domain(self.account_id, "example.org", "mg1", "ed25519",
                                             key.private_key_pem, key.public_key,
                                             "bounces.example.org")
        await self.submit("r0@example.net", sender="alice@gmail.com")
        await self.submit("r1@example.net", sender="news@example.org")
        await self.start()
        for message, bounce_domain in zip(self.pool.held,
                                          (GATEWAY_BOUNCES, "bounces.example.org"), strict=True):
            self.assertRegex(message.sender, rf"^b-\d+-[a-z0-9]+@{re.escape(bounce_domain)}$")
            rendered = email.message_from_bytes(await message.render(),
                                                policy=email.policy.default)
            self.assertIn(f"<mailto:unsubscribe@{bounce_domain}", rendered["List-Unsubscribe"])

    async def test_account_switches_and_message_language_reach_the_copy(self):
        """The account's tracking switches (T-5) and social links, and the message's
        language and social-links switch (S-9), as the runner reads them from the queue."""
        body = {**BODY, "html": '<p>x <a href="https://example.com/offer">offer</a></p>'}
        await self.sql("UPDATE accounts SET settings = %s WHERE id = %s", Json({
            "track_opens": False, "track_clicks": False,
            "social_links": {"facebook": "https://facebook.com/acme"}}), self.account_id)
        await self.submit("a@example.net", body=body,
                          options={"language": 4, "social_links": True})
        await self.start()
        (message,) = self.pool.held
        rendered = email.message_from_bytes(await message.render(), policy=email.policy.default)
        html = rendered.get_body(("html",)).get_content()
        self.assertNotIn("/t/o/", html)
        self.assertNotIn("/t/c/", html)
        self.assertIn('href="https://example.com/offer"', html)
        self.assertIn("View it in your browser", html)
        self.assertIn("Follow us", html)
        self.assertIn("https://facebook.com/acme", html)

    async def test_account_default_language_when_the_message_names_none(self):
        """S-9: `mailgw account set --language 6`; a message's own language still wins."""
        await self.sql("UPDATE accounts SET settings = %s WHERE id = %s",
                       Json({"language": 6}), self.account_id)
        await self.submit("a@example.net", options={"language": None})
        await self.submit("b@example.net", options={"language": 4})
        await self.start()
        texts = []
        for message in sorted(self.pool.held, key=lambda m: m.recipient):
            rendered = email.message_from_bytes(await message.render(),
                                                policy=email.policy.default)
            texts.append(rendered.get_body(("plain",)).get_content())
        self.assertTrue(texts[0].startswith("Vous ne voyez pas correctement cet e-mail"))
        self.assertTrue(texts[1].startswith("Can't see this email properly?"))

    async def test_recipient_suppressed_after_submission_is_not_sent(self):
        await self.submit("a@example.net")
        await self.sql("INSERT INTO suppressions (account_id, address, reason)"
                       " VALUES (%s, 'a@example.net', 'complaint')", self.account_id)
        await self.start()
        self.assertEqual(self.pool.held, [])
        rows = await self.sql("SELECT state, last_reply, lease_owner FROM deliveries")
        self.assertEqual(rows, [("not_sent", "complaint", None)])
        events = await self.sql("SELECT details FROM events WHERE type = 'not_sent'")
        self.assertEqual(events, [({"reason": "complaint"},)])

    async def test_hard_bounce_limit_comes_from_the_config(self):
        await self.submit("gone@example.net")
        self.runner = self.make_runner(hard_bounce_limit=1)
        await self.start()
        await self.answer_all("bounced", "550 5.1.1 no such user", bounce_type="hard")
        rows = await self.sql("SELECT hard_bounces, invalid FROM contacts")
        self.assertEqual(rows, [(1, True)])

    async def test_copies_of_an_archived_send_are_kept_as_sent(self):
        """H-2 eeid_eml: the copy sent (signed) is kept with its delivery when its send is
        archived, and only once it is sent; nothing is kept for other sends."""
        key = generate_dkim_key("ed25519")
        await self.stores.senders.add_domain(self.account_id, "example.org", "mg1", "ed25519",
                                             key.private_key_pem, key.public_key,
                                             "bounces.example.org")
        archived = await self.submit("a@example.net", "b@example.net")
        await self.sql("UPDATE sends SET archive = true WHERE id = %s", archived.send_id)
        await self.submit("c@example.net")
        await self.start()
        copies = {}
        for message in self.pool.held:
            copies[message.recipient] = await message.render()
        for message in self.pool.held:
            state = "deferred" if message.recipient == "b@example.net" else "sent"
            message.done.callback(Outcome(message.delivery_id, state, "250 ok"))
        await self.queue.settle()
        kept = dict(await self.sql("SELECT recipient, sent_eml FROM deliveries"))
        self.assertEqual(bytes(kept["a@example.net"]), copies["a@example.net"])
        self.assertTrue(copies["a@example.net"].startswith(b"DKIM-Signature: "))
        self.assertEqual((kept["b@example.net"], kept["c@example.net"]), (None, None))

    async def test_tags_take_contact_fields_campos_then_global_variables(self):
        """H-2: XYZ<NAME>XYZ takes the contact's own field first, then its campo (stored
        as DMDS writes it, XYZDNIXYZ), then the account's global variable."""
        body = {**BODY, "html": "<p>XYZNOMBREXYZ XYZDNIXYZ XYZEMPRESAXYZ XYZotroXYZ</p>"}
        await self.submit("a@example.net", body=body)
        await self.sql("UPDATE contacts SET fields = %s", Json({
            "nombre": "Ana", "campos": {"XYZDNIXYZ": "21232421", "XYZNOMBREXYZ": "campo"}}))
        await self.sql("INSERT INTO global_variables (account_id, name, value) VALUES"
                       " (%s, 'XYZEMPRESAXYZ', 'Planisys'), (%s, 'DNI', 'global')",
                       self.account_id, self.account_id)
        await self.start()
        (message,) = self.pool.held
        rendered = email.message_from_bytes(await message.render(), policy=email.policy.default)
        self.assertIn("<p>Ana 21232421 Planisys XYZotroXYZ</p>",
                      rendered.get_body(("html",)).get_content())

    async def test_dkim_key_operation_runs_in_a_thread(self):
        key = generate_dkim_key("rsa")
        await self.stores.senders.add_domain(self.account_id, "example.org", "mg1", "rsa",
                                             key.private_key_pem, key.public_key,
                                             "bounces.example.org")
        await self.submit("r0@example.net", "r1@example.net", "r2@example.net")
        record = f"v=DKIM1; k=rsa; p={key.public_key}".encode()
        await self.start()
        self.assertEqual(len(self.pool.held), 3)
        for message in self.pool.held:
            data = await message.render()
            self.assertTrue(data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;"))
            self.assertTrue(dkim.verify(data,
                                        dnsfunc=lambda name, timeout=5: record))
        await self.answer_all()
        self.assertEqual([name for name, _ in self.threads], ["key_signature"] * 3)
        self.assertNotIn(threading.get_ident(), {thread for _, thread in self.threads})


class RetryPolicyTests(unittest.TestCase):
    def runner(self, **config):
        return QueueRunner(None, None, None, None, reactor, DeliveryConfig(**config), "gw",
                           "gw", "n", _inline)

    def policy(self, attempts, age, **config):
        delivery = ClaimedDelivery(1, 1, 1, 1, None, "a@example.net", attempts, age, {}, None)
        return self.runner(**config)._retry_policy(delivery,
                                                   Outcome(1, "deferred", "451 later"))

    def test_intervals_double(self):
        self.assertEqual([self.policy(n, 0).retry_in for n in (1, 2, 3)], [300, 600, 1200])
        self.assertEqual(self.policy(20, 0).retry_in, MAX_RETRY_INTERVAL)

    def test_bounced_after_max_age(self):
        outcome = self.policy(30, 5 * 24 * 3600 - 60)
        self.assertEqual((outcome.state, outcome.bounce_type), ("bounced", "soft"))
        self.assertIn("451 later", outcome.reply)

    def test_other_outcomes_untouched(self):
        delivery = ClaimedDelivery(1, 1, 1, 1, None, "a@example.net", 1, 0, {}, None)
        sent = Outcome(1, "sent", "250 ok")
        self.assertIs(self.runner()._retry_policy(delivery, sent), sent)


class PreparedCacheTests(unittest.TestCase):
    def test_one_dkim_signer_per_key(self):
        """Parsing an RSA key costs ~40 ms: messages of one domain must share its signer."""
        key = generate_dkim_key("rsa")
        runner = QueueRunner(None, None, None, LinkSigner(b"k" * 32, "http://x"), reactor,
                             DeliveryConfig(), "gw", "gw", "n", _inline)
        for message_id in (1, 2):
            runner._prepare(MessageContext(message_id, 1, "news@example.org", None, BODY, {},
                                           AccountSettings(), None,
                                           "example.org", "s1", "rsa", key.private_key_pem,
                                           "bounces.example.org"))
        self.assertEqual(len(runner._dkim_signers), 1)
        self.assertEqual(len(runner._prepared), 2)
