"""The report stage (``inboxlift run report``): what each campaign did.

Reads ``campaign_plan``, ``outbox``, ``deliveries`` and ``events``; replaces

- ``campaign_results``: per campaign x variant (holdout included) x send day, counts, rates and
  Wilson intervals (:mod:`inboxlift.transforms.campaign_results`), every row recomputed each run;
- ``campaign_experiments``: one row per test — each A/B comparison of a variant with the control
  on clicks and on conversions, and each campaign's holdout uplift in conversions and in revenue
  (:mod:`inboxlift.campaigns.experiments`);

and writes the figures and ``report.html`` under ``paths.output_dir/report/``, also logged as
artifacts of an MLflow run named ``report``. The per-recipient work is Spark; the driver sees only
the aggregated rows (per campaign, variant and day; per bootstrap replicate; per test arm and
per-user count pattern, for the design effect of repeated sends).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from inboxlift.campaigns.definitions import HOLDOUT, load_campaigns
from inboxlift.campaigns.experiments import (
    AB_METRICS,
    EXPERIMENT_COLUMNS,
    FINAL,
    ab_tests,
    ab_windows,
    experiments_frame,
    holdout_tests,
    keep_first_final_readings,
)
from inboxlift.context import RunContext
from inboxlift.delivery.outbox import with_delivered_status
from inboxlift.delivery.states import DELIVERIES_SCHEMA, DELIVERIES_TABLE
from inboxlift.models.tracking import tracked_run
from inboxlift.reporting.page import report_page
from inboxlift.reporting.plots import png_bytes, report_figures
from inboxlift.session import materialize
from inboxlift.transforms.attribution import recipient_outcomes
from inboxlift.transforms.campaign_results import (
    RESULT_COLUMNS,
    aggregate_results,
    AB_TEST,
    HOLDOUT_TEST,
    bootstrap_revenue_sums,
    campaigns_with_repeats,
    summarise_outcomes,
    user_patterns,
)

RESULTS_TABLE = "campaign_results"
EXPERIMENTS_TABLE = "campaign_experiments"
REPORT_FOLDER = "report"
REPORT_PAGE = "report.html"
EXPERIMENTS_SCHEMA = (
    "campaign_id string, test string, metric string, variant string, control string, status string, "
    "first_send_date date, last_send_date date, reads_on date, n_variant long, n_control long, "
    "successes_variant long, successes_control long, value_variant double, value_control double, "
    "difference double, difference_low double, difference_high double, relative_lift double, "
    "relative_lift_low double, relative_lift_high double, p_value double, alpha double, mde_absolute double, "
    "mde_relative double, incremental_total double, incremental_total_low double, incremental_total_high double, "
    "is_significant boolean, winner string, method string, verdict string, design_effect_variant double, "
    "design_effect_control double")


@dataclass(frozen=True)
class ReportRun:
    run_id: str
    result_rows: int
    verdicts: tuple[tuple[str, str, str, str, str], ...]   # campaign, test, metric, status, verdict
    files: tuple[Path, ...] = field(default_factory=tuple)

    def summary(self) -> str:
        lines = [f"report (MLflow run {self.run_id}): {self.result_rows} rows in {RESULTS_TABLE}, "
                 f"{len(self.verdicts)} tests in {EXPERIMENTS_TABLE}"]
        lines += [f"  {campaign:<20} {test:<8} {metric:<12} {status:<13} {verdict}"
                  for campaign, test, metric, status, verdict in self.verdicts]
        lines += [f"  wrote {path}" for path in self.files]
        return "\n".join(lines)


def _deliveries(ctx: RunContext) -> DataFrame:
    if ctx.lake.exists(DELIVERIES_TABLE):
        return ctx.lake.read(DELIVERIES_TABLE)
    return ctx.spark.createDataFrame([], DELIVERIES_SCHEMA)


def _replace(ctx: RunContext, name: str, frame: DataFrame) -> None:
    if ctx.lake.exists(name):
        ctx.lake.overwrite(name, frame)
    else:
        ctx.lake.append(name, frame)


def campaign_outcomes(ctx: RunContext) -> DataFrame:
    """Per-recipient outcomes of every campaign day that sent something (not kept: the caller decides)."""
    def need(name: str, stage: str) -> DataFrame:
        return ctx.lake.read_required(name, needed_by="report", hint=f"run {stage} first")

    r = ctx.settings.report
    deliveries = _deliveries(ctx)
    # The outbox's sent status comes from deliveries (inboxlift.delivery.outbox).
    outbox = with_delivered_status(need("outbox", "render and send"), deliveries=deliveries)
    return recipient_outcomes(need("campaign_plan", "plan"), outbox, deliveries,
                              need("events", "ingest"), click_through_days=r.click_through_days,
                              view_through_days=r.view_through_days, uplift_window_days=r.uplift_window_days)


def closed_before(ctx: RunContext) -> dt.datetime:
    """A day whose every message was planned before this instant has all its windows closed."""
    r = ctx.settings.report
    longest = max(r.click_through_days, r.view_through_days, r.uplift_window_days)
    return ctx.clock.now() - dt.timedelta(days=longest)


AB_PATTERN_COLUMNS = ["campaign_id", "variant", "delivered", *AB_METRICS.values(), "users"]
HOLDOUT_PATTERN_COLUMNS = ["campaign_id", "is_treated", "recipients", "window_conversions", "users"]
SPANS = "campaign_id string, first_send_date date, last_send_date date"


def _patterns(ctx: RunContext, ab: list[tuple], holdout: list[tuple]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The A/B and the holdout tests' recipients per user (:func:`user_patterns`; ``ab``, ``holdout``:
    (campaign_id, first_send_date, last_send_date) per test), for the tests in which some user is a
    recipient on two days or more; no row for the others, whose design effects are all 1."""
    found_ab, found_holdout = pd.DataFrame(columns=AB_PATTERN_COLUMNS), pd.DataFrame(columns=HOLDOUT_PATTERN_COLUMNS)
    if not ab and not holdout:
        return found_ab, found_holdout
    spans_ab, spans_holdout = ctx.spark.createDataFrame(ab, SPANS), ctx.spark.createDataFrame(holdout, SPANS)
    # One row per campaign at most.
    repeated = campaigns_with_repeats(ctx.lake.read("campaign_plan"), ctx.lake.read("outbox"),
                                              ab=spans_ab, holdout=spans_holdout).collect()
    if not repeated:
        return found_ab, found_holdout
    wanted = {test: [r.campaign_id for r in repeated if r[test]] for test in (AB_TEST, HOLDOUT_TEST)}
    # One more pass over the per-recipient outcomes, for those tests only: the summary keeps no user
    # of a recipient without revenue. A row per test, campaign, arm and count pattern: small.
    chosen = F.col("campaign_id").isin(*{c for ids in wanted.values() for c in ids})
    found = user_patterns(campaign_outcomes(ctx).where(chosen),
                          ab=spans_ab.where(F.col("campaign_id").isin(*wanted[AB_TEST])),
                          holdout=spans_holdout.where(F.col("campaign_id").isin(*wanted[HOLDOUT_TEST]))).toPandas()
    of_ab, of_holdout = found[found["test"] == AB_TEST], found[found["test"] == HOLDOUT_TEST]
    found_ab = of_ab.rename(columns={"arm": "variant", "trials": "delivered", "clicks": "unique_clicks"})
    found_holdout = of_holdout.assign(is_treated=of_holdout["arm"] != HOLDOUT).rename(
        columns={"trials": "recipients", "conversions": "window_conversions"})
    return found_ab[AB_PATTERN_COLUMNS], found_holdout[HOLDOUT_PATTERN_COLUMNS]


