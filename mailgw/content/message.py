"""What a submitted message says: bodies, attachments and control headers (S-8, S-9, S-10).

Pure functions over bytes and strings, called by the SMTP submission path after DATA. Mail
from real clients is often malformed, so parsing is lenient and the only exception that ever
leaves this module is ContentRefused, whose text becomes the 554 reply.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import html
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from email import message_from_bytes
from email.message import Message
from email.policy import Compat32
from email.utils import getaddresses
from urllib.parse import unquote

import html2text

from mailgw.accounts.settings import AccountSettings
from mailgw.content.footer_texts import LANGUAGES
from mailgw.content.mime import read_message


class ContentRefused(Exception):
    """The message cannot be accepted; str(e) is the reason shown after
    '554 5.6.0 Transaction failed: '."""


def _nul_refused(where: str) -> ContentRefused:
    """RFC 5322 and MIME allow no NUL in headers and text, and PostgreSQL can store none in
    text or jsonb: refused for good, naming where, rather than failing the write (a 451
    the client would retry for days). Attachments are binary and keep theirs."""
    return ContentRefused(f"message contains a NUL character in {where}")


@dataclass(frozen=True)
class MessageOptions:
    """The S-9 switches a message may set through its control headers."""

    show_cab: bool = True
    social_links: bool = False
    # None: the account's default language (AccountSettings.language).
    language: int | None = None
    track_opens: bool = True
    track_clicks: bool = True
    # The campaign category (X-Mailgw-Category): recipients who unsubscribed from it for
    # the sender's domain are not sent to (D-6).
    category: str | None = None


@dataclass(frozen=True)
class ContentPolicy:
    """What an account accepts (S-8), one of its settings."""

    multipart: str = "generate"
    attachments: str = "keep"

    @classmethod
    def from_settings(cls, settings: AccountSettings) -> ContentPolicy:
        return cls(multipart=settings.multipart, attachments=settings.attachments)


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    data: bytes
    content_id: str | None  # without <>
    inline: bool  # an image the HTML shows through cid:, not a file for the reader


@dataclass(frozen=True)
class ParsedMessage:
    subject: str
    from_address: str | None
    from_name: str | None
    reply_to: list[str]
    text: str | None
    html: str | None
    attachments: tuple[Attachment, ...]
    options: MessageOptions
    # Other X- headers, decoded, reported with events (Aldeamo custom_headers).
    custom_headers: dict[str, str]
    # Headers delivered with the message, as written (RFC 2047 words kept so that address
    # lists re-parse the same way), unfolded, 8-bit bytes decoded.
    headers: tuple[tuple[str, str], ...]
    # What was read but not taken (a switch with a value it does not know), for the log.
    notices: tuple[str, ...] = ()


class _HeadersAsWritten(Compat32):
    """compat32 is the most forgiving parser; we only want header values untouched, since
    compat32 would wrap 8-bit ones in Header objects and we decode them ourselves."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        return value


_POLICY = _HeadersAsWritten()

_CONTROL_PREFIXES = ("x-teenvio-", "x-mailgw-")
_CONTROL_SWITCHES = {
    "showcab": "show_cab",
    "sociallinks": "social_links",
    "language": "language",
    "trackingopening": "track_opens",
    "trackingclicks": "track_clicks",
    "category": "category",
}
CATEGORY_MAX_LENGTH = 64
# Teenvio's values (S-9): "no" switches a feature off, "yes" on (SocialLinks is off by
# default); any other value leaves the default, as Teenvio does.
_SWITCH_VALUES = {"yes": True, "no": False}
# Everything else (Received, DKIM-Signature, Bcc, Content-*, ...) is rebuilt or must not leak.
_DELIVERY_HEADERS = frozenset({
    "message-id", "date", "to", "cc", "in-reply-to", "references", "keywords", "comments",
    "importance", "priority", "sensitivity", "auto-submitted", "precedence", "organization",
    "feedback-id",
})

