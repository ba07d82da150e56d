"""Durable event files for ingest: JSON lines, group-committed, rotated by time and size (docs/serve.md).

One :class:`EventLog` per server process. Each event is one line of JSON. Lines go into a hidden
in-progress file, ``.<name>.jsonl`` (ingest's listing skips names starting with ``.``), and
:meth:`EventLog.append` returns only once its line is written and ``fdatasync``'d. When the file is
``rotate_seconds`` old, would grow past ``rotate_bytes``, or the server stops, it is renamed to
``<name>.jsonl``: from then on it never changes, so ingest, which knows a file by path, size and
modification time, reads it exactly once.

Group commit: requests that arrive while a write is under way are written together by the next
one, with one ``fdatasync`` for all of them, so throughput grows with concurrency instead of being
one sync per request. The file work runs on one thread of its own, in order, so the event loop never
waits on the disk and writes, rotations and the final rename never interleave.

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
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

PREFIX = "serve-"
SUFFIX = ".jsonl"
_IN_PROGRESS = re.compile(r"\.serve-[A-Za-z0-9-]+\.jsonl")
# macOS has no fdatasync; fsync is the same guarantee there (and more work).
_datasync = getattr(os, "fdatasync", os.fsync)


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


class EventLog:
    """Appends event lines durably to rotated files in ``folder`` (see the module docstring).

    Args:
        folder: created if missing.
        rotate_seconds, rotate_bytes: when an in-progress file is closed and renamed into place.
        now: the wall clock, for file names (UTC).
        monotonic: for the age of files.
    """

    def __init__(self, folder: Path, *, rotate_seconds: float, rotate_bytes: int,
                 now: Callable[[], dt.datetime], monotonic: Callable[[], float] = time.monotonic) -> None:
        self.folder = folder
        self.rotate_seconds = rotate_seconds
        self.rotate_bytes = rotate_bytes
        self._now = now
        self._monotonic = monotonic
        self._writer = writer_id()
        self._sequence = 0
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._opened_at = 0.0
        self._pending: list[bytes] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._flushing = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.failure: str | None = None
        self.files_written = 0

    # ---- life cycle (the server's lifespan) -------------------------------------------------

    async def start(self) -> list[Path]:
        """Create the folder, finalise leftovers of killed servers, start the rotation timer."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="event-log")
        recovered = await self._in_thread(finalise_leftovers, self.folder)
        if recovered:
            log.warning("finalised %d event file(s) left by a stopped server: %s", len(recovered),
                        ", ".join(p.name for p in recovered))
        self._ticker = asyncio.get_running_loop().create_task(self._tick())
        return recovered

    async def close(self) -> None:
        """Write what is pending, rename the current file into place, stop the thread."""
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass
        while self._flushing or self._pending:
            if self._flushing:
                await asyncio.sleep(0.001)
            else:
                await self._flush()
        if self._executor is not None:
            await self._in_thread(self._finalise)
            self._executor.shutdown(wait=True)
            self._executor = None

    # ---- appending --------------------------------------------------------------------------

    async def append(self, line: bytes) -> None:
        """Return once ``line`` (one JSON object, ending with a newline) is on disk.

        Raises:
            EventLogError: it could not be written and synced; nothing is promised for it.
        """
        if self._executor is None:
            raise EventLogError("the event log is not started")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._pending.append(line)
        self._waiters.append(waiter)
        if not self._flushing:
            loop.create_task(self._flush())
        await waiter

    async def _flush(self) -> None:
        if self._flushing:
            return
        self._flushing = True
        try:
            # Whatever arrived while the previous batch was syncing is the next batch.
            while self._pending:
                lines, waiters = self._pending, self._waiters
                self._pending, self._waiters = [], []
                try:
                    await self._in_thread(self._write, b"".join(lines))
                except (OSError, RuntimeError) as exc:  # RuntimeError: the thread is gone (shutting down)
                    self.failure = f"{type(exc).__name__}: {exc}"
                    log.error("event file write failed: %s", self.failure)
                    error = EventLogError(self.failure)
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_exception(error)
                    continue
                self.failure = None
                for waiter in waiters:
                    # A request cancelled meanwhile (client gone) has its event written all the same.
                    if not waiter.done():
                        waiter.set_result(None)
        finally:
            self._flushing = False

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

    # ---- file work (on the log's own thread) ------------------------------------------------

    def _is_due(self, incoming: int) -> bool:
        if self._fd is None:
            return False
        too_old = self._monotonic() - self._opened_at >= self.rotate_seconds
        too_big = self._size > 0 and self._size + incoming > self.rotate_bytes
        return too_old or too_big

    def _rotate_if_due(self) -> None:
        if self._is_due(0):
            self._finalise()

    def _write(self, data: bytes) -> None:
        if self._is_due(len(data)):
            self._finalise()
        if self._fd is None:
            self._open()
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            _datasync(self._fd)
        except OSError:
            # The file may end with part of this batch now: close it as it is (ingest quarantines a
            # torn line) and start a fresh one with the next write.
            self._size += len(data) - len(view)
            self._safe_finalise()
            raise
        self._size += len(data)

    def _open(self) -> None:
        self._sequence += 1
        stamp = self._now().astimezone(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        name = f"{PREFIX}{stamp}-{self._writer}-{self._sequence:06d}{SUFFIX}"
        path = self.folder / f".{name}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _sync_folder(self.folder)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._path, self._size, self._opened_at = fd, path, 0, self._monotonic()

    def _finalise(self) -> None:
        """Rename the current file into place (still holding its lock), make that durable, close it."""
        if self._fd is None or self._path is None:
            return
        fd, path = self._fd, self._path
        self._fd, self._path = None, None
        try:
            if self._size:
                os.rename(path, path.with_name(path.name[1:]))
                self.files_written += 1
            else:
                path.unlink()
            _sync_folder(self.folder)
        finally:
            os.close(fd)

    def _safe_finalise(self) -> None:
        try:
            self._finalise()
        except OSError as exc:
            log.error("could not close a failed event file (the next start finalises it): %s", exc)
