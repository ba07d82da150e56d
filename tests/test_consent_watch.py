"""A send task's watch over the tracking service's event files (inboxlift.delivery.consent_watch):
what it reads, from when, how often, and the task holding a message back against a real SMTP server."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import time
from pathlib import Path

from inboxlift.clock import FixedClock
from inboxlift.delivery import states as S
from inboxlift.delivery.consent_watch import ConsentWatch, WatchPlan, watch_folder
from inboxlift.delivery.journal import TaskJournal
from inboxlift.delivery.partition import SendPlan, TaskSender
from inboxlift.delivery.smtp import RelayConfig
from inboxlift.service.app import event_line

from smtp_server import ScriptedHandler, smtp_server

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def line(kind: str, user: str, at: dt.datetime, scope: str = "all") -> bytes:
    # The bytes the service writes (app.event_line): the watch must read them as they are.
    return event_line(event_type=kind, at=at, user_id=user, campaign_id="c1", message_id=f"{user}-m",
                      properties={"scope": scope, "method": "page"})


def watch_plan(folder: Path, *, since: dt.datetime = NOW, file_time: float | None = None,
               every: float = 60.0) -> WatchPlan:
    return WatchPlan(folder=str(folder), since_file_time=time.time() - 60 if file_time is None else file_time,
                     since=since, every_seconds=every)


class Ticks:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_watch_reads_consent_events_since_the_selection_in_finished_and_in_progress_files(tmp_path):
    later = NOW + dt.timedelta(minutes=5)
    (tmp_path / "serve-a.jsonl").write_bytes(
        line("unsubscribe", "ann", later) + line("click", "bo", later)
        + line("unsubscribe", "cy", NOW - dt.timedelta(minutes=1))      # before the selection: applied by it
        + b'{"event_type":"unsubscribe","user_id":"dee","event_ts":"not a time"}\n'
        + line("preference_change", "eve", later, scope="weekly_picks"))
    # The file in progress: hidden, its last line still being written.
    (tmp_path / ".serve-b.jsonl").write_bytes(line("resubscribe", "fay", later) + line("unsubscribe", "gus", later)[:30])
    (tmp_path / "notes.txt").write_bytes(line("unsubscribe", "hal", later))
    ticks = Ticks()
    watch = ConsentWatch(watch_plan(tmp_path), monotonic=ticks)

    assert [watch.holds(u) for u in ("ann", "bo", "cy", "dee", "eve", "fay", "gus", "hal", None)] == [
        True, False, False, False, True, True, False, False, False]

    # The rest of gus's line arrives: not read before the next look is due, then read from where it stopped.
    with open(tmp_path / ".serve-b.jsonl", "ab") as f:
        f.write(line("unsubscribe", "gus", later)[30:])
    ticks.now = 59.0
    assert not watch.holds("gus")
    ticks.now = 60.0
    assert watch.holds("gus")
    assert watch.users == {"ann", "eve", "fay", "gus"}


def test_files_last_written_before_the_selection_are_not_read(tmp_path):
    old = tmp_path / "serve-old.jsonl"
    old.write_bytes(line("unsubscribe", "ann", NOW + dt.timedelta(minutes=1)))
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    (tmp_path / "serve-new.jsonl").write_bytes(line("unsubscribe", "bo", NOW + dt.timedelta(minutes=1)))
    watch = ConsentWatch(watch_plan(tmp_path, file_time=time.time() - 600))
    assert (watch.holds("ann"), watch.holds("bo")) == (False, True)
    # A service file's name tells when it was opened: one opened before the watch's bound is passed
    # over without a look at its time (its last write here is recent, as a copy or touch would leave it).
    stamp = dt.datetime.now(UTC) - dt.timedelta(hours=2)
    (tmp_path / f"serve-{stamp:%Y%m%dT%H%M%SZ}-vm-1-ab12cd-000001.jsonl").write_bytes(
        line("unsubscribe", "cy", NOW + dt.timedelta(minutes=1)))
    (tmp_path / f".serve-{dt.datetime.now(UTC):%Y%m%dT%H%M%SZ}-vm-1-ab12cd-000002.jsonl").write_bytes(
        line("unsubscribe", "dee", NOW + dt.timedelta(minutes=1)))
    bounded = ConsentWatch(dataclasses.replace(watch_plan(tmp_path, file_time=time.time() - 600),
                                               opened_before=time.time() - 3600))
    assert [bounded.holds(u) for u in ("bo", "cy", "dee")] == [True, False, True]
    # A folder that does not exist (the service never ran) holds nobody back.
    assert not ConsentWatch(watch_plan(tmp_path / "none")).holds("bo")


def test_only_local_paths_are_watched():
    assert watch_folder("var/landing/events/serve") == "var/landing/events/serve"
    assert watch_folder("file:///data/landing/events/serve") == "/data/landing/events/serve"
    assert watch_folder("/Volumes/main/inboxlift/landing/events/serve") == "/Volumes/main/inboxlift/landing/events/serve"
    assert watch_folder("s3://bucket/landing/events/serve") is None
    assert watch_folder("dbfs:/landing/events/serve") is None


def test_a_task_defers_the_message_of_a_user_whose_consent_changed_and_sends_the_others(tmp_path):
    events = tmp_path / "serve"
    events.mkdir()
    (events / ".serve-x.jsonl").write_bytes(line("unsubscribe", "bo", NOW + dt.timedelta(seconds=30)))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [dict(message_id=f"{u}-m@shop.example", attempt=1, untried_attempts=0, user_id=u,
                 to_email=f"{u}@mail.example", from_email="news@shop.example", subject="Hi", text="Hi\n",
                 html="<p>Hi</p>", headers={"Message-ID": f"<{u}-m@shop.example>"},
                 send_at=dt.datetime(2026, 11, 20, 9, 0, tzinfo=UTC)) for u in ("ann", "bo")]
    handler = ScriptedHandler()
    with smtp_server(handler) as port:
        plan = SendPlan(relay=RelayConfig(host="127.0.0.1", port=port, security="none", helo_name="localhost",
                                          connect_timeout=2.0, command_timeout=2.0),
                        run_dir=str(run_dir), connections=1, return_path="bounces@shop.example",
                        messages_per_second=0.0, domain_messages_per_second=0.0, throttle_backoff_seconds=1.0,
                        throttle_backoff_max_seconds=8.0, throttle_retries=2, max_attempts=3,
                        retry_backoff_minutes=15.0, retry_backoff_max_minutes=120.0, journal_fsync=False,
                        clock=FixedClock(NOW), consent_watch=watch_plan(events))
        sender = TaskSender(plan, TaskJournal(run_dir, partition=0, attempt=0, fsync=False))
        outcomes = [sender.handle(r) for r in rows]
        sender.close()
        sender.journal.close()
    assert [(o.state, o.reason) for o in outcomes] == [(S.SENT, None), (S.DEFERRED, S.CONSENT_CHANGED)]
    # Due again at once: the next run's selection decides by the consent rule.
    assert outcomes[1].next_at == NOW
    assert [r.rcpt for r in handler.received] == ["ann@mail.example"]
    assert S.CONSENT_CHANGED in S.UNTRIED_REASONS
