"""Public, token-addressed endpoints on the HTTP listener (S-8, T-1 to T-6).

- `/a/<token>`: an attachment replaced by a download link (S-8 `links`).
- `/t/o/<token>.gif`: the open pixel (T-1), `/t/c/<token>`: a click's redirect (T-2).
  Each answers once its event is committed, or after `tracking.commit_wait_seconds`
  whatever happened to it: a recipient never waits for, nor sees, our trouble.
- `/t/u/<token>`: the unsubscribe page (GET), its form and the RFC 8058 one-click
  unsubscribe (POST) (T-3). A change answers once committed, else 503.
- `/t/w/<token>`: the web version (T-4), the HTML exactly as that recipient received it.

A token that is not ours (forged, cut, altered, of another kind) is a plain 404: a
redirect goes only where a message we signed pointed. Every refusal is a short page;
nothing answers with a traceback.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any
from urllib.parse import quote

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource
from twisted.web.template import tags
from werkzeug.exceptions import HTTPException

from mailgw.content.body import StoredBody
from mailgw.content.contexts import bounce_domain, recipient_context, sender_context
from mailgw.content.footer_texts import DEFAULT_LANGUAGE, message_language
from mailgw.content.links import LinkSigner
from mailgw.content.render import PreparedMessage
from mailgw.content.unsubscribe_texts import unsubscribe_texts
from mailgw.errors import TransientDatabaseError
from mailgw.events.recorder import Hit, TrackingRecorder
from mailgw.http.pages import REASON_MAX_LENGTH, page, unsubscribe_page
from mailgw.store.queue import QueueStore
from mailgw.store.submissions import SubmissionStore
from mailgw.store.tracking import (
    CATEGORIES,
    RESUBSCRIBE,
    UNSUBSCRIBE,
    TrackedDelivery,
    TrackingStore,
)
from mailgw.text import one_line

# A transparent 1x1 GIF (GIF89a, one palette entry, a transparency extension).
PIXEL = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00"
         b"\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
# What Aldeamo's webhooks say of a one-click unsubscribe (seed 001, 8.6 reason).
ONE_CLICK_REASON = "Cancelación de suscripción en un clic"
ONE_CLICK_BODY = b"List-Unsubscribe=One-Click"
_NO_STORE = b"no-store, no-cache, must-revalidate, max-age=0, private"
# Characters a Location header keeps as they are: a URL's own, its %XX escapes included.
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~"
# The work has not finished within commit_wait_seconds.
_LATE = object()


class _NoSuchToken(Exception):
    """A token that is not ours, or whose delivery is gone: 404."""


class TrackingApp:
    app = Klein()
    log = Logger()

    def __init__(self, submissions: SubmissionStore, signer: LinkSigner,
                 recorder: TrackingRecorder, tracking: TrackingStore, queue: QueueStore,
                 clock, commit_wait: float, hostname: str, default_bounce_domain: str) -> None:
        """`hostname` and `default_bounce_domain` as the queue runner has them, so that the
        web version is prepared as the message was."""
        self.submissions = submissions
        self.signer = signer
        self.recorder = recorder
        self.tracking = tracking
        self.queue = queue
        self.clock = clock
        self.commit_wait = commit_wait
        self.hostname = hostname
        self.default_bounce_domain = default_bounce_domain

    def resource(self) -> Resource:
        """The app as a twisted.web resource, for the HTTP root."""
        return _TrackingResource(self, self.app.resource())

    @app.route("/a/<token>", methods=["GET"])
    async def attachment(self, request, token: str) -> bytes:
        """A file replaced by a link in the message; unknown tokens are 404."""
        found = await self.submissions.attachment(token)
        if found is None:
            raise _NoSuchToken()
        filename, content_type, data = found
        request.setHeader(b"Content-Type", content_type.encode("ascii", "replace"))
        request.setHeader(b"Content-Disposition",
                          b"attachment; filename*=UTF-8''" + quote(filename).encode("ascii"))
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        return data

    @app.route("/t/o/<token>.gif", methods=["GET", "HEAD"])
    def open_pixel(self, request, token: str) -> defer.Deferred[bytes]:
        delivery_id, _ = self._verify("o", token)
        recorded = self._within(self.recorder.opened(delivery_id, self._hit(request)))
        return recorded.addCallback(lambda _: self._pixel(request))

    @app.route("/t/c/<token>", methods=["GET", "HEAD"])
    def click(self, request, token: str) -> defer.Deferred[bytes]:
        delivery_id, url = self._verify("c", token)
        if not url.lower().startswith(("http://", "https://")):
            raise _NoSuchToken()
        recorded = self._within(self.recorder.clicked(delivery_id, url, self._hit(request)))
        return recorded.addCallback(lambda _: self._redirect(request, url))

    @app.route("/t/u/<token>", methods=["GET", "HEAD"])
    async def unsubscribe_page(self, request, token: str) -> bytes:
        """The page only: a GET (a link scanner's too) changes nothing."""
        delivery = await self._delivery("u", token)
        return await self._subscription_page(request, delivery)

    @app.route("/t/u/<token>", methods=["POST"])
    async def unsubscribe(self, request, token: str) -> bytes:
        """RFC 8058 one-click (`List-Unsubscribe=One-Click`): unsubscribed at once, no
        page. The page's form: `action` unsubscribe, categories (the `category` values
        kept) or resubscribe, and an optional `reason`."""
        args = request.args
        one_click = (args.get(b"List-Unsubscribe") == [b"One-Click"]
                     or request.content.read(len(ONE_CLICK_BODY) + 2).strip() == ONE_CLICK_BODY)
        action = UNSUBSCRIBE if one_click else _text(args, b"action")
        if action not in (UNSUBSCRIBE, RESUBSCRIBE, CATEGORIES):
            return _plain(request, 400, b"Bad request: not an unsubscribe form\n")
        delivery = await self._delivery("u", token)
        if action == CATEGORIES and not delivery.settings.categories:
            return _plain(request, 400, b"Bad request: this sender has no categories\n")
        details: dict[str, Any] = {"method": "one-click" if one_click else "page"}
        if action != RESUBSCRIBE:
            details["reason"] = (ONE_CLICK_REASON if one_click
                                 else one_line(_text(args, b"reason"))[:REASON_MAX_LENGTH])
        keep = frozenset(one_line(value.decode("utf-8", "replace"))
                         for value in args.get(b"category", []))
        changed = await self._within(self.recorder.change_subscription(
            delivery, action, self._hit(request), details, keep))
        if changed is _LATE:
            raise TransientDatabaseError("the change was not committed in time")
        if one_click:
            return _plain(request, 200, b"Unsubscribed\n")
        texts = unsubscribe_texts(message_language(delivery.options,
                                                   delivery.settings.language))
        notice = {CATEGORIES: texts.saved, RESUBSCRIBE: texts.resubscribed}.get(action)
        return await self._subscription_page(request, delivery, notice)

    @app.route("/t/w/<token>", methods=["GET", "HEAD"])
    async def web_version(self, request, token: str) -> bytes:
        delivery = await self._delivery("w", token)
        message = (await self.queue.messages([delivery.message_id])).get(delivery.message_id)
        if message is None:
            raise _NoSuchToken()
        body = StoredBody.from_json(message.body)
        sender = sender_context(message, body, self.hostname,
                                bounce_domain(message, self.default_bounce_domain), None)
        fields = await self.tracking.contact_fields(delivery.contact_id)
        html = PreparedMessage(body, message.options, sender, self.signer).render_html(
            recipient_context(delivery.id, delivery.recipient, fields,
                              message.global_variables))
        if html is None:
            return _plain(request, 404, b"This message has no web version\n")
        _page_headers(request)
        return html.encode("utf-8")

    @app.handle_errors(_NoSuchToken, HTTPException)
    def not_found(self, request, failure: Failure) -> bytes:
        """Also what the router refuses: a path (`/t/x/...`, a pixel without `.gif`) or a
        method no route takes."""
        return _plain(request, 404, b"Not found\n")

    @app.handle_errors(TransientDatabaseError)
    def unavailable(self, request, failure: Failure) -> defer.Deferred[bytes]:
        """The database is out of reach (R-2): 503, for the mail client or the person
        to try again."""
        request.setResponseCode(503)
        request.setHeader(b"Retry-After", b"60")
        _page_headers(request)
        texts = unsubscribe_texts(DEFAULT_LANGUAGE)
        return page(texts, tags.p(texts.unavailable))

    @app.handle_errors(Exception)
    def failed(self, request, failure: Failure) -> bytes:
        self.log.failure("tracking request {uri} failed", failure, uri=request.uri[:200])
        return _plain(request, 500, b"Internal error\n")

    def _verify(self, kind: str, token: str) -> tuple[int, str]:
        verified = self.signer.verify(kind, token)
        if verified is None:
            raise _NoSuchToken()
        return verified[0], verified[1] or ""

    async def _delivery(self, kind: str, token: str) -> TrackedDelivery:
        delivery_id, _ = self._verify(kind, token)
        delivery = await self.recorder.delivery(delivery_id)
        if delivery is None:
            raise _NoSuchToken()
        return delivery

    def _hit(self, request) -> Hit:
        return self.recorder.hit(request.method, getattr(request.getClientAddress(), "host", ""),
                                 request.requestHeaders.getRawHeaders(b"x-forwarded-for"),
                                 request.getHeader(b"user-agent"))

    def _within(self, work: Coroutine[Any, Any, Any]) -> defer.Deferred[Any]:
        """Fires with the work's result (or failure) when it finishes within
        commit_wait seconds, else with _LATE then; the work goes on either way."""
        finished = defer.ensureDeferred(work)
        answer: defer.Deferred[Any] = defer.Deferred()
        timer = self.clock.callLater(self.commit_wait, answer.callback, _LATE)

        def done(result: Any) -> None:
            if timer.active():
                timer.cancel()
                answer.callback(result)
            elif isinstance(result, Failure):
                self.log.failure("tracking work failed after its answer", result)

        finished.addBoth(done)
        return answer

    async def _subscription_page(self, request, delivery: TrackedDelivery,
                                 notice: str | None = None) -> bytes:
        subscription = await self.tracking.subscription(delivery)
        _page_headers(request)
        return await unsubscribe_page(
            unsubscribe_texts(message_language(delivery.options, delivery.settings.language)),
            delivery.recipient,
            delivery.sender_domain, delivery.settings.categories, subscription, notice)

    @staticmethod
    def _pixel(request) -> bytes:
        request.setHeader(b"Content-Type", b"image/gif")
        # A length, not HTTP/1.1's chunks: one write for the whole answer.
        request.setHeader(b"Content-Length", b"%d" % len(PIXEL))
        _no_store(request)
        return PIXEL

    @staticmethod
    def _redirect(request, url: str) -> bytes:
        request.setResponseCode(302)
        request.setHeader(b"Location", quote(url, safe=_URL_SAFE).encode("ascii"))
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        request.setHeader(b"Content-Length", b"0")
        _no_store(request)
        return b""


class _TrackingResource(Resource):
    """The pixel and the redirect, which come by the thousand after a campaign goes out,
    go straight to their handlers, without Klein's routing (70 us a hit, a seventh of a
    hit's CPU); every other path (and a method they do not take) is routed by the app.
    Same handlers, same answers."""

    isLeaf = True
    log = Logger()

    def __init__(self, app: TrackingApp, routed: Resource) -> None:
        super().__init__()
        self.app = app
        self.routed = routed
        self.hot = {b"o": app.open_pixel, b"c": app.click}

    def render(self, request) -> bytes | int:
        path = request.postpath
        handler = self.hot.get(path[1]) if len(path) == 3 and path[0] == b"t" else None
        token = path[-1]
        if path[1:2] == [b"o"]:  # as its route says: /t/o/<token>.gif
            handler = handler if token.endswith(b".gif") else None
            token = token[:-4]
        if handler is None or request.method not in (b"GET", b"HEAD"):
            return self.routed.render(request)
        try:
            answered = handler(request, token.decode("ascii"))
        except (_NoSuchToken, UnicodeDecodeError):
            return _plain(request, 404, b"Not found\n")
        gone: list[bool] = []
        request.notifyFinish().addBoth(gone.append)

        def respond(body: bytes) -> None:
            if not gone:
                request.write(body)
                request.finish()

        def failed(failure: Failure) -> None:
            self.log.failure("tracking request {uri} failed", failure, uri=request.uri[:200])
            respond(_plain(request, 500, b"Internal error\n"))

        answered.addCallbacks(respond, failed)
        return server.NOT_DONE_YET


def _text(args: dict[bytes, list[bytes]], name: bytes) -> str:
    values = args.get(name)
    return values[0].decode("utf-8", "replace") if values else ""


def _no_store(request) -> None:
    """Every hit must reach us: nothing may be cached on the way (T-1)."""
    request.setHeader(b"Cache-Control", _NO_STORE)
    request.setHeader(b"Pragma", b"no-cache")
    request.setHeader(b"Expires", b"Thu, 01 Jan 1970 00:00:00 GMT")


def _page_headers(request) -> None:
    """A page addressed by a recipient's token: kept out of search engines and caches,
    and its URL out of the Referer of the links it holds."""
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    request.setHeader(b"X-Robots-Tag", b"noindex, nofollow")
    request.setHeader(b"Referrer-Policy", b"no-referrer")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    _no_store(request)


def _plain(request, code: int, text: bytes) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    _no_store(request)
    return text

