"""Tracking benchmark: open-pixel and click-redirect hits per second, every event committed
before its response, mailgw against a straightforward tracker.

One run, on loopback only:

1. mailgw as an operator starts it (`mailgw init --demo`, `twistd -n mailgw`; delivery
   off), its embedded PostgreSQL durable (fsync, synchronous commit). With SQL: one send
   of `--deliveries` (10,000) recipients, delivered an hour ago, so that no hit is a
   machine's by its timing (T-6).
2. The peer, what a straightforward tracker does: a bare twisted.web resource (this
   script with --serve-peer) that checks the same signed token, then writes the same
   event row (ids looked up from the delivery, the client's address and user agent in
   its details) with one INSERT and one commit per hit, through a txpostgres pool of
   `--peer-pool` (10) connections to the same database, and answers the GIF or the 302.
3. The ceiling: the same bare resource answering the GIF with no database at all.
4. The load (identical for all): `--clients` (50) concurrent HTTP/1.1 keep-alive clients
   (asyncio, raw sockets), half of them fetching pixels and half following links, each
   hit for another delivery, with browsers' user agents; warm-up, then `--duration`
   (10) seconds counted. A hit counts when its answer is right (200 and the GIF, or
   302 and the Location); after each phase the events written are counted against the
   hits answered (each answered hit must have its event committed).
5. `--rounds` (3) rounds of peer then mailgw, the ceiling in each: a shared VM's speed
   drifts from one minute to the next, so each round's ratio compares two measurements
   taken seconds apart, and the result is the median.
6. The counters of a send of 100,000 recipients (H-4): events written with SQL (queued,
   sent, opens, clicks, machines', bounces, unsubscribes), then `GET
   /v1/stats/sends/<id>` timed (the median of 5).
7. Prints twistd's peak RSS, and last `RESULT tracking: <hits/s> hits/s, ratio <r> vs
   twisted.web+insert (target 1.0)`.

Run it as root with `make bench-tracking` (or `.venv/bin/python bench/tracking.py --help`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    LOOPBACK,
    REPO,
    BenchError,
    Interrupts,
    MemorySampler,
    Rounds,
    Server,
    cpu_ceiling,
    embedded_dsn,
    free_port,
    log,
    mailgw_server,
    mib,
    status_kb,
)
from common import run_sql as sql  # noqa: E402

TARGET_RATIO = 1.0
HTTP_READY = re.compile(r"mailgw ready: .*http\.listener=(\d+)")
DESTINATION = "https://shop.example.com/sale?utm_source=mail&item="
AGENTS = [
    b"Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
    b"(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
    b"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    b"Chrome/120.0.0.0 Safari/537.36",
    b"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like "
    b"Gecko)",
    b"Mozilla/5.0 (Linux; Android 13; SM-S901B) AppleWebKit/537.36 (KHTML, like Gecko) "
    b"Chrome/112.0.0.0 Mobile Safari/537.36",
    b"Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.4266; Pro)",
]
TRACKING_TOML = """\
[delivery]
enabled = false
"""


# --- the peer: a bare twisted.web tracker --------------------------------------------------

PEER_INSERT = """\
INSERT INTO events (account_id, send_id, message_id, delivery_id, contact_id, recipient,
                    type, details)
