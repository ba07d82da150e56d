"""The collective ALS: each step against normal equations solved by hand, partition independence,
and the fit through Spark (planted tastes, the same factors as the in-process loop, errors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pyspark.ml.recommendation import ALSModel

from inboxlift.models import als, recommend
from inboxlift.models.als import (
    PartitionRatings,
    fit_collective_als,
    fit_items,
    initial_factors,
    packed_outer,
    solve_normal,
)


def test_packed_outer_keeps_the_upper_triangle_row_by_row():
    assert packed_outer(np.array([[1.0, 2.0], [3.0, -1.0]])).tolist() == [[1.0, 2.0, 4.0], [9.0, -3.0, 1.0]]


def test_solve_normal_unpacks_adds_the_gram_and_the_diagonal():
    # [[2,1],[1,3]] + I + 1 on the diagonal = [[4,1],[1,5]]; x = [[5,-1],[-1,4]] / 19 @ [1, 2]
    x = solve_normal(np.array([[2.0, 1.0, 3.0]]), np.eye(2), np.array([1.0]), np.array([[1.0, 2.0]]))
    assert x[0] == pytest.approx([3 / 19, 7 / 19])


ITEMS = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])   # y0, y1, y2; YtY = [[2, 1], [1, 2]]


def _one_user(items, ratings, *, alpha=1.0):
    part = PartitionRatings(np.full(len(items), 7), np.array(items), np.array(ratings, dtype=float), n_items=3,
                            rank=2, alpha=alpha, seed=1)
    part.solve_users(ITEMS, 0.5)
    return part.factors[0]


def test_a_user_step_solves_the_implicit_normal_equations():
    # Ratings 1 (item 0) and 2 (item 2), alpha 1: c - 1 = 1 and 2, c = 2 and 3, two positives.
    # A = YtY + 1*y0y0' + 2*y2y2' + 0.5*2*I = [[6, 3], [3, 5]]; b = 2*y0 + 3*y2 = [5, 3]
    # x = [[5, -3], [-3, 6]] / 21 @ [5, 3] = [16/21, 3/21]
    assert _one_user([0, 2], [1.0, 2.0]) == pytest.approx([16 / 21, 3 / 21])


def test_a_negative_rating_weighs_its_item_but_prefers_it_zero():
    # Item 1 rated -1 adds 1*y1y1' to A (A = [[6, 3], [3, 6]]) and nothing to b or to the positives:
    # x = [[6, -3], [-3, 6]] / 27 @ [5, 3] = [21/27, 3/27]
    assert _one_user([0, 2, 1], [1.0, 2.0, -1.0]) == pytest.approx([21 / 27, 3 / 27])


def test_a_repeated_pair_counts_twice_as_spark_adds_every_row():
    # Item 0 twice (1 each) and item 2 (2): A = YtY + 2*y0y0' + 2*y2y2' + 0.5*3*I = [[7.5, 3], [3, 5.5]],
    # b = 2*y0 + 2*y0 + 3*y2 = [7, 3]; x = [[5.5, -3], [-3, 7.5]] / 32.25 @ [7, 3]
    assert _one_user([0, 0, 2], [1.0, 1.0, 2.0]) == pytest.approx([(38.5 - 9) / 32.25, (-21 + 22.5) / 32.25])


def test_initial_factors_are_unit_vectors_fixed_by_seed_and_id():
    first = initial_factors(np.array([3, 10, 11]), 4, seed=5)
    assert np.linalg.norm(first, axis=1) == pytest.approx([1.0, 1.0, 1.0])
    assert initial_factors(np.array([11]), 4, seed=5)[0].tolist() == first[2].tolist()   # whatever the batch
    assert not np.allclose(initial_factors(np.array([11]), 4, seed=6)[0], first[2])
    assert not np.allclose(first[1], first[2])


class LocalTasks:
    """Partitions answering in-process, as the barrier tasks do over sockets."""

    def __init__(self, parts):
        self.parts = parts

    def ask(self, op, arrays, *, only=None):
        return [p.answer(op, arrays) for p in self.parts]


def _pairs(seed=3, users=40, items=12, per_user=4):
    rng = np.random.default_rng(seed)
    u = np.repeat(np.arange(users), per_user)
    i = rng.integers(0, items, size=u.size)
    r = rng.choice([1.0, 2.0, 3.0, -1.0], size=u.size, p=[0.5, 0.25, 0.15, 0.1])
    return u, i, r


def _fit_local(u, i, r, splits, *, items=12, rank=3, iterations=4):
    groups = [np.isin(u % splits, [s]) for s in range(splits)]
    parts = [PartitionRatings(u[g], i[g], r[g], n_items=items, rank=rank, alpha=2.0, seed=9) for g in groups]
    solution = fit_items(LocalTasks(parts), n_items=items, rank=rank, reg=0.1, max_iter=iterations)
    users = {int(uid): f for p in parts for uid, f in zip(p.user_ids, p.factors)}
    return solution, users


def test_the_factors_do_not_depend_on_how_users_are_split():
    u, i, r = _pairs()
    one, users_one = _fit_local(u, i, r, 1)
    for splits in (2, 3):
        many, users_many = _fit_local(u, i, r, splits)
        assert np.allclose(many.factors, one.factors, atol=1e-10)
        assert all(np.allclose(users_many[k], users_one[k], atol=1e-10) for k in users_one)
    assert one.seen.tolist() == [bool(x) for x in np.bincount(i, minlength=12)]


def test_the_item_step_is_the_normal_equations_over_all_users():
    # One item step by hand: users' factors from their initial draw, every item's system assembled
    # directly from the pairs.
    u, i, r = _pairs(users=10, items=5, per_user=3)
    x = initial_factors(np.arange(10), 2, seed=9)
    parts = [PartitionRatings(u[u < 5], i[u < 5], r[u < 5], n_items=5, rank=2, alpha=2.0, seed=9),
             PartitionRatings(u[u >= 5], i[u >= 5], r[u >= 5], n_items=5, rank=2, alpha=2.0, seed=9)]
    tasks = LocalTasks(parts)
    solution = fit_items(tasks, n_items=5, rank=2, reg=0.1, max_iter=1)
    # fit_items solved the items from the initial users, then moved the users: recompute the items.
    for item in range(5):
        rows = np.flatnonzero(i == item)
        a = x.T @ x + sum(2.0 * abs(r[k]) * np.outer(x[u[k]], x[u[k]]) for k in rows)
        a += 0.1 * sum(r[k] > 0 for k in rows) * np.eye(2)
        b = sum((1 + 2.0 * abs(r[k])) * x[u[k]] for k in rows if r[k] > 0) if any(r[rows] > 0) else np.zeros(2)
        assert solution.factors[item] == pytest.approx(np.linalg.solve(a, b))


# ---- through Spark ---------------------------------------------------------------------------------

def test_fit_on_spark_recovers_planted_tastes_and_is_an_als_model(spark, tmp_path):
    # Users 0-5 use items 0-3, users 6-11 items 4-7; each user has seen three items of their group.
    rows = [(u, (u + j) % 4 + (0 if u < 6 else 4), 1.0) for u in range(12) for j in range(3)]
    ratings = spark.createDataFrame(rows, "user_idx int, item_idx int, confidence double").repartition(3)
    model = fit_collective_als(ratings, user_col="user_idx", item_col="item_idx", rating_col="confidence",
                               rank=2, max_iter=10, reg_param=0.05, alpha=10.0, seed=1)
    assert isinstance(model, ALSModel) and model.rank == 2
    assert model.userFactors.count() == 12 and model.itemFactors.count() == 8
    for row in model.recommendForAllUsers(4).collect():
        group = range(0, 4) if row["user_idx"] < 6 else range(4, 8)
        assert {rec["item_idx"] for rec in row["recommendations"]} == set(group)
    model.write().save(str(tmp_path / "als"))
    loaded = ALSModel.load(str(tmp_path / "als"))
    assert sorted(loaded.userFactors.collect()) == sorted(model.userFactors.collect())
    # The user factors live in a folder of their own under the checkpoint directory until released.
    folder = Path(als._FOLDERS[model.uid].removeprefix("file:"))
    assert folder.is_dir() and folder.parent == Path(spark.sparkContext.getCheckpointDir().removeprefix("file:"))
    als.release_factors(model)
    assert not folder.exists() and model.uid not in als._FOLDERS
    assert ALSModel.load(str(tmp_path / "als")).userFactors.count() == 12   # the saved copy is its own


def test_fit_on_spark_gives_the_in_process_factors(spark):
    u, i, r = _pairs()
    ratings = spark.createDataFrame([(int(a), int(b), float(c)) for a, b, c in zip(u, i, r)],
                                    "user_idx int, item_idx int, confidence double")
    model = fit_collective_als(ratings, user_col="user_idx", item_col="item_idx", rating_col="confidence",
                               rank=3, max_iter=4, reg_param=0.1, alpha=2.0, seed=9)
    solution, users = _fit_local(u, i, r, 1)
    items = {row["id"]: row["features"] for row in model.itemFactors.collect()}
    assert sorted(items) == np.flatnonzero(solution.seen).tolist()
    for item, features in items.items():
        assert features == pytest.approx(solution.factors[item], abs=1e-6)   # float32 in the model
    for row in model.userFactors.collect():
        assert row["features"] == pytest.approx(users[row["id"]], abs=1e-6)


def test_bad_ratings_fail_the_fit_with_the_reason(spark):
    ratings = spark.createDataFrame([(0, 1, 1.0), (1, 2, None)], "user_idx int, item_idx int, confidence double")
    with pytest.raises(ValueError, match="ALS input, partition .*null"):
        fit_collective_als(ratings, user_col="user_idx", item_col="item_idx", rating_col="confidence",
                           rank=2, max_iter=1, reg_param=0.1, alpha=1.0, seed=1)
    negative = spark.createDataFrame([(0, -1, 1.0)], "user_idx int, item_idx int, confidence double")
    with pytest.raises(ValueError, match="non-negative"):
        fit_collective_als(negative, user_col="user_idx", item_col="item_idx", rating_col="confidence",
                           rank=2, max_iter=1, reg_param=0.1, alpha=1.0, seed=1)


def test_catalogues_too_large_to_sum_go_to_spark_als(spark, monkeypatch, capsys):
    monkeypatch.setattr(als, "MAX_ITEM_SUMS_BYTES", 100)
    ratings = spark.createDataFrame([(u, u % 3, 1.0) for u in range(6)], "user_idx int, item_idx int, confidence double")
    params = recommend.AlsParams(rank=2, reg_param=0.1, alpha=1.0, weights=(1.0, 1.0, 1.0), max_iter=2)
    model = recommend.fit_als(ratings, params)
    assert "fitting with Spark's ALS instead" in capsys.readouterr().out
    assert not model.uid.startswith("ALSModel_collective_")
    assert model.userFactors.count() == 6
    recommend.release_factors(model)   # nothing to release for Spark's ALS
    assert model.userFactors.count() == 6


def test_fewer_users_than_the_rank_still_solve():
    # Two users, rank 3: XᵀX is singular, and item 1 has only a negative rating (nothing regularises it).
    part = PartitionRatings(np.array([0, 0, 1]), np.array([0, 1, 2]), np.array([1.0, -1.0, 2.0]), n_items=4,
                            rank=3, alpha=1.0, seed=2)
    solution = fit_items(LocalTasks([part]), n_items=4, rank=3, reg=0.1, max_iter=3)
    assert np.isfinite(solution.factors).all() and np.isfinite(part.factors).all()
    assert solution.seen.tolist() == [True, True, True, False]
    assert solution.factors[3].tolist() == [0.0, 0.0, 0.0]
