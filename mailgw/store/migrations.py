"""Schema migrations (O-3): numbered SQL files applied once, in order.

Files are `schema/NNN_name.sql`; once released a file is never edited, a
change is a new file.  All pending files are applied in one transaction under
an advisory lock, so two nodes starting together cannot both apply them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SCHEMA_DIR = Path(__file__).parent / "schema"
_FILE_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
# pg_advisory_xact_lock key: "mailgw" as an integer, constant across releases.
_LOCK_KEY = 0x6D61696C6777


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")


def available_migrations(directory: Path = SCHEMA_DIR) -> list[Migration]:
    """The migration files in version order; a misnamed file is an error."""
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise ValueError(f"migration file name not NNN_name.sql: {path.name}")
        migrations.append(Migration(int(match[1]), match[2], path))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise ValueError(f"two migration files share a number in {directory}")
    return migrations


async def migrate_txn(cursor, migrations: list[Migration]) -> list[Migration]:
    """Apply the migrations not yet recorded; returns those applied now."""
    await cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
    await cursor.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version integer PRIMARY KEY,"
        " name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())")
    await cursor.execute("SELECT version FROM schema_migrations")
    done = {row[0] for row in cursor.fetchall()}
    applied = []
    for migration in migrations:
        if migration.version in done:
            continue
        await cursor.execute(migration.sql())
        await cursor.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                             (migration.version, migration.name))
        applied.append(migration)
    return applied
