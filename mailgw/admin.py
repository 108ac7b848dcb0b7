"""Account administration (H-3, O-4) shared by the `mailgw` command and the management
API: both call these functions (and the stores' own), so that an operation means the
same from either. What is made here and shown once (API keys, generated passwords,
webhook secrets) is returned to the caller and stored only as the stores keep it.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from mailgw import credentials
from mailgw.content.dkim import DNSRecord, domain_dns_records, generate_dkim_key
from mailgw.content.message import CATEGORY_MAX_LENGTH
from mailgw.store import Stores
from mailgw.store.accounts import APIKeyInfo
from mailgw.store.campaigns import Campaign, CampaignKey, NewCampaign
from mailgw.store.senders import Sender, SenderDomain
from mailgw.store.suppressions import Suppression
from mailgw.store.webhooks import WEBHOOK_EVENT_TYPES, WebhookEndpoint
from mailgw.submit.addresses import InvalidAddress, normalize_address

USERNAME_MAX_LENGTH = 128
# Each endpoint gets its own posts, queue and connections (W-2): an account with
# thousands would make every event thousands of posts.
MAX_WEBHOOKS_PER_ACCOUNT = 20


class AdminRefused(Exception):
    """The operation cannot be done as asked; str() says why."""


# Runs a CPU-heavy step (a password hash, a key generation) and fires with its result.
InThread = Callable[..., Awaitable[Any]]


async def _inline(fn: Callable[..., Any], *args: Any) -> Any:
    """The command line's way: nothing else is waiting."""
    return fn(*args)


async def create_api_key(stores: Stores, account_id: int, name: str, kind: str = "account",
                         campaign_numid: int | None = None,
                         operator: bool = False) -> tuple[APIKeyInfo, str]:
    """A new key and the key itself, to be shown once (it is stored as a digest)."""
    key = credentials.new_api_key()
    try:
        info = await stores.accounts.create_api_key(
            account_id, name, credentials.hash_api_key(key), credentials.api_key_prefix(key),
            kind, campaign_numid, operator)
    except ValueError as refusal:
        raise AdminRefused(str(refusal)) from None
    return info, key


def campaign_key(sealer: credentials.Sealer, key: str) -> CampaignKey:
    """A campaign key as the stores keep it: digested for lookups, sealed to be shown."""
    return CampaignKey(credentials.hash_api_key(key), credentials.api_key_prefix(key),
                       sealer.seal(key))


async def create_campaign(stores: Stores, sealer: credentials.Sealer, account_id: int,
                          campaign: NewCampaign) -> tuple[Campaign, str | None]:
    """A DMDS campaign, and its new key when it is of type api (H-2)."""
    key = credentials.new_api_key() if campaign.type == "api" else None
    created = await stores.campaigns.create(
        account_id, campaign, campaign_key(sealer, key) if key is not None else None)
    return created, key


async def create_user(stores: Stores, account_id: int, username: str,
                      password: str | None = None, run_in_thread: InThread = _inline) -> str:
    """A user of the account; the password, generated when none is given (its hash
    made by `run_in_thread`: a server passes a thread, scrypt takes ~50 ms)."""
    if (not username or len(username) > USERNAME_MAX_LENGTH or not username.isprintable()
            or " " in username):
        raise AdminRefused(f"not a username (printable, no spaces, at most "
                           f"{USERNAME_MAX_LENGTH} characters): {username[:80]!r}")
    password = password or credentials.new_password()
    await stores.accounts.create_user(account_id, username,
                                      await run_in_thread(credentials.hash_password, password))
    return password


