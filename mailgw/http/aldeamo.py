"""Aldeamo's `POST /v1/email` (H-1): a JSON request turned into one `Submission` for the
one submission path, and its refusals into the seed's error names.

The door only translates: the request's fields are checked here (each missing or
wrong one has its seed error name, CR, LF or NUL in a field that becomes a header
is `Header_injection` naming the field, R-5), attachments are fetched (R-4), and
the submission path does the rest as for SMTP: the sender check, templates, the
content policy (the text part generated from the HTML), quotas, the recipients
imported as contacts of a group made for the request, and their queue rows, all
committed before the answer, which gives each recipient the msgid of its delivery.
"""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import formataddr
from typing import Any

from klein import Klein
from twisted.internet import defer

from mailgw.content.message import Attachment, MessageOptions, ParsedMessage
from mailgw.fetch import ContentFetcher, FetchRefused
from mailgw.http.api import APIError, add_json_error_pages, json_endpoint, read_json
from mailgw.http.auth import SEND, KeyAuthenticator
from mailgw.randomness import random_hex
from mailgw.submit.addresses import InvalidAddress, normalize_address
from mailgw.submit.errors import (
    BadTemplateVariables,
    ContactQuotaExhausted,
    ContentNotAccepted,
    DisallowedSender,
    SendQuotaExhausted,
    SubmissionRefused,
    UnknownTemplate,
)
from mailgw.submit.recipients import Recipient
from mailgw.submit.service import Submission, SubmissionService

# The seed's error names (section 7, "Posibles respuestas fallidas").
NO_MESSAGES_LEFT = "No_Messages_left"
UNKNOWN_TEMPLATE = "Could_not_find_template"
BAD_TEMPLATE_ID = "Error_Fetching_Template"
BAD_VARIABLES = "Incorrect_variable_syntax"
DOMAIN_NOT_PERMITTED = "Domain_not_permitted_err_1"
MISSING_SENDER = "Invalid_request_missing_parameters_err_1"
MALFORMED_REQUEST = "Invalid_request_missing_parameters_err_2"
MISSING_REPLY_TO = "Missing_replyTo"
MISSING_REPLY_TO_EMAIL = "Missing_replyTo_email"
MISSING_REPLY_TO_NAME = "Missing_replyTo_name"
MISSING_SUBJECT = "Subject_missing_or_empty"
MISSING_BODY = "Body_missing_or_empty"
MISSING_RECIPIENTS = "Recipient_missing_or_empty"
EMPTY_RECIPIENT = "A_Recipient_address_is_empty"
# mailgw's own (README, "Sending over HTTP").
HEADER_INJECTION = "Header_injection"
CONTENT_NOT_ACCEPTED = "Content_not_accepted"
CONTACT_LIMIT = "Contact_limit_reached"
TOO_MANY_RECIPIENTS = "Too_many_recipients"
MESSAGE_TOO_LARGE = "Message_too_large"
ATTACHMENT_NOT_ACCEPTED = "Attachment_not_accepted"
ATTACHMENT_NOT_FETCHED = "Attachment_not_fetched"

# The submission path's refusals, as the dialect names them: the one place they are mapped.
_REFUSALS: Mapping[type[SubmissionRefused], str] = {
    DisallowedSender: DOMAIN_NOT_PERMITTED,
    UnknownTemplate: UNKNOWN_TEMPLATE,
    BadTemplateVariables: BAD_VARIABLES,
    SendQuotaExhausted: NO_MESSAGES_LEFT,
    ContactQuotaExhausted: CONTACT_LIMIT,
    ContentNotAccepted: CONTENT_NOT_ACCEPTED,
}

MAX_ATTACHMENTS = 20
TEMPLATE_ID_MAX_LENGTH = 100
# Variable names as `{name}` merge tags take them: no special characters (the seed:
# "Recuerda no usar caracteres especiales").
_VARIABLE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# What would end or split a header line.
_HEADER_BREAKERS = re.compile(r"[\r\n\x00]")


def refusal_error(refusal: SubmissionRefused) -> APIError:
    """A refusal of the submission path as this dialect's 400."""
    for kind, name in _REFUSALS.items():
        if isinstance(refusal, kind):
            return APIError(400, name, str(refusal))
    return APIError(400, CONTENT_NOT_ACCEPTED, str(refusal))


@dataclass(frozen=True)
class AttachmentRequest:
    path: str
    filename: str | None


@dataclass(frozen=True)
class EmailRequest:
    """A `POST /v1/email` body, checked."""

    sender: str
    sender_name: str | None
    reply_to: str | None
    recipients: tuple[Recipient, ...]
    # The Cc header: the copies, with the names given.
    cc_header: str | None
    subject: str
    html: str | None
    template_id: str | None
    variables: dict[str, str]
    attachments: tuple[AttachmentRequest, ...]


def header_text(value: Any, field: str) -> Any:
    """`value`, unless it is text that holds CR, LF or NUL (R-5: it would split a header)."""
    if isinstance(value, str) and _HEADER_BREAKERS.search(value):
        raise APIError(400, HEADER_INJECTION,
                       f"{field} must not contain CR, LF or NUL characters", field=field)
    return value


