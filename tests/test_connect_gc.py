"""Models' finalizers on Spark Connect run only where no RPC is in flight (session.ml_finalizers_at_safe_points).

pyspark 4.2's Connect client deletes a model from the server's ML cache in the model's ``__del__``.
When Python's cyclic collector finalizes a model during another RPC of the same thread, the nested
delete waits forever: a local ``run-all`` on Connect hung so in its ``plan`` stage. The script below
makes that happen on purpose: the collector runs at almost every allocation, and a ``gc`` callback
drops a fitted model into a reference cycle when a collection starts where gRPC places a unary call
(a ``spark.conf.get``) on its channel, so that collection finalizes it there. With the guard made a
no-op the test failed in 6 runs of 6: three hung (killed at the 90 s timeout), and in three the
models were finalized inside those calls without a deadlock, which the script's own checks catch
(no model is left to pop). With the guard the collector never runs by itself inside the block, and
the test passed in 5 runs of 5 (about 22 s, most of it the Connect server's start).
"""

from __future__ import annotations

import gc

from inboxlift.session import collect_ml_garbage, ml_finalizers_at_safe_points
from run_all_shop import run_script

SCRIPT = r"""
import gc, linecache, sys, weakref
from pyspark.ml.clustering import KMeans
from pyspark.ml.linalg import Vectors
from pyspark.sql import SparkSession
from inboxlift.session import collect_ml_garbage, ml_finalizers_at_safe_points

spark = SparkSession.builder.remote("local[2]").getOrCreate()
points = spark.createDataFrame([(Vectors.dense([float(i), 0.0]),) for i in range(10)], ["features"])
pool = [KMeans(k=2, seed=1, maxIter=2).fit(points) for _ in range(3)]

def inside_a_call_being_placed():
    # gRPC's unary call places the call on its channel (segregated_call), holding the channel's lock
    # while it leaves a Python context manager: where the run-all's hang was caught.
    frame = sys._getframe(1)
    while frame is not None:
        caller = frame.f_back
        if (frame.f_code.co_name == "__exit__" and caller is not None and caller.f_code.co_name == "_blocking"
                and "segregated_call" in linecache.getline(caller.f_code.co_filename, caller.f_lineno)):
            return True
        frame = caller
    return False

def drop_one(phase, info):
    # A model left in a cycle as such a collection starts: this very collection finalizes it there.
    if phase == "start" and pool and inside_a_call_being_placed():
        cycle = [pool.pop()]
        cycle.append(cycle)

with ml_finalizers_at_safe_points(spark):
    gc.callbacks.append(drop_one)
    gc.set_threshold(1)
    try:
        for _ in range(50):
            spark.conf.get("spark.sql.shuffle.partitions")
    finally:
        gc.set_threshold(700)
        gc.callbacks.remove(drop_one)
    print("rpcs done, models never dropped:", len(pool), flush=True)
    # A model in a cycle stays until a safe point, and is released there.
    model = pool.pop()
    alive = weakref.ref(model)
    cycle = [model]
    cycle.append(cycle)
    del model, cycle
    print("in a cycle, before the safe point:", alive() is not None, flush=True)
    collect_ml_garbage()
    print("after collect_ml_garbage:", alive() is not None, flush=True)
    model = pool.pop()
    alive = weakref.ref(model)
    cycle = [model]
    cycle.append(cycle)
    del model, cycle
    pool.clear()   # the rest released here, not by finalizers at the interpreter's exit
print("after the block:", alive() is not None, "collector on:", gc.isenabled(), flush=True)
spark.stop()
"""


def test_a_model_finalized_by_the_collector_never_runs_inside_another_rpc_on_connect(tmp_path, after_run_all):
    done = run_script(SCRIPT, cwd=tmp_path, timeout=90, hung="the script hung (a finalizer's RPC inside another RPC)")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if ":" in line]
    assert lines == [
        "rpcs done, models never dropped: 3",
        "in a cycle, before the safe point: True",
        "after collect_ml_garbage: False",
        "after the block: False collector on: True",
    ]


def test_on_a_classic_session_the_collector_is_left_alone(spark):
    assert gc.isenabled()
    with ml_finalizers_at_safe_points(spark):
        assert gc.isenabled()
        collect_ml_garbage()
    assert gc.isenabled()