_FOLD = re.compile(r"\r?\n(?=[ \t])")
_LINE_BREAKS = re.compile(r"[\r\n]+")
# The encoded text holds no "?" (RFC 2047 2): a lazy ".*?" there would rescan the rest
# of the header from every "=?" that never ends, quadratic in a crafted header's size.
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([QqBb])\?([^?]*)\?=")
_DELIMITER_LINE = re.compile(rb"^--([0-9A-Za-z'()+_,./:=?-]{1,70})[ \t]*\r?$", re.MULTILINE)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_MARKDOWN_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
_TRAILING_SPACES = re.compile(r"[ \t]+$", re.MULTILINE)
_CID_SRC = re.compile(r"""(\bsrc\s*=\s*)(["'])cid:(.*?)\2""", re.IGNORECASE)
# A CSS reference, in a style attribute or block: url(cid:x), url('cid:x'), url("cid:x"),
# or url(&quot;cid:x&quot;) as editors write quotes inside attributes. Linear: the id
# cannot run past a parenthesis or a quote.
_CSS_CID_URL = re.compile(
    r"""(\burl\(\s*)(["']|&quot;|&\#39;|)cid:([^"'()\s<>]+?)\2(?=\s*\))""", re.IGNORECASE)
# One address, bare or after a display name of plain words: what getaddresses reads the
# same way without any of its special cases (quotes, comments, groups, dots in names).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDR_SPEC = rf"{_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
# The name's words and the blanks between them cannot overlap (a name that could end in
# blanks would be tried at every length against them: quadratic in a run of blanks).
_NAME_WORDS = r"[A-Za-z0-9_-]+(?:[ \t]+[A-Za-z0-9_-]+)*"
_SIMPLE_ADDRESS = re.compile(
    rf"[ \t]*(?:({_NAME_WORDS})?[ \t]*<({_ADDR_SPEC})>|({_ADDR_SPEC}))[ \t]*")
# What Python's HTMLParser (before 3.11.13, CVE-2025-6069) rescans the rest of the
# document for, once per occurrence: declarations and processing instructions (nothing
# of them is text), and a "<" whose tag does not end before the next "<" or the end.
_DECLARATION = re.compile(r"<[!?][^<>]*>")
_UNENDED_TAG = re.compile(r"<(?=[^<>]*(?:<|\Z))")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_TEMPLATE_TAG = re.compile(r"\s*\*\|tid:([^|\s]+)\|\*[ \t]?")


def parse_message(raw: bytes) -> ParsedMessage:
    """Everything mailgw needs from a submitted message, read as far as broken MIME allows."""
    try:
        return _parse(read_message(raw, _POLICY) or message_from_bytes(raw, policy=_POLICY))
    except ContentRefused:
        raise
    except Exception as error:  # the email package has many ways to choke; none may escape
        raise ContentRefused("message could not be parsed") from error


def _parse(message: Message) -> ParsedMessage:
    options, custom_headers, headers, notices = _read_headers(message)
    bodies, attachments = _read_parts(message)
    senders = _addresses("From", message.get_all("From", []))
    from_name, from_address = senders[0] if senders else (None, None)
    return ParsedMessage(
        subject=_decoded("Subject", message.get("Subject", "")),
        from_address=from_address,
        from_name=from_name,
        reply_to=[address
                  for _, address in _addresses("Reply-To", message.get_all("Reply-To", []))],
        text=bodies.get("text/plain"),
        html=bodies.get("text/html"),
        attachments=attachments,
        options=options,
        custom_headers=custom_headers,
        headers=headers,
        notices=notices,
    )


