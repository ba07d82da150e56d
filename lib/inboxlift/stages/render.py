"""The render stage: ``campaign_plan`` -> one email per recipient in ``outbox`` (docs/render.md).

``run_render`` reads the plan (one campaign, or all), skips and counts the holdout, joins users and
the catalogue, renders every recipient with sandboxed Jinja2 per partition (``mapInArrow``) and
writes:

- ``outbox``: merged by ``message_id`` (a hash of campaign and user), so a re-render replaces a
  message instead of adding one; a message whose status is no longer ``rendered`` (sent, say) is
  left as it is;
- ``render_errors``: the rows that could not be rendered, with the reason; replaced for the rendered
  campaigns on every run, so fixed rows disappear and a re-run adds no duplicates.

``export_eml`` writes a campaign's messages as ``.eml`` files, ``preview`` one message's HTML.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pyspark import StorageLevel
from pyspark.sql import functions as F

from inboxlift.context import RunContext
from inboxlift.render.eml import eml_bytes
from inboxlift.render.frames import (
    filter_sendable,
    is_holdout,
    render_partitions,
    render_plan,
)
from inboxlift.keys import signing_key
from inboxlift.render.message import STATUS_RENDERED, RenderConfig
from inboxlift.render.partition import OUTBOX_COLUMNS, RENDER_ERROR_COLUMNS

PLAN_TABLE = "campaign_plan"
USERS_TABLE = "users"
PRODUCTS_TABLE = "products"
OUTBOX_TABLE = "outbox"
ERRORS_TABLE = "render_errors"
_HEX_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class RenderReport:
    campaign_id: str | None
    # (campaign_id, variant, messages rendered)
    rendered: tuple[tuple[str, str, int], ...]
    # (campaign_id, holdout rows skipped)
    holdout: tuple[tuple[str, int], ...]
    # (campaign_id, reason, rows sent to render_errors)
    errors: tuple[tuple[str, str, int], ...]
    development_key: bool
    outbox_version: int | None
    errors_version: int | None

    @property
    def messages(self) -> int:
        return sum(n for _, _, n in self.rendered)

    @property
    def skipped_holdout(self) -> int:
        return sum(n for _, n in self.holdout)

    @property
    def failed(self) -> int:
        return sum(n for _, _, n in self.errors)

    def summary(self) -> str:
        scope = f"campaign {self.campaign_id}" if self.campaign_id else "every planned campaign"
        lines = [f"render ({scope}): {self.messages} messages into {OUTBOX_TABLE}, {self.failed} rows into "
                 f"{ERRORS_TABLE}, {self.skipped_holdout} holdout rows skipped (no email)"]
        holdout = dict(self.holdout)
        errors: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for campaign, reason, n in self.errors:
            errors[campaign].append((reason, n))
        campaigns = sorted({c for c, _, _ in self.rendered} | set(holdout) | set(errors))
        if campaigns:
            lines.append(f"  {'campaign':<28}{'variant':<10}{'messages':>10}")
        for campaign in campaigns:
            for c, variant, n in self.rendered:
                if c == campaign:
                    lines.append(f"  {campaign:<28}{variant:<10}{n:>10}")
            if holdout.get(campaign):
                lines.append(f"  {campaign:<28}{'holdout':<10}{holdout[campaign]:>10}  skipped")
            for reason, n in sorted(errors.get(campaign, [])):
                lines.append(f"  {campaign:<28}{'error':<10}{n:>10}  {reason}")
        if self.development_key:
            lines.append("  WARNING: links are signed with the development key (env local and the signing key's "
                         "environment variable unset): anyone can forge them; never send these emails")
        return "\n".join(lines)


def _in_list(column: str, values: list[str]) -> str:
    quoted = ", ".join("'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'" for v in values)
    return f"{column} IN ({quoted})"


def run_render(ctx: RunContext, *, campaign_id: str | None = None, environ: Mapping[str, str] | None = None,
               dbutils: Any = None) -> RenderReport:
    """Render the plan of one campaign (or of all) into ``outbox`` and ``render_errors``.

    Args:
        campaign_id: the campaign to render; None renders every campaign in the plan.
        environ: the process environment, where ``secrets.signing_key = env:NAME`` is looked up (the
            library reads no environment itself; without it only a local run can render, with the
            development key).
        dbutils: Databricks' dbutils, for ``dbsecret:scope/key`` references.
    """
    key, development_key = signing_key(ctx.settings, environ=environ or {}, dbutils=dbutils)
    plan = ctx.lake.read(PLAN_TABLE)
    if campaign_id is not None:
        plan = plan.where(F.col("campaign_id") == F.lit(campaign_id))
    if "plan_date" in plan.columns:
        # campaign_plan keeps every day's plans: render each campaign's latest day only (one message per
        # campaign and user, the outbox's key).
        latest = plan.groupBy("campaign_id").agg(F.max("plan_date").alias("plan_date"))
        plan = plan.join(latest, ["campaign_id", "plan_date"], "left_semi")
    config = RenderConfig.from_settings(ctx.settings.render, signing_key=key, rendered_at=ctx.clock.now())
    # Rendered once: the counts, the merge (which reads its source more than once) and the errors reuse it.
    rendered = render_plan(
        filter_sendable(plan), users=ctx.lake.read(USERS_TABLE), products=ctx.lake.read(PRODUCTS_TABLE),
        config=config, partitions=render_partitions(ctx.spark),
        task_catalogue_max_items=ctx.settings.render.task_catalogue_max_items,
    ).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        # Small: one row per campaign, variant and reason.
        counts = rendered.groupBy("campaign_id", "variant", "reason").count().collect()
        holdout = plan.where(is_holdout()).groupBy("campaign_id").count().collect()
        campaigns = sorted({r["campaign_id"] for r in counts} | {r["campaign_id"] for r in holdout}
                           | ({campaign_id} if campaign_id is not None else set()))
        messages = rendered.where(F.col("reason").isNull()).select(*OUTBOX_COLUMNS)
        failures = rendered.where(F.col("reason").isNotNull()).select(*RENDER_ERROR_COLUMNS)
        outbox = ctx.lake.merge(OUTBOX_TABLE, messages, keys=["message_id"],
                                update_condition=f"t.status = '{STATUS_RENDERED}'")
        if ctx.lake.exists(ERRORS_TABLE) and campaigns:
            errors = ctx.lake.overwrite(ERRORS_TABLE, failures, where=_in_list("campaign_id", campaigns))
        else:
            errors = ctx.lake.append(ERRORS_TABLE, failures)
    finally:
        rendered.unpersist()
    return RenderReport(
        campaign_id=campaign_id,
        rendered=tuple(sorted((r["campaign_id"], r["variant"] or "", r["count"]) for r in counts
                              if r["reason"] is None)),
        holdout=tuple(sorted((r["campaign_id"], r["count"]) for r in holdout)),
        errors=tuple(sorted((r["campaign_id"], r["reason"], r["count"]) for r in counts if r["reason"] is not None)),
        development_key=development_key,
        outbox_version=outbox.version,
        errors_version=errors.version,
    )


def _eml_name(message_id: str) -> str:
    local = message_id.split("@", 1)[0]
    return f"{local if _HEX_ID.fullmatch(local) else hashlib.sha256(message_id.encode()).hexdigest()[:32]}.eml"


def export_eml(ctx: RunContext, *, campaign_id: str, to_dir: str | Path) -> int:
    """Write every outbox message of a campaign to ``to_dir/<message-id>.eml``; returns the count.

    Messages stream to the driver a partition at a time (``toLocalIterator``), never all at once. A file
    is written under a temporary name and renamed, so a reader never sees half a message.
    """
    folder = Path(to_dir)
    folder.mkdir(parents=True, exist_ok=True)
    rows = (
        ctx.lake.read(OUTBOX_TABLE)
        .where(F.col("campaign_id") == F.lit(campaign_id))
        # Microseconds since the epoch: Python's Row would give a naive local-time datetime.
        .select("message_id", "to_email", "from_email", "subject", "text", "html", "headers",
                F.unix_micros("send_at").alias("send_at_us"))
    )
    written = 0
    for row in rows.toLocalIterator():
        message = row.asDict()
        if message["send_at_us"] is not None:
            message["send_at"] = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + \
                dt.timedelta(microseconds=message["send_at_us"])
        path = folder / _eml_name(message["message_id"])
        partial = path.with_suffix(".eml.partial")
        partial.write_bytes(eml_bytes(message))
        os.replace(partial, path)
        written += 1
    return written


def preview(ctx: RunContext, *, campaign_id: str, user_id: str, to_path: str | Path) -> Path:
    """Write the HTML of one user's message in a campaign to ``to_path``; returns the path.

    Raises:
        LookupError: the outbox holds no message for that campaign and user.
    """
    found = (
        ctx.lake.read(OUTBOX_TABLE)
        .where((F.col("campaign_id") == F.lit(campaign_id)) & (F.col("user_id") == F.lit(user_id)))
        .select("html").limit(1).collect()  # one row at most
    )
    if not found:
        raise LookupError(f"outbox has no message of campaign {campaign_id!r} for user {user_id!r} "
                          "(run render for the campaign first)")
    path = Path(to_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(found[0]["html"], encoding="utf-8")
    return path
