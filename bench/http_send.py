"""HTTP send benchmark: `POST /v1/email` against mailgw's own SMTP ingest of the same message.

One run, on loopback only:

1. Starts mailgw the way an operator does (`mailgw init --demo`, then `twistd -n
   mailgw`, common.mailgw_server), with delivery off and the per-key request rate
   lifted (the benchmark is one key in a hurry).
2. SMTP: the load generator (bench/loadgen.py), 20 sessions with STARTTLS and
   AUTH PLAIN, pipelined, each message one recipient and a ~5 KB HTML-only body
   (mailgw generates the text part).
3. HTTP: 20 keep-alive connections, each posting `/v1/email` with one recipient and
   the same HTML as the body, one request at a time; a request counts when it is
   answered 200 `Messages sent!`, which mailgw sends only after the commit.
4. Both loads send 200 warm-up messages, then measure 10,000 messages or 30 s; the
   order of the two alternates per round, and mailgw is started afresh each round.
   twistd's memory and the CPU of its process tree are sampled throughout.
5. The last line is `RESULT http_send: <msgs/s> msgs/s, ratio <http/smtp> vs
   smtp_ingest (target 1.0)`, the medians of the rounds.

Run it as root with `make bench-http` (or `.venv/bin/python bench/http_send.py --help`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    LOOPBACK,
    BenchError,
    Interrupts,
    MemoryPeaks,
    MemorySampler,
    Rounds,
    Server,
    cpu_ceiling,
    log,
    mailgw_server,
    mib,
)
from loadgen import LoadResult, LoadSpec, _Run, build_message_template, run_load

TARGET_RATIO = 1.0
# The config's [http] table ends where this begins (common.mailgw_server): the rate
# limit lifted, then delivery off.
HTTP_BENCH_TOML = """\
requests_per_second_per_key = 1000000.0
request_burst_per_key = 1000000

[delivery]
enabled = false
"""
HTTP_PORT = re.compile(r"mailgw ready: .*http\.listener=(\d+)")


def html_body(sender: str, size: int) -> str:
    """The HTML of the SMTP load's HTML-only message, as the text of a JSON field."""
    _, body = build_message_template(sender, size, html_only=True)
    return body.decode().replace("\r\n..", "\r\n.").removesuffix("\r\n")


