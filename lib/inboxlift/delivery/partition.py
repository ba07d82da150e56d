"""The per-partition sender: what ``DataFrame.mapInArrow`` runs in every send task.

One task, one SMTP connection (opened on first use, re-opened when lost), its share of the rate
limits (:mod:`inboxlift.delivery.ratelimit`) and its journal (:mod:`inboxlift.delivery.journal`).
For each message, in order:

1. the run's journal already has it (Spark runs the task again): replay the recorded state; a
   ``start`` without an ``end`` is ``unknown`` (never sent twice);
2. the user changed their consent since the run's selection
   (:mod:`inboxlift.delivery.consent_watch`): ``deferred`` (``consent_changed``), nothing sent;
3. CR/LF in a header, an address that fails validation again, or a row ``message_bytes`` refuses:
   ``failed`` with the reason, nothing sent;
4. MAIL, RCPT, DATA; after the relay's 354 the ``start`` line is made durable, then the content
   (:func:`inboxlift.render.eml.message_bytes`, the bytes ``.eml`` export writes) goes out;
5. the reply decides: 250 ``sent``; 421/451/452 slow the task down and retry the message (at most
   ``throttle_retries`` times, then ``deferred``); another 4xx ``deferred`` (``failed`` at the last
   attempt); 5xx ``bounced`` (to MAIL FROM: ``failed``, our sender is refused); no reply after the
   content ``unknown``; a connection lost before the content: reconnect and retry.

A message that never reached the relay (it cannot be reached, or the connection is lost before the
content, still after the retries) is ``deferred`` whatever its attempt: such attempts
(``untried_attempts``) do not count towards ``max_attempts``. Before each message the task checks
that its run still holds its lease (:func:`inboxlift.delivery.journal.lease_ended`); a run that lost
it sends nothing more (the task fails with :class:`~inboxlift.delivery.journal.LeaseLostError`).

Plain Python over Arrow batches: tests call :func:`send_batches` without Spark.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from inboxlift.addresses import ascii_address
from inboxlift.clock import Clock
from inboxlift.delivery import states as S
from inboxlift.delivery.consent_watch import ConsentWatch, WatchPlan
from inboxlift.delivery.journal import LeaseLostError, TaskJournal, lease_ended
from inboxlift.delivery.ratelimit import TaskPacer, backoff_seconds
from inboxlift.delivery.smtp import MAIL, REPLY, RelayConfig, RelayConnection, RelayError
from inboxlift.render.eml import MessageError, message_bytes

# The outbox columns a task reads (the bodies and headers are what message_bytes writes), and the
# message's earlier attempts that never reached the relay (from deliveries; absent counts as none).
INPUT_COLUMNS = ("message_id", "attempt", "untried_attempts", "user_id", "to_email", "from_email", "subject", "text",
                 "html", "headers", "send_at")
# How often a task reads its run's lease (a small file on the shared journal storage).
LEASE_CHECK_SECONDS = 1.0
RESULT_ARROW_SCHEMA = pa.schema([
    pa.field("message_id", pa.string()), pa.field("attempt", pa.int32()), pa.field("state", pa.string()),
    pa.field("smtp_code", pa.int32()), pa.field("reason", pa.string()),
])
RESULT_DDL = "message_id string, attempt int, state string, smtp_code int, reason string"
_LINE_BREAK = re.compile("[\r\n\x00\x85\u2028\u2029]")


@dataclass(frozen=True)
class SendPlan:
    """What every task of one run needs; small and picklable."""

    relay: RelayConfig
    run_dir: str
    connections: int
    return_path: str | None
    messages_per_second: float
    domain_messages_per_second: float
    throttle_backoff_seconds: float
    throttle_backoff_max_seconds: float
    throttle_retries: int
    max_attempts: int
    retry_backoff_minutes: float
    retry_backoff_max_minutes: float
    journal_fsync: bool
    # Business time for attempted_at and next_attempt_at (the run's clock, so tests can pin it).
    clock: Clock
    # Pacing uses the machine's monotonic time; tests may pass a fake sleep.
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)
    # The run whose lease the tasks check before each message (None: no lease, e.g. tests of a task).
    run_id: str | None = None
    # The consent events the tasks watch while they send (None: not watched).
    consent_watch: WatchPlan | None = None


@dataclass(frozen=True)
class Outcome:
    state: str
    code: int | None = None
    reason: str | None = None
    reply: str | None = None
    next_at: dt.datetime | None = None


def header_line_break(row: dict[str, Any], headers: dict[str, Any] | None = None) -> str | None:
    """The first field of the row that would reach a header with a line break (or NUL) in it.

    ``headers``: the row's headers map as a dict, when the caller has it already."""
    if headers is None:
        headers = _headers(row.get("headers"))
    fields: list[tuple[str, Any]] = [("to_email", row.get("to_email")), ("from_email", row.get("from_email")),
                                     ("subject", row.get("subject"))]
    fields += [(f"headers[{k}]", f"{k}{v}") for k, v in headers.items()]
    # Nearly every row has none: one search over all the values, then the field by field look only
    # for a row that has one.
    if not _LINE_BREAK.search("".join(v for _, v in fields if isinstance(v, str))):
        return None
    for name, value in fields:
        if isinstance(value, str) and _LINE_BREAK.search(value):
            return name
    return None


