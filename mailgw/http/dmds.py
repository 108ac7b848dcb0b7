"""The DMDS REST API v1.5 (H-2) under /v1/: contacts, the whitelist, groups, filters,
global variables, campaigns and their keys, sends, and the events of batches (eeid)
and of time ranges, answered `{"status": "ok", ...}` or `{"status": "err", "on":
"<reason>"}` as Planisys DMDS answers them.

The door only translates: parameters come from the query string and from a JSON
body on any method (dmds_input.py), the contact book and the event log are read and
written through their stores, events are shown through the one projection
(dmds_projection.py), and sends go to the one submission path, whose refusals are
mapped here to the DMDS wording. A send names its campaign with `numid`, or is made
with a campaign's key; its contacts become contacts of a group made for the call, in
the transaction of the message; a `send_many_*` longer than smtp.max_recipients is
stored in batches under one eeid. Every path answers with and without a trailing
slash.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formataddr
from typing import Any

from klein import Klein

from mailgw import admin
from mailgw.accounts.avatar import SubmissionAccount
from mailgw.content.merge import CAMPOS
from mailgw.content.message import MessageOptions, ParsedMessage
from mailgw.credentials import Sealer
from mailgw.errors import AlreadyExists
from mailgw.fetch import ContentFetcher, FetchRefused
from mailgw.http import auth
from mailgw.http import dmds_projection as projection
from mailgw.http.api import APIError, Raw, add_json_error_pages, json_endpoint_with
from mailgw.http.auth import READ, SEND, KeyAuthenticator
from mailgw.http.dmds_input import (
    MAX_TEXT,
    SENDER_NOT_ALLOWED,
    TAG_NAME,
    Params,
    SenderDomains,
    bad,
    checked_email,
    first_line,
    named_values,
    names,
    sender_domain_missing_error,
)
from mailgw.store import Stores
from mailgw.store.campaigns import Campaign, NewCampaign
from mailgw.store.contacts import ContactLimitReached
from mailgw.store.dmds import NAME_FIELDS, ContactChange, UnknownGroups, Validity
from mailgw.store.dmds_events import Batch
from mailgw.store.statistics import account_zone
from mailgw.submit.errors import (
    ContactQuotaExhausted,
    ContentNotAccepted,
    DisallowedSender,
    SendQuotaExhausted,
    SubmissionRefused,
)
from mailgw.submit.recipients import Recipient, submission_group_name
from mailgw.submit.service import Submission, SubmissionService

API_VERSION = "1.5"
NOT_FOUND = "Not_found"
CONFLICT = "Already_exists"
TOO_MANY_CONTACTS = "Too_many_contacts"
# The subject tag that a campaign's asunto_uri replaces, fetched for each send.
SUBJECT_TAG = "XYZTAG-CURLXYZ"
# Events shown with a contact (the seed's `eventos`), its latest ones.
MAX_CONTACT_EVENTS = 500
# A key set with campania_apikey: long enough not to be guessed, no blanks.
MIN_KEY_LENGTH, MAX_KEY_LENGTH = 16, 128
# The key refusals and mailgw's own errors without a message of their own, in words.
_WORDS = {"Invalid_API_Key": "invalid API key",
          "Current_service_is_not_active": "the account is not active",
          "API_key_not_authorized": "this API key may not do this",
          "Not_found": "not found", "Method_not_allowed": "method not allowed",
          "Internal_error": "internal error"}


def dmds_error_body(name: str, message: str | None = None, **extra: Any) -> dict[str, Any]:
    """The DMDS error body, `{"status": "err", "on": "<reason>"}`: the reason is the
    message, or the error name in words."""
    return {"status": "err", "on": message or _WORDS.get(name, name)}


def _ok(**fields: Any) -> tuple[int, dict[str, Any]]:
    return 200, {"status": "ok", **fields}


def _not_found(message: str) -> APIError:
    return APIError(404, NOT_FOUND, message)


def _route(app: Klein, path: str, *methods: str):
    """A route that answers with and without the trailing slash."""
    return app.route(path, methods=list(methods), strict_slashes=False)


dmds_endpoint = json_endpoint_with(dmds_error_body)


@dataclass(frozen=True)
class SendRequest:
    """A send_* call, checked, its campaign's defaults applied."""

    sender: str
    sender_name: str | None
    reply_to: str | None
    subject: str
    subject_uri: str | None
    html: str | None
    html_uri: str | None
    recipients: tuple[Recipient, ...]
    # Name fields given for contacts and copies.
    contact_names: tuple[ContactChange, ...]
    cc_header: str | None
    archive: bool | None
    reuse_eeid: str | None
    # Addresses of `contactos` that are not addresses: skipped, not counted.
    skipped: tuple[str, ...]


