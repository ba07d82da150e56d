"""The tracking and preference service against a real ``inboxlift serve`` on loopback (httpx as client).

Every endpoint; forged, altered, truncated, expired, another kind's and another user's tokens; an
open-redirect attempt; the preferences form and its CSRF token; machine opens; no PII in events;
a flood of 10,000 requests whose events each land exactly once. The event writer's rotation,
recovery and failure are tested in-process (no server needed), as are the settings' checks.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import errno
import fcntl
import json
import os
import re
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from inboxlift import tokens
from inboxlift.clock import SystemClock
from inboxlift.schemas import EVENT_TYPES, EVENTS_LANDING
from inboxlift.service import EventLog, EventLogError, build_app, event_line, finalise_leftovers
from inboxlift.service.app import _EventIds
from inboxlift.service.agents import AgentRules
from inboxlift.service.pages import issue_form_token, negotiate_locale
from inboxlift.settings import ServeSettings, SettingsError, load_settings
from service_server import KEY, ROOT, Server, event_files, flood, in_progress_files, read_events

UTC = dt.timezone.utc
SIGNING_KEY = KEY.encode()
IPHONE = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148"
DESKTOP = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36"
TARGET = "https://shop.example/p/i1?utm_source=inboxlift&utm_campaign=c1"


def now() -> dt.datetime:
    return dt.datetime.now(UTC)


def message(user_id: str = "u1", *, issued_at: dt.datetime | None = None, key: bytes = SIGNING_KEY,
            campaign_id: str = "wk-47") -> tuple[str, tokens.MessageTokens]:
    """A fresh message id (so a test finds its own events) and the message's token issuer."""
    message_id = f"m-{uuid.uuid4().hex[:12]}"
    issued = issued_at or now() - dt.timedelta(hours=2)
    return message_id, tokens.MessageTokens(key=key, issued_at=issued, message_id=message_id,
                                            campaign_id=campaign_id, user_id=user_id, variant="B")


def lines_of(server: Server, message_id: str) -> list[dict]:
    """The events of one message so far, from finished and in-progress files (each line is synced)."""
    found = []
    for path in event_files(server.events_dir) + in_progress_files(server.events_dir):
        for line in path.read_text("utf-8").splitlines():
            event = json.loads(line)
            if event.get("message_id") == message_id:
                found.append(event)
    return found


def all_text(server: Server) -> str:
    files = event_files(server.events_dir) + in_progress_files(server.events_dir)
    return "".join(p.read_text("utf-8") for p in files)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Server(tmp_path_factory.mktemp("serve")).start()
    yield running
    running.kill()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.base_url, timeout=10) as c:
        yield c


# ---- clicks -----------------------------------------------------------------------------------

def test_click_redirects_to_the_signed_url_and_records_the_click(server, client):
    message_id, issuer = message()
    response = client.get(f"/c/{issuer.click(3, 'i1', TARGET)}", headers={"user-agent": IPHONE})
    assert response.status_code == 302
    assert response.headers["location"] == TARGET
    assert "no-store" in response.headers["cache-control"]
    assert response.headers["referrer-policy"] == "no-referrer"
    (event,) = lines_of(server, message_id)
    assert set(event) == {"event_id", "event_type", "event_ts", "user_id", "item_id", "campaign_id", "message_id",
                          "properties"}
    assert set(event) - {"properties"} <= set(EVENTS_LANDING.fieldNames())
    assert event["event_type"] == "email_click" and event["event_type"] in EVENT_TYPES
    assert (event["user_id"], event["item_id"], event["campaign_id"]) == ("u1", "i1", "wk-47")
    assert uuid.UUID(event["event_id"]).version == 4
    assert abs(dt.datetime.fromisoformat(event["event_ts"].replace("Z", "+00:00")) - now()) < dt.timedelta(minutes=1)
    assert event["properties"] == {"variant": "B", "link_position": "3", "ua_class": "mobile",
                                   "is_machine_click": "false",
                                   "target_hash": tokens.ClickToken("", "", "", "", 0, "", TARGET, now()).target_hash}


def test_call_to_action_click_without_item_and_scanner_click(server, client):
    message_id, issuer = message()
    assert client.get(f"/c/{issuer.click(0, None, TARGET)}", headers={"user-agent": "Barracuda Sentinel"}
                      ).status_code == 302
    (event,) = lines_of(server, message_id)
    assert "item_id" not in event
    assert event["properties"]["link_position"] == "0"
    assert (event["properties"]["ua_class"], event["properties"]["is_machine_click"]) == ("scanner", "true")


def test_head_answers_like_get_and_records_nothing(server, client):
    message_id, issuer = message()
    assert client.head(f"/c/{issuer.click(1, 'i1', TARGET)}").status_code == 302
    assert client.head(f"/o/{issuer.open()}.gif").status_code == 200
    assert lines_of(server, message_id) == []


# ---- tokens that are not genuine --------------------------------------------------------------

def _altered(token: str) -> str:
    """One character of the MAC changed (to another base64url character)."""
    middle = len(token) // 2
    return token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1:]


def bad_click_tokens(issuer: tokens.MessageTokens) -> dict[str, str]:
    good = issuer.click(1, "i1", TARGET)
    _, expired_issuer = message(issued_at=now() - dt.timedelta(days=181))
    _, forger = message(key=b"someone-elses-signing-key-0123456789abcdef")
    return {
        "altered": _altered(good),
        "truncated": good[:-3],
        "extended": good + "AA",
        "forged": forger.click(1, "i1", TARGET),
        "expired": expired_issuer.click(1, "i1", TARGET),
        "open token": issuer.open(),
        "unsubscribe token": issuer.unsubscribe("weekly_picks"),
        "padded": good + "=",
        "empty-ish": "A",
    }


