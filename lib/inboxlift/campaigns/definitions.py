"""Campaign definitions: ``conf/campaigns.yml``, validated on load like the settings.

One entry per campaign under ``campaigns:``, keyed by its id::

    campaigns:
      weekly-picks:
        type: weekly_picks
        template: weekly_picks
        subjects:
          A: {en: "{{ first_name }}, your picks this week", zh-CN: "..."}
          B: {en: "Picked for you", zh-CN: "..."}
        split: {A: 0.5, B: 0.5}
        holdout: 0.1
        schedule: [mon]
        ...

An unknown key, a wrong type, shares that do not add up to 1, a variant without an English
subject or a locale without a template language is an error naming the campaign, the key and the
file. Types and their audience rules are in :mod:`inboxlift.campaigns.planning`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from inboxlift.settings import SettingsError, _build

CAMPAIGN_TYPES = ("weekly_picks", "abandoned_cart", "browse_abandonment", "win_back", "new_arrivals", "birthday",
                  "cross_sell")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
HOLDOUT = "holdout"
FALLBACK_LOCALE = "en"


@dataclass(frozen=True)
class FrequencyCap:
    """At most ``max_per_day`` emails a day and ``max_emails`` in the last ``days`` days (any campaign,
    planned or sent) per user; the campaign first in priority order takes the place."""

    max_emails: int = 2
    days: int = 7
    max_per_day: int = 1


@dataclass(frozen=True)
class QuietHours:
    """Local hours when nothing is sent: ``start`` (inclusive) to ``end`` (exclusive), across midnight if start > end."""

    start: int = 21
    end: int = 8


@dataclass(frozen=True)
class Audience:
    """Parameters of the type's audience rule (each type reads the ones it needs)."""

    # win_back: lifecycle stages that qualify.
    lifecycle_stages: list[str] = field(default_factory=lambda: ["lapsing", "lapsed"])
    # birthday: days from the campaign day that count as "birthday week" (0 = the day itself).
    birthday_window_days: int = 7
    # cross_sell: purchases within this many days before the campaign day.
    purchase_lookback_days: int = 14
    # weekly_picks: only users in these segments (empty = everyone).
    segments: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Experiment:
    """A campaign's A/B test, read once at a fixed horizon (README "Results and experiments").

    The test holds the sends of ``horizon_days`` days from ``start``; its verdict is read once the
    last of those days has had its whole attribution window. Until then the report shows the
    interim numbers and says "not enough data yet", so looking early cannot pick a winner by chance.
    """

    horizon_days: int = 14
    # The first send day of the test, YYYY-MM-DD (default: the campaign's first send day).
    start: str | None = None
    # The variant the others are compared with (default: the first one of ``split``).
    control: str | None = None


@dataclass(frozen=True)
class CampaignDefinition:
    type: Literal["weekly_picks", "abandoned_cart", "browse_abandonment", "win_back", "new_arrivals", "birthday",
                  "cross_sell"]
    template: str
    # variant -> locale -> Jinja2 subject line (sandboxed at render time).
    subjects: dict[str, dict[str, str]]
    # variant -> share of the users not held out; the shares add up to 1.
    split: dict[str, float]
    holdout: float = 0.1
    # Weekdays the campaign is due (``inboxlift run plan`` without --campaign plans the due ones).
    schedule: list[str] = field(default_factory=lambda: list(WEEKDAYS))
    frequency_cap: FrequencyCap = field(default_factory=FrequencyCap)
    quiet_hours: QuietHours = field(default_factory=QuietHours)
    locales: list[str] = field(default_factory=lambda: ["en", "zh-CN"])
    # A user gets the campaign again only after this many days.
    cooldown_days: int = 6
    # Fewer valid products than this: the user is skipped (nothing worth sending).
    min_products: int = 3
    max_products: int = 6
    # Lower runs first when several campaigns are planned together, and so wins the frequency cap.
    priority: int = 50
    enabled: bool = True
    audience: Audience = field(default_factory=Audience)
    experiment: Experiment = field(default_factory=Experiment)


@dataclass(frozen=True)
class CampaignFile:
    campaigns: dict[str, CampaignDefinition]


@dataclass(frozen=True)
class Campaign:
    """A definition with its id."""

    id: str
    spec: CampaignDefinition

    @property
    def control(self) -> str:
        """The variant an A/B test compares the others with."""
        return self.spec.experiment.control or next(iter(self.spec.split))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.spec, name)


