"""The texts mailgw inserts into a message, in the message's language (S-9).

Language ids are those of X-Teenvio-Language; an id mailgw does not know falls back to
Spanish, the default language of S-9.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_LANGUAGE = 3


@dataclass(frozen=True)
class FooterTexts:
    # The ShowCab line on top of the message, linking to the web version.
    view_in_browser: str
    # The title of the social links footer.
    follow_us: str


_TEXTS = {
    3: FooterTexts("¿No ves bien este correo? Míralo en tu navegador", "Síguenos"),
    4: FooterTexts("Can't see this email properly? View it in your browser", "Follow us"),
    5: FooterTexts("Non visualizzi correttamente questa email? Aprila nel tuo browser",
                   "Seguici"),
    # French puts a (no-break) space before "?".
    6: FooterTexts("Vous ne voyez pas correctement cet e-mail\u00a0? "
                   "Affichez-le dans votre navigateur", "Suivez-nous"),
    7: FooterTexts("Wird diese E-Mail nicht richtig angezeigt? Im Browser ansehen",
                   "Folgen Sie uns"),
    8: FooterTexts("Wordt deze e-mail niet goed weergegeven? Bekijk hem in je browser",
                   "Volg ons"),
    11: FooterTexts("Não consegue ver este e-mail corretamente? Veja-o no seu navegador",
                    "Siga-nos"),
    13: FooterTexts("Vises ikke denne e-posten riktig? Se den i nettleseren din", "Følg oss"),
    14: FooterTexts("Visas inte det här mejlet korrekt? Öppna det i din webbläsare",
                    "Följ oss"),
    15: FooterTexts("No veus bé aquest correu? Obre'l al navegador", "Segueix-nos"),
    16: FooterTexts("Eikö viesti näy oikein? Avaa se selaimessa", "Seuraa meitä"),
    17: FooterTexts("Non ves ben este correo? Ábreo no navegador", "Síguenos"),
    18: FooterTexts("Ez duzu mezu hau ondo ikusten? Ireki nabigatzailean", "Jarraitu gaitzazu"),
}


# The language ids of X-Teenvio-Language (S-9).
LANGUAGES = frozenset(_TEXTS)


def header_footer_texts(language: int) -> FooterTexts:
    """The texts for an S-9 language id; Spanish for an id mailgw does not know."""
    return _TEXTS.get(language) or _TEXTS[DEFAULT_LANGUAGE]


def message_language(options: Mapping[str, Any], default: int = DEFAULT_LANGUAGE) -> int:
    """A message's language id from its stored options (S-9); `default` (the account's
    language) when it names none."""
    language = options.get("language")
    return language if isinstance(language, int) else default
