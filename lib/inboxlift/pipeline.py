"""The pipeline's stages, in order: what ``inboxlift run STAGE`` and ``run-all`` execute.

Each stage is registered with its name, a one-line description, the arguments
it takes and the function that runs it on a :class:`RunContext`. Jobs, the CLI
and the Databricks bundle all go through this table.
"""

from __future__ import annotations

import argparse
import os
import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from inboxlift.context import RunContext


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[RunContext, argparse.Namespace], Any]


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    return None


def _ingest_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--landing-dir", help="folder of landing files (default: paths.landing_dir)")


def _run_ingest(ctx: RunContext, args: argparse.Namespace) -> Any:
    from inboxlift.stages.ingest import run_ingest

    return run_ingest(ctx, landing_dir=args.landing_dir, echo=_quiet)


def _quiet(text: str) -> None:
    """Stages that print their own summary hand it back instead; the CLI prints it once."""


def _features_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--as-of", type=dt.date.fromisoformat, default=None, metavar="YYYY-MM-DD",
                        help="compute the features as of this date (default: today per the clock)")


def _run_features(ctx: RunContext, args: argparse.Namespace) -> Any:
    from inboxlift.stages.features import run_features

    return run_features(ctx, as_of=args.as_of)


def _run_segment_train(ctx: RunContext, args: argparse.Namespace) -> Any:
    from inboxlift.stages.segments import run_segment_train

    return run_segment_train(ctx)


def _run_recommend_train(ctx: RunContext, args: argparse.Namespace) -> Any:
    from inboxlift.stages.recommend import run_recommend_train

    return run_recommend_train(ctx)


def _run_recommend(ctx: RunContext, args: argparse.Namespace) -> Any:
    from inboxlift.stages.recommend import run_recommend

    return run_recommend(ctx)


def _render_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--campaign", help="render this campaign's plan (default: every campaign in the plan)")
    parser.add_argument("--export", action="store_true",
                        help="also write every message as .eml under paths.output_dir/eml/<campaign>/ and one "
                             "HTML preview per campaign under paths.output_dir/previews/")


def _run_render(ctx: RunContext, args: argparse.Namespace) -> Any:
    from inboxlift.stages.render import run_render

    report = run_render(ctx, campaign_id=args.campaign, environ=os.environ, dbutils=ctx.dbutils)
    if not (args.export or getattr(args, "command", None) == "run-all"):
        return report
    return [report.summary(), *export_outputs(ctx, campaign_id=args.campaign)]


def export_outputs(ctx: RunContext, *, campaign_id: str | None = None) -> list[str]:
    """Every outbox message that may leave as .eml (see ``export_eml``: withdrawn and sent messages and
    users not allowed mail now are skipped and counted), and one preview per campaign (its first
    rendered message by user id), under paths.output_dir."""
    from pyspark.sql import functions as F

    from inboxlift.delivery.outbox import read_outbox
    from inboxlift.stages.render import STATUS_RENDERED, export_eml, preview

    out = Path(ctx.settings.paths.output_dir)
    outbox = read_outbox(ctx.lake)
    if campaign_id is not None:
        outbox = outbox.where(F.col("campaign_id") == campaign_id)
    # One row per campaign.
    firsts = outbox.groupBy("campaign_id").agg(
        F.min(F.when(F.col("status") == STATUS_RENDERED, F.col("user_id"))).alias("user_id")
    ).orderBy("campaign_id").collect()
    lines = []
    for row in firsts:
        report = export_eml(ctx, campaign_id=row.campaign_id, to_dir=out / "eml" / row.campaign_id)
        line = report.summary()
        if row.user_id is not None:
            page = preview(ctx, campaign_id=row.campaign_id, user_id=row.user_id,
                           to_path=out / "previews" / f"{row.campaign_id}.html")
            line += f"; preview {page}"
        lines.append(line)
    return lines


def _send_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--campaign", help="send this campaign's due messages (default: every campaign's)")
    parser.add_argument("--dry-run", action="store_true",
                        help="count what would be sent and skipped; send nothing, write nothing")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="send at most N messages (earliest send_at first); the others stay due")
    parser.add_argument("--resend-unknown", action="store_true",
                        help="send again the messages whose outcome is unknown (the relay may have them)")


def _run_send(ctx: RunContext, args: argparse.Namespace) -> Any:
    from inboxlift.stages.send import run_send

    options = dict(campaign_id=args.campaign, dry_run=args.dry_run, limit=args.limit,
                   resend_unknown=args.resend_unknown, environ=os.environ, dbutils=ctx.dbutils)
    if not ctx.settings.delivery.is_embedded or args.dry_run:
        return run_send(ctx, **options)
    # The local mode: an SMTP server on loopback keeps what is sent, for the duration of the stage.
    from inboxlift.delivery.sink import embedded_relay

    folder = Path(ctx.settings.paths.output_dir).absolute() / "sent"
    with embedded_relay(folder) as (relay, sink):
        report = run_send(ctx, relay=relay, **options)
    return [report.summary(), f"embedded relay {relay.name} (now stopped): {sink.accepted} messages stored in "
                              f"the Maildir {folder}"]


def _simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--days", type=int, default=None, metavar="N",
                        help="answer the messages sent (and holdouts planned) on the last N days, today included "
                             "(default: simulate.days)")


