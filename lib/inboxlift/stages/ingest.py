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
  ``events``, ``users``, ``products`` when the batch was planned, -1 for none),
  ``root, rel_path`` (the file relative to the landing root or the import's
  folder: the file's identity), ``content_hash`` (SHA-256, files up to
  ``ingest.hash_max_mb``), ``state`` (``planned`` or ``failed``), ``reason``
  and ``detail`` (why it failed: ``unreadable``, ``vanished``, ``changed``).
- ``ingest_runs``: one row per batch and entity: ``run_id, batch, entity,
  started_at, finished_at, files, read, accepted, duplicates, quarantined,
  quarantined_by_reason, conflicting_duplicates, failed_files``. A batch is
  *committed* when its rows are here; a batch in ``ingest_files`` but not here is pending.
- ``users_quarantine``, ``products_quarantine``, ``events_quarantine``: rejected
  records, and one row per failed file (no line, the file's reason).
- ``ingest_lease``: who is ingesting into this lake (:mod:`inboxlift.stages.ingest_lease`).

Exactly once. A run first takes the lake's ingest lease (one ingest or import
at a time; another run stops at once with :class:`ConcurrentIngestError`). New
files are cut into batches (``ingest.files_per_batch``). For each batch, in this order:

1. *plan*: check the batch's files (size, modification time, hash; read once to
   count each file's records, which also finds the files Spark cannot read) and
   append them to ``ingest_files`` with the next batch number ``N``, the run id,
   the planning time, the current table versions and each file's state;
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
A redo re-checks each file first: one that vanished or changed since it was
planned is not read (its bytes are not the ones planned); it is marked
``failed`` in ``ingest_files`` and quarantined whole, and the rest of the batch goes on.

A file is new when its (kind, path relative to its root, size, modification
time) is not in ``ingest_files``: a landing folder moved or reached through
another path is not read again; a file rewritten in place is (its events then
count as duplicates). See docs/ingest.md.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import functools
import io
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from pyspark import StorageLevel
from pyspark.sql import DataFrame
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

from inboxlift.context import RunContext
from inboxlift.schemas import EVENT_TYPES, EVENTS_LANDING, PRODUCTS_LANDING, USERS_LANDING
from inboxlift.settings import ClickstreamImport, InvoiceLinesImport
from inboxlift.stages.ingest_lease import ConcurrentIngestError, IngestLease, LeaseLostError, owner_name
from inboxlift.stages.ingest_sources import (
    FileFailure,
    FileRecords,
    error_summary,
    from_micros,
    list_files,
    probe,
    read_csv_records,
    read_text_lines,
    relative_path,
    relative_to,
    root_uri,
    stat_files,
)
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
    QUARANTINE_TABLE,
    QUARANTINED,
    USERS_TABLE,
    Rules,
    classify_events,
    classify_upserts,
    parse_csv_records,
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

__all__ = ["ConcurrentIngestError", "EntityCounts", "FailedFile", "ImportMappingError", "IngestBatchError",
           "IngestInterrupted", "IngestReport", "LeaseLostError", "ReconciliationError", "purge_quarantine",
           "run_import", "run_ingest"]

FILES_TABLE = "ingest_files"
RUNS_TABLE = "ingest_runs"
LANDING_KINDS = ("users", "products", "events")
IMPORT_SHAPES = ("invoice_lines", "clickstream")
# Where a batch may be interrupted by fail_after_files (tests), in the order a batch reaches them.
STEPS = ("planned", "users_quarantine", "users", "products_quarantine", "products",
         "events_quarantine", "events", "logged")
PLANNED, FAILED = "planned", "failed"

