"""The one txpostgres pool of the process and `run_interaction`.

Every database interaction in mailgw is an `async def *_txn(cursor, ...)`
function run through `Database.run_interaction(desc, fn, ...)`, inside one
transaction on a pooled connection.  A lost session becomes
`DatabaseUnavailable` (SMTP 451, HTTP 503), and the pool reconnects by
itself when PostgreSQL comes back (R-2); a statement refused on a live
session fails only its transaction: with `TransientDatabaseError` when trying
again may succeed (a deadlock, a serialization failure, a lock timeout), with
psycopg2's own error otherwise.  Callers above the store see mailgw's errors,
never psycopg2's classes, to decide what to retry.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import psycopg2
from psycopg2 import errors as pg_errors
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import reconnection, retrying, txpostgres

from mailgw.errors import DatabaseUnavailable, StartupError, TransientDatabaseError
from mailgw.metrics import Metrics
from mailgw.text import one_line

T = TypeVar("T")
Interaction = Callable[..., Awaitable[T]]

CONNECTION_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError,
                     reconnection.ConnectionDead, txpostgres.RollbackFailed)
# SQLSTATEs of a session that is gone: connection exceptions (class 08) and the server
# shutting down or restarting (57P01-57P03).
_SESSION_GONE = ("08", "57P01", "57P02", "57P03")
# Errors of a transaction that may succeed if tried again: class 40 (a deadlock, a
# serialization failure) and 55P03 (a lock timeout).
_TRANSIENT_ERRORS = (pg_errors.TransactionRollbackError, pg_errors.LockNotAvailable)


def is_connection_loss(error: BaseException) -> bool:
    """The session lost (the server gone or restarting, the network), as opposed to a
    statement PostgreSQL refused on a live one: a deadlock, a timeout or a full disk are
    OperationalErrors too, but they fail one transaction, not the database."""
    if isinstance(error, psycopg2.OperationalError):
        return error.pgcode is None or error.pgcode.startswith(_SESSION_GONE)
    return isinstance(error, CONNECTION_ERRORS)


# TCP keepalives unless the DSN sets its own: a database host that vanishes without a
# reset (a crashed VM, a dropped route) is noticed within about a minute, instead of
# after the system's TCP timeout (minutes, or hours for an idle connection).
_KEEPALIVES = {"keepalives": "1", "keepalives_idle": "30", "keepalives_interval": "10",
               "keepalives_count": "3"}


def with_keepalives(dsn: str) -> str:
    """A DSN that names a service (pg_service.conf may set keepalives) or that libpq
    cannot read is left as it is: connecting reports the latter as a startup error."""
    try:
        given = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return dsn
    if "service" in given:
        return dsn
    return psycopg2.extensions.make_dsn(
        dsn, **{key: value for key, value in _KEEPALIVES.items() if key not in given})


def _reconnect_delays():
    """Quick first retry, then at most 2 s apart, forever."""
    return retrying.simpleBackoffIterator(initialDelay=0.2, maxDelay=2.0, factor=2.0,
                                          maxRetries=0, now=True)


class Database:
    """A started pool plus the helper every store goes through."""

    log = Logger()

    def __init__(self, dsn: str, pool_size: int, reactor, metrics: Metrics | None = None
                 ) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self.reactor = reactor
        self._pool = _ReconnectingPool(reactor, with_keepalives(dsn), min=pool_size)
        # Counted here and by the stores' group committer (O-5).
        self.metrics = metrics or Metrics()
        self.metrics.database_connections.set(pool_size)
        self.metrics.database_connections_in_use.set_function(
            lambda: len(self._pool.every_connection) - len(self._pool.connections))
        self.metrics.database_available.set_function(lambda: float(self.available))
        # A lost session after a working one starts an outage; the next success ends it.
        self._reachable = True

    async def start(self) -> None:
        try:
            await self._pool.start()
        except defer.FirstError as e:
            self._pool.close()
            reason = _describe(e.subFailure.value)
            raise StartupError(f"cannot connect to the database ({reason})") from None

    def close(self) -> None:
        self._pool.close()

    @property
    def available(self) -> bool:
        """False while every connection of the pool is known to be lost (PostgreSQL
        restarting): work that would only queue up can be refused at once."""
        return not all(c.detector.connectionIsDead for c in self._pool.every_connection)

    async def run_interaction(self, desc: str, fn: Interaction[T], *args: Any,
                              **kwargs: Any) -> T:
        """Run `fn(cursor, *args, **kwargs)` in one transaction; `desc` names it in logs."""
        try:
            result = await self._pool.runInteraction(
                lambda cursor: defer.ensureDeferred(fn(cursor, *args, **kwargs)))
        except _TRANSIENT_ERRORS as e:
            raise TransientDatabaseError(f"{desc}: {_describe(e)}") from e
        except CONNECTION_ERRORS as e:
            if not is_connection_loss(e):
                raise
            self.log.warn("database unavailable during {desc}: {error}", desc=desc,
                          error=_describe(e))
            if self._reachable:
                self._reachable = False
                self.metrics.database_outages.inc()
            self._pool.reconnect_idle(Failure(e))
            raise DatabaseUnavailable(desc) from e
        self._reachable = True
        return result

    async def is_reachable(self) -> bool:
        try:
            await self.run_interaction("health_check", _select_one_txn)
        except DatabaseUnavailable:
            return False
        return True


# Advisory lock namespaces: checks of an account's caps (S-15) that must see every
# concurrent writer's rows take the account's lock for the rest of their transaction.
SEND_QUOTA_LOCK, CONTACT_LIMIT_LOCK = 1, 2


async def lock_account(cursor, namespace: int, account_id: int) -> None:
    """Wait for, then hold until commit, the account's lock in `namespace`."""
    await cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", (namespace, account_id))


