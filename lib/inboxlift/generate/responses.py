"""The generated shop's answers to delivered emails: planted probabilities, outcomes and events.

A *unit* is one campaign, user and plan day: a delivered message, or a holdout row of the plan
(no email; the user only buys on their own). Every draw hashes the seed, the draw's name and the
unit's key (:mod:`inboxlift.generate.draws`), so a unit gets the same outcome on every run, in any
partitioning, and a unit's organic purchase is the same draw whether it was mailed or held out.

Planted structure (rates in ``settings.simulate``, README "Simulated responses"):

- human opens grow with the user's planted engagement (collapsing after a lapse, as in the
  generator), times a lift when the message arrives within an hour of the user's active hour;
- clicks per open grow with engagement and with the share of the email's products in the user's
  taste group, times the campaign's planted variant lift;
- a click leads to a purchase at the campaign's rate (its incremental effect), more often when the
  clicked product is in the user's taste group; every unit, holdout included, also buys on its own
  at the organic rate (no campaign id), within ``organic_window_days`` of its *planned* send time
  (the plan's ``send_at``), not of the actual send: the email does not move what the user would buy
  anyway, so the organic purchases of a mailed unit and of a held-out one fall alike in the window
  the report measures both arms over (from the planned send time);
- unsubscribes (after an open) and complaints grow with the emails sent in the days before;
- bad addresses bounce; machines open (Apple's proxy) or open and click (security scanners) the mail
  of a fixed share of users, flagged with the user agent class as the tracking service flags them.
"""

from __future__ import annotations

from typing import Mapping

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from inboxlift.generate import draws
from inboxlift.generate.text import SECONDS_PER_DAY, iso_utc, local_seconds
from inboxlift.generate.vocab import TASTE_GROUPS
from inboxlift.settings import SimulateSettings
from inboxlift.schemas import require_columns

UNIT_KEY = ["campaign_id", "user_id", "plan_date"]
UNIT_COLUMNS = [*UNIT_KEY, "campaign_type", "variant", "message_id", "is_holdout", "sent_s", "planned_s", "issued_s",
                "item_ids", "recent_emails"]
TRAIT_COLUMNS = ["user_id", "engagement", "taste_group", "active_hour_local", "timezone", "is_lapsed", "lapsed_at",
                 "is_bad_address"]
CATALOGUE_COLUMNS = ["rank", "item_id", "category_path", "price", "currency"]
PROBABILITY_CAP = 0.95
# Engagement left to a user after their planted lapse (the generator's newsletter rule).
LAPSED_ENGAGEMENT = 0.1
# The user agent classes of people's opens and clicks (serve.user_agent_classes), and their shares.
HUMAN_AGENTS = ("mobile", "desktop", "webmail_proxy")
HUMAN_AGENT_WEIGHTS = (0.55, 0.3, 0.15)
APPLE_PROXY, SCANNER = "apple_proxy", "scanner"
# Mean delays (seconds) of the truncated exponential waits; the bounds are in the settings.
OPEN_MEAN_IN_ACTIVE_HOUR = 20 * 60
OPEN_MEAN_OTHERWISE = 4 * 3600
PURCHASE_MEAN = 3600
COMPLAINT_MEAN, COMPLAINT_BOUND = 6 * 3600, 2 * SECONDS_PER_DAY
ZIPF_EXPONENT = 1.1

_DRAWS = ("agent", "open", "click", "item", "buy", "organic", "organic_item", "fallback_item", "unsubscribe",
          "complaint", "delivered_ts", "bounce_ts", "machine_ts", "scanner_ts", "scanner_click_ts", "open_ts",
          "click_ts", "purchase_ts", "organic_ts", "unsubscribe_ts", "complaint_ts", "quantity", "organic_quantity")

# Event codes: part of each event's id, so never renumber them.
DELIVERED, BOUNCE, HUMAN_OPEN, PROXY_OPEN, SCANNER_OPEN, SCANNER_CLICK, HUMAN_CLICK, CLICK_PURCHASE, \
    ORGANIC_PURCHASE, UNSUBSCRIBE, COMPLAINT = range(11)


