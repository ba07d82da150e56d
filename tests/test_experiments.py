"""The report's statistics against hand-computed numbers, and tests of the tests: an A/A simulation
(no effect: "no significant difference" in at least 90 of 100 seeded runs), a planted A/B effect
inside its interval with the right winner, a planted holdout uplift inside its intervals.

The simulations draw the *aggregated* counts with numpy binomials and run the same function the
stage runs on ``campaign_results`` (:func:`ab_tests`), so 100 A/A runs take well under a second;
the uplift test runs the Spark bootstrap on 6,000 recipients (a few seconds).
"""

from __future__ import annotations

import datetime as dt
import math
import re
import time

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from inboxlift.campaigns.definitions import parse_campaigns
from inboxlift.campaigns.experiments import (
    NO_DIFFERENCE,
    NOT_ENOUGH,
    ab_tests,
    ab_verdict,
    compare_proportions,
    design_effect,
    experiments_frame,
    holdout_tests,
    keep_first_final_readings,
    wilson,
)
from inboxlift.transforms.campaign_results import bootstrap_revenue_sums, poisson_one, wilson_bounds

DAY = dt.date(2026, 11, 2)
TODAY = dt.date(2026, 11, 20)
CAMPAIGNS = parse_campaigns({"campaigns": {"ab": {
    "type": "weekly_picks", "template": "weekly_picks", "subjects": {"A": {"en": "a"}, "B": {"en": "b"}},
    "split": {"A": 0.5, "B": 0.5}, "experiment": {"horizon_days": 7}}}}, source="test")


