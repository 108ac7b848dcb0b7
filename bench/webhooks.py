"""Webhook benchmark: signed posts per second from mailgw's PostgreSQL queue to a local
receiver, against a bare treq client posting the same bodies in the same run.

One run, on loopback only:

1. The receiver (this script with --serve-receiver, a process of its own): a minimal
   asyncio HTTP/1.1 server that answers `200` with an empty body to every POST on a
   keep-alive connection, counts the posts with the time of the last one, keeps the
   bodies and webhook ids of a mailgw phase, and checks the signature of every 50th
   post with mailgw.events.webhooks.signing.verify.
2. mailgw as an operator starts it (`mailgw init --demo`, `twistd -n mailgw`;
   delivery off), with `[webhooks]` at its defaults except `max_queue_per_endpoint`
   (above the events of a phase, so that nothing is dropped) and `allow_http_hosts`;
   then `mailgw webhook add demo http://127.0.0.1:<port>/hook --events sent`, the
   secret from its last line. With SQL: one SMTP send of `--events` (20,000)
   deliveries (tracking.new_send), its message given a client address and two custom
   headers, so that the `sent` payloads are full-sized; then VACUUM ANALYZE and a
   CHECKPOINT, so that no background work on these rows lands in a phase.
3. mailgw phase: `--events` `sent` events, one per delivery, inserted with one
   statement (one transaction); the trigger of migration 010 notes them in
   webhook_outbox. The clock runs from that commit until the receiver has counted as
   many posts; then webhook_outbox and webhook_deliveries must both be empty (every
   outcome recorded). Posts sent twice (the same webhook id) are reported.
4. treq phase: a bare treq client (this script with --serve-peer, same Python, same
   machine, no database) posts the bodies the receiver kept from the last mailgw
   phase, `--connections` (10, mailgw's `connections_per_endpoint`) at a time, each
   signed when it is sent, with the same headers. The clock runs from its start
   until the receiver has counted them all.
5. A warm-up phase of `--warmup-events` (500), then `--rounds` (3) rounds, mailgw and
   treq in alternating order; each round's ratio compares two measurements taken
   seconds apart, the result is the median. CPU per post: twistd's (utime+stime of
   /proc/<pid>/stat), its PostgreSQL cluster's, the treq client's and the
   receiver's; PostgreSQL's transactions per post (pg_stat_database); twistd's peak
   RSS.
6. Last `RESULT webhooks: <posts/s> posts/s, ratio <r> vs treq (target 0.5)`.

Run it as root with `make bench-webhooks` (or `.venv/bin/python bench/webhooks.py --help`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    LOOPBACK,
    REPO,
    VENV_BIN,
    BenchError,
    Interrupts,
    MemorySampler,
    Rounds,
    Server,
    cpu_ceiling,
    cpu_seconds,
    embedded_dsn,
    free_port,
    log,
    mailgw_server,
    make_temp_dir,
    mib,
    run,
)
from common import run_sql as sql  # noqa: E402
from delivery import stop_process as stop_helper  # noqa: E402
from tracking import cluster_cpu, http_port, new_send  # noqa: E402

TARGET_RATIO = 0.5
HOOK_PATH = "/hook"
# Every how many posts the receiver checks a signature (HMAC over the body: cheap, but
# not free, and the receiver must not be what is measured).
VERIFY_EVERY = 50
# A phase fails when the receiver counts no new post for this long (mailgw's feed has
# been seen to take 30-50 s over one transaction: see bench/README.md).
STALL_SECONDS = 90.0
# After the last post, how long the outcomes may take to be written.
DRAIN_SECONDS = 30.0
USER_AGENT = "mailgw-webhooks"


def webhooks_toml(events: int) -> str:
    """The end of the config (common.mailgw_server): delivery off, webhooks on, the
    queue cap above a phase's events; everything else at mailgw's defaults."""
    return f"""\
[delivery]
enabled = false

