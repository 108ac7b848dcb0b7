"""The event log against a real PostgreSQL: its types (E-1)."""

import re

from mailgw.store.events import EventType
from tests.harness import DatabaseTestCase


class EventTypeTests(DatabaseTestCase):
    async def test_enumeration_matches_the_schema(self):
        """A type added to the schema's CHECK or to EventType alone fails here."""
        [(definition,)] = await self.sql(
            "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c"
            " JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY(c.conkey)"
            " WHERE c.conrelid = 'events'::regclass AND c.contype = 'c'"
            " AND a.attname = 'type'")
        allowed = re.findall(r"'(\w+)'::text", definition)
        self.assertEqual(sorted(allowed), sorted(t.value for t in EventType))
        self.assertEqual(len(set(allowed)), len(allowed))
