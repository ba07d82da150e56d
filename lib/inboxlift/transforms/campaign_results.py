"""``campaign_results``: per campaign x variant (holdout included) x send day, counts and rates with
Wilson intervals; and the per-recipient sums the holdout revenue bootstrap needs. Spark built-ins only.

Rates and their denominators: ``delivery_rate`` and ``bounce_rate`` per sent message; ``open_rate``,
``click_rate`` (unique clicks), ``conversion_rate`` (messages with an attributed order),
``unsubscribe_rate`` and ``complaint_rate`` per delivered message; ``window_conversion_rate`` per
recipient (treated or held out: what the holdout uplift compares).
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from scipy.stats import norm

from inboxlift.campaigns.definitions import HOLDOUT
from inboxlift.schemas import require_columns

GROUP = ["campaign_id", "variant", "send_date"]
COUNTS = ["recipients", "sent", "delivered", "bounced", "opens", "clicks", "unique_clicks", "conversions",
          "orders", "revenue", "unsubscribes", "complaints", "window_conversions", "window_orders",
          "window_revenue"]
# rate -> (numerator, denominator)
RATES = {
    "delivery_rate": ("delivered", "sent"),
    "bounce_rate": ("bounced", "sent"),
    "open_rate": ("opens", "delivered"),
    "click_rate": ("unique_clicks", "delivered"),
    "conversion_rate": ("conversions", "delivered"),
    "unsubscribe_rate": ("unsubscribes", "delivered"),
    "complaint_rate": ("complaints", "delivered"),
    "window_conversion_rate": ("window_conversions", "recipients"),
}
RESULT_COLUMNS = [*GROUP, *COUNTS,
                  *[c for rate in RATES for c in (rate, f"{rate}_low", f"{rate}_high")],
                  "is_window_closed"]


def z_value(alpha: float) -> float:
    """The two-sided normal quantile of level ``1 - alpha`` (1.959964 for 0.05)."""
    return float(norm.ppf(1 - alpha / 2))


def wilson_bounds(successes: Column, trials: Column, *, z: float) -> tuple[Column, Column]:
    """The Wilson score interval of ``successes / trials`` as two Columns (null when ``trials`` is 0)."""
    n = trials.cast("double")
    p = successes.cast("double") / n
    z2 = z * z
    centre = (p + F.lit(z2) / (2 * n)) / (1 + F.lit(z2) / n)
    half = F.lit(z) * F.sqrt(p * (1 - p) / n + F.lit(z2) / (4 * n * n)) / (1 + F.lit(z2) / n)
    valid = trials > 0
    return (F.when(valid, F.greatest(centre - half, F.lit(0.0))),
            F.when(valid, F.least(centre + half, F.lit(1.0))))


def summarise_outcomes(outcomes: DataFrame) -> DataFrame:
    """Per-recipient outcomes (:func:`inboxlift.transforms.attribution.recipient_outcomes`) -> what
    both readers of them need, a small fraction of their rows: ``GROUP`` (campaign, variant, send
    day), ``is_treated``, ``user_id`` and ``window_revenue``, ``recipients``, every count of
    ``COUNTS`` and ``last_send_at``.

    The recipients with window revenue (the only ones the revenue bootstrap draws weights for) keep
    a row each, with their ``user_id``; all the others of a campaign, variant and day are summed into
    one row whose ``user_id`` is null. :func:`aggregate_results` sums the rows per group and
    :func:`bootstrap_revenue_sums` reads the recipients with revenue and the counts, so the report
    keeps these rows between the two, not one row per recipient.
    """
    require_columns(outcomes, ["campaign_id", "variant", "send_date", "send_at", "user_id", "is_treated",
                               "is_sent", "is_delivered", "is_bounced", "is_opened", "is_clicked", "clicks",
                               "attributed_orders", "attributed_revenue", "is_unsubscribed", "is_complained",
                               "window_orders", "window_revenue"], step="summarise_outcomes")
    count = lambda condition: F.count_if(condition).cast("long")  # noqa: E731
    spender = F.when(F.col("window_revenue") > 0, F.col("user_id")).alias("user_id")
    return outcomes.groupBy(*GROUP, "is_treated", spender).agg(
        F.count("*").cast("long").alias("recipients"),
        count(F.col("is_sent")).alias("sent"),
        count(F.col("is_delivered")).alias("delivered"),
        count(F.col("is_bounced")).alias("bounced"),
        count(F.col("is_opened")).alias("opens"),
        F.sum("clicks").cast("long").alias("clicks"),
        count(F.col("is_clicked")).alias("unique_clicks"),
        count(F.col("attributed_orders") > 0).alias("conversions"),
        F.sum("attributed_orders").cast("long").alias("orders"),
        F.sum("attributed_revenue").cast("double").alias("revenue"),
        count(F.col("is_unsubscribed")).alias("unsubscribes"),
        count(F.col("is_complained")).alias("complaints"),
        count(F.col("window_orders") > 0).alias("window_conversions"),
        F.sum("window_orders").cast("long").alias("window_orders"),
        F.sum("window_revenue").cast("double").alias("window_revenue"),
        F.max("send_at").alias("last_send_at"),
    )


def aggregate_results(summary: DataFrame, *, alpha: float, window_closed_before: Column | None = None) -> DataFrame:
    """The outcomes' summary (:func:`summarise_outcomes`) -> the ``campaign_results`` rows
    (``RESULT_COLUMNS``).

    ``window_closed_before``: a timestamp Column; a day's ``is_window_closed`` says whether every
    recipient's attribution and uplift windows had ended before it (its counts are final).
    """
    require_columns(summary, [*GROUP, *COUNTS, "last_send_at"], step="aggregate_results")
    money = {"revenue", "window_revenue"}
    grouped = summary.groupBy(*GROUP).agg(
        *[(F.round(F.sum(c), 2) if c in money else F.sum(c).cast("long")).alias(c) for c in COUNTS],
        F.max("last_send_at").alias("_last_send_at"))
    z = z_value(alpha)
    rates = []
    for rate, (num, den) in RATES.items():
        low, high = wilson_bounds(F.col(num), F.col(den), z=z)
        rates += [F.when(F.col(den) > 0, F.col(num) / F.col(den)).alias(rate), low.alias(f"{rate}_low"),
                  high.alias(f"{rate}_high")]
    # A day is closed for all its variants at once: holdout and treated rows of a day stay comparable.
    day_last = F.max("_last_send_at").over(Window.partitionBy("campaign_id", "send_date").rowsBetween(
        Window.unboundedPreceding, Window.unboundedFollowing))
    closed = (day_last < window_closed_before) if window_closed_before is not None else F.lit(True)
    return grouped.select(*GROUP, *COUNTS, *rates, F.coalesce(closed, F.lit(False)).alias("is_window_closed"))


AB_TEST, HOLDOUT_TEST = "ab", "holdout"


def _in_spans(frame: DataFrame, *, date: str, ab: DataFrame, holdout: DataFrame) -> DataFrame:
    """``frame`` with ``_in_ab`` and ``_in_holdout``: whether its ``date`` lies in its campaign's A/B
    test span (``ab``) and holdout test span (``holdout``); rows in neither are left out. Both spans
    are ``campaign_id, first_send_date, last_send_date``, one row per campaign (small: broadcast)."""
    def span(spans: DataFrame, name: str) -> DataFrame:
        return spans.select("campaign_id", F.col("first_send_date").alias(f"_{name}_first"),
                            F.col("last_send_date").alias(f"_{name}_last"))

    def within(name: str) -> Column:
        return F.coalesce(F.col(date).between(F.col(f"_{name}_first"), F.col(f"_{name}_last")), F.lit(False))

    joined = (frame.join(F.broadcast(span(ab, "ab")), "campaign_id", how="left")
              .join(F.broadcast(span(holdout, "ho")), "campaign_id", how="left"))
    return (joined.withColumn("_in_ab", within("ab")).withColumn("_in_holdout", within("ho"))
            .where(F.col("_in_ab") | F.col("_in_holdout")))


def campaigns_with_repeats(plan: DataFrame, outbox: DataFrame, *, ab: DataFrame,
                                   holdout: DataFrame) -> DataFrame:
    """``campaign_id, ab, holdout``: per campaign, whether some user is a recipient on more than one
    send day of its A/B test span (treated users) and of its holdout test span (held-out users too),
    planned or in the outbox (the recipients of
    :func:`inboxlift.transforms.attribution.recipient_outcomes`); only campaigns with one or the
    other. In the others every user has one row at most, and the design effect of every rate is
    exactly 1, so their outcomes need no second pass (:func:`user_patterns`). One read of the plan's
    and the outbox's keys for both kinds of test.

    ``ab``, ``holdout``: ``campaign_id, first_send_date, last_send_date``, one row per test.
    """
    require_columns(plan, ["campaign_id", "plan_date", "user_id", "variant"], step="campaigns_with_repeats")
    require_columns(outbox, ["campaign_id", "plan_date", "user_id", "variant"],
                    step="campaigns_with_repeats (outbox)")
    keys = ["campaign_id", "plan_date", "user_id", "variant"]
    rows = _in_spans(plan.select(*keys).unionByName(outbox.select(*keys)), date="plan_date", ab=ab,
                     holdout=holdout)
    is_treated = F.coalesce(F.col("variant") != F.lit(HOLDOUT), F.lit(True))
    # A user's day once, whether the plan, the outbox or both have it (its flags are the same in both).
    user_days = rows.select("campaign_id", "user_id", "plan_date",
                            (F.col("_in_ab") & is_treated).cast("int").alias("_ab"),
                            F.col("_in_holdout").cast("int").alias("_holdout")).distinct()
    days = user_days.groupBy("campaign_id", "user_id").agg(F.sum("_ab").alias("_ab_days"),
                                                           F.sum("_holdout").alias("_holdout_days"))
    per_test = days.groupBy("campaign_id").agg((F.max("_ab_days") > 1).alias(AB_TEST),
                                               (F.max("_holdout_days") > 1).alias(HOLDOUT_TEST))
    return per_test.where(F.col(AB_TEST) | F.col(HOLDOUT_TEST))


def user_patterns(outcomes: DataFrame, *, ab: DataFrame, holdout: DataFrame) -> DataFrame:
    """How the tests' recipients fall on their users, in one pass over ``outcomes``: ``test,
    campaign_id, arm, trials, clicks, conversions, users``, one row per test, campaign, arm and
    per-user count pattern, with the number of users that have it (users with the same counts share
    a row, so the result grows with the most messages a user gets, not with users).

    - ``test`` ``ab`` (treated rows of the A/B test span ``ab``): ``arm`` is the variant; a user's
      ``trials`` are their delivered messages, ``clicks`` the clicked ones and ``conversions`` those
      with an attributed order (the counts aggregate_results sums);
    - ``test`` ``holdout`` (every row of the holdout test span ``holdout``, the closed days): ``arm``
      is ``treated`` or ``holdout``; ``trials`` are the user's recipient rows, ``conversions`` those
      with an order in their window, ``clicks`` 0.

    A test's messages are not independent when a user gets several (a weekly campaign over a
    four-week horizon): :func:`inboxlift.campaigns.experiments.design_effect` reads their variance
    from these rows.

    ``outcomes``: per-recipient outcomes (:func:`inboxlift.transforms.attribution.recipient_outcomes`);
    ``ab``, ``holdout``: ``campaign_id, first_send_date, last_send_date``, one row per test.
    """
    require_columns(outcomes, ["campaign_id", "variant", "send_date", "user_id", "is_treated", "is_delivered",
                               "is_clicked", "attributed_orders", "window_orders"], step="user_patterns")
    flag = lambda condition: condition.cast("long")  # noqa: E731
    for_ab = F.when(F.col("_in_ab") & F.col("is_treated"), F.struct(
        F.lit(AB_TEST).alias("test"), F.col("variant").alias("arm"), flag(F.col("is_delivered")).alias("trials"),
        flag(F.col("is_clicked")).alias("clicks"), flag(F.col("attributed_orders") > 0).alias("conversions")))
    for_holdout = F.when(F.col("_in_holdout"), F.struct(
        F.lit(HOLDOUT_TEST).alias("test"),
        F.when(F.col("is_treated"), F.lit("treated")).otherwise(F.lit(HOLDOUT)).alias("arm"),
        F.lit(1).cast("long").alias("trials"), F.lit(0).cast("long").alias("clicks"),
        flag(F.col("window_orders") > 0).alias("conversions")))
    # A row counts for each test whose span holds it: both structs, nulls dropped, one explode.
    rows = (_in_spans(outcomes, date="send_date", ab=ab, holdout=holdout)
            .select("campaign_id", "user_id",
                    F.explode(F.filter(F.array(for_ab, for_holdout), lambda t: t.isNotNull())).alias("_t"))
            .select("campaign_id", "user_id", "_t.*"))
    per_user = rows.groupBy("test", "campaign_id", "arm", "user_id").agg(
        *[F.sum(c).cast("long").alias(c) for c in ("trials", "clicks", "conversions")])
    return per_user.groupBy("test", "campaign_id", "arm", "trials", "clicks", "conversions").agg(
        F.count("*").cast("long").alias("users"))


def bootstrap_revenue_sums(summary: DataFrame, *, replicates: int, seed: int) -> DataFrame:
    """Poisson bootstrap sums of window revenue per campaign, arm (treated / holdout) and replicate.

    ``summary``: the outcomes' summary (:func:`summarise_outcomes`); each row counts ``recipients``.
    Each user gets a Poisson(1) weight per replicate, drawn from a hash of (seed, campaign, user,
    replicate) by the inverse CDF, so a rerun draws the same weights, and a user's sends of the
    campaign with revenue share it (users are what is resampled: one person's sends are not
    independent). Only recipients with revenue are expanded: the weights of the others sum, per
    arm, to a Poisson(n) number that the caller draws
    (:func:`inboxlift.campaigns.experiments.revenue_uplift`), a weight per send (they only count
    recipients, the mean's denominator). Returns
    ``campaign_id, is_treated, replicate, weight, weighted_revenue`` and, per campaign and arm, the
    recipient count ``n`` and the count of recipients without revenue ``n_zero`` (repeated per row).
    """
    require_columns(summary, ["campaign_id", "send_date", "user_id", "is_treated", "window_revenue", "recipients"],
                    step="bootstrap_revenue_sums")
    recipients = F.col("recipients")
    arms = summary.groupBy("campaign_id", "is_treated").agg(
        F.sum(recipients).cast("long").alias("n"),
        F.sum(F.when(F.col("window_revenue") <= 0, recipients).otherwise(F.lit(0))).cast("long").alias("n_zero"))
    # A row with revenue is one recipient, or several sharing a (campaign, day, user) key; all the
    # rows of one user draw one weight, which counts once per recipient.
    spenders = summary.where(F.col("window_revenue") > 0).select(
        "campaign_id", "send_date", "user_id", "is_treated", "window_revenue", recipients.alias("_recipients"))
    expanded = spenders.select("*", F.explode(F.sequence(F.lit(0), F.lit(replicates - 1))).alias("replicate"))
    u = F.pmod(F.xxhash64(F.lit(seed), "campaign_id", "user_id", "replicate"),
               F.lit(1 << 30)) / F.lit(float(1 << 30))
    weight = poisson_one(u)
    sums = expanded.groupBy("campaign_id", "is_treated", "replicate").agg(
        F.sum(weight * F.col("_recipients")).cast("long").alias("weight"),
        F.sum(weight * F.col("window_revenue")).alias("weighted_revenue"))
    return arms.join(sums, ["campaign_id", "is_treated"], how="left")


# P(X <= k) for X ~ Poisson(1), k = 0..9: a uniform number above k of these is a draw of k.
_POISSON_ONE_CDF = [0.36787944117144233, 0.7357588823428847, 0.9196986029286058, 0.9810118431238462,
                    0.9963401531726563, 0.9994058151824183, 0.9999167588507405, 0.9999897508033289,
                    0.999998874797402, 0.9999998885745217]


def poisson_one(u: Column) -> Column:
    """A Poisson(1) draw from a uniform number ``u`` in [0, 1) (inverse CDF, capped at 10)."""
    draw = F.lit(0)
    for threshold in _POISSON_ONE_CDF:
        draw = draw + (u >= F.lit(threshold)).cast("int")
    return draw