[webhooks]
enabled = true
max_queue_per_endpoint = {max(10000, 2 * events)}
allow_http_hosts = ["{LOOPBACK}", "localhost"]
"""


# --- the receiver --------------------------------------------------------------------------

_CONTENT_LENGTH = re.compile(rb"(?im)^content-length: *(\d+)")
_SIGNATURE = re.compile(rb"(?im)^x-mailgw-signature: *([^\r\n]+)")
_WEBHOOK_ID = re.compile(rb"(?im)^x-mailgw-webhook-id: *([^\r\n]+)")
_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class Tally:
    """What the receiver has seen since the last reset."""

    def __init__(self) -> None:
        from mailgw.events.webhooks.signing import verify

        self.verify = verify
        self.reset({})

    def reset(self, settings: dict) -> None:
        self.secret: str = settings.get("secret", "")
        self.keep: bool = settings.get("keep", False)
        self.posts = 0
        self.first = self.last = 0.0
        self.ids: set[bytes] = set()
        self.bodies: list[bytes] = []
        self.verified = self.bad_signatures = self.unframed = 0

    def post(self, head: bytes, body: bytes) -> None:
        self.last = time.monotonic()
        if not self.posts:
            self.first = self.last
        self.posts += 1
        if self.keep:
            webhook_id = _WEBHOOK_ID.search(head)
            self.ids.add(webhook_id[1] if webhook_id else b"")
            self.bodies.append(body)
        if self.secret and self.posts % VERIFY_EVERY == 1:
            signature = _SIGNATURE.search(head)
            if signature and self.verify(self.secret, signature[1].decode(), body, time.time()):
                self.verified += 1
            else:
                self.bad_signatures += 1

    def stats(self) -> dict:
        return {"posts": self.posts, "first": self.first, "last": self.last,
                "distinct_ids": len(self.ids), "verified": self.verified,
                "bad_signatures": self.bad_signatures, "unframed": self.unframed}


class _ReceiverProtocol(asyncio.Protocol):
    """HTTP/1.1 with Content-Length bodies, keep-alive, one request at a time."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.buffer = b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end]
            length = _CONTENT_LENGTH.search(head)
            if length is None and head.startswith(b"POST"):
                self.tally.unframed += 1  # chunked: not what a webhook sender does here
                self.transport.write(b"HTTP/1.1 411 Length Required\r\nConnection: close"
                                     b"\r\nContent-Length: 0\r\n\r\n")
                self.transport.close()
                return
            total = end + 4 + (int(length[1]) if length else 0)
            if len(self.buffer) < total:
                return
            body, self.buffer = self.buffer[end + 4:total], self.buffer[total:]
            self.transport.write(self.answer(head, body))

    def answer(self, head: bytes, body: bytes) -> bytes:
        path = head.split(b" ", 2)[1]
        if path == HOOK_PATH.encode():
            self.tally.post(head, body)
            return _OK
        if path == b"/control/stats":
            reply = json.dumps(self.tally.stats()).encode()
        elif path == b"/control/reset":
            self.tally.reset(json.loads(body or b"{}"))
            reply = b"{}"
        elif path == b"/control/dump":  # the kept bodies, one a line, into a file
            Path(json.loads(body)["path"]).write_bytes(b"".join(
                b + b"\n" for b in self.tally.bodies))
            reply = json.dumps({"bodies": len(self.tally.bodies)}).encode()
        else:
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d"
                b"\r\n\r\n" % len(reply)) + reply


def serve_receiver(port: int) -> None:
    """The receiver's process: serves until SIGTERM, after printing `receiver ready`."""
    sys.path.insert(0, str(REPO))

    async def serve() -> None:
        tally = Tally()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _ReceiverProtocol(tally), LOOPBACK, port,
                                          backlog=1024)
        stopped = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stopped.set_result, None)
        print("receiver ready", flush=True)
        # Nobody reads the pipe from now on: a flood of error lines must not fill it and
        # stop the receiver (missing posts show in its counts).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        async with server:
            await stopped

    asyncio.run(serve())


