"""What the inbound listener does with a message it accepted (D-7, T-3).

Each envelope recipient says what the message is for:

- `unsubscribe@<domain>`: the List-Unsubscribe mailto: of a message (render.py). Its
  Subject carries the signed token of the one-click URL (`unsubscribe-<token>`), and the
  recipient it names is unsubscribed from the sender's domain, as the one-click POST
  does, with Aldeamo's reason "Cancelación por correo electrónico".
- a bounce address `b-<delivery>-<tag>@<domain>` (the VERP Return-Path, links.py): the
  report is about that delivery.
- any other address of the domain (postmaster@, abuse@, a feedback loop's): the report
  is about the delivery that it names itself: the returned original's Return-Path or
  Message-ID, an ARF's Original-Mail-From, an address quoted in a bounce's text. A
  redacted complaint that kept none of them names nothing.

A report (mailgw/inbound/reports.py) that names a delivery is recorded (InboundStore):
a bounce, a complaint; anything else (a delay, an auto-reply) is logged and dropped.
Mail that names no delivery is dropped with a log line: never bounced back (no
backscatter). Every signature is checked (LinkSigner): a forged tag names nothing.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.content.links import LinkSigner
from mailgw.errors import TransientDatabaseError
from mailgw.inbound.reports import BOUNCE, COMPLAINT, UNREADABLE, Report
from mailgw.metrics import Metrics
from mailgw.store.inbound import RECORDED, AsyncBounce, Complaint, InboundStore
from mailgw.store.tracking import UNSUBSCRIBE, SubscriptionChange, TrackingStore
from mailgw.text import one_line

# Aldeamo's reason for an unsubscribe by mail (seed 001, 8.6 and 8.11).
MAILTO_REASON = "Cancelación por correo electrónico"
# The local part of the List-Unsubscribe mailto: address (content/contexts.py).
UNSUBSCRIBE_LOCAL_PART = "unsubscribe"
# Seconds the return-path domains are known without asking the database again: a
# domain added with `mailgw domain add` is accepted within this time.
DOMAINS_REFRESH_SECONDS = 30.0
# What became of a message, for each thing it was for (mailgw_inbound_messages_total).
OUTCOMES = ("bounce", "complaint", "unsubscribe", "ignored", "unmatched")

_UNSUBSCRIBE_TOKEN = re.compile(r"unsubscribe-([A-Za-z0-9_-]{1,2048})", re.IGNORECASE)


class ReturnPathDomains:
    """The domains the listener takes mail for: every account's return-path domains and
    the gateway's bounce domain, read at most every DOMAINS_REFRESH_SECONDS (readers
    that come meanwhile wait for one query); while the database is out of reach, the
    last ones read."""

    def __init__(self, read: Callable[[], Awaitable[frozenset[str]]], bounce_domain: str,
                 clock, refresh_seconds: float = DOMAINS_REFRESH_SECONDS) -> None:
        self._read = read
        self._bounce_domain = bounce_domain.lower()
        self._clock = clock
        self._refresh_seconds = refresh_seconds
        self._domains: frozenset[str] | None = None
        self._read_at = 0.0
        self._waiting: list[defer.Deferred[frozenset[str]]] = []

    async def includes(self, domain: str) -> bool:
        domain = domain.lower().rstrip(".")
        return domain == self._bounce_domain or domain in await self._current()

    async def _current(self) -> frozenset[str]:
        fresh = self._clock.seconds() - self._read_at < self._refresh_seconds
        if self._domains is not None and fresh:
            return self._domains
        waiter: defer.Deferred[frozenset[str]] = defer.Deferred()
        self._waiting.append(waiter)
        if len(self._waiting) == 1:
            defer.ensureDeferred(self._reload())
        try:
            return await waiter
        except TransientDatabaseError:
            if self._domains is None:
                raise
            return self._domains

    async def _reload(self) -> None:
        try:
            domains = await self._read()
        except Exception:
            result: frozenset[str] | Failure = Failure()
        else:
            result = self._domains = domains
            self._read_at = self._clock.seconds()
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


@dataclass(frozen=True)
class Envelope:
    """A message the listener accepted."""

    client_ip: str
    sender: str
    recipients: tuple[str, ...]
    raw: bytes


class FeedbackProcessor:
    log = Logger()

    def __init__(self, inbound: InboundStore, tracking: TrackingStore, signer: LinkSigner,
                 domains: ReturnPathDomains,
                 read_report: Callable[[bytes], Awaitable[Report]], clock,
                 hard_bounce_limit: int, metrics: Metrics) -> None:
        """`read_report`: mailgw.inbound.reports.read_report, run in a thread."""
        self.inbound = inbound
        self.tracking = tracking
        self.signer = signer
        self.domains = domains
        self.read_report = read_report
        self.clock = clock
        self.hard_bounce_limit = hard_bounce_limit
        self.metrics = metrics
        for outcome in OUTCOMES:  # every outcome shown from the start, at 0
            metrics.inbound_messages.labels(outcome)

    async def accepts(self, domain: str) -> bool:
        """Whether mail for `domain` is ours to take (no relaying)."""
        return await self.domains.includes(domain)

    async def process(self, envelope: Envelope) -> None:
        """Record what the message reports; raises only what the database raises (the
        listener then answers 451, and the sender's server tries again)."""
        report = await self.read_report(envelope.raw)
        done: set[tuple[str, int | None]] = set()
        for recipient in envelope.recipients:
            local = recipient.rpartition("@")[0].lower()
            if local == UNSUBSCRIBE_LOCAL_PART:
                target = ("unsubscribe", self._unsubscribe_token(report.subject))
            else:
                target = ("report", self._delivery_named(recipient, report))
            if target not in done:
                done.add(target)
                action, delivery_id = target
                handle = self._unsubscribe if action == "unsubscribe" else self._report
                outcome, detail = await handle(delivery_id, report)
                self.metrics.inbound_messages.labels(outcome).inc()
                self.log.info("inbound message from {ip} <{sender}> to <{recipient}>: "
                              "{outcome} ({detail})", ip=envelope.client_ip,
                              sender=one_line(envelope.sender)[:200],
                              recipient=one_line(recipient)[:200], outcome=outcome,
                              detail=detail)

    def _delivery_named(self, recipient: str, report: Report) -> int | None:
        """The delivery of the bounce address the message came to, else the one the
        report names by a bounce address or Message-ID of ours."""
        for reference in (recipient, *report.references):
            for parse in (self.signer.parse_bounce_address, self.signer.parse_message_id):
                delivery_id = parse(reference)
                if delivery_id is not None:
                    return delivery_id
        return None

    def _unsubscribe_token(self, subject: str) -> int | None:
        found = _UNSUBSCRIBE_TOKEN.search(subject)
        verified = self.signer.verify("u", found.group(1)) if found else None
        return verified[0] if verified else None

    async def _report(self, delivery_id: int | None, report: Report) -> tuple[str, str]:
        if delivery_id is None:
            what = (f"unreadable: {report.reply}" if report.kind == UNREADABLE
                    else f"a {report.kind} report")
            return "unmatched", f"{what} that names no delivery of ours; dropped"
        if report.kind == BOUNCE:
            result = await self.inbound.record_bounce(AsyncBounce(
                delivery_id, report.bounce_type, report.reply, report.status,
                self.hard_bounce_limit, self._now()))
            return self._outcome("bounce", result, delivery_id,
                                 f"{report.bounce_type} bounce: {report.reply}")
        if report.kind == COMPLAINT:
            result = await self.inbound.record_complaint(Complaint(
                delivery_id, report.feedback_type, report.user_agent, self._now()))
            return self._outcome("complaint", result, delivery_id,
                                 f"complaint, feedback type {report.feedback_type}")
        what = {UNREADABLE: f"unreadable: {report.reply}"}.get(
            report.kind, f"{report.kind}: nothing to record")
        return "ignored", f"delivery {delivery_id}: {what}"

    @staticmethod
    def _outcome(outcome: str, result: str, delivery_id: int, what: str) -> tuple[str, str]:
        if result == RECORDED:
            return outcome, f"delivery {delivery_id}: {what}"
        return "ignored", f"delivery {delivery_id}: {what}; not recorded: {result}"

    async def _unsubscribe(self, delivery_id: int | None, report: Report) -> tuple[str, str]:
        delivery = None if delivery_id is None else await self.tracking.delivery(delivery_id)
        if delivery is None:
            return "unmatched", "an unsubscribe whose subject holds no token of ours; dropped"
        changed = await self.tracking.change_subscription(SubscriptionChange(
            delivery, UNSUBSCRIBE, self._now(), {"method": "mailto", "reason": MAILTO_REASON}))
        return "unsubscribe", (f"delivery {delivery.id}: {delivery.recipient} unsubscribed "
                               f"from {delivery.sender_domain}"
                               + ("" if changed else " already"))

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), UTC)
