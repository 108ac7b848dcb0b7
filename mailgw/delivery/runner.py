"""The queue runner: claims due deliveries, renders, resolves and sends them (D-1 to D-6).

A loop claims a batch with one query, starts every delivery of it at once
(the pool groups them into connections per domain) and claims again while
fewer than `max_in_flight` are running.  Each outcome is written through the
group committer with the lease checked.  A message is prepared once and kept
in a small cache, so its other recipients only pay for personalisation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mailgw.config import DeliveryConfig
from mailgw.content.render import (
    DKIMSigner,
    LinkSigner,
    PreparedMessage,
    RecipientContext,
    SenderContext,
)
from mailgw.delivery.client import OutboundPool, OutgoingMessage
from mailgw.delivery.mx import PermanentDNSFailure, TemporaryDNSFailure
from mailgw.errors import DatabaseUnavailable
from mailgw.idle import IdleWaiters
from mailgw.store.queue import ClaimedDelivery, MessageContext, Outcome, QueueStore

# Deferred deliveries are retried after retry_base, then twice as long each time, never
# more than this apart.
MAX_RETRY_INTERVAL = 6 * 3600
# Prepared messages kept (~25 KiB each with tracked links). Claims come in due order, so a
# message's recipients are mostly worked on together; a small cache keeps twistd's memory
# independent of the queue's size (issue 4: 1k and 100k queued within 10%).
PREPARED_CACHE_SIZE = 100
DKIM_SIGNER_CACHE_SIZE = 500


def node_name(hostname: str) -> str:
    """The lease owner name of this process: unique across nodes and restarts."""
    return f"{hostname}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class QueueRunner:
    log = Logger()

    def __init__(self, queue: QueueStore, resolver, pool: OutboundPool, signer: LinkSigner,
                 clock, config: DeliveryConfig, hostname: str, owner: str,
                 run_in_thread: Callable[..., defer.Deferred[Any]]) -> None:
        self.queue = queue
        self.resolver = resolver
        self.pool = pool
        self.signer = signer
        self.clock = clock
        self.config = config
        self.hostname = hostname
        self.owner = owner
        self.run_in_thread = run_in_thread
        self.max_in_flight = 2 * config.batch_size
        self.in_flight = 0
        self.running = False
        self._loop_done: defer.Deferred[None] | None = None
        self._wakeup: defer.Deferred[None] | None = None
        self._drained = IdleWaiters()
        # message id -> (prepared message, bounce domain), most recently used last.
        self._prepared: OrderedDict[int, tuple[PreparedMessage, str]] = OrderedDict()
        # One signer per key, so that each key is parsed once, not once per message.
        self._dkim_signers: dict[tuple[str, str, str, str], DKIMSigner] = {}

    def start(self) -> None:
        self.running = True
        self._loop_done = defer.ensureDeferred(self._loop())
        self._loop_done.addErrback(lambda f: self.log.failure("queue runner stopped", f))

    async def stop(self) -> None:
        """Graceful stop (O-5): no new claims, running deliveries finish, leases freed,
        then the pool's connections QUIT without waiting out their idle time."""
        self.running = False
        self._wake()
        if self._loop_done is not None:
            await self._loop_done
        await self._drained.wait(self.in_flight == 0)
        with contextlib.suppress(DatabaseUnavailable):  # else the leases expire by themselves
            await self.queue.release(self.owner)
        await self.pool.close_idle()

    def _wake(self) -> None:
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None:
            wakeup.callback(None)

    async def _pause(self, seconds: float | None) -> None:
        """Wait until `seconds` pass (None: until a delivery finishes) or stop() is called."""
        self._wakeup = defer.Deferred()
        if seconds is not None:
            call = self.clock.callLater(seconds, self._wake)
            self._wakeup.addBoth(lambda r: call.cancel() if call.active() else None)
        await self._wakeup

    async def _loop(self) -> None:
        while self.running:
            if self.in_flight >= self.max_in_flight:
                await self._pause(None)
                continue
            try:
                claimed = await self.queue.claim(
                    self.owner, min(self.config.batch_size, self.max_in_flight - self.in_flight),
                    self.config.lease_seconds)
                contexts = await self._contexts(claimed)
            except DatabaseUnavailable:
                claimed = []
            if not claimed:
                await self._pause(self.config.poll_interval)
                continue
            for delivery in claimed:
                self.in_flight += 1
                d = defer.ensureDeferred(self._deliver(delivery,
                                                       contexts.get(delivery.message_id)))
                d.addErrback(lambda f: self.log.failure("delivery failed unexpectedly", f))
                d.addBoth(self._finished)

    def _finished(self, _: object) -> None:
        self.in_flight -= 1
        self._wake()
        if self.in_flight == 0:
            self._drained.fire()

    async def _contexts(self, claimed: list[ClaimedDelivery]) -> dict[int, Any]:
        missing = sorted({d.message_id for d in claimed} - self._prepared.keys())
        contexts: dict[int, Any] = {}
        if missing:
            contexts.update(await self.queue.messages(missing))
        return contexts

    async def _deliver(self, delivery: ClaimedDelivery, context: MessageContext | None
                       ) -> None:
        outcome = self._retry_policy(delivery, await self._attempt(delivery, context))
        self.log.info("delivery {id} to {rcpt}: {state} ({reply})", id=delivery.id,
                      rcpt=delivery.recipient, state=outcome.state, reply=outcome.reply)
        try:
            await self.queue.record(self.owner, outcome, self.config.hard_bounce_limit)
        except DatabaseUnavailable:
            # Not recorded: the lease expires and the delivery is tried again (R-1: the
            # only case where a recipient may get a message twice).
            self.log.warn("outcome of delivery {id} not recorded", id=delivery.id)

    async def _attempt(self, delivery: ClaimedDelivery, context: MessageContext | None
                       ) -> Outcome:
        if delivery.suppressed:
            return Outcome(delivery.id, "not_sent", delivery.suppressed)
        if context is None and delivery.message_id not in self._prepared:
            return Outcome(delivery.id, "not_sent", "message deleted")
        prepared, bounce_domain = self._prepare(delivery.message_id, context)
        domain = delivery.recipient.rpartition("@")[2]
        try:
            servers = await self._servers(domain)
        except PermanentDNSFailure as e:
            return Outcome(delivery.id, "bounced", f"5.1.2 {e}", bounce_type="hard")
        except TemporaryDNSFailure as e:
            return Outcome(delivery.id, "deferred", f"4.4.3 {e}")
        recipient = RecipientContext(delivery.id, delivery.recipient,
                                     _strings(delivery.fields), {})
        message = OutgoingMessage(delivery.id,
                                  self.signer.bounce_address(delivery.id, bounce_domain),
                                  delivery.recipient, lambda: self._render(prepared, recipient))
        return await self.pool.deliver(domain, servers, message)

    async def _render(self, prepared: PreparedMessage, recipient: RecipientContext) -> bytes:
        """The recipient's copy, signed. The DKIM key operation (~1 ms for RSA-2048) runs
        in a thread: the reactor that would sign also answers SMTP submissions."""
        data, signature = prepared.render_unsigned(recipient)
        if signature is None:
            return data
        return signature.header(await self.run_in_thread(signature.key_signature)) + data

    async def _servers(self, domain: str) -> list[tuple[str, str, int]]:
        """(MX name, address, port) in preference order (D-3)."""
        servers = []
        for server in await self.resolver.mail_servers(domain):
            try:
                addresses = await self.resolver.addresses(server.host)
            except TemporaryDNSFailure:
                continue
            servers.extend((server.host, address, server.port) for address in addresses)
        if not servers:
            raise TemporaryDNSFailure(f"no address for any mail server of {domain}")
        return servers

    def _prepare(self, message_id: int, context: MessageContext | None
                 ) -> tuple[PreparedMessage, str]:
        cached = self._prepared.get(message_id)
        if cached is not None:
            self._prepared.move_to_end(message_id)
            return cached
        settings = context.account_settings or {}
        bounce_domain = context.return_path_domain or context.sender.rpartition("@")[2]
        dkim = None
        if context.dkim_private_key:
            key = (context.dkim_domain, context.dkim_selector, context.dkim_algorithm,
                   context.dkim_private_key)
            dkim = self._dkim_signers.get(key)
            if dkim is None:
                if len(self._dkim_signers) >= DKIM_SIGNER_CACHE_SIZE:
                    self._dkim_signers.clear()
                dkim = self._dkim_signers[key] = DKIMSigner(*key)
        sender = SenderContext(
            from_address=context.sender, from_name=context.body.get("from_name"),
            hostname=self.hostname, bounce_domain=bounce_domain,
            unsubscribe_mailto=f"unsubscribe@{bounce_domain}", dkim=dkim,
            reply_to=context.reply_to,
            language=int(context.options.get("language", 3)),
            show_cab=bool(settings.get("show_cab", True)),
            social_links=dict(settings.get("social_links") or {}),
            track_opens=bool(settings.get("track_opens", True)),
            track_clicks=bool(settings.get("track_clicks", True)))
        try:
            prepared = PreparedMessage.from_body(context.body, context.options, sender,
                                                 self.signer)
        except ValueError as e:
            # An unusable DKIM key is the operator's to fix; the mail still goes, unsigned.
            self.log.error("DKIM key of {domain} unusable ({error}); sending unsigned",
                           domain=context.dkim_domain, error=e)
            prepared = PreparedMessage.from_body(
                context.body, context.options, dataclasses.replace(sender, dkim=None),
                self.signer)
        self._prepared[message_id] = (prepared, bounce_domain)
        while len(self._prepared) > PREPARED_CACHE_SIZE:
            self._prepared.popitem(last=False)
        return prepared, bounce_domain

    def _retry_policy(self, delivery: ClaimedDelivery, outcome: Outcome) -> Outcome:
        """D-5: deferred with growing intervals until max_age, then bounced (soft)."""
        if outcome.state != "deferred":
            return outcome
        delay = min(self.config.retry_base_seconds * 2 ** (delivery.attempts - 1),
                    MAX_RETRY_INTERVAL)
        if delivery.age + delay > self.config.max_age_seconds:
            return Outcome(delivery.id, "bounced", f"gave up after {delivery.attempts} "
                           f"attempts: {outcome.reply}", bounce_type="soft")
        return dataclasses.replace(outcome, retry_in=float(delay))


def _strings(fields: dict[str, Any]) -> dict[str, str]:
    return {str(k): "" if v is None else str(v) for k, v in fields.items()}
