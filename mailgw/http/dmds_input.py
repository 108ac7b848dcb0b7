"""What the DMDS door reads from a request (H-2, R-3): its parameters, from the query
string and from a JSON body on any method (DMDS clients send `curl -X GET -d
'{...}'`), each checked for its type; addresses checked with the seed's wording; the
sender's domain looked up in DNS; pages of lists.

Every refusal is an APIError whose message is the `on` of the DMDS error body.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from email_validator import EmailNotValidError, validate_email

from mailgw.delivery.mx import MXResolver, NullMX, PermanentDNSFailure, TemporaryDNSFailure
from mailgw.http.aldeamo import header_text
from mailgw.http.api import APIError, read_json
from mailgw.submit.addresses import InvalidAddress, normalize_address
from mailgw.text import one_line

BAD_REQUEST = "Bad_request"
INVALID_EMAIL = "Invalid_email"
INVALID_SENDER = "Invalid_sender"
SENDER_NOT_ALLOWED = "Sender_not_allowed"

# Longest text of a field that is not content (names, subjects, campos).
MAX_TEXT = 1000
# Pages (`pagina` from 1, `cantidad` from 10 as the seed says, at most MAX_PAGE).
MIN_PAGE = 10
MAX_PAGE = 10_000
MAX_PAGE_NUMBER = 1_000_000
DEFAULT_PAGE = 1000
# A name an XYZ<NAME>XYZ tag can take (a campo, a global variable), written bare or as
# its tag.
TAG_NAME = re.compile(r"[A-Za-z0-9_-]{1,70}")
# The seed's wording where email-validator's current one differs.
_NO_PERIOD = "The part after the @-sign is not valid. It should have a period."
_ONE_AT_SIGN = "The email address is not valid. It must have exactly one @-sign."
_INTERNATIONAL = "Internationalized characters before the @-sign are not supported."


def bad(message: str) -> APIError:
    return APIError(400, BAD_REQUEST, message)


def email_problem(address: str) -> str:
    """Why `address` is not an address, in the seed's words (from an older
    email-validator: one @-sign, no non-ASCII local part, a domain with a period), or
    else in the current email-validator's."""
    if address.count("@") != 1:
        return _ONE_AT_SIGN
    local, _, domain = address.partition("@")
    if not local.isascii():
        return _INTERNATIONAL
    try:
        validate_email(address, check_deliverability=False, allow_smtputf8=False, strict=True)
    except EmailNotValidError as error:
        text = str(error)
        return f"The domain name {domain} is not valid. It should have a period." \
            if text == _NO_PERIOD else text
    return "The email address is not valid."


def checked_email(value: Any, field: str = "email", prefix: str = "invalid email") -> str:
    """The address normalized (lowercase), or `<prefix> <why>` (the seed's errors)."""
    if not isinstance(value, str) or not value.strip():
        raise bad(f"{field} is required: an email address")
    header_text(value, field)
    address = value.strip()
    try:
        return normalize_address(address)
    except InvalidAddress:
        raise APIError(400, INVALID_EMAIL, f"{prefix} {email_problem(address)}") from None


@dataclass(frozen=True)
class Page:
    number: int
    size: int

    @property
    def offset(self) -> int:
        return (self.number - 1) * self.size


