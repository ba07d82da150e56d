"""The send stage: ``outbox`` -> the relay over SMTP, exactly once per message (README "Sending").

``run_send`` takes the run lock, commits what an earlier run that ended left in its journal (a run
whose lease still holds is refused: :func:`inboxlift.delivery.journal.pending_runs`), selects
the due messages (:mod:`inboxlift.delivery.selection`: rendered, ``send_at`` passed, not sent, not
waiting for a retry, the user still allowed mail now, with the consent events the tracking service
wrote since ingest's last batch: :mod:`inboxlift.pending_consent`), records the skipped ones, checks
the relay once from the driver, and sends the rest from the executors: the light keys of the due
messages are joined to the outbox's bodies, hash-partitioned into ``delivery.connections`` tasks, and
each task sends its partition over one SMTP connection (``mapInArrow``,
:func:`inboxlift.delivery.partition.send_batches`), holding back the message of a user whose consent
changed during the run (:mod:`inboxlift.delivery.consent_watch`). The driver only collects counts. The run's
journal then becomes ``deliveries`` rows, the outbox's ``sent`` statuses and suppressions
(:func:`inboxlift.delivery.bookkeeping.commit_runs`). A run that loses its lease midway stops: its
tasks send no further message, and it commits nothing (the next run commits its journal).
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from inboxlift.consent import email_hash
from inboxlift.context import RunContext
from inboxlift.delivery import states as S
from inboxlift.delivery.bookkeeping import Committed, commit_runs, with_message_columns
from inboxlift.delivery.consent_watch import WatchPlan, watch_folder
from inboxlift.delivery.journal import LeaseLostError, RunLock, new_run_id, pending_runs, start_run
from inboxlift.delivery.partition import INPUT_COLUMNS, RESULT_DDL, SendPlan, send_batches
from inboxlift.delivery.selection import (
    DUE,
    HELD_UNKNOWN,
    NOT_YET_DUE,
    WAITING,
    latest_deliveries,
    with_send_status,
    with_skip_reason,
)
from inboxlift.delivery.smtp import RelayConfig, RelayError, check_relay
from inboxlift.pending_consent import suppressions_now
from inboxlift.render.frames import render_partitions
from inboxlift.session import KEEP
from inboxlift.settings import Settings, SettingsError, resolve_secret

OUTBOX_TABLE = "outbox"
USERS_TABLE = "users"


class DeliveryError(RuntimeError):
    """The run cannot send as configured (relay refused, speculation on); nothing was sent."""


@dataclass(frozen=True)
class SendReport:
    run_id: str
    campaign_id: str | None
    dry_run: bool
    relay: str
    connections: int
    # this run: state -> messages (sent, deferred, bounced, failed, unknown; skipped is below)
    states: dict[str, int] = field(default_factory=dict)
    # this run: (state, reason) -> messages, for deferred, failed, unknown, bounced
    reasons: dict[tuple[str, str], int] = field(default_factory=dict)
    # this run: skip reason -> messages (consent reasons, expired)
    skipped: dict[str, int] = field(default_factory=dict)
    not_yet_due: int = 0
    waiting: int = 0
    held_unknown: int = 0
    held_back: int = 0
    seconds: float = 0.0
    # earlier runs that died, committed by this one: state -> messages
    recovered: dict[str, int] = field(default_factory=dict)
    recovered_runs: tuple[str, ...] = ()
    suppressed_bounced: int = 0
    suppressed_soft: int = 0

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    @property
    def attempted(self) -> int:
        return sum(self.states.values())

    @property
    def due(self) -> int:
        """Every message this run selected: sent + deferred + bounced + failed + skipped + unknown."""
        return self.attempted + self.skipped_total

    @property
    def per_second(self) -> float:
        return self.attempted / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        scope = f"campaign {self.campaign_id}" if self.campaign_id else "every campaign"
        n = self.states.get
        head = "send (dry run, nothing sent)" if self.dry_run else "send"
        lines = [f"{head} ({scope}) run {self.run_id} via {self.relay}: due {self.due} = sent {n(S.SENT, 0)} + "
                 f"deferred {n(S.DEFERRED, 0)} + bounced {n(S.BOUNCED, 0)} + failed {n(S.FAILED, 0)} + skipped "
                 f"{self.skipped_total} + unknown {n(S.UNKNOWN, 0)}"]
        if self.dry_run:
            lines[0] = (f"{head} ({scope}): due {self.due} = to send {self.attempted} + skipped {self.skipped_total}")
        if self.skipped:
            lines.append("  skipped: " + ", ".join(f"{r}={c}" for r, c in sorted(self.skipped.items())))
        for (state, reason), count in sorted(self.reasons.items()):
            lines.append(f"  {state}: {reason}={count}")
        if self.attempted and not self.dry_run:
            lines.append(f"  {self.attempted} messages in {self.seconds:.1f}s over {self.connections} connections: "
                         f"{self.per_second:.1f} messages/s")
        waits = [(self.not_yet_due, "not yet due (send_at later)"), (self.waiting, "deferred, waiting for a retry"),
                 (self.held_back, "held back by --limit")]
        lines += [f"  {count} {what}" for count, what in waits if count]
        if self.held_unknown:
            lines.append(f"  {self.held_unknown} messages unknown from earlier runs (the relay may have them): "
                         "not resent; --resend-unknown sends them again")
        if self.recovered_runs:
            states = ", ".join(f"{s}={c}" for s, c in sorted(self.recovered.items()))
            lines.append(f"  recovered {len(self.recovered_runs)} interrupted run(s) from their journal: {states}")
        if self.suppressed_bounced or self.suppressed_soft:
            lines.append(f"  suppressions added: bounced={self.suppressed_bounced}, soft_bounced={self.suppressed_soft}")
        return "\n".join(lines)


def relay_from_settings(settings: Settings, *, environ: Mapping[str, str], dbutils: Any = None) -> RelayConfig:
    """The relay of ``delivery:``, with the password of ``secrets.smtp_password`` when a user is set."""
    d = settings.delivery
    if d.is_embedded:
        raise SettingsError("delivery.relay_host is 'embedded': the embedded server is started by `inboxlift run "
                            "send` and run-all (inboxlift.delivery.sink); pass its relay to run_send")
    password = resolve_secret(settings.secrets.smtp_password, environ=environ, dbutils=dbutils) if d.username else None
    return RelayConfig.from_settings(d, password=password)


def _connections(ctx: RunContext) -> int:
    return ctx.settings.delivery.connections or render_partitions(ctx.spark) or 2


def _refuse_speculation(ctx: RunContext) -> None:
    # A speculative copy of a task would send the same partition at the same time.
    try:
        speculation = str(ctx.spark.conf.get("spark.speculation", "false")).lower()
    except Exception:  # noqa: BLE001 - a server that does not expose the setting runs without it
        speculation = "false"
    if speculation == "true":
        raise DeliveryError("spark.speculation is on: a speculative task would send its messages twice; "
                            "turn it off for the send stage")


def _consent_watch(ctx: RunContext, now: dt.datetime) -> WatchPlan | None:
    """What the tasks watch for consent changes during the run (consent_watch), taken before the
    selection reads the suppressions; None when the recheck is off or the folder is not a local path."""
    every = ctx.settings.delivery.consent_recheck_seconds
    folder = watch_folder(ctx.settings.service_events_dir)
    if not every or folder is None:
        return None
    # The selection lists finished files only: the watch starts before the file in progress began.
    margin = ctx.settings.serve.rotate_seconds + 60
    since_file_time = time.time() - margin
    return WatchPlan(folder=os.path.abspath(folder), since_file_time=since_file_time,
                     since=now - dt.timedelta(seconds=margin), every_seconds=every,
                     opened_before=since_file_time - margin)


def _skipped_rows(skipped: DataFrame, *, run_id: str, now: dt.datetime) -> DataFrame:
    rows = skipped.select(
        "message_id", "attempt", F.lit(run_id).alias("run_id"), F.lit(S.SKIPPED).alias("state"),
        F.col("skip_reason").alias("reason"), F.lit(now).cast("timestamp").alias("attempted_at"),
        "campaign_id", "user_id", email_hash(F.col("to_email")).alias("email_hash"))
    return with_message_columns(rows, outbox=None, origin=S.ORIGIN_SMTP)


def run_send(ctx: RunContext, *, campaign_id: str | None = None, dry_run: bool = False, limit: int | None = None,
             resend_unknown: bool = False, relay: RelayConfig | None = None,
             environ: Mapping[str, str] | None = None, dbutils: Any = None) -> SendReport:
    """Send the due outbox messages of one campaign (or of all).

    Args:
        dry_run: select and count only: no lock, no journal, no SMTP, no table written.
        limit: send at most this many messages (the earliest ``send_at`` first); the others stay due.
        resend_unknown: send again the messages whose outcome is ``unknown`` (the relay may have
            them: receiving systems drop a duplicate by its Message-ID, not all do).
        relay: where to send; default the ``delivery:`` settings (the embedded server's relay when
            ``relay_host`` is ``embedded``: the stage runner starts it).
        environ, dbutils: where ``secrets.smtp_password`` is looked up.

    Raises:
        DeliveryError: the relay refuses the connection, TLS or AUTH, or speculation is on (nothing sent).
    """
    d = ctx.settings.delivery
    now = ctx.clock.now()
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be 0 or more, got {limit}")
    if relay is None and not dry_run:
        relay = relay_from_settings(ctx.settings, environ=environ or {}, dbutils=dbutils)
    relay_name = relay.name if relay is not None else d.relay_host
    outbox = ctx.lake.read_required(OUTBOX_TABLE, needed_by="send", hint="run render first")
    run_id = new_run_id(now)
    connections = _connections(ctx)
    if dry_run:
        return _select(ctx, outbox, run_id=run_id, campaign_id=campaign_id, limit=limit, relay=relay_name,
                       resend_unknown=resend_unknown, connections=connections, now=now, dry_run=True)[0]
    _refuse_speculation(ctx)
    watch = _consent_watch(ctx, now)
    with RunLock(d.journal_dir, run_id=run_id, lease_seconds=d.lock_lease_seconds) as lock:
        recovered = Committed((), 0, 0)
        pending = pending_runs(d.journal_dir, lease_seconds=d.lock_lease_seconds)
        if pending:
            lock.check()
            recovered = commit_runs(ctx.lake, pending, now=now, soft_bounce_threshold=d.soft_bounce_threshold)
            outbox = ctx.lake.read(OUTBOX_TABLE)
        report, to_send, skipped, due = _select(ctx, outbox, run_id=run_id, campaign_id=campaign_id, limit=limit,
                                                relay=relay_name, resend_unknown=resend_unknown,
                                                connections=connections, now=now, dry_run=False)
        try:
            folders, seconds, results = [], 0.0, {}
            if report.attempted:
                assert relay is not None
                try:
                    check_relay(relay)
                except RelayError as exc:
                    raise DeliveryError(f"{exc}; nothing was sent") from exc
                lock.check()
                folder = start_run(d.journal_dir, run_id, {"run_id": run_id, "relay": relay.name,
                                                           "started_at": now.isoformat()}, lock=lock)
                folders.append(folder)
                started = time.monotonic()
                try:
                    results = _send(ctx, outbox, to_send, relay=relay, folder=str(folder), run_id=run_id,
                                    connections=connections, count=report.attempted, now=now, watch=watch)
                except Exception as exc:
                    # A task that finds the lease lost fails with LeaseLostError, which reaches the driver
                    # wrapped (and named) in Spark's error: say so plainly.
                    if lock.lost is None and LeaseLostError.__name__ not in str(exc):
                        raise
                    raise LeaseLostError(f"run {run_id} lost the send lock ({lock.lost or 'its folder lease ended'}):"
                                         " its tasks stopped sending; the next run commits its journal") from exc
                seconds = time.monotonic() - started
            # Only while this run holds the lock: a run that lost it leaves its journal to the next one.
            lock.check()
            for folder in folders:
                lock.end(folder)
            committed = commit_runs(ctx.lake, folders, extra=_skipped_rows(skipped, run_id=run_id, now=now),
                                    now=now, soft_bounce_threshold=d.soft_bounce_threshold)
        finally:
            due.unpersist()
    states = {s: c for s, c in committed.states(run_id).items() if s != S.SKIPPED}
    reasons = {(s, r or "-"): c for run, s, r, c in committed.counts
               if run == run_id and s not in (S.SENT, S.SKIPPED)}
    mismatch = {s: c for s, c in results.items() if states.get(s, 0) != c}
    if mismatch:
        raise DeliveryError(f"run {run_id}: the tasks reported {results} but the journal holds {states}")
    return SendReport(
        run_id=run_id, campaign_id=campaign_id, dry_run=False, relay=relay_name, connections=connections,
        states=states, reasons=reasons, skipped=report.skipped, not_yet_due=report.not_yet_due,
        waiting=report.waiting, held_unknown=report.held_unknown, held_back=report.held_back, seconds=seconds,
        recovered={s: c for s, c in recovered.states().items()}, recovered_runs=tuple(sorted(recovered.runs())),
        suppressed_bounced=committed.bounced_suppressions + recovered.bounced_suppressions,
        suppressed_soft=committed.soft_bounced_suppressions + recovered.soft_bounced_suppressions,
    )


def _select(ctx: RunContext, outbox: DataFrame, *, run_id: str, campaign_id: str | None, limit: int | None,
            relay: str, resend_unknown: bool, connections: int, now: dt.datetime,
            dry_run: bool) -> tuple[SendReport, DataFrame, DataFrame, DataFrame]:
    """The run's selection: the report's counts, the messages to send, the skipped ones, and the
    persisted due frame they come from (the caller unpersists it)."""
    d = ctx.settings.delivery
    deliveries = ctx.lake.read(S.DELIVERIES_TABLE) if ctx.lake.exists(S.DELIVERIES_TABLE) else None
    statuses = with_send_status(outbox, latest=latest_deliveries(deliveries) if deliveries is not None else None,
                                now=now, campaign_id=campaign_id, resend_unknown=resend_unknown)
    users = ctx.lake.read(USERS_TABLE)
    # The table with the consent events the tracking service wrote since ingest's last batch.
    suppressions = suppressions_now(ctx, users=users)
    max_delay = dt.timedelta(hours=d.max_delay_hours) if d.max_delay_hours else None
    # Light columns only. Every rendered message gets its send status and, when due, its skip reason,
    # in one persisted frame: the counts below materialise it in one job, and the skipped rows and the
    # keys of the messages sent read it from there.
    checked = statuses.transform(with_skip_reason, users=users, suppressions=suppressions,
                                 now=now, max_delay=max_delay)
    frame = checked.withColumn("skip_reason", F.when(F.col("send_status") == F.lit(DUE), F.col("skip_reason"))) \
        .persist(KEEP)
    # Small: one row per status and skip reason.
    counts = frame.groupBy("send_status", "skip_reason").count().collect()
    by_status: dict[str, int] = {}
    for r in counts:
        by_status[r["send_status"]] = by_status.get(r["send_status"], 0) + r["count"]
    by_reason = {r["skip_reason"]: r["count"] for r in counts if r["send_status"] == DUE}
    sendable = by_reason.pop(None, 0)
    due = frame.where(F.col("send_status") == F.lit(DUE))
    to_send = due.where(F.col("skip_reason").isNull())
    held_back = 0
    if limit is not None and sendable > limit:
        to_send = to_send.orderBy("send_at", "message_id").limit(limit)
        held_back, sendable = sendable - limit, limit
    report = SendReport(
        run_id=run_id, campaign_id=campaign_id, dry_run=dry_run, relay=relay, connections=connections,
        states={"to_send": sendable} if sendable else {}, skipped=by_reason,
        not_yet_due=by_status.get(NOT_YET_DUE, 0), waiting=by_status.get(WAITING, 0),
        held_unknown=by_status.get(HELD_UNKNOWN, 0), held_back=held_back)
    if dry_run:
        frame.unpersist()
    return report, to_send, due.where(F.col("skip_reason").isNotNull()), frame


def _send(ctx: RunContext, outbox: DataFrame, to_send: DataFrame, *, relay: RelayConfig, folder: str, run_id: str,
          connections: int, count: int, now: dt.datetime, watch: WatchPlan | None) -> dict[str, int]:
    """Run the send job; returns messages per state as the tasks reported them."""
    d = ctx.settings.delivery
    plan = SendPlan(
        relay=relay, run_dir=folder, run_id=run_id, connections=connections,
        return_path=d.return_path, messages_per_second=d.messages_per_second,
        domain_messages_per_second=d.domain_messages_per_second, throttle_backoff_seconds=d.throttle_backoff_seconds,
        throttle_backoff_max_seconds=d.throttle_backoff_max_seconds, throttle_retries=d.throttle_retries,
        max_attempts=d.max_attempts, retry_backoff_minutes=d.retry_backoff_minutes,
        retry_backoff_max_minutes=d.retry_backoff_max_minutes, journal_fsync=d.journal_fsync, clock=ctx.clock,
        consent_watch=watch)
    # untried_attempts comes with the selection (latest_deliveries): deliveries are read once per run.
    keys = to_send.select("message_id", "attempt", "untried_attempts")
    if count <= d.broadcast_max_messages:
        # The bodies stay where the outbox scan reads them; only the keys travel.
        keys = F.broadcast(keys)
    bodies = (outbox.select(*[c for c in INPUT_COLUMNS if c not in ("attempt", "untried_attempts")])
              .join(keys, "message_id", how="inner"))
    # The scan's partitions merged into at most `connections` tasks, without a shuffle: the bodies go
    # from the outbox's files to the Python workers once, not through a shuffle's disk and network
    # too. A task Spark runs again reads the same files; and whichever task holds a message, the run's
    # journal (every task's file) replays what was already attempted.
    results = bodies.coalesce(connections).mapInArrow(
        functools.partial(send_batches, plan=plan), RESULT_DDL)
    # One row per state: the send job runs here, its output is only counted.
    return {r["state"]: r["count"] for r in results.groupBy("state").count().collect()}