def _check(campaign_id: str, spec: CampaignDefinition, source: str) -> None:
    def bad(key: str, why: str) -> SettingsError:
        return SettingsError(f"{source}: campaign '{campaign_id}' setting '{key}' {why}")

    if not spec.split:
        raise bad("split", "needs at least one variant")
    if any(v == HOLDOUT for v in spec.split):
        raise bad("split", f"may not name a variant {HOLDOUT!r} (the holdout is set by 'holdout')")
    if any(share <= 0 for share in spec.split.values()) or abs(sum(spec.split.values()) - 1.0) > 1e-9:
        raise bad("split", f"shares must be positive and add up to 1, got {spec.split}")
    if not 0.0 <= spec.holdout < 1.0:
        raise bad("holdout", f"must be in [0, 1), got {spec.holdout}")
    if set(spec.subjects) != set(spec.split):
        raise bad("subjects", f"must have one entry per variant {sorted(spec.split)}, got {sorted(spec.subjects)}")
    for variant, by_locale in spec.subjects.items():
        if FALLBACK_LOCALE not in by_locale:
            raise bad(f"subjects.{variant}", f"needs an '{FALLBACK_LOCALE}' subject (the fallback locale)")
    if FALLBACK_LOCALE not in spec.locales:
        raise bad("locales", f"must include '{FALLBACK_LOCALE}', the fallback")
    unknown_days = sorted(set(spec.schedule) - set(WEEKDAYS))
    if unknown_days:
        raise bad("schedule", f"has unknown weekdays {unknown_days}; use {', '.join(WEEKDAYS)}")
    for name, hour in (("quiet_hours.start", spec.quiet_hours.start), ("quiet_hours.end", spec.quiet_hours.end)):
        if not 0 <= hour <= 23:
            raise bad(name, f"must be an hour 0-23, got {hour}")
    if spec.quiet_hours.start != spec.quiet_hours.end and _quiet_length(spec.quiet_hours) >= 24:
        raise bad("quiet_hours", "leave no hour to send in")
    if spec.min_products < 0 or spec.max_products < max(1, spec.min_products):
        raise bad("max_products", f"must be >= 1 and >= min_products ({spec.min_products})")
    if spec.frequency_cap.max_emails < 1 or spec.frequency_cap.days < 1 or spec.frequency_cap.max_per_day < 1:
        raise bad("frequency_cap", "needs max_emails >= 1, days >= 1 and max_per_day >= 1")
    if spec.cooldown_days < 0:
        raise bad("cooldown_days", "must be >= 0")
    if spec.experiment.horizon_days < 1:
        raise bad("experiment.horizon_days", f"must be at least 1, got {spec.experiment.horizon_days}")
    if spec.experiment.start is not None:
        try:
            dt.date.fromisoformat(spec.experiment.start)
        except ValueError:
            raise bad("experiment.start", f"must be a date YYYY-MM-DD, got {spec.experiment.start!r}") from None
    if spec.experiment.control is not None and spec.experiment.control not in spec.split:
        raise bad("experiment.control", f"must be one of the variants {sorted(spec.split)}, "
                  f"got {spec.experiment.control!r}")


def _quiet_length(quiet: QuietHours) -> int:
    return (quiet.end - quiet.start) % 24


def parse_campaigns(data: Any, *, source: str) -> dict[str, Campaign]:
    if not isinstance(data, dict):
        raise SettingsError(f"{source}: the top level must be a mapping with a 'campaigns' key")
    parsed = _build(CampaignFile, data, source=source, path="")
    campaigns = {}
    for campaign_id, spec in parsed.campaigns.items():
        if not campaign_id.replace("-", "").replace("_", "").isalnum():
            raise SettingsError(f"{source}: campaign id '{campaign_id}' must be letters, digits, - and _")
        _check(campaign_id, spec, source)
        campaigns[campaign_id] = Campaign(campaign_id, spec)
    return campaigns


def load_campaigns(path: str | Path) -> dict[str, Campaign]:
    """Read and validate a campaigns file; raises :class:`SettingsError` naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"no campaigns file {path} (set paths.campaigns_file)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML: {exc}") from exc
    return parse_campaigns(data, source=str(path))
