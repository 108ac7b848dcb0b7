"""What a message that comes back to the bounce domain reports (D-7). Pure, bounded.

`read_report(raw)` tells a delivery status notification (RFC 3464), a complaint
(ARF, RFC 5965), a non-standard bounce (the heuristics of flufl.bounce) and anything
else (an auto-reply) apart, and collects what in it may name the delivery it is about:
the original's Return-Path and Message-ID, the ARF's Original-Mail-From, and such
addresses quoted in the text. Which delivery that is, is for the caller to verify
(`LinkSigner`): nothing here is trusted.

Anyone can send anything to port 25, so the work stays bounded whatever the input
(R-3, R-6): the listener keeps at most `inbound.max_message_size` bytes of a message;
the email package's parser, whose cost grows with the nesting depth times the lines,
and with the square of a Content-Type's parameters, is only given messages with at most
MAX_NESTED_PARTS multipart or message parts and no Content-Type longer than
MAX_CONTENT_TYPE (bare CRs, which it takes for line ends, made LFs first); and
flufl.bounce, whose regular expressions can take the square of a line's length, reads
a copy whose text is cut to MAX_LINE characters a line and MAX_TEXT in all. The caller
runs it in a thread all the same.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email import message_from_bytes, message_from_string
from email.message import Message
from email.policy import compat32

from flufl.bounce import all_failures

from mailgw.text import one_line

# flufl.bounce logs a traceback when one of its detectors chokes on odd input (and then
# raises, which read_report takes for "nothing detected"): no traceback for bad input.
logging.getLogger("flufl.bounce").addHandler(logging.NullHandler())
logging.getLogger("flufl.bounce").propagate = False

# What a report says (Report.kind).
BOUNCE = "bounce"  # a delivery failed for good: hard (5.x.x) or soft (4.x.x)
DELAYED = "delayed"  # the remote server is still trying: not a bounce
COMPLAINT = "complaint"  # an ARF feedback report of abuse (a spam complaint)
NOTHING = "nothing"  # nothing to record: an auto-reply, a positive DSN, a DMARC report
UNREADABLE = "unreadable"  # too deeply nested, or not MIME at all

HARD, SOFT = "hard", "soft"
# Multipart and message parts a report may have: a DSN that returns the original message
# whole has about six (report, status, the original and its alternatives).
MAX_NESTED_PARTS = 16
# What flufl.bounce reads: its regular expressions are quadratic in a line's length.
MAX_LINE = 256
MAX_TEXT = 32 * 1024
# The remote text kept in an event (as the delivery engine keeps a reply).
MAX_REPLY = 1000
# Addresses and Message-IDs collected from one report.
MAX_REFERENCES = 10

MAX_CONTENT_TYPE = 4096

_BARE_CR = re.compile(rb"\r(?!\n)")
# A Content-Type field, its folded lines included.
_CONTENT_TYPE = re.compile(rb"^content-type:[^\n]*(?:\n[ \t][^\n]*)*",
                           re.IGNORECASE | re.MULTILINE)
_NESTING_TYPE = re.compile(rb"content-type:\s*(?:multipart|message)/", re.IGNORECASE)
_STATUS = re.compile(r"([245])\.\d{1,3}\.\d{1,3}")
# A reply as a server writes it, in a non-standard bounce: "550 5.1.1 ..." or "550-...".
_REPLY_LINE = re.compile(r"\b([45])\d\d[ -](?:[45]\.\d{1,3}\.\d{1,3}\b)?")
# Our bounce addresses and Message-IDs quoted in a text (the signer checks them).
_QUOTED_REFERENCE = re.compile(r"\bb-\d{1,20}-[a-z2-7]{16}@[a-z0-9.-]{1,255}"
                               r"|<\d{1,20}\.[a-z2-7]{16}@[^<>@\s]{1,255}>", re.IGNORECASE)
# ARF Feedback-Types (RFC 5965, 6591, 6650) that are no complaint of the recipient's.
_NOT_COMPLAINTS = frozenset({"not-spam", "auth-failure"})
_ORIGINAL_TYPES = ("message/rfc822", "text/rfc822-headers", "message/rfc822-headers",
                   "message/global", "message/global-headers")
_DSN_TYPES = ("message/delivery-status", "message/global-delivery-status")


@dataclass(frozen=True)
class Report:
    kind: str
    # BOUNCE: HARD or SOFT.
    bounce_type: str | None = None
    # The remote server's words: a DSN's Diagnostic-Code (else its status), a line of a
    # non-standard bounce, an ARF's Feedback-Type; or why the report is unreadable.
    reply: str = ""
    # The RFC 3463 status of a DSN, when it gives one.
    status: str | None = None
    # RFC 3464 or 5965, not the heuristics of flufl.bounce.
    standard: bool = True
    # ARF: Feedback-Type and User-Agent (the reporting mailbox provider's software).
    feedback_type: str | None = None
    user_agent: str | None = None
    # Bounce addresses and Message-IDs that may name the delivery, best first.
    references: tuple[str, ...] = ()
    # The message's own Subject (a List-Unsubscribe mailto carries its token there).
    subject: str = ""


def read_report(raw: bytes) -> Report:
    """What `raw` reports; never raises."""
    raw = _BARE_CR.sub(b"\n", raw)
    nested = 0
    for field in _CONTENT_TYPE.finditer(raw):
        if len(field.group(0)) > MAX_CONTENT_TYPE:
            return Report(UNREADABLE, reply=f"a Content-Type field of {len(field.group(0))}"
                                            f" bytes (at most {MAX_CONTENT_TYPE} are read)")
        nested += _NESTING_TYPE.match(field.group(0)) is not None
    if nested > MAX_NESTED_PARTS:
        return Report(UNREADABLE, reply=f"{nested} multipart or message parts (at most "
                                        f"{MAX_NESTED_PARTS} are read)")
    try:
        message = message_from_bytes(raw, policy=compat32)
        return _report(message)
    except Exception as error:  # the email package has many ways to choke; none may escape
        return Report(UNREADABLE, reply=f"not readable as MIME: {type(error).__name__}")


def _report(message: Message) -> Report:
    subject = _field(message, "Subject")
    if message.get_content_type() == "multipart/report":
        report_type = (message.get_param("report-type") or "").lower()
        parts = list(_parts(message))
        if report_type == "feedback-report":
            return _complaint(parts, subject)
        if report_type in ("delivery-status", "global-delivery-status"):
            found = _delivery_status(parts, subject)
            if found is not None:
                return found
    return _non_standard(message, subject)


def _parts(message: Message) -> Iterator[Message]:
    """The report's parts and theirs (the original is one part, its own parts not)."""
    for part in message.walk():
        if part is not message:
            yield part


