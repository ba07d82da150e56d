"""The one ``inboxlift run-all`` of the suite: a tiny generated shop, every stage, on Spark Connect.

tests/test_connect.py checks that the run completes on Connect; tests/test_pipeline.py checks what it
wrote (tables, mail in the relay, the notebooks and the logged models on its result). One run serves
both. The suite used to run a second run-all, on the classic session, for test_pipeline.py; what only
it covered is the stages chained on a classic session, and each stage runs on the classic
session in its own tests (test_ingest*,
test_features_stage, test_segments, test_recommend, test_plan, test_render, test_send,
test_simulate, test_report).

A local Connect server cannot start in a process that already holds a classic session (the test
session), so the command runs in a subprocess of this interpreter: this file run as a script, which
is ``inboxlift`` with a recorder of the plans the client sends (:func:`record_plan_sizes`). The suite
starts it before its first test and reads it in its last ones (tests/conftest.py), so it runs beside the
classic session's tests instead of before them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
NOW = "2026-11-20T12:00:00"
USERS = 60
ITEMS = 30


def spark_settings(work: Path) -> dict[str, object]:
    """The session the command builds: pyspark's own local Connect server."""
    return {
        "spark.remote": "local[2]",
        # 3g as the test session: the Connect server also holds every fitted model in its ML cache.
        "spark.driver_memory": "3g",
        "spark.shuffle_partitions": 2,
        "spark.checkpoint_dir": work / "checkpoints",
    }


def shop_settings(work: Path) -> dict[str, object]:
    """Where the run writes and what it generates: also what the notebooks are given to read its result."""
    return {
        "storage.lake_dir": work / "lake",
        "storage.backend": "deltars",
        "mlflow.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "mlflow.artifact_location": work / "artifacts",
        "paths.landing_dir": work / "landing",
        "paths.output_dir": work / "output",
        "generate.truth_dir": work / "truth",
        "delivery.journal_dir": work / "delivery",
        # The tiniest shop on which every stage still has rows to write and mail goes out: the point is that
        # every step runs, not what the models learn (that is tested in the stage and model tests).
        "generate.users": USERS,
        "generate.items": ITEMS,
        "generate.days": 28,
        "generate.dirty_rate": 0.0,
        # One k, both algorithms, one stability seed: every segment-train step, the fewest fits. The k search
        # runs on a sample of about half the users, then the choice is refitted on all of them, as on a
        # shop larger than search_sample_rows.
        "segments.k_max": 3,
        "segments.stability_seeds": "[7]",
        "segments.search_sample_rows": USERS // 2,
        # Two ALS candidates, fitted side by side in the first halving round (the search's quality is
        # tested in test_recommend*.py), one candidate for the other recommenders: every stage still runs.
        "recommend.ranks": "[4, 8]",
        "recommend.tuning_parallelism": 2,
        "recommend.reg_params": "[0.1]",
        "recommend.alphas": "[1.0]",
        "recommend.hybrid_weights": "[0.5]",
        "recommend.max_iter": 5,
        # A week each for test and validation leaves two weeks of the 28 days to train on (14 + 14 would
        # leave the small shop's training window empty).
        "recommend.test_days": 7,
        "recommend.validation_days": 7,
    }


def set_args(settings: dict[str, object]) -> list[str]:
    out = ["--conf-dir", str(ROOT / "conf")]
    for key, value in settings.items():
        out += ["--set", f"{key}={value}"]
    return out


@dataclass(frozen=True)
class RunAll:
    work: Path
    done: subprocess.CompletedProcess

    @property
    def stdout(self) -> str:
        return self.done.stdout