def _u(name: str) -> Column:
    return F.col("u_" + name)


def _cap(p: Column) -> Column:
    return F.least(F.greatest(p, F.lit(0.0)), F.lit(PROBABILITY_CAP))


def _truncated_exponential(u: Column, *, mean: float | Column, bound: float | Column) -> Column:
    """A wait in [0, bound): an exponential with ``mean``, cut at ``bound`` by rescaling the uniform."""
    mean_c = mean if isinstance(mean, Column) else F.lit(float(mean))
    bound_c = bound if isinstance(bound, Column) else F.lit(float(bound))
    return F.floor(-mean_c * F.log(1.0 - u * (1.0 - F.exp(-bound_c / mean_c)))).cast("long")


def _lookup(values: Mapping[str, float], key: Column, *, default: float) -> Column:
    """``values[key]``, or ``default`` for a key not in ``values`` (a literal map, so no join)."""
    if not values:
        return F.lit(float(default))
    table = F.create_map(*[F.lit(x) for k, v in sorted(values.items()) for x in (k, float(v))])
    return F.coalesce(F.try_element_at(table, key), F.lit(float(default)))


def variant_lift(params: SimulateSettings) -> Column:
    """The planted relative lift of clicks per open of the row's campaign and variant (1: none)."""
    flat = {f"{campaign}\u0000{variant}": lift for campaign, lifts in params.variant_click_lift.items()
            for variant, lift in lifts.items()}
    return _lookup(flat, F.concat_ws("\u0000", F.col("campaign_id"), F.col("variant")), default=1.0)


def click_purchase_rate(params: SimulateSettings) -> Column:
    return _lookup(params.campaign_click_purchase_rate, F.col("campaign_id"), default=params.click_purchase_rate)


def user_traits(users_truth: DataFrame, *, seed: int, params: SimulateSettings) -> DataFrame:
    """The generator's planted traits per user plus the simulation's own: mail client, machines."""
    require_columns(users_truth, TRAIT_COLUMNS, step="user_traits")
    with_draws = draws.with_uniforms(users_truth.select(*TRAIT_COLUMNS), seed=seed, prefix="sim-user",
                                     keys=["user_id"], names=("agent", "apple", "scanner"))
    return with_draws.select(
        *TRAIT_COLUMNS,
        draws.constant_at(list(HUMAN_AGENTS), draws.weighted_index(HUMAN_AGENT_WEIGHTS, _u("agent"))).alias(
            "human_agent"),
        (_u("apple") < params.apple_proxy_share).alias("is_apple_proxy_user"),
        (_u("scanner") < params.scanner_share).alias("is_scanner_user"),
    )


def with_item_relevance(units: DataFrame, *, categories: DataFrame) -> DataFrame:
    """``units`` with ``items``: their planned items in order, each ``(item_pos, item_id, is_relevant)``,
    and ``relevant_share``: the share of them in the user's taste group (0 without items).

    Args:
        units: rows keyed by ``UNIT_KEY`` with ``item_ids`` and ``taste_group``.
        categories: ``item_id, category_path``, one row per item (broadcast).
    """
    require_columns(units, [*UNIT_KEY, "item_ids", "taste_group"], step="with_item_relevance")
    require_columns(categories, ["item_id", "category_path"], step="with_item_relevance (categories)")
    group_categories = draws.constant_at([list(g.categories) for g in TASTE_GROUPS], F.col("taste_group"))
    others = [c for c in units.columns if c not in UNIT_KEY]
    exploded = units.select(*UNIT_KEY, F.struct(*others).alias("_unit"),
                            F.posexplode_outer("item_ids").alias("item_pos", "item_id"))
    is_relevant = F.coalesce(F.array_contains(group_categories, F.col("category_path")), F.lit(False))
    items = (exploded.join(F.broadcast(categories.select("item_id", "category_path")), "item_id", "left")
             .withColumn("taste_group", F.col("_unit.taste_group"))
             .withColumn("is_relevant", is_relevant))
    # A unit's exploded rows carry the same _unit, so ``first`` is exact; collect_list skips the null
    # item of a unit without items.
    grouped = items.groupBy(*UNIT_KEY).agg(
        F.first("_unit").alias("_unit"),
        F.sort_array(F.collect_list(F.when(F.col("item_id").isNotNull(),
                                           F.struct("item_pos", "item_id", "is_relevant")))).alias("items"))
    n = F.size("items")
    relevant = F.aggregate("items", F.lit(0), lambda acc, item: acc + F.when(item["is_relevant"], 1).otherwise(0))
    return grouped.select(*UNIT_KEY, "_unit.*", "items",
                          F.when(n > 0, relevant / n).otherwise(F.lit(0.0)).alias("relevant_share"))