def _complaint(parts: list[Message], subject: str) -> Report:
    fields = next((_sub_message(p) for p in parts
                   if p.get_content_type() == "message/feedback-report"), None)
    feedback_type = user_agent = None
    references: list[str] = []
    if fields is not None:
        feedback_type = _field(fields, "Feedback-Type").lower() or None
        user_agent = _field(fields, "User-Agent") or None
        references.append(_field(fields, "Original-Mail-From"))
    references.extend(_original_references(parts))
    kind = NOTHING if feedback_type in _NOT_COMPLAINTS else COMPLAINT
    return Report(kind, reply=feedback_type or "abuse", feedback_type=feedback_type,
                  user_agent=user_agent, references=_clean(references), subject=subject)


def _delivery_status(parts: list[Message], subject: str) -> Report | None:
    """RFC 3464: the per-recipient fields of the message/delivery-status part. None when
    there is no such part (then the heuristics try)."""
    status_part = next((p for p in parts if p.get_content_type() in _DSN_TYPES), None)
    if status_part is None:
        return None
    blocks = _status_blocks(status_part)
    recipients = [b for b in blocks[1:] if _field(b, "Action")] or blocks
    actions = [(_field(b, "Action").lower().split(" ")[0], b) for b in recipients]
    references = _clean(_original_references(parts))
    failed = next((b for action, b in actions if action == "failed"), None)
    if failed is None:
        kind = DELAYED if any(action == "delayed" for action, _ in actions) else NOTHING
        return Report(kind, references=references, subject=subject)
    found = _STATUS.search(_field(failed, "Status"))
    status = found.group(0) if found else None
    # When in doubt, soft: only a permanent status counts towards invalidation.
    bounce_type = HARD if status is not None and status[0] == "5" else SOFT
    diagnostic = _field(failed, "Diagnostic-Code")
    kind_of_code, semicolon, text = diagnostic.partition(";")
    reply = (text.strip() if semicolon and " " not in kind_of_code.strip() else diagnostic)
    return Report(BOUNCE, bounce_type, _limited(reply or status or "failed"), status,
                  references=references, subject=subject)


