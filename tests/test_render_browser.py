"""Rendered emails in a real browser: headless Chromium (Debian's ``chromium``) draws the preview HTML.

Checks: the screenshot is not blank, the message is no wider than 640 px on a desktop window and does
not overflow a phone-sized one, and every image has alt text (the 1x1 tracking pixel has an empty
alt, as decorative images should). Skips, saying why, when no Chromium binary is installed; CI
installs it (``.ci/run``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest

from inboxlift.render import RenderConfig, render_row
from inboxlift.settings import RenderSettings

CHROMIUM = next((p for p in (os.environ.get("CHROMIUM_BIN"), shutil.which("chromium"), "/usr/bin/chromium",
                             shutil.which("chromium-browser"), shutil.which("google-chrome")) if p and
                 Path(p).is_file()), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium binary (looked for $CHROMIUM_BIN, chromium, /usr/bin/chromium, chromium-browser, "
           "google-chrome); install it with `apt-get install -y chromium`",
)
MAX_WIDTH = 640
NARROW = 500
# Written into a copy of the page (never into the email): what the browser measured, for --dump-dom.
PROBE = """
<script>
window.addEventListener("load", function () {
  var message = document.getElementById("message");
  var images = Array.prototype.map.call(document.images, function (img) {
    return {alt: img.getAttribute("alt"), width: img.getAttribute("width"), src: img.getAttribute("src")};
  });
  var probe = document.createElement("pre");
  probe.id = "probe";
  var hrefs = Array.prototype.map.call(document.links, function (a) { return a.getAttribute("href"); });
  probe.textContent = JSON.stringify({
    title: document.title,
    hrefs: hrefs,
    scrollWidth: document.documentElement.scrollWidth,
    viewport: window.innerWidth,
    messageWidth: message.getBoundingClientRect().width,
    images: images
  });
  document.body.appendChild(probe);
});
</script>
"""


def _message(campaign_type: str, locale: str, first_name: str = "Ann") -> dict:
    config = RenderConfig.from_settings(RenderSettings(), signing_key=b"browser-test-signing-key-0123456789",
                                        rendered_at=dt.datetime(2026, 11, 20, 12, tzinfo=dt.timezone.utc))
    products = [
        dict(position=i, item_id=f"i{i}", source="cart" if i < 3 else "similar",
             name=f"Handwoven wool throw blanket, extra large, colour {i}" if i % 2 else f"Mug{'X' * 60}{i}",
             brand="Lumo", category="Home", price=Decimal("1234.50") + i, currency="USD",
             image_url=f"https://img.shop.example/i{i}.jpg", url=f"https://shop.example/p/i{i}", in_stock=True,
             is_found=True)
        for i in range(10)
    ]
    row = dict(campaign_id="wk-47", campaign_type=campaign_type, user_id="u1", variant="A", template=campaign_type,
               locale=locale, subject_template="{{ first_name or 'Hi there' }}, your picks",
               send_at=dt.datetime(2026, 11, 21, 9, tzinfo=dt.timezone.utc),
               context=[("segment_name", "VIP loyal"), ("cart_added_at", "2026-11-19T08:00:00Z")], has_user=True,
               email="ann@mail.example", first_name=first_name, timezone="Europe/London", email_consent=True,
               products=products)
    out = render_row(row, config)
    assert out["reason"] is None, out["error"]
    return out


def _chromium(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", "--no-first-run", "--disable-extensions",
               # Offline: the images' hosts resolve nowhere, so the browser shows their alt text.
               "--host-resolver-rules=MAP * ~NOTFOUND", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def _measure(html: str, tmp_path: Path, *, width: int, name: str) -> dict:
    page = tmp_path / f"{name}.html"
    page.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    result = _chromium(f"--window-size={width},2000", "--virtual-time-budget=5000", "--dump-dom", page.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, flags=re.S)
    assert found, f"chromium printed no probe (exit {result.returncode}): {result.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@pytest.mark.parametrize("campaign_type, locale", [("weekly_picks", "en"), ("abandoned_cart", "zh-CN")])
def test_layout_is_at_most_640px_wide_and_fits_a_phone(campaign_type, locale, tmp_path):
    html = _message(campaign_type, locale)["html"]
    desktop = _measure(html, tmp_path, width=1000, name="desktop")
    assert desktop["viewport"] == 1000
    assert 600 <= desktop["messageWidth"] <= MAX_WIDTH
    assert desktop["scrollWidth"] <= 1000
    # Headless Chromium windows are at least 500 px wide: narrow enough to show the table shrinks
    # below 640 px instead of forcing sideways scrolling.
    narrow = _measure(html, tmp_path, width=NARROW, name="narrow")
    assert narrow["viewport"] == NARROW
    assert narrow["messageWidth"] <= NARROW - 16 and narrow["scrollWidth"] <= NARROW

    images = desktop["images"]
    assert len(images) == 11  # ten product images and the tracking pixel
    for image in images:
        assert image["alt"] is not None, f"image without alt: {image['src']}"
        if image["width"] != "1":
            assert image["alt"].strip(), f"content image with empty alt: {image['src']}"
    pixels = [i for i in images if i["width"] == "1"]
    assert len(pixels) == 1 and pixels[0]["alt"] == ""
    assert re.fullmatch(r"https://t\.shop\.example/o/[A-Za-z0-9_-]+\.gif", pixels[0]["src"])


def test_title_has_no_bidi_override_and_every_link_is_a_signed_token(tmp_path):
    # U+202E in the first name would show "Ann" + "exe.gpj" reversed in the tab and the inbox.
    out = _message("weekly_picks", "en", first_name="Ann\u202egpj.exe")
    page = _measure(out["html"], tmp_path, width=1000, name="bidi")
    assert page["title"] == out["subject"] == "Anngpj.exe, your picks"
    hrefs = page["hrefs"]
    # Ten cards x (image, name, "View product"), the call to action, the unsubscribe link.
    assert len(hrefs) == 32
    assert all(re.fullmatch(r"https://t\.shop\.example/[cu]/[A-Za-z0-9_-]+", h) for h in hrefs), hrefs
    assert sum(h.startswith("https://t.shop.example/u/") for h in hrefs) == 1


def test_screenshot_is_not_blank(tmp_path):
    from PIL import Image, ImageStat

    page = tmp_path / "preview.html"
    page.write_text(_message("weekly_picks", "en")["html"], encoding="utf-8")
    shot = tmp_path / "preview.png"
    result = _chromium("--window-size=1000,1400", f"--screenshot={shot}", page.as_uri())
    assert shot.is_file(), f"no screenshot (exit {result.returncode}): {result.stderr[-2000:]}"
    with Image.open(shot) as image:
        assert image.size == (1000, 1400)
        grey = image.convert("L")
        stddev = ImageStat.Stat(grey).stddev[0]
        colours = grey.getcolors(maxcolors=256 * 256)
    # A blank page is one colour (stddev 0); text, cards and the grey frame give many shades.
    assert stddev > 10, f"screenshot looks blank (grey-level stddev {stddev:.2f})"
    assert colours is not None and len(colours) > 20
    # The page's dark text (#111827) is there: some pixels are much darker than the background.
    dark = sum(count for count, level in colours if level < 80)
    assert dark > 500, f"only {dark} dark pixels: no text drawn?"
