"""The whole pipeline on Spark Connect: ``run-all`` on a tiny shop against pyspark's own local Connect
server, the way Databricks serverless and shared clusters run it (no ``sparkContext``, no RDDs, no
JVM gateway in the client).

A local Connect server cannot start in a process that already holds a classic session (the test
session), so the command runs in a subprocess of this interpreter.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _settings(work: Path) -> dict[str, object]:
    return {
        "spark.remote": "local[2]",
        # 3g as the test session: the Connect server also holds every fitted model in its ML cache.
        "spark.driver_memory": "3g",
        "spark.shuffle_partitions": 2,
        "spark.checkpoint_dir": work / "checkpoints",
        "storage.lake_dir": work / "lake",
        "storage.backend": "deltars",
        "mlflow.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "mlflow.artifact_location": work / "artifacts",
        "paths.landing_dir": work / "landing",
        "paths.output_dir": work / "output",
        "generate.truth_dir": work / "truth",
        "delivery.journal_dir": work / "delivery",
        # The tiniest shop on which every stage still has rows to write and mail goes out: the point is that
        # every step runs on Connect, not what the models learn (that is tested on the classic session).
        "generate.users": 60,
        "generate.items": 30,
        "generate.days": 28,
        "generate.dirty_rate": 0.0,
        # One k, both algorithms, one stability seed: every segment-train step, the fewest fits.
        "segments.k_max": 3,
        "segments.stability_seeds": "[7]",
        # One candidate per recommender: the point is that every step runs on Connect, not the search.
        "recommend.ranks": "[8]",
        "recommend.reg_params": "[0.1]",
        "recommend.alphas": "[1.0]",
        "recommend.hybrid_weights": "[0.5]",
        "recommend.max_iter": 5,
        # A week each for test and validation leaves two weeks of the 28 days to train on (14 + 14 would
        # leave the small shop's training window empty).
        "recommend.test_days": 7,
        "recommend.validation_days": 7,
    }


@pytest.fixture(scope="module")
def connect_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("connect")
    args = [sys.executable, "-m", "inboxlift.cli", "run-all", "--conf-dir", str(ROOT / "conf"),
            "--now", "2026-11-20T12:00:00"]
    for key, value in _settings(work).items():
        args += ["--set", f"{key}={value}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INBOXLIFT", "SPARK_REMOTE", "PYSPARK"))}
    env["PYTHONPATH"] = str(ROOT / "lib") + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=1500)
    return work, done


def test_run_all_completes_on_spark_connect(connect_run):
    work, done = connect_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "Spark Connect" in done.stdout, done.stdout[:2000]
    listing = done.stdout.split("== tables", 1)[1]
    rows = {m.group(1): int(m.group(2).replace(",", ""))
            for m in re.finditer(r"^(\w+)\s+([\d,]+)\s+\d+\s+\d+\s", listing, flags=re.M)}
    for table in ("events", "users", "user_features", "user_segments", "recommendations", "campaign_plan",
                  "outbox", "deliveries"):
        assert rows.get(table, 0) > 0, f"{table} is empty or missing on Spark Connect: {rows}"
    stored = re.search(r"embedded relay \S+ \(now stopped\): (\d+) messages stored", done.stdout)
    assert stored and int(stored.group(1)) > 0, done.stdout[-3000:]


def test_no_classic_only_api_in_the_library():
    """The library names none of the APIs Spark Connect lacks (a cheap guard beside the run above)."""
    forbidden = re.compile(r"\.sparkContext\b|\._jvm\b|\._jsc\b|\._jdf\b|\.rdd\b|barrier\(")
    offenders = []
    for path in (ROOT / "lib" / "inboxlift").rglob("*.py"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if forbidden.search(code):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
