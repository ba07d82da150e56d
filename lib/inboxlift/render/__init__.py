"""Rendering: one email per planned recipient, with sandboxed Jinja2, per partition (docs/render.md)."""

from inboxlift.render.links import (
    click_url,
    message_id,
    unsubscribe_url,
    verify_click_url,
    verify_unsubscribe_url,
)
from inboxlift.render.message import RenderConfig, render_row
from inboxlift.render.partition import OUTBOX_COLUMNS, RENDER_ERROR_COLUMNS, RENDERED_SCHEMA, render_batches

__all__ = [
    "OUTBOX_COLUMNS", "RENDERED_SCHEMA", "RENDER_ERROR_COLUMNS", "RenderConfig", "click_url", "message_id",
    "render_batches", "render_row", "unsubscribe_url", "verify_click_url", "verify_unsubscribe_url",
]