async def _http_session(run: _Run, port: int, key: str, html: str) -> None:
    """One keep-alive connection posting one message at a time."""
    spec = run.spec
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        while (seq := run.take()) is not None:
            body = json.dumps({
                "from": {"email": spec.sender, "name": "Load Generator"},
                "to": [{"email": f"user{seq}@{spec.recipient_domain}"}],
                "subject": "Load test newsletter", "body": html}).encode()
            started = time.monotonic()
            writer.write(b"POST /v1/email HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (LOOPBACK.encode(), key.encode(), len(body), body))
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            answer = await reader.readexactly(length)
            status = status_line.split(b" ")[1:2]
            if status == [b"200"] and b"Messages sent!" in answer:
                run.accepted(time.monotonic() - started)
            else:
                run.error(f"HTTP {status[0].decode() if status else '?'}",
                          answer.decode("utf-8", "replace"))
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        run.error(f"connection {type(e).__name__}", str(e))
    finally:
        writer.close()


async def run_http_load(spec: LoadSpec, port: int, key: str) -> LoadResult:
    """loadgen.run_load with HTTP connections: the same counting, warm-up and bounds."""
    html = html_body(spec.sender, spec.message_size)
    return await run_load(spec, lambda run: _http_session(run, port, key, html))


@dataclass
class Measurement:
    door: str  # "smtp" or "http"
    load: LoadResult
    memory: MemoryPeaks

    @property
    def messages(self) -> int:
        return self.load.accepted + self.load.warmup_accepted

    @property
    def ceiling(self) -> float:
        return cpu_ceiling(self.messages, self.memory.cpu_seconds, self.load.client_cpu)


async def measure(door: str, server: Server, http_port: int, key: str,
                  args: argparse.Namespace) -> Measurement:
    spec = LoadSpec(host=LOOPBACK, port=server.port, username=server.username,
                    password=server.password, sender=server.sender, sessions=args.sessions,
                    messages=args.messages, warmup=args.warmup, duration=args.duration,
                    message_size=args.size, html_only=True)
    sampler = MemorySampler(server.pid)
    sampler.start()
    log(f"{door}: {spec.sessions} {'connections' if door == 'http' else 'sessions'}, "
        f"{spec.warmup} warm-up + {spec.messages} messages (at most {spec.duration:.0f} s)")
    limit = args.duration + 120
    try:
        async with asyncio.timeout(limit):
            load = await (run_http_load(spec, http_port, key) if door == "http"
                          else run_load(spec))
    except TimeoutError:
        raise BenchError(f"{door}: the load did not finish within {limit:.0f} s") from None
    finally:
        memory = await sampler.stop()
    log(f"{door}: {load.rate:.2f} msgs/s, {load.error_count} errors")
    return Measurement(door, load, memory)


def http_port_and_key(server: Server) -> tuple[int, str]:
    assert server.home is not None
    match = HTTP_PORT.search((server.home / "twistd.log").read_text(errors="replace"))
    if match is None:
        raise BenchError("no http.listener port in mailgw's 'ready' line")
    demo = json.loads((server.home / "state" / "demo.json").read_text())
    return int(match[1]), demo["api_key"]


def report(results: list[Measurement], rounds: Rounds) -> None:
    print("\n=== HTTP send benchmark (POST /v1/email, keep-alive) against SMTP ingest "
          "(STARTTLS + AUTH PLAIN, pipelined); 1 recipient, ~5 KB HTML-only, loopback ===")
    for m in results:
        per_message = 1000 * m.memory.cpu_seconds / m.messages if m.messages else 0.0
        print(f"\n{m.door}:")
        print("  " + m.load.summary().replace("\n", "\n  "))
        print(f"  server CPU: {m.memory.cpu_seconds:.1f} s ({per_message:.2f} ms per "
              f"message), of which twistd {m.memory.root_cpu_seconds:.1f} s")
        print(f"  peak RSS: twistd {mib(m.memory.root_hwm)} (VmHWM); embedded PostgreSQL "
              f"{mib(m.memory.children_rss)} summed RSS, {mib(m.memory.children_pss)} PSS")
    rounds.print("accepted msgs/s; the peer is mailgw's own SMTP ingest")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=20,
                        help="concurrent SMTP sessions and HTTP connections (20)")
    parser.add_argument("--messages", type=int, default=10000,
                        help="measured messages per load (10000)")
    parser.add_argument("--warmup", type=int, default=200,
                        help="messages sent before the clock starts (200)")
    parser.add_argument("--duration", type=float, default=30.0,
                        help="upper bound of each measured phase in seconds (30)")
    parser.add_argument("--size", type=int, default=5000, help="message size in bytes (5000)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds, each measuring both doors on a fresh mailgw (3)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("http_send: run as root (the embedded PostgreSQL needs it)", file=sys.stderr)
        return 2
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, Interrupts.handler)
    pairs: list[tuple[Measurement, Measurement]] = []
    failed = False
    try:
        for number in range(args.rounds):
            with mailgw_server(HTTP_BENCH_TOML) as server:
                http_port, key = http_port_and_key(server)
                doors = ("smtp", "http") if number % 2 == 0 else ("http", "smtp")
                measured = {door: asyncio.run(measure(door, server, http_port, key, args))
                            for door in doors}
                pairs.append((measured["smtp"], measured["http"]))
    except BenchError as e:
        print(f"http_send: {e}", file=sys.stderr, flush=True)
        failed = True
    except KeyboardInterrupt:
        print("http_send: interrupted; mailgw stopped and temporary files removed",
              file=sys.stderr)
        return 130
    rounds = Rounds("smtp")
    for smtp, http in pairs:
        rounds.add(smtp.load.rate, http.load.rate, smtp.ceiling, http.ceiling)
    if pairs:
        report([m for pair in pairs for m in pair], rounds)
        peak = max(m.memory.root_hwm for pair in pairs for m in pair)
        print(f"\npeak RSS of twistd over the run: {mib(peak)}")
    print()
    print(f"RESULT http_send: {rounds.mailgw:.2f} msgs/s, ratio {rounds.ratio:.2f} vs "
          f"smtp_ingest (target {TARGET_RATIO})")
    return 1 if failed or not rounds.pairs else 0


if __name__ == "__main__":
    sys.exit(main())
