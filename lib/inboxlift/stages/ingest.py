"""The ingest stage: landing files and retailers' exports -> Delta tables, exactly once.

``run_ingest`` reads the files under ``paths.landing_dir`` (``users/``,
``products/``, ``events/``, sub-folders and ``.gz`` included) that it has not
read before, validates and normalises every record, upserts users and
products, appends new events (partitioned by ``event_date``), and keeps every
rejected record in ``<entity>_quarantine``. ``run_import`` does the same for
an export of one of the shapes in ``ingest.imports``.

Tables written (besides ``events``, ``users``, ``products``):

- ``ingest_files``: one row per file and batch: ``batch, kind, path, size,
  modification_time, run_id, planned_at, read_versions`` (the versions of
  ``events``, ``users``, ``products`` when the batch was planned, -1 for none).
- ``ingest_runs``: one row per batch and entity: ``run_id, batch, entity,
  started_at, finished_at, files, read, accepted, duplicates, quarantined,
  quarantined_by_reason, conflicting_duplicates``. A batch is *committed* when
  its rows are here; a batch in ``ingest_files`` but not here is pending.
- ``users_quarantine``, ``products_quarantine``, ``events_quarantine``.
- ``suppressions`` (:mod:`inboxlift.consent`): merged from the batch's accepted ``unsubscribe``,
  ``resubscribe``, ``bounce`` and ``complaint`` events after the events append
  (``WriteId("ingest:suppressions", N)``); the first batch that writes it also takes the opt-outs
  already in ``events`` (a lake from before the table existed), for every campaign.

Exactly once. New files are cut into batches (``ingest.files_per_batch``).
For each batch, in this order:

1. *plan*: append the batch's files to ``ingest_files`` with the next batch
   number ``N``, the run id, the planning time and the current table versions;
2. write the quarantine and data tables, each write carrying the Delta
   transaction id ``WriteId("ingest:<table>", N)``;
3. append the batch's counts to ``ingest_runs`` (``WriteId("ingest:ingest_runs", N)``).

A crash before 1 leaves nothing: the files are still new. A crash anywhere
after 1 leaves batch ``N`` pending, and the next run redoes it first, with the
same files, run id, clock ("now" is the planning time) and the tables as they
were at planning time (time travel to ``read_versions``): its records come out
exactly as before, the writes that had committed are skipped by their
transaction ids, and the others happen. Only then are new files planned. A
batch's outcome therefore does not depend on where, or whether, a run crashed.
One ingest runs at a time per lake: a concurrent planner of the same batch
number is detected and refused.

A file is new when its (path, size, modification time) is not in
``ingest_files``: a file rewritten in place is read again (its events then
count as duplicates).
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import operator
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from pyspark import StorageLevel
from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, Observation, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    IntegerType,
    LongType,
    MapType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from inboxlift.consent import (
    CHANGED,
    CONSENT_EVENT_TYPES,
    SUPPRESSING_EVENTS,
    SUPPRESSION_KEY,
    SUPPRESSIONS_SCHEMA,
    SUPPRESSIONS_TABLE,
    suppression_updates,
)
from inboxlift.context import RunContext
from inboxlift.schemas import EVENT_TYPES, EVENTS_LANDING, PRODUCTS_LANDING, USERS_LANDING
from inboxlift.settings import ClickstreamImport, InvoiceLinesImport
from inboxlift.storage import WriteId
from inboxlift.transforms.imports import (
    IMPORT_EVENT_TYPES,
    derive_products,
    derive_users,
    export_columns,
    map_clickstream,
    map_invoice_lines,
)
from inboxlift.transforms.ingest import (
    ACCEPTED,
    DUPLICATE,
    PRODUCTS_TABLE,
    QUARANTINED,
    USERS_TABLE,
    Rules,
    classify_events,
    classify_upserts,
    drop_header_lines,
    parse_csv_lines,
    parse_json_lines,
    resolve_product_upserts,
    resolve_user_upserts,
    summarise_outcomes,
    to_events_table,
    to_quarantine,
    validate_events,
    validate_products,
    validate_users,
    with_reference_checks,
)

FILES_TABLE = "ingest_files"
RUNS_TABLE = "ingest_runs"
LANDING_KINDS = ("users", "products", "events")
IMPORT_SHAPES = ("invoice_lines", "clickstream")
# Where a batch may be interrupted by fail_after_files (tests), in the order a batch reaches them.
STEPS = ("planned", "users_quarantine", "users", "products_quarantine", "products",
         "events_quarantine", "events", "suppressions", "logged")

_SUFFIXES = {
    "users": (".csv", ".csv.gz"),
    "products": (".csv", ".csv.gz"),
    "events": (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz"),
}
_KEYS = {"users": "user_id", "products": "item_id"}
_SNAPSHOT_TABLES = ("events", "users", "products")

FILES_SCHEMA = StructType([
    StructField("batch", LongType()),
    StructField("kind", StringType()),
    StructField("path", StringType()),
    StructField("size", LongType()),
    StructField("modification_time", TimestampType()),
    StructField("run_id", StringType()),
    StructField("planned_at", TimestampType()),
    StructField("read_versions", MapType(StringType(), LongType())),
])
RUNS_SCHEMA = StructType([
    StructField("run_id", StringType()),
    StructField("batch", LongType()),
    StructField("entity", StringType()),
    StructField("started_at", TimestampType()),
    StructField("finished_at", TimestampType()),
    StructField("files", IntegerType()),
    StructField("read", LongType()),
    StructField("accepted", LongType()),
    StructField("duplicates", LongType()),
    StructField("quarantined", LongType()),
    StructField("quarantined_by_reason", MapType(StringType(), LongType())),
    StructField("conflicting_duplicates", LongType()),
])


class IngestInterrupted(RuntimeError):
    """A crash injected by ``fail_after_files`` (tests of exactly-once)."""


class ReconciliationError(RuntimeError):
    """Records were lost or invented: read != accepted + duplicates + quarantined."""


class ConcurrentIngestError(RuntimeError):
    """Another ingest planned the same batch number first."""


class ImportMappingError(ValueError):
    """An export lacks columns its mapping in ``ingest.imports`` names."""


@dataclass(frozen=True)
class EntityCounts:
    """What one entity's records became; ``read == accepted + duplicates + quarantined``."""

    entity: str
    files: int = 0
    read: int = 0
    accepted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    conflicting_duplicates: int = 0

    def __add__(self, other: "EntityCounts") -> "EntityCounts":
        reasons = dict(self.quarantined_by_reason)
        for reason, n in other.quarantined_by_reason.items():
            reasons[reason] = reasons.get(reason, 0) + n
        return EntityCounts(
            self.entity, self.files + other.files, self.read + other.read, self.accepted + other.accepted,
            self.duplicates + other.duplicates, self.quarantined + other.quarantined, dict(sorted(reasons.items())),
            self.conflicting_duplicates + other.conflicting_duplicates,
        )