_SUFFIXES = {
    "users": (".csv", ".csv.gz"),
    "products": (".csv", ".csv.gz"),
    "events": (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz"),
}
_KEYS = {"users": "user_id", "products": "item_id"}
_QUARANTINE_TABLES = {"users": "users_quarantine", "products": "products_quarantine"}
_SNAPSHOT_TABLES = ("events", "users", "products")

# New columns come last, so a table written before them gains them by schema evolution.
FILES_SCHEMA = StructType([
    StructField("batch", LongType()),
    StructField("kind", StringType()),
    StructField("path", StringType()),
    StructField("size", LongType()),
    StructField("modification_time", TimestampType()),
    StructField("run_id", StringType()),
    StructField("planned_at", TimestampType()),
    StructField("read_versions", MapType(StringType(), LongType())),
    StructField("root", StringType()),
    StructField("rel_path", StringType()),
    StructField("content_hash", StringType()),
    StructField("state", StringType()),
    StructField("reason", StringType()),
    StructField("detail", StringType()),
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
    StructField("failed_files", IntegerType()),
])


class IngestInterrupted(RuntimeError):
    """A crash injected by ``fail_after_files`` (tests of exactly-once)."""


class ReconciliationError(RuntimeError):
    """Records were lost or invented: read != accepted + duplicates + quarantined."""


class ImportMappingError(ValueError):
    """An export lacks columns its mapping in ``ingest.imports`` names."""


class IngestBatchError(RuntimeError):
    """Spark failed on a batch in a way no file check foresaw; the message names the batch's files."""


@dataclass(frozen=True)
class EntityCounts:
    """What one entity's records became; ``read == accepted + duplicates + quarantined``.

    ``failed_files`` are files of this entity that were not read at all (each has one quarantine
    row naming it; their records are in no count).
    """

    entity: str
    files: int = 0
    read: int = 0
    accepted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    conflicting_duplicates: int = 0
    failed_files: int = 0

    def __add__(self, other: "EntityCounts") -> "EntityCounts":
        reasons = dict(self.quarantined_by_reason)
        for reason, n in other.quarantined_by_reason.items():
            reasons[reason] = reasons.get(reason, 0) + n
        return EntityCounts(
            self.entity, self.files + other.files, self.read + other.read, self.accepted + other.accepted,
            self.duplicates + other.duplicates, self.quarantined + other.quarantined, dict(sorted(reasons.items())),
            self.conflicting_duplicates + other.conflicting_duplicates, self.failed_files + other.failed_files,
        )


@dataclass(frozen=True)
class FailedFile:
    batch: int
    kind: str
    path: str
    reason: str
    detail: str


@dataclass(frozen=True)
class IngestReport:
    """The batches a run committed (a redone pending batch included) and their counts per entity."""

    run_id: str
    batches: tuple[int, ...]
    recovered_batch: int | None
    entities: tuple[EntityCounts, ...]
    failed_files: tuple[FailedFile, ...] = ()
    # The holder of an expired lease this run took over (a run that died), if any.
    took_over_from: str | None = None

    def counts(self, entity: str) -> EntityCounts:
        for counts in self.entities:
            if counts.entity == entity:
                return counts
        return EntityCounts(entity)

    def summary(self) -> str:
        took_over = [f"took over the expired ingest lease of {self.took_over_from}"] if self.took_over_from else []
        if not self.batches:
            return "\n".join([f"ingest {self.run_id}: no new files", *took_over])
        recovered = f" (batch {self.recovered_batch} redone after an interrupted run)" if self.recovered_batch else ""
        lines = [f"ingest {self.run_id}: batches {', '.join(map(str, self.batches))}{recovered}", *took_over,
                 f"{'entity':<24}{'files':>7}{'read':>12}{'accepted':>12}{'duplicates':>12}{'quarantined':>13}"
                 f"{'failed files':>14}"]
        for c in self.entities:
            lines.append(f"{c.entity:<24}{c.files:>7}{c.read:>12}{c.accepted:>12}{c.duplicates:>12}"
                         f"{c.quarantined:>13}{c.failed_files:>14}")
        for c in self.entities:
            if c.quarantined_by_reason:
                reasons = ", ".join(f"{r}={n}" for r, n in sorted(c.quarantined_by_reason.items(), key=lambda x: -x[1]))
                lines.append(f"  {c.entity} quarantined by reason: {reasons}")
            if c.conflicting_duplicates:
                lines.append(f"  {c.entity}: {c.conflicting_duplicates} duplicates differ from the copy kept")
        for f in self.failed_files:
            lines.append(f"  failed file (batch {f.batch}, {f.kind}) {f.path}: {f.reason}: {f.detail}")
        return "\n".join(lines)


@dataclass(frozen=True)
class LandingFile:
    kind: str
    path: str
    size: int
    modification_time: dt.datetime
    root: str | None = None
    rel_path: str | None = None
    content_hash: str | None = None
    state: str = PLANNED
    reason: str | None = None
    detail: str | None = None
    # The path as ingest_files holds it (it differs from ``path`` when the landing folder moved).
    logged_path: str | None = None

    @property
    def is_readable(self) -> bool:
        return self.state == PLANNED

    def failed(self, failure: FileFailure) -> "LandingFile":
        return dataclasses.replace(self, state=FAILED, reason=failure.reason, detail=failure.detail)


@dataclass(frozen=True)
class BatchPlan:
    batch: int
    run_id: str
    planned_at: dt.datetime
    files: tuple[LandingFile, ...]
    read_versions: dict[str, int]

    def files_of(self, kind: str) -> list[str]:
        """The paths of the kind's files that are read (not failed), in order."""
        return sorted(f.path for f in self.files if f.kind == kind and f.is_readable)

    def failed_of(self, kind: str) -> list[LandingFile]:
        return sorted((f for f in self.files if f.kind == kind and not f.is_readable), key=lambda f: f.path)

    def count_of(self, kind: str) -> int:
        return sum(1 for f in self.files if f.kind == kind)


@dataclass
class _Failure:
    """Raises IngestInterrupted at ``step`` of the batch during which the run reaches ``after_files`` files.

    Every step also checks the lease: a run whose lease was taken over stops before its next write.
    """

    after_files: int | None
    step: str
    lease: IngestLease | None = None
    files_seen: int = 0

    def batch_started(self, files: int) -> None:
        self.files_seen += files

    def reached(self, step: str) -> None:
        if self.lease is not None:
            self.lease.check()
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

    Raises:
        ConcurrentIngestError: another ingest or import holds the lake's lease (nothing was done).
    """
    folder = (landing_dir or ctx.settings.paths.landing_dir).rstrip("/")
    root = root_uri(folder)
    listings = [list_files(ctx.spark, f"{folder}/{kind}", root=root, kind=kind, suffixes=_SUFFIXES[kind])
                for kind in LANDING_KINDS]
    return _run(ctx, listings, roots={kind: root for kind in LANDING_KINDS},
                fail_after_files=fail_after_files, fail_at=fail_at, echo=echo)


def run_import(ctx: RunContext, *, shape: str, path: str, fail_after_files: int | None = None,
               fail_at: str = "events", echo: Callable[[str], None] = print) -> IngestReport:
    """Import a retailer's export (a file or a folder of files) of a shape in ``ingest.imports``.

    Lines become events (entity ``<shape>``); the users and products they imply are merged into
    ``users`` and ``products`` (entities ``<shape>/users``, ``<shape>/products``). A file already
    imported is skipped.

    Raises:
        ImportMappingError: an export lacks a column the mapping names (nothing is written).
        ConcurrentIngestError: another ingest or import holds the lake's lease (nothing was done).
    """
    _mapping(ctx, shape)
    root = _import_root(path)
    listing = list_files(ctx.spark, path, root=root, kind=shape, suffixes=None)
    landing = root_uri(ctx.settings.paths.landing_dir)
    roots = {**{kind: landing for kind in LANDING_KINDS}, shape: root}
    return _run(ctx, [listing], roots=roots, fail_after_files=fail_after_files, fail_at=fail_at, echo=echo)


def _import_root(path: str) -> str:
    """The folder an export's files are keyed relative to: the path itself, or a file's folder."""
    uri = root_uri(path)
    parsed = urlparse(path)
    local = parsed.scheme in ("", "file") and not path.startswith("dbfs:")
    if local and Path(parsed.path if parsed.scheme else path).is_file():
        return uri.rsplit("/", 1)[0]
    return uri


def _run(ctx: RunContext, listings: list[DataFrame | None], *, roots: dict[str, str], fail_after_files: int | None,
         fail_at: str, echo: Callable[[str], None]) -> IngestReport:
    if fail_at not in STEPS:
        raise ValueError(f"fail_at must be one of {STEPS}, got {fail_at!r}")
    run_id = f"ingest-{ctx.clock.now():%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    # Before anything is read: a second ingest must not even look at a batch the first is working on.
    lease = IngestLease.acquire(ctx, owner=owner_name(run_id))
    try:
        lease.start_heartbeat()
        failure = _Failure(fail_after_files, fail_at, lease=lease)
        results: list[tuple[BatchPlan, list[EntityCounts]]] = []
        recovered = None
        for plan, records in _pending_plans(ctx, roots):
            failure.batch_started(len(plan.files))
            results.append((plan, _process(ctx, plan, records, failure)))
            recovered = plan.batch
        new_files = _new_files(ctx, [listing for listing in listings if listing is not None], roots)
        exports = [f for f in new_files if f.kind in IMPORT_SHAPES]
        checked_exports: dict[str, tuple[LandingFile, FileRecords | None]] = {}
        if exports:
            # Every export's header is checked before anything is planned or written.
            checked_exports = _check_files(ctx, exports, redo=False)
            _check_export_headers(ctx, checked_exports)
        per_batch = max(1, ctx.settings.ingest.files_per_batch)
        for start in range(0, len(new_files), per_batch):
            chunk = new_files[start:start + per_batch]
            lease.check()
            # The export check read every export together; a batch holding fewer must be read (and
            # its records numbered) on its own.
            reuse = bool(checked_exports) and {f.path for f in chunk} == set(checked_exports)
            checked = checked_exports if reuse else _check_files(ctx, chunk, redo=False)
            plan = _plan(ctx, [checked[f.path][0] for f in chunk], run_id)
            records = {path: r for path, (_, r) in checked.items() if r is not None}
            failure.batch_started(len(chunk))
            failure.reached("planned")
            results.append((plan, _process(ctx, plan, records, failure)))
    finally:
        lease.release()
    report = _report(run_id, results, recovered, lease)
    echo(report.summary())
    return report


def _report(run_id: str, results: list[tuple[BatchPlan, list[EntityCounts]]], recovered: int | None,
            lease: IngestLease) -> IngestReport:
    totals: dict[str, EntityCounts] = {}
    for _, counts in results:
        for c in counts:
            totals[c.entity] = totals[c.entity] + c if c.entity in totals else c
    failed = tuple(FailedFile(plan.batch, f.kind, f.path, f.reason or "", f.detail or "")
                   for plan, _ in results for f in plan.files if not f.is_readable)
    took_over = lease.taken_over.describe() if lease.taken_over is not None else None
    return IngestReport(run_id, tuple(plan.batch for plan, _ in results), recovered, tuple(totals.values()), failed,
                        took_over)


# ---- files and plans --------------------------------------------------------------------------

def _new_files(ctx: RunContext, listings: list[DataFrame], roots: dict[str, str]) -> list[LandingFile]:
    """Listed files whose (kind, relative path, size, modification time) is not in the file log, in batch order."""
    if not listings:
        return []
    listed = functools.reduce(DataFrame.unionByName, listings).withColumn(
        "key", F.coalesce(F.col("rel_path"), F.col("path")))
    if ctx.lake.exists(FILES_TABLE):
        logged = ctx.lake.read(FILES_TABLE)
        # Rows written before rel_path existed hold absolute paths: compared relative to the
        # current root when they are under it.
        derived = F.coalesce(*[F.when(F.col("kind") == kind, relative_path(F.col("path"), root))
                               for kind, root in roots.items()], F.col("path"))
        stored = F.coalesce(F.col("rel_path"), derived) if "rel_path" in logged.columns else derived
        known = logged.select("kind", stored.alias("key"), "size", "modification_time")
        listed = listed.join(known, on=["kind", "key", "size", "modification_time"], how="left_anti")
    # File metadata (one row per new file), not data.
    rows = listed.select("kind", "path", "rel_path", "size",
                         F.unix_micros("modification_time").alias("mtime_us")).collect()
    order = {kind: i for i, kind in enumerate((*LANDING_KINDS, *IMPORT_SHAPES))}
    files = [LandingFile(r.kind, r.path, int(r.size), from_micros(r.mtime_us), roots.get(r.kind), r.rel_path)
             for r in rows]
    return sorted(files, key=lambda f: (order[f.kind], f.path))


def _check_files(ctx: RunContext, files: list[LandingFile], *,
                 redo: bool) -> dict[str, tuple[LandingFile, FileRecords | None]]:
    """Each file checked (stat, hash, one read): the file with its state, and its records when readable.

    A new file takes its size, time and hash from now; a redone file must still have the ones it
    was planned with (else ``changed``), and must still exist (else ``vanished``).
    """
    hash_max = ctx.settings.ingest.hash_max_mb * 1024 * 1024
    stats = stat_files(ctx.spark, [f.path for f in files], hash_max_bytes=hash_max)
    checked: dict[str, LandingFile] = {}
    for f in files:
        now = stats.get(f.path)
        if now is None:
            checked[f.path] = f.failed(FileFailure("vanished", "the file no longer exists"))
        elif not redo:
            checked[f.path] = dataclasses.replace(f, size=now.size, modification_time=now.modification_time,
                                                  content_hash=now.content_hash)
        elif (now.size, now.modification_time) != (f.size, f.modification_time) or (
                f.content_hash is not None and now.content_hash is not None and now.content_hash != f.content_hash):
            checked[f.path] = f.failed(FileFailure("changed", (
                f"planned with {f.size} bytes, modified {f.modification_time:%Y-%m-%d %H:%M:%S}, "
                f"sha256 {f.content_hash or '-'}; now {now.size} bytes, modified "
                f"{now.modification_time:%Y-%m-%d %H:%M:%S}, sha256 {now.content_hash or '-'}")))
        else:
            checked[f.path] = f
    records: dict[str, FileRecords] = {}
    for kind in sorted({f.kind for f in files}):
        paths = sorted(p for p, f in checked.items() if f.kind == kind and f.is_readable)
        found, failures = probe(ctx.spark, paths, _reader(ctx, kind), with_first=kind != "events")
        records.update(found)
        for path, failure in failures.items():
            checked[path] = checked[path].failed(failure)
    return {p: (f, records.get(p)) for p, f in checked.items()}


def _reader(ctx: RunContext, kind: str) -> Callable[[list[str]], DataFrame]:
    if kind == "events":
        return functools.partial(read_text_lines, ctx.spark)
    delimiter = _mapping(ctx, kind).delimiter if kind in IMPORT_SHAPES else ","
    return functools.partial(read_csv_records, ctx.spark, delimiter=delimiter)


def _plan(ctx: RunContext, files: list[LandingFile], run_id: str) -> BatchPlan:
    lake = ctx.lake
    last = lake.read(FILES_TABLE).agg(F.max("batch")).first()[0] if lake.exists(FILES_TABLE) else None
    batch = (last or 0) + 1
    versions = {t: lake.version(t) if lake.exists(t) else -1 for t in _SNAPSHOT_TABLES}
    plan = BatchPlan(batch, run_id, ctx.clock.now(), tuple(files), versions)
    rows = [(batch, f.kind, f.path, f.size, f.modification_time, run_id, plan.planned_at, versions, f.root, f.rel_path,
             f.content_hash, f.state, f.reason, f.detail) for f in files]
    result = lake.append(FILES_TABLE, ctx.spark.createDataFrame(rows, FILES_SCHEMA),
                         write_id=WriteId("ingest:plan", batch), merge_schema=True)
    if result.skipped:
        raise ConcurrentIngestError(f"batch {batch} was planned by another ingest run meanwhile; run ingest again")
    return plan


def _pending_plans(ctx: RunContext, roots: dict[str, str]) -> list[tuple[BatchPlan, dict[str, FileRecords]]]:
    """Batches planned in ``ingest_files`` whose counts never reached ``ingest_runs``, re-checked."""
    lake = ctx.lake
    if not lake.exists(FILES_TABLE):
        return []
    planned = lake.read(FILES_TABLE)
    if lake.exists(RUNS_TABLE):
        planned = planned.join(lake.read(RUNS_TABLE).select("batch").distinct(), on="batch", how="left_anti")
    optional = [F.col(c) if c in planned.columns else F.lit(None).cast(FILES_SCHEMA[c].dataType).alias(c)
                for c in ("root", "rel_path", "content_hash", "state", "reason", "detail")]
    # The files of the (at most one) interrupted batch: metadata, bounded by files_per_batch.
    rows = planned.select(
        "batch", "kind", "path", "size", F.unix_micros("modification_time").alias("mtime_us"), "run_id",
        F.unix_micros("planned_at").alias("planned_us"), "read_versions", *optional,
    ).collect()
    plans = []
    for batch in sorted({r.batch for r in rows}):
        mine = [r for r in rows if r.batch == batch]
        files = [_logged_file(r, roots) for r in mine]
        first = mine[0]
        plan = BatchPlan(int(batch), first.run_id, from_micros(first.planned_us), (),
                         {k: int(v) for k, v in first.read_versions.items()})
        checked = _check_files(ctx, [f for f in files if f.is_readable], redo=True)
        files = [checked[f.path][0] if f.path in checked else f for f in files]
        plan = dataclasses.replace(plan, files=tuple(sorted(files, key=lambda f: f.path)))
        newly_failed = [f for f in files if not f.is_readable and f.path in checked]
        if newly_failed:
            _record_failures(ctx, plan, newly_failed)
        plans.append((plan, {p: r for p, (_, r) in checked.items() if r is not None}))
    return plans


def _logged_file(row, roots: dict[str, str]) -> LandingFile:
    """A file of a pending batch, found where its root is now (a moved landing folder included)."""
    root_now = roots.get(row.kind)
    rel = row.rel_path or (relative_to(row.path, row.root) if row.root else None) \
        or (relative_to(row.path, root_now) if root_now else None)
    path = f"{root_now}/{rel}" if root_now and rel else row.path
    return LandingFile(row.kind, path, int(row.size), from_micros(row.mtime_us), row.root or root_now, rel,
                       row.content_hash, row.state or PLANNED, row.reason, row.detail, logged_path=row.path)


def _record_failures(ctx: RunContext, plan: BatchPlan, failed: list[LandingFile]) -> None:
    """Mark files of a pending batch ``failed`` in ``ingest_files`` (idempotent: the same values again)."""
    lake = ctx.lake
    if "state" not in lake.read(FILES_TABLE).columns:
        # A batch planned before these columns existed: add them first (an empty, schema-evolving append).
        lake.append(FILES_TABLE, ctx.spark.createDataFrame([], FILES_SCHEMA), merge_schema=True)
    updates = ctx.spark.createDataFrame(
        [(plan.batch, f.logged_path or f.path, f.state, f.reason, f.detail) for f in failed],
        "batch bigint, path string, state string, reason string, detail string")
    current = lake.read(FILES_TABLE).join(updates.select("batch", "path"), on=["batch", "path"], how="left_semi")
    source = current.drop("state", "reason", "detail").join(updates, on=["batch", "path"], how="inner")
    lake.merge(FILES_TABLE, source.select(*lake.read(FILES_TABLE).columns), keys=["batch", "path"])


# ---- one batch --------------------------------------------------------------------------------

def _process(ctx: RunContext, plan: BatchPlan, records: dict[str, FileRecords], failure: _Failure) -> list[EntityCounts]:
    rules = Rules.from_settings(ctx.settings.ingest, now=plan.planned_at)
    cached: list[DataFrame] = []
    try:
        kinds = {f.kind for f in plan.files}
        shapes = sorted(kinds & set(IMPORT_SHAPES))
        if shapes:
            counts = []
            for shape in shapes:
                counts += _ingest_export(ctx, plan, records, shape=shape, rules=rules, failure=failure, cached=cached)
        else:
            counts = _ingest_landing(ctx, plan, records, kinds=kinds, rules=rules, failure=failure, cached=cached)
        _log_batch(ctx, plan, counts)
        failure.reached("logged")
        return counts
    except (IngestInterrupted, ConcurrentIngestError, ReconciliationError, ImportMappingError):
        raise
    except Exception as exc:  # noqa: BLE001 - any other failure becomes one message naming the files
        paths = [f.path for f in plan.files]
        shown = ", ".join(paths[:10]) + (f" and {len(paths) - 10} more" if len(paths) > 10 else "")
        raise IngestBatchError(
            f"ingest batch {plan.batch} failed: {error_summary(exc)}. Its files: {shown}. The batch stays "
            f"pending; the next run redoes it (a file that changed or vanished meanwhile is then refused)."
        ) from exc
    finally:
        for frame in cached:
            frame.unpersist()


def _read_count(plan: BatchPlan, records: dict[str, FileRecords], kind: str, *, has_header: bool) -> int:
    """Records of the kind's readable files, as the plan-time read counted them (headers excluded)."""
    found = [records[p] for p in plan.files_of(kind)]
    return sum(r.records - (1 if has_header and r.records else 0) for r in found)


def _headers(ctx: RunContext, plan: BatchPlan, records: dict[str, FileRecords], kind: str,
             delimiter: str) -> tuple[DataFrame, list[int]]:
    """Each readable file's header record (its first): ``source_file, header_pos, header_line, header_fields``."""
    rows = [(p, records[p].first_pos, records[p].first_line, _header_names(records[p].first_line, delimiter))
            for p in plan.files_of(kind) if records[p].records]
    schema = "source_file string, header_pos bigint, header_line string, header_fields array<string>"
    return ctx.spark.createDataFrame(rows, schema), sorted({len(r[3]) for r in rows})


def _header_names(header_line: str | None, delimiter: str) -> list[str]:
    text = (header_line or "").lstrip("\ufeff")
    fields = next(csv.reader(io.StringIO(text), delimiter=delimiter), [])
    return [name.strip().lstrip("\ufeff").lower() for name in fields]


def _csv_records(ctx: RunContext, plan: BatchPlan, records: dict[str, FileRecords], kind: str, *,
                 columns: dict[str, str], delimiter: str) -> DataFrame:
    headers, widths = _headers(ctx, plan, records, kind, delimiter)
    lines = read_csv_records(ctx.spark, plan.files_of(kind), delimiter=delimiter)
    return lines.transform(parse_csv_records, headers=headers, columns=columns, widths=widths, delimiter=delimiter)


def _ingest_landing(ctx: RunContext, plan: BatchPlan, records: dict[str, FileRecords], *, kinds: set[str],
                    rules: Rules, failure: _Failure, cached: list[DataFrame]) -> list[EntityCounts]:
    counts: list[EntityCounts] = []
    batch_ids: dict[str, DataFrame | None] = {"users": None, "products": None}
    for kind, landing, validate in (("users", USERS_LANDING, validate_users),
                                    ("products", PRODUCTS_LANDING, validate_products)):
        if kind not in kinds:
            continue
        parsed = _csv_records(ctx, plan, records, kind, columns={n: n for n in landing.fieldNames()}, delimiter=",")
        classified = _cache(parsed.transform(validate, rules=rules).transform(classify_upserts, key=_KEYS[kind]),
                            cached)
        entity_counts = _count(classified, _read_count(plan, records, kind, has_header=True), entity=kind,
                               files=plan.count_of(kind), failed_files=len(plan.failed_of(kind)))
        counts.append(entity_counts)
        batch_ids[kind] = _upsert(ctx, plan, classified, kind=kind, entity=kind, counts=entity_counts,
                                  failed=plan.failed_of(kind), failure=failure)
    if "events" in kinds:
        lines = read_text_lines(ctx.spark, plan.files_of("events"))
        validated = lines.transform(parse_json_lines, fields=EVENTS_LANDING).transform(
            validate_events, rules=rules, event_types=EVENT_TYPES)
        counts.append(_append_events(ctx, plan, validated, entity="events",
                                     read=_read_count(plan, records, "events", has_header=False),
                                     files=plan.count_of("events"), failed=plan.failed_of("events"),
                                     batch_ids=batch_ids, failure=failure, cached=cached))
    return counts


def _ingest_export(ctx: RunContext, plan: BatchPlan, records: dict[str, FileRecords], *, shape: str, rules: Rules,
                   failure: _Failure, cached: list[DataFrame]) -> list[EntityCounts]:
    mapping = _mapping(ctx, shape)
    is_invoice = isinstance(mapping, InvoiceLinesImport)
    parsed = _csv_records(ctx, plan, records, shape, columns=export_columns(mapping), delimiter=mapping.delimiter)
    mapped = (parsed.transform(map_invoice_lines, mapping=mapping) if is_invoice
              else parsed.transform(map_clickstream, mapping=mapping))
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
        entity_counts = _count(classified, None, entity=entity, files=0, failed_files=0)
        counts.append(entity_counts)
        batch_ids[kind] = _upsert(ctx, plan, classified, kind=kind, entity=entity, counts=entity_counts, failed=[],
                                  failure=failure)
    events = validated.drop(*carry)
    counts.insert(0, _append_events(ctx, plan, events, entity=shape,
                                    read=_read_count(plan, records, shape, has_header=True),
                                    files=plan.count_of(shape), failed=plan.failed_of(shape),
                                    batch_ids=batch_ids, failure=failure, cached=cached))
    return counts


def _upsert(ctx: RunContext, plan: BatchPlan, classified: DataFrame, *, kind: str, entity: str,
            counts: EntityCounts, failed: list[LandingFile], failure: _Failure) -> DataFrame:
    """Quarantine the rejects (and failed files), merge the accepted records; return the batch's ids of this kind."""
    lake, key = ctx.lake, _KEYS[kind]
    _quarantine(ctx, plan, classified, table=_QUARANTINE_TABLES[kind], entity=entity, id_column=key, counts=counts,
                failed=failed)
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


def _append_events(ctx: RunContext, plan: BatchPlan, validated: DataFrame, *, entity: str, read: int, files: int,
                   failed: list[LandingFile], batch_ids: dict[str, DataFrame | None], failure: _Failure,
                   cached: list[DataFrame]) -> EntityCounts:
    """Reference checks against the tables as planned plus this batch; dedupe; quarantine; append."""
    known_users = _known(ctx, plan, "users", "user_id", batch_ids.get("users"))
    known_items = _known(ctx, plan, "products", "item_id", batch_ids.get("products"))
    existing = _snapshot(ctx, plan, "events", "event_id")
    classified = _cache(
        validated.transform(with_reference_checks, known_users=known_users, known_items=known_items)
        .transform(classify_events, existing_ids=existing),
        cached,
    )
    counts = _count(classified, read, entity=entity, files=files, failed_files=len(failed))
    _quarantine(ctx, plan, classified, table="events_quarantine", entity=entity, id_column="event_id", counts=counts,
                failed=failed)
    failure.reached("events_quarantine")
    if counts.accepted:
        rows = classified.where(F.col("outcome") == ACCEPTED).transform(to_events_table, ingested_at=plan.planned_at)
        # Every task would otherwise write one small file per date it holds (tasks x dates files).
        # REBALANCE by date gathers each date's rows (adaptive execution still splits a skewed day
        # and coalesces small ones), so a batch writes about one file per date.
        rows = rows.hint("rebalance", "event_date")
        ctx.lake.append("events", rows, partition_by=["event_date"], write_id=WriteId("ingest:events", plan.batch))
    failure.reached("events")
    return counts


def _quarantine(ctx: RunContext, plan: BatchPlan, classified: DataFrame, *, table: str, entity: str,
                id_column: str, counts: EntityCounts, failed: list[LandingFile]) -> None:
    """Rejected records, and one row per failed file (no line; the file's reason), in one write."""
    if not counts.quarantined and not failed:
        return
    file_rows = ctx.spark.createDataFrame(
        [(entity, f.path, None, None, [f.reason], f.reason, plan.batch, plan.run_id, plan.planned_at) for f in failed],
        QUARANTINE_TABLE)
    rows = file_rows
    if counts.quarantined:
        rows = classified.where(F.col("outcome") == QUARANTINED).transform(
            to_quarantine, entity=entity, id_column=id_column, batch=plan.batch, run_id=plan.run_id,
            quarantined_at=plan.planned_at).unionByName(file_rows)
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
             c.duplicates, c.quarantined, c.quarantined_by_reason, c.conflicting_duplicates, c.failed_files)
            for c in counts]
    ctx.lake.append(RUNS_TABLE, ctx.spark.createDataFrame(rows, RUNS_SCHEMA),
                    write_id=WriteId("ingest:ingest_runs", plan.batch), merge_schema=True)


