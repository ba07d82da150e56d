"""Sending at scale: the send stage (Spark, 2 tasks, bookkeeping included) against a plain
``smtplib`` loop over one connection, same messages, same sink, same run.

N rendered messages (bodies of the size render makes: ~3 kB of text and ~18 kB of HTML, quoted-
printable on the wire) are generated once (fixed seed) as the ``outbox`` table of a fresh lake, with
their ``users``. An SMTP sink that accepts and discards (``aiosmtpd``) runs in its own process. Then:

- **stage**: ``inboxlift.stages.send.run_send`` as ``inboxlift run send`` calls it: the selection and
  the consent check, the join to the bodies, ``mapInArrow`` over ``--connections`` tasks (one SMTP
  connection each, the journal fsync'd per message), and the commit (``deliveries``; a sent
  message's outbox row is not rewritten, its status is read from ``deliveries``). Rate limits off. Its CPU is every process of this benchmark but the sink's: the
  driver, the JVM and the Python workers.
- **plain**: one Python process reads the same rows with pyarrow and, for each, makes its bytes with
  the same function (``inboxlift.render.eml.message_bytes``) and sends them with ``smtplib`` over one
  connection: no journal, no tables.

Between runs the outbox is written again and ``deliveries`` removed. The sink's CPU is measured apart
and left out; its headroom (the share of its one core it left idle) shows it was not the bottleneck.
The figure is messages per second per core of client CPU: messages / client CPU seconds.

    .venv/bin/python bench/bench_send.py [--messages 100000] [--connections 2] [--repeat 2] [--keep]

Goal from issue 19: the stage's messages per CPU second >= 0.8 x the plain loop's; the script exits
1 when missed. Data lives under ``.bench/send`` and is removed at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import shutil
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_render import tree_cpu_seconds  # noqa: E402

WORK_DIR = ROOT / ".bench" / "send"
GOAL = 0.8
NOW = "2026-11-20T12:00:00"
WORDS = ("lamp", "cup", "rug", "chair", "shoes", "jacket", "tea", "book", "candle", "mug", "scarf", "bag")
SINK = """
import sys, time
sys.path.insert(0, sys.argv[1])
from inboxlift.delivery.sink import LoopbackController

class Discard:
    async def handle_DATA(self, server, session, envelope):
        return "250 2.0.0 discarded"

