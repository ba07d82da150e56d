"""The one source of "now" for library code, so tests and back-fills can pin the date."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """The current instant, timezone-aware, in UTC."""

    def today(self) -> dt.date:
        """The current date in UTC."""


class SystemClock:
    """Wall-clock time. Built only at the entry points (jobs, CLI)."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)

    def today(self) -> dt.date:
        return self.now().date()


@dataclass(frozen=True)
class FixedClock:
    """A clock stopped at one instant: for tests and for re-running a past day."""

    instant: dt.datetime

    def __post_init__(self) -> None:
        if self.instant.tzinfo is None:
            raise ValueError("FixedClock needs a timezone-aware datetime")

    @classmethod
    def at(cls, iso: str) -> "FixedClock":
        """A clock at an ISO date or datetime; a naive value is read as UTC."""
        value = dt.datetime.fromisoformat(iso)
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return cls(value.astimezone(dt.timezone.utc))

    def now(self) -> dt.datetime:
        return self.instant

    def today(self) -> dt.date:
        return self.instant.date()
