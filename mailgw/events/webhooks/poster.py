"""One webhook post with treq (W-2): bounded in time, in connections and in what is read.

A post succeeds on a 2xx answer and nothing else. A redirect is not followed (the
signature was made for the endpoint's URL, and a redirect could lead the post
anywhere); a plain-http URL is posted to only while its host is in
`webhooks.allow_http_hosts`, checked again at each post, since the list may have
changed since the endpoint was added. The one time limit covers the connection,
TLS, the request and the answer, so a receiver that never accepts, never answers or
answers forever costs at most `timeout` seconds per attempt. The answer's body is
read up to a small bound, so that the connection can be used again, and abandoned
past it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

import treq
from twisted.internet import defer, ssl
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from mailgw.fetch import (
    TimedOut,
    discard_body,
    error_reason,
    read_body,
    within,
)

# An answer's body is read up to this; a receiver has nothing to say to mailgw.
MAX_ANSWER_BYTES = 64 * 1024
# An idle kept-alive connection is closed after this: before the receiver's own idle
# limit (Node's default is 5 s), so that a post is not sent on a connection the
# receiver is closing (a POST is not retried by the pool: it would wait for its retry).
IDLE_CONNECTION_SECONDS = 4


class PostFailed(Exception):
    """The post was not accepted; str() says why, for the log and `last_error`."""


class WebhookPoster:
    def __init__(self, reactor, clock, timeout: float, connections_per_host: int,
                 allow_http_hosts: Sequence[str], trust_root=None) -> None:
        self.clock = clock
        self.timeout = timeout
        self.allow_http_hosts = frozenset(allow_http_hosts)
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = connections_per_host
        pool.cachedConnectionTimeout = IDLE_CONNECTION_SECONDS
        self.agent = Agent(reactor, BrowserLikePolicyForHTTPS(trust_root or ssl.platformTrust()),
                           connectTimeout=timeout, pool=pool)
        self.pool = pool

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> None:
        """Post `body` as JSON to `url`; PostFailed says why it was not accepted."""
        parts = urlsplit(url)
        if parts.scheme == "http" and parts.hostname not in self.allow_http_hosts:
            raise PostFailed(f"plain http to {parts.hostname} is not allowed "
                             "(webhooks.allow_http_hosts)")
        try:
            await within(self._post(url, body, headers), self.timeout, self.clock)
        except TimedOut:
            raise PostFailed(f"no answer within {self.timeout:g} s") from None
        except PostFailed:
            raise
        except Exception as error:
            raise PostFailed(error_reason(error)) from None

    async def _post(self, url: str, body: bytes, headers: Mapping[str, str]) -> None:
        response = await treq.request(
            "POST", url, data=body, agent=self.agent, allow_redirects=False, unbuffered=True,
            headers={"Content-Type": ["application/json"], "User-Agent": ["mailgw-webhooks"],
                     **{name: [value] for name, value in headers.items()}})
        if 300 <= response.code < 400:
            await discard_body(response)
            location = response.headers.getRawHeaders(b"location", [b""])[0]
            raise PostFailed(f"answered {response.code}, a redirect to "
                             f"{location[:100].decode('latin-1')!a} (not followed)")
        # Read to keep the connection, unless longer than anyone needs.
        try:
            await read_body(response, MAX_ANSWER_BYTES)
        except defer.CancelledError:
            raise  # the time limit
        except Exception:
            pass  # too long, or cut off: the connection is gone, and the status decides
        if not 200 <= response.code < 300:
            raise PostFailed(f"answered {response.code}")

    async def close(self) -> None:
        await self.pool.closeCachedConnections()
