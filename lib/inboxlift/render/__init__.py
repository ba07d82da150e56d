"""Rendering: one email per planned recipient, with sandboxed Jinja2, per partition (docs/render.md).

The signed links an email carries are tokens of :mod:`inboxlift.tokens` (no Spark, for the service).
"""

from inboxlift.render.eml import message_bytes
from inboxlift.render.links import message_id
from inboxlift.render.message import RenderConfig, render_row
from inboxlift.render.partition import OUTBOX_COLUMNS, RENDER_ERROR_COLUMNS, RENDERED_SCHEMA, render_batches

__all__ = [
    "OUTBOX_COLUMNS", "RENDERED_SCHEMA", "RENDER_ERROR_COLUMNS", "RenderConfig", "message_bytes", "message_id",
    "render_batches", "render_row",
]