# `%(name)s::type`: a parameter of a prepared statement, with the type it is declared as.
_TYPED_PARAMETER = re.compile(r"%\((\w+)\)s::(\w+(?:\[\])?)")


class PreparedStatement:
    """A hot statement that PostgreSQL parses and plans once per connection.

    The batch statements of the hot paths (RCPT imports, submissions, the delivery
    queue) are long CTEs whose planning costs PostgreSQL about as much as running
    them for a small batch; PREPARE on a connection's first use, then EXECUTE.
    The SQL names its parameters as `%(name)s::type` (every one with its type);
    `execute` takes them as a mapping, as cursor.execute would.
    """

    # Statements prepared so far, per psycopg2 connection (a reconnection is a new
    # connection, whose statements are prepared again). PREPARE is not undone by a
    # rollback, so a statement stays prepared for the connection's lifetime.
    _prepared: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()

    def __init__(self, name: str, sql: str) -> None:
        self.name = name
        positions: dict[str, int] = {}
        types: list[str] = []

        def number(match: re.Match[str]) -> str:
            parameter, type_ = match.groups()
            if parameter not in positions:
                positions[parameter] = len(types) + 1
                types.append(type_)
            return f"${positions[parameter]}"

        body = _TYPED_PARAMETER.sub(number, sql)
        if "%(" in body:
            raise ValueError(f"{name}: every parameter needs a ::type")
        self._prepare = f"PREPARE {name} ({', '.join(types)}) AS {body}"
        arguments = ", ".join(f"%({p})s::{types[n - 1]}" for p, n in positions.items())
        self._execute = f"EXECUTE {name} ({arguments})"

    async def execute(self, cursor, parameters: Mapping[str, Any]) -> None:
        prepared = self._prepared.setdefault(cursor.connection, set())
        if self.name not in prepared:
            await cursor.execute(self._prepare)
            prepared.add(self.name)
        await cursor.execute(self._execute, parameters)


async def _select_one_txn(cursor) -> None:
    await cursor.execute("SELECT 1")


def _describe(error: Exception) -> str:
    """An error on one line, for logs and StartupError."""
    if isinstance(error, txpostgres.RollbackFailed):
        return f"{_describe(error.originalFailure.value)} (no rollback possible)"
    return one_line(str(error)) or type(error).__name__


