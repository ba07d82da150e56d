"""The tracking and preference service as a Starlette app: clicks, opens, unsubscribes (docs/serve.md).

``build_app(settings=..., key=..., clock=...)`` returns an ASGI app; :mod:`inboxlift.service.entry`
runs it under uvicorn. Routes:

- ``GET /c/<token>``: a click; 302 to the URL the token signs, and only that one.
- ``GET /o/<token>.gif``: an open; a 1x1 GIF, never cached.
- ``POST /u/<token>``: ``List-Unsubscribe=One-Click`` (RFC 8058) unsubscribes from all marketing
  mail at once; the preferences page's form records the person's choice.
- ``GET /u/<token>``: the preferences page.
- ``GET /healthz``: 200 while events can be written, 503 otherwise.

A token that is not genuine (forged, altered, truncated, expired, another kind's) answers 404 and
records nothing; so does a query string that repeats a parameter. Every answer that stands for an
event (a 302, a GIF, a saved choice) is sent only after the event is on disk; when it cannot be
written the answer is 503. HEAD requests get the same answers and record nothing: browsers and mail
clients never send HEAD, link checkers do.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
from pathlib import Path
from typing import AsyncIterator, Mapping
from urllib.parse import quote, urlsplit, urlunsplit

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from inboxlift import tokens
from inboxlift.clock import Clock
from inboxlift.service.agents import AgentRules
from inboxlift.service.events import EventLog, EventLogError
from inboxlift.service.pages import (
    CHOICES,
    Page,
    Pages,
    choices_for,
    issue_form_token,
    negotiate_locale,
    verify_form_token,
)
from inboxlift.settings import Settings

log = logging.getLogger(__name__)

# The smallest transparent GIF: 1x1, one colour, 43 bytes.
PIXEL = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")
NO_STORE = {"Cache-Control": "no-store, no-cache, must-revalidate, max-age=0", "Pragma": "no-cache", "Expires": "0"}
# The token in a tracking URL names a user: it must not travel on as a Referer.
PRIVATE = {**NO_STORE, "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"}
ONE_CLICK = {"List-Unsubscribe": "One-Click"}
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
# json's escaper for ensure_ascii=False (its C version when there is one): quotes and escapes a str.
_quote = json.encoder.encode_basestring
# White space (line breaks included) and control characters: never in a redirect.
_UNSAFE_IN_URL = re.compile(r"[\s\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufeff]")
# Every printable ASCII character but the space stays as it is in a redirect; only others are %-encoded.
_URL_SAFE = "".join(chr(c) for c in range(0x21, 0x7f))


def events_dir(settings: Settings) -> Path:
    """``serve.events_dir``, or ``<paths.landing_dir>/events/serve``."""
    return Path(settings.service_events_dir)


def _iso(instant: dt.datetime) -> str:
    # isoformat is twice as fast as strftime; the clock gives UTC, so the offset is always +00:00.
    if instant.tzinfo is not dt.timezone.utc:
        instant = instant.astimezone(dt.timezone.utc)
    return instant.isoformat(timespec="milliseconds")[:-6] + "Z"


class _EventIds:
    """Random (version 4) UUIDs as text, as ``str(uuid.uuid4())`` makes them, drawn from 4 kB of
    ``os.urandom`` at a time: one system call per 128 events instead of one per event. A forked
    child starts with an empty buffer, so parent and child never hand out the same ids."""

    __slots__ = ("_hex", "_at")
    _VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._hex, self._at = "", 0

    def __call__(self) -> str:
        at = self._at
        if at >= len(self._hex):
            self._hex, at = os.urandom(4096).hex(), 0
        h = self._hex[at:at + 32]
        self._at = at + 32
        # 122 random bits: the version nibble is 4 and the variant's two high bits are 10 (RFC 9562).
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{self._VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


_uuid4 = _EventIds()
os.register_at_fork(after_in_child=_uuid4.reset)


def event_line(*, event_type: str, at: dt.datetime, user_id: str, campaign_id: str, message_id: str,
               item_id: str | None = None, properties: Mapping[str, str]) -> bytes:
    """One landing line (schemas.EVENTS_LANDING keys, empty ones left out, plus ``properties``).

    A consent event's scope (``properties["scope"]``: ``all`` or a campaign type) is also written as
    the landing key ``campaign_type``, which is what ingest scopes suppressions by.

    The same bytes as ``json.dumps(record, ensure_ascii=False, separators=(",", ":"))`` with the
    keys in this order, put together from json's own string escaper: every click and open writes
    one, and a general encoder walking a dict costs more than the few fixed keys need.
    """
    parts = ['{"event_id":"', _uuid4(), '","event_type":', _quote(event_type), ',"event_ts":"', _iso(at),
             '","user_id":', _quote(user_id)]
    scope = properties.get("scope")
    if scope:
        parts += (',"campaign_type":', _quote(scope))
    if item_id:
        parts += (',"item_id":', _quote(item_id))
    if campaign_id:
        parts += (',"campaign_id":', _quote(campaign_id))
    if message_id:
        parts += (',"message_id":', _quote(message_id))
    parts.append(',"properties":{')
    parts.append(",".join([(_KEYS.get(k) or _quoted_key(k)) + _quote(v) for k, v in properties.items() if v]))
    parts.append("}}\n")
    return "".join(parts).encode("utf-8")


# Property names, quoted once: a few names from this module's code, so the dict stays small.
_KEYS: dict[str, str] = {}


def _quoted_key(name: str) -> str:
    _KEYS[name] = quoted = _quote(name) + ":"
    return quoted


class TrackingService:
    """The routes' handlers, sharing the key, the rules, the pages and the event log."""

    def __init__(self, *, settings: Settings, key: bytes, clock: Clock) -> None:
        tokens.check_key(key)
        self.settings = settings
        self.key = key
        self.verifier = tokens.Verifier(key)
        self.clock = clock
        self.max_age = settings.render.tracking_token_max_age
        self.form_max_age = dt.timedelta(minutes=settings.serve.form_max_age_minutes)
        self.max_body = settings.serve.max_body_bytes
        self.agents = AgentRules.from_settings(settings.serve)
        self.pages = Pages(shop_name=settings.render.from_name)
        self.log = EventLog(events_dir(settings), rotate_seconds=settings.serve.rotate_seconds,
                            rotate_bytes=settings.serve.rotate_bytes, now=clock.now,
                            syncs_in_flight=settings.serve.syncs_in_flight)
        base = urlsplit(settings.render.links_base_url)
        self.link_origin = f"{base.scheme}://{base.netloc}".lower()

    # ---- helpers ----------------------------------------------------------------------------

    def _ua_class(self, scope: Scope) -> str:
        # From the scope, as Starlette's Request reads them: the first User-Agent, the client's address.
        user_agent = None
        for name, value in scope["headers"]:
            if name == b"user-agent":
                user_agent = value.decode("latin-1")
                break
        client = scope.get("client")
        return self.agents.classify(user_agent, client[0] if client else None)

    @staticmethod
    def _not_found() -> Response:
        return PlainTextResponse("Not found\n", status_code=404, headers=PRIVATE)

    @staticmethod
    def _query_is_ambiguous(scope: Scope) -> bool:
        # The raw query from the scope: building request.url costs more than the whole check.
        query = scope.get("query_string", b"")
        return bool(query) and tokens.single_values(query.decode("latin-1")) is None

    async def _record(self, line: bytes) -> Response | None:
        """None once ``line`` is on disk; a 503 answer when it cannot be written."""
        try:
            await self.log.append(line)
        except EventLogError:
            return _unavailable()
        return None

    def _page(self, page: Page) -> Response:
        # same-origin, not no-referrer: under no-referrer a browser sends "Origin: null" with the
        # page's own form post, and the origin check could not tell it from a sandboxed attacker.
        # The page links nowhere else, so its URL (the token) still never leaves the service.
        return Response(page.html, status_code=page.status, media_type="text/html; charset=utf-8", headers={
            **PRIVATE, "Referrer-Policy": "same-origin", "X-Frame-Options": "DENY",
            "Content-Security-Policy": self.pages.content_security_policy})

    # ---- routes -----------------------------------------------------------------------------

    # Clicks and opens are the hot path: ASGI apps of their own that TrackingApp calls straight from
    # the path (Starlette's routing, middleware, Request and Response cost more than the click).
    # Their answers are the same bytes either way; other methods still get Starlette's 405.

    async def click(self, scope: Scope, receive: Receive, send: Send, token: str) -> None:
        now = self.clock.now()
        payload = self.verifier.click(token, now=now, max_age=self.max_age)
        if payload is None or self._query_is_ambiguous(scope) or not _is_web_url(payload.target):
            return await self._not_found()(scope, receive, send)
        if scope["method"] == "GET":
            ua_class = self._ua_class(scope)
            try:
                await self.log.append(event_line(
                    event_type="email_click", at=now, user_id=payload.user_id, campaign_id=payload.campaign_id,
                    message_id=payload.message_id, item_id=payload.item_id, properties={
                        "variant": payload.variant, "link_position": str(payload.position),
                        "target_hash": payload.target_hash, "ua_class": ua_class,
                        "is_machine_click": _flag(self.agents.is_machine(ua_class))}))
            except EventLogError:
                return await _unavailable()(scope, receive, send)
        await send({"type": "http.response.start", "status": 302,
                    "headers": [*_REDIRECT_RAW, (b"location", _location(payload.target)), _NO_BODY]})
        await send({"type": "http.response.body", "body": b""})

    async def open(self, scope: Scope, receive: Receive, send: Send, token: str) -> None:
        now = self.clock.now()
        payload = self.verifier.open(token, now=now, max_age=self.max_age)
        if payload is None or self._query_is_ambiguous(scope):
            return await self._not_found()(scope, receive, send)
        if scope["method"] == "GET":
            ua_class = self._ua_class(scope)
            is_machine = self.agents.is_machine_open(ua_class, issued_at=payload.issued_at, opened_at=now)
            try:
                await self.log.append(event_line(
                    event_type="email_open", at=now, user_id=payload.user_id, campaign_id=payload.campaign_id,
                    message_id=payload.message_id, properties={
                        "variant": payload.variant, "ua_class": ua_class, "is_machine_open": _flag(is_machine),
                        "seconds_since_issued": str(max(0, int((now - payload.issued_at).total_seconds())))}))
            except EventLogError:
                return await _unavailable()(scope, receive, send)
        await send({"type": "http.response.start", "status": 200, "headers": _PIXEL_RAW})
        await send({"type": "http.response.body", "body": PIXEL})

    async def preferences(self, request: Request) -> Response:
        token = request.path_params["token"]
        payload = self.verifier.unsubscribe(token)
        locale = negotiate_locale(request.query_params.get("lang"), request.headers.get("accept-language"))
        if payload is None or self._query_is_ambiguous(request.scope):
            return self._page(self.pages.problem(locale=locale, status=404, reason="invalid_link"))
        if request.method == "POST":
            return await self._post(request, token, payload)
        form_token = issue_form_token(key=self.key, token=token, now=self.clock.now())
        return self._page(self.pages.preferences(locale=locale, token=token, form_token=form_token,
                                                 campaign_type=payload.campaign_type))

    async def _post(self, request: Request, token: str, payload: tokens.UnsubscribeToken) -> Response:
        fields = await self._form(request)
        if isinstance(fields, Response):
            return fields
        now = self.clock.now()
        if fields == ONE_CLICK:
            failed = await self._record(self._preference_event(payload, request, at=now, event_type="unsubscribe",
                                                               scope="all", method="one_click"))
            return failed or PlainTextResponse("Unsubscribed\n", headers=PRIVATE)
        locale = negotiate_locale(fields.get("lang"), request.headers.get("accept-language"))
        if set(fields) - {"form_token", "lang", "choice"} or "form_token" not in fields:
            return self._page(self.pages.problem(locale=locale, status=400, reason="bad_request"))
        if not self._same_origin(request) or not verify_form_token(
                fields["form_token"], key=self.key, token=token, now=now, max_age=self.form_max_age):
            return self._page(self.pages.problem(locale=locale, status=403, reason="expired_form"))
        choice = fields.get("choice", "")
        if choice not in choices_for(payload.campaign_type):
            form_token = issue_form_token(key=self.key, token=token, now=now)
            return self._page(self.pages.preferences(locale=locale, token=token, form_token=form_token,
                                                     campaign_type=payload.campaign_type, error="choose"))
        event_type, scope = CHOICES[choice]
        failed = await self._record(self._preference_event(
            payload, request, at=now, event_type=event_type,
            scope=payload.campaign_type if scope == "type" else scope, method="page"))
        return failed or self._page(self.pages.saved(locale=locale, token=token, choice=choice,
                                                     campaign_type=payload.campaign_type))

    async def healthz(self, request: Request) -> Response:
        if self.log.failure:
            return JSONResponse({"status": "failing", "events": "cannot be written"}, status_code=503,
                                headers=NO_STORE)
        return JSONResponse({"status": "ok"}, headers=NO_STORE)

    # ---- the preference form ----------------------------------------------------------------

    def _preference_event(self, payload: tokens.UnsubscribeToken, request: Request, *, at: dt.datetime,
                          event_type: str, scope: str, method: str) -> bytes:
        return event_line(event_type=event_type, at=at, user_id=payload.user_id, campaign_id=payload.campaign_id,
                          message_id=payload.message_id, properties={
                              "variant": payload.variant, "campaign_type": payload.campaign_type, "scope": scope,
                              "method": method, "ua_class": self._ua_class(request.scope)})

    def _same_origin(self, request: Request) -> bool:
        """A browser's form post names its page's origin; one from another site is refused.

        No Origin header (older browsers, privacy settings) is allowed: the form token still has
        to be genuine, fresh and issued for this very link.
        """
        origin = request.headers.get("origin")
        if origin is None:
            return True
        own = f"{request.url.scheme}://{request.url.netloc}".lower()
        return origin.lower() in (own, self.link_origin)

    async def _form(self, request: Request) -> dict[str, str] | Response:
        """The POST body's fields (urlencoded or multipart, as RFC 8058 allows), each at most once."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in FORM_TYPES:
            return PlainTextResponse("Unsupported media type\n", status_code=415, headers=PRIVATE)
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return PlainTextResponse("Request too large\n", status_code=413, headers=PRIVATE)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                return PlainTextResponse("Request too large\n", status_code=413, headers=PRIVATE)
        bad = PlainTextResponse("Bad request\n", status_code=400, headers=PRIVATE)
        if content_type == "multipart/form-data":
            parser = MultiPartParser(Headers(scope=request.scope), _once(bytes(body)), max_files=0, max_fields=10)
            try:
                form = await parser.parse()
            except MultiPartException:
                return bad
            pairs = [(k, v) for k, v in form.multi_items()]
            if any(not isinstance(v, str) for _, v in pairs):
                return bad
            values = dict(pairs)
            return values if len(values) == len(pairs) else bad
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            return bad
        values = tokens.single_values(text)
        return values if values is not None else bad


_PRIVATE_RAW = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in PRIVATE.items()]
_NO_BODY = (b"content-length", b"0")
# A redirect has no body and no HTTP/1.1 cache keeps it under no-store (nor does an HTTP/1.0 one
# without Expires), so Pragma, Expires and nosniff would only add work: each header costs h11 ~1 µs
# to check and write, on every click (docs/serve.md, "Where the time goes").
_REDIRECT_RAW = [(k, v) for k, v in _PRIVATE_RAW if k in (b"cache-control", b"referrer-policy")]
_PIXEL_RAW = [*_PRIVATE_RAW, (b"content-type", b"image/gif"), (b"content-length", str(len(PIXEL)).encode("latin-1"))]


def _unavailable() -> Response:
    return PlainTextResponse("Service unavailable\n", status_code=503, headers={**PRIVATE, "Retry-After": "30"})


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _is_web_url(url: str) -> bool:
    # The token signs the target, so this is a second lock: never a javascript:, data: or relative URL,
    # nor one with white space or control characters (a header's line break).
    if _UNSAFE_IN_URL.search(url):
        return False
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _location(url: str) -> bytes:
    """``url`` as a Location header: ASCII, the host in IDNA, other non-ASCII characters %-encoded."""
    if url.isascii():
        return url.encode("ascii")
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = parts.netloc.replace(host, host.encode("idna").decode("ascii"), 1) if not host.isascii() else parts.netloc
    rest = quote(urlunsplit(("", "", parts.path, parts.query, parts.fragment)), safe=_URL_SAFE)
    return f"{parts.scheme}://{netloc}{rest}".encode("ascii")


class _Route:
    """A click or open handler as the ASGI endpoint of a Starlette route (for methods it refuses with
    405, and for an app mounted under a root path, which TrackingApp leaves to the router)."""

    def __init__(self, handler) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send, scope["path_params"]["token"])


class TrackingApp(Starlette):
    """Starlette, with ``GET``/``HEAD`` of ``/c/<token>`` and ``/o/<token>.gif`` answered before its
    middleware and router: exactly the paths those routes match (a token is one non-empty path
    segment), answered by the same handlers. Anything else takes the routed way."""

    def __init__(self, *, service: TrackingService, **kwargs) -> None:
        super().__init__(**kwargs)
        self.state.service = service
        self._click = service.click
        self._open = service.open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and not scope.get("root_path"):
            path = scope["path"]
            if path.startswith("/c/"):
                token = path[3:]
                if token and "/" not in token:
                    return await self._click(scope, receive, send, token)
            elif path.startswith("/o/") and path.endswith(".gif"):
                token = path[3:-4]
                if token and "/" not in token:
                    return await self._open(scope, receive, send, token)
        await super().__call__(scope, receive, send)


def build_app(*, settings: Settings, key: bytes, clock: Clock) -> Starlette:
    """The service's ASGI app; its event log starts and stops with the app's lifespan."""
    service = TrackingService(settings=settings, key=key, clock=clock)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.log.start()
        log.info("events go to %s", service.log.folder)
        try:
            yield
        finally:
            await service.log.close()

    routes = [
        Route("/c/{token}", _Route(service.click), methods=["GET"]),
        Route("/o/{token}.gif", _Route(service.open), methods=["GET"]),
        Route("/u/{token}", service.preferences, methods=["GET", "POST"]),
        Route("/healthz", service.healthz, methods=["GET"]),
    ]
    return TrackingApp(service=service, routes=routes, lifespan=lifespan)
