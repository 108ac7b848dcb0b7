"""The queue runner: claims due deliveries, renders, resolves and sends them (D-1 to D-6).

A loop claims a batch with one query, starts every delivery of it at once
(the pool groups them into connections per destination: a domain's MX hosts,
or the smarthost) and claims again while fewer than `max_in_flight` are
running.  Each outcome is written through the
group committer with the lease checked.  The leases of the deliveries still
running are renewed on a timer: a message held back by a rate limit or a slow
server may outlast one lease, and its row must not become claimable while
this node still has it.  A message is prepared once and kept in a small cache,
so its other recipients only pay for personalisation.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from mailgw.config import DeliveryConfig
from mailgw.content.body import StoredBody
from mailgw.content.contexts import bounce_domain, recipient_context, sender_context
from mailgw.content.dkim import DKIMSigner
from mailgw.content.links import LinkSigner
from mailgw.content.render import PreparedMessage, RecipientContext
from mailgw.delivery.client import MailHost, OutboundPool, OutgoingMessage
from mailgw.delivery.mx import NullMX, PermanentDNSFailure, TemporaryDNSFailure
from mailgw.errors import DatabaseUnavailable, TransientDatabaseError
from mailgw.idle import IdleWaiters, Nap
from mailgw.metrics import Metrics
from mailgw.store.queue import ClaimedDelivery, MessageContext, Outcome, QueueStore

# Deferred deliveries are retried after retry_base, then twice as long each time, never
# more than this apart.
MAX_RETRY_INTERVAL = 6 * 3600
# Prepared messages kept (~25 KiB each with tracked links). Claims come in due order, so a
# message's recipients are mostly worked on together; a small cache keeps twistd's memory
# independent of the queue's size (issue 4: 1k and 100k queued within 10%).
PREPARED_CACHE_SIZE = 100
DKIM_SIGNER_CACHE_SIZE = 500
# A graceful stop waits this long for running deliveries, then gives back the leases of
# those whose text is not being sent yet (held by a rate limit, waiting for a connection),
# then this long for the connections to QUIT: within the SMTP sessions' grace, which the
# Gateway's stop waits out side by side with this one.
STOP_DELIVERIES_SECONDS = 15.0
STOP_CONNECTIONS_SECONDS = 5.0
# Leases are renewed this many times per lease: a renewal that a busy database delays
# still comes before the lease runs out.
RENEWALS_PER_LEASE = 3
# An outcome the database could not take is written again after 1, 2, 4 ... seconds, at
# most this far apart; its lease is renewed meanwhile, so it is never tried again.
MAX_RECORD_RETRY_SECONDS = 30.0
# What may pass: the database out of reach, or a transaction that lost a deadlock or a
# serialization conflict, or waited too long for a lock (all TransientDatabaseError).
_PASSING_TROUBLE = (TransientDatabaseError, defer.CancelledError)


class LeaseReleased(Exception):
    """The delivery's lease was given back by a graceful stop: it is no longer this
    node's to send."""


@dataclasses.dataclass(frozen=True)
class _Ready:
    """A message prepared for personalisation, the domain of its return path, whether
    its copies are kept as sent (an archived send), and the account's global variables."""

    prepared: PreparedMessage
    bounce_domain: str
    archive: bool
    global_variables: Mapping[str, str]


