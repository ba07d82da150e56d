"""The delta-rs backend: Delta tables without Delta Lake's Spark jars.

Writes: executors write Parquet files through :mod:`deltars_source`; the
driver commits all of them, with any files they replace, in one Delta
transaction through ``deltalake``. Reads: the snapshot's file list (latest or
a past version) goes to Spark's own Parquet reader, with partition columns
taken from the Hive-style folders. No table data passes through the driver;
only file lists (metadata) do.

Merge and overwrite-by-predicate rewrite only the files that hold affected
rows: Spark finds them (a join on the keys, or a filtered scan), the
rewrite is one Spark write, and the commit removes exactly those files.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import uuid
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow as pa
from deltalake import DeltaTable
from deltalake import Schema as DeltaSchema
from deltalake.exceptions import CommitFailedError, TableNotFoundError as DeltaTableNotFound
from deltalake.transaction import (
    AddAction,
    CommitProperties,
    RemoveAction,
    Transaction,
    create_table_with_add_actions,
)
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema
from pyspark.sql.types import StructType

from inboxlift.storage.base import (
    TableInfo,
    WriteId,
    WriteResult,
    assert_unique_keys,
    check_merge_keys,
    check_schema,
    raise_duplicate_keys,
)
from inboxlift.storage.deltars_source import (
    FORMAT_NAME,
    HIVE_NULL,
    DeltaRsDataSource,
    escape_partition_value,
    partition_value_string,
)
from inboxlift.storage.errors import (
    ConcurrentWriteError,
    PredicateViolationError,
    SchemaMismatchError,
    StorageError,
    TableNotFoundError,
    UnsupportedTableError,
)
from inboxlift.storage.names import TableRef

FILE_COL = "_inboxlift_file"
_ROWS = "_inboxlift_rows"
_IS_DUPLICATE = "_inboxlift_is_duplicate"
STAGING_DIR = "_inboxlift_staging"
# Reader features whose meaning a plain Parquet read would get wrong.
_UNREADABLE_FEATURES = {"deletionVectors", "columnMapping", "v2Checkpoint", "typeWidening"}


def _normalise_uri(uri: str) -> str:
    """One spelling for a file, whether Spark (file:/a%20b) or delta-rs (/a b) names it."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return os.path.normpath(unquote(parsed.path))
    return unquote(uri)


def _spark_schema(delta_table: DeltaTable) -> StructType:
    arrow = pa.schema(delta_table.schema().to_arrow())
    return from_arrow_schema(arrow)


def _delta_schema(schema: StructType) -> DeltaSchema:
    arrow = to_arrow_schema(schema, timezone="UTC")
    return DeltaSchema.from_arrow(pa.schema([f.with_nullable(True) for f in arrow]))


