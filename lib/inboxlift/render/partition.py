"""The per-partition step: Arrow record batches of recipients in, rendered messages out.

:func:`render_batches` is what ``DataFrame.mapInArrow`` runs on every partition; it is plain Python
over ``pyarrow.RecordBatch`` objects, so tests call it without Spark. Each input row gives exactly
one output row: a message (``reason`` null) or a failure (``reason`` and ``error`` set, the message
columns null). Columns that pass through unchanged (ids, ``send_at``) are copied as Arrow arrays,
not converted to Python objects and back.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import pyarrow as pa
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import DateType, MapType, StringType, StructField, StructType, TimestampType

from inboxlift.render.message import STATUS_ERROR, STATUS_RENDERED, RenderConfig, render_row

# What the row function reads (the recipients frame may carry more columns).
ROW_COLUMNS = (
    "campaign_id", "campaign_type", "plan_date", "user_id", "variant", "template", "locale", "subject_template",
    "send_at",
    "context", "has_user", "email", "first_name", "timezone", "email_consent", "products",
)
PASS_THROUGH = ("campaign_id", "campaign_type", "plan_date", "user_id", "variant", "send_at", "plan_run_id",
                "template")

OUTBOX_COLUMNS = (
    "message_id", "campaign_id", "campaign_type", "user_id", "variant", "to_email", "from_email", "subject",
    "html", "text", "headers", "send_at", "status", "rendered_at", "plan_run_id", "plan_date",
)
# ~6 MB of messages per output batch (a message is 20-25 kB). Against 1,000 (~25 MB) the Spark side
# averaged 40.3 s against 41.9 s per 200k messages on 2 cores, close to run-to-run noise (bench/README.md).
OUTPUT_BATCH_ROWS = 250
RENDER_ERROR_COLUMNS = ("campaign_id", "user_id", "template", "reason", "error", "rendered_at")

_S = StringType()
RENDERED_SCHEMA = StructType([
    StructField("message_id", _S), StructField("campaign_id", _S), StructField("campaign_type", _S),
    StructField("user_id", _S), StructField("variant", _S), StructField("to_email", _S),
    StructField("from_email", _S), StructField("subject", _S), StructField("html", _S), StructField("text", _S),
    StructField("headers", MapType(_S, _S)), StructField("send_at", TimestampType()), StructField("status", _S),
    StructField("rendered_at", TimestampType()), StructField("plan_run_id", _S), StructField("template", _S),
    StructField("reason", _S), StructField("error", _S), StructField("plan_date", DateType()),
])
RENDERED_ARROW_SCHEMA = to_arrow_schema(RENDERED_SCHEMA, timezone="UTC")


# The catalogue columns a product card reads; the price as decimal text (see frames.PRODUCT_COLUMNS).
CATALOGUE_COLUMNS = ("item_id", "name", "brand", "price", "currency", "image_url", "url", "in_stock")


@dataclass(frozen=True)
class TaskCatalogue:
    """Catalogue rows (``CATALOGUE_COLUMNS``) shipped with the render function to every task.

    ``key`` names the content (a SHA-256 of the bytes), so a worker rebuilds its dictionary only when
    the catalogue changes; ``ipc`` is an Arrow IPC stream, compact and fast to pickle.
    """

    key: str
    ipc: bytes = field(repr=False)
    items: int

    @classmethod
    def from_arrow(cls, table: pa.Table) -> "TaskCatalogue":
        missing = [c for c in CATALOGUE_COLUMNS if c not in table.schema.names]
        if missing:
            raise ValueError(f"TaskCatalogue: the catalogue lacks column(s) {', '.join(missing)}")
        table = table.select(list(CATALOGUE_COLUMNS))
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        ipc = sink.getvalue().to_pybytes()
        return cls(key=hashlib.sha256(ipc).hexdigest(), ipc=ipc, items=table.num_rows)

    def lookup(self) -> dict[str, dict[str, Any]]:
        """item_id -> its card columns and ``is_found``; built once per worker for each catalogue."""
        global _lookup
        with _lookup_lock:
            if _lookup is None or _lookup[0] != self.key:
                table = pa.ipc.open_stream(self.ipc).read_all()
                # Price as text whatever the sender's type: formatting is cached per price text.
                if table.schema.field("price").type != pa.string():
                    table = table.set_column(table.schema.get_field_index("price"), "price",
                                             table.column("price").cast(pa.string()))
                _lookup = (self.key, {row["item_id"]: {**row, "is_found": True} for row in table.to_pylist()})
            return _lookup[1]


_lookup_lock = threading.Lock()
_lookup: tuple[str, dict[str, dict[str, Any]]] | None = None


def planned_cards(item_ids: list[str] | None, sources: list[str] | None,
                  catalogue: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The planned items in plan order with their catalogue columns, as Spark's join gives them: an
    item missing from the catalogue keeps its id and source with ``is_found`` unset."""
    return [
        {"position": position, "item_id": item, "source": source, **catalogue.get(item, {})}
        for position, (item, source) in enumerate(itertools.zip_longest(item_ids or (), sources or ()))
    ]


