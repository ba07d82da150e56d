"""One barrier Spark job whose tasks hold their partition in memory and answer the driver's steps.

The collective K-means (:mod:`inboxlift.models.kmeans`) and the collective ALS
(:mod:`inboxlift.models.als`) share this plumbing:

1. The driver opens a TCP listener on ``spark.driver.host`` and starts **one barrier job**
   (``mapInArrow(..., barrier=True)``) on a thread of its own: Spark launches all of its tasks at
   the same time or none, so every partition is loaded before any step needs it. There can be no
   more partitions than the cluster has task slots (:func:`task_slots`).
2. Each task loads its partition, connects to the driver, proves itself with a random 32-byte
   token made for that fit and says hello (its partition, the task count, and what the algorithm
   needs to know), or sends ``OP_ERROR`` with the reason its data is unusable.
3. The driver runs the algorithm, sending each step to every task (:class:`Tasks`); answers are
   sums over the task's own rows, never the rows. Numbers travel as raw float64 arrays.
4. The driver sends the algorithm's stop step; each task yields its output rows and ends, and the
   job completes. A failure on either side cancels the job; a task's failure surfaces as Spark's
   own error.

Spark's barrier ``allGather`` is not used for the steps: each call waited about a second here.
It needs classic Spark (not Spark Connect) and executors that can open a connection to the driver.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
import selectors
import socket
import struct
import time
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
from pyspark import InheritableThread
from pyspark.sql import DataFrame
from pyspark.sql.types import StructType

OP_HELLO, OP_ERROR = 0, 1   # every algorithm's own steps are numbered from 2
DEFAULT_TIMEOUT_S = 600.0   # the longest wait for a connection or an answer before the fit fails

# ---- the wire: length-prefixed float64 arrays ----------------------------------------------------

_HEAD = struct.Struct("!BI")     # op, number of arrays
_ARRAY = struct.Struct("!BQQ")   # dimensions (1 or 2), rows, columns


def _recv_exact(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("collective fit: the other side closed the connection")
        got += n
    return buffer


def send_message(sock: socket.socket, op: int, arrays: Sequence[np.ndarray]) -> None:
    pieces = [_HEAD.pack(op, len(arrays))]
    for array in arrays:
        array = np.ascontiguousarray(array, dtype="<f8")
        rows, columns = (array.shape[0], array.shape[1]) if array.ndim == 2 else (array.size, 0)
        pieces += [_ARRAY.pack(array.ndim if array.ndim == 2 else 1, rows, columns), array.tobytes()]
    sock.sendall(b"".join(pieces))


def recv_message(sock: socket.socket) -> tuple[int, list[np.ndarray]]:
    op, count = _HEAD.unpack(_recv_exact(sock, _HEAD.size))
    arrays = []
    for _ in range(count):
        ndim, rows, columns = _ARRAY.unpack(_recv_exact(sock, _ARRAY.size))
        values = rows * (columns if ndim == 2 else 1)
        array = np.frombuffer(_recv_exact(sock, 8 * values), dtype="<f8").astype(np.float64, copy=False)
        arrays.append(array.reshape(rows, columns) if ndim == 2 else array)
    return op, arrays


def text_of(array: np.ndarray) -> str:
    return bytes(array.astype(np.uint8)).decode("utf-8", "replace")


def as_bytes_array(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.float64)


# ---- the task's side -------------------------------------------------------------------------------

class UnusableInput(ValueError):
    """A partition's rows cannot be used by the algorithm (nulls, NaN, ...): the message says why."""


def task_connection(*, address: tuple[str, int], token: bytes, timeout: float) -> tuple[socket.socket, int, int]:
    """Inside a barrier task: the connection to the driver (token sent), the partition and the task count."""
    from pyspark import BarrierTaskContext

    context = BarrierTaskContext.get()
    sock = socket.create_connection(address, timeout=timeout)
    sock.sendall(token)
    return sock, context.partitionId(), len(context.getTaskInfos())


def report_unusable(sock: socket.socket, partition: int, tasks: int, error: UnusableInput) -> None:
    send_message(sock, OP_ERROR, [np.array([partition, tasks]), as_bytes_array(str(error))])


# ---- the driver's side -----------------------------------------------------------------------------

class Tasks:
    """The barrier job's tasks, connected to the driver: each step goes out to all, answers come back."""

    def __init__(self, connections: dict[int, socket.socket], hellos: list[list[np.ndarray]], *, name: str) -> None:
        self.connections = connections
        self.partitions = list(connections)   # position -> partition id
        self.hellos = hellos                   # position -> the task's hello arrays
        self.name = name

    def ask(self, op: int, arrays: Sequence[np.ndarray], *, only: int | None = None) -> list[list[np.ndarray]]:
        targets = self.partitions if only is None else [self.partitions[only]]
        for partition in targets:
            send_message(self.connections[partition], op, arrays)
        answers = []
        for partition in targets:
            got, payload = recv_message(self.connections[partition])
            if got != op:
                raise RuntimeError(f"{self.name}: partition {partition} answered step {got} to step {op}")
            answers.append(payload)
        return answers

    def tell(self, op: int, arrays: Sequence[np.ndarray] = ()) -> None:
        """A step without an answer (the stop)."""
        for sock in self.connections.values():
            send_message(sock, op, arrays)


