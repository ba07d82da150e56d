"""The report's figures (matplotlib, drawn off screen): rates per variant with their intervals, holdout
uplift per campaign, and cumulative rates over send days. Inputs are the small aggregated tables
(``campaign_results`` and ``campaign_experiments`` as pandas), never per-user rows."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from inboxlift.campaigns.definitions import HOLDOUT
from inboxlift.campaigns.experiments import UPLIFT, wilson

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RATES_PLOT, UPLIFT_PLOT, CUMULATIVE_PLOT = "rates_by_variant", "uplift_by_campaign", "cumulative_by_day"
_COLOURS = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#0891b2", "#ca8a04"]
_HOLDOUT_COLOUR = "#6b7280"


def _figure(width: float, height: float) -> "Figure":
    # A Figure without pyplot draws with the Agg canvas: no display, no global state.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _colour(variant: str, order: list[str]) -> str:
    return _HOLDOUT_COLOUR if variant == HOLDOUT else _COLOURS[order.index(variant) % len(_COLOURS)]


def _variants(frame: pd.DataFrame) -> list[str]:
    names = sorted(v for v in frame["variant"].unique() if v != HOLDOUT)
    return names + ([HOLDOUT] if (frame["variant"] == HOLDOUT).any() else [])


def _empty(figure: "Figure", text: str) -> "Figure":
    ax = figure.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    return figure


def _closed(results: pd.DataFrame) -> pd.DataFrame:
    """The send days whose uplift windows have all ended (``is_window_closed``): a day still open
    has not counted all its window conversions, and would pull its variant's rate down."""
    return results[results["is_window_closed"].fillna(False).astype(bool)]


def rates_figure(results: pd.DataFrame, *, alpha: float) -> "Figure":
    """Per campaign: click rate (per delivered, every send day) and window conversion rate (per
    recipient, the days whose windows have closed) of each variant."""
    campaigns = sorted(results["campaign_id"].unique())
    figure = _figure(10, 2.6 * max(1, len(campaigns)))
    if not campaigns:
        return _empty(figure, "no campaign has sent anything yet")
    axes = figure.subplots(len(campaigns), 2, squeeze=False)
    level = f"{(1 - alpha) * 100:.4g}%"
    panels = [("click rate (unique clicks / delivered)", "unique_clicks", "delivered"),
              ("conversion rate within the uplift window (closed days)", "window_conversions", "recipients")]
    closed = _closed(results)
    for row, campaign_id in enumerate(campaigns):
        totals = pd.concat([
            results[results["campaign_id"] == campaign_id].groupby("variant")[["unique_clicks", "delivered"]].sum(),
            closed[closed["campaign_id"] == campaign_id].groupby("variant")[["window_conversions", "recipients"]].sum(),
        ], axis=1).fillna(0)
        order = _variants(results[results["campaign_id"] == campaign_id])
        for col, (title, num, den) in enumerate(panels):
            ax = axes[row][col]
            shown = [v for v in order if not (v == HOLDOUT and num == "unique_clicks")]
            rates, lows, highs = [], [], []
            for v in shown:
                k, n = int(totals.at[v, num]), int(totals.at[v, den])
                low, high = wilson(k, n, alpha=alpha)
                rate = k / n if n else 0.0
                rates.append(rate * 100)
                # Clipped at 0: for 0 of n the Wilson bound can land a rounding error above the rate.
                lows.append(max(0.0, rate - (low if low is not None else rate)) * 100)
                highs.append(max(0.0, (high if high is not None else rate) - rate) * 100)
            ax.bar(shown, rates, yerr=[lows, highs], capsize=4, color=[_colour(v, order) for v in shown])
            ax.set_ylabel("%")
            ax.set_title(f"{campaign_id}: {title}", fontsize=9)
    figure.suptitle(f"Rates per variant ({level} Wilson intervals)", fontsize=11)
    return figure


def uplift_figure(experiments: pd.DataFrame) -> "Figure":
    """Per campaign: incremental conversions per 100 recipients and revenue per recipient, with intervals."""
    uplift = experiments[(experiments["test"] == UPLIFT) & experiments["difference"].notna()]
    campaigns = sorted(uplift["campaign_id"].unique())
    figure = _figure(10, 1.2 + 0.45 * max(1, len(campaigns)))
    if not campaigns:
        return _empty(figure, "no holdout comparison has closed windows yet")
    axes = figure.subplots(1, 2, squeeze=False)[0]
    for ax, metric, scale, label in ((axes[0], "conversions", 100.0, "incremental conversions per 100 recipients"),
                                     (axes[1], "revenue", 1.0, "incremental revenue per recipient")):
        rows = uplift[uplift["metric"] == metric].set_index("campaign_id").reindex(campaigns)
        y = list(range(len(campaigns)))
        point = (rows["difference"] * scale).to_numpy(dtype=float)
        low = (rows["difference_low"] * scale).to_numpy(dtype=float)
        high = (rows["difference_high"] * scale).to_numpy(dtype=float)
        # A percentile bootstrap interval need not contain its point estimate: bars start at the point.
        ax.errorbar(point, y, xerr=[np.clip(point - low, 0, None), np.clip(high - point, 0, None)], fmt="o",
                    capsize=4, color=_COLOURS[0])
        ax.axvline(0, color=_HOLDOUT_COLOUR, linewidth=1)
        ax.set_yticks(y, campaigns)
        ax.set_title(label, fontsize=9)
    figure.suptitle("Holdout uplift: treated minus held-out recipients", fontsize=11)
    return figure


def cumulative_figure(results: pd.DataFrame) -> "Figure":
    """Per campaign: cumulative click rate of each variant over send days, and window conversion rate
    over the days whose windows have closed."""
    campaigns = sorted(results["campaign_id"].unique())
    figure = _figure(10, 2.6 * max(1, len(campaigns)))
    if not campaigns:
        return _empty(figure, "no campaign has sent anything yet")
    axes = figure.subplots(len(campaigns), 2, squeeze=False)
    for row, campaign_id in enumerate(campaigns):
        mine = results[results["campaign_id"] == campaign_id]
        order = _variants(mine)
        for col, (num, den, title) in enumerate((("unique_clicks", "delivered", "cumulative click rate"),
                                                 ("window_conversions", "recipients",
                                                  "cumulative window conversion rate (closed days)"))):
            ax = axes[row][col]
            for v in order:
                if v == HOLDOUT and num == "unique_clicks":
                    continue
                days = (mine if num == "unique_clicks" else _closed(mine))
                days = days[days["variant"] == v].sort_values("send_date")
                cum_n = days[den].cumsum()
                rate = (days[num].cumsum() / cum_n.where(cum_n > 0)) * 100
                ax.plot(pd.to_datetime(days["send_date"]), rate, marker="o", label=v, color=_colour(v, order))
            ax.set_ylabel("%")
            ax.set_title(f"{campaign_id}: {title}", fontsize=9)
            ax.legend(fontsize=8)
            ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    figure.suptitle("Cumulative results over send days", fontsize=11)
    return figure


def report_figures(results: pd.DataFrame, experiments: pd.DataFrame, *, alpha: float) -> dict[str, "Figure"]:
    """The three figures, by file stem."""
    return {RATES_PLOT: rates_figure(results, alpha=alpha), UPLIFT_PLOT: uplift_figure(experiments),
            CUMULATIVE_PLOT: cumulative_figure(results)}


def png_bytes(figure: "Figure", *, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
