# Databricks notebook source
# MAGIC %md
# MAGIC # Campaign results
# MAGIC
# MAGIC What each campaign did: the verdicts of its A/B tests and holdout comparison
# MAGIC (`campaign_experiments`), its counts and rates per variant and send day (`campaign_results`), and
# MAGIC the report's figures. Everything comes from the library (`inboxlift.stages.report`); the methods
# MAGIC are described in the README, "Results and experiments".
# MAGIC
# MAGIC Run `inboxlift run report` first. On Databricks the widgets choose the environment (`env`) and the
# MAGIC catalog and schema (empty: the settings'). As a plain script:
# MAGIC `python notebooks/campaign_results.py --env local --set storage.lake_dir=... --set paths.output_dir=...`
# MAGIC (the same `--env`, `--conf-dir`, `--set`, `--now` as the `inboxlift` command).

# COMMAND ----------

# MAGIC %md
# MAGIC Install the wheel `databricks bundle deploy` uploaded with this notebook: the bundle puts notebooks
# MAGIC in `<root>/files/notebooks/` and the wheel in `<root>/artifacts/.internal/`. Elsewhere, point this
# MAGIC cell at a wheel built with `python -m pip wheel --no-deps --wheel-dir dist .`. Run as a plain
# MAGIC script, the cell is a comment and the installed library is used.

# COMMAND ----------

# MAGIC %pip install ../../artifacts/.internal/inboxlift-0.1.0-py3-none-any.whl

# COMMAND ----------

import pandas as pd

from inboxlift.notebook import open_notebook
from inboxlift.reporting.plots import report_figures
from inboxlift.stages.report import load_report

# On Databricks `dbutils` is the notebook's (widgets); as a script there is none (command line).
notebook = open_notebook(globals().get("dbutils"))
ctx, settings = notebook.ctx, notebook.ctx.settings
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
