"""Merge tags (S-11), rendered once per recipient by the delivery engine.

One precompiled pattern and one re.sub pass per string: replaced values are never scanned
again, so a value cannot smuggle in another tag, and cost stays linear in the content.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from typing import Any

_TAG = re.compile(
    # {name} (Aldeamo): letters, digits, _, - and inner spaces, so CSS such as
    # "p { color: red; }" never matches.
    r"\{(?P<variable>[A-Za-z0-9_-](?:[A-Za-z0-9_ -]{0,62}[A-Za-z0-9_-])?)\}"
    # XYZ<FIELD>XYZ (DMDS contact fields, e.g. XYZDNIXYZ, XYZTAG-CURLXYZ).
    r"|XYZ(?P<field>[A-Za-z0-9_-]{1,64}?)XYZ"
    # [Unsubscribe], [WebVersion] (Devino, mailgw).
    r"|\[(?P<link>[A-Za-z]{1,32})\]"
)


def merge(text: str, variables: Mapping[str, str], fields: Mapping[str, str],
          links: Mapping[str, str]) -> str:
    """Replace the tags that have a value; leave every other tag exactly as written.

    Variable names match exactly; field names and link names ignore case (links are keyed
    in lowercase: "unsubscribe", "webversion").
    """
    fields_by_name = {name.lower(): value for name, value in fields.items()}

    def value_of(tag: re.Match[str]) -> str:
        if tag.group("variable") is not None:
            found = variables.get(tag.group("variable"))
        elif tag.group("field") is not None:
            found = fields_by_name.get(tag.group("field").lower())
        else:
            found = links.get(tag.group("link").lower())
        return tag.group(0) if found is None else found

    return _TAG.sub(value_of, text)


def escape_for_html(values: Mapping[str, str]) -> dict[str, str]:
    """Values merged into HTML must not become markup."""
    return {name: html.escape(value) for name, value in values.items()}


# Where a contact keeps its DMDS campos (H-2) among its fields: {name: value}.
CAMPOS = "campos"


def field_name(name: str) -> str:
    """The name an XYZ<FIELD>XYZ tag finds a value by: case ignored, and a name written as
    its tag (a DMDS campo `XYZDNIXYZ`) is the tag's inner name (`dni`)."""
    lowered = name.lower()
    if len(lowered) > 6 and lowered.startswith("xyz") and lowered.endswith("xyz"):
        return lowered[3:-3]
    return lowered


def tag_fields(contact_fields: Mapping[str, Any], global_variables: Mapping[str, str]
               ) -> dict[str, str]:
    """The values of one recipient's XYZ<FIELD>XYZ tags: the contact's own fields
    (nombre, apellido ...), then its campos, then the account's global variables (H-2),
    the first that names a tag giving its value."""
    campos = contact_fields.get(CAMPOS)
    own = {name: value for name, value in contact_fields.items() if name != CAMPOS}
    values: dict[str, str] = {}
    for source in (global_variables, campos if isinstance(campos, dict) else {}, own):
        for name, value in source.items():
            values[field_name(str(name))] = "" if value is None else str(value)
    return values
