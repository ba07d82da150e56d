"""Random draws as pure functions of (seed, draw name, row keys).

Spark's ``rand(seed)`` depends on how rows are split into partitions, so the
same seed could give different data on a laptop and on a cluster. Every draw
here instead hashes the seed, the name of the draw and the row's own keys
(user index, session number, ...) with ``xxhash64``: a row gets the same
value wherever and however it is computed, and two draws with different
names are independent.
"""

from __future__ import annotations

import math
from typing import Sequence

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

ColumnOrName = Column | str

# 53 bits: the mantissa of a double, so every value below 1.0 is exact.
_MANTISSA_BITS = 53


def _col(key: ColumnOrName) -> Column:
    return F.col(key) if isinstance(key, str) else key


def with_uniforms(frame: DataFrame, *, seed: int, prefix: str, keys: Sequence[str], names: Sequence[str],
                  when: Column | None = None) -> DataFrame:
    """Adds a column ``u_<name>`` of uniform draws per name, keyed by ``keys``.

    Draws are materialised as columns, and later expressions refer to them by
    name, because Spark's optimiser copies a column's defining expression into
    every place that uses it when it folds projections and pushes filters:
    composing the draw expressions directly made plans so large that planning
    took minutes and generated code no longer compiled. The row's keys are
    hashed once (``h_<prefix>``); each draw then hashes that value with its own
    number, which keeps the generated code small.

    Args:
        when: only draw where this is true (null elsewhere), to skip hashing rows that need no draw.
    """
    row_hash = f"h_{prefix}"

    def draw(number: int) -> Column:
        top_bits = F.shiftrightunsigned(F.xxhash64(F.col(row_hash), F.lit(number)), 64 - _MANTISSA_BITS)
        value = top_bits.cast("double") / float(1 << _MANTISSA_BITS)
        return value if when is None else F.when(when, value)

    with_hash = frame.withColumn(row_hash, hash64(seed, prefix, *keys))
    return with_hash.withColumns({f"u_{name}": draw(i) for i, name in enumerate(names)}).drop(row_hash)


def drop_draws(frame: DataFrame) -> DataFrame:
    """Drops the ``u_*`` columns added by :func:`with_uniforms`."""
    return frame.drop(*[c for c in frame.columns if c.startswith("u_")])


def hash64(seed: int, draw: str, *keys: ColumnOrName) -> Column:
    """A 64-bit hash of the seed, the draw's name and the keys."""
    return F.xxhash64(F.lit(seed), F.lit(draw), *[_col(k) for k in keys])


def uniform(seed: int, draw: str, *keys: ColumnOrName) -> Column:
    """A uniform double in [0, 1)."""
    top_bits = F.shiftrightunsigned(hash64(seed, draw, *keys), 64 - _MANTISSA_BITS)
    return top_bits.cast("double") / float(1 << _MANTISSA_BITS)


def normal(seed: int, draw: str, *keys: ColumnOrName) -> Column:
    """A standard normal draw (Box-Muller over two independent uniforms)."""
    # 1 - u lies in (0, 1], so the log is finite.
    radius = F.sqrt(-2.0 * F.log(1.0 - uniform(seed, draw + "#r", *keys)))
    return radius * F.cos(2.0 * math.pi * uniform(seed, draw + "#a", *keys))


def exponential_of(u: Column) -> Column:
    """An exponential draw with mean 1 from a uniform ``u``."""
    return -F.log(1.0 - u)


def below(n: ColumnOrName | int, u: Column) -> Column:
    """An integer in [0, n) from a uniform ``u``."""
    bound = F.lit(n) if isinstance(n, int) else _col(n)
    return F.least(F.floor(u * bound), bound - 1).cast("int")


def pick(values: Sequence[object], u: Column) -> Column:
    """One of ``values``, equally likely."""
    return F.element_at(F.array(*[F.lit(v) for v in values]), below(len(values), u) + 1)


def constant_at(values: Sequence[object], index: Column) -> Column:
    """``values[index]`` for a list of constants and a 0-based index column."""
    return F.element_at(F.array(*[F.lit(v) for v in values]), (index + 1).cast("int"))


def weighted_index(weights: Sequence[float], u: Column) -> Column:
    """An index into ``weights`` drawn with probability proportional to its weight.

    ``u`` appears once per weight: pass a column reference, not a draw expression.
    """
    total = float(sum(weights))
    expr = None
    cumulative = 0.0
    for i, w in enumerate(weights[:-1]):
        cumulative += w / total
        expr = F.when(u < cumulative, F.lit(i)) if expr is None else expr.when(u < cumulative, F.lit(i))
    last = F.lit(len(weights) - 1)
    return last if expr is None else expr.otherwise(last)


def zipf_rank(u: Column, n: Column, *, exponent: float) -> Column:
    """A rank in [0, n) whose probability falls like ``1 / (rank + 1) ** exponent``.

    Inverse of the continuous Zipf CDF on [1, n + 1): exact in shape, cheap, and
    needs no table of the n harmonic weights (n is the catalogue size).
    """
    if exponent == 1.0:
        x = F.exp(u * F.log(n + 1))
    else:
        power = 1.0 - exponent
        x = F.pow(1.0 + u * (F.pow(n + 1, power) - 1.0), 1.0 / power)
    return F.greatest(F.lit(0), F.least(F.floor(x) - 1, n - 1)).cast("int")


def hex_id(prefix: str, seed: int, draw: str, *keys: ColumnOrName) -> Column:
    """An id like ``e3f0c...``: the prefix and the 16 hex digits of a 64-bit hash.

    Ids stay unique as long as the keys are (a collision among 30 M ids has odds
    of about 1 in 40,000) and are stable across runs with the same seed.
    """
    # translate, not lower: lower is locale-aware and slow on every one of millions of ids.
    return F.concat(F.lit(prefix), F.translate(F.lpad(F.hex(hash64(seed, draw, *keys)), 16, "0"), "ABCDEF", "abcdef"))
