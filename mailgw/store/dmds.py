"""The DMDS contact book (H-2): contacts with their name fields, campos and groups,
invalidation and the whitelist, groups, filters and the global variables.

These are the contacts every door imports at RCPT time (S-7), keyed by lowercased
address. A contact's `fields` hold the name fields at the top (`nombre`,
`apellido` ...) and its campos under `campos` ({name: value}, content.merge.CAMPOS),
which the delivery engine gives to XYZ<NAME>XYZ tags with the global variables.
Invalidations and revalidations are written with their events in one statement; a
whitelisted contact is left alone (and the delivery engine never invalidates it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg2.extras import Json

from mailgw.content.merge import CAMPOS
from mailgw.store.contacts import check_contact_limit
from mailgw.store.database import Database
from mailgw.store.dmds_events import LoggedEvent, contact_events_txn
from mailgw.store.events import EventType

# The name fields of a DMDS contact, in the order the seed shows them.
NAME_FIELDS = ("nombre", "apellido", "edad", "sexo", "profesion", "localidad",
               "codigo_pais", "codigo_region", "ciudad")


class UnknownGroups(Exception):
    """Groups named that the account does not have; args[0] lists them."""


@dataclass(frozen=True)
class ContactChange:
    """What a DMDS call sets on a contact: name fields (None clears one), campos to set,
    groups to join (existing ones)."""

    email: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    campos: Mapping[str, str] = field(default_factory=dict)
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class ContactView:
    """A contact as `contacto/<email>` shows it."""

    id: int
    email: str
    fields: dict[str, Any]
    invalid: bool
    whitelisted: bool
    created_at: datetime
    updated_at: datetime
    groups: list[str]
    # The origins of its groups (smtp, api, dmds, manual).
    origins: list[str]
    events: list[LoggedEvent]
    # Names of the campaigns it was sent under, and of those it unsubscribed from.
    campaigns: list[str]
    unsubscribed_campaigns: list[str]
    # The device type of its latest open or click, as tracking records it.
    device: str | None


@dataclass(frozen=True)
class Group:
    id: int
    name: str
    origin: str
    created_at: datetime


@dataclass(frozen=True)
class Filter:
    id: int
    name: str
    groups: list[str]
    # The values the contacts' campos must hold.
    campos: dict[str, str]


class Validity:
    """What invalidating or revalidating a contact did."""

    DONE = "done"
    WHITELISTED = "whitelisted"
    MISSING = "missing"


class DMDSStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    async def upsert_contacts(self, account_id: int, changes: Sequence[ContactChange],
                              max_contacts: int | None) -> list[tuple[int, bool]]:
        """Create or update the contacts (merging name fields and campos into theirs) and
        join them to their groups, in one transaction: (id, created) of each, in order.
        UnknownGroups or ContactLimitReached (S-15) refuse them all."""
        if not changes:
            return []
        return await self.db.run_interaction("dmds_upsert_contacts", _upsert_contacts_txn,
                                             account_id, list(changes), max_contacts)

    async def contact(self, account_id: int, email: str, event_types: Sequence[str],
                      max_events: int) -> ContactView | None:
        """The contact with its last `max_events` events of `event_types`."""
        return await self.db.run_interaction("dmds_contact", _contact_txn, account_id,
                                             email, list(event_types), max_events)

    async def set_validity(self, account_id: int, email: str, invalid: bool,
                           reason: str) -> str:
        """Invalidate (or revalidate, which also forgets its hard bounces) a contact that
        is not whitelisted, writing the event (details: reason) even when nothing
        changes; a Validity."""
        return await self.db.run_interaction("dmds_set_validity", _set_validity_txn,
                                             account_id, email, invalid, reason)

    async def invalid_contacts(self, account_id: int, offset: int, limit: int
                               ) -> list[tuple[int, str, datetime]]:
        """(id, email, updated) of the account's invalid contacts, by id."""
        return await self.db.run_interaction("dmds_invalid_contacts", _invalid_txn,
                                             account_id, offset, limit)

    async def whitelisted(self, account_id: int, email: str) -> bool:
        return await self.db.run_interaction("dmds_whitelisted", _whitelisted_txn,
                                             account_id, email)

    async def set_whitelisted(self, account_id: int, email: str, whitelisted: bool,
                              max_contacts: int | None) -> None:
        """Whitelist a contact (created if there is none: S-15 applies), or take it off."""
        await self.db.run_interaction("dmds_set_whitelisted", _set_whitelisted_txn,
                                      account_id, email, whitelisted, max_contacts)

    async def groups(self, account_id: int, offset: int, limit: int) -> list[Group]:
        return await self.db.run_interaction("dmds_groups", _groups_txn, account_id, offset,
                                             limit)

    async def create_group(self, account_id: int, name: str) -> tuple[int, bool]:
        """(id, created) of the group `name`, made when the account has none of that name."""
        return await self.db.run_interaction("dmds_create_group", _create_group_txn,
                                             account_id, name)

    async def delete_group(self, account_id: int, name: str) -> bool:
        """Whether there was one; its members stay contacts."""
        return await self.db.run_interaction("dmds_delete_named", _delete_named_txn,
                                             "groups", account_id, name)

    async def filters(self, account_id: int) -> list[Filter]:
        return await self.db.run_interaction("dmds_filters", _filters_txn, account_id)

    async def put_filter(self, account_id: int, name: str, groups: Sequence[str],
                         campos: Mapping[str, str]) -> int:
        """The filter's id; it replaces one of the same name. UnknownGroups refuses it."""
        return await self.db.run_interaction("dmds_put_filter", _put_filter_txn, account_id,
                                             name, list(groups), dict(campos))

    async def delete_filter(self, account_id: int, name: str) -> bool:
        return await self.db.run_interaction("dmds_delete_named", _delete_named_txn,
                                             "filters", account_id, name)

    async def variables(self, account_id: int) -> list[tuple[str, str]]:
        return await self.db.run_interaction("dmds_variables", _variables_txn, account_id)

    async def put_variable(self, account_id: int, name: str, value: str) -> None:
        await self.db.run_interaction("dmds_put_variable", _put_variable_txn, account_id,
                                      name, value)

    async def delete_variable(self, account_id: int, name: str) -> bool:
        return await self.db.run_interaction("dmds_delete_named", _delete_named_txn,
                                             "global_variables", account_id, name)


