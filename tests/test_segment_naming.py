"""Segment profiles and names: the rules, prospects, and names that tell alike segments apart, on
hand-written centroids and hand-computed profiles."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import pytest

from inboxlift.models.segments.features import CLUSTER_COL
from inboxlift.models.segments.naming import (
    NAMING_RULES,
    SegmentCentroid,
    cluster_profiles,
    distinction,
    finish_profiles,
    name_segment,
    name_segments,
    relabel_stage,
)
from inboxlift.settings import SegmentNaming
from planted_segments import TEST_PARAMS

NAMING = SegmentNaming()
ROLES = ("recency", "frequency", "monetary", "order_value", "activity", "inactivity", "open_rate", "tenure")


def centroid(cluster=0, size=10, bargain=None, no_order=None, other=None, **means) -> SegmentCentroid:
    return SegmentCentroid(cluster=cluster, size=size, means={r: means.get(r) for r in ROLES},
                           bargain_band_share=bargain, no_order_share=no_order, other_means=other or {})


ALL = centroid(cluster=-1, size=100, recency=40.0, frequency=4.0, monetary=400.0, order_value=80.0,
               inactivity=20.0, open_rate=0.2, tenure=200.0, bargain=0.3, no_order=0.2)


# ---- the rules -------------------------------------------------------------------------------------

@pytest.mark.parametrize("segment, expected", [
    # monetary 900 >= 2*400, orders 7 >= 1.5*4, recency 10 < 45.
    (centroid(recency=10.0, frequency=7.0, monetary=900.0, tenure=300.0), "VIP loyal"),
    # Rich and frequent but 50 days since the last order: no longer VIP, at risk.
    (centroid(recency=50.0, frequency=7.0, monetary=900.0, tenure=300.0), "at-risk big spenders"),
    # monetary 600 >= 1.5*400 (not 2x), recent: not VIP, not at risk; frequency 5 >= 4: loyal regulars.
    (centroid(recency=10.0, frequency=5.0, monetary=600.0, tenure=300.0, inactivity=5.0), "loyal regulars"),
    # tenure 20 <= 30 and orders 1 <= 0.5*4.
    (centroid(recency=20.0, frequency=1.0, monetary=30.0, tenure=20.0, inactivity=2.0), "new browsers"),
    # Inactivity 90 >= 60 days (recency alone would not say so: it is 30).
    (centroid(recency=30.0, frequency=1.0, monetary=50.0, tenure=400.0, inactivity=90.0), "dormant"),
    # Without an inactivity value the rule falls back to recency.
    (centroid(recency=70.0, frequency=1.0, monetary=50.0, tenure=400.0), "dormant"),
    # 50% budget users vs 30% overall >= 1.5x.
    (centroid(recency=10.0, frequency=2.0, monetary=150.0, tenure=300.0, inactivity=3.0, bargain=0.5),
     "bargain hunters"),
    # Or: order value 40 <= 0.6*80.
    (centroid(recency=10.0, frequency=2.0, monetary=150.0, order_value=40.0, tenure=300.0, inactivity=3.0),
     "bargain hunters"),
    (centroid(recency=10.0, frequency=2.0, monetary=150.0, order_value=70.0, open_rate=0.35, tenure=300.0,
              inactivity=3.0), "engaged readers"),
    # Orders 0.4 <= 0.5*4, not new, not dormant, most of them have bought (no-order share 0.6 < 0.9).
    (centroid(recency=40.0, frequency=0.4, monetary=10.0, open_rate=0.2, tenure=400.0, inactivity=30.0,
              no_order=0.6), "browsers"),
    # Orders 3: neither <= 2 nor >= 4.
    (centroid(recency=10.0, frequency=3.0, monetary=150.0, order_value=70.0, open_rate=0.2, tenure=300.0,
              inactivity=3.0), "occasional shoppers"),
])
def test_naming_rules_on_hand_made_centroids(segment, expected):
    assert name_segment(segment, ALL, NAMING)[0] == expected


def test_customers_without_an_order_are_prospects_not_dormant():
    # 300 days without activity would make them dormant; 95% of them never ordered: prospects.
    never_bought = centroid(recency=300.0, frequency=0.05, monetary=2.0, tenure=300.0, inactivity=300.0,
                            no_order=0.95)
    assert name_segment(never_bought, ALL, NAMING) == ("prospects", NAMING_RULES[0][1])
    # Below prospect_min_share (0.9) the other rules decide.
    assert name_segment(dataclasses.replace(never_bought, no_order_share=0.85), ALL, NAMING)[0] == "dormant"
    # No frequency column, no share: the rule is skipped.
    assert name_segment(dataclasses.replace(never_bought, no_order_share=None), ALL, NAMING)[0] == "dormant"


def test_rules_with_missing_roles_are_skipped_and_a_name_is_always_given():
    no_money = centroid(recency=10.0, frequency=9.0, tenure=300.0)
    # No monetary column: neither VIP nor big spenders; frequency 9 >= 4 makes loyal regulars.
    assert name_segment(no_money, ALL, NAMING)[0] == "loyal regulars"
    nothing = centroid()
    assert name_segment(nothing, centroid(cluster=-1), NAMING)[0] == "occasional shoppers"
    # A population mean of 0 cannot anchor a ratio: the ratio rules are skipped, not all true.
    zero = centroid(cluster=-1, recency=40.0, frequency=0.0, monetary=0.0, tenure=200.0)
    assert name_segment(centroid(recency=10.0, frequency=0.0, monetary=0.0, tenure=300.0), zero,
                        NAMING)[0] == "occasional shoppers"
    assert NAMING_RULES[-1][0] == "occasional shoppers"


# ---- names that tell segments apart ----------------------------------------------------------------

# Dormant (recency >= 60, no inactivity column), none a big spender (monetary < 1.5 x 400).
BIG = centroid(cluster=0, recency=200.0, frequency=3.0, monetary=500.0, open_rate=0.3, tenure=500.0)
ONE_TIME = centroid(cluster=1, recency=250.0, frequency=1.0, monetary=50.0, open_rate=0.2, tenure=500.0)


def test_two_dormant_segments_are_named_by_what_separates_them():
    # Separation |log((a + f) / (b + f))|, f a tenth of the all-users mean:
    # monetary (f 40) log(540/90) = 1.79; frequency (f 0.4) log(3.4/1.4) = 0.89; open rate (f 0.02)
    # log(0.32/0.22) = 0.37; recency (f 4) log(204/254) = 0.22; tenure equal. Monetary wins, both ways.
    named = name_segments([ONE_TIME, BIG], ALL, NAMING)
    assert [(n.segment_id, n.cluster, n.name) for n in named] == [
        (0, 0, "dormant, high past spend"), (1, 1, "dormant, low past spend")]
    big = named[0].distinctions[0]
    assert (big.column, big.value, big.others) == ("monetary", 500.0, 50.0) and big.ratio == pytest.approx(10.0)
    assert named[1].distinctions[0].ratio == pytest.approx(0.1)
    assert "told apart from the other 'dormant' segments by monetary 500 against 50 (10.00x)" in named[0].reason


def test_a_third_alike_segment_takes_its_own_distinction():
    # Against BIG and ONE_TIME (size-weighted), NEW differs most by tenure: log(60/520) = -2.16,
    # more than monetary log(90/315) = -1.25.
    new = centroid(cluster=2, recency=250.0, frequency=1.0, monetary=50.0, open_rate=0.2, tenure=40.0)
    names = {n.cluster: n.name for n in name_segments([BIG, ONE_TIME, new], ALL, NAMING)}
    assert names == {0: "dormant, high past spend", 1: "dormant, low past spend", 2: "dormant, newer"}


def test_segments_alike_after_one_distinction_get_a_second():
    # READER and SKIMMER both spend 50 against BIG's 500: both "low past spend" first. Between the
    # two, only the open rate differs: log(0.22/0.52) = -0.86.
    reader = dataclasses.replace(ONE_TIME, cluster=1, means={**ONE_TIME.means, "open_rate": 0.5})
    skimmer = dataclasses.replace(ONE_TIME, cluster=2, means={**ONE_TIME.means, "open_rate": 0.2})
    named = {n.cluster: n for n in name_segments([BIG, reader, skimmer], ALL, NAMING)}
    assert named[1].name == "dormant, low past spend, open emails"
    assert named[2].name == "dormant, low past spend, rarely open emails"
    assert [d.column for d in named[2].distinctions] == ["monetary", "open_rate"]
    # The second distinction is measured against the segment it was confused with only.
    assert named[2].distinctions[1].others == pytest.approx(0.5)


def test_features_without_a_role_can_tell_segments_apart():
    a = dataclasses.replace(ONE_TIME, cluster=0, other_means={"carts_30d": 4.0})
    b = dataclasses.replace(ONE_TIME, cluster=1, other_means={"carts_30d": 0.5})
    population = dataclasses.replace(ALL, other_means={"carts_30d": 1.0})
    assert distinction(a, [b], population).phrase == "high carts 30d"
    assert sorted(n.name for n in name_segments([a, b], population, NAMING)) == [
        "dormant, high carts 30d", "dormant, low carts 30d"]


def test_identical_segments_keep_their_id_rather_than_share_a_name():
    twins = [dataclasses.replace(ONE_TIME, cluster=0), dataclasses.replace(ONE_TIME, cluster=1)]
    assert [n.name for n in name_segments(twins, ALL, NAMING)] == ["dormant (segment 0)", "dormant (segment 1)"]


def test_segment_ids_follow_monetary_and_do_not_depend_on_cluster_numbers():
    vip = centroid(cluster=2, size=5, recency=10.0, frequency=9.0, monetary=950.0, tenure=500.0)
    named = name_segments([ONE_TIME, vip, BIG], ALL, NAMING)
    assert [(n.cluster, n.segment_id, n.name) for n in named] == [
        (2, 0, "VIP loyal"), (0, 1, "dormant, high past spend"), (1, 2, "dormant, low past spend")]
    # Renumbered clusters (another seed's numbering) give the same ids and names.
    renumbered = [dataclasses.replace(ONE_TIME, cluster=5), dataclasses.replace(vip, cluster=3),
                  dataclasses.replace(BIG, cluster=4)]
    assert [(n.cluster, n.segment_id, n.name) for n in name_segments(renumbered, ALL, NAMING)] == [
        (3, 0, "VIP loyal"), (4, 1, "dormant, high past spend"), (5, 2, "dormant, low past spend")]


# ---- profiles --------------------------------------------------------------------------------------

def test_profile_table_says_why_each_segment_has_its_name():
    raw = pd.DataFrame({CLUSTER_COL: [1, 0], "size": [30, 10], "mean_monetary": [50.0, 500.0]})
    named = name_segments([BIG, dataclasses.replace(ONE_TIME, size=30)], ALL, NAMING)
    profiles = finish_profiles(raw, named, total=40)
    assert list(profiles["segment_name"]) == ["dormant, high past spend", "dormant, low past spend"]
    assert list(profiles["model_cluster"]) == [0, 1]
    assert list(profiles["distinguished_by"]) == ["monetary", "monetary"]
    assert profiles["distinguishing_ratio"].tolist() == pytest.approx([10.0, 0.1])
    assert profiles["share"].tolist() == pytest.approx([0.25, 0.75])
    assert profiles["name_reason"][1].startswith("dormant: inactivity (else recency) >= dormant_days; told apart")
    # A segment its rule alone names has no distinction.
    alone = finish_profiles(raw.iloc[[1]], name_segments([BIG], ALL, NAMING), total=10)
    assert alone["distinguished_by"][0] == "" and math.isnan(alone["distinguishing_ratio"][0])


def test_profiles_by_hand(spark):
    schema = "user_id string, _seg_cluster int, orders int, monetary double, band string, cats array<string>"
    assigned = spark.createDataFrame([
        ("a", 0, 2, 100.0, "budget", ["x", "y"]),
        ("b", 0, 4, None, "budget", ["y"]),
        ("c", 0, 0, 50.0, "mid", ["z", "y"]),
        ("d", 1, 10, 1000.0, None, []),
        ("e", 1, None, 3000.0, "luxury", None),
    ], schema)
    params = dataclasses.replace(TEST_PARAMS, feature_columns=["orders", "monetary"], log_columns=[],
                                 roles={"frequency": "orders", "monetary": "monetary", "price_band": "band",
                                        "categories": "cats"}, top_categories=2)
    profiles, population = cluster_profiles(assigned, cluster_col=CLUSTER_COL, params=params)
    rows = {int(r[CLUSTER_COL]): r for r in profiles.to_dict("records")}
    assert rows[0]["size"] == 3 and rows[1]["size"] == 2
    assert rows[0]["mean_orders"] == pytest.approx(2.0)
    # The mean over users who have a value: (100 + 50) / 2.
    assert rows[0]["mean_monetary"] == pytest.approx(75.0)
    # Orders 0 (c) and unknown (e) count as no order.
    assert rows[0]["no_order_share"] == pytest.approx(1 / 3) and rows[1]["no_order_share"] == pytest.approx(0.5)
    assert rows[0]["top_price_band"] == "budget" and rows[1]["top_price_band"] == "luxury"
    assert rows[0]["bargain_band_share"] == pytest.approx(2 / 3)
    assert rows[1]["bargain_band_share"] == pytest.approx(0.0)
    # y in 3 lists, then x and z once each: the tie goes to the name first in order.
    assert rows[0]["top_categories"] == ["y", "x"]
    assert rows[1]["top_categories"] == []
    assert population["size"] == 5
    assert population["mean_orders"] == pytest.approx(16 / 4)
    assert population["mean_monetary"] == pytest.approx(4150 / 4)
    assert population["no_order_share"] == pytest.approx(2 / 5)
    assert population["bargain_band_share"] == pytest.approx(2 / 5)


def test_relabel_stage_maps_clusters_to_ids_and_names(spark):
    named = name_segments([ONE_TIME, BIG], ALL, NAMING)
    frame = spark.createDataFrame([(0,), (1,)], f"{CLUSTER_COL} int")
    out = {r[CLUSTER_COL]: (r["segment_id"], r["segment_name"], r["prediction"])
           for r in relabel_stage(named).transform(frame).collect()}
    assert out == {0: (0, "dormant, high past spend", 0), 1: (1, "dormant, low past spend", 1)}
