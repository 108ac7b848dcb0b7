"""KeyThreads: DKIM key operations in threads of their own, results in the reactor thread."""

import threading

from twisted.internet import reactor
from twisted.trial import unittest

from mailgw.delivery.key_threads import KeyThreads


class KeyThreadsTests(unittest.TestCase):
    def setUp(self):
        self.threads = KeyThreads(reactor, count=2)
        self.threads.start()
        self.running = list(self.threads._threads)
        self.addCleanup(self.threads.stop)

    async def test_result_computed_elsewhere_delivered_in_the_reactor_thread(self):
        reactor_thread = threading.get_ident()
        delivered = []

        def work(a, b):
            return threading.get_ident(), a + b

        d = self.threads.run(work, 2, 3)
        d.addCallback(lambda result: delivered.append(threading.get_ident()) or result)
        worker, total = await d
        self.assertEqual(total, 5)
        self.assertNotEqual(worker, reactor_thread)
        self.assertEqual(delivered, [reactor_thread])

    async def test_exception_is_the_errback(self):
        def broken():
            raise ValueError("bad key")

        with self.assertRaises(ValueError):
            await self.threads.run(broken)

    async def test_many_jobs_each_answered(self):
        results = [self.threads.run(pow, 2, n) for n in range(200)]
        self.assertEqual([await d for d in results], [2 ** n for n in range(200)])

    def test_stop_ends_the_threads(self):
        self.threads.stop()
        for thread in self.running:
            thread.join(5)
            self.assertFalse(thread.is_alive())
        self.assertRaises(RuntimeError, self.threads.run, pow, 2, 2)
