"""Landing files as ingest sees them: listed, keyed relative to their root, checked, read, probed.

- Files are known by their path *relative to the landing root* (or to an import's folder), so a
  landing folder moved, or reached through another absolute path, is not read again.
- A file's size, modification time and (up to ``ingest.hash_max_mb``) SHA-256 are taken when it is
  planned; a redo compares them and refuses a file that changed or vanished.
- Readers turn files into *lines* (``source_file, pos, line``): JSON lines through Spark's text
  reader, CSV records through Spark's CSV reader (``multiLine``, ``PERMISSIVE``), so a quoted field
  may hold newlines and be megabytes long; no regular expression looks at the text.
- :func:`probe` reads a set of files once, counting each file's records (the independent ``read``
  count) and finding each file's first record (a CSV header); a file Spark cannot read (a truncated
  ``.gz``, a file gone missing) is named, with the reason, instead of failing the batch.
"""

from __future__ import annotations

import datetime as dt
import functools
import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlparse

from pyspark.errors import AnalysisException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

LINES_SCHEMA = "source_file string, pos bigint, line string"
# Why a whole file was not read: ``ingest_files.reason`` and the reason of its quarantine row.
FILE_REASONS: dict[str, str] = {
    "unreadable": "Spark could not read the file (a truncated or corrupt .gz, an unreadable file): the detail says why",
    "vanished": "the file was planned but no longer exists when its batch is read",
    "changed": "the file's size, modification time or content hash differs from when its batch was planned",
}
# The file names ingest reads in each landing folder.
LANDING_SUFFIXES = {
    "users": (".csv", ".csv.gz"),
    "products": (".csv", ".csv.gz"),
    "events": (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz"),
}
_CORRUPT = "_corrupt_record"
_GLOB = re.compile(r"([\[\]{}*?\\])")


@dataclass(frozen=True)
class FileStat:
    size: int
    modification_time: dt.datetime
    content_hash: str | None


@dataclass(frozen=True)
class FileRecords:
    """What a probe found in one readable file: its records, and its first one (a CSV header)."""

    records: int
    first_pos: int | None = None
    first_line: str | None = None


@dataclass(frozen=True)
class FileFailure:
    reason: str
    detail: str


# ---- roots and relative paths -------------------------------------------------------------------

def root_uri(root: str) -> str:
    """A folder as Spark spells the files under it: ``file:/abs/path`` locally, the URI otherwise.

    The path is made absolute but symbolic links are *not* resolved: a landing folder reached
    through a link keeps the link's spelling, as Spark's listing does.
    """
    root = root.rstrip("/")
    parsed = urlparse(root)
    if parsed.scheme == "file":
        return "file:" + os.path.abspath(parsed.path)
    if parsed.scheme == "" and not root.startswith("dbfs:"):
        return "file:" + os.path.abspath(root)
    return root


def relative_path(path: Column, root: str) -> Column:
    """``path`` relative to ``root`` (a :func:`root_uri`), or null when it is not under it."""
    prefix = root + "/"
    return F.when(path.startswith(prefix), F.substring(path, len(prefix) + 1, 1 << 30))


def relative_to(path: str, root: str) -> str | None:
    prefix = root + "/"
    return path[len(prefix):] if path.startswith(prefix) else None


def exists_locally_or_remote(root: str) -> bool:
    return "://" in root or root.startswith("dbfs:") or Path(root).exists()


# ---- listing and checks ---------------------------------------------------------------------------

def list_files(spark: SparkSession, folder: str, *, root: str, kind: str,
               suffixes: tuple[str, ...] | None) -> DataFrame | None:
    """``kind, path, rel_path, size, modification_time`` of the files under ``folder`` (or that one file).

    Spark's file listing works on every file system Spark reads (local, DBFS, volumes, object
    stores), and it skips hidden files and ``_``-prefixed markers like ``_SUCCESS``.
    """
    if not exists_locally_or_remote(folder):
        return None
    try:
        # binaryFile reads file contents only when the content column is selected.
        listing = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(folder)
    except AnalysisException as exc:
        if exc.getCondition() == "PATH_NOT_FOUND":
            return None
        raise
    files = listing.select(
        F.lit(kind).alias("kind"), "path", relative_path(F.col("path"), root).alias("rel_path"),
        F.col("length").alias("size"), F.col("modificationTime").alias("modification_time"),
    )
    if suffixes:
        files = files.where(functools.reduce(operator.or_, [F.lower("path").endswith(s) for s in suffixes]))
    return files


def stat_files(spark: SparkSession, paths: Iterable[str], *, hash_max_bytes: int) -> dict[str, FileStat]:
    """Size, modification time and (files up to ``hash_max_bytes``) SHA-256 of the files that exist now."""
    paths = list(paths)
    if not paths:
        return {}
    try:
        return _stat(spark, paths, hash_max_bytes)
    except AnalysisException as exc:
        if exc.getCondition() != "PATH_NOT_FOUND":
            raise
    # Some file is gone: one listing per file tells which (metadata only, the rare path).
    found: dict[str, FileStat] = {}
    for path in paths:
        try:
            found.update(_stat(spark, [path], hash_max_bytes))
        except AnalysisException as exc:
            if exc.getCondition() != "PATH_NOT_FOUND":
                raise
    return found


def _stat(spark: SparkSession, paths: list[str], hash_max_bytes: int) -> dict[str, FileStat]:
    files = spark.read.format("binaryFile").load(escape_globs(paths))
    # One row per file: metadata. The length filter is applied before any content is read.
    hashes = {r.path: r.sha for r in files.where(F.col("length") <= hash_max_bytes)
              .select("path", F.sha2(F.col("content"), 256).alias("sha")).collect()} if hash_max_bytes >= 0 else {}
    rows = files.select("path", "length", F.unix_micros("modificationTime").alias("mtime_us")).collect()
    return {r.path: FileStat(int(r.length), from_micros(r.mtime_us), hashes.get(r.path)) for r in rows}


def from_micros(us: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=int(us))


# ---- readers ---------------------------------------------------------------------------------------

def escape_globs(paths: Iterable[str]) -> list[str]:
    """Spark reads paths as glob patterns; a file name may hold [, {, * or ?."""
    return [_GLOB.sub(r"\\\1", p) for p in paths]


def _source_file() -> Column:
    # _metadata.file_path is URI-encoded (a space is %20); decoded, it is the listing's path.
    # "+" is a literal in a URI path but a space to url_decode, so it is protected first.
    encoded = F.col("_metadata.file_path")
    return F.coalesce(F.try_url_decode(F.replace(encoded, F.lit("+"), F.lit("%2B"))), encoded)


def read_text_lines(spark: SparkSession, paths: list[str]) -> DataFrame:
    """``source_file, pos, line``: one row per line, ``.gz`` decompressed, invalid UTF-8 kept as bytes."""
    if not paths:
        return spark.createDataFrame([], LINES_SCHEMA)
    return spark.read.text(escape_globs(paths)).select(
        _source_file().alias("source_file"),
        # Numbered at the scan, before any shuffle: increases with the position in each file.
        F.monotonically_increasing_id().alias("pos"),
        F.col("value").alias("line"),
    )


def csv_options(delimiter: str) -> dict[str, str]:
    """How ingest reads CSV: RFC 4180 quoting (a quote inside quotes is doubled), nothing trimmed."""
    if len(delimiter) != 1:
        raise ValueError(f"a CSV delimiter must be one character, got {delimiter!r}")
    return {"sep": delimiter, "quote": '"', "escape": '"', "ignoreLeadingWhiteSpace": "false",
            "ignoreTrailingWhiteSpace": "false"}


def read_csv_records(spark: SparkSession, paths: list[str], *, delimiter: str) -> DataFrame:
    """``source_file, pos, line``: one row per CSV *record* (quoted newlines included), header records too.

    Spark's CSV reader with a one-column schema: every record of two fields or more does not fit,
    so PERMISSIVE mode hands over its text, as read, in the corrupt-record column; the fields are
    then parsed against the record's own file header (:func:`parse_csv_records`). A one-field
    record is written back as CSV (quoted when it needs to be), so it parses to one field again.
    Blank lines are not records (the reader skips them). Invalid UTF-8 arrives as U+FFFD.
    """
    if not paths:
        return spark.createDataFrame([], LINES_SCHEMA)
    options = csv_options(delimiter)
    frame = (spark.read.schema(f"_c0 string, {_CORRUPT} string")
             .options(**options, multiLine="true", mode="PERMISSIVE", columnNameOfCorruptRecord=_CORRUPT)
             .csv(escape_globs(paths)))
    one_field = F.to_csv(F.struct(F.coalesce(F.col("_c0"), F.lit("")).alias("_c0")), options)
    return frame.select(
        _source_file().alias("source_file"),
        F.monotonically_increasing_id().alias("pos"),
        F.coalesce(F.col(_CORRUPT), one_field).alias("line"),
    )


# ---- probes ----------------------------------------------------------------------------------------

Reader = Callable[[list[str]], DataFrame]


def probe(spark: SparkSession, paths: list[str], read: Reader, *,
          with_first: bool) -> tuple[dict[str, FileRecords], dict[str, FileFailure]]:
    """Read ``paths`` once: each readable file's records (and first record), and the files that failed.

    The files are read together; only when that fails is each read alone, to name the culprits
    (a file gone missing since it was listed is ``vanished``, any other failure ``unreadable``),
    and the others are read together again: a record's ``pos`` depends on which files are read
    together, and the stage finds each file's header by the ``pos`` seen here.
    """
    if not paths:
        return {}, {}
    try:
        return _records_per_file(read(paths), paths, with_first=with_first), {}
    except Exception:  # noqa: BLE001 - any failure of the shared read: find the file(s) behind it
        pass
    failures: dict[str, FileFailure] = {}
    for path in paths:
        try:
            _records_per_file(read([path]), [path], with_first=False)
        except Exception as exc:  # noqa: BLE001 - whatever Spark raised, the file is not readable
            gone = not stat_files(spark, [path], hash_max_bytes=-1)
            failures[path] = FileFailure("vanished", "the file no longer exists") if gone \
                else FileFailure("unreadable", error_summary(exc))
    readable = [p for p in paths if p not in failures]
    return (_records_per_file(read(readable), readable, with_first=with_first) if readable else {}), failures


def _records_per_file(lines: DataFrame, paths: list[str], *, with_first: bool) -> dict[str, FileRecords]:
    first = [F.min_by(F.struct("pos", "line"), "pos").alias("first")] if with_first else []
    # One row per file: counts (and the header record), not data.
    rows = lines.groupBy("source_file").agg(F.count(F.lit(1)).alias("records"), *first).collect()
    found = {r.source_file: FileRecords(int(r.records), *((r.first.pos, r.first.line) if with_first else ()))
             for r in rows}
    return {p: found.get(p, FileRecords(0)) for p in paths}


def error_summary(exc: BaseException) -> str:
    """The root cause of a Spark error in one line (the last "Caused by:", else the first line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line[len("Caused by:"):].strip() for line in lines if line.startswith("Caused by:")]
    text = causes[-1] if causes else (lines[0] if lines else type(exc).__name__)
    return text[:500]