class Params:
    """A request's parameters: the JSON body's, and the query string's for those it does
    not have. A JSON value must have the field's type (`pagina` must be a number, not
    "2", as the seed warns); from the query string, digits are a number."""

    def __init__(self, query: dict[str, str], body: dict[str, Any]) -> None:
        self.query = query
        self.body = body

    @classmethod
    def of(cls, request) -> Params:
        try:
            query = dict(parse_qsl(urlsplit(request.uri).query.decode("utf-8"),
                                   keep_blank_values=True))
        except UnicodeDecodeError:
            raise bad("the query string is not UTF-8 text") from None
        request.content.seek(0)
        body = read_json(request) if request.content.read().strip() else {}
        if not isinstance(body, dict):
            raise bad("the body must be a JSON object")
        return cls(query, body)

    def has(self, name: str) -> bool:
        return self.get(name) is not None

    def get(self, name: str) -> Any:
        if name in self.body:
            return self.body[name]
        return self.query.get(name)

    def text(self, name: str, required: bool = False, default: str | None = None,
             max_length: int = MAX_TEXT, header: bool = True) -> str | None:
        """A text; one that goes into a header holds no CR, LF or NUL (R-5)."""
        value = self.get(name)
        if value is not None and not isinstance(value, str):
            raise bad(f"{name} must be a string")
        if value is None or not value.strip():
            if required:
                raise bad(f"{name} is required")
            return default
        if header:
            header_text(value, name)
        elif "\x00" in value:
            raise bad(f"{name} must not contain NUL characters")
        if len(value) > max_length:
            raise bad(f"{name} is longer than {max_length} characters")
        return value

    def number(self, name: str, default: int | None = None, minimum: int = 0,
               maximum: int = 2**63 - 1) -> int | None:
        value = self.get(name)
        if value is None:
            return default
        if name not in self.body and isinstance(value, str) and value.isascii() \
                and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(f"{name} must be numeric (a JSON number)")
        if not minimum <= value <= maximum:
            raise bad(f"{name} must be a whole number from {minimum} to {maximum}")
        return value

    def flag(self, name: str) -> bool | None:
        """true/false, or the texts "true"/"false" (the seed writes "archive":"true")."""
        value = self.get(name)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise bad(f"{name} must be true or false")

    def items(self, name: str, required: bool = False) -> list[Any] | None:
        value = self.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, list) or (required and not value):
            raise bad(f"{name} must be a non-empty list" if required
                      else f"{name} must be a list")
        return value

    def page(self) -> Page:
        """`pagina` from 1 and `cantidad` from 10, both numeric."""
        return Page(self.number("pagina", 1, 1, MAX_PAGE_NUMBER),
                    self.number("cantidad", DEFAULT_PAGE, MIN_PAGE, MAX_PAGE))

    def moment(self, name: str) -> datetime:
        """`YYYY-MM-DD HH:MM:SS` (the account's local time), naive."""
        value = self.text(name, required=True)
        try:
            moment = datetime.strptime(value.replace("T", " "), "%Y-%m-%d %H:%M:%S")
        except ValueError:
            raise bad(f"{name} must be a date and time as YYYY-MM-DD HH:MM:SS") from None
        return moment


def named_values(value: Any, field: str) -> dict[str, str]:
    """Campos as the seed writes them, `[{"nombre": "XYZDNIXYZ", "valor": "1"}]` (or an
    object of names and values): names a tag can take, texts or numbers as values."""
    if value is None:
        return {}
    if isinstance(value, dict):
        value = [{"nombre": name, "valor": item} for name, item in value.items()]
    if not isinstance(value, list):
        raise bad(f"{field} must be a list of {{\"nombre\": ..., \"valor\": ...}}")
    values = {}
    for number, item in enumerate(value):
        name = item.get("nombre") if isinstance(item, dict) else None
        if not isinstance(name, str) or not TAG_NAME.fullmatch(name):
            raise bad(f"{field}[{number}].nombre must be a name of letters, digits, '_' "
                      "and '-' (at most 70)")
        found = item.get("valor")
        if isinstance(found, int | float) and not isinstance(found, bool):
            found = str(found)
        if found is None:
            found = ""
        if not isinstance(found, str) or "\x00" in found or len(found) > MAX_TEXT:
            raise bad(f"{field}[{number}].valor must be a text of at most {MAX_TEXT} "
                      "characters")
        values[name] = found
    return values


def names(value: Any, field: str) -> list[str]:
    """A list of names (groups), each a non-empty text."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(
            isinstance(name, str) and name.strip() and "\x00" not in name
            and len(name) <= 200 for name in value):
        raise bad(f"{field} must be a list of names (texts of 1 to 200 characters)")
    return list(dict.fromkeys(name.strip() for name in value))


class SenderDomains:
    """Whether a sender's domain exists, asked of DNS with twisted.names (the resolver
    of delivery.dns_servers), answers cached for their TTL: a domain without mail
    servers nor address does not exist."""

    def __init__(self, resolver: Callable[[], MXResolver]) -> None:
        # Made on first use: the system's resolver re-reads its files on a timer.
        self._make_resolver = resolver
        self._resolver: MXResolver | None = None

    async def missing(self, domain: str) -> bool:
        if self._resolver is None:
            self._resolver = self._make_resolver()
        try:
            await self._resolver.mail_servers(domain)
        except NullMX:
            return False
        except PermanentDNSFailure:
            return True
        except TemporaryDNSFailure:
            return False  # not known to be missing: whether it is allowed decides
        return False


def sender_domain_missing_error(domain: str) -> APIError:
    return APIError(400, INVALID_SENDER,
                    f"remitente invalido The domain name {domain} does not exist.")


def first_line(data: bytes) -> str:
    """A subject from fetched text: its first non-empty line (UTF-8), on one line."""
    for line in data.decode("utf-8", "replace").splitlines():
        if one_line(line):
            return " ".join(one_line(line).split())
    return ""


def email_list(items: Sequence[Any], field: str, key: str) -> list[tuple[str, dict]]:
    """(address, item) of a list of objects holding an address under `key`."""
    found = []
    for number, item in enumerate(items):
        if not isinstance(item, dict):
            raise bad(f"{field}[{number}] must be an object with {key}")
        found.append((checked_email(item.get(key), f"{field}[{number}].{key}"), item))
    return found
