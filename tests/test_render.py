"""Rendering: the row and partition functions without Spark, then the stage through Spark.

Expected values are written out by hand (Babel's and CLDR's spellings were read off once and typed in).
"""

from __future__ import annotations

import datetime as dt
import email
import hashlib
import json
import re
from decimal import Decimal
from email import policy
from urllib.parse import quote

import pyarrow as pa
import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    BooleanType,
    DateType,
    DecimalType,
    IntegerType,
    MapType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from inboxlift.render import RenderConfig, render_row
from inboxlift.render.eml import MessageError, eml_bytes, message_bytes
from inboxlift.render.frames import render_plan, task_catalogue
from inboxlift.render.partition import RENDERED_ARROW_SCHEMA, TaskCatalogue, render_batches
from inboxlift.settings import RenderSettings, SettingsError
from inboxlift.stages.render import export_eml, preview, run_render
from inboxlift.tokens import ClickToken, OpenToken, UnsubscribeToken, verify_click_url, verify_open_url, \
    verify_unsubscribe_url

KEY = b"test-signing-key-0123456789abcdef"
UTC = dt.timezone.utc
RENDERED_AT = dt.datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
SEND_AT = dt.datetime(2026, 11, 21, 9, 0, tzinfo=UTC)


def make_config() -> RenderConfig:
    return RenderConfig.from_settings(RenderSettings(), signing_key=KEY, rendered_at=RENDERED_AT)


def product(i: int, **changes) -> dict:
    base = dict(position=i, item_id=f"i{i}", source="als", name=f"Lamp {i}", brand="Lumo", category="Home",
                price=Decimal("1234.50"), currency="USD", image_url=f"https://img.shop.example/i{i}.jpg",
                url=f"https://shop.example/p/i{i}", in_stock=True, is_found=True)
    base.update(changes)
    return base


def recipient(**changes) -> dict:
    base = dict(campaign_id="c1", campaign_type="weekly_picks", user_id="u1", variant="A", template="weekly_picks",
                locale="en", subject_template="{{ first_name or 'Hi there' }}, your picks for this week",
                send_at=SEND_AT, context=[("segment_name", "bargain hunters")], has_user=True,
                email="ann@mail.example", first_name="Ann", timezone="Europe/London", email_consent=True,
                products=[product(1), product(2)])
    base.update(changes)
    return base


def hand_message_id(campaign_id: str, user_id: str, day: str | None = None) -> str:
    """sha256 of ``["campaign","user","YYYY-MM-DD"]`` (the plan day; null for a row without one)."""
    return hashlib.sha256(json.dumps([campaign_id, user_id, day]).replace(" ", "").encode()).hexdigest()[:32] \
        + "@shop.example"


def parse_eml(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=policy.default)


# ---- one row, no Spark ---------------------------------------------------------------------------

def links(text: str, kind: str) -> list[str]:
    """The tracking service's links of one kind ("u", "c", "o") in a text, in order."""
    return re.findall(r"https://t\.shop\.example/%s/[A-Za-z0-9_-]+(?:\.gif)?" % kind, text)


def test_a_row_renders_subject_bodies_links_and_headers():
    out = render_row(recipient(), make_config())
    assert out["reason"] is None and out["error"] is None
    assert out["subject"] == "Ann, your picks for this week"
    assert out["to_email"] == "ann@mail.example"
    msg_id = hand_message_id("c1", "u1")
    assert out["message_id"] == msg_id
    text, html = out["text"], out["html"]
    assert "Hi Ann," in text and "Great value this week: these picks are chosen for you." in text
    assert "- Lamp 1 (Lumo): $1,234.50" in text
    assert "Saturday, November 21, 2026" in text
    assert '<img class="card-img" src="https://img.shop.example/i1.jpg" alt="Lamp 1"' in html
    assert html.index("Lamp 1") < html.index("Lamp 2")
    assert 'width="1" height="1" alt=""' in html
    assert html.count("<img") == 3  # two product images and the pixel

    # The open pixel: <base>/o/<token>.gif naming the message.
    [pixel] = links(html, "o")
    assert pixel.endswith(".gif") and f'<img src="{pixel}" width="1"' in html
    assert verify_open_url(pixel, key=KEY, now=RENDERED_AT, max_age=None) == OpenToken(
        message_id=msg_id, campaign_id="c1", user_id="u1", variant="A", issued_at=RENDERED_AT)

    # Product links: signed click tokens carrying the product page with utm parameters; the cards are
    # positions 1 and 2, the call to action position 0 (to the first card's product).
    utm = "?utm_source=inboxlift&utm_medium=email&utm_campaign=c1&utm_content=A"
    clicks = links(text, "c")
    assert len(clicks) == 2
    assert [verify_click_url(c, key=KEY, now=RENDERED_AT, max_age=None) for c in clicks] == [
        ClickToken(message_id=msg_id, campaign_id="c1", user_id="u1", variant="A", position=i, item_id=f"i{i}",
                   target=f"https://shop.example/p/i{i}{utm}", issued_at=RENDERED_AT) for i in (1, 2)]
    html_clicks = links(html, "c")
    assert html_clicks.count(clicks[0]) == 3 and html_clicks.count(clicks[1]) == 3  # image, name, "View product"
    [cta] = [c for c in html_clicks if c not in clicks]
    cta_token = verify_click_url(cta, key=KEY, now=RENDERED_AT, max_age=None)
    assert (cta_token.position, cta_token.item_id, cta_token.target) == (0, "i1", f"https://shop.example/p/i1{utm}")
    assert f'<a href="{cta}" style="display:inline-block;' in html

    headers = out["headers"]
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert headers["Message-ID"] == f"<{msg_id}>"
    assert headers["From"] == "Example Shop <news@shop.example>"
    [unsubscribe] = links(headers["List-Unsubscribe"], "u")
    assert headers["List-Unsubscribe"] == (f"<{unsubscribe}>, <mailto:unsubscribe@shop.example?subject=unsubscribe"
                                           f"&body={quote(unsubscribe, safe='')}>")
    assert verify_unsubscribe_url(unsubscribe, key=KEY) == UnsubscribeToken(
        message_id=msg_id, campaign_id="c1", campaign_type="weekly_picks", user_id="u1", variant="A",
        issued_at=RENDERED_AT)
    assert links(html, "u") == [unsubscribe] and links(text, "u") == [unsubscribe]