def experiments_of(ctx: RunContext, results: pd.DataFrame, summary: DataFrame) -> pd.DataFrame:
    """The ``campaign_experiments`` rows from the aggregated ``results`` (pandas) and, for the revenue
    bootstrap, the outcomes' ``summary`` (Spark, :func:`summarise_outcomes`)."""
    r = ctx.settings.report
    campaigns = load_campaigns(ctx.settings.paths.campaigns_file)
    windows_ab = ab_windows(results, campaigns, click_through_days=r.click_through_days)
    closed = results[results["is_window_closed"]]
    with_holdout = set(closed.loc[closed["variant"] == HOLDOUT, "campaign_id"])
    closed = closed[closed["campaign_id"].isin(with_holdout)]
    # Closed days come in order, so each campaign's are the span from its first to its last.
    windows = (closed.groupby("campaign_id")["send_date"].agg(["min", "max"]).reset_index()
               .rename(columns={"min": "first_send_date", "max": "last_send_date"}))
    patterns_ab, patterns_holdout = _patterns(
        ctx, [(c, first, last) for c, (first, last, _) in sorted(windows_ab.items())],
        list(windows.itertuples(index=False, name=None)))
    rows = ab_tests(results, campaigns, today=ctx.clock.today(), alpha=r.alpha, power=r.power,
                    click_through_days=r.click_through_days, min_per_arm=r.min_recipients_per_arm,
                    patterns=patterns_ab)
    if not closed.empty:
        totals = (closed.assign(is_treated=closed["variant"] != HOLDOUT)
                  .groupby(["campaign_id", "is_treated"])[["recipients", "window_conversions", "window_revenue"]]
                  .sum().reset_index())
        days = ctx.spark.createDataFrame(closed[["campaign_id", "send_date"]].drop_duplicates(),
                                         "campaign_id string, send_date date")
        sample = summary.join(F.broadcast(days), ["campaign_id", "send_date"], how="left_semi")
        # One row per campaign, arm and replicate: grows with campaigns, not users.
        bootstrap = bootstrap_revenue_sums(sample, replicates=r.bootstrap_replicates, seed=r.bootstrap_seed).toPandas()
        rows += holdout_tests(totals, bootstrap, alpha=r.alpha, power=r.power, min_per_arm=r.min_recipients_per_arm,
                              replicates=r.bootstrap_replicates, seed=r.bootstrap_seed, windows=windows,
                              patterns=patterns_holdout)
    return experiments_frame(rows)


