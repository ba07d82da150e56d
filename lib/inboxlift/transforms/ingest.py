"""Pure steps of ingest: parse landing records, validate and normalise them, deduplicate, classify.

The parsers take a *lines* frame: ``source_file``, ``pos`` and ``line``. ``pos``
orders the records of one file (it is not a line number: Spark numbers rows per
read partition, and a file's rows come in order). For JSON lines, ``line`` is the
raw text as Spark's text reader hands it over (bytes that are not UTF-8 are kept
as they are); for CSV it is one record as Spark's CSV reader found it, quoted
newlines included (invalid UTF-8 arrives as U+FFFD).

Every record (CSV header records are not) leaves these steps with exactly one
``outcome``:

- ``quarantined``: ``reasons`` holds one or more codes of :data:`REASONS`, in
  that table's order, so the first (``reason``) is the most basic problem;
- ``duplicate``: a valid record whose id was seen first (in the table, or
  earlier in the batch: lower ``source_file``, then lower ``pos``); for users
  and products, an exact repeat of an earlier record;
- ``accepted``: everything else.

So read = accepted + duplicates + quarantined, for any input. The stage checks
that against an independent count of the records it read.

Normalisation: strings are trimmed (an empty string is null), event types are
lower-case snake_case, currencies upper-case ISO codes, e-mail addresses as
``email-validator`` normalises them, then lower-case (:mod:`inboxlift.transforms.fields`),
names and brands without control or bidi characters, timestamps UTC instants,
money ``decimal(12,2)``, counts ``int``, flags ``boolean``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    BooleanType,
    DateType,
    DecimalType,
    IntegerType,
    LongType,
    MapType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from inboxlift.schemas import EVENT_TYPES, require_columns
from inboxlift.settings import IngestSettings
from inboxlift.transforms.fields import HEADER_TEXT_COLUMNS, ID_COLUMNS, is_bad_id, normalise_email, strip_unsafe_text

ACCEPTED = "accepted"
DUPLICATE = "duplicate"
QUARANTINED = "quarantined"

# Reason codes, most basic first: a record's first reason is the one it is counted under.
REASONS: dict[str, str] = {
    "invalid_utf8": "the line holds bytes that are not UTF-8",
    "blank_line": "the line is empty or white space",
    "malformed_json": "the line is not one JSON object",
    "malformed_csv": "the record has a different number of fields than its file's header, or an unpaired quote",
    "repeated_header": "the record repeats its file's header (as in concatenated exports)",
    "bad_header": "the file's header lacks columns of the landing contract",
    "missing_event_id": "no event_id",
    "missing_user_id": "no user_id",
    "missing_item_id": "no item_id (item events) or stock code",
    "bad_id": "an id that does not match the id pattern (transforms/fields.py): a JSON array, object or "
              "fraction, NaN, control characters...",
    "missing_event_type": "no event_type",
    "unknown_event_type": "an event type outside the accepted list",
    "missing_timestamp": "no event_ts (events) or updated_at (users, products)",
    "bad_timestamp": "a timestamp that does not parse",
    "future_timestamp": "a timestamp after now + ingest.future_skew_minutes",
    "before_shop_opened": "an event before ingest.shop_opened",
    "non_numeric_price": "a price that is not a number",
    "negative_price": "a price below zero",
    "price_out_of_range": "a price that does not fit decimal(12,2)",
    "bad_currency": "a currency that is not a three-letter code",
    "bad_quantity": "a quantity that is not a whole number above zero",
    "bad_rating": "a rating that is not a whole number in [rating_min, rating_max]",
    "bad_properties": "event properties that are not one JSON object",
    "bad_stock": "a stock level that is not a whole number >= 0",
    "bad_date": "a date that does not parse, or a birthday in the future",
    "bad_boolean": "a flag that is not true/false/yes/no/1/0",
    "bad_email": "an e-mail address that email-validator rejects (syntax, or a domain that is not public)",
    "string_too_long": "a field longer than ingest.max_string_length",
    "excluded_item": "an export line for a non-product code (postage, fees, adjustments)",
    "unknown_user": "a user_id in neither the users table nor this batch's users",
    "unknown_item": "an item_id in neither the products table nor this batch's products",
}

# Events that are about one product. Search, e-mail, unsubscribe and bounce events have no item:
# an e-mail event may name one (the product clicked), and then it must be a known item.
ITEM_EVENT_TYPES = ("view", "add_to_cart", "remove_from_cart", "purchase", "review", "return")

LINE_COLUMNS = ("source_file", "pos", "line")
RECORD_COLUMNS = ("source_file", "pos", "line", "parse_error")
_MONEY = DecimalType(12, 2)

EVENT_FIELDS = StructType([
    StructField("event_id", StringType()),
    StructField("user_id", StringType()),
    StructField("item_id", StringType()),
    StructField("event_type", StringType()),
    StructField("event_ts", TimestampType()),
    StructField("event_date", DateType()),
    StructField("session_id", StringType()),
    StructField("order_id", StringType()),
    StructField("quantity", IntegerType()),
    StructField("price", _MONEY),
    StructField("currency", StringType()),
    StructField("query", StringType()),
    StructField("rating", IntegerType()),
    StructField("review_text", StringType()),
    StructField("campaign_id", StringType()),
    StructField("message_id", StringType()),
])
USER_FIELDS = StructType([
    StructField("user_id", StringType()),
    StructField("email", StringType()),
    StructField("first_name", StringType()),
    StructField("locale", StringType()),
    StructField("timezone", StringType()),
    StructField("country", StringType()),
    StructField("birthday", DateType()),
    StructField("signup_ts", TimestampType()),
    StructField("email_consent", BooleanType()),
    StructField("consent_ts", TimestampType()),
    StructField("updated_at", TimestampType()),
])
PRODUCT_FIELDS = StructType([
    StructField("item_id", StringType()),
    StructField("name", StringType()),
    StructField("description", StringType()),
    StructField("category_path", StringType()),
    StructField("category", StringType()),
    StructField("brand", StringType()),
    StructField("price", _MONEY),
    StructField("currency", StringType()),
    StructField("image_url", StringType()),
    StructField("url", StringType()),
    StructField("stock", IntegerType()),
    StructField("in_stock", BooleanType()),
    StructField("launched_at", DateType()),
    StructField("updated_at", TimestampType()),
])
_LINEAGE = [StructField("source_file", StringType()), StructField("ingested_at", TimestampType())]
# Event-specific values (the tracking service's variant, link position, scope...): a JSON object in
# the landing line, a map of text here.
PROPERTIES = StructField("properties", MapType(StringType(), StringType()))

# The tables' schemas: the contract with every later stage.
EVENTS_TABLE = StructType(list(EVENT_FIELDS.fields) + [PROPERTIES] + _LINEAGE)
USERS_TABLE = StructType(list(USER_FIELDS.fields) + _LINEAGE)
PRODUCTS_TABLE = StructType(list(PRODUCT_FIELDS.fields) + _LINEAGE)
QUARANTINE_TABLE = StructType([
    StructField("entity", StringType()),
    StructField("source_file", StringType()),
    StructField("line", StringType()),
    StructField("record_id", StringType()),
    StructField("reasons", ArrayType(StringType())),
    StructField("reason", StringType()),
    StructField("batch", LongType()),
    StructField("run_id", StringType()),
    StructField("quarantined_at", TimestampType()),
])

_TRIMMED = " \t\n\r\x0b\x0c\u00a0\ufeff"
_TRIMMED_SQL = "".join(f"\\u{ord(c):04x}" for c in _TRIMMED)  # the same characters as SQL escapes
_NUMBER = r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$"
_SECONDS_PER_DAY = 86_400
_TRUE = ("true", "t", "yes", "y", "1")
_FALSE = ("false", "f", "no", "n", "0")


@dataclass(frozen=True)
class Rules:
    """The validation thresholds of one batch; ``now`` is the batch's planning time, so a redo judges alike."""

    now: dt.datetime
    # None: no lower bound (ingest.shop_opened unset).
    shop_opened: dt.datetime | None = None
    future_skew_minutes: int = 10
    max_string_length: int = 2000
    rating_min: int = 1
    rating_max: int = 5

    @classmethod
    def from_settings(cls, settings: IngestSettings, *, now: dt.datetime) -> "Rules":
        opened = (dt.datetime.combine(dt.date.fromisoformat(settings.shop_opened), dt.time(), tzinfo=dt.timezone.utc)
                  if settings.shop_opened else None)
        return cls(now=now, shop_opened=opened, future_skew_minutes=settings.future_skew_minutes,
                   max_string_length=settings.max_string_length, rating_min=settings.rating_min,
                   rating_max=settings.rating_max)

    @property
    def latest_allowed(self) -> dt.datetime:
        return self.now + dt.timedelta(minutes=self.future_skew_minutes)


