"""SMTP ingest benchmark: authenticated submissions per second, mailgw against Postfix.

One run, on loopback only:

1. Installs Postfix (and Cyrus SASL) with apt-get when missing, then runs a
   private Postfix instance from a temporary directory (its own main.cf,
   master.cf, queue and data directories; nothing in /etc/postfix is used or
   touched): smtpd on 127.0.0.1 on a free port, STARTTLS required with a
   self-signed certificate, SASL AUTH (sasldb, PLAIN and LOGIN) required, any
   recipient accepted from the authenticated user and put on the hold queue
   (fsync'ed, never delivered).
2. Runs the load generator (bench/loadgen.py) against it, then stops it.
3. Starts mailgw the way an operator does, from a temporary state directory:
   `mailgw init --demo`, then `twistd -n mailgw`, and runs the same load with
   the demo credentials; samples the memory of twistd and of its embedded
   PostgreSQL meanwhile; stops it with SIGTERM.
4. Repeats 1-3 `--rounds` times (3): the speed of a shared VM drifts by tens of
   percent from one minute to the next, and alternating the two servers
   gives each round's ratio the same conditions.
5. Prints a summary; the last line is `RESULT smtp_ingest: <mailgw msgs/s>
   msgs/s, ratio <mailgw/postfix> vs postfix (target 1.5)`, the medians of
   the rounds.

Run it as root with `make bench-smtp` (or `.venv/bin/python bench/smtp_ingest.py --help`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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
    ensure_postfix,
    log,
    mailgw_server,
    mib,
    postfix_server,
)
from loadgen import LoadResult, LoadSpec, run_load

TARGET_RATIO = 1.5

# Nothing is ever delivered: mail goes to the hold queue, and smtp would defer anyway.
POSTFIX_HOLD_CF = """\
default_transport = smtp
relay_transport = smtp
defer_transports = smtp
# static:HOLD puts every message on the hold queue (HOLD does not end the evaluation).
smtpd_recipient_restrictions = check_client_access static:HOLD,
    permit_sasl_authenticated, reject
"""

# Ingest only: nothing leaves this machine.
INGEST_ONLY = """\
[delivery]
enabled = false
"""


@contextmanager
def postfix_holding() -> Iterator[Server]:
    """The private Postfix (common.postfix_server) putting everything on the hold queue."""
    with postfix_server(POSTFIX_HOLD_CF) as server:
        yield server
        held = sum(1 for p in (server.home / "queue" / "hold").rglob("*") if p.is_file())
        log(f"postfix hold queue: {held} messages")


# --- measuring ----------------------------------------------------------------------------

@dataclass
class Measurement:
    server: Server
    load: LoadResult
    memory: MemoryPeaks

    @property
    def messages(self) -> int:
        """Accepted messages, warm-up included: what the server's CPU was spent on."""
        return self.load.accepted + self.load.warmup_accepted

    @property
    def ceiling(self) -> float:
        return cpu_ceiling(self.messages, self.memory.cpu_seconds, self.load.client_cpu)


async def measure(server: Server, args: argparse.Namespace) -> Measurement:
    """Run the load against `server` while sampling its process tree."""
    spec = LoadSpec(host=LOOPBACK, port=server.port, username=server.username,
                    password=server.password, sender=server.sender, sessions=args.sessions,
                    messages=args.messages, warmup=args.warmup, duration=args.duration,
                    message_size=args.size, pipelining=not args.no_pipelining)
    sampler = MemorySampler(server.pid)
    sampler.start()
    log(f"{server.name}: {spec.sessions} sessions, {spec.warmup} warm-up + "
        f"{spec.messages} messages (at most {spec.duration:.0f} s) of ~{spec.message_size} B")
    limit = args.duration + 120
    try:
        async with asyncio.timeout(limit):
            load = await run_load(spec)
    except TimeoutError:
        raise BenchError(f"{server.name}: the load did not finish within {limit:.0f} s") from None
    finally:
        memory = await sampler.stop()
    log(f"{server.name}: {load.rate:.2f} msgs/s, {load.error_count} errors")
    return Measurement(server, load, memory)


def report(results: list[Measurement], rounds: Rounds) -> None:
    print("\n=== SMTP ingest benchmark (STARTTLS + AUTH PLAIN, 1 recipient, ~5 KB "
          "multipart/alternative, loopback) ===")
    for m in results:
        per_message = 1000 * m.memory.cpu_seconds / m.messages if m.messages else 0.0
        print(f"\n{m.server.name}:")
        print("  " + m.load.summary().replace("\n", "\n  "))
        cpu = m.memory
        print(f"  server CPU: {cpu.cpu_seconds:.1f} s ({per_message:.2f} ms per message), of "
              f"which {m.server.name}'s main process {cpu.root_cpu_seconds:.1f} s")
        if m.server.name == "mailgw":
            print(f"  peak RSS: twistd {mib(m.memory.root_hwm)} (VmHWM); embedded PostgreSQL "
                  f"{mib(m.memory.children_rss)} summed RSS, {mib(m.memory.children_pss)} PSS")
        else:
            print(f"  peak memory of all Postfix processes: {mib(m.memory.tree_rss)} summed "
                  f"RSS, {mib(m.memory.tree_pss)} PSS (master {mib(m.memory.root_hwm)})")
    rounds.print("accepted msgs/s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=20, help="concurrent sessions (20)")
    parser.add_argument("--messages", type=int, default=10000,
                        help="measured messages per server (10000)")
    parser.add_argument("--warmup", type=int, default=200,
                        help="messages sent before the clock starts (200)")
    parser.add_argument("--duration", type=float, default=30.0,
                        help="upper bound of each measured phase in seconds (30)")
    parser.add_argument("--size", type=int, default=5000, help="message size in bytes (5000)")
    parser.add_argument("--no-pipelining", action="store_true",
                        help="send MAIL, RCPT and DATA one at a time")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measurements of each server, alternating (3)")
    parser.add_argument("--mailgw-log", type=Path,
                        help="keep a copy of mailgw's twistd log of the last round in this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("smtp_ingest: run as root (Postfix and the embedded PostgreSQL need it)",
              file=sys.stderr)
        return 2
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, Interrupts.handler)
    results: list[Measurement] = []
    failed = False
    try:
        ensure_postfix()
        # One server at a time, so that they never compete for the two cores.
        for _ in range(args.rounds):
            for start_server in (postfix_holding,
                                 lambda: mailgw_server(INGEST_ONLY, args.mailgw_log)):
                with start_server() as server:
                    results.append(asyncio.run(measure(server, args)))
    except BenchError as e:
        print(f"smtp_ingest: {e}", file=sys.stderr, flush=True)
        failed = True
    except KeyboardInterrupt:
        print("smtp_ingest: interrupted; servers stopped and temporary files removed",
              file=sys.stderr)
        return 130
    rounds = Rounds("postfix")
    for postfix, mailgw in zip(results[::2], results[1::2], strict=False):
        rounds.add(postfix.load.rate, mailgw.load.rate, postfix.ceiling, mailgw.ceiling)
    if results:
        report(results, rounds)
    mailgw, ratio = rounds.mailgw, rounds.ratio
    print()
    print(f"RESULT smtp_ingest: {mailgw:.2f} msgs/s, ratio {ratio:.2f} vs postfix "
          f"(target {TARGET_RATIO})")
    return 1 if failed or not rounds.pairs else 0


if __name__ == "__main__":
    sys.exit(main())