async def _group_ids_txn(cursor, account_id: int, names: set[str]) -> dict[str, int]:
    """The ids of the groups named; UnknownGroups if some do not exist."""
    await cursor.execute("SELECT name, id FROM groups WHERE account_id = %s AND name = ANY(%s)",
                         (account_id, sorted(names)))
    found = dict(cursor.fetchall())
    missing = sorted(names - found.keys())
    if missing:
        raise UnknownGroups(missing)
    return found


# One statement for all the contacts, in the order of their addresses (as the RCPT
# imports lock them, so that the two never wait for each other in a cycle). Name
# fields given replace theirs (null clears one); campos given are merged into theirs.
_UPSERT_CONTACTS = (
    "WITH input AS ("
    "  SELECT * FROM unnest(%(emails)s::text[], %(fields)s::jsonb[], %(campos)s::jsonb[])"
    "  WITH ORDINALITY AS i(email, fields, campos, n))"
    " INSERT INTO contacts AS c (account_id, email, fields)"
    " SELECT DISTINCT ON (email) %(account)s, email,"
    f"  fields || jsonb_build_object('{CAMPOS}', campos)"
    "  FROM input ORDER BY email, n DESC"
    " ON CONFLICT (account_id, email) DO UPDATE SET"
    f"  fields = (c.fields - '{CAMPOS}') || (EXCLUDED.fields - '{CAMPOS}')"
    f"   || jsonb_build_object('{CAMPOS}', coalesce(c.fields -> '{CAMPOS}', '{{}}')"
    f"    || (EXCLUDED.fields -> '{CAMPOS}')),"
    "  updated_at = now()"
    " RETURNING c.id, c.email, xmax = 0")