@dataclass(frozen=True)
class IngestReport:
    """The batches a run committed (a redone pending batch included) and their counts per entity."""

    run_id: str
    batches: tuple[int, ...]
    recovered_batch: int | None
    entities: tuple[EntityCounts, ...]

    def counts(self, entity: str) -> EntityCounts:
        for counts in self.entities:
            if counts.entity == entity:
                return counts
        return EntityCounts(entity)

    def summary(self) -> str:
        if not self.batches:
            return f"ingest {self.run_id}: no new files"
        recovered = f" (batch {self.recovered_batch} redone after an interrupted run)" if self.recovered_batch else ""
        lines = [f"ingest {self.run_id}: batches {', '.join(map(str, self.batches))}{recovered}",
                 f"{'entity':<24}{'files':>7}{'read':>12}{'accepted':>12}{'duplicates':>12}{'quarantined':>13}"]
        for c in self.entities:
            lines.append(f"{c.entity:<24}{c.files:>7}{c.read:>12}{c.accepted:>12}{c.duplicates:>12}{c.quarantined:>13}")
        for c in self.entities:
            if c.quarantined_by_reason:
                reasons = ", ".join(f"{r}={n}" for r, n in sorted(c.quarantined_by_reason.items(), key=lambda x: -x[1]))
                lines.append(f"  {c.entity} quarantined by reason: {reasons}")
            if c.conflicting_duplicates:
                lines.append(f"  {c.entity}: {c.conflicting_duplicates} duplicates differ from the copy kept")
        return "\n".join(lines)


