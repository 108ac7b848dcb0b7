"""Delivery benchmark: messages delivered per second, mailgw against Postfix relaying.

One run, on loopback only:

1. A receiver: Postfix's `smtp-sink` on a free loopback port, accepting
   everything and counting messages (`-c` prints a running count at every
   final dot; the benchmark reads it from a pipe and timestamps each change).
2. DNS: tests/dns_server.py's LocalDNS in a helper process (this script with
   --serve-dns) on a free loopback port, answering `bench.example MX 10
   mx.bench.example` and `mx.bench.example A 127.0.0.1`.
3. Postfix (a private instance as in bench/smtp_ingest.py: STARTTLS + SASL AUTH)
   relays everything to the sink (`relayhost = [127.0.0.1]:<sink port>`); the
   load generator (bench/loadgen.py) submits ~5 KB multipart messages with
   links to user<n>@bench.example over 20 sessions; measured: arrivals at the sink
   per second, from the first submission to the last arrival.
4. mailgw the same way (`mailgw init --demo`, `twistd -n mailgw`) with delivery
   on, finding the sink through the MX path (`delivery.dns_servers`,
   `remote_smtp_port`): links rewritten, open pixel, DKIM (the demo domain's RSA
   key). Same load, same measurement; twistd's peak RSS.
5. Steps 3 and 4 `--rounds` times (3), alternating, each round with fresh
   servers and sinks: a shared VM's speed drifts from one minute to the next.
6. Memory against queue size: with the last round's database, queues of 1,000 and of
   100,000 deliveries (100 recipients per message, inserted with SQL while
   delivery is off) are worked through by a fresh twistd against a sink that
   answers every RCPT with 450 (all deferred); twistd's RSS once done.
7. Prints a summary; the last line is `RESULT delivery: <mailgw msgs/s> msgs/s,
   ratio <mailgw/postfix> vs postfix (target 1.5)`, the medians of the rounds.

Run it as root with `make bench-delivery` (or `.venv/bin/python bench/delivery.py --help`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    LOG_PROBLEM,
    LOOPBACK,
    REPO,
    BenchError,
    Interrupts,
    MemoryPeaks,
    MemorySampler,
    Rounds,
    Server,
    cpu_ceiling,
    embedded_dsn,
    ensure_postfix,
    free_port,
    log,
    mailgw_server,
    make_temp_dir,
    mib,
    postfix_server,
    report_log,
    run_sql,
    status_kb,
    wait_for_banner,
)
from loadgen import LoadResult, LoadSpec, run_load

TARGET_RATIO = 1.5
# Not bench.test: mailgw refuses special-use domains (.test, .invalid, ...) at RCPT, as
# email_validator does; .example is reserved too (RFC 2606) but accepted.
RECIPIENT_DOMAIN = "bench.example"
MX_HOST = "mx.bench.example"
ZONE = {
    RECIPIENT_DOMAIN: {"MX": [(10, MX_HOST)], "TTL": 300},
    MX_HOST: {"A": [LOOPBACK], "TTL": 300},
}

# Everything accepted is relayed to the sink, whatever the recipient domain (no DNS).
POSTFIX_RELAY_CF = """\
default_transport = smtp
relay_transport = smtp
relayhost = [{sink}]:{port}
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
"""


# --- the receiver -------------------------------------------------------------------------

class Sink:
    """Postfix's smtp-sink on a free loopback port; counts the messages it receives.

    `smtp-sink -c` writes "sess=N quit=N mesg=N\\r" each time a message ends; a thread
    reads that from a pipe and notes the time of every change. With `defer` every RCPT
    gets 450 (and -r implies no PIPELINING).
    """

    COUNTERS = re.compile(rb"sess=(\d+) .*mesg=(\d+)")

    def __init__(self, defer: bool = False) -> None:
        self.defer = defer
        self.port = 0
        self.count = 0
        self.sessions = 0  # SMTP sessions that have ended
        self.first_at: float | None = None
        self.last_at: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> Sink:
        self.port = free_port()
        argv = ["smtp-sink", "-c", "-u", "postfix", *(["-r", "RCPT"] if self.defer else []),
                f"{LOOPBACK}:{self.port}", "1000"]
        self._process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            wait_for_banner(self.port, 10)
        except BenchError:
            self.__exit__(None, None, None)
            raise
        log(f"smtp-sink on {LOOPBACK}:{self.port} (pid {self._process.pid}"
            f"{', every RCPT deferred with 450' if self.defer else ''})")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            stop_process(self._process)
        if self._reader is not None:
            self._reader.join(5)

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        fd = self._process.stdout.fileno()
        pending = b""
        while chunk := os.read(fd, 65536):
            now = time.monotonic()
            pending += chunk
            *updates, pending = pending.split(b"\r")
            for update in updates:
                if match := self.COUNTERS.search(update):
                    self.sessions = int(match[1])
                    count = int(match[2])
                    if count > self.count:
                        self.count = count
                        self.last_at = now
                        if self.first_at is None:
                            self.first_at = now


# --- DNS ----------------------------------------------------------------------------------

@contextmanager
def dns_server() -> Iterator[int]:
    """LocalDNS (tests/dns_server.py) serving ZONE in a helper process; yields its port."""
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve-dns", json.dumps(ZONE)], stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL, start_new_session=True, cwd=REPO)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode().strip()
        if not line.isdigit():
            raise BenchError(f"the DNS helper did not start (said {line!r}, "
                             f"status {process.poll()})")
        port = int(line)
        log(f"DNS on {LOOPBACK}:{port} (udp+tcp, pid {process.pid}): {RECIPIENT_DOMAIN} MX 10 "
            f"{MX_HOST}, {MX_HOST} A {LOOPBACK}")
        yield port
    finally:
        with Interrupts.shield():
            stop_process(process)


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM, and SIGKILL if it is still there 10 s later."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serve_dns(zone_json: str) -> None:
    """The helper process: run LocalDNS until SIGTERM, after printing its port."""
    sys.path.insert(0, str(REPO))
    from twisted.internet import reactor

    from tests.dns_server import LocalDNS

    zone = {name: {rtype: ([tuple(v) if isinstance(v, list) else v for v in values]
                           if isinstance(values, list) else values)
                   for rtype, values in entry.items()}
            for name, entry in json.loads(zone_json).items()}
    server = LocalDNS(zone)
    _host, port = server.start(reactor)
    server.queries = _NoList()  # nobody reads them: do not keep one tuple per query
    print(port, flush=True)
    reactor.run()


class _NoList(list):
    def append(self, item: object) -> None:
        pass


# --- mailgw's configuration -----------------------------------------------------------------

def delivery_toml(dns_port: int, sink_port: int, poll_interval: float,
                  retry_base: int | None = None) -> str:
    text = f"""\