# ---- checks and column helpers -----------------------------------------------------------------

def clean_text(text: Column) -> Column:
    """Trimmed (white space, no-break space, BOM), with the empty string as null."""
    # btrim takes a set of characters, not a pattern: much cheaper than a regex on every field.
    return F.nullif(F.btrim(text, F.lit(_TRIMMED)), F.lit(""))


def utc_date(ts: Column) -> Column:
    """The UTC calendar date of an instant, whatever the session time zone."""
    return F.date_from_unix_date(F.floor(F.unix_seconds(ts) / _SECONDS_PER_DAY).cast("int"))


def parse_timestamp(text: Column, *, fmt: str = "iso", zone: str = "UTC") -> Column:
    """A UTC instant from text, or null.

    Args:
        fmt: ``iso`` (ISO-8601; without an offset the time is UTC), ``epoch_ms``, ``epoch_s``,
            or a Spark datetime pattern whose wall-clock times are in ``zone``.
    """
    if fmt == "iso":
        upper = F.upper(text)
        is_date = upper.rlike(r"^\d{4}-\d{2}-\d{2}$")
        has_offset = upper.rlike(r"(Z|[+-]\d{2}(:?\d{2})?)$")
        # Appending Z makes the cast independent of spark.sql.session.timeZone.
        full = (F.when(is_date, F.concat(upper, F.lit("T00:00:00Z")))
                .when(has_offset, upper)
                .otherwise(F.concat(upper, F.lit("Z"))))
        return full.try_cast("timestamp")
    if fmt in ("epoch_ms", "epoch_s"):
        # 15 digits bound the value far below the long overflow of timestamp_millis.
        digits = F.when(text.rlike(r"^\d{1,15}$"), text.try_cast("bigint"))
        return F.timestamp_millis(digits) if fmt == "epoch_ms" else F.timestamp_seconds(digits)
    # The zone goes into the text, so the pattern's wall clock is read in that zone, not the session's.
    return F.try_to_timestamp(F.concat(text, F.lit(" " + zone)), F.lit(fmt + " VV"))


def parse_date(text: Column, *, fmt: str = "iso", zone: str = "UTC") -> Column:
    """A date from ``YYYY-MM-DD``, or the UTC date of a timestamp in ``fmt``."""
    plain = F.when(text.rlike(r"^\d{4}-\d{2}-\d{2}$"), text.try_cast("date"))
    return F.coalesce(plain, utc_date(parse_timestamp(text, fmt=fmt, zone=zone)))


def is_number(text: Column) -> Column:
    """A plain decimal number (no NaN, Infinity, thousands separators or currency signs)."""
    return text.rlike(_NUMBER)


def parse_money(text: Column) -> Column:
    return F.when(is_number(text), text.try_cast(_MONEY))


def parse_whole(text: Column) -> Column:
    """An int from ``3`` or ``3.0``; null for fractions, words and values beyond int."""
    return _whole(_number(text))