def test_links_go_straight_to_the_shop_without_click_tracking():
    config = RenderConfig.from_settings(RenderSettings(track_clicks=False), signing_key=KEY, rendered_at=RENDERED_AT)
    out = render_row(recipient(), config)
    assert links(out["html"], "c") == [] and links(out["text"], "c") == []
    utm = "?utm_source=inboxlift&utm_medium=email&utm_campaign=c1&utm_content=A"
    assert f"  https://shop.example/p/i1{utm}\n" in out["text"]
    assert out["html"].count(f'href="https://shop.example/p/i1{utm.replace("&", "&amp;")}"') == 4  # card x3, CTA
    assert len(links(out["html"], "u")) == 1 and len(links(out["html"], "o")) == 1


def test_links_base_url_may_end_with_a_slash_or_carry_a_path():
    config = RenderConfig.from_settings(RenderSettings(links_base_url="https://shop.example/t/"), signing_key=KEY,
                                        rendered_at=RENDERED_AT)
    out = render_row(recipient(), config)
    [unsubscribe] = re.findall(r"<(https://shop\.example/t/u/[A-Za-z0-9_-]+)>", out["headers"]["List-Unsubscribe"])
    assert verify_unsubscribe_url(unsubscribe, key=KEY).user_id == "u1"
    assert "https://shop.example/t//" not in out["html"]


@pytest.mark.parametrize("changes, key", [
    (dict(links_base_url="ftp://t.shop.example"), "links_base_url"),
    (dict(links_base_url="https://t.shop.example/?next=1"), "links_base_url"),
    (dict(links_base_url="https://t.shop.example/#top"), "links_base_url"),
    (dict(links_base_url="https://t.shop.example/a b"), "links_base_url"),
    (dict(links_base_url="https://user@t.shop.example"), "links_base_url"),
    (dict(links_base_url="https://t.bücher.example"), "links_base_url"),
    (dict(links_base_url="https://"), "links_base_url"),
    (dict(tracking_token_max_age_days=-1), "tracking_token_max_age_days"),
    (dict(from_address="news@bücher.example"), "from_address"),
    (dict(unsubscribe_mailto="a,b@shop.example"), "unsubscribe_mailto"),
    (dict(from_name="Shop\u202e"), "from_name"),
])
def test_render_link_settings_are_validated(changes, key):
    with pytest.raises(SettingsError, match=f"render.{key}"):
        RenderSettings(**changes)


def test_tracking_token_max_age_setting():
    assert RenderSettings().tracking_token_max_age == dt.timedelta(days=180)
    assert RenderSettings(tracking_token_max_age_days=0).tracking_token_max_age is None


def test_message_id_is_deterministic_per_campaign_user_and_plan_day():
    config = make_config()
    day = dt.date(2026, 11, 20)
    first = render_row(recipient(first_name="Ann", plan_date=day), config)["message_id"]
    again = render_row(recipient(first_name="Annie", variant="B", plan_date=day), config)["message_id"]
    other_user = render_row(recipient(user_id="u2", plan_date=day), config)["message_id"]
    other_campaign = render_row(recipient(campaign_id="c2", plan_date=day), config)["message_id"]
    # A recurring campaign's next plan day is another message (the send stage sends it again).
    next_week = render_row(recipient(plan_date=dt.date(2026, 11, 27)), config)["message_id"]
    no_day = render_row(recipient(), config)["message_id"]
    assert first == again == hand_message_id("c1", "u1", "2026-11-20")
    assert next_week == hand_message_id("c1", "u1", "2026-11-27")
    assert no_day == hand_message_id("c1", "u1")
    assert len({first, other_user, other_campaign, next_week, no_day}) == 5


def test_fallback_greeting_when_the_first_name_is_missing_or_blank():
    for missing in (None, "", "   "):
        out = render_row(recipient(first_name=missing), make_config())
        assert out["subject"] == "Hi there, your picks for this week"
        assert "Hi there," in out["text"] and "Hi ," not in out["text"]
        assert "Hi there," in out["html"]
    zh = render_row(recipient(first_name=None, locale="zh-CN"), make_config())
    assert "\n您好！\n" in zh["text"]


def test_locale_formats_money_and_dates_and_falls_back_to_english():
    cart = dict(campaign_type="abandoned_cart", template="abandoned_cart",
                context=[("cart_added_at", "2026-11-19T08:00:00Z")],
                products=[product(1, source="cart"), product(2, source="similar", price=Decimal("5"),
                                                                currency="EUR")])
    en = render_row(recipient(**cart, locale="en"), make_config())
    zh = render_row(recipient(**cart, locale="zh-CN", timezone="Asia/Shanghai"), make_config())
    underscore = render_row(recipient(**cart, locale="zh_CN"), make_config())
    french = render_row(recipient(**cart, locale="fr-FR"), make_config())
    assert "- Lamp 1: $1,234.50" in en["text"] and "- Lamp 2: €5.00" in en["text"]
    assert "You added these on November 19, 2026" in en["text"]
    assert "- Lamp 1: US$1,234.50" in zh["text"] and "- Lamp 2: €5.00" in zh["text"]
    assert "您在2026年11月19日加入购物车的商品还在等您。" in zh["text"]
    assert "2026年11月21日星期六" in zh["text"]
    assert '<html lang="zh-CN">' in zh["html"] and "购物车中的商品" in zh["html"]
    assert "US$1,234.50" in underscore["text"]
    assert "You added these on November 19, 2026" in french["text"] and '<html lang="en">' in french["html"]


def test_a_price_may_come_as_decimal_text():
    out = render_row(recipient(products=[product(1, price="1234.5"), product(2, price=Decimal("0.99"))]),
                     make_config())
    assert "- Lamp 1 (Lumo): $1,234.50" in out["text"] and "- Lamp 2 (Lumo): $0.99" in out["text"]


def test_send_date_is_the_users_local_date():
    late_evening_in_la = dt.datetime(2026, 11, 21, 1, 0, tzinfo=UTC)
    la = render_row(recipient(send_at=late_evening_in_la, timezone="America/Los_Angeles"), make_config())
    london = render_row(recipient(send_at=late_evening_in_la, timezone="Europe/London"), make_config())
    assert "Friday, November 20, 2026" in la["text"]
    assert "Saturday, November 21, 2026" in london["text"]


