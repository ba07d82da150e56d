"""``generate_shop`` on a small shop: landing format, planted structure against the truth, dirty records, determinism.

One shop is generated for the whole module; every expectation is written by
hand or read from the planted truth, never recomputed with the generator's code.
"""

from __future__ import annotations

import collections
import csv
import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from zoneinfo import ZoneInfo

import pytest
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from inboxlift.generate import (
    EVENT_DIRTY_KINDS, PRODUCT_DIRTY_KINDS, USER_DIRTY_KINDS, GenerateReport, generate_shop,
)
from inboxlift.schemas import EVENT_TYPES, EVENTS_LANDING, PRODUCTS_LANDING, SERVICE_ONLY_EVENT_TYPES, USERS_LANDING

UTC = dt.timezone.utc
END = dt.datetime(2026, 11, 20, 11, 0, tzinfo=UTC)
SHOP_OPENED = dt.datetime(2020, 1, 1, tzinfo=UTC)
USERS, ITEMS, DAYS = 500, 400, 90
NEW_ARRIVAL_DAYS = 14
DIRTY_RATE = 0.1
# Sessions per user and day, 2.5 times the default: active users then have enough
# sessions (a dozen and more) for their modal hour to mean something.
SESSIONS_PER_USER_DAY = 0.15
# Ingest's default limit for a string; overlong dirty strings must exceed it.
MAX_STRING_LENGTH = 2000
EMAIL_TYPES = ("email_delivered", "email_open", "email_click", "unsubscribe", "bounce")
BROWSE_TYPES = ("search", "view", "add_to_cart", "remove_from_cart", "purchase")


@dataclass(frozen=True)
class Landing:
    """One generated shop as the tests read it: raw landing lines, clean records, the dirty truth."""

    report: GenerateReport
    event_lines: list[bytes]
    user_lines: list[bytes]
    product_lines: list[bytes]
    user_header: bytes
    product_header: bytes
    # (source, kind, record_id, line) for every row of the truth's dirty table
    dirty: list[tuple[str, str, str | None, bytes]]
    clean_events: list[dict]
    clean_users: list[dict[str, str]]
    clean_products: list[dict[str, str]]
    # Ids of every row of the users and products files, dirty rows included.
    file_user_ids: set[str]
    file_item_ids: set[str]


def _file_lines(paths: list[str]) -> list[bytes]:
    lines: list[bytes] = []
    for path in paths:
        data = Path(path).read_bytes()
        assert data.endswith(b"\n"), f"{path} does not end with a line break"
        lines += data[:-1].split(b"\n")
    return lines


def _without(lines: list[bytes], removed: list[bytes]) -> list[bytes]:
    """``lines`` minus ``removed`` as multisets; every removed line must be there."""
    remaining = collections.Counter(lines)
    for line in removed:
        assert remaining[line] > 0, f"dirty line of the truth not in the landing files: {line[:120]!r}"
        remaining[line] -= 1
    kept = []
    for line in lines:
        if remaining[line] > 0:
            remaining[line] -= 1
            kept.append(line)
    return kept


def _csv_row(line: bytes) -> list[str]:
    return next(csv.reader([line.decode("utf-8")]))


def _generate(spark: SparkSession, root: Path, **sizes) -> GenerateReport:
    return generate_shop(spark, landing_dir=str(root / "landing"), truth_dir=str(root / "truth"), gzip=False,
                         end=END, **sizes)


