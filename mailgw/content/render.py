"""Each recipient's copy of a message, ready to send (D-2, S-9, S-11, T-1 to T-5).

Pure code: no I/O, no database, no reactor. The delivery engine prepares a stored message
once (`PreparedMessage(body, ...)` from its `StoredBody`: insert the S-9 texts, split the
HTML at its links, build every header and MIME part that is the same for all recipients)
and then renders it per recipient (`PreparedMessage.render`): one merge pass per part, the
signed tracking links joined in, the parts encoded, and the DKIM signature on top
(docs/architecture.md, principle 4). This module owns the sender and recipient contexts, header
writing and MIME building; the links are signed by `mailgw.content.links`, the signature
made by `mailgw.content.dkim`.
"""

from __future__ import annotations

import base64
import binascii
import html
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime, getaddresses
from typing import Any
from urllib.parse import quote

from mailgw.content.body import StoredBody
from mailgw.content.dkim import DKIMSigner, PendingSignature
from mailgw.content.footer_texts import FooterTexts, header_footer_texts, message_language
from mailgw.content.links import LinkSigner
from mailgw.content.merge import merge
from mailgw.content.message import Attachment, decode_header
from mailgw.randomness import random_hex
from mailgw.text import one_line

__all__ = ["PreparedMessage", "RecipientContext", "SenderContext"]


# --- Contexts ---

@dataclass(frozen=True)
class SenderContext:
    """What a message's sender (account, sender domain) brings; the same for all recipients."""

    from_address: str
    from_name: str | None
    hostname: str  # the gateway's, for Message-ID
    bounce_domain: str  # VERP Return-Path domain of the sender domain
    unsubscribe_mailto: str  # List-Unsubscribe mailto: address
    dkim: DKIMSigner | None
    language: int = 3  # S-9: the account's default, used when the message names none
    show_cab: bool = True  # account switches: a feature is on only when the message's
    social_links: Mapping[str, str] = field(default_factory=dict)  # network -> profile URL
    track_opens: bool = True  # option (S-9) and the account's switch (T-5) are both on
    track_clicks: bool = True
    reply_to: str | None = None  # the message's Reply-To address, when it has one


@dataclass(frozen=True)
class RecipientContext:
    delivery_id: int
    email: str
    fields: Mapping[str, str]  # contact fields (XYZ<FIELD>XYZ)
    variables: Mapping[str, str]  # template/API variables ({name})


# --- Headers ---

_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}")
_HEADER_LINE = 78  # RFC 5322 2.1.1: lines SHOULD be at most 78 characters, MUST be 998
_MAX_LINE = 998
# Longer words are written another way (encoded words, RFC 2231 continuations), so that
# a line with a word and a header name stays within 998.
_LONGEST_WORD = 900
# Header fields that mailgw writes itself or that describe MIME structure: a kept copy
# would duplicate or contradict ours.
_OURS = frozenset({"from", "to", "subject", "date", "message-id", "mime-version", "bcc",
                   "list-unsubscribe", "list-unsubscribe-post", "dkim-signature",
                   "return-path", "content-type", "content-transfer-encoding"})
# The headers that hold address lists (RFC 5322 3.6.2, 3.6.3, 3.6.6).
_ADDRESS_HEADERS = frozenset({"from", "sender", "reply-to", "to", "cc", "bcc", "resent-from",
                              "resent-sender", "resent-to", "resent-cc", "resent-bcc"})
# 42 bytes of UTF-8 are 56 base64 characters: "=?utf-8?b?...?=" stays within 68.
_ENCODED_WORD_BYTES = 42
_PLAIN_ADDRESS = re.compile(r"[!#-'*+\-/-9=?A-Z^-~.]{1,64}@[A-Za-z0-9.-]{1,255}")
# A display name of atoms (RFC 5322 3.2.3) is written as it is; any other is quoted.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ATOMS = re.compile(rf"{_ATOM}(?: {_ATOM})*")
# One address of a list: up to a comma outside quotes and comments. Possessive, and each
# character matched once, so one pass over the list.
_ADDRESS_ITEM = re.compile(r"""(?:"(?:[^"\\]++|\\.)*+"?|\((?:[^()\\]++|\\.)*+\)?|[^",(]++)++""",
                           re.DOTALL)