def _headers(value: Any) -> dict[str, Any]:
    # Arrow hands a map over as a list of (key, value) pairs.
    if value is None:
        return {}
    return dict(value.items()) if hasattr(value, "items") else dict(value)


class TaskSender:
    """Sends one task's messages over one connection; :meth:`handle` is one message."""

    def __init__(self, plan: SendPlan, journal: TaskJournal, *, connection: RelayConnection | None = None,
                 pacer: TaskPacer | None = None) -> None:
        self.plan = plan
        self.journal = journal
        self.connection = connection or RelayConnection(plan.relay)
        share = max(1, plan.connections)
        self.pacer = pacer or TaskPacer(rate=plan.messages_per_second / share,
                                        domain_rate=plan.domain_messages_per_second / share, sleep=plan.sleep)
        # Set when the relay cannot be reached at all: the task's other messages are deferred untried.
        self.unavailable: str | None = None
        self._lease_checked: float | None = None
        self.watch = ConsentWatch(plan.consent_watch) if plan.consent_watch is not None else None

    def handle(self, row: dict[str, Any]) -> Outcome:
        message_id, attempt = row["message_id"], int(row["attempt"])
        recorded = self.journal.recorded.get((message_id, attempt))
        if recorded is not None:
            if recorded.state is not None:
                return Outcome(recorded.state, recorded.code, recorded.reason)
            return self._end(message_id, attempt, Outcome(S.UNKNOWN, reason=S.INTERRUPTED,
                                                          reply="started by an earlier attempt of this task"))
        self._check_lease(message_id)
        if self.watch is not None and self.watch.holds(row.get("user_id")):
            return self._end(message_id, attempt, Outcome(
                S.DEFERRED, reason=S.CONSENT_CHANGED, next_at=self.plan.clock.now(),
                reply="the user changed their consent during the run: the next run decides"))
        # This attempt's number among the ones that reach the relay: what max_attempts counts.
        tries = attempt - int(row.get("untried_attempts") or 0)
        outcome = self._send(row, message_id, attempt, tries)
        return self._end(message_id, attempt, outcome)

    def _check_lease(self, message_id: str) -> None:
        if self.plan.run_id is None:
            return
        now = time.monotonic()
        if self._lease_checked is not None and now - self._lease_checked < LEASE_CHECK_SECONDS:
            return
        ended = lease_ended(Path(self.plan.run_dir), self.plan.run_id)
        if ended is not None:
            raise LeaseLostError(f"run {self.plan.run_id} lost its lease ({ended}): the task stops before "
                                 f"{message_id}; its messages not attempted stay due")
        self._lease_checked = now

    def _end(self, message_id: str, attempt: int, outcome: Outcome) -> Outcome:
        self.journal.ended(message_id, attempt, self.plan.clock.now(), state=outcome.state, code=outcome.code,
                           reply=outcome.reply, reason=outcome.reason, next_at=outcome.next_at)
        return outcome

    def _send(self, row: dict[str, Any], message_id: str, attempt: int, tries: int) -> Outcome:
        headers = _headers(row.get("headers"))
        broken = header_line_break(row, headers)
        if broken:
            return Outcome(S.FAILED, reason=S.HEADER_LINE_BREAK, reply=f"{broken} holds a line break")
        recipient = ascii_address(row.get("to_email"))
        if recipient is None:
            return Outcome(S.FAILED, reason=S.INVALID_ADDRESS, reply="to_email fails validation")
        sender = self.plan.return_path or ascii_address(row.get("from_email"))
        if sender is None:
            return Outcome(S.FAILED, reason=S.INVALID_SENDER, reply="from_email fails validation")
        try:
            data = message_bytes({**row, "headers": headers})
        except MessageError as exc:
            return Outcome(S.FAILED, reason=S.BAD_MESSAGE, reply=str(exc)[:500])
        domain = recipient.rsplit("@", 1)[1]
        retries = 0
        while True:
            if self.unavailable is not None:
                return self._untried(tries, self.unavailable, S.RELAY_UNAVAILABLE)
            if not self.connection.is_open:
                try:
                    self.connection.open()
                except RelayError as exc:
                    retries += 1
                    if retries > self.plan.throttle_retries:
                        self.unavailable = str(exc)[:500]
                        continue
                    self._back_off(retries)
                    continue
            self.pacer.wait(domain)
            reply = self.connection.send(
                sender, recipient, data,
                before_content=lambda: self.journal.started(message_id, attempt, self.plan.clock.now()))
            if reply.code == 250 and reply.phase == REPLY:
                self.pacer.accepted()
                return Outcome(S.SENT, 250, reply=reply.text)
            if reply.code is None:
                if reply.may_have_delivered:
                    return Outcome(S.UNKNOWN, reason=S.NO_REPLY, reply=reply.text)
                retries += 1
                if retries > self.plan.throttle_retries:
                    return self._untried(tries, reply.text, S.CONNECTION_LOST)
                self._back_off(retries)
                continue
            if reply.code in S.THROTTLE_CODES:
                self.pacer.slow_down()
                retries += 1
                if retries > self.plan.throttle_retries:
                    return self._deferred(tries, reply.code, reply.text, S.THROTTLED)
                self._back_off(retries)
                continue
            if 400 <= reply.code < 500:
                return self._deferred(tries, reply.code, reply.text, S.TEMPORARY)
            if 500 <= reply.code < 600:
                if reply.phase == MAIL:
                    return Outcome(S.FAILED, reply.code, S.SENDER_REFUSED, reply.text)
                return Outcome(S.BOUNCED, reply.code, S.REJECTED, reply.text)
            return Outcome(S.FAILED, reply.code, S.UNEXPECTED_REPLY, reply.text)

    def _back_off(self, retry: int) -> None:
        self.plan.sleep(backoff_seconds(retry, first=self.plan.throttle_backoff_seconds,
                                        cap=self.plan.throttle_backoff_max_seconds))

    def _deferred(self, tries: int, code: int | None, reply: str, reason: str) -> Outcome:
        """Deferred to a later run, or failed when this was the last try allowed."""
        if tries >= self.plan.max_attempts:
            return Outcome(S.FAILED, code, S.RETRIES_EXHAUSTED, f"{reason}: {reply}"[:500])
        return self._untried(tries, reply, reason, code=code)

    def _untried(self, tries: int, reply: str, reason: str, *, code: int | None = None) -> Outcome:
        """Deferred to a later run whatever the attempt: the relay never had the message."""
        minutes = backoff_seconds(max(1, tries), first=self.plan.retry_backoff_minutes,
                                  cap=self.plan.retry_backoff_max_minutes)
        return Outcome(S.DEFERRED, code, reason, reply, next_at=self.plan.clock.now() + dt.timedelta(minutes=minutes))

    def close(self) -> None:
        self.connection.close()


