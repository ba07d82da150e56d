"""Benchmark: clicks per second of ``inboxlift serve`` against a bare ASGI app that answers 302.

Both servers run under uvicorn with the same options and ``--workers`` processes (one per core by
default), on loopback; the load comes from other processes:

1. **throughput**: ``wrk`` (Debian's ``wrk``, C, one thread, keep-alive connections) hammers one
   click link for ``--seconds``; requests/s, p50 and p99 latency as wrk measures them. wrk is
   closed-loop: latency here is latency at saturation.
2. **fixed rate**: an open-loop generator (this file, ``--generate``, its own process) sends
   ``--rate`` requests/s on keep-alive connections, each at its scheduled time whether or not earlier
   ones were answered, and times each from that scheduled time (so a stall is not hidden by
   the generator waiting: no coordinated omission); p50, p99 and max. wrk cannot hold a fixed rate.

The CPU the servers themselves used per click (``/proc``, workers included) is printed too: on a
machine other work shares, throughput and latency mostly measure the competition, while the
ratio of CPU per click still says what recording costs. inboxlift's server writes and syncs every click to its event files before answering; the peer
records nothing. After the runs, the event lines are counted against the requests wrk and the
generator saw answered. Goals: throughput >= 0.5x the peer's, p99 < 20 ms at 500 requests/s.

    .venv/bin/python bench/bench_serve.py [--seconds 10] [--rate 500] [--workers 2] [--connections 32]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-serve-signing-key-0123456789abcdefgh"
TARGET = "https://shop.example/p/i000042?utm_source=inboxlift&utm_medium=email&utm_campaign=wk-47&utm_content=A"


# ---- the peer: a minimal ASGI app --------------------------------------------------------------

async def peer_app(scope, receive, send):
    """Answers every request with a 302 to the same URL; records nothing."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 302,
                "headers": [(b"location", TARGET.encode()), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


# ---- servers ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(port: int, path: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                if sock.recv(64).startswith(b"HTTP/1.1 "):
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("server did not start")


def start_inboxlift(folder: Path, port: int, workers: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "lib"), "INBOXLIFT_SIGNING_KEY": KEY}
    command = [sys.executable, "-m", "inboxlift.cli", "serve", "--conf-dir", str(ROOT / "conf"), "--port", str(port),
               "--workers", str(workers), "--set", f"paths.landing_dir={folder / 'landing'}"]
    return subprocess.Popen(command, cwd=folder, env=env, stdout=open(folder / "inboxlift.log", "ab"),
                            stderr=subprocess.STDOUT)


def start_peer(folder: Path, port: int, workers: int) -> subprocess.Popen:
    # The same uvicorn options inboxlift serve uses (service/entry.py).
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(__file__).parent), "bench_serve:peer_app",
               "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers), "--no-access-log",
               "--no-server-header", "--proxy-headers", "--log-level", "warning"]
    return subprocess.Popen(command, cwd=folder, stdout=open(folder / "peer.log", "ab"), stderr=subprocess.STDOUT)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a server process and its worker processes so far (from /proc)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    total = 0
    for process in [str(pid), *children]:
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ---- load -------------------------------------------------------------------------------------

def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(url: str, *, seconds: int, connections: int) -> dict:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
                         capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "requests": requests,
        "p50_ms": _ms(re.search(r"\s50%\s+(\S+)", out).group(1)),
        "p99_ms": _ms(re.search(r"\s99%\s+(\S+)", out).group(1)),
        "bad_status": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1).strip() if socket_errors else "none",
    }


