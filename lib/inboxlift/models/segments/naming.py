"""Segment profiles and names: per-cluster means in original units, rules, and names that tell segments apart.

The rules, the roles they read and how two segments the rules name alike are told apart are
described in ``docs/segments.md`` ("Segment ids, profiles and names").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
from pyspark.ml.feature import SQLTransformer
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from inboxlift.models.segments.features import CLUSTER_COL, NUMERIC_ROLES, PREDICTION, SEGMENT_ID, SEGMENT_NAME
from inboxlift.settings import SegmentNaming, SegmentSettings


@dataclass(frozen=True)
class SegmentCentroid:
    """A segment's profile as the naming rules see it, in original units.

    ``means``: role -> mean; ``other_means``: mean of each profiled column that plays no role (the
    other features), used only to tell apart segments the rules name alike; ``no_order_share``:
    share of the segment's users whose frequency is 0 or unknown.
    """

    cluster: int
    size: int
    means: dict[str, float | None]
    bargain_band_share: float | None = None
    no_order_share: float | None = None
    other_means: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Distinction:
    """What sets a segment apart from the others its rule named alike: one column, higher or lower."""

    column: str              # the role (recency, monetary, ...) or the feature column
    phrase: str              # what the name says, e.g. "high past spend"
    value: float             # the segment's mean
    others: float            # the size-weighted mean of the other segments of that name

    @property
    def ratio(self) -> float:
        return self.value / self.others if self.others else float("nan")

    def describe(self) -> str:
        ratio = f" ({self.ratio:.2f}x)" if not math.isnan(self.ratio) else ""
        return f"{self.column} {self.value:.4g} against {self.others:.4g}{ratio}"


@dataclass(frozen=True)
class NamedSegment:
    cluster: int
    segment_id: int
    name: str
    rule: str
    base_name: str = ""
    distinctions: tuple[Distinction, ...] = ()

    @property
    def reason(self) -> str:
        """Why the segment has its name: the rule, and what tells it apart from the others named alike."""
        text = f"{self.base_name or self.name}: {self.rule}"
        if self.distinctions:
            text += ("; told apart from the other '" + (self.base_name or self.name) + "' segments by "
                     + "; then ".join(d.describe() for d in self.distinctions))
        return text


# ---- profiles --------------------------------------------------------------------------------------

def profile_columns(params: SegmentSettings, available: Sequence[str]) -> list[str]:
    """Feature columns and numeric role columns present in the data, each once, features first."""
    columns = list(params.feature_columns)
    for role in NUMERIC_ROLES:
        column = params.roles.get(role)
        if column and column in available and column not in columns:
            columns.append(column)
    return columns


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def cluster_profiles(assigned: DataFrame, *, cluster_col: str, params: SegmentSettings) -> tuple[pd.DataFrame, dict]:
    """Per cluster: size, the mean of each profile column, the share without an order, price band
    facts, top categories.

    Returns the profile table (one row per cluster, so small) and the same means over all users.
    """
    columns = profile_columns(params, assigned.columns)
    band_col = params.roles.get("price_band")
    has_band = bool(band_col) and band_col in assigned.columns
    categories_col = params.roles.get("categories")
    has_categories = bool(categories_col) and categories_col in assigned.columns
    frequency_col = params.roles.get("frequency")

    aggregates = [F.count(F.lit(1)).alias("size"),
                  *[F.avg(F.col(c).cast("double")).alias(f"mean_{c}") for c in columns]]
    if frequency_col and frequency_col in assigned.columns:
        has_no_order = F.coalesce(F.col(frequency_col).cast("double"), F.lit(0.0)) <= 0
        aggregates.append(F.avg(F.when(has_no_order, 1.0).otherwise(0.0)).alias("no_order_share"))
    if has_band:
        is_bargain = F.col(band_col) == F.lit(params.naming.bargain_price_band)
        aggregates.append(F.avg(F.when(is_bargain, 1.0).otherwise(0.0)).alias("bargain_band_share"))
    # rollup adds the all-users row (cluster null; a real cluster is never null) in the same pass.
    rolled = assigned.rollup(cluster_col).agg(*aggregates).toPandas()
    # One row per cluster (k rows) and one all-users row from here on: small by construction.
    is_total = rolled[cluster_col].isna()
    population: dict[str, float | None] = {
        k: _finite_or_none(v) for k, v in rolled[is_total].iloc[0].to_dict().items() if k != cluster_col}
    rows = rolled[~is_total].astype({cluster_col: "int64"}).reset_index(drop=True)

    if has_band:
        bands = (assigned.where(F.col(band_col).isNotNull())
                 .groupBy(cluster_col, F.col(band_col).alias("band")).agg(F.count(F.lit(1)).alias("users")))
        # Total order (users, then band name) so a tie gives the same band in every run.
        by_users = Window.partitionBy(cluster_col).orderBy(F.desc("users"), F.asc("band"))
        top_band = (bands.withColumn("_rank", F.row_number().over(by_users)).where(F.col("_rank") == 1)
                    .select(cluster_col, "band").collect())
        best = {int(r[cluster_col]): r["band"] for r in top_band}
        rows["top_price_band"] = rows[cluster_col].map(lambda c: best.get(int(c)))
    if has_categories:
        counts = (assigned.select(cluster_col, F.explode(F.col(categories_col)).alias("category"))
                  .where(F.col("category").isNotNull())
                  .groupBy(cluster_col, "category").agg(F.count(F.lit(1)).alias("users")))
        by_users = Window.partitionBy(cluster_col).orderBy(F.desc("users"), F.asc("category"))
        top = (counts.withColumn("_rank", F.row_number().over(by_users))
               .where(F.col("_rank") <= params.top_categories)
               .select(cluster_col, "_rank", "category").collect())
        ranked: dict[int, list[tuple[int, str]]] = {}
        for r in top:
            ranked.setdefault(int(r[cluster_col]), []).append((int(r["_rank"]), r["category"]))
        rows["top_categories"] = rows[cluster_col].map(lambda c: [name for _, name in sorted(ranked.get(int(c), []))])
    return rows, population


def centroid_from_row(row: Mapping[str, Any], *, params: SegmentSettings, cluster: int) -> SegmentCentroid:
    """A profile row (or the all-users row, ``cluster=-1``) as the naming rules read it."""
    role_columns = {params.roles.get(role) for role in NUMERIC_ROLES}
    means = {role: (_finite_or_none(row.get(f"mean_{params.roles[role]}")) if params.roles.get(role) else None)
             for role in NUMERIC_ROLES}
    others = {c: _finite_or_none(row.get(f"mean_{c}")) for c in params.feature_columns if c not in role_columns}
    return SegmentCentroid(cluster=cluster, size=int(row["size"]), means=means,
                           bargain_band_share=_finite_or_none(row.get("bargain_band_share")),
                           no_order_share=_finite_or_none(row.get("no_order_share")), other_means=others)


def centroids_from_profiles(profiles: pd.DataFrame, *, cluster_col: str,
                            params: SegmentSettings) -> list[SegmentCentroid]:
    return [centroid_from_row(row, params=params, cluster=int(row[cluster_col]))
            for row in profiles.to_dict("records")]


# ---- rules -----------------------------------------------------------------------------------------

def _at_least(c: float | None, ratio: float, p: float | None) -> bool:
    return c is not None and p is not None and p > 0 and c >= ratio * p


def _at_most(c: float | None, ratio: float, p: float | None) -> bool:
    return c is not None and p is not None and p > 0 and c <= ratio * p


def _ge(c: float | None, threshold: float) -> bool:
    return c is not None and c >= threshold


def _lt(c: float | None, threshold: float) -> bool:
    return c is not None and c < threshold


Rule = Callable[[SegmentCentroid, SegmentCentroid, SegmentNaming], bool]


def _dormancy(c: SegmentCentroid) -> float | None:
    return c.means.get("inactivity") if c.means.get("inactivity") is not None else c.means.get("recency")


# (name, rule as written in the docs, predicate on (segment, all users, thresholds)), first match wins.
NAMING_RULES: list[tuple[str, str, Rule]] = [
    ("prospects",
     "share of users without an order >= prospect_min_share",
     lambda c, p, t: _ge(c.no_order_share, t.prospect_min_share)),
    ("VIP loyal",
     "monetary >= vip_monetary_ratio * all; frequency >= vip_frequency_ratio * all; recency < at_risk_recency_days",
     lambda c, p, t: (_at_least(c.means["monetary"], t.vip_monetary_ratio, p.means["monetary"])
                      and _at_least(c.means["frequency"], t.vip_frequency_ratio, p.means["frequency"])
                      and _lt(c.means["recency"], t.at_risk_recency_days))),
    ("at-risk big spenders",
     "monetary >= big_spender_monetary_ratio * all; recency >= at_risk_recency_days",
     lambda c, p, t: (_at_least(c.means["monetary"], t.big_spender_monetary_ratio, p.means["monetary"])
                      and _ge(c.means["recency"], t.at_risk_recency_days))),
    ("new browsers",
     "tenure <= new_tenure_days; frequency <= low_frequency_ratio * all",
     lambda c, p, t: (c.means["tenure"] is not None and c.means["tenure"] <= t.new_tenure_days
                      and _at_most(c.means["frequency"], t.low_frequency_ratio, p.means["frequency"]))),
    ("dormant",
     "inactivity (else recency) >= dormant_days",
     lambda c, p, t: _ge(_dormancy(c), t.dormant_days)),
    ("bargain hunters",
     "bargain band share >= bargain_band_share_ratio * all, or order_value <= bargain_order_value_ratio * all",
     lambda c, p, t: (_at_least(c.bargain_band_share, t.bargain_band_share_ratio, p.bargain_band_share)
                      or _at_most(c.means["order_value"], t.bargain_order_value_ratio, p.means["order_value"]))),
    ("engaged readers",
     "open_rate >= engaged_open_rate_ratio * all",
     lambda c, p, t: _at_least(c.means["open_rate"], t.engaged_open_rate_ratio, p.means["open_rate"])),
    ("browsers",
     "frequency <= low_frequency_ratio * all",
     lambda c, p, t: _at_most(c.means["frequency"], t.low_frequency_ratio, p.means["frequency"])),
    ("loyal regulars",
     "frequency >= all",
     lambda c, p, t: _at_least(c.means["frequency"], 1.0, p.means["frequency"])),
    ("occasional shoppers", "any other segment", lambda c, p, t: True),
]


def name_segment(centroid: SegmentCentroid, population: SegmentCentroid, naming: SegmentNaming) -> tuple[str, str]:
    """The first naming rule that holds for ``centroid``: ``(name, rule text)``."""
    for name, text, rule in NAMING_RULES:
        if rule(centroid, population, naming):
            return name, text
    raise AssertionError("the last naming rule always holds")


# ---- telling apart segments the rules name alike ---------------------------------------------------

# What a name says when a role's mean is higher or lower than the other segments' of the same name.
ROLE_PHRASES: dict[str, tuple[str, str]] = {
    "monetary": ("high past spend", "low past spend"),
    "frequency": ("frequent buyers", "few orders"),
    "recency": ("long since last order", "recent orders"),
    "order_value": ("large baskets", "small baskets"),
    "activity": ("frequent visitors", "rare visitors"),
    "inactivity": ("long inactive", "recently active"),
    "open_rate": ("open emails", "rarely open emails"),
    "tenure": ("long-standing", "newer"),
}
# Below this share of the all-users mean, a difference of means is noise: it floors both sides of the ratio.
_FLOOR_SHARE = 0.1


def _column_phrases(column: str) -> tuple[str, str]:
    label = column.replace("_", " ")
    return f"high {label}", f"low {label}"


def _candidate_means(c: SegmentCentroid) -> dict[str, tuple[float | None, tuple[str, str]]]:
    """Every mean a segment can be told apart by, in a fixed order: roles first, then other features."""
    means = {role: (c.means.get(role), ROLE_PHRASES[role]) for role in ROLE_PHRASES}
    means.update({column: (value, _column_phrases(column)) for column, value in sorted(c.other_means.items())})
    return means


def _weighted_mean(pairs: Sequence[tuple[float, int]]) -> float | None:
    total = sum(size for _, size in pairs)
    return sum(v * size for v, size in pairs) / total if total else None


def distinction(segment: SegmentCentroid, others: Sequence[SegmentCentroid], population: SegmentCentroid, *,
                exclude: frozenset[str] = frozenset()) -> Distinction | None:
    """The column whose mean most separates ``segment`` from ``others`` (size-weighted), or None.

    Separation is the absolute log ratio of the two means, each floored at a tenth of the all-users
    mean (so 0.1 against 0.3 orders, when users average 4, does not outweigh 60 against 900 spent).
    Ties go to the column listed first (roles, then features by name).
    """
    population_means = _candidate_means(population)
    best, best_score = None, 0.0
    for column, (value, (higher, lower)) in _candidate_means(segment).items():
        if column in exclude or value is None:
            continue
        other = _weighted_mean([(o_value, o.size) for o in others
                                if (o_value := _candidate_means(o)[column][0]) is not None])
        if other is None:
            continue
        anchor = population_means.get(column, (None,))[0]
        floor = _FLOOR_SHARE * abs(anchor) if anchor else _FLOOR_SHARE * max(abs(value), abs(other))
        if floor <= 0:
            continue
        score = abs(math.log((max(value, 0.0) + floor) / (max(other, 0.0) + floor)))
        if score > best_score:
            best_score = score
            best = Distinction(column=column, phrase=higher if value > other else lower, value=value, others=other)
    return best


def _tell_apart(group: Sequence[SegmentCentroid], population: SegmentCentroid, *,
                exclude: frozenset[str] = frozenset()) -> dict[int, tuple[Distinction, ...]]:
    """For segments sharing a name: the distinctions that make each one's name unique within the group."""
    found: dict[int, tuple[Distinction, ...]] = {}
    for segment in group:
        others = [o for o in group if o.cluster != segment.cluster]
        best = distinction(segment, others, population, exclude=exclude)
        found[segment.cluster] = (best,) if best else ()
    by_phrase: dict[tuple[str, ...], list[SegmentCentroid]] = {}
    for segment in group:
        by_phrase.setdefault(tuple(d.phrase for d in found[segment.cluster]), []).append(segment)
    for phrases, alike in by_phrase.items():
        if len(alike) < 2:
            continue
        used = exclude | {d.column for s in alike for d in found[s.cluster]}
        if not phrases or used == exclude:
            continue   # nothing left to tell them apart by
        deeper = _tell_apart(alike, population, exclude=used)
        for s in alike:
            found[s.cluster] = found[s.cluster] + deeper[s.cluster]
    return found