def planted_outcomes(units: DataFrame, *, traits: DataFrame, categories: DataFrame, catalogue: DataFrame,
                     catalogue_size: int, seed: int, params: SimulateSettings) -> DataFrame:
    """One row per unit with its planted probabilities, outcomes and their times (epoch seconds).

    Args:
        units: ``UNIT_COLUMNS``: ``sent_s`` is when the message left (a holdout: its planned send
            time), ``planned_s`` its planned send time (the plan's ``send_at``; organic purchases are
            timed from it, for both arms alike), ``issued_s`` when its tracking links were issued
            (render), ``recent_emails`` the user's sent emails in the ``fatigue_days`` before.
        traits: :func:`user_traits`; units of users without traits are dropped (inner join).
        categories: ``item_id, category_path``.
        catalogue: ``CATALOGUE_COLUMNS``, ``rank`` 0..catalogue_size-1 by popularity: what a
            purchase not led by a product link buys, and every purchase's price.
        catalogue_size: rows of ``catalogue``.
    """
    require_columns(units, UNIT_COLUMNS, step="planted_outcomes")
    require_columns(catalogue, CATALOGUE_COLUMNS, step="planted_outcomes (catalogue)")

    def engagement_at(s: Column) -> Column:
        is_lapsed = F.col("is_lapsed") & (s > F.unix_seconds(F.col("lapsed_at")))
        return F.col("engagement") * F.when(is_lapsed, F.lit(LAPSED_ENGAGEMENT)).otherwise(F.lit(1.0))

    engagement = engagement_at(F.col("sent_s"))
    delivered_s = F.col("sent_s") + 1 + draws.below(30, _u("delivered_ts"))
    local_hour = F.floor(F.pmod(local_seconds(F.col("delivered_s"), F.col("timezone")), SECONDS_PER_DAY) / 3600)
    gap = F.abs(local_hour - F.col("active_hour_local"))
    is_active_hour = F.least(gap, 24 - gap) <= 1

    n_items = F.size("items")
    clicked = F.when(n_items > 0, F.element_at("items", draws.below(n_items, _u("item") * _u("item")) + 1))
    is_mail = ~F.col("is_holdout")
    is_delivered = is_mail & ~F.coalesce(F.col("is_bad_address"), F.lit(False))
    fatigue = 1.0 + params.fatigue_per_email * F.col("recent_emails")

    p_open = _cap((params.open_base + params.open_per_engagement * F.col("engagement_at_send"))
                  * F.when(F.col("is_active_hour"), F.lit(params.active_hour_open_lift)).otherwise(F.lit(1.0)))
    p_click_open = _cap((params.click_base + params.click_per_engagement * F.col("engagement_at_send"))
                        * (1.0 + params.relevance_click_lift * F.col("relevant_share")) * F.col("variant_click_lift"))
    p_buy_click = _cap(F.col("click_purchase_rate") * F.when(
        F.coalesce(F.col("clicked.is_relevant"), F.lit(False)), F.lit(params.relevance_purchase_lift))
        .otherwise(F.lit(1.0)))
    # Organic buying does not depend on the arm: its engagement is the user's at the planned send time,
    # as its time is counted from it (a lapse between the planned and the actual send changes nothing).
    p_organic = _cap(params.organic_purchase_base
                     + params.organic_purchase_per_engagement * engagement_at(F.col("planned_s")))

    def when_delivered(p: Column) -> Column:
        return F.when(F.col("is_delivered"), p).otherwise(F.lit(0.0))

    def catalogue_pick(u: Column) -> Column:
        if not catalogue_size:
            return F.lit(None).cast("int")
        return draws.zipf_rank(u, F.lit(catalogue_size), exponent=ZIPF_EXPONENT)

    prices = catalogue.select("item_id", "price", "currency")
    quantity = draws.weighted_index([0.85, 0.11, 0.04], _u("quantity")) + 1
    organic_quantity = draws.weighted_index([0.85, 0.11, 0.04], _u("organic_quantity")) + 1

    open_bound = params.max_open_delay_hours * 3600 - 60
    purchase_bound = params.max_purchase_delay_hours * 3600 - 60
    open_mean = F.when(F.col("is_active_hour"), F.lit(float(OPEN_MEAN_IN_ACTIVE_HOUR))).otherwise(
        F.lit(float(OPEN_MEAN_OTHERWISE)))

    frame = (
        draws.with_uniforms(units.join(traits, "user_id", "inner"), seed=seed, prefix="sim-unit", keys=UNIT_KEY,
                            names=_DRAWS)
        .transform(with_item_relevance, categories=categories)
        .withColumns({"engagement_at_send": engagement, "delivered_s": delivered_s, "clicked": clicked,
                      "is_delivered": is_delivered, "is_bounce": is_mail & ~is_delivered,
                      "variant_click_lift": F.when(is_mail, variant_lift(params)),
                      "click_purchase_rate": F.when(is_mail, click_purchase_rate(params))})
        .withColumn("is_active_hour", is_mail & is_active_hour)
        .withColumns({
            "p_open": when_delivered(p_open),
            "p_click_given_open": when_delivered(p_click_open),
            "p_purchase_given_click": when_delivered(p_buy_click),
            "p_organic_purchase": p_organic,
            "p_unsubscribe_given_open": when_delivered(_cap(params.unsubscribe_per_open * fatigue)),
            "p_complaint": when_delivered(_cap(params.complaint_rate * fatigue)),
        })
        .withColumns({"_fallback_rank": catalogue_pick(_u("fallback_item")),
                      "_organic_rank": catalogue_pick(_u("organic_item"))})
        .join(F.broadcast(catalogue.select(F.col("rank").alias("_fallback_rank"),
                                           F.col("item_id").alias("_fallback_item"))), "_fallback_rank", "left")
        .join(F.broadcast(catalogue.select(F.col("rank").alias("_organic_rank"),
                                           F.col("item_id").alias("organic_item_id"),
                                           F.col("price").alias("organic_price"),
                                           F.col("currency").alias("organic_currency"))), "_organic_rank", "left")
        .withColumn("purchase_item_id", F.coalesce(F.col("clicked.item_id"), F.col("_fallback_item")))
        .join(F.broadcast(prices.select(F.col("item_id").alias("purchase_item_id"),
                                        F.col("price").alias("purchase_price"),
                                        F.col("currency").alias("purchase_currency"))), "purchase_item_id", "left")
    )
    is_open = F.col("is_delivered") & (_u("open") < F.col("p_open"))
    is_click = F.col("is_open") & (_u("click") < F.col("p_click_given_open"))
    is_click_purchase = (F.col("is_click") & (_u("buy") < F.col("p_purchase_given_click"))
                         & F.col("purchase_price").isNotNull())
    is_organic = (_u("organic") < F.col("p_organic_purchase")) & F.col("organic_price").isNotNull()
    open_s = F.col("delivered_s") + 60 + _truncated_exponential(_u("open_ts"), mean=open_mean, bound=open_bound)
    click_s = F.col("open_s") + 5 + draws.below(300, _u("click_ts"))
    purchase_s = F.col("click_s") + 60 + _truncated_exponential(_u("purchase_ts"), mean=PURCHASE_MEAN,
                                                                 bound=purchase_bound)
    organic_s = F.col("planned_s") + draws.below(params.organic_window_days * SECONDS_PER_DAY, _u("organic_ts"))
    scanner_open_s = F.col("delivered_s") + 1 + draws.below(20, _u("scanner_ts"))
    p_click = F.col("p_open") * F.col("p_click_given_open")
    p_click_purchase = p_click * F.col("p_purchase_given_click")
    p_any = 1.0 - (1.0 - p_click_purchase) * (1.0 - F.col("p_organic_purchase"))
    return (
        frame
        .withColumns({"is_open": is_open, "open_s": open_s})
        .withColumns({"is_click": is_click, "click_s": click_s})
        .withColumns({"is_click_purchase": is_click_purchase, "purchase_s": purchase_s})
        .select(
            F.date_from_unix_date(F.floor(F.col("sent_s") / SECONDS_PER_DAY).cast("int")).alias("send_date"),
            *UNIT_KEY, "campaign_type", "variant", "is_holdout", "message_id", "sent_s", "planned_s", "issued_s",
            "engagement_at_send", "taste_group", "human_agent", "is_active_hour", F.size("items").alias("n_items"),
            "relevant_share", "recent_emails", "variant_click_lift", "click_purchase_rate",
            "p_open", "p_click_given_open", p_click.alias("p_click"), "p_purchase_given_click",
            p_click_purchase.alias("p_click_purchase"), "p_organic_purchase", p_any.alias("p_any_purchase"),
            (p_any - F.col("p_organic_purchase")).alias("p_incremental_purchase"),
            "p_unsubscribe_given_open", "p_complaint",
            "is_delivered", "is_bounce", "delivered_s",
            (F.col("sent_s") + 30 + draws.below(570, _u("bounce_ts"))).alias("bounce_s"),
            (F.col("is_delivered") & F.col("is_apple_proxy_user")).alias("is_proxy_open"),
            (F.col("delivered_s") + 1 + draws.below(120, _u("machine_ts"))).alias("proxy_open_s"),
            (F.col("is_delivered") & F.col("is_scanner_user")).alias("is_scanner_open"),
            scanner_open_s.alias("scanner_open_s"),
            (F.col("is_delivered") & F.col("is_scanner_user") & (F.size("items") > 0)).alias("is_scanner_click"),
            F.element_at("items", 1)["item_id"].alias("scanner_item_id"),
            (scanner_open_s + 1 + draws.below(10, _u("scanner_click_ts"))).alias("scanner_click_s"),
            "is_open", "open_s", "is_click", "click_s",
            F.col("clicked.item_id").alias("clicked_item_id"),
            (F.coalesce(F.col("clicked.item_pos"), F.lit(-1)) + 1).alias("click_position"),
            F.coalesce(F.col("clicked.is_relevant"), F.lit(False)).alias("is_clicked_relevant"),
            "is_click_purchase", "purchase_s", "purchase_item_id", quantity.alias("purchase_quantity"),
            "purchase_price", "purchase_currency",
            is_organic.alias("is_organic_purchase"), organic_s.alias("organic_s"), "organic_item_id",
            organic_quantity.alias("organic_quantity"), "organic_price", "organic_currency",
            (F.col("is_open") & (_u("unsubscribe") < F.col("p_unsubscribe_given_open"))).alias("is_unsubscribe"),
            (F.col("open_s") + 10 + draws.below(600, _u("unsubscribe_ts"))).alias("unsubscribe_s"),
            (F.col("is_delivered") & (_u("complaint") < F.col("p_complaint"))).alias("is_complaint"),
            (F.col("delivered_s") + 60 + _truncated_exponential(_u("complaint_ts"), mean=COMPLAINT_MEAN,
                                                                bound=COMPLAINT_BOUND)).alias("complaint_s"),
        )
    )


