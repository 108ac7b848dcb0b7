"""Operations endpoints (O-5): /healthz for load balancers and systemd watchers."""

from __future__ import annotations

import json

from klein import Klein

from mailgw.store.database import Database


class OperationsApp:
    app = Klein()

    def __init__(self, database: Database) -> None:
        self.database = database

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