# Delivery by MX through the benchmark's DNS, to the sink's port on 127.0.0.1.
[delivery]
enabled = true
dns_servers = ["{LOOPBACK}:{dns_port}"]
remote_smtp_port = {sink_port}
poll_interval = {poll_interval}
"""
    if retry_base is not None:
        text += f"retry_base_seconds = {retry_base}\n"
    return text


NO_DELIVERY = """\
[delivery]
enabled = false
"""

DELIVERY_LINE = re.compile(r"delivery (\d+) to \S+: (\w+) \((.*)\)$")


@dataclass
class LogSummary:
    outcomes: Counter[str] = field(default_factory=Counter)
    samples: dict[str, str] = field(default_factory=dict)  # state -> first non-sent reply
    problems: list[str] = field(default_factory=list)


def delivery_log_reporter(into: list[LogSummary]):
    """A mailgw_server report function: the usual, plus the delivery outcomes in the log."""

    def report(log_path: Path) -> None:
        report_log(log_path)
        summary = LogSummary()
        with suppress(OSError), log_path.open(errors="replace") as lines:
            for line in lines:
                if match := DELIVERY_LINE.search(line):
                    summary.outcomes[match[2]] += 1
                    if match[2] != "sent":
                        summary.samples.setdefault(match[2], match[3][:200])
                elif LOG_PROBLEM.search(line):
                    summary.problems.append(line.rstrip()[:300])
        if summary.outcomes:
            log("mailgw's log: delivery outcomes " + ", ".join(
                f"{state} {count}" for state, count in summary.outcomes.most_common()))
        into.append(summary)

    return report


def quiet_report(log_path: Path) -> None:
    """For the starts that only fill the queue: just the problems, if any."""
    with suppress(OSError):
        problems = [line for line in log_path.read_text(errors="replace").splitlines()
                    if LOG_PROBLEM.search(line)]
        for line in problems[:10]:
            print("    " + line[:300])


# --- database -----------------------------------------------------------------------------

def sql(server: Server, query: str, params: dict | None = None) -> list[tuple]:
    """One statement against a running mailgw's embedded database (autocommit)."""
    return run_sql(embedded_dsn(server), query, params)


