"""The management API (H-3) under /v1/admin/, with an admin API key; JSON in and out.

Everything an account has lives under `/v1/admin/accounts/<name>/`: users, API keys,
sender domains (with their DKIM key's DNS records), verified senders, templates,
webhook endpoints and suppressions. An account's admin key reaches only its own
account: another account's name, like any object that is not the account's, is a
404. The installation's operator key (`mailgw apikey create ... --operator`)
reaches every account, and alone may create accounts, change their plan, quotas,
networks and state, and mark domains and senders verified (which lets an account
send as them). The handlers call the same store functions and `mailgw.admin`
operations as the `mailgw` command.

Lists are pages: `?limit=` (1 to 500, default 100) and the `next_cursor` of the
previous page as `?cursor=`; `next_cursor` is null on the last page.

`/v1/admin/queue/...` is the delivery queue (O-7), through the same QueueAdminStore as
`mailgw queue`: an account's admin key sees and steers its own deliveries, the
operator's key everyone's, and it alone suspends and resumes recipient domains.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from klein import Klein

from mailgw import admin
from mailgw.accounts.avatar import SubmissionAccount
from mailgw.accounts.settings import ATTACHMENT_MODES, MULTIPART_MODES, AccountSettings
from mailgw.config import Config
from mailgw.content.dkim import DKIM_ALGORITHMS
from mailgw.errors import AlreadyExists, NotFound
from mailgw.http.api import APIError, add_json_error_pages, json_endpoint, read_json
from mailgw.http.auth import MANAGE, KeyAuthenticator
from mailgw.store import Stores
from mailgw.store.accounts import KEY_KINDS, Account
from mailgw.store.queue_admin import (
    MAX_LISTED,
    BadQueueRequest,
    DeliveryDetails,
    DeliverySummary,
    QueueActionRefused,
    QueueCount,
    QueueFilter,
    SuspendedDomain,
)
from mailgw.store.suppressions import SuppressionFilter
from mailgw.store.templates import Template

BAD_REQUEST = "Bad_request"
CONFLICT = "Already_exists"
NOT_FOUND = "Not_found"
FORBIDDEN = "Operator_only"
QUEUE_REFUSED = "Queue_action_refused"
MAX_PAGE = 500
# A row id in a path: a bigint (a longer number is no row, not a database error).
ROW_ID = f"<int(max={2**63 - 1})"
ACCOUNT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _bad(message: str) -> APIError:
    return APIError(400, BAD_REQUEST, message)


def _text(body: dict, name: str, required: bool = True, default: str | None = None
          ) -> str | None:
    """The text field `name`: required (non-empty), or optional with a default."""
    value = body.get(name)
    if value is None:
        if default is not None or not required:
            return default
        raise _bad(f"{name} is required")
    if not isinstance(value, str) or (required and default is None and not value.strip()) \
            or "\x00" in value:
        raise _bad(f"{name} must be a {'non-empty ' if required else ''}string without NUL")
    return value


def _switch(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _bad(f"{name} must be true or false")
    return value


def _limit_value(body: dict, name: str) -> Any:
    """A quota: a whole number of 0 or more, or null for none (absent: unchanged)."""
    value = body[name]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or not 0 <= value < 2**31):
        raise _bad(f"{name} must be a whole number of 0 or more, or null")
    return value


def _object(request) -> dict:
    body = read_json(request)
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    return body


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True)
class Page:
    """Where a list starts (after the cursor's key) and how long it is."""

    after: Any
    limit: int

    @classmethod
    def of(cls, request, first: Any = 0) -> Page:
        limit = _argument(request, b"limit") or "100"
        if not limit.isascii() or not limit.isdigit() or not 1 <= int(limit) <= MAX_PAGE:
            raise _bad(f"limit must be a whole number from 1 to {MAX_PAGE}")
        cursor = _argument(request, b"cursor")
        after = first
        if cursor:
            try:
                after = json.loads(base64.urlsafe_b64decode(cursor.encode("ascii") + b"=="))
            except (ValueError, UnicodeError, binascii.Error):
                raise _bad("cursor is not one this API gave") from None
            if type(after) is not type(first) or (isinstance(after, int)
                                                  and not 0 <= after < 2**63) or (
                    isinstance(after, str) and "\x00" in after):
                raise _bad("cursor is not one this API gave")
        return cls(after, int(limit))

    def answer(self, items: list, item_json: Callable[[Any], dict],
               key: Callable[[Any], Any]) -> dict:
        """The page's body: its items, and the cursor of the next page (null: no more)."""
        cursor = None
        if len(items) == self.limit:
            cursor = base64.urlsafe_b64encode(json.dumps(key(items[-1])).encode()).decode(
                "ascii").rstrip("=")
        return {"items": [item_json(item) for item in items], "next_cursor": cursor}


def _argument(request, name: bytes) -> str | None:
    values = request.args.get(name)
    if not values:
        return None
    try:
        value = values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(f"{name.decode()} is not UTF-8 text") from None
    if "\x00" in value:
        raise _bad(f"{name.decode()} must not contain NUL")
    return value


def _account_json(account: Account) -> dict:
    return {"id": account.id, "name": account.name, "plan": account.plan,
            "timezone": account.timezone, "active": account.active,
            "created_at": _time(account.created_at)}


def _template_json(template: Template) -> dict:
    return {"template_id": template.template_id, "name": template.name,
            "subject": template.subject, "html": template.html, "text": template.text}


class ManagementApp:
    app = Klein()
    add_json_error_pages(app)

    def __init__(self, authenticator: KeyAuthenticator, stores: Stores, config: Config,
                 run_in_thread: Callable[..., Any]) -> None:
        self.authenticator = authenticator
        self.stores = stores
        self.config = config
        # Password hashing and DKIM key generation (tens of milliseconds) off the reactor.
        self.run_in_thread = run_in_thread

    async def _caller(self, request) -> SubmissionAccount:
        return await self.authenticator.caller(request, MANAGE)

    async def _operator(self, request) -> SubmissionAccount:
        caller = await self._caller(request)
        if not caller.key.operator:
            raise APIError(403, FORBIDDEN, "only the operator's key may do this")
        return caller

    async def _account(self, request, name: str, operator_only: bool = False
                       ) -> tuple[SubmissionAccount, Account]:
        """The account named in the path, if the caller's key may manage it (404 if not,
        as if there were none)."""
        caller = await (self._operator(request) if operator_only else self._caller(request))
        if not caller.key.operator and name != caller.name:
            raise APIError(404, NOT_FOUND, f"no account named {name!r}")
        try:
            return caller, await self.stores.accounts.get_account(name)
        except NotFound as missing:
            raise APIError(404, NOT_FOUND, str(missing)) from None

    async def _page(self, request, name: str, lister: Callable[..., Any],
                    item_json: Callable[[Any], dict], key: Callable[[Any], Any],
                    first: Any = 0) -> tuple[int, dict]:
        """A page of one kind of the account's objects: `lister(account_id, after, limit)`
        lists them in the order of `key`, which the cursor holds."""
        _, account = await self._account(request, name)
        page = Page.of(request, first)
        return 200, page.answer(await lister(account.id, page.after, page.limit), item_json,
                                key)

    # -- accounts ----------------------------------------------------------------------

    @app.route("/v1/admin/accounts", methods=["GET"])
    @json_endpoint
    async def list_accounts(self, request) -> tuple[int, Any]:
        caller = await self._caller(request)
        page = Page.of(request)
        if caller.key.operator:
            accounts = await self.stores.accounts.accounts_page(page.after, page.limit)
        else:
            own = await self.stores.accounts.get_account(caller.name)
            accounts = [own] if own.id > page.after else []
        return 200, page.answer(accounts, _account_json, lambda a: a.id)

    @app.route("/v1/admin/accounts", methods=["POST"])
    @json_endpoint
    async def create_account(self, request) -> tuple[int, Any]:
        await self._operator(request)
        body = _object(request)
        name = _text(body, "name").strip()
        if not ACCOUNT_NAME.fullmatch(name):
            raise _bad("an account name is 1 to 64 letters, digits, '.', '_' or '-'")
        try:
            account = await self.stores.accounts.create_account(
                name, _text(body, "plan", default="default"),
                _timezone(_text(body, "timezone", default="America/Bogota")))
        except AlreadyExists as taken:
            raise APIError(409, CONFLICT, str(taken)) from None
        return 201, _account_json(account)

    @app.route("/v1/admin/accounts/<name>", methods=["GET"])
    @json_endpoint
    async def get_account(self, request, name: str) -> tuple[int, Any]:
        _, account = await self._account(request, name)
        return 200, await self._account_details(account)

    async def _account_details(self, account: Account) -> dict:
        profile = await self.stores.accounts.profile(account.id)
        return {**_account_json(account), "settings": {
            "multipart": profile.settings.multipart,
            "attachments": profile.settings.attachments, "archive": profile.settings.archive},
            "sends_per_month": profile.sends_per_month, "max_contacts": profile.max_contacts,
            "allowed_networks": profile.allowed_networks}

    @app.route("/v1/admin/accounts/<name>", methods=["PATCH"])
    @json_endpoint
    async def update_account(self, request, name: str) -> tuple[int, Any]:
        """An admin changes the account's settings and time zone; the operator also its
        plan, quotas, networks and state."""
        caller, account = await self._account(request, name)
        body = _object(request)
        for setting, choices in (("multipart", MULTIPART_MODES),
                                 ("attachments", ATTACHMENT_MODES)):
            if body.get(setting) is not None and body[setting] not in choices:
                raise _bad(f"{setting} must be one of {', '.join(choices)}")
        settings = AccountSettings.changes(multipart=body.get("multipart"),
                                           attachments=body.get("attachments"),
                                           archive=_switch(body, "archive"))
        columns: dict[str, Any] = {}
        if body.get("timezone") is not None:
            columns["timezone"] = _timezone(_text(body, "timezone"))
        operator_only = {"plan", "sends_per_month", "max_contacts", "allowed_networks",
                         "active"} & body.keys()
        if operator_only and not caller.key.operator:
            raise APIError(403, FORBIDDEN, f"only the operator's key may change "
                           f"{', '.join(sorted(operator_only))}")
        if "plan" in body:
            columns["plan"] = _text(body, "plan")
        for quota in ("sends_per_month", "max_contacts"):
            if quota in body:
                columns[quota] = _limit_value(body, quota)
        if "active" in body:
            columns["active"] = _switch(body, "active")
            if columns["active"] is None:
                raise _bad("active must be true or false")
        if "allowed_networks" in body:
            columns["allowed_networks"] = _networks(body["allowed_networks"])
        await self.stores.accounts.update_account(account.name, settings, columns)
        self.authenticator.forget_keys()
        return 200, await self._account_details(
            await self.stores.accounts.get_account(account.name))

    # -- users -------------------------------------------------------------------------

    @app.route("/v1/admin/accounts/<name>/users", methods=["GET"])
    @json_endpoint
    async def list_users(self, request, name: str) -> tuple[int, Any]:
        return await self._page(request, name, self.stores.accounts.list_users, lambda u: {
            "username": u.username, "created_at": _time(u.created_at)}, lambda u: u.id)

    @app.route("/v1/admin/accounts/<name>/users", methods=["POST"])
    @json_endpoint
    async def create_user(self, request, name: str) -> tuple[int, Any]:
        """The password is generated unless given, and shown only in this answer."""
        _, account = await self._account(request, name)
        body = _object(request)
        username = _text(body, "username").strip()
        try:
            password = await admin.create_user(self.stores, account.id, username,
                                               _text(body, "password", required=False),
                                               self.run_in_thread)
        except admin.AdminRefused as refusal:
            raise _bad(str(refusal)) from None
        except AlreadyExists as taken:
            raise APIError(409, CONFLICT, str(taken)) from None
        return 201, {"username": username, "password": password}

    @app.route("/v1/admin/accounts/<name>/users/<username>", methods=["DELETE"])
    @json_endpoint
    async def delete_user(self, request, name: str, username: str) -> tuple[int, Any]:
        _, account = await self._account(request, name)
        await _found(self.stores.accounts.delete_user(account.id, username))
        return 200, {"deleted": username}

    # -- API keys ----------------------------------------------------------------------

    @app.route("/v1/admin/accounts/<name>/keys", methods=["GET"])
    @json_endpoint
    async def list_keys(self, request, name: str) -> tuple[int, Any]:
        return await self._page(request, name, self.stores.accounts.list_api_keys, _key_json,
                                lambda k: k.id)

    @app.route("/v1/admin/accounts/<name>/keys", methods=["POST"])
    @json_endpoint
    async def create_key(self, request, name: str) -> tuple[int, Any]:
        """A key of the account, shown only in this answer (stored as a digest)."""
        _, account = await self._account(request, name)
        body = _object(request)
        kind = _text(body, "kind", default="account")
        if kind not in KEY_KINDS:
            raise _bad(f"kind must be one of {', '.join(KEY_KINDS)}")
        campaign = body.get("campaign")
        if campaign is not None and (isinstance(campaign, bool) or not isinstance(campaign, int)
                                     or not 0 < campaign < 2**63):
            raise _bad("campaign must be a campaign's numid")
        try:
            info, key = await admin.create_api_key(
                self.stores, account.id, _text(body, "name", default=""), kind, campaign)
        except admin.AdminRefused as refusal:
            raise _bad(str(refusal)) from None
        except NotFound as missing:
            raise APIError(404, NOT_FOUND, str(missing)) from None
        return 201, {**_key_json(info), "key": key}

    @app.route(f"/v1/admin/accounts/<name>/keys/{ROW_ID}:key_id>", methods=["DELETE"])
    @json_endpoint
    async def revoke_key(self, request, name: str, key_id: int) -> tuple[int, Any]:
        _, account = await self._account(request, name)
        await _found(self.stores.accounts.revoke_api_key(account.id, key_id))
        self.authenticator.forget_keys()
        return 200, {"revoked": key_id}

    # -- sender domains and senders ------------------------------------------------------

    @app.route("/v1/admin/accounts/<name>/domains", methods=["GET"])
    @json_endpoint
    async def list_domains(self, request, name: str) -> tuple[int, Any]:
        return await self._page(request, name, self.stores.senders.list_domains,
                                self._domain_json, lambda d: d.id)

    @app.route("/v1/admin/accounts/<name>/domains", methods=["POST"])
    @json_endpoint
    async def add_domain(self, request, name: str) -> tuple[int, Any]:
        """A new DKIM key is made for the domain; the answer lists the DNS records to
        publish. `verified` is for the operator's key only."""
        caller, account = await self._account(request, name)
        body = _object(request)
        verified = bool(_switch(body, "verified"))
        if verified and not caller.key.operator:
            raise APIError(403, FORBIDDEN, "only the operator's key may mark a domain verified")
        algorithm = _text(body, "algorithm", default="rsa")
        if algorithm not in DKIM_ALGORITHMS:
            raise _bad(f"algorithm must be one of {', '.join(DKIM_ALGORITHMS)}")
        try:
            domain = await admin.add_domain(
                self.stores, account.id, _text(body, "domain"), algorithm,
                _text(body, "selector", default="mailgw"),
                _text(body, "return_path_domain", required=False), verified,
                self.run_in_thread)
        except admin.AdminRefused as refusal:
            raise _bad(str(refusal)) from None
        except AlreadyExists as taken:
            raise APIError(409, CONFLICT, str(taken)) from None
        return 201, self._domain_json(domain)

    @app.route("/v1/admin/accounts/<name>/domains/<domain>", methods=["GET"])
    @json_endpoint
    async def get_domain(self, request, name: str, domain: str) -> tuple[int, Any]:
        _, account = await self._account(request, name)
        return 200, self._domain_json(await _found(self.stores.senders.get_domain(account.id,
                                                                                  domain)))

    @app.route("/v1/admin/accounts/<name>/domains/<domain>", methods=["DELETE"])
    @json_endpoint
    async def delete_domain(self, request, name: str, domain: str) -> tuple[int, Any]:
        _, account = await self._account(request, name)
        await _found(self.stores.senders.delete_domain(account.id, domain))
        return 200, {"deleted": domain.lower()}

    @app.route("/v1/admin/accounts/<name>/domains/<domain>/verify", methods=["POST"])
    @json_endpoint
    async def verify_domain(self, request, name: str, domain: str) -> tuple[int, Any]:
        _, account = await self._account(request, name, operator_only=True)
        return 200, self._domain_json(await _found(self.stores.senders.verify_domain(
            account.id, domain)))

    def _domain_json(self, domain) -> dict:
        return {"domain": domain.domain, "dkim_selector": domain.dkim_selector,
                "dkim_algorithm": domain.dkim_algorithm,
                "dkim_public_key": domain.dkim_public_key,
                "return_path_domain": domain.return_path_domain,
                "verified": domain.verified_at is not None,
                "dns_records": [{"name": r.name, "type": r.type, "value": r.value}
                                for r in admin.domain_records(domain, self.config.hostname)]}

    @app.route("/v1/admin/accounts/<name>/senders", methods=["GET"])
    @json_endpoint
    async def list_senders(self, request, name: str) -> tuple[int, Any]:
        return await self._page(request, name, self.stores.senders.list_senders, _sender_json,
                                lambda s: s.address, first="")

    @app.route("/v1/admin/accounts/<name>/senders", methods=["POST"])
    @json_endpoint
    async def add_sender(self, request, name: str) -> tuple[int, Any]:
        caller, account = await self._account(request, name)
        body = _object(request)
        verified = bool(_switch(body, "verified"))
        if verified and not caller.key.operator:
            raise APIError(403, FORBIDDEN, "only the operator's key may mark a sender verified")
        try:
            sender = await admin.add_sender(self.stores, account.id, _text(body, "address"),
                                            verified)
        except admin.AdminRefused as refusal:
            raise _bad(str(refusal)) from None
        except AlreadyExists as taken:
            raise APIError(409, CONFLICT, str(taken)) from None
        return 201, _sender_json(sender)

    @app.route("/v1/admin/accounts/<name>/senders/<address>", methods=["DELETE"])
    @json_endpoint
    async def delete_sender(self, request, name: str, address: str) -> tuple[int, Any]:
        _, account = await self._account(request, name)
        await _found(self.stores.senders.delete_sender(account.id, address))
        return 200, {"deleted": address.lower()}

    @app.route("/v1/admin/accounts/<name>/senders/<address>/verify", methods=["POST"])
    @json_endpoint
    async def verify_sender(self, request, name: str, address: str) -> tuple[int, Any]:
        _, account = await self._account(request, name, operator_only=True)
        return 200, _sender_json(await _found(self.stores.senders.verify_sender(account.id,
                                                                                address)))

    # -- templates ---------------------------------------------------------------------

    @app.route("/v1/admin/accounts/<name>/templates", methods=["GET"])
    @json_endpoint
    async def list_templates(self, request, name: str) -> tuple[int, Any]:
        return await self._page(request, name, self.stores.templates.list, _template_json,
                                lambda t: t.template_id, first="")

    @app.route("/v1/admin/accounts/<name>/templates/<template_id>", methods=["GET"])
    @json_endpoint
    async def get_template(self, request, name: str, template_id: str) -> tuple[int, Any]:
        _, account = await self._account(request, name)
        template = await self.stores.templates.get(account.id, template_id)
        if template is None:
            raise APIError(404, NOT_FOUND, f"no template {template_id!r}")
        return 200, _template_json(template)

    @app.route("/v1/admin/accounts/<name>/templates/<template_id>", methods=["PUT"])
    @json_endpoint
    async def put_template(self, request, name: str, template_id: str) -> tuple[int, Any]:
        """Create or replace the template `template_id` (Aldeamo's `template_id`)."""
        _, account = await self._account(request, name)
        body = _object(request)
        html = _text(body, "html", required=False)
        text = _text(body, "text", required=False)
        if not (html or text):
            raise _bad("a template needs html or text")
        if not template_id.isprintable() or len(template_id) > 100:
            raise _bad("a template id is printable text of at most 100 characters")
        template = Template(template_id, _text(body, "name", default=""),
                            _text(body, "subject", default=""), html, text)
        await self.stores.templates.put(account.id, template)
        return 200, _template_json(template)

    @app.route("/v1/admin/accounts/<name>/templates/<template_id>", methods=["DELETE"])
    @json_endpoint
    async def delete_template(self, request, name: str, template_id: str) -> tuple[int, Any]:
        _, account = await self._account(request, name)
        if not await self.stores.templates.delete(account.id, template_id):
            raise APIError(404, NOT_FOUND, f"no template {template_id!r}")
        return 200, {"deleted": template_id}

    # -- webhook endpoints -------------------------------------------------------------

    @app.route("/v1/admin/accounts/<name>/webhooks", methods=["GET"])
    @json_endpoint
    async def list_webhooks(self, request, name: str) -> tuple[int, Any]:
        return await self._page(request, name, self.stores.webhooks.list, _webhook_json,
                                lambda w: w.id)

    @app.route("/v1/admin/accounts/<name>/webhooks", methods=["POST"])
    @json_endpoint
    async def add_webhook(self, request, name: str) -> tuple[int, Any]:
        """The endpoint's signing secret is shown only in this answer."""
        _, account = await self._account(request, name)
        body = _object(request)
        events = body.get("event_types")
        if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
            raise _bad("event_types must be an array of event type names")
        try:
            endpoint, secret = await admin.add_webhook(
                self.stores, account.id, _text(body, "url"), events,
                self.config.webhooks.allow_http_hosts)
        except admin.AdminRefused as refusal:
            raise _bad(str(refusal)) from None
        return 201, {**_webhook_json(endpoint), "secret": secret}

    @app.route(f"/v1/admin/accounts/<name>/webhooks/{ROW_ID}:endpoint_id>",
               methods=["DELETE"])
    @json_endpoint
    async def delete_webhook(self, request, name: str, endpoint_id: int) -> tuple[int, Any]:
        _, account = await self._account(request, name)
        await _found(self.stores.webhooks.delete(account.id, endpoint_id))
        return 200, {"deleted": endpoint_id}

    # -- suppressions ------------------------------------------------------------------

    @app.route("/v1/admin/accounts/<name>/suppressions", methods=["GET"])
    @json_endpoint
    async def list_suppressions(self, request, name: str) -> tuple[int, Any]:
        """Every suppression, or those of `?address=` or of `?domain=` (the addresses at a
        recipient domain)."""
        which = _which(request)
        return await self._page(
            request, name, lambda account_id, after, limit: self.stores.suppressions.list(
                account_id, which, after, limit), _suppression_json, lambda s: s.id)

    @app.route("/v1/admin/accounts/<name>/suppressions", methods=["POST"])
    @json_endpoint
    async def add_suppression(self, request, name: str) -> tuple[int, Any]:
        _, account = await self._account(request, name)
        body = _object(request)
        try:
            row = await admin.add_suppression(
                self.stores, account.id, _text(body, "address"),
                _text(body, "sender_domain", required=False) or None,
                _text(body, "category", required=False) or None)
        except admin.AdminRefused as refusal:
            raise _bad(str(refusal)) from None
        except AlreadyExists as taken:
            raise APIError(409, CONFLICT, str(taken)) from None
        return 201, _suppression_json(row)

    @app.route("/v1/admin/accounts/<name>/suppressions", methods=["DELETE"])
    @json_endpoint
    async def remove_suppressions(self, request, name: str) -> tuple[int, Any]:
        """Remove the suppressions of `?address=` or `?domain=` (one is required)."""
        _, account = await self._account(request, name)
        which = _which(request)
        if which.address is None and which.domain is None:
            raise _bad("give address or domain")
        return 200, {"removed": await self.stores.suppressions.remove(account.id, which)}

    # -- the delivery queue (O-7) ------------------------------------------------------
    # An account's admin key sees and steers its own account's deliveries; the operator's
    # key every account's, and alone suspends recipient domains or retries all of one
    # (they concern every account's mail).

    @app.route("/v1/admin/queue", methods=["GET"])
    @json_endpoint
    async def queue_counts(self, request) -> tuple[int, Any]:
        """Deliveries counted by state, account and recipient domain."""
        which = await self._queue_filter(request)
        counts = await _queue_answer(self.stores.queue_admin.counts(which))
        return 200, {"items": [_queue_count_json(count) for count in counts]}

    @app.route("/v1/admin/queue/deliveries", methods=["GET"])
    @json_endpoint
    async def queue_deliveries(self, request) -> tuple[int, Any]:
        which = await self._queue_filter(request)
        limit = _argument(request, b"limit") or "100"
        if not limit.isascii() or not limit.isdigit() or not 1 <= int(limit) <= MAX_LISTED:
            raise _bad(f"limit must be a whole number from 1 to {MAX_LISTED}")
        listed = await _queue_answer(self.stores.queue_admin.deliveries(which, int(limit)))
        return 200, {"items": [_delivery_json(delivery) for delivery in listed]}

    @app.route(f"/v1/admin/queue/deliveries/{ROW_ID}:delivery_id>", methods=["GET"])
    @json_endpoint
    async def queue_delivery(self, request, delivery_id: int) -> tuple[int, Any]:
        """One delivery with its history: each attempt's outcome and remote reply."""
        details = await self._own_delivery(request, delivery_id)
        return 200, {
            **_delivery_json(details.delivery), "send_id": details.send_id,
            "message_id": details.message_id, "sender": details.sender,
            "from_address": details.from_address, "subject": details.subject,
            "first_attempt_at": _time(details.first_attempt_at),
            "last_attempt_at": _time(details.last_attempt_at),
            "events": [{"occurred_at": _time(event.occurred_at), "type": str(event.type),
                        "details": event.details} for event in details.events]}

    @app.route(f"/v1/admin/queue/deliveries/{ROW_ID}:delivery_id>/retry",
               methods=["POST"])
    @json_endpoint
    async def queue_retry(self, request, delivery_id: int) -> tuple[int, Any]:
        """A deferred delivery is due now."""
        await self._own_delivery(request, delivery_id)
        return 200, _delivery_json(
            await _queue_answer(self.stores.queue_admin.retry(delivery_id)))

    @app.route(f"/v1/admin/queue/deliveries/{ROW_ID}:delivery_id>/cancel",
               methods=["POST"])
    @json_endpoint
    async def queue_cancel(self, request, delivery_id: int) -> tuple[int, Any]:
        """A waiting delivery is not sent (`not_sent`, with the body's `reason`)."""
        await self._own_delivery(request, delivery_id)
        reason = _text(_object(request), "reason", required=False, default="")
        return 200, _delivery_json(
            await _queue_answer(self.stores.queue_admin.cancel(delivery_id, reason)))

    @app.route("/v1/admin/queue/domains/<domain>/retry", methods=["POST"])
    @json_endpoint
    async def queue_retry_domain(self, request, domain: str) -> tuple[int, Any]:
        """Every deferred delivery to a recipient domain is due now."""
        await self._operator(request)
        return 200, {"due": await _queue_answer(self.stores.queue_admin.retry_domain(domain))}

    @app.route("/v1/admin/queue/suspended", methods=["GET"])
    @json_endpoint
    async def queue_suspended(self, request) -> tuple[int, Any]:
        await self._operator(request)
        return 200, {"items": [_suspended_json(held)
                               for held in await self.stores.queue_admin.suspended()]}

    @app.route("/v1/admin/queue/suspended/<domain>", methods=["PUT"])
    @json_endpoint
    async def queue_suspend(self, request, domain: str) -> tuple[int, Any]:
        """Hold every delivery to a recipient domain, on every node, until resumed."""
        await self._operator(request)
        reason = _text(_object(request), "reason", required=False, default="")
        return 200, _suspended_json(
            await _queue_answer(self.stores.queue_admin.suspend(domain, reason)))

    @app.route("/v1/admin/queue/suspended/<domain>", methods=["DELETE"])
    @json_endpoint
    async def queue_resume(self, request, domain: str) -> tuple[int, Any]:
        """Resume a suspended domain: what it held is due at once."""
        await self._operator(request)
        return 200, {"due": await _queue_answer(self.stores.queue_admin.resume(domain))}

    async def _queue_filter(self, request) -> QueueFilter:
        """`?state=&account=&domain=`; an account's admin key sees only its account."""
        caller = await self._caller(request)
        account = _argument(request, b"account")
        if not caller.key.operator:
            if account is not None and account != caller.name:
                raise APIError(404, NOT_FOUND, f"no account named {account!r}")
            account = caller.name
        try:
            return QueueFilter(_argument(request, b"state"), account,
                               _argument(request, b"domain")).checked()
        except BadQueueRequest as bad:
            raise _bad(str(bad)) from None

    async def _own_delivery(self, request, delivery_id: int) -> DeliveryDetails:
        """The delivery, if the caller's key may see it (404 if not, as if there were
        none)."""
        caller = await self._caller(request)
        details = await _queue_answer(self.stores.queue_admin.show(delivery_id))
        if not caller.key.operator and details.delivery.account != caller.name:
            raise APIError(404, NOT_FOUND, f"no delivery {delivery_id}")
        return details


async def _found(pending):
    try:
        return await pending
    except NotFound as missing:
        raise APIError(404, NOT_FOUND, str(missing)) from None


async def _queue_answer(pending):
    """What a queue operation answers; its refusals as 404, 400 and 409."""
    try:
        return await pending
    except NotFound as missing:
        raise APIError(404, NOT_FOUND, str(missing)) from None
    except BadQueueRequest as bad:
        raise _bad(str(bad)) from None
    except QueueActionRefused as refused:
        raise APIError(409, QUEUE_REFUSED, str(refused)) from None


def _queue_count_json(count: QueueCount) -> dict:
    return {"state": count.state, "account": count.account, "domain": count.domain,
            "deliveries": count.deliveries, "held": count.held,
            "oldest": _time(count.oldest)}


def _delivery_json(delivery: DeliverySummary) -> dict:
    return {"id": delivery.id, "account": delivery.account, "recipient": delivery.recipient,
            "state": delivery.state, "attempts": delivery.attempts,
            "next_attempt_at": _time(delivery.next_attempt_at), "held": delivery.held,
            "sending": delivery.sending, "last_reply": delivery.last_reply,
            "created_at": _time(delivery.created_at)}


def _suspended_json(held: SuspendedDomain) -> dict:
    return {"domain": held.domain, "reason": held.reason,
            "suspended_at": _time(held.suspended_at), "held": held.held}


def _which(request) -> SuppressionFilter:
    address = _argument(request, b"address")
    domain = _argument(request, b"domain")
    return SuppressionFilter(address.lower() if address else None,
                             domain.lower() if domain else None)


def _timezone(name: str) -> str:
    """An IANA time zone (the account's webhook timestamps, W-1)."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise _bad(f"not a time zone: {name[:60]!a}") from None
    return name


def _networks(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise _bad("allowed_networks must be an array of CIDR networks, or null")
    try:
        return [str(ipaddress.ip_network(n.strip(), strict=False)) for n in value]
    except ValueError as e:
        raise _bad(f"allowed_networks: {e}") from None


def _key_json(key) -> dict:
    return {"id": key.id, "name": key.name, "prefix": key.prefix, "kind": key.kind,
            "campaign": key.campaign_numid, "operator": key.operator,
            "created_at": _time(key.created_at), "revoked_at": _time(key.revoked_at)}


def _sender_json(sender) -> dict:
    return {"address": sender.address, "verified": sender.verified_at is not None}


def _webhook_json(endpoint) -> dict:
    return {"id": endpoint.id, "url": endpoint.url, "event_types": endpoint.event_types,
            "active": endpoint.active, "dropped": endpoint.dropped_count,
            "created_at": _time(endpoint.created_at)}


def _suppression_json(row) -> dict:
    return {"id": row.id, "address": row.address, "sender_domain": row.scope_domain,
            "category": row.category, "reason": row.reason,
            "created_at": _time(row.created_at)}