def _column(batch: pa.RecordBatch, name: str, target: pa.DataType) -> pa.Array:
    if name not in batch.schema.names:
        return pa.nulls(batch.num_rows, type=target)
    values = batch.column(name)
    return values if values.type == target else values.cast(target)


def render_batch(batch: pa.RecordBatch, config: RenderConfig,
                 catalogue: dict[str, dict[str, Any]] | None = None) -> pa.RecordBatch:
    """One batch of recipients -> one batch of ``RENDERED_SCHEMA`` rows, row for row.

    With ``catalogue`` (item_id -> catalogue columns) the rows' ``item_ids`` and ``item_sources`` are
    joined with it here; without it each row must carry its ``products``.
    """
    names = batch.schema.names
    joined_here = catalogue is not None and "products" not in names
    wanted = ROW_COLUMNS + (("item_ids", "item_sources") if joined_here else ())
    rows: list[dict[str, Any]] = batch.select([c for c in wanted if c in names]).to_pylist()
    if joined_here:
        for row in rows:
            row["products"] = planned_cards(row.pop("item_ids", None), row.pop("item_sources", None), catalogue)
    results = [render_row(row, config) for row in rows]
    n = batch.num_rows
    ok = [r["reason"] is None for r in results]
    computed = {
        name: [r.get(name) for r in results]
        for name in ("message_id", "to_email", "subject", "html", "text", "reason", "error")
    }
    headers = [list(r["headers"].items()) if r.get("headers") else None for r in results]
    schema = RENDERED_ARROW_SCHEMA
    arrays = {
        **{name: pa.array(values, type=schema.field(name).type) for name, values in computed.items()},
        **{name: _column(batch, name, schema.field(name).type) for name in PASS_THROUGH},
        "headers": pa.array(headers, type=schema.field("headers").type),
        "from_email": pa.array([config.from_address if good else None for good in ok], type=pa.string()),
        "status": pa.array([STATUS_RENDERED if good else STATUS_ERROR for good in ok], type=pa.string()),
        "rendered_at": pa.array([config.rendered_at] * n, type=schema.field("rendered_at").type),
    }
    return pa.RecordBatch.from_arrays([arrays[f.name] for f in schema], schema=schema)


def render_batches(batches: Iterable[pa.RecordBatch], config: RenderConfig, *,
                   catalogue: TaskCatalogue | None = None,
                   max_rows: int = OUTPUT_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The ``mapInArrow`` function (bind ``config``, and ``catalogue`` for the map-side join, with
    functools.partial).

    Output batches hold at most ``max_rows`` messages: a message is some 20-25 kB of HTML and text,
    so Spark's default input batch (10,000 rows) would come back as one batch of 200+ MB.
    """
    lookup = catalogue.lookup() if catalogue is not None else None
    for batch in batches:
        for start in range(0, batch.num_rows, max_rows):
            yield render_batch(batch.slice(start, max_rows), config, lookup)
