"""Stored templates (Aldeamo `template_id`, S-10)."""

from __future__ import annotations

from dataclasses import dataclass

from mailgw.store.database import Database


@dataclass(frozen=True)
class Template:
    template_id: str
    name: str
    subject: str
    html: str | None
    text: str | None


class TemplateStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    async def put(self, account_id: int, template: Template) -> None:
        await self.db.run_interaction("put_template", _upsert_template_txn, account_id,
                                      template)

    async def get(self, account_id: int, template_id: str) -> Template | None:
        return await self.db.run_interaction("get_template", _select_template_txn, account_id,
                                             template_id)

    async def list(self, account_id: int, after: str = "",
                   limit: int | None = None) -> list[Template]:
        """The account's templates by id (a page: those after `after`)."""
        return await self.db.run_interaction("list_templates", _select_templates_txn,
                                             account_id, after, limit)

    async def delete(self, account_id: int, template_id: str) -> bool:
        """Whether there was such a template."""
        return await self.db.run_interaction("delete_template", _delete_template_txn,
                                             account_id, template_id)


_COLUMNS = "template_id, name, subject, html, text"


async def _upsert_template_txn(cursor, account_id: int, template: Template) -> None:
    await cursor.execute(
        "INSERT INTO templates (account_id, template_id, name, subject, html, text)"
        " VALUES (%s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (account_id, template_id) DO UPDATE SET name = EXCLUDED.name,"
        " subject = EXCLUDED.subject, html = EXCLUDED.html, text = EXCLUDED.text,"
        " updated_at = now()",
        (account_id, template.template_id, template.name, template.subject, template.html,
         template.text))


async def _select_template_txn(cursor, account_id: int, template_id: str) -> Template | None:
    await cursor.execute(
        f"SELECT {_COLUMNS} FROM templates WHERE account_id = %s AND template_id = %s",
        (account_id, template_id))
    row = cursor.fetchone()
    return Template(*row) if row else None


async def _select_templates_txn(cursor, account_id: int, after: str,
                                limit: int | None) -> list[Template]:
    await cursor.execute(
        f"SELECT {_COLUMNS} FROM templates WHERE account_id = %s AND template_id > %s"
        " ORDER BY template_id LIMIT %s", (account_id, after, limit))
    return [Template(*row) for row in cursor.fetchall()]


async def _delete_template_txn(cursor, account_id: int, template_id: str) -> bool:
    await cursor.execute("DELETE FROM templates WHERE account_id = %s AND template_id = %s"
                         " RETURNING id", (account_id, template_id))
    return cursor.fetchone() is not None