SELECT d.account_id, m.send_id, d.message_id, d.id, d.contact_id, d.recipient, %s, %s
FROM deliveries d JOIN messages m ON m.id = d.message_id WHERE d.id = %s"""


def serve_peer(mode: str, port: int, dsn: str, secret_hex: str, pool: int) -> None:
    """The straightforward tracker (`insert`), or the GIF alone (`gif`); runs until killed."""
    from psycopg2.extras import Json
    from twisted.internet import defer, reactor
    from twisted.web import resource, server
    from txpostgres import txpostgres

    from mailgw.content.links import LinkSigner
    from mailgw.http.tracking import PIXEL

    signer = LinkSigner(bytes.fromhex(secret_hex), "http://localhost:8080")
    connections = txpostgres.ConnectionPool(None, dsn, min=pool) if mode == "insert" else None

    class Hit(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            kind = request.postpath[0].decode() if len(request.postpath) > 1 else ""
            verified = signer.verify(kind, request.postpath[-1].decode()) if kind in "oc" \
                else None
            if verified is None:
                request.setResponseCode(404)
                return b"Not found\n"
            delivery_id, url = verified
            if connections is None:
                return self.answer(request, url)
            details = {"ip": request.getClientAddress().host,
                       "user_agent": (request.getHeader(b"user-agent") or b"").decode(
                           "utf-8", "replace")}
            if url:
                details["url"] = url

            def insert(cursor):
                return cursor.execute(PEER_INSERT, ("click" if url else "open", Json(details),
                                                    delivery_id))

            d = connections.runInteraction(insert)
            d.addCallback(lambda _: request.write(self.answer(request, url)))
            d.addErrback(lambda f: request.setResponseCode(500) or request.write(
                f.getErrorMessage().encode()))
            d.addBoth(lambda _: request.finish())
            return server.NOT_DONE_YET

        @staticmethod
        def answer(request, url: str | None) -> bytes:
            if url:
                request.setResponseCode(302)
                request.setHeader(b"Location", url.encode())
                request.setHeader(b"Content-Length", b"0")
                return b""
            request.setHeader(b"Content-Type", b"image/gif")
            request.setHeader(b"Content-Length", b"%d" % len(PIXEL))
            request.setHeader(b"Cache-Control", b"no-store")
            return PIXEL

    root = resource.Resource()
    root.putChild(b"t", Hit())

    async def start() -> None:
        if connections is not None:
            await connections.start()
        reactor.listenTCP(port, server.Site(root), interface=LOOPBACK, backlog=1024)
        print("peer ready", flush=True)

    defer.ensureDeferred(start()).addErrback(lambda f: (print(f), reactor.stop()))
    reactor.run()


class Peer:
    """This script with --serve-peer in a process of its own."""

    def __init__(self, mode: str, dsn: str, secret: bytes, pool: int) -> None:
        self.mode = mode
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve-peer", mode, str(self.port), dsn,
             secret.hex(), str(pool)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)

    def __enter__(self) -> Peer:
        line = self.process.stdout.readline().decode(errors="replace").strip()
        if line != "peer ready":
            self.stop()
            raise BenchError(f"the {self.mode} peer did not start: {line}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        with Interrupts.shield():
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()


# --- data ----------------------------------------------------------------------------------

NEW_SEND = """\
WITH account AS (SELECT id FROM accounts WHERE name = 'demo'),
 send AS (INSERT INTO sends (account_id, origin, subject, sender)
          SELECT id, 'api', %(subject)s, 'demo@example.com' FROM account RETURNING id, account_id),
 message AS (INSERT INTO messages (account_id, send_id, message_uid, sender, subject, body)
             SELECT account_id, id, md5(random()::text), 'demo@example.com', %(subject)s,
              convert_to('{"subject": "s", "html": "<p>x</p>"}', 'UTF8') FROM send
             RETURNING id, account_id, send_id)
INSERT INTO deliveries (message_id, account_id, recipient, state, updated_at)
SELECT m.id, m.account_id, 'r' || g || '@bench.example', 'sent', now() - interval '1 hour'
FROM message m, generate_series(1, %(n)s) g
RETURNING (SELECT send_id FROM message), id
"""


def new_send(dsn: str, subject: str, n: int) -> tuple[int, list[int]]:
    """A send of `n` deliveries recorded sent an hour ago: its id and the deliveries'."""
    rows = sql(dsn, NEW_SEND, {"subject": subject, "n": n})
    return rows[0][0], [row[1] for row in rows]