async def _upsert_contacts_txn(cursor, account_id: int, changes: list[ContactChange],
                               max_contacts: int | None) -> list[tuple[int, bool]]:
    wanted = {group for change in changes for group in change.groups}
    groups = await _group_ids_txn(cursor, account_id, wanted) if wanted else {}
    if max_contacts is not None:
        await check_contact_limit(cursor, account_id, max_contacts,
                                  {change.email for change in changes})
    await cursor.execute(_UPSERT_CONTACTS, {
        "account": account_id, "emails": [c.email for c in changes],
        "fields": [Json(dict(c.fields)) for c in changes],
        "campos": [Json(dict(c.campos)) for c in changes]})
    found = {email: (contact_id, created) for contact_id, email, created in cursor.fetchall()}
    members = sorted({(groups[group], found[change.email][0])
                      for change in changes for group in change.groups})
    if members:
        await cursor.execute(
            "INSERT INTO group_members (group_id, contact_id)"
            " SELECT * FROM unnest(%s::bigint[], %s::bigint[]) ON CONFLICT DO NOTHING",
            ([g for g, _ in members], [c for _, c in members]))
    return [found[change.email] for change in changes]


async def _contact_txn(cursor, account_id: int, email: str, event_types: list[str],
                       max_events: int) -> ContactView | None:
    await cursor.execute(
        "SELECT id, email, fields, invalid, whitelisted, created_at, updated_at"
        " FROM contacts WHERE account_id = %s AND email = %s", (account_id, email))
    row = cursor.fetchone()
    if row is None:
        return None
    contact_id = row[0]
    await cursor.execute(
        "SELECT g.name, g.origin FROM group_members m JOIN groups g ON g.id = m.group_id"
        " WHERE m.contact_id = %s ORDER BY m.added_at, g.id", (contact_id,))
    groups = cursor.fetchall()
    await cursor.execute(
        "SELECT DISTINCT c.name FROM deliveries d JOIN messages m ON m.id = d.message_id"
        " JOIN sends s ON s.id = m.send_id JOIN campaigns c ON c.id = s.campaign_id"
        " WHERE d.account_id = %s AND d.contact_id = %s ORDER BY c.name",
        (account_id, contact_id))
    campaigns = [name for (name,) in cursor.fetchall()]
    await cursor.execute(
        "SELECT DISTINCT c.name FROM events e JOIN sends s ON s.id = e.send_id"
        " JOIN campaigns c ON c.id = s.campaign_id WHERE e.contact_id = %s"
        f" AND e.type = '{EventType.UNSUBSCRIBED}' ORDER BY c.name", (contact_id,))
    unsubscribed = [name for (name,) in cursor.fetchall()]
    await cursor.execute(
        "SELECT details ->> 'device_type' FROM events WHERE contact_id = %s"
        f" AND type IN ('{EventType.OPEN}', '{EventType.CLICK}')"
        " ORDER BY occurred_at DESC, id DESC LIMIT 1", (contact_id,))
    device = cursor.fetchone()
    events = await contact_events_txn(cursor, account_id, contact_id, event_types,
                                      max_events)
    origins = list(dict.fromkeys(origin for _, origin in groups))
    return ContactView(*row, [name for name, _ in groups], origins, events, campaigns,
                       unsubscribed, device[0] if device else None)


async def _set_validity_txn(cursor, account_id: int, email: str, invalid: bool,
                            reason: str) -> str:
    await cursor.execute("SELECT whitelisted FROM contacts WHERE account_id = %s"
                         " AND email = %s FOR NO KEY UPDATE", (account_id, email))
    row = cursor.fetchone()
    if row is None:
        return Validity.MISSING
    if row[0]:
        return Validity.WHITELISTED
    event = EventType.INVALIDATED if invalid else EventType.REVALIDATED
    await cursor.execute(
        "WITH c AS (UPDATE contacts SET invalid = %s,"
        "  hard_bounces = CASE WHEN %s THEN hard_bounces ELSE 0 END, updated_at = now()"
        "  WHERE account_id = %s AND email = %s RETURNING id, email)"
        " INSERT INTO events (account_id, contact_id, recipient, type, details)"
        " SELECT %s, id, email, %s, %s FROM c",
        (invalid, invalid, account_id, email, account_id, event, Json({"reason": reason})))
    return Validity.DONE


