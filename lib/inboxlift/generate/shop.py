"""``generate_shop``: write one batch of a synthetic shop's export, and its planted truth.

Landing files (what ingest reads), under ``landing_dir``:

- ``users/<batch>-part-NNNNN.csv[.gz]`` — header row, columns ``schemas.USERS_LANDING``;
- ``products/<batch>-part-NNNNN.csv[.gz]`` — header row, columns ``schemas.PRODUCTS_LANDING``;
- ``events/<batch>-part-NNNNN.jsonl[.gz]`` — JSON lines, keys ``schemas.EVENTS_LANDING`` (nulls left out).

Planted truth (for tests and evaluation only; no stage may read it), Parquet
under ``truth_dir/<table>/batch=<batch>/``: ``users`` (taste group, peak local
hour, lapse, ...), ``items`` (popularity rank, quality, new arrival),
``taste_groups`` and ``dirty`` (every dirty landing line with its kind).

``<batch>`` is ``<end as yyyymmddThhmmssZ>-seed<seed>``: the same end and seed
replace their own files; any other run adds files beside them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Iterator, Mapping

from pyspark.sql import Column, DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from inboxlift.generate import catalog, dirty, draws, events as ev, users as us
from inboxlift.generate.dirty import DirtyPlan
from inboxlift.generate.text import csv_line
from inboxlift.generate.writer import lines_of, with_header_first, write_lines
from inboxlift.schemas import EVENT_TYPES, EVENTS_LANDING, PRODUCTS_LANDING, USERS_LANDING

SHOP_OPENED = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
assert int(SHOP_OPENED.timestamp()) == dirty.SHOP_OPENED_S
# Events are built in EVENTS_LANDING order, with the timestamp carried as epoch seconds until written;
# the shop's own events have no properties (only the tracking service writes them).
assert [f for f in EVENTS_LANDING.fieldNames() if f != "properties"] == [
    ("event_ts" if f == "ts" else f) for f in ev.EVENT_FIELDS]
# Users sign up at most this long before the end of the data.
SIGNUP_HISTORY_DAYS = 3 * 365
# Target events per events file (about 150 MB of JSON before gzip).
EVENTS_PER_FILE = 500_000
# Clean events per user and day for each expected session per day (search, views,
# carts, purchases, reviews; late signups, lapses and not-yet-launched items
# included), and per user and newsletter (consent share, opens and clicks included).
# Measured on generated data (2,000 users, 60 days); used to size files and, in the
# benchmark, to turn an events target into a number of days.
BROWSE_EVENTS_PER_SESSION_DAY = 3.1
EMAIL_EVENTS_PER_USER_NEWSLETTER = 0.82


@dataclass(frozen=True)
class GenerateReport:
    """What one ``generate_shop`` run wrote."""

    batch_id: str
    seed: int
    start: dt.datetime
    end: dt.datetime
    users: int
    items: int
    campaigns: int
    events: int
    events_by_type: dict[str, int]
    # source ("events", "users", "products") -> dirty kind -> records
    dirty: dict[str, dict[str, int]]
    # entity ("users", "products", "events") -> files, in part order
    landing_files: dict[str, list[str]]
    # table ("users", "items", "taste_groups", "dirty") -> folder of this batch's Parquet
    truth_paths: dict[str, str] = field(default_factory=dict)

    @property
    def dirty_total(self) -> int:
        return sum(sum(kinds.values()) for kinds in self.dirty.values())

    @property
    def files_written(self) -> int:
        return sum(len(files) for files in self.landing_files.values())

    def summary(self) -> str:
        lines = [
            f"batch {self.batch_id}: {self.users:,} users, {self.items:,} items, {self.events:,} events "
            f"({self.start:%Y-%m-%d %H:%M} .. {self.end:%Y-%m-%d %H:%M} UTC), {self.campaigns} newsletters",
            "events by type: " + ", ".join(f"{t}={n:,}" for t, n in self.events_by_type.items()),
            f"dirty records: {self.dirty_total:,} "
            + "; ".join(f"{src}: " + ", ".join(f"{k}={n}" for k, n in kinds.items() if n)
                        for src, kinds in self.dirty.items()),
            f"files written: {self.files_written} "
            + ", ".join(f"{entity}={len(files)}" for entity, files in self.landing_files.items()),
        ]
        return "\n".join(lines)


def expected_events(*, users: int, days: int, sessions_per_user_day: float, campaign_every_days: int) -> float:
    """Roughly how many clean events a run of this size produces."""
    browse = users * days * sessions_per_user_day * BROWSE_EVENTS_PER_SESSION_DAY
    email = users * (days / campaign_every_days) * EMAIL_EVENTS_PER_USER_NEWSLETTER
    return browse + email


def batch_id_for(*, end: dt.datetime, seed: int) -> str:
    return f"{end.astimezone(dt.timezone.utc):%Y%m%dT%H%M%SZ}-seed{seed}"


# The generator's plans are deep stacks of projections with hundreds of aliased
# expressions. Spark's constraint propagation (used to infer and prune filters, which
# these plans do not need) walks every alias for every filter and took more planning
# time than the jobs themselves ran; it is switched off while generating, then restored.
GENERATOR_SQL_CONF = {"spark.sql.constraintPropagation.enabled": "false"}


@contextlib.contextmanager
def session_conf(spark: SparkSession, conf: Mapping[str, str]) -> Iterator[None]:
    """Sets SQL settings for the duration of the block and puts the previous values back."""
    previous = {}
    for key, value in conf.items():
        try:
            previous[key] = spark.conf.get(key, None)
            spark.conf.set(key, value)
        except Exception:  # noqa: BLE001 - a platform may forbid a setting; it is only a speed-up
            previous.pop(key, None)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)


def _kind_counts(kinds: tuple[str, ...]) -> list[Column]:
    return [F.count_if(F.col("dirty_kind") == k).alias(k) for k in kinds]


def _csv_rows(
    frame: DataFrame, *, fields: dict[str, Column], seed: int, source: str, key: str, plan: DirtyPlan,
    kinds: tuple[str, ...], fresh_id: Column, id_field: str, overrides, bytes_field: str,
) -> DataFrame:
    """Rows of a CSV landing file: ``clean_line``, and ``dirty_line`` / ``dirty_kind`` where a dirty sibling follows.

    Args:
        overrides: builds the dirty overrides from references to the clean fields.
    """
    refs = {name: F.col(f"f_{name}") for name in fields}
    kind = F.col("dirty_kind")
    joined, line = dirty.csv_dirty_line(refs, kind=kind, fresh_id=fresh_id, id_field=id_field,
                                        overrides=overrides(refs), bytes_field=bytes_field,
                                        values_line=F.col("dirty_values"))
    with_fields = frame.withColumns({f"f_{name}": value for name, value in fields.items()})
    return (
        dirty.with_csv_dirt(with_fields, seed=seed, source=source, key=key, plan=plan, kinds=kinds)
        .withColumns({"clean_line": csv_line(list(refs.values())), "dirty_values": F.when(kind.isNotNull(), joined)})
        .withColumn("dirty_line", line)
        .select(key, F.col(f"f_{id_field}").alias("base_id"), "clean_line", "dirty_kind", "dirty_line",
                F.when(kind.isNotNull() & (kind != "missing_id"), fresh_id).alias("dirty_record_id"))
    )


def _dirty_truth(rows: DataFrame, *, source: str, base_id: str) -> DataFrame:
    """Truth rows for the dirty siblings in ``rows`` (``dirty_kind``, ``dirty_line``, ``dirty_record_id``)."""
    raw = F.col("dirty_line").cast("binary")
    return rows.where(F.col("dirty_kind").isNotNull()).select(
        F.lit(source).alias("source"), F.col("dirty_kind").alias("kind"),
        F.when(F.col("dirty_record_id") != "", F.col("dirty_record_id")).alias("record_id"),
        F.col(base_id).alias("base_id"), raw.alias("line"), F.sha2(raw, 256).alias("line_sha256"),
    )


def generate_shop(
    spark: SparkSession,
    *,
    landing_dir: str,
    truth_dir: str,
    users: int,
    items: int,
    days: int,
    dirty_rate: float,
    seed: int,
    gzip: bool,
    end: dt.datetime,
    sessions_per_user_day: float = 0.06,
    campaign_every_days: int = 7,
    new_arrival_days: int = 14,
) -> GenerateReport:
    """Generate users, products and ``days`` of events ending at ``end``, as landing files, on the executors.

    Args:
        spark: the session.
        landing_dir: where landing files go (``users/``, ``products/``, ``events/`` below it).
        truth_dir: where the planted truth goes; never under ``landing_dir``.
        users, items, days: sizes.
        dirty_rate: share of landing records (per file kind) that are dirty, 0..0.5.
        seed: the same seed and sizes give byte-identical files.
        gzip: write ``.gz`` files.
        end: the last instant of generated activity (timezone-aware; from the run's clock).
        sessions_per_user_day: browsing sessions of an average user per day.
        campaign_every_days: days between newsletters.
        new_arrival_days: items launched within this many days before ``end`` are new arrivals.

    Returns:
        Counts, files and truth folders of this batch.
    """
    with session_conf(spark, GENERATOR_SQL_CONF):
        return _generate(spark, landing_dir=landing_dir, truth_dir=truth_dir, users=users, items=items, days=days,
                         dirty_rate=dirty_rate, seed=seed, gzip=gzip, end=end,
                         sessions_per_user_day=sessions_per_user_day, campaign_every_days=campaign_every_days,
                         new_arrival_days=new_arrival_days)


def _generate(
    spark: SparkSession, *, landing_dir: str, truth_dir: str, users: int, items: int, days: int, dirty_rate: float,
    seed: int, gzip: bool, end: dt.datetime, sessions_per_user_day: float, campaign_every_days: int,
    new_arrival_days: int,
) -> GenerateReport:
    _check_arguments(landing_dir=landing_dir, truth_dir=truth_dir, users=users, items=items, days=days,
                     end=end, campaign_every_days=campaign_every_days, new_arrival_days=new_arrival_days)
    plan = DirtyPlan(dirty_rate)
    end_s = int(end.timestamp())
    start_s = end_s - days * 86_400
    floor_s = max(dirty.SHOP_OPENED_S, min(end_s - SIGNUP_HISTORY_DAYS * 86_400, start_s - 30 * 86_400))
    batch_id = batch_id_for(end=end, seed=seed)
    landing = landing_dir.rstrip("/")
    truth = truth_dir.rstrip("/")

    items_df = catalog.build_items(spark, seed=seed, items=items, window=catalog.CatalogWindow(
        end_s=end_s, window_start_s=start_s, floor_s=floor_s, new_arrival_days=new_arrival_days))
    products = _csv_rows(
        items_df, fields=catalog.products_landing_fields(), seed=seed, source="products", key="item_idx", plan=plan,
        kinds=dirty.PRODUCT_DIRTY_KINDS, fresh_id=F.format_string("i%06d", items + 1 + F.col("item_idx")),
        id_field="item_id", overrides=dirty.product_dirty_overrides, bytes_field="name")
    campaigns = ev.newsletter_schedule(start_s=start_s, end_s=end_s, every_days=campaign_every_days)
    expected = expected_events(users=users, days=days, sessions_per_user_day=sessions_per_user_day,
                               campaign_every_days=campaign_every_days)
    event_partitions = max(1, min(users, math.ceil(expected / EVENTS_PER_FILE)))
    # One users frame for both the users file and the events: users are split by
    # expected events, and the users file merges those splits back (a narrow coalesce).
    users_df = us.build_users(spark, seed=seed, users=users, window=us.UserWindow(
        start_s=start_s, end_s=end_s, floor_s=floor_s), partitions=event_partitions)
    user_rows = _csv_rows(
        users_df.coalesce(min(event_partitions, us.user_partitions(users))), fields=us.users_landing_fields(),
        seed=seed, source="users", key="user_idx", plan=plan, kinds=dirty.USER_DIRTY_KINDS,
        fresh_id=F.format_string("u%07d", users + 1 + F.col("user_idx")), id_field="user_id",
        overrides=lambda refs: dirty.user_dirty_overrides(refs, end_s=end_s), bytes_field="first_name")

    products_obs = Observation(f"generate-products-{batch_id}")
    product_files = _write_csv(products.observe(products_obs, *_kind_counts(dirty.PRODUCT_DIRTY_KINDS)),
                               header=PRODUCTS_LANDING.fieldNames(), folder=f"{landing}/products",
                               batch_id=batch_id, gzip=gzip)
    users_obs = Observation(f"generate-users-{batch_id}")
    user_files = _write_csv(user_rows.observe(users_obs, *_kind_counts(dirty.USER_DIRTY_KINDS)),
                            header=USERS_LANDING.fieldNames(), folder=f"{landing}/users", batch_id=batch_id, gzip=gzip)

    lookup = catalog.build_item_lookup(items_df).cache()
    try:
        sizes = catalog.pool_sizes(lookup)
        sessions = ev.explode_sessions(users_df, seed=seed, start_s=start_s, end_s=end_s,
                                       sessions_per_user_day=sessions_per_user_day, dirty_unit_share=plan.unit_share)
        generated = ev.explode_browse_events(sessions, seed=seed, lookup=lookup, pool_sizes=sizes, end_s=end_s)
        if campaigns:
            deliveries = ev.explode_deliveries(users_df, seed=seed, campaigns=campaigns,
                                               every_days=campaign_every_days, dirty_unit_share=plan.unit_share)
            generated = generated.unionByName(ev.explode_email_events(deliveries, seed=seed, end_s=end_s))
        events = (dirty.with_event_dirt(generated, seed=seed, plan=plan)
                  .transform(dirty.with_dirty_event_line, seed=seed, users=users, items=items, end_s=end_s))

        events_obs = Observation(f"generate-events-{batch_id}")
        observed = events.observe(
            events_obs, *[F.count_if(F.col("event_type") == t).alias(t) for t in EVENT_TYPES],
            *_kind_counts(dirty.EVENT_DIRTY_KINDS))
        event_files = write_lines(lines_of(observed, ev.landing_json(), F.col("dirty_line")),
                                  folder=f"{landing}/events", batch_id=batch_id, extension="jsonl", gzip=gzip)

        # The events' dirty truth is a second pass over the same plan. Spark pushes the
        # ``is_dirty_unit`` filter down to the sessions and deliveries, so only the
        # dirty-bearing units are regenerated (see DirtyPlan), and nothing is cached.
        dirty_truth = (_dirty_truth(products, source="products", base_id="base_id")
                       .unionByName(_dirty_truth(user_rows, source="users", base_id="base_id")))
        if plan.rate > 0:
            dirty_truth = dirty_truth.unionByName(
                _dirty_truth(events.where("is_dirty_unit"), source="events", base_id="event_id"))
        truth_paths = {name: f"{truth}/{name}/batch={batch_id}" for name in ("users", "items", "taste_groups", "dirty")}
        dirty_truth.write.mode("overwrite").parquet(truth_paths["dirty"])
    finally:
        lookup.unpersist()
    us.users_truth(users_df.coalesce(min(event_partitions, us.user_partitions(users)))).write.mode("overwrite").parquet(truth_paths["users"])
    items_df.select(
        "item_id", "category_path", "brand", "price_band", F.col("item_idx").alias("popularity_rank"),
        "quality", "is_new_arrival", F.timestamp_seconds("launched_s").alias("launched_at"),
    ).write.mode("overwrite").parquet(truth_paths["items"])
    catalog.taste_group_truth(spark).write.mode("overwrite").parquet(truth_paths["taste_groups"])

    event_metrics = events_obs.get
    return GenerateReport(
        batch_id=batch_id, seed=seed,
        start=dt.datetime.fromtimestamp(start_s, dt.timezone.utc), end=dt.datetime.fromtimestamp(end_s, dt.timezone.utc),
        users=users, items=items, campaigns=len(campaigns),
        events=sum(int(event_metrics[t]) for t in EVENT_TYPES),
        events_by_type={t: int(event_metrics[t]) for t in EVENT_TYPES},
        dirty={
            "events": {k: int(event_metrics[k]) for k in dirty.EVENT_DIRTY_KINDS},
            "users": {k: int(users_obs.get[k]) for k in dirty.USER_DIRTY_KINDS},
            "products": {k: int(products_obs.get[k]) for k in dirty.PRODUCT_DIRTY_KINDS},
        },
        landing_files={"users": user_files, "products": product_files, "events": event_files},
        truth_paths=truth_paths,
    )


def _write_csv(rows: DataFrame, *, header: list[str], folder: str, batch_id: str, gzip: bool) -> list[str]:
    lines = with_header_first(rows, header=",".join(header), line=F.col("clean_line"), extra=F.col("dirty_line"))
    return write_lines(lines, folder=folder, batch_id=batch_id, extension="csv", gzip=gzip)


def _check_arguments(*, landing_dir: str, truth_dir: str, users: int, items: int, days: int, end: dt.datetime,
                     campaign_every_days: int, new_arrival_days: int) -> None:
    problems = []
    for name, value in (("users", users), ("items", items), ("days", days),
                        ("campaign_every_days", campaign_every_days), ("new_arrival_days", new_arrival_days)):
        if not isinstance(value, int) or value < 1:
            problems.append(f"{name} must be a positive integer, got {value!r}")
    if end.tzinfo is None:
        problems.append("end must be timezone-aware (UTC from the run's clock)")
    elif isinstance(days, int) and end - dt.timedelta(days=days + 30) < SHOP_OPENED:
        problems.append(f"{days} days before {end:%Y-%m-%d} starts too close to the shop's opening "
                        f"({SHOP_OPENED:%Y-%m-%d}); use fewer days or a later end")
    landing, truth = landing_dir.rstrip("/") + "/", truth_dir.rstrip("/") + "/"
    if truth.startswith(landing) or landing.startswith(truth):
        problems.append(f"truth_dir {truth_dir!r} and landing_dir {landing_dir!r} must not contain each other")
    if problems:
        raise ValueError("; ".join(problems))