class DeltaRsBackend:
    name = "delta-rs"

    def __init__(self, spark: SparkSession, *, max_rows_per_file: int = 5_000_000) -> None:
        self.spark = spark
        self.max_rows_per_file = max_rows_per_file
        if not getattr(spark, "_inboxlift_deltars_registered", False):
            spark.dataSource.register(DeltaRsDataSource)
            spark._inboxlift_deltars_registered = True  # type: ignore[attr-defined]

    # ---- snapshots -----------------------------------------------------------------------

    def _require_path(self, ref: TableRef) -> str:
        if not ref.is_path:
            raise StorageError(
                f"the delta-rs backend stores tables in folders, not catalog tables like {ref.location!r}; "
                "use storage.backend=native (Delta Lake's jars) for Unity Catalog names"
            )
        return ref.location

    def _table(self, ref: TableRef, *, version: int | None = None,
               timestamp: dt.datetime | str | None = None) -> DeltaTable:
        location = self._require_path(ref)
        try:
            table = DeltaTable(location)
        except DeltaTableNotFound as exc:
            raise TableNotFoundError(f"table {ref.name!r} does not exist at {location}") from exc
        if version is not None:
            table.load_as_version(version)
        elif timestamp is not None:
            when = dt.datetime.fromisoformat(timestamp) if isinstance(timestamp, str) else timestamp
            if when.tzinfo is None:
                when = when.replace(tzinfo=dt.timezone.utc)
            table.load_as_version(when)
        return table

    def exists(self, ref: TableRef) -> bool:
        return DeltaTable.is_deltatable(self._require_path(ref))

    def table_schema(self, ref: TableRef) -> StructType:
        return _spark_schema(self._table(ref))

    def partition_columns(self, ref: TableRef) -> list[str]:
        return list(self._table(ref).metadata().partition_columns)

    def version(self, ref: TableRef) -> int:
        return self._table(ref).version()

    def _actions(self, table: DeltaTable) -> list[dict[str, Any]]:
        """The snapshot's add actions (one small dict per file: metadata, not data)."""
        actions = pa.table(table.get_add_actions(flatten=True))
        keep = ["path", "size_bytes", "num_records"] + [c for c in actions.column_names if c.startswith("partition.")]
        return actions.select([c for c in keep if c in actions.column_names]).to_pylist()

    def _check_readable(self, ref: TableRef, table: DeltaTable) -> None:
        features = set(table.protocol().reader_features or [])
        unreadable = features & _UNREADABLE_FEATURES
        if unreadable:
            raise UnsupportedTableError(
                f"table {ref.name!r} uses {', '.join(sorted(unreadable))}, which the delta-rs backend "
                "cannot hand to Spark's Parquet reader; read it with storage.backend=native"
            )

    def _frame(self, ref: TableRef, table: DeltaTable, actions: list[dict[str, Any]], *,
               with_file: bool = False) -> DataFrame:
        """Spark's Parquet reader over the given files, with partition columns from their folders."""
        schema = _spark_schema(table)
        parts = list(table.metadata().partition_columns)
        root = table.table_uri.rstrip("/")
        if not actions:
            empty = self.spark.createDataFrame([], schema)
            return empty.withColumn(FILE_COL, F.lit(None).cast("string")) if with_file else empty
        for action in actions:
            expected = "/".join(
                f"{escape_partition_value(c)}="
                + (HIVE_NULL if action.get(f"partition.{c}") is None
                   else escape_partition_value(partition_value_string(action[f"partition.{c}"])))
                for c in parts
            )
            folder = os.path.dirname(unquote(action["path"]))
            if parts and folder != expected:
                raise UnsupportedTableError(
                    f"table {ref.name!r} keeps file {action['path']} outside the Hive-style folder "
                    f"{expected!r}; the delta-rs backend reads partition values from folders"
                )
        data_fields = [f for f in schema.fields if f.name not in parts]
        part_fields = [f for f in schema.fields if f.name in parts]
        uris = [f"{root}/{unquote(a['path'])}" for a in actions]
        reader = self.spark.read.schema(StructType(data_fields + part_fields)).option("basePath", root)
        # Spark "lists" more than this many paths with a Spark job (seconds of scheduling). These paths
        # are the log's files, not folders to search: on a local disk each costs one stat on the driver,
        # so the job is pure overhead. Object stores pay a request per file, so there the job stays.
        # The listing happens here, when the DataFrame is made; reading it later uses the result.
        threshold_key = "spark.sql.sources.parallelPartitionDiscovery.threshold"
        was_set = self.spark.conf.get(threshold_key, None)
        lift = urlparse(root).scheme in ("", "file") and len(uris) > int(self.spark.conf.get(threshold_key))
        if lift:
            self.spark.conf.set(threshold_key, str(len(uris)))
        try:
            frame = reader.parquet(*uris)
        finally:
            if lift and was_set is None:
                self.spark.conf.unset(threshold_key)
            elif lift:
                self.spark.conf.set(threshold_key, was_set)
        columns = [F.col(n) for n in schema.fieldNames()]
        if with_file:
            columns.append(F.col("_metadata.file_path").alias(FILE_COL))
        return frame.select(*columns)

    def read(self, ref: TableRef, *, version: int | None = None,
             timestamp: dt.datetime | str | None = None) -> DataFrame:
        table = self._table(ref, version=version, timestamp=timestamp)
        self._check_readable(ref, table)
        return self._frame(ref, table, self._actions(table))

    # ---- writes --------------------------------------------------------------------------

    def _write_files(self, ref: TableRef, df: DataFrame, partition_by: list[str]) -> list[dict[str, Any]]:
        """Run the Spark job that writes data files; return their add descriptions."""
        root = self._require_path(ref)
        write_id = uuid.uuid4().hex
        manifest = f"{root}/{STAGING_DIR}/{write_id}.json"
        # Spark looks Python data sources up in the JVM thread's active session, which a Python
        # thread other than the one that built the session does not have (concurrent writers, a
        # notebook's thread pool). A classic session's createDataFrame makes it the thread's
        # active session as a side effect, through public API; it runs no job.
        self.spark.createDataFrame([], "x int")
        (
            df.write.format(FORMAT_NAME)
            .mode("append")
            .option("path", root)
            .option("manifest", manifest)
            .option("partition_by", json.dumps(partition_by))
            .option("write_id", write_id)
            .option("max_rows_per_file", str(self.max_rows_per_file))
            .save()
        )
        with open(manifest, encoding="utf-8") as fh:
            files = json.load(fh)["files"]
        os.remove(manifest)
        return files

    @staticmethod
    def _add_actions(files: list[dict[str, Any]]) -> list[AddAction]:
        return [
            AddAction(f["path"], f["size"], f["partition_values"], f["modification_time"], True, f["stats"])
            for f in files
        ]

    @staticmethod
    def _remove_actions(actions: list[dict[str, Any]], parts: list[str]) -> list[RemoveAction]:
        now = int(time.time() * 1000)
        return [
            RemoveAction(a["path"], True, now, a.get("size_bytes"),
                         {c: partition_value_string(a.get(f"partition.{c}")) for c in parts} if parts else None)
            for a in actions
        ]

    @staticmethod
    def _commit_properties(operation: str, ref: TableRef, write_id: WriteId | None, *,
                           creating: bool = False) -> CommitProperties:
        return CommitProperties(
            custom_metadata={"inboxlift.operation": operation, "inboxlift.table": ref.name},
            app_transactions=[Transaction(write_id.app_id, write_id.version)] if write_id else None,
            # A create that finds version 0 taken lost a race with another writer's create. delta-rs
            # 1.6 would retry it as version 1, whose conflict check lets a CREATE TABLE through: both
            # creates then "succeed", the second adding its rows beside the first's (measured: 29 of
            # 30 racing pairs). With no retry the loser fails with CommitFailedError instead.
            max_commit_retries=0 if creating else None,
        )

    @staticmethod
    def _already_written(table: DeltaTable, write_id: WriteId | None) -> bool:
        if write_id is None:
            return False
        done = table.transaction_version(write_id.app_id)
        return done is not None and done >= write_id.version

    def _commit(self, ref: TableRef, table: DeltaTable | None, *, operation: str, schema: StructType,
                partition_by: list[str], files: list[dict[str, Any]], removes: list[RemoveAction],
                mode: str, write_id: WriteId | None, replace_schema: bool = False) -> WriteResult:
        adds = self._add_actions(files)
        props = self._commit_properties(operation, ref, write_id, creating=table is None)
        if table is not None and not replace_schema:
            known = set(table.schema().to_arrow().names)
            new_fields = [f for f in _delta_schema(schema).fields if f.name not in known]
            if new_fields:
                # Schema evolution is its own commit (delta-rs does not widen a schema inside a
                # write transaction); the new columns are nullable, so older files read as null.
                table.alter.add_columns(new_fields)
        try:
            if table is None or replace_schema:
                create_table_with_add_actions(
                    ref.location, _delta_schema(schema), adds,
                    mode="overwrite" if table is not None else "error",
                    partition_by=partition_by or None, name=ref.name, commit_properties=props,
                )
            else:
                table.create_write_transaction(
                    [*adds, *removes], mode=mode, schema=_delta_schema(schema),
                    partition_by=partition_by or None, commit_properties=props,
                )
        except CommitFailedError as exc:
            if table is None:
                raise ConcurrentWriteError(
                    f"table {ref.name!r} was created by another writer meanwhile; this write is not committed, "
                    f"retry it ({exc})"
                ) from exc
            raise ConcurrentWriteError(
                f"{operation} on table {ref.name!r} conflicts with a write committed meanwhile; "
                f"the table is unchanged by this write, retry it ({exc})"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - a racing create shows up as "already exists"
            if table is None and "exist" in str(exc).lower():
                raise ConcurrentWriteError(
                    f"table {ref.name!r} was created by another writer meanwhile; retry the write ({exc})"
                ) from exc
            raise
        return WriteResult(
            table=ref.name, operation=operation, version=DeltaTable(ref.location).version(),
            files_added=len(adds), files_removed=len(removes),
            rows_written=sum(f["num_records"] for f in files),
        )

    def _files_matching(self, ref: TableRef, table: DeltaTable, actions: list[dict[str, Any]],
                        where: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Files with rows matching ``where``: (wholly matching, partly matching)."""
        by_file = {_normalise_uri(f"{table.table_uri.rstrip('/')}/{unquote(a['path'])}"): a for a in actions}
        frame = self._frame(ref, table, actions, with_file=True)
        predicate = F.coalesce(F.expr(where), F.lit(False))
        # File names only: at most one row per file of the table, never table data.
        hit = {_normalise_uri(r[0]) for r in frame.where(predicate).select(FILE_COL).distinct().collect()}
        if not hit:
            return [], []
        hit_actions = [by_file[f] for f in hit]
        partial_frame = self._frame(ref, table, hit_actions, with_file=True)
        partial = {_normalise_uri(r[0]) for r in partial_frame.where(~predicate).select(FILE_COL).distinct().collect()}
        return [by_file[f] for f in hit - partial], [by_file[f] for f in partial]

    def write(self, ref: TableRef, df: DataFrame, *, mode: str, partition_by: list[str] | None,
              where: str | None, write_id: WriteId | None, merge_schema: bool,
              overwrite_schema: bool) -> WriteResult:
        table = self._table(ref) if self.exists(ref) else None
        operation = "append" if mode == "append" else ("overwrite_where" if where else "overwrite")
        if table is not None and self._already_written(table, write_id):
            return WriteResult(ref.name, operation, table.version(), skipped=True)

        schema = df.schema
        replace_schema = overwrite_schema and mode == "overwrite" and where is None
        if table is None or replace_schema:
            parts = list(partition_by or [])
            unknown = [c for c in parts if c not in schema.fieldNames()]
            if unknown:
                raise SchemaMismatchError(ref.name, missing=unknown, extra=[], changed=[])
        else:
            parts = list(table.metadata().partition_columns)
            if partition_by is not None and list(partition_by) != parts:
                raise StorageError(
                    f"table {ref.name!r} is partitioned by {parts}, the write asked for {list(partition_by)}; "
                    "overwrite with overwrite_schema=True to change it"
                )
            table_schema = _spark_schema(table)
            new_columns = check_schema(ref.name, table_schema, schema, merge_schema=merge_schema)
            df = df.select(*table_schema.fieldNames(), *new_columns)
            schema = StructType(list(table_schema.fields) + [schema[c] for c in new_columns])

        removes: list[RemoveAction] = []
        commit_mode = "append"
        if mode == "overwrite" and table is not None and not replace_schema:
            if where is None:
                commit_mode = "overwrite"
            else:
                violating = df.where(~F.coalesce(F.expr(where), F.lit(False))).limit(1)
                if not violating.isEmpty():
                    raise PredicateViolationError(
                        f"overwrite of {ref.name!r} where {where!r}: some rows to write do not satisfy the predicate"
                    )
                whole, partial = self._files_matching(ref, table, self._actions(table), where)
                if partial:
                    kept = self._frame(ref, table, partial).where(~F.coalesce(F.expr(where), F.lit(False)))
                    df = df.unionByName(kept, allowMissingColumns=True)
                removes = self._remove_actions(whole + partial, parts)
        files = self._write_files(ref, df, parts)
        return self._commit(ref, table, operation=operation, schema=schema, partition_by=parts, files=files,
                            removes=removes, mode=commit_mode, write_id=write_id, replace_schema=replace_schema)

    @staticmethod
    def _merge_scan(ref: TableRef, source: DataFrame, target: DataFrame,
                    keys: list[str]) -> tuple[set[str], bool]:
        """The files holding the source's keys, and whether the source has rows, in one Spark job.

        The same job checks that the source holds each key once (a merge with duplicate keys would
        depend on row order): both branches share one aggregation of the source by key, which Spark
        computes once, so the source is read once for the check and the file search together.
        Returns (affected file URIs, the source has rows). Collects at most one row per file of the
        table, one for the keys not in it, and three duplicate keys: metadata, never table data.

        Raises:
            MergeSourceError: the source has duplicate keys (up to three named, with their counts).
        """
        per_key = source.groupBy(*keys).agg(F.count(F.lit(1)).alias(_ROWS))
        key_types = {f.name: f.dataType for f in per_key.schema.fields}
        # A left join: keys in no file (new rows) make one group with a null file.
        per_file = (
            per_key.join(target.select(*keys, FILE_COL), on=keys, how="left")
            .groupBy(FILE_COL).agg(F.max(_ROWS).alias(_ROWS))
            .select(F.lit(False).alias(_IS_DUPLICATE), *[F.lit(None).cast(key_types[k]).alias(k) for k in keys],
                    FILE_COL, _ROWS)
        )
        duplicates = (
            per_key.where(F.col(_ROWS) > 1).limit(3)
            .select(F.lit(True).alias(_IS_DUPLICATE), *keys, F.lit(None).cast("string").alias(FILE_COL), _ROWS)
        )
        rows = per_file.unionByName(duplicates).collect()
        examples = [r for r in rows if r[_IS_DUPLICATE]]
        if examples:
            raise_duplicate_keys(ref.name, keys, [(r, r[_ROWS]) for r in examples])
        groups = [r for r in rows if not r[_IS_DUPLICATE]]
        return {_normalise_uri(r[FILE_COL]) for r in groups if r[FILE_COL] is not None}, bool(groups)

    def merge(self, ref: TableRef, source: DataFrame, *, keys: list[str], update_condition: str | None,
              insert_new: bool, write_id: WriteId | None) -> WriteResult:
        if not self.exists(ref):
            check_merge_keys(ref.name, keys, source.columns, None)
            assert_unique_keys(ref.name, source, keys)
            return self.write(ref, source, mode="append", partition_by=None, where=None,
                              write_id=write_id, merge_schema=False, overwrite_schema=False)
        table = self._table(ref)
        if self._already_written(table, write_id):
            return WriteResult(ref.name, "merge", table.version(), skipped=True)
        table_schema = _spark_schema(table)
        check_merge_keys(ref.name, keys, source.columns, table_schema.fieldNames())
        check_schema(ref.name, table_schema, source.schema, merge_schema=False)
        parts = list(table.metadata().partition_columns)
        actions = self._actions(table)
        by_file = {_normalise_uri(f"{table.table_uri.rstrip('/')}/{unquote(a['path'])}"): a for a in actions}

        target = self._frame(ref, table, actions, with_file=True)
        affected_files, has_rows = self._merge_scan(ref, source, target, keys)
        if not has_rows or (not affected_files and not insert_new):
            # Nothing to change (an empty source, or only new keys where inserts are off): commit the
            # empty transaction without a Spark write, so the version and the write id advance as for
            # any other merge.
            return self._commit(ref, table, operation="merge", schema=table_schema, partition_by=parts, files=[],
                                removes=[], mode="append", write_id=write_id)
        affected = [by_file[f] for f in affected_files]
        columns = table_schema.fieldNames()

        src = source.select(*columns).withColumn("_in_source", F.lit(True)).alias("s")
        tgt = self._frame(ref, table, affected).withColumn("_in_target", F.lit(True)).alias("t")
        on = [F.col(f"t.{k}") == F.col(f"s.{k}") for k in keys]
        joined = tgt.join(src, on=on, how="full_outer")
        in_source = F.col("s._in_source").isNotNull()
        in_target = F.col("t._in_target").isNotNull()
        update = F.coalesce(F.expr(update_condition), F.lit(False)) if update_condition else F.lit(True)
        take_source = in_source & ((~in_target & F.lit(insert_new)) | (in_target & update))
        keep_row = in_target | (in_source & F.lit(insert_new))
        merged = joined.where(keep_row).select(
            *[F.when(take_source, F.col(f"s.{c}")).otherwise(F.col(f"t.{c}")).alias(c) for c in columns]
        )
        files = self._write_files(ref, merged, parts)
        removes = self._remove_actions(affected, parts)
        return self._commit(ref, table, operation="merge", schema=table_schema, partition_by=parts, files=files,
                            removes=removes, mode="append", write_id=write_id)

    # ---- maintenance -----------------------------------------------------------------------

    def history(self, ref: TableRef, limit: int | None = None) -> list[dict[str, Any]]:
        return self._table(ref).history(limit)

    def vacuum(self, ref: TableRef, *, retention_hours: int, dry_run: bool) -> list[str]:
        return self._table(ref).vacuum(retention_hours=retention_hours, dry_run=dry_run,
                                       enforce_retention_duration=False)

    def optimize(self, ref: TableRef, *, target_file_mb: int) -> dict[str, Any]:
        return self._table(ref).optimize.compact(target_size=target_file_mb * 1024 * 1024)

    def info(self, ref: TableRef) -> TableInfo:
        table = self._table(ref)
        actions = self._actions(table)
        last = table.history(1)
        stamp = last[0].get("timestamp") if last else None
        return TableInfo(
            name=ref.name, location=ref.location, version=table.version(),
            rows=sum(int(a.get("num_records") or 0) for a in actions), files=len(actions),
            last_write=dt.datetime.fromtimestamp(stamp / 1000, dt.timezone.utc) if stamp else None,
            last_operation=last[0].get("operation") if last else None,
            partition_by=list(table.metadata().partition_columns),
        )