class DMDSApp:
    app = Klein()
    add_json_error_pages(app, dmds_error_body)

    def __init__(self, authenticator: KeyAuthenticator, service: SubmissionService,
                 stores: Stores, fetcher: ContentFetcher, sealer: Sealer,
                 sender_domains: SenderDomains, batch_size: int, max_contacts: int,
                 max_message_size: int) -> None:
        self.authenticator = authenticator
        self.service = service
        self.stores = stores
        self.fetcher = fetcher
        self.sealer = sealer
        self.sender_domains = sender_domains
        # Recipients per stored message (smtp.max_recipients) and per call (413 past it).
        self.batch_size = batch_size
        self.max_contacts = max_contacts
        self.max_message_size = max_message_size

    # -- keys -------------------------------------------------------------------------

    async def _caller(self, request, action: str = READ, campaign_numid: int | None = None,
                      own_campaign: bool = False) -> SubmissionAccount:
        """The account of the request's key, allowed `action` (for the campaign
        `campaign_numid`; with `own_campaign`, a campaign key sends for its own): 403 in
        DMDS words otherwise (429 past the key's rate)."""
        try:
            try:
                return await self.authenticator.authorized(request, action, campaign_numid)
            except auth.KeyNotAuthorized:
                if not own_campaign:
                    raise
                account = await self.authenticator.account(request)
                auth.authorize(account, action, account.key.campaign_numid if account.key else None)
                return account
        except auth.InvalidAPIKey:
            raise APIError(403, "Invalid_API_Key") from None
        except auth.InactiveAccount:
            raise APIError(403, "Current_service_is_not_active") from None
        except auth.KeyNotAuthorized:
            raise APIError(403, "API_key_not_authorized") from None

    async def _read(self, request) -> tuple[SubmissionAccount, Params]:
        """A caller that may read and manage its account's DMDS objects, and its params."""
        caller = await self._caller(request)
        return caller, Params.of(request)

    async def _zone(self, caller: SubmissionAccount):
        account = await self.stores.accounts.get_account(caller.name)
        return account_zone(account.timezone)

    # -- version ----------------------------------------------------------------------

    @_route(app, "/v1/version/", "GET")
    @dmds_endpoint
    async def version(self, request) -> tuple[int, Any]:
        await self._caller(request)
        return _ok(version=API_VERSION)

    # -- contacts ---------------------------------------------------------------------

    @_route(app, "/v1/contacto/", "POST", "PUT")
    @dmds_endpoint
    async def put_contact(self, request) -> tuple[int, Any]:
        """Create or update a contact by its email: name fields, groups, campos."""
        caller, params = await self._read(request)
        email = checked_email(params.get("email"))
        fields = {name: self._name_field(params, name) for name in NAME_FIELDS
                  if name in params.body or name in params.query}
        groups = names(params.get("grupos"), "grupos")
        campos = named_values(params.get(CAMPOS), CAMPOS)
        if params.has("remitente"):
            await self._sender(caller, params.get("remitente"))
        try:
            [(numid, created)] = await self.stores.dmds.upsert_contacts(
                caller.account_id, [ContactChange(email, fields, campos, tuple(groups))],
                caller.max_contacts)
        except UnknownGroups as unknown:
            raise bad(f"grupo {unknown.args[0][0]} does not exist (create it with grupo/)"
                      ) from None
        except ContactLimitReached:
            raise bad("contact limit reached") from None
        return _ok(numid=numid, email=email, operacion=_operation(created))

    @staticmethod
    def _name_field(params: Params, name: str) -> Any:
        if name == "edad":
            return params.number("edad", minimum=0, maximum=200)
        return params.text(name, default="", max_length=200)

    @_route(app, "/v1/contacto/<email>", "GET")
    @dmds_endpoint
    async def get_contact(self, request, email: str) -> tuple[int, Any]:
        """The contact as the seed shows it, with its events, groups and campaigns."""
        caller = await self._caller(request)
        address = checked_email(email)
        contact = await self.stores.dmds.contact(caller.account_id, address,
                                                 projection.PROJECTED_TYPES,
                                                 MAX_CONTACT_EVENTS)
        if contact is None:
            raise _not_found(f"contacto {address} not found")
        tz = await self._zone(caller)
        fields = contact.fields
        campos = fields.get(CAMPOS) if isinstance(fields.get(CAMPOS), dict) else {}
        shown = {name: fields.get(name, None if name == "edad" else "")
                 for name in NAME_FIELDS}
        return _ok(contacto={
            "numid": contact.id, "email": contact.email,
            **{name: shown[name] for name in NAME_FIELDS[:6]},
            "operacion": _operation(contact.created_at == contact.updated_at),
            "actualizado": projection.local_time(contact.updated_at, tz),
            "origenes": ",".join(contact.origins),
            **{name: shown[name] for name in NAME_FIELDS[6:]},
            "dispositivo": projection.device(contact.device),
            "subtipo_dispositivo_id": None, "grupo_de_dominio_id": 0,
            "invalido": contact.invalid, "whitelist": contact.whitelisted,
            "campos": _campos(campos),
            "eventos": [projection.contact_event(event, tz) for event in contact.events],
            "grupos": contact.groups, "campanias": contact.campaigns,
            "campanias_desusc": contact.unsubscribed_campaigns})

    @_route(app, "/v1/invalidar/<email>", "GET")
    @dmds_endpoint
    async def invalidate(self, request, email: str) -> tuple[int, Any]:
        return await self._validity(request, email, True)

    @_route(app, "/v1/revalidar/<email>", "GET")
    @dmds_endpoint
    async def revalidate(self, request, email: str) -> tuple[int, Any]:
        return await self._validity(request, email, False)

    async def _validity(self, request, email: str, invalid: bool) -> tuple[int, Any]:
        """An invalidation or revalidation event, unless the contact is whitelisted."""
        caller = await self._caller(request)
        address = checked_email(email)
        done = await self.stores.dmds.set_validity(caller.account_id, address, invalid,
                                                   "api")
        if done == Validity.MISSING:
            raise _not_found(f"contacto {address} not found")
        if done == Validity.WHITELISTED:
            return _ok(msg="whitelisted")
        return _ok(msg=f"{address} {'invalidado' if invalid else 'revalidado'}")

    @_route(app, "/v1/invalidos/", "GET")
    @dmds_endpoint
    async def invalid_contacts(self, request) -> tuple[int, Any]:
        caller, params = await self._read(request)
        page = params.page()
        found = await self.stores.dmds.invalid_contacts(caller.account_id, page.offset,
                                                        page.size)
        tz = await self._zone(caller)
        return _ok(pagina=page.number, cantidad=page.size, invalidos=[
            {"numid": numid, "email": email, "actualizado": projection.local_time(at, tz)}
            for numid, email, at in found])

    # -- whitelist --------------------------------------------------------------------

    @_route(app, "/v1/whitelist/<email>", "GET")
    @dmds_endpoint
    async def whitelisted(self, request, email: str) -> tuple[int, Any]:
        caller = await self._caller(request)
        address = checked_email(email)
        return _whitelist_answer(address, await self.stores.dmds.whitelisted(
            caller.account_id, address))

    @_route(app, "/v1/whitelist/<email>", "POST", "PUT")
    @dmds_endpoint
    async def whitelist(self, request, email: str) -> tuple[int, Any]:
        return await self._set_whitelisted(request, email, True)

    @_route(app, "/v1/whitelist/<email>", "DELETE")
    @dmds_endpoint
    async def unwhitelist(self, request, email: str) -> tuple[int, Any]:
        return await self._set_whitelisted(request, email, False)

    async def _set_whitelisted(self, request, email: str, listed: bool) -> tuple[int, Any]:
        caller = await self._caller(request)
        address = checked_email(email)
        try:
            await self.stores.dmds.set_whitelisted(caller.account_id, address, listed,
                                                   caller.max_contacts)
        except ContactLimitReached:
            raise bad("contact limit reached") from None
        return _whitelist_answer(address, listed)

    # -- groups, filters, global variables --------------------------------------------

    @_route(app, "/v1/grupo/", "GET")
    @dmds_endpoint
    async def groups(self, request) -> tuple[int, Any]:
        caller, params = await self._read(request)
        page = params.page()
        found = await self.stores.dmds.groups(caller.account_id, page.offset, page.size)
        tz = await self._zone(caller)
        return _ok(pagina=page.number, cantidad=page.size, grupos=[
            {"id": group.id, "nombre": group.name, "origen": group.origin,
             "creado": projection.local_time(group.created_at, tz)} for group in found])

    @_route(app, "/v1/grupo/", "POST", "PUT")
    @dmds_endpoint
    async def create_group(self, request) -> tuple[int, Any]:
        caller, params = await self._read(request)
        name = _object_name(params)
        group_id, created = await self.stores.dmds.create_group(caller.account_id, name)
        return _ok(id=group_id, nombre=name, msg="creado" if created else "ya existe")

    @_route(app, "/v1/grupo/", "DELETE")
    @dmds_endpoint
    async def delete_group(self, request) -> tuple[int, Any]:
        """Its contacts stay."""
        return await self._delete(request, "grupo", _object_name,
                                  self.stores.dmds.delete_group)

    async def _delete(self, request, kind: str, name_of: Callable[[Params], str],
                      delete: Callable[[int, str], Awaitable[bool]]) -> tuple[int, Any]:
        """Delete the account's object of `kind` that the params name (404 if none)."""
        caller, params = await self._read(request)
        name = name_of(params)
        if not await delete(caller.account_id, name):
            raise _not_found(f"{kind} {name} not found")
        return _ok(msg=f"{kind} {name} deleted")

    @_route(app, "/v1/filtros/", "GET")
    @dmds_endpoint
    async def filters(self, request) -> tuple[int, Any]:
        caller = await self._caller(request)
        found = await self.stores.dmds.filters(caller.account_id)
        return _ok(filtros=[
            {"id": f.id, "nombre": f.name, "grupos": f.groups,
             "campos": _campos(f.campos)}
            for f in found])

    @_route(app, "/v1/filtros/", "POST", "PUT")
    @dmds_endpoint
    async def put_filter(self, request) -> tuple[int, Any]:
        caller, params = await self._read(request)
        name = _object_name(params)
        try:
            filter_id = await self.stores.dmds.put_filter(
                caller.account_id, name, names(params.get("grupos"), "grupos"),
                named_values(params.get(CAMPOS), CAMPOS))
        except UnknownGroups as unknown:
            raise bad(f"grupo {unknown.args[0][0]} does not exist") from None
        return _ok(id=filter_id, nombre=name)

    @_route(app, "/v1/filtros/", "DELETE")
    @dmds_endpoint
    async def delete_filter(self, request) -> tuple[int, Any]:
        return await self._delete(request, "filtro", _object_name,
                                  self.stores.dmds.delete_filter)

    @_route(app, "/v1/variables/", "GET")
    @dmds_endpoint
    async def variables(self, request) -> tuple[int, Any]:
        caller = await self._caller(request)
        found = await self.stores.dmds.variables(caller.account_id)
        return _ok(variables=[{"variable": name, "valor": value} for name, value in found])

    @_route(app, "/v1/variables/", "POST", "PUT")
    @dmds_endpoint
    async def put_variable(self, request) -> tuple[int, Any]:
        caller, params = await self._read(request)
        name = _variable_name(params)
        value = params.get("valor")
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        value = "" if value is None else value
        if not isinstance(value, str) or "\x00" in value or len(value) > MAX_TEXT:
            raise bad(f"valor must be a text of at most {MAX_TEXT} characters")
        await self.stores.dmds.put_variable(caller.account_id, name, value)
        return _ok(variable=name, valor=value)

    @_route(app, "/v1/variables/", "DELETE")
    @dmds_endpoint
    async def delete_variable(self, request) -> tuple[int, Any]:
        return await self._delete(request, "variable", _variable_name,
                                  self.stores.dmds.delete_variable)

    # -- campaigns --------------------------------------------------------------------

    @_route(app, "/v1/campania/", "GET")
    @dmds_endpoint
    async def campaigns(self, request) -> tuple[int, Any]:
        """The account's campaigns (their keys are not listed: campania_apikey/)."""
        caller, params = await self._read(request)
        kind = params.text("tipo")
        if kind is not None and kind not in ("api", "normal", "bulk"):
            raise bad("tipo must be api, normal or bulk")
        found = await self.stores.campaigns.campaigns(
            caller.account_id, kind, params.number("numid", minimum=1))
        tz = await self._zone(caller)
        return _ok(campanias=[_campaign_json(c, tz) for c in found])

    @_route(app, "/v1/campania/", "POST")
    @dmds_endpoint
    async def create_campaign(self, request) -> tuple[int, Any]:
        """An api campaign (sender, subject and content URL required, replyto optional)
        with its key, or a normal one (completed elsewhere)."""
        caller, params = await self._read(request)
        name = _object_name(params)
        kind = params.text("tipo", required=True)
        if kind not in ("api", "normal"):
            raise bad("tipo must be api or normal")
        required = kind == "api"
        sender = params.get("remitente")
        if required or sender is not None:
            sender = await self._sender(caller, sender)
        subject = params.text("asunto", required=required)
        subject_uri = params.text("asunto_uri", required=bool(subject and SUBJECT_TAG in subject))
        reply_to = params.get("replyto")
        if reply_to is not None:
            reply_to = await self._reply_to(caller, reply_to, "replyto")
        campaign, key = await admin.create_campaign(
            self.stores, self.sealer, caller.account_id, NewCampaign(
                kind, name, sender,
                params.text("remitente_nombre", required=required, max_length=200),
                reply_to, subject, _url(subject_uri, "asunto_uri"),
                _url(params.text("html_uri", required=required), "html_uri")))
        answer = {"id": campaign.uuid, "numid": campaign.numid}
        if key is not None:
            answer["camp_apikey"] = key
        return _ok(**answer)

    @_route(app, "/v1/campania_apikey/<int(max=9223372036854775807):numid>", "GET")
    @dmds_endpoint
    async def campaign_key(self, request, numid: int) -> tuple[int, Any]:
        """The key of an api campaign, shown again (kept sealed, not hashed)."""
        caller = await self._caller(request)
        campaign = await self._campaign(caller, numid)
        sealed = await self.stores.campaigns.sealed_key(caller.account_id, numid)
        if sealed is None:
            raise _not_found(f"campania {numid} has no apikey that can be shown "
                             "(set one with POST)")
        return _ok(numid=campaign.numid, apikey=self.sealer.open(sealed))

    @_route(app, "/v1/campania_apikey/<int(max=9223372036854775807):numid>", "POST", "PUT")
    @dmds_endpoint
    async def set_campaign_key(self, request, numid: int) -> tuple[int, Any]:
        """Set the campaign's key (`apikey`); its previous key stops working."""
        caller, params = await self._read(request)
        key = params.text("apikey", required=True, max_length=MAX_KEY_LENGTH)
        if len(key) < MIN_KEY_LENGTH or not key.isascii() or not key.isprintable() \
                or " " in key:
            raise bad(f"apikey must be {MIN_KEY_LENGTH} to {MAX_KEY_LENGTH} printable ASCII "
                      "characters without blanks")
        await self._campaign(caller, numid)
        try:
            await self.stores.campaigns.set_key(caller.account_id, numid,
                                                admin.campaign_key(self.sealer, key))
        except AlreadyExists:
            raise APIError(409, CONFLICT, "that apikey is already in use") from None
        self.authenticator.forget_keys()  # the previous key stops at once on this node
        return _ok(numid=numid, apikey=key)

    async def _campaign(self, caller: SubmissionAccount, numid: int) -> Campaign:
        """An api campaign of the caller's account (404 or 400 otherwise)."""
        campaign = await self.stores.campaigns.get(caller.account_id, numid)
        if campaign is None:
            raise _not_found(f"campania {numid} not found")
        if campaign.type != "api":
            raise bad(f"campania {numid} is not of type api")
        return campaign

    # -- sends ------------------------------------------------------------------------

    @_route(app, "/v1/send_one_inline/", "POST")
    @dmds_endpoint
    async def send_one_inline(self, request) -> tuple[int, Any]:
        return await self._send(request, many=False, by_uri=False)

    @_route(app, "/v1/send_one_uri/", "POST")
    @dmds_endpoint
    async def send_one_uri(self, request) -> tuple[int, Any]:
        return await self._send(request, many=False, by_uri=True)

    @_route(app, "/v1/send_many_inline/", "POST")
    @dmds_endpoint
    async def send_many_inline(self, request) -> tuple[int, Any]:
        return await self._send(request, many=True, by_uri=False)

    @_route(app, "/v1/send_many_uri/", "POST")
    @dmds_endpoint
    async def send_many_uri(self, request) -> tuple[int, Any]:
        return await self._send(request, many=True, by_uri=True)

    async def _send(self, request, many: bool, by_uri: bool) -> tuple[int, Any]:
        """Answered `{"status": "ok", "sent": <copies queued>, "eeid": <uuid>}` once every
        batch is committed."""
        caller, params, campaign = await self._send_caller(request)
        send = await self._send_request(caller, params, campaign, many, by_uri)
        if not send.recipients:
            raise bad("contactos holds no valid address")
        batch = await self._reused_batch(caller, send.reuse_eeid)
        html = send.html
        if html is None:
            html = await self._fetch_text(send.html_uri, "html_uri")
        if len(html.encode("utf-8")) > self.max_message_size:
            raise bad(f"the html is larger than {self.max_message_size} bytes")
        subject = send.subject
        if SUBJECT_TAG in subject:
            if send.subject_uri is None:
                raise bad(f"asunto_uri is required when asunto holds {SUBJECT_TAG}")
            fetched = first_line((await self._fetch(send.subject_uri, "asunto_uri")).data)
            subject = subject.replace(SUBJECT_TAG, fetched)
        if send.contact_names:
            try:
                await self.stores.dmds.upsert_contacts(caller.account_id, send.contact_names,
                                                       caller.max_contacts)
            except ContactLimitReached:
                raise bad("contact limit reached") from None
        content = ParsedMessage(
            subject=subject, from_address=send.sender, from_name=send.sender_name,
            reply_to=[send.reply_to] if send.reply_to else [], text=None, html=html,
            attachments=(), options=MessageOptions(), custom_headers={},
            headers=(("Cc", send.cc_header),) if send.cc_header else ())
        return await self._submit(caller, request, send, content, campaign, batch)

    async def _send_caller(self, request
                           ) -> tuple[SubmissionAccount, Params, Campaign | None]:
        """The caller, its params and the campaign the send is made under: `numid`, or the
        campaign of a campaign key (which may send for no other)."""
        try:
            params = Params.of(request)
            numid = params.number("numid", minimum=1)
        except APIError:
            await self._caller(request, SEND, own_campaign=True)  # a wrong key first
            raise
        caller = await self._caller(request, SEND, numid, own_campaign=numid is None)
        if numid is None and caller.key is not None and caller.key.kind == "campaign":
            numid = caller.key.campaign_numid
        return caller, params, (await self._campaign(caller, numid) if numid else None)

    async def _send_request(self, caller: SubmissionAccount, params: Params,
                            campaign: Campaign | None, many: bool, by_uri: bool
                            ) -> SendRequest:
        """The call's fields checked, in the seed's order: the addresses first, then the
        sender; a campaign's defaults for what the call leaves out."""
        recipients, names_given, skipped = self._recipients(params, many)
        copies, cc_header, copy_names = self._copies(params, {r.email for r in recipients})
        subject = params.text("asunto", default=campaign.subject if campaign else None)
        if subject is None:
            raise bad("asunto is required")
        html = html_uri = None
        if by_uri:
            html_uri = _url(params.text("html_uri", default=campaign.content_uri
                                        if campaign else None), "html_uri")
            if html_uri is None:
                raise bad("html_uri is required")
        else:
            html = params.text("html", required=True, max_length=self.max_message_size,
                               header=False)
        sender = params.get("remitente")
        sender = await self._sender(caller, campaign.sender if sender is None and campaign
                                    else sender)
        reply_to = params.get("reply-to") if params.has("reply-to") else params.get("replyto")
        if reply_to is None and campaign is not None:
            reply_to = campaign.reply_to
        if reply_to is not None:
            reply_to = await self._reply_to(caller, reply_to, "reply-to")
        reuse = None
        if params.flag("reuse_eeid"):
            reuse = params.text("eeid", required=True)
        return SendRequest(
            sender=sender,
            sender_name=params.text("remitente_nombre", max_length=200,
                                    default=campaign.sender_name if campaign else None),
            reply_to=reply_to, subject=subject,
            subject_uri=_url(params.text("asunto_uri", default=campaign.subject_uri
                                         if campaign else None), "asunto_uri"),
            html=html, html_uri=html_uri, recipients=(*recipients, *copies),
            contact_names=(*names_given, *copy_names), cc_header=cc_header,
            archive=params.flag("archive"), reuse_eeid=reuse, skipped=tuple(skipped))

    def _recipients(self, params: Params, many: bool
                    ) -> tuple[list[Recipient], list[ContactChange], list[str]]:
        """The contacts sent to, their names, and (send_many) the addresses skipped as
        invalid, which the seed warns make `sent` lower."""
        if many:
            items = params.items("contactos", required=True)
            if len(items) > self.max_contacts:
                raise APIError(413, TOO_MANY_CONTACTS, f"contactos holds more than "
                               f"{self.max_contacts} contacts")
        else:
            item = params.get("contacto")
            if not isinstance(item, dict):
                raise bad("contacto must be an object with an email")
            items = [item]
        recipients, changes, skipped, seen = [], [], [], set()
        for number, item in enumerate(items):
            field = f"contactos[{number}]" if many else "contacto"
            if not isinstance(item, dict):
                raise bad(f"{field} must be an object with an email")
            try:
                email = checked_email(item.get("email"), f"{field}.email")
            except APIError:
                if not many or not isinstance(item.get("email"), str):
                    raise
                skipped.append(item["email"][:254])
                continue
            given = _names(item, field, "nombre", "apellido")
            if given:
                changes.append(ContactChange(email, given))
            if email not in seen:
                seen.add(email)
                recipients.append(Recipient.parse(item["email"].strip(), "to"))
        return recipients, changes, skipped

    def _copies(self, params: Params, taken: set[str]
                ) -> tuple[list[Recipient], str | None, list[ContactChange]]:
        """`copia` (cc_email, cc_nombre, cc_apellido: in the Cc header) and `copia_oculta`
        (bcc_email); an address already sent to is sent once."""
        recipients, shown, changes = [], [], []
        for kind, field, key in (("cc", "copia", "cc_email"), ("bcc", "copia_oculta",
                                                                  "bcc_email")):
            for number, item in enumerate(params.items(field) or []):
                where = f"{field}[{number}]"
                if not isinstance(item, dict):
                    raise bad(f"{where} must be an object with {key}")
                email = checked_email(item.get(key), f"{where}.{key}")
                if kind == "cc":
                    given = _names(item, where, "cc_nombre", "cc_apellido")
                    if given:
                        changes.append(ContactChange(email, {
                            "nombre": given.get("cc_nombre", ""),
                            "apellido": given.get("cc_apellido", "")}))
                    name = " ".join(part for part in (given.get("cc_nombre"),
                                                      given.get("cc_apellido")) if part)
                    shown.append(formataddr((name, email)) if name else email)
                if email not in taken:
                    taken.add(email)
                    recipients.append(Recipient.parse(item[key].strip(), kind))
        return recipients, ", ".join(shown) or None, changes

    async def _reused_batch(self, caller: SubmissionAccount, eeid: str | None
                            ) -> Batch | None:
        if eeid is None:
            return None
        return await self._batch(caller, eeid)

    async def _submit(self, caller: SubmissionAccount, request, send: SendRequest,
                      content: ParsedMessage, campaign: Campaign | None,
                      batch: Batch | None) -> tuple[int, Any]:
        """The recipients in messages of at most `batch_size` (copies with the first), one
        eeid for all, the call's contacts in one group; each committed on its own."""
        send_id, eeid = (batch.send_id, batch.eeid) if batch else (None, None)
        group = submission_group_name("dmds")
        sent = 0
        recipients = send.recipients
        for start in range(0, len(recipients), self.batch_size):
            submission = Submission(
                account=caller, origin="dmds", sender=send.sender,
                recipients=recipients[start:start + self.batch_size], content=content,
                client_ip=request.getClientAddress().host,
                campaign_id=campaign.id if campaign else None, send_id=send_id, eeid=eeid,
                group_name=group, archive=send.archive)
            try:
                stored = await self.service.submit(submission)
            except SubmissionRefused as refusal:
                error = _refusal_error(refusal, send)
                if start:  # earlier batches are committed: say what was sent
                    error.extra.update(sent=sent, eeid=eeid)
                raise error from None
            sent += stored.queued
            send_id, eeid = stored.send_id, stored.eeid
        answer: dict[str, Any] = {"sent": sent, "eeid": eeid}
        if send.skipped:
            answer["invalidos"] = list(send.skipped)
        return _ok(**answer)

    async def _sender(self, caller: SubmissionAccount, value: Any) -> str:
        """The sender checked as the seed's examples show: an address, then a domain that
        exists (no lookup for the account's own senders), then one the account may send
        from."""
        if value is None:
            raise bad("remitente is required")
        sender = checked_email(value, "remitente", prefix="remitente invalido")
        try:
            return await self.service.check_sender(caller, sender)
        except DisallowedSender:
            pass
        domain = sender.rpartition("@")[2]
        if await self.sender_domains.missing(domain):
            raise sender_domain_missing_error(domain)
        raise APIError(400, SENDER_NOT_ALLOWED, "dominio remitente no permitido")

    async def _reply_to(self, caller: SubmissionAccount, value: Any, field: str) -> str:
        """A Reply-To the account may use, as the submission path requires (S-6)."""
        address = checked_email(value, field, prefix=f"{field} invalido")
        try:
            return await self.service.check_sender(caller, address)
        except DisallowedSender:
            raise APIError(400, SENDER_NOT_ALLOWED, f"dominio {field} no permitido") from None

    async def _fetch(self, url: str, field: str):
        try:
            return await self.fetcher.fetch(url)
        except FetchRefused as refusal:
            raise bad(f"{field}: {refusal}") from None

    async def _fetch_text(self, url: str, field: str) -> str:
        """Content by URI, read as UTF-8 (what is not UTF-8 is shown replaced, as the seed
        warns)."""
        data = (await self._fetch(url, field)).data
        text = data.decode("utf-8", "replace").replace("\x00", "")
        if not text.strip():
            raise bad(f"{field}: the content is empty")
        return text

    # -- batches (eeid) and events ----------------------------------------------------

    async def _batch(self, caller: SubmissionAccount, eeid: str) -> Batch:
        """The caller's batch `eeid`: 404 for an unknown one and for another account's."""
        try:
            uuid.UUID(eeid)
        except ValueError:
            raise bad("eeid must be a UUID") from None
        batch = await self.stores.dmds_events.batch(caller.account_id, eeid)
        if batch is None:
            raise _not_found(f"eeid {eeid} not found")
        return batch

    @_route(app, "/v1/eeid/<eeid>", "GET")
    @dmds_endpoint
    async def batch_events(self, request, eeid: str) -> tuple[int, Any]:
        """The batch's events, a page at a time, and its archive section when archived."""
        caller, params = await self._read(request)
        batch = await self._batch(caller, eeid)
        page = params.page()
        events = await self.stores.dmds_events.batch_events(
            batch.send_id, projection.PROJECTED_TYPES, page.offset, page.size)
        tz = await self._zone(caller)
        answer: dict[str, Any] = {
            "eeid": batch.eeid, "campania": batch.campaign or "", "pagina": page.number,
            "cantidad": page.size,
            "eventos": [projection.batch_event(event, tz) for event in events]}
        if batch.archive:
            answer["archive"] = await self._archive(batch, tz)
        return _ok(**answer)

    async def _archive(self, batch: Batch, tz) -> dict[str, Any]:
        """The trace of an archived batch: what was sent, to whom, with what result."""
        trace = await self.stores.dmds_events.trace(batch.send_id)
        return {"remitente": batch.sender, "asunto": batch.subject,
                "creado": projection.local_time(batch.created_at, tz),
                "destinatarios": [{
                    "email": d.recipient, "tipo": d.kind, "estado": d.state,
                    "respuesta": d.last_reply, "intentos": d.attempts,
                    "ultimo_intento": projection.local_time(d.last_attempt_at, tz),
                    "eml": d.eml_kept} for d in trace]}

    @_route(app, "/v1/eeid_info/<eeid>", "GET")
    @dmds_endpoint
    async def batch_info(self, request, eeid: str) -> tuple[int, Any]:
        caller = await self._caller(request)
        batch = await self._batch(caller, eeid)
        counts = await self.stores.dmds_events.batch_counts(batch.send_id)
        tz = await self._zone(caller)
        states = counts.states
        return _ok(eeid=batch.eeid, creado=projection.local_time(batch.created_at, tz),
                   campania=batch.campaign or "", numid=batch.campaign_numid,
                   remitente=batch.sender, asunto=batch.subject, archive=batch.archive,
                   mensajes=counts.messages, destinatarios=sum(states.values()),
                   enviados=states.get("sent", 0),
                   pendientes=states.get("queued", 0) + states.get("deferred", 0),
                   rebotados=states.get("bounced", 0), no_enviados=states.get("not_sent", 0))

    @_route(app, "/v1/eeid_eml/<eeid>/<email>", "GET")
    @dmds_endpoint
    async def sent_copy(self, request, eeid: str, email: str) -> tuple[int, Any]:
        """The message exactly as sent to `email` in an archived batch (message/rfc822)."""
        caller = await self._caller(request)
        batch = await self._batch(caller, eeid)
        address = checked_email(email)
        if not batch.archive:
            raise _not_found(f"eeid {batch.eeid} is not archived (send with archive: true)")
        state, copy = await self.stores.dmds_events.sent_copy(batch.send_id, address)
        if state is None:
            raise _not_found(f"{address} is not a recipient of eeid {batch.eeid}")
        if copy is None:
            raise _not_found(f"no copy was sent to {address} (its delivery is {state})")
        return 200, Raw(copy, b"message/rfc822")


    @_route(app, "/v1/cantidad_eventos/", "GET", "POST")
    @dmds_endpoint
    async def count_events(self, request) -> tuple[int, Any]:
        """How many events the account had from `desde` to `hasta` (v1.5)."""
        caller, params = await self._read(request)
        start, end, tz = await self._range(caller, params)
        count = await self.stores.dmds_events.count_between(
            caller.account_id, projection.PROJECTED_TYPES, start, end)
        return _ok(desde=projection.local_time(start, tz),
                   hasta=projection.local_time(end, tz), cantidad=count)

    @_route(app, "/v1/ver_eventos/", "GET", "POST")
    @dmds_endpoint
    async def list_events(self, request) -> tuple[int, Any]:
        """The account's events from `desde` to `hasta`, page `pagina` of `cantidad` (v1.5),
        oldest first."""
        caller, params = await self._read(request)
        start, end, tz = await self._range(caller, params)
        page = params.page()
        events = await self.stores.dmds_events.events_between(
            caller.account_id, projection.PROJECTED_TYPES, start, end, page.offset,
            page.size)
        return _ok(pagina=page.number, cantidad=page.size,
                   eventos=[projection.batch_event(event, tz) for event in events])

    async def _range(self, caller: SubmissionAccount, params: Params):
        """`desde` and `hasta` in the account's time zone, as times, and the zone."""
        tz = await self._zone(caller)
        start = params.moment("desde").replace(tzinfo=tz)
        end = params.moment("hasta").replace(tzinfo=tz)
        if end < start:
            raise bad("hasta must not be before desde")
        return start, end, tz


