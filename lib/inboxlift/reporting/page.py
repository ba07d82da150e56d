"""``report.html``: one static page a marketer can open anywhere — verdicts, totals and the figures,
every image inlined as base64, no script, no external asset. Autoescaping Jinja2 from the package."""

from __future__ import annotations

import base64
import datetime as dt
import math
import struct
from typing import Any, Mapping

import jinja2
import pandas as pd

from inboxlift.campaigns.experiments import AB
from inboxlift.settings import ReportSettings

_ALT = {
    "rates_by_variant": "Click rate and window conversion rate per variant, with intervals",
    "uplift_by_campaign": "Incremental conversions and revenue per recipient per campaign, treated minus holdout",
    "cumulative_by_day": "Cumulative click and conversion rates per variant over send days",
}
_TOTAL_COUNTS = ["recipients", "sent", "delivered", "bounced", "opens", "unique_clicks", "conversions", "revenue",
                 "unsubscribes", "complaints", "window_conversions"]


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("inboxlift.reporting", "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined)


def _png_size(data: bytes) -> tuple[int, int]:
    # The IHDR chunk follows the 8-byte signature: length, "IHDR", then width and height.
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _rate(num: float, den: float) -> str:
    return f"{num / den * 100:.2f}%" if den else "\u2013"


def campaign_totals(results: pd.DataFrame) -> list[dict[str, Any]]:
    """Per campaign and variant, every send day summed (rows for the page)."""
    if results.empty:
        return []
    sums = results.groupby(["campaign_id", "variant"], sort=True)[_TOTAL_COUNTS].sum().reset_index()
    rows = []
    for r in sums.itertuples(index=False):
        rows.append(dict(
            campaign_id=r.campaign_id, variant=r.variant, recipients=int(r.recipients), sent=int(r.sent),
            delivered=int(r.delivered), bounced=int(r.bounced), opens=int(r.opens), unique_clicks=int(r.unique_clicks),
            conversions=int(r.conversions), revenue=f"{float(r.revenue):,.2f}", unsubscribes=int(r.unsubscribes),
            complaints=int(r.complaints), click_rate=_rate(r.unique_clicks, r.delivered),
            conversion_rate=_rate(r.conversions, r.delivered),
            window_conversion_rate=_rate(r.window_conversions, r.recipients)))
    return rows


def report_page(results: pd.DataFrame, experiments: pd.DataFrame, pngs: Mapping[str, bytes], *,
                settings: ReportSettings, generated_at: dt.datetime) -> str:
    """The page's HTML."""
    experiment_rows = []
    for e in experiments.sort_values(["campaign_id", "test", "metric", "variant"]).itertuples(index=False):
        experiment_rows.append(dict(
            campaign_id=e.campaign_id, metric=e.metric, status=e.status, verdict=e.verdict,
            test_label=f"A/B {e.variant} vs {e.control}" if e.test == AB else "holdout uplift",
            n_variant=int(e.n_variant) if not _missing(e.n_variant) else "\u2013",
            n_control=int(e.n_control) if not _missing(e.n_control) else "\u2013"))
    figures = []
    for stem, data in pngs.items():
        width, height = _png_size(data)
        figures.append(dict(stem=stem, data=base64.b64encode(data).decode("ascii"), alt=_ALT.get(stem, stem),
                            width=width, height=height))
    return _environment().get_template("report.html").render(
        generated_at=generated_at.strftime("%Y-%m-%d %H:%M UTC"), click_days=f"{settings.click_through_days:g}",
        view_days=f"{settings.view_through_days:g}", uplift_days=f"{settings.uplift_window_days:g}",
        level=f"{(1 - settings.alpha) * 100:.4g}%", experiments=experiment_rows, totals=campaign_totals(results),
        figures=figures)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
