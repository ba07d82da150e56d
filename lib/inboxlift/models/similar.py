"""Blocked top-k scoring, item-item similarity from ALS factors, and content-based item similarity.

**Blocked top-k** (:func:`top_k_blocked`) is how every "best k of a large set" is computed here:
ALS recommendations for all users, ``similar_items`` (cosine of ALS item factors) and
``content_similar_items``. Queries (users, or items) are hashed into blocks of about
``block_size``; the candidates are packed into chunks of about ``chunk_size`` (one row holding
their ids and concatenated vectors), each chunk is copied to every block (a shuffle of ``blocks x
chunks`` rows) and each block meets its chunks in one ``cogroup(...).applyInArrow`` call. There
numpy takes the block's queries a few rows at a time against all of its candidates (about 1 MiB of
scores per pass, so they stay in cache) and keeps each row's top k: no all-pairs table is ever
materialised, nothing is collected to the driver, and memory per task is the block and its
candidates' vectors.

Scores are ordered by one int64 key per (query, candidate): the float's bits, made order-preserving,
in the high half and ``2**32 - 1 - candidate_id`` in the low half. Keys are unique, so the top k is a
total order — ties in score go to the smaller candidate id — and the same in every run whatever
the partitioning. Keys are built only for the few scores that can enter a row's top k: in each pass
the maxima of 512 disjoint groups of candidates give a lower bound on every row's k-th best score
(the k-th largest maximum), one comparison with it finds about k entries per row (eight at a time,
as 64-bit words of the boolean mask), and only those are keyed and sorted (bench/README.md times
it). Excluded pairs (items a
user bought, an item itself) score -inf and never appear in the output, so a query may get fewer
than k rows. Exclusions given as pairs (``exclusions``: one row per query and excluded candidate,
millions of rows for "items already seen") are hashed to the same blocks as their queries, packed into one long per pair and gathered
per block (a partial aggregation, so the shuffle moves a few packed lists, not millions of rows),
then ride with the block's queries as a row of their own: no per-query grouping and no join.

**Content similarity** (:func:`content_vectors`): each item is four unit vectors — the category
path as its prefixes (``Sports``, ``Sports>Running``, ``Sports>Running>Shoes``), the brand, the
price band (one-hot over ``features.price_band_labels``), and the TF-IDF of its name and
description — scaled by the square roots of the normalised ``content_weights`` and concatenated.
The dot product of two items is then ``sum(weight_part * cosine_part)``: 1 for identical items, 0
for nothing in common. Category prefixes, brands (512 slots each) and words
(``content_text_features``) are hashed (``HashingTF``) so the vector needs no vocabulary on the
driver. Items are compared within their top-level category only (the query and candidate sets are grouped by it):
items in different departments share no category prefix, and leaving them out keeps the work at
``sum(n_category**2)`` rather than ``n**2``.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.ml import Pipeline
from pyspark.ml.feature import IDF, HashingTF, Normalizer, RegexTokenizer, StopWordsRemover
from pyspark.ml.functions import vector_to_array
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from inboxlift.schemas import require_columns

ID, IDS, FEATURES, EXCLUDE, GROUP = "id", "ids", "features", "exclude", "group"
TOP_K_SCHEMA = "query_id int, rank int, item_id int, score float"
CONTENT_PARTS = ("category", "brand", "price_band", "text")
# Hashed widths of the category-prefix and brand parts: two different values share a slot with
# probability 1/512, which adds that part's weight to the pair's similarity (noise, not bias that matters
# for ranking within a category). Price bands are few and known, so they are one-hot, exact.
CATEGORY_FEATURES, BRAND_FEATURES = 512, 512
_BLOCK, _GROUP_KEY = "_block", "_group"
# The query side of a block mixes two kinds of rows: queries, and lists of (query, excluded
# candidate) pairs packed as query_id << 32 | candidate_id (low 32 bits).
_KIND, _PAIRS = "_kind", "_pairs"
_QUERY_ROW, _PAIR_ROW = 0, 1
_LOW_MASK = np.int64(0xFFFFFFFF)


# ---- blocked top-k -----------------------------------------------------------------------------

def order_keys(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """One int64 per score: higher score first, then smaller id; unique while ids are unique.

    A float32's bits read as int32 order positive floats correctly and negative ones backwards;
    flipping the magnitude bits of negatives (``bits ^ 0x7FFFFFFF``) gives one increasing order.
    """
    bits = np.ascontiguousarray(scores, dtype=np.float32).view(np.int32).astype(np.int64)
    ordered = np.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered << 32) | (_LOW_MASK - ids.astype(np.int64))


def decode_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (ids, scores) that :func:`order_keys` packed."""
    ids = (_LOW_MASK - (keys & _LOW_MASK)).astype(np.int32)
    ordered = keys >> 32
    bits = np.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF).astype(np.int32)
    return ids, bits.view(np.float32)


