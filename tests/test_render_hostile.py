"""The hostile corpus of rendering (tests/data/hostile/render/): injected values in recipients, and
altered, forged, truncated and ambiguous links. No Spark.

The data files hold inputs only; each case's outcome is written here by hand.
"""

from __future__ import annotations

import datetime as dt
import email
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from email import policy
from pathlib import Path

import pytest

from inboxlift.render import RenderConfig, message_bytes, render_row
from inboxlift.settings import RenderSettings
from inboxlift.tokens import (
    ClickToken,
    OpenToken,
    UnsubscribeToken,
    verify_click_url,
    verify_open_url,
    verify_unsubscribe_url,
)

CORPUS = Path(__file__).resolve().parent / "data" / "hostile" / "render"
KEY = b"hostile-corpus-signing-key-0123456789"
UTC = dt.timezone.utc
ISSUED = dt.datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
SEND_AT = dt.datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
UTM = "utm_source=inboxlift&utm_medium=email&utm_campaign=c1&utm_content=A"
# The only header lines a message may have (a continuation line starts with a space).
HEADER_NAMES = {"From", "To", "Subject", "Date", "Message-ID", "List-Unsubscribe", "List-Unsubscribe-Post",
                "X-Inboxlift-Campaign", "X-Inboxlift-Variant", "MIME-Version", "Content-Type"}
INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff\u2028\u2029]")


def cases(name: str) -> dict[str, dict]:
    return {case["id"]: case for case in json.loads((CORPUS / name).read_text(encoding="utf-8"))["cases"]}


def product(i: int, **changes) -> dict:
    return {"position": i, "item_id": f"i{i}", "source": "als", "name": f"Lamp {i}", "brand": "Lumo",
            "price": Decimal("12.50"), "currency": "USD", "image_url": f"https://img.shop.example/i{i}.jpg",
            "url": f"https://shop.example/p/i{i}", "in_stock": True, "is_found": True, **changes}


def recipient(case: dict) -> dict:
    changes = dict(case.get("recipient", {}))
    if "context" in changes:
        changes["context"] = list(changes["context"].items())
    products = [product(i + 1, **p) for i, p in enumerate(case.get("products", [{}, {}]))]
    return {"campaign_id": "c1", "campaign_type": "weekly_picks", "user_id": "u1", "variant": "A",
            "template": "weekly_picks", "locale": "en",
            "subject_template": "{{ first_name or 'Hi there' }}, your picks for this week", "send_at": SEND_AT,
            "context": [("segment_name", "browsers")], "has_user": True, "email": "ann@mail.example",
            "first_name": "Ann", "timezone": "Europe/London", "email_consent": True, "products": products,
            **changes}


@dataclass(frozen=True)
class Rendered:
    subject: str
    to: str = "ann@mail.example"
    variant_header: str = "A"
    first_target: str = f"https://shop.example/p/i1?{UTM}"


@dataclass(frozen=True)
class Failed:
    reason: str


RECIPIENT_OUTCOMES = {
    "crlf_bcc_in_first_name": Rendered("Ann Bcc: victim@mail.example, your picks for this week"),
    "lf_and_line_separators_in_first_name": Rendered("Ann To: eve@mail.example X: 1, your picks for this week"),
    "bcc_in_a_subject_variable": Rendered("Picks for VIP Bcc: victim@mail.example"),
    "crlf_in_variant": Rendered("Ann, your picks for this week", variant_header="A Reply-To: eve@mail.example",
                                first_target="https://shop.example/p/i1?utm_source=inboxlift&utm_medium=email"
                                             "&utm_campaign=c1&utm_content=A%0D%0AReply-To%3A%20eve%40mail.example"),
    "nul_address": Failed("invalid_email"),
    "comma_address": Failed("invalid_email"),
    "crlf_address": Failed("invalid_email"),
    "two_addresses": Failed("invalid_email"),
    "display_name_address": Failed("invalid_email"),
    "escape_in_address": Failed("invalid_email"),
    "bidi_override_address": Failed("invalid_email"),
    "internationalised_domain": Rendered("Ann, your picks for this week", to="ann@xn--bcher-kva.example"),
    "bidi_override_in_first_name": Rendered("Anngpj.exe, your picks for this week"),
    "bidi_and_format_in_product_name": Rendered("Lamp 1 for you"),
    "name_of_5000_characters": Failed("value_too_long"),
    "subject_variable_of_5000_characters": Failed("subject_too_long"),
    "template_code_in_first_name": Rendered("{{ 7 * 7 }}{% if true %}x{% endif %}, your picks for this week"),
    "html_in_first_name": Rendered("<script>alert(1)</script>, your picks for this week"),
    "duplicated_parameters_in_product_url": Rendered(
        "Ann, your picks for this week", first_target=f"https://shop.example/p/i1?id=1&id=2&{UTM}"),
    "javascript_and_oversized_product_urls": Failed("no_products"),
}


def test_every_recipient_case_has_an_outcome():
    assert set(cases("recipients.json")) == set(RECIPIENT_OUTCOMES)