def _read_headers(message: Message) -> tuple[MessageOptions, dict[str, str],
                                             tuple[tuple[str, str], ...], tuple[str, ...]]:
    switches: dict[str, bool | int | str] = {}
    custom_headers: dict[str, str] = {}
    kept: list[tuple[str, str]] = []
    notices: list[str] = []
    for name, value in message.items():
        if "\x00" in value:
            raise _nul_refused(f"the {name} header")
        lowered = name.lower()
        prefix = next((p for p in _CONTROL_PREFIXES if lowered.startswith(p)), None)
        if prefix is not None:
            # Unknown X-Teenvio-* / X-Mailgw-* headers are dropped too: they are ours.
            switch = _CONTROL_SWITCHES.get(lowered[len(prefix):])
            if switch is not None:
                decoded = _decoded(name, value)
                taken = _switch_value(name, switch, decoded)
                if taken is None:
                    notices.append(f"{name}: {decoded[:40]!a} is not a value it takes; "
                                   "the default applies")
                else:
                    switches[switch] = taken
        elif lowered.startswith("x-"):
            custom_headers[name] = _decoded(name, value)
            kept.append((name, _unfolded(value)))
        elif lowered in _DELIVERY_HEADERS or lowered.startswith("list-"):
            kept.append((name, _unfolded(value)))
    return MessageOptions(**switches), custom_headers, tuple(kept), tuple(notices)


def _switch_value(header: str, switch: str, value: str) -> bool | int | str | None:
    """The switch's value, or None for one it does not take (the default then applies,
    as Teenvio does: a message is never refused for a value like "off" or an unknown
    language). A bad category is refused: which recipients are sent to depends on it."""
    if switch == "category":
        name = value.strip()
        if name and len(name) <= CATEGORY_MAX_LENGTH and name.isprintable():
            return name
        raise ContentRefused(f"{header} must be a category name of 1 to "
                             f"{CATEGORY_MAX_LENGTH} characters, not {value[:40]!a}")
    word = value.strip().lower()
    if switch == "language":
        if word.isascii() and word.isdigit() and int(word) in LANGUAGES:
            return int(word)
        return None
    return _SWITCH_VALUES.get(word)


def _leaves(part: Message, in_alternative: bool = False, nested: bool = False
            ) -> Iterator[tuple[Message, str, bool]]:
    """Non-multipart parts in order, each with its content type and whether it is one of
    several alternatives. (The email package parses the Content-Type header again for
    each of its getters: once per part is enough.) The headers of nested parts are
    checked for NUL here, those of the message in _read_headers."""
    if nested:
        for name, value in part.items():
            if "\x00" in value:
                raise _nul_refused(f"the {name} header of a MIME part")
    content_type = part.get_content_type()
    maintype, _, subtype = content_type.partition("/")
    if maintype != "multipart":
        yield part, content_type, in_alternative
        return
    alternative = subtype == "alternative"
    children = part.get_payload() if part.is_multipart() else _guess_boundary(part)
    for child in children:
        yield from _leaves(child, alternative, nested=True)


def _guess_boundary(part: Message) -> list[Message]:
    """A multipart whose boundary is missing or wrong: take the first delimiter-looking line
    as the boundary rather than refuse the message or send its MIME as text."""
    body = part.get_payload(decode=True) or b""
    found = _DELIMITER_LINE.search(body)
    if found is None:
        return []
    content_type = part.get_content_type().encode("utf-8", "surrogateescape")
    header = b'Content-Type: %s; boundary="%s"\r\n\r\n' % (content_type, found.group(1))
    rebuilt = message_from_bytes(header + body, policy=_POLICY)
    return rebuilt.get_payload() if rebuilt.is_multipart() else []


def _read_parts(message: Message) -> tuple[dict[str, str], tuple[Attachment, ...]]:
    bodies: dict[str, str] = {}
    attachments: list[Attachment] = []
    for part, content_type, in_alternative in _leaves(message):
        readable = (content_type.startswith("text/")
                    and part.get_content_disposition() != "attachment")
        if readable and content_type in ("text/plain", "text/html") and content_type not in bodies:
            body = _decode_bytes(part.get_payload(decode=True) or b"", part.get_content_charset())
            if "\x00" in body:  # raw, or encoded: quoted-printable =00, base64
                raise _nul_refused(f"the {content_type} part")
            body = body.replace("\r\n", "\n").removeprefix("\ufeff")
            if body.strip():  # a blank body is no body: the other one gets generated
                bodies[content_type] = body
            continue
        if readable and in_alternative:
            continue  # another rendering: text/x-amp-html, text/watch-html, a second text/html
        attachments.append(_attachment(part, len(attachments) + 1))
    return bodies, tuple(attachments)


