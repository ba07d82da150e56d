"""Blocked top-k and similarity against brute-force numpy on tiny factor sets, and content vectors by hand."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from inboxlift.models import similar
from inboxlift.models.similar import (
    content_similar,
    content_vectors,
    decode_keys,
    order_keys,
    _at_least,
    score_block,
    similar_items,
    top_k_blocked,
)


def brute_top_k(queries: np.ndarray, q_ids, candidates: np.ndarray, c_ids, k: int, excluded=None):
    """Score desc, then id asc, excluded pairs left out: the order the blocked code must reproduce."""
    out = {}
    for qi, q in zip(q_ids, queries):
        scored = [(-float(np.float32(q @ c)), int(ci)) for ci, c in zip(c_ids, candidates)
                  if (excluded is None or ci not in excluded.get(qi, set()))]
        out[int(qi)] = [(ci, -s) for s, ci in sorted(scored)[:k]]
    return out


def test_order_keys_sort_by_score_then_smaller_id_and_decode_back():
    scores = np.array([[0.5, -2.0, 0.5, -0.25, 3.0, 0.0, -1e-30, -np.inf]], dtype=np.float32)
    ids = np.array([7, 1, 3, 9, 2, 4, 5, 6])
    keys = order_keys(scores, ids)
    order = ids[np.argsort(keys[0])[::-1]]
    # 3.0 | 0.5 (ids 3 before 7) | 0.0 | -1e-30 | -0.25 | -2.0 | -inf
    assert order.tolist() == [2, 3, 7, 4, 5, 9, 1, 6]
    decoded_ids, decoded_scores = decode_keys(keys)
    assert decoded_ids[0].tolist() == ids.tolist()
    assert decoded_scores[0].tolist() == scores[0].tolist()


def _table(ids, vectors, exclude=None) -> pa.Table:
    columns = {"id": pa.array(ids, pa.int32()),
               "features": pa.array([list(map(float, v)) for v in vectors], pa.list_(pa.float32()))}
    if exclude is not None:
        columns["exclude"] = pa.array(exclude, pa.list_(pa.int32()))
    return pa.table(columns)


def _chunks(ids, vectors, size: int) -> pa.Table:
    """Candidates packed as top_k_blocked packs them: one row per chunk of ``size``."""
    ids, vectors = list(ids), [list(map(float, v)) for v in vectors]
    starts = range(0, len(ids), size)
    return pa.table({"ids": pa.array([ids[i:i + size] for i in starts], pa.list_(pa.int32())),
                     "features": pa.array([sum(vectors[i:i + size], []) for i in starts], pa.list_(pa.float32()))})


def test_score_block_matches_brute_force_with_chunks_and_exclusions():
    rng = np.random.default_rng(4)
    q = rng.normal(size=(6, 3)).astype(np.float32)
    c = rng.normal(size=(11, 3)).astype(np.float32)
    q_ids, c_ids = [10, 11, 12, 13, 14, 15], [40, 31, 32, 33, 34, 35, 36, 37, 38, 39, 30]
    exclude = [[31, 32], None, [], [99], [30, 31, 32, 33, 34, 35, 36, 37, 38], list(c_ids)]
    out = score_block(_table(q_ids, q, exclude), _chunks(c_ids, c, 3), k=4, has_exclude=True,
                      exclude_self=False).to_pylist()
    expected = brute_top_k(q, q_ids, c, c_ids, 4, {qi: set(e or []) for qi, e in zip(q_ids, exclude)})
    got: dict[int, list] = {}
    for row in out:
        got.setdefault(row["query_id"], []).append((row["rank"], row["item_id"], row["score"]))
    for qi in q_ids:
        rows = sorted(got.get(qi, []))
        assert [r[0] for r in rows] == list(range(1, len(rows) + 1))
        assert [r[1] for r in rows] == [e[0] for e in expected[qi]]
        assert [r[2] for r in rows] == pytest.approx([e[1] for e in expected[qi]], rel=1e-6)
    # 14 may only get 39 and 40; 15 excluded everything
    assert [r[1] for r in sorted(got[14])] == sorted([39, 40], key=lambda i: -float(q[4] @ c[c_ids.index(i)]))
    assert 15 not in got


def test_ties_go_to_the_smaller_id_in_every_chunking():
    queries = _table([1, 2], [[0.0, 0.0], [1.0, 0.0]])
    for chunk in (1, 2, 3, 4):
        candidates = _chunks([9, 3, 5, 7], [[1, 0], [1, 0], [1, 0], [2, 0]], chunk)
        rows = score_block(queries, candidates, k=2, has_exclude=False, exclude_self=False)
        # query 1 scores 0 everywhere: ids 3 and 5; query 2: 7 (score 2), then 3 of the three tied at 1
        assert [(r["query_id"], r["rank"], r["item_id"], r["score"]) for r in rows.to_pylist()] == [
            (1, 1, 3, 0.0), (1, 2, 5, 0.0), (2, 1, 7, 2.0), (2, 2, 3, 1.0)]


def test_score_block_empty_sides():
    empty = _table([], np.zeros((0, 2)))
    assert score_block(empty, _chunks([1], [[1.0, 0.0]], 2), k=2, has_exclude=False,
                       exclude_self=False).num_rows == 0
    assert score_block(_table([1], [[1.0, 0.0]]), _chunks([], [], 2), k=2, has_exclude=False,
                       exclude_self=False).num_rows == 0


def _small_factors(seed: int):
    """13 query and 9 candidate vectors of rank 4, and the exclusions both Spark tests use
    (112 excludes every candidate)."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(13, 4)).astype(np.float32)
    c = rng.normal(size=(9, 4)).astype(np.float32)
    return q, c, list(range(100, 113)), list(range(9)), {100: {0, 1}, 105: {3}, 112: set(range(9))}


