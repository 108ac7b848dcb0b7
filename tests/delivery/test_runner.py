"""The queue runner with a real queue and stand-ins for DNS and the outbound pool."""

import threading
import uuid

import dkim
from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from mailgw.config import DeliveryConfig
from mailgw.content.dkim import generate_dkim_key
from mailgw.content.render import LinkSigner
from mailgw.delivery.mx import MailServer
from mailgw.delivery.runner import MAX_RETRY_INTERVAL, QueueRunner
from mailgw.store.queue import ClaimedDelivery, Outcome
from mailgw.store.submissions import QueuedRecipient, SubmissionRecord
from tests.harness import DatabaseTestCase


class StubResolver:
    async def mail_servers(self, domain):
        return [MailServer("mx." + domain, 25, 10)]

    async def addresses(self, host):
        return ["127.0.0.1"]


class HeldPool:
    """Holds every message until the test answers it."""

    def __init__(self):
        self.held = []
        self.closed = False

    def deliver(self, domain, servers, message):
        self.held.append(message)
        return message.done

    def close_idle(self):
        self.closed = True
        return defer.succeed(None)


async def _sql_txn(cursor, sql):
    await cursor.execute(sql)
    return cursor.fetchall()


def _inline(fn, *args):
    return defer.maybeDeferred(fn, *args)


class RunnerTests(DatabaseTestCase):
    async def setUp(self):
        await super().setUp()
        account = await self.stores.accounts.create_account("acme")
        self.account_id = account.id
        await self.stores.submissions.store(SubmissionRecord(
            account_id=account.id, origin="api", message_uid=uuid.uuid4().hex,
            sender="news@example.org", subject="s", html="<p>x</p>",
            body={"subject": "s", "html": "<p>x</p>", "text": "x"},
            recipients=tuple(QueuedRecipient(f"r{i}@example.net", None) for i in range(3))))
        self.pool = HeldPool()
        self.runner = QueueRunner(
            self.stores.queue, StubResolver(), self.pool,
            LinkSigner(b"k" * 32, "http://localhost:8080"), reactor,
            DeliveryConfig(batch_size=2, poll_interval=0.01), "gw.example.org", "node-a",
            self.run_in_thread)
        self.threads = []

    def run_in_thread(self, fn, *args):
        """deferToThread, noting the function and the thread it ran in."""
        def noted():
            self.threads.append((fn.__name__, threading.get_ident()))
            return fn(*args)
        return threads.deferToThread(noted)

    async def wait_for_held(self, count):
        while len(self.pool.held) < count:
            await task.deferLater(reactor, 0.01, lambda: None)

    async def test_stop_waits_for_running_deliveries_then_frees_leases(self):
        self.runner.start()
        await self.wait_for_held(3)
        stopping = defer.ensureDeferred(self.runner.stop())
        await task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(stopping.called)  # deliveries still running
        for message in self.pool.held:
            message.done.callback(Outcome(message.delivery_id, "sent", "250 ok"))
        await stopping
        rows = await self.database.run_interaction(
            "rows", _sql_txn, "SELECT state, lease_owner FROM deliveries")
        self.assertEqual(rows, [("sent", None)] * 3)
        self.assertFalse(self.runner.running)
        self.assertTrue(self.pool.closed)  # idle connections QUIT at once

    async def test_dkim_key_operation_runs_in_a_thread(self):
        key = generate_dkim_key("rsa")
        await self.stores.senders.add_domain(self.account_id, "example.org", "mg1", "rsa",
                                             key.private_key_pem, key.public_key,
                                             "bounces.example.org")
        record = f"v=DKIM1; k=rsa; p={key.public_key}".encode()
        self.runner.start()
        self.addCleanup(self.runner.stop)
        await self.wait_for_held(3)
        for message in self.pool.held:
            data = await message.render()
            self.assertTrue(data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;"))
            self.assertTrue(dkim.verify(data,
                                        dnsfunc=lambda name, timeout=5: record))
            message.done.callback(Outcome(message.delivery_id, "sent", "250 ok"))
        self.assertEqual([name for name, _ in self.threads], ["key_signature"] * 3)
        self.assertNotIn(threading.get_ident(), {thread for _, thread in self.threads})


class RetryPolicyTests(unittest.TestCase):
    def policy(self, attempts, age, **config):
        runner = QueueRunner(None, None, None, None, reactor, DeliveryConfig(**config), "gw",
                             "n", _inline)
        delivery = ClaimedDelivery(1, 1, 1, 1, None, "a@example.net", attempts, age, {}, None)
        return runner._retry_policy(delivery, Outcome(1, "deferred", "451 later"))

    def test_intervals_double(self):
        self.assertEqual([self.policy(n, 0).retry_in for n in (1, 2, 3)], [300, 600, 1200])
        self.assertEqual(self.policy(20, 0).retry_in, MAX_RETRY_INTERVAL)

    def test_bounced_after_max_age(self):
        outcome = self.policy(30, 5 * 24 * 3600 - 60)
        self.assertEqual((outcome.state, outcome.bounce_type), ("bounced", "soft"))
        self.assertIn("451 later", outcome.reply)

    def test_other_outcomes_untouched(self):
        runner = QueueRunner(None, None, None, None, reactor, DeliveryConfig(), "gw", "n",
                             _inline)
        delivery = ClaimedDelivery(1, 1, 1, 1, None, "a@example.net", 1, 0, {}, None)
        sent = Outcome(1, "sent", "250 ok")
        self.assertIs(runner._retry_policy(delivery, sent), sent)


class PreparedCacheTests(unittest.TestCase):
    def test_one_dkim_signer_per_key(self):
        """Parsing an RSA key costs ~40 ms: messages of one domain must share its signer."""
        from mailgw.content.dkim import generate_dkim_key
        from mailgw.store.queue import MessageContext

        key = generate_dkim_key("rsa")
        runner = QueueRunner(None, None, None, LinkSigner(b"k" * 32, "http://x"), reactor,
                             DeliveryConfig(), "gw", "n", _inline)
        for message_id in (1, 2):
            context = MessageContext(message_id, 1, "news@example.org", None,
                                     {"subject": "s", "html": "<p>x</p>", "text": "x"}, {}, {},
                                     "example.org", "s1", "rsa", key.private_key_pem,
                                     "bounces.example.org")
            runner._prepare(message_id, context)
        self.assertEqual(len(runner._dkim_signers), 1)
        self.assertEqual(len(runner._prepared), 2)