def _campos(campos: dict[str, Any]) -> list[dict[str, Any]]:
    """Campos as the seed shows them, by name."""
    return [{"nombre": name, "valor": campos[name]} for name in sorted(campos)]


def _operation(created: bool) -> str:
    return "Alta" if created else "Modificacion"


def _whitelist_answer(address: str, listed: bool) -> tuple[int, Any]:
    """The seed's messages: `<email> whitelisted`, `<email> not whitelisted`."""
    return _ok(msg=f"{address} {'whitelisted' if listed else 'not whitelisted'}")


def _object_name(params: Params) -> str:
    """The `nombre` of a group or a filter."""
    return params.text("nombre", required=True, max_length=200)


def _variable_name(params: Params) -> str:
    name = params.text("variable", required=True, max_length=70)
    if not TAG_NAME.fullmatch(name):
        raise bad("variable must be a name of letters, digits, '_' and '-' (at most 70)")
    return name


def _url(value: str | None, field: str) -> str | None:
    """A URL the fetcher takes: http(s), or a data: URI holding the content itself."""
    if value is not None and not value.strip().lower().startswith(
            ("http://", "https://", "data:")):
        raise bad(f"{field} must be an http or https URL")
    return value.strip() if value is not None else None


def _names(item: dict, field: str, *keys: str) -> dict[str, str]:
    """The name fields an item gives (texts), by their keys."""
    found = {}
    for key in keys:
        value = item.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > 200:
            raise bad(f"{field}.{key} must be a text of at most 200 characters")
        if value.strip():
            found[key] = value.strip()
    return found


def _campaign_json(campaign: Campaign, tz) -> dict[str, Any]:
    return {"id": campaign.uuid, "numid": campaign.numid, "nombre": campaign.name,
            "tipo": campaign.type, "remitente": campaign.sender,
            "remitente_nombre": campaign.sender_name, "replyto": campaign.reply_to,
            "asunto": campaign.subject, "asunto_uri": campaign.subject_uri,
            "html_uri": campaign.content_uri,
            "creada": projection.local_time(campaign.created_at, tz)}


def _refusal_error(refusal: SubmissionRefused, send: SendRequest) -> APIError:
    """A refusal of the submission path in DMDS words."""
    if isinstance(refusal, DisallowedSender):
        field = "reply-to" if refusal.address == send.reply_to else "remitente"
        return APIError(400, SENDER_NOT_ALLOWED, f"dominio {field} no permitido")
    if isinstance(refusal, SendQuotaExhausted):
        return bad("no sends left this month")
    if isinstance(refusal, ContactQuotaExhausted):
        return bad("contact limit reached")
    if isinstance(refusal, ContentNotAccepted):
        return bad(f"content not accepted: {refusal}")
    return bad(str(refusal))