def node_name(hostname: str) -> str:
    """The lease owner name of this process: unique across nodes and restarts."""
    return f"{hostname}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class QueueRunner:
    log = Logger()

    def __init__(self, queue: QueueStore, resolver, pool: OutboundPool, signer: LinkSigner,
                 clock, config: DeliveryConfig, hostname: str, bounce_domain: str, owner: str,
                 run_in_thread: Callable[..., defer.Deferred[Any]],
                 metrics: Metrics | None = None) -> None:
        """`bounce_domain`: of the return path and the unsubscribe mailto: address of
        senders whose domain has no return-path domain of its own."""
        self.metrics = metrics or Metrics()
        self.queue = queue
        self.resolver = resolver
        self.pool = pool
        self.signer = signer
        self.clock = clock
        self.config = config
        self.hostname = hostname
        self.bounce_domain = bounce_domain
        self.owner = owner
        self.run_in_thread = run_in_thread
        self.max_in_flight = 2 * config.batch_size
        self.running = False
        self._loop_done: defer.Deferred[None] | None = None
        self._nap = Nap(clock)
        self._drained = IdleWaiters()
        # Deliveries started and not finished: their leases are renewed.
        self._working: set[int] = set()
        # Those of them whose text is being sent: a stop keeps their leases.
        self._sending: set[int] = set()
        # A stop gave up waiting and gave back the leases of the others.
        self._leases_released = False
        self._renewals = task.LoopingCall(
            lambda: defer.ensureDeferred(self._renew_leases()))
        self._renewals.clock = clock
        # message id -> prepared message, most recently used last.
        self._prepared: OrderedDict[int, _Ready] = OrderedDict()
        # One signer per key, so that each key is parsed once, not once per message.
        self._dkim_signers: dict[tuple[str, str, str, str], DKIMSigner] = {}

    @property
    def in_flight(self) -> int:
        return len(self._working)

    def start(self) -> None:
        self.running = True
        self._loop_done = defer.ensureDeferred(self._loop())
        self._loop_done.addErrback(lambda f: self.log.failure("queue runner stopped", f))
        renewing = self._renewals.start(self.config.lease_seconds / RENEWALS_PER_LEASE,
                                        now=False)
        renewing.addErrback(lambda f: self.log.failure("lease renewal stopped", f))

    async def stop(self) -> None:
        """Graceful stop (O-5): no new claims; running deliveries get a bounded time to
        finish, then those not being sent yet are given up and their leases freed; then
        the pool's connections QUIT without waiting out their idle time."""
        self.running = False
        self._nap.wake()
        if self._loop_done is not None:
            await self._loop_done
        try:
            await self._drained.wait(not self._working).addTimeout(STOP_DELIVERIES_SECONDS,
                                                                    self.clock)
        except defer.TimeoutError:
            self._leases_released = True
            self.log.warn("stopping with {count} deliveries unfinished; {sending} of them "
                          "being sent keep their leases until they expire",
                          count=len(self._working), sending=len(self._sending))
            self.pool.withdraw(self._working - self._sending)
        if self._renewals.running:
            self._renewals.stop()
        try:
            await self.queue.release(self.owner, sorted(self._sending))
        except Exception:  # the leases expire by themselves; the rest of the stop goes on
            self.log.failure("leases not released", Failure(), LogLevel.warn)
        try:
            await self.pool.close_idle().addTimeout(STOP_CONNECTIONS_SECONDS, self.clock)
        except defer.TimeoutError:
            self.log.warn("stopping with outbound connections still open")

    async def _loop(self) -> None:
        while self.running:
            if self.in_flight >= self.max_in_flight:
                await self._nap.take(None)
                continue
            try:
                claimed = await self.queue.claim(
                    self.owner, min(self.config.batch_size, self.max_in_flight - self.in_flight),
                    self.config.lease_seconds)
                # After an outage longer than a lease, rows still being worked on here come
                # back: they are this node's already, and must not be sent a second time.
                claimed = [d for d in claimed if d.id not in self._working]
                messages = await self._messages(claimed)
            except DatabaseUnavailable:
                claimed = []
            except Exception:
                # Any other database error (a failover to a read-only server, say) must not
                # end the loop: nothing would be delivered until a restart.
                self.log.failure("claiming deliveries failed", Failure(), LogLevel.error)
                claimed = []
            if not claimed:
                await self._nap.take(self.config.poll_interval)
                continue
            for delivery in claimed:
                self._working.add(delivery.id)
                d = defer.ensureDeferred(self._deliver(delivery,
                                                       messages.get(delivery.message_id)))
                d.addErrback(lambda f: self.log.failure("delivery failed unexpectedly", f))
                d.addBoth(self._finished, delivery.id)

    def _finished(self, _: object, delivery_id: int) -> None:
        self._working.discard(delivery_id)
        self._sending.discard(delivery_id)
        self._nap.wake()
        if not self._working:
            self._drained.fire()

    async def _renew_leases(self) -> None:
        """Every running delivery's lease in one statement, until it has finished."""
        if not self._working:
            return
        try:
            await self.queue.renew(self.owner, sorted(self._working), self.config.lease_seconds)
        except Exception:
            # The next renewal tries again, well before the leases run out.
            self.log.failure("leases of {count} deliveries not renewed", Failure(),
                             LogLevel.warn, count=len(self._working))

    async def _messages(self, claimed: list[ClaimedDelivery]
                        ) -> dict[int, _Ready | Exception]:
        """The prepared messages of a claimed batch, held by the batch itself: preparing
        one may push another out of the cache, and that must not make it look deleted.
        A message of a delivery not suppressed that is missing from the result is not in
        the database; an exception is why it cannot be prepared."""
        wanted = {d.message_id for d in claimed if not d.suppressed}
        messages: dict[int, _Ready | Exception] = {}
        for message_id in wanted & self._prepared.keys():
            self._prepared.move_to_end(message_id)
            messages[message_id] = self._prepared[message_id]
        missing = sorted(wanted - messages.keys())
        if missing:
            for message_id, context in (await self.queue.messages(missing)).items():
                messages[message_id] = self._prepared_or_error(context)
        return messages

    def _prepared_or_error(self, context: MessageContext) -> _Ready | Exception:
        """A message that cannot be prepared (broken content) is logged once per batch;
        its deliveries are deferred, so that the maximum age bounces them in the end."""
        try:
            return self._prepare(context)
        except Exception as e:
            self.log.failure("message {id} cannot be prepared; its deliveries are deferred",
                             id=context.id, level=LogLevel.error)
            return e

    async def _deliver(self, delivery: ClaimedDelivery, message: _Ready | Exception | None
                       ) -> None:
        started = self.clock.seconds()
        outcome = self._retry_policy(delivery, await self._attempt(delivery, message))
        if self._leases_released and delivery.id not in self._sending:
            return  # stop() gave its lease back: the next claim tries it again
        self.metrics.delivery_attempts.labels(outcome.state).inc()
        self.metrics.delivery_attempt_seconds.observe(self.clock.seconds() - started)
        self.log.info("delivery {id} to {rcpt}: {state} ({reply})", id=delivery.id,
                      rcpt=delivery.recipient, state=outcome.state, reply=outcome.reply)
        await self._record(outcome)

    async def _record(self, outcome: Outcome) -> None:
        """Write the outcome, again and again while the database cannot take it for now:
        the delivery stays this node's (its lease renewed), so a message already sent is
        not sent again once the database is back (R-1, R-2). An outcome the database
        refuses for itself is logged and left: retrying could not help."""
        delay = 1.0
        while True:
            try:
                await self.queue.record(self.owner, outcome, self.config.hard_bounce_limit)
                return
            except _PASSING_TROUBLE as e:
                self.log.warn("outcome of delivery {id} not recorded ({error}); again in "
                              "{delay} s", id=outcome.delivery_id, error=e, delay=delay)
            except Exception:
                self.log.failure("outcome of delivery {id} refused", Failure(),
                                 id=outcome.delivery_id)
                return
            if not self._renewals.running:  # stopped: the lease runs out by itself
                return
            await task.deferLater(self.clock, delay, lambda: None)
            delay = min(delay * 2, MAX_RECORD_RETRY_SECONDS)

    async def _attempt(self, delivery: ClaimedDelivery, message: _Ready | Exception | None
                       ) -> Outcome:
        if delivery.suppressed:
            return Outcome(delivery.id, "not_sent", delivery.suppressed)
        if message is None:
            return Outcome(delivery.id, "not_sent", "message deleted")
        if isinstance(message, Exception):
            return Outcome(delivery.id, "deferred", f"message could not be prepared: {message}")
        domain = delivery.recipient.rpartition("@")[2]
        try:
            servers = await self._servers(domain)
        except NullMX as e:  # RFC 7505 4.1
            return Outcome(delivery.id, "bounced", f"556 5.1.10 {e}", bounce_type="hard")
        except PermanentDNSFailure as e:
            return Outcome(delivery.id, "bounced", f"5.1.2 {e}", bounce_type="hard")
        except TemporaryDNSFailure as e:
            return Outcome(delivery.id, "deferred", f"4.4.3 {e}")
        recipient = recipient_context(delivery.id, delivery.recipient, delivery.fields,
                                      message.global_variables)
        rendered: list[bytes] = []
        outgoing = OutgoingMessage(
            delivery.id, self.signer.bounce_address(delivery.id, message.bounce_domain),
            delivery.recipient,
            lambda: self._render(delivery.id, message.prepared, recipient, rendered))
        outcome = await self.pool.deliver(domain, servers, outgoing)
        if message.archive and outcome.state == "sent" and rendered:
            return dataclasses.replace(outcome, sent_eml=rendered[-1])
        return outcome

    async def _render(self, delivery_id: int, prepared: PreparedMessage,
                      recipient: RecipientContext, rendered: list[bytes]) -> bytes:
        """The recipient's copy, signed (and kept in `rendered`, for an archived send).
        The DKIM key operation (~1 ms for RSA-2048) runs in a thread: the reactor that
        would sign also answers SMTP submissions. Called when the server has taken the
        envelope: from then on a stop keeps the lease."""
        if self._leases_released:
            raise LeaseReleased(f"delivery {delivery_id} was given back to the queue")
        self._sending.add(delivery_id)
        data, signature = prepared.render_unsigned(recipient)
        if signature is not None:
            data = signature.header(await self.run_in_thread(signature.key_signature)) + data
        rendered.append(data)
        return data

    async def _servers(self, domain: str) -> list[MailHost]:
        """The addresses of the domain's mail servers in preference order (D-3)."""
        servers = []
        for server in await self.resolver.mail_servers(domain):
            try:
                addresses = await self.resolver.addresses(server.host)
            except TemporaryDNSFailure:
                continue
            servers.extend(MailHost(server.host, address, server.port, server.preference)
                           for address in addresses)
        if not servers:
            raise TemporaryDNSFailure(f"no address for any mail server of {domain}")
        return servers

    def _prepare(self, context: MessageContext) -> _Ready:
        """The message prepared and cached; raises what its content makes fail."""
        returns_to = bounce_domain(context, self.bounce_domain)
        body = StoredBody.from_json(context.body)
        sender = sender_context(context, body, self.hostname, returns_to,
                                self._dkim_signer(context))
        try:
            prepared = PreparedMessage(body, context.options, sender, self.signer)
        except Exception as e:
            if sender.dkim is None:
                raise
            # Without the key it fails again when the content is at fault (that error
            # goes up); if not, the key was: the operator's to fix, the mail goes unsigned.
            prepared = PreparedMessage(
                body, context.options, dataclasses.replace(sender, dkim=None), self.signer)
            self.log.error("DKIM key of {domain} unusable ({error}); sending unsigned",
                           domain=context.dkim_domain, error=e)
        ready = self._prepared[context.id] = _Ready(prepared, returns_to, context.archive,
                                                    context.global_variables)
        while len(self._prepared) > PREPARED_CACHE_SIZE:
            self._prepared.popitem(last=False)
        return ready

    def _dkim_signer(self, context: MessageContext) -> DKIMSigner | None:
        if not context.dkim_private_key:
            return None
        key = (context.dkim_domain, context.dkim_selector, context.dkim_algorithm,
               context.dkim_private_key)
        dkim = self._dkim_signers.get(key)
        if dkim is None:
            if len(self._dkim_signers) >= DKIM_SIGNER_CACHE_SIZE:
                self._dkim_signers.clear()
            dkim = self._dkim_signers[key] = DKIMSigner(*key)
        return dkim

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

