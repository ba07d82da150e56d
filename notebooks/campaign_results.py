# Databricks notebook source
# MAGIC %md
# MAGIC # Campaign results
# MAGIC
# MAGIC What each campaign did: the verdicts of its A/B tests and holdout comparison
# MAGIC (`campaign_experiments`), its counts and rates per variant and send day (`campaign_results`), and
# MAGIC the report's figures. Everything comes from the library (`inboxlift.stages.report`); the methods
# MAGIC are described in the README, "Results and experiments".
# MAGIC
# MAGIC Run `inboxlift run report` first. As a plain script:
# MAGIC `python notebooks/campaign_results.py --env local --set storage.lake_dir=... --set paths.output_dir=...`
# MAGIC (the same `--env`, `--conf-dir`, `--set`, `--now` as the `inboxlift` command).

# COMMAND ----------

import os
import sys

import pandas as pd

from inboxlift.cli import build_context, build_parser, load_from_args
from inboxlift.reporting.plots import report_figures
from inboxlift.stages.report import load_report

# The `settings` command takes the common options; arguments a notebook host adds are ignored.
args, _ = build_parser(os.environ).parse_known_args(["settings", *sys.argv[1:]])
settings = load_from_args(args, os.environ)
ctx = build_context(settings, now=args.now, environ=os.environ)
pd.set_option("display.width", 200)
pd.set_option("display.max_colwidth", 120)

# COMMAND ----------

# MAGIC %md
# MAGIC ## Verdicts
# MAGIC One row per test: each variant against the control on clicks and conversions (read once, at the
# MAGIC campaign's fixed horizon), and each campaign's uplift over its holdout in conversions and revenue.

# COMMAND ----------

results, experiments = load_report(ctx)
print(f"{len(results)} rows in campaign_results, {len(experiments)} tests in campaign_experiments")
print(experiments[["campaign_id", "test", "metric", "variant", "control", "status", "verdict"]].to_string(index=False))
experiments

# COMMAND ----------

# MAGIC %md
# MAGIC ## Per campaign and variant, every send day together

# COMMAND ----------

totals = results.groupby(["campaign_id", "variant"])[
    ["recipients", "sent", "delivered", "bounced", "opens", "unique_clicks", "conversions", "revenue",
     "unsubscribes", "complaints", "window_conversions", "window_revenue"]].sum()
print(totals.to_string())
totals

# COMMAND ----------

# MAGIC %md
# MAGIC ## Figures
# MAGIC Rates per variant with their intervals, the holdout uplift per campaign, cumulative rates over send days.

# COMMAND ----------

figures = report_figures(results, experiments, alpha=settings.report.alpha)
figures["rates_by_variant"]

# COMMAND ----------

figures["uplift_by_campaign"]

# COMMAND ----------

figures["cumulative_by_day"]
