"""SMTP authentication (S-3, R-6): the SASL exchanges and the failure throttle.

The exchanges turn AUTH LOGIN and PLAIN into twisted.cred credentials, which
the portal checks with the account checkers (mailgw.accounts).  `AuthThrottle`
slows down and then refuses clients that keep guessing.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import math
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from twisted.cred import credentials
from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from mailgw.errors import DatabaseUnavailable
from mailgw.store.auth_failures import AuthFailureStore

T = TypeVar("T")


class LoginExchange:
    """AUTH LOGIN: the username and the password asked for in turn (Teenvio's prompts)."""

    PROMPTS = (b"Username:", b"Password:")

    def __init__(self, initial: bytes | None) -> None:
        self.answers: list[bytes] = [] if initial is None else [initial]

    def next_prompt(self) -> bytes | None:
        return self.PROMPTS[len(self.answers)] if len(self.answers) < 2 else None

    def answer(self, decoded: bytes) -> None:
        self.answers.append(decoded)

    def credentials(self) -> credentials.UsernamePassword:
        return credentials.UsernamePassword(self.answers[0], self.answers[1])


class PlainExchange:
    """AUTH PLAIN: one response, `authzid NUL authcid NUL password` (RFC 4616)."""

    def __init__(self, initial: bytes | None) -> None:
        self.response = initial

    def next_prompt(self) -> bytes | None:
        return b"" if self.response is None else None

    def answer(self, decoded: bytes) -> None:
        self.response = decoded

    def credentials(self) -> credentials.UsernamePassword:
        parts = (self.response or b"").split(b"\0")
        if len(parts) != 3:
            raise ValueError("PLAIN response needs three NUL-separated parts")
        return credentials.UsernamePassword(parts[1], parts[2])


MECHANISMS = {b"LOGIN": LoginExchange, b"PLAIN": PlainExchange}


def decode_response(line: bytes) -> bytes | None:
    """A base64 SASL response; `=` is the empty response (RFC 4954); None if not base64."""
    if line == b"=":
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        return None


# How often a node reads the counts the other nodes changed (at most; only when an AUTH
# comes), and how far back each read goes past the previous one: a failure committed a
# little after its time, and nodes' clocks a little apart, are still read.
SHARED_REFRESH_SECONDS = 5.0
SHARED_REFRESH_OVERLAP = 10.0


class AuthThrottle:
    """Failed AUTH attempts per client address, per username, and per username at
    each address (S-3, R-6).

    A few failures are free; after that each failure's reply waits longer
    (1, 2, 4 ... seconds, at most `max_delay`), by the largest of its three
    counts.  A client address is cut off (421) after `max_ip_failures` (high:
    one address may serve many users behind NAT).  A username is refused (454)
    at an address that failed `max_user_failures` times for it, or
    `free_attempts` times once the username has `max_user_failures` failures
    from all addresses together: an address without recent failures for a
    username is never refused it, so guessing cannot lock the owner out.
    A count is forgotten `forget_after` seconds after its last failure.

    With a `shared` store, every node counts together: failures are written
    there, and the other nodes' are read at most every SHARED_REFRESH_SECONDS
    (the counts here are that cache).  While the database fails, the counts
    here go on alone.
    """

    log = Logger()

    def __init__(self, clock, free_attempts: int = 3, max_user_failures: int = 10,
                 max_ip_failures: int = 30, max_delay: float = 30.0,
                 forget_after: float = 900.0, max_entries: int = 100_000,
                 shared: AuthFailureStore | None = None) -> None:
        self.clock = clock
        self.free_attempts = free_attempts
        self.max_user_failures = max_user_failures
        self.max_ip_failures = max_ip_failures
        self.max_delay = max_delay
        self.forget_after = forget_after
        self.max_entries = max_entries
        self.shared = shared
        # (count, time of the last failure) by key, least recently changed first.
        self._failures: OrderedDict[bytes, tuple[int, float]] = OrderedDict()
        # Attempts being checked, per client address.
        self._checking: Counter[str] = Counter()
        self._refresh_lock = defer.DeferredLock()
        self._next_refresh = -math.inf
        self._last_refresh = -math.inf

    def _count(self, key: bytes) -> int:
        entry = self._failures.get(key)
        if entry is None:
            return 0
        count, last = entry
        if self.clock.seconds() - last > self.forget_after:
            del self._failures[key]
            return 0
        return count

    def _set(self, key: bytes, count: int, last: float) -> None:
        """A count as of `last`, unless the one here is more recent (counted here while
        the database failed)."""
        entry = self._failures.get(key)
        if entry is None or last >= entry[1]:
            self._failures[key] = (count, last)
            self._failures.move_to_end(key)

    def _evict(self) -> None:
        while len(self._failures) > self.max_entries:
            self._failures.popitem(last=False)

    def user_failures(self, username: str) -> int:
        """The username's recent failures, from every address."""
        return self._count(_user_key(username))

    def ip_blocked(self, ip: str) -> bool:
        return self._count(_address_key(ip)) + self._checking[ip] >= self.max_ip_failures

    def user_blocked(self, ip: str, username: str) -> bool:
        at_address = self._count(_user_at_key(ip, username))
        return at_address >= self.max_user_failures or (
            at_address >= self.free_attempts
            and self.user_failures(username) >= self.max_user_failures)

    @contextlib.contextmanager
    def checking(self, ip: str) -> Iterator[None]:
        """An attempt being checked counts against its address until it is answered:
        attempts sent all at once cannot pass the cap before their failures count."""
        self._checking[ip] += 1
        try:
            yield
        finally:
            self._checking[ip] -= 1
            if not self._checking[ip]:
                del self._checking[ip]

    async def refresh(self) -> None:
        """The other nodes' failures, read if the last read is SHARED_REFRESH_SECONDS
        old; AUTHs meanwhile use the counts here, and wait for no query."""
        if self.shared is not None and self.clock.seconds() >= self._next_refresh:
            await self._refresh_lock.run(self._refresh_if_due)

    async def _refresh_if_due(self) -> None:
        now = self.clock.seconds()
        if now < self._next_refresh:
            return  # read by the AUTH that held the lock before
        self._next_refresh = now + SHARED_REFRESH_SECONDS
        since = max(self._last_refresh - SHARED_REFRESH_OVERLAP, now - self.forget_after)
        counts = await self._shared("read", self.shared.changed_since, since,
                                    self.max_entries)
        if counts is None:
            return
        self._last_refresh = now
        for key, count, last in reversed(counts):  # the oldest first: LRU order
            self._set(key, count, last)
        self._evict()

    async def record_failure(self, ip: str, username: str) -> float:
        """Count a failure; returns how long to wait before answering it."""
        keys = (_address_key(ip), _user_key(username), _user_at_key(ip, username))
        now = self.clock.seconds()
        counts = None
        if self.shared is not None:
            counts = await self._shared("write", self.shared.record, keys, now,
                                        self.forget_after)
        if counts is None:
            counts = [(key, self._count(key) + 1, now) for key in keys]
        for key, count, last in counts:
            self._set(key, count, last)
        self._evict()
        worst = max(count for _, count, _ in counts)
        if worst <= self.free_attempts:
            return 0.0
        return min(2.0 ** (worst - self.free_attempts - 1), self.max_delay)

    async def record_success(self, ip: str, username: str) -> None:
        """Clears the username's count at this address only.  Not the address's count,
        or an attacker's own login would reset the count of its guesses for others;
        not the username's total either, which holds back guessing from many addresses
        and never refuses an address without failures for the username."""
        key = _user_at_key(ip, username)
        if self._count(key) and self.shared is not None:
            await self._shared("reset", self.shared.reset, key, self.clock.seconds())
        self._failures.pop(key, None)

    async def _shared(self, what: str, call: Callable[..., Awaitable[T]], *args: Any
                      ) -> T | None:
        """`call(*args)` on the shared store, or None if the database failed."""
        try:
            return await call(*args)
        except DatabaseUnavailable:
            return None  # logged by the database
        except Exception:
            self.log.failure("AUTH failure counts: {what} failed; counting on this node",
                             Failure(), LogLevel.warn, what=what)
            return None


def _address_key(ip: str) -> bytes:
    return _key("ip", ip)


def _user_key(username: str) -> bytes:
    return _key("user", username.lower())


def _user_at_key(ip: str, username: str) -> bytes:
    return _key("user@ip", ip, username.lower())


def _key(*parts: str) -> bytes:
    """16 bytes for a counted key: the username last (it may hold anything), never
    kept as it was typed (often a password in the wrong box)."""
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=16).digest()
