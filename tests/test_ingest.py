"""Ingest transforms on hand-written lines: parsing, every dirty-record kind, every normalisation, dedupe, upserts."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from chispa import assert_df_equality
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

from inboxlift.schemas import EVENTS_LANDING, PRODUCTS_LANDING, USERS_LANDING
from inboxlift.transforms.ingest import (
    ACCEPTED,
    DUPLICATE,
    QUARANTINED,
    PRODUCTS_TABLE,
    USER_FIELDS,
    USERS_TABLE,
    Rules,
    classify_events,
    classify_upserts,
    parse_csv_records,
    parse_json_lines,
    parse_timestamp,
    reasons_array,
    resolve_product_upserts,
    resolve_user_upserts,
    summarise_outcomes,
    validate_events,
    validate_products,
    validate_users,
    with_reference_checks,
)

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
RULES = Rules(now=NOW, shop_opened=dt.datetime(2020, 1, 1, tzinfo=UTC), future_skew_minutes=10,
              max_string_length=40, rating_min=1, rating_max=5)
LINES = "source_file string, pos bigint, line string"


def ts(text: str) -> dt.datetime:
    """A naive datetime as Spark returns TIMESTAMP values in this UTC session."""
    return dt.datetime.fromisoformat(text)


def lines_of(spark, *rows):
    return spark.createDataFrame(list(rows), LINES)


def event_records(spark, rows: list[dict]):
    """Parsed-looking event records: text fields, no parse error."""
    names = EVENTS_LANDING.fieldNames()
    data = [("f1", i, f"line {i}", None, *[r.get(n) for n in names]) for i, r in enumerate(rows)]
    schema = StructType([StructField("source_file", StringType()), StructField("pos", StringType()),
                         StructField("line", StringType()), StructField("parse_error", StringType()),
                         *EVENTS_LANDING.fields])
    return spark.createDataFrame(data, schema).withColumn("pos", F.col("pos").cast("bigint"))


def good_event(**overrides) -> dict:
    event = {"event_id": "e1", "event_type": "view", "event_ts": "2026-11-19T10:00:00Z", "user_id": "u1",
             "item_id": "i1"}
    event.update(overrides)
    return event


def reasons_by_pos(frame) -> dict[int, list[str]]:
    # A handful of hand-written rows.
    return {r.pos: list(r.reasons) for r in frame.select("pos", "reasons").collect()}


# ---- parsing ----------------------------------------------------------------------------------

def test_parse_json_lines_keeps_text_and_flags_lines_that_are_not_objects(spark):
    fields = StructType([StructField("event_id", StringType()), StructField("price", StringType()),
                         StructField("query", StringType())])
    lines = lines_of(
        spark,
        ("f", 0, '{"event_id": "e1", "price": 12.50, "query": {"q": 1}}'),
        ("f", 1, "not json"),
        ("f", 2, "[1, 2]"),
        ("f", 3, "42"),
        ("f", 4, '{"event_id": "e2"'),
        ("f", 5, "   "),
        ("f", 6, '{"event_id": null, "other": true}'),
        ("f", 7, '\ufeff{"event_id": "e3"}'),
    )
    expected = spark.createDataFrame([
        ("f", 0, '{"event_id": "e1", "price": 12.50, "query": {"q": 1}}', None, "e1", "12.5", '{"q":1}'),
        ("f", 1, "not json", "malformed_json", None, None, None),
        ("f", 2, "[1, 2]", "malformed_json", None, None, None),
        ("f", 3, "42", "malformed_json", None, None, None),
        ("f", 4, '{"event_id": "e2"', "malformed_json", None, None, None),
        ("f", 5, "   ", "blank_line", None, None, None),
        ("f", 6, '{"event_id": null, "other": true}', None, None, None, None),
        ("f", 7, '\ufeff{"event_id": "e3"}', None, "e3", None, None),
    ], "source_file string, pos bigint, line string, parse_error string, event_id string, price string, query string")
    assert_df_equality(parse_json_lines(lines, fields=fields), expected, ignore_row_order=True, ignore_nullable=True)


def test_parse_json_lines_of_no_lines_is_empty(spark):
    out = parse_json_lines(spark.createDataFrame([], LINES), fields=EVENTS_LANDING)
    assert out.isEmpty()
    assert out.columns == ["source_file", "pos", "line", "parse_error", *EVENTS_LANDING.fieldNames()]


CSV_HEADERS = "source_file string, header_pos bigint, header_line string, header_fields array<string>"


def test_csv_records_are_read_by_each_files_header(spark):
    records = lines_of(
        spark,
        ("a.csv", 0, "id,name,price"),
        ("a.csv", 1, 'i1,"Pan, cast iron",10'),
        ("a.csv", 2, 'i2,"The ""best"" mat",5'),
        ("a.csv", 3, "i3,too few"),
        ("a.csv", 4, "i4,too,many,fields"),
        ("a.csv", 5, 'i5,"open quote,1'),
        ("a.csv", 6, 'i6,"two\nlines",2'),       # a quoted newline: one record
        ("a.csv", 7, "id,name,price"),          # a repeated header, as in concatenated exports
        ("a.csv", 8, "i7,,"),
        ("a.csv", 9, "i8,\x00nul,1"),            # a NUL is just a character to the parser
        ("a.csv", 16, 'i9,32" screen,1'),        # a bare quote: RFC 4180 wants the field quoted
        ("b.csv", 10, "PRICE, Name ,ID,extra"),  # another order, other case and spacing, a fourth column
        ("b.csv", 11, "7,Lamp,i9,x"),
        ("b.csv", 12, "7,Lamp,i10"),             # three fields where b's header has four
        ("c.csv", 13, "id,price"),               # lacks "name"
        ("c.csv", 14, "i11,3"),
    )
    headers = spark.createDataFrame([
        ("a.csv", 0, "id,name,price", ["id", "name", "price"]),
        ("b.csv", 10, "PRICE, Name ,ID,extra", ["price", "name", "id", "extra"]),
        ("c.csv", 13, "id,price", ["id", "price"]),
    ], CSV_HEADERS)
    out = parse_csv_records(records, headers=headers, columns={"item_id": "ID", "name": "name", "price": "price"},
                            widths=[2, 3, 4])
    expected = spark.createDataFrame([
        ("a.csv", 1, 'i1,"Pan, cast iron",10', None, "i1", "Pan, cast iron", "10"),
        ("a.csv", 2, 'i2,"The ""best"" mat",5', None, "i2", 'The "best" mat', "5"),
        ("a.csv", 3, "i3,too few", "malformed_csv", None, None, None),
        ("a.csv", 4, "i4,too,many,fields", "malformed_csv", None, None, None),
        ("a.csv", 5, 'i5,"open quote,1', "malformed_csv", None, None, None),
        ("a.csv", 6, 'i6,"two\nlines",2', None, "i6", "two\nlines", "2"),
        ("a.csv", 7, "id,name,price", "repeated_header", None, None, None),
        ("a.csv", 8, "i7,,", None, "i7", None, None),
        ("a.csv", 9, "i8,\x00nul,1", None, "i8", "\x00nul", "1"),
        ("a.csv", 16, 'i9,32" screen,1', "malformed_csv", None, None, None),
        ("b.csv", 11, "7,Lamp,i9,x", None, "i9", "Lamp", "7"),
        ("b.csv", 12, "7,Lamp,i10", "malformed_csv", None, None, None),
        ("c.csv", 14, "i11,3", "bad_header", None, None, None),
    ], "source_file string, pos bigint, line string, parse_error string, item_id string, name string, price string")
    assert_df_equality(out, expected, ignore_row_order=True, ignore_nullable=True)


def test_a_long_quoted_field_is_parsed_without_a_regular_expression(spark):
    # The line-based check this replaced overflowed the JVM's stack at 3,000 characters.
    long = "x" * 200_000
    records = lines_of(spark, ("a.csv", 0, "id,name"), ("a.csv", 1, f'i1,"{long}"'), ("a.csv", 2, f'i2,"{long}'))
    headers = spark.createDataFrame([("a.csv", 0, "id,name", ["id", "name"])], CSV_HEADERS)
    out = parse_csv_records(records, headers=headers, columns={"id": "id", "name": "name"}, widths=[2])
    got = {r.pos: (r.parse_error, r.id, len(r.name or "")) for r in out.collect()}
    assert got == {1: (None, "i1", 200_000), 2: ("malformed_csv", None, 0)}


def test_csv_parsing_of_no_records_is_empty(spark):
    empty_headers = spark.createDataFrame([], CSV_HEADERS)
    out = parse_csv_records(spark.createDataFrame([], LINES), headers=empty_headers, columns={"a": "a"}, widths=[])
    assert out.isEmpty()
    assert out.columns == ["source_file", "pos", "line", "parse_error", "a"]


# ---- normalisation ----------------------------------------------------------------------------

@pytest.mark.parametrize("session_zone", ["UTC", "America/New_York"])
def test_timestamps_are_utc_instants_whatever_the_session_zone(spark, session_zone):
    texts = spark.createDataFrame([(t,) for t in [
        "2026-11-20T08:15:00Z", "2026-11-20t08:15:00z", "2026-11-20T09:15:00+01:00", "2026-11-20 08:15:00",
        "2026-11-20", "1763626500000", "11/20/2026 8:15", "7/1/2026 9:15", "yesterday", None,
    ]], "t string")
    previous = spark.conf.get("spark.sql.session.timeZone")
    spark.conf.set("spark.sql.session.timeZone", session_zone)
    try:
        # Epoch seconds, read without any zone, are the test's yardstick.
        out = texts.select(
            "t",
            F.unix_seconds(parse_timestamp(F.col("t"))).alias("iso"),
            F.unix_seconds(parse_timestamp(F.col("t"), fmt="epoch_ms")).alias("ms"),
            F.unix_seconds(parse_timestamp(F.col("t"), fmt="M/d/yyyy H:mm", zone="Europe/London")).alias("uk"),
        ).collect()
    finally:
        spark.conf.set("spark.sql.session.timeZone", previous)
    got = {r.t: (r.iso, r.ms, r.uk) for r in out}
    at_0815 = int(dt.datetime(2026, 11, 20, 8, 15, tzinfo=UTC).timestamp())
    assert got["2026-11-20T08:15:00Z"] == (at_0815, None, None)
    assert got["2026-11-20t08:15:00z"] == (at_0815, None, None)
    assert got["2026-11-20T09:15:00+01:00"] == (at_0815, None, None)
    assert got["2026-11-20 08:15:00"] == (at_0815, None, None)            # no offset: UTC
    assert got["2026-11-20"] == (at_0815 - (8 * 3600 + 15 * 60), None, None)
    assert got["1763626500000"] == (None, 1763626500, None)
    assert got["11/20/2026 8:15"] == (None, None, at_0815)                 # London is on GMT in November
    assert got["7/1/2026 9:15"] == (None, None, int(dt.datetime(2026, 7, 1, 8, 15, tzinfo=UTC).timestamp()))  # BST
    assert got["yesterday"] == (None, None, None)
    assert got[None] == (None, None, None)


def test_events_are_typed_and_normalised(spark):
    records = event_records(spark, [
        {"event_id": " e1 ", "event_type": " Add-To-Cart ", "event_ts": "2026-11-19T23:30:00-02:00",
         "user_id": "u1 ", "item_id": "\u00a0i1", "quantity": "2.0", "price": "19.999", "currency": " eur ",
         "session_id": "", "query": "  red shoes ", "rating": None},
        {"event_id": "e2", "event_type": "REVIEW", "event_ts": "2026-11-19T10:00:00Z", "user_id": "u1",
         "item_id": "i1", "rating": "4", "review_text": "good"},
    ])
    validated = validate_events(records, rules=RULES)
    # chispa orders rows by every column, and Spark cannot order by a map: properties apart.
    assert validated.where(F.col("properties").isNotNull()).isEmpty()
    out = validated.drop("line", "payload_hash", "source_file", "properties")
    expected = spark.createDataFrame([
        (0, "e1", "u1", "i1", "add_to_cart", ts("2026-11-20 01:30:00"), dt.date(2026, 11, 20), None, None, 2,
         Decimal("20.00"), "EUR", "red shoes", None, None, None, None, []),
        (1, "e2", "u1", "i1", "review", ts("2026-11-19 10:00:00"), dt.date(2026, 11, 19), None, None, None,
         None, None, None, 4, "good", None, None, []),
    ], "pos bigint, event_id string, user_id string, item_id string, event_type string, event_ts timestamp, "
       "event_date date, session_id string, order_id string, quantity int, price decimal(12,2), currency string, "
       "query string, rating int, review_text string, campaign_id string, message_id string, reasons array<string>")
    assert_df_equality(out, expected, ignore_row_order=True, ignore_nullable=True)


# ---- every dirty-record kind ------------------------------------------------------------------

def test_every_dirty_event_kind_gets_its_reason(spark):
    rows = [
        good_event(),                                                      # 0 clean
        good_event(event_id=None),                                         # 1
        good_event(user_id="  "),                                          # 2 blank is missing
        good_event(item_id=None),                                          # 3 a view needs an item
        good_event(event_type=None),                                       # 4
        good_event(event_type="teleport"),                                 # 5
        good_event(event_ts=None),                                         # 6
        good_event(event_ts="20/11/2026"),                                 # 7
        good_event(event_ts="2026-11-20T12:11:00Z"),                       # 8 now + 11 min
        good_event(event_ts="2019-12-31T23:59:59Z"),                       # 9
        good_event(price="abc"),                                           # 10
        good_event(price="NaN"),                                           # 11
        good_event(price="-0.50"),                                         # 12
        good_event(price="1e20"),                                          # 13
        good_event(currency="euro"),                                       # 14
        good_event(quantity="abc"),                                        # 15
        good_event(quantity="0"),                                          # 16
        good_event(quantity="1.5"),                                        # 17
        good_event(event_type="review", rating="9"),                       # 18
        good_event(event_type="review", rating="four"),                    # 19
        good_event(review_text="x" * 41),                                  # 20 over max_string_length (40)
        good_event(event_type="email_open", item_id=None, message_id="m1"),  # 21 e-mail events need no item
        good_event(event_ts="2026-11-20T12:09:00Z"),                       # 22 within the skew
        {k: None for k in EVENTS_LANDING.fieldNames()},                    # 23 a row of nulls
        good_event(event_id=None, event_type="teleport", price="-1"),      # 24 several reasons, in order
    ]
    out = validate_events(event_records(spark, rows), rules=RULES)
    assert reasons_by_pos(out) == {
        0: [], 1: ["missing_event_id"], 2: ["missing_user_id"], 3: ["missing_item_id"],
        4: ["missing_event_type"], 5: ["unknown_event_type"], 6: ["missing_timestamp"], 7: ["bad_timestamp"],
        8: ["future_timestamp"], 9: ["before_shop_opened"], 10: ["non_numeric_price"], 11: ["non_numeric_price"],
        12: ["negative_price"], 13: ["price_out_of_range"], 14: ["bad_currency"], 15: ["bad_quantity"],
        16: ["bad_quantity"], 17: ["bad_quantity"], 18: ["bad_rating"], 19: ["bad_rating"], 20: ["string_too_long"],
        21: [], 22: [],
        23: ["missing_event_id", "missing_user_id", "missing_event_type", "missing_timestamp"],
        24: ["missing_event_id", "unknown_event_type", "negative_price"],
    }


def test_structural_problems_come_first(spark):
    lines = lines_of(
        spark,
        ("f", 0, '{"event_id": "e1", "event_type": "view", "event_ts": "2026-11-19T10:00:00Z", '
                 '"user_id": "u\ufffd1", "item_id": "i1"}'),
        ("f", 1, "{oops\ufffd"),
        ("f", 2, ""),
    )
    # Undecodable bytes, as Spark's text reader leaves them (casting binary to string does not validate).
    raw_bytes = spark.range(1).select(F.lit("f").alias("source_file"), F.lit(3).cast("bigint").alias("pos"), F.concat(
        F.lit('{"event_id": "e3", "event_type": "view", "event_ts": "2026-11-19T10:00:00Z", "user_id": "u'),
        F.unhex(F.lit("FF")).cast("string"), F.lit('", "item_id": "i1"}')).alias("line"))
    out = validate_events(parse_json_lines(lines.unionByName(raw_bytes), fields=EVENTS_LANDING), rules=RULES)
    # The undecodable byte is in the user id, which is then no valid id either.
    assert reasons_by_pos(out) == {0: ["invalid_utf8", "bad_id"], 1: ["invalid_utf8", "malformed_json"],
                                   2: ["blank_line"], 3: ["invalid_utf8", "bad_id"]}


def test_ids_must_match_the_documented_pattern(spark):
    def line(event_id: str, **extra: str) -> str:
        fields = {"event_type": '"view"', "event_ts": '"2026-11-19T10:00:00Z"', "user_id": '"u1"', "item_id": '"i1"',
                  **extra}
        return "{" + ", ".join([f'"event_id": {event_id}'] + [f'"{k}": {v}' for k, v in fields.items()]) + "}"

    lines = lines_of(
        spark,
        ("f", 0, line('"e-1_A:b/c@d+e#f=g~h.i"')),        # every allowed punctuation
        ("f", 1, line("12345")),                          # a JSON integer is a fine id
        ("f", 2, line('"8f14e45f-ceea-467f-a0e6-000000000001"')),
        ("f", 3, line('"BANK CHARGES"')),                 # a space inside, as in real stock codes
        ("f", 4, line(r'"\u8ba2\u53551"')),                  # letters of any script
        ("f", 5, line('["e5"]')),                         # a JSON array
        ("f", 6, line('{"id": 1}')),                      # a JSON object
        ("f", 7, line("NaN")),
        ("f", 8, line("1e40")),                           # Spark's JSON reader writes it 1.0E40
        ("f", 9, line("12.5")),
        ("f", 10, line(r'"e10\r\nBcc: x@evil.example"')),
        ("f", 11, line(r'"e11\u0000"')),
        ("f", 12, line(r'"e12\u001b[31m"')),              # an escape sequence
        ("f", 13, line(r'"e13\u202e"')),                   # a right-to-left override
        ("f", 14, line('"' + "x" * 129 + '"')),            # longer than 128
        ("f", 15, line('"-e15"')),                        # must start with a letter, digit or _
        ("f", 16, line('"e16"', session_id=r'"s\n1"', order_id='"o[1]"', campaign_id='"c<1>"', message_id='"m 1"')),
        ("f", 17, line('"e17"', user_id='"Infinity"')),
    )
    out = validate_events(parse_json_lines(lines, fields=EVENTS_LANDING), rules=RULES)
    bad = {pos for pos, reasons in reasons_by_pos(out).items() if "bad_id" in reasons}
    assert bad == {5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17}
    assert reasons_by_pos(out)[0] == [] and reasons_by_pos(out)[4] == []


def test_user_and_product_ids_are_checked_too(spark):
    users = spark.createDataFrame(
        [("f", 0, "l", None, "u\x001", None, None, None, None, None, None, None, None, None, "2024-01-01")],
        StructType([StructField("source_file", StringType()), StructField("pos", StringType()),
                    StructField("line", StringType()), StructField("parse_error", StringType()),
                    *USERS_LANDING.fields])).withColumn("pos", F.col("pos").cast("bigint"))
    assert reasons_by_pos(validate_users(users, rules=RULES)) == {0: ["bad_id"]}
    products = spark.createDataFrame(
        [("f", 0, "l", None, "[1,2]", *[None] * 10, "2024-01-01")],
        StructType([StructField("source_file", StringType()), StructField("pos", StringType()),
                    StructField("line", StringType()), StructField("parse_error", StringType()),
                    *PRODUCTS_LANDING.fields])).withColumn("pos", F.col("pos").cast("bigint"))
    assert reasons_by_pos(validate_products(products, rules=RULES)) == {0: ["bad_id"]}


def user_records(spark, rows: list[dict]):
    names = USERS_LANDING.fieldNames()
    base = {"user_id": "u1", "updated_at": "2024-01-01T00:00:00Z"}
    data = [("f", i, f"line {i}", None, *[{**base, **r}.get(n) for n in names]) for i, r in enumerate(rows)]
    return spark.createDataFrame(data, StructType([
        StructField("source_file", StringType()), StructField("pos", StringType()), StructField("line", StringType()),
        StructField("parse_error", StringType()), *USERS_LANDING.fields])).withColumn("pos", F.col("pos").cast("bigint"))


def test_email_addresses_are_checked_by_email_validator_and_normalised(spark):
    addresses = {
        0: ("Ann.Lee@Example.COM", "ann.lee@example.com"),
        1: ("nul\x00x@example.com", None),         # a NUL: an invalid To: header otherwise
        2: ("a,b@example.com", None),              # a comma would split the To: header
        3: ("Bob <bob@example.com>", None),        # a display name is not an address
        4: ('"a b"@example.com', None),            # quoted local parts are refused
        5: ("x@[192.0.2.1]", None),                # so are IP-literal domains
        6: ("x@localhost", None),                  # and domains that are not public
        7: ("x@shop.test", None),
        8: ("a..b@example.com", None),
        9: ("fay@B\u00fccher.de", "fay@xn--bcher-kva.de"),   # an internationalised domain, in ASCII
        10: ("\u7528\u6237@example.com", None),    # a non-ASCII local part would need SMTPUTF8
        11: (None, None),                          # no address is no error
    }
    out = validate_users(user_records(spark, [{"email": a} for a, _ in addresses.values()]), rules=RULES)
    got = {r.pos: (r.email, "bad_email" in r.reasons) for r in out.select("pos", "email", "reasons").collect()}
    assert got == {pos: (want, want is None and given is not None) for pos, (given, want) in addresses.items()}


def test_text_that_reaches_headers_loses_control_and_bidi_characters(spark):
    users = validate_users(user_records(spark, [
        {"first_name": "Bob\r\nBcc: victim@evil.example"},
        {"first_name": "\u202eeciL\u202c"},
        {"first_name": "\u2066Ann\u2069\u200e\u200f\u061c\x85\u2028"},
        {"first_name": "Zo\u00eb\u200d\t\x07"},        # a ZWJ stays; TAB becomes a space, then trimmed
        {"first_name": "\u202e"},                         # nothing left: no name
    ]), rules=RULES)
    assert {r.pos: r.first_name for r in users.collect()} == {
        0: "Bob Bcc: victim@evil.example", 1: "eciL", 2: "Ann", 3: "Zo\u00eb\u200d", 4: None}
    assert all(r.reasons == [] for r in users.collect())
    products = spark.createDataFrame(
        [("f", 0, "l", None, "i1", "Pan\u202e\r\n", "Keeps\nits\x07lines", "Home\u2067 > Pans", "Ac\x00me",
          None, None, None, None, None, None, "2024-01-01")],
        StructType([StructField("source_file", StringType()), StructField("pos", StringType()),
                    StructField("line", StringType()), StructField("parse_error", StringType()),
                    *PRODUCTS_LANDING.fields])).withColumn("pos", F.col("pos").cast("bigint"))
    row = validate_products(products, rules=RULES).first()
    # The description reaches no header: it is kept as written (HTML escaping protects the body).
    assert (row.name, row.description, row.category_path, row.category, row.brand) == (
        "Pan", "Keeps\nits\x07lines", "Home > Pans", "Home", "Acme")


def test_anonymous_and_excluded_items_for_exports(spark):
    rows = [good_event(user_id=None), good_event(item_id="POST"), good_event(event_type="return")]
    out = validate_events(event_records(spark, rows), rules=RULES, allow_anonymous=True,
                          excluded_item_ids=("POST",), event_types=("view", "return"))
    assert reasons_by_pos(out) == {0: [], 1: ["excluded_item"], 2: []}


def test_reasons_array_refuses_unknown_codes():
    with pytest.raises(ValueError, match="unknown reason codes"):
        reasons_array({"made_up": F.lit(True)})


def test_users_are_typed_normalised_and_checked(spark):
    names = USERS_LANDING.fieldNames()
    rows = [
        ("u1", " Ann@Example.COM ", "Ann", "en-GB", "Europe/London", "gb", "1990-04-17", "2024-01-05T10:00:00Z",
         "TRUE", "2024-01-05T10:00:00+01:00", "2024-01-05T10:00:00Z"),
        ("u2", "bob@", "Bob", None, None, "United Kingdom", "1990-02-30", "soon", "maybe", None, None),
        ("u3", None, None, None, None, None, "2030-01-01", None, "no", None, "2027-01-01T00:00:00Z"),
        tuple([None] * len(names)),
    ]
    data = [("f", i, f"line {i}", None, *r) for i, r in enumerate(rows)]
    records = spark.createDataFrame(data, StructType([
        StructField("source_file", StringType()), StructField("pos", StringType()), StructField("line", StringType()),
        StructField("parse_error", StringType()), *USERS_LANDING.fields])).withColumn("pos", F.col("pos").cast("bigint"))
    out = validate_users(records, rules=RULES)
    assert reasons_by_pos(out) == {
        0: [],
        1: ["missing_timestamp", "bad_timestamp", "bad_date", "bad_boolean", "bad_email"],
        2: ["future_timestamp", "bad_date"],
        3: ["missing_user_id", "missing_timestamp"],
    }
    first = out.where("pos = 0").drop("source_file", "pos", "line", "reasons", "payload_hash")
    expected = spark.createDataFrame([
        ("u1", "ann@example.com", "Ann", "en-GB", "Europe/London", "GB", dt.date(1990, 4, 17),
         ts("2024-01-05 10:00:00"), True, ts("2024-01-05 09:00:00"), ts("2024-01-05 10:00:00")),
    ], USER_FIELDS)
    assert_df_equality(first, expected, ignore_nullable=True)


def test_products_are_typed_normalised_and_checked(spark):
    rows = [
        ("i1", "Pan", "Cast iron", "Home > Kitchen > Cookware", "Acme", "59.9", "eur", None, None, "12",
         "2024-01-01T00:00:00Z", "2024-01-01T00:00:00Z"),
        ("i2", "Mat", None, "Sports/Yoga", None, "-3", "EUR", None, None, "-1", "someday", "2024-01-01T00:00:00Z"),
        ("i3", None, None, None, None, "12,50", "E", None, None, "lots", None, None),
        ("i4", None, None, None, None, None, None, None, None, "0", "2024-02-01", "2024-01-01T00:00:00Z"),
    ]
    data = [("f", i, f"line {i}", None, *r) for i, r in enumerate(rows)]
    records = spark.createDataFrame(data, StructType([
        StructField("source_file", StringType()), StructField("pos", StringType()), StructField("line", StringType()),
        StructField("parse_error", StringType()), *PRODUCTS_LANDING.fields])).withColumn("pos", F.col("pos").cast("bigint"))
    out = validate_products(records, rules=RULES)
    assert reasons_by_pos(out) == {
        0: [], 1: ["negative_price", "bad_stock", "bad_date"],
        2: ["missing_timestamp", "non_numeric_price", "bad_currency", "bad_stock"], 3: [],
    }
    got = {r.item_id: (r.category, r.price, r.currency, r.stock, r.in_stock, r.launched_at)
           for r in out.where("pos in (0, 3)").collect()}
    assert got == {"i1": ("Home", Decimal("59.90"), "EUR", 12, True, dt.date(2024, 1, 1)),
                   "i4": (None, None, None, 0, False, dt.date(2024, 2, 1))}


# ---- references, dedupe, outcomes -------------------------------------------------------------

def test_references_must_be_known_users_and_items(spark):
    rows = [
        good_event(event_id="a"),
        good_event(event_id="b", user_id="u9"),
        good_event(event_id="c", item_id="i9"),
        good_event(event_id="d", event_type="email_open", item_id=None),
        good_event(event_id="e", event_type="email_click", item_id="i9"),
        good_event(event_id="f", user_id="u9", item_id="i9", price="-1"),
    ]
    events = validate_events(event_records(spark, rows), rules=RULES)
    # Repeated ids on the right must not multiply events.
    known_users = spark.createDataFrame([("u1",), ("u1",), (None,)], "user_id string")
    known_items = spark.createDataFrame([("i1",), ("i1",)], "item_id string")
    out = with_reference_checks(events, known_users=known_users, known_items=known_items)
    assert out.count() == 6
    assert reasons_by_pos(out) == {0: [], 1: ["unknown_user"], 2: ["unknown_item"], 3: [], 4: ["unknown_item"],
                                   5: ["negative_price", "unknown_user", "unknown_item"]}


def _classified(spark, rows, existing=()):
    events = spark.createDataFrame(rows, "event_id string, source_file string, pos bigint, line string, "
                                         "reasons array<string>, payload_hash bigint")
    existing_ids = spark.createDataFrame([(e,) for e in existing], "event_id string")
    return classify_events(events, existing_ids=existing_ids)


def test_first_seen_event_wins_and_table_ids_are_duplicates(spark):
    out = _classified(spark, [
        ("e1", "b.jsonl", 0, "l1", [], 1),
        ("e1", "a.jsonl", 9, "l2", [], 1),               # earlier file: wins
        ("e1", "a.jsonl", 10, "l3", [], 2),              # same id, other payload
        ("e2", "a.jsonl", 1, "l4", ["bad_rating"], 3),   # invalid copy cannot win...
        ("e2", "a.jsonl", 2, "l5", [], 4),               # ...so this one is accepted
        ("e3", "a.jsonl", 3, "l6", [], 5),               # already in the table
        (None, "a.jsonl", 4, "l7", ["missing_event_id"], 6),
    ], existing=["e3", "e9"])
    expected = spark.createDataFrame([
        ("e1", "b.jsonl", 0, None, DUPLICATE, False),
        ("e1", "a.jsonl", 9, None, ACCEPTED, False),
        ("e1", "a.jsonl", 10, None, DUPLICATE, True),
        ("e2", "a.jsonl", 1, "l4", QUARANTINED, False),
        ("e2", "a.jsonl", 2, None, ACCEPTED, False),
        ("e3", "a.jsonl", 3, None, DUPLICATE, False),
        (None, "a.jsonl", 4, "l7", QUARANTINED, False),
    ], "event_id string, source_file string, pos bigint, line string, outcome string, is_conflicting boolean")
    assert_df_equality(out.select("event_id", "source_file", "pos", "line", "outcome", "is_conflicting"), expected,
                       ignore_row_order=True, ignore_nullable=True)


def test_classifying_no_events_is_empty(spark):
    out = _classified(spark, [], existing=["e1"])
    assert out.isEmpty()
    assert summarise_outcomes(out).isEmpty()


def test_exact_repeats_of_users_are_duplicates_and_new_versions_accepted(spark):
    records = spark.createDataFrame([
        ("u1", "f", 0, "a", [], 1), ("u1", "f", 1, "b", [], 1), ("u1", "f", 2, "c", [], 2),
        ("u2", "f", 3, "d", ["bad_email"], 3), (None, "f", 4, "e", ["missing_user_id"], 4),
    ], "user_id string, source_file string, pos bigint, line string, reasons array<string>, payload_hash bigint")
    got = {r.pos: r.outcome for r in classify_upserts(records, key="user_id").collect()}
    assert got == {0: ACCEPTED, 1: DUPLICATE, 2: ACCEPTED, 3: QUARANTINED, 4: QUARANTINED}


def test_summary_counts_each_record_once_under_its_first_reason(spark):
    classified = spark.createDataFrame([
        (ACCEPTED, [], False), (DUPLICATE, [], True), (DUPLICATE, [], False),
        (QUARANTINED, ["invalid_utf8", "malformed_json"], False), (QUARANTINED, ["malformed_json"], False),
        (QUARANTINED, ["unknown_user"], False),
    ], "outcome string, reasons array<string>, is_conflicting boolean")
    expected = spark.createDataFrame([
        (ACCEPTED, None, 1, 0), (DUPLICATE, None, 2, 1), (QUARANTINED, "invalid_utf8", 1, 0),
        (QUARANTINED, "malformed_json", 1, 0), (QUARANTINED, "unknown_user", 1, 0),
    ], "outcome string, reason string, records bigint, conflicting bigint")
    assert_df_equality(summarise_outcomes(classified), expected, ignore_row_order=True, ignore_nullable=True)


# ---- upserts ----------------------------------------------------------------------------------

USER_INCOMING = ("user_id string, email string, first_name string, locale string, timezone string, country string, "
                 "birthday date, signup_ts timestamp, email_consent boolean, consent_ts timestamp, "
                 "updated_at timestamp, source_file string, pos bigint")


def test_user_upserts_apply_changes_and_never_restore_a_withdrawn_consent(spark):
    at = ts("2026-11-20 12:00:00")
    current = spark.createDataFrame([
        ("u1", "old@x.com", "Ann", "en-GB", "Europe/London", "GB", None, ts("2024-01-01 00:00:00"), False,
         ts("2025-06-01 00:00:00"), ts("2025-06-01 00:00:00"), "old.csv", ts("2025-06-02 00:00:00")),
        ("u2", "bob@x.com", "Bob", None, None, "US", None, ts("2024-01-01 00:00:00"), True,
         ts("2024-01-01 00:00:00"), ts("2024-01-01 00:00:00"), "old.csv", ts("2025-06-02 00:00:00")),
        ("u9", "zed@x.com", None, None, None, None, None, None, True, None, None, "old.csv", None),
    ], USERS_TABLE)
    incoming = spark.createDataFrame([
        # Newer record, new e-mail, but consent from an older export: e-mail changes, consent stays withdrawn.
        ("u1", "new@x.com", None, None, None, None, None, ts("2024-02-01 00:00:00"), True,
         ts("2024-01-01 00:00:00"), ts("2025-07-01 00:00:00"), "new.csv", 5),
        # An older record: nothing it says wins, but the earlier signup is kept.
        ("u2", "stale@x.com", None, None, None, None, None, ts("2023-01-01 00:00:00"), True,
         ts("2023-01-01 00:00:00"), ts("2023-06-01 00:00:00"), "new.csv", 6),
        # Withdrawal and a re-consent at the same instant: the withdrawal wins.
        ("u2", None, None, None, None, None, None, None, False, ts("2025-01-01 00:00:00"),
         ts("2025-01-01 00:00:00"), "new.csv", 7),
        ("u2", None, None, None, None, None, None, None, True, ts("2025-01-01 00:00:00"),
         ts("2025-01-01 00:00:00"), "new.csv", 8),
        # A new user; a null consent stays unknown.
        ("u3", "cy@x.com", "Cy", None, None, "DE", None, None, None, None, ts("2025-01-01 00:00:00"), "new.csv", 9),
    ], USER_INCOMING)
    expected = spark.createDataFrame([
        ("u1", "new@x.com", "Ann", "en-GB", "Europe/London", "GB", None, ts("2024-01-01 00:00:00"), False,
         ts("2025-06-01 00:00:00"), ts("2025-07-01 00:00:00"), "new.csv", at),
        ("u2", "bob@x.com", "Bob", None, None, "US", None, ts("2023-01-01 00:00:00"), False,
         ts("2025-01-01 00:00:00"), ts("2025-01-01 00:00:00"), "new.csv", at),
        ("u3", "cy@x.com", "Cy", None, None, "DE", None, None, None, None, ts("2025-01-01 00:00:00"), "new.csv", at),
    ], USERS_TABLE)
    out = resolve_user_upserts(incoming, current=current, ingested_at=NOW)
    assert_df_equality(out, expected, ignore_row_order=True, ignore_nullable=True)


def test_a_withdrawal_without_consent_ts_counts_at_its_updated_at_and_beats_an_older_grant(spark):
    at = ts("2026-11-20 12:00:00")
    current = spark.createDataFrame([
        ("u1", "a@x.com", None, None, None, None, None, None, True, ts("2026-01-05 00:00:00"),
         ts("2026-01-05 00:00:00"), "old.csv", ts("2026-01-06 00:00:00")),
        # Written before consent times were kept: a grant of unknown time, updated since by other fields.
        ("u2", "b@x.com", None, None, None, None, None, None, True, None,
         ts("2026-10-01 00:00:00"), "old.csv", ts("2026-10-02 00:00:00")),
        ("u3", "c@x.com", None, None, None, None, None, None, False, ts("2026-06-01 00:00:00"),
         ts("2026-06-01 00:00:00"), "old.csv", ts("2026-06-02 00:00:00")),
    ], USERS_TABLE)
    incoming = spark.createDataFrame([
        # A shop's opt-out: opt_in_date emptied. Newer than the dated grant: the withdrawal wins.
        ("u1", None, None, None, None, None, None, None, False, None, ts("2026-11-20 00:00:00"), "new.csv", 1),
        # A dated withdrawal arriving late still beats the table's grant of unknown time.
        ("u2", None, None, None, None, None, None, None, False, ts("2026-09-01 00:00:00"),
         ts("2026-09-01 00:00:00"), "new.csv", 2),
        # An undated grant older than the withdrawal does not restore consent...
        ("u3", None, None, None, None, None, None, None, True, None, ts("2026-05-01 00:00:00"), "new.csv", 3),
        # ...and an undated re-consent newer than it does; a shop without consent dates still works.
        ("u4", "d@x.com", None, None, None, None, None, None, False, None, ts("2026-03-01 00:00:00"), "new.csv", 4),
        ("u4", None, None, None, None, None, None, None, True, None, ts("2026-04-01 00:00:00"), "new.csv", 5),
    ], USER_INCOMING)
    expected = spark.createDataFrame([
        ("u1", "a@x.com", None, None, None, None, None, None, False, ts("2026-11-20 00:00:00"),
         ts("2026-11-20 00:00:00"), "new.csv", at),
        ("u2", "b@x.com", None, None, None, None, None, None, False, ts("2026-09-01 00:00:00"),
         ts("2026-10-01 00:00:00"), "old.csv", ts("2026-10-02 00:00:00")),
        ("u3", "c@x.com", None, None, None, None, None, None, False, ts("2026-06-01 00:00:00"),
         ts("2026-06-01 00:00:00"), "old.csv", ts("2026-06-02 00:00:00")),
        ("u4", "d@x.com", None, None, None, None, None, None, True, ts("2026-04-01 00:00:00"),
         ts("2026-04-01 00:00:00"), "new.csv", at),
    ], USERS_TABLE)
    out = resolve_user_upserts(incoming, current=current, ingested_at=NOW)
    assert_df_equality(out, expected, ignore_row_order=True, ignore_nullable=True)


def test_user_upserts_of_nothing_are_empty(spark):
    out = resolve_user_upserts(spark.createDataFrame([], USER_INCOMING),
                               current=spark.createDataFrame([], USERS_TABLE), ingested_at=NOW)
    assert out.isEmpty()
    assert out.schema.simpleString() == USERS_TABLE.simpleString()


def test_product_upserts_apply_a_newer_price_and_ignore_an_older_one(spark):
    at = ts("2026-11-20 12:00:00")
    current = spark.createDataFrame([
        ("i1", "Pan", None, "Home > Kitchen", "Home", "Acme", Decimal("59.90"), "EUR", None, None, 3, True,
         dt.date(2024, 1, 1), ts("2025-01-01 00:00:00"), "old.csv", ts("2025-01-02 00:00:00")),
        ("i2", "Mat", None, None, None, None, Decimal("35.00"), "EUR", None, None, 0, False, None,
         ts("2025-01-01 00:00:00"), "old.csv", ts("2025-01-02 00:00:00")),
    ], PRODUCTS_TABLE)
    incoming = spark.createDataFrame([
        ("i1", None, None, "Sale > Kitchen", None, None, Decimal("49.90"), "GBP", None, None, 0, None, None,
         ts("2025-02-01 00:00:00"), "new.csv", 1),
        ("i2", "Old mat", None, None, None, None, Decimal("99.00"), "USD", None, None, 5, None, None,
         ts("2024-01-01 00:00:00"), "new.csv", 2),
    ], "item_id string, name string, description string, category_path string, category string, brand string, "
       "price decimal(12,2), currency string, image_url string, url string, stock int, in_stock boolean, "
       "launched_at date, updated_at timestamp, source_file string, pos bigint")
    expected = spark.createDataFrame([
        ("i1", "Pan", None, "Sale > Kitchen", "Sale", "Acme", Decimal("49.90"), "GBP", None, None, 0, False,
         dt.date(2024, 1, 1), ts("2025-02-01 00:00:00"), "new.csv", at),
        ("i2", "Mat", None, None, None, None, Decimal("35.00"), "EUR", None, None, 0, False, None,
         ts("2025-01-01 00:00:00"), "old.csv", ts("2025-01-02 00:00:00")),
    ], PRODUCTS_TABLE)
    out = resolve_product_upserts(incoming, current=current, ingested_at=NOW)
    assert_df_equality(out, expected, ignore_row_order=True, ignore_nullable=True)


# ---- reconciliation over varied inputs --------------------------------------------------------

LINE_KINDS = {
    # kind -> (line template, outcome); {i} makes ids unique per generated line.
    "new": ('{{"event_id": "n{i}", "event_type": "view", "event_ts": "2026-11-19T10:00:00Z", '
            '"user_id": "u1", "item_id": "i1"}}', ACCEPTED),
    "repeat": ('{{"event_id": "dup", "event_type": "view", "event_ts": "2026-11-19T10:00:00Z", '
               '"user_id": "u1", "item_id": "i1"}}', None),
    "in_table": ('{{"event_id": "old", "event_type": "view", "event_ts": "2026-11-19T10:00:00Z", '
                 '"user_id": "u1", "item_id": "i1"}}', DUPLICATE),
    "malformed": ("{{nope {i}", QUARANTINED),
    "blank": ("", QUARANTINED),
    "unknown_user": ('{{"event_id": "x{i}", "event_type": "view", "event_ts": "2026-11-19T10:00:00Z", '
                     '"user_id": "nobody", "item_id": "i1"}}', QUARANTINED),
    "future": ('{{"event_id": "f{i}", "event_type": "view", "event_ts": "2099-01-01T00:00:00Z", '
               '"user_id": "u1", "item_id": "i1"}}', QUARANTINED),
    "bad_price": ('{{"event_id": "p{i}", "event_type": "purchase", "event_ts": "2026-11-19T10:00:00Z", '
                  '"user_id": "u1", "item_id": "i1", "price": "-1{i}"}}', QUARANTINED),
}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(sorted(LINE_KINDS)), min_size=0, max_size=25),
       files=st.integers(min_value=1, max_value=3))
def test_every_line_is_accepted_duplicate_or_quarantined(spark, kinds, files):
    lines = lines_of(spark, *[(f"f{i % files}", i, LINE_KINDS[k][0].format(i=i)) for i, k in enumerate(kinds)])
    events = validate_events(parse_json_lines(lines, fields=EVENTS_LANDING), rules=RULES)
    checked = with_reference_checks(events, known_users=spark.createDataFrame([("u1",)], "user_id string"),
                                    known_items=spark.createDataFrame([("i1",)], "item_id string"))
    classified = classify_events(checked, existing_ids=spark.createDataFrame([("old",)], "event_id string"))
    got = {o: 0 for o in (ACCEPTED, DUPLICATE, QUARANTINED)}
    for row in summarise_outcomes(classified).collect():
        got[row.outcome] += row.records
    # The oracle: each kind's outcome, and the first "repeat" line accepted, the others duplicates.
    expected = {o: 0 for o in (ACCEPTED, DUPLICATE, QUARANTINED)}
    for k in kinds:
        if LINE_KINDS[k][1] is not None:
            expected[LINE_KINDS[k][1]] += 1
    repeats = kinds.count("repeat")
    expected[ACCEPTED] += min(repeats, 1)
    expected[DUPLICATE] += max(repeats - 1, 0)
    assert got == expected
    assert sum(got.values()) == len(kinds)
