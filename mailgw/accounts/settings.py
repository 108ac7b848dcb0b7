"""An account's settings (the jsonb `accounts.settings`), typed and read in one place.

Pure: nothing of mailgw but the list of S-9 languages is imported here, so
that every layer, the store included, can return and read them.  A missing
key, or a value the setting does not take, means the setting's default: a
typo never blocks an account.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from mailgw.content.footer_texts import DEFAULT_LANGUAGE, LANGUAGES

MULTIPART_MODES = ("generate", "strict")
ATTACHMENT_MODES = ("keep", "links", "reject")
# T-3: as X-Mailgw-Category takes them (content/message.py), without commas (the CLI
# lists them comma-separated).
CATEGORY_MAX_LENGTH = 64
MAX_CATEGORIES = 50


def category_name(value: Any) -> bool:
    """Whether `value` can name one of an account's campaign categories."""
    return (isinstance(value, str) and 0 < len(value) <= CATEGORY_MAX_LENGTH
            and value.isprintable() and value == value.strip() and "," not in value)


@dataclass(frozen=True)
class AccountSettings:
    # S-8: a message without a text or an HTML part gets the other generated, or
    # ("strict") is refused.
    multipart: str = "generate"
    # S-8: attachments are kept, hosted behind links, or refused.
    attachments: str = "keep"
    # S-14: the raw text of each message is kept with it.
    archive: bool = False
    # S-9: the header and footer texts around the message.
    show_cab: bool = True
    # S-9: network -> profile URL, shown when a message asks for social links.
    social_links: Mapping[str, str] = field(default_factory=dict)
    # T-5: the account's tracking switches (a message can turn tracking off as well).
    track_opens: bool = True
    track_clicks: bool = True
    # T-3: the campaign categories a recipient may unsubscribe from one by one on the
    # unsubscribe page (Aldeamo's domain categories); none: the page offers the domain.
    categories: tuple[str, ...] = ()
    # S-9: the language of the inserted texts when a message names none (an
    # X-Teenvio-Language id).
    language: int = DEFAULT_LANGUAGE

    @classmethod
    def from_json(cls, stored: Any) -> AccountSettings:
        """The settings as stored; what is missing or not what a setting takes is its
        default."""
        if not isinstance(stored, Mapping):
            stored = {}
        default = cls()

        def switch(name: str) -> bool:
            value = stored.get(name)
            return value if isinstance(value, bool) else getattr(default, name)

        def choice(name: str, choices: tuple[str, ...]) -> str:
            value = stored.get(name)
            return value if isinstance(value, str) and value in choices else getattr(
                default, name)

        links = stored.get("social_links")
        categories = stored.get("categories")
        language = stored.get("language")
        return cls(
            multipart=choice("multipart", MULTIPART_MODES),
            attachments=choice("attachments", ATTACHMENT_MODES),
            archive=switch("archive"), show_cab=switch("show_cab"),
            # A link that is not text cannot be a URL.
            social_links={str(network): url for network, url in links.items()
                          if isinstance(url, str)} if isinstance(links, Mapping) else {},
            track_opens=switch("track_opens"), track_clicks=switch("track_clicks"),
            # A name that is no category name is left out, and so is a repeated one.
            categories=tuple(dict.fromkeys(c for c in categories if category_name(c)))
            [:MAX_CATEGORIES] if isinstance(categories, list | tuple) else (),
            language=language if type(language) is int and language in LANGUAGES
            else default.language)

    @classmethod
    def changes(cls, **values: Any) -> dict[str, Any]:
        """The JSON that sets the settings given (None: left as they are) and keeps the
        others, merged into an account's by AccountStore.update_account.  ValueError
        for a name that is no setting, or a value the setting does not take, which
        reading would take for the default."""
        # JSON has lists where the settings have tuples.
        given = {name: tuple(value) if isinstance(value, list) else value
                 for name, value in values.items() if value is not None}
        unknown = given.keys() - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"not account settings: {', '.join(sorted(unknown))}")
        read = cls.from_json(given)
        bad = [name for name, value in given.items()
               if type(value) is not type(getattr(read, name)) or value != getattr(read, name)]
        if bad:
            raise ValueError(f"bad values for account settings: {', '.join(sorted(bad))}")
        return given
