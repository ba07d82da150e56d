"""K-means at scale: Spark's K-means as inboxlift configures it, against scikit-learn's, on the same matrix.

One users x features matrix (planted clusters plus noise, fixed seed) is written once as Parquet,
one file per core. In the same run, each peer then clusters that matrix:

- **Spark**: read the Parquet files -> the features as one column -> ``inboxlift.models.segments.clusterer``
  (K-means, k-means|| initialisation), timed from the read to the fitted model. With the default
  ``collective`` solver the column is ``array(f00, ..., f19)``, as the segment search fits on an
  array column; ``--input vector`` assembles a Spark ML vector instead (Spark ML's ``KMeans``
  needs one). Nothing is cached first: each K-means holds or caches its own input.
- **scikit-learn**: ``KMeans(init="k-means++", n_init=1, algorithm="lloyd")`` on the same matrix,
  timed for the fit alone and for Parquet read + fit.

Same k, the same iteration cap, ``tol=0`` on both (each stops only when nothing moves any more, or at
the cap), one initialisation each. The within-cluster sum of squares of both is recomputed by the
same numpy code on the same matrix from each peer's final centres, so the comparison does not
depend on how either library reports its cost.

Before the timed fits, each peer fits the same matrix once untimed (``--warmup``): a session's first
Spark fit also pays for the JVM compiling Spark's and the solver's code (some 7 s here, against
1.2-2.1 s for the fits after it), and ``segment-train`` fits K-means six to eight times in one
session with the default settings (k from 3 to 8, and two more seeds for stability when K-means is
chosen), so every fit it makes but the first is warm.
Both the warm-up and the timed fits are printed.

    .venv/bin/python bench/bench_segments.py [--users N] [--features N] [--k N] [--iterations N]
        [--solver collective|row|block|auto] [--input array|vector] [--repeat N] [--warmup N]

Goal from the issue: Spark's time <= 3x scikit-learn's fit, with an equal or lower sum of squares
(equal within 1e-6 relative); the script exits 1 when either is missed. Data lives under
``.bench/segments`` and is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
WORK_DIR = ROOT / ".bench" / "segments"
TIME_GOAL = 3.0


def planted_matrix(users: int, features: int, *, clusters: int, seed: int) -> np.ndarray:
    """``users x features`` float64: ``clusters`` Gaussian blobs of unequal sizes and spreads, standardised."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 3.0, size=(clusters, features))
    weights = rng.dirichlet(np.full(clusters, 2.0))
    labels = rng.choice(clusters, size=users, p=weights)
    spreads = rng.uniform(0.6, 1.6, size=clusters)
    matrix = centres[labels] + rng.normal(0.0, 1.0, size=(users, features)) * spreads[labels, None]
    # Standardised, as the segment pipeline's scaler leaves its features.
    return (matrix - matrix.mean(axis=0)) / matrix.std(axis=0)


def write_parquet(matrix: np.ndarray, folder: Path, *, files: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    columns = [f"f{j:02d}" for j in range(matrix.shape[1])]
    paths = []
    for i, chunk in enumerate(np.array_split(matrix, files)):
        path = folder / f"part-{i:03d}.parquet"
        pq.write_table(pa.table({c: chunk[:, j] for j, c in enumerate(columns)}), path, compression="snappy")
        paths.append(str(path))
    return paths


def wssse(matrix: np.ndarray, centres: np.ndarray, *, chunk: int = 200_000) -> float:
    """Sum over rows of the squared distance to the nearest centre."""
    total = 0.0
    centre_norms = (centres ** 2).sum(axis=1)
    for start in range(0, len(matrix), chunk):
        block = matrix[start:start + chunk]
        d = (block ** 2).sum(axis=1)[:, None] - 2 * block @ centres.T + centre_norms[None, :]
        total += float(np.maximum(d.min(axis=1), 0.0).sum())
    return total


def run_sklearn(paths: list[str], *, k: int, iterations: int, seed: int) -> dict:
    from sklearn.cluster import KMeans as SkKMeans

    started = time.perf_counter()
    matrix = np.column_stack([c.to_numpy() for c in pq.ParquetDataset(paths).read().columns])
    read = time.perf_counter() - started
    model = SkKMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=iterations, tol=0.0,
                     algorithm="lloyd", random_state=seed)
    started = time.perf_counter()
    model.fit(matrix)
    fit = time.perf_counter() - started
    return {"read": read, "fit": fit, "centres": model.cluster_centers_, "iterations": int(model.n_iter_),
            "own_cost": float(model.inertia_), "matrix": matrix}


