"""Ingest's file log: which files are new, their checks, the plan of a batch, pending batches.

``ingest_files`` holds one row per file and batch (see :mod:`inboxlift.stages.ingest`). A file is
known by its kind, its path relative to its root, its size and its modification time. Before a
batch is planned its files are checked (:func:`check_files`): stat and hash, then one read that
counts each file's records and finds the ones Spark cannot read. A pending batch is re-checked
before it is redone: a file that vanished or changed is marked ``failed`` and not read.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
from dataclasses import dataclass
from typing import Callable

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, MapType, StringType, StructField, StructType, TimestampType

from inboxlift.context import RunContext
from inboxlift.settings import CatalogueImport, ClickstreamImport, CustomersImport, InvoiceLinesImport
from inboxlift.stages.ingest_lease import ConcurrentIngestError
from inboxlift.stages.ingest_sources import (
    FileFailure,
    FileRecords,
    from_micros,
    probe,
    read_csv_records,
    read_text_lines,
    relative_path,
    relative_to,
    stat_files,
)
from inboxlift.storage import WriteId

FILES_TABLE = "ingest_files"
RUNS_TABLE = "ingest_runs"
LANDING_KINDS = ("users", "products", "events")
IMPORT_SHAPES = ("invoice_lines", "clickstream", "customers", "catalogue")
PLANNED, FAILED = "planned", "failed"
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


def new_files(ctx: RunContext, listings: list[DataFrame], roots: dict[str, str]) -> list[LandingFile]:
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


def check_files(ctx: RunContext, files: list[LandingFile], *,
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
    delimiter = mapping_of(ctx, kind).delimiter if kind in IMPORT_SHAPES else ","
    return functools.partial(read_csv_records, ctx.spark, delimiter=delimiter)


def plan_batch(ctx: RunContext, files: list[LandingFile], run_id: str) -> BatchPlan:
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


def pending_plans(ctx: RunContext, roots: dict[str, str]) -> list[tuple[BatchPlan, dict[str, FileRecords]]]:
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
        checked = check_files(ctx, [f for f in files if f.is_readable], redo=True)
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


def mapping_of(ctx: RunContext, shape: str) -> InvoiceLinesImport | ClickstreamImport | CustomersImport | CatalogueImport:
    if shape not in IMPORT_SHAPES:
        raise ValueError(f"unknown export shape {shape!r}; the shapes are {', '.join(IMPORT_SHAPES)}")
    return getattr(ctx.settings.ingest.imports, shape)
