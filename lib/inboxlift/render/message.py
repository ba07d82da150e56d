"""One message from one planned recipient: plain Python, no Spark (Spark calls it per partition).

:func:`render_row` takes a recipient as a mapping (the plan row, the user's columns, the planned
products from the catalogue) and returns the outbox columns it computes, or the reason and error
that send the row to ``render_errors`` instead. It never raises for bad data: one broken row must
not stop the batch.

Safety rules (tested in tests/test_render.py):

- values from data are template *variables*, never template source, so ``{{ }}`` in a name stays text;
- HTML bodies are autoescaped; text bodies and subjects are plain text;
- every value that reaches a header, the subject or ``<title>`` goes through :func:`one_line`, so a
  CR/LF in a name cannot add a header and bidi controls cannot reorder what the reader sees;
- addresses are validated with ``email-validator`` (:mod:`inboxlift.addresses`) before a ``To:``;
- only absolute http(s) URLs from the catalogue become links or images; links are signed tokens
  (:mod:`inboxlift.tokens`).
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from dataclasses import dataclass, field
from decimal import Decimal
from email.utils import formataddr
from typing import Any, Mapping
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel.dates import format_date, format_skeleton
from babel.numbers import format_currency
from jinja2 import TemplateNotFound, TemplateSyntaxError, UndefinedError
from jinja2.exceptions import SecurityError, TemplateError

from inboxlift.addresses import ascii_address
from inboxlift.render import engine
from inboxlift.render.links import is_web_url, message_id, utm_query, with_utm
from inboxlift.settings import RenderSettings
from inboxlift.tokens import CLICK, OPEN, UNSUBSCRIBE, MessageTokens, check_key, link_url

STATUS_RENDERED = "rendered"
STATUS_ERROR = "error"
LIST_UNSUBSCRIBE_POST = "List-Unsubscribe=One-Click"
# Whitespace controls and every character Python's str.splitlines treats as a line break: one space.
_BREAKS = re.compile(r"[\t\n\v\f\r\x1c-\x1e\x85\u2028\u2029]+")
# Removed: the other C0 and C1 controls (NUL...), DEL, and the bidi and format characters that
# reorder or hide text (U+202A-U+202E embeddings and overrides, U+2066-U+2069 isolates, U+200E/U+200F
# marks, U+061C, U+FEFF). Joiners (U+200C/U+200D) stay: scripts and emoji need them.
_INVISIBLE = re.compile("[\x00-\x08\x0e-\x1b\x1f\x7f-\x84\x86-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff]+")
_SPACES = re.compile(r" {2,}")
# Longer first names fail the row (value_too_long); longer subject lines fail it too (subject_too_long).
MAX_NAME_CHARS = 100
MAX_SUBJECT_CHARS = 250
# Link positions in click tokens: 0 the call to action, 1.. the product cards in the order shown.
CTA_POSITION = 0
# Context values with these names (or ending so) are ISO dates or timestamps, shown as local dates.
_DATE_SUFFIXES = ("_at", "_date", "_on")
_DATE_KEYS = ("birthday",)
_MAX_ERROR = 1000


@dataclass(frozen=True)
class RenderConfig:
    """What every row's rendering needs besides its data; small and picklable (sent to workers)."""

    from_address: str
    from_name: str
    postal_address: str
    # Without a trailing slash: <links_base_url>/u/<token>, /c/<token>, /o/<token>.gif.
    links_base_url: str
    track_clicks: bool
    unsubscribe_mailto: str
    utm_source: str
    utm_medium: str
    max_products: int
    # Out of repr: a config in a log or a traceback must not show the key.
    signing_key: bytes = field(repr=False)
    rendered_at: dt.datetime

    def __post_init__(self) -> None:
        check_key(self.signing_key)

    @classmethod
    def from_settings(cls, settings: RenderSettings, *, signing_key: bytes, rendered_at: dt.datetime) -> "RenderConfig":
        return cls(
            from_address=settings.from_address, from_name=settings.from_name,
            postal_address=settings.postal_address, links_base_url=settings.links_base_url.rstrip("/"),
            track_clicks=settings.track_clicks, unsubscribe_mailto=settings.unsubscribe_mailto,
            utm_source=settings.utm_source, utm_medium=settings.utm_medium,
            max_products=settings.max_products, signing_key=signing_key, rendered_at=rendered_at,
        )

    @property
    def domain(self) -> str:
        return self.from_address.rsplit("@", 1)[1]