def _number(text: Column) -> Column:
    return F.when(is_number(text), text.try_cast(DecimalType(24, 6)))


def _whole(number: Column) -> Column:
    return F.when(number == F.floor(number), number.try_cast("int"))


def parse_flag(text: Column) -> Column:
    lowered = F.lower(text)
    return F.when(lowered.isin(*_TRUE), F.lit(True)).when(lowered.isin(*_FALSE), F.lit(False))


def reasons_array(checks: Mapping[str, Column]) -> Column:
    """The codes whose condition holds, in :data:`REASONS` order (a null condition does not hold)."""
    unknown = sorted(set(checks) - set(REASONS))
    if unknown:
        raise ValueError(f"unknown reason codes {unknown}; known: {list(REASONS)}")
    # Joined text, split only when not empty: plain generated code, where array_compact runs a
    # lambda per row (measured: about a third of the cost of validating an event).
    joined = F.concat_ws(",", *[F.when(checks[c], F.lit(c)) for c in REASONS if c in checks])
    return F.when(joined == "", F.array().cast("array<string>")).otherwise(F.split(joined, ",", -1))


def _too_long(columns: Iterable[str], limit: int) -> Column:
    return F.greatest(*[F.coalesce(F.length(F.col(c)), F.lit(0)) for c in columns], F.lit(0)) > limit


def _base_checks(records: DataFrame) -> dict[str, Column]:
    parse_error = F.col("parse_error")
    return {
        # Spark's text reader keeps undecodable bytes as they are; a line repaired upstream shows U+FFFD.
        "invalid_utf8": ~F.is_valid_utf8(F.col("line")) | (F.instr(F.col("line"), "\ufffd") > 0),
        "blank_line": parse_error == "blank_line",
        "malformed_json": parse_error == "malformed_json",
        "malformed_csv": parse_error == "malformed_csv",
        "repeated_header": parse_error == "repeated_header",
        "bad_header": parse_error == "bad_header",
    }


def _text_fields(records: DataFrame, names: Iterable[str]) -> DataFrame:
    """Cleaned text of the named fields, null for lines that did not parse.

    Fields that reach a header or a subject (:data:`HEADER_TEXT_COLUMNS`) also lose their control
    and bidi/format characters (:func:`strip_unsafe_text`).
    """
    parsed = F.col("parse_error").isNull()
    names = list(names)

    def cleaned(name: str) -> Column:
        text = F.col(name)
        return clean_text(strip_unsafe_text(text) if name in HEADER_TEXT_COLUMNS else text)

    return records.select(*RECORD_COLUMNS, *[c for c in records.columns if c not in RECORD_COLUMNS and c not in names],
                          *[F.when(parsed, cleaned(n)).alias(n) for n in names])


def _bad_ids(names: Iterable[str]) -> Column:
    """Any of the named (cleaned) id columns present but not a valid id."""
    return F.greatest(*[F.coalesce(is_bad_id(F.col(n)), F.lit(False)) for n in names], F.lit(False))


# ---- parsing ----------------------------------------------------------------------------------