async def add_domain(stores: Stores, account_id: int, domain: str, algorithm: str = "rsa",
                     selector: str = "mailgw", return_path_domain: str | None = None,
                     verified: bool = False, run_in_thread: InThread = _inline
                     ) -> SenderDomain:
    """A sender domain with a new DKIM key (`domain_records` says what to publish)."""
    domain = domain.lower().strip()
    if not is_domain_name(domain):
        raise AdminRefused(f"not a domain name: {domain!r}")
    return_path = (return_path_domain or f"bounces.{domain}").lower().strip()
    if not is_domain_name(return_path):
        raise AdminRefused(f"not a domain name: {return_path!r}")
    if not selector or not all(c.isalnum() or c in "-_" for c in selector):
        raise AdminRefused(f"not a DKIM selector: {selector!r}")
    key = await run_in_thread(generate_dkim_key, algorithm)
    added = await stores.senders.add_domain(account_id, domain, selector, key.algorithm,
                                            key.private_key_pem, key.public_key, return_path)
    if verified:
        added = await stores.senders.verify_domain(account_id, domain)
    return added


def domain_records(domain: SenderDomain, gateway_hostname: str) -> list[DNSRecord]:
    """The DNS records to publish for a sender domain (DKIM, SPF, return path, DMARC)."""
    return domain_dns_records(domain.domain, domain.dkim_selector, domain.dkim_algorithm,
                              domain.dkim_public_key, domain.return_path_domain,
                              gateway_hostname)


async def add_sender(stores: Stores, account_id: int, address: str,
                     verified: bool = False) -> Sender:
    try:
        normalized = normalize_address(address.strip())
    except InvalidAddress:
        raise AdminRefused(f"not an email address: {address}") from None
    return await stores.senders.add_sender(account_id, normalized, verified)


async def add_webhook(stores: Stores, account_id: int, url: str, event_types: list[str],
                      allow_http_hosts: list[str]) -> tuple[WebhookEndpoint, str]:
    """An endpoint and its signing secret (W-2), shown once. https only, except the hosts
    the operator allows plain http for (`webhooks.allow_http_hosts`)."""
    parts = urlsplit(url)
    if not parts.hostname or parts.scheme not in ("https", "http") or (
            parts.scheme == "http" and parts.hostname not in allow_http_hosts):
        raise AdminRefused(f"a webhook URL must be https://... (http only for "
                           f"{', '.join(allow_http_hosts) or 'no host'}), not {url[:100]!a}")
    unknown = sorted(set(event_types) - set(WEBHOOK_EVENT_TYPES))
    if not event_types or unknown:
        raise AdminRefused(f"event types must be some of {', '.join(WEBHOOK_EVENT_TYPES)}")
    if len(await stores.webhooks.list(account_id, limit=None)) >= MAX_WEBHOOKS_PER_ACCOUNT:
        raise AdminRefused(f"an account has at most {MAX_WEBHOOKS_PER_ACCOUNT} webhook "
                           "endpoints; remove one first")
    secret = secrets.token_urlsafe(32)
    return await stores.webhooks.create(account_id, url, secret, event_types), secret


async def add_suppression(stores: Stores, account_id: int, address: str,
                          sender_domain: str | None = None,
                          category: str | None = None) -> Suppression:
    """A manual suppression of `address` (for mail from `sender_domain`, in `category`;
    None: all)."""
    try:
        normalized = normalize_address(address.strip())
    except InvalidAddress:
        raise AdminRefused(f"not an email address: {address[:80]}") from None
    if sender_domain is not None:
        sender_domain = sender_domain.lower().strip()
        if not is_domain_name(sender_domain):
            raise AdminRefused(f"not a domain name: {sender_domain[:80]!r}")
    if category is not None and not (0 < len(category) <= CATEGORY_MAX_LENGTH
                                     and category.isprintable()):
        raise AdminRefused(f"a category is 1 to {CATEGORY_MAX_LENGTH} printable characters")
    return await stores.suppressions.add(account_id, normalized, sender_domain, category)


def is_domain_name(name: str) -> bool:
    """An ASCII host name of two labels or more (IDNA already applied)."""
    labels = name.split(".")
    return (len(labels) >= 2 and len(name) <= 253 and all(
        label and len(label) <= 63 and label.isascii()
        and all(c.isalnum() or c == "-" for c in label) for label in labels))
