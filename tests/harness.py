"""Test harness: a real PostgreSQL per test run, a fresh database per test case.

The cluster is created on first use in a temporary directory (as the
unprivileged `mailgw` user when the tests run as root), tuned for speed
(no fsync: nothing here needs to survive a power cut) and removed when the
test process exits.  Migrations are applied once to a template database;
each test case gets its own copy, so tests never see each other's rows.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import smtplib
import ssl
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import psycopg2
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from mailgw import admin
from mailgw.config import Config, DatabaseConfig, DeliveryConfig, HTTPConfig, SMTPConfig
from mailgw.embedded_pg import Cluster, RunAs
from mailgw.gateway import Gateway
from mailgw.store import Stores
from mailgw.store.database import Database
from mailgw.store.migrations import available_migrations, migrate_txn

TEMPLATE_DB = "mailgw_template"
FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
                 "max_connections": "300", "shared_buffers": "64MB"}
LOOPBACK_PORT = "tcp:0:interface=127.0.0.1"

_cluster: Cluster | None = None
_database_numbers = itertools.count(1)


def new_cluster(prefix: str = "mailgw-test-pg-") -> Cluster:
    """A started throwaway cluster, stopped and deleted when the process exits."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)  # the cluster's user must reach root/pg
    cluster = Cluster(root / "pg", RunAs.for_cluster("mailgw"), settings=FAST_SETTINGS)
    atexit.register(shutil.rmtree, root, True)
    atexit.register(cluster.stop)
    cluster.initialize()
    cluster.start()
    return cluster


def shared_cluster() -> Cluster:
    """The cluster shared by the whole run, with the migrated template database."""
    global _cluster
    if _cluster is None:
        _cluster = new_cluster()
        _admin(_cluster, f"CREATE DATABASE {TEMPLATE_DB}")
        conn = psycopg2.connect(_cluster.dsn_for(TEMPLATE_DB))
        with conn, conn.cursor() as cursor:
            run_sync(migrate_txn(SyncCursor(cursor), available_migrations()))
        conn.close()
    return _cluster


def fresh_database(template: str = TEMPLATE_DB) -> str:
    """The DSN of a new database copied from the migrated template."""
    cluster = shared_cluster()
    name = f"test_{os.getpid()}_{next(_database_numbers)}"
    _admin(cluster, f"CREATE DATABASE {name} TEMPLATE {template}")
    return cluster.dsn_for(name)


def empty_database() -> str:
    """The DSN of a new database with no schema at all (for migration tests)."""
    return fresh_database(template="template0")


def _admin(cluster: Cluster, sql: str) -> None:
    conn = psycopg2.connect(cluster.dsn_for("postgres"))
    conn.autocommit = True
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql)
    finally:
        conn.close()


class SyncCursor:
    """A psycopg2 cursor with txpostgres' awaitable execute, to run *_txn functions
    synchronously where no reactor runs (building the template)."""

    def __init__(self, cursor) -> None:
        self._cursor = cursor

    async def execute(self, sql: str, params: Any = None) -> SyncCursor:
        self._cursor.execute(sql, params)
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


