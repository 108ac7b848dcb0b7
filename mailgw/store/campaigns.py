"""DMDS campaigns (H-2): the defaults of the sends made under them, and their keys.

A campaign's key (camp_apikey) is an API key of kind `campaign` of its own campaign
(api_keys, found by its digest: it sends for that campaign over HTTP, and logs in
over SMTP as `dmdsid-<numid>`), and the campaign keeps it sealed as well
(credentials.Sealer), to show it again. Setting a new key revokes the previous
one; campaign keys made otherwise (`mailgw apikey create --kind campaign`) are
left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg2 import errors as pg_errors

from mailgw.errors import AlreadyExists
from mailgw.store.database import Database

CAMPAIGN_TYPES = ("api", "normal", "bulk")
# The name of a campaign's own key in api_keys (`mailgw apikey list` shows it).
CAMPAIGN_KEY_NAME = "camp_apikey"


@dataclass(frozen=True)
class Campaign:
    id: int
    uuid: str
    numid: int
    account_id: int
    type: str
    name: str
    sender: str | None
    sender_name: str | None
    reply_to: str | None
    subject: str | None
    subject_uri: str | None
    content_uri: str | None
    created_at: datetime


@dataclass(frozen=True)
class NewCampaign:
    type: str
    name: str
    sender: str | None = None
    sender_name: str | None = None
    reply_to: str | None = None
    subject: str | None = None
    subject_uri: str | None = None
    content_uri: str | None = None


@dataclass(frozen=True)
class CampaignKey:
    """A campaign key as stored: its digest and first characters (api_keys) and the key
    sealed (campaigns)."""

    digest: str
    prefix: str
    sealed: bytes


_COLUMNS = ("c.id, c.uuid::text, c.numid, c.account_id, c.type, c.name, c.sender,"
            " c.sender_name, c.reply_to, c.subject, c.subject_uri, c.content_uri,"
            " c.created_at")


class CampaignStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    async def create(self, account_id: int, campaign: NewCampaign,
                     key: CampaignKey | None) -> Campaign:
        """The campaign, with its key when it has one (AlreadyExists: the key is already
        another key's, which a random key never is)."""
        try:
            return await self.db.run_interaction("create_campaign", _insert_campaign_txn,
                                                 account_id, campaign, key)
        except pg_errors.UniqueViolation:
            raise AlreadyExists("that key is already in use") from None

    async def campaigns(self, account_id: int, campaign_type: str | None = None,
                        numid: int | None = None) -> list[Campaign]:
        """The account's campaigns by numid, of one type and one numid when given."""
        return await self.db.run_interaction("list_campaigns", _select_campaigns_txn,
                                             account_id, campaign_type, numid)

    async def get(self, account_id: int, numid: int) -> Campaign | None:
        found = await self.campaigns(account_id, numid=numid)
        return found[0] if found else None

    async def sealed_key(self, account_id: int, numid: int) -> bytes | None:
        """The campaign's key as sealed, None when it has none that can be shown."""
        return await self.db.run_interaction("campaign_sealed_key", _select_sealed_key_txn,
                                             account_id, numid)

    async def set_key(self, account_id: int, numid: int, key: CampaignKey) -> bool:
        """Give the campaign a new key, revoking its previous one; False: no such campaign
        (AlreadyExists: the key is already another key's)."""
        try:
            return await self.db.run_interaction("set_campaign_key", _set_key_txn,
                                                 account_id, numid, key)
        except pg_errors.UniqueViolation:
            raise AlreadyExists("that key is already in use") from None


async def _insert_campaign_txn(cursor, account_id: int, campaign: NewCampaign,
                               key: CampaignKey | None) -> Campaign:
    await cursor.execute(
        "INSERT INTO campaigns AS c (account_id, type, name, sender, sender_name, reply_to,"
        " subject, subject_uri, content_uri) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
        f" RETURNING {_COLUMNS}",
        (account_id, campaign.type, campaign.name, campaign.sender, campaign.sender_name,
         campaign.reply_to, campaign.subject, campaign.subject_uri, campaign.content_uri))
    created = Campaign(*cursor.fetchone())
    if key is not None:
        await _store_key_txn(cursor, account_id, created.id, key)
    return created


async def _store_key_txn(cursor, account_id: int, campaign_id: int, key: CampaignKey) -> None:
    await cursor.execute(
        "WITH k AS (INSERT INTO api_keys (account_id, name, key_hash, key_prefix, kind,"
        "  campaign_id) VALUES (%s, %s, %s, %s, 'campaign', %s) RETURNING id)"
        " UPDATE campaigns SET api_key_id = k.id, api_key_sealed = %s FROM k"
        " WHERE campaigns.id = %s",
        (account_id, CAMPAIGN_KEY_NAME, key.digest, key.prefix, campaign_id, key.sealed,
         campaign_id))


async def _select_campaigns_txn(cursor, account_id: int, campaign_type: str | None,
                                numid: int | None) -> list[Campaign]:
    await cursor.execute(
        f"SELECT {_COLUMNS} FROM campaigns c WHERE c.account_id = %s"
        " AND (%s::text IS NULL OR c.type = %s) AND (%s::bigint IS NULL OR c.numid = %s)"
        " ORDER BY c.numid", (account_id, campaign_type, campaign_type, numid, numid))
    return [Campaign(*row) for row in cursor.fetchall()]


async def _select_sealed_key_txn(cursor, account_id: int, numid: int) -> bytes | None:
    await cursor.execute(
        "SELECT c.api_key_sealed FROM campaigns c JOIN api_keys k ON k.id = c.api_key_id"
        " WHERE c.account_id = %s AND c.numid = %s AND k.revoked_at IS NULL",
        (account_id, numid))
    row = cursor.fetchone()
    return bytes(row[0]) if row and row[0] is not None else None


async def _set_key_txn(cursor, account_id: int, numid: int, key: CampaignKey) -> bool:
    await cursor.execute(
        "SELECT id, api_key_id FROM campaigns WHERE account_id = %s AND numid = %s"
        " FOR UPDATE", (account_id, numid))
    row = cursor.fetchone()
    if row is None:
        return False
    campaign_id, previous = row
    if previous is not None:
        await cursor.execute("UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())"
                             " WHERE id = %s", (previous,))
    await _store_key_txn(cursor, account_id, campaign_id, key)
    return True
