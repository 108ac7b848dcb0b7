"""The HTML pages of the tracking endpoints (T-3), written with twisted.web.template.

Small, self-contained pages (inline style, no scripts, no outside resources) in the
message's language; every value put in them is escaped by the template flattener.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet import defer
from twisted.web.template import Tag, flattenString, tags

from mailgw.content.unsubscribe_texts import UnsubscribeTexts
from mailgw.store.tracking import CATEGORIES, RESUBSCRIBE, UNSUBSCRIBE, Subscription

REASON_MAX_LENGTH = 500
_STYLE = """
body{margin:0;background:#f4f4f5;color:#18181b;font:16px/1.5 system-ui,-apple-system,
"Segoe UI",Roboto,Arial,sans-serif}
main{max-width:32rem;margin:3rem auto;padding:2rem;background:#fff;border-radius:12px;
box-shadow:0 1px 3px rgba(0,0,0,.12)}
h1{margin:0 0 1rem;font-size:1.5rem}
p{margin:0 0 1rem;overflow-wrap:anywhere}
.notice{padding:.75rem 1rem;background:#ecfdf5;border-left:4px solid #10b981;border-radius:4px}
fieldset{margin:0 0 1rem;padding:.75rem 1rem;border:1px solid #d4d4d8;border-radius:8px}
legend{padding:0 .25rem;font-weight:600}
label{display:block;margin:.25rem 0}
textarea{box-sizing:border-box;width:100%;margin:.25rem 0 1rem;padding:.5rem;
border:1px solid #d4d4d8;border-radius:6px;font:inherit}
button{display:block;width:100%;margin:.5rem 0 0;padding:.75rem 1rem;border:0;
border-radius:6px;font:inherit;font-weight:600;cursor:pointer}
.primary{background:#18181b;color:#fff}
.secondary{background:#e4e4e7;color:#18181b}
""".replace("\n", "")


def page(texts: UnsubscribeTexts, *content: Tag) -> defer.Deferred[bytes]:
    """A complete HTML document with `content` in its main element."""
    document = tags.html(
        tags.head(tags.meta(charset="utf-8"),
                  tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
                  tags.meta(name="robots", content="noindex"),
                  tags.title(texts.title), tags.style(_STYLE)),
        tags.body(Tag("main")(tags.h1(texts.title), *content)), lang=texts.lang)
    return flattenString(None, document).addCallback(lambda html: b"<!DOCTYPE html>\n" + html)


def unsubscribe_page(texts: UnsubscribeTexts, email: str, domain: str,
                     categories: Sequence[str], subscription: Subscription,
                     notice: str | None = None) -> defer.Deferred[bytes]:
    """The page of a recipient's subscription to a sender domain: unsubscribe (from the
    account's categories one by one, when it has some), or subscribe again. Its buttons
    POST the form to the page's own URL; a GET changes nothing."""
    def say(text: str) -> str:
        return text.format(email=email, domain=domain)

    content: list[Tag] = [tags.p(say(notice), class_="notice")] if notice else []
    if subscription.unsubscribed:
        content += [tags.p(say(texts.unsubscribed)),
                    tags.form(_button(RESUBSCRIBE, texts.resubscribe, "primary"),
                              method="post")]
        return page(texts, *content)
    form: list[Tag] = []
    if categories:
        boxes = []
        for category in categories:
            box = tags.input(type="checkbox", name="category", value=category)
            if category not in subscription.cancelled:
                box(checked="checked")
            boxes.append(tags.label(box, " ", category))
        form += [tags.fieldset(tags.legend(texts.categories), *boxes),
                 _button(CATEGORIES, texts.save, "primary")]
    form += [tags.label(texts.reason, tags.textarea(name="reason", rows="2",
                                                    maxlength=str(REASON_MAX_LENGTH)),
                        style="margin-top:1rem"),
             _button(UNSUBSCRIBE, say(texts.unsubscribe_all if categories
                                      else texts.unsubscribe),
                     "secondary" if categories else "primary")]
    content += [tags.p(say(texts.subscribed)), tags.form(*form, method="post")]
    return page(texts, *content)


def _button(action: str, text: str, kind: str) -> Tag:
    return tags.button(text, type="submit", name="action", value=action, class_=kind)
