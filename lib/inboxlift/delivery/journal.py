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
lease the owner renews (in the lock and in its run's folder, ``lease.json``); a lock whose owner
process on this host is gone, or (another host) whose lease ran out, belongs to a dead run and is
taken over. A run that finds its lease lost stops: its tasks send no further message and it commits
nothing. A run folder is committed by another run only once its own lease is over.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
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

log = logging.getLogger(__name__)

RUNS = "runs"
LOCK = "send.lock"
COMMITTED = "_COMMITTED"
MANIFEST = "run.json"
LEASE = "lease.json"
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


def start_run(journal_dir: str | Path, run_id: str, manifest: dict[str, Any], *, lock: "RunLock") -> Path:
    """Create the run's folder with its lease (renewed with ``lock`` from now on) and its manifest
    (relay, start time): metadata, before any task runs."""
    folder = runs_dir(journal_dir) / run_id
    folder.mkdir(parents=True, exist_ok=False)
    lock.keep(folder)
    _write_atomic(folder / MANIFEST, json.dumps(manifest, sort_keys=True))
    return folder


def read_manifest(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def pending_runs(journal_dir: str | Path, *, lease_seconds: float) -> list[Path]:
    """Run folders of ended runs not committed to ``deliveries`` yet (a crashed run), oldest first.
    Folders already committed (a crash between the commit and the clean-up) are removed.

    Raises:
        SendLockedError: a folder's run still holds its lease: it may be sending, and this run must
            neither commit its folder (lines are still coming) nor send beside it.
    """
    root = runs_dir(journal_dir)
    if not root.is_dir():
        return []
    pending = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        live = _live_owner(folder, lease_seconds)
        if live is not None:
            raise SendLockedError(f"send run {folder.name} is still sending ({live}); its folder {folder} is "
                                  f"committed once its lease ends (within {lease_seconds:.0f}s of its last renewal)")
        if (folder / COMMITTED).exists():
            shutil.rmtree(folder, ignore_errors=True)
        else:
            pending.append(folder)
    return pending


def _live_owner(folder: Path, lease_seconds: float) -> str | None:
    """Who still holds ``folder``'s lease (None: its run ended, or died).

    The lease is over when its time ran out, the run released it, or its process on this host is
    gone. A folder without a lease file (a run between creating its folder and writing its lease, or
    one written by an earlier release) counts as held until the folder is a lease old."""
    seen = _look(folder / LEASE)
    if seen is None:
        try:
            age = time.time() - folder.stat().st_mtime
        except FileNotFoundError:
            return None
        return None if age > lease_seconds else "its folder is new and has no lease yet"
    stat, held = seen
    if not held:
        return None if time.time() - stat.st_mtime > lease_seconds else "its lease is being written"
    if _owner_gone(held) or held["expires"] < time.time():
        return None
    return f"pid {held.get('pid')} on {held.get('host')}, lease until {_when(held['expires'])}"


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


def _when(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="seconds")


def _look(path: Path) -> tuple[os.stat_result, dict[str, Any]] | None:
    """A lock or lease file's stat and owner (an empty dict when empty or unreadable); None when absent.
    The stat is the open file's, so it belongs to the content read."""
    try:
        with open(path, "rb") as fh:
            stat, raw = os.fstat(fh.fileno()), fh.read()
    except FileNotFoundError:
        return None
    try:
        held = json.loads(raw.decode("utf-8"))
    except ValueError:
        held = None
    if not isinstance(held, dict) or not isinstance(held.get("expires"), (int, float)):
        held = {}
    return stat, held


def _owner_gone(held: dict[str, Any]) -> bool:
    """The owner ran on this host and its process is gone."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def lease_ended(folder: Path, run_id: str) -> str | None:
    """Why run ``run_id`` may send no more into its ``folder``: its lease there ran out, was released,
    or names another run. None while it holds. Read by the send tasks (any host, the shared folder)."""
    seen = _look(folder / LEASE)
    if seen is None:
        return f"its lease file {folder / LEASE} is gone"
    held = seen[1]
    if not held:
        return None   # written atomically: unreadable only on a read error, not a lost lease
    if held.get("run_id") != run_id:
        return f"{folder / LEASE} names run {held.get('run_id')}"
    if held.get("lost"):
        return f"it lost the send lock: {held['lost']}"
    if held["expires"] < time.time():
        return f"its lease ended at {_when(held['expires'])}"
    return None


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


class LeaseLostError(SendLockedError):
    """This run's lease ended or was taken over: it must send and commit nothing more."""


class RunLock:
    """At most one send run at a time per journal folder.

    The lock file names the owner (run id, host, pid) and a lease end. It is created with its content
    in one step (a written temporary file hard-linked to the lock's name, which fails when the name
    exists), so a competitor never reads a half-written lock. The owner renews the lease from a
    background thread every third of ``lease_seconds``, after checking the lock still names it; a
    failed renewal is retried, and a lease that ran out or was taken over is *lost*: :meth:`check`
    raises from then on and the run's tasks stop (its folder's lease, :meth:`keep`, is renewed with
    the lock and no longer).

    A lock is stale (taken over) when its owner ran on this host and that process is gone (a killed
    run, found at once), or, for an owner elsewhere, when its lease ended. A live owner on this host
    keeps its lock whatever its lease says: it gives the lock up itself when it cannot renew. An empty
    or unreadable lock is being written (or was cut short by a crash): held until it is a lease old.
    """

    def __init__(self, journal_dir: str | Path, *, run_id: str, lease_seconds: float) -> None:
        self.path = Path(journal_dir) / LOCK
        self.run_id = run_id
        self.lease = lease_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._folders: list[Path] = []
        # Guards _folders and their lease files between the renewal thread and the run.
        self._folders_lock = threading.Lock()
        self._expires = 0.0
        self._lost: str | None = None

    def _content(self, expires: float) -> str:
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires": expires})

    def _stale(self, held: dict[str, Any], stat: os.stat_result) -> bool:
        if not held:
            return stat.st_mtime + self.lease < time.time()
        if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
            # Its process decides, not the lease: a live owner here is not taken over (it gives the
            # lock up itself when it cannot renew), a dead one is, at once.
            return _owner_gone(held)
        return held["expires"] < time.time()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._thread = threading.Thread(target=self._renew, name="inboxlift-send-lock", daemon=True)
                self._thread.start()
                return
            seen = _look(self.path)
            if seen is None:
                continue   # released between the two looks
            stat, held = seen
            if not self._stale(held, stat):
                who = (f"{held.get('run_id')}, pid {held.get('pid')} on {held.get('host')}" if held
                       else "its lock is being written")
                raise SendLockedError(
                    f"another send run ({who}) holds {self.path}; if it is dead, its lease ends within "
                    f"{self.lease:.0f}s") from None
            self._take_over(stat)
        raise SendLockedError(f"could not take {self.path}: other runs keep taking it")

    def _create(self) -> bool:
        """The lock, created with its content; False when it exists."""
        expires = time.time() + self.lease
        partial = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex[:8]}.partial")
        _write_atomic(partial, self._content(expires))
        try:
            os.link(partial, self.path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS):
                raise
            # A file system without hard links (some cloud mounts): create, then write. The lock is
            # empty in between; a competitor counts an empty lock as held, so that is still safe.
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(self._content(expires))
        finally:
            partial.unlink(missing_ok=True)
        self._expires = expires
        return True

    def _take_over(self, judged: os.stat_result) -> None:
        """Remove the stale lock judged from ``judged``, and only it: it is moved aside first, and put
        back when it turns out to be another one (a run took or renewed the lock meanwhile)."""
        aside = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex[:8]}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            now = os.stat(aside)
            if (now.st_ino, now.st_mtime_ns, now.st_size) != (judged.st_ino, judged.st_mtime_ns, judged.st_size):
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass   # a third run took the name meanwhile; the one moved aside finds its lock lost
        finally:
            aside.unlink(missing_ok=True)

    def keep(self, folder: Path) -> None:
        """Hold a lease on the run's ``folder`` too, renewed with the lock's (see :func:`pending_runs`)."""
        with self._folders_lock:
            _write_atomic(folder / LEASE, self._content(self._expires))
            self._folders.append(folder)

    def end(self, folder: Path) -> None:
        """The run's tasks are done with ``folder``: its lease ends now (a run holding the lock may commit
        it), and it is no longer renewed (its commit removes it)."""
        with self._folders_lock:
            if folder in self._folders:
                self._folders.remove(folder)
            _write_atomic(folder / LEASE, self._content(0))

    @property
    def lost(self) -> str | None:
        """Why the lease was lost; None while this run holds it."""
        return self._lost

    def check(self) -> None:
        """Raise :class:`LeaseLostError` when the lease was lost: the run must send and commit nothing more."""
        if self._lost is not None:
            raise LeaseLostError(f"run {self.run_id} lost the send lock {self.path} ({self._lost}): it sends and "
                                 "commits nothing more; the next run commits its journal")

    def _renew(self) -> None:
        wait = self.lease / 3
        while not self._stop.wait(wait):
            if time.time() >= self._expires:
                self._lose(f"its lease ended at {_when(self._expires)} before it could be renewed")
                return
            try:
                seen = _look(self.path)
                if seen is None or seen[1].get("run_id") != self.run_id:
                    holder = "the lock file is gone" if seen is None else f"run {seen[1].get('run_id')} holds it"
                    self._lose(holder)
                    return
                expires = time.time() + self.lease
                text = self._content(expires)
                _write_atomic(self.path, text)
                self._expires = expires
                with self._folders_lock:
                    for folder in self._folders:
                        _write_atomic(folder / LEASE, text)
            except OSError as exc:
                # A passing storage error: try again soon; the lease lasts until self._expires.
                log.warning("send lock %s: renewal failed (%s); retrying", self.path, exc)
                wait = min(self.lease / 3, max(self.lease / 30, 0.05))
                continue
            wait = self.lease / 3

    def _lose(self, why: str) -> None:
        self._lost = why
        log.error("send run %s lost the send lock %s: %s", self.run_id, self.path, why)
        # Tell the tasks now (they stop at their next message). The lease's end stays as it was: the
        # run holding the lock now waits for it before it commits this run's folder.
        held = {**json.loads(self._content(self._expires)), "lost": why}
        with self._folders_lock:
            for folder in self._folders:
                try:
                    _write_atomic(folder / LEASE, json.dumps(held))
                except OSError as exc:
                    log.warning("send run %s: could not mark %s lost (%s); its tasks stop at %s", self.run_id,
                                folder, exc, _when(self._expires))

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        # The run's tasks have ended: its folder is the next run's to commit.
        for folder in self._folders:
            try:
                _write_atomic(folder / LEASE, self._content(0))
            except OSError as exc:
                log.warning("send run %s: could not release the lease of %s (%s); it ends at %s", self.run_id,
                            folder, exc, _when(self._expires))
        seen = _look(self.path)
        if seen is not None and seen[1].get("run_id") == self.run_id:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
