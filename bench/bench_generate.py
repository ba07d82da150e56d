"""Benchmark: how fast ``generate_shop`` writes a synthetic shop, against a trivial Spark write.

Run from the repository root, e.g.::

    .venv/bin/python bench/bench_generate.py --users 1000000 --events-target 10000000

It generates into ``.bench/generate/`` (removed afterwards unless ``--keep``),
then, in the same session, copies the event files it wrote with Spark's text
reader and writer (the cost of moving those bytes and nothing else), and prints
events generated, seconds, events per second, the ratio of the two times and
the exact command.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from inboxlift.clock import FixedClock
from inboxlift.generate import expected_events, generate_shop
from inboxlift.session import build_session
from inboxlift.settings import load_settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=20_000)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--events-target", type=int, default=10_000_000,
                      help="choose the number of days to produce about this many clean events")
    size.add_argument("--days", type=int, help="generate exactly this many days (overrides --events-target)")
    parser.add_argument("--dirty-rate", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--gzip", action="store_true")
    parser.add_argument("--end", default="2026-11-20T12:00:00", help="last instant of activity (UTC)")
    parser.add_argument("--out", default=".bench/generate")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    return parser.parse_args(argv)


def days_for(target: int, *, users: int, sessions_per_user_day: float, campaign_every_days: int) -> int:
    per_day = expected_events(users=users, days=1, sessions_per_user_day=sessions_per_user_day,
                              campaign_every_days=campaign_every_days)
    return max(1, math.ceil(target / per_day))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings("local", conf_dir="conf", overrides={"spark.ui_enabled": False},
                             environ=os.environ)
    gen = settings.generate
    days = args.days or days_for(args.events_target, users=args.users,
                                 sessions_per_user_day=gen.sessions_per_user_day,
                                 campaign_every_days=gen.campaign_every_days)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    info = build_session(settings.spark, environ=os.environ, app_name="inboxlift-bench-generate")
    spark = info.spark
    print(info.describe(), flush=True)
    end = FixedClock.at(args.end).now()

    started = time.perf_counter()
    report = generate_shop(
        spark, landing_dir=str(out / "landing"), truth_dir=str(out / "truth"), users=args.users, items=args.items,
        days=days, dirty_rate=args.dirty_rate, seed=args.seed, gzip=args.gzip, end=end,
        sessions_per_user_day=gen.sessions_per_user_day, campaign_every_days=gen.campaign_every_days,
        new_arrival_days=gen.new_arrival_days)
    generate_s = time.perf_counter() - started
    landing_bytes = sum(os.path.getsize(f) for files in report.landing_files.values() for f in files)

    # The peer: Spark copying the same landing lines (read as text, written as text), i.e. the
    # cost of moving these bytes through Spark with no generation at all.
    lines = report.events + report.dirty_total
    started = time.perf_counter()
    spark.read.text(str(out / "landing" / "events")).write.mode("overwrite").option(
        "compression", "gzip" if args.gzip else "none").text(str(out / "plain_copy"))
    plain_s = time.perf_counter() - started

    print(report.summary())
    print(f"days generated: {days}; landing bytes: {landing_bytes / 1e9:.2f} GB")
    print(f"events generated: {report.events:,} (+ {report.dirty_total:,} dirty records)")
    print(f"generate seconds: {generate_s:.1f}")
    print(f"events/s: {report.events / generate_s:,.0f}")
    print(f"peer: Spark text copy of the {lines:,} event lines: {plain_s:.1f} s ({lines / plain_s:,.0f} lines/s)")
    print(f"generate time / copy time: {generate_s / plain_s:.1f}x")
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