class Receiver:
    """The receiver's process, seen from the benchmark: its port, pid and control."""

    def __init__(self, process: subprocess.Popen, port: int) -> None:
        self.process, self.port = process, port
        self.url = f"http://{LOOPBACK}:{port}{HOOK_PATH}"

    def control(self, action: str, **settings) -> dict:
        request = urllib.request.Request(
            f"http://{LOOPBACK}:{self.port}/control/{action}",
            data=json.dumps(settings).encode() if action != "stats" else None)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    @property
    def cpu(self) -> float:
        return cpu_seconds(self.process.pid, False)


# --- the peer: a bare treq client ----------------------------------------------------------

def serve_peer(url: str, secret: str, connections: int, bodies_path: str) -> None:
    """The treq client's process: loads the bodies, says `peer ready`, waits for a line on
    stdin, posts them all `connections` at a time and prints what it did as JSON."""
    sys.path.insert(0, str(REPO))
    import treq
    from twisted.internet import defer, reactor
    from twisted.web.client import Agent, HTTPConnectionPool

    from mailgw.events.webhooks.signing import SIGNATURE_HEADER, sign

    bodies = Path(bodies_path).read_bytes().splitlines()
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = connections
    agent = Agent(reactor, pool=pool)
    todo = iter(enumerate(bodies, 1))
    outcome = {"posts": 0, "errors": 0, "error": ""}
    print("peer ready", flush=True)
    sys.stdin.readline()

    async def poster() -> None:
        for number, body in todo:
            headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                       SIGNATURE_HEADER: sign(secret, int(time.time()), body),
                       "X-Mailgw-Webhook-Id": str(number)}
            try:
                response = await treq.post(url, data=body, headers=headers, agent=agent,
                                           allow_redirects=False)
                await treq.content(response)
            except Exception as e:  # counted; the phase reports it
                outcome["errors"] += 1
                outcome["error"] = repr(e)
                continue
            if 200 <= response.code < 300:
                outcome["posts"] += 1
            else:
                outcome["errors"] += 1
                outcome["error"] = f"answered {response.code}"

    async def main() -> None:
        cpu, started = time.process_time(), time.monotonic()
        await defer.gatherResults([defer.ensureDeferred(poster()) for _ in range(connections)])
        outcome.update(started=started, seconds=time.monotonic() - started,
                       cpu=time.process_time() - cpu)
        print(json.dumps(outcome), flush=True)
        await pool.closeCachedConnections()

    defer.ensureDeferred(main()).addErrback(print).addBoth(lambda _: reactor.stop())
    reactor.run()


# --- helpers' processes --------------------------------------------------------------------