def subprocess_env() -> dict[str, str]:
    """This environment for a child Python that builds its own session: no inboxlift, Spark Connect or
    pyspark variables of the test run, and the library importable from the checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INBOXLIFT", "SPARK_REMOTE", "PYSPARK"))}
    env["PYTHONPATH"] = str(ROOT / "lib") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _lowest_priority() -> None:
    """In the child before it runs: CPU time only when the classic session's tests leave a core idle.

    The child gets a process group of its own but stays in the test run's session: Linux's scheduler
    autogroups (on by default in many kernels) put each session in a group that gets an equal share of
    the CPU whatever its processes' nice values, so a child in a new session (``setsid``) at nice 19
    would still take half the cores from the tests (measured: docs/testing.md, "The run-all beside the tests").
    """
    os.nice(19)


# How the run-all's process starts: at the lowest priority, in a process group of its own (``stop()`` ends
# its JVM too) inside the test run's session.
BACKGROUND = {"preexec_fn": _lowest_priority, "process_group": 0}


def run_script(script: str, *args: str, cwd: Path, timeout: float, hung: str) -> subprocess.CompletedProcess:
    """``python -c script args`` in a process group of its own (with a library-only environment), awaited.

    For a test that starts its own local Connect server: past ``timeout`` the whole group is killed,
    server included, and the test fails with ``hung`` and what the script had printed.
    """
    child = subprocess.Popen([sys.executable, "-c", script, *args], cwd=cwd, env=subprocess_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, _ = child.communicate()
        raise AssertionError(f"{hung}:\n{out}") from None
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


class RunAllInBackground:
    """``inboxlift run-all`` on an empty local lake under ``work``, started now and awaited by :meth:`result`.

    The suite starts it before its first test (tests/conftest.py) and runs the tests that read it last:
    the classic session's tests leave about a third of the two cores idle (their driver mostly waits on
    Catalyst, one thread), and the run-all's own JVM uses them meanwhile. Its output goes to files, not
    pipes, so a long run never blocks on a full pipe nobody reads yet.
    """

    def __init__(self, work: Path, *, timeout: float = 1500.0) -> None:
        self.work = work
        self.timeout = timeout
        settings = {**spark_settings(work), **shop_settings(work)}
        self.args = [sys.executable, __file__, "run-all", *set_args(settings), "--now", NOW]
        self._out = open(work / "run_all.stdout", "w+", encoding="utf-8")
        self._err = open(work / "run_all.stderr", "w+", encoding="utf-8")
        self.process = subprocess.Popen(self.args, cwd=work, env=subprocess_env(), stdout=self._out,
                                        stderr=self._err, text=True, **BACKGROUND)
        self._result: RunAll | None = None
        self._timed_out: subprocess.TimeoutExpired | None = None

    def result(self) -> RunAll:
        """Wait for the run and return what it printed. ``timeout`` counts from this call, not from the start:
        at the lowest priority the run may have had little CPU until the tests beside it were done."""
        if self._result is None:
            if self._timed_out is not None:
                raise self._timed_out
            try:
                returncode = self.process.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired as timed_out:
                self._timed_out = timed_out  # every later reader fails the same way
                self.stop()
                raise
            outputs = []
            for stream in (self._out, self._err):
                stream.seek(0)
                outputs.append(stream.read())
                stream.close()
            self._result = RunAll(self.work, subprocess.CompletedProcess(self.args, returncode, *outputs))
        return self._result

    def stop(self) -> None:
        """Kill the run and its Connect server if they are still going (the suite ended early, or it timed out)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for stream in (self._out, self._err):
            stream.close()


PLAN_SIZES = "connect_plans.json"


def record_plan_sizes(path: Path, *, keep: int = 5) -> None:
    """Write the largest plans this process's Connect client executes to ``path``: their size and the
    library's calling lines.

    A Connect client sends a command's whole plan tree, so a frame used a dozen times in one query is
    sent a dozen times over; the server converts and analyses all of it for every command (a 4.7 MB
    plan once cost the tiny shop's ingest 14 s). pyspark 4.2's client has no public hook for this: the
    recorder wraps the two methods every execution passes through (analysis requests carry the same
    plans).
    """
    from pyspark.sql.connect.client import core

    largest: list[dict[str, object]] = []

    def note(request) -> None:
        size = request.plan.ByteSize()
        if len(largest) == keep and size <= largest[-1]["bytes"]:
            return
        frames = [f for f in traceback.extract_stack()[:-3] if "inboxlift" in f.filename]
        largest.append({"bytes": size, "at": " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                                                         for f in reversed(frames[-4:]))})
        largest.sort(key=lambda entry: -entry["bytes"])
        del largest[keep:]
        path.write_text(json.dumps(largest, indent=1), encoding="utf-8")

    for name in ("_execute", "_execute_and_fetch_as_iterator"):
        def wrapped(self, request, *args, _original=getattr(core.SparkConnectClient, name), **kwargs):
            note(request)
            return _original(self, request, *args, **kwargs)
        setattr(core.SparkConnectClient, name, wrapped)


if __name__ == "__main__":
    from inboxlift.cli import main

    record_plan_sizes(Path.cwd() / PLAN_SIZES)
    sys.exit(main(sys.argv[1:]))