@dataclass(frozen=True)
class LandingFile:
    kind: str
    path: str
    size: int
    modification_time: dt.datetime


@dataclass(frozen=True)
class BatchPlan:
    batch: int
    run_id: str
    planned_at: dt.datetime
    files: tuple[LandingFile, ...]
    read_versions: dict[str, int]

    def files_of(self, kind: str) -> list[str]:
        return [f.path for f in self.files if f.kind == kind]


@dataclass
class _Failure:
    """Raises IngestInterrupted at ``step`` of the batch during which the run reaches ``after_files`` files."""

    after_files: int | None
    step: str
    files_seen: int = 0

    def batch_started(self, files: int) -> None:
        self.files_seen += files

    def reached(self, step: str) -> None:
        if self.after_files is not None and step == self.step and self.files_seen >= self.after_files:
            raise IngestInterrupted(f"injected failure at step {step!r} after {self.files_seen} files")


# ---- entry points -----------------------------------------------------------------------------

def run_ingest(ctx: RunContext, *, landing_dir: str | None = None, fail_after_files: int | None = None,
               fail_at: str = "events", echo: Callable[[str], None] = print) -> IngestReport:
    """Ingest the landing files not ingested before; redo an interrupted batch first.

    Args:
        landing_dir: defaults to ``paths.landing_dir``.
        fail_after_files: for tests: raise :class:`IngestInterrupted` at step ``fail_at`` (one of
            :data:`STEPS`) of the batch in which this many files have been taken up.
        echo: where the summary goes.
    """
    root = (landing_dir or ctx.settings.paths.landing_dir).rstrip("/")
    listings = [_list_files(ctx.spark, f"{root}/{kind}", kind=kind, suffixes=_SUFFIXES[kind]) for kind in LANDING_KINDS]
    return _run(ctx, listings, fail_after_files=fail_after_files, fail_at=fail_at, echo=echo)


def run_import(ctx: RunContext, *, shape: str, path: str, fail_after_files: int | None = None,
               fail_at: str = "events", echo: Callable[[str], None] = print) -> IngestReport:
    """Import a retailer's export (a file or a folder of files) of a shape in ``ingest.imports``.

    Lines become events (entity ``<shape>``); the users and products they imply are merged into
    ``users`` and ``products`` (entities ``<shape>/users``, ``<shape>/products``). A file already
    imported is skipped.

    Raises:
        ImportMappingError: an export lacks a column the mapping names (nothing is written).
    """
    _mapping(ctx, shape)
    listing = _list_files(ctx.spark, path, kind=shape, suffixes=None)
    return _run(ctx, [listing], fail_after_files=fail_after_files, fail_at=fail_at, echo=echo)


def _run(ctx: RunContext, listings: list[DataFrame | None], *, fail_after_files: int | None, fail_at: str,
         echo: Callable[[str], None]) -> IngestReport:
    if fail_at not in STEPS:
        raise ValueError(f"fail_at must be one of {STEPS}, got {fail_at!r}")
    run_id = f"ingest-{ctx.clock.now():%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    failure = _Failure(fail_after_files, fail_at)
    results: list[tuple[int, list[EntityCounts]]] = []
    recovered = None
    for plan in _pending_plans(ctx):
        failure.batch_started(len(plan.files))
        results.append((plan.batch, _process(ctx, plan, failure)))
        recovered = plan.batch
    new_files = _new_files(ctx, [listing for listing in listings if listing is not None])
    for shape in sorted({f.kind for f in new_files} & set(IMPORT_SHAPES)):
        _check_export_headers(ctx, [f.path for f in new_files if f.kind == shape], _mapping(ctx, shape))
    per_batch = max(1, ctx.settings.ingest.files_per_batch)
    for start in range(0, len(new_files), per_batch):
        chunk = new_files[start:start + per_batch]
        plan = _plan(ctx, chunk, run_id)
        failure.batch_started(len(chunk))
        failure.reached("planned")
        results.append((plan.batch, _process(ctx, plan, failure)))
    report = _report(run_id, results, recovered)
    echo(report.summary())
    return report