def _task_ids() -> tuple[int, int]:
    from pyspark import TaskContext

    task = TaskContext.get()
    return (task.partitionId(), task.attemptNumber()) if task is not None else (0, 0)


def send_batches(batches: Iterable[pa.RecordBatch], plan: SendPlan) -> Iterator[pa.RecordBatch]:
    """The ``mapInArrow`` function (bind ``plan`` with functools.partial): one result row per message."""
    partition, attempt = _task_ids()
    journal = TaskJournal(Path(plan.run_dir), partition=partition, attempt=attempt, fsync=plan.journal_fsync)
    sender = TaskSender(plan, journal)
    try:
        for batch in batches:
            rows = batch.select([c for c in INPUT_COLUMNS if c in batch.schema.names]).to_pylist()
            outcomes = [(row["message_id"], row["attempt"], sender.handle(row)) for row in rows]
            yield pa.RecordBatch.from_arrays([
                pa.array([m for m, _, _ in outcomes], pa.string()),
                pa.array([a for _, a, _ in outcomes], pa.int32()),
                pa.array([o.state for _, _, o in outcomes], pa.string()),
                pa.array([o.code for _, _, o in outcomes], pa.int32()),
                pa.array([o.reason for _, _, o in outcomes], pa.string()),
            ], schema=RESULT_ARROW_SCHEMA)
    finally:
        sender.close()
        journal.close()