def _props(**values: Column | str) -> Column:
    return F.create_map(*[x for k, v in values.items() for x in (F.lit(k), v if isinstance(v, Column) else F.lit(v))])


_EVENT_FIELDS = {"event_id": "string", "event_type": "string", "ts": "bigint", "user_id": "string",
                 "item_id": "string", "order_id": "string", "quantity": "int", "price": "decimal(12,2)",
                 "currency": "string", "campaign_id": "string", "message_id": "string", "campaign_type": "string",
                 "properties": "map<string,string>"}


def _event(code: int, event_type: str, ts: Column, *, seed: int, with_campaign: bool = True,
           **values: Column) -> Column:
    base = {"event_id": draws.hex_id("e", seed, "response-event", *UNIT_KEY, F.lit(code)),
            "event_type": F.lit(event_type), "ts": ts, "user_id": F.col("user_id")}
    if with_campaign:
        base.update(campaign_id=F.col("campaign_id"), message_id=F.col("message_id"))
    fields = {**base, **values}
    return F.struct(*[(fields[n] if n in fields else F.lit(None)).cast(t).alias(n) for n, t in _EVENT_FIELDS.items()])


def response_events(outcomes: DataFrame, *, seed: int, files_per_day: int) -> DataFrame:
    """One row per event of every unit, due or not: ``send_date, bucket, event_id, event_type, ts`` (epoch
    seconds) and the landing fields; properties as the tracking service writes them."""
    variant = F.col("variant")
    false, true = F.lit("false"), F.lit("true")

    def seconds_since(ts: Column) -> Column:
        """``seconds_since_issued`` as the service writes it: from the render run (token issue) to the open."""
        return F.greatest(ts - F.col("issued_s"), F.lit(0)).cast("string")

    def order_id(code: int) -> Column:
        return draws.hex_id("o", seed, "response-order", *UNIT_KEY, F.lit(code))

    events = [
        F.when(F.col("is_delivered"), _event(DELIVERED, "email_delivered", F.col("delivered_s"), seed=seed,
                                             properties=_props(variant=variant))),
        F.when(F.col("is_bounce"), _event(BOUNCE, "bounce", F.col("bounce_s"), seed=seed,
                                          properties=_props(variant=variant))),
        F.when(F.col("is_open"), _event(HUMAN_OPEN, "email_open", F.col("open_s"), seed=seed, properties=_props(
            variant=variant, ua_class=F.col("human_agent"), is_machine_open=false,
            seconds_since_issued=seconds_since(F.col("open_s"))))),
        F.when(F.col("is_proxy_open"), _event(PROXY_OPEN, "email_open", F.col("proxy_open_s"), seed=seed,
                                              properties=_props(
            variant=variant, ua_class=APPLE_PROXY, is_machine_open=true,
            seconds_since_issued=seconds_since(F.col("proxy_open_s"))))),
        F.when(F.col("is_scanner_open"), _event(SCANNER_OPEN, "email_open", F.col("scanner_open_s"), seed=seed,
                                                properties=_props(
            variant=variant, ua_class=SCANNER, is_machine_open=true,
            seconds_since_issued=seconds_since(F.col("scanner_open_s"))))),
        F.when(F.col("is_scanner_click"), _event(SCANNER_CLICK, "email_click", F.col("scanner_click_s"), seed=seed,
                                                 item_id=F.col("scanner_item_id"), properties=_props(
            variant=variant, link_position="1", ua_class=SCANNER, is_machine_click=true))),
        F.when(F.col("is_click"), _event(HUMAN_CLICK, "email_click", F.col("click_s"), seed=seed,
                                         item_id=F.col("clicked_item_id"), properties=_props(
            variant=variant, link_position=F.col("click_position").cast("string"), ua_class=F.col("human_agent"),
            is_machine_click=false))),
        F.when(F.col("is_click_purchase"), _event(
            CLICK_PURCHASE, "purchase", F.col("purchase_s"), seed=seed, item_id=F.col("purchase_item_id"),
            order_id=order_id(CLICK_PURCHASE), quantity=F.col("purchase_quantity"), price=F.col("purchase_price"),
            currency=F.col("purchase_currency"))),
        F.when(F.col("is_organic_purchase"), _event(
            ORGANIC_PURCHASE, "purchase", F.col("organic_s"), seed=seed, with_campaign=False,
            item_id=F.col("organic_item_id"), order_id=order_id(ORGANIC_PURCHASE),
            quantity=F.col("organic_quantity"), price=F.col("organic_price"), currency=F.col("organic_currency"))),
        # A one-click unsubscribe from every campaign, as the service writes it (the scope is also campaign_type).
        F.when(F.col("is_unsubscribe"), _event(UNSUBSCRIBE, "unsubscribe", F.col("unsubscribe_s"), seed=seed,
                                               campaign_type=F.lit("all"), properties=_props(
            variant=variant, campaign_type=F.col("campaign_type"), scope="all", method="one_click",
            ua_class=F.col("human_agent")))),
        F.when(F.col("is_complaint"), _event(COMPLAINT, "complaint", F.col("complaint_s"), seed=seed,
                                             properties=_props(variant=variant))),
    ]
    bucket = F.pmod(draws.hash64(seed, "response-file", *UNIT_KEY), F.lit(files_per_day)).cast("int")
    # Nulls dropped after the explode, as the generator does (see generate.events._explode_events).
    return (outcomes.select("send_date", bucket.alias("bucket"), F.explode_outer(F.array(*events)).alias("ev"))
            .where(F.col("ev").isNotNull())
            .select("send_date", "bucket", "ev.*"))


