"""Public, token-addressed endpoints on the HTTP listener (T-).

Now: attachment downloads for the `links` attachment policy (S-8).  The
open pixel, click redirects, unsubscribe and web version join this app in
the tracking issue.
"""

from __future__ import annotations

from urllib.parse import quote

from klein import Klein

from mailgw.store.submissions import SubmissionStore


class TrackingApp:
    app = Klein()

    def __init__(self, submissions: SubmissionStore) -> None:
        self.submissions = submissions

    @app.route("/a/<token>", methods=["GET"])
    async def attachment(self, request, token: str) -> bytes:
        """A file replaced by a link in the message; unknown tokens are 404."""
        found = await self.submissions.attachment(token)
        if found is None:
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"Not found\n"
        filename, content_type, data = found
        request.setHeader(b"Content-Type", content_type.encode("ascii", "replace"))
        request.setHeader(b"Content-Disposition",
                          b"attachment; filename*=UTF-8''" + quote(filename).encode("ascii"))
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        return data
