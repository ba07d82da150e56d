"""Who gets which campaign, with which products, when: pure DataFrame steps, all Spark built-ins.

A campaign type is two things: its **audience** (users and the reason they qualify, plus context
values for the template) and its **candidate products** (rows ``user_id, item_id, source,
priority``, lower priority first). :func:`plan_campaign` then applies, in order:

1. **exclusions**, each user counted under the first that applies: the mail permission of
   :func:`inboxlift.consent.with_mail_permission` as of the planning time (``unknown_user``,
   ``no_consent``, ``unsubscribed``, ``bounced``, ``complained``, ``suppressed``),
   ``already_received`` (this campaign planned for the user in the last ``cooldown_days``),
   ``daily_cap`` (``frequency_cap.max_per_day`` emails, 1 by default, already planned for the
   user that day by campaigns before this one in priority order: the higher priority goes),
   ``frequency_cap`` (``frequency_cap.max_emails`` emails of any campaign in the last
   ``frequency_cap.days`` days: the plans of earlier days, and of that day those of the campaigns
   before this one in priority order, see :func:`decide_campaign`),
   ``too_few_products`` (fewer than ``min_products`` products left after the product filters).
   A holdout plan row counts in all three checks as the email it stands for (intent to treat): a
   held-out user is kept from later emails exactly as a mailed user is, so both arms face the same
   later eligibility; a plan row and its sent message are one email;
2. **product filters**: in stock, not bought before (cart items excepted), not reviewed negatively,
   each item once (its best priority), at most ``max_products`` in priority order;
3. **assignment**: a user is held out when ``u_h < holdout`` and otherwise gets the variant whose
   cumulative share first exceeds ``u_v``, where ``u_h`` and ``u_v`` are uniform numbers from
   ``xxhash64`` of (campaign id, salt, user id): the same user gets the same arm in every run;
4. **send time**: the user's ``preferred_send_hour`` in their own time zone on the campaign day,
   moved out of the quiet hours (a late hour moves back to the last hour before the quiet hours
   start, an early one forward to the hour they end), stored in UTC.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Callable, Collection

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from inboxlift.campaigns.definitions import FALLBACK_LOCALE, HOLDOUT, Campaign
from inboxlift.consent import BLOCK_REASONS, with_mail_permission
from inboxlift.transforms.features_user import valid_timezone

EXCLUSION_REASONS = (*BLOCK_REASONS, "already_received", "daily_cap", "frequency_cap", "too_few_products")
PLAN_COLUMNS = ["campaign_id", "campaign_type", "plan_date", "user_id", "variant", "template", "locale",
                "subject_template", "send_at", "reason", "item_ids", "item_sources", "context", "plan_run_id",
                "planned_at"]
EXCLUSION_COLUMNS = ["campaign_id", "plan_date", "user_id", "reason", "plan_run_id"]
# Sources a product of an email can come from (recommendations add theirs: als, popular, content, ...).
CART, BROWSED, SIMILAR, POPULAR_IN_CATEGORY, POPULAR, NEW_ARRIVAL = (
    "cart", "browsed", "similar", "popular_in_category", "popular", "new_arrival")
# Similar items taken per anchor item.
SIMILAR_PER_ITEM = 3
# Best sellers kept per category for win-back and new arrivals.
PER_CATEGORY = 10
_HASH_BUCKETS = 1_000_000


@dataclass(frozen=True)
class PlanInputs:
    """The tables a plan reads; optional ones are None when they do not exist yet."""

    users: DataFrame                 # users: user_id, email, locale, timezone, birthday, email_consent
    user_features: DataFrame         # user_features
    item_features: DataFrame         # item_features: item_id, category, is_in_stock, is_new_arrival, ...
    history: DataFrame               # campaign_id, user_id, plan_date of plans (holdout too) and sent messages
    purchases: DataFrame             # user_id, item_id, event_ts of purchase events before the cut-off
    recommendations: DataFrame | None = None   # user_id, rank, item_id, source
    similar_items: DataFrame | None = None     # item_id, rank, similar_item_id
    content_similar_items: DataFrame | None = None
    user_segments: DataFrame | None = None     # user_id, segment_name
    suppressions: DataFrame | None = None      # the suppressions table (inboxlift.consent)


class MissingInputError(RuntimeError):
    """A campaign type needs a table an earlier stage writes."""


# ---- audiences and candidate products, per type ---------------------------------------------------

def _need(frame: DataFrame | None, table: str, campaign: Campaign) -> DataFrame:
    if frame is None:
        raise MissingInputError(f"campaign {campaign.id!r} ({campaign.type}) needs table {table!r}: "
                                f"run the stage that writes it first")
    return frame


def _no_context() -> Column:
    return F.create_map().cast("map<string,string>")


def _recommended(inputs: PlanInputs, campaign: Campaign) -> DataFrame:
    recs = _need(inputs.recommendations, "recommendations", campaign)
    return recs.select("user_id", "item_id", F.col("source"), F.col("rank").cast("int").alias("priority"))


def _similar_to(anchors: DataFrame, inputs: PlanInputs, campaign: Campaign) -> DataFrame:
    """Items similar to each user's anchors (``user_id, item_id, anchor_priority``), ALS neighbours first,
    content neighbours for items ALS has no factors for."""
    tables = []
    if inputs.similar_items is not None:
        tables.append(inputs.similar_items.select("item_id", "rank", "similar_item_id", F.lit(0).alias("kind")))
    if inputs.content_similar_items is not None:
        tables.append(inputs.content_similar_items.select("item_id", "rank", "similar_item_id",
                                                          F.lit(1).alias("kind")))
    if not tables:
        raise MissingInputError(f"campaign {campaign.id!r} ({campaign.type}) needs table 'similar_items' or "
                                f"'content_similar_items': run recommend first")
    neighbours = tables[0]
    for other in tables[1:]:
        neighbours = neighbours.unionByName(other)
    # Per anchor item, ALS neighbours if it has any, else content ones.
    best_kind = neighbours.groupBy("item_id").agg(F.min("kind").alias("kind"))
    neighbours = neighbours.join(best_kind, ["item_id", "kind"]).where(F.col("rank") <= SIMILAR_PER_ITEM)
    return (anchors.join(neighbours, "item_id")
            .select("user_id", F.col("similar_item_id").alias("item_id"), F.lit(SIMILAR).alias("source"),
                    (F.lit(1000) + F.col("anchor_priority") * 10 + F.col("rank")).cast("int").alias("priority")))


def _category_best_sellers(item_features: DataFrame, *, new_only: bool) -> DataFrame:
    """``category, item_id, cat_rank``: the best-selling (or newest) in-stock items of each category."""
    items = item_features.where(F.col("is_in_stock") & F.col("category").isNotNull())
    if new_only:
        items = items.where(F.col("is_new_arrival"))
        order = [F.col("days_since_launch").asc_nulls_last(), F.col("trending_score").desc(), F.col("item_id")]
    else:
        order = [F.col("purchases_90d").desc(), F.col("views_90d").desc(), F.col("item_id")]
    ranked = items.withColumn("cat_rank", F.row_number().over(Window.partitionBy("category").orderBy(*order)))
    return ranked.where(F.col("cat_rank") <= PER_CATEGORY).select("category", "item_id", "cat_rank")


def _in_top_categories(users: DataFrame, per_category: DataFrame, source: str) -> DataFrame:
    favourites = users.select("user_id", F.posexplode("top_categories").alias("cat_pos", "category"))
    return favourites.join(per_category, "category").select(
        "user_id", "item_id", F.lit(source).alias("source"),
        (F.col("cat_pos") * 100 + F.col("cat_rank")).cast("int").alias("priority"))


def _weekly_picks(inputs: PlanInputs, campaign: Campaign, plan_date: dt.date) -> tuple[DataFrame, DataFrame]:
    users = inputs.user_features.select("user_id")
    segments = inputs.user_segments
    if segments is not None:
        users = users.join(segments.select("user_id", "segment_name"), "user_id", "left")
    else:
        users = users.withColumn("segment_name", F.lit(None).cast("string"))
    if campaign.audience.segments:
        users = users.where(F.col("segment_name").isin(*campaign.audience.segments))
    audience = users.select(
        "user_id", F.lit("personal recommendations").alias("reason"),
        F.create_map(F.lit("segment_name"), F.coalesce(F.col("segment_name"), F.lit(""))).alias("context"))
    return audience, _recommended(inputs, campaign)


def _abandoned_cart(inputs: PlanInputs, campaign: Campaign, plan_date: dt.date) -> tuple[DataFrame, DataFrame]:
    carts = inputs.user_features.where(F.size("open_cart_item_ids") > 0)
    audience = carts.select(
        "user_id",
        F.format_string("open cart of %d items since %s", F.col("open_cart_item_count"),
                        F.date_format("open_cart_added_at", "yyyy-MM-dd HH:mm")).alias("reason"),
        F.create_map(F.lit("cart_added_at"), F.date_format("open_cart_added_at", "yyyy-MM-dd'T'HH:mm:ss'Z'"),
                     F.lit("cart_item_count"), F.col("open_cart_item_count").cast("string")).alias("context"))
    in_cart = carts.select("user_id", F.posexplode("open_cart_item_ids").alias("anchor_priority", "item_id"))
    cart_rows = in_cart.select("user_id", "item_id", F.lit(CART).alias("source"),
                               F.col("anchor_priority").cast("int").alias("priority"))
    return audience, cart_rows.unionByName(_similar_to(in_cart, inputs, campaign))


def _browse_abandonment(inputs: PlanInputs, campaign: Campaign,
                        plan_date: dt.date) -> tuple[DataFrame, DataFrame]:
    # Users with an open cart get the abandoned-cart email instead.
    browsers = inputs.user_features.where((F.size("browsed_not_bought_item_ids") > 0)
                                          & (F.size("open_cart_item_ids") == 0))
    audience = browsers.select("user_id", F.format_string("viewed %d items without buying",
                                                          F.size("browsed_not_bought_item_ids")).alias("reason"),
                               _no_context().alias("context"))
    items = browsers.select("user_id", F.posexplode("browsed_not_bought_item_ids").alias("priority", "item_id"))
    return audience, items.select("user_id", "item_id", F.lit(BROWSED).alias("source"),
                                  F.col("priority").cast("int"))


def _win_back(inputs: PlanInputs, campaign: Campaign, plan_date: dt.date) -> tuple[DataFrame, DataFrame]:
    stages = campaign.audience.lifecycle_stages
    lapsing = inputs.user_features.where(F.col("lifecycle_stage").isin(*stages))
    audience = lapsing.select("user_id", F.concat(F.lit("lifecycle stage "), F.col("lifecycle_stage"),
                                                  F.lit(", last active "),
                                                  F.col("days_since_last_activity").cast("string"),
                                                  F.lit(" days ago")).alias("reason"),
                              F.create_map(F.lit("lifecycle_stage"), F.col("lifecycle_stage")).alias("context"))
    best = _category_best_sellers(inputs.item_features, new_only=False)
    in_favourites = _in_top_categories(lapsing, best, POPULAR_IN_CATEGORY)
    overall = (inputs.item_features.where(F.col("is_in_stock"))
               # Global and small: one row per in-stock item, an order over the catalogue, not over users.
               .withColumn("r", F.row_number().over(Window.orderBy(
                   F.col("purchases_90d").desc(), F.col("views_90d").desc(), F.col("item_id"))))
               .where(F.col("r") <= PER_CATEGORY))
    fallback = lapsing.select("user_id").crossJoin(F.broadcast(overall.select("item_id", "r"))).select(
        "user_id", "item_id", F.lit(POPULAR).alias("source"), (F.lit(10_000) + F.col("r")).cast("int").alias("priority"))
    return audience, in_favourites.unionByName(fallback)


def _new_arrivals(inputs: PlanInputs, campaign: Campaign, plan_date: dt.date) -> tuple[DataFrame, DataFrame]:
    users = inputs.user_features.where(F.size("top_categories") > 0)
    audience = users.select("user_id", F.concat(F.lit("new arrivals in "),
                                                F.array_join("top_categories", ", ")).alias("reason"),
                            _no_context().alias("context"))
    newest = _category_best_sellers(inputs.item_features, new_only=True)
    return audience, _in_top_categories(users, newest, NEW_ARRIVAL)


def next_birthday(birthday: Column, day: dt.date) -> Column:
    """The first anniversary of ``birthday`` on or after ``day`` (29 February is 1 March in other years)."""
    def in_year(year: Column) -> Column:
        first = F.make_date(year, F.lit(1), F.lit(1))
        return F.date_add(F.add_months(first, F.month(birthday) - 1), F.dayofmonth(birthday) - 1)

    this_year = in_year(F.lit(day.year))
    return F.when(this_year >= F.lit(day), this_year).otherwise(in_year(F.lit(day.year + 1)))


def _birthday(inputs: PlanInputs, campaign: Campaign, plan_date: dt.date) -> tuple[DataFrame, DataFrame]:
    window = campaign.audience.birthday_window_days
    upcoming = next_birthday(F.col("birthday"), plan_date)
    users = (inputs.users.where(F.col("birthday").isNotNull()).select("user_id", upcoming.alias("next_birthday"))
             .where(F.datediff("next_birthday", F.lit(plan_date)) < window))
    audience = users.select(
        "user_id", F.concat(F.lit("birthday on "), F.col("next_birthday").cast("string")).alias("reason"),
        F.create_map(F.lit("birthday"), F.col("next_birthday").cast("string")).alias("context"))
    items = _recommended(inputs, campaign) if inputs.recommendations is not None else \
        audience.select("user_id").where(F.lit(False)).select(
            "user_id", F.lit(None).cast("string").alias("item_id"), F.lit(None).cast("string").alias("source"),
            F.lit(None).cast("int").alias("priority"))
    return audience, items


def _cross_sell(inputs: PlanInputs, campaign: Campaign, plan_date: dt.date) -> tuple[DataFrame, DataFrame]:
    since = dt.datetime.combine(plan_date - dt.timedelta(days=campaign.audience.purchase_lookback_days),
                                dt.time(), tzinfo=dt.timezone.utc)
    recent = (inputs.purchases.where(F.col("event_ts") >= F.lit(since))
              .groupBy("user_id", "item_id").agg(F.max("event_ts").alias("bought_at")))
    anchors = recent.withColumn("anchor_priority", F.row_number().over(
        Window.partitionBy("user_id").orderBy(F.col("bought_at").desc(), F.col("item_id"))) - 1)
    audience = anchors.groupBy("user_id").agg(F.count("*").alias("n"), F.max("bought_at").alias("last")).select(
        "user_id", F.format_string("bought %d items in the last %d days", F.col("n"),
                                   F.lit(campaign.audience.purchase_lookback_days)).alias("reason"),
        F.create_map(F.lit("last_purchase_at"),
                     F.date_format("last", "yyyy-MM-dd'T'HH:mm:ss'Z'")).alias("context"))
    return audience, _similar_to(anchors.select("user_id", "item_id", "anchor_priority"), inputs, campaign)


AUDIENCES: dict[str, Callable[[PlanInputs, Campaign, dt.date], tuple[DataFrame, DataFrame]]] = {
    "weekly_picks": _weekly_picks,
    "abandoned_cart": _abandoned_cart,
    "browse_abandonment": _browse_abandonment,
    "win_back": _win_back,
    "new_arrivals": _new_arrivals,
    "birthday": _birthday,
    "cross_sell": _cross_sell,
}


# ---- the common steps -----------------------------------------------------------------------------

def uniform(campaign_id: str, salt: str, user_id: Column) -> Column:
    """A number in [0, 1) from a hash of the campaign, a salt and the user: stable across runs and machines."""
    return F.pmod(F.xxhash64(F.lit(campaign_id), F.lit(salt), user_id), F.lit(_HASH_BUCKETS)) / _HASH_BUCKETS


def assign_variant(campaign: Campaign, user_id: Column) -> Column:
    """``holdout`` with probability ``holdout``, else a variant by the ``split`` shares (in the file's order)."""
    u_variant = uniform(campaign.id, "variant", user_id)
    choice = None
    cumulative = 0.0
    variants = list(campaign.split.items())
    for i, (variant, share) in enumerate(variants):
        cumulative += share
        if i == len(variants) - 1:
            choice = F.lit(variant) if choice is None else choice.otherwise(F.lit(variant))
        else:
            condition = u_variant < F.lit(cumulative)
            choice = F.when(condition, F.lit(variant)) if choice is None else choice.when(condition, F.lit(variant))
    return F.when(uniform(campaign.id, "holdout", user_id) < F.lit(campaign.holdout), F.lit(HOLDOUT)).otherwise(choice)


def send_hour(preferred: Column, *, quiet_start: int, quiet_end: int) -> Column:
    """``preferred`` moved out of the quiet hours [start, end) (across midnight when start > end)."""
    if quiet_start == quiet_end:
        return preferred
    last_before = (quiet_start - 1) % 24
    if quiet_start > quiet_end:      # e.g. 21 -> 8: late hours back to 20, early hours on to 8
        return (F.when(preferred >= quiet_start, F.lit(last_before))
                .when(preferred < quiet_end, F.lit(quiet_end)).otherwise(preferred))
    # e.g. 12 -> 14: the first half back before the start, the second half on to the end
    middle = quiet_start + (quiet_end - quiet_start) / 2
    return (F.when((preferred >= quiet_start) & (preferred < middle), F.lit(last_before))
            .when((preferred >= middle) & (preferred < quiet_end), F.lit(quiet_end)).otherwise(preferred))


def send_time_utc(plan_date: dt.date, hour: Column, zone: Column) -> Column:
    """The UTC instant of ``hour``:00 on ``plan_date`` in time zone ``zone``."""
    local = F.make_timestamp_ntz(F.lit(plan_date.year), F.lit(plan_date.month), F.lit(plan_date.day), hour,
                                 F.lit(0), F.lit(0))
    return F.to_utc_timestamp(local.cast("timestamp"), zone)


def _exclusion(campaign: Campaign) -> Column:
    """The first exclusion reason of each audience row (null: none), before the product check."""
    cap = campaign.frequency_cap
    checks = [
        ("already_received", F.col("_same_campaign") > 0),
        ("daily_cap", F.col("_today_emails") >= cap.max_per_day),
        ("frequency_cap", F.col("_recent_emails") >= cap.max_emails),
    ]
    reason = F.col("blocked_reason")
    for name, condition in checks:
        reason = F.coalesce(reason, F.when(condition, F.lit(name)))
    return reason


def _history_counts(inputs: PlanInputs, campaign: Campaign, plan_date: dt.date,
                    later_campaigns: Collection[str]) -> DataFrame:
    """Per user: emails of any campaign in the cap window and of this campaign in its cool-down.

    An email is a (campaign, user, day) of the history, counted once however many rows name it: a
    plan row and the outbox message sent for it are one email, not two.
    """
    cap_from = plan_date - dt.timedelta(days=campaign.frequency_cap.days - 1)
    cool_from = plan_date - dt.timedelta(days=campaign.cooldown_days)
    # This campaign's own plan for the day is being replaced, and the campaigns after it in priority
    # order are planned after it: their plans of the day do not count, whichever run wrote them.
    not_before = [campaign.id, *sorted(set(later_campaigns) - {campaign.id})]
    history = inputs.history.where(~(F.col("campaign_id").isin(*not_before) & (F.col("plan_date") == F.lit(plan_date))))
    history = (history.where(F.col("plan_date") <= F.lit(plan_date))
               .select("campaign_id", "user_id", "plan_date").distinct())
    return history.groupBy("user_id").agg(
        F.count_if(F.col("plan_date") >= F.lit(cap_from)).alias("_recent_emails"),
        F.count_if(F.col("plan_date") == F.lit(plan_date)).alias("_today_emails"),
        F.count_if((F.col("campaign_id") == campaign.id) & (F.col("plan_date") >= F.lit(cool_from))
                   ).alias("_same_campaign"))


def _chosen_products(candidates: DataFrame, inputs: PlanInputs, campaign: Campaign) -> DataFrame:
    """``user_id, item_ids, item_sources``: filtered candidates, best priority first, at most max_products."""
    items = inputs.item_features.select("item_id", "is_in_stock")
    bought = inputs.purchases.select("user_id", "item_id").distinct().withColumn("_bought", F.lit(True))
    negative = inputs.user_features.select(
        "user_id", F.explode("negatively_reviewed_item_ids").alias("item_id")).withColumn("_negative", F.lit(True))
    rows = (candidates.where(F.col("item_id").isNotNull())
            .join(items, "item_id")
            .join(bought, ["user_id", "item_id"], "left")
            .join(negative, ["user_id", "item_id"], "left")
            .where(F.col("is_in_stock")
                   & ~F.coalesce(F.col("_negative"), F.lit(False))
                   # A cart item was added after any earlier purchase of it: it stays.
                   & ((F.col("source") == CART) | ~F.coalesce(F.col("_bought"), F.lit(False)))))
    best = rows.groupBy("user_id", "item_id").agg(F.min_by("source", F.struct("priority", "source")).alias("source"),
                                                  F.min("priority").alias("priority"))
    ranked = best.withColumn("_n", F.row_number().over(
        Window.partitionBy("user_id").orderBy("priority", "item_id"))).where(F.col("_n") <= campaign.max_products)
    ordered = ranked.groupBy("user_id").agg(
        F.array_sort(F.collect_list(F.struct("_n", "item_id", "source"))).alias("_chosen"))
    return ordered.select("user_id", F.col("_chosen.item_id").alias("item_ids"),
                          F.col("_chosen.source").alias("item_sources"))


def decide_campaign(inputs: PlanInputs, campaign: Campaign, *, plan_date: dt.date, plan_run_id: str,
                    planned_at: dt.datetime, later_campaigns: Collection[str] = ()) -> DataFrame:
    """One row per audience user: the plan columns plus ``excluded`` (the exclusion reason, or null).

    Plan rows and exclusion rows both come from this one frame (:func:`split_decisions`), so a
    stage that persists it computes the audience, its joins and the product choice once.

    The frequency cap counts the history's plans of earlier days, and of ``plan_date`` those of
    every campaign except this one and ``later_campaigns`` (the ids after it in priority order).
    So a campaign's plan for a day depends only on the plans before it in that order, whichever
    runs wrote them: re-planning a day, all of it or one campaign, gives the same rows.
    """
    audience, candidates = AUDIENCES[campaign.type](inputs, campaign, plan_date)
    profile = inputs.users.select("user_id", "locale", "timezone")
    features = inputs.user_features.select("user_id", "preferred_send_hour")
    frame = (audience.dropDuplicates(["user_id"])
             .transform(with_mail_permission, users=inputs.users, suppressions=inputs.suppressions,
                        now=planned_at, campaign_type=campaign.type)
             .join(profile, "user_id", "left")
             .join(features, "user_id", "left")
             .join(_history_counts(inputs, campaign, plan_date, later_campaigns), "user_id", "left"))
    frame = frame.fillna({"_recent_emails": 0, "_today_emails": 0, "_same_campaign": 0})
    frame = frame.withColumn("_excluded", _exclusion(campaign))
    # Products only for the users no earlier rule excluded; too few of them is the last reason.
    eligible = frame.where(F.col("_excluded").isNull()).select("user_id")
    products = _chosen_products(candidates.join(eligible, "user_id", "left_semi"), inputs, campaign)
    frame = frame.join(products, "user_id", "left").withColumn(
        "_excluded", F.coalesce(F.col("_excluded"), F.when(
            F.coalesce(F.size("item_ids"), F.lit(0)) < campaign.min_products, F.lit("too_few_products"))))

    locale = F.when(F.col("locale").isin(*campaign.locales), F.col("locale")).otherwise(F.lit(FALLBACK_LOCALE))
    subjects = F.create_map(*[
        part for v, by_locale in campaign.subjects.items() for loc, text in by_locale.items()
        for part in (F.lit(f"{v}\u001f{loc}"), F.lit(text))])
    subject = F.coalesce(F.element_at(subjects, F.concat_ws("\u001f", F.col("variant"), F.col("locale"))),
                         F.element_at(subjects, F.concat_ws("\u001f", F.col("variant"), F.lit(FALLBACK_LOCALE))))
    quiet = campaign.quiet_hours
    hour = send_hour(F.coalesce(F.col("preferred_send_hour"), F.lit(10)), quiet_start=quiet.start,
                     quiet_end=quiet.end)
    return (frame
            .withColumn("variant", assign_variant(campaign, F.col("user_id")))
            .withColumn("locale", locale)
            .select(
                F.lit(campaign.id).alias("campaign_id"), F.lit(campaign.type).alias("campaign_type"),
                F.lit(plan_date).alias("plan_date"), "user_id", "variant", F.lit(campaign.template).alias("template"),
                "locale",
                F.when(F.col("variant") != HOLDOUT, subject).alias("subject_template"),
                send_time_utc(plan_date, hour, valid_timezone(F.col("timezone"))).alias("send_at"),
                "reason",
                F.coalesce("item_ids", F.array().cast("array<string>")).alias("item_ids"),
                F.coalesce("item_sources", F.array().cast("array<string>")).alias("item_sources"),
                F.col("context").cast("map<string,string>").alias("context"),
                F.lit(plan_run_id).alias("plan_run_id"),
                F.lit(planned_at).cast("timestamp").alias("planned_at"),
                F.col("_excluded").alias("excluded")))


def split_decisions(decisions: DataFrame) -> tuple[DataFrame, DataFrame]:
    """(plan rows, exclusion rows) of a :func:`decide_campaign` frame."""
    plan = decisions.where(F.col("excluded").isNull()).select(*PLAN_COLUMNS)
    exclusions = decisions.where(F.col("excluded").isNotNull()).select(
        "campaign_id", "plan_date", "user_id", F.col("excluded").alias("reason"), "plan_run_id")
    return plan, exclusions.select(*EXCLUSION_COLUMNS)


def plan_campaign(inputs: PlanInputs, campaign: Campaign, *, plan_date: dt.date, plan_run_id: str,
                  planned_at: dt.datetime, later_campaigns: Collection[str] = ()) -> tuple[DataFrame, DataFrame]:
    """(plan rows, exclusion rows) of one campaign for one day; see the module docstring for the rules."""
    return split_decisions(decide_campaign(inputs, campaign, plan_date=plan_date, plan_run_id=plan_run_id,
                                           planned_at=planned_at, later_campaigns=later_campaigns))
