"""A Spark Python Data Source that writes Delta data files with pyarrow on the executors.

Each task receives its partition as Arrow batches, splits them by the table's
partition columns, and writes Parquet files into the table folder (Hive-style
``col=value`` folders, partition columns left out of the files as Delta
requires). It returns one Delta ``add`` description per file, with the
statistics (row count, nulls, min/max) that readers use to skip files.

Spark runs a writer's ``commit`` in a separate Python process, so it cannot
hand results back to the caller. It therefore writes the collected file list
to a small manifest; :mod:`inboxlift.storage.deltars` reads it on the driver
and commits every file in one Delta transaction through ``deltalake``.
"""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import inspect
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator
from urllib.parse import quote

from pyspark.sql.datasource import DataSource, DataSourceArrowWriter, WriterCommitMessage
from pyspark.sql.types import StructType

FORMAT_NAME = "inboxlift_deltars"
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
# Characters Spark and Hive escape in partition folder names.
_UNSAFE = set('"#%\'*/:=?\\\x7f{[]}^') | {chr(c) for c in range(0x20)}
# String statistics are truncated like Delta Spark's; a longer max is left out (it would be wrong).
_STATS_STRING_PREFIX = 32
# Rows that decide a file's dictionary encoding: about the first data page parquet-mr decides on.
_DICTIONARY_SAMPLE_ROWS = 20_000


@dataclass
class FilesWritten(WriterCommitMessage):
    files: list[dict[str, Any]] = field(default_factory=list)


def escape_partition_value(value: str) -> str:
    return "".join(f"%{ord(ch):02X}" if ch in _UNSAFE else ch for ch in value)


def partition_value_string(value: Any) -> str | None:
    """How Delta's log spells a partition value."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return value.isoformat(sep=" ", timespec="microseconds")
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)


def _stat_value(value: Any, *, upper: bool) -> Any:
    """A JSON statistic; timestamps are rounded outwards to the millisecond Delta stores."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        micros = value.microsecond
        rounded = (math.ceil(micros / 1000) if upper else micros // 1000) * 1000
        if rounded == 1_000_000:
            value = value.replace(microsecond=0) + dt.timedelta(seconds=1)
        else:
            value = value.replace(microsecond=rounded)
        return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return None  # a float could round past the true bound; JSON has no exact decimal here
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, bytes):
        return None
    if isinstance(value, str):
        if len(value) <= _STATS_STRING_PREFIX:
            return value
        return None if upper else value[:_STATS_STRING_PREFIX]
    return value


def file_stats(path: str, num_rows: int, columns: list[str]) -> str:
    """Delta statistics JSON from the Parquet footer (no data is re-read)."""
    import pyarrow.parquet as pq

    meta = pq.read_metadata(path)
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    top_level = {meta.schema.column(i).path: i for i in range(meta.num_columns)}
    for name in columns:
        idx = top_level.get(name)
        if idx is None:
            continue  # nested column: Delta keeps no stats we need for it
        lo = hi = None
        null_count = 0
        complete = True
        for rg in range(meta.num_row_groups):
            stats = meta.row_group(rg).column(idx).statistics
            if stats is None or not stats.has_null_count:
                complete = False
                break
            null_count += stats.null_count
            if stats.has_min_max:
                lo = stats.min if lo is None or stats.min < lo else lo
                hi = stats.max if hi is None or stats.max > hi else hi
        if not complete:
            continue
        nulls[name] = null_count
        if lo is not None:
            lo_v, hi_v = _stat_value(lo, upper=False), _stat_value(hi, upper=True)
            if lo_v is not None:
                mins[name] = lo_v
            if hi_v is not None:
                maxs[name] = hi_v
    return json.dumps({"numRecords": num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls})


@functools.lru_cache(maxsize=1)
def _parquet_options() -> dict[str, Any]:
    """Writer options that match Spark's own Parquet files, where this pyarrow has them."""
    import pyarrow.parquet as pq

    # Spark stores decimals of up to 18 digits as INT64, which its reader decodes faster than the
    # fixed-size byte arrays pyarrow writes by default (the option is missing from older pyarrow).
    if "store_decimal_as_integer" in inspect.signature(pq.ParquetWriter.__init__).parameters:
        return {"store_decimal_as_integer": True}
    return {}


def dictionary_columns(sample) -> list[str] | bool:
    """The columns of a file to dictionary-encode, chosen as Spark's own Parquet writer chooses.

    parquet-mr writes a column chunk plain when, over its first page, the dictionary plus the
    indices would not be smaller than the plain values (ids, URLs); pyarrow always tries a
    dictionary and keeps the pages it wrote before giving up, which Spark's reader decodes more
    slowly (a full scan of events took about 12% more CPU). ``sample`` is the file's first rows.
    Returns ``True`` (every column) when a column is nested or has a dot in its name, as Parquet
    then names the column's leaves differently.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if any(pa.types.is_nested(f.type) or "." in f.name for f in sample.schema):
        return True
    keep = []
    for name in sample.column_names:
        values = sample.column(name)
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)
                or pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type)):
            keep.append(name)
            continue
        values = values.drop_null()
        if len(values) == 0:
            keep.append(name)
            continue
        distinct = pc.unique(values)
        # Byte arrays are stored with a 4-byte length; indices are bit-packed to the dictionary's width.
        plain_bytes = pc.sum(pc.binary_length(values)).as_py() + 4 * len(values)
        dictionary_bytes = pc.sum(pc.binary_length(distinct)).as_py() + 4 * len(distinct)
        index_bytes = len(values) * max(1, (len(distinct) - 1).bit_length()) / 8
        if dictionary_bytes + index_bytes < plain_bytes:
            keep.append(name)
    return keep


class _PartitionedFileWriter:
    """Buffers a task's rows per table partition and writes them as sized Parquet files."""

    def __init__(self, root: str, partition_by: list[str], write_id: str, task: int,
                 max_rows_per_file: int, buffer_rows: int) -> None:
        self.root = root.rstrip("/")
        self.partition_by = partition_by
        self.prefix = f"part-{task:05d}-{write_id}"
        self.max_rows_per_file = max_rows_per_file
        self.buffer_rows = buffer_rows
        self.buffers: dict[tuple, list] = {}
        self.buffered: dict[tuple, int] = {}
        self.open: dict[tuple, Any] = {}  # partition key -> (writer, relative path, rows)
        self.files: list[dict[str, Any]] = []
        self.seq = 0
        self.schema = None
        self.data_schema = None

    def _nullable(self, schema):
        import pyarrow as pa

        return pa.schema([f.with_nullable(True) for f in schema])

    def add(self, batch) -> None:
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        if batch.num_rows == 0:
            return
        if self.schema is None:
            self.schema = self._nullable(batch.schema)
            self.data_schema = pa.schema([f for f in self.schema if f.name not in self.partition_by])
        table = pa.Table.from_batches([batch]).cast(self.schema)
        if not self.partition_by:
            self._buffer((), table.select(self.data_schema.names))
            return
        # Sort by the partition columns and cut the batch at each change of key.
        order = pc.sort_indices(table, sort_keys=[(c, "ascending", "at_end") for c in self.partition_by]
                                )
        table = table.take(order)
        changes = [0]
        if table.num_rows > 1:
            change = np.zeros(table.num_rows - 1, dtype=bool)
            for col in self.partition_by:
                values = table.column(col)
                same = pc.fill_null(pc.equal(values.slice(1), values.slice(0, table.num_rows - 1)), False)
                both_null = pc.and_(pc.is_null(values.slice(1)), pc.is_null(values.slice(0, table.num_rows - 1)))
                change |= ~pc.or_(same, both_null).to_numpy(zero_copy_only=False)
            changes += (np.nonzero(change)[0] + 1).tolist()
        # Key values only where a run starts: converting every row's key to Python costs more than the sort.
        starts = pa.array(changes, type=pa.int64())
        keys = list(zip(*(table.column(c).take(starts).to_pylist() for c in self.partition_by)))
        changes.append(table.num_rows)
        data = table.select(self.data_schema.names)
        for key, start, end in zip(keys, changes[:-1], changes[1:]):
            self._buffer(key, data.slice(start, end - start))

    def _buffer(self, key: tuple, table) -> None:
        self.buffers.setdefault(key, []).append(table)
        self.buffered[key] = self.buffered.get(key, 0) + table.num_rows
        if self.buffered[key] >= self.buffer_rows:
            self._flush(key)

    def _flush(self, key: tuple) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        chunks = self.buffers.pop(key, [])
        self.buffered.pop(key, None)
        if not chunks:
            return
        table = pa.concat_tables(chunks)
        offset = 0
        while offset < table.num_rows:
            if key not in self.open:
                rel_dir = "/".join(
                    f"{escape_partition_value(c)}="
                    f"{HIVE_NULL if v is None else escape_partition_value(partition_value_string(v))}"
                    for c, v in zip(self.partition_by, key)
                )
                rel = f"{rel_dir}/" if rel_dir else ""
                rel += f"{self.prefix}-{self.seq:04d}.snappy.parquet"
                self.seq += 1
                full = f"{self.root}/{rel}"
                os.makedirs(os.path.dirname(full), exist_ok=True)
                sample = table.slice(offset, _DICTIONARY_SAMPLE_ROWS)
                writer = pq.ParquetWriter(full, self.data_schema, compression="snappy",
                                          use_dictionary=dictionary_columns(sample), **_parquet_options())
                self.open[key] = [writer, rel, 0]
            writer, rel, rows = self.open[key]
            take = min(table.num_rows - offset, self.max_rows_per_file - rows)
            writer.write_table(table.slice(offset, take), row_group_size=take)
            offset += take
            self.open[key][2] = rows + take
            if self.open[key][2] >= self.max_rows_per_file:
                self._close(key)

    def _close(self, key: tuple) -> None:
        writer, rel, rows = self.open.pop(key)
        writer.close()
        full = f"{self.root}/{rel}"
        self.files.append({
            # Delta paths are URIs relative to the table root: escape '%' and friends once more.
            "path": quote(rel, safe="/=-_.~"),
            "local_path": rel,
            "partition_values": {c: partition_value_string(v) for c, v in zip(self.partition_by, key)},
            "size": os.path.getsize(full),
            "modification_time": int(time.time() * 1000),
            "num_records": rows,
            "stats": file_stats(full, rows, self.data_schema.names),
        })

    def finish(self) -> list[dict[str, Any]]:
        for key in list(self.buffers):
            self._flush(key)
        for key in list(self.open):
            self._close(key)
        return self.files