def delivery_states(server: Server) -> dict[str, int]:
    return dict(sql(server, "SELECT state, count(*) FROM deliveries GROUP BY state"))


# --- measuring: delivered messages per second ------------------------------------------------

@dataclass
class DeliveryMeasurement:
    server: Server
    load: LoadResult
    memory: MemoryPeaks
    delivered: int
    seconds: float  # first submission to last arrival at the sink
    drained_after: float  # last arrival, seconds after the last accepted submission
    stalled: bool
    connections: int = 0  # SMTP sessions the sink saw end (after the server stopped)
    states: dict[str, int] = field(default_factory=dict)  # mailgw: deliveries by state
    not_sent: list[tuple[str, str, int]] = field(default_factory=list)  # state, reply, count
    postfix_log: Counter[str] = field(default_factory=Counter)
    log: LogSummary | None = None

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else 0.0

    @property
    def ceiling(self) -> float:
        return cpu_ceiling(self.delivered, self.memory.cpu_seconds, self.load.client_cpu)


async def measure_delivery(server: Server, sink: Sink, args: argparse.Namespace
                           ) -> DeliveryMeasurement:
    """Submit the load, then wait until the sink has received every accepted message."""
    spec = LoadSpec(host=LOOPBACK, port=server.port, username=server.username,
                    password=server.password, sender=server.sender, sessions=args.sessions,
                    messages=args.messages, warmup=0, duration=args.duration,
                    message_size=args.size, recipient_domain=RECIPIENT_DOMAIN,
                    links=args.links)
    sampler = MemorySampler(server.pid)
    sampler.start()
    log(f"{server.name}: {spec.sessions} sessions submit {spec.messages} messages (at most "
        f"{spec.duration:.0f} s) of ~{spec.message_size} B with {spec.links} links to "
        f"user<n>@{RECIPIENT_DOMAIN}")
    base = sink.count
    started = time.monotonic()
    limit = args.duration + 120
    stalled = False
    try:
        try:
            async with asyncio.timeout(limit):
                load = await run_load(spec)
        except TimeoutError:
            raise BenchError(f"{server.name}: the load did not finish within {limit:.0f} s"
                             ) from None
        submitted_at = time.monotonic()
        log(f"{server.name}: {load.accepted} accepted ({load.rate:.2f} msgs/s), "
            f"{load.error_count} errors; {sink.count - base} at the sink so far")
        # Wait for the rest, as long as it keeps arriving.
        last_count, last_progress = sink.count, time.monotonic()
        while sink.count - base < load.accepted:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            if sink.count != last_count:
                last_count, last_progress = sink.count, now
            elif now - last_progress > args.stall:
                stalled = True
                log(f"{server.name}: nothing arrived for {args.stall:.0f} s; "
                    f"{sink.count - base} of {load.accepted} delivered, giving up waiting")
                break
    finally:
        memory = await sampler.stop()
    delivered = sink.count - base
    last = sink.last_at or started
    m = DeliveryMeasurement(server, load, memory, delivered, last - started,
                            max(last - submitted_at, 0.0), stalled)
    log(f"{server.name}: {delivered} delivered in {m.seconds:.2f} s: {m.rate:.2f} msgs/s")
    return m