def _status_blocks(part: Message) -> list[Message]:
    """The field blocks of a delivery-status part: the per-message one, then one per
    recipient. The parser makes them messages of their own; a global (UTF-8) report is
    text, read the same way."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [block for block in payload if isinstance(block, Message)]
    text = payload if isinstance(payload, str) else ""
    return [message_from_string(block.strip() + "\n\n", policy=compat32)
            for block in re.split(r"\r?\n[ \t]*\r?\n", text) if block.strip()]


def _non_standard(message: Message, subject: str) -> Report:
    """flufl.bounce's detectors over a bounded copy; its permanent failures are bounces
    (hard, unless the server's reply quoted in the text is a 4xx), its temporary ones
    delays."""
    copy, text = _bounded_copy(message)
    try:
        temporary, permanent = all_failures(copy)
    except Exception:  # a detector that chokes on odd input: nothing detected
        temporary, permanent = frozenset(), frozenset()
    references = _clean([*_original_references(list(_parts(message))),
                         *(m.group(0) for m in _QUOTED_REFERENCE.finditer(text))])
    if permanent:
        found = _REPLY_LINE.search(text)
        line = text[found.start():].partition("\n")[0] if found else ""
        bounce_type = SOFT if found and found.group(1) == "4" else HARD
        return Report(BOUNCE, bounce_type, _limited(line or "undeliverable"), standard=False,
                      references=references, subject=subject)
    kind = DELAYED if temporary else NOTHING
    return Report(kind, standard=False, references=references, subject=subject)


def _original_references(parts: list[Message]) -> list[str]:
    """The returned original's Return-Path and Message-ID (its headers, whole or alone)."""
    references = []
    for part in parts:
        if part.get_content_type() in _ORIGINAL_TYPES:
            original = _sub_message(part)
            if original is not None:
                references.extend(_field(original, name) for name in ("Return-Path",
                                                                      "Message-ID"))
    return references


def _sub_message(part: Message) -> Message | None:
    """The message a message/* part holds (the parser made it one), or the headers a
    text/rfc822-headers part holds."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return payload[0] if payload and isinstance(payload[0], Message) else None
    if isinstance(payload, str):
        return message_from_string(payload.lstrip("\r\n") + "\n\n", policy=compat32)
    return None


def _bounded_copy(message: Message) -> tuple[Message, str]:
    """The message as flufl.bounce needs it (the structure, the headers it reads, the
    text), with at most MAX_LINE characters a line and MAX_TEXT in all; and that text."""
    budget = [MAX_TEXT]
    texts: list[str] = []

    def copy(part: Message) -> Message:
        new = Message()
        for name in ("From", "Subject", "Content-Type", "X-Failed-Recipients", "X-Mailer"):
            value = part.get(name)
            if isinstance(value, str):
                new[name] = one_line(value)[:MAX_LINE]
        payload = part.get_payload()
        if isinstance(payload, list):
            new.set_payload([copy(p) for p in payload if isinstance(p, Message)])
        elif part.get_content_maintype() in ("text", "message") and budget[0] > 0:
            decoded = part.get_payload(decode=True) or b""
            text = "\n".join(line[:MAX_LINE] for line in decoded.decode(
                "utf-8", "replace").splitlines())[:budget[0]]
            budget[0] -= len(text)
            texts.append(text)
            new.set_payload(text)
        return new

    bounded = copy(message)
    if bounded.get("From") is None:
        bounded["From"] = "MAILER-DAEMON"  # some detectors read it, and fail without it
    return bounded, "\n".join(texts)


def _field(message: Message, name: str) -> str:
    """A header or report field as one line, bounded; "" when missing or not text."""
    value = message.get(name)
    return one_line(value[:4 * MAX_REPLY]) if isinstance(value, str) else ""


def _limited(text: str) -> str:
    return one_line(text)[:MAX_REPLY]


def _clean(references: list[str]) -> tuple[str, ...]:
    """Non-empty, each once, in order, at most MAX_REFERENCES."""
    return tuple(dict.fromkeys(r.strip()[:512] for r in references
                               if r and r.strip().strip("<>")))[:MAX_REFERENCES]
