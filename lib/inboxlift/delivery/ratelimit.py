"""Pacing one sending task: its share of the job-wide and per-domain rates, and back-off.

Each task gets ``1/connections`` of ``delivery.messages_per_second`` and of
``delivery.domain_messages_per_second``: with every task at its share, the job never passes either
limit, and no task has to talk to another. A relay's "slow down" (421, 451, 452) halves the task's
rate; each accepted message afterwards wins back a twentieth of it.
Plain Python: the clock and the sleep are passed in, so tests pace nothing for real.
"""

from __future__ import annotations

import time
from typing import Callable

# After a throttle the rate is halved, down to this share of the configured rate at most.
_MIN_SHARE = 1 / 64
# Accepted messages it takes to win the configured rate back after a halving.
_RECOVERY_STEPS = 20


class TaskPacer:
    """Waits before each message so the task keeps to ``rate`` messages per second overall and
    ``domain_rate`` per recipient domain (0: no limit)."""

    def __init__(self, *, rate: float, domain_rate: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.max_rate = rate
        self.rate = rate
        self.domain_rate = domain_rate
        self.clock = clock
        self.sleep = sleep
        self._next = 0.0
        self._next_by_domain: dict[str, float] = {}
        self.slept = 0.0

    def wait(self, domain: str) -> None:
        """Block until the next message to ``domain`` may go, and book its slot."""
        now = self.clock()
        ready = max(now, self._next if self.rate else now,
                    self._next_by_domain.get(domain, now) if self.domain_rate else now)
        if ready > now:
            self.sleep(ready - now)
            self.slept += ready - now
        if self.rate:
            self._next = ready + 1.0 / self.rate
        if self.domain_rate:
            self._next_by_domain[domain] = ready + 1.0 / self.domain_rate

    def slow_down(self) -> None:
        """The relay asked to slow down: halve the rate (an unlimited task drops to 10 per second)."""
        if not self.max_rate:
            self.max_rate = 10.0
            self.rate = 10.0
        self.rate = max(self.rate / 2, self.max_rate * _MIN_SHARE)

    def accepted(self) -> None:
        if self.rate < self.max_rate:
            self.rate = min(self.max_rate, self.rate + self.max_rate / _RECOVERY_STEPS)


def backoff_seconds(retry: int, *, first: float, cap: float) -> float:
    """The wait before retry number ``retry`` (1, 2, ...): ``first``, doubling, at most ``cap``."""
    return min(cap, first * 2 ** max(0, retry - 1))