def test_top_k_blocked_on_spark_equals_brute_force(spark):
    q, c, q_ids, c_ids, excluded = _small_factors(7)
    queries = spark.createDataFrame(
        [(i, v.tolist(), sorted(excluded[i]) if i in excluded else None) for i, v in zip(q_ids, q)],
        "id int, features array<float>, seen array<int>")
    candidates = spark.createDataFrame([(i, v.tolist()) for i, v in zip(c_ids, c)], "id int, features array<float>")
    rows = top_k_blocked(queries, candidates, k=3, block_size=4, chunk_size=2, exclude_col="seen").collect()
    got: dict[int, list] = {}
    for r in sorted(rows, key=lambda r: (r["query_id"], r["rank"])):
        got.setdefault(r["query_id"], []).append((r["item_id"], r["score"]))
    expected = brute_top_k(q, q_ids, c, c_ids, 3, excluded)
    assert set(got) == set(q_ids) - {112}
    for qi in got:
        assert [i for i, _ in got[qi]] == [i for i, _ in expected[qi]]
        assert [s for _, s in got[qi]] == pytest.approx([s for _, s in expected[qi]], rel=1e-5)
    assert top_k_blocked(queries.limit(0), candidates, k=3, block_size=4, chunk_size=2).isEmpty()


def test_similar_items_is_cosine_without_the_item_itself(spark):
    factors = np.array([[1, 0, 0], [2, 0.1, 0], [0, 1, 0], [0, 3, 0.2], [1, 1, 0], [-1, 0, 0], [0, 0, 0]],
                       dtype=np.float32)
    frame = spark.createDataFrame([(i, v.tolist()) for i, v in enumerate(factors)], "id int, features array<float>")
    in_stock = spark.createDataFrame([(i,) for i in (0, 1, 2, 3, 5, 6)], "id int")  # 4 is out of stock
    rows = similar_items(frame, k=2, block_size=3, chunk_size=2, candidate_ids=in_stock).collect()
    got: dict[int, list] = {}
    for r in sorted(rows, key=lambda r: (r["item_idx"], r["rank"])):
        got.setdefault(r["item_idx"], []).append((r["similar_item_idx"], r["score"]))
    unit = {i: v / np.linalg.norm(v) for i, v in enumerate(factors) if np.linalg.norm(v) > 0}
    for i in unit:
        scored = sorted((-float(unit[i] @ unit[j]), j) for j in unit if j != i and j in (0, 1, 2, 3, 5))
        assert [j for j, _ in got[i]] == [j for _, j in scored[:2]]
        assert [s for _, s in got[i]] == pytest.approx([-s for s, _ in scored[:2]], rel=1e-5)
    # By hand: item 0's nearest is 1 (cos = 2 / sqrt(4.01)), item 4 (out of stock) still gets its list
    assert got[0][0] == (1, pytest.approx(2 / math.sqrt(4.01), rel=1e-6))
    assert 6 not in got and all(j != 4 for rows_ in got.values() for j, _ in rows_)


