"""A send process killed with SIGKILL, then run again: each message reaches the relay once, except
the ``unknown`` ones, at most the messages in flight at the kill (issue 19).

The send runs in a real subprocess (its own driver, JVM and Python workers, killed together as a
process group, as a crashed machine or container would be); the scripted SMTP server runs in this
process and knows what it received and what was in flight. The re-run is this process's stage.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from inboxlift.delivery.outbox import read_outbox
from inboxlift.stages.send import run_send

from smtp_server import ScriptedHandler, smtp_server
from test_send import OUTBOX, USERS, message, mid, sending_ctx, user

ROOT = Path(__file__).resolve().parents[1]
USER_IDS = [f"u{i:02d}" for i in range(12)]
WAIT = 480.0   # the subprocess starts a Spark session first; the machine may be busy


@pytest.fixture(autouse=True)
def utc_session(spark):
    spark.conf.set("spark.sql.session.timeZone", "UTC")


def _start_send(ctx, port: int, work: Path) -> subprocess.Popen:
    settings = {
        "spark.master": "local[2]", "spark.driver_memory": "1g", "spark.ui_enabled": False,
        "spark.shuffle_partitions": 2, "spark.checkpoint_dir": work / "checkpoints",
        "storage.lake_dir": ctx.settings.storage.lake_dir,
        "storage.backend": "native" if ctx.lake.backend.name == "native" else "deltars",
        "paths.output_dir": work / "output", "mlflow.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "delivery.relay_host": "127.0.0.1", "delivery.relay_port": port, "delivery.security": "none",
        "delivery.connections": 2, "delivery.messages_per_second": 0, "delivery.domain_messages_per_second": 0,
        "delivery.helo_name": "localhost", "delivery.command_timeout_seconds": 600,
        "delivery.journal_dir": ctx.settings.delivery.journal_dir,
    }
    args = [sys.executable, "-m", "inboxlift.cli", "run", "send", "--conf-dir", str(ROOT / "conf"),
            "--now", "2026-11-20T12:00:00"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INBOXLIFT", "SPARK_REMOTE", "PYSPARK"))}
    env["PYTHONPATH"] = str(ROOT / "lib") + os.pathsep + env.get("PYTHONPATH", "")
    out = open(work / "send.log", "w")
    # Its own process group: the kill takes the driver, its JVM and the Python workers at once.
    return subprocess.Popen(args, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(event, proc: subprocess.Popen, work: Path) -> None:
    deadline = time.monotonic() + WAIT
    while not event.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the send process did not reach the kill point:\n"
                                 + (work / "send.log").read_text()[-5000:])


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _lake(ctx, spark) -> None:
    ctx.lake.append("outbox", spark.createDataFrame([message(u) for u in USER_IDS], OUTBOX))
    ctx.lake.append("users", spark.createDataFrame([user(u) for u in USER_IDS], USERS))


def test_killed_between_the_content_and_the_reply_only_the_messages_in_flight_are_unknown(ctx, spark, tmp_path):
    _lake(ctx, spark)
    handler = ScriptedHandler(hold_after=5)   # accept 5, then hold each next message's reply
    with smtp_server(handler) as port:
        proc = _start_send(ctx, port, tmp_path)
        _wait_for(handler.holding, proc, tmp_path)
        time.sleep(1.0)   # let the other task reach its held message too (or not: either is fine)
        _kill(proc)
        in_flight = handler.open
        accepted = [r.message_id for r in handler.received]
        handler.release.set()
    assert 1 <= in_flight <= 2 and len(accepted) == 5

    resumed = ScriptedHandler()
    with smtp_server(resumed) as port:
        report = run_send(sending_ctx(ctx, port))
        later = run_send(sending_ctx(ctx, port))
    unknown = report.recovered.get("unknown", 0)
    # The killed run's journal: the 5 accepted are sent, those in flight unknown; the rest never
    # started and went now.
    assert report.recovered == {"sent": 5, **({"unknown": unknown} if unknown else {})}
    assert 1 <= unknown <= in_flight
    # This run reports them, and does not send them.
    assert report.states == {"sent": 12 - 5 - unknown} and report.held_unknown == unknown
    assert later.due == 0 and later.held_unknown == unknown
    received = accepted + [r.message_id for r in resumed.received]
    states = {r.message_id: r.state for r in ctx.lake.read("deliveries").collect()}
    unknown_ids = {m for m, s in states.items() if s == "unknown"}
    assert len(unknown_ids) == unknown
    for u in USER_IDS:
        expected = 0 if mid(u) in unknown_ids else 1
        assert received.count(f"<{mid(u)}>") == expected, u
    assert "recovered 1 interrupted run(s) from their journal" in report.summary()
    assert f"{unknown} messages unknown from earlier runs" in later.summary()

    # --resend-unknown sends them (the relay never answered for them; the Message-ID is the same).
    again = ScriptedHandler()
    with smtp_server(again) as port:
        resent = run_send(sending_ctx(ctx, port), resend_unknown=True)
    assert resent.states == {"sent": unknown} and sorted(r.message_id for r in again.received) == sorted(
        f"<{m}>" for m in unknown_ids)


def test_killed_after_every_reply_before_the_commit_nothing_is_sent_twice(ctx, spark, tmp_path):
    _lake(ctx, spark)
    handler = ScriptedHandler(hold_quit=True)   # every message accepted; the tasks never get past QUIT
    with smtp_server(handler) as port:
        proc = _start_send(ctx, port, tmp_path)
        deadline = time.monotonic() + WAIT
        while len(handler.received) < len(USER_IDS) or not handler.quitting.is_set():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"received {len(handler.received)}, quitting {handler.quitting.is_set()}:\n"
                                     + (tmp_path / "send.log").read_text()[-5000:])
            time.sleep(0.2)
        _kill(proc)
        handler.release.set()
    assert not ctx.lake.exists("deliveries")   # the run died before its commit

    resumed = ScriptedHandler()
    with smtp_server(resumed) as port:
        report = run_send(sending_ctx(ctx, port))
    assert report.recovered == {"sent": 12} and report.due == 0 and resumed.received == []
    assert sorted(r.message_id for r in handler.received) == sorted(f"<{mid(u)}>" for u in USER_IDS)
    assert read_outbox(ctx.lake).where(F.col("status") == "sent").count() == 12
