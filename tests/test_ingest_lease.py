"""One ingest at a time per lake: the lease, its takers racing in threads, renewal, take-over of a dead run's lease."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
import time
from pathlib import Path

import pytest

from conftest import settings_in
from inboxlift.clock import FixedClock
from inboxlift.context import RunContext
from inboxlift.stages.ingest import IngestInterrupted, run_ingest
from inboxlift.stages.ingest_lease import ConcurrentIngestError, IngestLease, LeaseLostError, read_lease
from inboxlift.storage import Lake

NOON = FixedClock.at("2026-11-20T12:00:00")


@dataclasses.dataclass
class MovableClock:
    """A clock a test moves forward, as time passes for a run that is still working."""

    instant: dt.datetime

    def now(self) -> dt.datetime:
        return self.instant

    def today(self) -> dt.date:
        return self.instant.date()


def context(spark, spark_info, base_settings, folder: Path, clock=NOON) -> RunContext:
    """A context of its own (as another process would have) on the lake and landing folder under ``folder``."""
    settings = settings_in(base_settings, folder)
    lake = Lake.open(spark, settings.storage, has_delta_jars=spark_info.has_delta_jars)
    return RunContext(spark=spark, settings=settings, lake=lake, clock=clock)


def write_events(landing: Path, name: str, ids: list[str]) -> None:
    path = landing / "events" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    # Events of unknown users: quarantined, which is all these tests need to see a batch done.
    path.write_text("".join(json.dumps({"event_id": i, "event_type": "search", "event_ts": "2026-11-19T10:00:00Z",
                                        "user_id": "u1"}) + "\n" for i in ids))


def quiet(_: str) -> None:
    return None


def test_a_second_ingest_stops_at_once_and_says_who_holds_the_lease(spark, spark_info, base_settings, tmp_path):
    ctx = context(spark, spark_info, base_settings, tmp_path)
    write_events(Path(ctx.settings.paths.landing_dir), "a.jsonl", ["e1", "e2"])
    # A first run is interrupted after planning: its batch is pending.
    with pytest.raises(IngestInterrupted):
        run_ingest(ctx, fail_after_files=1, fail_at="planned", echo=quiet)
    # A run still working holds the lease (as a run redoing that batch would).
    other = IngestLease.acquire(context(spark, spark_info, base_settings, tmp_path), owner="ingest-other on box (pid 7)")
    files_version = ctx.lake.version("ingest_files")

    with pytest.raises(ConcurrentIngestError) as raised:
        run_ingest(ctx, echo=quiet)

    assert str(raised.value).startswith(
        "another ingest is running on this lake: ingest-other on box (pid 7) holds it since 2026-11-20 12:00:00 UTC "
        "(last renewed 2026-11-20 12:00:00 UTC) until 2026-11-20 12:30:00 UTC. This run stops without reading or "
        "writing anything")
    # The pending batch was not touched by the second run.
    assert not ctx.lake.exists("ingest_runs") and ctx.lake.version("ingest_files") == files_version

    other.release()
    report = run_ingest(ctx, echo=quiet)
    assert report.recovered_batch == 1 and report.counts("events").read == 2
    assert read_lease(ctx).released_at is not None


def test_the_lease_of_a_run_that_died_is_taken_over_once_expired(spark, spark_info, base_settings, tmp_path):
    ctx = context(spark, spark_info, base_settings, tmp_path)
    write_events(Path(ctx.settings.paths.landing_dir), "a.jsonl", ["e1"])
    # Taken and never released nor renewed: the run was killed.
    IngestLease.acquire(ctx, owner="ingest-dead on box (pid 9)")
    still_held = context(spark, spark_info, base_settings, tmp_path, clock=FixedClock.at("2026-11-20T12:29:59"))
    with pytest.raises(ConcurrentIngestError, match="ingest-dead on box"):
        run_ingest(still_held, echo=quiet)

    later = context(spark, spark_info, base_settings, tmp_path, clock=FixedClock.at("2026-11-20T12:30:01"))
    printed: list[str] = []
    report = run_ingest(later, echo=printed.append)

    assert report.batches == (1,)
    assert report.took_over_from.startswith("ingest-dead on box (pid 9) holds it since 2026-11-20 12:00:00 UTC")
    assert "took over the expired ingest lease of ingest-dead on box (pid 9)" in printed[0]


def test_takers_racing_in_threads_one_wins_and_the_others_get_the_clear_error(spark, spark_info, base_settings,
                                                                             tmp_path):
    for round_ in range(2):
        takers = 3
        barrier = threading.Barrier(takers)
        outcomes: dict[int, object] = {}

        contexts = [context(spark, spark_info, base_settings, tmp_path) for _ in range(takers)]

        def take(n: int) -> None:
            ctx = contexts[n]
            barrier.wait()
            try:
                outcomes[n] = IngestLease.acquire(ctx, owner=f"taker-{round_}-{n}")
            except Exception as exc:  # noqa: BLE001 - the test looks at what each taker got
                outcomes[n] = exc

        threads = [threading.Thread(target=take, args=(n,)) for n in range(takers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [o for o in outcomes.values() if isinstance(o, IngestLease)]
        losers = [o for o in outcomes.values() if not isinstance(o, IngestLease)]
        assert len(winners) == 1 and len(losers) == takers - 1
        # Never the storage layer's ConcurrentWriteError: the stage's own error, with its message.
        assert all(type(e) is ConcurrentIngestError for e in losers), losers
        holder = read_lease(context(spark, spark_info, base_settings, tmp_path))
        assert holder.owner == winners[0].owner and holder.released_at is None
        assert all(winners[0].owner in str(e) or "at the same moment" in str(e) for e in losers)
        winners[0].release()


def test_two_ingests_started_together_in_threads_do_the_work_once(spark, spark_info, base_settings, tmp_path):
    landing = tmp_path / "landing"
    write_events(landing, "a.jsonl", ["e1", "e2", "e3"])
    barrier = threading.Barrier(2)
    outcomes: dict[int, object] = {}

    contexts = [context(spark, spark_info, base_settings, tmp_path) for _ in range(2)]

    def ingest(n: int) -> None:
        ctx = contexts[n]
        barrier.wait()
        try:
            outcomes[n] = run_ingest(ctx, echo=quiet)
        except Exception as exc:  # noqa: BLE001
            outcomes[n] = exc

    threads = [threading.Thread(target=ingest, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    reports = [o for o in outcomes.values() if not isinstance(o, Exception)]
    errors = [o for o in outcomes.values() if isinstance(o, Exception)]
    # Exactly one did the batch; the other was refused, or (started after the first had finished) found nothing new.
    assert sorted(r.batches for r in reports) in ([(1,)], [(), (1,)])
    assert all(type(e) is ConcurrentIngestError for e in errors), errors
    ctx = context(spark, spark_info, base_settings, tmp_path)
    runs = ctx.lake.read("ingest_runs").collect()
    assert [(r.batch, r.read, r.quarantined) for r in runs] == [(1, 3, 3)]
    assert ctx.lake.read("events_quarantine").count() == 3


def test_renewal_pushes_the_expiry_and_a_lost_lease_stops_its_holder(spark, spark_info, base_settings, tmp_path):
    clock = MovableClock(NOON.instant)
    ctx = context(spark, spark_info, base_settings, tmp_path, clock=clock)
    lease = IngestLease.acquire(ctx, owner="slow")
    clock.instant = NOON.instant + dt.timedelta(minutes=20)
    lease.renew()
    state = read_lease(ctx)
    assert (state.owner, state.sequence, f"{state.expires_at:%H:%M}", f"{state.acquired_at:%H:%M}") == \
        ("slow", 2, "12:50", "12:00")

    # The holder stalls past its expiry; another run takes over.
    late = context(spark, spark_info, base_settings, tmp_path, clock=FixedClock.at("2026-11-20T12:51:00"))
    taker = IngestLease.acquire(late, owner="taker")
    assert taker.taken_over.owner == "slow"
    with pytest.raises(LeaseLostError, match="slow lost the ingest lease .* taker holds it"):
        lease.renew()
    # Releasing a lost lease leaves the new holder's alone.
    lease.release()
    assert read_lease(ctx).owner == "taker" and read_lease(ctx).released_at is None

    # The heartbeat renews from its own thread.
    start = read_lease(ctx).sequence
    taker.start_heartbeat(interval_seconds=0.5)
    deadline = time.monotonic() + 120
    while read_lease(ctx).sequence < start + 2:
        assert time.monotonic() < deadline, "the heartbeat did not renew the lease"
        time.sleep(0.5)
    taker.check()
    taker.release()
    assert read_lease(ctx).released_at is not None
