"""Schemathesis against a live Gateway (H-, R-3): every operation of the OpenAPI document,
with generated valid and invalid input; the only check is that nothing answers 500.

`make fuzz-http` runs a few hundred cases against a Gateway on a throwaway PostgreSQL;
tests/http/test_openapi.py runs a smaller number in the test suite. The Gateway has
an account `demo` (the document's example account name) with a verified domain, a
sender, a template and an admin key, which the requests carry.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from twisted.internet import defer, task, utils

from mailgw import admin
from mailgw.config import Config, DatabaseConfig, DeliveryConfig, HTTPConfig, SMTPConfig
from mailgw.gateway import Gateway
from mailgw.http.openapi import DOCUMENT
from mailgw.store import Stores
from mailgw.store.templates import Template
from tests.dns_server import LocalDNS
from tests.harness import new_cluster

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
LOOPBACK = "tcp:0:interface=127.0.0.1"


def fuzz_config(state_dir: str, dsn: str, dns_port: int) -> Config:
    """Loopback listeners, no delivery, no rate limit (the fuzzer is one key in a hurry),
    fetches that give up fast (generated URLs lead nowhere), and names (fetched URLs',
    DMDS senders' domains) looked up in a local DNS server that knows none."""
    return Config(hostname="mx.fuzz.example", state_dir=state_dir,
                  smtp=SMTPConfig(starttls_listeners=[LOOPBACK], implicit_tls_listeners=[]),
                  http=HTTPConfig(listener=LOOPBACK, requests_per_second_per_key=1e6,
                                  request_burst_per_key=1_000_000, fetch_timeout=1.0),
                  database=DatabaseConfig(dsn=dsn, pool_size=2),
                  delivery=DeliveryConfig(enabled=False,
                                          dns_servers=[f"127.0.0.1:{dns_port}"]))


async def prepare(stores: Stores) -> str:
    """The account the document's examples name, and its admin key."""
    account = await stores.accounts.create_account("demo")
    await admin.add_domain(stores, account.id, "example.com", verified=True)
    await admin.add_sender(stores, account.id, "demo@example.com", verified=True)
    await stores.templates.put(account.id, Template("welcome", "w", "Hola {nombre}",
                                                    "<p>Hola {nombre}</p>", None))
    # An id no generated DELETE .../keys/<id> is likely to hit: the fuzzer must not
    # revoke its own key in the first few cases.
    await stores.database.run_interaction("far_key_ids", _far_key_ids_txn)
    _, key = await admin.create_api_key(stores, account.id, "fuzz", "admin")
    return key


async def _far_key_ids_txn(cursor) -> None:
    await cursor.execute("ALTER TABLE api_keys ALTER COLUMN id RESTART WITH 7340000000000")


async def run_schemathesis(reactor, port: int, key: str, max_examples: int,
                           seed: int | None = None) -> tuple[int, str]:
    """schemathesis' exit status and output (0: no case answered 500)."""
    args = ["run", str(DOCUMENT), "--url", f"http://127.0.0.1:{port}",
            "--checks", "not_a_server_error", "--max-examples", str(max_examples),
            "--header", f"Authorization: Bearer {key}", "--generation-database", "none",
            "--request-timeout", "10", "--no-color", "--workers", "1",
            "--suppress-health-check", "all", "--phases", "examples,coverage,fuzzing"]
    if seed is not None:
        args += ["--seed", str(seed)]
    out, err, status = await utils.getProcessOutputAndValue(
        str(SCHEMATHESIS), args, env={**os.environ, "NO_COLOR": "1"}, reactor=reactor)
    return status, (out + err).decode("utf-8", "replace")


async def _main(reactor, max_examples: int, seed: int | None) -> None:
    cluster = new_cluster("mailgw-fuzz-pg-")
    _, dns_port = LocalDNS().start(reactor)
    gateway = Gateway(fuzz_config(tempfile.mkdtemp(prefix="mailgw-fuzz-"), cluster.dsn,
                                  dns_port), reactor)
    gateway.startService()
    await gateway.ready
    try:
        key = await prepare(gateway.stores)
        status, output = await run_schemathesis(reactor, gateway.port_for("http.listener"),
                                                key, max_examples, seed)
    finally:
        await gateway.stopService()
    print(output)
    print(f"RESULT fuzz_http: {'no 500 found' if status == 0 else 'FAILED'}")
    if status:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=10,
                        help="cases per operation and phase (default 10)")
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(_main(reactor, args.max_examples,
                                                          args.seed)))


if __name__ == "__main__":
    main()
