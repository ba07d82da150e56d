"""What both storage backends share: write identities, results, schema checks."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Protocol

from pyspark.sql import DataFrame
from pyspark.sql.types import DataType, StructType

from inboxlift.storage.errors import MergeSourceError, SchemaMismatchError
from inboxlift.storage.names import TableRef


@dataclass(frozen=True)
class WriteId:
    """Delta's transaction identifier: a writer's application id and a batch number.

    A write that carries a WriteId is skipped when the table already holds a
    commit from the same ``app_id`` with a ``version`` at least as high, so a
    retried job never appends twice.
    """

    app_id: str
    version: int

    def __post_init__(self) -> None:
        if not self.app_id:
            raise ValueError("WriteId.app_id must not be empty")
        if self.version < 0:
            raise ValueError("WriteId.version must be >= 0")


@dataclass(frozen=True)
class WriteResult:
    table: str
    operation: str
    version: int | None
    skipped: bool = False
    files_added: int = 0
    files_removed: int = 0
    rows_written: int | None = None


@dataclass(frozen=True)
class TableInfo:
    name: str
    location: str
    version: int
    rows: int
    files: int
    last_write: dt.datetime | None
    last_operation: str | None
    partition_by: list[str]


class Backend(Protocol):
    name: str

    def exists(self, ref: TableRef) -> bool: ...

    def read(self, ref: TableRef, *, version: int | None, timestamp: dt.datetime | str | None) -> DataFrame: ...

    def table_schema(self, ref: TableRef) -> StructType: ...

    def partition_columns(self, ref: TableRef) -> list[str]: ...

    def write(self, ref: TableRef, df: DataFrame, *, mode: str, partition_by: list[str] | None,
              where: str | None, write_id: WriteId | None, merge_schema: bool,
              overwrite_schema: bool) -> WriteResult: ...

    def merge(self, ref: TableRef, source: DataFrame, *, keys: list[str], update_condition: str | None,
              insert_new: bool, write_id: WriteId | None) -> WriteResult: ...

    def version(self, ref: TableRef) -> int: ...

    def history(self, ref: TableRef, limit: int | None) -> list[dict[str, Any]]: ...

    def vacuum(self, ref: TableRef, *, retention_hours: int, dry_run: bool) -> list[str]: ...

    def optimize(self, ref: TableRef, *, target_file_mb: int) -> dict[str, Any]: ...

    def info(self, ref: TableRef) -> TableInfo: ...


def _simple(tp: DataType) -> str:
    return tp.simpleString()


def check_schema(table: str, table_schema: StructType, data_schema: StructType, *, merge_schema: bool) -> list[str]:
    """Compare columns by name (nullability aside); returns the new columns allowed by ``merge_schema``.

    Raises:
        SchemaMismatchError: columns are missing, have other types, or are new without ``merge_schema``.
    """
    table_types = {f.name: f.dataType for f in table_schema.fields}
    data_types = {f.name: f.dataType for f in data_schema.fields}
    missing = [n for n in table_types if n not in data_types]
    extra = [n for n in data_types if n not in table_types]
    changed = [
        f"{n} (table {_simple(table_types[n])}, data {_simple(data_types[n])})"
        for n in table_types
        if n in data_types and not _same_type(table_types[n], data_types[n])
    ]
    if missing or changed or (extra and not merge_schema):
        raise SchemaMismatchError(table, missing=missing, extra=extra, changed=changed)
    return extra


def _same_type(a: DataType, b: DataType) -> bool:
    """Equal types, ignoring nullability and field metadata inside structs and arrays."""
    return _strip(a) == _strip(b)


def _strip(tp: DataType) -> Any:
    from pyspark.sql.types import ArrayType, MapType, StructType

    if isinstance(tp, StructType):
        return ("struct", tuple((f.name, _strip(f.dataType)) for f in tp.fields))
    if isinstance(tp, ArrayType):
        return ("array", _strip(tp.elementType))
    if isinstance(tp, MapType):
        return ("map", _strip(tp.keyType), _strip(tp.valueType))
    return tp.simpleString()


def check_merge_keys(table: str, keys: list[str], source_cols: list[str], table_cols: list[str] | None) -> None:
    if not keys:
        raise MergeSourceError(f"merge into {table!r} needs at least one key column")
    missing_source = [k for k in keys if k not in source_cols]
    missing_table = [k for k in keys if table_cols is not None and k not in table_cols]
    if missing_source or missing_table:
        raise MergeSourceError(
            f"merge into {table!r}: key columns missing from the source: {missing_source or 'none'}, "
            f"from the table: {missing_table or 'none'}"
        )


def assert_unique_keys(table: str, source: DataFrame, keys: list[str]) -> None:
    """A merge source may hold each key once, or the result would depend on row order."""
    from pyspark.sql import functions as F

    dupes = source.groupBy(*keys).agg(F.count(F.lit(1)).alias("rows")).where("rows > 1").limit(3)
    examples = dupes.collect()  # at most three rows
    if examples:
        raise_duplicate_keys(table, keys, [(r, r["rows"]) for r in examples])


def raise_duplicate_keys(table: str, keys: list[str], examples: list[tuple[Any, int]]) -> None:
    """Raise :class:`MergeSourceError` naming the duplicate keys found: (row with the keys, count) pairs."""
    shown = "; ".join(", ".join(f"{k}={row[k]!r}" for k in keys) + f" ({count} rows)" for row, count in examples)
    raise MergeSourceError(f"merge into {table!r}: the source has duplicate keys, e.g. {shown}")
