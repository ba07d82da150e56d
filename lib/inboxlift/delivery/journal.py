"""Each send run's journal and the run lock: what makes a crash cost at most the messages in flight.

A run owns a folder ``<delivery.journal_dir>/runs/<run_id>/``. Every task appends JSON lines to its
own file there (``part-<partition>-<attempt>.jsonl``, :class:`TaskJournal`):

- ``start`` for a message, flushed and (with ``delivery.journal_fsync``) fsync'd *before* its
  content goes to the relay: the relay has said 354 and is waiting for the data, so from here on it
  may accept the message;
- ``end`` with the outcome (the relay's reply, or a state decided without the relay) once known.

The driver turns the folder into ``deliveries`` rows when the run ends, and any earlier run's folder
left by a crash at the start of the next run (:mod:`inboxlift.delivery.bookkeeping`): ``end`` gives
the state; a ``start`` without an ``end`` is ``unknown``; a message without a line was never handed
to the relay and is simply due again. A task that Spark runs again (a retry, a recomputed stage)
reads the lines already in the folder and replays them instead of sending again.

:class:`RunLock` keeps two runs from sending the same messages: a lock file holding the owner and a
lease the owner renews; a lock whose lease ran out, or whose owner process on this host is gone,
belongs to a dead run and is taken over.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pyspark.sql.types import IntegerType, StringType, StructField, StructType

RUNS = "runs"
LOCK = "send.lock"
COMMITTED = "_COMMITTED"
MANIFEST = "run.json"
START, END = "start", "end"

# What Spark's JSON reader reads the journal with (one object per line; short keys keep lines small).
JOURNAL_SCHEMA = StructType([
    StructField("k", StringType()),     # start | end
    StructField("m", StringType()),     # message_id
    StructField("a", IntegerType()),    # attempt
    StructField("t", StringType()),     # when (ISO 8601, UTC)
    StructField("s", StringType()),     # end: the state
    StructField("c", IntegerType()),    # end: the relay's reply code, when it gave one
    StructField("r", StringType()),     # end: the relay's reply text (or the error)
    StructField("x", StringType()),     # end: the reason (failed, deferred, skipped)
    StructField("n", StringType()),     # end: when a deferred message is due again (ISO 8601, UTC)
])


def runs_dir(journal_dir: str | Path) -> Path:
    return Path(journal_dir) / RUNS


def new_run_id(now: dt.datetime) -> str:
    """Sortable by start time, unique across hosts."""
    return f"send-{now.astimezone(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def start_run(journal_dir: str | Path, run_id: str, manifest: dict[str, Any]) -> Path:
    """Create the run's folder with its manifest (relay, start time): metadata, before any task runs."""
    folder = runs_dir(journal_dir) / run_id
    folder.mkdir(parents=True, exist_ok=False)
    _write_atomic(folder / MANIFEST, json.dumps(manifest, sort_keys=True))
    return folder


def read_manifest(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def pending_runs(journal_dir: str | Path) -> list[Path]:
    """Run folders not committed to ``deliveries`` yet (a crashed run, or this run before its commit),
    oldest first. Folders already committed (a crash between the commit and the clean-up) are removed."""
    root = runs_dir(journal_dir)
    if not root.is_dir():
        return []
    pending = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if (folder / COMMITTED).exists():
            shutil.rmtree(folder, ignore_errors=True)
        else:
            pending.append(folder)
    return pending


def mark_committed(folder: Path) -> None:
    """The run's lines are in ``deliveries``: mark the folder (so a crash now cannot commit it twice
    over a later state), then remove it."""
    _write_atomic(folder / COMMITTED, "")
    shutil.rmtree(folder, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + f".{uuid.uuid4().hex[:6]}.partial")
    with open(partial, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, path)


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.timezone.utc).isoformat()


