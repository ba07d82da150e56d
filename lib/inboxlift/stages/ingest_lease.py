"""One ingest at a time per lake: a lease in the ``ingest_lease`` table, taken by a Delta transaction.

The table holds one row: ``resource, sequence, owner, acquired_at, renewed_at,
expires_at, released_at``. Every change of the lease (take, renew, release)
rewrites that row with ``sequence + 1`` and carries the Delta transaction id
``WriteId("ingest:lease", sequence + 1)``. Two runs that read the same row and
both try to write the next sequence cannot both win: the second write is either
skipped (the table already holds that transaction id) or refused by Delta's
conflict check (a concurrent commit with the same application id), and in both
cases the loser reads who holds the lease and raises :class:`ConcurrentIngestError`.

A holder renews the lease every third of ``ingest.lease_minutes`` from a
background thread; a run that died (``kill -9``, a lost machine) stops renewing,
and once its lease has expired the next run takes it over. A holder that finds
its lease taken over (it stalled past the expiry) stops at its next step with
:class:`LeaseLostError`. See docs/ingest.md ("One ingest at a time").
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
from dataclasses import dataclass

from pyspark.sql.types import LongType, StringType, StructField, StructType, TimestampType

from inboxlift.context import RunContext
from inboxlift.storage import ConcurrentWriteError, WriteId

LEASE_TABLE = "ingest_lease"
# The lease covers everything ingest keeps per lake: batch numbers, ingest_files, ingest_runs.
RESOURCE = "ingest"
_APP_ID = "ingest:lease"

LEASE_SCHEMA = StructType([
    StructField("resource", StringType()),
    StructField("sequence", LongType()),
    StructField("owner", StringType()),
    StructField("acquired_at", TimestampType()),
    StructField("renewed_at", TimestampType()),
    StructField("expires_at", TimestampType()),
    StructField("released_at", TimestampType()),
])


class ConcurrentIngestError(RuntimeError):
    """Another ingest or import holds this lake's ingest lease; this run did nothing."""


class LeaseLostError(ConcurrentIngestError):
    """This run's lease expired and another run took it over; this run stopped."""


@dataclass(frozen=True)
class LeaseState:
    sequence: int
    owner: str | None
    acquired_at: dt.datetime | None
    renewed_at: dt.datetime | None
    expires_at: dt.datetime | None
    released_at: dt.datetime | None

    def is_held_at(self, now: dt.datetime) -> bool:
        return self.owner is not None and self.released_at is None and self.expires_at is not None \
            and self.expires_at > now

    def describe(self) -> str:
        return (f"{self.owner} holds it since {_utc(self.acquired_at)} (last renewed {_utc(self.renewed_at)}) "
                f"until {_utc(self.expires_at)}")


def owner_name(run_id: str) -> str:
    """Who a lease row names: the run, its host and process, so a person can find it."""
    return f"{run_id} on {socket.gethostname()} (pid {os.getpid()})"


def _utc(value: dt.datetime | None) -> str:
    if value is None:
        return "-"
    return _aware(value).strftime("%Y-%m-%d %H:%M:%S UTC")


def _aware(value: dt.datetime) -> dt.datetime:
    # Spark hands timestamps back as naive datetimes in the session time zone, which is UTC here.
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)


def read_lease(ctx: RunContext) -> LeaseState | None:
    """The lease row, or None before any ingest took it."""
    if not ctx.lake.exists(LEASE_TABLE):
        return None
    # One row.
    rows = ctx.lake.read(LEASE_TABLE).where(f"resource = '{RESOURCE}'").collect()
    if not rows:
        return None
    row = max(rows, key=lambda r: r.sequence)
    stamps = {name: _aware(row[name]) if row[name] is not None else None
              for name in ("acquired_at", "renewed_at", "expires_at", "released_at")}
    return LeaseState(int(row.sequence), row.owner, **stamps)