def parse_json_lines(lines: DataFrame, *, fields: StructType) -> DataFrame:
    """One JSON object per line -> its fields as text (a number or object as Spark's JSON reader writes it).

    Returns ``source_file, pos, line, parse_error, <fields>``; ``parse_error`` is
    ``blank_line``, ``malformed_json`` (not JSON, or JSON but not an object) or null.
    """
    require_columns(lines, LINE_COLUMNS, step="parse_json_lines")
    corrupt = "_corrupt_record"
    schema = StructType([StructField(f.name, StringType()) for f in fields.fields] + [StructField(corrupt, StringType())])
    # Each step reads the previous one's column: an expression inside CASE WHEN is not shared by
    # Spark's common-subexpression elimination, and JSON parsing is the costliest step of all.
    # SQL's TRIM(LEADING ... FROM ...): the two-argument ltrim() logs a deprecation warning per query.
    text = F.expr(f"TRIM(LEADING '{_TRIMMED_SQL}' FROM line)")
    parsed = F.from_json(F.col("_text"), schema, {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": corrupt})
    is_blank = F.coalesce(F.col("_text") == "", F.lit(True))
    # from_json accepts arrays and scalars only by flagging them corrupt; an object line starts with "{".
    is_object = (F.col("_text").startswith("{") & F.col("_parsed").isNotNull()
                 & F.col("_parsed")[corrupt].isNull())
    parse_error = F.when(is_blank, F.lit("blank_line")).when(~is_object, F.lit("malformed_json"))
    return (
        lines.select(*LINE_COLUMNS, text.alias("_text"))
        .select(*LINE_COLUMNS, "_text", parsed.alias("_parsed"))
        .select(*LINE_COLUMNS, "_parsed", parse_error.alias("parse_error"))
        .select(*RECORD_COLUMNS, *[F.when(F.col("parse_error").isNull(), F.col("_parsed")[f.name]).alias(f.name)
                                   for f in fields.fields])
    )


def parse_csv_records(records: DataFrame, *, headers: DataFrame, columns: Mapping[str, str], widths: Sequence[int],
                      delimiter: str = ",") -> DataFrame:
    """CSV records -> the named columns as text, found by each file's own header.

    Args:
        records: ``source_file, pos, line``, one row per CSV record as Spark's CSV reader found it
            (quoted newlines inside), each file's header record included.
        headers: ``source_file, header_pos, header_line, header_fields`` (names lower-case,
            trimmed, without a BOM), one row per file.
        columns: output column -> header name (matched case-insensitively).
        widths: the distinct numbers of fields of the headers.
        delimiter: one character.

    Returns ``source_file, pos, line, parse_error, <columns>`` for every record but the headers;
    ``parse_error`` is ``bad_header`` (the file lacks a column), ``repeated_header`` (the header
    again, as in concatenated exports), ``malformed_csv`` (a field count other than the header's,
    or an odd number of quotes: one left open, or a bare quote in an unquoted field) or null.
    """
    require_columns(records, LINE_COLUMNS, step="parse_csv_records")
    require_columns(headers, ("source_file", "header_pos", "header_line", "header_fields"),
                    step="parse_csv_records (headers)")
    options = {"sep": delimiter, "quote": '"', "escape": '"', "ignoreLeadingWhiteSpace": "false",
               "ignoreTrailingWhiteSpace": "false", "mode": "PERMISSIVE", "columnNameOfCorruptRecord": "_corrupt"}
    width = F.size(F.col("header_fields"))
    # Spark's CSV parser, against a schema as wide as the record's own header: it flags any other
    # field count as a corrupt record. One parse per header width present.
    parses = {w: F.when(width == w, F.from_csv(F.col("line"), ", ".join(
        [f"_c{i} string" for i in range(w)] + ["_corrupt string"]), options)) for w in sorted(set(widths))}
    fields = F.coalesce(*[F.when(width == w, F.array(*[F.col(f"_p{w}")[f"_c{i}"] for i in range(w)]))
                          for w in parses], F.array().cast("array<string>")) if parses else F.array().cast("array<string>")
    wrong_count = F.coalesce(*[F.when(width == w, F.col(f"_p{w}")["_corrupt"].isNotNull()) for w in parses],
                             F.lit(True)) if parses else F.lit(True)
    # A quote left open runs to the end of the record (at the end of a file, with the right field
    # count, the parser would take it as a value). In RFC 4180 CSV every quote is paired: a
    # quoted field adds two, a quote inside one is doubled. Counted by length, not a pattern.
    quotes = F.length(F.col("line")) - F.length(F.replace(F.col("line"), F.lit('"'), F.lit("")))
    is_malformed = wrong_count | (quotes % 2 == 1)
    header = F.col("header_fields")
    positions = {out: F.array_position(header, F.lit(name.strip().lower())) for out, name in columns.items()}
    lacks_column = F.greatest(*[p == 0 for p in positions.values()], F.lit(False)) | header.isNull()
    parse_error = (F.when(lacks_column, F.lit("bad_header"))
                   .when(F.col("line") == F.col("header_line"), F.lit("repeated_header"))
                   .when(is_malformed, F.lit("malformed_csv")))
    # One row per file on the right: the join cannot multiply records.
    body = records.join(F.broadcast(headers.select("source_file", "header_pos", "header_line", "header_fields")),
                        on="source_file", how="left").where(~F.coalesce(F.col("pos") == F.col("header_pos"),
                                                                         F.lit(False)))
    # Each step reads the previous one's columns, so each record is parsed once.
    return (
        body.select(*LINE_COLUMNS, "header_line", "header_fields", *[p.alias(f"_p{w}") for w, p in parses.items()])
        .select(*LINE_COLUMNS, "header_fields", parse_error.alias("parse_error"), fields.alias("_fields"))
        .select(*RECORD_COLUMNS,
                *[F.when(F.col("parse_error").isNull() & (p > 0),
                         F.try_element_at(F.col("_fields"), p.cast("int"))).alias(out)
                  for out, p in positions.items()])
    )


# ---- validation -------------------------------------------------------------------------------

def validate_events(records: DataFrame, *, rules: Rules, event_types: Sequence[str] = EVENT_TYPES,
                    timestamp_format: str = "iso", timezone: str = "UTC", allow_anonymous: bool = False,
                    excluded_item_ids: Sequence[str] = (), carry: Sequence[str] = ()) -> DataFrame:
    """Landing-shaped event records (text) -> typed, normalised events with their reasons.

    Args:
        rules: thresholds; ``rules.now`` bounds future timestamps.
        event_types: the accepted types (after lower-casing, spaces and hyphens as ``_``).
        timestamp_format, timezone: how ``event_ts`` is written (see :func:`parse_timestamp`).
        allow_anonymous: a missing user_id is an anonymous event, not an error (exports).
        excluded_item_ids: item ids that are not products (quarantined as ``excluded_item``).
        carry: extra text columns passed through (cleaned, length-checked), e.g. an export's country.

    Returns ``source_file, pos, line``, the event fields of :data:`EVENT_FIELDS`, ``properties``
    (a map; ``bad_properties`` when the text is not a JSON object), ``carry``, ``reasons`` and
    ``payload_hash`` (of the typed event fields and properties, to tell duplicates apart).
    """
    text_names = [f.name for f in EVENT_FIELDS.fields if f.name != "event_date"] + [PROPERTIES.name]
    require_columns(records, [*RECORD_COLUMNS, *text_names, *carry], step="validate_events")
    text = _text_fields(records, [*text_names, *carry])

    price_text, quantity_text, rating_text = F.col("price"), F.col("quantity"), F.col("rating")
    # Two steps, each reading the previous one's columns, so no parse runs twice per line.
    parsed = text.select(
        "source_file", "pos", "line", "parse_error", "event_id", "user_id", "item_id",
        F.regexp_replace(F.lower(F.col("event_type")), r"[\s-]+", "_").alias("event_type"),
        parse_timestamp(F.col("event_ts"), fmt=timestamp_format, zone=timezone).alias("event_ts"),
        "session_id", "order_id", F.upper(F.col("currency")).alias("currency"), "query", "review_text",
        "campaign_id", "message_id", *carry,
        F.from_json(F.col("properties"), PROPERTIES.dataType).alias("properties"),
        # The raw texts, for the checks below.
        F.col("event_type").alias("_type_text"), F.col("event_ts").alias("_ts_text"),
        price_text.alias("_price_text"), quantity_text.alias("_quantity_text"), rating_text.alias("_rating_text"),
        F.col("properties").alias("_properties_text"),
        is_number(price_text).alias("_is_price_number"),
        _number(quantity_text).alias("_quantity_number"), _number(rating_text).alias("_rating_number"),
        _too_long([*text_names, *carry], rules.max_string_length).alias("_is_too_long"),
        _bad_ids(ID_COLUMNS).alias("_has_bad_id"),
    )
    typed = parsed.withColumns({
        "event_date": utc_date(F.col("event_ts")),
        "price": F.when(F.col("_is_price_number"), F.col("_price_text").try_cast(_MONEY)),
        "quantity": _whole(F.col("_quantity_number")),
        "rating": _whole(F.col("_rating_number")),
    })
    present = F.col("parse_error").isNull()
    checks = {
        **_base_checks(typed),
        "missing_event_id": present & F.col("event_id").isNull(),
        "missing_user_id": present & F.col("user_id").isNull() & F.lit(not allow_anonymous),
        "missing_item_id": present & F.col("event_type").isin(*ITEM_EVENT_TYPES) & F.col("item_id").isNull(),
        "bad_id": F.col("_has_bad_id"),
        "missing_event_type": present & F.col("_type_text").isNull(),
        "unknown_event_type": F.col("_type_text").isNotNull() & ~F.col("event_type").isin(*event_types),
        "missing_timestamp": present & F.col("_ts_text").isNull(),
        "bad_timestamp": F.col("_ts_text").isNotNull() & F.col("event_ts").isNull(),
        "future_timestamp": F.col("event_ts") > F.lit(rules.latest_allowed),
        "before_shop_opened": (F.col("event_ts") < F.lit(rules.shop_opened)) if rules.shop_opened else F.lit(False),
        "non_numeric_price": F.col("_price_text").isNotNull() & ~F.col("_is_price_number"),
        "negative_price": F.col("_is_price_number") & (F.col("_price_text").try_cast("double") < 0),
        "price_out_of_range": F.col("_is_price_number") & F.col("price").isNull(),
        "bad_currency": F.col("currency").isNotNull() & ~F.col("currency").rlike("^[A-Z]{3}$"),
        "bad_quantity": F.col("_quantity_text").isNotNull() & ~F.coalesce(F.col("quantity") > 0, F.lit(False)),
        "bad_rating": F.col("_rating_text").isNotNull() & ~F.coalesce(
            F.col("rating").between(rules.rating_min, rules.rating_max), F.lit(False)),
        # from_json gives null for anything but an object (text, a number, an array, broken JSON).
        "bad_properties": F.col("_properties_text").isNotNull() & F.col("properties").isNull(),
        "string_too_long": F.col("_is_too_long"),
        "excluded_item": F.col("item_id").isin(*excluded_item_ids) if excluded_item_ids else F.lit(False),
    }
    event_names = [f.name for f in EVENT_FIELDS.fields]
    # A map cannot be hashed; its entries, sorted, can (so key order does not make a conflict).
    properties_entries = F.sort_array(F.map_entries(F.col(PROPERTIES.name)))
    return typed.select(
        "source_file", "pos", "line",
        *[F.col(f.name).cast(f.dataType).alias(f.name) for f in EVENT_FIELDS.fields],
        F.col(PROPERTIES.name),
        *carry,
        reasons_array(checks).alias("reasons"),
        F.xxhash64(*event_names, properties_entries).alias("payload_hash"),
    )


def validate_users(records: DataFrame, *, rules: Rules, timestamp_format: str = "iso", timezone: str = "UTC",
                   default_updated_at: dt.datetime | None = None) -> DataFrame:
    """Landing-shaped user records (text) -> typed, normalised users with their reasons.

    Args:
        timestamp_format, timezone: how ``signup_ts``, ``consent_ts``, ``updated_at`` are written
            (:func:`parse_timestamp`; exports may differ from landing files' ISO-8601).
        default_updated_at: ``updated_at`` of records without one (an export with no such column:
            the import's time), instead of quarantining them as ``missing_timestamp``.

    Returns ``source_file, pos, line``, the fields of :data:`USER_FIELDS`, ``reasons``, ``payload_hash``.
    """
    text_names = [f.name for f in USER_FIELDS.fields]
    require_columns(records, [*RECORD_COLUMNS, *text_names], step="validate_users")
    # The one Python step of validation, on its own column so it runs once per record.
    text = _text_fields(records, text_names).withColumn("_email", normalise_email(F.col("email")))
    raw = {n: F.col(n) for n in text_names}
    typed = {
        "user_id": raw["user_id"],
        "email": F.col("_email"),
        "first_name": raw["first_name"],
        "locale": raw["locale"],
        "timezone": raw["timezone"],
        # Two-letter country codes are upper-cased; longer names (from exports) are kept as written.
        "country": F.when(F.length(raw["country"]) == 2, F.upper(raw["country"])).otherwise(raw["country"]),
        "birthday": parse_date(raw["birthday"], fmt=timestamp_format, zone=timezone),
        "signup_ts": parse_timestamp(raw["signup_ts"], fmt=timestamp_format, zone=timezone),
        "email_consent": parse_flag(raw["email_consent"]),
        "consent_ts": parse_timestamp(raw["consent_ts"], fmt=timestamp_format, zone=timezone),
        "updated_at": _with_default(parse_timestamp(raw["updated_at"], fmt=timestamp_format, zone=timezone),
                                    raw["updated_at"], default_updated_at),
    }
    present = F.col("parse_error").isNull()
    latest = F.lit(rules.latest_allowed)

    def unparsed(name: str) -> Column:
        return raw[name].isNotNull() & typed[name].isNull()

    checks = {
        **_base_checks(text),
        "missing_user_id": present & raw["user_id"].isNull(),
        "bad_id": _bad_ids(["user_id"]),
        "missing_timestamp": present & typed["updated_at"].isNull() & raw["updated_at"].isNull(),
        "bad_timestamp": unparsed("signup_ts") | unparsed("consent_ts") | unparsed("updated_at"),
        # A future updated_at would win every later merge: it is as wrong as a future event.
        "future_timestamp": F.greatest(typed["updated_at"], typed["consent_ts"], typed["signup_ts"]) > latest,
        "bad_date": unparsed("birthday") | (typed["birthday"] > F.lit(rules.now.date())),
        "bad_boolean": unparsed("email_consent"),
        "bad_email": raw["email"].isNotNull() & typed["email"].isNull(),
        "string_too_long": _too_long(text_names, rules.max_string_length),
    }
    return text.select(
        "source_file", "pos", "line",
        *[typed[f.name].cast(f.dataType).alias(f.name) for f in USER_FIELDS.fields],
        reasons_array(checks).alias("reasons"),
        F.xxhash64(*[typed[f.name] for f in USER_FIELDS.fields]).alias("payload_hash"),
    )


def validate_products(records: DataFrame, *, rules: Rules, timestamp_format: str = "iso", timezone: str = "UTC",
                      default_updated_at: dt.datetime | None = None) -> DataFrame:
    """Landing-shaped product records (text) -> typed, normalised products with their reasons.

    ``timestamp_format``, ``timezone``, ``default_updated_at``: as for :func:`validate_users`.

    Returns ``source_file, pos, line``, the fields of :data:`PRODUCT_FIELDS`, ``reasons``, ``payload_hash``.
    """
    text_names = [f.name for f in PRODUCT_FIELDS.fields if f.name not in ("category", "in_stock")]
    require_columns(records, [*RECORD_COLUMNS, *text_names], step="validate_products")
    text = _text_fields(records, text_names)
    raw = {n: F.col(n) for n in text_names}
    stock = parse_whole(raw["stock"])
    typed = {
        "item_id": raw["item_id"],
        "name": raw["name"],
        "description": raw["description"],
        "category_path": raw["category_path"],
        "category": top_category(raw["category_path"]),
        "brand": raw["brand"],
        "price": parse_money(raw["price"]),
        "currency": F.upper(raw["currency"]),
        "image_url": raw["image_url"],
        "url": raw["url"],
        "stock": stock,
        "in_stock": stock > 0,
        "launched_at": parse_date(raw["launched_at"], fmt=timestamp_format, zone=timezone),
        "updated_at": _with_default(parse_timestamp(raw["updated_at"], fmt=timestamp_format, zone=timezone),
                                    raw["updated_at"], default_updated_at),
    }
    present = F.col("parse_error").isNull()
    checks = {
        **_base_checks(text),
        "missing_item_id": present & raw["item_id"].isNull(),
        "bad_id": _bad_ids(["item_id"]),
        "missing_timestamp": present & typed["updated_at"].isNull() & raw["updated_at"].isNull(),
        "bad_timestamp": raw["updated_at"].isNotNull() & typed["updated_at"].isNull(),
        "future_timestamp": typed["updated_at"] > F.lit(rules.latest_allowed),
        "non_numeric_price": raw["price"].isNotNull() & ~is_number(raw["price"]),
        "negative_price": is_number(raw["price"]) & (raw["price"].try_cast("double") < 0),
        "price_out_of_range": is_number(raw["price"]) & typed["price"].isNull(),
        "bad_currency": typed["currency"].isNotNull() & ~typed["currency"].rlike("^[A-Z]{3}$"),
        "bad_stock": raw["stock"].isNotNull() & ~F.coalesce(stock >= 0, F.lit(False)),
        "bad_date": raw["launched_at"].isNotNull() & typed["launched_at"].isNull(),
        "string_too_long": _too_long(text_names, rules.max_string_length),
    }
    return text.select(
        "source_file", "pos", "line",
        *[typed[f.name].cast(f.dataType).alias(f.name) for f in PRODUCT_FIELDS.fields],
        reasons_array(checks).alias("reasons"),
        F.xxhash64(*[typed[f.name] for f in PRODUCT_FIELDS.fields]).alias("payload_hash"),
    )


def _with_default(parsed: Column, raw: Column, default: dt.datetime | None) -> Column:
    """The parsed value; where the text is absent, ``default`` (a bad text stays null: bad_timestamp)."""
    if default is None:
        return parsed
    return F.when(raw.isNull(), F.lit(default).cast("timestamp")).otherwise(parsed)


def top_category(category_path: Column) -> Column:
    """``Home`` from ``Home > Kitchen > Cookware`` (also ``/`` or ``|`` separated)."""
    return clean_text(F.try_element_at(F.split(category_path, r"\s*[>/|]\s*"), F.lit(1)))


def with_reference_checks(events: DataFrame, *, known_users: DataFrame, known_items: DataFrame) -> DataFrame:
    """Add ``unknown_user`` / ``unknown_item`` to events naming a user or item that is not known.

    Args:
        known_users: a ``user_id`` column (the users table and this batch's users).
        known_items: an ``item_id`` column (the products table and this batch's products).
    """
    require_columns(events, ("user_id", "item_id", "reasons"), step="with_reference_checks")
    require_columns(known_users, ("user_id",), step="with_reference_checks (known_users)")
    require_columns(known_items, ("item_id",), step="with_reference_checks (known_items)")
    # distinct(): one row per id on the right, so the left joins cannot multiply events.
    users = known_users.select("user_id").where(F.col("user_id").isNotNull()).distinct() \
        .withColumn("_is_known_user", F.lit(True))
    items = known_items.select("item_id").where(F.col("item_id").isNotNull()).distinct() \
        .withColumn("_is_known_item", F.lit(True))
    joined = events.join(users, on="user_id", how="left").join(items, on="item_id", how="left")
    unknown = reasons_array({
        "unknown_user": F.col("user_id").isNotNull() & F.col("_is_known_user").isNull(),
        "unknown_item": F.col("item_id").isNotNull() & F.col("_is_known_item").isNull(),
    })
    # unknown_user and unknown_item come last in REASONS: appending keeps the order.
    return joined.withColumn("reasons", F.concat(F.col("reasons"), unknown)).select(*events.columns)


# ---- deduplication and outcome ----------------------------------------------------------------

def classify_events(events: DataFrame, *, existing_ids: DataFrame) -> DataFrame:
    """Give every event its ``outcome``; first seen wins among valid events with the same id.

    An id already in ``existing_ids`` (the events table) makes every valid copy a duplicate;
    otherwise the copy with the lowest ``(source_file, pos)`` is accepted. ``is_conflicting``
    marks a duplicate whose payload differs from the accepted copy in this batch (a duplicate
    of a table row is not compared: that would mean reading the whole table). ``line`` is kept
    for quarantined events only.
    """
    require_columns(events, ("event_id", "source_file", "pos", "line", "reasons", "payload_hash"),
                    step="classify_events")
    require_columns(existing_ids, ("event_id",), step="classify_events (existing_ids)")
    is_valid = F.size(F.col("reasons")) == 0
    batch = (events.withColumn("_is_valid", is_valid).withColumn("_from_table", F.lit(False))
             .withColumn("line", F.when(~F.col("_is_valid"), F.col("line"))))
    table = existing_ids.select("event_id").withColumn("_is_valid", F.lit(True)).withColumn("_from_table", F.lit(True))
    both = batch.unionByName(table, allowMissingColumns=True)
    # Valid rows first, table rows before batch rows, then file and position: a total order
    # (a batch's (source_file, pos) is unique; the table holds each id once).
    first_seen = Window.partitionBy("event_id").orderBy(
        F.col("_is_valid").desc(), F.col("_from_table").desc(), F.col("source_file").asc(), F.col("pos").asc())
    rank = F.row_number().over(first_seen)
    winner_hash = F.first("payload_hash").over(first_seen.rowsBetween(Window.unboundedPreceding, Window.currentRow))
    outcome = (F.when(~F.col("_is_valid"), F.lit(QUARANTINED))
               .when(rank == 1, F.lit(ACCEPTED))
               .otherwise(F.lit(DUPLICATE)))
    return (
        both.withColumn("outcome", outcome)
        .withColumn("is_conflicting", (F.col("outcome") == DUPLICATE)
                    & F.coalesce(winner_hash != F.col("payload_hash"), F.lit(False)))
        .where(~F.col("_from_table"))
        .select(*events.columns, "outcome", "is_conflicting")
    )


def classify_upserts(records: DataFrame, *, key: str) -> DataFrame:
    """Give every user or product record its ``outcome``.

    Valid records are all accepted (later ones update earlier ones when merged) except exact
    repeats of an earlier record (same key and payload), which are duplicates.
    """
    require_columns(records, (key, "source_file", "pos", "line", "reasons", "payload_hash"), step="classify_upserts")
    is_valid = F.size(F.col("reasons")) == 0
    same_record = Window.partitionBy(key, "payload_hash").orderBy(
        (~is_valid).asc(), F.col("source_file").asc(), F.col("pos").asc())
    outcome = (F.when(~is_valid, F.lit(QUARANTINED))
               .when(F.row_number().over(same_record) == 1, F.lit(ACCEPTED))
               .otherwise(F.lit(DUPLICATE)))
    return (
        records.withColumn("outcome", outcome)
        .withColumn("line", F.when(F.col("outcome") == QUARANTINED, F.col("line")))
        .withColumn("is_conflicting", F.lit(False))
        .select(*records.columns, "outcome", "is_conflicting")
    )


def summarise_outcomes(classified: DataFrame) -> DataFrame:
    """Records per outcome and first reason: ``outcome, reason, records, conflicting`` (a few rows)."""
    require_columns(classified, ("outcome", "reasons", "is_conflicting"), step="summarise_outcomes")
    return classified.groupBy(
        "outcome", F.try_element_at(F.col("reasons"), F.lit(1)).alias("reason"),
    ).agg(
        F.count(F.lit(1)).alias("records"),
        F.count(F.when(F.col("is_conflicting"), F.lit(1))).alias("conflicting"),
    ).select("outcome", "reason", "records", "conflicting")


# ---- table rows -------------------------------------------------------------------------------

def to_events_table(accepted: DataFrame, *, ingested_at: dt.datetime) -> DataFrame:
    """Accepted events -> rows of the ``events`` table."""
    require_columns(accepted, [f.name for f in EVENT_FIELDS.fields] + [PROPERTIES.name, "source_file"],
                    step="to_events_table")
    return accepted.select(
        *[F.col(f.name).cast(f.dataType) for f in EVENT_FIELDS.fields],
        F.col(PROPERTIES.name).cast(PROPERTIES.dataType),
        F.col("source_file"), F.lit(ingested_at).cast("timestamp").alias("ingested_at"),
    )


def to_quarantine(quarantined: DataFrame, *, entity: str, id_column: str, batch: int, run_id: str,
                  quarantined_at: dt.datetime) -> DataFrame:
    """Quarantined records -> rows of a quarantine table (raw line, all reasons, the first as ``reason``)."""
    require_columns(quarantined, ("source_file", "line", "reasons", id_column), step="to_quarantine")
    return quarantined.select(
        F.lit(entity).alias("entity"),
        "source_file",
        # Parquet strings must be UTF-8: undecodable bytes become U+FFFD here.
        F.make_valid_utf8(F.col("line")).alias("line"),
        F.make_valid_utf8(F.col(id_column).cast("string")).alias("record_id"),
        "reasons",
        F.try_element_at(F.col("reasons"), F.lit(1)).alias("reason"),
        F.lit(batch).cast("bigint").alias("batch"),
        F.lit(run_id).alias("run_id"),
        F.lit(quarantined_at).cast("timestamp").alias("quarantined_at"),
    )


def _newest(value: Column | str, order: Column) -> Column:
    """The value from the newest record that has one (a null never erases a known value)."""
    value = F.col(value) if isinstance(value, str) else value
    return F.max_by(value, F.when(value.isNotNull(), order))


def _stacked(incoming: DataFrame, current: DataFrame, *, key: str, fields: StructType,
             ingested_at: dt.datetime) -> DataFrame:
    """Incoming records and the current rows of the same keys, one frame, with a merge order."""
    names = [f.name for f in fields.fields]
    keys = incoming.select(key).distinct()
    current_rows = current.join(keys, on=key, how="left_semi").select(
        *names, "source_file", "ingested_at", F.lit(0).alias("_is_incoming"), F.lit(None).cast("bigint").alias("pos"))
    incoming_rows = incoming.select(
        *names, "source_file", F.lit(ingested_at).cast("timestamp").alias("ingested_at"),
        F.lit(1).alias("_is_incoming"), F.col("pos").cast("bigint"))
    return current_rows.unionByName(incoming_rows)


def _consent_time() -> Column:
    """When a record's consent decision was made: its ``consent_ts``, else its ``updated_at``.

    A shop's opt-in date is typically empty after an opt-out (docs/byod.md), and a null would sort
    below every dated grant: the withdrawal would lose to an older grant. A row of the ``users``
    table written before this rule may lack ``consent_ts``; its ``updated_at`` is the latest of all
    its records, no earlier than its consent, so it dates a withdrawal late (it stays withdrawn)
    but could date a grant late too: a table grant of unknown time stays undated, below every
    dated record, as before.
    """
    is_table_grant = (F.col("_is_incoming") == F.lit(0)) & F.coalesce(F.col("email_consent"), F.lit(False))
    return F.coalesce(F.col("consent_ts"), F.when(~is_table_grant, F.col("updated_at")))


def resolve_user_upserts(incoming: DataFrame, *, current: DataFrame, ingested_at: dt.datetime) -> DataFrame:
    """One row per incoming user: the user after applying every incoming record to the current row.

    - Attributes come from the newest record (``updated_at``; on a tie an incoming record beats
      the table, a later file or line beats an earlier one) that has a value: a missing value
      never erases a known one.
    - Consent (``email_consent`` with ``consent_ts``) comes from the record with the latest
      consent time (:func:`_consent_time`: ``consent_ts``, or ``updated_at`` when the record has
      none), then ``updated_at``; on a full tie a withdrawal wins. So a withdrawn consent is never
      overwritten by an older record. The row keeps that consent time as its ``consent_ts``, so
      the next merge compares the same instants.
    - ``signup_ts`` is the earliest known, ``updated_at`` the latest.

    Args:
        incoming: accepted records (:data:`USER_FIELDS`, ``source_file``, ``pos``).
        current: the ``users`` table (or an empty frame with its schema).
    """
    require_columns(incoming, [*USER_FIELDS.fieldNames(), "source_file", "pos"], step="resolve_user_upserts")
    require_columns(current, USERS_TABLE.fieldNames(), step="resolve_user_upserts (current)")
    rows = _stacked(incoming, current, key="user_id", fields=USER_FIELDS, ingested_at=ingested_at)
    order = F.struct("updated_at", "_is_incoming", "source_file", "pos")
    rows = rows.withColumn("_consent_at", _consent_time())
    consent_order = F.struct("_consent_at", "updated_at", (~F.col("email_consent")).alias("_is_withdrawal"),
                             "_is_incoming", "source_file", "pos")
    consent = F.max_by(F.struct("email_consent", F.col("_consent_at").alias("consent_ts")),
                       F.when(F.col("email_consent").isNotNull(), consent_order))
    attributes = ["email", "first_name", "locale", "timezone", "country", "birthday"]
    resolved = rows.groupBy("user_id").agg(
        *[_newest(c, order).alias(c) for c in attributes],
        F.min("signup_ts").alias("signup_ts"),
        consent.alias("_consent"),
        F.max("updated_at").alias("updated_at"),
        F.max_by("source_file", order).alias("source_file"),
        F.max_by("ingested_at", order).alias("ingested_at"),
    )
    return resolved.select(
        "user_id", *attributes, "signup_ts",
        F.col("_consent.email_consent").alias("email_consent"), F.col("_consent.consent_ts").alias("consent_ts"),
        "updated_at", "source_file", "ingested_at",
    ).select(*[F.col(f.name).cast(f.dataType) for f in USERS_TABLE.fields])


def resolve_product_upserts(incoming: DataFrame, *, current: DataFrame, ingested_at: dt.datetime) -> DataFrame:
    """One row per incoming product: the product after applying every incoming record.

    Attributes come from the newest record that has a value (as for users); price and currency
    travel together; ``category`` and ``in_stock`` follow the chosen path and stock.
    """
    require_columns(incoming, [*PRODUCT_FIELDS.fieldNames(), "source_file", "pos"], step="resolve_product_upserts")
    require_columns(current, PRODUCTS_TABLE.fieldNames(), step="resolve_product_upserts (current)")
    rows = _stacked(incoming, current, key="item_id", fields=PRODUCT_FIELDS, ingested_at=ingested_at)
    order = F.struct("updated_at", "_is_incoming", "source_file", "pos")
    attributes = ["name", "description", "category_path", "brand", "image_url", "url", "stock", "launched_at"]
    resolved = rows.groupBy("item_id").agg(
        *[_newest(c, order).alias(c) for c in attributes],
        F.max_by(F.struct("price", "currency"), F.when(F.col("price").isNotNull(), order)).alias("_money"),
        F.max("updated_at").alias("updated_at"),
        F.max_by("source_file", order).alias("source_file"),
        F.max_by("ingested_at", order).alias("ingested_at"),
    )
    return resolved.select(
        "item_id", "name", "description", "category_path", top_category(F.col("category_path")).alias("category"),
        "brand", F.col("_money.price").alias("price"), F.col("_money.currency").alias("currency"),
        "image_url", "url", "stock", (F.col("stock") > 0).alias("in_stock"), "launched_at", "updated_at",
        "source_file", "ingested_at",
    ).select(*[F.col(f.name).cast(f.dataType) for f in PRODUCTS_TABLE.fields])
