"""The recommender's models without the stages: Spark ML's ALS on planted tastes, item-based CF on
hand-written baskets, the hybrid's weight on a tiny case, the tuning search and the fit's settings."""

from __future__ import annotations

import datetime as dt
import math
import threading
import weakref
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from inboxlift.models.recommend.als import (
    AlsFitSettings,
    AlsParams,
    RatingsCache,
    als_blocks,
    als_top_k,
    checkpoint_dir,
    fit_als,
    fit_settings,
    local_task_slots,
    task_slots,
)
from inboxlift.models.recommend.evaluate import ranking_metrics
from inboxlift.models.recommend.itemcf import (
    ItemCfParams,
    blend,
    item_similarities,
    itemcf_top_k,
    recent_baskets,
)
from inboxlift.models.recommend.training import (
    RecommenderChoice,
    best_hybrid_weight,
    choose_recommender,
    hybrid_label,
)
from inboxlift.models.recommend.tuning import Round, cost, plan, schedule, successive_halving
from inboxlift.session import concurrently
from inboxlift.settings import RecommendSettings

PAIRS = "user_idx int, item_idx int, view_w double, cart_w double, purchase_w double"


# ---- ALS on a planted-taste shop -----------------------------------------------------------------

GROUPS, USERS_PER_GROUP, ITEMS_PER_GROUP, SEEN = 3, 24, 10, 5


def planted_pairs(spark):
    """3 taste groups x 24 users x 10 items: each user viewed 5 items of their group, carted one of them;
    every fourth user also viewed one item of the next group (noise)."""
    rows = []
    for g in range(GROUPS):
        for u in range(USERS_PER_GROUP):
            user = g * USERS_PER_GROUP + u
            for j in range(SEEN):
                item = g * ITEMS_PER_GROUP + (u * 3 + j * 7) % ITEMS_PER_GROUP
                rows.append((user, item, 1.0, 1.0 if j == 0 else 0.0, 0.0))
            if u % 4 == 0:
                rows.append((user, ((g + 1) % GROUPS) * ITEMS_PER_GROUP + u % ITEMS_PER_GROUP, 1.0, 0.0, 0.0))
    return spark.createDataFrame(rows, PAIRS)


