"""A real ``inboxlift serve`` process on loopback for the service's tests, and a concurrent httpx client.

The server is the command line's own (``python -m inboxlift.cli serve``), in a subprocess, so tests
can stop it gracefully (SIGTERM: uvicorn's shutdown, the event file renamed into place) or kill it
(SIGKILL: nothing runs, the in-progress file stays behind).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
KEY = "service-tests-signing-key-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """``inboxlift serve`` with its landing folder under ``folder``."""

    folder: Path
    settings: list[str] = field(default_factory=list)
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def events_dir(self) -> Path:
        return self.folder / "landing" / "events" / "serve"

    def start(self, timeout: float = 60.0) -> "Server":
        self.port = free_port()
        overrides = [f"paths.landing_dir={self.folder / 'landing'}", *self.settings]
        command = [sys.executable, "-m", "inboxlift.cli", "serve", "--conf-dir", str(ROOT / "conf"),
                   "--port", str(self.port), *[a for o in overrides for a in ("--set", o)]]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "lib"), "INBOXLIFT_SIGNING_KEY": KEY}
        log = open(self.folder / f"server-{self.port}.log", "ab")
        self.process = subprocess.Popen(command, cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}: {self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"the server did not answer within {timeout} s: {self.log()[-3000:]}")

    def log(self) -> str:
        return (self.folder / f"server-{self.port}.log").read_text(encoding="utf-8", errors="replace")

    def stop(self) -> int:
        """SIGTERM and wait: uvicorn shuts down, the service renames its event file into place."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def event_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.jsonl") if not p.name.startswith("."))


def in_progress_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.jsonl"))


def read_events(folder: Path) -> list[dict[str, Any]]:
    """Every line of the finished event files, parsed (a torn line raises)."""
    return [json.loads(line) for path in event_files(folder) for line in path.read_text("utf-8").splitlines()]


def flood(base_url: str, requests: list[tuple[str, str, dict]], *, concurrency: int = 16,
          statuses: list[int | None] | None = None) -> list[int | None]:
    """Send the requests ``concurrency`` at a time; each one's status, None when it got no answer.

    One thread per connection, each with its own keep-alive ``httpx.Client``: on this project's
    2-core machines that sends several times more requests per second than one ``AsyncClient``
    with as many connections. ``statuses`` (one None per request) is filled in as answers come, for
    a caller watching from another thread.
    """
    statuses = statuses if statuses is not None else [None] * len(requests)
    queue = iter(range(len(requests)))
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(base_url=base_url, timeout=30) as client:
            while True:
                with lock:
                    i = next(queue, None)
                if i is None:
                    return
                method, path, kwargs = requests[i]
                try:
                    statuses[i] = client.request(method, path, **kwargs).status_code
                except httpx.TransportError:
                    continue

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses
