"""The HTTP listener's root: several Klein apps, each mounted at path prefixes.

Every app routes on full paths (`/a/<token>`, `/healthz`, `/v1/email`), so it
reads the same standalone and mounted; the root only picks the app and hands it
the whole path. A prefix is one or more whole segments, and the longest that
matches wins: with `("v1", "email")` and `("v1",)` mounted, `/v1/email` goes to
the first app and `/v1/contacto/` to the second. Segments are compared as
twisted.web gives them, percent-decoded (`/v%31` is `/v1`; `%2F` does not split a
segment), and an empty segment is a segment of its own: `/v1` and `/v1/` match
`("v1",)`, `//v1` does not. A path no prefix matches goes to the default app. A path
or host name that is not UTF-8 (`/t/%ff`) is a plain 400 here: the apps route on text.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import unquote_to_bytes

from twisted.web import server
from twisted.web.resource import ErrorPage, Resource

from mailgw.http.api import BoundedSite
from mailgw.metrics import Metrics

# The route of a request the default app answers, in metrics.
DEFAULT_ROUTE = "/"


class HTTPRoot(Resource):
    def __init__(self, apps: Mapping[tuple[str, ...], Resource], default: Resource) -> None:
        super().__init__()
        for prefix in apps:
            if not prefix or not all(segment and "/" not in segment for segment in prefix):
                raise ValueError(f"not a path prefix of whole segments: {prefix!r}")
        self.apps = {tuple(segment.encode() for segment in prefix): app
                     for prefix, app in apps.items()}
        self.longest = max(map(len, self.apps), default=0)
        self.default = default

    def getChild(self, name: bytes, request) -> Resource:
        # Give the segment back, so that the app sees the full path.
        request.postpath.insert(0, request.prepath.pop())
        try:
            b"/".join(request.postpath).decode("utf-8")
            request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            return _NOT_UTF8
        prefix = self._prefix(request.postpath)
        if prefix is None:
            request.mailgw_route = DEFAULT_ROUTE
            return self.default
        request.mailgw_route = "/" + "/".join(s.decode() for s in prefix)
        return self.apps[prefix]

    def _prefix(self, segments: list[bytes]) -> tuple[bytes, ...] | None:
        """The longest mounted prefix of the path's segments, None when none is."""
        start = tuple(segments[:self.longest])
        for length in range(len(start), 0, -1):
            if start[:length] in self.apps:
                return start[:length]
        return None

    def route_of(self, path: bytes) -> str:
        """The route (mount point) a raw request path (query string and all) goes to, as
        the metrics name it: for answers made before any app sees the request."""
        segments = unquote_to_bytes(path.partition(b"?")[0]).split(b"/")[1:]
        prefix = self._prefix(segments)
        return DEFAULT_ROUTE if prefix is None else "/" + "/".join(
            s.decode("utf-8", "replace") for s in prefix)


class MeteredSite(server.Site):
    """A Site that counts each request it answers by route (the mount point HTTPRoot
    chose: a few values, whatever the paths asked for) and status (O-5)."""

    def __init__(self, resource: Resource, metrics: Metrics, **kwargs) -> None:
        super().__init__(resource, **kwargs)
        self.metrics = metrics

    def log(self, request) -> None:
        super().log(request)
        route = getattr(request, "mailgw_route", DEFAULT_ROUTE)
        self.metrics.http_requests.labels(route, str(request.code)).inc()


class QuietSite(server.Site):
    """A Site that writes no access-log line for the paths under `quiet`: tracking hits
    come by the thousand after a campaign goes out, and each one is an event already
    (T-1, T-2); a log line each would flood the log and cost as much CPU as the hit's
    own work."""

    quiet: tuple[bytes, ...] = ()

    def log(self, request) -> None:
        if not request.path.startswith(self.quiet):
            super().log(request)


class ListenerSite(MeteredSite, QuietSite, BoundedSite):
    """The HTTP listener's Site: requests counted (MeteredSite), tracking hits left out
    of the access log (QuietSite), bounded in size and time (BoundedSite)."""

    quiet = (b"/t/",)


_NOT_UTF8 = ErrorPage(400, "Bad Request", "The path is not UTF-8.")
