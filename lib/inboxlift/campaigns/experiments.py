"""The statistics of ``campaign_experiments``: A/B tests at a fixed horizon and holdout uplift.

Everything here runs on the driver over *aggregated* counts (one row per campaign, variant and
send day, or per bootstrap replicate), which grow with campaigns, not users. The methods, and why,
are in the README ("Results and experiments"):

- rates: Wilson score intervals; a difference of two rates: Newcombe's hybrid score interval, its
  p-value from the pooled two-proportion z-test; a relative lift: the log risk-ratio interval;
- the minimum detectable effect at the achieved sample size, at ``report.power``;
- a user's repeated messages in one test: each arm's counts divided by their design effect
  (:func:`design_effect`, the delta method clustered by user) before the comparison (A/B and the
  holdout conversions);
- A/B peeking: a **fixed horizon** per test (``experiment.horizon_days`` in the campaigns file).
  Until the horizon's last send day has had its whole click-through window the verdict is "not
  enough data yet", whatever the interim numbers say; with more than two variants each is
  compared with the control at ``alpha / (variants - 1)`` (Bonferroni);
- holdout revenue: a Poisson bootstrap of users (a user's sends share one weight) whose replicate sums Spark computes
  (:func:`inboxlift.transforms.campaign_results.bootstrap_revenue_sums`), percentile interval.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd
from scipy.stats import norm

from inboxlift.campaigns.definitions import HOLDOUT, Campaign

AB, UPLIFT = "ab", "holdout"
FINAL, INTERIM, INSUFFICIENT = "final", "interim", "insufficient"
NO_DIFFERENCE = "no significant difference"
NOT_ENOUGH = "not enough data yet"
# metric name -> the campaign_results count that is its success
AB_METRICS = {"clicks": "unique_clicks", "conversions": "conversions"}
EXPERIMENT_COLUMNS = [
    "campaign_id", "test", "metric", "variant", "control", "status", "first_send_date", "last_send_date",
    "reads_on", "n_variant", "n_control", "successes_variant", "successes_control", "value_variant",
    "value_control", "difference", "difference_low", "difference_high", "relative_lift", "relative_lift_low",
    "relative_lift_high", "p_value", "alpha", "mde_absolute", "mde_relative", "incremental_total",
    "incremental_total_low", "incremental_total_high", "is_significant", "winner", "method", "verdict",
    "design_effect_variant", "design_effect_control",
]


def wilson(successes: float, trials: float, *, alpha: float = 0.05) -> tuple[float, float] | tuple[None, None]:
    """The Wilson score interval of ``successes / trials``; (None, None) without trials."""
    if trials <= 0:
        return None, None
    z = norm.ppf(1 - alpha / 2)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Comparison:
    """Variant (b) against control (a): rates, their difference b - a and the test of it."""

    k_b: float
    n_b: float
    k_a: float
    n_a: float
    rate_b: float
    rate_a: float
    difference: float
    difference_low: float
    difference_high: float
    relative_lift: float | None
    relative_lift_low: float | None
    relative_lift_high: float | None
    p_value: float
    mde_absolute: float
    mde_relative: float | None
    alpha: float

    @property
    def is_significant(self) -> bool:
        """The z-test rejects *and* both intervals exclude no change, so the words never contradict the
        numbers shown beside them (at the boundary the three can disagree; then nothing is declared)."""
        intervals = [(self.difference_low, self.difference_high)]
        if self.relative_lift_low is not None:
            intervals.append((self.relative_lift_low, self.relative_lift_high))
        return self.p_value < self.alpha and all(low > 0 or high < 0 for low, high in intervals)


def compare_proportions(k_b: float, n_b: float, k_a: float, n_a: float, *, alpha: float = 0.05,
                        power: float = 0.8) -> Comparison:
    """Two-proportion comparison of ``k_b / n_b`` against ``k_a / n_a`` (both ``n`` > 0); the counts
    may be effective ones (counts divided by a design effect), so fractional."""
    if n_a <= 0 or n_b <= 0:
        raise ValueError(f"both groups need trials, got n_b={n_b}, n_a={n_a}")
    z = norm.ppf(1 - alpha / 2)
    p_b, p_a = k_b / n_b, k_a / n_a
    d = p_b - p_a
    # Newcombe (1998), method 10: the Wilson intervals of each rate combined.
    low_b, high_b = wilson(k_b, n_b, alpha=alpha)
    low_a, high_a = wilson(k_a, n_a, alpha=alpha)
    d_low = d - math.sqrt((p_b - low_b) ** 2 + (high_a - p_a) ** 2)
    d_high = d + math.sqrt((high_b - p_b) ** 2 + (p_a - low_a) ** 2)
    pooled = (k_a + k_b) / (n_a + n_b)
    se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    p_value = 1.0 if se_pooled == 0 else float(2 * norm.sf(abs(d) / se_pooled))
    # The absolute difference a test at this alpha and these sample sizes detects with ``power``.
    mde = (z + norm.ppf(power)) * se_pooled if se_pooled > 0 else float("nan")
    rel = rel_low = rel_high = None
    if k_a > 0 and k_b > 0:
        log_rr = math.log(p_b / p_a)
        se_log = math.sqrt(1 / k_b - 1 / n_b + 1 / k_a - 1 / n_a)
        rel = p_b / p_a - 1
        rel_low, rel_high = math.exp(log_rr - z * se_log) - 1, math.exp(log_rr + z * se_log) - 1
    return Comparison(k_b=k_b, n_b=n_b, k_a=k_a, n_a=n_a, rate_b=p_b, rate_a=p_a, difference=d,
                      difference_low=d_low, difference_high=d_high, relative_lift=rel, relative_lift_low=rel_low,
                      relative_lift_high=rel_high, p_value=p_value, mde_absolute=mde,
                      mde_relative=mde / p_a if p_a > 0 else None, alpha=alpha)


def _signed(x: float, digits: int) -> str:
    """``x`` with its sign, a minus sign for negatives, never "-0" (rounding to zero shows "+0")."""
    return f"{round(x, digits) + 0.0:+.{digits}f}".replace("-", "\u2212")


def _pct(x: float) -> str:
    return _signed(x * 100, 0) + "%"


def _pts(x: float) -> str:
    return _signed(x * 100, 2) + " pts"


def _effect(c: Comparison) -> str:
    """"+14% (95% CI +6% to +22%)" relative, or in percentage points when a rate is 0."""
    level = f"{(1 - c.alpha) * 100:.4g}%"
    if c.relative_lift is not None:
        return f"{_pct(c.relative_lift)} ({level} CI {_pct(c.relative_lift_low)} to {_pct(c.relative_lift_high)})"
    return f"{_pts(c.difference)} ({level} CI {_pts(c.difference_low)} to {_pts(c.difference_high)})"


def ab_verdict(c: Comparison, *, variant: str, control: str, metric: str) -> tuple[str, str | None]:
    """(plain-words verdict, winner or None) of a final reading."""
    if c.is_significant:
        winner, loser = (variant, control) if c.difference > 0 else (control, variant)
        subject = "" if winner == variant else f"{variant} "
        return f"{winner} beats {loser} on {metric}: {subject}{_effect(c)}", winner
    mde = f"; detectable at this size: \u00b1{c.mde_relative * 100:.0f}%" if c.mde_relative else ""
    return (f"{NO_DIFFERENCE} on {metric}: {variant} vs {control} {_effect(c)}, p = {c.p_value:.2f}{mde}",
            None)


def horizon_window(campaign: Campaign, first_send: dt.date, *, click_through_days: float) -> tuple[dt.date, dt.date, dt.date]:
    """(first, last send day of the test, the day it reads on) for a campaign whose first send was ``first_send``."""
    start = dt.date.fromisoformat(campaign.experiment.start) if campaign.experiment.start else first_send
    last = start + dt.timedelta(days=campaign.experiment.horizon_days - 1)
    # The last send day's messages go out during that day (UTC); their click-through windows close
    # at most click_through_days after its end.
    reads_on = last + dt.timedelta(days=1 + math.ceil(click_through_days))
    return start, last, reads_on


def ab_windows(results: pd.DataFrame, campaigns: dict[str, Campaign], *,
               click_through_days: float) -> dict[str, tuple[dt.date, dt.date, dt.date]]:
    """Each A/B campaign's test: (first send day, last send day, the day it reads on)
    (:func:`horizon_window` from the campaign's first treated send day in ``results``)."""
    treated = results[results["variant"] != HOLDOUT]
    windows = {}
    for campaign_id, days in treated.groupby("campaign_id", sort=True):
        campaign = campaigns.get(campaign_id)
        if campaign is not None and len(campaign.split) >= 2:
            windows[campaign_id] = horizon_window(campaign, min(days["send_date"]),
                                                  click_through_days=click_through_days)
    return windows


def design_effect(patterns: pd.DataFrame, *, metric_column: str, trials_column: str = "delivered") -> float:
    """How much more a rate's variance is than independent messages would give: 1 when each user
    gets one message, more when a user's messages succeed or fail together.

    ``patterns``: one arm's rows of :func:`inboxlift.transforms.campaign_results.user_patterns`
    (per-user counts of ``trials_column`` and ``metric_column``, with the ``users`` that have them). The
    rate ``p = K / N`` is a ratio of per-user sums; its variance, with users independent (the
    variant is drawn per user), is ``sum((k_u - p n_u)^2) / N^2`` (the delta method, clustered by
    user); divided by the binomial ``p (1 - p) / N`` that is ``sum((k_u - p n_u)^2) / (N p (1 - p))``,
    exactly 1 when every ``n_u`` is 1. Never below 1: a test is never read as surer than the
    per-message one.
    """
    users = patterns["users"].to_numpy(dtype=float)
    n = patterns[trials_column].to_numpy(dtype=float)
    k = patterns[metric_column].to_numpy(dtype=float)
    total, successes = float((users * n).sum()), float((users * k).sum())
    if total <= 0 or successes <= 0 or successes >= total:
        return 1.0
    p = successes / total
    spread = float((users * (k - p * n) ** 2).sum())
    # Rounded: one message per user gives 1 up to the floating point error of the sums.
    return max(1.0, round(spread / (total * p * (1 - p)), 9))


def _row(**values: Any) -> dict[str, Any]:
    row = dict.fromkeys(EXPERIMENT_COLUMNS)
    row.update(values)
    return row


def ab_tests(results: pd.DataFrame, campaigns: dict[str, Campaign], *, today: dt.date, alpha: float, power: float,
             click_through_days: float, min_per_arm: int, patterns: pd.DataFrame | None = None) -> list[dict[str, Any]]:
    """One row per campaign with variants, metric and variant other than the control.

    ``results``: campaign_results rows (pandas; one per campaign, variant and send day).
    ``patterns``: the tests' messages per user
    (the A/B rows of :func:`inboxlift.transforms.campaign_results.user_patterns`, over
    :func:`ab_windows`, as ``variant, delivered, unique_clicks, conversions``): each
    variant's counts enter the test divided by their :func:`design_effect` (the effective sample
    size), so a user's repeated messages count as the information they hold. None: every message
    counts as independent (design effect 1).
    """
    rows = []
    treated = results[results["variant"] != HOLDOUT]
    windows = ab_windows(results, campaigns, click_through_days=click_through_days)
    for campaign_id, days in treated.groupby("campaign_id", sort=True):
        if campaign_id not in windows:
            continue
        campaign = campaigns[campaign_id]
        start, last, reads_on = windows[campaign_id]
        in_test = days[(days["send_date"] >= start) & (days["send_date"] <= last)]
        totals = in_test.groupby("variant")[["delivered", *AB_METRICS.values()]].sum()
        control = campaign.control
        level = alpha / (len(campaign.split) - 1)
        for variant in [v for v in campaign.split if v != control]:
            for metric, column in AB_METRICS.items():
                n_b, n_a = (int(totals.at[v, "delivered"]) if v in totals.index else 0 for v in (variant, control))
                k_b, k_a = (int(totals.at[v, column]) if v in totals.index else 0 for v in (variant, control))
                deff_b, deff_a = (_variant_effect(patterns, campaign_id, v, column) for v in (variant, control))
                base = dict(campaign_id=campaign_id, test=AB, metric=metric, variant=variant, control=control,
                            first_send_date=start, last_send_date=last, reads_on=reads_on, n_variant=n_b,
                            n_control=n_a, successes_variant=k_b, successes_control=k_a, alpha=level,
                            design_effect_variant=deff_b, design_effect_control=deff_a,
                            method=("two-proportion z-test, Newcombe interval, on effective counts (messages "
                                    "clustered by user)" if patterns is not None else
                                    "two-proportion z-test, Newcombe interval")
                            + f"; fixed horizon {campaign.experiment.horizon_days} days")
                if min(n_a, n_b) < min_per_arm:
                    rows.append(_row(**base, status=INSUFFICIENT, is_significant=False, verdict=(
                        f"{NOT_ENOUGH}: {n_b} delivered in {variant}, {n_a} in {control} "
                        f"(at least {min_per_arm} each)")))
                    continue
                c = compare_proportions(k_b / deff_b, n_b / deff_b, k_a / deff_a, n_a / deff_a, alpha=level,
                                        power=power)
                numbers = dict(value_variant=c.rate_b, value_control=c.rate_a, difference=c.difference,
                               difference_low=c.difference_low, difference_high=c.difference_high,
                               relative_lift=c.relative_lift, relative_lift_low=c.relative_lift_low,
                               relative_lift_high=c.relative_lift_high, p_value=c.p_value, mde_absolute=c.mde_absolute,
                               mde_relative=c.mde_relative)
                if today < reads_on:
                    day = min((today - start).days + 1, campaign.experiment.horizon_days)
                    rows.append(_row(**base, **numbers, status=INTERIM, is_significant=False, verdict=(
                        f"{NOT_ENOUGH}: the test reads on {reads_on} (send day {max(day, 0)} of "
                        f"{campaign.experiment.horizon_days}); interim {variant} vs {control} {_effect(c)}")))
                    continue
                verdict, winner = ab_verdict(c, variant=variant, control=control, metric=metric)
                rows.append(_row(**base, **numbers, status=FINAL, is_significant=c.is_significant, winner=winner,
                                 verdict=verdict))
    return rows


def _variant_effect(patterns: pd.DataFrame | None, campaign_id: str, variant: str, column: str) -> float:
    if patterns is None:
        return 1.0
    mine = patterns[(patterns["campaign_id"] == campaign_id) & (patterns["variant"] == variant)]
    return design_effect(mine, metric_column=column) if not mine.empty else 1.0


def _arm_effect(patterns: pd.DataFrame | None, campaign_id: str, is_treated: bool) -> float:
    if patterns is None:
        return 1.0
    mine = patterns[(patterns["campaign_id"] == campaign_id) & (patterns["is_treated"] == is_treated)]
    return design_effect(mine, metric_column="window_conversions", trials_column="recipients") if not mine.empty \
        else 1.0


def revenue_uplift(sums: pd.DataFrame, *, replicates: int, alpha: float,
                   seed: int) -> tuple[float, float, float] | None:
    """(treated - holdout mean revenue per recipient, low, high) from one campaign's bootstrap sums.

    ``sums``: the rows of :func:`inboxlift.transforms.campaign_results.bootstrap_revenue_sums` for
    one campaign plus ``total`` (the arm's revenue). The weights of recipients without revenue are
    drawn here: per replicate and arm, a Poisson(``n_zero``) number, the sum of that many Poisson(1)
    weights. None when an arm has no recipients.
    """
    rng = np.random.default_rng(seed)
    draws, points = {}, {}
    for treated in (True, False):
        arm = sums[sums["is_treated"] == treated]
        if arm.empty or int(arm["n"].iloc[0]) == 0:
            return None
        n, n_zero, total = int(arm["n"].iloc[0]), int(arm["n_zero"].iloc[0]), float(arm["total"].iloc[0])
        weights, revenue = np.zeros(replicates), np.zeros(replicates)
        spent = arm.dropna(subset=["replicate"])
        index = spent["replicate"].astype(int).to_numpy()
        weights[index] = spent["weight"].to_numpy(dtype=float)
        revenue[index] = spent["weighted_revenue"].to_numpy(dtype=float)
        weights += rng.poisson(n_zero, size=replicates)
        draws[treated] = revenue / np.maximum(weights, 1.0)
        points[treated] = total / n
    low, high = np.quantile(draws[True] - draws[False], [alpha / 2, 1 - alpha / 2])
    return points[True] - points[False], float(low), float(high)


def holdout_tests(totals: pd.DataFrame, bootstrap: pd.DataFrame, *, alpha: float, power: float, min_per_arm: int,
                  replicates: int, seed: int, windows: pd.DataFrame,
                  patterns: pd.DataFrame | None = None) -> list[dict[str, Any]]:
    """Two rows per campaign with a holdout: incremental conversions and revenue per recipient.

    ``totals``: per ``campaign_id`` and ``is_treated`` the recipients, window conversions and window
    revenue of the send days whose windows have closed; ``bootstrap``: the replicate sums of the same
    recipients (a user's sends share their weights); ``windows``: per campaign its
    ``first_send_date``, ``last_send_date`` (closed days); ``patterns``: the same recipients per user
    (the holdout rows of :func:`inboxlift.transforms.campaign_results.user_patterns`, as
    ``is_treated, recipients, window_conversions``): each arm's conversions
    enter the test divided by their :func:`design_effect`. None: every recipient row counts as
    independent.
    """
    rows = []
    level = f"{(1 - alpha) * 100:.4g}%"
    for campaign_id in sorted(windows["campaign_id"]):
        span = windows[windows["campaign_id"] == campaign_id].iloc[0]
        mine = totals[totals["campaign_id"] == campaign_id].set_index("is_treated")
        if True not in mine.index and False not in mine.index:
            continue
        get = lambda arm, col: int(mine.at[arm, col]) if arm in mine.index else 0  # noqa: E731
        n_t, n_h = get(True, "recipients"), get(False, "recipients")
        k_t, k_h = get(True, "window_conversions"), get(False, "window_conversions")
        base = dict(campaign_id=campaign_id, test=UPLIFT, variant="treated", control=HOLDOUT,
                    first_send_date=span["first_send_date"], last_send_date=span["last_send_date"],
                    n_variant=n_t, n_control=n_h, alpha=alpha)
        if min(n_t, n_h) < min_per_arm:
            for metric in ("conversions", "revenue"):
                rows.append(_row(**base, metric=metric, status=INSUFFICIENT, is_significant=False, verdict=(
                    f"{NOT_ENOUGH}: {n_t} treated and {n_h} held-out recipients with closed windows "
                    f"(at least {min_per_arm} each)")))
            continue
        deff_t, deff_h = (_arm_effect(patterns, campaign_id, arm) for arm in (True, False))
        c = compare_proportions(k_t / deff_t, n_t / deff_t, k_h / deff_h, n_h / deff_h, alpha=alpha, power=power)
        significant = c.is_significant
        words = ("adds conversions" if c.difference > 0 else "costs conversions") if significant else \
            "no significant uplift in conversions"
        rows.append(_row(
            **base, metric="conversions", status=FINAL, successes_variant=k_t, successes_control=k_h,
            value_variant=c.rate_b, value_control=c.rate_a, difference=c.difference, difference_low=c.difference_low,
            difference_high=c.difference_high, relative_lift=c.relative_lift, relative_lift_low=c.relative_lift_low,
            relative_lift_high=c.relative_lift_high, p_value=c.p_value, mde_absolute=c.mde_absolute,
            mde_relative=c.mde_relative, incremental_total=c.difference * n_t,
            incremental_total_low=c.difference_low * n_t, incremental_total_high=c.difference_high * n_t,
            is_significant=significant, winner=("treated" if c.difference > 0 else HOLDOUT) if significant else None,
            design_effect_variant=deff_t, design_effect_control=deff_h,
            method="window conversions, treated vs holdout: two-proportion z-test, Newcombe interval"
                   + (" on effective counts (recipients clustered by user)" if patterns is not None else ""),
            verdict=(f"{words}: {_signed(c.difference * 100, 2)} per 100 recipients ({level} CI "
                     f"{_signed(c.difference_low * 100, 2)} to {_signed(c.difference_high * 100, 2)}), about "
                     f"{_signed(c.difference * n_t, 0)} converting recipients of {n_t}")))
        mine_boot = bootstrap[bootstrap["campaign_id"] == campaign_id].merge(
            mine[["window_revenue"]].rename(columns={"window_revenue": "total"}), left_on="is_treated",
            right_index=True)
        uplift = revenue_uplift(mine_boot, replicates=replicates, alpha=alpha, seed=seed)
        if uplift is None:
            continue
        value_t = float(mine.at[True, "window_revenue"]) / n_t
        value_h = float(mine.at[False, "window_revenue"]) / n_h
        point, low, high = uplift
        significant = low > 0 or high < 0
        words = ("adds revenue" if point > 0 else "costs revenue") if significant else "no significant uplift in revenue"
        rows.append(_row(
            **base, metric="revenue", status=FINAL, value_variant=value_t, value_control=value_h, difference=point,
            difference_low=low, difference_high=high,
            relative_lift=point / value_h if value_h > 0 else None, incremental_total=point * n_t,
            incremental_total_low=low * n_t, incremental_total_high=high * n_t, is_significant=significant,
            winner=("treated" if point > 0 else HOLDOUT) if significant else None,
            method=f"window revenue per recipient, Poisson bootstrap of users ({replicates} replicates), "
                   "percentile interval",
            verdict=(f"{words}: {_signed(point, 2)} per recipient ({level} CI {_signed(low, 2)} to "
                     f"{_signed(high, 2)}), about {_signed(point * n_t, 0)} over {n_t} recipients")))
    return rows


def experiments_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """The rows in ``EXPERIMENT_COLUMNS`` order (an empty frame with those columns when there are none)."""
    return pd.DataFrame(list(rows), columns=EXPERIMENT_COLUMNS)


# What makes two A/B readings the same test: the campaign, the comparison, and the test's span.
READING_KEY = ["campaign_id", "test", "metric", "variant", "control", "first_send_date", "last_send_date",
               "reads_on", "alpha"]


def keep_first_final_readings(current: pd.DataFrame, previous: pd.DataFrame | None) -> pd.DataFrame:
    """``current`` with each A/B test's first final reading kept: a row the last report already read
    as ``final`` for the same test (:data:`READING_KEY`) replaces this run's row for it.

    A fixed-horizon test is read once, on its ``reads_on`` day. Clicks, and the orders they lead to,
    can still arrive after it (a click days after delivery opens its own click-through window), and
    a verdict that changed from one report to the next would be a second look at the data. Holdout
    rows and interim rows are this run's as computed; a test whose span or alpha changed is a new test.
    """
    if previous is None or previous.empty or current.empty:
        return current
    earlier = previous[(previous["test"] == AB) & (previous["status"] == FINAL)]
    if earlier.empty:
        return current

    def keys(frame: pd.DataFrame) -> pd.Series:
        return frame[READING_KEY].astype(str).agg("\x1f".join, axis=1)

    # A table written before a column existed reads it as null.
    by_key = {key: row for key, row in zip(keys(earlier),
                                           earlier.reindex(columns=EXPERIMENT_COLUMNS).to_dict("records"))}
    rows = []
    for key, row in zip(keys(current), current[EXPERIMENT_COLUMNS].to_dict("records")):
        kept = by_key.get(key) if row["test"] == AB and row["status"] == FINAL else None
        rows.append(kept if kept is not None else row)
    return experiments_frame(rows)