def test_birthday_shows_the_day_without_the_year_in_each_locale():
    bday = dict(campaign_type="birthday", template="birthday", context=[("birthday", "1990-03-07")], products=[])
    en = render_row(recipient(**bday), make_config())
    zh = render_row(recipient(**bday, locale="zh-CN"), make_config())
    assert "March 7 is your day" in en["text"] and "1990" not in en["text"]
    assert "3月7日是您的生日" in zh["text"]
    assert "<img" in en["html"] and en["html"].count("<img") == 1  # the pixel only: no products planned


def test_every_campaign_type_renders_in_both_locales():
    types = ["weekly_picks", "abandoned_cart", "browse_abandonment", "win_back", "new_arrivals", "birthday",
             "cross_sell"]
    for campaign_type in types:
        for locale in ("en", "zh-CN"):
            out = render_row(recipient(campaign_type=campaign_type, template=campaign_type, locale=locale),
                             make_config())
            assert out["reason"] is None, (campaign_type, locale, out["error"])
            assert "Lamp 2" in out["text"] and "Lamp 2" in out["html"]
            assert ('<html lang="%s">' % locale) in out["html"]


def test_one_sandboxed_environment_per_process_and_none_in_the_pickled_task():
    import functools
    import pickle

    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment
    from pyspark import cloudpickle

    from inboxlift.render import engine

    render_row(recipient(), make_config())
    first = engine.environment()
    for user in ("u2", "u3", "u4"):
        render_row(recipient(user_id=user, locale="zh-CN"), make_config())
    assert engine.environment() is first
    assert isinstance(first, SandboxedEnvironment) and first.undefined is StrictUndefined
    assert first.autoescape("en/weekly_picks.html") is True and first.autoescape("en/weekly_picks.txt") is False
    # What Spark ships to workers: the function by reference and the small config, no environment.
    task = cloudpickle.dumps(functools.partial(render_batches, config=make_config()))
    assert b"SandboxedEnvironment" not in task and b"jinja2" not in task and len(task) < 2000
    assert pickle.loads(task).keywords["config"] == make_config()


# ---- safety ----------------------------------------------------------------------------------------

def test_line_breaks_in_data_cannot_add_headers():
    name = "Ann\r\nBcc: victim@mail.example\nX-Evil: 1"
    out = render_row(recipient(first_name=name, variant="A\r\nX-Injected: yes"), make_config())
    assert out["subject"] == "Ann Bcc: victim@mail.example X-Evil: 1, your picks for this week"
    assert all("\r" not in v and "\n" not in v for v in out["headers"].values())
    raw = eml_bytes({**out, "send_at": SEND_AT})
    parsed = parse_eml(raw)
    assert parsed["Bcc"] is None and parsed["X-Evil"] is None and parsed["X-Injected"] is None
    assert parsed["Subject"] == "Ann Bcc: victim@mail.example X-Evil: 1, your picks for this week"
    assert parsed["X-Inboxlift-Variant"] == "A X-Injected: yes"
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nBcc:" not in head and b"\r\nX-Evil" not in head and b"\r\nX-Injected" not in head
    assert b"\r\nSubject: Ann Bcc: victim@mail.example X-Evil: 1, your picks for this week\r\n" in head
    # An address with a line break is refused, not cleaned into some other address.
    bad = render_row(recipient(email="ann@mail.example\r\nBcc: victim@mail.example"), make_config())
    assert bad["reason"] == "invalid_email" and "victim" not in bad["error"]


