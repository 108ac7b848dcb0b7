"""A stored message's rendering contexts, built in one place (D-2, T-4).

The delivery engine renders each recipient's copy from them, and the web version shows
the HTML from the same ones: what the recipient received and what the web version shows
(switches, texts, language, links) cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mailgw.content.body import StoredBody
from mailgw.content.dkim import DKIMSigner
from mailgw.content.merge import tag_fields
from mailgw.content.render import RecipientContext, SenderContext
from mailgw.store.queue import MessageContext


def bounce_domain(message: MessageContext, default: str) -> str:
    """The domain of the message's return path and unsubscribe mailto: its sender domain's
    registered return-path domain, else `default` (delivery.bounce_domain). Never the
    sender's own domain: a single verified address at a mail provider would get its
    bounces and unsubscribes there, out of mailgw's reach."""
    return message.return_path_domain or default


def sender_context(message: MessageContext, body: StoredBody, hostname: str,
                   bounce_domain: str, dkim: DKIMSigner | None) -> SenderContext:
    """What the message's account and sender bring to every recipient's copy."""
    settings = message.account_settings
    return SenderContext(
        from_address=message.from_address or message.sender, from_name=body.from_name,
        hostname=hostname, bounce_domain=bounce_domain,
        unsubscribe_mailto=f"unsubscribe@{bounce_domain}", dkim=dkim,
        reply_to=message.reply_to, show_cab=settings.show_cab,
        social_links=settings.social_links, track_opens=settings.track_opens,
        track_clicks=settings.track_clicks, language=settings.language)


def recipient_context(delivery_id: int, email: str, fields: Mapping[str, Any],
                      global_variables: Mapping[str, str] | None = None) -> RecipientContext:
    """One recipient, with their contact's fields, then its campos, then the account's
    global variables (H-2) as the XYZ<NAME>XYZ tags' text."""
    return RecipientContext(delivery_id, email,
                            tag_fields(fields, global_variables or {}), {})