@pytest.fixture(scope="module")
def shop(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> GenerateReport:
    return _generate(spark, tmp_path_factory.mktemp("shop"), users=USERS, items=ITEMS, days=DAYS,
                     dirty_rate=DIRTY_RATE, seed=7, sessions_per_user_day=SESSIONS_PER_USER_DAY,
                     campaign_every_days=7, new_arrival_days=NEW_ARRIVAL_DAYS)


@pytest.fixture(scope="module")
def landing(spark: SparkSession, shop: GenerateReport) -> Landing:
    # The dirty table holds a few thousand rows for this shop size.
    dirty = [(r["source"], r["kind"], r["record_id"], bytes(r["line"]))
             for r in spark.read.parquet(shop.truth_paths["dirty"]).collect()]
    events = _file_lines(shop.landing_files["events"])
    user_file, product_file = _file_lines(shop.landing_files["users"]), _file_lines(shop.landing_files["products"])
    dirty_of = {src: [line for s, _, _, line in dirty if s == src] for src in ("events", "users", "products")}
    clean_users = _without(user_file[1:], dirty_of["users"])
    clean_products = _without(product_file[1:], dirty_of["products"])
    return Landing(
        report=shop, event_lines=events, user_lines=user_file[1:], product_lines=product_file[1:],
        user_header=user_file[0], product_header=product_file[0], dirty=dirty,
        clean_events=[json.loads(line) for line in _without(events, dirty_of["events"])],
        clean_users=[dict(zip(USERS_LANDING.fieldNames(), _csv_row(line), strict=True)) for line in clean_users],
        clean_products=[dict(zip(PRODUCTS_LANDING.fieldNames(), _csv_row(line), strict=True))
                        for line in clean_products],
        # Ids are never quoted, and reading the bytes before the first comma survives invalid UTF-8.
        file_user_ids={line.split(b",")[0].decode() for line in user_file[1:]},
        file_item_ids={line.split(b",")[0].decode() for line in product_file[1:]},
    )


@pytest.fixture(scope="module")
def events(spark: SparkSession, shop: GenerateReport) -> Iterator[DataFrame]:
    """The clean events, read by Spark: landing lines minus the truth's dirty lines, parsed."""
    lines = spark.read.text(shop.landing_files["events"])
    dirty = (spark.read.parquet(shop.truth_paths["dirty"]).where(F.col("source") == "events")
             .select(F.col("line").cast("string").alias("value")))
    parsed = (lines.exceptAll(dirty)
              .select(F.from_json("value", EVENTS_LANDING).alias("e")).select("e.*")
              # The instant, and the naive UTC wall time from which local hours are computed
              # without depending on the session's time zone.
              .withColumns({"at": F.to_timestamp("event_ts", "yyyy-MM-dd'T'HH:mm:ssX"),
                            "ts": F.to_timestamp_ntz(F.regexp_replace("event_ts", "Z$", ""))}))
    yield parsed.cache()
    parsed.unpersist()


def _truth(spark: SparkSession, shop: GenerateReport, table: str) -> DataFrame:
    return spark.read.parquet(shop.truth_paths[table])


def _iso(text: str) -> dt.datetime:
    assert len(text) == 20 and text.endswith("Z"), text
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


# ---------------------------------------------------------------- determinism


@pytest.fixture(scope="module")
def tiny_runs(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, GenerateReport]]:
    """Seed 11 twice (with dirt, in separate folders), seed 12 once without dirt."""
    runs = {}
    for name, seed, rate in (("first", 11, DIRTY_RATE), ("again", 11, DIRTY_RATE), ("other_seed", 12, 0.0)):
        root = tmp_path_factory.mktemp(f"tiny-{name}")
        runs[name] = (root, _generate(spark, root, users=50, items=10, days=10, dirty_rate=rate, seed=seed))
    return runs


def _landing_bytes(root: Path) -> dict[str, bytes]:
    landing = root / "landing"
    return {str(p.relative_to(landing)): p.read_bytes() for p in sorted(landing.rglob("*")) if p.is_file()}


def test_same_seed_and_end_give_byte_identical_landing_files(tiny_runs):
    (first_root, first), (again_root, again) = tiny_runs["first"], tiny_runs["again"]
    first_files, again_files = _landing_bytes(first_root), _landing_bytes(again_root)

    assert sorted(first_files) == [
        "events/20261120T110000Z-seed11-part-00000.jsonl",
        "products/20261120T110000Z-seed11-part-00000.csv",
        "users/20261120T110000Z-seed11-part-00000.csv",
    ]
    assert first_files == again_files
    # Something to compare: events and dirty lines, including raw invalid bytes.
    assert first.events > 50 and first.dirty_total > 0
    assert (first.events_by_type, first.dirty) == (again.events_by_type, again.dirty)


def test_another_seed_gives_other_data(tiny_runs):
    (first_root, first), (other_root, _) = tiny_runs["first"], tiny_runs["other_seed"]

    def event_ids(root: Path) -> set[str]:
        ids = set()
        for path in (root / "landing/events/").glob("*.jsonl"):
            for raw in path.read_bytes().splitlines():
                try:
                    ids.add(json.loads(raw).get("event_id"))
                except ValueError:
                    pass
        return ids

    def rows(root: Path, entity: str) -> set[bytes]:
        return {line for path in (root / "landing" / entity).glob("*.csv") for line in path.read_bytes().splitlines()}

    assert event_ids(first_root).isdisjoint(event_ids(other_root))
    # Ids are 1..n in both runs, but names, markets, prices and brands are drawn anew;
    # only the header row may coincide.
    assert len(rows(first_root, "users") & rows(other_root, "users")) == 1
    assert len(rows(first_root, "products") & rows(other_root, "products")) == 1