def _report(run_id: str, results: list[tuple[int, list[EntityCounts]]], recovered: int | None) -> IngestReport:
    totals: dict[str, EntityCounts] = {}
    for _, counts in results:
        for c in counts:
            totals[c.entity] = totals[c.entity] + c if c.entity in totals else c
    return IngestReport(run_id, tuple(b for b, _ in results), recovered, tuple(totals.values()))


# ---- files and plans --------------------------------------------------------------------------

def _list_files(spark: SparkSession, root: str, *, kind: str, suffixes: tuple[str, ...] | None) -> DataFrame | None:
    """``kind, path, size, modification_time`` of the files under ``root`` (a folder or one file).

    Spark's file listing works on every file system Spark reads (local, DBFS, volumes, object
    stores), and it skips hidden files and ``_``-prefixed markers like ``_SUCCESS``.
    """
    if "://" not in root and not root.startswith("dbfs:") and not Path(root).exists():
        return None
    try:
        # binaryFile reads file contents only when the content column is selected.
        listing = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(root)
    except AnalysisException as exc:
        if exc.getCondition() == "PATH_NOT_FOUND":
            return None
        raise
    files = listing.select(
        F.lit(kind).alias("kind"), "path", F.col("length").alias("size"),
        F.col("modificationTime").alias("modification_time"),
    )
    if suffixes:
        files = files.where(functools.reduce(operator.or_, [F.lower("path").endswith(s) for s in suffixes]))
    return files


def _new_files(ctx: RunContext, listings: list[DataFrame]) -> list[LandingFile]:
    """Listed files whose (path, size, modification time) is not in the file log, in batch order."""
    if not listings:
        return []
    listed = functools.reduce(DataFrame.unionByName, listings)
    if ctx.lake.exists(FILES_TABLE):
        logged = ctx.lake.read(FILES_TABLE).select("path", "size", "modification_time")
        listed = listed.join(logged, on=["path", "size", "modification_time"], how="left_anti")
    # File metadata (one row per new file), not data.
    rows = listed.select("kind", "path", "size", F.unix_micros("modification_time").alias("mtime_us")).collect()
    order = {kind: i for i, kind in enumerate((*LANDING_KINDS, *IMPORT_SHAPES))}
    files = [LandingFile(r.kind, r.path, int(r.size), _from_micros(r.mtime_us)) for r in rows]
    return sorted(files, key=lambda f: (order[f.kind], f.path))


def _from_micros(us: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=int(us))


def _plan(ctx: RunContext, files: list[LandingFile], run_id: str) -> BatchPlan:
    lake = ctx.lake
    last = lake.read(FILES_TABLE).agg(F.max("batch")).first()[0] if lake.exists(FILES_TABLE) else None
    batch = (last or 0) + 1
    versions = {t: lake.version(t) if lake.exists(t) else -1 for t in _SNAPSHOT_TABLES}
    plan = BatchPlan(batch, run_id, ctx.clock.now(), tuple(files), versions)
    rows = [(batch, f.kind, f.path, f.size, f.modification_time, run_id, plan.planned_at, versions) for f in files]
    result = lake.append(FILES_TABLE, ctx.spark.createDataFrame(rows, FILES_SCHEMA),
                         write_id=WriteId("ingest:plan", batch))
    if result.skipped:
        raise ConcurrentIngestError(f"batch {batch} was planned by another ingest run meanwhile; run ingest again")
    return plan


