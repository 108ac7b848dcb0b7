"""What every JSON app on the HTTP listener shares (H-, R-2, R-3): bodies read with a
limit, one place where errors become answers, the per-key request rate, and the Site
that refuses oversized or slow requests while they arrive.

twisted.web reads a request's whole body before any resource sees it, so a limit
checked by the app would come after the memory is spent. `BoundedSite` makes
`BoundedRequest`s instead, which answer `413` as soon as `Content-Length` (or the
bytes of a chunked body, counted as they come) passes `http.max_body_size`, keep
none of the rest, and answer `408` to a request not complete within
`http.request_timeout` seconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from werkzeug.exceptions import MethodNotAllowed, NotFound

from mailgw.errors import DatabaseUnavailable, TransientDatabaseError

log = Logger()


class APIError(Exception):
    """An answer other than success: its status, its error name (the dialect's, or one
    of mailgw's own, listed in the README), and what else the body says."""

    def __init__(self, status: int, name: str, message: str | None = None,
                 **extra: Any) -> None:
        super().__init__(name if message is None else f"{name}: {message}")
        self.status = status
        self.name = name
        self.message = message
        self.extra = extra
        self.headers: dict[bytes, bytes] = {}


def error_body(name: str, message: str | None = None, **extra: Any) -> dict[str, Any]:
    """The error body of the Aldeamo dialect, which the management API shares:
    `{"error": "<name>"}`, with a `message` in words (and a `field`) where mailgw has
    more to say."""
    body: dict[str, Any] = {"error": name}
    if message is not None:
        body["message"] = message
    body.update(extra)
    return body


# mailgw's own error names, for what the seed's table has no name for.
INVALID_JSON = "Invalid_JSON"
REQUEST_TOO_LARGE = "Request_too_large"
REQUEST_TIMEOUT = "Request_timeout"
TOO_MANY_REQUESTS = "Too_many_requests"
SERVICE_UNAVAILABLE = "Service_unavailable"
NOT_FOUND = "Not_found"
METHOD_NOT_ALLOWED = "Method_not_allowed"
INTERNAL_ERROR = "Internal_error"


def json_bytes(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def respond(request, status: int, body: Any) -> bytes:
    data = json_bytes(body)
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    # Not chunked: a keep-alive client reads one length and the body.
    request.setHeader(b"Content-Length", b"%d" % len(data))
    return data


@dataclass(frozen=True)
class Raw:
    """A successful answer that is not JSON (a message as sent): its bytes and type."""

    data: bytes
    content_type: bytes


def respond_raw(request, status: int, body: Raw) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", body.content_type)
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Content-Length", b"%d" % len(body.data))
    return body.data


def finished_anyway(work: defer.Deferred) -> defer.Deferred:
    """A Deferred with `work`'s result; cancelling it (Klein does when the client goes
    away) stops the waiting, not the work. A transaction cancelled half-way would cost
    its pooled connection, and a group commit every caller of its batch; the work ends
    as it would have, its answer unsent."""
    waiting: defer.Deferred = defer.Deferred()

    def settle(result):
        if not waiting.called:
            waiting.callback(result)
        elif isinstance(result, Failure) and not result.check(APIError):
            log.failure("after the client went away", result)
        return None

    work.addBoth(settle)
    return waiting


# Makes a dialect's error body from an error name, a message in words (or None) and
# what else the refusal says: `error_body` (Aldeamo, the management API), or DMDS's.
ErrorShape = Callable[..., dict[str, Any]]


def json_endpoint(handler: Callable[..., Awaitable[tuple[int, Any]]]
                  ) -> Callable[..., Awaitable[bytes]]:
    """A Klein handler answering (status, JSON body), whose refusals become error bodies
    of the Aldeamo dialect (`json_endpoint_with` for another dialect's)."""
    return json_endpoint_with(error_body)(handler)


def json_endpoint_with(shape: ErrorShape):
    """A decorator for Klein handlers answering (status, JSON body), whose refusals become
    `shape`'s error bodies in one place: APIError as it says, an unreachable database
    `503` (R-2), anything else a logged `500` without a traceback (R-3)."""
    return lambda handler: _answering(handler, shape)


def _answering(handler: Callable[..., Awaitable[tuple[int, Any]]], shape: ErrorShape
               ) -> Callable[..., Awaitable[bytes]]:
    @wraps(handler)
    async def answer(self, request, *args: Any, **kwargs: Any) -> bytes:
        try:
            if any("\x00" in value for value in kwargs.values() if isinstance(value, str)):
                # No name of anything holds one (PostgreSQL could not even compare it).
                raise APIError(404, NOT_FOUND)
            status, body = await finished_anyway(defer.ensureDeferred(
                handler(self, request, *args, **kwargs)))
        except defer.CancelledError:
            return b""  # the client is gone: nobody to answer
        except APIError as refusal:
            for name, value in refusal.headers.items():
                request.setHeader(name, value)
            return respond(request, refusal.status,
                           shape(refusal.name, refusal.message, **refusal.extra))
        except TransientDatabaseError as error:
            if not isinstance(error, DatabaseUnavailable):
                log.warn("{path}: {error}", path=request.path, error=error)
            request.setHeader(b"Retry-After", b"1")
            return respond(request, 503, shape(
                SERVICE_UNAVAILABLE, "the database is unavailable, try again later"))
        except Exception:
            log.failure("{method} {path} failed", method=request.method, path=request.path)
            return respond(request, 500, shape(INTERNAL_ERROR))
        if isinstance(body, Raw):
            return respond_raw(request, status, body)
        return respond(request, status, body)

    return answer


def add_json_error_pages(app, shape: ErrorShape = error_body) -> None:
    """Unknown paths and methods of a Klein app answer in JSON (`shape`'s error bodies),
    not Klein's HTML page. (Klein passes an app bound to an object that object first:
    the handlers take the request and the failure last.)"""

    @app.handle_errors(NotFound)
    def not_found(*args: Any) -> bytes:
        request, _ = args[-2:]
        return respond(request, 404, shape(NOT_FOUND))

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(*args: Any) -> bytes:
        request, failure = args[-2:]
        allowed = failure.value.valid_methods or []
        request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
        return respond(request, 405, shape(METHOD_NOT_ALLOWED))


def read_json(request) -> Any:
    """The request's JSON body (already bounded by BoundedSite); `Invalid_JSON` when it is
    not JSON, not UTF-8, or holds text no UTF-8 can (a lone surrogate, `\\ud800`),
    which PostgreSQL could not store either."""
    request.content.seek(0)
    data = request.content.read()
    try:
        value = json.loads(data.decode("utf-8"))
        json_bytes(value)  # UnicodeEncodeError for a lone surrogate anywhere
    except UnicodeError:
        raise APIError(400, INVALID_JSON, "the body is not valid UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise APIError(400, INVALID_JSON, f"the body is not JSON: {error.msg} at line "
                                          f"{error.lineno} column {error.colno}") from None
    except RecursionError:
        raise APIError(400, INVALID_JSON, "the body is nested too deeply") from None
    return value


class RateLimiter:
    """A token bucket per API key (by its digest): `rate` requests a second, `burst` at
    once. Buckets of keys that have been quiet long enough to be full again are
    forgotten, so memory follows the keys in use, not every key ever seen."""

    def __init__(self, clock, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.clock = clock
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def wait(self, key: str) -> float:
        """0 when a request with `key` may go now (and counts it), else the seconds until
        it may."""
        now = self.clock.seconds()
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
        if len(self._buckets) >= self.max_keys and key not in self._buckets:
            self._forget_full(now)
        self._buckets[key] = (tokens - 1, now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        refill = self.burst / self.rate
        self._buckets = {key: (tokens, at) for key, (tokens, at) in self._buckets.items()
                         if now - at < refill}
        if len(self._buckets) >= self.max_keys:  # every key busy: forget the oldest half
            keep = sorted(self._buckets.items(), key=lambda item: item[1][1])
            self._buckets = dict(keep[len(keep) // 2:])

    def check(self, key: str) -> None:
        """`429 Too_many_requests` with `Retry-After` when the key is over its rate."""
        wait = self.wait(key)
        if wait:
            refusal = APIError(429, TOO_MANY_REQUESTS,
                               f"more than {self.rate:g} requests a second with this key")
            refusal.headers[b"Retry-After"] = str(max(1, math.ceil(wait))).encode("ascii")
            raise refusal


# -- the Site --------------------------------------------------------------------------

ErrorBody = Callable[[bytes, str, str], dict[str, Any]]


def _default_error_body(path: bytes, name: str, message: str) -> dict[str, Any]:
    return error_body(name, message)


_REASONS = {408: b"Request Timeout", 413: b"Content Too Large"}


class BoundedRequest(server.Request):
    """A request whose body may not pass the site's `max_body_size`, nor the request its
    `request_timeout`: refused while it arrives, answered at once and never kept."""

    def __init__(self, channel, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        self._received = 0
        self._refused = False
        site = channel.site
        self._deadline = channel.callLater(site.request_timeout, self._too_slow)

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.channel.site.max_body_size:
            # No "100 Continue" for a body that will not be read.
            self.requestHeaders.removeHeader(b"expect")
            self._too_large()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return  # drained and dropped: the answer is out, the client may still send
        self._received += len(data)
        if self._received > self.channel.site.max_body_size:
            self._too_large()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._stop_deadline()
        if self._refused:  # the body has ended: nothing more to read from this client
            self.channel.transport.loseConnection()
            return
        super().requestReceived(command, path, version)

    def connectionLost(self, reason) -> None:
        self._stop_deadline()
        super().connectionLost(reason)

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_large(self) -> None:
        """413 now. The rest of the body is read and dropped (a client that reads only
        after sending would otherwise lose the answer to a reset) until it ends or the
        request's deadline cuts it."""
        site = self.channel.site
        self._refuse(413, REQUEST_TOO_LARGE,
                     f"the request body is larger than {site.max_body_size} bytes")
        self.content = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self._refused:  # still sending the body of a refused request
            self.channel.transport.abortConnection()
            return
        site = self.channel.site
        self._refuse(408, REQUEST_TIMEOUT,
                     f"the request was not complete within {site.request_timeout:g} s")
        self.channel.transport.loseConnection()

    def _refuse(self, status: int, name: str, message: str) -> None:
        self._refused = True
        self.channel.persistent = False
        path = getattr(self.channel, "_path", b"") or b""
        body = json_bytes(self.channel.site.error_body(path, name, message))
        self.channel.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, _REASONS[status], len(body), body))


class BoundedSite(server.Site):
    """The HTTP listener's Site: request bodies of at most `max_body_size` bytes, whole
    requests within `request_timeout` seconds, idle keep-alive connections closed after
    `idle_timeout`; no tracebacks shown."""

    requestFactory = BoundedRequest
    displayTracebacks = False

    def __init__(self, resource, max_body_size: int, request_timeout: float,
                 idle_timeout: float, reactor=None,
                 error_body: ErrorBody = _default_error_body) -> None:
        super().__init__(resource, timeout=idle_timeout, reactor=reactor)
        self.max_body_size = max_body_size
        self.request_timeout = request_timeout
        self.error_body = error_body