def test_click_tokens_that_are_not_genuine_answer_404_and_record_nothing(server, client):
    message_id, issuer = message()
    for kind, token in bad_click_tokens(issuer).items():
        response = client.get(f"/c/{token}")
        assert response.status_code == 404, kind
        assert "location" not in response.headers, kind
    assert lines_of(server, message_id) == []


def test_open_and_unsubscribe_tokens_that_are_not_genuine_answer_404(server, client):
    message_id, issuer = message()
    _, forger = message(key=b"someone-elses-signing-key-0123456789abcdef")
    _, expired = message(issued_at=now() - dt.timedelta(days=181))
    for token in (_altered(issuer.open()), issuer.open()[:-2], forger.open(), expired.open(),
                  issuer.click(1, "i1", TARGET)):
        assert client.get(f"/o/{token}.gif").status_code == 404
    unsubscribe = issuer.unsubscribe("weekly_picks")
    for token in (_altered(unsubscribe), unsubscribe[:-4], forger.unsubscribe("weekly_picks"), issuer.open()):
        assert client.post(f"/u/{token}", data={"List-Unsubscribe": "One-Click"}).status_code == 404
        page = client.get(f"/u/{token}")
        assert page.status_code == 404 and "This link does not work" in page.text
    assert lines_of(server, message_id) == []


def test_another_users_token_cannot_be_made_from_mine(server, client):
    # Changing the user id inside my token (same length, so only the bytes differ) breaks the MAC.
    message_id, mine = message(user_id="u1")
    good = mine.click(1, "i1", TARGET)
    raw = base64.urlsafe_b64decode(good + "=" * (-len(good) % 4))
    spliced = raw.replace(b"\x02u1", b"\x02u2", 1)
    assert spliced != raw
    token = base64.urlsafe_b64encode(spliced).rstrip(b"=").decode()
    assert client.get(f"/c/{token}").status_code == 404
    assert lines_of(server, message_id) == []


def test_a_repeated_query_parameter_is_refused(server, client):
    message_id, issuer = message()
    assert client.get(f"/c/{issuer.click(1, 'i1', TARGET)}?u=u1&u=u2").status_code == 404
    assert client.get(f"/o/{issuer.open()}.gif?a=1&a=2").status_code == 404
    assert lines_of(server, message_id) == []


# ---- no open redirect -------------------------------------------------------------------------

def test_no_open_redirect(server, client):
    message_id, issuer = message()
    good = issuer.click(1, "i1", TARGET)
    # A query added to a genuine link changes nothing: the redirect goes where the token says.
    response = client.get(f"/c/{good}?url=https://evil.example/&next=//evil.example")
    assert response.status_code == 302 and response.headers["location"] == TARGET
    # A URL where the token should be, encoded or not, is no token.
    for path in ("/c/https:%2F%2Fevil.example%2F", "/c/%2F%2Fevil.example", "/c/evil.example"):
        assert client.get(path).status_code == 404, path
    # Even a genuine token is not followed to something that is not a web address.
    for target in ("javascript:alert(1)", "//evil.example/", "data:text/html,hi", "/relative"):
        assert client.get(f"/c/{issuer.click(2, 'i1', target)}").status_code == 404, target
    assert len(lines_of(server, message_id)) == 1


def test_a_non_ascii_target_is_sent_encoded_and_a_line_break_never(server, client):
    message_id, issuer = message()
    response = client.get(f"/c/{issuer.click(1, 'i1', 'https://shop.example/p/tè?q=日本')}")
    assert response.status_code == 302
    assert response.headers["location"] == "https://shop.example/p/t%C3%A8?q=%E6%97%A5%E6%9C%AC"
    injected = issuer.click(1, "i1", "https://shop.example/p\r\nSet-Cookie: session=1")
    response = client.get(f"/c/{injected}")
    assert response.status_code == 404 and "set-cookie" not in response.headers
    assert len(lines_of(server, message_id)) == 1


# ---- opens ------------------------------------------------------------------------------------

def test_open_answers_a_1x1_gif_that_is_never_cached(server, client):
    message_id, issuer = message()
    response = client.get(f"/o/{issuer.open()}.gif", headers={"user-agent": IPHONE})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/gif"
    assert response.content[:6] == b"GIF89a" and response.content[6:10] == b"\x01\x00\x01\x00"
    assert "no-store" in response.headers["cache-control"] and response.headers["pragma"] == "no-cache"
    (event,) = lines_of(server, message_id)
    assert event["event_type"] == "email_open"
    assert event["properties"]["is_machine_open"] == "false"
    assert event["properties"]["ua_class"] == "mobile"
    assert 7100 <= int(event["properties"]["seconds_since_issued"]) <= 7300


