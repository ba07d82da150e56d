"""Durable event files for ingest: JSON lines, group-committed, rotated by time and size (docs/serve.md).

One :class:`EventLog` per server process. Each event is one line of JSON. Lines go into a hidden
in-progress file, ``.<name>.jsonl`` (ingest's listing skips names starting with ``.``), and
:meth:`EventLog.append` returns only once its line is written and ``fdatasync``'d. When the file is
``rotate_seconds`` old, would grow past ``rotate_bytes``, or the server stops, it is renamed to
``<name>.jsonl``: from then on it never changes, so ingest, which knows a file by path, size and
modification time, reads it exactly once.

Group commit: requests that arrive while a batch is being synced are written together by the next
one, with one ``fdatasync`` for all of them, so throughput grows with concurrency instead of being
one sync per request. Up to ``syncs_in_flight`` batches (two by default) are synced at once: when the
disk is slower than the requests come, the next batch does not wait for the running sync but starts
its own as soon as it has as many events as the batch before it. When the disk keeps up, the batch
in flight finishes first and its successor simply goes next, so no sync is spent on a smaller batch.
Each slot has a descriptor of its own (an ``open`` of its own, not a ``dup``): Linux reports a
write-back error once per open file, so one shared descriptor could hand the error to the other
batch's ``fdatasync`` and let this one claim success. File work runs on the log's own threads, so the
event loop never waits on the disk. Choosing the file, rotating and renaming are done under a lock;
a batch is appended (``O_APPEND``: whole, never interleaved with another) and synced outside it, and a
file is renamed into place only once no batch on it is still being written or synced.

A killed server leaves its in-progress file behind. The writer holds an exclusive ``flock`` on its
file for as long as it is open (the kernel drops it when the process dies), so at start each
server finalises the hidden files nobody holds, and never a live sibling worker's. A line cut short
by the crash stays as it is: ingest quarantines it (``malformed_json``) and keeps every whole line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import fcntl
import logging
import os
import re
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

PREFIX = "serve-"
SUFFIX = ".jsonl"
_IN_PROGRESS = re.compile(r"\.serve-[A-Za-z0-9-]+\.jsonl")
# macOS has no fdatasync; fsync is the same guarantee there (and more work).
_datasync = getattr(os, "fdatasync", os.fsync)
# Linux (4.7+): a write that is also an fdatasync of what it wrote.
_RWF_DSYNC = getattr(os, "RWF_DSYNC", 0) if hasattr(os, "pwritev") and os.uname().sysname == "Linux" else 0


class EventLogError(RuntimeError):
    """An event could not be made durable (the disk is full, the folder is gone...)."""


def writer_id() -> str:
    """This process's part of the file names: host, pid and a random tag (pids are reused)."""
    host = re.sub(r"[^A-Za-z0-9]+", "-", socket.gethostname()).strip("-")[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def _sync_folder(folder: Path) -> None:
    """Make a file's creation or renaming in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finalise_leftovers(folder: Path) -> list[Path]:
    """Rename in-progress files whose writer is gone into place; returns the files renamed.

    A file is a leftover when its ``flock`` can be taken: a live writer holds it. An empty
    leftover (the writer died between creating it and writing) is removed.
    """
    done: list[Path] = []
    if not folder.is_dir():
        return done
    for path in sorted(folder.iterdir()):
        if not _IN_PROGRESS.fullmatch(path.name):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # its writer renamed it meanwhile
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live writer's file
                continue
            final = path.with_name(path.name[1:])
            try:
                if os.fstat(fd).st_size == 0:
                    path.unlink()
                else:
                    os.rename(path, final)
                    done.append(final)
            except FileNotFoundError:  # renamed by its writer between our open and our lock
                continue
        finally:
            os.close(fd)
    if done:
        _sync_folder(folder)
    return done


class _File:
    """An in-progress event file: one descriptor per sync slot, its size, and the syncs running on it."""

    __slots__ = ("path", "fds", "size", "opened_at", "syncing", "retired")

    def __init__(self, path: Path, fds: list[int], opened_at: float) -> None:
        self.path, self.fds, self.opened_at = path, fds, opened_at
        self.size = 0
        self.syncing = 0
        self.retired = False


def _append_durably(fd: int, data: bytes) -> None:
    """Append ``data`` through ``fd`` (opened with ``O_APPEND``) and return once it is on disk.

    On Linux one ``pwritev2(RWF_DSYNC)`` call does both (the same work as ``write`` then
    ``fdatasync``, one system call less); elsewhere ``write`` then ``fdatasync`` (``fsync`` on macOS).
    """
    view = memoryview(data)
    if _RWF_DSYNC:
        while view:  # offset -1: at the file position, which O_APPEND makes the end
            view = view[os.pwritev(fd, [view], -1, _RWF_DSYNC):]
        return
    while view:
        view = view[os.write(fd, view):]
    _datasync(fd)


class EventLog:
    """Appends event lines durably to rotated files in ``folder`` (see the module docstring).

    Args:
        folder: created if missing.
        rotate_seconds, rotate_bytes: when an in-progress file is closed and renamed into place.
        now: the wall clock, for file names (UTC).
        monotonic: for the age of files.
        syncs_in_flight: batches synced at once (1: one after the other).
    """

    def __init__(self, folder: Path, *, rotate_seconds: float, rotate_bytes: int,
                 now: Callable[[], dt.datetime], monotonic: Callable[[], float] = time.monotonic,
                 syncs_in_flight: int = 2) -> None:
        if syncs_in_flight < 1:
            raise ValueError("syncs_in_flight must be 1 or more")
        self.folder = folder
        self.rotate_seconds = rotate_seconds
        self.rotate_bytes = rotate_bytes
        self.syncs_in_flight = syncs_in_flight
        self._now = now
        self._monotonic = monotonic
        self._writer = writer_id()
        self._sequence = 0
        # Thread side (under _lock): the file being appended to.
        self._lock = threading.Lock()
        self._file: _File | None = None
        # Loop side: lines waiting for a free slot, and the slots (descriptor indexes) not syncing.
        self._pending: list[bytes] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._free_slots = list(range(syncs_in_flight))
        self._launch_due = False
        self._last_batch = 0
        self.events_written = 0
        self.syncs = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.failure: str | None = None
        self.files_written = 0

    # ---- life cycle (the server's lifespan) -------------------------------------------------

    async def start(self) -> list[Path]:
        """Create the folder, finalise leftovers of killed servers, start the rotation timer."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._loop = asyncio.get_running_loop()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=self.syncs_in_flight,
                                                               thread_name_prefix="event-log")
        recovered = await self._in_thread(finalise_leftovers, self.folder)
        if recovered:
            log.warning("finalised %d event file(s) left by a stopped server: %s", len(recovered),
                        ", ".join(p.name for p in recovered))
        self._ticker = self._loop.create_task(self._tick())
        return recovered

    async def close(self) -> None:
        """Write what is pending, rename the current file into place, stop the threads."""
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass
        while self._pending or len(self._free_slots) < self.syncs_in_flight:
            if self._pending and self._free_slots:
                self._launch()
            await asyncio.sleep(0.001)
        if self._executor is not None:
            await self._in_thread(self._close_file)
            self._executor.shutdown(wait=True)
            self._executor = None
        log.info("event log closed: %d event(s) in %d sync(s)", self.events_written, self.syncs)

    # ---- appending --------------------------------------------------------------------------

    async def append(self, line: bytes) -> None:
        """Return once ``line`` (one JSON object, ending with a newline) is on disk.

        Raises:
            EventLogError: it could not be written and synced; nothing is promised for it.
        """
        if self._executor is None:
            raise EventLogError("the event log is not started")
        waiter = self._loop.create_future()  # type: ignore[union-attr]
        self._pending.append(line)
        self._waiters.append(waiter)
        if not self._launch_due and self._batch_is_due():
            # After the callbacks already queued: requests read in the same turn of the loop join.
            self._launch_due = True
            self._loop.call_soon(self._launch)  # type: ignore[union-attr]
        await waiter

    def _batch_is_due(self) -> bool:
        """A slot is free, and either no sync is running or the pending batch is as large as the
        last one launched (waiting longer would only make a sync beside it smaller)."""
        free = len(self._free_slots)
        return bool(free) and (free == self.syncs_in_flight or len(self._pending) >= self._last_batch)

    def _launch(self) -> None:
        """Hand what is pending to a free slot's thread, as one batch."""
        self._launch_due = False
        if not self._pending or not self._free_slots:
            return
        slot = self._free_slots.pop()
        lines, waiters = self._pending, self._waiters
        self._pending, self._waiters = [], []
        self._last_batch = len(lines)
        try:
            if self._executor is None:  # appended while the log was closing
                raise RuntimeError("the event log is closed")
            done = self._loop.run_in_executor(self._executor, self._commit, slot, b"".join(lines))  # type: ignore[union-attr]
        except RuntimeError as exc:  # the executor is shutting down
            self._free_slots.append(slot)
            self._answer(waiters, exc)
            return
        done.add_done_callback(lambda future: self._committed(slot, waiters, future))

    def _committed(self, slot: int, waiters: list[asyncio.Future[None]], future: asyncio.Future[None]) -> None:
        self._free_slots.append(slot)
        error = future.exception() if not future.cancelled() else RuntimeError("the sync was cancelled")
        if error is None:
            self.syncs += 1
            self.events_written += len(waiters)
        self._answer(waiters, error)
        # What arrived while this batch was syncing is the next batch: now, unless another sync is
        # still running and the pending batch is smaller than the last (it grows while that one runs).
        if self._pending and not self._launch_due and self._batch_is_due():
            self._launch()

    def _answer(self, waiters: list[asyncio.Future[None]], error: BaseException | None) -> None:
        if error is None:
            self.failure = None
            for waiter in waiters:
                # A request cancelled meanwhile (client gone) has its event written all the same.
                if not waiter.done():
                    waiter.set_result(None)
            return
        self.failure = f"{type(error).__name__}: {error}"
        log.error("event file write failed: %s", self.failure)
        failed = EventLogError(self.failure)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(failed)

    async def _tick(self) -> None:
        """Rotate an idle file that has grown old, so its events reach ingest without new traffic."""
        period = min(1.0, self.rotate_seconds / 4)
        while True:
            await asyncio.sleep(period)
            try:
                await self._in_thread(self._rotate_if_due)
            except OSError as exc:
                self.failure = f"{type(exc).__name__}: {exc}"
                log.error("event file rotation failed: %s", self.failure)

    async def _in_thread(self, fn, *args):
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ---- file work (on the log's threads) ---------------------------------------------------

    def _is_due(self, file: _File, incoming: int) -> bool:
        too_old = self._monotonic() - file.opened_at >= self.rotate_seconds
        too_big = file.size > 0 and file.size + incoming > self.rotate_bytes
        return too_old or too_big

    def _rotate_if_due(self) -> None:
        with self._lock:
            if self._file is not None and self._is_due(self._file, 0):
                self._retire(self._file)

    def _close_file(self) -> None:
        with self._lock:
            if self._file is not None:
                self._retire(self._file)

    def _commit(self, slot: int, data: bytes) -> None:
        """Append ``data`` to the current file through ``slot``'s descriptor and sync it."""
        with self._lock:
            if self._file is not None and self._is_due(self._file, len(data)):
                self._retire(self._file)
            if self._file is None:
                self._file = self._open()
            file = self._file
            # Counted before it is written, so a batch beside this one rotates on the size with it.
            file.size += len(data)
            file.syncing += 1
        failed = True
        try:
            _append_durably(file.fds[slot], data)
            failed = False
        finally:
            with self._lock:
                file.syncing -= 1
                if failed:
                    # The file may end with part of this batch now: close it as it is (ingest
                    # quarantines a torn line) and start a fresh one with the next batch.
                    self._retire(file, safely=True)
                elif file.retired and not file.syncing:
                    self._finalise(file, safely=True)

    def _open(self) -> _File:
        self._sequence += 1
        stamp = self._now().astimezone(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        name = f"{PREFIX}{stamp}-{self._writer}-{self._sequence:06d}{SUFFIX}"
        path = self.folder / f".{name}"
        fds = [os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)]
        try:
            fcntl.flock(fds[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
            while len(fds) < self.syncs_in_flight:
                fds.append(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))
            _sync_folder(self.folder)
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return _File(path, fds, self._monotonic())

    def _retire(self, file: _File, *, safely: bool = False) -> None:
        """No more writes to ``file``: the next batch opens a new one. It is renamed into place now,
        or by the last of its syncs still running."""
        file.retired = True
        if self._file is file:
            self._file = None
        if not file.syncing:
            self._finalise(file, safely=safely)

    def _finalise(self, file: _File, *, safely: bool = False) -> None:
        """Rename ``file`` into place (still holding its lock), make that durable, close it."""
        if not file.fds:
            return
        fds, file.fds = file.fds, []
        try:
            if os.fstat(fds[0]).st_size:  # not file.size: a failed batch may have written nothing
                os.rename(file.path, file.path.with_name(file.path.name[1:]))
                self.files_written += 1
            else:
                file.path.unlink()
            _sync_folder(self.folder)
        except OSError as exc:
            if not safely:
                raise
            log.error("could not close a failed event file (the next start finalises it): %s", exc)
        finally:
            for fd in fds:
                os.close(fd)
