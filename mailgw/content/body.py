"""A message's content as stored for delivery (the `messages.body` document, D-2).

The submission path stores it once per message (`StoredBody.of(content).to_json()`) and
the delivery engine prepares every recipient's copy from it
(`StoredBody.from_json(...)`, then `mailgw.content.render.PreparedMessage`). The JSON keys
are those of every body stored so far, and `from_json` reads a missing or null key as its
default, so that messages queued by an older mailgw still render.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mailgw.content.message import Attachment, ParsedMessage


@dataclass(frozen=True)
class StoredBody:
    subject: str
    from_name: str | None
    html: str | None
    text: str | None
    # Headers delivered with the message, as written (ParsedMessage.headers).
    headers: tuple[tuple[str, str], ...]
    attachments: tuple[Attachment, ...]

    @classmethod
    def of(cls, content: ParsedMessage) -> StoredBody:
        """The body of a submission, once its content is checked and rewritten."""
        return cls(content.subject, content.from_name, content.html, content.text,
                   content.headers, content.attachments)

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored in messages.body; attachment data in base64."""
        return {
            "subject": self.subject,
            "from_name": self.from_name,
            "html": self.html,
            "text": self.text,
            "headers": [list(header) for header in self.headers],
            "attachments": [
                {"filename": a.filename, "content_type": a.content_type,
                 "content_id": a.content_id, "inline": a.inline,
                 "data": base64.b64encode(a.data).decode("ascii")}
                for a in self.attachments],
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> StoredBody:
        """A stored body read back; raises what undecodable attachment data makes fail."""
        return cls(
            subject=str(value.get("subject") or ""),
            from_name=value.get("from_name"),
            html=value.get("html"),
            text=value.get("text"),
            headers=tuple((str(item[0]), str(item[1])) for item in value.get("headers") or ()),
            attachments=tuple(_attachment(item) for item in value.get("attachments") or ()),
        )


def _attachment(value: Mapping[str, Any]) -> Attachment:
    return Attachment(
        filename=str(value.get("filename") or ""),
        content_type=str(value.get("content_type") or ""),
        data=base64.b64decode(value.get("data") or ""),
        content_id=str(value.get("content_id") or "") or None,
        inline=bool(value.get("inline")),
    )