def _attachment(part: Message, number: int) -> Attachment:
    content_id = _unfolded(part.get("Content-ID", "")).strip("<> ") or None
    if part.is_multipart():  # an attached message (message/rfc822) is kept as written
        data = b"".join(child.as_bytes() for child in part.get_payload())
    else:
        data = part.get_payload(decode=True) or b""
    return Attachment(
        filename=_filename(part) or f"attachment-{number}",
        content_type=part.get_content_type(),
        data=data,
        content_id=content_id,
        inline=(content_id is not None and part.get_content_maintype() == "image"
                and part.get_content_disposition() != "attachment"),
    )


def _filename(part: Message) -> str:
    """The base name only: recipients must not see, nor storage use, a client's paths."""
    name = part.get_filename()
    if not name:
        return ""
    name = decode_header(name)
    if "\x00" in name:  # RFC 2231 %00 or an RFC 2047 word
        raise _nul_refused("the file name of an attachment")
    name = name.replace("\\", "/").rpartition("/")[2]
    return "".join(char for char in name if char.isprintable()).strip()


def _addresses(header: str, values: list[str]) -> list[tuple[str | None, str]]:
    """(display name, addr-spec with its domain lowercased) for each address in the headers."""
    found = []
    for name, address in _parse_addresses([_unfolded(value) for value in values]):
        local, at, domain = address.rpartition("@")
        if local and at and domain:
            display = _decoded(header, name)
            if len(display) >= 2 and display[0] == display[-1] == '"':
                display = display[1:-1]  # Thunderbird puts the quotes inside the encoded word
            found.append((display or None, f"{local}@{domain.lower()}"))
    return found


def _parse_addresses(values: list[str]) -> list[tuple[str, str]]:
    """`getaddresses(values)`, whose pure-Python parser costs ~50 us a message; a header
    holding one plain address, bare or as `Words <address>`, is read with a regex to the
    same result (a test compares them)."""
    parsed = []
    for value in values:
        simple = _SIMPLE_ADDRESS.fullmatch(value)
        if simple is None:
            return getaddresses(values)
        name, bracketed, bare = simple.groups()
        parsed.append((" ".join((name or "").split()), bracketed) if bracketed
                      else ("", bare))
    return parsed


def _decode_bytes(data: bytes, charset: str | None) -> str:
    """The declared charset, else UTF-8, else Latin-1, which decodes anything. A decoding
    with lone surrogates (UTF-7 and the escape codecs make them of "+2AA-" or "\\ud800")
    is a wrong one: PostgreSQL could not store it, and the write would fail with a 451."""
    for codec in (_codec(charset), "utf-8"):
        if codec is not None:
            try:
                text = data.decode(codec)
                if codec != "utf-8":  # whose decoder never makes surrogates
                    text.encode("utf-8")
                return text
            except (LookupError, UnicodeError):
                pass
    return data.decode("latin-1")


def _codec(charset: str | None) -> str | None:
    if not charset:
        return None
    try:
        name = codecs.lookup(charset).name
    except (LookupError, ValueError):
        return None
    # As browsers do: mail labelled ISO-8859-1 is usually Windows-1252 (curly quotes, euro).
    return "cp1252" if name == "iso8859-1" else name


def _unfolded(value: str) -> str:
    """A header value unfolded, with raw 8-bit bytes (surrogate-escaped by the parser)
    decoded. Unlike `one_line`, it keeps other control characters: the parser refuses
    a NUL, and a category name that is not printable, rather than send them changed."""
    if not value.isascii():
        value = _decode_bytes(value.encode("utf-8", "surrogateescape"), None)
    return _LINE_BREAKS.sub(" ", _FOLD.sub("", value)).strip()


