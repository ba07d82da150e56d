"""Signed link tokens (inboxlift.tokens) and the signing key (inboxlift.keys), without Spark.

The token layout is written out byte by byte here, from docs/render.md, and signed with hmac by
hand: the issuer must produce exactly these bytes, which the tracking service (issue 20) relies on.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from inboxlift.render import RenderConfig
from inboxlift.keys import DEV_SIGNING_KEY, signing_key
from inboxlift.settings import RenderSettings, SecretSettings, Settings, SettingsError
from inboxlift.tokens import (
    ClickToken,
    MessageTokens,
    OpenToken,
    UnsubscribeToken,
    Verifier,
    issue_click,
    issue_open,
    issue_unsubscribe,
    link_token,
    link_url,
    single_values,
    verify_click,
    verify_click_url,
    verify_open,
    verify_open_url,
    verify_unsubscribe,
    verify_unsubscribe_url,
)

KEY = b"test-signing-key-0123456789abcdef"
UTC = dt.timezone.utc
ISSUED = dt.datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
ISSUED_SECONDS = 1795176000  # 2026-11-20T12:00:00Z
MSG = "0123456789abcdef0123456789abcdef@shop.example"  # 45 characters
TARGET = "https://shop.example/p/i1?utm_source=inboxlift&utm_content=A"  # 60 characters
IDS = dict(message_id=MSG, campaign_id="c1", user_id="u1", variant="A")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sealed(purpose: bytes, body: bytes, key: bytes = KEY) -> str:
    mac = hmac.new(key, b"inboxlift-link\x00" + purpose + b"\x00" + body, hashlib.sha256).digest()[:16]
    return b64(body + mac)


HEAD = b"\x01" + struct.pack(">I", ISSUED_SECONDS) + b"\x2d" + MSG.encode() + b"\x02c1" + b"\x02u1" + b"\x01A"


def test_tokens_have_the_documented_layout():
    assert ISSUED.timestamp() == ISSUED_SECONDS
    assert issue_unsubscribe(key=KEY, issued_at=ISSUED, campaign_type="weekly_picks", **IDS) == \
        sealed(b"unsubscribe", HEAD + b"\x0cweekly_picks")
    assert issue_click(key=KEY, issued_at=ISSUED, position=3, item_id="i1", target=TARGET, **IDS) == \
        sealed(b"click", HEAD + b"\x03" + b"\x02i1" + b"\x3c" + TARGET.encode())
    assert issue_open(key=KEY, issued_at=ISSUED, **IDS) == sealed(b"open", HEAD)
    # Lengths of 128 bytes and more take two LEB128 bytes; a position too.
    long_target = "https://shop.example/" + "x" * 179  # 200 characters
    assert issue_click(key=KEY, issued_at=ISSUED, position=300, item_id="", target=long_target, **IDS) == \
        sealed(b"click", HEAD + b"\xac\x02" + b"\x00" + b"\xc8\x01" + long_target.encode())
    # A naive time is UTC; None ids are empty fields.
    assert issue_open(key=KEY, issued_at=ISSUED.replace(tzinfo=None), **{**IDS, "variant": None}) == \
        sealed(b"open", HEAD[:-2] + b"\x00")


def test_genuine_tokens_verify_to_their_typed_payloads():
    tokens = MessageTokens(key=KEY, issued_at=ISSUED, **IDS)
    later = ISSUED + dt.timedelta(days=1)
    assert verify_unsubscribe(tokens.unsubscribe("weekly_picks"), key=KEY) == UnsubscribeToken(
        campaign_type="weekly_picks", issued_at=ISSUED, **IDS)
    click = verify_click(tokens.click(0, "i1", TARGET), key=KEY, now=later, max_age=dt.timedelta(days=2))
    assert click == ClickToken(position=0, item_id="i1", target=TARGET, issued_at=ISSUED, **IDS)
    assert click.target_hash == hashlib.sha256(TARGET.encode()).hexdigest()[:16]
    assert verify_open(tokens.open(), key=KEY, now=later, max_age=None) == OpenToken(issued_at=ISSUED, **IDS)
    # Any text survives: the encoding is length-prefixed, not delimited.
    odd = dict(message_id="m@x", campaign_id="a/b?c=d&e", user_id="用户 1", variant="")
    assert verify_unsubscribe(issue_unsubscribe(key=KEY, issued_at=ISSUED, campaign_type=None, **odd), key=KEY) == \
        UnsubscribeToken(campaign_type="", issued_at=ISSUED, **odd)


def test_length_prefixes_keep_fields_apart():
    one = issue_open(key=KEY, issued_at=ISSUED, message_id="m", campaign_id="a", user_id="bc", variant="A")
    two = issue_open(key=KEY, issued_at=ISSUED, message_id="m", campaign_id="ab", user_id="c", variant="A")
    assert one != two
    assert verify_open(one, key=KEY, now=ISSUED, max_age=None).user_id == "bc"
    assert verify_open(two, key=KEY, now=ISSUED, max_age=None).user_id == "c"


def _flipped(token: str, byte: int) -> str:
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[byte] ^= 0x01
    return b64(bytes(raw))


def test_altered_forged_truncated_and_misused_tokens_are_refused():
    tokens = MessageTokens(key=KEY, issued_at=ISSUED, **IDS)
    unsubscribe, click, opened = tokens.unsubscribe("weekly_picks"), tokens.click(1, "i1", TARGET), tokens.open()
    size = len(base64.urlsafe_b64decode(click + "=" * (-len(click) % 4)))
    for byte in range(size):  # every bit flip of the first bit of every byte, payload and MAC alike
        assert verify_click(_flipped(click, byte), key=KEY, now=ISSUED, max_age=None) is None, byte
    for cut in range(len(unsubscribe)):
        assert verify_unsubscribe(unsubscribe[:cut], key=KEY) is None, cut
    other_key = b"another-signing-key-0123456789abcdef"
    assert verify_unsubscribe(unsubscribe, key=other_key) is None
    assert verify_unsubscribe(issue_unsubscribe(key=other_key, issued_at=ISSUED, campaign_type="x", **IDS),
                              key=KEY) is None
    # One purpose's token is no other's, even where the fields would parse.
    assert verify_unsubscribe(click, key=KEY) is None and verify_unsubscribe(opened, key=KEY) is None
    assert verify_click(unsubscribe, key=KEY, now=ISSUED, max_age=None) is None
    assert verify_open(click, key=KEY, now=ISSUED, max_age=None) is None
    assert verify_click(opened, key=KEY, now=ISSUED, max_age=None) is None
    # Other spellings of the same bytes: padding, spare bits set in the last character, the standard
    # alphabet's characters, whitespace.
    assert verify_unsubscribe(unsubscribe + "==", key=KEY) is None
    assert len(unsubscribe) % 4 == 2  # 88 bytes: the last character carries 4 spare bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    respelled = unsubscribe[:-1] + alphabet[alphabet.index(unsubscribe[-1]) ^ 1]
    assert base64.urlsafe_b64decode(respelled + "==") == base64.urlsafe_b64decode(unsubscribe + "==")
    assert verify_unsubscribe(respelled, key=KEY) is None
    assert verify_unsubscribe(f" {unsubscribe}", key=KEY) is None
    assert verify_unsubscribe("+" + unsubscribe[1:], key=KEY) is None
    for junk in ("", "A", "AAAA", "é" * 40, "A" * 9000, "%2F" * 30):
        assert verify_unsubscribe(junk, key=KEY) is None, junk


def test_a_token_verifies_in_its_one_spelling_only_whatever_its_length():
    # Message ids of 0-3 characters give tokens of every length mod 4 the encoder writes (0, 2, 3);
    # changing the last character either changes the bytes (the MAC fails) or only its spare bits.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    tails = set()
    for message_id in ("", "m", "mm", "mmm"):
        token = issue_open(key=KEY, issued_at=ISSUED, message_id=message_id, campaign_id="c", user_id="u",
                           variant="A")
        tails.add(len(token) % 4)
        for character in alphabet:
            respelled = token[:-1] + character
            verified = verify_open(respelled, key=KEY, now=ISSUED, max_age=None)
            assert (verified is not None) == (respelled == token), (message_id, character)
        genuine = verify_open(token, key=KEY, now=ISSUED, max_age=None)
        assert genuine is not None and Verifier(KEY).open(token, now=ISSUED, max_age=None) == genuine
    assert tails == {0, 2, 3}


def test_bodies_the_issuer_never_writes_are_refused_even_with_a_genuine_mac():
    def open_token(body: bytes) -> OpenToken | None:
        return verify_open(sealed(b"open", body), key=KEY, now=ISSUED, max_age=None)

    assert open_token(HEAD) == OpenToken(issued_at=ISSUED, **IDS)
    assert open_token(HEAD + b"\x00") is None                       # a trailing field
    assert open_token(HEAD[:-1]) is None                            # a field cut short
    assert open_token(b"\x02" + HEAD[1:]) is None                   # another format version
    assert open_token(HEAD[:-2] + b"\x81\x00A") is None             # a length in two bytes where one does
    assert open_token(HEAD[:-2] + b"\x01\xff") is None              # not UTF-8
    assert open_token(HEAD[:5]) is None                             # no fields at all


def test_click_and_open_tokens_expire_after_max_age_unsubscribe_tokens_never():
    tokens = MessageTokens(key=KEY, issued_at=ISSUED, **IDS)
    click, opened, unsubscribe = tokens.click(1, "i1", TARGET), tokens.open(), tokens.unsubscribe("weekly_picks")
    max_age = dt.timedelta(days=180)
    in_time, too_late = ISSUED + max_age, ISSUED + max_age + dt.timedelta(seconds=1)
    assert verify_click(click, key=KEY, now=in_time, max_age=max_age).position == 1
    assert verify_click(click, key=KEY, now=too_late, max_age=max_age) is None
    assert verify_open(opened, key=KEY, now=in_time.replace(tzinfo=None), max_age=max_age) is not None
    assert verify_open(opened, key=KEY, now=too_late, max_age=max_age) is None
    assert verify_click(click, key=KEY, now=ISSUED + dt.timedelta(days=3650), max_age=None) is not None
    # RFC 8058: a one-click link in a ten-year-old email still unsubscribes.
    assert verify_unsubscribe(unsubscribe, key=KEY).issued_at == ISSUED


def test_links_put_tokens_in_the_path_and_refuse_duplicated_query_parameters():
    tokens = MessageTokens(key=KEY, issued_at=ISSUED, **IDS)
    unsubscribe = link_url("https://t.shop.example", "unsubscribe", tokens.unsubscribe("weekly_picks"))
    click = link_url("https://t.shop.example", "click", tokens.click(1, "i1", TARGET))
    pixel = link_url("https://t.shop.example", "open", tokens.open())
    assert unsubscribe == f"https://t.shop.example/u/{tokens.unsubscribe('weekly_picks')}"
    assert click.startswith("https://t.shop.example/c/") and pixel.endswith(".gif")
    assert pixel == f"https://t.shop.example/o/{tokens.open()}.gif"
    assert verify_unsubscribe_url(unsubscribe, key=KEY).user_id == "u1"
    assert verify_click_url(click, key=KEY, now=ISSUED, max_age=None).target == TARGET
    assert verify_open_url(pixel, key=KEY, now=ISSUED, max_age=None).message_id == MSG
    # A query string appended on the way is ignored, unless it repeats a parameter.
    assert verify_unsubscribe_url(unsubscribe + "?src=gateway", key=KEY) is not None
    for query in ("?a=1&a=2", "?t=https://evil.example&t=" + TARGET, "?List-Unsubscribe=One-Click&"
                  "List-Unsubscribe=One-Click", "?x&x"):
        assert verify_unsubscribe_url(unsubscribe + query, key=KEY) is None, query
        assert verify_click_url(click + query, key=KEY, now=ISSUED, max_age=None) is None, query
        assert verify_open_url(pixel + query, key=KEY, now=ISSUED, max_age=None) is None, query
    # Wrong segment, no .gif, another scheme, nothing after the segment.
    assert link_token(click.replace("/c/", "/u/"), "click") is None
    assert verify_unsubscribe_url(click.replace("/c/", "/u/"), key=KEY) is None  # a click token is no unsubscribe
    assert link_token(pixel[:-4], "open") is None
    assert link_token(unsubscribe.replace("https:", "javascript:"), "unsubscribe") is None
    assert link_token("https://t.shop.example/u/", "unsubscribe") is None
    # The RFC 8058 POST body is a form: the same rule.
    assert single_values("List-Unsubscribe=One-Click") == {"List-Unsubscribe": "One-Click"}
    assert single_values("List-Unsubscribe=One-Click&List-Unsubscribe=One-Click") is None
    assert single_values("") == {}


def test_keys_shorter_than_32_bytes_are_refused_by_issuers_verifiers_and_the_render_config():
    short = b"k" * 31
    with pytest.raises(ValueError, match="at least 32 bytes"):
        MessageTokens(key=short, issued_at=ISSUED, **IDS)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        verify_unsubscribe(issue_unsubscribe(key=KEY, issued_at=ISSUED, campaign_type="x", **IDS), key=short)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        RenderConfig.from_settings(RenderSettings(), signing_key=b"\x01", rendered_at=ISSUED)
    assert MessageTokens(key=b"k" * 32, issued_at=ISSUED, **IDS).open()


def _settings(env: str, reference: str = "env:INBOXLIFT_SIGNING_KEY") -> Settings:
    return Settings(env=env, secrets=SecretSettings(signing_key=reference))


def test_the_signing_key_is_at_least_32_bytes_in_every_environment():
    assert signing_key(_settings("local"), environ={}) == (DEV_SIGNING_KEY, True)
    assert len(DEV_SIGNING_KEY) >= 32
    good = "s" * 32
    assert signing_key(_settings("prod"), environ={"INBOXLIFT_SIGNING_KEY": good}) == (good.encode(), False)
    for env in ("local", "dev", "prod"):
        for short in ("x", "s" * 31, "é" * 15):  # 1, 31 and 30 bytes
            with pytest.raises(SettingsError, match=r"'env:INBOXLIFT_SIGNING_KEY' \(secrets.signing_key\) is "
                                                    r"\d+ bytes; a signing key must be at least 32 bytes") as error:
                signing_key(_settings(env), environ={"INBOXLIFT_SIGNING_KEY": short})
            assert short not in str(error.value)
    with pytest.raises(SettingsError, match="INBOXLIFT_SIGNING_KEY is not set"):
        signing_key(_settings("prod"), environ={})


def test_the_tokens_module_imports_without_spark():
    lib = Path(__file__).resolve().parents[1] / "lib"
    code = ("import sys; sys.path.insert(0, %r); import inboxlift.tokens; "
            "assert not [m for m in sys.modules if m.startswith(('pyspark', 'inboxlift.render'))]" % str(lib))
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_servers_verifier_answers_as_the_functions_do():
    # inboxlift serve verifies with a Verifier (each purpose's HMAC keyed once); every answer, genuine
    # or not, must be the functions' own.
    from inboxlift.tokens import Verifier

    tokens = MessageTokens(key=KEY, issued_at=ISSUED, **IDS)
    other = MessageTokens(key=b"another-signing-key-0123456789abcdef", issued_at=ISSUED, **IDS)
    genuine = [tokens.click(0, None, TARGET), tokens.click(300, "i1", TARGET), tokens.open(),
               tokens.unsubscribe("weekly_picks"), tokens.unsubscribe(None)]
    candidates = [*genuine, *(_flipped(t, n) for t in genuine for n in (0, 7, 30, -1)),
                  *(t[:-3] for t in genuine), other.click(1, "i1", TARGET), other.open(),
                  other.unsubscribe("weekly_picks"), genuine[0] + "=", "", "A", "é" * 40]
    verifier = Verifier(KEY)
    max_age = dt.timedelta(days=180)
    for now in (ISSUED, ISSUED + max_age + dt.timedelta(seconds=1)):
        for token in candidates:
            assert verifier.click(token, now=now, max_age=max_age) == verify_click(
                token, key=KEY, now=now, max_age=max_age), token
            assert verifier.open(token, now=now, max_age=max_age) == verify_open(
                token, key=KEY, now=now, max_age=max_age), token
            assert verifier.unsubscribe(token) == verify_unsubscribe(token, key=KEY), token
    assert verifier.click(genuine[1], now=ISSUED, max_age=max_age) == ClickToken(
        position=300, item_id="i1", target=TARGET, issued_at=ISSUED, **IDS)
    assert verifier.click(genuine[1], now=ISSUED + max_age + dt.timedelta(seconds=1), max_age=max_age) is None
    with pytest.raises(ValueError):
        Verifier(b"too-short")