# ---- executor side ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recorded:
    """What a run's journal already says about one message: ``state`` None means started, no end."""

    state: str | None
    code: int | None = None
    reason: str | None = None


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash: its message was not handed over
                if isinstance(entry, dict) and entry.get("m") is not None and entry.get("a") is not None:
                    yield entry
    except FileNotFoundError:
        return


class TaskJournal:
    """One task's journal file, and what the run's other files already recorded (replayed, not resent).

    Args:
        folder: the run's folder.
        partition, attempt: the Spark task's partition id and attempt number (they name the file).
        fsync: fsync each ``start`` line (a later ``end`` line is made durable by the next fsync or
            by :meth:`close`; losing it in a machine crash leaves the message ``unknown``, never resent).
    """

    def __init__(self, folder: Path, *, partition: int, attempt: int, fsync: bool) -> None:
        self.path = folder / f"part-{partition:05d}-{attempt}-{uuid.uuid4().hex[:6]}.jsonl"
        self.fsync = fsync
        self.recorded: dict[tuple[str, int], Recorded] = {}
        # Every file already there: Spark may run this partition again, or (if partitioning ever
        # changed between attempts) another task may have held some of these messages.
        for other in sorted(folder.glob("part-*.jsonl")):
            for entry in _lines(other):
                key = (entry["m"], int(entry["a"]))
                if entry.get("k") == END:
                    self.recorded[key] = Recorded(entry.get("s"), entry.get("c"), entry.get("x"))
                elif entry.get("k") == START:
                    self.recorded.setdefault(key, Recorded(None))
        self._fh = open(self.path, "a", encoding="utf-8")

    def started(self, message_id: str, attempt: int, at: dt.datetime) -> None:
        """Durable before the message's content is handed to the relay."""
        self._fh.write(json.dumps({"k": START, "m": message_id, "a": attempt, "t": _iso(at)}) + "\n")
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())

    def ended(self, message_id: str, attempt: int, at: dt.datetime, *, state: str, code: int | None = None,
              reply: str | None = None, reason: str | None = None, next_at: dt.datetime | None = None) -> None:
        entry = {"k": END, "m": message_id, "a": attempt, "t": _iso(at), "s": state, "c": code, "r": reply,
                 "x": reason, "n": _iso(next_at)}
        self._fh.write(json.dumps({k: v for k, v in entry.items() if v is not None}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()


# ---- driver side: the run lock --------------------------------------------------------------------

class SendLockedError(RuntimeError):
    """Another send run holds the lock."""


class RunLock:
    """At most one send run at a time per journal folder.

    The lock file names the owner (run id, host, pid) and a lease end. The owner renews the lease from
    a background thread every third of ``lease_seconds``. A lock is stale (taken over) when its lease
    ended or when its owner ran on this host and that process is gone (a killed run, found at once).
    """

    def __init__(self, journal_dir: str | Path, *, run_id: str, lease_seconds: float) -> None:
        self.path = Path(journal_dir) / LOCK
        self.run_id = run_id
        self.lease = lease_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _content(self) -> str:
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires": time.time() + self.lease})

    def _stale(self, held: dict[str, Any]) -> bool:
        if held.get("expires", 0) < time.time():
            return True
        if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
            try:
                os.kill(held["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    held = json.loads(self.path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    held = {}
                if held and not self._stale(held):
                    raise SendLockedError(
                        f"another send run ({held.get('run_id')}, pid {held.get('pid')} on {held.get('host')}) "
                        f"holds {self.path}; if it is dead, its lease ends within {self.lease:.0f}s") from None
                # Stale (or unreadable, e.g. cut short by a crash): take it over.
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(self._content())
            self._thread = threading.Thread(target=self._renew, name="inboxlift-send-lock", daemon=True)
            self._thread.start()
            return
        raise SendLockedError(f"could not take {self.path}: other runs keep taking it")

    def _renew(self) -> None:
        while not self._stop.wait(self.lease / 3):
            _write_atomic(self.path, self._content())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            held = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if held.get("run_id") == self.run_id:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