def decode_header(value: str) -> str:
    """RFC 2047 decoding that, unlike the email package's, survives unknown charsets and
    8-bit headers; whitespace between adjacent encoded words is dropped (RFC 2047 6.2)."""
    value = _unfolded(value)
    pieces: list[str] = []
    end = 0
    for match in _ENCODED_WORD.finditer(value):
        between = value[end:match.start()]
        if not (pieces and between.isspace()):
            pieces.append(between)
        pieces.append(_decode_word(match))
        end = match.end()
    pieces.append(value[end:])
    return _LINE_BREAKS.sub(" ", "".join(pieces)).strip()


def _decoded(header: str, value: str) -> str:
    """decode_header, refusing a NUL that RFC 2047 or RFC 2231 encoding hid."""
    decoded = decode_header(value)
    if "\x00" in decoded:
        raise _nul_refused(f"the {header} header")
    return decoded


def _decode_word(word: re.Match[str]) -> str:
    charset, encoding, encoded = word.groups()
    if not encoded.isascii():
        return word.group(0)
    try:
        if encoding in "Qq":
            data = binascii.a2b_qp(encoded.encode("ascii"), header=True)
        else:
            data = base64.b64decode(encoded + "=" * (-len(encoded) % 4))
    except binascii.Error:
        return word.group(0)
    return _decode_bytes(data, charset.partition("*")[0])  # drop an RFC 2231 language


def apply_policy(message: ParsedMessage, policy: ContentPolicy) -> ParsedMessage:
    """S-8: refuse what the account does not accept, generate the body it lets us generate."""
    if message.text is None and message.html is None:
        raise ContentRefused("message has no text or HTML body")
    if policy.attachments == "reject":
        for attachment in message.attachments:
            if not attachment.inline:
                raise ContentRefused(f"Not allowed attachment type {_extension(attachment)}")
    if message.text is not None and message.html is not None:
        return message
    if policy.multipart == "strict":
        raise ContentRefused("message needs a text/plain and a text/html part")
    if message.html is None:
        return replace(message, html=_html_from_text(message.text))
    return replace(message, text=_text_from_html(message.html))


def _extension(attachment: Attachment) -> str:
    """Devino names the refused type by file extension; without a usable one, the MIME
    subtype. Either is safe to put in an SMTP reply."""
    stem, dot, extension = attachment.filename.rpartition(".")
    if stem and extension.isascii() and extension.isalnum():
        return extension.lower()
    return attachment.content_type.partition("/")[2] or attachment.content_type


def _html_from_text(text: str) -> str:
    paragraphs = (html.escape(p.strip("\n"), quote=False).replace("\n", "<br>\n")
                  for p in _PARAGRAPH_BREAK.split(text.strip()) if p.strip())
    body = "\n".join(f"<p>{paragraph}</p>" for paragraph in paragraphs)
    return ('<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n</head>\n'
            f"<body>\n{body}\n</body>\n</html>\n")


def _text_from_html(document: str) -> str:
    converter = html2text.HTML2Text()
    converter.body_width = 0  # no wrapping: recipients' clients wrap
    converter.ignore_images = True
    converter.unicode_snob = True
    # Entities decoded by the parser: html2text alone turns <u>V&iacute;ctor</u> into "V íctor".
    converter.convert_charrefs = True
    # html2text writes Markdown; people reading text/plain need no backslash escapes, and
    # an escaped href="[Unsubscribe]" would no longer be a merge tag. Nor do they need the
    # two trailing spaces of Markdown's line breaks.
    text = _MARKDOWN_ESCAPE.sub(r"\1", converter.handle(_parseable_html(document)))
    return _TRAILING_SPACES.sub("", text).strip() + "\n"


