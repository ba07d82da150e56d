"""The whole pipeline on Spark Connect: ``run-all`` on a tiny shop against pyspark's own local Connect
server, the way Databricks serverless and shared clusters run it (no ``sparkContext``, no RDDs, no
JVM gateway in the client).

The run is the suite's one run-all (the ``run_all`` fixture, tests/run_all_shop.py); tests/test_pipeline.py
checks what it wrote.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from run_all_shop import PLAN_SIZES

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_completes_on_spark_connect(run_all):
    done = run_all.done
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


def test_no_command_of_the_run_sends_a_plan_of_a_megabyte(run_all):
    """A Connect client sends a command's whole plan; a frame used many times in one query multiplies it.

    Measured on this run: the largest plans are 0.3-0.4 MB (features, the generator). The suppressions'
    update once sent 4.7 MB, the events' classification a dozen times over, until ingest checkpointed it.
    """
    largest = json.loads((run_all.work / PLAN_SIZES).read_text(encoding="utf-8"))
    assert largest, "the run recorded no plans"
    assert largest[0]["bytes"] < 1_000_000, largest


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
