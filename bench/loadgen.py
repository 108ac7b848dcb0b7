"""An asyncio SMTP submission load generator (standard library only: asyncio + ssl).

`run_load(spec)` opens `spec.sessions` concurrent sessions, each doing
EHLO, STARTTLS, EHLO, AUTH and then MAIL FROM / RCPT TO / DATA transactions
(pipelined when the server offers PIPELINING) with a ~5 KB multipart/alternative
message, until `spec.warmup + spec.messages` transactions have been attempted or
the measured phase has lasted `spec.duration` seconds.

The rate is measured in steady state: the clock starts when the warm-up
messages have been accepted (sessions are connected and authenticated by then)
and stops at the last accepted message.  A transaction counts as accepted only
when its final reply to the message data is 2xx.  Everything else is counted in
`LoadResult.errors` by stage and reply code ("DATA-end 451", "connect
ConnectionRefusedError", ...), with the first reply text seen for each.

Also usable on its own:

    python bench/loadgen.py --port 58700 --user U --password P --sender S
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ssl
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from email.utils import formatdate

CRLF = b"\r\n"
FILLER_WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit",
                "sed", "do", "eiusmod", "tempor", "incididunt", "ut", "labore", "et", "dolore",
                "magna", "aliqua", "enim", "ad", "minim", "veniam", "quis", "nostrud")
# After this many failed connection attempts in a row a session gives up.
MAX_CONSECUTIVE_CONNECT_FAILURES = 5


@dataclass(frozen=True)
class LoadSpec:
    """What to send, where, and how much."""

    host: str
    port: int
    username: str
    password: str
    sender: str
    sessions: int = 20
    messages: int = 2000  # measured transactions (after the warm-up)
    warmup: int = 200  # transactions accepted before the clock starts
    duration: float = 30.0  # upper bound of the measured phase, in seconds
    message_size: int = 5000  # approximate size of each message, in bytes
    recipient_domain: str = "example.net"
    links: int = 0  # http(s) links in each part (newsletter-like; 0: none)
    html_only: bool = False  # one text/html part instead of multipart/alternative
    pipelining: bool = True  # pipeline MAIL/RCPT/DATA when the server offers it
    auth_mechanism: str = "PLAIN"  # or "LOGIN"
    starttls: bool = True
    timeout: float = 60.0  # per reply
    ehlo_name: str = "loadgen.localdomain"


@dataclass
class LoadResult:
    """Counts and timings of one run."""

    accepted: int = 0  # accepted in the measured phase
    warmup_accepted: int = 0
    elapsed: float = 0.0  # seconds of the measured phase
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: dict[str, str] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)  # seconds, measured phase
    client_cpu: float = 0.0  # CPU seconds this process used during the run
    wall: float = 0.0  # seconds of the whole run, connection set-up included
    sessions_given_up: int = 0

    @property
    def rate(self) -> float:
        """Accepted messages per second in the measured phase."""
        return self.accepted / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def percentile(self, p: float) -> float:
        """Transaction latency (MAIL FROM to the final reply) at percentile `p`, seconds."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    def summary(self) -> str:
        lines = [
            f"{self.accepted} messages accepted in {self.elapsed:.2f} s: "
            f"{self.rate:.2f} msgs/s (after {self.warmup_accepted} warm-up messages)",
            f"latency p50 {self.percentile(50) * 1000:.1f} ms, "
            f"p95 {self.percentile(95) * 1000:.1f} ms, p99 {self.percentile(99) * 1000:.1f} ms",
            f"errors: {self.error_count}"
            + (f", sessions given up: {self.sessions_given_up}" if self.sessions_given_up else ""),
        ]
        for key, count in self.errors.most_common():
            lines.append(f"  {count:6d} x {key}: {self.error_samples.get(key, '')}")
        lines.append(f"load generator CPU: {self.client_cpu:.1f} s over {self.wall:.1f} s "
                     f"({100 * self.client_cpu / self.wall if self.wall else 0:.0f}% of one core)")
        return "\n".join(lines)


class SMTPReplyError(Exception):
    """The server answered a set-up command with an unexpected reply."""

    def __init__(self, stage: str, code: int, text: str) -> None:
        super().__init__(f"{stage}: {code} {text}")
        self.stage, self.code, self.text = stage, code, text