def _parseable_html(document: str) -> str:
    """The document without what would make HTMLParser quadratic in its size: comments
    (an unended one runs to the end, as in HTML5), declarations, and a "<" that starts no
    complete tag, which becomes text. Each step is one linear pass."""
    pieces: list[str] = []
    start = 0
    while (opened := document.find("<!--", start)) >= 0:
        pieces.append(document[start:opened])
        closed = document.find("-->", opened + 4)
        start = len(document) if closed < 0 else closed + 3
    pieces.append(document[start:])
    return _UNENDED_TAG.sub("&lt;", _DECLARATION.sub("", "".join(pieces)))


def replace_cid_references(html_document: str, urls: dict[str, str]
                           ) -> tuple[str, set[str]]:
    """Teenvio: images embedded with cid: (in src attributes and CSS url()) become images
    hosted at the given URLs; and the Content-IDs of the images the HTML now shows."""
    shown: set[str] = set()

    def hosted(match: re.Match[str]) -> str:
        content_id = match.group(3)
        if content_id not in urls:
            content_id = unquote(content_id)  # a cid: URL %-encodes the Content-ID (RFC 2392)
        url = urls.get(content_id)
        if url is None:
            return match.group(0)
        shown.add(content_id)
        return f"{match.group(1)}{match.group(2)}{html.escape(url)}{match.group(2)}"

    return _CSS_CID_URL.sub(hosted, _CID_SRC.sub(hosted, html_document)), shown


def append_attachment_links(message: ParsedMessage,
                            links: list[tuple[str, str]]) -> ParsedMessage:
    """S-8 `links`: files reach the reader as download links instead of attachments;
    nothing stays attached (the images the HTML shows are hosted)."""
    if not links:
        return replace(message, attachments=())
    items = "".join(f'<li><a href="{html.escape(url)}">{html.escape(name)}</a></li>\n'
                    for name, url in links)
    block = f'<ul class="mailgw-attachments">\n{items}</ul>\n'
    listing = "\n".join(f"{name}: {url}" for name, url in links)
    document = message.html
    if document is not None:
        body_end = document.lower().rfind("</body>")
        document = (document + block if body_end < 0
                    else document[:body_end] + block + document[body_end:])
    text = None if message.text is None else f"{message.text.rstrip()}\n\n{listing}\n"
    return replace(message, attachments=(), html=document, text=text)


def split_template_tag(subject: str) -> tuple[str | None, str]:
    """S-10 (Aldeamo): '*|tid:ID|* rest' selects stored template ID; the tag is not sent."""
    match = _TEMPLATE_TAG.match(subject)
    if match is None:
        return None, subject
    return match.group(1), subject[match.end():]


def template_variables(body: str | None, html_body: str | None = None) -> dict[str, str]:
    """S-10: the text body carries the template's variables as a flat JSON object; 'null'
    means none. Numbers are kept exactly as written (a price stays '1.50'). A message
    with only HTML (Aldeamo's "Body HTML") carries them as the text of its HTML body."""
    if body is None and html_body is not None:
        body = _text_from_html(html_body)
    if body is None or body.strip() in ("", "null"):
        return {}
    try:
        value = json.loads(body, parse_int=str, parse_float=str, parse_constant=str)
    except json.JSONDecodeError as error:
        raise _bad_variables(f"{error.msg} at line {error.lineno} column {error.colno}") from None
    except RecursionError:
        raise _bad_variables("nested too deeply") from None
    if not isinstance(value, dict):
        raise _bad_variables('expected an object like {"name": "value"}')
    variables = {}
    for name, item in value.items():
        if isinstance(item, dict | list):
            raise _bad_variables(f"value of {name[:40]!a} is not a string or number")
        if isinstance(item, bool):
            item = "true" if item else "false"
        if isinstance(item, str):
            if "\x00" in item:  # written \u0000
                raise _nul_refused(f"the template variable {name[:40]!a}")
            if _SURROGATE.search(item):  # written \ud800, which no UTF-8 can hold
                raise _bad_variables(f"value of {name[:40]!a} is not valid Unicode")
        variables[name] = "" if item is None else item
    return variables


def _bad_variables(detail: str) -> ContentRefused:
    return ContentRefused(f"template variables are not a valid JSON object: {detail}")