@pytest.mark.parametrize("case_id", sorted(RECIPIENT_OUTCOMES))
def test_hostile_recipients(case_id):
    row = recipient(cases("recipients.json")[case_id])
    expected = RECIPIENT_OUTCOMES[case_id]
    config = RenderConfig.from_settings(RenderSettings(), signing_key=KEY, rendered_at=ISSUED)
    out = render_row(row, config)
    if isinstance(expected, Failed):
        assert out["reason"] == expected.reason, out["error"]
        assert "to_email" not in out and "html" not in out
        # render_errors holds no personal data: never the address or the name.
        assert "@" not in out["error"] and "AAAA" not in out["error"]
        return

    assert out["reason"] is None, out["error"]
    assert out["subject"] == expected.subject and out["to_email"] == expected.to
    raw = message_bytes({**out, "send_at": SEND_AT})
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")  # headers are 7-bit ASCII, whatever the data
    names = [line.split(":", 1)[0] for line in head.split("\r\n") if not line.startswith(" ")]
    assert sorted(names) == sorted(HEADER_NAMES), names  # each once: nothing injected, nothing lost
    assert f"\r\nTo: {expected.to}\r\n" in head
    assert f"\r\nX-Inboxlift-Variant: {expected.variant_header}\r\n" in head
    [unsubscribe_line] = [line for line in head.split("\r\n") if line.startswith("List-Unsubscribe: ")]
    assert re.fullmatch(r"List-Unsubscribe: <https://t\.shop\.example/u/[A-Za-z0-9_-]+>,", unsubscribe_line)
    parsed = email.message_from_bytes(raw, policy=policy.default)
    assert parsed["Subject"] == expected.subject
    assert f"<title>{expected.subject.replace('<', '&lt;').replace('>', '&gt;')}</title>" in out["html"]
    for value in (out["subject"], *out["headers"].values(), re.search(r"<title>(.*)</title>", out["html"])[1]):
        assert not INVISIBLE.search(value), value
    assert "<script>" not in out["html"]
    click = re.search(r"https://t\.shop\.example/c/[A-Za-z0-9_-]+", out["text"])[0]
    assert verify_click_url(click, key=KEY, now=ISSUED, max_age=None).target == expected.first_target


LINK_PAYLOADS = {
    "genuine_unsubscribe": UnsubscribeToken(
        message_id="0123456789abcdef0123456789abcdef@shop.example", campaign_id="c1", campaign_type="weekly_picks",
        user_id="u1", variant="A", issued_at=ISSUED),
    "genuine_click": ClickToken(
        message_id="0123456789abcdef0123456789abcdef@shop.example", campaign_id="c1", user_id="u1", variant="A",
        position=1, item_id="i1", target=f"https://shop.example/p/i1?{UTM}", issued_at=ISSUED),
    "genuine_open": OpenToken(
        message_id="0123456789abcdef0123456789abcdef@shop.example", campaign_id="c1", user_id="u1", variant="A",
        issued_at=ISSUED),
}
LINK_PAYLOADS["unsubscribe_with_an_appended_parameter"] = LINK_PAYLOADS["genuine_unsubscribe"]
REFUSED_LINKS = {
    "unsubscribe_with_duplicated_parameters", "click_with_duplicated_target_parameters",
    "open_with_duplicated_parameters", "unsubscribe_truncated", "unsubscribe_cut_in_half",
    "unsubscribe_forged_with_another_key", "unsubscribe_for_another_user_mac_kept", "click_to_another_host_mac_kept",
    "click_token_on_the_unsubscribe_path", "unsubscribe_token_on_the_click_path", "open_token_without_gif",
    "unsubscribe_token_padded", "unsubscribe_token_empty", "old_query_signature_link",
    "old_query_signature_duplicated",
}


def verify_all(url: str, now: dt.datetime) -> list:
    max_age = dt.timedelta(days=180)
    return [verify_unsubscribe_url(url, key=KEY), verify_click_url(url, key=KEY, now=now, max_age=max_age),
            verify_open_url(url, key=KEY, now=now, max_age=max_age)]


def test_every_link_case_has_an_outcome():
    assert set(cases("links.json")) == set(LINK_PAYLOADS) | REFUSED_LINKS
    assert not set(LINK_PAYLOADS) & REFUSED_LINKS


@pytest.mark.parametrize("case_id", sorted(set(LINK_PAYLOADS) | REFUSED_LINKS))
def test_hostile_links(case_id):
    url = cases("links.json")[case_id]["url"]
    found = [payload for payload in verify_all(url, ISSUED + dt.timedelta(days=1)) if payload is not None]
    assert found == ([LINK_PAYLOADS[case_id]] if case_id in LINK_PAYLOADS else [])


def test_corpus_links_expire_by_purpose():
    links = cases("links.json")
    ten_years = ISSUED + dt.timedelta(days=3650)
    assert verify_all(links["genuine_unsubscribe"]["url"], ten_years)[0] == LINK_PAYLOADS["genuine_unsubscribe"]
    assert verify_all(links["genuine_click"]["url"], ISSUED + dt.timedelta(days=181)) == [None, None, None]
    assert verify_all(links["genuine_open"]["url"], ISSUED + dt.timedelta(days=181)) == [None, None, None]
