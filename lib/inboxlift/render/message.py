"""One message from one planned recipient: plain Python, no Spark (Spark calls it per partition).

:func:`render_row` takes a recipient as a mapping (the plan row, the user's columns, the planned
products from the catalogue) and returns the outbox columns it computes, or the reason and error
that send the row to ``render_errors`` instead. It never raises for bad data: one broken row must
not stop the batch.

Safety rules (tested in tests/test_render.py):

- values from data are template *variables*, never template source, so ``{{ }}`` in a name stays text;
- HTML bodies are autoescaped; text bodies and subjects are plain text;
- every header value goes through :func:`one_line`, so a CR/LF in a name cannot add a header;
- only absolute http(s) URLs from the catalogue become links or images.
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

from inboxlift.render import engine
from inboxlift.render.links import (
    click_url,
    is_web_url,
    message_id,
    pixel_url,
    unsubscribe_url,
    utm_query,
    with_utm,
)
from inboxlift.settings import RenderSettings

STATUS_RENDERED = "rendered"
STATUS_ERROR = "error"
LIST_UNSUBSCRIBE_POST = "List-Unsubscribe=One-Click"
# Control characters and every character Python's str.splitlines treats as a line break.
_BREAKS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")
_SPACES = re.compile(r" {2,}")
_EMAIL = re.compile(r"[^@\s<>()\[\],;:\"\\]{1,64}@[^@\s<>()\[\],;:\"\\]+\.[^@\s<>()\[\],;:\"\\.]{2,}")
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
    tracking_base_url: str
    unsubscribe_base_url: str
    unsubscribe_mailto: str
    pixel_url: str
    utm_source: str
    utm_medium: str
    max_products: int
    # Out of repr: a config in a log or a traceback must not show the key.
    signing_key: bytes = field(repr=False)
    rendered_at: dt.datetime

    @classmethod
    def from_settings(cls, settings: RenderSettings, *, signing_key: bytes, rendered_at: dt.datetime) -> "RenderConfig":
        return cls(
            from_address=settings.from_address, from_name=settings.from_name,
            postal_address=settings.postal_address, tracking_base_url=settings.tracking_base_url,
            unsubscribe_base_url=settings.unsubscribe_base_url, unsubscribe_mailto=settings.unsubscribe_mailto,
            pixel_url=settings.pixel_url, utm_source=settings.utm_source, utm_medium=settings.utm_medium,
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
    """Text safe for a header: line breaks and control characters become one space."""
    if value is None:
        return ""
    text = str(value)
    # Most values need nothing: printable means no control character and no line separator.
    if text.isprintable() and "  " not in text:
        return text.strip()
    return _SPACES.sub(" ", _BREAKS.sub(" ", text)).strip()


def is_email_address(value: str | None) -> bool:
    return bool(value) and len(value) <= 254 and _EMAIL.fullmatch(value) is not None


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


def _cards(row: Mapping[str, Any], config: RenderConfig, *, locale: str, msg_id: str) -> list[dict[str, Any]]:
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
        link = click_url(config.tracking_base_url, target=target, message_id=msg_id, key=config.signing_key) \
            if config.tracking_base_url else target
        name = one_line(product["name"])
        cards.append({
            "item_id": product.get("item_id"),
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
    to_email = row.get("email")
    if not is_email_address(to_email):
        raise RowError("invalid_email", "the user's email address is missing or malformed")
    campaign_id, user_id = row["campaign_id"], row["user_id"]

    locale = engine.template_locale(row.get("locale"))
    html_template, locale = engine.body_template(row.get("template") or "", locale, "html")
    text_template, _ = engine.body_template(row["template"], locale, "txt")
    zone = _zone(row.get("timezone"))
    msg_id = message_id(campaign_id, user_id, domain=config.domain)
    unsubscribe = unsubscribe_url(config.unsubscribe_base_url, campaign_id=campaign_id, user_id=user_id,
                                  key=config.signing_key)
    context = _as_dict(row.get("context"))
    send_at = row.get("send_at") or config.rendered_at
    values = {
        "lang": locale,
        # None, never "": templates write their own locale's greeting ("Hi there") when it is missing.
        "first_name": one_line(row.get("first_name")) or None,
        "shop_name": config.from_name,
        "postal_address": config.postal_address,
        "campaign": {"id": campaign_id, "type": row.get("campaign_type"), "variant": row.get("variant")},
        "context": context,
        "dates": _formatted_dates(context, zone, locale),
        "date_line": format_day(_local_date(send_at, zone), "full", locale),
        "products": _cards(row, config, locale=locale, msg_id=msg_id),
        "unsubscribe_url": unsubscribe,
        "pixel_url": pixel_url(config.pixel_url, message_id=msg_id),
    }
    subject = one_line(engine.subject_template(row.get("subject_template") or "").render(values))
    if not subject:
        raise RowError("empty_subject", "the subject line renders empty")
    values["subject"] = subject
    headers = {
        "From": formataddr((one_line(config.from_name), config.from_address)),
        "Message-ID": f"<{msg_id}>",
        "List-Unsubscribe": f"<{unsubscribe}>, <mailto:{config.unsubscribe_mailto}?subject=unsubscribe"
                            f"&body={quote(unsubscribe, safe='')}>",
        "List-Unsubscribe-Post": LIST_UNSUBSCRIBE_POST,
        "X-Inboxlift-Campaign": one_line(campaign_id),
        "X-Inboxlift-Variant": one_line(row.get("variant")),
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
