"""Operations endpoints (O-5): /healthz for load balancers and systemd watchers, /metrics
for Prometheus."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence

from klein import Klein

from mailgw.metrics import CONTENT_TYPE, Metrics, QueueDepthProbe
from mailgw.store.database import Database

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class OperationsApp:
    app = Klein()

    def __init__(self, database: Database, metrics: Metrics | None = None,
                 queue_depth: QueueDepthProbe | None = None,
                 metrics_networks: Sequence[str] = ("127.0.0.0/8", "::1/128")) -> None:
        self.database = database
        self.metrics = metrics or database.metrics
        self.queue_depth = queue_depth
        self.metrics_networks = tuple(ipaddress.ip_network(n, strict=False)
                                      for n in metrics_networks)

    @app.route("/healthz", methods=["GET"])
    async def healthz(self, request) -> bytes:
        """200 while PostgreSQL answers, 503 while it does not (R-2)."""
        reachable = await self.database.is_reachable()
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        if not reachable:
            request.setResponseCode(503)
        return json.dumps({"status": "ok" if reachable else "unavailable",
                           "database": "ok" if reachable else "unreachable"}).encode()

    @app.route("/metrics", methods=["GET"])
    async def metrics_page(self, request) -> bytes:
        """Prometheus' text format, only for clients on http.metrics_networks: the figures
        describe customers' traffic."""
        request.setHeader(b"Cache-Control", b"no-store")
        if not self._may_read_metrics(request):
            request.setResponseCode(403)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"/metrics is served only to the networks in http.metrics_networks\n"
        depth = None if self.queue_depth is None else await self.queue_depth.depth()
        request.setHeader(b"Content-Type", CONTENT_TYPE.encode("ascii"))
        return self.metrics.exposition(depth)

    def _may_read_metrics(self, request) -> bool:
        """The client's address, and the one a reverse proxy gives in X-Forwarded-For
        (the last, which that proxy wrote: a client can put anything before it), must
        both be on the networks: a proxy on this host makes every client look local.
        A Unix socket's client is on this host."""
        peer = getattr(request.getClientAddress(), "host", None)
        if peer is not None and not self._on_metrics_networks(peer):
            return False
        forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for")
        if forwarded:
            last = b",".join(forwarded).split(b",")[-1].strip()
            return self._on_metrics_networks(last.decode("ascii", "replace"))
        return True

    def _on_metrics_networks(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip("[]"))
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # an IPv4 client of a dual-stack listener
        return any(ip in network for network in self.metrics_networks)