def test_no_dirty_records_at_rate_zero(spark, tiny_runs):
    root, report = tiny_runs["other_seed"]

    assert report.dirty == {"events": dict.fromkeys(EVENT_DIRTY_KINDS, 0),
                            "users": dict.fromkeys(USER_DIRTY_KINDS, 0),
                            "products": dict.fromkeys(PRODUCT_DIRTY_KINDS, 0)}
    assert spark.read.parquet(report.truth_paths["dirty"]).isEmpty()
    events = [json.loads(line) for line in _file_lines(report.landing_files["events"])]
    assert len(events) == report.events > 50
    assert {e["event_type"] for e in events} <= set(EVENT_TYPES)
    assert len({e["event_id"] for e in events}) == len(events)
    users = _file_lines(report.landing_files["users"])[1:]
    assert [_csv_row(line)[0] for line in users] == [f"u{n:07d}" for n in range(1, 51)]
    products = _file_lines(report.landing_files["products"])[1:]
    assert sorted(_csv_row(line)[0] for line in products) == [f"i{n:06d}" for n in range(1, 11)]


# ---------------------------------------------------------------- landing format


def test_report_counts_equal_the_landing_files_counted_by_spark(spark, shop, events):
    lines = spark.read.text(shop.landing_files["events"])
    by_type = {r["event_type"]: r["count"] for r in events.groupBy("event_type").count().collect()}

    assert lines.count() == shop.events + sum(shop.dirty["events"].values())
    # The report counts every type of schemas.EVENT_TYPES, those the shop never produces as 0.
    assert by_type == {t: n for t, n in shop.events_by_type.items() if n}
    assert set(shop.events_by_type) == set(EVENT_TYPES)
    assert shop.events == sum(by_type.values())
    assert (shop.users, shop.items) == (USERS, ITEMS)


def test_users_file_is_csv_with_the_landing_header(landing):
    assert landing.user_header == b"user_id,email,first_name,locale,timezone,country,birthday,signup_ts," \
                                  b"email_consent,consent_ts,updated_at"
    assert landing.user_header.decode().split(",") == USERS_LANDING.fieldNames()
    users = landing.clean_users
    assert [u["user_id"] for u in users] == [f"u{n:07d}" for n in range(1, USERS + 1)]
    assert all("@" in u["email"] for u in users)
    assert {"en", "zh-CN"} <= {u["locale"] for u in users}
    for u in users:
        ZoneInfo(u["timezone"])
        assert u["email_consent"] in ("true", "false")
        assert (u["consent_ts"] != "") == (u["email_consent"] == "true"), u
        assert _iso(u["signup_ts"]) <= END
    missing_names = sum(u["first_name"] == "" for u in users)
    assert 0 < missing_names < USERS // 4


def test_products_file_is_csv_with_category_trees_and_new_arrivals(spark, shop, landing):
    assert landing.product_header == b"item_id,name,description,category_path,brand,price,currency,image_url,url," \
                                     b"stock,launched_at,updated_at"
    assert landing.product_header.decode().split(",") == PRODUCTS_LANDING.fieldNames()
    products = landing.clean_products
    assert sorted(p["item_id"] for p in products) == [f"i{n:06d}" for n in range(1, ITEMS + 1)]

    parent_of: dict[str, str] = {}
    for p in products:
        levels = p["category_path"].split(" > ")
        assert len(levels) == 3 and all(levels), p["category_path"]
        # A tree: a sub-category under two departments would have two parents.
        assert parent_of.setdefault(" > ".join(levels[:2]), levels[0]) == levels[0]
        assert float(p["price"]) > 0 and p["price"].endswith(".99")
        assert int(p["stock"]) >= 0
        assert p["url"].startswith("https://") and p["image_url"].startswith("https://")
    assert len(set(parent_of.values())) >= 5

    cutoff = END - dt.timedelta(days=NEW_ARRIVAL_DAYS)
    launched_lately = {p["item_id"] for p in products if cutoff <= _iso(p["launched_at"]) <= END}
    truth_new = {r["item_id"] for r in _truth(spark, shop, "items").where("is_new_arrival").collect()}
    assert 0 < len(launched_lately) < ITEMS // 4
    assert launched_lately == truth_new