STATS_EVENTS = """\
INSERT INTO events (account_id, send_id, message_id, delivery_id, recipient, type, machine,
                    details, occurred_at)
SELECT d.account_id, %(send)s, d.message_id, d.id, d.recipient, e.type, e.machine,
       e.details, now() - interval '1 hour'
FROM deliveries d JOIN messages m ON m.id = d.message_id AND m.send_id = %(send)s,
LATERAL (VALUES
  ('queued', false, '{}'::jsonb, true),
  ('sent', false, '{"reply": "250 2.0.0 Ok: queued"}', d.id %% 100 <> 0),
  ('bounced', false, '{"type": "hard", "reply": "550 5.1.1 no such user"}', d.id %% 100 = 0),
  ('open', false, '{"ip": "203.0.113.7", "user_agent": "Mozilla/5.0", "device_type":
     "mobile", "browser": "Mobile Safari"}', d.id %% 3 = 0),
  ('open', false, '{"ip": "203.0.113.7"}', d.id %% 6 = 0),
  ('open', true, '{"ip": "17.58.1.2", "machine_reason": "privacy_proxy"}', d.id %% 5 = 0),
  ('click', false, '{"url": "https://shop.example.com/"}', d.id %% 10 = 0),
  ('click', true, '{"url": "https://shop.example.com/", "machine_reason": "head"}',
   d.id %% 20 = 0),
  ('unsubscribed', false, '{"subscription_type": "domain subscription cancelled"}',
   d.id %% 200 = 0)) AS e(type, machine, details, wanted)
WHERE e.wanted
"""


# --- the load ------------------------------------------------------------------------------

@dataclass
class LoadResult:
    hits: int = 0  # right answers in the counted seconds
    answered: int = 0  # right answers, warm-up included (each must have its event)
    seconds: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    client_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.hits / self.seconds if self.seconds else 0.0

    def latency(self, quantile: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(quantile * len(ordered)))] * 1000 if ordered \
            else 0.0


async def _client(number: int, port: int, paths: list[tuple[bytes, bytes | None]],
                  start: float, end: float, result: LoadResult) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    agent = AGENTS[number % len(AGENTS)]
    try:
        index = number
        while True:
            now = time.monotonic()
            if now >= end:
                return
            path, location = paths[index % len(paths)]
            index += 50
            writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: bench\r\nUser-Agent: " + agent
                         + b"\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            status = head[9:12]
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            body = await reader.readexactly(int(length[1])) if length else b""
            right = (status == b"302" and location is not None
                     and b"\r\nLocation: " + location + b"\r\n" in head) or (
                status == b"200" and location is None and body[:6] == b"GIF89a")
            if right:
                result.answered += 1
            if now < start:
                continue
            if right:
                result.hits += 1
                result.latencies.append(time.monotonic() - now)
            else:
                result.errors[f"{status.decode(errors='replace')} {body[:60]!r}"] += 1
    except (OSError, asyncio.IncompleteReadError) as e:
        result.errors[type(e).__name__] += 1
    finally:
        writer.close()


async def run_load(port: int, paths: list[tuple[bytes, bytes | None]], clients: int,
                   warmup: float, duration: float) -> LoadResult:
    result = LoadResult()
    cpu = time.process_time()
    start = time.monotonic() + warmup
    end = start + duration
    await asyncio.gather(*(_client(n, port, paths, start, end, result)
                           for n in range(clients)))
    result.seconds = duration
    result.client_cpu = time.process_time() - cpu
    return result


def hit_paths(signer, deliveries: list[int], salt: int) -> list[tuple[bytes, bytes | None]]:
    """Alternately a pixel and a link, each of another delivery: (path, Location or None)."""
    paths = []
    for n, delivery_id in enumerate(deliveries):
        if n % 2:
            url = f"{DESTINATION}{salt}-{n}"
            paths.append((urlsplit(signer.click_url(delivery_id, url)).path.encode(),
                          url.encode()))
        else:
            paths.append((urlsplit(signer.open_url(delivery_id)).path.encode(), None))
    return paths


# --- phases --------------------------------------------------------------------------------

@dataclass
class Phase:
    name: str
    load: LoadResult
    events: int | None  # events written during the phase (None: no database)
    server_cpu: float  # the server process and its database (its share of the cluster)
    process_cpu: float  # the server process alone
    peak_rss_kb: int

    @property
    def ceiling(self) -> float:
        return cpu_ceiling(self.load.answered, self.server_cpu, self.load.client_cpu)


