"""The ALS search on the validation window: a rank-scaled grid, sampled to a budget, by successive halving.

**Grid.** ``ranks x reg_params x alphas x confidence weight sets``. ``reg_params`` and ``alphas`` are
the values at rank ``reference_rank``; at rank r both are multiplied by ``r / reference_rank``: a
larger rank (more freedom per user and item) meets proportionally more regularisation, and the
observed pairs' confidence grows with it, so regParam / alpha stays what was chosen at the reference.

**Successive halving** (Jamieson and Talwalkar, 2016; the inner loop of Hyperband) with ALS
iterations as the resource: every candidate is fitted with few iterations and scored by NDCG@k on
validation, the best third goes on with three times the iterations, and so on; the last round fits
its candidates with ``max_iter`` and the best of them is chosen. ``tuning_budget`` caps the
iterations of the whole search: when the grid is larger than the budget affords, a seeded random
sample of it enters the first round. Details and measurements: docs/recommend.md#tuning.
"""

from __future__ import annotations

import itertools
import math
import random
import threading
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence, TypeVar

from inboxlift.models.recommend.als import AlsParams
from inboxlift.settings import RecommendSettings

# Survivors per round: one in ETA goes on, with ETA times the iterations (Hyperband's usual 3).
ETA = 3
# Fewest iterations a round fits with: the fewest after which the candidates' ranking agreed with
# their ranking after 10 on the generated shop (docs/recommend.md#tuning has the measurement).
MIN_ROUND_ITER = 4
Model = TypeVar("Model")
# How a round's fits are run: (step, items) -> the step's results in the items' order.
RoundRunner = Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]


@dataclass(frozen=True)
class Round:
    """One round of successive halving: how many candidates are fitted, with how many iterations."""

    candidates: int
    iterations: int


@dataclass(frozen=True)
class TuningPoint:
    """One fit of the search: the candidate (``max_iter`` = the round's iterations) and its score."""

    params: AlsParams
    round: int
    ndcg: float
    seconds: float


def param_grid(settings: RecommendSettings, *, default_weights: Sequence[float]) -> list[AlsParams]:
    """Every point of the grid at ``max_iter``, in settings order (the first wins ties)."""
    weight_sets = [tuple(float(x) for x in w) for w in settings.confidence_weights] or [
        tuple(float(x) for x in default_weights)]
    return [AlsParams(rank=r, reg_param=scaled(float(reg), rank=r, reference=settings.reference_rank),
                      alpha=scaled(float(a), rank=r, reference=settings.reference_rank), weights=w,
                      max_iter=settings.max_iter, seed=settings.seed)
            for w, r, reg, a in itertools.product(weight_sets, settings.ranks, settings.reg_params, settings.alphas)]


def scaled(value: float, *, rank: int, reference: int) -> float:
    """regParam or alpha at ``rank`` for a value given at rank ``reference``: proportional to the rank."""
    return float(f"{value * rank / reference:.6g}")   # 0.05 * 32 / 16 is 0.1, not 0.1000000000001


def schedule(candidates: int, max_iter: int) -> list[Round]:
    """The rounds of successive halving for ``candidates``; the last fits with ``max_iter``.

    Round j of R fits ``ceil(candidates / ETA ** j)`` candidates with ``ceil(max_iter / ETA ** (R - j))``
    iterations, at least ``MIN_ROUND_ITER``. R is as many rounds as halving down to one candidate
    needs, but never more than there are distinct iteration counts between ``MIN_ROUND_ITER`` and
    ``max_iter`` (refitting survivors with the iterations they were scored with would score them
    again for nothing): then the last round fits more than one candidate and keeps the best.
    """
    if candidates <= 1:
        return [Round(candidates=1, iterations=max_iter)]

    def iterations(rounds: int, j: int) -> int:
        return min(max_iter, max(MIN_ROUND_ITER, math.ceil(max_iter / ETA ** (rounds - j))))

    rounds = math.ceil(math.log(candidates, ETA) - 1e-9)
    while rounds > 0 and len({iterations(rounds, j) for j in range(rounds + 1)}) < rounds + 1:
        rounds -= 1
    return [Round(candidates=max(1, math.ceil(candidates / ETA ** j - 1e-9)), iterations=iterations(rounds, j))
            for j in range(rounds + 1)]


def cost(rounds: Sequence[Round]) -> int:
    """ALS iterations a schedule fits in all."""
    return sum(r.candidates * r.iterations for r in rounds)


def plan(grid: Sequence[AlsParams], *, budget: int, seed: int) -> tuple[list[AlsParams], list[Round]]:
    """The candidates entering the first round and the schedule, within ``budget`` iterations.

    The whole grid when its schedule fits the budget; otherwise the largest seeded sample of it that
    does (kept in grid order, so ties still go to the point listed first). At least one candidate.
    """
    if not grid:
        raise ValueError("tuning: the grid is empty")
    max_iter = grid[0].max_iter
    n = len(grid)
    while n > 1 and cost(schedule(n, max_iter)) > budget:
        n -= 1
    if n == len(grid):
        chosen = list(grid)
    else:
        picked = sorted(random.Random(seed).sample(range(len(grid)), n))
        chosen = [grid[i] for i in picked]
    return chosen, schedule(n, max_iter)


def successive_halving(candidates: Sequence[AlsParams], rounds: Sequence[Round],
                       score: Callable[[AlsParams], tuple[float, float, Model]], *,
                       run_round: RoundRunner | None = None,
                       ) -> tuple[AlsParams, Model, list[TuningPoint]]:
    """Run the rounds; return the chosen candidate (at the last round's iterations), its model and every fit.

    ``score(params)`` fits ``params`` on the validation training data and returns (NDCG@k, seconds,
    the model). ``run_round(step, candidates)`` applies ``step`` to each of a round's candidates and
    returns the results in their order: by default one after the other; the training runs several
    at once (:func:`inboxlift.session.concurrently`). A round's fits do not depend on each other, and
    the best is the highest NDCG, the first listed on a tie, whatever order the fits end in. Models
    are dropped as soon as they lose: an earlier round's at once, the last round's when a better one
    is scored, so at most one more than the fits running at once is held.
    """
    run = run_round or (lambda step, items: [step(item) for item in items])
    alive = list(candidates)
    points: list[TuningPoint] = []
    best: tuple[float, int, AlsParams, Model] | None = None   # the last round's best so far, under `lock`
    lock = threading.Lock()
    for number, this_round in enumerate(rounds):
        last = number == len(rounds) - 1
        fitted = list(enumerate(replace(params, max_iter=this_round.iterations) for params in alive))

        def step(item: tuple[int, AlsParams]) -> tuple[float, float]:
            nonlocal best
            position, params = item
            ndcg, seconds, model = score(params)
            if last:
                with lock:
                    if best is None or (_finite(ndcg), -position) > (best[0], -best[1]):
                        best = (_finite(ndcg), position, params, model)
            return ndcg, seconds

        scored = run(step, fitted)
        points.extend(TuningPoint(params=params, round=number, ndcg=ndcg, seconds=seconds)
                      for (_, params), (ndcg, seconds) in zip(fitted, scored))
        if not last:
            keep = rounds[number + 1].candidates
            order = sorted(range(len(alive)), key=lambda i: (-_finite(scored[i][0]), i))
            alive = [alive[i] for i in sorted(order[:keep])]
    assert best is not None
    return best[2], best[3], points


def _finite(value: float) -> float:
    return -math.inf if math.isnan(value) else value
