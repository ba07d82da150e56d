"""Links and ids inside an email: the Message-ID, tracking parameters, which URLs may become links.

The signed links themselves (unsubscribe, click, open) are tokens: :mod:`inboxlift.tokens`. These
functions run ~10 times per email, so they build strings directly where ``urlencode`` would give the
same text several times slower.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

# Longer product or image URLs are not linked: browsers and servers refuse URLs of some kB, and a
# click token carries its target.
MAX_URL_CHARS = 2048
_WEB_URL = re.compile(r"https?://[^/?#\s\x00-\x1f\x7f]+[^\s\x00-\x1f\x7f]*", re.IGNORECASE)


def message_id(campaign_id: str, user_id: str, plan_date: dt.date | None, *, domain: str) -> str:
    """The deterministic id of the one message a user gets from a campaign's plan of one day:
    ``<hex>@<domain>``.

    A re-render of the same day computes the same id, so writing the outbox by this key replaces,
    never duplicates; the next day's plan of a recurring campaign is a new message with a new id,
    which the send stage sends again (a sent message is never sent twice). The header form adds
    angle brackets: ``Message-ID: <hex@domain>``.
    """
    day = plan_date.isoformat() if plan_date is not None else None
    payload = json.dumps([campaign_id, user_id, day], ensure_ascii=True, separators=(",", ":")).encode("ascii")
    return f"{hashlib.sha256(payload).hexdigest()[:32]}@{domain}"


def utm_query(*, source: str, medium: str, campaign: str, content: str) -> str:
    """The utm parameters of one message's links, as a query string (the same for all its products)."""
    return urlencode({"utm_source": source, "utm_medium": medium, "utm_campaign": campaign,
                      "utm_content": content}, quote_via=quote)


def with_utm(url: str, utm: str) -> str:
    """``url`` with the query string ``utm`` of :func:`utm_query`. Every ``utm_*`` parameter the URL
    had is dropped (repeated ones too), so each appears once; the shop's own parameters are kept as
    they are, in order."""
    if "?" not in url and "#" not in url:
        return f"{url}?{utm}"
    scheme, netloc, path, query, fragment = urlsplit(url)
    kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if not k.startswith("utm_")]
    query = f"{urlencode(kept, quote_via=quote)}&{utm}" if kept else utm
    return urlunsplit((scheme, netloc, path, query, fragment))


def is_web_url(url: str | None) -> bool:
    """An absolute http(s) URL of at most :data:`MAX_URL_CHARS` without whitespace or control
    characters: the only links emails carry (a ``javascript:`` or ``data:`` URL from the catalogue
    must never become a link)."""
    return bool(url) and len(url) <= MAX_URL_CHARS and _WEB_URL.fullmatch(url) is not None
