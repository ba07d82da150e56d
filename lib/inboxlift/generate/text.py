"""How landing text looks: ISO-8601 UTC timestamps, CSV fields, local wall-clock time.

Times are carried as epoch seconds (``bigint``) and formatted by arithmetic, so
the text does not depend on ``spark.sql.session.timeZone`` (Databricks
workspaces often set it to something other than UTC).
"""

from __future__ import annotations

from pyspark.sql import Column
from pyspark.sql import functions as F

SECONDS_PER_DAY = 86_400


def _two_digits(value: Column) -> Column:
    # lpad rather than format_string: java.util.Formatter is slow at millions of rows.
    return F.lpad(value.cast("int").cast("string"), 2, "0")


def iso_utc(seconds: Column) -> Column:
    """``2026-11-20T08:15:00Z`` for epoch seconds."""
    days = F.floor(seconds / SECONDS_PER_DAY)
    in_day = seconds - days * SECONDS_PER_DAY
    return F.concat(
        F.date_from_unix_date(days.cast("int")).cast("string"),
        F.lit("T"),
        _two_digits(in_day / 3600), F.lit(":"), _two_digits(in_day % 3600 / 60), F.lit(":"), _two_digits(in_day % 60),
        F.lit("Z"),
    )


def iso_date(days: Column) -> Column:
    """``1990-04-17`` for days since 1970-01-01."""
    return F.date_from_unix_date(days.cast("int")).cast("string")


def local_seconds(utc_seconds: Column, timezone: Column) -> Column:
    """Wall-clock seconds in ``timezone`` (as if that wall clock were UTC) for a UTC instant."""
    # from_utc_timestamp shifts the instant by the zone's offset at that instant (DST-aware);
    # unix_seconds then reads the shifted value back without any session time zone.
    return F.unix_seconds(F.from_utc_timestamp(F.timestamp_seconds(utc_seconds), timezone))


def utc_seconds(wall_seconds: Column, timezone: Column) -> Column:
    """The UTC instant of a wall-clock time in ``timezone`` (inverse of :func:`local_seconds`)."""
    return F.unix_seconds(F.to_utc_timestamp(F.timestamp_seconds(wall_seconds), timezone))


def csv_field(value: Column) -> Column:
    """One CSV field: empty for null, quoted (quotes doubled) when it holds a comma, quote or line break."""
    # Byte searches, not a regular expression: this runs for every field of every row.
    needs_quotes = value.contains(",") | value.contains('"') | value.contains("\n") | value.contains("\r")
    quoted = F.concat(F.lit('"'), F.replace(value, F.lit('"'), F.lit('""')), F.lit('"'))
    return F.coalesce(F.when(needs_quotes, quoted).otherwise(value), F.lit(""))


def csv_line(fields: list[Column]) -> Column:
    return F.concat_ws(",", *[csv_field(f) for f in fields])


def splice_bytes(line: Column, *, token: str, hex_bytes: Column) -> Column:
    """Replace ``token`` in ``line`` by raw bytes, which may be invalid UTF-8.

    JSON and CSV encoders go through Java strings, which would repair the bytes,
    so invalid sequences are spliced into the finished line. Casting binary to
    string does not validate, and ``concat``/``substring_index`` copy bytes.
    """
    raw = F.unhex(hex_bytes).cast("string")
    return F.concat(F.substring_index(line, token, 1), raw, F.substring_index(line, token, -1))
