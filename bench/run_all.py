"""Run every benchmark in turn (``make bench``) and print one line per benchmark at the end.

Each benchmark is its own process (its own Spark session and memory), started with this
interpreter from the repository root, with the default sizes of its script unless
``--quick`` is given (sizes small enough to check that every script works, in minutes; the
figures of a quick run are not the ones the goals refer to). ``--only NAME`` runs some of them.
The exit status is non-zero when any benchmark missed its goal or failed.

    .venv/bin/python bench/run_all.py [--quick] [--only storage --only segments ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (script, extra arguments of a quick run)
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "storage": ("bench_storage.py", ["--rows", "1000000", "--repeat", "1"]),
    "generate": ("bench_generate.py", ["--users", "50000", "--items", "2000", "--events-target", "1000000"]),
    "ingest": ("bench_ingest.py", ["--events", "1000000", "--users", "20000", "--items", "2000", "--files", "8"]),
    "features": ("bench_features.py", ["--events", "1000000", "--users", "50000", "--repeat", "1"]),
    "segments": ("bench_segments.py", ["--users", "100000"]),
    "recommend": ("bench_recommend.py", ["--users", "20000", "--items", "2000", "--interactions", "300000"]),
    "render": ("bench_render.py", ["--messages", "20000", "--repeat", "1"]),
    "send": ("bench_send.py", ["--messages", "5000", "--repeat", "1"]),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the scripts, not the goals")
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS), default=[],
                        help="run only this benchmark (repeatable)")
    args = parser.parse_args(argv)
    chosen = args.only or list(BENCHMARKS)
    outcomes = []
    for name in chosen:
        script, quick = BENCHMARKS[name]
        path = HERE / script
        if not path.is_file():
            outcomes.append((name, "missing", 0.0))
            continue
        command = [sys.executable, str(path), *(quick if args.quick else [])]
        print(f"\n===== {name}: {' '.join(command[1:])}", flush=True)
        started = time.monotonic()
        code = subprocess.call(command, cwd=HERE.parent)
        outcomes.append((name, "ok" if code == 0 else f"exit {code}", time.monotonic() - started))
    print("\n===== summary", flush=True)
    for name, outcome, seconds in outcomes:
        print(f"  {name:<10} {outcome:<10} {seconds:8.0f} s")
    return 0 if all(outcome == "ok" for _, outcome, _ in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
