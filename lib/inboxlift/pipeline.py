"""The pipeline's stages, in order: what ``inboxlift run STAGE`` and ``run-all`` execute.

Each stage is registered with its name, a one-line description, the arguments
it takes and the function that runs it on a :class:`RunContext`. Jobs, the CLI
and the Databricks bundle all go through this table.
"""

from __future__ import annotations

import argparse
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


def _plan_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--campaign", help="plan this campaign (an id of the campaigns file)")
    which.add_argument("--all", dest="all_campaigns", action="store_true",
                       help="plan every enabled campaign, due today or not")
    parser.add_argument("--date", type=dt.date.fromisoformat, default=None, metavar="YYYY-MM-DD",
                        help="the campaign day (default: today per the clock)")


def _run_plan(ctx: RunContext, args: argparse.Namespace) -> Any:
    from inboxlift.stages.plan import run_plan

    return run_plan(ctx, campaign_id=args.campaign, all_campaigns=args.all_campaigns, plan_date=args.date)


def _run_segment(ctx: RunContext, args: argparse.Namespace) -> Any:
    from inboxlift.stages.segments import run_segment

    return run_segment(ctx)


def _maintain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--retention-hours", type=int, default=None,
                        help="vacuum files unreferenced for longer than this (default: storage.vacuum_retention_hours)")


def _run_maintain(ctx: RunContext, args: argparse.Namespace) -> list[str]:
    """Compact small files and vacuum old ones in every table."""
    lines = []
    for name in ctx.lake.table_names():
        ctx.lake.optimize(name)
        removed = ctx.lake.vacuum(name, retention_hours=args.retention_hours)
        lines.append(f"{name}: optimized, {len(removed)} old files vacuumed")
    return lines


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
        Stage("plan", "choose who gets which campaign, with which products, when (campaign_plan)",
              _plan_arguments, _run_plan),
        Stage("maintain", "compact and vacuum every table", _maintain_arguments, _run_maintain),
    ]
}

# The stages run-all executes, in order (maintenance is scheduled on its own).
RUN_ALL = ["ingest", "features", "segment-train", "segment"]


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