@pytest.mark.parametrize("case, headers, issued_ago, ua_class, is_machine", [
    ("a person on a phone, hours later", {"user-agent": IPHONE}, dt.timedelta(hours=2), "mobile", "false"),
    ("Apple Mail Privacy Protection's bare agent", {"user-agent": "Mozilla/5.0"}, dt.timedelta(hours=2),
     "apple_proxy", "true"),
    ("from Apple's network, through our proxy", {"user-agent": IPHONE, "x-forwarded-for": "17.58.100.7"},
     dt.timedelta(hours=2), "apple_proxy", "true"),
    ("a link scanner", {"user-agent": "Mozilla/5.0 (compatible; proofpoint-url-defense)"}, dt.timedelta(hours=2),
     "scanner", "true"),
    ("seconds after it was sent", {"user-agent": DESKTOP}, dt.timedelta(seconds=5), "desktop", "true"),
    ("Gmail's image proxy: a person opening", {"user-agent": "Mozilla/5.0 (via ggpht.com GoogleImageProxy)"},
     dt.timedelta(hours=2), "webmail_proxy", "false"),
    ("no user agent at all", {"user-agent": ""}, dt.timedelta(hours=2), "none", "false"),
])
def test_machine_opens_are_flagged(server, client, case, headers, issued_ago, ua_class, is_machine):
    message_id, issuer = message(issued_at=now() - issued_ago)
    assert client.get(f"/o/{issuer.open()}.gif", headers=headers).status_code == 200
    (event,) = lines_of(server, message_id)
    assert (event["properties"]["ua_class"], event["properties"]["is_machine_open"]) == (ua_class, is_machine), case


# ---- one-click unsubscribe (RFC 8058) ----------------------------------------------------------

@pytest.mark.parametrize("encoding", ["urlencoded", "multipart"])
def test_one_click_unsubscribes_at_once(server, client, encoding):
    message_id, issuer = message()
    body = ({"data": {"List-Unsubscribe": "One-Click"}} if encoding == "urlencoded"
            else {"files": {"List-Unsubscribe": (None, "One-Click")}})
    response = client.post(f"/u/{issuer.unsubscribe('weekly_picks')}", **body)
    assert response.status_code == 200
    (event,) = lines_of(server, message_id)
    assert event["event_type"] == "unsubscribe"
    assert event["properties"] == {"variant": "B", "campaign_type": "weekly_picks", "scope": "all",
                                   "method": "one_click", "ua_class": "scanner"}  # httpx's agent: a machine


def test_posts_that_are_not_one_click_nor_the_form_record_nothing(server, client):
    message_id, issuer = message()
    path = f"/u/{issuer.unsubscribe('weekly_picks')}"
    cases = {
        "other value": (client.post, {"data": {"List-Unsubscribe": "Yes"}}, 400),
        "extra field": (client.post, {"data": {"List-Unsubscribe": "One-Click", "x": "1"}}, 400),
        "repeated": (client.post, {"content": b"List-Unsubscribe=One-Click&List-Unsubscribe=One-Click",
                                   "headers": {"content-type": "application/x-www-form-urlencoded"}}, 400),
        "json": (client.post, {"json": {"List-Unsubscribe": "One-Click"}}, 415),
        "too large": (client.post, {"data": {"List-Unsubscribe": "One-Click", "pad": "x" * 5000}}, 413),
        "empty": (client.post, {"content": b"", "headers": {"content-type": "application/x-www-form-urlencoded"}},
                  400),
        "not utf-8": (client.post, {"content": b"List-Unsubscribe=\xff",
                                    "headers": {"content-type": "application/x-www-form-urlencoded"}}, 400),
    }
    for name, (send, kwargs, status) in cases.items():
        assert send(path, **kwargs).status_code == status, name
    assert lines_of(server, message_id) == []


# ---- the preferences page ---------------------------------------------------------------------

def form_token_of(html: str) -> str:
    found = re.search(r'name="form_token" value="([A-Za-z0-9_-]+)"', html)
    assert found, html
    return found.group(1)


def test_page_is_in_the_users_language_and_locked_down(server, client):
    _, issuer = message()
    path = f"/u/{issuer.unsubscribe('weekly_picks')}"
    english = client.get(path)
    assert english.status_code == 200 and english.headers["content-type"] == "text/html; charset=utf-8"
    assert '<html lang="en">' in english.text and "“Weekly picks”" in english.text
    assert english.text.count('type="radio"') == 4 and english.text.count("<label for=") == 4
    chinese = client.get(path, headers={"accept-language": "zh-CN,zh;q=0.9,en;q=0.5"})
    assert '<html lang="zh-CN">' in chinese.text and "每周精选" in chinese.text and "退订全部营销邮件" in chinese.text
    assert '<html lang="zh-CN">' in client.get(f"{path}?lang=zh-CN", headers={"accept-language": "en"}).text
    headers = english.headers
    assert headers["x-frame-options"] == "DENY" and headers["referrer-policy"] == "same-origin"
    assert "default-src 'none'" in headers["content-security-policy"]
    assert "form-action 'self'" in headers["content-security-policy"]
    assert "<script" not in english.text
    # The form posts back to the page's own address and carries no personal data.
    assert f'action="{issuer.unsubscribe("weekly_picks")}"' in english.text
    assert "u1" not in english.text.replace(issuer.unsubscribe("weekly_picks"), "")


def test_a_link_without_campaign_type_offers_the_all_mail_choices_only(server, client):
    message_id, issuer = message()
    path = f"/u/{issuer.unsubscribe(None)}"
    page = client.get(path)
    assert page.text.count('type="radio"') == 2 and "only_type" not in page.text
    refused = client.post(path, data={"form_token": form_token_of(page.text), "choice": "only_type"})
    assert refused.status_code == 400
    assert lines_of(server, message_id) == []


@pytest.mark.parametrize("choice, event_type, scope", [
    ("unsubscribe_type", "unsubscribe", "weekly_picks"),
    ("only_type", "preference_change", "weekly_picks"),
    ("unsubscribe_all", "unsubscribe", "all"),
    ("resubscribe_all", "resubscribe", "all"),
])
def test_form_choices_are_recorded(server, client, choice, event_type, scope):
    message_id, issuer = message()
    path = f"/u/{issuer.unsubscribe('weekly_picks')}"
    page = client.get(path, headers={"accept-language": "zh-CN"})
    saved = client.post(path, data={"form_token": form_token_of(page.text), "lang": "zh-CN", "choice": choice},
                        headers={"origin": server.base_url, "user-agent": DESKTOP})
    assert saved.status_code == 200 and "已保存您的选择" in saved.text
    (event,) = lines_of(server, message_id)
    assert event["event_type"] == event_type
    assert event["properties"] == {"variant": "B", "campaign_type": "weekly_picks", "scope": scope,
                                   "method": "page", "ua_class": "desktop"}