def run_report(ctx: RunContext) -> ReportRun:
    """Recompute both tables, the figures and the page; log them to MLflow (module docstring)."""
    r = ctx.settings.report
    # Read twice: by the results and by the revenue bootstrap, so kept, as the outcomes' summary:
    # the recipients with revenue one row each, the others summed per campaign, variant and day
    # (bench/README.md, "Keeping the outcomes' summary"). Kept as a local checkpoint: the results
    # and the bootstrap start from the computed rows instead of the attribution's plan.
    summary = materialize(summarise_outcomes(campaign_outcomes(ctx)))
    results = aggregate_results(summary, alpha=r.alpha, window_closed_before=F.lit(closed_before(ctx)))
    _replace(ctx, RESULTS_TABLE, results.select(*RESULT_COLUMNS))
    # Per campaign, variant and day: small.
    results_pd = ctx.lake.read(RESULTS_TABLE).toPandas()
    # A/B tests already read as final keep that reading (keep_first_final_readings).
    previous = ctx.lake.read(EXPERIMENTS_TABLE).toPandas() if ctx.lake.exists(EXPERIMENTS_TABLE) else None
    experiments = keep_first_final_readings(experiments_of(ctx, results_pd, summary), previous)
    del summary, results  # the checkpoint's blocks are freed once nothing refers to it
    frame = ctx.spark.createDataFrame(experiments.astype(object).where(experiments.notna(), None)[EXPERIMENT_COLUMNS],
                                      EXPERIMENTS_SCHEMA)
    _replace(ctx, EXPERIMENTS_TABLE, frame)

    folder = Path(ctx.settings.paths.output_dir) / REPORT_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    pngs = {stem: png_bytes(figure) for stem, figure in report_figures(results_pd, experiments, alpha=r.alpha).items()}
    files = []
    for stem, data in pngs.items():
        path = folder / f"{stem}.png"
        path.write_bytes(data)
        files.append(path)
    page = folder / REPORT_PAGE
    page.write_text(report_page(results_pd, experiments, pngs, settings=r, generated_at=ctx.clock.now()),
                    encoding="utf-8")
    files.append(page)

    now = ctx.clock.now()
    with tracked_run(ctx.settings.mlflow, run_name=f"report {now:%Y-%m-%dT%H:%MZ}",
                     tags={"inboxlift.stage": "report"}, params=vars(r) | {"as_of": now.isoformat()}) as run:
        mlflow.log_metrics({"campaign_results_rows": len(results_pd), "tests": len(experiments),
                            "tests_final": int((experiments["status"] == FINAL).sum()),
                            "tests_significant": int(experiments["is_significant"].fillna(False).astype(bool).sum())})
        for path in files:
            mlflow.log_artifact(str(path), artifact_path=REPORT_FOLDER)
        mlflow.log_text(experiments.to_csv(index=False), f"{REPORT_FOLDER}/{EXPERIMENTS_TABLE}.csv")
    verdicts = tuple((e.campaign_id, e.test, e.metric, e.status, e.verdict)
                     for e in experiments.sort_values(["campaign_id", "test", "metric"]).itertuples(index=False))
    return ReportRun(run_id=run.info.run_id, result_rows=len(results_pd), verdicts=verdicts, files=tuple(files))


def load_report(ctx: RunContext) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(campaign_results, campaign_experiments) as pandas, for a notebook: both tables are aggregated."""
    for name in (RESULTS_TABLE, EXPERIMENTS_TABLE):
        if not ctx.lake.exists(name):
            raise FileNotFoundError(f"table {name!r} does not exist yet: run `inboxlift run report` first")
    return ctx.lake.read(RESULTS_TABLE).toPandas(), ctx.lake.read(EXPERIMENTS_TABLE).toPandas()