class SMTPClient:
    """A minimal SMTP client over asyncio streams; enough for submission load."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float) -> None:
        self.reader, self.writer, self.timeout = reader, writer, timeout
        self.extensions: set[str] = set()

    @classmethod
    async def connect(cls, host: str, port: int, timeout: float) -> SMTPClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        return cls(reader, writer, timeout)

    async def reply(self) -> tuple[int, str]:
        """Read one (possibly multi-line) reply: its code and its text lines joined by '\\n'."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), self.timeout)
            if not line.endswith(b"\n"):
                raise ConnectionResetError("connection closed by the server")
            lines.append(line[4:].rstrip(b"\r\n").decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    async def command(self, line: bytes) -> tuple[int, str]:
        self.writer.write(line + CRLF)
        return await self.reply()

    async def expect(self, stage: str, line: bytes | None, wanted: int) -> str:
        """Send `line` (None: just read, for the banner) and require reply class `wanted`xx."""
        code, text = await (self.command(line) if line is not None else self.reply())
        if code // 100 != wanted:
            raise SMTPReplyError(stage, code, text)
        return text

    async def ehlo(self, name: str) -> None:
        text = await self.expect("EHLO", b"EHLO " + name.encode(), 2)
        self.extensions = {line.split(" ", 1)[0].upper() for line in text.split("\n")[1:]}

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        await self.expect("STARTTLS", b"STARTTLS", 2)
        await asyncio.wait_for(
            self.writer.start_tls(context, server_hostname=server_hostname), self.timeout)

    async def auth(self, mechanism: str, username: str, password: str) -> None:
        if mechanism == "PLAIN":
            token = base64.b64encode(f"\0{username}\0{password}".encode())
            await self.expect("AUTH", b"AUTH PLAIN " + token, 2)
        elif mechanism == "LOGIN":
            await self.expect("AUTH", b"AUTH LOGIN", 3)
            await self.expect("AUTH", base64.b64encode(username.encode()), 3)
            await self.expect("AUTH", base64.b64encode(password.encode()), 2)
        else:
            raise ValueError(f"unsupported AUTH mechanism {mechanism}")

    async def quit(self) -> None:
        with suppress(OSError, TimeoutError, ValueError):
            self.writer.write(b"QUIT" + CRLF)
            await asyncio.wait_for(self.reply(), 5)
        await self.close()

    async def close(self) -> None:
        self.writer.close()
        with suppress(OSError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), 5)


def _filler_lines(total: int, width: int, wrap: str = "{}") -> list[str]:
    """Lines of filler words of about `width` characters, `total` characters in all."""
    out, line, i, used = [], [], 0, 0
    while used < total:
        line.append(FILLER_WORDS[i % len(FILLER_WORDS)])
        i += 1
        if len(" ".join(line)) >= width:
            text = wrap.format(" ".join(line))
            out.append(text)
            used += len(text) + 2
            line = []
    return out


def newsletter_html(size: int) -> str:
    """An HTML document of about `size` bytes of paragraphs (the HTML-only message, and
    the body of bench/http_send.py's requests)."""
    return "\r\n".join(["<html><body>", *_filler_lines(size - 40, 60, "<p>{}</p>"),
                         "</body></html>"])