def header_block(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def test_url_and_id_headers_are_raw_ascii_folded_only_between_list_items():
    # Read as bytes: Python's parser decodes RFC 2047 words, which hid List-Unsubscribe's encoding.
    out = render_row(recipient(), make_config())
    [unsubscribe] = links(out["headers"]["List-Unsubscribe"], "u")
    raw = message_bytes({**out, "send_at": SEND_AT})
    msg_id = hand_message_id("c1", "u1")
    boundary = hashlib.sha256(out["text"].encode() + b"\x00" + out["html"].encode()).hexdigest()[:32]
    assert header_block(raw) == [
        b"From: Example Shop <news@shop.example>",
        b"To: ann@mail.example",
        b"Subject: Ann, your picks for this week",
        b"Date: Sat, 21 Nov 2026 09:00:00 +0000",
        f"Message-ID: <{msg_id}>".encode(),
        f"List-Unsubscribe: <{unsubscribe}>,".encode(),
        f" <mailto:unsubscribe@shop.example?subject=unsubscribe&body={quote(unsubscribe, safe='')}>".encode(),
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click",
        b"X-Inboxlift-Campaign: c1",
        b"X-Inboxlift-Variant: A",
        b"MIME-Version: 1.0",
        b"Content-Type: multipart/alternative;",
        f' boundary="=_{boundary}"'.encode(),
    ]
    assert b"=?" not in raw.split(b"\r\n\r\n", 1)[0]
    # The same row gives the same bytes (the send stage hands these to SMTP).
    assert message_bytes({**out, "send_at": SEND_AT}) == raw
    assert message_bytes({**render_row(recipient(), make_config()), "send_at": SEND_AT}) == raw


def test_a_short_list_header_stays_on_one_line_and_non_ascii_ids_are_refused():
    from inboxlift.render.eml import raw_header

    assert raw_header("List-Unsubscribe", "<https://a.example/u/x>,<mailto:u@a.example>") == \
        b"List-Unsubscribe: <https://a.example/u/x>, <mailto:u@a.example>\r\n"
    assert raw_header("Message-ID", "<caf\u00e9@shop.example>") is None
    assert raw_header("X-Long", "x" * 1000) is None
    row = {**render_row(recipient(), make_config()), "send_at": SEND_AT}
    with pytest.raises(MessageError, match="Message-ID"):
        message_bytes({**row, "headers": {**row["headers"], "Message-ID": "<caf\u00e9@shop.example>"}})
    with pytest.raises(MessageError, match="Bcc"):
        message_bytes({**row, "headers": {**row["headers"], "Bcc": "victim@mail.example"}})
    # A non-ASCII X- header is text: RFC 2047 words, which the parser decodes.
    variant = message_bytes({**row, "headers": {**row["headers"], "X-Inboxlift-Variant": "变体"}})
    assert b"X-Inboxlift-Variant: =?utf-8?" in variant and parse_eml(variant)["X-Inboxlift-Variant"] == "变体"


INVALID_ADDRESSES = [
    "nul\x00x@example.com", "a,b@example.com", "ann@mail.example\r\nBcc: victim@mail.example", "ann\r@mail.example",
    "ann\n@mail.example", "ann\t@mail.example", "ann\x7f@mail.example", "ann\x1b@mail.example",
    "ann\u0085@mail.example", "ann\u202e@mail.example", "ann@mail\u202e.example", "Ann <ann@mail.example>",
    "ann@mail.example, eve@mail.example", "ann@@mail.example", "ann@localhost", '"ann"@mail.example',
    "用户@mail.example", "ann@mail.example.", " ann@mail.example", "a" * 65 + "@mail.example", "",
]


@pytest.mark.parametrize("address", INVALID_ADDRESSES)
def test_an_invalid_address_fails_the_row_and_never_reaches_a_to_header(address):
    out = render_row(recipient(email=address), make_config())
    assert out["reason"] == "invalid_email" and "to_email" not in out
    good = render_row(recipient(), make_config())
    with pytest.raises(MessageError, match="to_email"):
        message_bytes({**good, "to_email": address})


def test_an_internationalised_domain_is_idna_encoded_and_the_domain_lower_cased():
    out = render_row(recipient(email="ann@bücher.example"), make_config())
    assert out["reason"] is None and out["to_email"] == "ann@xn--bcher-kva.example"
    assert b"\r\nTo: ann@xn--bcher-kva.example\r\n" in message_bytes({**out, "send_at": SEND_AT})
    assert render_row(recipient(email="Ann@Mail.Example"), make_config())["to_email"] == "Ann@mail.example"


BIDI_AND_CONTROLS = ("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c\ufeff"
                     "\x00\x01\x08\x1b\x1f\x7f\x80\x9f")


def test_bidi_and_format_characters_never_reach_a_header_the_subject_or_the_title():
    out = render_row(recipient(first_name="Ann\u202egpj.exe", variant="A\u2066B\u2069",
                               subject_template="{{ first_name }}: {{ products[0]['name'] }}",
                               products=[product(1, name="Lamp\u202e 1\ufeff"), product(2)]), make_config())
    assert out["reason"] is None, out["error"]
    assert out["subject"] == "Anngpj.exe: Lamp 1"
    assert "<title>Anngpj.exe: Lamp 1</title>" in out["html"]
    assert "Hi Anngpj.exe," in out["text"] and "- Lamp 1 (Lumo)" in out["text"]
    assert out["headers"]["X-Inboxlift-Variant"] == "AB"
    for part in (out["subject"], out["html"], out["text"], *out["headers"].values()):
        assert not any(c in part for c in BIDI_AND_CONTROLS)
    raw = message_bytes({**out, "send_at": SEND_AT})
    assert parse_eml(raw)["Subject"] == "Anngpj.exe: Lamp 1"


def test_one_line_removes_invisible_characters_and_turns_line_breaks_into_a_space():
    from inboxlift.render.message import one_line

    for c in BIDI_AND_CONTROLS:
        assert one_line(f"A{c}B") == "AB", repr(c)
    for c in "\t\n\v\f\r\x1c\x1d\x1e\x85\u2028\u2029":
        assert one_line(f"A{c}B") == "A B", repr(c)
    # Joiners stay: scripts and emoji sequences need them.
    assert one_line("👩\u200d💻 \u0915\u094d\u200d\u0937") == "👩\u200d💻 \u0915\u094d\u200d\u0937"
    assert one_line(" A  \u202e B ") == "A B" and one_line(None) == ""


def test_template_code_in_data_stays_literal():
    code = "{{ 7 * 7 }}{% for x in range(3) %}x{% endfor %}"
    out = render_row(recipient(first_name=code, context=[("segment_name", code)],
                               products=[product(1, name=code)]), make_config())
    assert out["reason"] is None
    assert out["subject"] == f"{code}, your picks for this week"
    assert f"Hi {code}," in out["text"] and f"- {code} (Lumo)" in out["text"]
    without_links = re.sub(r"https://\S+", "", out["text"])  # tokens are base64: "49" may occur in one
    assert "49" not in without_links and "xxx" not in without_links
    assert f"Hi {code}," in out["html"]


def test_html_in_data_is_escaped_in_html_and_kept_as_text_in_text():
    script = "<script>alert(1)</script>"
    attr = '"><img src=x onerror=alert(1)>'
    out = render_row(recipient(first_name=script, products=[product(1, name=attr), product(2)]), make_config())
    html = out["html"]
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "onerror=alert(1)>" not in html
    assert 'alt="&#34;&gt;&lt;img src=x onerror=alert(1)&gt;"' in html
    assert f"Hi {script}," in out["text"]


def test_only_web_urls_become_links_or_images():
    products = [product(1, url="javascript:alert(1)"), product(2, image_url="data:image/png;base64,AAAA"),
                product(3, url="https://shop.example/p/ok\nX: y")]
    out = render_row(recipient(products=products), make_config())
    assert "javascript:" not in out["html"] and "data:image" not in out["html"]
    assert "Lamp 1" not in out["html"] and "Lamp 3" not in out["html"]
    assert "Lamp 2" in out["html"] and out["html"].count("<img") == 1  # Lamp 2 without its image, and the pixel


def test_the_sandbox_refuses_unsafe_template_code():
    out = render_row(recipient(subject_template="{{ ''.__class__.__mro__[1].__subclasses__() }}"), make_config())
    assert out["reason"] == "sandbox_violation", out["error"]


@pytest.mark.parametrize("changes, reason", [
    (dict(subject_template="Picks for {{ context.favourite_colour }}"), "undefined_value"),
    (dict(subject_template="{{ first_name "), "template_syntax"),
    (dict(template="no_such_template"), "template_missing"),
    (dict(template="../base"), "template_missing"),
    (dict(email=None), "invalid_email"),
    (dict(email="not-an-address"), "invalid_email"),
    (dict(email="nul\x00x@example.com"), "invalid_email"),
    (dict(email="a,b@example.com"), "invalid_email"),
    (dict(first_name="x" * 101), "value_too_long"),
    (dict(subject_template="{{ 'x' * 251 }}"), "subject_too_long"),
    (dict(has_user=False, email=None), "unknown_user"),
    (dict(email_consent=False), "no_consent"),
    (dict(email_consent=None), "no_consent"),
    (dict(products=[product(1, is_found=None), product(2, in_stock=False), product(3, price=None)]), "no_products"),
    (dict(context=[("cart_added_at", "yesterday")]), "bad_value"),
    (dict(products=[product(1, price="12,50")]), "bad_value"),
    (dict(subject_template="  {{ '' }} "), "empty_subject"),
])
def test_a_row_that_breaks_gets_a_reason_not_an_exception(changes, reason):
    out = render_row(recipient(**changes), make_config())
    assert out["reason"] == reason, out["error"]
    assert out["error"]
    assert "message_id" not in out


# ---- the partition function on Arrow batches, no Spark ----------------------------------------------

PRODUCT_STRUCT = pa.struct([
    ("position", pa.int32()), ("item_id", pa.string()), ("source", pa.string()), ("name", pa.string()),
    ("brand", pa.string()), ("category", pa.string()), ("price", pa.decimal128(12, 2)), ("currency", pa.string()),
    ("image_url", pa.string()), ("url", pa.string()), ("in_stock", pa.bool_()), ("is_found", pa.bool_()),
])
RECIPIENT_ARROW = pa.schema([
    ("campaign_id", pa.string()), ("campaign_type", pa.string()), ("user_id", pa.string()), ("variant", pa.string()),
    ("template", pa.string()), ("locale", pa.string()), ("subject_template", pa.string()),
    ("send_at", pa.timestamp("us", tz="UTC")), ("item_ids", pa.list_(pa.string())),
    ("context", pa.map_(pa.string(), pa.string())), ("plan_run_id", pa.string()),
    ("products", pa.list_(PRODUCT_STRUCT)), ("email", pa.string()), ("first_name", pa.string()),
    ("timezone", pa.string()), ("email_consent", pa.bool_()), ("has_user", pa.bool_()),
])


def arrow_rows(*rows: dict) -> pa.RecordBatch:
    full = [{**r, "plan_run_id": "run-1", "item_ids": [p["item_id"] for p in r["products"]]} for r in rows]
    return pa.RecordBatch.from_pylist(full, schema=RECIPIENT_ARROW)


def test_partition_function_on_arrow_batches_one_output_row_per_input_row():
    good = recipient(user_id="u1")
    broken = recipient(user_id="u2", subject_template="{{ context.nope }}")
    nobody = recipient(user_id="u3", has_user=False, email=None, first_name=None, email_consent=None)
    batches = [arrow_rows(good, broken), arrow_rows(), arrow_rows(nobody)]
    out = list(render_batches(iter(batches), make_config()))
    assert len(out) == 2  # the empty batch yields nothing
    assert all(b.schema == RENDERED_ARROW_SCHEMA for b in out)
    rows = pa.Table.from_batches(out).to_pylist()
    assert [(r["user_id"], r["status"], r["reason"]) for r in rows] == [
        ("u1", "rendered", None), ("u2", "error", "undefined_value"), ("u3", "error", "unknown_user")]
    first = rows[0]
    assert first["message_id"] == hand_message_id("c1", "u1")
    assert first["send_at"] == SEND_AT and first["rendered_at"] == RENDERED_AT
    assert first["from_email"] == "news@shop.example" and first["plan_run_id"] == "run-1"
    assert dict(first["headers"])["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert rows[1]["html"] is None and rows[1]["template"] == "weekly_picks" and "nope" in rows[1]["error"]


CATALOGUE_ARROW = pa.schema([
    ("item_id", pa.string()), ("name", pa.string()), ("brand", pa.string()), ("price", pa.string()),
    ("currency", pa.string()), ("image_url", pa.string()), ("url", pa.string()), ("in_stock", pa.bool_()),
])
PLANNED_ARROW = pa.schema([f for f in RECIPIENT_ARROW if f.name != "products"] + [("item_sources", pa.list_(pa.string()))])


def test_partition_function_joins_the_planned_items_with_a_task_catalogue():
    # The map-side join: rows carry item ids only; the catalogue travels with the function.
    lamp = {"item_id": "i1", "name": "Lamp 1", "brand": "Lumo", "price": "1234.50", "currency": "USD",
            "image_url": "https://img.shop.example/i1.jpg", "url": "https://shop.example/p/i1", "in_stock": True}
    rug = {**lamp, "item_id": "i2", "name": "Rug", "brand": None, "price": "99.99", "url": "https://shop.example/p/i2"}
    gone = {**lamp, "item_id": "i3", "name": "Old lamp", "in_stock": False}
    catalogue = TaskCatalogue.from_arrow(pa.Table.from_pylist([lamp, rug, gone], schema=CATALOGUE_ARROW))
    assert catalogue.items == 3
    base = {k: v for k, v in recipient().items() if k != "products"}
    rows = [
        {**base, "user_id": "u1", "item_ids": ["i2", "i9", "i1"], "item_sources": ["als", "als", "content"]},
        {**base, "user_id": "u2", "item_ids": ["i9", "i3"], "item_sources": ["als", "als"]},  # none usable
        {**base, "user_id": "u3", "item_ids": None, "item_sources": None},                  # nothing planned
    ]
    batch = pa.RecordBatch.from_pylist([{**r, "plan_run_id": "run-1"} for r in rows], schema=PLANNED_ARROW)
    out = pa.Table.from_batches(list(render_batches(iter([batch]), make_config(), catalogue=catalogue))).to_pylist()
    assert [(r["user_id"], r["reason"]) for r in out] == [("u1", None), ("u2", "no_products"), ("u3", None)]
    # The rug and the lamp in plan order; i9 (not in the catalogue) left out; the rug has no brand line.
    text = out[0]["text"]
    assert "- Rug: $99.99\n" in text and "- Lamp 1 (Lumo): $1,234.50\n" in text
    assert text.index("- Rug") < text.index("- Lamp 1") and "Old lamp" not in out[1]["error"]
    assert "/p/i9" not in out[0]["html"] and out[0]["html"].count('class="card-img"') == 2
    assert 'class="card-img"' not in out[2]["html"]
    # The same row with the products already joined (Spark's way) renders the same message.
    joined = recipient(user_id="u1", products=[
        product(0, item_id="i2", name="Rug", brand=None, price=Decimal("99.99"), url="https://shop.example/p/i2",
                image_url="https://img.shop.example/i1.jpg"),
        product(1, item_id="i9", is_found=None, name=None),
        product(2, item_id="i1", name="Lamp 1", source="content", url="https://shop.example/p/i1",
                image_url="https://img.shop.example/i1.jpg")])
    assert render_row(joined, make_config())["html"] == out[0]["html"]


def test_task_catalogue_ships_the_catalogue_or_the_planned_items_or_nothing(spark):
    products = _catalogue(spark)   # i1, i2, i3
    plan = spark.createDataFrame([(["i3", "i9"],), (["i3"],), (None,)], "item_ids array<string>")
    whole = task_catalogue(plan, products, max_items=3)
    planned = task_catalogue(plan, products, max_items=2)
    assert whole.items == 3 and planned.items == 1           # only i3 is planned and in the catalogue
    rows = pa.ipc.open_stream(planned.ipc).read_all().to_pylist()
    assert rows == [{"item_id": "i3", "name": "Rug", "brand": "Weave", "price": "99.99", "currency": "USD",
                     "image_url": "https://img.shop.example/i3.jpg", "url": "https://shop.example/p/i3",
                     "in_stock": True}]
    two_planned = spark.createDataFrame([(["i3", "i1"],)], "item_ids array<string>")
    assert task_catalogue(two_planned, products, max_items=1) is None   # more planned items than allowed
    assert task_catalogue(plan, products, max_items=0) is None


def test_render_plan_gives_the_same_messages_with_either_product_join(spark):
    users = spark.createDataFrame([
        ("u1", "ann@mail.example", "Ann", "Europe/London", True),
        ("u2", "li@mail.example", "李雷", "Asia/Shanghai", True),
        ("u3", "bo@mail.example", None, "UTC", True),
    ], "user_id string, email string, first_name string, timezone string, email_consent boolean")
    plan = _plan(spark, [
        ("c1", "u1", "A", "en", SUBJECT, ["i3", "i1", "i2"]),
        ("c1", "u2", "B", "zh-CN", SUBJECT, ["i2", "i9"]),
        ("c1", "u3", "A", "en", SUBJECT, ["i9"]),           # nothing usable: no_products either way
        ("c1", "u4", "A", "en", SUBJECT, ["i1"]),           # not in users
    ])
    config = make_config()
    map_side = render_plan(plan, users=users, products=_catalogue(spark), config=config, partitions=2,
                           task_catalogue_max_items=100)
    in_spark = render_plan(plan, users=users, products=_catalogue(spark), config=config, partitions=2,
                           task_catalogue_max_items=0)
    assert "MapInArrow" in map_side._jdf.queryExecution().executedPlan().toString()
    assert "Generate" not in map_side._jdf.queryExecution().executedPlan().toString()
    assert "Generate" in in_spark._jdf.queryExecution().executedPlan().toString()
    assert sorted((r["user_id"], r["reason"]) for r in map_side.collect()) == [
        ("u1", None), ("u2", None), ("u3", "no_products"), ("u4", "unknown_user")]
    columns = ["message_id", "user_id", "subject", "html", "text", "reason"]
    assert_df_equality(map_side.select(*columns), in_spark.select(*columns), ignore_row_order=True)


def test_eml_is_multipart_alternative_with_the_right_headers_and_parts():
    out = render_row(recipient(first_name="李雷", locale="zh-CN",
                               subject_template="{{ first_name or '您好' }}，本周为您精选"), make_config())
    raw = eml_bytes({**out, "send_at": SEND_AT})
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")  # SMTP line ends only
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    msg = parse_eml(raw)
    assert msg.get_content_type() == "multipart/alternative"
    assert msg["Subject"] == "李雷，本周为您精选"
    assert msg["To"] == "ann@mail.example"
    assert msg["From"] == "Example Shop <news@shop.example>"
    assert msg["Date"] == "Sat, 21 Nov 2026 09:00:00 +0000"
    assert msg["Message-ID"] == f"<{hand_message_id('c1', 'u1')}>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["List-Unsubscribe"].startswith("<https://t.shop.example/u/")
    assert msg["MIME-Version"] == "1.0"
    text_part, html_part = list(msg.iter_parts())
    assert text_part.get_content_type() == "text/plain" and html_part.get_content_type() == "text/html"
    assert text_part.get_content_charset() == "utf-8"
    assert text_part.get_content().replace("\r\n", "\n") == out["text"]
    assert html_part.get_content().replace("\r\n", "\n") == out["html"]


# ---- through Spark -----------------------------------------------------------------------------------

USERS_SCHEMA = StructType([
    StructField("user_id", StringType()), StructField("email", StringType()), StructField("first_name", StringType()),
    StructField("locale", StringType()), StructField("timezone", StringType()), StructField("country", StringType()),
    StructField("birthday", DateType()), StructField("email_consent", BooleanType()),
])
PRODUCTS_SCHEMA = StructType([
    StructField("item_id", StringType()), StructField("name", StringType()), StructField("description", StringType()),
    StructField("category", StringType()), StructField("brand", StringType()),
    StructField("price", DecimalType(12, 2)), StructField("currency", StringType()),
    StructField("image_url", StringType()), StructField("url", StringType()), StructField("stock", IntegerType()),
    StructField("in_stock", BooleanType()),
])
PLAN_SCHEMA = StructType([
    StructField("campaign_id", StringType()), StructField("campaign_type", StringType()),
    StructField("plan_date", DateType()), StructField("user_id", StringType()), StructField("variant", StringType()),
    StructField("template", StringType()), StructField("locale", StringType()),
    StructField("subject_template", StringType()), StructField("send_at", TimestampType()),
    StructField("reason", StringType()), StructField("item_ids", ArrayType(StringType())),
    StructField("item_sources", ArrayType(StringType())), StructField("context", MapType(StringType(), StringType())),
    StructField("plan_run_id", StringType()), StructField("planned_at", TimestampType()),
])
SUBJECT = "{{ first_name or 'Hi there' }}, your picks for this week"
DAY = "2026-11-20"  # the plan day of _plan's rows


def _catalogue(spark):
    return spark.createDataFrame([
        ("i1", "Desk Lamp", "A lamp", "Home", "Lumo", Decimal("1234.50"), "USD", "https://img.shop.example/i1.jpg",
         "https://shop.example/p/i1", 5, True),
        ("i2", "Tea Cup", None, "Kitchen", None, Decimal("8.00"), "USD", None, "https://shop.example/p/i2", 9, True),
        ("i3", "Rug", None, "Home", "Weave", Decimal("99.99"), "USD", "https://img.shop.example/i3.jpg",
         "https://shop.example/p/i3", 1, True),
    ], PRODUCTS_SCHEMA)


def _plan(spark, rows):
    day = dt.date(2026, 11, 20)
    send = dt.datetime(2026, 11, 21, 9, 0)
    return spark.createDataFrame([
        (c, "weekly_picks", day, u, v, "weekly_picks", loc, subject, send, "test", items, ["als"] * len(items),
         {"segment_name": "browsers"}, "plan-1", dt.datetime(2026, 11, 20, 6, 0))
        for c, u, v, loc, subject, items in rows
    ], PLAN_SCHEMA)


def test_render_stage_writes_outbox_and_errors_and_a_rerender_replaces(ctx, spark, tmp_path):
    spark.conf.set("spark.sql.session.timeZone", "UTC")
    ctx.lake.append("users", spark.createDataFrame([
        ("u1", "ann@mail.example", "Ann", "en", "Europe/London", "GB", None, True),
        ("u2", "li@mail.example", "李雷", "zh-CN", "Asia/Shanghai", "CN", None, True),
        ("u3", "bo@mail.example", None, "en", "America/New_York", "US", None, True),
        ("u4", "hold@mail.example", "Hal", "en", "UTC", "GB", None, True),
        ("u5", "off@mail.example", "Olga", "en", "UTC", "GB", None, False),
        ("u7", "ed@@mail.example", "Ed", "en", "UTC", "GB", None, True),
    ], USERS_SCHEMA))
    ctx.lake.append("products", _catalogue(spark))
    ctx.lake.append("campaign_plan", _plan(spark, [
        ("c1", "u1", "A", "en", SUBJECT, ["i3", "i1", "i2"]),
        ("c1", "u2", "B", "zh-CN", SUBJECT, ["i2", "i9"]),                      # i9 is not in the catalogue
        ("c1", "u3", "A", "en", "{{ context.favourite_colour }} picks", ["i1"]),  # breaks its subject
        ("c1", "u4", "holdout", "en", SUBJECT, ["i1"]),
        ("c1", "u5", "A", "en", SUBJECT, ["i1"]),                                # consent withdrawn since planning
        ("c1", "u6", "B", "en", SUBJECT, ["i1"]),                                # no longer in users
        ("c1", "u7", "B", "en", SUBJECT, ["i1"]),                                # a malformed address
        ("c2", "u1", "A", "en", SUBJECT, ["i1"]),                                # another campaign: not rendered
    ]))

    report = run_render(ctx, campaign_id="c1")

    assert report.rendered == (("c1", "A", 1), ("c1", "B", 1))
    assert report.holdout == (("c1", 1),)
    assert report.errors == (("c1", "invalid_email", 1), ("c1", "no_consent", 1), ("c1", "undefined_value", 1),
                             ("c1", "unknown_user", 1))
    assert report.development_key is True  # env local, no INBOXLIFT_SIGNING_KEY passed
    summary = report.summary()
    assert "2 messages into outbox, 4 rows into render_errors, 1 holdout rows skipped" in summary
    assert "undefined_value" in summary and "development key" in summary

    outbox = ctx.lake.read("outbox")
    expected = spark.createDataFrame([
        (hand_message_id("c1", "u1", DAY), "c1", "u1", "A", "ann@mail.example", "Ann, your picks for this week",
         "rendered", "plan-1"),
        (hand_message_id("c1", "u2", DAY), "c1", "u2", "B", "li@mail.example", "李雷, your picks for this week",
         "rendered", "plan-1"),
    ], "message_id string, campaign_id string, user_id string, variant string, to_email string, subject string, "
       "status string, plan_run_id string")
    assert_df_equality(outbox.select(*expected.columns), expected, ignore_row_order=True, ignore_nullable=True)
    ann = outbox.where("user_id = 'u1'").select(
        "html", "text", "headers", "from_email", F.unix_micros("send_at").alias("send_us"),
        F.unix_micros("rendered_at").alias("rendered_us")).collect()[0]
    # Products in plan order (i3, i1, i2), the tea cup without an image but still a card.
    assert ann["text"].index("- Rug (Weave): $99.99") < ann["text"].index("- Desk Lamp (Lumo): $1,234.50") \
        < ann["text"].index("- Tea Cup: $8.00")
    assert ann["html"].count("<img") == 3
    assert ann["send_us"] == int(dt.datetime(2026, 11, 21, 9, 0, tzinfo=UTC).timestamp() * 1_000_000)
    assert ann["rendered_us"] == int(ctx.clock.now().timestamp() * 1_000_000)
    assert ann["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    li_text = outbox.where("user_id = 'u2'").select("text").collect()[0]["text"]
    assert "- Tea Cup: US$8.00" in li_text and "i9" not in li_text

    errors = ctx.lake.read("render_errors")
    expected_errors = spark.createDataFrame(
        [("c1", "u3", "weekly_picks", "undefined_value"), ("c1", "u5", "weekly_picks", "no_consent"),
         ("c1", "u6", "weekly_picks", "unknown_user"), ("c1", "u7", "weekly_picks", "invalid_email")],
        "campaign_id string, user_id string, template string, reason string")
    assert_df_equality(errors.select(*expected_errors.columns), expected_errors, ignore_row_order=True,
                       ignore_nullable=True)
    assert sorted(errors.columns) == sorted(["campaign_id", "user_id", "template", "reason", "error", "rendered_at"])

    # Export and preview.
    exported = export_eml(ctx, campaign_id="c1", to_dir=tmp_path / "eml")
    files = sorted((tmp_path / "eml").glob("*.eml"))
    assert (exported.written, exported.skipped) == (2, {}) and [f.name for f in files] == sorted(
        f"{hand_message_id('c1', u, DAY).split('@')[0]}.eml" for u in ("u1", "u2"))
    msg = parse_eml((tmp_path / "eml" / f"{hand_message_id('c1', 'u1', DAY).split('@')[0]}.eml").read_bytes())
    assert msg.get_content_type() == "multipart/alternative"
    assert msg["To"] == "ann@mail.example" and msg["Subject"] == "Ann, your picks for this week"
    assert msg["Date"] == "Sat, 21 Nov 2026 09:00:00 +0000"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    page = preview(ctx, campaign_id="c1", user_id="u2", to_path=tmp_path / "preview" / "u2.html")
    assert "李雷，您好！" in page.read_text(encoding="utf-8")
    with pytest.raises(LookupError):
        preview(ctx, campaign_id="c1", user_id="u3", to_path=tmp_path / "none.html")

    # Two users change their data (a name, a fixed address); one message was sent meanwhile.
    sent = ctx.lake.read("outbox").where("user_id = 'u2'").withColumn("status", F.lit("sent"))
    ctx.lake.merge("outbox", sent, keys=["message_id"])
    ctx.lake.overwrite("users", spark.createDataFrame([
        ("u1", "ann@mail.example", "Annie", "en", "Europe/London", "GB", None, True),
        ("u2", "li@mail.example", "小李", "zh-CN", "Asia/Shanghai", "CN", None, True),
        ("u3", "bo@mail.example", None, "en", "America/New_York", "US", None, True),
        ("u5", "off@mail.example", "Olga", "en", "UTC", "GB", None, False),
        ("u7", "ed@mail.example", "Ed", "en", "UTC", "GB", None, True),
    ], USERS_SCHEMA))
    again = run_render(ctx, campaign_id="c1")
    assert again.rendered == (("c1", "A", 1), ("c1", "B", 2))
    assert again.errors == (("c1", "no_consent", 1), ("c1", "undefined_value", 1), ("c1", "unknown_user", 1))
    rerendered = spark.createDataFrame([
        (hand_message_id("c1", "u1", DAY), "u1", "Annie, your picks for this week", "rendered"),
        (hand_message_id("c1", "u2", DAY), "u2", "李雷, your picks for this week", "sent"),  # sent: left alone
        (hand_message_id("c1", "u7", DAY), "u7", "Ed, your picks for this week", "rendered"),
    ], "message_id string, user_id string, subject string, status string")
    assert_df_equality(ctx.lake.read("outbox").select(*rerendered.columns), rerendered, ignore_row_order=True,
                       ignore_nullable=True)
    # Replaced, not appended: u7's fixed row is gone, the others are there once.
    assert_df_equality(ctx.lake.read("render_errors").select("campaign_id", "user_id", "reason"),
                       spark.createDataFrame([("c1", "u3", "undefined_value"), ("c1", "u5", "no_consent"),
                                              ("c1", "u6", "unknown_user")],
                                             "campaign_id string, user_id string, reason string"),
                       ignore_row_order=True, ignore_nullable=True)


def test_render_stage_on_an_empty_plan_writes_empty_tables(ctx, spark):
    ctx.lake.append("users", spark.createDataFrame([], USERS_SCHEMA))
    ctx.lake.append("products", _catalogue(spark))
    ctx.lake.append("campaign_plan", _plan(spark, []))
    report = run_render(ctx, campaign_id="c1", environ={"INBOXLIFT_SIGNING_KEY": "k" * 32})
    assert (report.messages, report.failed, report.skipped_holdout, report.development_key) == (0, 0, 0, False)
    assert ctx.lake.read("outbox").isEmpty() and ctx.lake.read("render_errors").isEmpty()


def test_render_takes_each_campaigns_latest_plan_day_only(ctx, spark):
    ctx.lake.append("users", spark.createDataFrame([
        ("u1", "ann@mail.example", "Ann", "en", "Europe/London", "GB", None, True),
        ("u2", "li@mail.example", "Li", "en", "UTC", "GB", None, True),
    ], USERS_SCHEMA))
    ctx.lake.append("products", _catalogue(spark))
    latest = _plan(spark, [("c1", "u1", "A", "en", "This week", ["i1"])])
    # The same campaign planned a week earlier, for u1 and u2: kept as history, not rendered again.
    earlier = _plan(spark, [("c1", "u1", "A", "en", "Last week", ["i2"]),
                            ("c1", "u2", "A", "en", "Last week", ["i2"])]).withColumn(
        "plan_date", F.lit(dt.date(2026, 11, 13)))
    ctx.lake.append("campaign_plan", latest.unionByName(earlier))

    report = run_render(ctx, campaign_id="c1")

    assert report.rendered == (("c1", "A", 1),)
    rows = ctx.lake.read("outbox").select("user_id", "subject").collect()
    assert [(r.user_id, r.subject) for r in rows] == [("u1", "This week")]


def test_a_recurring_campaigns_next_day_is_a_new_message_and_the_earlier_days_rows_stay(ctx, spark):
    ctx.lake.append("users", spark.createDataFrame([
        ("u1", "ann@mail.example", "Ann", "en", "Europe/London", "GB", None, True),
        ("u2", "li@mail.example", "Li", "en", "UTC", "GB", None, True),
    ], USERS_SCHEMA))
    ctx.lake.append("products", _catalogue(spark))
    last_week = _plan(spark, [("c1", "u1", "A", "en", "Last week", ["i2"]),
                              ("c1", "u2", "A", "en", "Last week", ["i2"])]).withColumn(
        "plan_date", F.lit(dt.date(2026, 11, 13)))
    ctx.lake.append("campaign_plan", last_week)
    run_render(ctx, campaign_id="c1")
    # Last week's message to u1 left; u2's never did.
    sent = ctx.lake.read("outbox").where("user_id = 'u1'").withColumn("status", F.lit("sent"))
    ctx.lake.merge("outbox", sent, keys=["message_id"])
    ctx.lake.append("campaign_plan", _plan(spark, [("c1", "u1", "A", "en", "This week", ["i1"]),
                                                   ("c1", "u2", "A", "en", "This week", ["i1"])]))

    report = run_render(ctx, campaign_id="c1")

    assert report.rendered == (("c1", "A", 2),)
    expected = spark.createDataFrame([
        (hand_message_id("c1", "u1", "2026-11-13"), "u1", dt.date(2026, 11, 13), "Last week", "sent", None),
        (hand_message_id("c1", "u2", "2026-11-13"), "u2", dt.date(2026, 11, 13), "Last week", "withdrawn",
         "superseded"),
        (hand_message_id("c1", "u1", DAY), "u1", dt.date(2026, 11, 20), "This week", "rendered", None),
        (hand_message_id("c1", "u2", DAY), "u2", dt.date(2026, 11, 20), "This week", "rendered", None),
    ], "message_id string, user_id string, plan_date date, subject string, status string, status_reason string")
    assert_df_equality(ctx.lake.read("outbox").select(*expected.columns), expected, ignore_row_order=True,
                       ignore_nullable=True)
