"""The refusals of the submission path: one hierarchy, which every door maps to its
own answers (SMTP replies, the Aldeamo and DMDS error bodies).

str() of a refusal is its reason in words (SMTP shows it after
`554 5.6.0 Transaction failed: `).  The lower layers keep their own exceptions
(content's ContentRefused, the store's quota errors): the submission path
translates them here, so that a door sees only these, and DatabaseUnavailable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from mailgw.content.message import ContentRefused
from mailgw.store.contacts import ContactLimitReached
from mailgw.store.submissions import QuotaExceeded


class SubmissionRefused(Exception):
    """The submission cannot be accepted as it is; str() says why."""


class DisallowedSender(SubmissionRefused):
    """S-6: the sender or a Reply-To is not a verified address of the account."""

    def __init__(self, address: str) -> None:
        super().__init__(f"disallowed sender {address}")
        self.address = address


class ContentNotAccepted(SubmissionRefused):
    """S-8, S-9: the content is malformed, or the account's content policy refuses it;
    str() is the reason."""


class UnknownTemplate(SubmissionRefused):
    """S-10: the account has no template of this id."""

    def __init__(self, template_id: str) -> None:
        super().__init__(f"unknown template {template_id}")
        self.template_id = template_id


class BadTemplateVariables(SubmissionRefused):
    """S-10: the template's variables are not a flat JSON object of texts; str() says
    what is wrong."""


class SendQuotaExhausted(SubmissionRefused):
    """S-15: the account's plan has no sends left this month."""

    def __init__(self) -> None:
        super().__init__("no sends left")


class ContactQuotaExhausted(SubmissionRefused):
    """S-15: the account's plan allows no more contacts."""

    def __init__(self) -> None:
        super().__init__("contact limit reached")


@contextlib.contextmanager
def lower_refusals_translated() -> Iterator[None]:
    """The content's and the store's refusals, raised as the submission path's."""
    try:
        yield
    except ContentRefused as refusal:
        raise ContentNotAccepted(str(refusal)) from refusal
    except QuotaExceeded as refusal:
        raise SendQuotaExhausted() from refusal
    except ContactLimitReached as refusal:
        raise ContactQuotaExhausted() from refusal
