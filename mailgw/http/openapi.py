"""The OpenAPI 3.1 document of every HTTP endpoint (H-), served at /v1/openapi.json.

The document is a file kept in the repository (openapi.json beside this module); a
test validates it and compares its paths with the routes the Gateway serves.
"""

from __future__ import annotations

from pathlib import Path

from klein import Klein

from mailgw.http.api import add_json_error_pages

DOCUMENT = Path(__file__).with_name("openapi.json")


class OpenAPIApp:
    app = Klein()
    add_json_error_pages(app)

    def __init__(self, document: Path = DOCUMENT) -> None:
        self.document = document.read_bytes()

    @app.route("/v1/openapi.json", methods=["GET"])
    def openapi(self, request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return self.document
