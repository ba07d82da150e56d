"""Formats of an export checked on a sample, before anything is planned or written.

A wrong ``timestamp_format`` (or a number written ``2,55``) would otherwise quarantine every line
of the export, one ``bad_timestamp`` at a time. Each export file's first
``ingest.imports.format_sample_rows`` records are read with Spark's CSV reader and parsed exactly
as the import will parse them; a column of which more than half the non-empty sample values do
not parse stops the import with one :class:`ImportFormatError` naming the file, the column, the
format and a value that failed. A column that parses on the sample is not checked further: the
few bad values of the full run are quarantined as usual.
"""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING, Callable

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from inboxlift.settings import CatalogueImport, ClickstreamImport, CustomersImport, InvoiceLinesImport
from inboxlift.stages.ingest_plan import mapping_of
from inboxlift.stages.ingest_sources import FileRecords, read_csv_records
from inboxlift.transforms.imports import export_columns
from inboxlift.transforms.ingest import clean_text, is_number, parse_csv_records, parse_date, parse_timestamp

if TYPE_CHECKING:
    from inboxlift.context import RunContext
    from inboxlift.stages.ingest_plan import LandingFile

# At most this many files of one import are sampled (an export split into thousands of parts
# shares one format; the first ones say whether it is right).
MAX_SAMPLED_FILES = 20
# More than this share of a column's non-empty sample values failing is a wrong format.
FAILING_SHARE = 0.5


class ImportFormatError(ValueError):
    """An export's timestamps or numbers are not in the format its mapping says (found on a sample)."""


def header_names(header_line: str | None, delimiter: str) -> list[str]:
    """A CSV header's names: lower-case, trimmed, without a UTF-8 BOM."""
    text = (header_line or "").lstrip("\ufeff")
    fields = next(csv.reader(io.StringIO(text), delimiter=delimiter), [])
    return [name.strip().lstrip("\ufeff").lower() for name in fields]


Parser = Callable[[Column], Column]


def format_checks(mapping: InvoiceLinesImport | ClickstreamImport | CustomersImport | CatalogueImport
                  ) -> dict[str, tuple[str, Parser]]:
    """Our column -> (the format as the message states it, a parser giving null when the text does not parse)."""
    def timestamp(fmt: str, zone: str) -> tuple[str, Parser]:
        return (f"timestamp_format {fmt!r}", lambda text: parse_timestamp(text, fmt=fmt, zone=zone))

    def number() -> tuple[str, Parser]:
        return ("a plain decimal number such as 2.55 (no thousands separators or currency signs)",
                lambda text: F.when(is_number(text), F.lit(True)))

    if isinstance(mapping, InvoiceLinesImport):
        return {"invoice_date": timestamp(mapping.timestamp_format, mapping.timezone),
                "quantity": number(), "unit_price": number()}
    if isinstance(mapping, ClickstreamImport):
        return {"timestamp": timestamp(mapping.timestamp_format, mapping.timezone)}
    fmt, zone = mapping.timestamp_format, mapping.timezone_of_times
    if isinstance(mapping, CustomersImport):
        checks = {name: timestamp(fmt, zone) for name in ("signup_ts", "consent_ts", "updated_at")}
        checks["birthday"] = (f"YYYY-MM-DD or timestamp_format {fmt!r}",
                              lambda text: parse_date(text, fmt=fmt, zone=zone))
    else:
        checks = {"updated_at": timestamp(fmt, zone), "price": number(), "stock": number(),
                  "launched_at": (f"YYYY-MM-DD or timestamp_format {fmt!r}",
                                  lambda text: parse_date(text, fmt=fmt, zone=zone))}
    mapped = export_columns(mapping)
    return {name: check for name, check in checks.items() if name in mapped}


def check_export_formats(ctx: "RunContext", checked: dict[str, tuple["LandingFile", FileRecords | None]]) -> None:
    """Raise :class:`ImportFormatError` for the first export file whose sample fails a format."""
    sample_rows = max(1, ctx.settings.ingest.imports.format_sample_rows)
    readable = sorted((path, landing, records) for path, (landing, records) in checked.items()
                      if records is not None and records.records > 1)
    for path, landing, records in readable[:MAX_SAMPLED_FILES]:
        mapping = mapping_of(ctx, landing.kind)
        checks = format_checks(mapping)
        if not checks:
            continue
        columns = export_columns(mapping)
        sample = _sample(ctx, path, records, columns=columns, delimiter=mapping.delimiter, rows=sample_rows)
        aggregates = []
        for name, (_, parse) in checks.items():
            text = clean_text(F.col(name))
            bad = text.isNotNull() & parse(text).isNull()
            aggregates += [F.count(text).alias(f"{name}__present"), F.count_if(bad).alias(f"{name}__bad"),
                           F.min(F.when(bad, text)).alias(f"{name}__example")]
        # One row: a few counts per checked column of a sample of at most sample_rows records.
        row = sample.agg(*aggregates).first()
        for name, (stated, _) in checks.items():
            present, bad = row[f"{name}__present"], row[f"{name}__bad"]
            if present and bad > FAILING_SHARE * present:
                setting = f"ingest.imports.{landing.kind}"
                raise ImportFormatError(
                    f"{path}: column {columns[name]!r} ({name}) is not in the format the settings give: "
                    f"{bad} of the first {present} values fail to parse as {stated}, e.g. "
                    f"{row[f'{name}__example']!r}. Set the format under {setting} (nothing was imported)."
                )


def _sample(ctx: "RunContext", path: str, records: FileRecords, *, columns: dict[str, str], delimiter: str,
            rows: int) -> DataFrame:
    """The file's first ``rows`` records after its header, parsed against that header."""
    headers = ctx.spark.createDataFrame(
        [(path, records.first_pos, records.first_line, header_names(records.first_line, delimiter))],
        "source_file string, header_pos bigint, header_line string, header_fields array<string>")
    # limit() stops the scan early: a sample of a big export reads its first blocks only.
    lines = read_csv_records(ctx.spark, [path], delimiter=delimiter).limit(rows + 1)
    width = len(header_names(records.first_line, delimiter))
    parsed = lines.transform(parse_csv_records, headers=headers, columns=columns, widths=[width], delimiter=delimiter)
    return parsed.where(F.col("parse_error").isNull())
