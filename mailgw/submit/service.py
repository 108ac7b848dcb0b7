"""Validate, prepare and store a submission in one transaction (S-6 to S-15).

Doors (SMTP DATA, the HTTP dialects) translate their input into a
`Submission` and call `SubmissionService.submit`; the refusals it raises
(errors.py) are mapped by each door to its own reply codes or error names.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mailgw.accounts.avatar import SubmissionAccount
from mailgw.content.body import StoredBody
from mailgw.content.merge import escape_for_html, merge
from mailgw.content.message import (
    ContentPolicy,
    ContentRefused,
    ParsedMessage,
    append_attachment_links,
    apply_policy,
    parse_message,
    replace_cid_references,
    split_template_tag,
    template_variables,
)
from mailgw.errors import DatabaseUnavailable
from mailgw.randomness import random_hex
from mailgw.store import Stores
from mailgw.store.contacts import ImportedRecipient, RecipientImport
from mailgw.store.submissions import (
    QueuedRecipient,
    StoredAttachment,
    StoredSubmission,
    SubmissionRecord,
)
from mailgw.submit.addresses import normalize_address
from mailgw.submit.errors import (
    BadTemplateVariables,
    DisallowedSender,
    UnknownTemplate,
    lower_refusals_translated,
)
from mailgw.submit.recipients import Recipient, RecipientImports, submission_group_name


@dataclass(frozen=True)
class Submission:
    account: SubmissionAccount
    origin: str
    sender: str
    # The recipients, or, from SMTP, `imports` of them as contacts (S-7).
    recipients: tuple[Recipient, ...]
    content: ParsedMessage
    imports: RecipientImports | None = None
    raw: bytes | None = None
    client_ip: str | None = None
    template_id: str | None = None
    variables: Mapping[str, str] = field(default_factory=dict)
    # Give each recipient a msgid of its own, which the door answers (H-1).
    msgids: bool = False
    # DMDS (H-2): the campaign the send is made under; an existing send of the account to
    # join (its id and eeid: reuse_eeid, or the next batch of a long send_many); the
    # group the recipients join (several submissions of one call share it; None: one
    # made for this submission); archiving asked by the door (None: the account's).
    campaign_id: int | None = None
    send_id: int | None = None
    eeid: str | None = None
    group_name: str | None = None
    archive: bool | None = None

    @classmethod
    def from_mime(cls, account: SubmissionAccount, origin: str, sender: str, raw: bytes,
                  imports: RecipientImports, client_ip: str) -> Submission:
        """A submission whose content is a whole MIME message (SMTP DATA), its
        recipients imported; a subject that names a template (S-10) carries its
        variables in the body.  Raises ContentNotAccepted or BadTemplateVariables."""
        with lower_refusals_translated():
            content = parse_message(raw)
        template_id, subject = split_template_tag(content.subject)
        variables = {}
        if template_id is not None:
            try:
                variables = template_variables(content.text, content.html)
            except ContentRefused as refusal:
                raise BadTemplateVariables(str(refusal)) from refusal
            content = dataclasses.replace(content, subject=subject)
        return cls(account=account, origin=origin, sender=sender, recipients=(),
                   content=content, imports=imports, raw=raw, client_ip=client_ip,
                   template_id=template_id, variables=variables)


# How long a verified sender is trusted without asking the database again: one
# query per MAIL FROM would cost a round trip per message; withdrawing a
# verification takes effect within this time.
SENDER_CACHE_SECONDS = 30
SENDER_CACHE_SIZE = 10_000
# A text part generated from more HTML than this is written in a thread: html2text takes
# about 2 us a byte (0.9 s for a 450 KB newsletter), time every other session and delivery
# would otherwise wait on the reactor.
THREADED_HTML_CHARS = 64 * 1024


class SubmissionService:
    log = Logger()

    def __init__(self, stores: Stores, public_base_url: str, clock,
                 run_in_thread: Callable[..., defer.Deferred[Any]]) -> None:
        self.stores = stores
        self.public_base_url = public_base_url.rstrip("/")
        self.clock = clock
        self.run_in_thread = run_in_thread
        self._verified_senders: dict[tuple[int, str], float] = {}

    async def check_sender(self, account: SubmissionAccount, address: str) -> str:
        """The normalized sender, or DisallowedSender (S-6)."""
        try:
            normalized = normalize_address(address)
        except Exception:
            raise DisallowedSender(address) from None
        key = (account.account_id, normalized)
        if self._verified_senders.get(key, 0.0) > self.clock.seconds():
            return normalized
        if not await self.stores.senders.sender_allowed(account.account_id, normalized):
            raise DisallowedSender(address)
        if len(self._verified_senders) >= SENDER_CACHE_SIZE:
            self._verified_senders.clear()
        self._verified_senders[key] = self.clock.seconds() + SENDER_CACHE_SECONDS
        return normalized

    def recipient_imports(self, account: SubmissionAccount, group_name: str, origin: str,
                          sender: str) -> RecipientImports:
        """S-7: the recipients of one transaction, each upserted (normalized) as a contact
        in the submission's group `group_name`, with its suppression for the sender's
        domain."""
        def commit(request: RecipientImport) -> defer.Deferred[ImportedRecipient]:
            return defer.ensureDeferred(self.stores.contacts.import_recipient(request))

        return RecipientImports(self._import_request(account, group_name, origin, sender),
                                commit, self.clock)

    def _import_request(self, account: SubmissionAccount, group_name: str, origin: str,
                        sender: str) -> Callable[[Recipient], RecipientImport]:
        sender_domain = sender.rpartition("@")[2]

        def request(recipient: Recipient) -> RecipientImport:
            if not self.stores.database.available:
                raise DatabaseUnavailable("import_recipient")
            return RecipientImport(account.account_id, group_name, origin, recipient.email,
                                   sender_domain, account.max_contacts, recipient.kind,
                                   recipient.address)

        return request

    async def submit(self, submission: Submission) -> StoredSubmission:
        account = submission.account
        content = submission.content
        for notice in content.notices:  # S-9: accepted with the default; the operator sees why
            self.log.warn("message of account {account} ({origin}): {notice}",
                          account=account.name, origin=submission.origin, notice=notice)
        if submission.template_id is not None:
            content = await self._expand_template(submission)
        policy = ContentPolicy.from_settings(account.settings)
        with lower_refusals_translated():
            if content.text is None and len(content.html or "") > THREADED_HTML_CHARS:
                content = await self.run_in_thread(apply_policy, content, policy)
            else:
                content = apply_policy(content, policy)
        for address in content.reply_to:
            await self.check_sender(account, address)
        from_address = await self._header_from(submission, content.from_address)
        attachments: tuple[StoredAttachment, ...] = ()
        if policy.attachments == "links":
            content, attachments = self._link_attachments(content)
        record = SubmissionRecord(
            account_id=account.account_id,
            origin=submission.origin,
            message_uid=random_hex(),
            sender=submission.sender,
            subject=content.subject,
            html=content.html,
            body=StoredBody.of(content).to_json(),
            recipients=tuple(QueuedRecipient(r.delivered_to, None, r.kind)
                             for r in submission.recipients),
            reply_to=content.reply_to[0] if content.reply_to else None,
            headers=dict(content.headers),
            custom_headers=content.custom_headers,
            options=dict(vars(content.options)),
            client_ip=submission.client_ip,
            raw=submission.raw,
            size=len(submission.raw or b""),
            archive=(account.settings.archive if submission.archive is None
                     else submission.archive),
            sends_per_month=account.sends_per_month,
            attachments=attachments,
            from_address=from_address,
            msgids=submission.msgids,
            campaign_id=submission.campaign_id,
            send_id=submission.send_id,
            eeid=submission.eeid,
        )
        with lower_refusals_translated():
            return await self._store(record, submission)

    async def _header_from(self, submission: Submission, written: str | None) -> str | None:
        """The header From's address as the client wrote it, to be kept (Aldeamo and
        Devino clients set it themselves), when it is a verified sender of the account
        and not the envelope sender; None: the From is the envelope sender (with the
        display name written), as for a From the account may not use."""
        if written is None or written == submission.sender:
            return None
        try:
            await self.check_sender(submission.account, written)
        except DisallowedSender:
            self.log.warn("message of account {account} ({origin}): header From {written} "
                          "is not a verified sender; the From is the envelope sender "
                          "{sender}", account=submission.account.name,
                          origin=submission.origin, written=written, sender=submission.sender)
            return None
        return written

    async def _store(self, record: SubmissionRecord, submission: Submission
                     ) -> StoredSubmission:
        """Commit the record with the imports of its recipients when they are still
        held (one transaction), else once they are committed. Recipients given without
        imports (the HTTP doors) are imported in the same transaction as the message,
        as contacts of a group made for it (S-7)."""
        imports = submission.imports
        if imports is None:
            request = self._import_request(
                submission.account,
                submission.group_name or submission_group_name(submission.origin),
                submission.origin, submission.sender)
            return await self.stores.submissions.store(
                record, [request(recipient) for recipient in submission.recipients])
        held = imports.take()
        if held is not None:
            return await self.stores.submissions.store(record, held)
        recipients, group_id = await imports.imported()
        return await self.stores.submissions.store(dataclasses.replace(
            record, recipients=tuple(recipients), group_id=group_id))

    async def _expand_template(self, submission: Submission) -> ParsedMessage:
        """S-10: the stored template with the submission's variables merged in."""
        template = await self.stores.templates.get(submission.account.account_id,
                                                   submission.template_id)
        if template is None:
            raise UnknownTemplate(submission.template_id)
        subject, html, text = template.subject, template.html, template.text
        variables = submission.variables
        return dataclasses.replace(
            submission.content,
            subject=merge(submission.content.subject or subject, variables, {}, {}),
            html=merge(html, escape_for_html(variables), {}, {}) if html else None,
            text=merge(text, variables, {}, {}) if text else None)

    def _link_attachments(self, content: ParsedMessage
                          ) -> tuple[ParsedMessage, tuple[StoredAttachment, ...]]:
        """S-8 `links` (Teenvio): images the HTML shows through cid: become hosted images,
        every other part a download link; nothing stays attached."""
        tokens = [secrets.token_urlsafe(18) for _ in content.attachments]
        urls = [f"{self.public_base_url}/a/{token}" for token in tokens]
        images = {attachment.content_id: url
                  for attachment, url in zip(content.attachments, urls, strict=True)
                  if attachment.inline and attachment.content_id}
        document, shown = (replace_cid_references(content.html, images) if content.html
                           else (content.html, set()))
        links = [(attachment.filename, url)
                 for attachment, url in zip(content.attachments, urls, strict=True)
                 if not (attachment.inline and attachment.content_id in shown)]
        stored = tuple(StoredAttachment(token, a.filename, a.content_type, a.data)
                       for a, token in zip(content.attachments, tokens, strict=True))
        return append_attachment_links(dataclasses.replace(content, html=document),
                                       links), stored