class IngestLease:
    """A held lease: renew it, check it, release it. Made by :meth:`acquire`."""

    def __init__(self, ctx: RunContext, *, owner: str, state: LeaseState, taken_over: LeaseState | None) -> None:
        self._ctx = ctx
        self.owner = owner
        self.state = state
        # The expired lease of a run that died, when this one took it over (for the report).
        self.taken_over = taken_over
        self._lost: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def minutes(self) -> int:
        return max(1, self._ctx.settings.ingest.lease_minutes)

    @classmethod
    def acquire(cls, ctx: RunContext, *, owner: str) -> "IngestLease":
        """Take the lake's ingest lease, or raise :class:`ConcurrentIngestError` naming its holder.

        A released or expired lease is taken; a lease held by someone else until later is not.
        """
        now = ctx.clock.now()
        current = read_lease(ctx)
        if current is not None and current.is_held_at(now) and current.owner != owner:
            raise ConcurrentIngestError(_busy_message(current))
        lease = cls(ctx, owner=owner, state=current or LeaseState(0, None, None, None, None, None),
                    taken_over=current if current is not None and current.owner is not None
                    and current.released_at is None else None)
        expires = now + dt.timedelta(minutes=lease.minutes)
        lease._write(LeaseState(lease.state.sequence + 1, owner, now, now, expires, None), taking=True)
        return lease

    def renew(self) -> None:
        """Push the expiry ``ingest.lease_minutes`` past now; raise :class:`LeaseLostError` if no longer held."""
        with self._lock:
            now = self._ctx.clock.now()
            current = read_lease(self._ctx)
            if current is None or current.sequence != self.state.sequence or current.owner != self.owner:
                raise LeaseLostError(_lost_message(self.owner, current))
            expires = now + dt.timedelta(minutes=self.minutes)
            self._write(LeaseState(current.sequence + 1, self.owner, current.acquired_at, now, expires, None),
                        taking=False)

    def release(self) -> None:
        """Give the lease back (when this run still holds it), and stop renewing it."""
        self.stop_heartbeat()
        with self._lock:
            current = read_lease(self._ctx)
            if current is None or current.sequence != self.state.sequence or current.owner != self.owner:
                return
            now = self._ctx.clock.now()
            try:
                self._write(LeaseState(current.sequence + 1, self.owner, current.acquired_at, current.renewed_at,
                                       current.expires_at, now), taking=False)
            except ConcurrentIngestError:
                # Taken over meanwhile: nothing of ours to give back.
                return

    def check(self) -> None:
        """Raise what the heartbeat found (a lost lease) in the thread doing the work."""
        if self._lost is not None:
            raise self._lost

    def start_heartbeat(self, interval_seconds: float | None = None) -> None:
        """Renew the lease every ``interval_seconds`` (a third of the lease) until released."""
        interval = interval_seconds if interval_seconds is not None else self.minutes * 60 / 3

        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    self.renew()
                except BaseException as exc:  # noqa: BLE001 - handed to the working thread by check()
                    self._lost = exc if isinstance(exc, ConcurrentIngestError) else LeaseLostError(
                        f"the ingest lease could not be renewed ({type(exc).__name__}: {exc}); stopping")
                    return

        self._thread = threading.Thread(target=beat, name=f"ingest-lease-{self.owner}", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def _write(self, new: LeaseState, *, taking: bool) -> None:
        ctx = self._ctx
        row = [(RESOURCE, new.sequence, new.owner, new.acquired_at, new.renewed_at, new.expires_at, new.released_at)]
        try:
            result = ctx.lake.overwrite(LEASE_TABLE, ctx.spark.createDataFrame(row, LEASE_SCHEMA),
                                        write_id=WriteId(_APP_ID, new.sequence))
            won = not result.skipped
        except ConcurrentWriteError:
            won = False
        if won:
            # A write that was neither skipped nor refused holds the row: a rival writing the same
            # sequence either finds its transaction id committed (skipped) or fails Delta's conflict
            # check, so there is nothing to read back.
            self.state = new
            return
        after = read_lease(ctx)
        if taking:
            raise ConcurrentIngestError(_busy_message(after) if after is not None else
                                        "another ingest took this lake's ingest lease at the same moment; "
                                        "this run stops without reading or writing anything")
        raise LeaseLostError(_lost_message(self.owner, after))


def _busy_message(holder: LeaseState) -> str:
    return (f"another ingest is running on this lake: {holder.describe()}. This run stops without reading or "
            f"writing anything; run it again when that one has finished (a lease that is not renewed, because "
            f"its run died, is taken over after {_utc(holder.expires_at)}).")


def _lost_message(owner: str, current: LeaseState | None) -> str:
    holder = current.describe() if current is not None and current.owner else "nobody holds it now"
    return (f"{owner} lost the ingest lease (it was not renewed in time and was taken over: {holder}); "
            f"this run stops, and the batch it was working on is redone by the run that holds the lease.")