def _run_simulate(ctx: RunContext, args: argparse.Namespace) -> Any:
    from inboxlift.stages.simulate import NoGeneratedShopError, run_simulate

    try:
        return run_simulate(ctx, days=args.days)
    except NoGeneratedShopError as exc:
        # run-all on a real shop's data: there is nothing to simulate, and that is no failure.
        if getattr(args, "command", None) == "run-all":
            return f"skipped: {exc}"
        raise


def _plan_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--campaign", help="plan this campaign (an id of the campaigns file)")
    which.add_argument("--all", dest="all_campaigns", action="store_true",
                       help="plan every enabled campaign, due today or not")
    parser.add_argument("--date", type=dt.date.fromisoformat, default=None, metavar="YYYY-MM-DD",
                        help="the campaign day (default: today per the clock)")


def _run_plan(ctx: RunContext, args: argparse.Namespace) -> Any:
    from inboxlift.stages.plan import run_plan

    # run-all plans every campaign, so the main command shows one email of each type.
    every = args.all_campaigns or getattr(args, "command", None) == "run-all"
    return run_plan(ctx, campaign_id=args.campaign, all_campaigns=every, plan_date=args.date)


def _run_segment(ctx: RunContext, args: argparse.Namespace) -> Any:
    from inboxlift.stages.segments import run_segment

    return run_segment(ctx)


def _run_report(ctx: RunContext, args: argparse.Namespace) -> Any:
    from inboxlift.stages.report import run_report

    return run_report(ctx)


def _maintain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--retention-hours", type=int, default=None,
                        help="vacuum files unreferenced for longer than this (default: storage.vacuum_retention_hours)")


def _run_maintain(ctx: RunContext, args: argparse.Namespace) -> list[str]:
    """Delete quarantine rows past ``ingest.quarantine_retention_days``, then compact and vacuum every table."""
    from inboxlift.stages.ingest import purge_quarantine

    # Before the vacuum, so the files of the deleted rows go with it once they are old enough.
    lines = purge_quarantine(ctx)
    for name in ctx.lake.table_names():
        ctx.lake.optimize(name)
        removed = ctx.lake.vacuum(name, retention_hours=args.retention_hours)
        lines.append(f"{name}: optimized, {len(removed)} old files vacuumed")
    lines.append(_remove_stale_checkpoints(ctx))
    return lines


def _remove_stale_checkpoints(ctx: RunContext) -> str:
    from inboxlift.checkpoints import remove_stale_checkpoints

    spark = ctx.settings.spark
    removed = remove_stale_checkpoints(spark.checkpoint_dir, now=ctx.clock.now(),
                                       older_than=dt.timedelta(hours=spark.checkpoint_retention_hours))
    return f"checkpoints: {len(removed)} folders older than {spark.checkpoint_retention_hours} h removed " \
           f"from {spark.checkpoint_dir}"


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in [
        Stage("ingest", "validate landing files into events, users, products (+ quarantine, run log)",
              _ingest_arguments, _run_ingest),
        Stage("features", "user_features, item_features, interactions and review sentiment as of a date",
              _features_arguments, _run_features),
        Stage("segment-train", "search K-means / bisecting K-means segmentations, log and register in MLflow",
              _no_arguments, _run_segment_train),
        Stage("segment", "assign every user a segment with the champion model (user_segments)",
              _no_arguments, _run_segment),
        Stage("recommend-train", "ALS on interactions: tune, evaluate against popularity baselines, register in MLflow",
              _no_arguments, _run_recommend_train),
        Stage("recommend", "top-N per user from the champion ALS with filters and fallbacks; similar items",
              _no_arguments, _run_recommend),
        Stage("plan", "choose who gets which campaign, with which products, when (campaign_plan)",
              _plan_arguments, _run_plan),
        Stage("render", "render one email per planned user with Jinja2 per partition (outbox, render_errors)",
              _render_arguments, _run_render),
        Stage("send", "send the due outbox messages over SMTP, exactly once each (deliveries, suppressions)",
              _send_arguments, _run_send),
        Stage("simulate-responses", "the generated shop answers delivered emails: opens, clicks, purchases as "
              "landing events, with planted truth (generated shop only)", _simulate_arguments, _run_simulate),
        Stage("report", "attribution, A/B tests and holdout uplift per campaign (campaign_results, "
              "campaign_experiments, plots, report.html)", _no_arguments, _run_report),
        Stage("maintain", "delete expired quarantine rows and old checkpoints, compact and vacuum every table",
              _maintain_arguments,
              _run_maintain),
    ]
}

# The stages run-all executes, in order (maintenance is scheduled on its own).
RUN_ALL = ["ingest", "features", "segment-train", "segment", "recommend-train", "recommend", "plan", "render",
           "send", "simulate-responses", "report"]
# Stages for the generated shop only: never a task of the Databricks bundle.
GENERATED_SHOP_ONLY = ("simulate-responses",)


def landing_is_empty(landing_dir: str) -> bool:
    root = Path(landing_dir)
    return not root.is_dir() or not any(p.is_file() for p in root.rglob("*") if not p.name.startswith((".", "_")))


def generate_default_data(ctx: RunContext) -> Any:
    """Synthetic shop data from ``settings.generate``, ending at the clock's now."""
    from inboxlift.generate import generate_shop

    g = ctx.settings.generate
    return generate_shop(
        ctx.spark, landing_dir=ctx.settings.paths.landing_dir, truth_dir=g.truth_dir, users=g.users,
        items=g.items, days=g.days, dirty_rate=g.dirty_rate, seed=g.seed, gzip=g.gzip,
        end=ctx.clock.now().replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=1),
    )