def _pending_plans(ctx: RunContext) -> list[BatchPlan]:
    """Batches planned in ``ingest_files`` whose counts never reached ``ingest_runs``."""
    lake = ctx.lake
    if not lake.exists(FILES_TABLE):
        return []
    planned = lake.read(FILES_TABLE)
    if lake.exists(RUNS_TABLE):
        planned = planned.join(lake.read(RUNS_TABLE).select("batch").distinct(), on="batch", how="left_anti")
    # The files of the (at most one) interrupted batch: metadata, bounded by files_per_batch.
    rows = planned.select(
        "batch", "kind", "path", "size", F.unix_micros("modification_time").alias("mtime_us"), "run_id",
        F.unix_micros("planned_at").alias("planned_us"), "read_versions",
    ).collect()
    plans = []
    for batch in sorted({r.batch for r in rows}):
        mine = [r for r in rows if r.batch == batch]
        files = sorted((LandingFile(r.kind, r.path, int(r.size), _from_micros(r.mtime_us)) for r in mine),
                       key=lambda f: f.path)
        first = mine[0]
        plans.append(BatchPlan(int(batch), first.run_id, _from_micros(first.planned_us), tuple(files),
                               {k: int(v) for k, v in first.read_versions.items()}))
    return plans


# ---- one batch --------------------------------------------------------------------------------

def _process(ctx: RunContext, plan: BatchPlan, failure: _Failure) -> list[EntityCounts]:
    rules = Rules.from_settings(ctx.settings.ingest, now=plan.planned_at)
    cached: list[DataFrame] = []
    try:
        kinds = {f.kind for f in plan.files}
        shapes = sorted(kinds & set(IMPORT_SHAPES))
        if shapes:
            counts = []
            for shape in shapes:
                counts += _ingest_export(ctx, plan, shape=shape, rules=rules, failure=failure, cached=cached)
        else:
            counts = _ingest_landing(ctx, plan, kinds=kinds, rules=rules, failure=failure, cached=cached)
        _log_batch(ctx, plan, counts)
        failure.reached("logged")
        return counts
    finally:
        for frame in cached:
            frame.unpersist()


def _ingest_landing(ctx: RunContext, plan: BatchPlan, *, kinds: set[str], rules: Rules, failure: _Failure,
                    cached: list[DataFrame]) -> list[EntityCounts]:
    counts: list[EntityCounts] = []
    batch_ids: dict[str, DataFrame | None] = {"users": None, "products": None}
    for kind, landing, validate in (("users", USERS_LANDING, validate_users),
                                    ("products", PRODUCTS_LANDING, validate_products)):
        if kind not in kinds:
            continue
        lines = _read_lines(ctx.spark, plan.files_of(kind))
        headers, width = _csv_headers(ctx.spark, lines, delimiter=",")
        observation = Observation()
        body = lines.transform(drop_header_lines, headers=headers).observe(
            observation, F.count(F.lit(1)).alias("lines"))
        records = body.transform(parse_csv_lines, headers=headers, columns={n: n for n in landing.fieldNames()},
                                 width=width)
        classified = _cache(records.transform(validate, rules=rules).transform(classify_upserts, key=_KEYS[kind]),
                            cached)
        entity_counts = _count(classified, observation, entity=kind, files=len(plan.files_of(kind)))
        counts.append(entity_counts)
        batch_ids[kind] = _upsert(ctx, plan, classified, kind=kind, entity=kind, counts=entity_counts,
                                  failure=failure)
    if "events" in kinds:
        lines = _read_lines(ctx.spark, plan.files_of("events"))
        observation = Observation()
        body = lines.observe(observation, F.count(F.lit(1)).alias("lines"))
        # campaign_type rides along (not an events column) to scope the batch's suppressions.
        validated = body.transform(parse_json_lines, fields=EVENTS_LANDING).transform(
            validate_events, rules=rules, event_types=EVENT_TYPES, carry=("campaign_type",))
        counts.append(_append_events(ctx, plan, validated, entity="events", observation=observation,
                                     files=len(plan.files_of("events")), batch_ids=batch_ids,
                                     failure=failure, cached=cached))
    return counts


