# Databricks notebook source
# MAGIC %md
# MAGIC # Recommendations
# MAGIC
# MAGIC The champion recommender (MLflow model `recommend.registered_model`, alias `champion`) against the
# MAGIC popularity baselines on the test window; a few users with what they did and what they are
# MAGIC recommended; and the items most like the most popular ones. Everything comes from the library
# MAGIC (`inboxlift.explore.recommendations`); metrics and sources are described in `docs/recommend.md`.
# MAGIC
# MAGIC Run `inboxlift run recommend-train` and `inboxlift run recommend` first. On Databricks the widgets
# MAGIC choose the environment (`env`), the day (`as_of`) and the catalog and schema (empty: the settings').
# MAGIC As a plain script: `python notebooks/recommendations.py --env local --set storage.lake_dir=...`.
# MAGIC The plot is also written under `paths.output_dir/recommendations/`.

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

from inboxlift.explore.recommendations import (
    champion_metrics, example_user_ids, plot_metrics, similar_item_examples, user_examples,
)
from inboxlift.notebook import open_notebook
from inboxlift.stages.segments import save_plots

notebook = open_notebook(globals().get("dbutils"))
ctx, settings = notebook.ctx, notebook.ctx.settings

# COMMAND ----------

# MAGIC %md
# MAGIC ## The champion against the baselines (test window)

# COMMAND ----------

metrics = champion_metrics(ctx)
print(f"{metrics.name} version {metrics.version} (run {metrics.run_id}), serving {metrics.chosen}")
print(metrics.table.to_string(float_format=lambda v: f"{v:.4f}"))
saved = save_plots({"metrics_vs_baselines": plot_metrics(metrics)},
                   directory=Path(settings.paths.output_dir) / "recommendations")
print("plots written:", ", ".join(str(p) for p in saved))

# COMMAND ----------

# MAGIC %md
# MAGIC ## Example users: their strongest interactions, then their recommendations

# COMMAND ----------

users = example_user_ids(ctx.lake.read("interactions"), ctx.lake.read("recommendations"), n=3)
for user_id, (history, recommended) in user_examples(ctx, users).items():
    print(f"\n=== user {user_id}: history")
    print(history.to_string(index=False))
    print(f"--- user {user_id}: recommendations")
    print(recommended.to_string(index=False))

# COMMAND ----------

# MAGIC %md
# MAGIC ## Similar items of the most popular items

# COMMAND ----------

similar = similar_item_examples(ctx, n=3)
print(similar.to_string(index=False))