@contextmanager
def helper(name: str, *argv: str) -> Iterator[subprocess.Popen]:
    """This script with `argv` in a process of its own (stdin a pipe), once it has printed
    `<name> ready`; SIGTERM on exit."""
    process = subprocess.Popen(
        [sys.executable, __file__, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        start_new_session=True)
    try:
        said = read_line(process, 60)
        if said != f"{name} ready":
            with suppress(subprocess.TimeoutExpired):
                process.wait(5)
            if process.poll() is not None:  # it died: what it said
                rest = _unread.pop(process.pid, b"") + process.stdout.read()
                said += "\n" + rest.decode(errors="replace")[-2000:]
            raise BenchError(f"the {name} did not start: {said}")
        yield process
    finally:
        with Interrupts.shield():
            stop_helper(process)


_unread: dict[int, bytes] = {}  # what a helper printed past the last line read, by pid


def read_line(process: subprocess.Popen, timeout: float) -> str:
    """The next line the process prints ("" at its end), waiting at most `timeout`
    seconds; read from the pipe directly, so that no line waits in a buffer that
    select() does not see."""
    deadline = time.monotonic() + timeout
    pending = _unread.pop(process.pid, b"")
    while b"\n" not in pending:
        ready, _, _ = select.select([process.stdout], [], [],
                                    max(0.0, deadline - time.monotonic()))
        if not ready:
            raise BenchError(f"no answer from pid {process.pid} within {timeout:.0f} s")
        chunk = os.read(process.stdout.fileno(), 65536)
        if not chunk:
            return pending.decode(errors="replace").strip()
        pending += chunk
    line, _unread[process.pid] = pending.split(b"\n", 1)
    return line.decode(errors="replace").strip()


# --- data ----------------------------------------------------------------------------------

# What an SMTP submission leaves in its message row and W-1's `sent` payload reports.
SMTP_MESSAGE = """\
WITH send AS (UPDATE sends SET origin = 'smtp', subject = %(subject)s WHERE id = %(send)s
              RETURNING id)
UPDATE messages SET client_ip = '203.0.113.25', subject = %(subject)s,
 custom_headers = '{"X-Campaign-Ref": "spring-sale-2025", "X-Customer-Id": "C-0042137"}'
FROM send WHERE messages.send_id = send.id"""

# One `sent` event per delivery of the send, in one statement: the delivery engine's
# details (the remote reply); the trigger notes each in webhook_outbox.
SENT_EVENTS = """\
INSERT INTO events (account_id, send_id, message_id, delivery_id, contact_id, recipient,
                    type, details)
SELECT d.account_id, %(send)s, d.message_id, d.id, d.contact_id, d.recipient, 'sent',
       jsonb_build_object('reply', '250 2.0.0 Ok: queued as '
                          || upper(substr(md5(d.id::text || %(round)s), 1, 12)))
FROM deliveries d JOIN messages m ON m.id = d.message_id AND m.send_id = %(send)s
ORDER BY d.id LIMIT %(n)s"""

QUEUE_LEFT = "SELECT (SELECT count(*) FROM webhook_outbox), (SELECT count(*) FROM " \
             "webhook_deliveries)"
COMMITS = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
# mailgw's /metrics (O-5): the group commits of webhook outcomes, their items and time.
OUTCOME_COMMITS = re.compile(r'^mailgw_group_commit_(batch_size_count|batch_size_sum|'
                             r'seconds_sum)\{batch="record_webhook_outcomes"\} (\S+)$', re.M)


def outcome_commits(server: Server) -> dict[str, float]:
    """mailgw's counts so far: outcome commits (batch_size_count), outcomes written
    (batch_size_sum) and seconds spent in those transactions (seconds_sum)."""
    url = f"http://{LOOPBACK}:{http_port(server)}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return {name: float(value) for name, value in OUTCOME_COMMITS.findall(text)}


def add_endpoint(server: Server, url: str) -> str:
    """`mailgw webhook add <demo account> <url> --events sent`: the secret (its last line)."""
    demo = json.loads((server.home / "state" / "demo.json").read_text())
    said = run([str(VENV_BIN / "mailgw"), "-c", str(server.home / "mailgw.toml"), "webhook",
                "add", demo.get("account", "demo"), url, "--events", "sent"], cwd=REPO,
               env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.strip().splitlines()
    log(f"mailgw webhook add: {said[0]}")
    return said[-1]


# --- phases --------------------------------------------------------------------------------

@dataclass
class Phase:
    name: str  # "mailgw", "treq" or "warm-up"
    posts: int  # posts the receiver counted
    wanted: int
    seconds: float  # from the start (mailgw: the events' commit) to the last post counted
    first_post: float  # seconds from the start to the first post counted
    sender_cpu: float  # twistd's main process, or the treq client
    database_cpu: float  # the PostgreSQL cluster (0 for treq)
    receiver_cpu: float
    distinct_ids: int = 0  # mailgw: webhook ids counted (fewer than posts: some posted twice)
    commits: int = 0  # mailgw: PostgreSQL transactions committed over the phase
    outcome_commits: int = 0  # mailgw: group commits of outcomes over the phase
    outcome_seconds: float = 0.0  # mailgw: the time those transactions took, summed
    peak_rss_kb: int = 0
    errors: str = ""

    @property
    def rate(self) -> float:
        return self.posts / self.seconds if self.seconds and self.posts >= self.wanted else 0.0

    @property
    def ceiling(self) -> float:
        return cpu_ceiling(self.posts, self.sender_cpu + self.database_cpu, self.receiver_cpu)

    def per_post(self, seconds: float) -> float:
        return seconds / self.posts * 1000 if self.posts else 0.0


async def wait_for_posts(receiver: Receiver, wanted: int, started: float,
                         timeout: float) -> dict:
    """Poll the receiver until it has counted `wanted` posts; stop waiting when none comes
    for STALL_SECONDS, or after `timeout`."""
    progress, progress_at = -1, time.monotonic()
    while True:
        stats = receiver.control("stats")
        now = time.monotonic()
        if stats["posts"] >= wanted:
            return stats
        if stats["posts"] != progress:
            progress, progress_at = stats["posts"], now
        if now - progress_at > STALL_SECONDS or now - started > timeout:
            return stats
        await asyncio.sleep(0.05)


async def mailgw_phase(name: str, server: Server, receiver: Receiver, secret: str,
                       send_id: int, events: int, number: int, timeout: float) -> Phase:
    dsn = embedded_dsn(server)
    receiver.control("reset", secret=secret, keep=True)
    sampler = MemorySampler(server.pid)
    sampler.start()
    database_cpu, receiver_cpu = cluster_cpu(server.pid), receiver.cpu
    commits, outcomes = sql(dsn, COMMITS)[0][0], outcome_commits(server)
    sql(dsn, SENT_EVENTS, {"send": send_id, "n": events, "round": str(number)})
    started = time.monotonic()
    stats = await wait_for_posts(receiver, events, started, timeout)
    left, drain_until = sql(dsn, QUEUE_LEFT)[0], time.monotonic() + DRAIN_SECONDS
    while any(left) and time.monotonic() < drain_until:
        await asyncio.sleep(0.05)
        left = sql(dsn, QUEUE_LEFT)[0]
    peaks = await sampler.stop()
    database_cpu = cluster_cpu(server.pid) - database_cpu
    receiver_cpu = receiver.cpu - receiver_cpu
    await asyncio.sleep(1.1)  # pg_stat_database is updated at most once a second
    commits = sql(dsn, COMMITS)[0][0] - commits
    outcomes = {name: value - outcomes.get(name, 0.0)
                for name, value in outcome_commits(server).items()}
    errors = []
    if stats["posts"] < events:
        errors.append(f"only {stats['posts']} of {events} posts arrived")
    if any(left):
        errors.append(f"left in webhook_outbox / webhook_deliveries: {left[0]} / {left[1]}")
    if stats["bad_signatures"] or stats["unframed"]:
        errors.append(f"{stats['bad_signatures']} bad signatures, {stats['unframed']} posts "
                      "without Content-Length")
    phase = Phase(name, stats["posts"], events, stats["last"] - started,
                  stats["first"] - started if stats["posts"] else 0.0, peaks.root_cpu_seconds,
                  database_cpu, receiver_cpu, stats["distinct_ids"], commits,
                  int(outcomes.get("batch_size_count", 0)), outcomes.get("seconds_sum", 0.0),
                  peaks.root_hwm, "; ".join(errors))
    report_phase(phase, stats)
    return phase


async def treq_phase(receiver: Receiver, secret: str, bodies: Path, connections: int,
                     timeout: float) -> Phase:
    wanted = len(bodies.read_bytes().splitlines())
    receiver.control("reset", secret=secret, keep=False)
    with helper("peer", "--serve-peer", receiver.url, secret, str(connections),
                str(bodies)) as peer:
        receiver_cpu = receiver.cpu
        peer.stdin.write(b"go\n")
        peer.stdin.flush()
        stats = await wait_for_posts(receiver, wanted, time.monotonic(), timeout)
        receiver_cpu = receiver.cpu - receiver_cpu
        said = ""
        deadline = time.monotonic() + 10
        while not said.startswith("{") and time.monotonic() < deadline:
            said = read_line(peer, 10)
    if not said.startswith("{"):
        raise BenchError(f"the treq client said {said!r}")
    outcome = json.loads(said)
    started = outcome["started"]
    errors = f"{outcome['errors']} errors, the last: {outcome['error']}" \
        if outcome["errors"] else ""
    phase = Phase("treq", stats["posts"], wanted, stats["last"] - started,
                  stats["first"] - started if stats["posts"] else 0.0, outcome["cpu"], 0.0,
                  receiver_cpu, errors=errors)
    report_phase(phase, stats)
    return phase


def report_phase(phase: Phase, stats: dict) -> None:
    cpu = (f"CPU per post {phase.per_post(phase.sender_cpu):.3f} ms"
           + (f" + PostgreSQL {phase.per_post(phase.database_cpu):.3f} ms"
              if phase.database_cpu else "")
           + f", receiver {phase.per_post(phase.receiver_cpu):.3f} ms")
    extra = ""
    if phase.commits and phase.posts:
        extra = f", {phase.commits / phase.posts:.2f} commits per post"
    if phase.outcome_commits:
        extra += (f" (outcomes: {phase.posts / phase.outcome_commits:.1f} a commit, "
                  f"{phase.outcome_seconds / phase.outcome_commits * 1000:.1f} ms a "
                  "transaction)")
    if phase.distinct_ids and phase.distinct_ids < phase.posts:
        extra += f", {phase.posts - phase.distinct_ids} posted twice"
    if phase.first_post > 5:
        extra += (f"; NOTE: nothing posted for {phase.first_post:.0f} s after the commit (the "
                  "feed's first transaction: see bench/README.md)")
    log(f"{phase.name}: {phase.posts} posts in {phase.seconds:.2f} s = {phase.rate:.0f} "
        f"posts/s (first after {phase.first_post:.2f} s); {cpu}{extra}; signatures checked "
        f"{stats['verified']}" + (f"; PROBLEM: {phase.errors}" if phase.errors else ""))


async def run_rounds(args: argparse.Namespace, work: Path) -> tuple[list[Phase], Rounds]:
    phases: list[Phase] = []
    rounds = Rounds("treq")
    bodies = work / "bodies.jsonl"  # the last mailgw phase's, for the treq client
    timeout = args.phase_timeout
    with helper("receiver", "--serve-receiver", str(free_port())) as receiver_process:
        receiver = Receiver(receiver_process, int(receiver_process.args[-1]))
        log(f"receiver on {receiver.url} (pid {receiver_process.pid})")
        with mailgw_server(webhooks_toml(args.events)) as server:
            dsn = embedded_dsn(server)
            secret = add_endpoint(server, receiver.url)
            send_id, deliveries = new_send(dsn, "webhooks bench", args.events)
            sql(dsn, SMTP_MESSAGE, {"send": send_id, "subject": "Spring sale: 20% off"})
            # Autovacuum of these rows (and the first checkpoint) would land in a phase.
            sql(dsn, "VACUUM ANALYZE sends, messages, deliveries")
            sql(dsn, "CHECKPOINT")
            log(f"an SMTP send of {len(deliveries)} deliveries")
            warmup = await mailgw_phase("warm-up", server, receiver, secret, send_id,
                                        args.warmup_events, 0, timeout)
            if warmup.errors:
                raise BenchError(f"the warm-up failed: {warmup.errors}")
            receiver.control("dump", path=str(bodies))
            sample = bodies.read_bytes().split(b"\n", 1)[0]
            log(f"a body ({len(sample)} bytes): {sample.decode()}")
            for number in range(1, args.rounds + 1):
                # mailgw first in odd rounds; the treq client posts the bodies of the
                # mailgw phase before it (this round's or the last round's).
                order = ("mailgw", "treq") if number % 2 else ("treq", "mailgw")
                log(f"round {number} of {args.rounds}: {' then '.join(order)}")
                pair: dict[str, Phase] = {}
                for which in order:
                    if which == "mailgw":
                        pair[which] = await mailgw_phase("mailgw", server, receiver, secret,
                                                         send_id, args.events, number, timeout)
                        receiver.control("dump", path=str(bodies))
                    else:
                        pair[which] = await treq_phase(receiver, secret, bodies,
                                                       args.connections, timeout)
                phases.extend(pair[which] for which in order)
                rounds.add(pair["treq"].rate, pair["mailgw"].rate, pair["treq"].ceiling,
                           pair["mailgw"].ceiling)
    return phases, rounds


def report(phases: list[Phase], rounds: Rounds) -> None:
    print("\nper phase: posts, seconds, posts/s, seconds to the first post, CPU ms per post "
          "(sender: twistd's main process or the treq client; PostgreSQL; receiver), "
          "PostgreSQL commits per post, twistd's peak RSS")
    for phase in phases:
        commits = f"{phase.commits / phase.posts:5.2f}" if phase.commits and phase.posts \
            else "    -"
        rss = mib(phase.peak_rss_kb) if phase.peak_rss_kb else "-"
        print(f"  {phase.name:7} {phase.posts:6} {phase.seconds:7.2f} {phase.rate:7.0f} "
              f"{phase.first_post:5.2f}  {phase.per_post(phase.sender_cpu):6.3f} "
              f"{phase.per_post(phase.database_cpu):6.3f} {phase.per_post(phase.receiver_cpu):6.3f}"
              f"  {commits}  {rss}" + (f"  PROBLEM: {phase.errors}" if phase.errors else ""))
    posts = sum(p.posts for p in phases)
    receiver = sum(p.receiver_cpu for p in phases) / posts if posts else 0.0
    if receiver:
        print(f"\nthe receiver: {receiver * 1000:.3f} ms of CPU a post over all phases, so "
              f"about {1 / receiver:.0f} posts/s on one core")
    rounds.print("posts/s")
    print("  (here the load generator is the receiver, and the server the sender: twistd "
          "with PostgreSQL, or the treq client)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20000,
                        help="sent events (posts) per phase (20000)")
    parser.add_argument("--warmup-events", type=int, default=500,
                        help="events of the warm-up phase, mailgw only (500)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    parser.add_argument("--connections", type=int, default=10,
                        help="the treq client's concurrent posts: mailgw's "
                        "webhooks.connections_per_endpoint (10)")
    parser.add_argument("--phase-timeout", type=float, default=180.0,
                        help="seconds a phase may take at most (180)")
    parser.add_argument("--serve-receiver", metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-peer", nargs=4, metavar=("URL", "SECRET", "CONNECTIONS",
                                                          "BODIES"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_receiver:
        serve_receiver(int(args.serve_receiver))
        return 0
    if args.serve_peer:
        url, secret, connections, bodies = args.serve_peer
        serve_peer(url, secret, int(connections), bodies)
        return 0
    if os.geteuid() != 0:
        print("webhooks: run as root (the embedded PostgreSQL runs as the mailgw user)",
              file=sys.stderr)
        return 2
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, Interrupts.handler)
    started = time.monotonic()
    work = make_temp_dir("mailgw-bench-webhooks-")
    try:
        phases, rounds = asyncio.run(run_rounds(args, work))
    except BenchError as e:
        print(f"webhooks: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("webhooks: interrupted; processes stopped and temporary files removed",
              file=sys.stderr)
        return 130
    finally:
        with Interrupts.shield():
            shutil.rmtree(work, ignore_errors=True)
    log(f"whole run: {time.monotonic() - started:.0f} s")
    report(phases, rounds)
    print()
    print(f"RESULT webhooks: {rounds.mailgw:.0f} posts/s, ratio {rounds.ratio:.2f} vs treq "
          f"(target {TARGET_RATIO})")
    return 1 if any(p.errors for p in phases) or not rounds.pairs else 0


if __name__ == "__main__":
    sys.exit(main())