async def _invalid_txn(cursor, account_id: int, offset: int, limit: int
                       ) -> list[tuple[int, str, datetime]]:
    await cursor.execute(
        "SELECT id, email, updated_at FROM contacts WHERE account_id = %s AND invalid"
        " ORDER BY id OFFSET %s LIMIT %s", (account_id, offset, limit))
    return cursor.fetchall()


async def _whitelisted_txn(cursor, account_id: int, email: str) -> bool:
    await cursor.execute("SELECT whitelisted FROM contacts WHERE account_id = %s"
                         " AND email = %s", (account_id, email))
    row = cursor.fetchone()
    return bool(row and row[0])


async def _set_whitelisted_txn(cursor, account_id: int, email: str, whitelisted: bool,
                               max_contacts: int | None) -> None:
    if not whitelisted:
        await cursor.execute("UPDATE contacts SET whitelisted = false, updated_at = now()"
                             " WHERE account_id = %s AND email = %s AND whitelisted",
                             (account_id, email))
        return
    if max_contacts is not None:
        await check_contact_limit(cursor, account_id, max_contacts, {email})
    await cursor.execute(
        "INSERT INTO contacts AS c (account_id, email, whitelisted) VALUES (%s, %s, true)"
        " ON CONFLICT (account_id, email) DO UPDATE SET whitelisted = true,"
        " updated_at = now() WHERE NOT c.whitelisted", (account_id, email))


async def _groups_txn(cursor, account_id: int, offset: int, limit: int) -> list[Group]:
    await cursor.execute(
        "SELECT id, name, origin, created_at FROM groups WHERE account_id = %s"
        " ORDER BY id OFFSET %s LIMIT %s", (account_id, offset, limit))
    return [Group(*row) for row in cursor.fetchall()]


async def _create_group_txn(cursor, account_id: int, name: str) -> tuple[int, bool]:
    await cursor.execute(
        "INSERT INTO groups AS g (account_id, name, origin) VALUES (%s, %s, 'manual')"
        " ON CONFLICT (account_id, name) DO UPDATE SET name = g.name"
        " RETURNING id, xmax = 0", (account_id, name))
    return cursor.fetchone()


async def _delete_named_txn(cursor, table: str, account_id: int, name: str) -> bool:
    """Delete the account's row of `table` (a constant of this module) named `name`."""
    await cursor.execute(f"DELETE FROM {table} WHERE account_id = %s AND name = %s"
                         " RETURNING id", (account_id, name))
    return cursor.fetchone() is not None


async def _filters_txn(cursor, account_id: int) -> list[Filter]:
    await cursor.execute("SELECT id, name, groups, fields FROM filters WHERE account_id = %s"
                         " ORDER BY name", (account_id,))
    return [Filter(*row) for row in cursor.fetchall()]


async def _put_filter_txn(cursor, account_id: int, name: str, groups: list[str],
                          campos: dict[str, str]) -> int:
    if groups:
        await _group_ids_txn(cursor, account_id, set(groups))
    await cursor.execute(
        "INSERT INTO filters (account_id, name, groups, fields) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (account_id, name) DO UPDATE SET groups = EXCLUDED.groups,"
        " fields = EXCLUDED.fields RETURNING id", (account_id, name, groups, Json(campos)))
    return cursor.fetchone()[0]


async def _variables_txn(cursor, account_id: int) -> list[tuple[str, str]]:
    await cursor.execute("SELECT name, value FROM global_variables WHERE account_id = %s"
                         " ORDER BY name", (account_id,))
    return cursor.fetchall()


async def _put_variable_txn(cursor, account_id: int, name: str, value: str) -> None:
    await cursor.execute(
        "INSERT INTO global_variables (account_id, name, value) VALUES (%s, %s, %s)"
        " ON CONFLICT (account_id, name) DO UPDATE SET value = EXCLUDED.value",
        (account_id, name, value))