def count_events(dsn: str, send_id: int) -> int:
    """A phase's events of hits (an open a click implies is not a hit)."""
    return sql(dsn, "SELECT count(*) FROM events WHERE send_id = %s AND type IN"
                    " ('open', 'click') AND NOT details ? 'implied_by'", (send_id,))[0][0]


async def measure(name: str, port: int, pid: int, dsn: str | None, send_id: int | None,
                  paths, args: argparse.Namespace, cluster_root: int) -> Phase:
    """`cluster_root`: twistd, whose children are the PostgreSQL cluster that both mailgw
    and the peer write to: its CPU over the phase is the database's share."""
    before = count_events(dsn, send_id) if dsn else 0
    sampler = MemorySampler(pid)
    sampler.start()
    database_cpu = cluster_cpu(cluster_root)
    load = await run_load(port, paths, args.clients, args.warmup, args.duration)
    database_cpu = cluster_cpu(cluster_root) - database_cpu if dsn else 0.0
    peaks = await sampler.stop()
    events = count_events(dsn, send_id) - before if dsn else None
    phase = Phase(name, load, events, peaks.root_cpu_seconds + database_cpu,
                  peaks.root_cpu_seconds, peaks.root_hwm)
    errors = f", errors {dict(load.errors)}" if load.errors else ""
    written = "" if events is None else (f", {events} events written for {load.answered} "
                                         "hits answered (warm-up included)")
    log(f"{name}: {load.hits} hits in {load.seconds:.0f} s = {load.rate:.0f} hits/s, latency "
        f"p50 {load.latency(0.5):.1f} ms p99 {load.latency(0.99):.1f} ms{written}{errors}")
    return phase


def cluster_cpu(mailgw_pid: int) -> float:
    """CPU seconds of the PostgreSQL processes (twistd's children) alive now, and of
    those they have reaped."""
    from common import cpu_seconds, process_tree
    return sum(cpu_seconds(pid) for pid in process_tree(mailgw_pid) if pid != mailgw_pid)


def http_port(server: Server) -> int:
    text = (server.home / "twistd.log").read_text(errors="replace")
    found = HTTP_READY.search(text)
    if not found:
        raise BenchError("no http.listener port in mailgw's log")
    return int(found[1])


def time_send_counters(port: int, api_key: str, send_id: int, times: int = 5
                       ) -> tuple[float, dict]:
    """Median milliseconds of GET /v1/stats/sends/<id>, and its counters."""
    elapsed, counters = [], {}
    for _ in range(times):
        request = urllib.request.Request(f"http://{LOOPBACK}:{port}/v1/stats/sends/{send_id}",
                                         headers={"Authorization": f"Bearer {api_key}"})
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=60) as response:
            counters = json.loads(response.read())["counters"]
        elapsed.append((time.perf_counter() - started) * 1000)
    return statistics.median(elapsed), counters


async def run(args: argparse.Namespace) -> tuple[list[Phase], Rounds, float, dict]:
    from mailgw.content.links import LinkSigner

    phases: list[Phase] = []
    rounds = Rounds("twisted.web+insert")
    with mailgw_server(TRACKING_TOML) as server:
        dsn = embedded_dsn(server)
        port = http_port(server)
        demo = json.loads((server.home / "state" / "demo.json").read_text())
        secret = bytes(sql(dsn, "SELECT secret FROM signing_keys WHERE name = 'links'")[0][0])
        signer = LinkSigner(secret, "http://localhost:8080")
        send_id, deliveries = new_send(dsn, "tracking bench", args.deliveries)
        sql(dsn, "VACUUM ANALYZE deliveries")
        log(f"a send of {len(deliveries)} deliveries, sent an hour ago")
        with Peer("gif", "", secret, 0) as ceiling_peer, \
                Peer("insert", dsn, secret, args.peer_pool) as peer:
            for number in range(1, args.rounds + 1):
                log(f"round {number} of {args.rounds}")
                paths = hit_paths(signer, deliveries, number)
                phases.append(await measure("twisted.web+insert", peer.port, peer.process.pid,
                                            dsn, send_id, paths, args, server.pid))
                paths = hit_paths(signer, deliveries, number + 100)
                phases.append(await measure("mailgw", port, server.pid, dsn, send_id, paths,
                                            args, server.pid))
                phases.append(await measure("twisted.web GIF, no database", ceiling_peer.port,
                                            ceiling_peer.process.pid, None, None, paths, args,
                                            server.pid))
                peer_phase, mailgw_phase = phases[-3], phases[-2]
                rounds.add(peer_phase.load.rate, mailgw_phase.load.rate, peer_phase.ceiling,
                           mailgw_phase.ceiling)
        log(f"counters of a send of {args.stats_recipients} recipients: writing its events")
        big_send, _ = new_send(dsn, "statistics bench", args.stats_recipients)
        sql(dsn, STATS_EVENTS, {"send": big_send})
        sql(dsn, "VACUUM ANALYZE events")
        stats_ms, counters = time_send_counters(port, demo["api_key"], big_send)
        log(f"GET /v1/stats/sends/{big_send}: {stats_ms:.0f} ms (median of 5): {counters}")
        log(f"twistd peak RSS {mib(status_kb(server.pid, 'VmHWM'))}")
    return phases, rounds, stats_ms, counters


