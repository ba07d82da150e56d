"""Dirty records: extra landing lines that look like a real export gone wrong.

A dirty record is never a clean record damaged in place: it is an additional
line written right after the clean record it was derived from, so the clean
data stays complete and the dirty share is exact in expectation. Dirty lines
get fresh ids (events: a new event id; users and products: ids beyond the
clean range) except duplicates, which reuse the clean event's id on purpose.
Their kinds are recorded only under the truth folder.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from inboxlift.generate import draws
from inboxlift.generate.text import SECONDS_PER_DAY, csv_field, iso_utc, splice_bytes

EVENT_DIRTY_KINDS = (
    "malformed_json", "missing_event_id", "missing_user_id", "unknown_event_type", "negative_price",
    "non_numeric_price", "future_timestamp", "before_shop_timestamp", "duplicate_exact", "duplicate_conflict",
    "wrong_type", "unknown_user", "unknown_item", "overlong_string", "invalid_utf8",
)
USER_DIRTY_KINDS = (
    "missing_id", "wrong_type", "overlong_string", "invalid_utf8", "malformed_row", "future_timestamp",
)
PRODUCT_DIRTY_KINDS = (
    "missing_id", "negative_price", "non_numeric_price", "overlong_string", "invalid_utf8", "malformed_row",
    "wrong_type",
)

# Longer than ingest's default max_string_length (2000) by a wide margin.
OVERLONG_CHARS = 4200
# Where raw bytes go; spliced in after the line is encoded (see text.splice_bytes).
BYTES_TOKEN = "@@RAWBYTES@@"
# Latin-1 é, Latin-1 ü, a truncated 2-byte sequence, a byte that never occurs in UTF-8,
# an encoded UTF-16 surrogate (CESU-8, as some Java exports produce).
INVALID_UTF8_HEX = ("E9", "FC", "C328", "FF", "EDA080")
UNKNOWN_EVENT_TYPES = ("wishlist_add", "page_ping", "share", "coupon_applied")
NON_NUMERIC_PRICES = ("N/A", "12,99", "19.99 USD", "free", "call us")
# An item that exists in every catalogue (ids are numbered 1..items).
ANY_ITEM_ID = "i000001"
# The earliest instant of the shop's data; ingest's shop_opened default.
SHOP_OPENED_S = 1_577_836_800  # 2020-01-01T00:00:00Z
# Sessions per dirty-bearing unit: units are picked at 10x the dirty rate and events
# within them at a tenth, so the truth pass only regenerates a tenth of the data.
UNIT_OVERSAMPLING = 10.0


@dataclass(frozen=True)
class DirtyPlan:
    """How often to plant a dirty record.

    ``rate`` is the share of all landing records that are dirty; each clean record
    therefore spawns a dirty sibling with probability ``rate / (1 - rate)``.
    """

    rate: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 0.5:
            raise ValueError(f"dirty_rate must be between 0 and 0.5, got {self.rate}")

    @property
    def per_clean(self) -> float:
        return self.rate / (1.0 - self.rate)

    @property
    def unit_share(self) -> float:
        """Share of sessions / deliveries allowed to hold dirty events."""
        return min(1.0, UNIT_OVERSAMPLING * self.per_clean)

    @property
    def within_unit(self) -> float:
        """Chance that an event of a dirty-bearing unit gets a dirty sibling."""
        return self.per_clean / self.unit_share if self.unit_share > 0 else 0.0


def with_event_dirt(events: DataFrame, *, seed: int, plan: DirtyPlan) -> DataFrame:
    """Adds ``dirty_kind``: the kind of the dirty sibling an event spawns, null for most events."""
    in_unit = F.col("is_dirty_unit")
    drawn = draws.pick(EVENT_DIRTY_KINDS, F.col("u_dirty_kind"))
    # Price damage needs a purchase-shaped record; an event without an item (a search,
    # an email event) spawns an unknown event type instead.
    fitted = F.when(F.col("dirty_drawn").isin("negative_price", "non_numeric_price") & F.col("item_id").isNull(),
                    F.lit("unknown_event_type")).otherwise(F.col("dirty_drawn"))
    return (
        events
        .withColumn("u_dirty", F.when(in_unit, draws.uniform(seed, "dirty-event", "event_id")))
        .withColumn("u_dirty_kind", F.when(in_unit & (F.col("u_dirty") < plan.within_unit),
                                           draws.uniform(seed, "dirty-event-kind", "event_id")))
        .withColumn("dirty_drawn", F.when(F.col("u_dirty_kind").isNotNull(), drawn))
        .withColumn("dirty_kind", fitted)
        .drop("u_dirty", "u_dirty_kind", "dirty_drawn")
    )


_EVENT_DRAWS = ("blank", "type", "future", "epoch", "past", "shift", "user", "item", "variant", "cut", "price",
                "bytes")


def with_dirty_event_line(events: DataFrame, *, seed: int, users: int, items: int, end_s: int) -> DataFrame:
    """Adds ``dirty_line`` (the landing line of the dirty sibling) and ``dirty_record_id`` (its event id).

    Both are null for events without a ``dirty_kind``; their draws are skipped there.
    ``end_s`` is the end of the data: future timestamps lie at least 30 days beyond it.
    """
    kind = F.col("dirty_kind")
    is_dirty = kind.isNotNull()

    def u(name: str) -> Column:
        return F.col("u_" + name)

    key = F.col("event_id")
    is_price = kind.isin("negative_price", "non_numeric_price")
    is_review = F.col("event_type") == "review"
    record_id = (F.when(kind.isin("duplicate_exact", "duplicate_conflict"), key)
                 .when(kind == "missing_event_id", F.when(u("blank") < 0.5, F.lit("")))
                 .otherwise(draws.hex_id("e", seed, "dirty-event-id", key)))
    # From the end of the data, not the event: an early event moved 30 days on can
    # still lie before the end, a valid timestamp that ingest rightly accepts.
    ts = (F.when(kind == "future_timestamp", end_s + F.floor((30 + 1800 * u("future")) * SECONDS_PER_DAY))
          .when(kind == "before_shop_timestamp",
                F.when(u("epoch") < 0.3, F.lit(0)).otherwise(
                    SHOP_OPENED_S - F.floor((1 + 3000 * u("past")) * SECONDS_PER_DAY)))
          .when(kind == "duplicate_conflict", F.col("ts") + 1 + draws.below(600, u("shift")))
          .otherwise(F.col("ts")))
    text_value = F.when(is_review, F.col("review_text")).otherwise(F.col("query"))
    damaged_text = (F.when(kind == "overlong_string",
                           F.concat_ws(" ", text_value, F.repeat(F.lit("really "), OVERLONG_CHARS // 7)))
                    .when(kind == "invalid_utf8", F.concat_ws(" ", text_value, F.lit("caf" + BYTES_TOKEN)))
                    .otherwise(text_value))
    is_text_kind = kind.isin("overlong_string", "invalid_utf8")
    default_price = F.lit(19.99).cast("decimal(12,2)")
    fields = {
        "event_id": F.col("dirty_record_id"),
        "event_type": (F.when(kind == "unknown_event_type", draws.pick(UNKNOWN_EVENT_TYPES, u("type")))
                       .when(is_price, F.lit("purchase"))
                       .when((kind == "unknown_item") & F.col("item_id").isNull(), F.lit("view"))
                       .otherwise(F.col("event_type"))),
        "event_ts": iso_utc(F.col("dirty_ts")),
        "user_id": (F.when(kind == "missing_user_id", F.when(u("blank") < 0.5, F.lit("")))
                    .when(kind == "unknown_user",
                          F.format_string("u%07d", 3 * users + 1 + draws.below(users, u("user"))))
                    .otherwise(F.col("user_id"))),
        "item_id": (F.when(kind == "unknown_item",
                           F.format_string("i%06d", 3 * items + 1 + draws.below(items, u("item"))))
                    .when(is_price, F.coalesce(F.col("item_id"), F.lit(ANY_ITEM_ID)))
                    .otherwise(F.col("item_id"))),
        "session_id": F.col("session_id"),
        "order_id": F.when(is_price, F.coalesce(F.col("order_id"), draws.hex_id("o", seed, "dirty-order", key)))
                     .otherwise(F.col("order_id")),
        "quantity": (F.when(is_price, F.coalesce(F.col("quantity"), F.lit(1)))
                     .when((kind == "duplicate_conflict") & F.col("quantity").isNotNull(), F.col("quantity") + 1)
                     .otherwise(F.col("quantity"))),
        "price": (F.when(kind == "negative_price", -F.abs(F.coalesce(F.col("price"), default_price)))
                  .when(is_price, F.coalesce(F.col("price"), default_price))
                  .otherwise(F.col("price"))),
        "currency": F.when(is_price, F.lit("USD")).otherwise(F.col("currency")),
        # Damaged text goes into the review of a review, into the query of anything else.
        "query": F.when(is_text_kind & ~is_review, damaged_text).otherwise(F.col("query")),
        "rating": F.col("rating"),
        "review_text": F.when(is_text_kind & is_review, damaged_text).otherwise(F.col("review_text")),
        "campaign_id": F.col("campaign_id"),
        "message_id": F.col("message_id"),
    }

    json = F.col("dirty_json")
    length = F.length(json)
    variant = draws.below(4, u("variant"))
    malformed = (F.when(variant == 0, F.substring(json, F.lit(1), F.floor(length * (0.3 + 0.4 * u("cut"))).cast("int")))
                 .when(variant == 1, F.translate(json, '"', "'"))
                 .when(variant == 2, F.substring(json, F.lit(1), (length - 1).cast("int")))
                 .otherwise(F.concat(F.substring(json, F.lit(1), (length - 1).cast("int")), F.lit(",}"))))
    # A timestamp as epoch seconds, an id as a number, a string inside an array,
    # a quantity spelled out.
    wrong_type = (
        F.when((variant == 0) | ((variant == 3) & F.col("quantity").isNull()),
               F.regexp_replace(json, '"event_ts":"[^"]*"',
                                F.concat(F.lit('"event_ts":'), F.col("dirty_ts").cast("string"))))
        .when(variant == 1, F.regexp_replace(json, '"user_id":"u0*([0-9]+)"', '"user_id":$1'))
        .when(variant == 2, F.regexp_replace(json, '"event_type":"([^"]*)"', '"event_type":["$1"]'))
        .otherwise(F.regexp_replace(json, '"quantity":[0-9]+', '"quantity":"two"'))
    )
    non_numeric = F.regexp_replace(json, '"price":-?[0-9.]+', F.concat(
        F.lit('"price":"'), draws.pick(NON_NUMERIC_PRICES, u("price")), F.lit('"')))
    line = (F.when(kind == "malformed_json", malformed)
            .when(kind == "wrong_type", wrong_type)
            .when(kind == "non_numeric_price", non_numeric)
            .when(kind == "invalid_utf8",
                  splice_bytes(json, token=BYTES_TOKEN, hex_bytes=draws.pick(INVALID_UTF8_HEX, u("bytes"))))
            .otherwise(json))

    return (
        draws.with_uniforms(events, seed=seed, prefix="dirty", keys=["event_id"], names=_EVENT_DRAWS, when=is_dirty)
        .withColumns({"dirty_record_id": F.when(is_dirty, record_id), "dirty_ts": F.when(is_dirty, ts)})
        .withColumn("dirty_json", F.when(is_dirty, F.to_json(F.struct(*[v.alias(n) for n, v in fields.items()]))))
        .withColumn("dirty_line", line)
        .drop("dirty_json", "dirty_ts")
        .transform(draws.drop_draws)
    )


_CSV_DRAWS = ("variant", "bytes", "consent", "future", "price", "stock")


def with_csv_dirt(frame: DataFrame, *, seed: int, source: str, key: str, plan: DirtyPlan,
                  kinds: tuple[str, ...]) -> DataFrame:
    """Adds ``dirty_kind`` to CSV rows (null for most) and the ``u_*`` draws their damage needs."""
    u_dirty = draws.uniform(seed, f"dirty-{source}", key)
    return draws.with_uniforms(
        frame.withColumn("dirty_kind", F.when(u_dirty < plan.per_clean,
                                              draws.pick(kinds, draws.uniform(seed, f"dirty-{source}-kind", key)))),
        seed=seed, prefix=f"dirty-{source}", keys=[key], names=_CSV_DRAWS, when=F.col("dirty_kind").isNotNull())


def csv_dirty_line(
    fields: dict[str, Column], *, kind: Column, fresh_id: Column, id_field: str,
    overrides: dict[str, list[tuple[str, Column]]], bytes_field: str, values_line: Column,
) -> tuple[Column, Column]:
    """A damaged CSV row derived from a clean one, in two steps.

    Returns:
        The row's fields joined (before malformation), to be materialised as a column, and the
        final line computed from that column (``values_line``).

    Args:
        fields: the clean row's fields as text columns, in landing column order.
        kind: the dirty kind column.
        fresh_id: the id of the dirty row (beyond the clean id range).
        id_field: the name of the id column.
        overrides: per field, (kind, value) pairs replacing the field for that kind.
        bytes_field: the field that receives invalid UTF-8.
        values_line: a reference to the materialised first result.
    """
    values = []
    for name, clean in fields.items():
        value = fresh_id if name == id_field else clean
        cases = [("missing_id", F.lit(None).cast("string"))] if name == id_field else []
        cases += overrides.get(name, [])
        if name == bytes_field:
            cases.append(("invalid_utf8", F.concat(F.coalesce(clean, F.lit("")), F.lit(BYTES_TOKEN))))
        for case_kind, case_value in reversed(cases):
            value = F.when(kind == case_kind, case_value).otherwise(value)
        values.append(csv_field(value))
    joined = F.concat_ws(",", *values)
    # Too few columns (cut after half of the separators; a quoted comma may cut a field
    # in two, which is just as broken) or too many.
    too_few = F.substring_index(values_line, ",", len(values) // 2)
    too_many = F.concat(values_line, F.lit(",extra,,"))
    line = (F.when(kind == "malformed_row", F.when(F.col("u_variant") < 0.5, too_few).otherwise(too_many))
            .when(kind == "invalid_utf8",
                  splice_bytes(values_line, token=BYTES_TOKEN, hex_bytes=draws.pick(INVALID_UTF8_HEX, F.col("u_bytes"))))
            .otherwise(values_line))
    return joined, line


def user_dirty_overrides(fields: dict[str, Column], *, end_s: int) -> dict[str, list[tuple[str, Column]]]:
    """Per users-CSV field, the damaged value for each dirty kind that touches it."""
    variant = draws.below(3, F.col("u_variant"))

    def only(number: int, value: Column, field: str) -> Column:
        return F.when(variant == number, value).otherwise(fields[field])

    return {
        "email_consent": [("wrong_type", only(0, draws.pick(("maybe", "yes please", "2"), F.col("u_consent")),
                                              "email_consent"))],
        "birthday": [("wrong_type", only(1, F.lit("31/02/1990"), "birthday"))],
        "signup_ts": [
            ("wrong_type", only(2, F.lit("yesterday"), "signup_ts")),
            ("future_timestamp", iso_utc(F.lit(end_s) + F.floor((30 + 1800 * F.col("u_future")) * SECONDS_PER_DAY))),
        ],
        "first_name": [("overlong_string", F.repeat(F.lit("Alexandra"), OVERLONG_CHARS // 9 + 1))],
    }


def product_dirty_overrides(fields: dict[str, Column]) -> dict[str, list[tuple[str, Column]]]:
    """Per products-CSV field, the damaged value for each dirty kind that touches it."""
    is_stock = F.col("u_variant") < 0.5
    return {
        "price": [
            ("negative_price", F.concat(F.lit("-"), fields["price"])),
            ("non_numeric_price", draws.pick(NON_NUMERIC_PRICES, F.col("u_price"))),
        ],
        "stock": [("wrong_type", F.when(is_stock, draws.pick(("plenty", "ten", "-"), F.col("u_stock")))
                   .otherwise(fields["stock"]))],
        "launched_at": [("wrong_type", F.when(~is_stock, F.lit("coming soon")).otherwise(fields["launched_at"]))],
        "description": [("overlong_string", F.repeat(F.lit("Best product ever. "), OVERLONG_CHARS // 19 + 1))],
    }