# A display name (without specials, or quoted) and an angle-addr: possessive, linear.
_NAMED_ADDRESS = re.compile(r"""([^<>"()\\,;:@\[\]]*+|"[^"\\]*+")\s*+<([!-;=?-~]++)>""")
# RFC 2231 attribute-char: what a percent-encoded parameter value keeps as it is.
_ATTRIBUTE_CHARS = "!#$&+^`{|}"
_PARAMETER_PIECE = 54  # " filename*0*=utf-8''", 54 characters and ";" fit in 78


def _fold(name: str, words: Iterable[str]) -> bytes:
    """`name:` and the words, a space before each, folded (RFC 5322 2.2.3) before a word
    that would take its line past 78 characters. One pass, linear in the header's length:
    the email package's folder rescans the rest of a header for every line it writes,
    quadratic in a long list (8.2 s for a Cc of 10,000 addresses, 28.9 s for 20,000, on
    the reactor). Words are ASCII and never split; an empty one is an extra space."""
    lines: list[str] = []
    line = f"{name}:"
    for word in words:
        if word and len(line) + 1 + len(word) > _HEADER_LINE and line.strip():
            lines.append(line)
            line = ""
        line += " " + word
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def _unstructured(name: str, value: str) -> bytes:
    """A header of free text (Subject), folded, RFC 2047 encoded when not plain ASCII, or
    when "=?" would read as an encoded word, or a word is too long for a line."""
    value = one_line(value)
    if len(name) + 2 + len(value) <= _HEADER_LINE and value.isascii() and "=?" not in value:
        return f"{name}: {value}\r\n".encode("ascii")
    words = value.split(" ")
    if value.isascii() and "=?" not in value and max(map(len, words)) <= _LONGEST_WORD:
        return _fold(name, words)
    return _fold(name, _encoded_words(value))


def _encoded_words(text: str) -> list[str]:
    """RFC 2047 B words of at most 42 bytes of UTF-8 each, never splitting a character."""
    data = text.encode("utf-8", "replace")
    words, start = [], 0
    while start < len(data):
        end = min(start + _ENCODED_WORD_BYTES, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:  # inside a character
            end -= 1
        words.append(f"=?utf-8?b?{base64.b64encode(data[start:end]).decode('ascii')}?=")
        start = end
    return words


def _address_header(name: str, display_name: str | None, address: str) -> bytes:
    address = one_line(address)
    words = _mailbox_words(one_line(display_name or ""), address)
    if words is None:  # a non-ASCII local part, which only SMTPUTF8 can carry
        return f"{name}: {address}\r\n".encode("utf-8", "replace")
    return _fold(name, words)


def _mailbox_words(display_name: str, address: str) -> list[str] | None:
    """`Display Name <address>` as words (RFC 5322 3.4), the domain in IDNA; None when the
    address cannot be written in 7 bits."""
    local, at, domain = address.rpartition("@")
    if at and not domain.isascii():
        try:
            address = f"{local}@{domain.encode('idna').decode('ascii')}"
        except UnicodeError:
            return None
    if not address.isascii() or len(address) > _LONGEST_WORD:
        return None
    if not display_name:
        return [address]
    if display_name.isascii() and display_name.isprintable() and "=?" not in display_name:
        if _ATOMS.fullmatch(display_name):
            words = display_name.split(" ")
        else:  # a quoted string, folded at its spaces
            words = display_name.replace("\\", "\\\\").replace('"', '\\"').split(" ")
            words[0], words[-1] = '"' + words[0], words[-1] + '"'
        if max(map(len, words)) <= _LONGEST_WORD:
            return [*words, f"<{address}>"]
    return [*_encoded_words(display_name), f"<{address}>"]


def _address_list_words(value: str) -> list[str]:
    """The words of an address list, each address but the last ending in its comma.
    Addresses in plain ASCII are kept as written; any other (an 8-bit display name, a
    word too long for a line) is read and written anew, its display name encoded."""
    words: list[str] = []
    for match in _ADDRESS_ITEM.finditer(value):
        item = match.group(0).strip()
        item_words = item.split(" ")
        if not item.isascii() or max(map(len, item_words)) > _LONGEST_WORD:
            item_words = _address_anew(item)
        if item_words:
            words.extend(item_words)
            words[-1] += ","
    if words:
        words[-1] = words[-1][:-1]
    return words


def _address_anew(item: str) -> list[str]:
    """One address of a list, written in 7 bits; as encoded text if it is no address.
    `Name <address>` and `"Name" <address>` are read with a regex: getaddresses takes
    ~17 us an address (a third of a second for a list of 20,000)."""
    named = _NAMED_ADDRESS.fullmatch(item)
    if named is not None:
        display, address = named.group(1).strip().strip('"'), named.group(2)
    else:
        parsed = getaddresses([item])
        display, address = parsed[0] if len(parsed) == 1 else ("", "")
    words = _mailbox_words(decode_header(display), address) if address else None
    return _encoded_words(decode_header(item)) if words is None else words


def _kept_header(name: str, value: str) -> bytes | None:
    """A header of the submitted message, as written when it is plain ASCII; folded when
    longer than a line may be, and RFC 2047 encoded where it is not ASCII."""
    if not _FIELD_NAME.fullmatch(name):
        return None
    value = one_line(value)
    line = f"{name}: {value}\r\n"
    if value.isascii() and len(line) <= _MAX_LINE:
        return line.encode("ascii")
    if name.lower() in _ADDRESS_HEADERS:
        return _fold(name, _address_list_words(value))
    words = value.split(" ")
    if value.isascii() and max(map(len, words)) <= _LONGEST_WORD:
        return _fold(name, words)  # encoded words as written: they hold no space
    return _fold(name, _encoded_words(decode_header(value)))


def _to_header(address: str) -> bytes:
    address = one_line(address)
    if _PLAIN_ADDRESS.fullmatch(address):
        return f"To: {address}\r\n".encode("ascii")
    return _address_header("To", None, address)


def _ascii_domain(domain: str) -> str:
    """A host or domain name as it may appear in a header (IDNA for a non-ASCII one)."""
    domain = one_line(domain)
    try:
        return domain if domain.isascii() else domain.encode("idna").decode("ascii")
    except UnicodeError:
        return "invalid"


# --- Body parts ---

# A boundary with "=_" never occurs in quoted-printable or base64 text, so the parts need
# not be searched for it.
_BOUNDARY_PREFIX = "=_mailgw_"
_TEXT_HEADERS = {
    "qp": b"Content-Transfer-Encoding: quoted-printable\r\n",
    "b64": b"Content-Transfer-Encoding: base64\r\n",
}
_MIME_TOKEN = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,64}")


