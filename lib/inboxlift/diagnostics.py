"""No silent zero: when a stage's output is empty or collapses, say the likely cause and the fix.

Each ``diagnose_*`` function looks at a stage's report (and, where the report cannot tell, a few
counts of the tables it wrote) and returns :class:`Diagnosis` values; the command line prints them
as warnings after the stage's summary, and ``run-all`` exits with :data:`EMPTY_OUTBOX_EXIT` when
the final outbox holds nothing to send for a reason the shop can fix (docs/byod.md). Every check
is a count or an emptiness test of a whole table: nothing here grows with the number of users on
the driver.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from pyspark.sql import functions as F

from inboxlift.context import RunContext

log = logging.getLogger("inboxlift.diagnostics")

# run-all's exit code when it ran to the end but the outbox is empty for a reason the shop can fix.
EMPTY_OUTBOX_EXIT = 3
# More than this share of an entity's records quarantined is a collapse, not a few bad lines.
QUARANTINE_SHARE = 0.5

NO_EMAIL = ("no user has an e-mail address",
            "import a customers file: inboxlift import --shape customers FILE (docs/byod.md)")
NO_CONSENT = ("no user has e-mail consent",
              "import a customers file with a consent column, mapped as ingest.imports.customers.email_consent "
              "(docs/byod.md)")
NO_STOCK = ("no item is in stock",
            "import a catalogue file with a stock column (inboxlift import --shape catalogue FILE), or set "
            "features.unknown_stock_in_stock: true to read unknown stock as in stock")

# The fix for the reason most of a collapsed entity's records were quarantined for.
QUARANTINE_FIXES = {
    "before_shop_opened": "the data starts before ingest.shop_opened: set it to the shop's first day, or leave "
                          "it unset (no lower bound)",
    "bad_timestamp": "set the export's timestamp_format and timezone under ingest.imports.<shape> (landing files "
                     "want ISO-8601)",
    "future_timestamp": "the timestamps lie after now: check the time zone under ingest.imports.<shape>.timezone",
    "excluded_item": "most lines are charges in ingest.imports.invoice_lines.non_product_codes: check that list",
    "unknown_event_type": "map the export's event names under ingest.imports.clickstream.event_types",
    "bad_header": "the header lacks columns the mapping names: rename them under ingest.imports.<shape>",
    "missing_user_id": "map the user id column under ingest.imports.<shape>",
    "missing_timestamp": "map the timestamp column under ingest.imports.<shape>",
}


@dataclass(frozen=True)
class Diagnosis:
    """One warning: which stage, what collapsed, the likely cause, what to do."""

    stage: str
    problem: str
    fix: str
    # The shop can fix it (data, settings); false for what only the passage of time changes.
    shop_fixable: bool = True

    def message(self) -> str:
        return f"warning: {self.stage}: {self.problem}: {self.fix}"


def report(diagnoses: list[Diagnosis], echo: Any = print) -> None:
    """Print each warning (and log it, for jobs whose stdout nobody reads)."""
    for d in diagnoses:
        log.warning(d.message())
        echo(d.message())


def diagnose_ingest(result: Any, *, stage: str = "ingest") -> list[Diagnosis]:
    """Entities of which more than half the records were quarantined, with the main reason's fix."""
    out = []
    for counts in getattr(result, "entities", ()):
        if counts.read and counts.quarantined > QUARANTINE_SHARE * counts.read:
            top = max(sorted(counts.quarantined_by_reason.items()), key=lambda kv: kv[1], default=(None, 0))[0]
            fix = QUARANTINE_FIXES.get(top, "the lines and their reasons are in the quarantine tables "
                                            "(docs/ingest.md, Validation)")
            out.append(Diagnosis(stage, f"{counts.quarantined} of {counts.read} {counts.entity} records were "
                                        f"quarantined (mostly {top})", fix.replace("<shape>", counts.entity)))
    return out


def diagnose_audience(ctx: RunContext, *, stage: str) -> list[Diagnosis]:
    """Nobody can be mailed: no address, or no consent, in ``users``."""
    if not ctx.lake.exists("users"):
        return []
    users = ctx.lake.read("users")
    if users.isEmpty():
        return []
    with_email = users.where(F.col("email").isNotNull())
    if with_email.isEmpty():
        return [Diagnosis(stage, *NO_EMAIL)]
    if with_email.where(F.col("email_consent")).isEmpty():
        return [Diagnosis(stage, *NO_CONSENT)]
    return []


def diagnose_stock(ctx: RunContext, *, stage: str) -> list[Diagnosis]:
    """Every item out of stock: nothing can be recommended or listed."""
    if not ctx.lake.exists("item_features"):
        return []
    items = ctx.lake.read("item_features")
    if items.isEmpty() or not items.where(F.col("is_in_stock")).isEmpty():
        return []
    return [Diagnosis(stage, *NO_STOCK)]