class DeltaRsDataSource(DataSource):
    """``df.write.format("inboxlift_deltars")``: data files for a Delta table, plus a manifest.

    Options: ``path`` (table root), ``manifest`` (where the file list goes),
    ``partition_by`` (JSON list), ``write_id`` (unique per write),
    ``max_rows_per_file``, ``buffer_rows``.
    """

    @classmethod
    def name(cls) -> str:
        return FORMAT_NAME

    def writer(self, schema: StructType, overwrite: bool) -> "DeltaRsArrowWriter":
        return DeltaRsArrowWriter(dict(self.options))


class DeltaRsArrowWriter(DataSourceArrowWriter):
    def __init__(self, options: dict[str, str]) -> None:
        self.root = options["path"]
        self.manifest = options["manifest"]
        self.partition_by = json.loads(options.get("partition_by", "[]"))
        self.write_id = options["write_id"]
        self.max_rows_per_file = int(options.get("max_rows_per_file", 5_000_000))
        self.buffer_rows = int(options.get("buffer_rows", 1_000_000))

    def write(self, iterator: Iterator[Any]) -> FilesWritten:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        task = ctx.partitionId() if ctx is not None else 0
        files = _PartitionedFileWriter(self.root, self.partition_by, self.write_id, task,
                                       self.max_rows_per_file, self.buffer_rows)
        for batch in iterator:
            files.add(batch)
        return FilesWritten(files=files.finish())

    def commit(self, messages: list[Any]) -> None:
        files = [f for m in messages if m is not None for f in m.files]
        tmp = f"{self.manifest}.tmp"
        os.makedirs(os.path.dirname(self.manifest), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as out:
            json.dump({"write_id": self.write_id, "files": files}, out)
        os.replace(tmp, self.manifest)

    def abort(self, messages: list[Any]) -> None:
        for message in messages:
            for f in getattr(message, "files", None) or []:
                try:
                    os.remove(f"{self.root}/{f['local_path']}")
                except OSError:
                    pass