def parse_email_request(body: Any, max_recipients: int) -> EmailRequest:
    """The request's fields, or the APIError the seed names for the first one wrong.
    Unknown fields are ignored (clients send extra ones)."""
    if not isinstance(body, dict):
        raise APIError(400, MALFORMED_REQUEST, "the body must be a JSON object")
    sender, sender_name = _sender(body.get("from"))
    recipients, cc_header = _recipients(body, max_recipients)
    reply_to = _reply_to(body)
    template_id = _template_id(body.get("template_id"))
    subject = header_text(body.get("subject"), "subject")
    if subject is None and template_id is not None:
        subject = ""  # the template's subject
    elif not isinstance(subject, str) or not subject.strip():
        raise APIError(400, MISSING_SUBJECT)
    html = None
    if template_id is None:
        html = body.get("body")
        if not isinstance(html, str) or not html.strip():
            raise APIError(400, MISSING_BODY)
        if "\x00" in html:
            raise APIError(400, CONTENT_NOT_ACCEPTED, "body must not contain NUL characters")
    return EmailRequest(sender, sender_name, reply_to, recipients, cc_header, subject, html,
                        template_id, _variables(body.get("variables")),
                        _attachments(body.get("attachments")))


def _sender(value: Any) -> tuple[str, str | None]:
    if not isinstance(value, dict) or not isinstance(value.get("email"), str) \
            or not value["email"].strip():
        raise APIError(400, MISSING_SENDER, "from.email is required")
    email = header_text(value["email"], "from.email").strip()
    name = header_text(value.get("name"), "from.name")
    if name is not None and not isinstance(name, str):
        raise APIError(400, MALFORMED_REQUEST, "from.name must be a string")
    return email, name or None


def _recipients(body: dict, max_recipients: int) -> tuple[tuple[Recipient, ...], str | None]:
    to = body.get("to")
    if not isinstance(to, list) or not to:
        raise APIError(400, MISSING_RECIPIENTS)
    options = body.get("options", {})
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise APIError(400, MALFORMED_REQUEST, "options must be an object")
    lists = [("to", "to", to)]
    for kind in ("cc", "bcc"):
        items = options.get(kind)
        if items is None:
            continue
        if not isinstance(items, list):
            raise APIError(400, MALFORMED_REQUEST, f"options.{kind} must be an array")
        lists.append((kind, f"options.{kind}", items))
    seen: set[str] = set()
    recipients: list[Recipient] = []
    copies: list[str] = []
    for kind, field, items in lists:
        for number, item in enumerate(items):
            email, name = _recipient(item, f"{field}[{number}]")
            if kind == "cc":
                copies.append(formataddr((name, email)) if name else email)
            if email not in seen:  # each address is sent the message once, first kind wins
                seen.add(email)
                recipients.append(Recipient(email, kind))
    if len(recipients) > max_recipients:
        raise APIError(400, TOO_MANY_RECIPIENTS,
                       f"at most {max_recipients} recipients in one request")
    return tuple(recipients), ", ".join(copies) or None


def _recipient(item: Any, field: str) -> tuple[str, str | None]:
    if not isinstance(item, dict):
        raise APIError(400, EMPTY_RECIPIENT, f"{field} must be an object with an email")
    email = header_text(item.get("email"), f"{field}.email")
    name = header_text(item.get("name"), f"{field}.name")
    if not isinstance(email, str) or not email.strip():
        raise APIError(400, EMPTY_RECIPIENT, f"{field}.email is missing or empty")
    try:
        email = normalize_address(email.strip())
    except InvalidAddress:
        raise APIError(400, EMPTY_RECIPIENT, f"{field}.email is not a valid address") from None
    if name is not None and not isinstance(name, str):
        raise APIError(400, MALFORMED_REQUEST, f"{field}.name must be a string")
    return email, name or None


def _reply_to(body: dict) -> str | None:
    """Optional, as the demo and many clients send none; when given, an object with an
    email and a name, as the seed's example."""
    if "replyTo" not in body:
        return None
    value = body["replyTo"]
    if not isinstance(value, dict):
        raise APIError(400, MISSING_REPLY_TO, "replyTo must be an object with email and name")
    email = header_text(value.get("email"), "replyTo.email")
    name = header_text(value.get("name"), "replyTo.name")
    if not isinstance(email, str) or not email.strip():
        raise APIError(400, MISSING_REPLY_TO_EMAIL)
    try:
        email = normalize_address(email.strip())
    except InvalidAddress:
        raise APIError(400, MISSING_REPLY_TO_EMAIL, "replyTo.email is not a valid address"
                       ) from None
    if not isinstance(name, str) or not name.strip():
        raise APIError(400, MISSING_REPLY_TO_NAME)
    return email


def _template_id(value: Any) -> str | None:
    if value is None:
        return None
    if (not isinstance(value, str) or not value.strip() or len(value) > TEMPLATE_ID_MAX_LENGTH
            or not value.isprintable()):
        raise APIError(400, BAD_TEMPLATE_ID, "template_id must be the id of a template: "
                       f"printable text of 1 to {TEMPLATE_ID_MAX_LENGTH} characters")
    return value.strip()


