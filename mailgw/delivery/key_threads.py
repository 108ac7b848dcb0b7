"""Threads of their own for DKIM key operations.

An RSA-2048 signature takes about 1 ms of OpenSSL, which releases the GIL; the
reactor thread must not spend it. Twisted's thread pool runs a few dozen lines
of Python per job (its team coordinator, context and logging wrappers), and
the reactor thread, each time it releases the GIL for a system call, can find
a pool thread holding it for those lines: the delivery benchmark showed the
reactor waiting in socket reads about a tenth of its time. Here a job costs a
C queue's get and one `callFromThread`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

T = TypeVar("T")

_STOP = None


class KeyThreads:
    def __init__(self, reactor, count: int = 2) -> None:
        self.reactor = reactor
        self.count = count
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for number in range(self.count):
            thread = threading.Thread(target=self._work, name=f"mailgw-dkim-{number}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """The threads end after the jobs already queued (the queue runner, stopped
        before, queues no more)."""
        for _ in self._threads:
            self._jobs.put(_STOP)
        self._threads = []

    def run(self, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """`fn(*args)` in one of the threads; fires in the reactor thread."""
        if not self._threads:
            raise RuntimeError("KeyThreads is not running")
        d: defer.Deferred[T] = defer.Deferred()
        self._jobs.put((fn, args, d))
        return d

    def _work(self) -> None:
        get, call = self._jobs.get, self.reactor.callFromThread
        while (job := get()) is not _STOP:
            fn, args, d = job
            try:
                result = fn(*args)
            except BaseException:
                call(d.errback, Failure())
            else:
                call(d.callback, result)
