"""segment-train end to end: the k search on a cached sample against the same search fitting every k on all users.

The data is the generated shop (``inboxlift.generate``, its planted taste groups and activity
levels) at ``--users`` users, ingested and turned into ``user_features`` by the real stages, once,
under ``.bench/segments`` (``--keep`` keeps it for the next run; ``--lake DIR`` reads the
``user_features`` of an existing lake instead). Then, in one Spark session, alternating:

- **sample**: ``run_segment_train`` with ``segments.search_sample_rows = --sample-rows`` (the
  default setting, 200,000): every (algorithm, k) and the stability seeds fit on a cached sample of
  the scaled features; the chosen (algorithm, k) is fitted once more on all users;
- **all users**: the same stage with ``search_sample_rows`` above the number of users: every fit of
  the search and of the stability seeds runs on all users (no refit: the search's model is kept).

Each is timed from the start of ``run_segment_train`` to its end: reading ``user_features``, the
preprocessing, the search, the refit, profiles and names, the MLflow run, registration and promotion
(each variant registers its own model name). Before the timed runs, one untimed run of the sample
variant (``--warmup``) pays for the JVM compiling Spark ML's code, as the other stages of a
``run-all`` would before ``segment-train``.

scikit-learn is printed beside, as information only: the same search (K-means with k-means++ and
bisecting K-means, one initialisation each, the same k range and iteration cap) fitting every k on
all users' scaled features in memory, with the silhouette on ``--sklearn-silhouette-rows`` users
(scikit-learn's silhouette is quadratic in the rows).

    .venv/bin/python bench/bench_segments.py [--users N] [--sample-rows N] [--repeat N] [--warmup N]
        [--keep] [--lake DIR] [--no-sklearn]

Goal from the issue: the sample's end-to-end time <= 0.5x all users', with the same chosen
(algorithm, k). The script exits 1 when either is missed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK_DIR = ROOT / ".bench" / "segments"
TIME_GOAL = 0.5
NOW = "2026-11-20T12:00:00"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--events-target", type=int, default=10_000_000,
                        help="days of generated history are chosen to give about this many events")
    parser.add_argument("--sample-rows", type=int, default=None,
                        help="segments.search_sample_rows of the sample variant (default: the setting's default)")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs of each variant, alternating; best counts")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of the sample variant first")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--driver-memory", default="8g")
    parser.add_argument("--keep", action="store_true", help="keep (and reuse) the generated shop under .bench/segments")
    parser.add_argument("--lake", help="use the user_features table of this lake instead of generating a shop")
    parser.add_argument("--no-sklearn", dest="sklearn", action="store_false", help="skip the scikit-learn search")
    parser.add_argument("--sklearn-silhouette-rows", type=int, default=10_000)
    return parser.parse_args(argv)


def bench_settings(args: argparse.Namespace, lake_dir: Path):
    from inboxlift.settings import load_settings

    work = WORK_DIR
    return load_settings("local", conf_dir=ROOT / "conf", environ={}, overrides={
        "spark.master": f"local[{args.cores}]",
        "spark.driver_memory": args.driver_memory,
        "spark.ui_enabled": False,
        "spark.checkpoint_dir": str(work / "checkpoints"),
        "storage.lake_dir": str(lake_dir),
        "storage.backend": "deltars",
        "mlflow.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "mlflow.artifact_location": str(work / "artifacts"),
        "paths.landing_dir": str(work / "landing"),
        "paths.output_dir": str(work / "output"),
        "generate.truth_dir": str(work / "truth"),
        "generate.users": args.users,
        "generate.items": args.items,
        "generate.dirty_rate": 0.0,
    })


def build_shop(ctx, args: argparse.Namespace) -> dict:
    """Generate the shop, ingest it and compute user_features (the real stages); returns their timings."""
    from bench_generate import days_for

    from inboxlift.pipeline import generate_default_data
    from inboxlift.stages.features import run_features
    from inboxlift.stages.ingest import run_ingest

    gen = ctx.settings.generate
    days = days_for(args.events_target, users=args.users, sessions_per_user_day=gen.sessions_per_user_day,
                    campaign_every_days=gen.campaign_every_days)
    ctx = dataclasses.replace(ctx, settings=dataclasses.replace(
        ctx.settings, generate=dataclasses.replace(gen, days=days)))
    timings = {}
    for name, step in (("generate", generate_default_data),
                       ("ingest", lambda c: run_ingest(c, echo=lambda text: None)),
                       ("features", run_features)):
        started = time.perf_counter()
        step(ctx)
        timings[name] = time.perf_counter() - started
        print(f"{name}: {timings[name]:.0f} s", flush=True)
    return {"users": args.users, "items": args.items, "days": days, "seconds": timings}


def train(ctx, *, sample_rows: int, model_name: str):
    from inboxlift.stages.segments import run_segment_train

    segments = dataclasses.replace(ctx.settings.segments, search_sample_rows=sample_rows, registered_model=model_name)
    run_ctx = dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, segments=segments))
    started = time.perf_counter()
    report = run_segment_train(run_ctx)
    return time.perf_counter() - started, report.model


def sklearn_search(features, params, *, silhouette_rows: int, seed: int) -> dict:
    """The same search in scikit-learn on all users' scaled features, in memory (information only)."""
    import numpy as np
    from sklearn.cluster import BisectingKMeans as SkBisecting
    from sklearn.cluster import KMeans as SkKMeans
    from sklearn.metrics import silhouette_score

    started = time.perf_counter()
    frame = features.select(*params.feature_columns).toPandas()
    columns = []
    for column in params.feature_columns:
        values = frame[column].astype(float).to_numpy()
        values = np.where(np.isnan(values), params.null_fill.get(column, 0.0), values)
        columns.append(np.log1p(np.maximum(values, 0.0)) if column in params.log_columns else values)
    matrix = np.column_stack(columns)
    std = matrix.std(axis=0)
    matrix = (matrix - matrix.mean(axis=0)) / np.where(std > 0, std, 1.0)
    load = time.perf_counter() - started
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(matrix), size=min(silhouette_rows, len(matrix)), replace=False)
    best, fits, scoring = None, 0.0, 0.0
    for algorithm in params.algorithms:
        for k in range(params.k_min, params.k_max + 1):
            model = (SkKMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=params.max_iter, random_state=seed)
                     if algorithm == "kmeans" else
                     SkBisecting(n_clusters=k, n_init=1, max_iter=params.max_iter, random_state=seed))
            started = time.perf_counter()
            labels = model.fit_predict(matrix)
            fits += time.perf_counter() - started
            started = time.perf_counter()
            score = float(silhouette_score(matrix[pick], labels[pick], metric="sqeuclidean"))
            scoring += time.perf_counter() - started
            if best is None or score > best[0]:
                best = (score, algorithm, k)
    return {"load": load, "fits": fits, "silhouette": scoring, "silhouette_rows": len(pick), "choice": best}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "bench"))

    from inboxlift.clock import FixedClock
    from inboxlift.context import RunContext
    from inboxlift.session import build_session
    from inboxlift.settings import SegmentSettings
    from inboxlift.storage import Lake

    sample_rows = args.sample_rows or SegmentSettings().search_sample_rows
    marker = WORK_DIR / "shop.json"
    reuse = args.keep and marker.exists() and json.loads(marker.read_text()).get("users") == args.users
    if not args.lake and not reuse:
        shutil.rmtree(WORK_DIR, ignore_errors=True)
    else:
        # Earlier runs' MLflow runs and models are not this run's business.
        for stale in ("mlflow.db", "artifacts"):
            path = WORK_DIR / stale
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    settings = bench_settings(args, Path(args.lake) if args.lake else WORK_DIR / "lake")
    info = build_session(settings.spark, environ={"CI": "true"}, app_name="inboxlift-bench-segments")
    info.spark.sparkContext.setLogLevel("ERROR")
    print(info.describe(), flush=True)
    lake = Lake.open(info.spark, settings.storage, has_delta_jars=info.has_delta_jars)
    ctx = RunContext(spark=info.spark, settings=settings, lake=lake, clock=FixedClock.at(NOW))
    try:
        if args.lake:
            shop = {"lake": args.lake}
        elif reuse:
            shop = json.loads(marker.read_text())
            print(f"reusing the shop of an earlier run: {shop}", flush=True)
        else:
            shop = build_shop(ctx, args)
            marker.write_text(json.dumps(shop))
        users = lake.read("user_features").count()
        all_rows = max(users + 1, sample_rows)

        for _ in range(args.warmup):
            seconds, _ = train(ctx, sample_rows=sample_rows, model_name="bench-segments-warmup")
            print(f"untimed warm-up run (sample): {seconds:.1f} s", flush=True)
        runs: dict[str, list] = {"sample": [], "all users": []}
        for _ in range(args.repeat):
            for variant, rows in (("all users", all_rows), ("sample", sample_rows)):
                seconds, model = train(ctx, sample_rows=rows, model_name=f"bench-segments-{variant.replace(' ', '-')}")
                runs[variant].append((seconds, model))
                print(f"{variant}: {seconds:.1f} s, searched on {model.search_rows:,} users, chose "
                      f"{model.choice.algorithm} k={model.choice.k}", flush=True)
        sklearn = (sklearn_search(lake.read("user_features"), settings.segments,
                                  silhouette_rows=args.sklearn_silhouette_rows, seed=settings.segments.seed)
                   if args.sklearn else None)
    finally:
        info.spark.stop()
        if not args.keep and not args.lake:
            shutil.rmtree(WORK_DIR, ignore_errors=True)

    params = settings.segments
    print(f"\nsegment-train on {users:,} users ({shop}); {args.cores} cores (local[{args.cores}]); k {params.k_min}.."
          f"{params.k_max}, {', '.join(params.algorithms)}, stability seeds {params.stability_seeds}, "
          f"solver {params.kmeans_solver}; best of {args.repeat}")
    print(f"{'variant':<12}{'seconds':>9}{'searched on':>13}{'search fits':>13}{'refit':>8}{'chosen':>24}"
          f"{'silhouette':>12}{'segments (names)':>20}")
    best = {}
    for variant, results in runs.items():
        seconds, model = min(results, key=lambda r: r[0])
        best[variant] = (seconds, model)
        fits = sum(c.seconds for c in model.candidates)
        chosen = f"{model.choice.algorithm} k={model.choice.k}"
        print(f"{variant:<12}{seconds:>9.1f}{model.search_rows:>13,}{fits:>13.1f}{model.refit_seconds:>8.1f}"
              f"{chosen:>24}{model.choice.silhouette:>12.4f}  {', '.join(model.profiles['segment_name'])}")
        print(f"{'':<12}all timed runs: {', '.join(f'{s:.1f}' for s, _ in results)} s")
        if model.refit is not None:
            kept = "the sample's fit" if model.refit.kept_seed is None else f"seed {model.refit.kept_seed}"
            print(f"{'':<12}refit on all users: kept {kept}; cost per user of the sample's fit "
                  f"{model.refit.sample_fit_cost / users:.4f}, of each refit: "
                  + ", ".join(f"seed {seed} {cost / users:.4f}" for seed, cost in model.refit.tried))
        print(f"{'':<12}segment shares: " + ", ".join(
            f"{name} {share:.1%}" for name, share in zip(model.profiles["segment_name"], model.profiles["share"])))
    for variant, (_, model) in best.items():
        print(f"{variant} k search: " + "; ".join(
            f"{c.algorithm} k={c.k} {c.silhouette:.4f}" for c in model.candidates))
    if sklearn:
        score, algorithm, k = sklearn["choice"]
        print(f"scikit-learn (information): same search fitting every k on all users in memory: fits "
              f"{sklearn['fits']:.1f} s, silhouette on {sklearn['silhouette_rows']:,} users {sklearn['silhouette']:.1f} s, "
              f"loading and scaling {sklearn['load']:.1f} s; chose {algorithm} k={k} at {score:.4f}")
    ratio = best["sample"][0] / best["all users"][0]
    same = ((best["sample"][1].choice.algorithm, best["sample"][1].choice.k)
            == (best["all users"][1].choice.algorithm, best["all users"][1].choice.k))
    print(f"time ratio sample / all users: {ratio:.2f}x (goal <= {TIME_GOAL}x: {'met' if ratio <= TIME_GOAL else 'not met'}); "
          f"same chosen algorithm and k: {'yes' if same else 'no'}")
    return 0 if ratio <= TIME_GOAL and same else 1


if __name__ == "__main__":
    sys.exit(main())
