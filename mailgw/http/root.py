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

from twisted.web import server
from twisted.web.resource import ErrorPage, Resource


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
        segments = tuple(request.postpath[:self.longest])
        for length in range(len(segments), 0, -1):
            app = self.apps.get(segments[:length])
            if app is not None:
                return app
        return self.default


class QuietSite(server.Site):
    """A Site that writes no access-log line for the paths under `quiet` prefixes:
    tracking hits come by the thousand after a campaign goes out, and each one is an
    event already (T-1, T-2); a log line each would flood the log and cost as much CPU
    as the hit's own work."""

    def __init__(self, resource: Resource, quiet: tuple[bytes, ...] = ()) -> None:
        super().__init__(resource)
        self.quiet = quiet

    def log(self, request) -> None:
        if not request.path.startswith(self.quiet):
            super().log(request)


_NOT_UTF8 = ErrorPage(400, "Bad Request", "The path is not UTF-8.")