def landing_line() -> Column:
    """An event row of :func:`response_events` as its landing line: JSON, ``EVENTS_LANDING`` keys, nulls left out."""
    fields = [iso_utc(F.col("ts")).alias("event_ts") if n == "ts" else F.col(n) for n in _EVENT_FIELDS]
    return F.to_json(F.struct(*fields))


def planted_rates(outcomes: DataFrame) -> DataFrame:
    """Per send day, campaign and variant (``holdout`` included): the planted rates (means of the units'
    probabilities) and the drawn counts. Rates are per unit; a holdout unit has no email."""
    def mean(name: str) -> Column:
        return F.avg(name).alias(f"planted_{name[2:]}_rate")

    counted = {"is_delivered": "delivered", "is_bounce": "bounced", "is_open": "human_opens",
               "is_click": "human_clicks",
               "is_click_purchase": "click_purchases", "is_organic_purchase": "organic_purchases",
               "is_unsubscribe": "unsubscribes", "is_complaint": "complaints", "is_proxy_open": "proxy_opens",
               "is_scanner_open": "scanner_opens"}

    revenue = (F.when(F.col("is_click_purchase"), F.col("purchase_price") * F.col("purchase_quantity"))
               .otherwise(F.lit(0)) + F.when(F.col("is_organic_purchase"),
                                             F.col("organic_price") * F.col("organic_quantity")).otherwise(F.lit(0)))
    return outcomes.groupBy("send_date", "campaign_id", "variant").agg(
        F.count("*").alias("units"),
        F.first("variant_click_lift").alias("planted_variant_click_lift"),
        F.first("click_purchase_rate").alias("planted_purchase_per_click"),
        *[mean(p) for p in ("p_open", "p_click", "p_click_given_open", "p_click_purchase", "p_organic_purchase",
                            "p_any_purchase", "p_incremental_purchase", "p_complaint")],
        F.avg(F.col("p_open") * F.col("p_unsubscribe_given_open")).alias("planted_unsubscribe_rate"),
        *[F.count_if(F.col(flag)).alias(name) for flag, name in counted.items()],
        F.count_if(F.col("is_click_purchase") | F.col("is_organic_purchase")).alias("purchasers"),
        F.sum(revenue).cast("decimal(18,2)").alias("revenue"),
    )