async def _open_loop(port: int, path: str, rate: float, seconds: float, connections: int) -> dict:
    """Send ``rate`` GETs/s for ``seconds`` on ``connections`` keep-alive connections (round robin)."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\n\r\n".encode()
    streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(connections)]
    locks = [asyncio.Lock() for _ in streams]
    latencies: list[float] = []
    failures = 0

    async def one(i: int, scheduled: float) -> None:
        nonlocal failures
        reader, writer = streams[i % connections]
        async with locks[i % connections]:  # HTTP/1.1: one request at a time per connection
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length:\s*(\d+)", head)
            if length and int(length.group(1)):
                await reader.readexactly(int(length.group(1)))
        if not head.startswith((b"HTTP/1.1 302", b"HTTP/1.1 200")):
            failures += 1
        latencies.append(time.perf_counter() - scheduled)

    start = time.perf_counter() + 0.2
    total = int(rate * seconds)
    tasks = []
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, scheduled)))
    await asyncio.gather(*tasks)
    for _, writer in streams:
        writer.close()
    elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    return {"requests": total, "achieved_rate": total / elapsed, "failures": failures,
            "p50_ms": ordered[len(ordered) // 2] * 1000, "p99_ms": ordered[int(len(ordered) * 0.99) - 1] * 1000,
            "max_ms": ordered[-1] * 1000}


def run_fixed_rate(port: int, path: str, *, rate: int, seconds: int, connections: int) -> dict:
    """The open-loop generator, in a process of its own."""
    out = subprocess.run([sys.executable, __file__, "--generate", str(port), path, str(rate), str(seconds),
                          str(connections)], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---- the run ----------------------------------------------------------------------------------

def click_path() -> str:
    sys.path.insert(0, str(ROOT / "lib"))
    from inboxlift import tokens

    token = tokens.issue_click(key=KEY.encode(), issued_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1),
                               message_id="<wk-47.u0000042@shop.example>", campaign_id="wk-47", user_id="u0000042",
                               variant="A", position=3, item_id="i000042", target=TARGET)
    return f"/c/{token}"


def count_events(folder: Path) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in (folder / "landing" / "events" / "serve").glob("serve-*.jsonl"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="length of each measurement (default 10)")
    parser.add_argument("--rate", type=int, default=500, help="requests/s of the fixed-rate run (default 500)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                        help="uvicorn worker processes per server (default: one per core)")
    parser.add_argument("--connections", type=int, default=64, help="wrk's keep-alive connections (default 64)")
    parser.add_argument("--rate-connections", type=int, default=16,
                        help="connections of the fixed-rate generator (default 16)")
    parser.add_argument("--keep", action="store_true", help="keep .bench/serve (event files, logs)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2

    folder = ROOT / ".bench" / "serve"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = click_path()
    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    for name, start in (("peer", start_peer), ("inboxlift", start_inboxlift)):
        port = free_port()
        process = start(folder, port, args.workers)
        try:
            wait_ready(port, "/healthz", process)
            run_wrk(f"http://127.0.0.1:{port}{path}", seconds=2, connections=args.connections)  # warm-up
            cpu_before = cpu_seconds(process.pid)
            throughput = run_wrk(f"http://127.0.0.1:{port}{path}", seconds=args.seconds, connections=args.connections)
            throughput["cpu_us"] = 1e6 * (cpu_seconds(process.pid) - cpu_before) / throughput["requests"]
            fixed = run_fixed_rate(port, path, rate=args.rate, seconds=args.seconds, connections=args.rate_connections)
        finally:
            stop(process)
        results[name] = {"throughput": throughput, "fixed": fixed}
    load_after = os.getloadavg()

    ours, peer = results["inboxlift"], results["peer"]
    ratio = ours["throughput"]["requests_per_s"] / peer["throughput"]["requests_per_s"]
    recorded = count_events(folder)
    # Every answered click, warm-up included, is one line; wrk may also count a few cut at its end.
    print(f"machine: {os.cpu_count()} cores, load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
          f"{args.workers} uvicorn worker(s) per server; wrk -t1 -c{args.connections}, {args.seconds} s")
    print(f"{'':<11}{'clicks/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU us':>8}   at {args.rate}/s: {'p50 ms':>7}"
          f"{'p99 ms':>8}{'max ms':>8}{'rate':>8}")
    for name in ("peer", "inboxlift"):
        t, f = results[name]["throughput"], results[name]["fixed"]
        print(f"{name:<11}{t['requests_per_s']:>10,.0f}{t['p50_ms']:>9.2f}{t['p99_ms']:>9.2f}{t['cpu_us']:>8.0f}   "
              f"{'':>{len(str(args.rate)) + 4}}{f['p50_ms']:>7.2f}{f['p99_ms']:>8.2f}{f['max_ms']:>8.1f}"
              f"{f['achieved_rate']:>8.0f}")
    answered = ours["throughput"]["requests"] + ours["fixed"]["requests"]
    cpu_ratio = peer["throughput"]["cpu_us"] / ours["throughput"]["cpu_us"]
    print(f"ratio by CPU per click {cpu_ratio:.2f} (the servers' own CPU; on a shared machine the steadier figure)")
    print(f"throughput ratio {ratio:.2f} (goal >= 0.5); p99 at {args.rate}/s {ours['fixed']['p99_ms']:.2f} ms "
          f"(goal < 20); event lines {recorded:,} for {answered:,} measured clicks plus the warm-up")
    errors = [f"{n}: {r['throughput']['bad_status']} bad statuses, socket errors {r['throughput']['socket_errors']}, "
              f"{r['fixed']['failures']} fixed-rate failures" for n, r in results.items()
              if r["throughput"]["bad_status"] or r["fixed"]["failures"]]
    for error in errors:
        print("errors:", error)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    met = ratio >= 0.5 and ours["fixed"]["p99_ms"] < 20 and recorded >= answered and not errors
    return 0 if met else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--generate":
        port, path, rate, seconds, connections = sys.argv[2:7]
        print(json.dumps(asyncio.run(_open_loop(int(port), path, float(rate), float(seconds), int(connections)))))
        sys.exit(0)
    sys.exit(main())