def test_form_posts_that_are_not_genuine_record_nothing(server, client):
    message_id, issuer = message(user_id="u1")
    _, other_user = message(user_id="u2")
    token = issuer.unsubscribe("weekly_picks")
    path = f"/u/{token}"
    mine = form_token_of(client.get(path).text)
    theirs = form_token_of(client.get(f"/u/{other_user.unsubscribe('weekly_picks')}").text)
    stale = issue_form_token(key=SIGNING_KEY, token=token, now=now() - dt.timedelta(days=2))
    future = issue_form_token(key=SIGNING_KEY, token=token, now=now() + dt.timedelta(hours=1))
    forged = issue_form_token(key=b"someone-elses-signing-key-0123456789abcdef", token=token, now=now())
    for name, fields, headers, status in [
        ("another user's form token", {"form_token": theirs, "choice": "unsubscribe_all"}, {}, 403),
        ("a stale form token", {"form_token": stale, "choice": "unsubscribe_all"}, {}, 403),
        ("a form token from the future", {"form_token": future, "choice": "unsubscribe_all"}, {}, 403),
        ("a forged form token", {"form_token": forged, "choice": "unsubscribe_all"}, {}, 403),
        ("an altered form token", {"form_token": _altered(mine), "choice": "unsubscribe_all"}, {}, 403),
        ("another site's page", {"form_token": mine, "choice": "unsubscribe_all"},
         {"origin": "https://evil.example"}, 403),
        ("no form token", {"choice": "unsubscribe_all"}, {}, 400),
        ("an unknown field", {"form_token": mine, "choice": "unsubscribe_all", "user_id": "u2"}, {}, 400),
        ("an unknown choice", {"form_token": mine, "choice": "delete_account"}, {}, 400),
    ]:
        response = client.post(path, data=fields, headers=headers)
        assert response.status_code == status, name
    no_choice = client.post(path, data={"form_token": mine})
    assert no_choice.status_code == 400 and 'role="alert"' in no_choice.text
    assert 'aria-describedby="choice-error"' in no_choice.text
    assert lines_of(server, message_id) == []
    # The page's own, fresh form token still works afterwards.
    assert client.post(path, data={"form_token": mine, "choice": "unsubscribe_all"}).status_code == 200
    assert len(lines_of(server, message_id)) == 1


# ---- health, unknown paths, privacy -----------------------------------------------------------

def test_healthz_unknown_paths_and_methods(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert client.get("/").status_code == 404
    assert client.get("/u/").status_code == 404
    assert client.put(f"/c/{message()[1].click(1, 'i1', TARGET)}").status_code == 405
    assert "server" not in response.headers


_IPV4 = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?!\.?\d)")


def ip_addresses(text: str) -> list[str]:
    """Every dotted IPv4 address in ``text`` (not a timestamp's "17.585Z", which a substring check took for one)."""
    return _IPV4.findall(text)


@pytest.mark.parametrize("text, found", [
    ('{"event_ts":"2026-12-07T14:30:17.585Z"}', []),
    ('{"ip":"17.58.100.7"}', ["17.58.100.7"]),
    ("from 127.0.0.1, via 203.0.113.77.", ["127.0.0.1", "203.0.113.77"]),
    ("version 1.2.3.4.5", []),
])
def test_ip_addresses_finds_addresses_not_timestamps(text, found):
    assert ip_addresses(text) == found


def test_events_hold_no_address_and_no_ip(server, client):
    _, issuer = message()
    client.get(f"/o/{issuer.open()}.gif", headers={"x-forwarded-for": "203.0.113.77", "user-agent": IPHONE})
    text = all_text(server)
    assert text and "@" not in text
    assert ip_addresses(text) == [] and "203.0.113" not in text   # nor the forwarded address cut short
    assert "iPhone" not in text and "Mozilla" not in text  # only the agent's class is kept


# ---- a flood: every event lands exactly once --------------------------------------------------

def test_a_flood_of_10000_requests_lands_every_event_exactly_once(tmp_path):
    # Small files, so the flood also crosses several size rotations.
    server = Server(tmp_path, settings=["serve.rotate_bytes=200000"]).start()
    try:
        requests, expected = [], {}
        issued = now() - dt.timedelta(hours=1)
        for i in range(10_000):
            issuer = tokens.MessageTokens(key=SIGNING_KEY, issued_at=issued, message_id=f"flood-{i}",
                                          campaign_id="c1", user_id=f"u{i % 10}", variant="A")
            if i % 10 < 6:
                requests.append(("GET", f"/c/{issuer.click(1 + i % 5, 'i1', TARGET)}", {}))
                expected[f"flood-{i}"] = "email_click"
            elif i % 10 < 9:
                requests.append(("GET", f"/o/{issuer.open()}.gif", {}))
                expected[f"flood-{i}"] = "email_open"
            else:
                requests.append(("POST", f"/u/{issuer.unsubscribe('weekly_picks')}",
                                 {"data": {"List-Unsubscribe": "One-Click"}}))
                expected[f"flood-{i}"] = "unsubscribe"
        statuses = flood(server.base_url, requests, concurrency=16)
    finally:
        assert server.stop() in (0, -15)
    assert statuses.count(302) == 6000 and statuses.count(200) == 4000
    assert in_progress_files(server.events_dir) == []
    files = event_files(server.events_dir)
    assert len(files) >= 5, "the size rotation cut the flood into several files"
    assert all(f.stat().st_size <= 200_000 for f in files)
    events = read_events(server.events_dir)
    assert len(events) == 10_000
    assert {e["message_id"]: e["event_type"] for e in events} == expected
    assert len({e["event_id"] for e in events}) == 10_000


