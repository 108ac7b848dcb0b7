"""Statistics over HTTP (H-4), with the account's API key.

`GET /v1/stats/sends/<send_id>`: a send's counters; another account's send is a 404,
as one that does not exist. `GET /v1/stats?from=<iso>&to=<iso>`: the account's
counters over the range and per day in its time zone. The counters are exactly those
of `mailgw.store.statistics.COUNTERS`. Errors are JSON: 403 for a missing, wrong or
revoked key (`invalid_api_key`) and for a disabled account (`account_inactive`), 400
for a bad range, 404, and 503 while the database is out of reach.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from werkzeug.exceptions import HTTPException

from mailgw.errors import TransientDatabaseError
from mailgw.http.auth import InactiveAccount, InvalidAPIKey, KeyAuthenticator
from mailgw.store.statistics import (
    AccountStatistics,
    SendStatistics,
    StatisticsStore,
    account_zone,
    time_range,
)

# Send ids are bigints: longer digit strings name no send.
_MAX_ID_DIGITS = 18


class _NotFound(Exception):
    pass


class _BadRequest(Exception):
    pass


def send_json(stats: SendStatistics) -> dict[str, Any]:
    return {"send_id": stats.send_id, "subject": stats.subject,
            "created_at": stats.created_at.isoformat(), "counters": stats.counters.as_dict()}


def account_json(name: str, timezone: str, stats: AccountStatistics) -> dict[str, Any]:
    return {"account": name, "timezone": timezone, "from": stats.start.isoformat(),
            "to": stats.end.isoformat(), "totals": stats.totals.as_dict(),
            "days": [{"date": day.isoformat(), "counters": counters.as_dict()}
                     for day, counters in stats.days]}


class StatsApp:
    app = Klein()
    log = Logger()

    def __init__(self, authenticator: KeyAuthenticator, statistics: StatisticsStore,
                 clock) -> None:
        self.authenticator = authenticator
        self.statistics = statistics
        self.clock = clock

    @app.route("/v1/stats/sends/<send_id>", methods=["GET"])
    async def send(self, request, send_id: str) -> bytes:
        account = await self.authenticator.account(request)
        if not (send_id.isascii() and send_id.isdigit() and len(send_id) <= _MAX_ID_DIGITS):
            raise _NotFound()
        stats = await self.statistics.send(int(send_id), account.account_id)
        if stats is None:
            raise _NotFound()
        return _json(request, 200, send_json(stats))

    @app.route("/v1/stats", methods=["GET"])
    async def account(self, request) -> bytes:
        account = await self.authenticator.account(request)
        timezone = await self.statistics.timezone(account.account_id) or "UTC"
        zone = account_zone(timezone)
        now = datetime.fromtimestamp(self.clock.seconds(), UTC)
        try:
            start, end = time_range(_argument(request, b"from"), _argument(request, b"to"),
                                    zone, now)
        except ValueError as e:
            raise _BadRequest(str(e)) from None
        stats = await self.statistics.account(account.account_id, start, end, zone.key)
        return _json(request, 200, account_json(account.name, zone.key, stats))

    @app.route("/v1/stats/", branch=True)
    def unknown(self, request) -> bytes:
        raise _NotFound()

    @app.handle_errors(InvalidAPIKey)
    def invalid_key(self, request, failure: Failure) -> bytes:
        return _json(request, 403, {"error": "invalid_api_key",
                                    "message": "missing, wrong or revoked API key"})

    @app.handle_errors(InactiveAccount)
    def inactive(self, request, failure: Failure) -> bytes:
        return _json(request, 403, {"error": "account_inactive",
                                    "message": "the account is disabled"})

    @app.handle_errors(_BadRequest)
    def bad_request(self, request, failure: Failure) -> bytes:
        return _json(request, 400, {"error": "bad_request", "message": str(failure.value)})

    @app.handle_errors(_NotFound, HTTPException)
    def not_found(self, request, failure: Failure) -> bytes:
        return _json(request, 404, {"error": "not_found", "message": "no such statistics"})

    @app.handle_errors(TransientDatabaseError)
    def unavailable(self, request, failure: Failure) -> bytes:
        request.setHeader(b"Retry-After", b"30")
        return _json(request, 503, {"error": "unavailable",
                                    "message": "the database is out of reach, try again"})

    @app.handle_errors(Exception)
    def failed(self, request, failure: Failure) -> bytes:
        self.log.failure("statistics request {uri} failed", failure, uri=request.uri[:200])
        return _json(request, 500, {"error": "internal_error", "message": "internal error"})


def _argument(request, name: bytes) -> str | None:
    values = request.args.get(name)
    if not values:
        return None
    try:
        return values[0].decode("ascii")
    except UnicodeDecodeError:
        raise _BadRequest(f"{name.decode()}: not an ISO 8601 date or time") from None


def _json(request, code: int, value: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(value, ensure_ascii=False).encode("utf-8")
