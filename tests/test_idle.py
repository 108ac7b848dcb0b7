"""IdleWaiters: what a graceful stop waits on."""

from twisted.trial import unittest

from mailgw.idle import IdleWaiters


class IdleWaitersTests(unittest.TestCase):
    def test_already_idle_fires_at_once(self):
        self.assertIsNone(self.successResultOf(IdleWaiters().wait(True)))

    def test_waiters_fire_when_it_becomes_idle_and_only_then(self):
        waiters = IdleWaiters()
        first, second = waiters.wait(False), waiters.wait(False)
        self.assertNoResult(first)
        waiters.fire()
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))
        later = waiters.wait(False)  # a new wait is for the next time
        self.assertNoResult(later)
        waiters.fire()
        self.successResultOf(later)
