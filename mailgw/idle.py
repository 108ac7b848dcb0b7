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


class Nap:
    """A loop's pause (the queue runner's, the webhook dispatcher's): until some seconds
    pass, or until `wake()` (work has come, or a stop). A wake while the loop is not
    pausing (in the middle of a claim, say) is kept for its next pause, which then
    ends at once: the work that came meanwhile is not left waiting a whole interval."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self._wakeup: defer.Deferred[None] | None = None
        self._woken = False

    @property
    def napping(self) -> bool:
        return self._wakeup is not None

    def wake(self) -> None:
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is None:
            self._woken = True
        else:
            wakeup.callback(None)

    async def take(self, seconds: float | None) -> None:
        """Wait until `seconds` pass (None: until woken) or `wake()` is called."""
        if self._woken:
            self._woken = False
            return
        self._wakeup = wakeup = defer.Deferred()
        if seconds is not None:
            call = self.clock.callLater(seconds, self.wake)
            wakeup.addBoth(lambda r: call.cancel() if call.active() else None)
        await wakeup
