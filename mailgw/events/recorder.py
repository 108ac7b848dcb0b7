"""Recording tracking hits as events (T-1 to T-3, T-6, E-1; principle 3).

The endpoints answer a hit only once its event is committed, through the group
commit: a burst of opens after a campaign costs one statement and one flush per batch.
The pixel and the redirect never fail for our trouble: with the database out of reach
their event is lost, logged (`tracking event lost`) and counted in `lost`, by event
type, and in the metric `mailgw_tracking_events_lost_total`. Subscription changes,
which the recipient must be able to count on, raise instead, and their endpoint
answers 503.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.errors import DatabaseUnavailable, TransientDatabaseError
from mailgw.events.agents import Agent, AgentParser
from mailgw.events.client import Network, client_address
from mailgw.events.geo import GeoLocator
from mailgw.events.machine import MachineRules
from mailgw.metrics import Metrics
from mailgw.store.database import Database
from mailgw.store.events import EventStore, EventType
from mailgw.store.tracking import SubscriptionChange, TrackedDelivery, TrackingStore


@dataclass(frozen=True)
class Hit:
    """One request to a tracking URL, as its event records it."""

    method: bytes
    address: str
    agent: Agent
    # When it arrived, in seconds since the epoch (the recorder's clock).
    received_at: float

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.received_at, UTC)


class TrackingRecorder:
    log = Logger()

    def __init__(self, database: Database, tracking: TrackingStore, events: EventStore,
                 agents: AgentParser, geo: GeoLocator, rules: MachineRules,
                 trusted_proxies: Sequence[Network], clock,
                 metrics: Metrics | None = None) -> None:
        self.database = database
        self.tracking = tracking
        self.events = events
        self.agents = agents
        self.geo = geo
        self.rules = rules
        self.trusted_proxies = tuple(trusted_proxies)
        self.clock = clock
        self.metrics = metrics
        # Events lost to database trouble, by type (and in all in the metrics).
        self.lost: Counter[str] = Counter()

    def hit(self, method: bytes, peer: str, forwarded: Sequence[bytes] | None,
            user_agent: bytes | None) -> Hit:
        """A request's hit: its client (X-Forwarded-For from trusted proxies only) and
        agent, at the clock's time."""
        return Hit(method, client_address(peer, forwarded, self.trusted_proxies),
                   self.agents.agent(user_agent), self.clock.seconds())

    def client_details(self, hit: Hit) -> dict[str, Any]:
        """What every tracking event records of its client (W-1's geo and device fields)."""
        place = self.geo.locate(hit.address)
        agent = hit.agent
        return {"ip": hit.address, "user_agent": agent.user_agent,
                "device_type": agent.device_type, "os": agent.os, "browser": agent.browser,
                "city": place.city, "region": place.region, "country": place.country,
                "country_code": place.country_code, "latitude": place.latitude,
                "longitude": place.longitude}

    async def delivery(self, delivery_id: int) -> TrackedDelivery | None:
        """The delivery a token names; DatabaseUnavailable at once while every connection
        is known to be lost (nothing to wait for)."""
        if not self.database.available:
            raise DatabaseUnavailable("tracked_deliveries")
        return await self.tracking.delivery(delivery_id)

    async def opened(self, delivery_id: int, hit: Hit) -> None:
        """Record an open (T-1). Never raises: a lost event is logged and counted."""
        await self._record(EventType.OPEN, delivery_id, hit, None)

    async def clicked(self, delivery_id: int, url: str, hit: Hit) -> None:
        """Record a click (T-2), and a person's open with it when none is recorded
        (images blocked). Never raises."""
        await self._record(EventType.CLICK, delivery_id, hit, url)

    async def change_subscription(self, delivery: TrackedDelivery, action: str, hit: Hit,
                                  details: dict[str, Any], keep: frozenset[str] = frozenset()
                                  ) -> bool:
        """Unsubscribe or resubscribe (T-3); raises what the database raises."""
        return await self.tracking.change_subscription(SubscriptionChange(
            delivery, action, hit.time, {**details, **self.client_details(hit)}, keep))

    async def _record(self, type_: EventType, delivery_id: int, hit: Hit, url: str | None
                      ) -> None:
        try:
            delivery = await self.delivery(delivery_id)
            if delivery is None:  # the message, or the account, was deleted
                return
            await self.events.record_many(self._events(type_, delivery, hit, url))
        except TransientDatabaseError as e:
            self._lost(type_, delivery_id, str(e))
        except Exception:
            self.log.failure("tracking event of delivery {id} not recorded", Failure(),
                             id=delivery_id)
            self._lost(type_, delivery_id, "an error")

    def _events(self, type_: EventType, delivery: TrackedDelivery, hit: Hit, url: str | None):
        """The hit's events; none for a message whose switches (T-5) say no."""
        opening = type_ == EventType.OPEN
        if not (delivery.tracks_opens if opening else delivery.tracks_clicks):
            return []
        since = None
        if delivery.sent_at is not None:
            since = hit.received_at - delivery.sent_at
        elif delivery.state not in ("queued", "deferred"):  # bounced or not sent: no time
            since = float("inf")
        reason = self.rules.judge(opening=opening, method=hit.method, agent=hit.agent,
                                  address=hit.address, since_delivery=since)
        details = self.client_details(hit)
        if reason is not None:
            details["machine_reason"] = reason
        if url is None:
            return [delivery.event(type_, details, hit.time, reason is not None)]
        events = [delivery.event(type_, {"url": url, **details}, hit.time, reason is not None)]
        if reason is None and not delivery.opened and delivery.tracks_opens:
            events.insert(0, delivery.event(EventType.OPEN, {**details, "implied_by": "click"},
                                            hit.time))
        return events

    def _lost(self, type_: EventType, delivery_id: int, why: str) -> None:
        self.lost[type_] += 1
        if self.metrics is not None:
            self.metrics.tracking_events_lost.inc()
        self.log.warn("tracking event lost: {type} of delivery {id} ({why})", type=type_,
                      id=delivery_id, why=why)
