"""The preferences page in headless Chromium (Debian's ``chromium``, driven by Playwright, no browser
download): it renders at 360 px wide without sideways scrolling, every choice has its label, the
keyboard alone can choose and submit, the form works with JavaScript off, and the unsubscribe is
recorded. Screenshots are kept under the test's tmp folder (their paths are printed).

Skips, saying why, when Chromium or Playwright is missing; CI installs both (``.ci/run``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path

import pytest

from inboxlift import tokens
from service_server import KEY, Server, event_files, in_progress_files

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
CHROMIUM = next((p for p in (os.environ.get("CHROMIUM_BIN"), "/usr/bin/chromium", shutil.which("chromium"))
                 if p and Path(p).is_file()), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary; `apt-get install -y chromium`")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]
PHONE = {"width": 360, "height": 740}


def _events(server: Server, message_id: str) -> list[dict]:
    lines = [line for path in event_files(server.events_dir) + in_progress_files(server.events_dir)
             for line in path.read_text("utf-8").splitlines()]
    return [e for e in map(json.loads, lines) if e.get("message_id") == message_id]


def _token(message_id: str, campaign_type: str) -> str:
    return tokens.issue_unsubscribe(key=KEY.encode(), issued_at=dt.datetime.now(dt.timezone.utc),
                                    message_id=message_id, campaign_id="wk-47", campaign_type=campaign_type,
                                    user_id="u7", variant="A")


def _not_blank(path: Path) -> None:
    from PIL import Image, ImageStat

    with Image.open(path) as image:
        assert image.width == PHONE["width"]
        grey = image.convert("L")
        assert ImageStat.Stat(grey).stddev[0] > 10, f"{path} looks blank"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Server(tmp_path_factory.mktemp("serve-browser")).start()
    yield running
    running.kill()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield launched
        launched.close()


def test_the_keyboard_alone_unsubscribes_with_javascript_off_on_a_phone(server, browser, tmp_path):
    context = browser.new_context(viewport=PHONE, java_script_enabled=False, locale="en-GB")
    page = context.new_page()
    page.goto(f"{server.base_url}/u/{_token('m-browser-1', 'weekly_picks')}")
    assert page.title() == "Email preferences · Example Shop"
    assert page.locator("html").get_attribute("lang") == "en"

    # Every choice has a label, and the labels are what a screen reader announces.
    radios = page.get_by_role("radio")
    assert radios.count() == 4
    for label in ("Stop “Weekly picks” emails, keep the others", "Only send me “Weekly picks” emails",
                  "Stop all marketing email", "Send me all marketing email again"):
        assert page.get_by_label(label).count() == 1, label
    assert page.get_by_role("group", name="What would you like to do?").count() == 1

    # 360 px: nothing sticks out sideways, the targets are large enough to touch.
    for element in (*[radios.nth(i) for i in range(4)], page.get_by_role("button")):
        box = element.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
    assert page.get_by_role("button").bounding_box()["height"] >= 44
    shot = tmp_path / "preferences-en-360px.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}")
    _not_blank(shot)

    # Keyboard only: Tab into the radio group, arrows to "Stop all marketing email", Tab, Enter.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "choice-unsubscribe_type"
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    assert page.get_by_label("Stop all marketing email").is_checked()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.tagName") == "BUTTON"
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.get_by_role("heading", level=1).inner_text() == "Your choice is saved"
    assert "unsubscribed from all marketing email" in page.get_by_role("status").inner_text()
    saved = tmp_path / "saved-en-360px.png"
    page.screenshot(path=str(saved), full_page=True)
    print(f"screenshot: {saved}")
    context.close()

    (event,) = _events(server, "m-browser-1")
    assert event["event_type"] == "unsubscribe" and event["user_id"] == "u7"
    assert {k: event["properties"][k] for k in ("scope", "method", "campaign_type")} == {
        "scope": "all", "method": "page", "campaign_type": "weekly_picks"}


def test_the_page_in_chinese_fits_a_phone_and_submits_with_a_click(server, browser, tmp_path):
    context = browser.new_context(viewport=PHONE, locale="zh-CN")
    page = context.new_page()
    page.goto(f"{server.base_url}/u/{_token('m-browser-2', 'abandoned_cart')}")
    assert page.locator("html").get_attribute("lang") == "zh-CN"
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    shot = tmp_path / "preferences-zh-CN-360px.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}")
    _not_blank(shot)
    # Submitting without a choice is stopped by the browser (the radios are required): nothing is sent.
    page.get_by_role("button", name="保存我的选择").click()
    assert page.get_by_role("heading", level=1).inner_text() == "邮件订阅设置"
    assert _events(server, "m-browser-2") == []
    page.get_by_label("不再接收“购物车提醒”邮件，其他邮件照常").check()
    with page.expect_navigation():
        page.get_by_role("button", name="保存我的选择").click()
    assert page.get_by_role("heading", level=1).inner_text() == "已保存您的选择"
    context.close()
    (event,) = _events(server, "m-browser-2")
    assert event["event_type"] == "unsubscribe"
    assert (event["properties"]["scope"], event["properties"]["ua_class"]) == ("abandoned_cart", "scanner")