class RowError(Exception):
    """Data that cannot make a message; ``reason`` is the render_errors reason.

    Messages never quote names or addresses: render_errors is no place for personal data.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def one_line(value: Any) -> str:
    """Text safe for a header, a subject or a title: line breaks become one space; other control
    characters and bidi/format characters (``_INVISIBLE``) are removed; spaces collapse."""
    if value is None:
        return ""
    text = str(value)
    # Most values need nothing: printable means no control, format (Cf) or line separator character.
    if text.isprintable() and "  " not in text:
        return text.strip()
    return _SPACES.sub(" ", _BREAKS.sub(" ", _INVISIBLE.sub("", text))).strip()


@functools.lru_cache(maxsize=65536)
def format_money(amount: Decimal | str, currency: str, locale: str) -> str:
    """``amount`` (a Decimal or its text) in ``currency`` as written in ``locale`` (en: $1,234.50;
    zh-CN: US$1,234.50)."""
    try:
        value = amount if isinstance(amount, Decimal) else Decimal(amount)
    except ArithmeticError:
        raise RowError("bad_value", "a product price is not a decimal number") from None
    return format_currency(value, currency, locale=engine.babel_locale(locale))


@functools.lru_cache(maxsize=4096)
def format_day(day: dt.date, style: str, locale: str) -> str:
    """A date as written in ``locale``: a Babel format ("full", "long") or the skeleton "MMMMd"
    (month and day, no year, for birthdays). Cached: a campaign's emails share a handful of dates."""
    babel = engine.babel_locale(locale)
    if style == "MMMMd":
        return format_skeleton(style, day, locale=babel)
    return format_date(day, format=style, locale=babel)


def _local_date(value: Any, zone: dt.tzinfo) -> dt.date:
    if isinstance(value, dt.datetime):
        instant = value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
        return instant.astimezone(zone).date()
    if isinstance(value, dt.date):
        return value
    text = str(value).strip()
    if len(text) == 10:
        return dt.date.fromisoformat(text)
    return _local_date(dt.datetime.fromisoformat(text.replace("Z", "+00:00")), zone)


def _plan_day(value: Any) -> dt.date | None:
    """The plan day of a row (a date, or its ISO text); None for a plan written before it existed."""
    if value is None or isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        return value
    return dt.date.fromisoformat(str(value)[:10])


def _zone(name: str | None) -> dt.tzinfo:
    try:
        return ZoneInfo(name) if name else dt.timezone.utc
    except (ZoneInfoNotFoundError, ValueError):
        return dt.timezone.utc


def _as_dict(context: Any) -> dict[str, str]:
    if context is None:
        return {}
    # Arrow hands a map over as a list of (key, value) pairs.
    items = context.items() if isinstance(context, Mapping) else context
    return {str(k): ("" if v is None else str(v)) for k, v in items}


def _formatted_dates(context: Mapping[str, str], zone: dt.tzinfo, locale: str) -> dict[str, str]:
    dates = {}
    for key, value in context.items():
        if not (key in _DATE_KEYS or key.endswith(_DATE_SUFFIXES)) or not value:
            continue
        try:
            day = _local_date(value, zone)
        except ValueError:
            raise RowError("bad_value", f"context value {key!r} is not an ISO date or timestamp") from None
        # A birthday is a day of the year, shown without the year.
        dates[key] = format_day(day, "MMMMd" if key in _DATE_KEYS else "long", locale)
    return dates


def _cards(row: Mapping[str, Any], config: RenderConfig, *, locale: str,
           tokens: MessageTokens) -> list[dict[str, Any]]:
    planned = row.get("products") or []
    cards = []
    utm = utm_query(source=config.utm_source, medium=config.utm_medium, campaign=row["campaign_id"],
                    content=row.get("variant") or "")
    for product in planned:
        if len(cards) >= config.max_products:
            break
        usable = (product.get("is_found") and product.get("in_stock") is not False and product.get("name")
                  and product.get("price") is not None and product.get("currency") and is_web_url(product.get("url")))
        if not usable:
            continue
        target = with_utm(product["url"], utm)
        position = len(cards) + 1
        link = link_url(config.links_base_url, CLICK, tokens.click(position, product.get("item_id"), target)) \
            if config.track_clicks else target
        name = one_line(product["name"])
        cards.append({
            "item_id": product.get("item_id"),
            "target": target,
            "name": name,
            "brand": one_line(product.get("brand")) or None,
            "price": format_money(product["price"], product["currency"], locale),
            "image_url": product["image_url"] if is_web_url(product.get("image_url")) else None,
            "alt": name,
            "link": link,
            "source": product.get("source"),
        })
    if planned and not cards:
        raise RowError("no_products", f"none of the {len(planned)} planned items is in the catalogue, "
                                      "in stock, priced and linked")
    return cards