def _ingest_export(ctx: RunContext, plan: BatchPlan, *, shape: str, rules: Rules, failure: _Failure,
                   cached: list[DataFrame]) -> list[EntityCounts]:
    mapping = _mapping(ctx, shape)
    is_invoice = isinstance(mapping, InvoiceLinesImport)
    paths = plan.files_of(shape)
    lines = _read_lines(ctx.spark, paths)
    headers, width = _csv_headers(ctx.spark, lines, delimiter=mapping.delimiter)
    observation = Observation()
    body = lines.transform(drop_header_lines, headers=headers).observe(observation, F.count(F.lit(1)).alias("lines"))
    records = body.transform(parse_csv_lines, headers=headers, columns=export_columns(mapping), width=width,
                             delimiter=mapping.delimiter)
    mapped = (records.transform(map_invoice_lines, mapping=mapping) if is_invoice
              else records.transform(map_clickstream, mapping=mapping))
    carry = ("country", "description") if is_invoice else ()
    validated = _cache(mapped.transform(
        validate_events, rules=rules, event_types=(*EVENT_TYPES, *IMPORT_EVENT_TYPES),
        timestamp_format=mapping.timestamp_format, timezone=mapping.timezone, allow_anonymous=is_invoice,
        excluded_item_ids=tuple(mapping.non_product_codes) if is_invoice else (), carry=carry,
    ), cached)

    counts: list[EntityCounts] = []
    batch_ids: dict[str, DataFrame | None] = {}
    derived = {
        "users": derive_users(validated, with_country=is_invoice),
        "products": derive_products(validated, with_details=is_invoice),
    }
    for kind, records_of_kind in derived.items():
        classified = _cache(records_of_kind.transform(classify_upserts, key=_KEYS[kind]), cached)
        entity = f"{shape}/{kind}"
        entity_counts = _count(classified, None, entity=entity, files=0)
        counts.append(entity_counts)
        batch_ids[kind] = _upsert(ctx, plan, classified, kind=kind, entity=entity, counts=entity_counts,
                                  failure=failure)
    events = validated.drop(*carry)
    counts.insert(0, _append_events(ctx, plan, events, entity=shape, observation=observation, files=len(paths),
                                    batch_ids=batch_ids, failure=failure, cached=cached))
    return counts


def _upsert(ctx: RunContext, plan: BatchPlan, classified: DataFrame, *, kind: str, entity: str,
            counts: EntityCounts, failure: _Failure) -> DataFrame:
    """Quarantine the rejects, merge the accepted records; return the batch's ids of this kind."""
    lake, key = ctx.lake, _KEYS[kind]
    _quarantine(ctx, plan, classified, table=f"{kind}_quarantine", entity=entity, id_column=key, counts=counts)
    failure.reached(f"{kind}_quarantine")
    accepted = classified.where(F.col("outcome") == ACCEPTED)
    if counts.accepted:
        schema, resolve = (USERS_TABLE, resolve_user_upserts) if kind == "users" else (PRODUCTS_TABLE,
                                                                                      resolve_product_upserts)
        current = lake.read(kind) if lake.exists(kind) else ctx.spark.createDataFrame([], schema)
        resolved = accepted.transform(resolve, current=current, ingested_at=plan.planned_at)
        lake.merge(kind, resolved, keys=[key], write_id=WriteId(f"ingest:{kind}", plan.batch))
    failure.reached(kind)
    return accepted.select(key)


def _append_events(ctx: RunContext, plan: BatchPlan, validated: DataFrame, *, entity: str,
                   observation: Observation, files: int, batch_ids: dict[str, DataFrame | None],
                   failure: _Failure, cached: list[DataFrame]) -> EntityCounts:
    """Reference checks against the tables as planned plus this batch; dedupe; quarantine; append."""
    known_users = _known(ctx, plan, "users", "user_id", batch_ids.get("users"))
    known_items = _known(ctx, plan, "products", "item_id", batch_ids.get("products"))
    existing = _snapshot(ctx, plan, "events", "event_id")
    classified = _cache(
        validated.transform(with_reference_checks, known_users=known_users, known_items=known_items)
        .transform(classify_events, existing_ids=existing),
        cached,
    )
    counts = _count(classified, observation, entity=entity, files=files)
    _quarantine(ctx, plan, classified, table="events_quarantine", entity=entity, id_column="event_id", counts=counts)
    failure.reached("events_quarantine")
    if counts.accepted:
        rows = classified.where(F.col("outcome") == ACCEPTED).transform(to_events_table, ingested_at=plan.planned_at)
        # Every task would otherwise write one small file per date it holds (tasks x dates files).
        # REBALANCE by date gathers each date's rows (adaptive execution still splits a skewed day
        # and coalesces small ones), so a batch writes about one file per date.
        rows = rows.hint("rebalance", "event_date")
        ctx.lake.append("events", rows, partition_by=["event_date"], write_id=WriteId("ingest:events", plan.batch))
    failure.reached("events")
    _update_suppressions(ctx, plan, classified.where(F.col("outcome") == ACCEPTED))
    failure.reached("suppressions")
    return counts