def run_sync(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never really waits (it awaits only SyncCursor)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("coroutine waited for something")


class QueriesDatabase:
    """`self.sql(...)` for a test case that sets `self.database`."""

    database: Database

    async def sql(self, sql: str, *params: Any) -> list[tuple] | None:
        """One statement in its own transaction: its rows, or None if it returns none."""
        return await run_sql(self.database, sql, *params)


class DatabaseTestCase(QueriesDatabase, unittest.TestCase):
    """A started Database and Stores over a fresh copy of the migrated schema."""

    async def setUp(self) -> None:
        self.dsn = fresh_database()
        self.database = Database(self.dsn, 2, reactor)
        await self.database.start()
        self.addCleanup(self.database.close)
        self.stores = Stores.on(self.database)



async def _sql_txn(cursor, sql: str, params: tuple) -> list[tuple] | None:
    await cursor.execute(sql, params)
    return cursor.fetchall() if cursor.description else None


def gateway_config(test: unittest.TestCase, dsn: str, **changes: Any) -> Config:
    """Every listener on an ephemeral loopback port, state in the test's temp dir, and no
    delivery (tests that deliver turn it on with their own DNS server and receiver)."""
    return Config(
        hostname="mx.test.example",
        state_dir=test.mktemp(),
        smtp=SMTPConfig(starttls_listeners=[LOOPBACK_PORT, LOOPBACK_PORT],
                        implicit_tls_listeners=[LOOPBACK_PORT]),
        http=HTTPConfig(listener=LOOPBACK_PORT),
        database=DatabaseConfig(dsn=dsn, pool_size=2),
        delivery=DeliveryConfig(enabled=False),
    ).replace(**changes)


async def start_gateway(test: unittest.TestCase, config: Config, clock=None) -> Gateway:
    """A running Gateway, stopped when the test ends; `clock` drives its timers."""
    gateway = Gateway(config, reactor, clock)
    gateway.startService()
    test.addCleanup(gateway.stopService)
    await gateway.ready
    return gateway


async def start_with_account(test: unittest.TestCase, config: Config) -> None:
    """A running Gateway (`test.gateway`, `.database`, `.stores`) with the account acme
    (`test.account`), its verified domain dominio.com and an account API key
    (`test.key`), for the HTTP API tests; `test.base` is the listener's URL."""
    test.gateway = await start_gateway(test, config)
    test.database = test.gateway.database
    test.stores = test.gateway.stores
    test.account = await test.stores.accounts.create_account("acme")
    await admin.add_domain(test.stores, test.account.id, "dominio.com", verified=True)
    _, test.key = await admin.create_api_key(test.stores, test.account.id, "k")
    test.base = f"http://127.0.0.1:{test.gateway.port_for('http.listener')}"


# -- clients and waiting, shared by the end-to-end tests ----------------------------------

# The account user, password and verified sender the SMTP flow tests create.
USER, PASSWORD, SENDER = "acme.pro", "s3cret-pass", "remitente@dominio.com"

# A small HTML-only message from SENDER with one tracked link.
SIMPLE = (b"From: remitente@dominio.com\r\nTo: a@example.net\r\nSubject: hi\r\n"
          b"Content-Type: text/html; charset=utf-8\r\n\r\n<p>Hi <a href=\"https://x.example\">x"
          b"</a></p>\r\n")


def insecure_tls() -> ssl.SSLContext:
    """A client context that accepts the gateway's self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def smtp_client(port: int, implicit_tls: bool = False) -> smtplib.SMTP:
    """A blocking smtplib client connected to a loopback port (run it in a thread)."""
    if implicit_tls:
        client = smtplib.SMTP_SSL(timeout=10, context=insecure_tls())
    else:
        client = smtplib.SMTP(timeout=10)
    client._host = "127.0.0.1"  # TLS's server_hostname; smtplib sets it only in __init__
    client.connect("127.0.0.1", port)
    return client


async def run_sql(database: Database, sql: str, *params: Any) -> list[tuple] | None:
    """One statement in its own transaction: its rows, or None if it returns none."""
    return await database.run_interaction("test_sql", _sql_txn, sql, params)


def log_lines(test: unittest.TestCase) -> list[str]:
    """The lines logged from now to the end of the test, as the operator reads them."""
    lines: list[str] = []

    def observe(event: dict) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


async def until(predicate, what: str, seconds: float = 10) -> None:
    """Let the reactor run until `predicate()` holds; fail after `seconds` (a bound for
    a broken build, never reached when the test passes)."""
    deadline = reactor.seconds() + seconds
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"still waiting for {what}")
        await task.deferLater(reactor, 0.01, lambda: None)


async def reactor_turns(count: int = 10) -> None:
    """Let the reactor handle what is already under way (nothing timed)."""
    for _ in range(count):
        await task.deferLater(reactor, 0, lambda: None)


@implementer(IHandshakeListener)
class Client(protocol.Protocol):
    """A raw client that keeps what the server sent; `lost` fires when the connection is
    gone."""

    def __init__(self) -> None:
        self.received = b""
        self.handshake_done = False
        self.lost: defer.Deferred[bytes] = defer.Deferred()

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.lost.callback(self.received)

    async def close(self) -> None:
        if not self.lost.called:
            self.transport.abortConnection()
            await self.lost


def published(key):
    """A dkimpy dnsfunc that finds DKIM `key` published as s1._domainkey.example.org."""
    def lookup(name, timeout=5):
        if name == b"s1._domainkey.example.org.":
            return f"v=DKIM1; k={key.algorithm}; p={key.public_key}".encode("ascii")
        return None
    return lookup