def report(phases: list[Phase], rounds: Rounds, stats_ms: float, recipients: int) -> None:
    print("\nper phase: hits/s, latency p50/p99 ms, events written vs hits answered, CPU ms "
          "per hit of the server process and with its database, peak RSS of the server "
          "process")
    for phase in phases:
        load = phase.load
        hits = load.answered or 1
        written = "-" if phase.events is None else f"{phase.events}/{load.answered}"
        print(f"  {phase.name:30} {load.rate:8.0f} {load.latency(0.5):6.1f} "
              f"{load.latency(0.99):7.1f}  {written:>13}  {phase.process_cpu / hits * 1000:6.3f}"
              f"  {phase.server_cpu / hits * 1000:6.3f}  {mib(phase.peak_rss_kb)}"
              f"  (load generator {load.client_cpu / hits * 1000:.3f})")
    ceilings = [p.load.rate for p in phases if p.events is None]
    if ceilings:
        print(f"\nbare twisted.web GIF, no database (the ceiling): "
              f"{statistics.median(ceilings):.0f} hits/s (median)")
    print(f"counters of a send of {recipients} recipients: {stats_ms:.0f} ms "
          "(GET /v1/stats/sends/<id>, median of 5)")
    rounds.print("hits/s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50,
                        help="concurrent keep-alive clients (50)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds counted in each phase (10)")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds of load before counting (2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    parser.add_argument("--deliveries", type=int, default=10000,
                        help="deliveries the hits are spread over (10000)")
    parser.add_argument("--peer-pool", type=int, default=10,
                        help="database connections of the peer (10)")
    parser.add_argument("--stats-recipients", type=int, default=100000,
                        help="recipients of the send whose counters are timed (100000)")
    parser.add_argument("--serve-peer", nargs=5, metavar=("MODE", "PORT", "DSN", "SECRET",
                                                          "POOL"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_peer:
        mode, port, dsn, secret, pool = args.serve_peer
        serve_peer(mode, int(port), dsn, secret, int(pool))
        return 0
    if os.geteuid() != 0:
        print("tracking: run as root (the embedded PostgreSQL runs as the mailgw user)",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, Interrupts.handler)
    started = time.monotonic()
    try:
        phases, rounds, stats_ms, _ = asyncio.run(run(args))
    except BenchError as e:
        print(f"tracking: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("tracking: interrupted; servers stopped and temporary files removed",
              file=sys.stderr)
        return 130
    log(f"whole run: {time.monotonic() - started:.0f} s")
    report(phases, rounds, stats_ms, args.stats_recipients)
    print()
    print(f"RESULT tracking: {rounds.mailgw:.0f} hits/s, ratio {rounds.ratio:.2f} vs "
          f"twisted.web+insert (target {TARGET_RATIO})")
    lost = [p for p in phases if p.events is not None and p.events < p.load.answered]
    return 1 if lost or not rounds.pairs else 0


if __name__ == "__main__":
    sys.exit(main())