def test_wilson_matches_the_textbook_values():
    # 10 of 100 at 95%: (0.0552, 0.1744) (Newcombe 1998, and any table of Wilson intervals).
    low, high = wilson(10, 100)
    assert (round(low, 4), round(high, 4)) == (0.0552, 0.1744)
    # 0 of 10: [0, z²/(n + z²)] = [0, 3.8415 / 13.8415] = [0, 0.2775].
    low, high = wilson(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert wilson(0, 0) == (None, None)


def test_wilson_column_agrees_with_the_hand_values(spark):
    rows = spark.createDataFrame([(10, 100), (0, 10), (3, 0)], "k long, n long")
    low, high = wilson_bounds(F.col("k"), F.col("n"), z=1.959963984540054)
    got = [(r.low, r.high) for r in rows.select(low.alias("low"), high.alias("high")).collect()]
    assert got[0] == (pytest.approx(0.0552, abs=1e-4), pytest.approx(0.1744, abs=1e-4))
    assert got[1] == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert got[2] == (None, None)


def test_two_proportions_match_hand_computed_values():
    # Newcombe (1998), table II: 56/70 - 48/80 = 0.2000, hybrid score interval 0.0524 to 0.3339.
    c = compare_proportions(56, 70, 48, 80)
    assert c.difference == pytest.approx(0.2)
    assert (round(c.difference_low, 4), round(c.difference_high, 4)) == (0.0524, 0.3339)
    # 70/1000 against 50/1000: pooled 0.06, se sqrt(0.06 * 0.94 * 2/1000) = 0.0106207,
    # z = 0.02 / 0.0106207 = 1.88312, two-sided p = 0.0597.
    c = compare_proportions(70, 1000, 50, 1000)
    assert c.p_value == pytest.approx(0.0597, abs=1e-4) and not c.is_significant
    # MDE at 80% power: (1.959964 + 0.841621) * 0.0106207 = 0.029755, relative to 5%: 59.5%.
    assert c.mde_absolute == pytest.approx(0.029755, abs=1e-5)
    assert c.mde_relative == pytest.approx(0.5951, abs=1e-3)
    # Relative lift 0.4; log-ratio se sqrt(1/70 - 1/1000 + 1/50 - 1/1000) = 0.179682:
    # exp(ln 1.4 -+ 1.959964 * 0.179682) - 1 = -0.0156 to +0.9910.
    assert c.relative_lift == pytest.approx(0.4)
    assert c.relative_lift_low == pytest.approx(-0.0156, abs=1e-4)
    assert c.relative_lift_high == pytest.approx(0.9910, abs=1e-4)


def test_verdicts_in_plain_words():
    c = compare_proportions(1140, 10000, 1000, 10000)
    verdict, winner = ab_verdict(c, variant="B", control="A", metric="clicks")
    assert winner == "B" and verdict.startswith("B beats A on clicks: +14% (95% CI +")
    verdict, winner = ab_verdict(compare_proportions(860, 10000, 1000, 10000), variant="B", control="A",
                                 metric="clicks")
    assert winner == "A" and verdict.startswith("A beats B on clicks: B \u221214% (95% CI \u2212")
    verdict, winner = ab_verdict(compare_proportions(70, 1000, 50, 1000), variant="B", control="A",
                                 metric="clicks")
    assert winner is None and verdict.startswith(f"{NO_DIFFERENCE} on clicks: B vs A +40%")
    assert "detectable at this size: \u00b160%" in verdict


def _results(delivered: tuple[int, int], clicks: tuple[int, int], conversions: tuple[int, int],
             day: dt.date = DAY) -> pd.DataFrame:
    """campaign_results rows of one send day for variants A and B (only the columns ab_tests reads)."""
    return pd.DataFrame({"campaign_id": ["ab", "ab"], "variant": ["A", "B"], "send_date": [day, day],
                         "delivered": list(delivered), "unique_clicks": list(clicks),
                         "conversions": list(conversions)})


def _ab(results: pd.DataFrame, today: dt.date = TODAY, patterns: pd.DataFrame | None = None) -> dict[str, dict]:
    rows = ab_tests(results, CAMPAIGNS, today=today, alpha=0.05, power=0.8, click_through_days=3, min_per_arm=100,
                    patterns=patterns)
    return {r["metric"]: r for r in rows}


def _patterns(rows: list[tuple[str, int, int, int]]) -> pd.DataFrame:
    """A/B rows of user_patterns for campaign "ab", as ab_tests reads them: (variant, delivered,
    unique clicks, users); no conversions."""
    return pd.DataFrame([("ab", v, n, k, 0, users) for v, n, k, users in rows],
                        columns=["campaign_id", "variant", "delivered", "unique_clicks", "conversions", "users"])


def test_the_design_effect_of_repeated_sends_against_hand_computed_values():
    def effect(rows):
        return design_effect(_patterns([("A", *r) for r in rows]), metric_column="unique_clicks")

    # One message per user: p = 0.3, sum((k - p)^2) = 30 * 0.49 + 70 * 0.09 = 21 = N p (1 - p).
    assert effect([(1, 1, 30), (1, 0, 70)]) == pytest.approx(1.0)
    # Two users, four messages each, one clicks all, one none: (2^2 + 2^2) / (8 * 0.25) = 4.
    assert effect([(4, 4, 1), (4, 0, 1)]) == pytest.approx(4.0)
    # p = 20 / 60: (5 (4/3)^2 + 5 (2/3)^2 + 10 (2/3)^2 + 30 (1/3)^2) / (60 (1/3)(2/3)) = (170/9) / (120/9).
    assert effect([(2, 2, 5), (2, 0, 5), (1, 1, 10), (1, 0, 30)]) == pytest.approx(170 / 120)
    # Every user clicks exactly half of their messages: less spread than independent ones, read as 1.
    assert effect([(4, 2, 10)]) == 1.0
    # No success, or nothing but successes: nothing to scale.
    assert effect([(4, 0, 10)]) == effect([(3, 3, 10)]) == 1.0


def test_repeated_sends_to_the_same_users_widen_the_test_to_what_they_hold():
    # 1,000 users per variant, four messages each: A's 400 clicks come from 100 users who click every
    # time, B's 480 from 120. Per message, 10 % against 12 % of 4,000 is significant (z = 2.86); the
    # design effect of both is 4 (A: (100 * 3.6^2 + 900 * 0.4^2) / (4000 * 0.1 * 0.9) = 1440 / 360),
    # so the test sees 1,000 effective messages each: 100 against 120, z = 1.43, p = 0.15.
    results = _results((4000, 4000), (400, 480), (0, 0))
    patterns = _patterns([("A", 4, 4, 100), ("A", 4, 0, 900), ("B", 4, 4, 120), ("B", 4, 0, 880)])
    per_message = _ab(results)["clicks"]
    clustered = _ab(results, patterns=patterns)["clicks"]
    assert per_message["is_significant"] and per_message["p_value"] == pytest.approx(0.0042, abs=2e-4)
    assert not clustered["is_significant"] and clustered["p_value"] == pytest.approx(0.153, abs=2e-3)
    assert clustered["verdict"].startswith(NO_DIFFERENCE)
    assert (clustered["design_effect_variant"], clustered["design_effect_control"]) == (
        pytest.approx(4.0), pytest.approx(4.0))
    # The table keeps the counts as they are; the rates are the same either way.
    assert (clustered["n_variant"], clustered["successes_variant"], clustered["value_variant"]) == (4000, 480, 0.12)
    assert "clustered by user" in clustered["method"] and "clustered" not in per_message["method"]
    assert (per_message["design_effect_variant"], per_message["design_effect_control"]) == (1.0, 1.0)


def test_a_a_with_users_who_click_alike_across_their_sends_stays_quiet_only_with_the_design_effect():
    """100 seeded A/A runs: 2,500 users per arm, four messages each, each user's click chance drawn
    from Beta(0.2, 1.8) (mean 10 %, within-user correlation 1/3: design effect about 2). Counted per
    message the test fails the 90-in-100 bar; with the design effect it holds it."""
    quiet = {"per message": 0, "clustered": 0}
    for seed in range(100):
        rng = np.random.default_rng(1000 + seed)
        arms = {v: rng.binomial(4, rng.beta(0.2, 1.8, size=2500)) for v in ("A", "B")}
        results = _results((10_000, 10_000), (int(arms["A"].sum()), int(arms["B"].sum())), (0, 0))
        patterns = _patterns([(v, 4, k, int((clicks == k).sum())) for v, clicks in arms.items() for k in range(5)])
        quiet["per message"] += _ab(results)["clicks"]["verdict"].startswith(NO_DIFFERENCE)
        quiet["clustered"] += _ab(results, patterns=patterns)["clicks"]["verdict"].startswith(NO_DIFFERENCE)
    assert quiet["clustered"] >= 90 and quiet["per message"] < 90, quiet


def test_a_a_simulation_reports_no_difference_at_least_90_times_in_100():
    started = time.perf_counter()
    quiet = {"clicks": 0, "conversions": 0}
    n = 20_000
    for seed in range(100):
        rng = np.random.default_rng(seed)
        clicks = rng.binomial(n, 0.03, size=2)
        conversions = rng.binomial(n, 0.008, size=2)
        tests = _ab(_results((n, n), tuple(clicks), tuple(conversions)))
        for metric, row in tests.items():
            assert row["status"] == "final"
            quiet[metric] += row["verdict"].startswith(NO_DIFFERENCE)
    assert quiet["clicks"] >= 90 and quiet["conversions"] >= 90, quiet
    assert time.perf_counter() - started < 5


def test_a_planted_effect_is_inside_the_interval_and_the_winner_is_right():
    rng = np.random.default_rng(15)
    n, base, lift = 60_000, 0.05, 0.15
    clicks = (rng.binomial(n, base), rng.binomial(n, base * (1 + lift)))
    tests = _ab(_results((n, n), clicks, (rng.binomial(n, 0.01), rng.binomial(n, 0.01))))
    row = tests["clicks"]
    assert row["winner"] == "B" and row["verdict"].startswith("B beats A on clicks: +")
    assert row["relative_lift_low"] < lift < row["relative_lift_high"]
    assert row["difference_low"] < base * lift < row["difference_high"]


def test_peeking_before_the_horizon_says_not_enough_data_yet():
    # A big, real difference on the first send day: still no winner before the test reads.
    results = _results((20_000, 20_000), (600, 900), (100, 160))
    early = _ab(results, today=DAY + dt.timedelta(days=2))
    assert early["clicks"]["status"] == "interim" and early["clicks"]["winner"] is None
    # Horizon 7 days from 11-02: last send day 11-08, its click-through window closed by 11-12.
    assert early["clicks"]["reads_on"] == dt.date(2026, 11, 12)
    assert early["clicks"]["verdict"].startswith(f"{NOT_ENOUGH}: the test reads on 2026-11-12 (send day 3 of 7)")
    assert _ab(results, today=dt.date(2026, 11, 12))["clicks"]["winner"] == "B"
    # Days after the horizon are not part of the test.
    later = pd.concat([results, _results((20_000, 20_000), (900, 600), (100, 100), day=DAY + dt.timedelta(days=7))])
    assert _ab(later)["clicks"]["n_variant"] == 20_000
    # Too few recipients: not enough data, horizon or not.
    small = _ab(_results((50, 60), (5, 9), (1, 1)))
    assert small["clicks"]["status"] == "insufficient" and small["clicks"]["verdict"].startswith(NOT_ENOUGH)


def test_a_final_reading_is_kept_when_late_clicks_arrive_and_only_for_the_same_test():
    # 11-02..11-08 read on 11-12: 20,000 delivered per arm, 600 against 900 clicks -> B wins.
    first = experiments_frame(_ab(_results((20_000, 20_000), (600, 900), (100, 160))).values())
    assert set(first["status"]) == {"final"} and first.loc[first["metric"] == "clicks", "winner"].item() == "B"
    # A later report: late clicks moved A to 905, so this run alone would name A the winner.
    later = experiments_frame(_ab(_results((20_000, 20_000), (905, 900), (100, 160))).values())
    assert later.loc[later["metric"] == "clicks", "winner"].item() is None
    kept = keep_first_final_readings(later, first)
    clicks = kept[kept["metric"] == "clicks"].iloc[0]
    assert (clicks["successes_control"], clicks["successes_variant"], clicks["winner"]) == (600, 900, "B")
    # An interim earlier reading is not kept: the final one is this run's.
    interim = experiments_frame(_ab(_results((20_000, 20_000), (600, 900), (100, 160)),
                                    today=DAY + dt.timedelta(days=2)).values())
    assert set(interim["status"]) == {"interim"}
    again = keep_first_final_readings(later, interim)
    assert again.loc[again["metric"] == "clicks", "successes_control"].item() == 905
    # A test with another span (a new start) is a new test: not replaced by the old reading.
    moved = first.assign(first_send_date=DAY - dt.timedelta(days=7))
    assert keep_first_final_readings(later, moved).equals(later)
    # Holdout rows are recomputed every run: an earlier holdout row never replaces one.
    holdout_before = later.assign(test="holdout", successes_control=1)
    holdout_now = later.assign(test="holdout")
    assert keep_first_final_readings(holdout_now, holdout_before).equals(holdout_now)
    assert keep_first_final_readings(later, None).equals(later)


def test_poisson_weights_have_mean_and_variance_one(spark):
    u = (F.col("id") + F.lit(0.5)) / F.lit(100_000.0)  # an even grid of uniform numbers
    stats = spark.range(100_000).select(poisson_one(u).alias("w")).agg(
        F.mean("w").alias("mean"), F.var_pop("w").alias("var")).first()
    assert stats["mean"] == pytest.approx(1.0, abs=0.001) and stats["var"] == pytest.approx(1.0, abs=0.01)


def test_holdout_uplift_intervals_cover_the_planted_uplift(spark):
    """6,000 recipients, half held out: conversion 8% treated against 5%, order values log-normal."""
    rng = np.random.default_rng(21)
    n, p_treated, p_holdout, mu, sigma = 3000, 0.08, 0.05, 3.5, 0.8
    order_value = math.exp(mu + sigma ** 2 / 2)   # E[log-normal] = 44.7
    planted_conversions, planted_revenue = p_treated - p_holdout, (p_treated - p_holdout) * order_value
    rows = []
    for treated, p in ((True, p_treated), (False, p_holdout)):
        converted = rng.random(n) < p
        revenue = np.where(converted, rng.lognormal(mu, sigma, n), 0.0)
        rows += [("c", DAY, f"{'t' if treated else 'h'}{i}", treated, float(r), int(c))
                 for i, (r, c) in enumerate(zip(revenue, converted))]
    outcomes = spark.createDataFrame(rows, "campaign_id string, send_date date, user_id string, is_treated boolean, "
                                           "window_revenue double, converted int")
    totals = (outcomes.groupBy("campaign_id", "is_treated")
              .agg(F.count("*").alias("recipients"), F.sum("converted").alias("window_conversions"),
                   F.sum("window_revenue").alias("window_revenue")).toPandas())
    # One recipient per row: a summary (summarise_outcomes) of recipients who each keep their row.
    bootstrap = bootstrap_revenue_sums(outcomes.withColumn("recipients", F.lit(1)), replicates=400,
                                       seed=7).toPandas()
    windows = pd.DataFrame({"campaign_id": ["c"], "first_send_date": [DAY], "last_send_date": [DAY]})
    rows = holdout_tests(totals, bootstrap, alpha=0.05, power=0.8, min_per_arm=100, replicates=400, seed=7,
                         windows=windows)
    tests = {r["metric"]: r for r in rows}
    conversions, revenue = tests["conversions"], tests["revenue"]
    assert conversions["difference_low"] < planted_conversions < conversions["difference_high"]
    assert conversions["is_significant"] and conversions["verdict"].startswith("adds conversions: +")
    assert revenue["difference_low"] < planted_revenue < revenue["difference_high"]
    assert revenue["difference_low"] < revenue["difference"] < revenue["difference_high"]
    # The bootstrap interval is about as wide as a normal one on these data (same order of magnitude).
    width = revenue["difference_high"] - revenue["difference_low"]
    assert 0.5 < width < 2.5, width


@pytest.mark.parametrize("experiment, message", [
    ({"horizon_days": 0}, "'experiment.horizon_days' must be at least 1, got 0"),
    ({"start": "soon"}, "'experiment.start' must be a date YYYY-MM-DD, got 'soon'"),
    ({"control": "C"}, "'experiment.control' must be one of the variants ['A', 'B'], got 'C'"),
    ({"horizon": 7}, "experiment.horizon"),
])
def test_a_wrong_experiment_is_an_error_naming_the_key(experiment, message):
    from inboxlift.settings import SettingsError

    spec = {"type": "weekly_picks", "template": "weekly_picks", "subjects": {"A": {"en": "a"}, "B": {"en": "b"}},
            "split": {"A": 0.5, "B": 0.5}, "experiment": experiment}
    with pytest.raises(SettingsError, match=re.escape(message)):
        parse_campaigns({"campaigns": {"ab": spec}}, source="campaigns.yml")


def test_report_settings_are_validated():
    from inboxlift.settings import ReportSettings, SettingsError

    with pytest.raises(SettingsError, match=re.escape("setting 'report.alpha' must be between 0 and 1, got 1.5")):
        ReportSettings(alpha=1.5)
    with pytest.raises(SettingsError, match="report.bootstrap_replicates"):
        ReportSettings(bootstrap_replicates=5)