# Scores computed per pass: 2**18 float32 (1 MiB) stay in a core's L2 cache through the passes over
# them. Rows of a pass: 2**18 // candidates (13 rows of 20,000 items; one row from 262,144 items).
_PASS_SCORES = 1 << 18
# Strided groups whose maxima bound each row's k-th best score from below (see _top_keys_by_rows).
_BOUND_GROUPS = 512


def _top_keys_by_rows(queries: np.ndarray, candidates: np.ndarray, ids: np.ndarray, excluded_rows: np.ndarray,
                      excluded_cols: np.ndarray, k: int) -> np.ndarray:
    """Each query's keys (:func:`order_keys`) of its ``min(k, candidates)`` best candidates, best first.

    Args:
        queries: (n, d) float32. candidates: (m, d) float32, rows in ascending ``ids`` order.
        excluded_rows, excluded_cols: (query row, candidate row) pairs scoring -inf, ordered by row.

    Rows are taken a few at a time, ``_PASS_SCORES`` scores per pass, all candidates at once. In a
    pass, a lower bound on each row's k-th best score comes from ``_BOUND_GROUPS`` disjoint groups
    of candidates (column ``j`` in group ``j % groups``, so popular low ids spread over all of them):
    the k-th largest of the group maxima is reached by k distinct candidates, so it cannot exceed
    the k-th best. One comparison with that bound finds the few entries that can be in the top k
    (about k per row); keys are built for those alone and sorted. A row left with fewer than k
    entries (all else excluded) is padded with the smallest key, which decodes to a NaN score.
    """
    n, m = queries.shape[0], candidates.shape[0]
    width = min(k, m)
    out = np.full((n, width), np.iinfo(np.int64).min, dtype=np.int64)
    if n == 0 or width == 0:
        return out
    per_pass = max(1, min(n, _PASS_SCORES // m))
    groups = min(m, max(_BOUND_GROUPS, width))
    grouped = m - m % groups
    by_column = np.ascontiguousarray(candidates.T)
    bounds = np.searchsorted(excluded_rows, np.arange(0, n + per_pass, per_pass))
    for i, first in enumerate(range(0, n, per_pass)):
        last = min(n, first + per_pass)
        scores = queries[first:last] @ by_column
        lo, hi = bounds[i], bounds[i + 1]
        scores[excluded_rows[lo:hi] - first, excluded_cols[lo:hi]] = -np.inf
        maxima = scores[:, :grouped].reshape(last - first, grouped // groups, groups).max(axis=1)
        floor = np.partition(maxima, groups - width, axis=1)[:, groups - width]
        rows, cols = _at_least(scores, floor)
        keys = order_keys(scores[rows, cols], ids[cols])
        order = np.lexsort((~keys, rows))  # by row, then key descending (~key reverses int64 order)
        rows, keys = rows[order], keys[order]
        counts = np.bincount(rows, minlength=last - first)
        rank = np.arange(rows.size) - (np.cumsum(counts) - counts)[rows]
        kept = rank < width
        out[first + rows[kept], rank[kept]] = keys[kept]
    return out


def _at_least(scores: np.ndarray, floor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) where ``scores[row, col] >= floor[row]``, in row-major order.

    The same as ``np.nonzero(scores >= floor[:, None])``, several times faster when few pass: the
    boolean mask is scanned eight entries at a time (as 64-bit words) and only words holding a
    passing entry are looked at one by one.
    """
    n, m = scores.shape
    flat = (scores >= floor[:, None]).reshape(-1)
    whole = flat.size - flat.size % 8
    words = np.flatnonzero(flat[:whole].view(np.uint64))
    hits = (words[:, None] * 8 + np.arange(8)).ravel()
    hits = np.concatenate([hits[flat[hits]], whole + np.flatnonzero(flat[whole:])])
    return hits // m, hits % m


def _matrix(column: pa.ChunkedArray | pa.Array, rows: int) -> np.ndarray:
    """A list<float> column of equal-length lists as a float32 matrix (rows x length)."""
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    width = values.size // rows if rows else 0
    return values.reshape(rows, width)


def _excluded_pairs(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(query row, excluded id) pairs from a list<int> column; a null list excludes nothing."""
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    rows = np.repeat(np.arange(lengths.size), lengths)
    return rows, values.astype(np.int64)


def _positions(ids: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``wanted``, whether it is in the sorted ``ids`` and where."""
    at = np.searchsorted(ids, wanted)
    found = at < ids.size
    found[found] = ids[at[found]] == wanted[found]
    return found, at


def _pair_rows(q_ids: np.ndarray, pair_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For pairs naming queries by id: whether each names a query of the block, and its row."""
    order = np.argsort(q_ids, kind="stable")
    found, at = _positions(q_ids[order], pair_ids)
    return found, order[np.minimum(at, order.size - 1)]


def score_block(queries: pa.Table, candidates: pa.Table, *, k: int, has_exclude: bool,
                exclude_self: bool) -> pa.Table:
    """The top k candidates of every query of one block (the per-block step of :func:`top_k_blocked`).

    Args:
        queries: one row per query: ``id`` (int), ``features`` (list<float>) and, with
            ``has_exclude``, ``exclude`` (list<int> of candidate ids never to return for it). With a
            ``_kind`` column, the rows of kind 1 carry ``_pairs`` instead: (query id, excluded
            candidate id) pairs packed as ``query << 32 | candidate``; only rows of kind 0 are queries.
        candidates: one row per chunk of candidates: ``ids`` (list<int>) and ``features`` (their
            vectors concatenated, list<float>); the chunks are joined into one matrix.
        exclude_self: a query never gets the candidate with its own id (item-item similarity).

    Returns:
        ``query_id, rank, item_id, score`` rows, rank 1 the highest dot product.
    """
    empty = pa.table({"query_id": pa.array([], pa.int32()), "rank": pa.array([], pa.int32()),
                      "item_id": pa.array([], pa.int32()), "score": pa.array([], pa.float32())})
    pairs = None
    if _KIND in queries.column_names:
        kind = queries.column(_KIND)
        pairs = queries.filter(pc.equal(kind, _PAIR_ROW))
        queries = queries.filter(pc.equal(kind, _QUERY_ROW))
    n_q = queries.num_rows
    if n_q == 0 or candidates.num_rows == 0:
        return empty
    q_ids = queries.column(ID).to_numpy().astype(np.int64)
    q_vecs = _matrix(queries.column(FEATURES), n_q)
    width = q_vecs.shape[1]
    if has_exclude:
        excluded_rows, excluded = _excluded_pairs(queries.column(EXCLUDE))
    else:
        excluded_rows, excluded = np.empty(0, np.int64), np.empty(0, np.int64)
    if pairs is not None and pairs.num_rows:
        packed = pc.list_flatten(pairs.column(_PAIRS)).to_numpy(zero_copy_only=False).astype(np.int64)
        pair_queries = packed >> 32
        pair_items = (packed & _LOW_MASK).astype(np.uint32).view(np.int32).astype(np.int64)
        known, rows = _pair_rows(q_ids, pair_queries)
        excluded_rows = np.concatenate([excluded_rows, rows[known]])
        excluded = np.concatenate([excluded, pair_items[known]])
    if exclude_self:
        excluded_rows = np.concatenate([excluded_rows, np.arange(n_q)])
        excluded = np.concatenate([excluded, q_ids])

    # The block's candidates as one matrix in id order (ties go to the smaller id by key anyway).
    c_ids = pc.list_flatten(candidates.column(IDS)).to_numpy(zero_copy_only=False).astype(np.int64)
    c_vecs = pc.list_flatten(candidates.column(FEATURES)).to_numpy(zero_copy_only=False)
    if c_vecs.size != c_ids.size * width:
        raise ValueError(f"score_block: candidate vectors hold {c_vecs.size} values for {c_ids.size} ids; "
                         f"the queries' vectors have length {width}")
    order = np.argsort(c_ids, kind="stable")
    c_ids = c_ids[order]
    c_vecs = c_vecs.astype(np.float32, copy=False).reshape(c_ids.size, width)[order]
    # Every excluded pair as a (query row, candidate column) cell, ordered by row; unknown ids dropped.
    found, at = _positions(c_ids, excluded)
    by_row = np.argsort(excluded_rows[found], kind="stable")
    best = _top_keys_by_rows(q_vecs, c_vecs, c_ids, excluded_rows[found][by_row], at[found][by_row], k)

    item_ids, scores = decode_keys(best)
    valid = np.isfinite(scores)
    ranks = np.broadcast_to(np.arange(1, best.shape[1] + 1, dtype=np.int32), best.shape)
    query_ids = np.broadcast_to(q_ids.astype(np.int32)[:, None], best.shape)
    return pa.table({"query_id": pa.array(query_ids[valid]), "rank": pa.array(ranks[valid]),
                     "item_id": pa.array(item_ids[valid]), "score": pa.array(scores[valid])})


def top_k_blocked(queries: DataFrame, candidates: DataFrame, *, k: int, block_size: int, chunk_size: int,
                  exclude_col: str | None = None, exclusions: DataFrame | None = None,
                  group_col: str | None = None, exclude_self: bool = False) -> DataFrame:
    """Each query's ``k`` candidates with the highest dot product, computed block by block.

    Args:
        queries: ``id`` (int), ``features`` (array<float>), optionally ``exclude_col``
            (array<int>, candidate ids not to return) and ``group_col``.
        candidates: ``id``, ``features`` (same length) and ``group_col`` when given.
        k: rows per query at most (fewer when fewer candidates are left).
        block_size: queries per block (one Python call each; its vectors, and all candidates'
            vectors of its group, are in memory at once).
        chunk_size: candidates per packed row of the shuffle (each row is copied to every block).
        exclusions: ``id`` (a query id) and ``excluded_id`` (a candidate id): pairs never to return,
            as many rows as there are; pairs of ids not among the queries are ignored. Not with
            ``group_col``.
        group_col: when given, a query is only compared with candidates of its own group.
        exclude_self: never pair a query with the candidate of the same id.

    Returns:
        ``query_id, rank, item_id, score`` (rank 1 = best; ties go to the smaller item id).
    """
    for name, frame, needed in (("queries", queries, [ID, FEATURES, *[c for c in (exclude_col, group_col) if c]]),
                                ("candidates", candidates, [ID, FEATURES, *[c for c in (group_col,) if c]])):
        require_columns(frame, needed, step=f"top_k_blocked ({name})")
    if exclusions is not None:
        require_columns(exclusions, [ID, "excluded_id"], step="top_k_blocked (exclusions)")
        if group_col:
            raise ValueError("top_k_blocked: exclusions as pairs cannot be combined with group_col")
    if k <= 0 or block_size <= 0 or chunk_size <= 0:
        raise ValueError(f"top_k_blocked: k, block_size and chunk_size must be positive, got {k}, {block_size}, "
                         f"{chunk_size}")
    # The sizes are the only things the driver learns: two counts in one job.
    sizes = queries.agg(F.count(F.lit(1)).alias("q")).crossJoin(candidates.agg(F.count(F.lit(1)).alias("c"))).first()
    blocks = max(1, math.ceil(sizes["q"] / block_size))
    chunks = max(1, math.ceil(sizes["c"] / chunk_size))
    group = F.coalesce(F.col(group_col).cast("string"), F.lit("")) if group_col else F.lit("")
    query_cols = [F.col(ID).cast("int").alias(ID), F.col(FEATURES).cast("array<float>").alias(FEATURES)]
    if exclude_col:
        query_cols.append(F.col(exclude_col).cast("array<int>").alias(EXCLUDE))
    query_blocks = queries.select(group.alias(_GROUP_KEY),
                                  F.pmod(F.xxhash64(F.col(ID).cast("int")), F.lit(blocks)).cast("int").alias(_BLOCK),
                                  *query_cols)
    if exclusions is not None:
        # Each pair goes to its query's block (the same hash of the same int id), packed in one long;
        # the lists are gathered per block map-side first, so few rows are shuffled.
        query_id = F.col(ID).cast("int")
        packed_pair = F.shiftleft(query_id.cast("long"), 32).bitwiseOR(
            F.col("excluded_id").cast("int").cast("long").bitwiseAND(F.lit(0xFFFFFFFF)))
        pair_rows = (
            exclusions.where(F.col(ID).isNotNull() & F.col("excluded_id").isNotNull())
            .select(F.pmod(F.xxhash64(query_id), F.lit(blocks)).cast("int").alias(_BLOCK), packed_pair.alias("_p"))
            .groupBy(_BLOCK).agg(F.collect_list("_p").alias(_PAIRS))
            .select(F.lit("").alias(_GROUP_KEY), _BLOCK, F.lit(None).cast("int").alias(ID),
                    F.lit(None).cast("array<float>").alias(FEATURES),
                    *([F.lit(None).cast("array<int>").alias(EXCLUDE)] if exclude_col else []),
                    F.lit(_PAIR_ROW).alias(_KIND), _PAIRS)
        )
        query_blocks = query_blocks.select("*", F.lit(_QUERY_ROW).alias(_KIND),
                                           F.lit(None).cast("array<bigint>").alias(_PAIRS)).unionByName(pair_rows)
    # Candidates travel packed, one row per chunk (ids and concatenated vectors): each chunk is copied
    # once to every block of its group, so a shuffle moves blocks x chunks rows, not blocks x items.
    packed = (candidates.select(group.alias(_GROUP_KEY), F.pmod(F.xxhash64(F.col(ID)), F.lit(chunks)).alias("_chunk"),
                                F.struct(F.col(ID).cast("int").alias(ID),
                                         F.col(FEATURES).cast("array<float>").alias(FEATURES)).alias("_c"))
              .groupBy(_GROUP_KEY, "_chunk").agg(F.collect_list("_c").alias("_cs"))
              .select(_GROUP_KEY, F.transform("_cs", lambda c: c[ID]).alias(IDS),
                      F.flatten(F.transform("_cs", lambda c: c[FEATURES])).alias(FEATURES)))
    block_ids = queries.sparkSession.range(blocks).select(F.col("id").cast("int").alias(_BLOCK))
    candidate_blocks = packed.crossJoin(block_ids)
    has_exclude = exclude_col is not None

    def per_block(left: pa.Table, right: pa.Table) -> pa.Table:
        return score_block(left, right, k=k, has_exclude=has_exclude, exclude_self=exclude_self)

    return (query_blocks.groupBy(_GROUP_KEY, _BLOCK)
            .cogroup(candidate_blocks.groupBy(_GROUP_KEY, _BLOCK))
            .applyInArrow(per_block, schema=TOP_K_SCHEMA))


# ---- item-item similarity from ALS factors -----------------------------------------------------

def l2_normalised(vector: Column) -> Column:
    """An array<float> divided by its Euclidean norm (null for a zero vector)."""
    norm = F.sqrt(F.aggregate(vector, F.lit(0.0).cast("double"), lambda acc, x: acc + x * x))
    return F.when(norm > 0, F.transform(vector, lambda x: (x / norm).cast("float")))


def similar_items(item_factors: DataFrame, *, k: int, block_size: int, chunk_size: int,
                  candidate_ids: DataFrame | None = None) -> DataFrame:
    """Each item's ``k`` most similar items by cosine of their ALS factors, itself excluded.

    Args:
        item_factors: ALS ``itemFactors`` (``id`` int, ``features`` array<float>).
        candidate_ids: when given (one column ``id``), only these items may be returned as similar
            (e.g. those in stock); every item of ``item_factors`` still gets its list.

    Returns:
        ``item_idx, rank, similar_item_idx, score`` (score = cosine, rank 1 the most similar).
    """
    unit = (item_factors.select(F.col(ID), l2_normalised(F.col(FEATURES)).alias(FEATURES))
            .where(F.col(FEATURES).isNotNull()))
    candidates = unit if candidate_ids is None else unit.join(candidate_ids.select(ID).distinct(), on=ID, how="inner")
    return top_k_blocked(unit, candidates, k=k, block_size=block_size, chunk_size=chunk_size,
                         exclude_self=True).select(
        F.col("query_id").alias("item_idx"), "rank", F.col("item_id").alias("similar_item_idx"), "score")


# ---- content-based similarity ------------------------------------------------------------------

CATEGORY_SPLIT = r"\s*[>/|]\s*"


def category_prefixes(path: Column) -> Column:
    """``A > B > C`` -> ``[a, a>b, a>b>c]`` (lower case; empty for a null or blank path)."""
    parts = F.filter(F.split(F.lower(F.trim(path)), CATEGORY_SPLIT), lambda p: p != "")
    # sequence(1, 0) counts down, so an empty or null path is handled before it.
    return F.when(F.coalesce(F.size(parts), F.lit(0)) > 0,
                  F.transform(F.sequence(F.lit(1), F.size(parts)),
                              lambda i: F.array_join(F.slice(parts, 1, i), ">"))).otherwise(
        F.array().cast("array<string>"))


def price_band(price: Column, *, edges: Sequence[float], labels: Sequence[str]) -> Column:
    """The band label of a price: below ``edges[i]`` is ``labels[i]``, from the last edge on the last label."""
    band = F.lit(labels[-1])
    for edge, label in reversed(list(zip(edges, labels))):
        band = F.when(price.cast("double") < F.lit(float(edge)), F.lit(label)).otherwise(band)
    return F.when(price.isNotNull(), band)


def _tokens(value: Column) -> Column:
    return F.when(value.isNotNull() & (F.trim(value) != ""), F.array(F.lower(F.trim(value)))).otherwise(
        F.array().cast("array<string>"))


def normalised_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """``content_weights`` scaled to sum to 1 (parts not named weigh 0)."""
    total = sum(weights.get(p, 0.0) for p in CONTENT_PARTS)
    if total <= 0:
        raise ValueError(f"content weights must not all be 0: {dict(weights)}")
    return {p: weights.get(p, 0.0) / total for p in CONTENT_PARTS}


def content_vectors(products: DataFrame, *, weights: Mapping[str, float], text_features: int,
                    price_edges: Sequence[float], price_labels: Sequence[str]) -> DataFrame:
    """Products (``item_id, name, description, category_path, brand, price``) -> one content vector per item.

    Returns ``item_id, group, features`` (array<float>): ``group`` is the top-level category (lower
    case, "" when unknown); the dot product of two vectors is the weighted sum of the parts' cosines.
    """
    require_columns(products, ["item_id", "name", "description", "category_path", "brand", "price"],
                    step="content_vectors (products)")
    share = normalised_weights(weights)
    prepared = products.select(
        "item_id",
        category_prefixes(F.col("category_path")).alias("_cat"),
        _tokens(F.col("brand")).alias("_brand"),
        price_band(F.col("price"), edges=price_edges, labels=price_labels).alias("_band"),
        F.concat_ws(" ", F.coalesce(F.col("name"), F.lit("")), F.coalesce(F.col("description"), F.lit("")))
        .alias("_text"),
    )
    stages = [
        HashingTF(inputCol="_cat", outputCol="_cat_tf", numFeatures=CATEGORY_FEATURES, binary=True),
        HashingTF(inputCol="_brand", outputCol="_brand_tf", numFeatures=BRAND_FEATURES, binary=True),
        RegexTokenizer(inputCol="_text", outputCol="_words", pattern=r"(?U)\w+", gaps=False, toLowercase=True),
        StopWordsRemover(inputCol="_words", outputCol="_terms"),
        HashingTF(inputCol="_terms", outputCol="_text_tf", numFeatures=text_features),
        IDF(inputCol="_text_tf", outputCol="_text_tfidf"),
    ]
    parts = {"category": "_cat_tf", "brand": "_brand_tf", "text": "_text_tfidf"}
    for part, column in parts.items():
        stages.append(Normalizer(inputCol=column, outputCol=f"_{part}_unit", p=2.0))
    featurised = Pipeline(stages=stages).fit(prepared).transform(prepared)

    def scaled(part: str) -> Column:
        factor = math.sqrt(share[part])
        if part == "price_band":
            return F.array(*[F.when(F.col("_band") == F.lit(label), F.lit(factor)).otherwise(F.lit(0.0)).cast("float")
                             for label in price_labels])
        # A zero vector normalises to NaNs in Spark ML: it stands for "no such part" and contributes 0.
        return F.transform(vector_to_array(F.col(f"_{part}_unit"), dtype="float32"),
                           lambda x: F.when(F.isnan(x), F.lit(0.0)).otherwise(x * F.lit(factor)).cast("float"))

    return featurised.select(
        "item_id",
        F.coalesce(F.try_element_at(F.col("_cat"), F.lit(1)), F.lit("")).alias(GROUP),
        F.concat(*[scaled(p) for p in CONTENT_PARTS]).alias(FEATURES),
    )


def content_similar(vectors: DataFrame, *, k: int, block_size: int, chunk_size: int,
                    candidate_ids: DataFrame | None = None) -> DataFrame:
    """Each item's ``k`` most similar items by content within its top-level category, itself excluded.

    Args:
        vectors: ``id`` (int item index), ``group``, ``features`` from :func:`content_vectors`.
        candidate_ids: when given (column ``id``), only these items may be returned.

    Returns:
        ``item_idx, rank, similar_item_idx, score`` (score = weighted cosine, 0..1).
    """
    candidates = vectors if candidate_ids is None else vectors.join(candidate_ids.select(ID).distinct(), on=ID,
                                                                    how="inner")
    return top_k_blocked(vectors, candidates, k=k, block_size=block_size, chunk_size=chunk_size,
                         group_col=GROUP, exclude_self=True).where(F.col("score") > 0).select(
        F.col("query_id").alias("item_idx"), "rank", F.col("item_id").alias("similar_item_idx"), "score")
