"""Consent changes during a send run, as the tasks see them (README "Sending").

A run selects its messages with the suppressions as they stand then
(:func:`inboxlift.pending_consent.suppressions_now`), and sending them takes hours at a relay's
rate: 1M messages at 50 per second is five and a half. A person who unsubscribes from yesterday's
email at noon must not get today's at three. So each send task watches the tracking service's event
files (``serve.events_dir``, the files in progress included) for consent events written since the
selection, every ``delivery.consent_recheck_seconds``, reading only the bytes added since its last
look. A message whose user has such an event of any kind (an unsubscribe, a resubscribe, a
preference change, a complaint) is not sent: it is deferred untried (``consent_changed``, not counted
towards ``max_attempts``, due again at once) and the next run's selection decides by the consent
rule, with the event read by then. The watch only holds messages back; it never lets one through.

The selection's own read lists the finished files only, so the watch starts a margin before it
(``serve.rotate_seconds`` plus a minute): a consent event the selection already applied may hold a
message back once more, which costs that message one run and nothing else. The folder keeps every
file the service ever wrote; a file whose name says it was opened long enough before is passed over
without a ``stat`` (a service file is written for ``serve.rotate_seconds`` at most).

Plain Python on the executors (a POSIX path: local, or a mounted volume such as ``/Volumes`` or
``/dbfs``, as the journal's folder); :func:`watch_folder` says whether the folder is one.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlparse

from inboxlift.consent import CONSENT_EVENT_TYPES
from inboxlift.stages.ingest_sources import LANDING_SUFFIXES

# A line naming a consent event type; only those lines are parsed as JSON (most lines are clicks and opens).
_CONSENT_LINE = re.compile(
    rb'^[^\n]*"event_type"\s*:\s*"(?:' + b"|".join(t.encode() for t in CONSENT_EVENT_TYPES) + rb')"[^\n]*$',
    re.MULTILINE)
# The event file names ingest reads, but compressed ones: the service writes plain JSON lines.
_SUFFIXES = tuple(s for s in LANDING_SUFFIXES["events"] if not s.endswith(".gz"))
# The service's file names start with the UTC time the file was opened (service.events).
_SERVICE_NAME = re.compile(r"\.?serve-(\d{8}T\d{6}Z)-")


def _opened_at(name: str) -> float:
    """When a service file was opened, by its name (epoch seconds); infinity for another name."""
    match = _SERVICE_NAME.match(name)
    if match is None:
        return float("inf")
    opened = dt.datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
    return opened.timestamp()


def watch_folder(folder: str) -> str | None:
    """``folder`` as a local path the executors can read with Python, or None (an object store URI)."""
    parsed = urlparse(folder)
    if parsed.scheme == "file":
        return parsed.path
    if parsed.scheme == "" and not folder.startswith("dbfs:"):
        return folder
    return None


@dataclass(frozen=True)
class WatchPlan:
    """What a task needs to watch: small and picklable."""

    folder: str
    # Files last modified before this (epoch seconds) are not read; events before ``since`` are ignored.
    since_file_time: float
    since: dt.datetime
    every_seconds: float
    # A service file named as opened before this (epoch seconds) was finished before
    # ``since_file_time``: it is passed over by its name, without a stat (the folder keeps every file).
    opened_before: float = 0.0


@dataclass
class ConsentWatch:
    """One task's view of the consent events written since the run's selection."""

    plan: WatchPlan
    monotonic: Callable[[], float] = time.monotonic
    # Users with a consent event since ``plan.since``.
    users: set[str] = field(default_factory=set)
    _read_to: dict[str, int] = field(default_factory=dict)
    _looked_at: float | None = None

    def holds(self, user_id: str | None) -> bool:
        """True when the user has a consent event since the selection (re-read when due)."""
        now = self.monotonic()
        if self._looked_at is None or now - self._looked_at >= self.plan.every_seconds:
            self.refresh()
            self._looked_at = now
        return user_id is not None and user_id in self.users

    def refresh(self) -> None:
        """Read what the service's files gained since the last look."""
        try:
            entries = list(os.scandir(self.plan.folder))
        except FileNotFoundError:
            return
        for entry in entries:
            # The service's in-progress files are hidden (".serve-...jsonl"): read them too.
            if not entry.name.endswith(_SUFFIXES) or _opened_at(entry.name) < self.plan.opened_before:
                continue
            try:
                stat = entry.stat()
            except FileNotFoundError:   # renamed or removed since the listing
                continue
            start = self._read_to.get(entry.name, 0)
            if stat.st_mtime < self.plan.since_file_time or stat.st_size <= start:
                continue
            try:
                with open(entry.path, "rb") as f:
                    f.seek(start)
                    data = f.read(stat.st_size - start)
            except FileNotFoundError:
                continue
            # Whole lines only: a line still being written is read on a later look.
            whole = data.rfind(b"\n") + 1
            self._read_to[entry.name] = start + whole
            for match in _CONSENT_LINE.finditer(data, 0, whole):
                self._add(match.group(0))

    def _add(self, line: bytes) -> None:
        try:
            record = json.loads(line)
            user_id, at = record.get("user_id"), dt.datetime.fromisoformat(record.get("event_ts") or "")
        except (ValueError, TypeError, AttributeError):
            return   # ingest quarantines it; it changes nobody's consent
        if at.tzinfo is None:
            at = at.replace(tzinfo=dt.timezone.utc)
        if isinstance(user_id, str) and user_id and at >= self.plan.since:
            self.users.add(user_id)