def _count(classified: DataFrame, read: int | None, *, entity: str, files: int, failed_files: int) -> EntityCounts:
    """Counts per outcome; ``read`` is the independent count of records taken when the files were checked."""
    # A handful of rows: outcome x first reason.
    rows = summarise_outcomes(classified).collect()
    by = {outcome: sum(r.records for r in rows if r.outcome == outcome) for outcome in (ACCEPTED, DUPLICATE, QUARANTINED)}
    reasons = {r.reason: int(r.records) for r in rows if r.outcome == QUARANTINED}
    total = sum(by.values())
    read = total if read is None else read
    if read != total or sum(reasons.values()) != by[QUARANTINED]:
        raise ReconciliationError(
            f"{entity}: read {read} records but accepted {by[ACCEPTED]} + duplicates {by[DUPLICATE]} "
            f"+ quarantined {by[QUARANTINED]} = {total} (by reason: {reasons})"
        )
    return EntityCounts(entity, files, read, by[ACCEPTED], by[DUPLICATE], by[QUARANTINED], dict(sorted(reasons.items())),
                        sum(int(r.conflicting) for r in rows), failed_files)


def _cache(frame: DataFrame, cached: list[DataFrame]) -> DataFrame:
    # Counted, then written to two or three tables: computed once, not once per action.
    frame = frame.persist(StorageLevel.MEMORY_AND_DISK)
    cached.append(frame)
    return frame


