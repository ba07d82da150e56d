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
- ``suppressions`` (:mod:`inboxlift.consent`): merged from the batch's accepted ``unsubscribe``,
  ``resubscribe``, ``preference_change``, ``bounce`` and ``complaint`` events after the events append
  (``WriteId("ingest:suppressions", N)``); the first batch that writes it also takes the opt-outs
  already in ``events`` (a lake from before the table existed), for every campaign.

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
count as duplicates). The file log and batch plans live in :mod:`inboxlift.stages.ingest_plan`,
file listing, checks and readers in :mod:`inboxlift.stages.ingest_sources`, the lease in
:mod:`inboxlift.stages.ingest_lease`. See docs/ingest.md.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import IntegerType, LongType, MapType, StringType, StructField, StructType, TimestampType

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
from inboxlift.session import materialize
from inboxlift.settings import InvoiceLinesImport
from inboxlift.stages.ingest_lease import ConcurrentIngestError, IngestLease, LeaseLostError, owner_name
from inboxlift.stages.ingest_plan import (
    FILES_SCHEMA,
    FILES_TABLE,
    IMPORT_SHAPES,
    LANDING_KINDS,
    RUNS_TABLE,
    BatchPlan,
    LandingFile,
    check_files,
    mapping_of,
    new_files,
    pending_plans,
    plan_batch,
)
from inboxlift.stages.ingest_sources import (
    LANDING_SUFFIXES,
    FileRecords,
    error_summary,
    list_files,
    read_csv_records,
    read_text_lines,
    root_uri,
)
from inboxlift.storage import WriteId
from inboxlift.stages.ingest_formats import ImportFormatError, check_export_formats, header_names
from inboxlift.transforms.imports import (
    ALIASES_TABLE,
    IMPORT_EVENT_TYPES,
    derive_products,
    derive_users,
    export_columns,
    item_aliases,
    map_catalogue,
    map_clickstream,
    map_customers,
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

__all__ = ["FILES_SCHEMA", "FILES_TABLE", "RUNS_TABLE", "ConcurrentIngestError", "EntityCounts", "FailedFile",
           "ImportFormatError", "ImportMappingError", "IngestBatchError",
           "IngestInterrupted", "IngestReport", "LeaseLostError", "ReconciliationError", "purge_quarantine",
           "run_import", "run_ingest"]

# Where a batch may be interrupted by fail_after_files (tests), in the order a batch reaches them.
STEPS = ("planned", "users_quarantine", "users", "products_quarantine", "products",
         "events_quarantine", "events", "suppressions", "item_aliases", "logged")

_KEYS = {"users": "user_id", "products": "item_id"}
_QUARANTINE_TABLES = {"users": "users_quarantine", "products": "products_quarantine"}

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
    # What an import assumed for what its files did not say (stated in the summary).
    defaults: tuple[str, ...] = ()

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
        lines += [f"  default: {d}" for d in self.defaults]
        return "\n".join(lines)


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
    listings = [list_files(ctx.spark, f"{folder}/{kind}", root=root, kind=kind, suffixes=LANDING_SUFFIXES[kind])
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
    mapping_of(ctx, shape)
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
        for plan, records in pending_plans(ctx, roots):
            failure.batch_started(len(plan.files))
            results.append((plan, _process(ctx, plan, records, failure)))
            recovered = plan.batch
        fresh = new_files(ctx, [listing for listing in listings if listing is not None], roots)
        exports = [f for f in fresh if f.kind in IMPORT_SHAPES]
        checked_exports: dict[str, tuple[LandingFile, FileRecords | None]] = {}
        if exports:
            # Every export's header is checked before anything is planned or written.
            checked_exports = check_files(ctx, exports, redo=False)
            _check_export_headers(ctx, checked_exports)
            # A wrong timestamp or number format is one error naming a bad value, not every line quarantined.
            check_export_formats(ctx, checked_exports)
        per_batch = max(1, ctx.settings.ingest.files_per_batch)
        for start in range(0, len(fresh), per_batch):
            chunk = fresh[start:start + per_batch]
            lease.check()
            # The export check read every export together; a batch holding fewer must be read (and
            # its records numbered) on its own.
            reuse = bool(checked_exports) and {f.path for f in chunk} == set(checked_exports)
            checked = checked_exports if reuse else check_files(ctx, chunk, redo=False)
            plan = plan_batch(ctx, [checked[f.path][0] for f in chunk], run_id)
            records = {path: r for path, (_, r) in checked.items() if r is not None}
            failure.batch_started(len(chunk))
            failure.reached("planned")
            results.append((plan, _process(ctx, plan, records, failure)))
    finally:
        lease.release()
    report = dataclasses.replace(_report(run_id, results, recovered, lease),
                                 defaults=import_defaults(ctx, {f.kind for plan, _ in results for f in plan.files}))
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
    except (IngestInterrupted, ConcurrentIngestError, ReconciliationError, ImportMappingError, ImportFormatError):
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
    rows = [(p, records[p].first_pos, records[p].first_line, header_names(records[p].first_line, delimiter))
            for p in plan.files_of(kind) if records[p].records]
    schema = "source_file string, header_pos bigint, header_line string, header_fields array<string>"
    return ctx.spark.createDataFrame(rows, schema), sorted({len(r[3]) for r in rows})


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
        # campaign_type rides along (not an events column) to scope the batch's suppressions.
        validated = lines.transform(parse_json_lines, fields=EVENTS_LANDING).transform(
            validate_events, rules=rules, event_types=EVENT_TYPES, carry=("campaign_type",))
        counts.append(_append_events(ctx, plan, validated, entity="events",
                                     read=_read_count(plan, records, "events", has_header=False),
                                     files=plan.count_of("events"), failed=plan.failed_of("events"),
                                     batch_ids=batch_ids, failure=failure, cached=cached))
    return counts


def _ingest_entity_export(ctx: RunContext, plan: BatchPlan, records: dict[str, FileRecords], *, shape: str,
                          rules: Rules, failure: _Failure, cached: list[DataFrame]) -> list[EntityCounts]:
    """A customers or catalogue export: its rows validated as users or products, merged like landing files."""
    mapping = mapping_of(ctx, shape)
    kind = "users" if shape == "customers" else "products"
    parsed = _csv_records(ctx, plan, records, shape, columns=export_columns(mapping), delimiter=mapping.delimiter)
    if kind == "users":
        mapped, validate = parsed.transform(map_customers, mapping=mapping), validate_users
    else:
        mapped = parsed.transform(map_catalogue, mapping=mapping, item_case=ctx.settings.ingest.imports.item_id_case)
        mapped, validate = _cache(mapped, cached), validate_products
    validated = mapped.transform(validate, rules=rules, timestamp_format=mapping.timestamp_format,
                                 timezone=mapping.timezone_of_times, default_updated_at=plan.planned_at)
    classified = _cache(validated.transform(classify_upserts, key=_KEYS[kind]), cached)
    counts = _count(classified, _read_count(plan, records, shape, has_header=True), entity=shape,
                    files=plan.count_of(shape), failed_files=len(plan.failed_of(shape)))
    accepted_ids = _upsert(ctx, plan, classified, kind=kind, entity=shape, counts=counts,
                           failed=plan.failed_of(shape), failure=failure)
    if kind == "products":
        aliases = mapped.join(accepted_ids.distinct(), on="item_id", how="left_semi").withColumn(
            "reasons", F.array().cast("array<string>"))
        _merge_aliases(ctx, plan, aliases, shape=shape)
    return [counts]


def _merge_aliases(ctx: RunContext, plan: BatchPlan, records: DataFrame, *, shape: str) -> None:
    """Keep each stock code as written that normalisation changed (``item_aliases``), once per batch."""
    rows = item_aliases(records, shape=shape, seen_at=F.lit(plan.planned_at))
    if rows.isEmpty():
        return
    ctx.lake.merge(ALIASES_TABLE, rows, keys=["alias"], update_condition="s.item_id <> t.item_id",
                   write_id=WriteId(f"ingest:{ALIASES_TABLE}", plan.batch))


def _ingest_export(ctx: RunContext, plan: BatchPlan, records: dict[str, FileRecords], *, shape: str, rules: Rules,
                   failure: _Failure, cached: list[DataFrame]) -> list[EntityCounts]:
    if shape in ("customers", "catalogue"):
        return _ingest_entity_export(ctx, plan, records, shape=shape, rules=rules, failure=failure, cached=cached)
    mapping = mapping_of(ctx, shape)
    is_invoice = isinstance(mapping, InvoiceLinesImport)
    item_case = ctx.settings.ingest.imports.item_id_case
    parsed = _csv_records(ctx, plan, records, shape, columns=export_columns(mapping), delimiter=mapping.delimiter)
    mapped = (parsed.transform(map_invoice_lines, mapping=mapping, item_case=item_case) if is_invoice
              else parsed.transform(map_clickstream, mapping=mapping))
    carry = ("country", "description", "item_alias") if is_invoice else ()
    validated = _cache(mapped.transform(
        validate_events, rules=rules, event_types=(*EVENT_TYPES, *IMPORT_EVENT_TYPES),
        timestamp_format=mapping.timestamp_format, timezone=mapping.timezone, allow_anonymous=is_invoice,
        excluded_item_ids=tuple(str(normalise_code(c, item_case)) for c in mapping.non_product_codes) if is_invoice
        else (), carry=carry,
    ), cached)

    counts: list[EntityCounts] = []
    batch_ids: dict[str, DataFrame | None] = {}
    derived = {
        "users": derive_users(validated, with_country=is_invoice),
        "products": derive_products(validated, with_details=is_invoice,
                                    price_window_days=ctx.settings.ingest.imports.price_window_days),
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
    if is_invoice:
        _merge_aliases(ctx, plan, validated, shape=shape)
    failure.reached("item_aliases")
    return counts


def normalise_code(code: str, case: str) -> str:
    """A configured stock code (non_product_codes) as stored: the rule :func:`normalise_item_id` applies."""
    return code.upper() if case == "upper" else code


def import_defaults(ctx: RunContext, kinds: set[str]) -> tuple[str, ...]:
    """The summary's lines on what the shop's files did not say and what is assumed instead."""
    shapes = kinds & {"invoice_lines", "clickstream", "customers", "catalogue"}
    if not shapes:
        return ()
    have = {kind for kind in ("users", "products") if ctx.lake.exists(kind)}
    lines = []
    imports, features = ctx.settings.ingest.imports, ctx.settings.features
    if "invoice_lines" in shapes:
        lines.append(f"product prices from invoice lines: the median unit price of customer lines over the last "
                     f"{imports.price_window_days} days of each item's sales (ingest.imports.price_window_days); "
                     f"a catalogue file's prices win")
    if "products" in have:
        unknown = "in stock" if features.unknown_stock_in_stock else "out of stock"
        lines.append(f"products without a stock figure count as {unknown} (features.unknown_stock_in_stock); "
                     f"without a launch date they are never new arrivals")
    if imports.item_id_case == "upper":
        lines.append(f"stock codes upper-cased (ingest.imports.item_id_case); the codes as written are in "
                     f"{ALIASES_TABLE}")
    if "users" in have:
        has_email = not ctx.lake.read("users").where(F.col("email").isNotNull()).isEmpty()
        if not has_email:
            lines.append("no customer has an e-mail address or consent yet: nobody can be mailed until a customers "
                         "file is imported (inboxlift import --shape customers FILE)")
    return tuple(lines)


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
        # merge_schema: an events table from before a new landing column (properties) gains it.
        ctx.lake.append("events", rows, partition_by=["event_date"], write_id=WriteId("ingest:events", plan.batch),
                        merge_schema=True)
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
    """``frame`` computed once for the count and the two or three tables it is written to.

    It is checkpointed (:func:`inboxlift.session.materialize`), not only persisted: a persisted
    frame keeps its whole plan, which Spark Connect sends with every later command and a classic
    session analyses again for every frame built on it. The suppressions' update refers to the
    events' classification a dozen times: on Connect a plan of 4.7 MB whose analysis and two jobs
    took 14 s in the tiny shop's ``run-all`` (README, "Plan size on Spark Connect" and "Kept frames
    cut their plans").
    """
    frame = materialize(frame)
    cached.append(frame)
    return frame


# ---- exports ----------------------------------------------------------------------------------

def _check_export_headers(ctx: RunContext, checked: dict[str, tuple[LandingFile, FileRecords | None]]) -> None:
    """Refuse an export whose header lacks a mapped column, before anything is planned or written."""
    for path, (landing, records) in sorted(checked.items()):
        if records is None or not records.records:
            continue
        mapping = mapping_of(ctx, landing.kind)
        names = header_names(records.first_line, mapping.delimiter)
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

