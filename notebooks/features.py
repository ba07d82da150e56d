# Databricks notebook source
# MAGIC %md
# MAGIC # User features
# MAGIC
# MAGIC How `user_features` is distributed (one histogram per numeric feature of the segmentation) and the
# MAGIC RFM grid: buyers by recency score (5 = bought most recently) and frequency score, with their mean
# MAGIC spend, and how many users never bought. Everything comes from the library (`inboxlift.explore.features`);
# MAGIC the features themselves are described in the README's Feature reference.
# MAGIC
# MAGIC Run `inboxlift run features` first. On Databricks the widgets choose the environment (`env`), the
# MAGIC day (`as_of`, shown in the titles) and the catalog and schema (empty: the settings'). As a plain script:
# MAGIC `python notebooks/features.py --env local --set storage.lake_dir=...`. The plots are also written
# MAGIC under `paths.output_dir/features/`.

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

from inboxlift.explore.features import feature_histograms, plot_histograms, plot_rfm_grid, rfm_grid
from inboxlift.notebook import open_notebook
from inboxlift.stages.segments import save_plots

notebook = open_notebook(globals().get("dbutils"))
ctx, settings = notebook.ctx, notebook.ctx.settings
user_features = ctx.lake.read_required("user_features", needed_by="the features notebook", hint="run features first")
print(f"user_features as of {notebook.day}: {user_features.count()} users")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Distributions
# MAGIC Equal-width bins between each feature's minimum and maximum; users with no value are counted apart.

# COMMAND ----------

histograms = feature_histograms(user_features, settings.segments.feature_columns)
for column, bins in histograms.items():
    missing = int(bins.loc[bins["bin_low"].isna(), "users"].sum())
    print(f"{column:<28} {int(bins['users'].sum()) - missing:>8} users with a value, {missing:>6} without")
figures = {"distributions": plot_histograms(histograms)}
figures["distributions"]

# COMMAND ----------

# MAGIC %md
# MAGIC ## RFM grid
# MAGIC Quintiles of recency and frequency among buyers (the columns playing those roles in `segments.roles`).

# COMMAND ----------

roles = settings.segments.roles
grid = rfm_grid(user_features, recency=roles["recency"], frequency=roles["frequency"], monetary=roles["monetary"])
figures["rfm_grid"] = plot_rfm_grid(grid)
saved = save_plots(figures, directory=Path(settings.paths.output_dir) / "features")
print("plots written:", ", ".join(str(p) for p in saved))
print(grid.to_string(index=False))
figures["rfm_grid"]