def render_message(row: Mapping[str, Any], config: RenderConfig) -> dict[str, Any]:
    """The computed outbox columns of one recipient; raises :class:`RowError` or a Jinja2 error."""
    if not row.get("has_user"):
        raise RowError("unknown_user", "the user_id has no row in users")
    if row.get("email_consent") is not True:
        raise RowError("no_consent", "the user has not consented to email (checked again at render time)")
    to_email = ascii_address(row.get("email"))
    if to_email is None:
        raise RowError("invalid_email", "the user's email address is missing or malformed")
    campaign_id, user_id, variant = row["campaign_id"], row["user_id"], row.get("variant")
    first_name = one_line(row.get("first_name")) or None
    if first_name is not None and len(first_name) > MAX_NAME_CHARS:
        raise RowError("value_too_long", f"first_name is longer than {MAX_NAME_CHARS} characters")

    locale = engine.template_locale(row.get("locale"))
    html_template, locale = engine.body_template(row.get("template") or "", locale, "html")
    text_template, _ = engine.body_template(row["template"], locale, "txt")
    zone = _zone(row.get("timezone"))
    msg_id = message_id(campaign_id, user_id, _plan_day(row.get("plan_date")), domain=config.domain)
    tokens = MessageTokens(key=config.signing_key, issued_at=config.rendered_at, message_id=msg_id,
                           campaign_id=campaign_id, user_id=user_id, variant=variant)
    unsubscribe = link_url(config.links_base_url, UNSUBSCRIBE, tokens.unsubscribe(row.get("campaign_type")))
    cards = _cards(row, config, locale=locale, tokens=tokens)
    cta = None
    if cards:
        first = cards[0]
        cta = link_url(config.links_base_url, CLICK, tokens.click(CTA_POSITION, first["item_id"], first["target"])) \
            if config.track_clicks else first["target"]
    context = _as_dict(row.get("context"))
    send_at = row.get("send_at") or config.rendered_at
    values = {
        "lang": locale,
        # None, never "": templates write their own locale's greeting ("Hi there") when it is missing.
        "first_name": first_name,
        "shop_name": config.from_name,
        "postal_address": config.postal_address,
        "campaign": {"id": campaign_id, "type": row.get("campaign_type"), "variant": variant},
        "context": context,
        "dates": _formatted_dates(context, zone, locale),
        "date_line": format_day(_local_date(send_at, zone), "full", locale),
        "products": cards,
        "cta_url": cta,
        "unsubscribe_url": unsubscribe,
        "pixel_url": link_url(config.links_base_url, OPEN, tokens.open()),
    }
    subject = one_line(engine.subject_template(row.get("subject_template") or "").render(values))
    if not subject:
        raise RowError("empty_subject", "the subject line renders empty")
    if len(subject) > MAX_SUBJECT_CHARS:
        raise RowError("subject_too_long", f"the subject line is longer than {MAX_SUBJECT_CHARS} characters")
    values["subject"] = subject
    headers = {
        "From": formataddr((one_line(config.from_name), config.from_address)),
        "Message-ID": f"<{msg_id}>",
        "List-Unsubscribe": f"<{unsubscribe}>, <mailto:{config.unsubscribe_mailto}?subject=unsubscribe"
                            f"&body={quote(unsubscribe, safe='')}>",
        "List-Unsubscribe-Post": LIST_UNSUBSCRIBE_POST,
        "X-Inboxlift-Campaign": one_line(campaign_id),
        "X-Inboxlift-Variant": one_line(variant),
    }
    return {
        "message_id": msg_id,
        "to_email": to_email,
        "subject": subject,
        "html": html_template.render(values),
        "text": text_template.render(values),
        "headers": headers,
    }


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, RowError):
        return exc.reason
    if isinstance(exc, UndefinedError):
        return "undefined_value"
    if isinstance(exc, SecurityError):
        return "sandbox_violation"
    if isinstance(exc, TemplateNotFound):
        return "template_missing"
    if isinstance(exc, TemplateSyntaxError):
        return "template_syntax"
    if isinstance(exc, TemplateError):
        return "template_error"
    return "render_failed"


def render_row(row: Mapping[str, Any], config: RenderConfig) -> dict[str, Any]:
    """:func:`render_message`'s columns plus ``reason`` and ``error`` (both None when it rendered);
    a failing row has only ``reason`` and ``error``."""
    try:
        rendered = render_message(row, config)
    except Exception as exc:  # noqa: BLE001 - any failure of one row goes to render_errors, the batch goes on
        return {"reason": failure_reason(exc), "error": f"{type(exc).__name__}: {exc}"[:_MAX_ERROR]}
    rendered["reason"] = None
    rendered["error"] = None
    return rendered