def _encode_text(text: str) -> tuple[bytes, bytes]:
    """(Content-Transfer-Encoding header, body) for a UTF-8 text part: quoted-printable
    for mostly-ASCII text, base64 when that is shorter (Cyrillic, Greek, CJK...). Either
    way the message is 7-bit clean and needs no 8BITMIME from the receiving server."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    data = text.encode("utf-8", "replace")
    # Each non-ASCII character takes 2-4 bytes, each 3 characters in quoted-printable.
    if (len(data) - len(text)) * 12 < len(data):
        return _TEXT_HEADERS["qp"], binascii.b2a_qp(data, istext=True).replace(b"\n", b"\r\n")
    data = text.replace("\n", "\r\n").encode("utf-8", "replace")
    return _TEXT_HEADERS["b64"], base64.encodebytes(data).replace(b"\n", b"\r\n")


def _attachment_part(attachment: Attachment) -> tuple[bytes, bool]:
    """(the complete MIME part, whether it is an inline cid: image)."""
    data = attachment.data
    maintype, _, subtype = attachment.content_type.lower().partition("/")
    if not (_MIME_TOKEN.fullmatch(maintype) and _MIME_TOKEN.fullmatch(subtype)) or \
            maintype == "multipart":
        maintype, subtype = "application", "octet-stream"
    filename = one_line(attachment.filename) or "attachment"
    content_id = one_line(attachment.content_id or "").strip("<> ")
    content_id = "".join(content_id.split())
    if not (content_id.isascii() and len(content_id) <= _LONGEST_WORD):
        content_id = ""  # no line can hold it: the image cannot be shown through cid:
    inline = attachment.inline and bool(content_id)
    encoding, body = "base64", base64.encodebytes(data).replace(b"\n", b"\r\n")
    if maintype == "message":
        # RFC 2046 5.2.1: message/* may not be base64. A 7-bit message goes as written;
        # any other is sent as a file.
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if data.isascii() and all(len(line) <= 998 for line in data.split(b"\r\n")):
            encoding, body = "7bit", data if data.endswith(b"\r\n") else data + b"\r\n"
        else:
            maintype, subtype = "application", "octet-stream"
    head = [_fold("Content-Type", [f"{maintype}/{subtype};", *_parameter("name", filename)]),
            f"Content-Transfer-Encoding: {encoding}\r\n".encode("ascii"),
            _fold("Content-Disposition", ["inline;" if inline else "attachment;",
                                          *_parameter("filename", filename)])]
    if content_id:
        head.append(f"Content-ID: <{content_id}>\r\n".encode("ascii"))
    return b"".join(head) + b"\r\n" + body, inline


def _parameter(name: str, value: str) -> list[str]:
    """A MIME parameter as header words: `name="value"` when the value is short printable
    ASCII, else RFC 2231 percent-encoded UTF-8, in continuations that each fit a line."""
    if value.isascii() and value.isprintable() and len(value) <= _PARAMETER_PIECE:
        return ['{}="{}"'.format(name, value.replace("\\", "\\\\").replace('"', '\\"'))]
    encoded = quote(value, safe=_ATTRIBUTE_CHARS, errors="replace")
    pieces, start = [], 0
    while start < len(encoded):
        end = min(start + _PARAMETER_PIECE, len(encoded))
        if end < len(encoded) and "%" in encoded[end - 2:end]:  # a %XX is not split
            end = encoded.rindex("%", end - 2, end)
        pieces.append(encoded[start:end])
        start = end
    if len(pieces) == 1:
        return [f"{name}*=utf-8''{pieces[0]}"]
    pieces[0] = "utf-8''" + pieces[0]
    words = [f"{name}*{number}*={piece};" for number, piece in enumerate(pieces)]
    words[-1] = words[-1].removesuffix(";")
    return words


# Placeholders of the MIME layout filled per recipient.
_TEXT, _HTML = object(), object()


def _multipart(subtype: str, children: list, boundary: str, params: str = "") -> list:
    """The chunks of a multipart: its Content-Type header, then each child between
    delimiters; children are chunk lists themselves or placeholders."""
    chunks: list = [f'Content-Type: multipart/{subtype};{params}\r\n boundary="{boundary}"\r\n'
                    f"\r\n".encode("ascii")]
    for child in children:
        chunks.append(f"--{boundary}\r\n".encode("ascii"))
        chunks.extend(child)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    return chunks


# --- HTML ---

# A tag's attributes: possessive, and no "<" outside quotes, so that a "<a " that never
# ends costs a scan to the next "<", not a rescan of the rest of the document.
_ATTRIBUTES = r"""(?:[^<>"']++|"[^"]*+"|'[^']*+')*+"""
_LINK_TAG = re.compile(r"<(?:a|area)\b" + _ATTRIBUTES + ">", re.IGNORECASE)
_HREF = re.compile(r"""(?<![\w:-])href\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'=<>`]+))""",
                   re.IGNORECASE)
_BODY_OPEN = re.compile(r"<body\b" + _ATTRIBUTES + ">", re.IGNORECASE)
_HEAD_CLOSE = re.compile(r"</head\s*>", re.IGNORECASE)
_HTML_OPEN = re.compile(r"<html\b" + _ATTRIBUTES + ">", re.IGNORECASE)
_BODY_CLOSE = re.compile(r"</body\s*>", re.IGNORECASE)
_HTML_CLOSE = re.compile(r"</html\s*>", re.IGNORECASE)
_HTTP = ("http://", "https://")
_OUR_LINK_TAGS = frozenset({"[unsubscribe]", "[webversion]"})
# Browsers drop tabs and line breaks from URLs (WHATWG URL); so do we, before signing.
_URL_NOISE = re.compile(r"[\t\r\n]")
# Marks the places of per-recipient URLs in the merged HTML. Merge tags cannot span it, and
# it is removed from the content and from the values merged in, so it marks nothing else.
_SLOT = "\x00"
_CLICK, _MERGED_LINK, _OPEN = 0, 1, 2
_SOCIAL_NAMES = {"facebook": "Facebook", "twitter": "Twitter", "x": "X",
                 "instagram": "Instagram", "linkedin": "LinkedIn", "youtube": "YouTube",
                 "tiktok": "TikTok", "pinterest": "Pinterest", "whatsapp": "WhatsApp",
                 "telegram": "Telegram", "threads": "Threads", "mastodon": "Mastodon",
                 "bluesky": "Bluesky"}
_SMALL_PRINT = ("margin:0;padding:8px 0;font-family:Arial,Helvetica,sans-serif;"
                "font-size:12px;line-height:16px;color:#666666;text-align:center")
_PIXEL = '<img src="' + _SLOT + '" width="1" height="1" alt="" style="display:none">'


def _insert_at_top(document: str, block: str) -> str:
    """Right after <body>, else after </head> or <html>, else at the start."""
    for pattern in (_BODY_OPEN, _HEAD_CLOSE, _HTML_OPEN):
        found = pattern.search(document)
        if found is not None:
            return document[:found.end()] + "\n" + block + document[found.end():]
    return block + "\n" + document


def _end_position(document: str) -> int:
    """Before the last </body>, else before </html>, else the end."""
    for pattern in (_BODY_CLOSE, _HTML_CLOSE):
        last = None
        for last in pattern.finditer(document):  # noqa: B007 - the last match is wanted
            pass
        if last is not None:
            return last.start()
    return len(document)


def _social_links(links: Mapping[str, str]) -> list[tuple[str, str]]:
    """(shown name, URL) of the sender's http(s) profile links."""
    shown = []
    for network, url in links.items():
        url = one_line(str(url))
        if url.lower().startswith(_HTTP):
            name = one_line(str(network))
            shown.append((_SOCIAL_NAMES.get(name.lower(), name), url))
    return shown


def _html_values(values: Mapping[str, str]) -> dict[str, str]:
    """Values merged into HTML must not become markup nor slot marks."""
    return {name: html.escape(value.replace(_SLOT, "")) for name, value in values.items()}


def _may_hold_tag(value: str) -> bool:
    """Whether a merge tag (S-11) may be in `value`; a superset, decided by merging."""
    return "{" in value or "[" in value or "XYZ" in value


# --- Preparation: what is the same for every recipient ---

def _text_with_header_footer(text: str | None, texts: FooterTexts, show_cab: bool,
                     social: list[tuple[str, str]]) -> str | None:
    """The text part with the web version line on top and the social links at the end."""
    if text is None:
        return None
    if show_cab:
        text = f"{texts.view_in_browser}: [WebVersion]\n\n{text}"
    if social:
        listing = "\n".join(f"{name}: {url}" for name, url in social)
        text = f"{text.rstrip()}\n\n{texts.follow_us}:\n{listing}\n"
    return text


def _html_with_slots(document: str | None, texts: FooterTexts, show_cab: bool,
                     social: list[tuple[str, str]], track_opens: bool, track_clicks: bool,
                     tracking: str) -> tuple[str | None, list[tuple[int, str]]]:
    """The HTML with its S-9 texts and a _SLOT at each per-recipient URL (tracked links,
    the open pixel), and what each slot holds, in order."""
    slots: list[tuple[int, str]] = []
    if document is None:
        return None, slots
    document = document.replace(_SLOT, "")
    if show_cab:
        document = _insert_at_top(document, (
            f'<p style="{_SMALL_PRINT}"><a href="[WebVersion]" '
            f'style="color:#666666;text-decoration:underline">'
            f"{html.escape(texts.view_in_browser, quote=False)}</a></p>"))
    if social:
        items = " &middot; ".join(
            f'<a href="{html.escape(url)}" style="color:#666666">'
            f"{html.escape(name, quote=False)}</a>"
            for name, url in social)
        block = (f'<p style="{_SMALL_PRINT}">{html.escape(texts.follow_us, quote=False)}: '
                 f"{items}</p>\n")
        end = _end_position(document)
        document = document[:end] + block + document[end:]
    # (start, end, replacement with one slot, slot) of every per-recipient URL.
    spans: list[tuple[int, int, str, tuple[int, str]]] = []
    if track_clicks:
        for tag in _LINK_TAG.finditer(document):
            href = _HREF.search(tag.group(0))
            slot = href and _link_slot(next(v for v in href.groups() if v is not None),
                                       tracking)
            if slot is not None:
                spans.append((tag.start() + href.start(), tag.start() + href.end(),
                              f'href="{_SLOT}"', slot))
    if track_opens:
        end = _end_position(document)
        spans.append((end, end, _PIXEL + "\n", (_OPEN, "")))
    pieces, position = [], 0
    for start, end, replacement, slot in sorted(spans, key=lambda span: span[0]):
        pieces.append(document[position:start])
        pieces.append(replacement)
        slots.append(slot)
        position = end
    pieces.append(document[position:])
    return "".join(pieces), slots


def _link_slot(raw_href: str, tracking: str) -> tuple[int, str] | None:
    """How a link is tracked: a fixed destination, one known per recipient (it holds
    merge tags), or not at all (mailto:, anchors, [Unsubscribe], our own URLs)."""
    href = _URL_NOISE.sub("", html.unescape(raw_href)).strip()
    if href.lower() in _OUR_LINK_TAGS:
        return None
    if _may_hold_tag(href):
        return (_MERGED_LINK, href)
    if href.lower().startswith(_HTTP) and not href.startswith(tracking):
        return (_CLICK, href)
    return None


def _mime_layout(has_text: bool, has_html: bool, attachments: Iterable[Attachment]) -> list:
    """The MIME tree as chunks, with _TEXT and _HTML where the per-recipient parts go."""
    boundary = _BOUNDARY_PREFIX + random_hex()
    inline, files = [], []
    for attachment in attachments:
        part, is_inline = _attachment_part(attachment)
        (inline if is_inline and has_html else files).append([part])
    html_node: list = [_HTML]
    if inline:
        html_node = _multipart("related", [html_node, *inline], boundary + "_r",
                               ' type="text/html";')
    bodies = ([[_TEXT]] if has_text else []) + ([html_node] if has_html else [])
    root = bodies[0] if len(bodies) == 1 else _multipart("alternative", bodies,
                                                         boundary + "_a")
    if files:
        root = _multipart("mixed", [root, *files], boundary + "_m")
    return root


def _middle_headers(headers: Iterable[tuple[str, str]], reply_to: str | None) -> bytes:
    """MIME-Version, Reply-To and the headers of the submitted message that are kept."""
    middle = [b"MIME-Version: 1.0\r\n"]
    ours = set(_OURS)
    if reply_to:
        middle.append(_address_header("Reply-To", None, reply_to))
        ours.add("reply-to")
    for name, value in headers:
        if name.lower() not in ours and not name.lower().startswith("content-"):
            kept = _kept_header(name, value)
            if kept is not None:
                middle.append(kept)
    return b"".join(middle)


# --- The message ---

class PreparedMessage:
    """A stored message prepared ONCE, then rendered cheaply per recipient (D-2)."""

    _signer: LinkSigner
    _dkim: DKIMSigner | None
    _tracking: str  # the prefix of our own tracking URLs, which are never tracked again
    _subject: str  # before merging
    _subject_header: bytes  # for every recipient whose subject merges to the same text
    _unsubscribe_mailto: str
    _hostname: str  # the gateway's, for Message-ID
    _text: str | None  # the text part before merging; None: the message has none
    _html: str | None  # the HTML before merging, a _SLOT at each per-recipient URL
    _slots: list[tuple[int, str]]  # (kind, destination) of each _SLOT, in order
    _layout: list  # the MIME tree's chunks, _TEXT and _HTML where the parts go
    _from_header: bytes
    _middle_headers: bytes  # the headers between Date and List-Unsubscribe

    def __init__(self, body: StoredBody, options: Mapping[str, Any] | None,
                 sender: SenderContext, signer: LinkSigner) -> None:
        """options: the message's MessageOptions as a dict (S-9). A feature is on when the
        message options and the sender's switch both say so (T-5)."""
        options = options or {}
        if sender.dkim is not None:
            sender.dkim._key  # noqa: B018 - a broken key fails here, once, not per recipient
        texts = header_footer_texts(message_language(options, sender.language))
        show_cab = bool(options.get("show_cab", True)) and sender.show_cab
        social = (_social_links(sender.social_links)
                  if options.get("social_links", False) else [])
        track_opens = bool(options.get("track_opens", True)) and sender.track_opens
        track_clicks = bool(options.get("track_clicks", True)) and sender.track_clicks

        self._signer = signer
        self._dkim = sender.dkim
        self._tracking = f"{signer.base_url}/t/"
        self._subject = body.subject
        self._subject_header = _unstructured("Subject", body.subject)
        local, at, domain = one_line(sender.unsubscribe_mailto).rpartition("@")
        self._unsubscribe_mailto = f"{local}{at}{_ascii_domain(domain)}"
        self._hostname = _ascii_domain(sender.hostname)
        text = _text_with_header_footer(body.text, texts, show_cab, social)
        self._html, self._slots = _html_with_slots(body.html, texts, show_cab, social,
                                                   track_opens, track_clicks, self._tracking)
        # A message with neither part is sent with an empty text part.
        self._text = "" if text is None and self._html is None else text
        self._layout = _mime_layout(self._text is not None, self._html is not None,
                                    body.attachments)
        from_name = sender.from_name if sender.from_name is not None else body.from_name
        self._from_header = _address_header("From", from_name, sender.from_address)
        self._middle_headers = _middle_headers(body.headers, sender.reply_to)

    # Rendering.

    def render(self, recipient: RecipientContext) -> bytes:
        """The complete RFC 5322 message for one recipient: CRLF line endings, 7-bit, with
        the DKIM-Signature on top when the sender domain has a key."""
        message, signature = self.render_unsigned(recipient)
        if signature is None:
            return message
        return signature.header(signature.key_signature()) + message

    def render_unsigned(self, recipient: RecipientContext
                        ) -> tuple[bytes, PendingSignature | None]:
        """render() without the DKIM key operation: the message and, when the sender
        domain has a key, its signature to complete (the delivery engine does that in a
        thread) and put on top."""
        delivery_id = recipient.delivery_id
        unsubscribe = self._signer.unsubscribe_url(delivery_id)
        links = {"unsubscribe": unsubscribe,
                 "webversion": self._signer.web_version_url(delivery_id)}
        text_part = html_part = b""
        if self._text is not None:
            text = merge(self._text, recipient.variables, recipient.fields, links)
            encoding, encoded = _encode_text(text)
            text_part = (b"Content-Type: text/plain; charset=utf-8\r\n" + encoding
                         + b"\r\n" + encoded)
        if self._html is not None:
            encoding, encoded = _encode_text(self._merge_html(recipient, links))
            html_part = (b"Content-Type: text/html; charset=utf-8\r\n" + encoding
                         + b"\r\n" + encoded)
        subject = merge(self._subject, recipient.variables, recipient.fields, links)
        token = unsubscribe.rpartition("/")[2]
        list_unsubscribe = (f"List-Unsubscribe: <{unsubscribe}>,\r\n <mailto:"
                            f"{self._unsubscribe_mailto}?subject=unsubscribe-{token}>\r\n")
        message = b"".join([
            self._from_header,
            _to_header(recipient.email),
            self._subject_header if subject == self._subject
            else _unstructured("Subject", subject),
            f"Date: {format_datetime(datetime.now(UTC))}\r\n"
            f"Message-ID: <{random_hex()}@{self._hostname}>\r\n".encode("ascii"),
            self._middle_headers,
            list_unsubscribe.encode("ascii"),
            b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
            *(text_part if chunk is _TEXT else html_part if chunk is _HTML else chunk
              for chunk in self._layout),
        ])
        return message, None if self._dkim is None else self._dkim.prepare(message)

    def render_html(self, recipient: RecipientContext) -> str | None:
        """The HTML exactly as this recipient receives it: the web version (T-4)."""
        if self._html is None:
            return None
        delivery_id = recipient.delivery_id
        return self._merge_html(recipient, {
            "unsubscribe": self._signer.unsubscribe_url(delivery_id),
            "webversion": self._signer.web_version_url(delivery_id)})

    def _merge_html(self, recipient: RecipientContext, links: dict[str, str]) -> str:
        merged = merge(self._html, _html_values(recipient.variables),
                       _html_values(recipient.fields), links)
        if not self._slots:
            return merged
        pieces = merged.split(_SLOT)
        out = [pieces[0]]
        signer, delivery_id = self._signer, recipient.delivery_id
        for (kind, href), piece in zip(self._slots, pieces[1:], strict=True):
            if kind == _CLICK:
                url = signer.click_url(delivery_id, href)
            elif kind == _OPEN:
                url = signer.open_url(delivery_id)
            else:
                url = _URL_NOISE.sub("", merge(href, recipient.variables, recipient.fields,
                                               links)).strip()
                if url.lower().startswith(_HTTP) and not url.startswith(self._tracking):
                    url = signer.click_url(delivery_id, url)
            out.append(html.escape(url))
            out.append(piece)
        return "".join(out)