def build_message_template(sender: str, size: int, links: int = 0,
                           html_only: bool = False) -> tuple[bytes, bytes]:
    """Headers-after-To and the dot-stuffed body of a multipart/alternative message.

    The message is about `size` bytes: a text/plain and a text/html part of the
    same newsletter-like text, with `links` article links (<a href> in the HTML,
    bare URLs in the text) spread through it; or, `html_only`, the HTML of
    `newsletter_html` alone (the server generates the text part).  Only To, Date
    and Message-ID differ per message.
    """
    boundary = "=_loadgen_boundary_5f0c1e"
    head = (f"From: Load Generator <{sender}>\r\n"
            "Subject: Load test newsletter\r\n"
            "MIME-Version: 1.0\r\n"
            f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n')
    if html_only:
        head = head.replace(f'multipart/alternative; boundary="{boundary}"',
                            "text/html; charset=utf-8\r\nContent-Transfer-Encoding: 7bit")
        body = newsletter_html(max(size - len(head) - 300, 200)) + "\r\n"
        return head.encode(), body.encode().replace(b"\r\n.", b"\r\n..")
    budget = max(size - len(head) - 560, 200)  # To, Date, Message-ID, MIME lines
    lines = _filler_lines

    urls = [f"https://www.example.org/news/2024/article-{i}?utm_source=newsletter&id={i}"
            for i in range(1, links + 1)]
    text_links = [f"Read more: {url}" for url in urls]
    html_links = [f'<p><a href="{url.replace("&", "&amp;")}">Read article {i}</a></p>'
                  for i, url in enumerate(urls, 1)]
    budget -= sum(len(line) + 2 for line in text_links + html_links)
    text_part = _interleave(lines(budget * 2 // 5, 72), text_links)
    html_part = (["<html><body>"]
                 + _interleave(lines(budget * 3 // 5 - 40, 60, "<p>{}</p>"), html_links)
                 + ["</body></html>"])
    body = "\r\n".join([
        "This is a multi-part message in MIME format.", "",
        f"--{boundary}", "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 7bit", "", *text_part, "",
        f"--{boundary}", "Content-Type: text/html; charset=utf-8",
        "Content-Transfer-Encoding: 7bit", "", *html_part, "",
        f"--{boundary}--", ""])
    stuffed = body.encode().replace(b"\r\n.", b"\r\n..")
    return head.encode(), stuffed


def _interleave(paragraphs: list[str], extra: list[str]) -> list[str]:
    """`paragraphs` with the `extra` lines spread evenly between them."""
    out: list[str] = []
    pending = list(extra)
    every = max(len(paragraphs) // (len(extra) + 1), 1)
    for i, paragraph in enumerate(paragraphs, 1):
        out.append(paragraph)
        if pending and i % every == 0:
            out.append(pending.pop(0))
    return out + pending


class _Run:
    """State shared by the sessions of one run: the ticket counter and the results."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.result = LoadResult()
        self.issued = 0
        self.started_at: float | None = None  # start of the measured phase
        self.last_accept = 0.0
        self.head, self.body = build_message_template(spec.sender, spec.message_size,
                                                      spec.links, spec.html_only)

    def take(self) -> int | None:
        """The next message's sequence number, or None when the run is over."""
        if self.issued >= self.spec.warmup + self.spec.messages:
            return None
        if (self.started_at is not None
                and time.monotonic() - self.started_at > self.spec.duration):
            return None
        self.issued += 1
        return self.issued

    def accepted(self, latency: float) -> None:
        now = time.monotonic()
        result = self.result
        if self.started_at is None:
            result.warmup_accepted += 1
            if result.warmup_accepted >= self.spec.warmup:
                self.started_at = now
            return
        result.accepted += 1
        result.latencies.append(latency)
        self.last_accept = now

    def error(self, key: str, text: str) -> None:
        self.result.errors[key] += 1
        self.result.error_samples.setdefault(key, text.replace("\n", " ")[:200])

    def message(self, seq: int) -> tuple[str, bytes]:
        recipient = f"user{seq}@{self.spec.recipient_domain}"
        headers = (f"To: <{recipient}>\r\nDate: {formatdate(localtime=True)}\r\n"
                   f"Message-ID: <loadgen.{seq}.{time.time_ns()}@loadgen.localdomain>\r\n")
        return recipient, headers.encode() + self.head + self.body + b".\r\n"


async def _open_session(run: _Run, context: ssl.SSLContext) -> SMTPClient:
    spec = run.spec
    client = await SMTPClient.connect(spec.host, spec.port, spec.timeout)
    try:
        await client.expect("banner", None, 2)
        await client.ehlo(spec.ehlo_name)
        if spec.starttls:
            await client.starttls(context, spec.host)
            await client.ehlo(spec.ehlo_name)
        await client.auth(spec.auth_mechanism, spec.username, spec.password)
    except BaseException:
        await client.close()
        raise
    return client


async def _transaction(run: _Run, client: SMTPClient, seq: int, pipelining: bool) -> bool:
    """One MAIL/RCPT/DATA transaction; True when it must be followed by RSET."""
    recipient, message = run.message(seq)
    commands = [b"MAIL FROM:<" + run.spec.sender.encode() + b">",
                b"RCPT TO:<" + recipient.encode() + b">", b"DATA"]
    started = time.monotonic()
    replies: list[tuple[int, str]] = []
    if pipelining:
        client.writer.write(CRLF.join(commands) + CRLF)
        replies = [await client.reply() for _ in commands]
    else:
        for line in commands:
            replies.append(await client.command(line))
            if replies[-1][0] // 100 != 2:
                break
    for stage, (code, text) in zip(("MAIL", "RCPT", "DATA"), replies, strict=False):
        if code // 100 != (3 if stage == "DATA" else 2):
            run.error(f"{stage} {code}", text)
            if code == 421:
                raise ConnectionResetError(f"421 {text}")
            if replies[-1][0] == 354:  # pipelined DATA went through after all: end it empty
                client.writer.write(b"." + CRLF)
                await client.reply()
            return True
    client.writer.write(message)
    code, text = await client.reply()
    if code // 100 == 2:
        run.accepted(time.monotonic() - started)
        return False
    run.error(f"DATA-end {code}", text)
    if code == 421:
        raise ConnectionResetError(f"421 {text}")
    return False


async def _session(run: _Run, context: ssl.SSLContext) -> None:
    """One connection's worth of work, reconnecting after connection-level failures."""
    failures = 0
    seq = run.take()
    while seq is not None:
        try:
            client = await _open_session(run, context)
        except SMTPReplyError as e:
            run.error(f"{e.stage} {e.code}", e.text)
            failures += 1
        except (OSError, TimeoutError, ssl.SSLError, ValueError) as e:
            run.error(f"connect {type(e).__name__}", str(e))
            failures += 1
        else:
            failures = 0
            pipelining = run.spec.pipelining and "PIPELINING" in client.extensions
            try:
                while seq is not None:
                    if await _transaction(run, client, seq, pipelining):
                        await client.command(b"RSET")
                    seq = run.take()
                await client.quit()
                return
            except (OSError, TimeoutError, ssl.SSLError, ValueError) as e:
                run.error(f"session {type(e).__name__}", str(e))
                await client.close()
                seq = run.take()
        if failures >= MAX_CONSECUTIVE_CONNECT_FAILURES:
            run.result.sessions_given_up += 1
            return
        await asyncio.sleep(0.2 * failures)


def client_tls_context() -> ssl.SSLContext:
    """TLS 1.2+ without certificate checks: the servers under test use self-signed ones."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


async def run_load(spec: LoadSpec,
                   session: Callable[[_Run], Awaitable[None]] | None = None) -> LoadResult:
    """Run the load described by `spec` and return what happened. `session(run)` is one
    client's loop (default: an SMTP session); bench/http_send.py gives its HTTP one,
    which counts through the same `_Run`."""
    run = _Run(spec)
    if session is None:
        context = client_tls_context()

        def session(run: _Run) -> Awaitable[None]:
            return _session(run, context)

    cpu0, wall0 = time.process_time(), time.monotonic()
    if spec.warmup <= 0:
        run.started_at = wall0
    await asyncio.gather(*(session(run) for _ in range(spec.sessions)))
    result = run.result
    result.client_cpu = time.process_time() - cpu0
    result.wall = time.monotonic() - wall0
    if run.started_at is not None and result.accepted:
        result.elapsed = run.last_accept - run.started_at
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--sender", required=True)
    parser.add_argument("--sessions", type=int, default=LoadSpec.sessions)
    parser.add_argument("--messages", type=int, default=LoadSpec.messages)
    parser.add_argument("--warmup", type=int, default=LoadSpec.warmup)
    parser.add_argument("--duration", type=float, default=LoadSpec.duration)
    parser.add_argument("--size", type=int, default=LoadSpec.message_size)
    parser.add_argument("--domain", default=LoadSpec.recipient_domain,
                        help="recipient domain (user<n>@DOMAIN)")
    parser.add_argument("--links", type=int, default=LoadSpec.links,
                        help="links in each message part")
    parser.add_argument("--auth", choices=("PLAIN", "LOGIN"), default="PLAIN")
    parser.add_argument("--no-pipelining", action="store_true")
    parser.add_argument("--no-starttls", action="store_true")
    args = parser.parse_args(argv)
    spec = LoadSpec(host=args.host, port=args.port, username=args.user,
                    password=args.password, sender=args.sender, sessions=args.sessions,
                    messages=args.messages, warmup=args.warmup, duration=args.duration,
                    message_size=args.size, recipient_domain=args.domain, links=args.links,
                    auth_mechanism=args.auth,
                    pipelining=not args.no_pipelining, starttls=not args.no_starttls)
    result = asyncio.run(run_load(spec))
    print(result.summary())
    sys.exit(0 if result.accepted else 1)


if __name__ == "__main__":
    main()
