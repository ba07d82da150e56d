"""The native backend: Delta Lake's own Spark integration (delta-spark, Databricks)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from inboxlift.storage.base import TableInfo, WriteId, WriteResult, assert_unique_keys, check_merge_keys, check_schema
from inboxlift.storage.errors import ConcurrentWriteError, PredicateViolationError, StorageError, TableNotFoundError
from inboxlift.storage.names import TableRef


def _is_conflict(exc: Exception) -> bool:
    return "Concurrent" in type(exc).__name__ or "ConcurrentModification" in str(exc) or "DELTA_CONCURRENT" in str(exc)


class NativeDeltaBackend:
    name = "native"

    def __init__(self, spark: SparkSession) -> None:
        from delta.tables import DeltaTable  # noqa: F401 - fail early when the Python side is missing

        self.spark = spark

    def _delta(self, ref: TableRef):
        from delta.tables import DeltaTable

        if not self.exists(ref):
            raise TableNotFoundError(f"table {ref.name!r} does not exist at {ref.location}")
        if ref.is_path:
            return DeltaTable.forPath(self.spark, ref.location)
        return DeltaTable.forName(self.spark, ref.location)

    def exists(self, ref: TableRef) -> bool:
        from delta.tables import DeltaTable

        if ref.is_path:
            return DeltaTable.isDeltaTable(self.spark, ref.location)
        return self.spark.catalog.tableExists(ref.location)

    def read(self, ref: TableRef, *, version: int | None = None,
             timestamp: dt.datetime | str | None = None) -> DataFrame:
        if not self.exists(ref):
            raise TableNotFoundError(f"table {ref.name!r} does not exist at {ref.location}")
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        elif timestamp is not None:
            stamp = timestamp.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f") \
                if isinstance(timestamp, dt.datetime) else timestamp
            reader = reader.option("timestampAsOf", stamp)
        return reader.load(ref.location) if ref.is_path else reader.table(ref.location)

    def table_schema(self, ref: TableRef) -> StructType:
        return self.read(ref).schema

    def partition_columns(self, ref: TableRef) -> list[str]:
        detail = self._delta(ref).detail().select("partitionColumns").first()
        return list(detail[0]) if detail else []

    def version(self, ref: TableRef) -> int:
        return int(self._delta(ref).history(1).select("version").first()[0])

    def write(self, ref: TableRef, df: DataFrame, *, mode: str, partition_by: list[str] | None,
              where: str | None, write_id: WriteId | None, merge_schema: bool,
              overwrite_schema: bool) -> WriteResult:
        operation = "append" if mode == "append" else ("overwrite_where" if where else "overwrite")
        exists = self.exists(ref)
        if exists and not (overwrite_schema and mode == "overwrite" and where is None):
            check_schema(ref.name, self.table_schema(ref), df.schema, merge_schema=merge_schema)
        if where is not None and mode == "overwrite":
            if not df.where(~F.coalesce(F.expr(where), F.lit(False))).limit(1).isEmpty():
                raise PredicateViolationError(
                    f"overwrite of {ref.name!r} where {where!r}: some rows to write do not satisfy the predicate"
                )
        writer = df.write.format("delta").mode(mode)
        if partition_by and (not exists or overwrite_schema):
            writer = writer.partitionBy(*partition_by)
        if where is not None and mode == "overwrite":
            writer = writer.option("replaceWhere", where)
        if merge_schema:
            writer = writer.option("mergeSchema", "true")
        if overwrite_schema:
            writer = writer.option("overwriteSchema", "true")
        if write_id is not None:
            writer = writer.option("txnAppId", write_id.app_id).option("txnVersion", str(write_id.version))
        before = self.version(ref) if exists else None
        try:
            if ref.is_path:
                writer.save(ref.location)
            else:
                writer.saveAsTable(ref.location)
        except Exception as exc:  # noqa: BLE001
            if _is_conflict(exc):
                raise ConcurrentWriteError(f"{operation} on table {ref.name!r} conflicts with another writer: {exc}") from exc
            raise
        after = self.version(ref)
        return WriteResult(ref.name, operation, after, skipped=before is not None and after == before)

    def merge(self, ref: TableRef, source: DataFrame, *, keys: list[str], update_condition: str | None,
              insert_new: bool, write_id: WriteId | None) -> WriteResult:
        if not self.exists(ref):
            check_merge_keys(ref.name, keys, source.columns, None)
            assert_unique_keys(ref.name, source, keys)
            return self.write(ref, source, mode="append", partition_by=None, where=None, write_id=write_id,
                              merge_schema=False, overwrite_schema=False)
        table_schema = self.table_schema(ref)
        check_merge_keys(ref.name, keys, source.columns, table_schema.fieldNames())
        check_schema(ref.name, table_schema, source.schema, merge_schema=False)
        assert_unique_keys(ref.name, source, keys)
        condition = " AND ".join(f"t.`{k}` = s.`{k}`" for k in keys)
        before = self.version(ref)
        builder = self._delta(ref).alias("t").merge(source.alias("s"), condition)
        builder = builder.whenMatchedUpdateAll(condition=update_condition)
        if insert_new:
            builder = builder.whenNotMatchedInsertAll()
        if write_id is not None:
            # Delta reads the transaction identifier for MERGE from these session settings.
            self.spark.conf.set("spark.databricks.delta.write.txnAppId", write_id.app_id)
            self.spark.conf.set("spark.databricks.delta.write.txnVersion", str(write_id.version))
        try:
            builder.execute()
        except Exception as exc:  # noqa: BLE001
            if _is_conflict(exc):
                raise ConcurrentWriteError(f"merge into {ref.name!r} conflicts with another writer: {exc}") from exc
            raise
        finally:
            if write_id is not None:
                self.spark.conf.unset("spark.databricks.delta.write.txnAppId")
                self.spark.conf.unset("spark.databricks.delta.write.txnVersion")
        after = self.version(ref)
        return WriteResult(ref.name, "merge", after, skipped=after == before)

    def history(self, ref: TableRef, limit: int | None = None) -> list[dict[str, Any]]:
        frame = self._delta(ref).history(limit) if limit else self._delta(ref).history()
        # A table's history is metadata: one row per commit.
        return [row.asDict(recursive=True) for row in frame.collect()]

    def vacuum(self, ref: TableRef, *, retention_hours: int, dry_run: bool) -> list[str]:
        if dry_run:
            raise StorageError("dry-run vacuum is not offered by delta-spark's Python API; use SQL VACUUM ... DRY RUN")
        self.spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", str(retention_hours >= 168).lower())
        self._delta(ref).vacuum(retention_hours)
        return []

    def optimize(self, ref: TableRef, *, target_file_mb: int) -> dict[str, Any]:
        self.spark.conf.set("spark.databricks.delta.optimize.maxFileSize", str(target_file_mb * 1024 * 1024))
        metrics = self._delta(ref).optimize().executeCompaction().first()
        return metrics.asDict(recursive=True) if metrics else {}

    def info(self, ref: TableRef) -> TableInfo:
        detail = self._delta(ref).detail().first()
        last = self._delta(ref).history(1).first()
        rows = self.read(ref).count()
        return TableInfo(
            name=ref.name, location=ref.location, version=int(last["version"]), rows=int(rows),
            files=int(detail["numFiles"]), last_write=last["timestamp"], last_operation=last["operation"],
            partition_by=list(detail["partitionColumns"]),
        )
