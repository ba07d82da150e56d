"""The one door to tables: ``Lake`` reads and writes logical tables on either backend."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pyspark.sql import DataFrame, SparkSession

from inboxlift.settings import StorageSettings
from inboxlift.storage.base import Backend, TableInfo, WriteId, WriteResult
from inboxlift.storage.errors import StorageError
from inboxlift.storage.names import TableNames, TableRef


def choose_backend(spark: SparkSession, settings: StorageSettings, *, has_delta_jars: bool) -> Backend:
    """Native Delta where its jars are loaded, delta-rs otherwise (or as settings force)."""
    wanted = settings.backend
    if wanted == "native" or (wanted == "auto" and has_delta_jars):
        if not has_delta_jars:
            raise StorageError("storage.backend is 'native' but Delta Lake's Spark jars are not on the classpath")
        from inboxlift.storage.native import NativeDeltaBackend

        return NativeDeltaBackend(spark)
    from inboxlift.storage.deltars import DeltaRsBackend

    return DeltaRsBackend(spark)


class Lake:
    """Logical tables (``events``, ``users``...) on a Delta backend.

    Every write mode is explicit: :meth:`append`, :meth:`overwrite` (whole
    table, or ``where=`` a predicate), :meth:`merge`. Nothing overwrites
    unless asked to. A ``write_id`` makes a write idempotent.
    """

    def __init__(self, spark: SparkSession, settings: StorageSettings, *, backend: Backend) -> None:
        self.spark = spark
        self.settings = settings
        self.names = TableNames(settings)
        self.backend = backend

    @classmethod
    def open(cls, spark: SparkSession, settings: StorageSettings, *, has_delta_jars: bool) -> "Lake":
        return cls(spark, settings, backend=choose_backend(spark, settings, has_delta_jars=has_delta_jars))

    def ref(self, name: str) -> TableRef:
        return self.names.resolve(name)

    def location(self, name: str) -> str:
        return self.ref(name).location

    def exists(self, name: str) -> bool:
        return self.backend.exists(self.ref(name))

    def read(self, name: str, *, version: int | None = None, timestamp: dt.datetime | str | None = None) -> DataFrame:
        """The table now, at a version, or as it was at a timestamp (time travel)."""
        if version is not None and timestamp is not None:
            raise ValueError("read() takes a version or a timestamp, not both")
        return self.backend.read(self.ref(name), version=version, timestamp=timestamp)

    def read_required(self, name: str, *, needed_by: str, hint: str) -> DataFrame:
        """:meth:`read`, or a ``FileNotFoundError`` that says which step needs the table and what
        writes it (``hint``), when the table does not exist yet."""
        if not self.exists(name):
            raise FileNotFoundError(f"{needed_by} needs table {name!r}, which does not exist yet: {hint}")
        return self.read(name)

    def append(self, name: str, df: DataFrame, *, partition_by: list[str] | None = None,
               write_id: WriteId | None = None, merge_schema: bool = False) -> WriteResult:
        """Add rows; creates the table (partitioned by ``partition_by``) when it does not exist."""
        return self.backend.write(self.ref(name), df, mode="append", partition_by=partition_by, where=None,
                                  write_id=write_id, merge_schema=merge_schema, overwrite_schema=False)

    def overwrite(self, name: str, df: DataFrame, *, where: str | None = None, partition_by: list[str] | None = None,
                  write_id: WriteId | None = None, overwrite_schema: bool = False) -> WriteResult:
        """Replace the whole table, or only the rows matching the SQL predicate ``where``."""
        if overwrite_schema and where is not None:
            raise ValueError("overwrite_schema replaces the whole table; it cannot go with where=")
        return self.backend.write(self.ref(name), df, mode="overwrite", partition_by=partition_by, where=where,
                                  write_id=write_id, merge_schema=False, overwrite_schema=overwrite_schema)

    def merge(self, name: str, source: DataFrame, *, keys: list[str], update_condition: str | None = None,
              insert_new: bool = True, write_id: WriteId | None = None) -> WriteResult:
        """Upsert ``source`` by ``keys``: matched rows are updated (where ``update_condition``, a SQL
        expression over ``s.`` source and ``t.`` target columns, holds), new keys inserted."""
        return self.backend.merge(self.ref(name), source, keys=list(keys), update_condition=update_condition,
                                  insert_new=insert_new, write_id=write_id)

    def version(self, name: str) -> int:
        return self.backend.version(self.ref(name))

    def history(self, name: str, limit: int | None = None) -> list[dict[str, Any]]:
        return self.backend.history(self.ref(name), limit)

    def vacuum(self, name: str, *, retention_hours: int | None = None, dry_run: bool = False) -> list[str]:
        hours = self.settings.vacuum_retention_hours if retention_hours is None else retention_hours
        return self.backend.vacuum(self.ref(name), retention_hours=hours, dry_run=dry_run)

    def optimize(self, name: str, *, target_file_mb: int | None = None) -> dict[str, Any]:
        return self.backend.optimize(self.ref(name), target_file_mb=target_file_mb or self.settings.target_file_mb)

    def info(self, name: str) -> TableInfo:
        return self.backend.info(self.ref(name))

    def table_names(self) -> list[str]:
        """Tables present: the lake folder's Delta tables, or the catalog schema's tables."""
        if self.names.uses_catalog:
            catalog, schema = self.settings.catalog, self.settings.schema
            return sorted(t.name for t in self.spark.catalog.listTables(f"{catalog}.{schema}"))
        return self.names.local_table_names()