def test_events_are_json_lines_with_landing_keys_and_every_type(shop, landing):
    keys = set(EVENTS_LANDING.fieldNames())
    user_ids = {u["user_id"] for u in landing.clean_users}
    item_ids = {p["item_id"] for p in landing.clean_products}
    for e in landing.clean_events:
        assert set(e) <= keys, e
        assert {"event_id", "event_type", "event_ts", "user_id"} <= set(e), e
        assert shop.start <= _iso(e["event_ts"]) <= END, e
        assert e["user_id"] in user_ids and e.get("item_id", "i000001") in item_ids, e
    # Every type but complaints (a feedback loop the shop does not have) and those only the tracking
    # service writes.
    generated = set(EVENT_TYPES) - set(SERVICE_ONLY_EVENT_TYPES) - {"complaint"}
    assert {e["event_type"] for e in landing.clean_events} == generated
    assert len({e["event_id"] for e in landing.clean_events}) == len(landing.clean_events)


def test_events_carry_the_fields_of_their_type(landing):
    by_type = collections.defaultdict(list)
    for e in landing.clean_events:
        by_type[e["event_type"]].append(e)

    for t in EMAIL_TYPES:
        assert all(e["campaign_id"].startswith("nl-") and e["message_id"] for e in by_type[t]), t
    for t in ("view", "add_to_cart", "remove_from_cart", "purchase", "review"):
        assert all(e["item_id"] and e["session_id"] for e in by_type[t]), t
    for e in by_type["purchase"]:
        assert e["order_id"] and e["currency"] == "USD"
        assert isinstance(e["quantity"], int) and e["quantity"] >= 1
        assert isinstance(e["price"], (int, float)) and e["price"] > 0
    assert all(e["query"].strip() for e in by_type["search"])
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in e["query"]) for e in by_type["search"])
    assert {e["rating"] for e in by_type["review"]} <= {1, 2, 3, 4, 5}
    assert len({e["rating"] for e in by_type["review"]}) >= 3


def test_review_words_carry_the_rating_s_sentiment(landing):
    # Written by hand from the review vocabulary: words no review of the other side may use.
    positive = ("love it", "excellent quality", "highly recommend", "great value", "非常好", "强烈推荐")
    negative = ("terrible quality", "waste of money", "very disappointed", "broke after a week",
                "很失望", "浪费钱")
    reviews = [e for e in landing.clean_events if e["event_type"] == "review"]
    assert len(reviews) >= 30
    for e in reviews:
        text = e["review_text"].lower()
        if e["rating"] >= 4:
            assert not any(w in text for w in negative), e
        if e["rating"] <= 2:
            assert not any(w in text for w in positive), e
    assert any(any(w in e["review_text"].lower() for w in positive) for e in reviews if e["rating"] >= 4)
    assert any(any(w in e["review_text"].lower() for w in negative) for e in reviews if e["rating"] <= 2)


# ---------------------------------------------------------------- planted structure


def test_taste_groups_view_mostly_their_preferred_categories(spark, shop, events):
    items = _truth(spark, shop, "items").select("item_id", "category_path")
    groups = _truth(spark, shop, "taste_groups").select("taste_group", "preferred_categories")
    is_preferred = F.array_contains("preferred_categories", F.col("category_path")).cast("double")
    observed = (
        events.where(F.col("event_type") == "view").select("user_id", "item_id")
        .join(items, on="item_id", how="inner")
        .join(_truth(spark, shop, "users").select("user_id", "taste_group"), on="user_id", how="inner")
        .join(groups, on="taste_group", how="inner")
        .groupBy("taste_group").agg(F.avg(is_preferred).alias("share"), F.count("*").alias("views"))
    )
    # By chance, a view lands in a group's categories as often as the catalogue holds them.
    chance = items.crossJoin(groups).groupBy("taste_group").agg(F.avg(is_preferred).alias("chance"))
    rows = observed.join(chance, on="taste_group", how="inner").orderBy("taste_group").collect()

    # Every group has members; the catalogue's share of a group's 4 categories (of 26
    # leaves) is about 0.15. 80% of sessions browse only the group's own pool, the rest
    # the whole shop, so about 0.8 + 0.2 * 0.15 = 0.83 of a group's views are expected in
    # its categories. 0.7 and four times chance leave room for a few hundred views' noise.
    assert [r["taste_group"] for r in rows] == list(range(8))
    for r in rows:
        assert r["views"] >= 200, r
        assert 0.05 < r["chance"] < 0.25, r
        assert r["share"] >= 0.7 and r["share"] >= 4 * r["chance"], r


