"""The plan stage (``inboxlift run plan``): campaign definitions -> ``campaign_plan`` and ``campaign_exclusions``.

Campaigns are planned one at a time in ``priority`` order (then id), so a campaign planned first
counts against the frequency cap of the ones after it. Each campaign's plan for the day replaces its
earlier plan for the same day (``overwrite where campaign_id = .. and plan_date = ..``), and
``campaign_plan`` keeps every day's plans: the history the cap and the cool-down count, with the
``outbox``'s sent messages. A holdout row counts as a send (intent to treat): the held-out user is
kept from later emails exactly as a mailed one is, so the holdout and the treated users face the
same later eligibility and the holdout uplift compares like with like. Of the day being planned, a
campaign counts only the plans of the campaigns before it in priority order
(:func:`inboxlift.campaigns.planning.decide_campaign`), never the earlier plans of itself or of the
campaigns after it, which the run replaces: re-planning a day, every campaign or one, gives the
same rows.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass, field

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from inboxlift.campaigns.definitions import HOLDOUT, WEEKDAYS, Campaign, load_campaigns
from inboxlift.campaigns.planning import EXCLUSION_REASONS, PlanInputs, decide_campaign, split_decisions
from inboxlift.context import RunContext
from inboxlift.delivery.outbox import with_delivered_status
from inboxlift.delivery.states import DELIVERIES_TABLE
from inboxlift.pending_consent import suppressions_now
from inboxlift.session import KEEP
from inboxlift.transforms.features_returns import net_of_returns

PLAN_TABLE = "campaign_plan"
EXCLUSIONS_TABLE = "campaign_exclusions"
OUTBOX_TABLE = "outbox"
# An outbox message counts as a send once it left; until then its plan row is what counts.
SENT = "sent"


class UnknownCampaignError(ValueError):
    """A campaign id that is not in the campaigns file."""


@dataclass(frozen=True)
class CampaignCounts:
    campaign_id: str
    campaign_type: str
    variants: dict[str, int] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)

    @property
    def planned(self) -> int:
        return sum(n for v, n in self.variants.items() if v != HOLDOUT)

    @property
    def audience(self) -> int:
        return sum(self.variants.values()) + sum(self.excluded.values())


@dataclass(frozen=True)
class PlanReport:
    plan_date: dt.date
    plan_run_id: str
    campaigns: tuple[CampaignCounts, ...]

    def summary(self) -> str:
        lines = [f"plan {self.plan_run_id} for {self.plan_date}: {len(self.campaigns)} campaigns",
                 f"  {'campaign':<22}{'audience':>9}{'planned':>9}  variants / exclusions"]
        for c in self.campaigns:
            variants = ", ".join(f"{v}={n}" for v, n in sorted(c.variants.items()))
            excluded = ", ".join(f"{r}={c.excluded[r]}" for r in EXCLUSION_REASONS if c.excluded.get(r))
            lines.append(f"  {c.campaign_id:<22}{c.audience:>9}{c.planned:>9}  {variants or '-'}"
                         + (f" | excluded: {excluded}" if excluded else ""))
        return "\n".join(lines)


def _optional(ctx: RunContext, name: str) -> DataFrame | None:
    return ctx.lake.read(name) if ctx.lake.exists(name) else None


def _required(ctx: RunContext, name: str) -> DataFrame:
    return ctx.lake.read_required(name, needed_by="planning", hint="run the stage that writes it first")


def plan_inputs(ctx: RunContext, *, suppressions: DataFrame | None = None) -> PlanInputs:
    """The tables planning reads, as of the clock's now.

    Args:
        suppressions: the suppressions to plan with (from :func:`inboxlift.pending_consent.suppressions_now`,
            read once per run); default: read them now.
    """
    now = ctx.clock.now()
    # A purchase cancelled or returned in full was not bought (transforms.features_returns).
    events = _required(ctx, "events").transform(net_of_returns)
    purchases = (events.where((F.col("event_type") == "purchase") & (F.col("event_ts") < F.lit(now))
                              & F.col("user_id").isNotNull() & F.col("item_id").isNotNull())
                 .select("user_id", "item_id", "event_ts"))
    history = None
    for name in (PLAN_TABLE, OUTBOX_TABLE):
        table = _optional(ctx, name)
        if table is not None and name == OUTBOX_TABLE:
            # Sent per deliveries, whatever the row says (inboxlift.delivery.outbox).
            table = with_delivered_status(table, deliveries=_optional(ctx, DELIVERIES_TABLE))
        if table is None or "plan_date" not in table.columns:
            continue
        # Every plan row counts, holdout included: a held-out user got a virtual send (module docstring).
        rows = table
        if name == OUTBOX_TABLE:
            # A rendered message of a plan that has since been replaced is no send.
            rows = rows.where(F.col("status") == SENT)
        rows = rows.select("campaign_id", "user_id", "plan_date")
        history = rows if history is None else history.unionByName(rows)
    if history is None:
        history = ctx.spark.createDataFrame([], "campaign_id string, user_id string, plan_date date")
    return PlanInputs(
        users=_required(ctx, "users"),
        user_features=_required(ctx, "user_features"),
        item_features=_required(ctx, "item_features"),
        # A mailed plan row and its sent outbox message are one send: _history_counts counts each
        # (campaign, user, day) once.
        history=history,
        purchases=purchases,
        recommendations=_optional(ctx, "recommendations"),
        similar_items=_optional(ctx, "similar_items"),
        content_similar_items=_optional(ctx, "content_similar_items"),
        user_segments=_optional(ctx, "user_segments"),
        # The table with the consent events the tracking service wrote since ingest's last batch.
        suppressions=suppressions if suppressions is not None else suppressions_now(ctx),
    )


def chosen_campaigns(campaigns: dict[str, Campaign], *, campaign_id: str | None, all_campaigns: bool,
                     plan_date: dt.date) -> list[Campaign]:
    """The campaigns to plan, by priority: one by id, every enabled one, or the enabled ones due that weekday."""
    if campaign_id is not None:
        if campaign_id not in campaigns:
            raise UnknownCampaignError(f"no campaign {campaign_id!r}; the campaigns are {', '.join(sorted(campaigns))}")
        chosen = [campaigns[campaign_id]]
    else:
        weekday = WEEKDAYS[plan_date.weekday()]
        chosen = [c for c in campaigns.values() if c.enabled and (all_campaigns or weekday in c.schedule)]
    return sorted(chosen, key=lambda c: (c.priority, c.id))


def run_plan(ctx: RunContext, *, campaign_id: str | None = None, all_campaigns: bool = False,
             plan_date: dt.date | None = None) -> PlanReport:
    """Plan one campaign, every campaign (``all_campaigns``) or the campaigns due on ``plan_date`` (default today)."""
    plan_date = plan_date or ctx.clock.today()
    campaigns = load_campaigns(ctx.settings.paths.campaigns_file)
    chosen = chosen_campaigns(campaigns, campaign_id=campaign_id, all_campaigns=all_campaigns, plan_date=plan_date)
    order = sorted(campaigns.values(), key=lambda c: (c.priority, c.id))
    now = ctx.clock.now()
    run_id = f"plan-{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    counts = []
    # Read once for every campaign of the run (pending consent events take a Spark job to apply).
    suppressions = suppressions_now(ctx)
    for campaign in chosen:
        # re-read: the history includes the campaigns planned before this one
        inputs = plan_inputs(ctx, suppressions=suppressions)
        later = [c.id for c in order[order.index(campaign) + 1:]]
        # Computed once for both tables: audience, joins, product choice.
        decisions = decide_campaign(inputs, campaign, plan_date=plan_date, plan_run_id=run_id,
                                    planned_at=now, later_campaigns=later).persist(KEEP)
        try:
            plan, exclusions = split_decisions(decisions)
            where = f"campaign_id = '{campaign.id}' AND plan_date = DATE'{plan_date.isoformat()}'"
            for table, frame in ((PLAN_TABLE, plan), (EXCLUSIONS_TABLE, exclusions)):
                if ctx.lake.exists(table):
                    ctx.lake.overwrite(table, frame, where=where)
                else:
                    ctx.lake.append(table, frame)
            counts.append(_counts(campaign, decisions))
        finally:
            decisions.unpersist()
    return PlanReport(plan_date=plan_date, plan_run_id=run_id, campaigns=tuple(counts))


def _counts(campaign: Campaign, decisions: DataFrame) -> CampaignCounts:
    """Planned rows per variant and excluded rows per reason, in one job over the kept decisions.

    They are the rows just written: the overwrite replaced exactly this campaign's day in both tables.
    (Reading both tables back cost two reads and two jobs per campaign.)
    """
    rows = (decisions
            .select("excluded", F.when(F.col("excluded").isNull(), F.col("variant")).alias("variant"))
            .groupBy("excluded", "variant").count().collect())  # one row per variant and per reason
    return CampaignCounts(campaign.id, campaign.type,
                          variants={r["variant"]: r["count"] for r in rows if r["excluded"] is None},
                          excluded={r["excluded"]: r["count"] for r in rows if r["excluded"] is not None})