def diagnose_features(ctx: RunContext, result: Any) -> list[Diagnosis]:
    rows = getattr(result, "rows", {})
    out = []
    if rows.get("user_features") == 0:
        out.append(Diagnosis("features", "user_features is empty", "no users: run ingest or import first"))
    if rows.get("interactions") == 0:
        out.append(Diagnosis("features", "no user viewed, carted or bought anything before the as-of date",
                             "import invoice lines or events up to that date (or pass --as-of within the data)"))
    return out + diagnose_stock(ctx, stage="features") + diagnose_audience(ctx, stage="features")


def diagnose_recommend(ctx: RunContext, result: Any) -> list[Diagnosis]:
    if getattr(result, "rows", 1):
        return []
    out = diagnose_stock(ctx, stage="recommend")
    return out or [Diagnosis("recommend", "0 recommendations", "user_features or the catalogue is empty: run "
                                                                "features after importing customers and products")]


def diagnose_plan(ctx: RunContext, result: Any) -> list[Diagnosis]:
    campaigns = getattr(result, "campaigns", ())
    if not campaigns or sum(c.planned for c in campaigns):
        return []
    excluded: dict[str, int] = {}
    for c in campaigns:
        for reason, n in c.excluded.items():
            excluded[reason] = excluded.get(reason, 0) + n
    out = diagnose_audience(ctx, stage="plan")
    if out:
        return out
    if not excluded:
        return [Diagnosis("plan", "0 planned: no user is in any campaign's audience today",
                          "check the campaigns' schedule and audience (conf/campaigns.yml), or plan --all",
                          shop_fixable=False)]
    top = max(sorted(excluded.items()), key=lambda kv: kv[1])[0]
    if top == "too_few_products":
        return diagnose_stock(ctx, stage="plan") or [Diagnosis(
            "plan", "0 planned: every user has too few products left (in stock, not bought before)",
            "import a catalogue with stock, or lower min_products in conf/campaigns.yml")]
    if top in ("no_consent",):
        return [Diagnosis("plan", *NO_CONSENT)]
    if top in ("daily_cap", "frequency_cap", "already_received"):
        return [Diagnosis("plan", f"0 planned: every user was excluded by {top}",
                          "they were mailed lately; nothing to fix", shop_fixable=False)]
    return [Diagnosis("plan", f"0 planned: most users excluded as {top}", "see campaign_exclusions and the "
                                                                          "README's \"Who may be mailed\"")]


def diagnose_render(ctx: RunContext, result: Any) -> list[Diagnosis]:
    messages = getattr(result, "messages", None)
    if messages is None and isinstance(result, list) and result:
        messages = getattr(result[0], "messages", None)
    if messages != 0:
        return []
    return [Diagnosis("render", "0 messages rendered", "the plan is empty: see the plan stage's warnings",
                      shop_fixable=False)]


DIAGNOSES = {
    "ingest": lambda ctx, result: diagnose_ingest(result),
    "import": lambda ctx, result: diagnose_ingest(result, stage="import"),
    "features": diagnose_features,
    "recommend": diagnose_recommend,
    "plan": diagnose_plan,
    "render": diagnose_render,
}


def diagnose_stage(ctx: RunContext, stage: str, result: Any) -> list[Diagnosis]:
    """The warnings of one stage's result (none for a stage without checks)."""
    check = DIAGNOSES.get(stage)
    return check(ctx, result) if check is not None else []


def outbox_is_empty(ctx: RunContext, plan_date: dt.date) -> bool:
    """No message rendered or sent for ``plan_date``."""
    if not ctx.lake.exists("outbox"):
        return True
    outbox = ctx.lake.read("outbox")
    if "plan_date" in outbox.columns:
        outbox = outbox.where(F.col("plan_date") == F.lit(plan_date))
    return outbox.where(F.col("status").isin("rendered", "sent")).isEmpty()


def final_outbox(ctx: RunContext, earlier: list[Diagnosis]) -> list[Diagnosis]:
    """run-all's last word: an empty outbox, with the fixable causes found on the way (or the audience's)."""
    if not outbox_is_empty(ctx, ctx.clock.today()):
        return []
    fixable = [d for d in earlier if d.shop_fixable] or [d for d in diagnose_audience(ctx, stage="run-all")]
    if not fixable:
        return []
    return [Diagnosis("run-all", "the outbox is empty", "fix the causes above, then run again: "
                      + "; ".join(f"{d.problem} ({d.stage})" for d in fixable))]