def _update_suppressions(ctx: RunContext, plan: BatchPlan, accepted: DataFrame) -> None:
    """Merge the batch's accepted consent events into ``suppressions``, once per batch."""
    def consent_events(frame: DataFrame) -> DataFrame:
        scope = F.col("campaign_type") if "campaign_type" in frame.columns else F.lit(None).cast("string")
        return frame.where(F.col("event_type").isin(*CONSENT_EVENT_TYPES)).select(
            "event_id", "event_type", "event_ts", "user_id", scope.alias("campaign_type"))

    lake = ctx.lake
    events = consent_events(accepted)
    exists = lake.exists(SUPPRESSIONS_TABLE)
    if exists and events.isEmpty():
        return
    if not exists and plan.read_versions.get("events", -1) >= 0:
        # A lake from before the table: the opt-outs it already holds count as well. events does not
        # keep campaign_type, so they count for every campaign; lifts are left out, as they could
        # then lift more than they named.
        earlier = consent_events(lake.read("events", version=plan.read_versions["events"]))
        events = events.unionByName(earlier.where(F.col("event_type").isin(*SUPPRESSING_EVENTS)))
    current = lake.read(SUPPRESSIONS_TABLE) if exists else ctx.spark.createDataFrame([], SUPPRESSIONS_SCHEMA)
    users = (lake.read("users") if lake.exists("users")
             else ctx.spark.createDataFrame([], "user_id string, email string"))
    rows = suppression_updates(events, current=current, users=users, updated_at=plan.planned_at)
    lake.merge(SUPPRESSIONS_TABLE, rows, keys=SUPPRESSION_KEY, update_condition=CHANGED,
               write_id=WriteId("ingest:suppressions", plan.batch))


def _quarantine(ctx: RunContext, plan: BatchPlan, classified: DataFrame, *, table: str, entity: str,
                id_column: str, counts: EntityCounts) -> None:
    if not counts.quarantined:
        return
    rows = classified.where(F.col("outcome") == QUARANTINED).transform(
        to_quarantine, entity=entity, id_column=id_column, batch=plan.batch, run_id=plan.run_id,
        quarantined_at=plan.planned_at)
    ctx.lake.append(table, rows, write_id=WriteId(f"ingest:{table}", plan.batch))


def _snapshot(ctx: RunContext, plan: BatchPlan, table: str, key: str) -> DataFrame:
    """The key column of a table as it was when the batch was planned (empty if it did not exist)."""
    version = plan.read_versions.get(table, -1)
    if version < 0:
        return ctx.spark.createDataFrame([], StructType([StructField(key, StringType())]))
    return ctx.lake.read(table, version=version).select(key)


def _known(ctx: RunContext, plan: BatchPlan, table: str, key: str, batch_ids: DataFrame | None) -> DataFrame:
    known = _snapshot(ctx, plan, table, key)
    return known.unionByName(batch_ids.select(key)) if batch_ids is not None else known


def _log_batch(ctx: RunContext, plan: BatchPlan, counts: list[EntityCounts]) -> None:
    finished = ctx.clock.now()
    rows = [(plan.run_id, plan.batch, c.entity, plan.planned_at, finished, c.files, c.read, c.accepted,
             c.duplicates, c.quarantined, c.quarantined_by_reason, c.conflicting_duplicates) for c in counts]
    ctx.lake.append(RUNS_TABLE, ctx.spark.createDataFrame(rows, RUNS_SCHEMA),
                    write_id=WriteId("ingest:ingest_runs", plan.batch))


