"""The preferences page: its language, its choices, its signed form token and its HTML.

The page works without JavaScript (a plain form, posted to the page's own address), in ``en`` and
``zh-CN`` (``?lang=`` first, then the browser's Accept-Language, then ``en``: the link's token names
no locale), and carries nothing about the person in its URL but the token. Forms are CSRF-safe by
a form token: ``base64url(issued-at || HMAC-SHA256(key, "inboxlift-form" 0 unsubscribe-token 0
issued-at)[:16])``, valid for ``serve.form_max_age_minutes`` and for the page's own token only.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import struct
from dataclasses import dataclass
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

LOCALES = ("en", "zh-CN")
DEFAULT_LOCALE = "en"
TEMPLATES = Path(__file__).parent / "templates"

# What a person can choose on the page -> (event type, scope). "type" stands for the campaign type of
# the email the link came from; the first two need one.
UNSUBSCRIBE_TYPE = "unsubscribe_type"
ONLY_TYPE = "only_type"
UNSUBSCRIBE_ALL = "unsubscribe_all"
RESUBSCRIBE_ALL = "resubscribe_all"
CHOICES: dict[str, tuple[str, str]] = {
    UNSUBSCRIBE_TYPE: ("unsubscribe", "type"),
    ONLY_TYPE: ("preference_change", "type"),
    UNSUBSCRIBE_ALL: ("unsubscribe", "all"),
    RESUBSCRIBE_ALL: ("resubscribe", "all"),
}
_TYPE_CHOICES = (UNSUBSCRIBE_TYPE, ONLY_TYPE)

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_ISSUED = struct.Struct(">I")
_MAC_BYTES = 16
# A form token issued a little "in the future" of the verifying worker (clock steps between
# processes or hosts) is still accepted.
_CLOCK_SKEW = dt.timedelta(seconds=60)


def choices_for(campaign_type: str) -> tuple[str, ...]:
    """The choices the page offers for a link of ``campaign_type`` (empty: no per-type choices)."""
    return tuple(c for c in CHOICES if campaign_type or c not in _TYPE_CHOICES)


def negotiate_locale(requested: str | None, accept_language: str | None) -> str:
    """``en`` or ``zh-CN``: an explicit ``?lang=`` if it names one, else the browser's preference."""
    if requested:
        for locale in LOCALES:
            if requested.lower() == locale.lower():
                return locale
    ranked: list[tuple[float, int, str]] = []
    for i, part in enumerate((accept_language or "")[:512].split(",")):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        if params.strip().lower().startswith("q="):
            try:
                quality = float(params.strip()[2:])
            except ValueError:
                continue
        if tag and quality > 0:
            ranked.append((-quality, i, tag.strip().lower()))
    for _, _, tag in sorted(ranked):
        primary = tag.split("-")[0]
        # zh-TW and zh-HK readers get simplified Chinese: the one Chinese the emails are written in.
        if primary == "zh":
            return "zh-CN"
        if primary == "en":
            return "en"
    return DEFAULT_LOCALE


def _form_mac(key: bytes, token: str, issued: bytes) -> bytes:
    message = b"inboxlift-form\x00" + token.encode("ascii") + b"\x00" + issued
    return hmac.digest(key, message, "sha256")[:_MAC_BYTES]


def issue_form_token(*, key: bytes, token: str, now: dt.datetime) -> str:
    """The form token of a page shown for unsubscribe ``token`` at ``now``."""
    issued = _ISSUED.pack(int((now - _EPOCH).total_seconds()))
    return base64.urlsafe_b64encode(issued + _form_mac(key, token, issued)).rstrip(b"=").decode("ascii")


def verify_form_token(form_token: str, *, key: bytes, token: str, now: dt.datetime, max_age: dt.timedelta) -> bool:
    """True for a form token issued for ``token`` at most ``max_age`` ago."""
    if not form_token or len(form_token) > 64 or not form_token.isascii():
        return False
    try:
        raw = base64.urlsafe_b64decode(form_token + "=" * (-len(form_token) % 4))
    except (binascii.Error, ValueError):
        return False
    if len(raw) != _ISSUED.size + _MAC_BYTES:
        return False
    issued, mac = raw[:_ISSUED.size], raw[_ISSUED.size:]
    if not hmac.compare_digest(mac, _form_mac(key, token, issued)):
        return False
    issued_at = _EPOCH + dt.timedelta(seconds=_ISSUED.unpack(issued)[0])
    return issued_at - _CLOCK_SKEW <= now and now - issued_at <= max_age


@dataclass(frozen=True)
class Page:
    status: int
    html: str


class Pages:
    """Renders the service's HTML pages: ``templates/<name>.html`` over one layout, in the words of
    ``templates/<locale>/_words.html``.

    The stylesheet is inlined, and allowed by its hash in the Content-Security-Policy, so a page is
    one response and the policy can forbid every other source.
    """

    def __init__(self, *, shop_name: str) -> None:
        self.shop_name = shop_name
        self.env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]),
                               undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.css = (TEMPLATES / "page.css").read_text(encoding="utf-8")
        digest = base64.b64encode(hashlib.sha256(self.css.encode("utf-8")).digest()).decode("ascii")
        self.content_security_policy = (
            f"default-src 'none'; style-src 'sha256-{digest}'; img-src 'none'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'")

    def _render(self, locale: str, name: str, status: int, **context: object) -> Page:
        template = self.env.get_template(f"{name}.html")
        return Page(status, template.render(lang=locale, locales=LOCALES, css=Markup(self.css), shop_name=self.shop_name,
                                           **context))

    def preferences(self, *, locale: str, token: str, form_token: str, campaign_type: str,
                    error: str | None = None) -> Page:
        return self._render(locale, "preferences", 400 if error else 200, token=token, form_token=form_token,
                            campaign_type=campaign_type, choices=choices_for(campaign_type), error=error)

    def saved(self, *, locale: str, token: str, choice: str, campaign_type: str) -> Page:
        return self._render(locale, "saved", 200, token=token, choice=choice, campaign_type=campaign_type)

    def problem(self, *, locale: str, status: int, reason: str) -> Page:
        """``reason``: ``invalid_link`` (404), ``expired_form`` (403), ``bad_request`` (400)."""
        return self._render(locale, "problem", status, reason=reason)
