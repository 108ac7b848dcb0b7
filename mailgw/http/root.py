"""The HTTP listener's root: several Klein apps, each owning some first path segments.

Every app routes on full paths (`/a/<token>`, `/healthz`, later `/v1/...`), so it
reads the same standalone and mounted; the root only picks the app by the first
segment and hands it the whole path.
"""

from __future__ import annotations

from twisted.web.resource import Resource


class HTTPRoot(Resource):
    def __init__(self, apps: dict[bytes, Resource], default: Resource) -> None:
        super().__init__()
        self.apps = apps
        self.default = default

    def getChild(self, name: bytes, request) -> Resource:  # noqa: N802 (Twisted's name)
        # Give the segment back, so that the app sees the full path.
        request.postpath.insert(0, request.prepath.pop())
        return self.apps.get(name, self.default)