def test_several_workers_each_write_their_own_files(tmp_path):
    # Two uvicorn processes started from the factory: the settings travel through the environment.
    server = Server(tmp_path, settings=["serve.workers=2", "serve.rotate_seconds=3600"]).start()
    try:
        issued = now() - dt.timedelta(hours=1)
        requests = [("GET", "/c/" + tokens.issue_click(
            key=SIGNING_KEY, issued_at=issued, message_id=f"w-{i}", campaign_id="c1", user_id="u1", variant="A",
            position=1, item_id="i1", target=TARGET), {}) for i in range(400)]
        assert flood(server.base_url, requests, concurrency=8) == [302] * 400
    finally:
        assert server.stop() in (0, -15)
    assert in_progress_files(server.events_dir) == []
    events = read_events(server.events_dir)
    assert sorted(e["message_id"] for e in events) == sorted(f"w-{i}" for i in range(400))
    writers = {re.match(r"serve-\d{8}T\d{6}Z-(.+)-\d{6}\.jsonl", p.name).group(1)
               for p in event_files(server.events_dir)}
    assert 1 <= len(writers) <= 2


def test_the_command_refuses_a_pinned_clock_and_bad_settings():
    from inboxlift.cli import main

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    assert main(["serve", "--conf-dir", conf, "--now", "2026-11-20T12:00:00"], environ={}) == 2
    assert main(["serve", "--conf-dir", conf, "--port", "70000"], environ={}) == 2
    assert main(["serve", "--conf-dir", conf, "--set", "serve.machine_classes=[robots]"], environ={}) == 2


# ---- the event writer in-process --------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def line(n: int) -> bytes:
    return json.dumps({"event_id": f"e{n}", "event_type": "email_open"}).encode() + b"\n"


def test_files_rotate_by_size_and_time_and_only_finished_files_are_visible(tmp_path):
    monotonic = Clock()

    async def scenario() -> None:
        log = EventLog(tmp_path, rotate_seconds=60, rotate_bytes=100, now=now, monotonic=monotonic)
        await log.start()
        for n in range(3):  # ~40 bytes each: the third would pass 100 bytes
            await log.append(line(n))
        assert len(event_files(tmp_path)) == 1 and len(in_progress_files(tmp_path)) == 1
        monotonic.seconds = 61
        await asyncio.sleep(1.2)  # the rotation timer runs at least once a second
        assert len(event_files(tmp_path)) == 2 and in_progress_files(tmp_path) == []
        await asyncio.sleep(1.2)  # idle: no empty file appears
        assert len(list(tmp_path.iterdir())) == 2
        await asyncio.gather(*(log.append(line(n)) for n in range(3, 6)))
        await log.close()

    asyncio.run(scenario())
    files = event_files(tmp_path)
    assert [len(p.read_bytes().splitlines()) for p in files] == [2, 1, 3]
    assert sorted(json.loads(x)["event_id"] for p in files for x in p.read_bytes().splitlines()) == [
        f"e{n}" for n in range(6)]
    assert all(re.fullmatch(r"serve-\d{8}T\d{6}Z-[A-Za-z0-9-]+-\d{6}\.jsonl", p.name) for p in files)