PRODUCTS = "item_id string, name string, description string, category_path string, brand string, price double"


def test_content_vectors_weigh_each_part_by_its_cosine(spark):
    products = spark.createDataFrame([
        ("a", "Trail shoe", "light running shoe", "Sports > Running > Shoes", "Stride", 60.0),
        ("b", "Road shoe", "light running shoe", "Sports > Running > Shoes", "Stride", 65.0),
        ("c", "Yoga mat", "thick mat", "Sports > Yoga > Mats", "Zenflow", 20.0),
        ("d", "Novel", "a mystery", "Books > Fiction", None, None),
        ("e", None, None, None, None, None),
    ], PRODUCTS)
    weights = {"category": 0.4, "brand": 0.2, "price_band": 0.1, "text": 0.3}
    vectors = content_vectors(products, weights=weights, text_features=64, price_edges=[25.0, 75.0, 200.0],
                              price_labels=["budget", "mid", "premium", "luxury"])
    v = {r["item_id"]: (r["group"], np.array(r["features"])) for r in vectors.collect()}
    assert {k: g for k, (g, _) in v.items()} == {"a": "sports", "b": "sports", "c": "sports", "d": "books", "e": ""}
    # a and b: same path, brand and band; descriptions equal, names differ ("trail" vs "road")
    text_ab = float(v["a"][1][-64:] @ v["b"][1][-64:]) / 0.3
    assert float(v["a"][1] @ v["b"][1]) == pytest.approx(0.4 + 0.2 + 0.1 + 0.3 * text_ab, abs=1e-5)
    # a and c share 1 of 3 path prefixes (cosine 1/3), nothing else: no brand, other band, no common word
    assert float(v["a"][1] @ v["c"][1]) == pytest.approx(0.4 / 3, abs=1e-5)
    assert float(v["a"][1] @ v["a"][1]) == pytest.approx(1.0, abs=1e-5)
    assert float(np.abs(v["e"][1]).sum()) == 0.0

    ids = vectors.join(spark.createDataFrame([(k, i) for i, k in enumerate("abcde")], "item_id string, id int"),
                       on="item_id", how="inner")
    rows = content_similar(ids, k=2, block_size=2, chunk_size=2).collect()
    got = {(r["item_idx"], r["rank"]): r["similar_item_idx"] for r in rows}
    # Within "sports" only; d (books) has no other book, e shares nothing with anyone
    assert got == {(0, 1): 1, (0, 2): 2, (1, 1): 0, (1, 2): 2, (2, 1): 0, (2, 2): 1}


def test_exclusions_as_pairs_reach_their_queries_block(spark):
    q, c, q_ids, c_ids, excluded = _small_factors(11)
    queries = spark.createDataFrame([(i, v.tolist()) for i, v in zip(q_ids, q)], "id int, features array<float>")
    candidates = spark.createDataFrame([(i, v.tolist()) for i, v in zip(c_ids, c)], "id int, features array<float>")
    # One row per pair, a pair repeated, and pairs of a query id that is not among the queries.
    pairs = [(qi, ci) for qi, items in excluded.items() for ci in sorted(items)] + [(100, 0), (999, 2), (999, 4)]
    exclusions = spark.createDataFrame(pairs, "id int, excluded_id int")
    rows = top_k_blocked(queries, candidates, k=3, block_size=4, chunk_size=2, exclusions=exclusions).collect()
    got: dict[int, list] = {}
    for r in sorted(rows, key=lambda r: (r["query_id"], r["rank"])):
        got.setdefault(r["query_id"], []).append(r["item_id"])
    expected = brute_top_k(q, q_ids, c, c_ids, 3, excluded)
    assert set(got) == set(q_ids) - {112}   # 112 excluded every candidate
    assert got == {qi: [i for i, _ in expected[qi]] for qi in got}
    assert not {0, 1} & set(got[100]) and 3 not in got[105]
    with pytest.raises(ValueError, match="excluded_id"):
        top_k_blocked(queries, candidates, k=3, block_size=4, chunk_size=2, exclusions=exclusions.select("id"))


def test_at_least_finds_the_same_entries_as_nonzero():
    rng = np.random.default_rng(3)
    for shape in [(7, 13), (64, 512), (5, 1), (3, 8)]:
        scores = rng.normal(size=shape).astype(np.float32)
        floor = np.quantile(scores, 0.9, axis=1).astype(np.float32)
        rows, cols = _at_least(scores, floor)
        want_rows, want_cols = np.nonzero(scores >= floor[:, None])
        assert rows.tolist() == want_rows.tolist() and cols.tolist() == want_cols.tolist()


