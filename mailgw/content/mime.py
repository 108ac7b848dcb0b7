"""Well-formed MIME read into the email package's own `Message` tree, faster.

The email package's FeedParser makes several Python calls for every line of a
message: about 1 ms for a 5 KB newsletter, half of what an SMTP submission
costs mailgw.  Mail from applications is nearly always well formed, so
`read_message` splits headers and multipart bodies with a few regular
expressions over the whole text instead, and builds the same `Message` objects
(the same header values, payloads and tree) that `email.message_from_bytes`
would.  Anything it is not sure to read exactly as FeedParser does (a defect
FeedParser would work around, bare CR line ends, message/* parts, a missing
boundary) gives None, and the caller hands the message to the email package.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from email.message import Message
from email.policy import Policy

# A header line FeedParser accepts ('name:'), with a name; a continuation starts with
# a space or a tab.
_HEADER_NAME = re.compile(r"[\041-\071\073-\176]+:")
_BLANK_LINE = re.compile(r"\n\r?\n")
_CONTINUATION = (" ", "\t")
# What may follow a boundary on its line (RFC 2046 5.1.1): '--' when it closes, blanks.
_DELIMITER_END = re.compile(r"(--)?[ \t]*(?:\r?\n|\Z)")


def read_message(raw: bytes, policy: Policy) -> Message | None:
    """`email.message_from_bytes(raw, policy=policy)`, or None where that is the only
    safe way (the caller then uses it)."""
    if raw.count(b"\r") != raw.count(b"\r\n") or raw.startswith(b"From "):
        return None  # bare CR line ends; an mbox From_ line
    # As BytesParser does: the bytes as ASCII, 8-bit bytes kept as surrogates.
    return _read(raw.decode("ascii", "surrogateescape"), policy)


def _read(text: str, policy: Policy) -> Message | None:
    message = Message(policy=policy)
    if text.startswith(("\n", "\r\n")):  # no headers at all
        body = text[1:] if text[0] == "\n" else text[2:]
    else:
        end = _BLANK_LINE.search(text)
        if end is None:
            return None  # headers only, or a line that is neither header nor blank
        if not _add_headers(message, text[:end.start() + 1]):
            return None
        body = text[end.end():]
    maintype = message.get_content_maintype()
    if maintype == "message":
        return None  # FeedParser parses these into sub-messages
    if maintype != "multipart":
        message.set_payload(body)
        return message
    return message if _add_parts(message, body, policy) else None


def _add_headers(message: Message, block: str) -> bool:
    """Each header as FeedParser and compat32 store it: the name as written, the value
    after the colon without leading blanks, continuation lines kept, no final line end."""
    lines = block[:-1].split("\n")
    if lines[0].startswith(_CONTINUATION):
        return False
    name, value = "", ""
    for line in lines:
        if line.startswith(_CONTINUATION):
            value += "\n" + line
            continue
        if not _HEADER_NAME.match(line):
            return False
        if name:
            message.set_raw(name, value.rstrip("\r\n"))
        name, _, value = line.partition(":")
        value = value.lstrip(" \t")
    message.set_raw(name, value.rstrip("\r\n"))
    return True


def _add_parts(message: Message, body: str, policy: Policy) -> bool:
    """The parts between the boundary lines; the line end before each boundary belongs
    to the boundary (RFC 2046 5.1.1)."""
    boundary = message.get_boundary()
    if boundary is None or message.get_content_type() == "multipart/digest":
        return False
    delimiter = "--" + boundary
    parts: list[Message] = []
    start = None
    for line_start, line_end, closing in _delimiter_lines(body, delimiter):
        if start is not None:
            if line_start == start:
                return False  # repeated boundary lines: FeedParser makes odd parts of them
            part = _read(_strip_line_end(body[start:line_start]), policy)
            if part is None or part.is_multipart():
                return False  # nested multiparts: FeedParser strips their epilogue
            parts.append(part)
        if closing:
            message.set_payload(parts)
            return bool(parts)
        start = line_end
    return False  # no closing boundary


def _delimiter_lines(body: str, delimiter: str) -> Iterator[tuple[int, int, bool]]:
    """(start, end, closing) of each line that is `delimiter`, maybe followed by '--'
    (closing), then blanks. str.find, not a MULTILINE regex: '^' is tried at every
    character of the body."""
    position = body.find(delimiter)
    while position >= 0:
        after = position + len(delimiter)
        if position == 0 or body[position - 1] == "\n":
            rest = _DELIMITER_END.match(body, after)
            if rest is not None:
                yield position, rest.end(), rest.group(1) is not None
        position = body.find(delimiter, after)


def _strip_line_end(text: str) -> str:
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text
