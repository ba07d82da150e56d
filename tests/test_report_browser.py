"""report.html in headless Chromium (Debian's ``chromium``, driven by Playwright, no browser download):
the page loads from a file with the network cut off and asks for nothing beyond itself, every figure
decodes, the verdict and totals tables are there, and a laptop-wide window needs no sideways scroll.

Skips, saying why, when Chromium or Playwright is missing; CI installs both (``.ci/run``).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from inboxlift.campaigns.experiments import compare_proportions
from inboxlift.reporting.page import report_page
from inboxlift.reporting.plots import png_bytes, report_figures
from inboxlift.settings import ReportSettings

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
CHROMIUM = next((p for p in (os.environ.get("CHROMIUM_BIN"), "/usr/bin/chromium", shutil.which("chromium"))
                 if p and Path(p).is_file()), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary; `apt-get install -y chromium`")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]
LAPTOP = {"width": 1280, "height": 800}
DAYS = [dt.date(2026, 11, 2), dt.date(2026, 11, 9)]


def _results() -> pd.DataFrame:
    rows = []
    for day in DAYS:
        for variant, clicks, conversions in (("A", 300, 40), ("B", 345, 47), ("holdout", 0, 0)):
            treated = variant != "holdout"
            rows.append(dict(campaign_id="weekly-picks", variant=variant, send_date=day,
                             recipients=5000 if treated else 1000, sent=4990 if treated else 0,
                             delivered=4950 if treated else 0, bounced=40 if treated else 0,
                             opens=1500 if treated else 0, clicks=clicks + 20, unique_clicks=clicks,
                             conversions=conversions, orders=conversions, revenue=conversions * 42.5,
                             unsubscribes=3 if treated else 0, complaints=1 if treated else 0,
                             window_conversions=120 if treated else 18, window_orders=130 if treated else 18,
                             window_revenue=5100.0 if treated else 765.0, is_window_closed=True))
    return pd.DataFrame(rows)


def _experiments() -> pd.DataFrame:
    c = compare_proportions(690, 9900, 600, 9900)
    u = compare_proportions(240, 10000, 36, 2000)
    return pd.DataFrame([
        dict(campaign_id="weekly-picks", test="ab", metric="clicks", variant="B", control="A", status="final",
             n_variant=9900, n_control=9900, difference=c.difference, difference_low=c.difference_low,
             difference_high=c.difference_high, is_significant=True,
             verdict="B beats A on clicks: +15% (95% CI +3% to +28%)"),
        dict(campaign_id="weekly-picks", test="holdout", metric="conversions", variant="treated", control="holdout",
             status="final", n_variant=10000, n_control=2000, difference=u.difference, difference_low=u.difference_low,
             difference_high=u.difference_high, is_significant=True,
             verdict="adds conversions: +0.60 per 100 recipients (95% CI +0.00 to +1.20)"),
        dict(campaign_id="weekly-picks", test="holdout", metric="revenue", variant="treated", control="holdout",
             status="final", n_variant=10000, n_control=2000, difference=0.255, difference_low=-0.02,
             difference_high=0.51, is_significant=False,
             verdict="no significant uplift in revenue: +0.26 per recipient (95% CI \u22120.02 to +0.51)"),
    ])


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield launched
        launched.close()


def test_report_page_is_self_contained_and_readable(browser, tmp_path):
    results, experiments = _results(), _experiments()
    pngs = {stem: png_bytes(f) for stem, f in report_figures(results, experiments, alpha=0.05).items()}
    page_file = tmp_path / "report.html"
    page_file.write_text(report_page(results, experiments, pngs, settings=ReportSettings(),
                                     generated_at=dt.datetime(2026, 11, 20, 12, tzinfo=dt.timezone.utc)), "utf-8")

    context = browser.new_context(viewport=LAPTOP, offline=True)
    page = context.new_page()
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(page_file.as_uri())
    page.wait_for_load_state("load")
    # Only the page itself and its inlined images: no stylesheet, font, script or image from anywhere.
    assert [u for u in requested if not u.startswith(("file://", "data:"))] == []
    assert page.title() == "Campaign results 2026-11-20 12:00 UTC"

    images = page.locator("img")
    assert images.count() == 3
    for i in range(3):
        image = images.nth(i)
        assert image.evaluate("img => img.complete && img.naturalWidth > 300 && img.naturalHeight > 100")
        assert image.get_attribute("alt")
    verdicts = page.locator("#experiments tbody tr")
    assert verdicts.count() == 3
    assert "B beats A on clicks: +15%" in verdicts.nth(0).inner_text()
    totals = page.locator("#totals tbody tr")
    assert totals.count() == 3 and "9900" in totals.nth(0).inner_text()
    assert page.evaluate("document.documentElement.scrollWidth") <= LAPTOP["width"]
    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}")
    context.close()


def test_figures_draw_rates_of_zero_and_of_everything():
    """0 of n and n of n: the Wilson bounds meet the rate (within rounding) and the bars still draw."""
    results = _results()
    # 0 of 3 per day, 0 of 6 in all: a Wilson lower bound of 5.6e-17 for 0 of 3.
    results.loc[results["variant"] == "A", ["unique_clicks", "delivered"]] = [0, 3]
    results.loc[results["variant"] == "B", "unique_clicks"] = results.loc[results["variant"] == "B", "delivered"]
    results.loc[results["variant"] == "holdout", "window_conversions"] = 0
    pngs = {stem: png_bytes(f) for stem, f in report_figures(results, _experiments(), alpha=0.05).items()}
    assert all(data[:8] == b"\x89PNG\r\n\x1a\n" for data in pngs.values())