controller = LoopbackController(Discard(), data_size_limit=0)
controller.start()
print(controller.port, flush=True)
sys.stdin.read()
controller.stop()
"""


def generate(folder: Path, *, messages: int, seed: int = 19) -> None:
    rng = random.Random(seed)
    rows = []
    for i in range(messages):
        user = f"u{i:07d}"
        words = " ".join(rng.choice(WORDS) for _ in range(450))
        rows.append({
            "message_id": f"{i:032x}@shop.example", "campaign_id": "weekly-picks", "campaign_type": "weekly_picks",
            "user_id": user, "variant": "A", "to_email": f"{user}@mail{i % 50}.example",
            "from_email": "news@shop.example", "subject": f"{user}, your picks for this week",
            "html": f"<html><body><p>Hi {user}</p>" + f"<p>{words}</p>" * 7 + "</body></html>",
            "text": f"Hi {user}\n" + words + "\n",
            "headers": [("From", "Example Shop <news@shop.example>"), ("Message-ID", f"<{i:032x}@shop.example>"),
                        ("List-Unsubscribe", f"<https://t.shop.example/u/{'x' * 120}{i}>, "
                                             "<mailto:unsubscribe@shop.example?subject=unsubscribe>"),
                        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
                        ("X-Inboxlift-Campaign", "weekly-picks"), ("X-Inboxlift-Variant", "A")],
            "send_at": dt.datetime(2026, 11, 20, 9, 0, tzinfo=dt.timezone.utc), "status": "rendered",
            "rendered_at": dt.datetime(2026, 11, 20, 6, 0, tzinfo=dt.timezone.utc), "plan_run_id": "bench",
            "plan_date": dt.date(2026, 11, 20), "status_reason": None,
        })
    schema = pa.schema([
        ("message_id", pa.string()), ("campaign_id", pa.string()), ("campaign_type", pa.string()),
        ("user_id", pa.string()), ("variant", pa.string()), ("to_email", pa.string()), ("from_email", pa.string()),
        ("subject", pa.string()), ("html", pa.string()), ("text", pa.string()),
        ("headers", pa.map_(pa.string(), pa.string())), ("send_at", pa.timestamp("us", tz="UTC")),
        ("status", pa.string()), ("rendered_at", pa.timestamp("us", tz="UTC")), ("plan_run_id", pa.string()),
        ("plan_date", pa.date32()), ("status_reason", pa.string()),
    ])
    (folder / "outbox").mkdir(parents=True, exist_ok=True)
    step = 10_000
    for f, start in enumerate(range(0, messages, step)):
        pq.write_table(pa.Table.from_pylist(rows[start:start + step], schema=schema),
                       folder / "outbox" / f"part-{f:04d}.parquet")
    pq.write_table(pa.table({"user_id": [r["user_id"] for r in rows], "email": [r["to_email"] for r in rows],
                             "email_consent": [True] * messages}), folder / "users.parquet")


def start_sink() -> tuple[subprocess.Popen, int]:
    sink = subprocess.Popen([sys.executable, "-c", SINK, str(ROOT / "lib")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    return sink, int(sink.stdout.readline())


def reset_lake(spark, ctx, folder: Path) -> None:
    for name in ("outbox", "deliveries", "users"):
        shutil.rmtree(Path(ctx.settings.storage.lake_dir) / name, ignore_errors=True)
    shutil.rmtree(ctx.settings.delivery.journal_dir, ignore_errors=True)
    ctx.lake.append("outbox", spark.read.parquet(str(folder / "outbox")))
    ctx.lake.append("users", spark.read.parquet(str(folder / "users.parquet")))


def run_stage(spark, ctx, folder: Path, sink_pid: int, port: int) -> tuple[float, float | None, float | None, int]:
    from inboxlift.delivery.smtp import RelayConfig
    from inboxlift.stages.send import run_send

    reset_lake(spark, ctx, folder)
    me = os.getpid()
    before, sink_before = tree_cpu_seconds(me), tree_cpu_seconds(sink_pid)
    started = time.perf_counter()
    report = run_send(ctx, relay=RelayConfig(host="127.0.0.1", port=port, security="none", helo_name="localhost"))
    seconds = time.perf_counter() - started
    after, sink_after = tree_cpu_seconds(me), tree_cpu_seconds(sink_pid)
    sink = None if sink_before is None else sink_after - sink_before
    client = None if before is None else (after - before) - (sink or 0.0)
    return seconds, client, sink, report.states.get("sent", 0)


def run_plain(folder: Path, sink_pid: int, port: int) -> tuple[float, float, float | None, int]:
    from inboxlift.render.eml import message_bytes

    sink_before = tree_cpu_seconds(sink_pid)
    started, cpu = time.perf_counter(), time.process_time()
    sent = 0
    with smtplib.SMTP("127.0.0.1", port, local_hostname="localhost") as smtp:
        for path in sorted((folder / "outbox").glob("*.parquet")):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1000):
                for row in batch.to_pylist():
                    row["headers"] = dict(row["headers"])
                    smtp.sendmail("news@shop.example", [row["to_email"]], message_bytes(row))
                    sent += 1
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    sink_after = tree_cpu_seconds(sink_pid)
    return seconds, cpu, None if sink_before is None else sink_after - sink_before, sent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--connections", type=int, default=2, help="send tasks (SMTP connections) of the stage")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep .bench/send")
    args = parser.parse_args(argv)

    from inboxlift.clock import FixedClock
    from inboxlift.context import RunContext
    from inboxlift.session import build_session
    from inboxlift.settings import load_settings
    from inboxlift.storage import Lake

    shutil.rmtree(WORK_DIR, ignore_errors=True)
    data = WORK_DIR / "data"
    print(f"generating {args.messages:,d} messages ...", flush=True)
    generate(data, messages=args.messages)
    settings = load_settings("local", conf_dir=ROOT / "conf", overrides={
        "spark.master": f"local[{args.connections}]", "spark.ui_enabled": False,
        "spark.shuffle_partitions": args.connections, "storage.lake_dir": str(WORK_DIR / "lake"),
        "storage.backend": "deltars", "delivery.journal_dir": str(WORK_DIR / "journal"),
        "delivery.connections": args.connections, "delivery.messages_per_second": 0,
        "delivery.domain_messages_per_second": 0, "delivery.max_delay_hours": 0})
    info = build_session(settings.spark, environ=os.environ, app_name="bench-send")
    spark = info.spark
    spark.conf.set("spark.sql.session.timeZone", "UTC")
    ctx = RunContext(spark=spark, settings=settings, clock=FixedClock.at(NOW),
                     lake=Lake.open(spark, settings.storage, has_delta_jars=info.has_delta_jars))
    sink, port = start_sink()
    best: dict[str, tuple] = {}
    try:
        for attempt in range(args.repeat):
            for name in (("stage", "plain") if attempt % 2 == 0 else ("plain", "stage")):
                result = run_stage(spark, ctx, data, sink.pid, port) if name == "stage" else run_plain(data, sink.pid, port)
                seconds, cpu, sink_cpu, sent = result
                print(f"  {name:<6} run {attempt + 1}: {seconds:7.1f} s wall  {cpu:7.1f} s client CPU  "
                      f"sink {sink_cpu or 0:6.1f} s CPU ({1 - (sink_cpu or 0) / seconds:.0%} of its core idle)  "
                      f"{sent:,d} sent", flush=True)
                if sent != args.messages:
                    raise SystemExit(f"{name} sent {sent} of {args.messages} messages")
                if name not in best or cpu < best[name][1]:
                    best[name] = result
    finally:
        sink.stdin.close()
        sink.wait(timeout=30)
        spark.stop()
        if not args.keep:
            shutil.rmtree(WORK_DIR, ignore_errors=True)
    (s_wall, s_cpu, s_sink, n), (p_wall, p_cpu, p_sink, _) = best["stage"], best["plain"]
    print(f"\n{'peer':<8}{'wall s':>9}{'msg/s':>9}{'CPU s':>9}{'msg/CPU s':>11}{'sink idle':>11}")
    print(f"{'stage':<8}{s_wall:>9.1f}{n / s_wall:>9.0f}{s_cpu:>9.1f}{n / s_cpu:>11.0f}{1 - s_sink / s_wall:>11.0%}")
    print(f"{'plain':<8}{p_wall:>9.1f}{n / p_wall:>9.0f}{p_cpu:>9.1f}{n / p_cpu:>11.0f}{1 - p_sink / p_wall:>11.0%}")
    ratio = p_cpu / s_cpu
    print(f"stage per CPU second / plain per CPU second: {ratio:.3f} (goal >= {GOAL}); wall on "
          f"{args.connections} tasks {s_wall:.1f} s against the loop's {p_wall:.1f} s; load {os.getloadavg()}")
    return 0 if ratio >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