# ---- exports ----------------------------------------------------------------------------------

def _mapping(ctx: RunContext, shape: str) -> InvoiceLinesImport | ClickstreamImport:
    if shape not in IMPORT_SHAPES:
        raise ValueError(f"unknown export shape {shape!r}; the shapes are {', '.join(IMPORT_SHAPES)}")
    return getattr(ctx.settings.ingest.imports, shape)


def _check_export_headers(ctx: RunContext, checked: dict[str, tuple[LandingFile, FileRecords | None]]) -> None:
    """Refuse an export whose header lacks a mapped column, before anything is planned or written."""
    for path, (landing, records) in sorted(checked.items()):
        if records is None or not records.records:
            continue
        mapping = _mapping(ctx, landing.kind)
        names = _header_names(records.first_line, mapping.delimiter)
        wanted = export_columns(mapping)
        missing = [f"{ours} -> {theirs!r}" for ours, theirs in wanted.items() if theirs.strip().lower() not in names]
        if missing:
            raise ImportMappingError(
                f"{path}: the header lacks mapped columns {missing}; it has {names}. "
                f"Set the column names under ingest.imports in the settings."
            )


# ---- retention --------------------------------------------------------------------------------

def purge_quarantine(ctx: RunContext) -> list[str]:
    """Delete quarantine rows older than ``ingest.quarantine_retention_days`` (their raw lines hold addresses).

    Every ``*_quarantine`` table with a ``quarantined_at`` column is purged; the deleted rows'
    files leave the disk when ``maintain`` vacuums the table afterwards.
    """
    days = ctx.settings.ingest.quarantine_retention_days
    cutoff = ctx.clock.now() - dt.timedelta(days=days)
    # With its offset, the literal is one instant whatever the session time zone.
    predicate = f"quarantined_at < TIMESTAMP '{cutoff.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S.%f}+00:00'"
    lines = []
    for name in ctx.lake.table_names():
        if not name.endswith("_quarantine"):
            continue
        table = ctx.lake.read(name)
        if "quarantined_at" not in table.columns:
            continue
        # Counting what goes: a number for the log line, not data.
        old = table.where(predicate).count()
        if old:
            ctx.lake.overwrite(name, ctx.spark.createDataFrame([], table.schema), where=predicate)
        lines.append(f"{name}: {old} rows quarantined before {cutoff:%Y-%m-%d} deleted "
                     f"(ingest.quarantine_retention_days = {days})")
    return lines