def test_spark_als_recovers_planted_taste_groups_and_checkpoints_where_the_conf_says(spark):
    pairs = planted_pairs(spark)
    ratings = RatingsCache(pairs)
    params = AlsParams(rank=3, reg_param=0.05, alpha=10.0, weights=(1.0, 3.0, 8.0), max_iter=4, seed=3)
    fit = AlsFitSettings(num_user_blocks=2, num_item_blocks=2, checkpoint_interval=2)
    # Spark's own checkpoint directory, from the session conf (no sparkContext call)
    folder = Path(checkpoint_dir(spark).removeprefix("file:"))
    before = set(folder.rglob("rdd-*"))
    try:
        assert ratings.count((1.0, 3.0, 8.0)) == GROUPS * USERS_PER_GROUP * SEEN + GROUPS * USERS_PER_GROUP // 4
        model = fit_als(ratings.ratings((1.0, 3.0, 8.0)), params, fit)
    finally:
        ratings.release()
    assert model.rank == 3 and model.userFactors.count() == GROUPS * USERS_PER_GROUP
    assert set(folder.rglob("rdd-*")) - before, "ALS wrote no checkpoint under spark.checkpoint.dir"

    users = pairs.select("user_idx").distinct()
    top = als_top_k(model, users, k=3, block_size=16, chunk_size=8, exclusions=pairs.select("user_idx", "item_idx"))
    rows = top.collect()
    own = sum(1 for r in rows if r["item_idx"] // ITEMS_PER_GROUP == r["user_idx"] // USERS_PER_GROUP)
    # Hand-stated threshold: at least 90% of the top-3 unseen items of a user are of their own group
    # (5 unseen items per group are left; chance would give a third).
    assert len(rows) == GROUPS * USERS_PER_GROUP * 3
    assert own / len(rows) >= 0.9, f"only {own} of {len(rows)} recommendations from the user's own group"


def test_blocks_follow_the_task_slots_and_the_data(spark):
    # The test session runs local[2] and says spark.default.parallelism = 1: two tasks run at once,
    # whatever the shuffles' parallelism (before, the slots were read from the latter: 1 here, and
    # twice the cores in the local session, which gave ALS twice the blocks it has cores for).
    assert int(spark.conf.get("spark.default.parallelism")) == 1
    assert task_slots(spark) == 2
    assert spark.range(1000).select(F.spark_partition_id().alias("p")).distinct().count() == 1
    assert [local_task_slots(m, cpus=8) for m in ("local", "local[3]", "local[*]", "local[4,2]", "local[*, 3]",
                                                   "local-cluster[2,3,1024]")] == [1, 3, 8, 4, 8, 6]
    assert [local_task_slots(m) for m in ("yarn", "spark://host:7077", "sc://localhost", "unknown")] == [None] * 4
    # A Spark Connect client cannot count a remote server's cores: Spark is asked instead.
    assert local_task_slots("local[*]", on_this_machine=False) is None
    assert local_task_slots("local[3]", on_this_machine=False) == 3
    assert als_blocks(pairs=5_000_000, slots=64, min_pairs_per_block=200_000) == 25
    assert als_blocks(pairs=50_000_000, slots=64, min_pairs_per_block=200_000) == 64
    assert als_blocks(pairs=10, slots=64, min_pairs_per_block=200_000) == 1
    assert als_blocks(pairs=0, slots=8, min_pairs_per_block=200_000) == 1
    settings = RecommendSettings(num_user_blocks=0, num_item_blocks=6, intermediate_storage_level="MEMORY_ONLY",
                                 checkpoint_interval=3)
    assert fit_settings(settings, pairs=1_000_000, slots=4) == AlsFitSettings(
        num_user_blocks=4, num_item_blocks=6, intermediate_storage_level="MEMORY_ONLY",
        final_storage_level="MEMORY_AND_DISK", checkpoint_interval=3)


def test_ratings_are_prepared_once_per_weight_set(spark):
    pairs = spark.createDataFrame([(1, 2, 1.0, 0.0, 0.5), (1, 3, 0.0, 0.0, 0.0), (None, 3, 1.0, 0.0, 0.0)], PAIRS)
    cache = RatingsCache(pairs)
    try:
        first = cache.ratings((1.0, 3.0, 8.0))
        assert cache.ratings([1, 3, 8]) is first          # the same cached frame for the same weights
        # The all-zero pair and the pair without a user are left out; 1 * 1 + 8 * 0.5 = 5
        assert first.is_cached and cache.count((1, 3, 8)) == 1
        assert first.storageLevel.deserialized is True  # Spark's MEMORY_AND_DISK, the setting's default
        assert dict(first.dtypes) == {"user_idx": "int", "item_idx": "int", "confidence": "float"}
        assert [tuple(r) for r in first.collect()] == [(1, 2, 5.0)]
    finally:
        cache.release()
    assert not first.is_cached



def test_fits_running_at_once_share_one_cached_ratings_frame(spark):
    pairs = spark.createDataFrame([(1, 2, 1.0, 0.0, 0.5), (2, 3, 2.0, 0.0, 0.0)], PAIRS)
    cache = RatingsCache(pairs)
    together = threading.Barrier(3)

    def ask(_):
        together.wait(timeout=60)   # all three ask for the same weight set at the same moment
        return cache.ratings((1.0, 3.0, 8.0))

    try:
        frames = concurrently(ask, range(3), parallelism=3, spark=spark)
        # One frame built and cached, the same one for every fit: 1 + 8 * 0.5 = 5 and 2 * 1 = 2
        assert frames[1] is frames[0] and frames[2] is frames[0] and frames[0].is_cached
        assert cache.count((1, 3, 8)) == 2
        assert sorted(tuple(r) for r in frames[0].collect()) == [(1, 2, 5.0), (2, 3, 2.0)]
    finally:
        cache.release()

# ---- item-based CF by hand -----------------------------------------------------------------------

A, B, C, D, E = 1, 2, 3, 4, 5
T0 = dt.datetime(2026, 11, 1)
BASKET_SCHEMA = "user_idx int, item_idx int, last_ts timestamp"


def hand_pairs(spark):
    def at(day):
        return T0 + dt.timedelta(days=day)

    return spark.createDataFrame([
        (1, A, at(1)), (1, B, at(2)), (1, C, at(3)),
        (2, A, at(1)), (2, B, at(2)),
        (3, B, at(1)), (3, C, at(2)),
        (4, A, at(1)), (4, D, at(2)),
        (5, E, at(1)), (5, A, at(2)), (5, B, at(3)), (5, C, at(4)),  # E the oldest
        (6, None, at(1)),                                             # a null item
    ], BASKET_SCHEMA)


def test_item_cf_similarities_and_scores_by_hand(spark):
    pairs = hand_pairs(spark)
    baskets = recent_baskets(pairs, basket_items=3)
    # The cap keeps user 5's three latest items: E drops; the null row is gone
    assert sorted(r["item_idx"] for r in baskets.where("user_idx = 5").collect()) == [A, B, C]
    assert baskets.where("user_idx = 6").isEmpty()

    # Baskets holding each item: A 4 (users 1 2 4 5), B 4 (1 2 3 5), C 3 (1 3 5), D 1. Together: A-B 3, A-C 2,
    # B-C 3, A-D 1 (below min_support 2). Cosine: A-B 3/4, A-C 2/sqrt(12), B-C 3/sqrt(12).
    ab, ac, bc = 0.75, 2 / math.sqrt(12), 3 / math.sqrt(12)
    similar = item_similarities(baskets, params=ItemCfParams(basket_items=3, neighbours=2, min_support=2))
    assert similar.columns == ["item_idx", "rank", "similar_item_idx", "score"]
    rows = {(r[0], r[1]): (r[2], r[3]) for r in similar.collect()}
    assert rows == {(A, 1): (B, pytest.approx(ab)), (A, 2): (C, pytest.approx(ac)),
                    (B, 1): (C, pytest.approx(bc)), (B, 2): (A, pytest.approx(ab)),
                    (C, 1): (B, pytest.approx(bc)), (C, 2): (A, pytest.approx(ac))}

    # Scores: sum over basket items of the similarity, seen items excluded.
    # user 2 (A, B): C = ac + bc; user 3 (B, C): A = ab + ac; user 4 (A, D): B = ab, C = ac.
    seen = pairs.select("user_idx", "item_idx")
    top = {(r["user_idx"], r["rank"]): (r["item_idx"], r["score"])
           for r in itemcf_top_k(baskets, similar, k=2, exclusions=seen).collect()}
    assert top == {(2, 1): (C, pytest.approx(ac + bc)), (3, 1): (A, pytest.approx(ab + ac)),
                   (4, 1): (B, pytest.approx(ab)), (4, 2): (C, pytest.approx(ac))}
    # Only some items may be recommended, only some users scored
    allowed = spark.createDataFrame([(A,), (B,), (D,)], "item_idx int")
    only = itemcf_top_k(baskets, similar, k=2, exclusions=seen, candidate_items=allowed,
                        users=spark.createDataFrame([(3,), (4,)], "user_idx int"))
    assert sorted((r["user_idx"], r["item_idx"]) for r in only.collect()) == [(3, A), (4, B)]


def test_item_cf_of_nothing_is_nothing(spark):
    empty = recent_baskets(spark.createDataFrame([], BASKET_SCHEMA), basket_items=3)
    similar = item_similarities(empty, params=ItemCfParams())
    assert similar.isEmpty() and itemcf_top_k(empty, similar, k=5).isEmpty()


# ---- the hybrid's weight on a tiny case ----------------------------------------------------------

def test_the_hybrid_weight_is_chosen_on_validation(spark):
    # ALS: user 1 A .9 B .6 C .3, user 2 D .8 E .4; item-CF: user 1 C 2 D 1, user 2 E 3 F 1.5, user 3 (unknown
    # to ALS) B 1. Relevant: user 1 {A, C}, user 2 {E}. Each source's scores divided by the user's best:
    # ALS u1 A 1 B 2/3 C 1/3, u2 D 1 E 1/2; CF u1 C 1 D 1/2, u2 E 1 F 1/2.
    F_ = 6
    als = spark.createDataFrame([(1, A, 0.9), (1, B, 0.6), (1, C, 0.3), (2, D, 0.8), (2, E, 0.4)],
                                "user_idx int, item_idx int, score double")
    cf = spark.createDataFrame([(1, C, 2.0), (1, D, 1.0), (2, E, 3.0), (2, F_, 1.5), (3, B, 1.0)],
                               "user_idx int, item_idx int, score double")
    relevant = spark.createDataFrame([(1, A), (1, C), (2, E)], "user_idx int, item_idx int")
    users = spark.createDataFrame([(1,), (2,)], "user_idx int")

    half = {(r["user_idx"], r["rank"]): (r["item_idx"], r["score"], r["has_als"])
            for r in blend(als, cf, als_weight=0.5, k=2).collect()}
    # w = 0.5: u1 C 1/6 + 1/2 = 2/3, A 1/2; u2 E 1/4 + 1/2 = 3/4, D 1/2; u3 B 1/2 (item-CF only)
    assert half == {(1, 1): (C, pytest.approx(2 / 3), True), (1, 2): (A, pytest.approx(0.5), True),
                    (2, 1): (E, pytest.approx(0.75), True), (2, 2): (D, pytest.approx(0.5), True),
                    (3, 1): (B, pytest.approx(0.5), False)}

    def ndcg(weight):
        return ranking_metrics(blend(als, cf, als_weight=weight, k=2), relevant, users=users, k=2,
                               catalog_size=6, metrics=("ndcg",)).ndcg

    one_of_two_first = 1 / (1 + 1 / math.log2(3))   # one hit at rank 1 of two relevant items
    # w = .25: u1 C D (one hit first), u2 E F (hit first); w = .5: both perfect;
    # w = .75: u1 A, then B and C tie at 1/2 (B, the smaller index), u2 D E (hit second)
    scores = {hybrid_label(0.25): (one_of_two_first + 1) / 2, hybrid_label(0.5): 1.0,
              hybrid_label(0.75): (one_of_two_first + 1 / math.log2(3)) / 2}
    for label, value in scores.items():
        assert ndcg(float(label.split("=")[1])) == pytest.approx(value)
    # ALS alone ranks like w = .75 here, item-CF alone like w = .25
    scores.update({"als": scores[hybrid_label(0.75)], "itemcf": scores[hybrid_label(0.25)]})
    assert best_hybrid_weight(scores, [0.25, 0.5, 0.75]) == 0.5
    params = AlsParams(rank=4, reg_param=0.1, alpha=1.0, weights=(1.0, 3.0, 8.0))
    choice = choose_recommender(params, scores, kinds={"als", "itemcf", "hybrid"}, hybrid_weights=[0.25, 0.5, 0.75],
                                itemcf=ItemCfParams())
    assert (choice.kind, choice.als_weight, choice.similar_items_source) == ("hybrid", 0.5, "itemcf")
    # Without the hybrid, item-CF wins; ties go to ALS
    assert choose_recommender(params, scores, kinds={"als", "itemcf"}, hybrid_weights=[0.5],
                              itemcf=ItemCfParams()).kind == "itemcf"
    tie = choose_recommender(params, {"als": 0.4, "itemcf": 0.4}, kinds={"als", "itemcf"}, hybrid_weights=[],
                             itemcf=ItemCfParams())
    assert (tie.kind, tie.similar_items_source) == ("als", "als")
    # The choice survives MLflow's params (strings) and back
    assert RecommenderChoice.from_params(choice.as_params("chosen"), "chosen") == choice


# ---- the search ----------------------------------------------------------------------------------

def test_successive_halving_schedule_budget_and_survivors():
    assert schedule(1, 10) == [Round(1, 10)]
    # 9 candidates with 4 iterations each (the fewest), the best 3 with 10: 36 + 30 iterations. Between 4
    # and 10 there is no third iteration count, so two rounds, the last keeping the best of three.
    assert schedule(9, 10) == [Round(9, 4), Round(3, 10)] and cost(schedule(9, 10)) == 66
    assert schedule(3, 10) == [Round(3, 4), Round(1, 10)]
    # With 20 iterations three rounds fit: 4, 7 and 20 iterations, a third kept each time
    assert schedule(27, 20) == [Round(27, 4), Round(9, 7), Round(3, 20)]
    # Fewer iterations than a round's least: one round, every candidate at max_iter
    assert schedule(5, 3) == [Round(5, 3)]

    grid = [AlsParams(rank=r, reg_param=0.1, alpha=a, weights=(1.0, 1.0, 1.0), max_iter=10)
            for r in (8, 16, 32) for a in (1.0, 10.0, 40.0)]
    everything, rounds = plan(grid, budget=66, seed=1)
    assert everything == grid and rounds == schedule(9, 10)
    sampled, rounds = plan(grid, budget=40, seed=1)   # 9 cost 66, 7 cost 58, 5 cost 40
    assert len(sampled) == 5 and rounds == schedule(5, 10) == [Round(5, 4), Round(2, 10)]
    assert sampled == sorted(sampled, key=grid.index) and plan(grid, budget=40, seed=1)[0] == sampled
    alone, rounds = plan(grid, budget=1, seed=1)   # less than one full fit: one sampled candidate, no halving
    assert len(alone) == 1 and alone[0] in grid and rounds == [Round(1, 10)]

    # A score that prefers rank 16 and alpha 10, more so with more iterations; each fit's "model" is its
    # params, so the model kept is the winner's own
    def score(params):
        value = 1.0 - abs(params.rank - 16) / 100 - abs(params.alpha - 10) / 1000 + params.max_iter / 10_000
        return value, 0.0, params

    winner, model, points = successive_halving(grid, schedule(9, 10), score)
    assert (winner.rank, winner.alpha, winner.max_iter) == (16, 10.0, 10) and model == winner
    assert [(p.round, p.params.max_iter) for p in points] == [(0, 4)] * 9 + [(1, 10)] * 3
    assert {(p.params.rank, p.params.alpha) for p in points if p.round == 1} == {(16, 1.0), (16, 10.0), (16, 40.0)}


def test_successive_halving_chooses_the_same_whatever_order_its_fits_end_in_and_drops_losers():
    grid = [AlsParams(rank=r, reg_param=0.1, alpha=a, weights=(1.0, 1.0, 1.0), max_iter=10)
            for r in (8, 16, 32) for a in (1.0, 10.0, 40.0)]

    class Fitted:   # a model whose lifetime the test can watch
        def __init__(self, params):
            self.params = params

    alive = weakref.WeakSet()
    most_alive = []

    def score(params):
        most_alive.append(len(alive))
        model = Fitted(params)
        alive.add(model)
        # Rank 16 wins; its three alphas tie at 10 iterations, so the first listed (alpha 1) must be chosen
        value = 1.0 - abs(params.rank - 16) / 100 + (0.0 if params.max_iter == 10 else params.alpha / 1000)
        return value, 0.0, model

    def backwards(step, items):   # the last candidate's fit ends first, the results in the candidates' order
        return [step(item) for item in reversed(items)][::-1]

    winner, model, points = successive_halving(grid, schedule(9, 10), score)
    # One model at a time and the best so far: a loser is gone before the next fit starts
    assert max(most_alive) <= 1 and len(alive) == 1 and model.params == winner
    assert (winner.rank, winner.alpha, winner.max_iter) == (16, 1.0, 10)

    del model
    assert len(alive) == 0   # nothing else kept a model
    most_alive.clear()
    again, again_model, again_points = successive_halving(grid, schedule(9, 10), score, run_round=backwards)
    assert again == winner and again_model.params == winner and again_points == points
    assert max(most_alive) <= 1
