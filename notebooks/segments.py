# Databricks notebook source
# MAGIC %md
# MAGIC # User segments
# MAGIC
# MAGIC The champion segmentation (MLflow model `segments.registered_model`, alias `champion`): how k was
# MAGIC chosen, each segment's size, centroid in original units, top categories and name, and how many
# MAGIC users each segment holds in `user_segments`. Everything here comes from the library
# MAGIC (`inboxlift.stages.segments`); the rules are described in `docs/segments.md`.
# MAGIC
# MAGIC Run `inboxlift run segment-train` (and `inboxlift run segment`) first. As a plain script:
# MAGIC `python notebooks/segments.py --env local --set storage.lake_dir=... --set mlflow.tracking_uri=...`
# MAGIC (the same `--env`, `--conf-dir`, `--set` as the `inboxlift` command; `INBOXLIFT_ENV` picks the
# MAGIC settings file). The plots are also written under `paths.output_dir/segments/`.

# COMMAND ----------

import os
import sys
from pathlib import Path

from inboxlift.cli import build_context, build_parser, load_from_args
from inboxlift.stages.segments import champion_artifacts, champion_plots, save_plots, segment_counts

# The `settings` command takes the common options; arguments a notebook host adds are ignored.
args, _ = build_parser(os.environ).parse_known_args(["settings", *sys.argv[1:]])
settings = load_from_args(args, os.environ)
ctx = build_context(settings, now=args.now, environ=os.environ)

# COMMAND ----------

# MAGIC %md
# MAGIC ## The champion and how its k was chosen

# COMMAND ----------

champion = champion_artifacts(ctx)
print(f"{champion.name} version {champion.version} (run {champion.run_id})")
print(champion.selection_reason)
champion.k_search

# COMMAND ----------

figures = champion_plots(champion)
saved = save_plots(figures, directory=Path(settings.paths.output_dir) / "segments")
print("plots written:", ", ".join(str(p) for p in saved))
figures["k_search"]

# COMMAND ----------

# MAGIC %md
# MAGIC ## Segment profiles
# MAGIC Size, share, mean of each feature in its own units, price band and top categories per segment;
# MAGIC the chart colours each mean by its ratio to all users' mean.

# COMMAND ----------

print(champion.profiles.to_string(index=False))
figures["segment_profiles"]

# COMMAND ----------

# MAGIC %md
# MAGIC ## Users per segment in `user_segments`

# COMMAND ----------

for segment_id, name, users in segment_counts(ctx):
    print(f"{segment_id:>3}  {name:<24}{users:>9}")
