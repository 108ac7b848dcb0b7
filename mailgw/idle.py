"""Waiting for something to become idle: a graceful stop waits for the group commit
to write what it was given, for the queue runner's deliveries to finish and for the
outbound pool's connections to close."""

from __future__ import annotations

from twisted.internet import defer


class IdleWaiters:
    def __init__(self) -> None:
        self._waiting: list[defer.Deferred[None]] = []

    def wait(self, idle: bool) -> defer.Deferred[None]:
        """Fires at once when `idle`, else at the next `fire()`."""
        if idle:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        return d

    def fire(self) -> None:
        """It has become idle: every waiter so far fires."""
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