def test_leftovers_are_finalised_unless_a_live_writer_holds_them(tmp_path):
    dead = tmp_path / ".serve-20261120T120000Z-host-1-aaaaaa-000001.jsonl"
    dead.write_bytes(line(1) + b'{"event_id": "torn')
    empty = tmp_path / ".serve-20261120T120000Z-host-2-bbbbbb-000001.jsonl"
    empty.write_bytes(b"")
    live = tmp_path / ".serve-20261120T120000Z-host-3-cccccc-000001.jsonl"
    live.write_bytes(line(2))
    other = tmp_path / ".notes.jsonl"
    other.write_bytes(b"x")
    holder = os.open(live, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        renamed = finalise_leftovers(tmp_path)
    finally:
        os.close(holder)
    assert renamed == [tmp_path / dead.name[1:]]
    assert (tmp_path / dead.name[1:]).read_bytes().endswith(b'{"event_id": "torn')  # kept for ingest to quarantine
    assert not empty.exists() and live.exists() and other.exists()
    assert finalise_leftovers(tmp_path) == [tmp_path / live.name[1:]]  # its writer is gone now


def test_a_write_that_fails_is_an_error_and_the_log_recovers(tmp_path):
    folder = tmp_path / "events"

    async def scenario() -> None:
        log = EventLog(folder, rotate_seconds=60, rotate_bytes=10_000, now=now)
        await log.start()
        await log.append(line(1))
        await log.close()
        log = EventLog(folder, rotate_seconds=60, rotate_bytes=10_000, now=now)
        await log.start()
        folder.rename(tmp_path / "moved")  # the folder disappears under the server
        with pytest.raises(EventLogError):
            await log.append(line(2))
        assert log.failure
        folder.mkdir()
        await log.append(line(3))
        assert log.failure is None
        await log.close()

    asyncio.run(scenario())
    assert [json.loads(x)["event_id"] for p in event_files(folder) for x in p.read_bytes().splitlines()] == ["e3"]


def _slow_durable_appends(monkeypatch, *, seconds: float, fail_call: int | None = None):
    """Make each batch's write-and-sync take ``seconds`` (the real one runs after the wait); the
    ``fail_call``-th batch (1-based) fails with EIO instead. Returns what was seen: the most batches
    in flight at once, the lines each batch held and whether it succeeded, the descriptors used."""
    from inboxlift.service import events

    real = events._append_durably
    seen = {"in_flight": 0, "most_in_flight": 0, "batches": [], "fds": set(), "synced": set()}
    lock = threading.Lock()

    def slow(fd: int, data: bytes) -> None:
        with lock:
            seen["in_flight"] += 1
            seen["most_in_flight"] = max(seen["most_in_flight"], seen["in_flight"])
            seen["fds"].add(fd)
            call = len(seen["batches"]) + 1
            seen["batches"].append((data.splitlines(), None))
        try:
            time.sleep(seconds)
            if call == fail_call:
                raise OSError(errno.EIO, "Input/output error")
            real(fd, data)
            with lock:
                seen["synced"].update(data.splitlines())
        finally:
            with lock:
                seen["in_flight"] -= 1
                seen["batches"][call - 1] = (data.splitlines(), call != fail_call)

    monkeypatch.setattr(events, "_append_durably", slow)
    return seen


def _staggered_appends(log: EventLog, seen: dict, lines: list[bytes], *, every: float) -> list[str]:
    """Append ``lines`` ten at a time, a wave every ``every`` seconds; each one's outcome. An append
    that returns must find its line already synced."""
    async def one(line: bytes) -> str:
        try:
            await log.append(line)
        except EventLogError:
            return "failed"
        assert line.rstrip(b"\n") in seen["synced"], "answered before its line was on disk"
        return "ok"

    async def waves() -> list[str]:
        tasks = []
        for at in range(0, len(lines), 10):
            tasks += [asyncio.create_task(one(x)) for x in lines[at:at + 10]]
            await asyncio.sleep(every)
        return list(await asyncio.gather(*tasks))

    return waves()


def test_batches_sync_side_by_side_when_the_disk_is_slow_and_every_event_lands_once(tmp_path, monkeypatch):
    # A sync of 60 ms and a wave of ten events every 10 ms: with one sync at a time each wave would
    # wait for the running sync and then its own; with two, the next batch starts beside it.
    seen = _slow_durable_appends(monkeypatch, seconds=0.06)
    lines = [line(n) for n in range(200)]

    async def scenario() -> list[str]:
        log = EventLog(tmp_path, rotate_seconds=60, rotate_bytes=10_000_000, now=now, syncs_in_flight=2)
        await log.start()
        outcomes = await _staggered_appends(log, seen, lines, every=0.01)
        # Each slot writes through a descriptor opened on its own, not a dup: its own write-back errors.
        first, second = log._file.fds
        fcntl.fcntl(first, fcntl.F_SETFL, fcntl.fcntl(first, fcntl.F_GETFL) | os.O_NONBLOCK)
        assert not fcntl.fcntl(second, fcntl.F_GETFL) & os.O_NONBLOCK
        await log.close()
        assert log.events_written == 200 and log.syncs == len(seen["batches"])
        return outcomes

    assert asyncio.run(scenario()) == ["ok"] * 200
    assert seen["most_in_flight"] == 2 and len(seen["fds"]) == 2
    assert len(seen["batches"]) < 200 / 5, "concurrent events share a sync"
    assert sorted(x for batch, _ in seen["batches"] for x in batch) == sorted(x.rstrip(b"\n") for x in lines)
    assert in_progress_files(tmp_path) == []
    written = [x for p in event_files(tmp_path) for x in p.read_bytes().splitlines()]
    assert sorted(written) == sorted(x.rstrip(b"\n") for x in lines)  # every event once, nothing torn


def test_one_sync_at_a_time_when_asked(tmp_path, monkeypatch):
    seen = _slow_durable_appends(monkeypatch, seconds=0.03)

    async def scenario() -> list[str]:
        log = EventLog(tmp_path, rotate_seconds=60, rotate_bytes=10_000_000, now=now, syncs_in_flight=1)
        await log.start()
        outcomes = await _staggered_appends(log, seen, [line(n) for n in range(60)], every=0.01)
        await log.close()
        return outcomes

    assert asyncio.run(scenario()) == ["ok"] * 60
    assert seen["most_in_flight"] == 1 and len(seen["fds"]) == 1
    assert sorted(json.loads(x)["event_id"] for p in event_files(tmp_path) for x in p.read_bytes().splitlines()) \
        == sorted(f"e{n}" for n in range(60))


def test_a_failing_sync_fails_its_own_batch_and_no_answer_claims_durability(tmp_path, monkeypatch):
    # The second batch's sync fails while the first is still in flight on the same file.
    seen = _slow_durable_appends(monkeypatch, seconds=0.06, fail_call=2)
    lines = [line(n) for n in range(100)]

    async def scenario() -> list[str]:
        log = EventLog(tmp_path, rotate_seconds=60, rotate_bytes=10_000_000, now=now, syncs_in_flight=2)
        await log.start()
        outcomes = await _staggered_appends(log, seen, lines, every=0.01)
        assert log.failure is None  # later batches succeeded: the log recovered
        await log.close()
        return outcomes

    outcomes = asyncio.run(scenario())
    assert seen["most_in_flight"] == 2
    failed_batch = [batch for batch, ok in seen["batches"] if ok is False]
    assert len(failed_batch) == 1
    failed = {x for x in failed_batch[0]}
    assert [x.rstrip(b"\n") in failed for x in lines] == [o == "failed" for o in outcomes]
    assert 0 < outcomes.count("failed") < 100
    # The file the failure happened in was closed and renamed into place; later batches went to another.
    files = event_files(tmp_path)
    assert len(files) == 2 and in_progress_files(tmp_path) == []
    written = [x for p in files for x in p.read_bytes().splitlines()]
    assert set(written) >= {x.rstrip(b"\n") for x, o in zip(lines, outcomes) if o == "ok"}
    assert not set(written) & failed  # the failing call here wrote nothing


# ---- the hot path, in process ----------------------------------------------------------------

async def _asgi(app, method: str, path: str, *, query: bytes = b"", root_path: str = "",
                user_agent: bytes = b"test") -> tuple[list[dict], dict]:
    """One request straight into the ASGI app: the messages it sent, and the scope it saw."""
    messages: list[dict] = []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": root_path + path, "raw_path": (root_path + path).encode(),
             "query_string": query, "root_path": root_path, "client": ("127.0.0.1", 50000),
             "server": ("127.0.0.1", 8080), "headers": [(b"host", b"127.0.0.1:8080"), (b"user-agent", user_agent)]}

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        messages.append(message)

    await app(scope, receive, send)
    return messages, scope


