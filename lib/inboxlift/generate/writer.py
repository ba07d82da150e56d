"""Writing landing files: Spark writes text parts, the driver gives them their batch names.

Spark names part files with a random UUID and a ``.txt`` suffix. A shop's
export has stable names, so each part is moved to
``<entity>/<batch_id>-part-NNNNN.<ext>[.gz]``: the files of one batch sort
together, a second batch adds files beside them, and re-running the same batch
replaces exactly its own files. Only file names pass through the driver.

``landing_dir`` must be a path the driver can see as a file system (a local
folder, ``/dbfs/...`` or ``/Volumes/...`` on Databricks).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F


def lines_of(frame: DataFrame, *lines: Column) -> DataFrame:
    """One ``value`` row per non-null line, in the given order, for every row of ``frame``.

    Nulls are dropped after the explode, not inside the array: a higher-order
    ``filter`` would run without generated code. ``explode_outer``, because for
    ``explode`` Spark infers a "non-empty array" filter that would build every line twice.
    """
    return frame.select(F.explode_outer(F.array(*lines)).alias("value")).where(F.col("value").isNotNull())


def with_header_first(frame: DataFrame, *, header: str, line: Column, extra: Column) -> DataFrame:
    """One ``value`` column: the header before the first row of every partition, then each row's lines.

    Every part file then starts with its own header, as CSV readers expect.
    """
    # The low 33 bits of monotonically_increasing_id count rows within a partition.
    marked = frame.withColumn("_is_first", (F.monotonically_increasing_id() % (1 << 33)) == 0)
    return lines_of(marked, F.when(F.col("_is_first"), F.lit(header)), line, extra)


def write_lines(lines: DataFrame, *, folder: str, batch_id: str, extension: str, gzip: bool) -> list[str]:
    """Write a one-string-column DataFrame as text parts named ``<batch_id>-part-NNNNN.<extension>[.gz]``.

    Returns:
        The files written, sorted by part number.
    """
    target = Path(folder)
    staging = target.parent / "_staging" / f"{batch_id}-{target.name}"
    lines.write.mode("overwrite").option("compression", "gzip" if gzip else "none").text(str(staging))

    suffix = f".{extension}.gz" if gzip else f".{extension}"
    parts = sorted(p for p in staging.iterdir() if p.name.startswith("part-") and p.stat().st_size > 0)
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob(f"{batch_id}-part-*"):
        old.unlink()
    written = []
    for number, part in enumerate(parts):
        final = target / f"{batch_id}-part-{number:05d}{suffix}"
        part.rename(final)
        written.append(str(final))
    shutil.rmtree(staging)
    if not any(staging.parent.iterdir()):
        staging.parent.rmdir()
    return written
