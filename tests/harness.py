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
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import psycopg2
from twisted.internet import reactor
from twisted.trial import unittest

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


class DatabaseTestCase(unittest.TestCase):
    """A started Database and Stores over a fresh copy of the migrated schema."""

    async def setUp(self) -> None:
        self.dsn = fresh_database()
        self.database = Database(self.dsn, 2, reactor)
        await self.database.start()
        self.addCleanup(self.database.close)
        self.stores = Stores.on(self.database)

    async def sql(self, sql: str, *params: Any) -> list[tuple] | None:
        """One statement in its own transaction: its rows, or None if it returns none."""
        return await self.database.run_interaction("test_sql", _sql_txn, sql, params)


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
