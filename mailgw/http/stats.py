"""Statistics over HTTP (H-4), with an account (or admin) API key.

`GET /v1/stats/sends/<send_id>`: a send's counters; another account's send is a 404,
as one that does not exist. `GET /v1/stats?from=<iso>&to=<iso>`: the account's
counters over the range and per day in its time zone. The counters are exactly those
of `mailgw.store.statistics.COUNTERS`. Errors are the JSON bodies every JSON app
shares (mailgw/http/api.py): 403 `Invalid_API_Key`, `Current_service_is_not_active`
or `API_key_not_authorized` (a campaign's key), 400 `Bad_request` for a bad range,
404 `Not_found`, 503 while the database is out of reach.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from klein import Klein

from mailgw.http.api import NOT_FOUND, APIError, add_json_error_pages, json_endpoint
from mailgw.http.auth import READ, KeyAuthenticator
from mailgw.store.statistics import (
    AccountStatistics,
    SendStatistics,
    StatisticsStore,
    account_zone,
    time_range,
)

BAD_REQUEST = "Bad_request"
# Send ids are bigints: longer digit strings name no send.
_MAX_ID_DIGITS = 18


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
    add_json_error_pages(app)

    def __init__(self, authenticator: KeyAuthenticator, statistics: StatisticsStore,
                 clock) -> None:
        self.authenticator = authenticator
        self.statistics = statistics
        self.clock = clock

    @app.route("/v1/stats/sends/<send_id>", methods=["GET"])
    @json_endpoint
    async def send(self, request, send_id: str) -> tuple[int, Any]:
        account = await self.authenticator.caller(request, READ)
        if not (send_id.isascii() and send_id.isdigit() and len(send_id) <= _MAX_ID_DIGITS):
            raise APIError(404, NOT_FOUND, "no such send")
        stats = await self.statistics.send(int(send_id), account.account_id)
        if stats is None:
            raise APIError(404, NOT_FOUND, "no such send")
        return 200, send_json(stats)

    @app.route("/v1/stats", methods=["GET"])
    @json_endpoint
    async def account(self, request) -> tuple[int, Any]:
        account = await self.authenticator.caller(request, READ)
        zone = account_zone(await self.statistics.timezone(account.account_id) or "UTC")
        now = datetime.fromtimestamp(self.clock.seconds(), UTC)
        try:
            start, end = time_range(_argument(request, b"from"), _argument(request, b"to"),
                                    zone, now)
        except ValueError as e:
            raise APIError(400, BAD_REQUEST, str(e)) from None
        stats = await self.statistics.account(account.account_id, start, end, zone.key)
        return 200, account_json(account.name, zone.key, stats)


def _argument(request, name: bytes) -> str | None:
    values = request.args.get(name)
    if not values:
        return None
    try:
        return values[0].decode("ascii")
    except UnicodeDecodeError:
        raise APIError(400, BAD_REQUEST, f"{name.decode()}: not an ISO 8601 date or "
                       "time") from None