class _ReconnectingPool(txpostgres.ConnectionPool):
    """A txpostgres pool whose connections reconnect when PostgreSQL returns."""

    def __init__(self, reactor, *connargs, **connkw) -> None:
        self.reactor = reactor
        super().__init__(None, *connargs, **connkw)
        # `connections` holds only the idle ones; closing must reach busy ones too.
        self.every_connection = frozenset(self.connections)

    def connectionFactory(self, reactor, cooperator):
        detector = _Detector(deathChecker=lambda failure: is_connection_loss(failure.value),
                             reconnectionIterator=_reconnect_delays, reactor=reactor)
        return _Connection(reactor, cooperator, detector=detector)

    def close(self) -> None:
        for connection in self.every_connection:
            connection.detector.stop()
            connection.close()

    def _runInteraction(self, interaction, *args, **kwargs):
        """Like txpostgres', but on a connection that is not known to be dead: after a
        restart the first connection back serves everyone while the others reconnect."""
        alive = [c for c in self.connections if not c.detector.connectionIsDead]
        connection = alive[0] if alive else next(iter(self.connections))
        self.connections.remove(connection)
        d = connection.runInteraction(interaction, *args, **kwargs)
        return d.addBoth(self._putBackAndPassthrough, connection)

    def reconnect_idle(self, failure: Failure) -> None:
        """One dead connection means a restart: renew the idle ones too, now."""
        for connection in list(self.connections):
            connection.detector.checkForDeadConnection(failure)


class _Detector(reconnection.DeadConnectionDetector):
    """txpostgres' detector, with reconnection attempts that a closing pool can stop."""

    _retrying: defer.Deferred | None = None
    _stopped = False

    def startReconnecting(self, f: Failure) -> None:
        if self._stopped:  # the pool is closed: a failure now is no reason to reconnect
            return
        call = retrying.RetryingCall(self.reconnect)
        call.reactor = self.reactor
        self._retrying = call.start(self.reconnectionIterator())
        self._retrying.addCallbacks(lambda _: self.connectionRecovered(), self._not_recovered)

    def _not_recovered(self, failure: Failure) -> None:
        """Retrying goes on until stopped: cancelled while waiting for the next attempt,
        or, stopped during an attempt, failed with that attempt when close() ends it."""
        if not self._stopped:
            failure.trap(defer.CancelledError)

    def stop(self) -> None:
        self._stopped = True
        if self._retrying is not None and not self._retrying.called:
            # During a connection attempt the canceller raises: psycopg2 cannot cancel it
            # ("asynchronous connection attempt underway"), or it has just succeeded and
            # txpostgres' canceller refuses.  Closing the connection, next, ends it.
            with contextlib.suppress(psycopg2.Error, txpostgres._CancelInProgress):
                self._retrying.cancel()


class _Connection(txpostgres.Connection):
    log = Logger()

    def _runInteraction(self, interaction, *args, **kwargs):
        """txpostgres' transaction (begin, the interaction, commit; rollback on failure),
        but a rollback that cannot run is part of losing the connection, not an error
        to log: txpostgres hands it to `log.err`, which an operator reads as a bug and
        trial as a test error.  The caller still gets txpostgres' RollbackFailed, a
        connection error: DatabaseUnavailable for it, and the detector reconnects."""
        cursor = self.cursor()
        d = cursor.execute("begin")
        d.addCallback(interaction, *args, **kwargs)
        d.addCallback(_commit, cursor)
        d.addErrback(self._rollback, cursor)
        return d

    def _rollback(self, failure: Failure, cursor) -> defer.Deferred | Failure:
        if cursor.connection.closed:
            # PostgreSQL ended the session (a restart) and its transaction with it;
            # there is nothing to roll back, and psycopg2 would refuse to try.
            return Failure(txpostgres.RollbackFailed(self, failure))
        d = defer.maybeDeferred(cursor.execute, "rollback")
        d.addCallbacks(lambda _: failure, self._rollback_failed, errbackArgs=(failure,))
        return d

    def _rollback_failed(self, rollback_failure: Failure, failure: Failure) -> Failure:
        self.log.warn("rollback failed, the connection will be renewed: {error}",
                      error=_describe(rollback_failure.value))
        return Failure(txpostgres.RollbackFailed(self, failure))

    def close(self) -> None:
        if self._connection is None:  # never connected: nothing to close
            return
        try:
            super().close()
        except psycopg2.Error:
            # A reconnection attempt still underway cannot be closed: stop watching it
            # (psycopg2 closes it when it is collected).
            self.reactor.removeReader(self)
            self.reactor.removeWriter(self)

    def doRead(self) -> None:
        """An idle connection that the server closes (a restart) is a lost
        connection to reconnect, not an unhandled error in the reactor."""
        try:
            super().doRead()
        except CONNECTION_ERRORS:
            self.connectionLost(Failure())


def _commit(result: T, cursor) -> defer.Deferred[T]:
    return cursor.execute("commit").addCallback(lambda _: result)