def test_clicks_and_opens_answer_the_same_ahead_of_the_router_as_through_it(tmp_path):
    # GET and HEAD of /c/ and /o/ skip Starlette's middleware and router; an app mounted under a root
    # path goes through them (as does any other method). Both ways must give the same bytes.
    settings = load_settings("local", conf_dir=ROOT / "conf", environ={},
                             overrides={"paths.landing_dir": str(tmp_path / "landing")})
    app = build_app(settings=settings, key=SIGNING_KEY, clock=SystemClock())
    message_id, issuer = message()
    _, forger = message(key=b"someone-elses-signing-key-0123456789abcdef")
    _, old = message(issued_at=now() - dt.timedelta(days=181))
    click, opened = issuer.click(1, "i1", TARGET), issuer.open()
    not_found = {"type": "http.response.start", "status": 404, "headers": [
        (b"cache-control", b"no-store, no-cache, must-revalidate, max-age=0"), (b"pragma", b"no-cache"),
        (b"expires", b"0"), (b"referrer-policy", b"no-referrer"), (b"x-content-type-options", b"nosniff"),
        (b"content-length", b"10"), (b"content-type", b"text/plain; charset=utf-8")]}
    # A redirect carries only the headers that mean something without a body.
    redirect = {"type": "http.response.start", "status": 302, "headers": [
        not_found["headers"][0], not_found["headers"][3], (b"location", TARGET.encode()), (b"content-length", b"0")]}
    pixel = {"type": "http.response.start", "status": 200, "headers": [
        *not_found["headers"][:5], (b"content-type", b"image/gif"), (b"content-length", b"43")]}
    cases = [  # method, path, query, the answer's start, body
        ("GET", f"/c/{_altered(click)}", b"", not_found, b"Not found\n"),
        ("GET", f"/c/{forger.click(1, 'i1', TARGET)}", b"", not_found, b"Not found\n"),
        ("GET", f"/c/{old.click(1, 'i1', TARGET)}", b"", not_found, b"Not found\n"),
        ("GET", f"/c/{opened}", b"", not_found, b"Not found\n"),
        ("GET", f"/c/{issuer.click(2, 'i1', 'javascript:alert(1)')}", b"", not_found, b"Not found\n"),
        ("GET", f"/c/{click}", b"u=1&u=2", not_found, b"Not found\n"),
        ("GET", f"/o/{click}.gif", b"", not_found, b"Not found\n"),
        ("GET", f"/o/{_altered(opened)}.gif", b"", not_found, b"Not found\n"),
        ("HEAD", f"/c/{click}", b"", redirect, b""),
        ("HEAD", f"/o/{opened}.gif", b"", pixel, gif_pixel()),
        ("GET", f"/c/{click}", b"url=https://evil.example/", redirect, b""),
        ("GET", f"/o/{opened}.gif", b"", pixel, gif_pixel()),
    ]

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            for method, path, query, start, body in cases:
                fast, fast_scope = await _asgi(app, method, path, query=query)
                routed, routed_scope = await _asgi(app, method, path, query=query, root_path="/mounted")
                assert fast == routed == [start, {"type": "http.response.body", "body": body}], (method, path)
                assert "app" not in fast_scope and "app" in routed_scope  # the two ways were taken
            # Only other paths and methods reach the router from the root: Starlette's 405 and 404.
            for method, path, status in (("PUT", f"/c/{click}", 405), ("POST", f"/o/{opened}.gif", 405),
                                         ("GET", f"/c/{click}/x", 404), ("GET", "/o/.gif", 404),
                                         ("GET", "/c/", 404)):
                answer, scope = await _asgi(app, method, path)
                assert answer[0]["status"] == status and "app" in scope, (method, path)
            # A disk that refuses the write: 503 with Retry-After both ways, never the redirect or the GIF.
            def failing_write(slot: int, data: bytes) -> None:
                raise OSError(28, "No space left on device")

            writes, app.state.service.log._commit = app.state.service.log._commit, failing_write
            for path in (f"/c/{click}", f"/o/{opened}.gif"):
                for root_path in ("", "/mounted"):
                    (start, body), _ = await _asgi(app, "GET", path, root_path=root_path)
                    assert start["status"] == 503 and (b"retry-after", b"30") in start["headers"], (path, root_path)
                    assert not any(name == b"location" for name, _ in start["headers"])
                    assert body["body"] == b"Service unavailable\n"
            app.state.service.log._commit = writes

    asyncio.run(scenario())
    events = [json.loads(x) for p in event_files(tmp_path / "landing" / "events" / "serve")
              for x in p.read_bytes().splitlines()]
    # The two genuine GETs, each answered twice (ahead of the router and through it); HEAD records nothing.
    assert sorted(e["event_type"] for e in events) == ["email_click"] * 2 + ["email_open"] * 2
    assert {e["message_id"] for e in events} == {message_id}
    assert {e["properties"]["ua_class"] for e in events} == {"other"}


