"""Users: landing attributes plus the planted traits that drive their events.

Every attribute is a draw keyed by ``user_idx``, so the users CSV and the event
generator can each build the users they need, partitioned their own way, and
still agree on every user.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from inboxlift.generate import draws
from inboxlift.generate.text import SECONDS_PER_DAY, iso_date, iso_utc
from inboxlift.generate.vocab import EMAIL_DOMAINS, FIRST_NAMES, MARKETS, TASTE_GROUPS

USERS_PER_FILE = 1_000_000

MISSING_NAME_SHARE = 0.07
MISSING_BIRTHDAY_SHARE = 0.12
CONSENT_SHARE = 0.72
# Users who opted in later than at signup (from a pop-up, a checkout box).
LATE_CONSENT_SHARE = 0.2
SIGNUP_IN_WINDOW_SHARE = 0.2
LAPSED_SHARE = 0.15
BAD_ADDRESS_SHARE = 0.02
# Activity is log-normal: median user ~0.55x the mean, top 1% ~7x. sigma 1.1 gives
# the heavy head of a real shop (a few users make a large share of sessions).
ACTIVITY_SIGMA = 1.1
ACTIVITY_CAP = 40.0

# When users like to shop, as local hours 0..23: each user gets one peak hour
# from this distribution (morning, lunch break, evening).
ACTIVE_HOUR_WEIGHTS = (0.1, 0.05, 0.02, 0.02, 0.02, 0.05, 0.4, 1.0, 1.2, 0.8, 0.6, 0.8,
                       1.2, 1.0, 0.6, 0.5, 0.6, 0.8, 1.2, 1.6, 1.8, 1.6, 1.0, 0.4)


@dataclass(frozen=True)
class UserWindow:
    """Instants, as epoch seconds: the events window and the earliest signup."""

    start_s: int
    end_s: int
    floor_s: int


def _market_attr(name: str) -> Column:
    return F.element_at(F.array(*[F.lit(getattr(m, name)) for m in MARKETS]), F.col("market") + 1)


_USER_DRAWS = (
    "market", "name", "has_name", "domain", "age", "has_birthday", "signup_in_window", "signup", "late_consent",
    "consent_delay", "consent", "taste", "lapse_at", "lapsed", "active_hour", "peak_share", "bad_address",
)


def build_users(spark: SparkSession, *, seed: int, users: int, window: UserWindow, partitions: int) -> DataFrame:
    """One row per user: landing fields and planted traits (taste group, activity, peak hour, lapse)."""
    def u(name: str) -> Column:
        return F.col("u_" + name)

    languages = list(FIRST_NAMES)
    lang_no = draws.constant_at([languages.index(m.names) for m in MARKETS], F.col("market"))
    names_by_lang = F.array(*[F.array(*[F.lit(d) for d, _ in FIRST_NAMES[lang]]) for lang in languages])
    ascii_by_lang = F.array(*[F.array(*[F.lit(a) for _, a in FIRST_NAMES[lang]]) for lang in languages])
    has_name = u("has_name") >= MISSING_NAME_SHARE
    name_no = draws.below(F.size(F.element_at(names_by_lang, F.col("lang_no") + 1)), u("name")) + 1
    local_part = F.concat(
        F.when(F.col("has_name"), F.element_at(F.element_at(ascii_by_lang, F.col("lang_no") + 1), F.col("name_no")))
        .otherwise(F.lit("customer")),
        F.lit("."), (F.col("user_idx") + 1).cast("string"))

    end_day = window.end_s // SECONDS_PER_DAY
    age_days = F.floor((17 + 58 * u("age")) * 365.25)
    before_window = window.start_s - F.floor(u("signup") * (window.start_s - window.floor_s))
    in_window = window.start_s + F.floor(u("signup") * (window.end_s - window.start_s - 3600))
    consent_delay = F.floor(u("consent_delay") * F.when(u("late_consent") < LATE_CONSENT_SHARE,
                                                        F.lit(60 * SECONDS_PER_DAY)).otherwise(F.lit(120)))
    activity = F.least(F.lit(ACTIVITY_CAP), F.exp(ACTIVITY_SIGMA * F.col("n_activity") - ACTIVITY_SIGMA ** 2 / 2))
    lapse_at = window.start_s + F.floor((0.1 + 0.5 * u("lapse_at")) * (window.end_s - window.start_s))

    base = spark.range(0, users, 1, partitions).withColumnRenamed("id", "user_idx")
    return (
        draws.with_uniforms(base, seed=seed, prefix="user", keys=["user_idx"], names=_USER_DRAWS)
        .withColumn("n_activity", draws.normal(seed, "user-activity", "user_idx"))
        .withColumns({
            "market": draws.weighted_index([m.weight for m in MARKETS], u("market")),
            "has_name": has_name,
            "is_consented": u("consent") < CONSENT_SHARE,
            "signup_s": F.when(u("signup_in_window") < SIGNUP_IN_WINDOW_SHARE, in_window)
                         .otherwise(before_window).cast("long"),
            "activity": activity,
            "lapse_at": lapse_at.cast("long"),
        })
        .withColumns({"lang_no": lang_no, "name_no": name_no})
        .withColumn("consent_s", F.when(F.col("is_consented"), F.least(F.col("signup_s") + consent_delay,
                                                                        F.lit(window.end_s))).cast("long"))
        .withColumn("is_lapsed", (u("lapsed") < LAPSED_SHARE) & (F.col("signup_s") < F.col("lapse_at")))
        .select(
            "user_idx",
            F.format_string("u%07d", F.col("user_idx") + 1).alias("user_id"),
            F.concat(local_part, F.lit("@"), draws.pick(EMAIL_DOMAINS, u("domain"))).alias("email"),
            F.when(F.col("has_name"), F.element_at(F.element_at(names_by_lang, F.col("lang_no") + 1),
                                                   F.col("name_no"))).alias("first_name"),
            _market_attr("locale").alias("locale"),
            _market_attr("timezone").alias("timezone"),
            _market_attr("country").alias("country"),
            F.when(u("has_birthday") >= MISSING_BIRTHDAY_SHARE, iso_date(end_day - age_days)).alias("birthday"),
            "signup_s", "is_consented", "consent_s",
            F.greatest(F.col("signup_s"), F.coalesce(F.col("consent_s"), F.col("signup_s"))).alias("updated_s"),
            draws.weighted_index([g.weight for g in TASTE_GROUPS], u("taste")).alias("taste_group"),
            "activity",
            # 0..1: how much email engagement grows with shopping activity.
            (F.col("activity") / (F.col("activity") + 1.0)).alias("engagement"),
            draws.weighted_index(ACTIVE_HOUR_WEIGHTS, u("active_hour")).alias("active_hour_local"),
            # Share of a user's sessions that fall near their peak hour; the rest follow the
            # population's daily curve.
            (0.55 + 0.3 * u("peak_share")).alias("peak_share"),
            # Only users who signed up before their lapse date can lapse.
            "is_lapsed",
            F.when(F.col("is_lapsed"), F.col("lapse_at")).alias("lapsed_s"),
            (u("bad_address") < BAD_ADDRESS_SHARE).alias("is_bad_address"),
        )
    )


def user_partitions(users: int) -> int:
    return max(1, math.ceil(users / USERS_PER_FILE))


def users_landing_fields() -> dict[str, Column]:
    """The USERS_LANDING columns as text, keyed by name."""
    return {
        "user_id": F.col("user_id"),
        "email": F.col("email"),
        "first_name": F.col("first_name"),
        "locale": F.col("locale"),
        "timezone": F.col("timezone"),
        "country": F.col("country"),
        "birthday": F.col("birthday"),
        "signup_ts": iso_utc(F.col("signup_s")),
        "email_consent": F.when(F.col("is_consented"), F.lit("true")).otherwise(F.lit("false")),
        "consent_ts": F.when(F.col("consent_s").isNotNull(), iso_utc(F.col("consent_s"))),
        "updated_at": iso_utc(F.col("updated_s")),
    }


def users_truth(users: DataFrame) -> DataFrame:
    """The planted traits, for tests and evaluation only."""
    names = F.array(*[F.lit(g.name) for g in TASTE_GROUPS])
    return users.select(
        "user_id", "taste_group", F.element_at(names, F.col("taste_group") + 1).alias("taste_group_name"),
        "active_hour_local", "timezone", "locale", "activity", "engagement", "peak_share", "is_lapsed",
        F.timestamp_seconds(F.col("lapsed_s")).alias("lapsed_at"), "is_bad_address", "is_consented",
        F.timestamp_seconds(F.col("signup_s")).alias("signup_at"),
    )