class _Job:
    """The barrier job on its own thread, so the driver can serve its tasks meanwhile."""

    def __init__(self, run: Callable[[], object], name: str) -> None:
        self.error: BaseException | None = None
        self.result: object = None
        # InheritableThread: the job keeps the caller's local properties (scheduler pool, job
        # description) when PySpark pins Python threads to JVM threads.
        self.thread = InheritableThread(target=self._run, args=(run,), name=name, daemon=True)
        self.thread.start()

    def _run(self, run) -> None:
        try:
            self.result = run()
        except BaseException as error:  # reported by the driver thread
            self.error = error


def _accept_all(server: socket.socket, token: bytes, job: _Job, timeout: float, name: str) -> Tasks:
    """Connections from every task of the job, each proved by the token, in partition order."""
    connections: dict[int, socket.socket] = {}
    hellos: dict[int, list[np.ndarray]] = {}
    expected = None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(server, selectors.EVENT_READ)
        while expected is None or len(connections) < expected:
            if job.error is not None:
                raise job.error
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: {len(connections)} of {expected or '?'} tasks connected "
                                   f"within {timeout:.0f} s")
            if not selector.select(timeout=0.2):
                continue
            sock, _ = server.accept()
            sock.settimeout(timeout)
            try:
                if not hmac.compare_digest(_recv_exact(sock, len(token)), token):
                    sock.close()
                    continue
                op, arrays = recv_message(sock)
            except (OSError, ConnectionError):
                sock.close()
                continue
            partition, tasks = int(arrays[0][0]), int(arrays[0][1])
            if op == OP_ERROR:
                sock.close()
                raise ValueError(f"{name} input, partition {partition}: {text_of(arrays[1])}")
            expected = tasks
            connections[partition] = sock
            hellos[partition] = arrays
    ordered = dict(sorted(connections.items()))
    return Tasks(ordered, [hellos[p] for p in ordered], name=name)


def task_slots(context) -> int:
    """How many tasks the cluster runs at once: the number Spark checks a barrier stage against.

    ``defaultParallelism`` is not it (local sessions set it to twice the cores). Spark's own count
    (``SparkContext.maxNumConcurrentTasks``) is asked through the JVM; when that fails or is 0 (no
    executor registered yet), a local master's thread count, else ``defaultParallelism``.
    """
    try:
        jvm_context = context._jsc.sc()  # noqa: SLF001 - Spark has no Python API for the slot count
        slots = int(jvm_context.maxNumConcurrentTasks(jvm_context.resourceProfileManager().defaultResourceProfile()))
        if slots > 0:
            return slots
    except Exception:  # noqa: BLE001 - fall back to what the master says
        pass
    local = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\d+)?\])?", context.master or "")
    if local:
        threads = local.group(1)
        return 1 if threads is None else (os.cpu_count() or 1) if threads == "*" else int(threads)
    return context.defaultParallelism


def spark_context(frame: DataFrame, *, name: str, instead: str):
    try:
        return frame.sparkSession.sparkContext
    except Exception as error:  # noqa: BLE001 - Spark Connect has no SparkContext
        raise RuntimeError(f"the collective {name} needs classic Spark (the driver starts a barrier job and "
                           f"serves its tasks); on Spark Connect {instead}") from error


def run_collective(frame: DataFrame, task: Callable[..., Iterator[pa.RecordBatch]], schema: str | StructType,
                   driver: Callable[[Tasks], object], *, stop_op: int, name: str,
                   finish: Callable[[DataFrame], object], timeout: float = DEFAULT_TIMEOUT_S) -> tuple[object, object]:
    """Run ``task`` (bound to the driver's address, token and timeout by keyword) on every
    partition of ``frame`` in one barrier job, and ``driver`` on the connected :class:`Tasks`
    meanwhile; then tell every task ``stop_op``.

    ``finish`` is the action on the job's output (``schema``) that runs it, e.g. a collect or an
    eager local checkpoint. Returns (what ``driver`` returned, what ``finish`` returned). ``frame``
    must have no more partitions than :func:`task_slots`.
    """
    from functools import partial

    spark = frame.sparkSession
    context = spark.sparkContext
    host = spark.conf.get("spark.driver.host")
    token = secrets.token_bytes(32)
    group = f"inboxlift-{re.sub(r'[^a-z0-9]+', '-', name.lower())}-{secrets.token_hex(8)}"
    server = socket.create_server((host, 0))
    tasks: Tasks | None = None

    def run_job() -> object:
        context.setJobGroup(group, f"inboxlift {name} (barrier)", interruptOnCancel=True)
        bound = partial(task, address=(host, server.getsockname()[1]), token=token, timeout=timeout)
        return finish(frame.mapInArrow(bound, schema, barrier=True))

    job = _Job(run_job, name=f"collective-{group}")
    try:
        tasks = _accept_all(server, token, job, timeout, name)
        answer = driver(tasks)
        tasks.tell(stop_op)
    except BaseException as error:
        context.cancelJobGroup(group)
        job.thread.join(timeout)
        if isinstance(error, (ConnectionError, OSError)) and job.error is not None:
            raise job.error from error   # a task failed: Spark's error says why
        raise
    finally:
        if tasks is not None:
            for sock in tasks.connections.values():
                sock.close()
        server.close()
    job.thread.join()
    if job.error is not None:
        raise job.error
    return answer, job.result