def gif_pixel() -> bytes:
    return bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")


def test_event_lines_are_the_json_a_general_encoder_writes():
    # event_line puts the line together from json's string escaper; it must be the very bytes that
    # json.dumps writes for the same record: quotes, backslashes, control and line-separator
    # characters escaped, other non-ASCII as UTF-8, empty values left out.
    at = dt.datetime(2026, 11, 20, 12, 0, 0, 123456, tzinfo=UTC)
    odd = 'u"1\\\n\t\x00\u2028é日'
    line = event_line(event_type="email_click", at=at, user_id=odd, campaign_id="wk-47", message_id="<m@x>",
                      item_id="i1", properties={"variant": "", "link_position": "0", 'k"\\': odd})
    record = json.loads(line)
    expected = {"event_id": record["event_id"], "event_type": "email_click", "event_ts": "2026-11-20T12:00:00.123Z",
                "user_id": odd, "item_id": "i1", "campaign_id": "wk-47", "message_id": "<m@x>",
                "properties": {"link_position": "0", 'k"\\': odd}}
    assert line == (json.dumps(expected, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
    assert list(record) == list(expected)
    scoped = event_line(event_type="unsubscribe", at=at.astimezone(dt.timezone(dt.timedelta(hours=8))),
                        user_id="u1", campaign_id="", message_id="", properties={"scope": "all", "method": "page"})
    record = json.loads(scoped)
    assert record == {"event_id": record["event_id"], "event_type": "unsubscribe",
                      "event_ts": "2026-11-20T12:00:00.123Z", "user_id": "u1", "campaign_type": "all",
                      "properties": {"scope": "all", "method": "page"}}
    assert scoped.endswith(b"}\n") and scoped.count(b"\n") == 1


def test_event_ids_are_random_version_4_uuids_and_a_forked_child_draws_its_own():
    ids = _EventIds()
    drawn = [ids() for _ in range(1000)]  # several refills of the 128-id buffer
    assert len(set(drawn)) == 1000
    for text in drawn:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122
    from inboxlift.service import app as app_module

    app_module._uuid4()  # the process's buffer now holds ids not handed out yet
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child process
        os.close(read)
        os.write(write, "".join(app_module._uuid4() for _ in range(4)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        from_child = pipe.read().decode()
    os.waitpid(child, 0)
    # Without the reset at fork, the child would hand out the parent's next ids.
    from_parent = "".join(app_module._uuid4() for _ in range(4))
    assert len(from_child) == len(from_parent) == 144 and from_child != from_parent


# ---- rules ------------------------------------------------------------------------------------

def test_user_agent_classes():
    rules = AgentRules.from_settings(ServeSettings())
    assert rules.classify(IPHONE, "198.51.100.1") == "mobile"
    assert rules.classify(DESKTOP, None) == "desktop"
    assert rules.classify("Mozilla/5.0", None) == "apple_proxy"
    assert rules.classify(DESKTOP, "17.1.2.3") == "apple_proxy"
    assert rules.classify(DESKTOP, "not an address") == "desktop"
    assert rules.classify("curl/8.5.0", None) == "scanner"
    assert rules.classify("Googlebot/2.1", None) == "scanner"
    assert rules.classify("SomethingNew/1.0", None) == "other"
    assert rules.classify(None, None) == "none" and rules.classify("  ", None) == "none"
    assert rules.is_machine("scanner") and not rules.is_machine("webmail_proxy")
    # Addresses are remembered: asked again, the same answers.
    assert rules.classify(DESKTOP, "17.1.2.3") == "apple_proxy" and rules.classify(DESKTOP, "18.1.2.3") == "desktop"
    assert rules.classify(DESKTOP, "not an address") == "desktop"


def test_language_negotiation():
    assert negotiate_locale(None, None) == "en"
    assert negotiate_locale(None, "zh-TW,zh;q=0.8") == "zh-CN"
    assert negotiate_locale(None, "fr-FR,en;q=0.5,zh;q=0.7") == "zh-CN"
    assert negotiate_locale(None, "fr-FR,de;q=0.5") == "en"
    assert negotiate_locale(None, "zh;q=0,en") == "en"
    assert negotiate_locale("ZH-cn", "en") == "zh-CN"
    assert negotiate_locale("klingon", "zh") == "zh-CN"


@pytest.mark.parametrize("values, message", [
    ({"port": 0}, "serve.port"),
    ({"workers": 0}, "serve.workers"),
    ({"rotate_seconds": 0}, "serve.rotate_seconds"),
    ({"user_agent_classes": {"bots": ["("]}}, "invalid pattern"),
    ({"user_agent_classes": {"other": ["x"]}}, "not 'none' or 'other'"),
    ({"machine_classes": ["robots"]}, "not in user_agent_classes"),
    ({"apple_proxy_networks": ["17/8"]}, "not a network"),
])
def test_serve_settings_are_checked(values, message):
    with pytest.raises(SettingsError, match=message):
        ServeSettings(**values)