def run_spark(spark, folder: Path, *, k: int, iterations: int, seed: int, solver: str, features: int,
              vectors: bool) -> dict:
    from pyspark.ml.feature import VectorAssembler
    from pyspark.sql import functions as F

    from inboxlift.models.segments import FEATURES_COL, clusterer
    from inboxlift.settings import SegmentSettings

    params = SegmentSettings(max_iter=iterations, tol=0.0, seed=seed, kmeans_solver=solver)
    estimator = clusterer(params, algorithm="kmeans", k=k, seed=seed)
    columns = [f"f{j:02d}" for j in range(features)]
    started = time.perf_counter()
    matrix = spark.read.parquet(str(folder)).select(*columns)
    if vectors:
        points = VectorAssembler(inputCols=columns, outputCol=FEATURES_COL).transform(matrix)
    else:
        points = matrix.select(F.array(*columns).alias(FEATURES_COL))
    model = estimator.fit(points)
    fit = time.perf_counter() - started
    return {"fit": fit, "centres": np.array(model.clusterCenters()), "iterations": int(model.summary.numIter),
            "own_cost": float(model.summary.trainingCost), "partitions": points.rdd.getNumPartitions()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--solver", choices=["collective", "row", "block", "auto"], default=None,
                        help="segments.kmeans_solver (default: its default): collective is inboxlift's "
                             "K-means, the others Spark ML's KMeans with that solver")
    parser.add_argument("--input", choices=["array", "vector"], default=None,
                        help="the features as an array<double> column of the Parquet columns (default for "
                             "the collective solver, which the segment search fits on a cached array column) "
                             "or as a VectorAssembler vector (default for Spark ML's KMeans)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each peer, alternating; the best time counts")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed fits of each peer before the timed ones (default 1; see the docstring)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--driver-memory", default="4g")
    args = parser.parse_args(argv)
    if args.solver is None:
        from inboxlift.settings import SegmentSettings

        args.solver = SegmentSettings().kmeans_solver
    if args.input is None:
        args.input = "array" if args.solver == "collective" else "vector"

    from pyspark.sql import SparkSession

    shutil.rmtree(WORK_DIR, ignore_errors=True)
    folder = WORK_DIR / "matrix"
    matrix = planted_matrix(args.users, args.features, clusters=args.k, seed=args.seed)
    paths = write_parquet(matrix, folder, files=args.cores)
    size = sum(os.path.getsize(p) for p in paths)
    del matrix
    # Python workers (the collective solver's tasks) must run this interpreter, as in every local session.
    os.environ["PYSPARK_PYTHON"] = sys.executable
    spark = (SparkSession.builder.master(f"local[{args.cores}]").appName("bench-segments")
             .config("spark.driver.memory", args.driver_memory)
             .config("spark.sql.codegen.hugeMethodLimit", "8000")   # as inboxlift.session sets it
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .config("spark.sql.shuffle.partitions", str(args.cores))
             .config("spark.default.parallelism", str(args.cores))
             # One input partition per file (= per core): each task reads one whole file.
             .config("spark.sql.files.maxPartitionBytes", str(size // args.cores + (1 << 20)))
             .config("spark.sql.files.openCostInBytes", str(1 << 20))
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    try:
        warm_spark, warm_sk = [], []
        for _ in range(args.warmup):
            warm_spark.append(run_spark(spark, folder, k=args.k, iterations=args.iterations, seed=args.seed,
                                        solver=args.solver, features=args.features,
                                        vectors=args.input == "vector")["fit"])
            warm_sk.append(run_sklearn(paths, k=args.k, iterations=args.iterations, seed=args.seed)["fit"])
        sk_runs, spark_runs = [], []
        for _ in range(args.repeat):
            spark_runs.append(run_spark(spark, folder, k=args.k, iterations=args.iterations, seed=args.seed,
                                        solver=args.solver, features=args.features,
                                        vectors=args.input == "vector"))
            sk_runs.append(run_sklearn(paths, k=args.k, iterations=args.iterations, seed=args.seed))
        best_spark = min(spark_runs, key=lambda r: r["fit"])
        best_sk = min(sk_runs, key=lambda r: r["fit"])
        shared = best_sk["matrix"]
        spark_cost = wssse(shared, best_spark["centres"])
        sk_cost = wssse(shared, best_sk["centres"])
    finally:
        spark.stop()
        shutil.rmtree(WORK_DIR, ignore_errors=True)

    sk_total = best_sk["read"] + best_sk["fit"]
    print(f"K-means: {args.users:,} users x {args.features} features, k={args.k}, at most {args.iterations} "
          f"iterations, tol=0, one initialisation; {args.cores} cores (local[{args.cores}]), Parquet "
          f"{size / 1e6:.0f} MB in {len(paths)} files, Spark solver={args.solver}, input {args.input}, best of {args.repeat}")
    if args.warmup:
        print(f"untimed warm-up fits: Spark {', '.join(f'{t:.2f}' for t in warm_spark)} s, "
              f"scikit-learn {', '.join(f'{t:.2f}' for t in warm_sk)} s")
    spark_times = ", ".join(f"{r['fit']:.2f}" for r in spark_runs)
    sk_times = ", ".join(f"{r['fit']:.2f}" for r in sk_runs)
    print(f"timed fits: Spark {spark_times} s, scikit-learn {sk_times} s")
    print(f"{'peer':<44}{'seconds':>9}{'iterations':>12}{'sum of squares':>18}{'(own report)':>18}")
    spark_name = "inboxlift collective" if args.solver == "collective" else "Spark ML KMeans"
    print(f"{spark_name + ' k-means|| (Parquet->fit)':<44}{best_spark['fit']:>9.2f}{best_spark['iterations']:>12}"
          f"{spark_cost:>18,.0f}{best_spark['own_cost']:>18,.0f}")
    print(f"{'scikit-learn KMeans k-means++ (fit)':<44}{best_sk['fit']:>9.2f}{best_sk['iterations']:>12}"
          f"{sk_cost:>18,.0f}{best_sk['own_cost']:>18,.0f}")
    print(f"{'scikit-learn (Parquet read + fit)':<44}{sk_total:>9.2f}")
    ratio_fit = best_spark["fit"] / best_sk["fit"]
    ratio_total = best_spark["fit"] / sk_total
    cost_ratio = spark_cost / sk_cost
    print(f"time ratio Spark / scikit-learn: {ratio_fit:.2f}x against its fit, {ratio_total:.2f}x against read + fit "
          f"(goal <= {TIME_GOAL:.0f}x: {'met' if ratio_fit <= TIME_GOAL else 'not met'} against the fit)")
    cost_met = cost_ratio <= 1.0 + 1e-6
    print(f"sum of squares Spark / scikit-learn: {cost_ratio:.4f} ({'equal or lower' if cost_met else 'higher'})")
    # As every benchmark here: non-zero when a goal is missed.
    return 0 if ratio_fit <= TIME_GOAL and cost_met else 1


if __name__ == "__main__":
    sys.exit(main())
