# Databricks notebook source
# MAGIC %md
# MAGIC # User segments
# MAGIC
# MAGIC The champion segmentation (MLflow model `segments.registered_model`, alias `champion`): how k was
# MAGIC chosen, each segment's size, centroid in original units, top categories and name, and how many
# MAGIC users each segment holds in `user_segments`. Everything here comes from the library
# MAGIC (`inboxlift.stages.segments`); the rules are described in `docs/segments.md`.
# MAGIC
# MAGIC Run `inboxlift run segment-train` (and `inboxlift run segment`) first. On Databricks the widgets
# MAGIC choose the environment (`env`), the day (`as_of`) and the catalog and schema (empty: the settings').
# MAGIC As a plain script: `python notebooks/segments.py --env local --set storage.lake_dir=...` (the same
# MAGIC `--env`, `--conf-dir`, `--set` as the `inboxlift` command). The plots are also written under
# MAGIC `paths.output_dir/segments/`.

# COMMAND ----------

# MAGIC %md
# MAGIC Install the wheel `databricks bundle deploy` uploaded with this notebook: the bundle puts notebooks
# MAGIC in `<root>/files/notebooks/` and the wheel in `<root>/artifacts/.internal/`. Elsewhere, point this
# MAGIC cell at a wheel built with `python -m pip wheel --no-deps --wheel-dir dist .`. Run as a plain
# MAGIC script, the cell is a comment and the installed library is used.

# COMMAND ----------

# MAGIC %pip install ../../artifacts/.internal/inboxlift-0.1.0-py3-none-any.whl

# COMMAND ----------

from pathlib import Path

from inboxlift.notebook import open_notebook
from inboxlift.stages.segments import champion_artifacts, champion_plots, save_plots, segment_counts

# On Databricks `dbutils` is the notebook's (widgets); as a script there is none (command line).
notebook = open_notebook(globals().get("dbutils"))
ctx, settings = notebook.ctx, notebook.ctx.settings

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