def _variables(value: Any) -> dict[str, str]:
    """A flat object of names (no special characters) and texts or numbers."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise APIError(400, BAD_VARIABLES, 'variables must be an object like {"name": "Ana"}')
    variables = {}
    for name, item in value.items():
        if not _VARIABLE_NAME.fullmatch(name):
            raise APIError(400, BAD_VARIABLES, f"variable name {name[:40]!a}: letters, "
                           "digits, '_', '.' and '-' only")
        if isinstance(item, bool):
            item = "true" if item else "false"
        elif isinstance(item, int | float):
            item = str(item)
        elif item is None:
            item = ""
        if not isinstance(item, str) or "\x00" in item:
            raise APIError(400, BAD_VARIABLES, f"variable {name!a} must be a string or a "
                           "number, without NUL characters")
        variables[name] = item
    return variables


def _attachments(value: Any) -> tuple[AttachmentRequest, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise APIError(400, MALFORMED_REQUEST, "attachments must be an array")
    if len(value) > MAX_ATTACHMENTS:
        raise APIError(400, ATTACHMENT_NOT_ACCEPTED,
                       f"at most {MAX_ATTACHMENTS} attachments in one request")
    found = []
    for number, item in enumerate(value):
        field = f"attachments[{number}]"
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise APIError(400, ATTACHMENT_NOT_ACCEPTED,
                           f"{field} must be an object with a path (a URL or a data: URI)")
        filename = header_text(item.get("filename"), f"{field}.filename")
        if filename is not None and not isinstance(filename, str):
            raise APIError(400, MALFORMED_REQUEST, f"{field}.filename must be a string")
        name = (filename or "").replace("\\", "/").rpartition("/")[2].strip()
        found.append(AttachmentRequest(item["path"], name or None))
    return tuple(found)


def _random_filename(content_type: str) -> str:
    extension = mimetypes.guess_extension(content_type) or ".bin"
    return f"attachment-{random_hex(4)}{extension}"


class AldeamoApp:
    app = Klein()
    add_json_error_pages(app)

    def __init__(self, authenticator: KeyAuthenticator, service: SubmissionService,
                 fetcher: ContentFetcher, max_recipients: int, max_message_size: int) -> None:
        self.authenticator = authenticator
        self.service = service
        self.fetcher = fetcher
        self.max_recipients = max_recipients
        self.max_message_size = max_message_size

    @app.route("/v1/email", methods=["POST"])
    @json_endpoint
    async def send(self, request) -> tuple[int, Any]:
        """H-1: one message to `to[]`, `options.cc[]` and `options.bcc[]`, answered once
        committed, with each recipient's msgid."""
        account = await self.authenticator.caller(request, SEND)
        email = parse_email_request(read_json(request), self.max_recipients)
        try:
            sender = await self.service.check_sender(account, email.sender)
        except SubmissionRefused as refusal:
            raise refusal_error(refusal) from None
        attachments = await self._attachments(email.attachments)
        size = len((email.html or "").encode("utf-8")) + sum(len(a.data) for a in attachments)
        if size > self.max_message_size:
            raise APIError(400, MESSAGE_TOO_LARGE,
                           f"the message is larger than {self.max_message_size} bytes")
        content = ParsedMessage(
            subject=email.subject, from_address=sender, from_name=email.sender_name,
            reply_to=[email.reply_to] if email.reply_to else [], text=None, html=email.html,
            attachments=attachments, options=MessageOptions(), custom_headers={},
            headers=(("Cc", email.cc_header),) if email.cc_header else ())
        submission = Submission(
            account=account, origin="api", sender=sender, recipients=email.recipients,
            content=content, client_ip=request.getClientAddress().host,
            template_id=email.template_id, variables=email.variables, msgids=True)
        try:
            stored = await self.service.submit(submission)
        except SubmissionRefused as refusal:
            raise refusal_error(refusal) from None
        return 200, {"message": "Messages sent!",
                     "to": [{"email": address, "msgid": msgid}
                            for address, msgid in stored.msgids]}

    async def _attachments(self, wanted: Sequence[AttachmentRequest]
                           ) -> tuple[Attachment, ...]:
        """Every attachment fetched (side by side) or decoded; the first that cannot be is
        refused, naming it."""
        results = await defer.DeferredList(
            [defer.ensureDeferred(self.fetcher.fetch(a.path)) for a in wanted],
            consumeErrors=True)
        attachments = []
        for number, (request, (ok, result)) in enumerate(zip(wanted, results, strict=True)):
            if not ok:
                if result.check(FetchRefused):
                    raise APIError(400, ATTACHMENT_NOT_FETCHED,
                                   f"attachments[{number}].path: {result.value}")
                result.raiseException()
            content_type = (result.content_type
                            or mimetypes.guess_type(request.filename or result.filename or "")[0]
                            or "application/octet-stream")
            filename = (request.filename or result.filename
                        or _random_filename(content_type))
            attachments.append(Attachment(filename, content_type, result.data, None, False))
        return tuple(attachments)