def _exact_top(scores: np.ndarray, ids: np.ndarray, k: int) -> list[list[int]]:
    """Each row's k best ids by score desc, then id asc, by Python's sort."""
    return [[int(i) for _, i in sorted(zip(-row.astype(np.float64), ids))[:k]] for row in scores]


def test_passes_of_few_rows_with_a_ragged_tail_of_columns_are_exact(monkeypatch):
    # 2,500 candidates, 7 rows per pass; 512 bound groups cover 2,048 columns and the last 452 are
    # outside every group: they can still enter a row's top 10.
    monkeypatch.setattr(similar, "_PASS_SCORES", 7 * 2500)
    rng = np.random.default_rng(5)
    q = rng.normal(size=(40, 6)).astype(np.float32)
    c = rng.normal(size=(2500, 6)).astype(np.float32)
    c[2200:] *= 3.0  # the tail holds most of every row's best
    ids = np.arange(1000, 3500)
    out = score_block(_table(list(range(40)), q), _chunks(ids.tolist(), c, 700), k=10, has_exclude=False,
                      exclude_self=False).to_pylist()
    got = [[r["item_id"] for r in out if r["query_id"] == qi] for qi in range(40)]
    assert got == _exact_top(q @ c.T, ids, 10)
    assert sum(i >= 3200 for row in got for i in row) > 200  # the tail did win


def test_best_candidates_crowded_into_one_group_of_ids_are_exact():
    # Query 0's scores rise with the id, so its 10 best are the 10 highest ids; with ids spread
    # over the groups by id mod 512 the bound stays exact however the best cluster.
    columns = 3000
    rng = np.random.default_rng(8)
    c = np.stack([np.arange(columns) / columns, rng.normal(size=columns)], axis=1).astype(np.float32)
    q = np.vstack([[1.0, 0.0], np.stack([np.zeros(30), rng.uniform(0.5, 2.0, size=30)], axis=1)]).astype(np.float32)
    ids = np.arange(columns)
    out = score_block(_table(list(range(31)), q), _chunks(ids.tolist(), c, 1000), k=10, has_exclude=False,
                      exclude_self=False).to_pylist()
    got = [[r["item_id"] for r in out if r["query_id"] == qi] for qi in range(31)]
    assert got[0] == list(range(columns - 1, columns - 11, -1))
    assert got == _exact_top(q @ c.T, ids, 10)


def test_rows_left_with_fewer_than_k_candidates_get_only_those():
    # 600 candidates, query 1 may only get ids 5 and 9, query 2 none: no padding reaches the output.
    rng = np.random.default_rng(2)
    c = rng.normal(size=(600, 3)).astype(np.float32)
    q = rng.normal(size=(3, 3)).astype(np.float32)
    everything = list(range(600))
    exclude = [[], [i for i in everything if i not in (5, 9)], everything]
    out = score_block(_table([0, 1, 2], q, exclude), _chunks(everything, c, 250), k=4, has_exclude=True,
                      exclude_self=False).to_pylist()
    got = {qi: [(r["rank"], r["item_id"]) for r in out if r["query_id"] == qi] for qi in range(3)}
    assert [i for _, i in got[0]] == _exact_top(q[:1] @ c.T, np.arange(600), 4)[0]
    s5, s9 = float(q[1] @ c[5]), float(q[1] @ c[9])
    assert got[1] == ([(1, 5), (2, 9)] if s5 >= s9 else [(1, 9), (2, 5)])
    assert got[2] == []


def test_equal_scores_across_many_groups_go_to_the_smallest_ids():
    # 1,200 candidates all scoring 1.0 for the query: its top 5 are ids 0..4, whichever groups hold them.
    c = np.ones((1200, 2), dtype=np.float32)
    ids = np.arange(1200)[::-1].copy()  # given in reverse order
    out = score_block(_table([7], [[0.5, 0.5]]), _chunks(ids.tolist(), c, 500), k=5, has_exclude=False,
                      exclude_self=False).to_pylist()
    assert [(r["rank"], r["item_id"], r["score"]) for r in out] == [(1, 0, 1.0), (2, 1, 1.0), (3, 2, 1.0),
                                                                    (4, 3, 1.0), (5, 4, 1.0)]