def _count(classified: DataFrame, observation: Observation | None, *, entity: str, files: int) -> EntityCounts:
    """Counts per outcome; ``read`` is the independent count of lines observed before parsing."""
    # A handful of rows: outcome x first reason.
    rows = summarise_outcomes(classified).collect()
    by = {outcome: sum(r.records for r in rows if r.outcome == outcome) for outcome in (ACCEPTED, DUPLICATE, QUARANTINED)}
    reasons = {r.reason: int(r.records) for r in rows if r.outcome == QUARANTINED}
    total = sum(by.values())
    read = int(observation.get["lines"]) if observation is not None else total
    if read != total or sum(reasons.values()) != by[QUARANTINED]:
        raise ReconciliationError(
            f"{entity}: read {read} lines but accepted {by[ACCEPTED]} + duplicates {by[DUPLICATE]} "
            f"+ quarantined {by[QUARANTINED]} = {total} (by reason: {reasons})"
        )
    return EntityCounts(entity, files, read, by[ACCEPTED], by[DUPLICATE], by[QUARANTINED], dict(sorted(reasons.items())),
                        sum(int(r.conflicting) for r in rows))


def _cache(frame: DataFrame, cached: list[DataFrame]) -> DataFrame:
    # Counted, then written to two or three tables: computed once, not once per action.
    frame = frame.persist(StorageLevel.MEMORY_AND_DISK)
    cached.append(frame)
    return frame


# ---- reading ----------------------------------------------------------------------------------

_GLOB = re.compile(r"([\[\]{}*?\\])")


def _read_lines(spark: SparkSession, paths: Iterable[str]) -> DataFrame:
    """``source_file, pos, line``: one row per line, ``.gz`` decompressed, invalid UTF-8 as U+FFFD."""
    # Spark reads paths as glob patterns; a file name may hold [, {, * or ?.
    escaped = [_GLOB.sub(r"\\\1", p) for p in paths]
    return spark.read.text(escaped).select(
        F.col("_metadata.file_path").alias("source_file"),
        # Numbered before any shuffle: increases with the position in each file.
        F.monotonically_increasing_id().alias("pos"),
        F.col("value").alias("line"),
    )


def _csv_headers(spark: SparkSession, lines: DataFrame, *, delimiter: str) -> tuple[DataFrame, int]:
    """Each file's first line, and its field names (lower case): ``source_file, header_line, header_fields``."""
    # One row per file (its first line): metadata, not data.
    firsts = lines.groupBy("source_file").agg(F.min_by("line", "pos").alias("header_line")).collect()
    rows = [(r.source_file, r.header_line, _header_names(r.header_line, delimiter)) for r in firsts]
    width = max((len(names) for _, _, names in rows), default=1)
    schema = "source_file string, header_line string, header_fields array<string>"
    return spark.createDataFrame(rows, schema), width


def _header_names(header_line: str | None, delimiter: str) -> list[str]:
    text = (header_line or "").lstrip("\ufeff")
    fields = next(csv.reader([text], delimiter=delimiter), [])
    return [name.strip().lower() for name in fields]


def _mapping(ctx: RunContext, shape: str) -> InvoiceLinesImport | ClickstreamImport:
    if shape not in IMPORT_SHAPES:
        raise ValueError(f"unknown export shape {shape!r}; the shapes are {', '.join(IMPORT_SHAPES)}")
    return getattr(ctx.settings.ingest.imports, shape)


def _check_export_headers(ctx: RunContext, paths: list[str], mapping: InvoiceLinesImport | ClickstreamImport) -> None:
    """Refuse an export whose header lacks a mapped column, before anything is planned or written."""
    if not paths:
        return
    lines = _read_lines(ctx.spark, paths)
    # One row per file (its first line).
    firsts = lines.groupBy("source_file").agg(F.min_by("line", "pos").alias("header_line")).collect()
    wanted = export_columns(mapping)
    for row in firsts:
        names = _header_names(row.header_line, mapping.delimiter)
        missing = [f"{ours} -> {theirs!r}" for ours, theirs in wanted.items() if theirs.strip().lower() not in names]
        if missing:
            raise ImportMappingError(
                f"{row.source_file}: the header lacks mapped columns {missing}; it has {names}. "
                f"Set the column names under ingest.imports in the settings."
            )