def segment_order(centroids: Sequence[SegmentCentroid]) -> list[int]:
    """Clusters in segment-id order: mean monetary value descending, then orders, size, raw cluster.

    A missing mean sorts last, so the order never depends on how the clusterer numbered clusters.
    """
    def key(c: SegmentCentroid) -> tuple:
        monetary, frequency = c.means.get("monetary"), c.means.get("frequency")
        return (monetary is None, -(monetary or 0.0), frequency is None, -(frequency or 0.0), -c.size, c.cluster)

    return [c.cluster for c in sorted(centroids, key=key)]


def name_segments(centroids: Sequence[SegmentCentroid], population: SegmentCentroid,
                  naming: SegmentNaming) -> list[NamedSegment]:
    """Segment ids and unique names for clusters, in segment-id order.

    Segments the rules give the same name are each named by what most separates them from the
    others of that name ("dormant, high past spend", "dormant, low past spend"); if that still
    leaves two alike, by the next column that separates those two. Only segments identical in
    every mean would keep their segment id as the last resort.
    """
    by_cluster = {c.cluster: c for c in centroids}
    order = segment_order(centroids)
    ruled = {cluster: name_segment(by_cluster[cluster], population, naming) for cluster in order}
    groups: dict[str, list[SegmentCentroid]] = {}
    for cluster in order:
        groups.setdefault(ruled[cluster][0], []).append(by_cluster[cluster])
    distinctions: dict[int, tuple[Distinction, ...]] = {}
    for alike in groups.values():
        if len(alike) > 1:
            distinctions.update(_tell_apart(alike, population))
    named = []
    for segment_id, cluster in enumerate(order):
        base, rule = ruled[cluster]
        found = distinctions.get(cluster, ())
        name = ", ".join([base, *(d.phrase for d in found)])
        named.append(NamedSegment(cluster=cluster, segment_id=segment_id, name=name, rule=rule, base_name=base,
                                  distinctions=found))
    counts: dict[str, int] = {}
    for n in named:
        counts[n.name] = counts.get(n.name, 0) + 1
    return [n if counts[n.name] == 1 else NamedSegment(
        cluster=n.cluster, segment_id=n.segment_id, name=f"{n.name} (segment {n.segment_id})", rule=n.rule,
        base_name=n.base_name, distinctions=n.distinctions) for n in named]