def test_item_popularity_is_skewed(events):
    counts = sorted((r["count"] for r in events.where(F.col("event_type") == "view").groupBy("item_id").count()
                     .collect()), reverse=True)
    total = sum(counts)
    top_share = sum(counts[: ITEMS // 10]) / total
    median = counts[len(counts) // 2]

    # Equal popularity would give the top 10% of items 10% of the views; Zipf ranks
    # (exponent 1.1) within pools of ~60 items give them several times that.
    assert top_share >= 0.35, top_share
    assert counts[0] >= 10 * max(median, 1), (counts[:5], median)


def test_funnels_narrow_and_carts_are_abandoned(events):
    def of_type(event_type: str, ts_name: str) -> DataFrame:
        return events.where(F.col("event_type") == event_type).select("session_id", "item_id",
                                                                      F.col("at").alias(ts_name))

    by_type = {r["event_type"]: r["count"] for r in events.groupBy("event_type").count().collect()}
    carts, purchases = of_type("add_to_cart", "cart_ts"), of_type("purchase", "buy_ts")
    views = of_type("view", "view_ts")
    abandoned = carts.join(purchases, on=["session_id", "item_id"], how="left_anti").count()

    assert by_type["view"] > by_type["add_to_cart"] > by_type["purchase"] > 0
    # A cart is bought when it is not removed (3/4) and its session checks out (1/2): 3/8,
    # so about 5/8 of carts are abandoned.
    assert 0.5 <= abandoned / by_type["add_to_cart"] <= 0.75, (abandoned, by_type["add_to_cart"])
    # Every purchase follows a view and a cart of the same item in the same session.
    in_order = (F.col("view_ts") < F.col("cart_ts")) & (F.col("cart_ts") < F.col("buy_ts"))
    preceded = (purchases.join(carts, on=["session_id", "item_id"], how="inner")
                .join(views, on=["session_id", "item_id"], how="inner").where(in_order)
                .select("session_id", "item_id", "buy_ts"))
    assert purchases.join(preceded, on=["session_id", "item_id", "buy_ts"], how="left_anti").isEmpty()


def test_sessions_start_near_each_user_s_peak_local_hour(spark, shop, events):
    truth = _truth(spark, shop, "users").select("user_id", "timezone", "active_hour_local")
    starts = (events.where(F.col("event_type").isin("search", "view"))
              .groupBy("user_id", "session_id").agg(F.min("ts").alias("start"))
              .join(truth, on="user_id", how="inner")
              .withColumn("hour", F.hour(F.convert_timezone(F.lit("UTC"), F.col("timezone"), F.col("start")))))
    by_hour = starts.groupBy("user_id", "active_hour_local", "hour").agg(F.count("*").alias("n"))
    busiest_first = Window.partitionBy("user_id").orderBy(F.desc("n"), F.asc("hour"))
    active_users = (
        by_hour
        .withColumn("sessions", F.sum("n").over(Window.partitionBy("user_id")))
        .withColumn("rank", F.row_number().over(busiest_first))
        .where((F.col("rank") == 1) & (F.col("sessions") >= 8))
        .select((F.abs(F.col("hour") - F.col("active_hour_local")) % 24).alias("d"))
        .select(F.least("d", 24 - F.col("d")).alias("hours_off"))
        .collect()
    )
    near = sum(r["hours_off"] <= 2 for r in active_users) / len(active_users)

    # 55-85% of a user's sessions start within about an hour of the peak, so with 8 or
    # more sessions the modal hour is almost always within 2 h; by chance (hours spread
    # like the population's day) it would be 5 hours of 24, about 0.2-0.3.
    assert len(active_users) >= 50
    assert near >= 0.85, near


def test_email_opens_and_clicks_are_fewer_than_deliveries(spark, shop, events):
    by_type = {r["event_type"]: r["count"] for r in events.groupBy("event_type").count().collect()}
    messages = {t: events.where(F.col("event_type") == t).select("message_id") for t in EMAIL_TYPES}

    assert by_type["email_delivered"] > by_type["email_open"] > by_type["email_click"] > 0
    assert messages["email_open"].join(messages["email_delivered"], on="message_id", how="left_anti").isEmpty()
    assert messages["email_click"].join(messages["email_open"], on="message_id", how="left_anti").isEmpty()
    assert messages["bounce"].join(messages["email_delivered"], on="message_id", how="left_anti").count() \
        == by_type["bounce"]
    # Engagement grows with activity: open chances are 0.04 + 0.6 * engagement, so users
    # above 0.5 (mean ~0.62) open about twice as often as those below (mean ~0.26).
    engaged = _truth(spark, shop, "users").select("user_id", (F.col("engagement") >= 0.5).alias("is_engaged"))
    rates = {r["is_engaged"]: r["open_rate"] for r in (
        events.where(F.col("event_type").isin("email_delivered", "email_open"))
        .join(engaged, on="user_id", how="inner").groupBy("is_engaged")
        .agg((F.count_if(F.col("event_type") == "email_open") / F.count_if(F.col("event_type") == "email_delivered"))
             .alias("open_rate"))
        .collect())}
    assert rates[True] > 1.5 * rates[False], rates


def test_lapsed_users_stop_browsing(spark, shop, events):
    truth = _truth(spark, shop, "users").select("user_id", "is_lapsed", "lapsed_at")
    # Sessions, from their first event: views of a session run a few minutes past its start.
    sessions = (events.where(F.col("event_type").isin(*BROWSE_TYPES))
                .groupBy("user_id", "session_id").agg(F.min("at").alias("start"), F.max("at").alias("last"))
                .join(truth, on="user_id", how="inner"))
    lapsed = sessions.where("is_lapsed")
    last_browse = sessions.groupBy("user_id", "is_lapsed").agg(F.max("last").alias("last"))
    # Lapses fall between 10% and 60% of the window, so at least 0.4 * 90 = 36 days before
    # its end; a session's events run on for minutes, hence a day of margin.
    quiet_since = END - dt.timedelta(days=0.4 * DAYS - 1)
    quiet = {r["is_lapsed"]: (r["quiet"], r["users"]) for r in last_browse.groupBy("is_lapsed").agg(
        F.count_if(F.col("last") < F.lit(quiet_since)).alias("quiet"), F.count("*").alias("users")).collect()}
    lapsed_users = truth.where("is_lapsed").count()

    assert 0.05 * USERS <= lapsed_users <= 0.3 * USERS
    assert lapsed.select("user_id").distinct().count() >= 20  # active before they lapsed
    assert lapsed.where(F.col("start") >= F.col("lapsed_at")).isEmpty()
    assert quiet[True][0] == quiet[True][1]
    # Users who did not lapse keep browsing: most were seen in those last 35 days.
    assert quiet[False][0] < 0.5 * quiet[False][1], quiet


# ---------------------------------------------------------------- dirty records


def test_every_dirty_kind_is_planted_and_reported(landing):
    counts = collections.Counter((source, kind) for source, kind, _, _ in landing.dirty)
    for source, kinds in (("events", EVENT_DIRTY_KINDS), ("users", USER_DIRTY_KINDS),
                          ("products", PRODUCT_DIRTY_KINDS)):
        assert all(counts[(source, k)] > 0 for k in kinds), (source, counts)
        assert landing.report.dirty[source] == {k: counts[(source, k)] for k in kinds}
    assert set(counts) <= ({("events", k) for k in EVENT_DIRTY_KINDS} | {("users", k) for k in USER_DIRTY_KINDS}
                           | {("products", k) for k in PRODUCT_DIRTY_KINDS})


def test_dirty_share_is_the_requested_rate(landing):
    for source, lines in (("events", landing.event_lines), ("users", landing.user_lines),
                          ("products", landing.product_lines)):
        dirty = sum(s == source for s, _, _, _ in landing.dirty)
        share = dirty / len(lines)
        # Binomial noise: ~25,000 event lines, 500 users, 400 products.
        tolerance = 0.02 if source == "events" else 0.05
        assert abs(share - DIRTY_RATE) <= tolerance, (source, dirty, len(lines))


def _json(line: bytes) -> dict:
    value = json.loads(line)
    assert isinstance(value, dict)
    return value


def _is_iso(text: object) -> bool:
    try:
        _iso(str(text))
        return True
    except (AssertionError, ValueError):
        return False


def _not_a_number(value: object) -> bool:
    try:
        float(value)  # type: ignore[arg-type]
        return False
    except (TypeError, ValueError):
        return True


def _overlong(values) -> bool:
    return any(isinstance(v, str) and len(v) > MAX_STRING_LENGTH for v in values)


def _fails_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def _fails_json(line: bytes) -> bool:
    try:
        _json(line)
        return False
    except (ValueError, AssertionError):
        return True


def _event_check(kind: str, line: bytes, landing: Landing, ids: dict[str, list[bytes]]) -> bool:
    if kind == "malformed_json":
        return _fails_json(line)
    if kind == "invalid_utf8":
        return _fails_utf8(line)
    e = _json(line)
    return {
        "missing_event_id": lambda: e.get("event_id", "") == "",
        "missing_user_id": lambda: e.get("user_id", "") == "",
        "unknown_event_type": lambda: e["event_type"] not in EVENT_TYPES,
        "negative_price": lambda: e["event_type"] == "purchase" and e["price"] < 0,
        "non_numeric_price": lambda: isinstance(e["price"], str) and _not_a_number(e["price"]),
        "future_timestamp": lambda: _iso(e["event_ts"]) > END,
        "before_shop_timestamp": lambda: _iso(e["event_ts"]) < SHOP_OPENED,
        "duplicate_exact": lambda: len(ids[e["event_id"]]) == 2 and ids[e["event_id"]][0] == ids[e["event_id"]][1],
        "duplicate_conflict": lambda: len(ids[e["event_id"]]) == 2 and ids[e["event_id"]][0] != ids[e["event_id"]][1],
        "wrong_type": lambda: (isinstance(e.get("event_ts"), int) or isinstance(e.get("user_id"), int)
                               or isinstance(e.get("event_type"), list) or isinstance(e.get("quantity"), str)),
        "unknown_user": lambda: e["user_id"].startswith("u") and e["user_id"] not in landing.file_user_ids,
        "unknown_item": lambda: e["item_id"].startswith("i") and e["item_id"] not in landing.file_item_ids,
        "overlong_string": lambda: _overlong(e.values()),
    }[kind]()


def _csv_check(source: str, kind: str, line: bytes) -> bool:
    if kind == "invalid_utf8":
        return _fails_utf8(line)
    fields = (USERS_LANDING if source == "users" else PRODUCTS_LANDING).fieldNames()
    row = _csv_row(line)
    if kind == "malformed_row":
        return len(row) != len(fields)
    r = dict(zip(fields, row, strict=True))
    if kind == "missing_id":
        return row[0] == ""
    if kind == "overlong_string":
        return _overlong(row)
    if source == "users":
        return {
            "future_timestamp": lambda: _iso(r["signup_ts"]) > END,
            "wrong_type": lambda: (r["email_consent"] not in ("true", "false") or not _is_iso(r["signup_ts"])
                                   or (r["birthday"] != "" and not _is_date(r["birthday"]))),
        }[kind]()
    return {
        "negative_price": lambda: float(r["price"]) < 0,
        "non_numeric_price": lambda: _not_a_number(r["price"]),
        "wrong_type": lambda: not r["stock"].isdigit() or not _is_iso(r["launched_at"]),
    }[kind]()


def _is_date(text: str) -> bool:
    try:
        dt.date.fromisoformat(text)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("source,kind", [("events", k) for k in EVENT_DIRTY_KINDS]
                         + [("users", k) for k in USER_DIRTY_KINDS] + [("products", k) for k in PRODUCT_DIRTY_KINDS])
def test_dirty_lines_are_broken_as_their_kind_says(landing, source, kind):
    lines = [(record_id, line) for s, k, record_id, line in landing.dirty if (s, k) == (source, kind)]
    ids: dict[str, list[bytes]] = collections.defaultdict(list)
    if kind.startswith("duplicate"):
        for line in landing.event_lines:
            if not _fails_json(line):
                ids[_json(line).get("event_id")].append(line)

    assert lines
    for record_id, line in lines:
        if source == "events":
            assert _event_check(kind, line, landing, ids), line[:300]
        else:
            assert _csv_check(source, kind, line), line[:300]
        if kind.startswith("duplicate"):
            assert _json(line)["event_id"] == record_id