def postfix_log_summary(home: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    with suppress(OSError), (home / "maillog").open(errors="replace") as lines:
        for line in lines:
            if match := re.search(r"\bstatus=(\w+)", line):
                counts[match[1]] += 1
            elif re.search(r"\b(warning|error|fatal|panic):", line):
                counts["warning/error lines"] += 1
    return counts


def run_postfix(sink: Sink, args: argparse.Namespace) -> DeliveryMeasurement:
    with postfix_server(POSTFIX_RELAY_CF.format(sink=LOOPBACK, port=sink.port)) as server:
        m = asyncio.run(measure_delivery(server, sink, args))
        assert server.home is not None
        m.postfix_log = postfix_log_summary(server.home)
        log("postfix's log: " + (", ".join(f"{k} {v}" for k, v in m.postfix_log.items())
                                 or "no status lines"))
    time.sleep(0.5)  # the sink reports the sessions that Postfix's stop ended
    m.connections = sink.sessions
    return m


def run_mailgw(root: Path, dns_port: int, sink: Sink, args: argparse.Namespace
               ) -> DeliveryMeasurement:
    logs: list[LogSummary] = []
    toml = delivery_toml(dns_port, sink.port, args.poll_interval)
    with mailgw_server(toml, args.mailgw_log, root=root,
                       report=delivery_log_reporter(logs)) as server:
        m = asyncio.run(measure_delivery(server, sink, args))
        m.states = delivery_states(server)
        m.not_sent = [(state, reply or "", count) for state, reply, count in sql(
            server, "SELECT state, last_reply, count(*) FROM deliveries WHERE state <> 'sent'"
            " GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 5")]
    m.log = logs[-1] if logs else None
    time.sleep(0.5)
    m.connections = sink.sessions
    return m


# --- measuring: memory against queue size ---------------------------------------------------

@dataclass
class QueueCase:
    queued: int
    attempted: int = 0  # recorded outcomes of the queued deliveries
    seconds: float = 0.0  # twistd ready to the last outcome recorded
    rss_ready: int = 0  # KiB, just after twistd said it is ready
    rss_done: int = 0  # KiB, once worked through (or at the time limit)
    hwm: int = 0  # VmHWM at that time
    finished: bool = False
    states: dict[str, int] = field(default_factory=dict)
    log: LogSummary | None = None

    @property
    def rate(self) -> float:
        return self.attempted / self.seconds if self.seconds > 0 else 0.0


FILL_QUEUE = """\
WITH m AS (SELECT id, account_id, row_number() OVER (ORDER BY id) - 1 AS k FROM messages)
INSERT INTO deliveries (message_id, account_id, recipient)
SELECT m.id, m.account_id, 'queued' || g || '@' || %(domain)s
FROM generate_series(0, %(n)s - 1) g
JOIN m ON m.k = (g / %(per)s) %% (SELECT count(*) FROM m)
"""

PROGRESS = """\
SELECT count(*) FILTER (WHERE state = 'queued' OR lease_owner IS NOT NULL),
       count(*) FILTER (WHERE state <> 'queued' AND lease_owner IS NULL)
FROM deliveries WHERE id > %(first)s
"""


def fill_queue(server: Server, n: int, per_message: int) -> int:
    """Replace what is waiting by `n` queued deliveries, `per_message` per message (of those
    submitted before); returns the largest delivery id before them."""
    if not sql(server, "SELECT count(*) FROM messages")[0][0]:
        raise BenchError("no message in the database to queue deliveries of")
    sql(server, "DELETE FROM deliveries WHERE state IN ('queued', 'deferred')")
    first = sql(server, "SELECT coalesce(max(id), 0) FROM deliveries")[0][0]
    started = time.monotonic()
    sql(server, FILL_QUEUE, {"n": n, "per": per_message, "domain": RECIPIENT_DOMAIN})
    sql(server, "VACUUM ANALYZE deliveries")
    log(f"queued {n} deliveries ({per_message} per message) with SQL in "
        f"{time.monotonic() - started:.1f} s")
    return first


async def work_through(server: Server, case: QueueCase, first: int, timeout: float) -> None:
    """Wait until every queued delivery has an outcome recorded; note twistd's memory."""
    started = time.monotonic()
    case.rss_ready = status_kb(server.pid, "VmRSS")
    sampler = MemorySampler(server.pid, interval=1.0)
    sampler.start()
    next_note = started + 30
    try:
        while True:
            remaining, done = sql(server, PROGRESS, {"first": first})[0]
            case.attempted = done
            now = time.monotonic()
            if remaining == 0:
                case.finished = True
                break
            if now - started > timeout:
                log(f"time limit: {done} of {case.queued} worked through in {timeout:.0f} s")
                break
            if now >= next_note:
                log(f"  ... {done} of {case.queued} after {now - started:.0f} s, "
                    f"twistd RSS {mib(status_kb(server.pid, 'VmRSS'))}")
                next_note += 30
            await asyncio.sleep(0.5 if case.queued > 5000 else 0.1)
        case.seconds = time.monotonic() - started
        case.rss_done = status_kb(server.pid, "VmRSS")
        case.hwm = status_kb(server.pid, "VmHWM")
    finally:
        await sampler.stop()


def run_queue_cases(root: Path, dns_port: int, args: argparse.Namespace) -> list[QueueCase]:
    cases: list[QueueCase] = []
    with Sink(defer=True) as sink:
        for n in (args.queue_small, args.queue_large):
            case = QueueCase(n)
            with mailgw_server(NO_DELIVERY, root=root, report=quiet_report) as server:
                first = fill_queue(server, n, args.recipients_per_message)
            logs: list[LogSummary] = []
            toml = delivery_toml(dns_port, sink.port, args.poll_interval, retry_base=86400)
            with mailgw_server(toml, root=root, report=delivery_log_reporter(logs)) as server:
                asyncio.run(work_through(server, case, first, args.queue_timeout))
                case.states = dict(sql(server, "SELECT state, count(*) FROM deliveries"
                                       " WHERE id > %(first)s GROUP BY 1", {"first": first}))
            case.log = logs[-1] if logs else None
            log(f"queue of {n}: {case.attempted} attempted in {case.seconds:.1f} s "
                f"({case.rate:.0f}/s); twistd RSS {mib(case.rss_ready)} when ready, "
                f"{mib(case.rss_done)} when done (VmHWM {mib(case.hwm)})")
            cases.append(case)
    return cases


# --- report ---------------------------------------------------------------------------------

def report(results: list[DeliveryMeasurement], cases: list[QueueCase],
           args: argparse.Namespace) -> None:
    print(f"\n=== Delivery benchmark (submission over STARTTLS + AUTH PLAIN, ~{args.size} B "
          f"multipart/alternative with {args.links} links, relayed/delivered to smtp-sink; "
          "loopback) ===")
    for m in results:
        print(f"\n{m.server.name}:")
        load = m.load
        print(f"  submitted: {load.accepted} accepted in {load.elapsed:.2f} s "
              f"({load.rate:.2f} msgs/s), {load.error_count} errors, "
              f"latency p50 {load.percentile(50) * 1000:.0f} ms / "
              f"p99 {load.percentile(99) * 1000:.0f} ms")
        for key, count in load.errors.most_common():
            print(f"    {count:6d} x {key}: {load.error_samples.get(key, '')}")
        extra = m.delivered - load.accepted
        print(f"  delivered: {m.delivered} at the sink in {m.seconds:.2f} s from the first "
              f"submission: {m.rate:.2f} msgs/s; the last one {m.drained_after:.2f} s after the "
              f"last submission; {m.connections} connections to the sink"
              + (f"; {-extra} MISSING (stalled)" if extra < 0 else "")
              + (f"; {extra} MORE than accepted (duplicates)" if extra > 0 else ""))
        total = load.accepted or 1
        cpu = m.memory
        print(f"  server CPU: {cpu.cpu_seconds:.1f} s ({1000 * cpu.cpu_seconds / total:.2f} ms "
              f"per message), of which the main process {cpu.root_cpu_seconds:.1f} s; "
              f"load generator {load.client_cpu:.1f} s")
        if m.server.name == "mailgw":
            print(f"  peak RSS: twistd {mib(cpu.root_hwm)} (VmHWM); embedded PostgreSQL "
                  f"{mib(cpu.children_rss)} summed RSS, {mib(cpu.children_pss)} PSS")
            print("  deliveries by state: " + ", ".join(f"{k} {v}" for k, v in
                                                        sorted(m.states.items())))
            for state, reply, count in m.not_sent:
                print(f"    {count:6d} x {state}: {reply[:160]}")
            if m.log is not None and m.log.problems:
                print(f"  log: {len(m.log.problems)} warning/error lines, e.g. "
                      f"{m.log.problems[0][:200]}")
        else:
            print(f"  peak memory of all Postfix processes: {mib(cpu.tree_rss)} summed RSS, "
                  f"{mib(cpu.tree_pss)} PSS")
            print("  maillog: " + ", ".join(f"{k} {v}" for k, v in m.postfix_log.items()))
    if cases:
        print(f"\nmailgw twistd RSS against queue size ({args.recipients_per_message} recipients "
              "per message, every RCPT deferred with 450, a fresh twistd per case):")
        for case in cases:
            status = "worked through" if case.finished else "NOT finished"
            print(f"  {case.queued:>7} queued: {status} {case.attempted} in {case.seconds:.1f} s "
                  f"({case.rate:.0f} attempts/s); RSS {mib(case.rss_ready)} when ready, "
                  f"{mib(case.rss_done)} after, VmHWM {mib(case.hwm)}")
            if case.log is not None:
                outcomes = ", ".join(f"{k} {v}" for k, v in case.log.outcomes.most_common())
                sample = "; ".join(f"{k}: {v}" for k, v in case.log.samples.items())
                print(f"           log: {outcomes or 'no outcomes'}" + (f" ({sample})"
                                                                        if sample else ""))
        if len(cases) == 2 and cases[0].rss_done:
            small, large = cases
            growth = (large.rss_done - small.rss_done) / small.rss_done
            print(f"  RSS with {large.queued} vs with {small.queued} queued: "
                  f"{100 * growth:+.1f}% (target within 10%)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=20, help="concurrent sessions (20)")
    parser.add_argument("--messages", type=int, default=5000,
                        help="messages submitted per server (5000)")
    parser.add_argument("--duration", type=float, default=60.0,
                        help="upper bound of each submission phase in seconds (60)")
    parser.add_argument("--size", type=int, default=5000, help="message size in bytes (5000)")
    parser.add_argument("--links", type=int, default=10,
                        help="links in each message part (10)")
    parser.add_argument("--stall", type=float, default=30.0,
                        help="stop waiting for deliveries after this many seconds without an "
                             "arrival (30)")
    parser.add_argument("--poll-interval", type=float, default=0.05,
                        help="mailgw's delivery.poll_interval (0.05)")
    parser.add_argument("--queue-small", type=int, default=1000,
                        help="deliveries queued in the first memory case (1000)")
    parser.add_argument("--queue-large", type=int, default=100000,
                        help="deliveries queued in the second memory case (100000)")
    parser.add_argument("--recipients-per-message", type=int, default=100,
                        help="queued deliveries per message in the memory cases (100)")
    parser.add_argument("--queue-timeout", type=float, default=240.0,
                        help="time limit for working through one queue, seconds (240)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="delivery measurements of each server, alternating (3)")
    parser.add_argument("--no-queue", action="store_true",
                        help="skip the memory-against-queue-size cases")
    parser.add_argument("--mailgw-log", type=Path,
                        help="keep a copy of mailgw's twistd log of the last round's run here")
    parser.add_argument("--serve-dns", metavar="ZONE_JSON", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_dns:
        serve_dns(args.serve_dns)
        return 0
    if os.geteuid() != 0:
        print("delivery: run as root (Postfix, smtp-sink and the embedded PostgreSQL need it)",
              file=sys.stderr)
        return 2
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, Interrupts.handler)
    results: list[DeliveryMeasurement] = []
    cases: list[QueueCase] = []
    failed = False
    root: Path | None = None
    started = time.monotonic()
    try:
        ensure_postfix()
        with dns_server() as dns_port:
            # One server at a time, each with its own sink, so that they never compete.
            for _ in range(args.rounds):
                with Sink() as sink:
                    results.append(run_postfix(sink, args))
                if root is not None:
                    with Interrupts.shield():
                        shutil.rmtree(root, ignore_errors=True)
                root = make_temp_dir("mailgw-bench-delivery-")
                with Sink() as sink:
                    results.append(run_mailgw(root, dns_port, sink, args))
            if not args.no_queue:
                cases = run_queue_cases(root, dns_port, args)
    except BenchError as e:
        print(f"delivery: {e}", file=sys.stderr, flush=True)
        failed = True
    except KeyboardInterrupt:
        print("delivery: interrupted; servers stopped and temporary files removed",
              file=sys.stderr)
        return 130
    finally:
        if root is not None:
            with Interrupts.shield():
                shutil.rmtree(root, ignore_errors=True)
    log(f"whole run: {time.monotonic() - started:.0f} s")
    rounds = Rounds("postfix")
    for postfix, mailgw in zip(results[::2], results[1::2], strict=False):
        rounds.add(postfix.rate, mailgw.rate, postfix.ceiling, mailgw.ceiling)
    if results:
        report(results, cases, args)
        rounds.print("delivered msgs/s")
    mailgw, ratio = rounds.mailgw, rounds.ratio
    print()
    print(f"RESULT delivery: {mailgw:.2f} msgs/s, ratio {ratio:.2f} vs postfix "
          f"(target {TARGET_RATIO})")
    return 1 if failed or not rounds.pairs else 0


if __name__ == "__main__":
    sys.exit(main())