def finish_profiles(raw: pd.DataFrame, named: Sequence[NamedSegment], *, total: int) -> pd.DataFrame:
    """The profile table in segment-id order, with names, the rule and why each name was given."""
    by_cluster = {n.cluster: n for n in named}

    def of(attribute: Callable[[NamedSegment], Any]) -> pd.Series:
        return raw[CLUSTER_COL].map(lambda c: attribute(by_cluster[int(c)]))

    profiles = raw.copy()
    profiles.insert(0, SEGMENT_ID, of(lambda n: n.segment_id))
    profiles.insert(1, SEGMENT_NAME, of(lambda n: n.name))
    profiles.insert(2, "naming_rule", of(lambda n: n.rule))
    profiles.insert(3, "distinguished_by", of(lambda n: ", ".join(d.column for d in n.distinctions)))
    profiles.insert(4, "distinguishing_ratio",
                    of(lambda n: n.distinctions[0].ratio if n.distinctions else float("nan")))
    profiles.insert(5, "name_reason", of(lambda n: n.reason))
    profiles.insert(7, "share", profiles["size"] / total if total else 0.0)
    profiles = profiles.rename(columns={CLUSTER_COL: "model_cluster"})
    return profiles.sort_values(SEGMENT_ID).reset_index(drop=True)


def relabel_stage(named: Sequence[NamedSegment]) -> SQLTransformer:
    """Raw cluster -> ``segment_id``, ``segment_name`` and ``prediction`` (= segment_id, for MLflow's pyfunc)."""
    by_cluster = {n.cluster: n for n in named}
    clusters = range(max(by_cluster) + 1)
    ids = ", ".join(str(by_cluster[c].segment_id) if c in by_cluster else "NULL" for c in clusters)

    def quoted(text: str) -> str:
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"

    names = ", ".join(quoted(by_cluster[c].name) if c in by_cluster else "NULL" for c in clusters)
    segment_id = f"CAST(element_at(array({ids}), {CLUSTER_COL} + 1) AS INT)"
    return SQLTransformer(statement=(
        f"SELECT *, {segment_id} AS {SEGMENT_ID}, CAST(element_at(array({names}), {CLUSTER_COL} + 1) AS STRING) "
        f"AS {SEGMENT_NAME}, {segment_id} AS {PREDICTION} FROM __THIS__"))
