"""Train and evaluate the recommenders on time windows: tune on validation, report on test, fit on all.

With ``C`` the cut-off (the end of the as-of day) the test window is ``[C - test_days, C)`` and the
validation window the ``validation_days`` before it. Every model is trained on the events before its
window and ranks, for the same users and with the same exclusions (items seen before the window),
the items those users interacted with in the window and never before:

1. **validation**: the ALS search (:mod:`.tuning`), then item-based CF and the hybrid at each
   ``hybrid_weights``; the recommender with the best NDCG@k is chosen (ties: ALS, item-CF, hybrid);
2. **test**: the chosen ALS parameters, item-CF, the hybrid at the chosen weight and both popularity
   baselines, every metric;
3. **final**: ALS with the chosen parameters on all events before ``C``: the model logged and registered.

Docs: docs/recommend.md#recommend-train.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from pyspark.ml.recommendation import ALSModel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from inboxlift.models.recommend.als import (
    AlsFitSettings,
    AlsParams,
    RatingsCache,
    als_top_k,
    fit_als,
    fit_settings,
    task_slots,
)
from inboxlift.models.recommend.baselines import item_popularity, popularity_candidates, user_top_categories
from inboxlift.models.recommend.data import (
    ITEM_ID,
    ITEM_IDX,
    USER_IDX,
    decayed_pairs,
    to_indexes,
    window_items,
    with_confidence,
)
from inboxlift.models.recommend.evaluate import Evaluation, RankingMetrics, ranking_metrics
from inboxlift.models.recommend.itemcf import (
    CANDIDATE_FACTOR,
    ItemCfParams,
    blend,
    item_similarities,
    itemcf_top_k,
    recent_baskets,
)
from inboxlift.models.recommend.tuning import TuningPoint, plan, successive_halving
from inboxlift.session import collect_ml_garbage, concurrently, materialize
from inboxlift.settings import RecommendSettings

ALS_KIND, ITEMCF_KIND, HYBRID_KIND = "als", "itemcf", "hybrid"
KINDS = (ALS_KIND, ITEMCF_KIND, HYBRID_KIND)
BASELINES = ("popular_in_category", "popular")


@dataclass(frozen=True)
class RecommenderChoice:
    """What ``recommend`` serves: a kind, its models' parameters, and where ``similar_items`` come from."""

    kind: str
    als: AlsParams
    itemcf: ItemCfParams
    als_weight: float
    similar_items_source: str

    @property
    def label(self) -> str:
        if self.kind == HYBRID_KIND:
            return f"hybrid (ALS weight {self.als_weight:g}) of ALS {self.als.label} and item-CF"
        return f"ALS {self.als.label}" if self.kind == ALS_KIND else "item-based CF"

    def as_params(self, prefix: str) -> dict[str, str]:
        return {f"{prefix}.recommender": self.kind, f"{prefix}.als_weight": str(self.als_weight),
                f"{prefix}.similar_items_source": self.similar_items_source,
                **self.als.as_params(prefix), **self.itemcf.as_params(f"{prefix}.itemcf")}

    @classmethod
    def from_params(cls, params: Mapping[str, str], prefix: str) -> "RecommenderChoice | None":
        """The choice :meth:`as_params` logged; a run from before item-CF existed reads as plain ALS."""
        als = AlsParams.from_params(params, prefix)
        if als is None:
            return None
        kind = params.get(f"{prefix}.recommender", ALS_KIND)
        itemcf = ItemCfParams.from_params(params, f"{prefix}.itemcf") or ItemCfParams()
        try:
            weight = float(params.get(f"{prefix}.als_weight", "1.0"))
        except ValueError:
            return None
        return cls(kind=kind, als=als, itemcf=itemcf, als_weight=weight,
                   similar_items_source=params.get(f"{prefix}.similar_items_source", ALS_KIND))


@dataclass
class SplitData:
    """What every model is evaluated on for one window (indexes, not ids)."""

    name: str
    train_cutoff: dt.datetime
    end: dt.datetime
    pairs: DataFrame             # user_idx, item_idx, view_w, cart_w, purchase_w, has_purchased, last_ts (persisted)
    relevant: DataFrame          # user_idx, item_idx: new-to-user items of the window, evaluated users only
    users: DataFrame             # user_idx of the evaluated users
    popularity: DataFrame        # item_popularity as of the train cut-off
    user_categories: DataFrame   # user_top_categories from the training pairs
    users_evaluated: int
    users_with_relevant: int
    train_items: int
    ratings: RatingsCache = field(init=False)

    def __post_init__(self) -> None:
        self.ratings = RatingsCache(self.pairs)

    def release(self) -> None:
        self.ratings.release()
        for frame in (self.pairs, self.relevant, self.users, self.popularity, self.user_categories):
            frame.unpersist()


@dataclass
class TrainedRecommender:
    """The result of :meth:`RecommenderTraining.run`."""

    choice: RecommenderChoice
    model: ALSModel
    tuning: list[TuningPoint]
    validation: dict[str, float]      # NDCG@k on validation: "als", "itemcf", "hybrid w=0.5", ...
    test: Evaluation
    test_hybrid_weight: float | None   # the hybrid's ALS weight on test: the best on validation
    fit: AlsFitSettings
    fit_seconds: float
    training_pairs: int
    training_users: int
    training_items: int
    cutoffs: dict[str, str] = field(default_factory=dict)

    @property
    def score(self) -> float:
        """The chosen recommender's test NDCG@k: what promotion compares."""
        return self.test.metrics[self.choice.kind].ndcg


def hybrid_label(weight: float) -> str:
    return f"{HYBRID_KIND} w={weight:g}"


class RecommenderTraining:
    """Tune, evaluate and fit the recommenders on ``events`` as of a cut-off (see the module docstring).

    Args:
        events: the ``events`` table (``user_id, item_id, event_type, event_ts[, event_date]``).
        item_categories: ``item_id, category``, one row per item.
        user_map, item_map: the id maps, covering every user and item of ``events``.
        cutoff: the end of the data used; the test window ends here.
        default_weights, half_life_days: the features' confidence weights and decay.
    """

    def __init__(self, *, events: DataFrame, item_categories: DataFrame, user_map: DataFrame, item_map: DataFrame,
                 settings: RecommendSettings, cutoff: dt.datetime, default_weights: Sequence[float],
                 half_life_days: float) -> None:
        self.events = events
        self.item_categories = to_indexes(item_categories.select(ITEM_ID, "category"), item_map=item_map)
        self.item_categories_by_id = item_categories.select(ITEM_ID, "category")
        self.user_map = user_map
        self.item_map = item_map
        self.settings = settings
        self.cutoff = cutoff
        self.default_weights = tuple(float(w) for w in default_weights)
        self.half_life_days = half_life_days
        self.test_start = cutoff - dt.timedelta(days=settings.test_days)
        self.validation_start = self.test_start - dt.timedelta(days=settings.validation_days)
        self.itemcf_params = ItemCfParams(basket_items=settings.itemcf_basket_items,
                                          neighbours=settings.itemcf_neighbours,
                                          min_support=settings.itemcf_min_support)
        self._slots: int | None = None

    # -- data

    def pairs_before(self, cutoff: dt.datetime) -> DataFrame:
        """Decayed (user_idx, item_idx) counts before ``cutoff``."""
        pairs = decayed_pairs(self.events, cutoff=cutoff, half_life_days=self.half_life_days)
        return to_indexes(pairs, user_map=self.user_map, item_map=self.item_map)

    def split(self, name: str, *, train_cutoff: dt.datetime, end: dt.datetime) -> SplitData:
        s = self.settings
        pairs = materialize(self.pairs_before(train_cutoff))
        window = to_indexes(window_items(self.events, start=train_cutoff, end=end, relevance=s.relevance),
                            user_map=self.user_map, item_map=self.item_map)
        new_to_user = window.join(pairs.select(USER_IDX, ITEM_IDX), on=[USER_IDX, ITEM_IDX], how="left_anti")
        with_relevant = new_to_user.select(USER_IDX).distinct()
        users = materialize(with_relevant.join(pairs.select(USER_IDX).distinct(), on=USER_IDX, how="inner"))
        relevant = materialize(new_to_user.join(users, on=USER_IDX, how="inner"))
        popularity = materialize(item_popularity(self.events, item_categories=self.item_categories_by_id,
                                                 end=train_cutoff, days=s.popularity_days, item_map=self.item_map))
        categories = materialize(user_top_categories(with_confidence(pairs, weights=self.default_weights),
                                                     item_categories=self.item_categories, n=s.fallback_categories))
        counts = (users.agg(F.count(F.lit(1)).alias("evaluated"))
                  .crossJoin(with_relevant.agg(F.count(F.lit(1)).alias("with_relevant")))
                  .crossJoin(pairs.agg(F.countDistinct(ITEM_IDX).alias("items"))).first())
        return SplitData(name=name, train_cutoff=train_cutoff, end=end, pairs=pairs, relevant=relevant, users=users,
                         popularity=popularity, user_categories=categories, users_evaluated=int(counts["evaluated"]),
                         users_with_relevant=int(counts["with_relevant"]), train_items=int(counts["items"]))

    def test_split(self) -> SplitData:
        return self.split("test", train_cutoff=self.test_start, end=self.cutoff)

    # -- fits and rankings

    def fit_settings_for(self, pairs: int) -> AlsFitSettings:
        """Blocks for ``pairs`` ratings; the cluster's task slots are asked once, and only when needed."""
        s = self.settings
        if self._slots is None and (s.num_user_blocks == 0 or s.num_item_blocks == 0):
            self._slots = task_slots(self.events.sparkSession)
        return fit_settings(s, pairs=pairs, slots=self._slots or 1)

    def fit(self, data: SplitData, params: AlsParams) -> ALSModel:
        ratings = data.ratings.ratings(params.weights)
        return fit_als(ratings, params, self.fit_settings_for(data.ratings.count(params.weights)))

    def als_ranking(self, model: ALSModel, data: SplitData, *, k: int) -> DataFrame:
        s = self.settings
        return als_top_k(model, data.users, k=k, block_size=s.user_block_size, chunk_size=s.item_block_size,
                         exclusions=data.pairs.select(USER_IDX, ITEM_IDX))

    def itemcf_ranking(self, data: SplitData, params: ItemCfParams, *, k: int) -> DataFrame:
        baskets = recent_baskets(data.pairs, basket_items=params.basket_items)
        return itemcf_top_k(baskets, item_similarities(baskets, params=params), k=k, users=data.users,
                            exclusions=data.pairs.select(USER_IDX, ITEM_IDX))

    def baseline_ranking(self, data: SplitData, *, by_category: bool) -> DataFrame:
        users = data.users.select(USER_IDX, F.lit(self.settings.k).alias("need"))
        return popularity_candidates(
            users, popularity=data.popularity, exclusions=data.pairs.select(USER_IDX, ITEM_IDX),
            user_categories=data.user_categories if by_category else None,
        ).select(USER_IDX, F.col("position").alias("rank"), ITEM_IDX)

    def score(self, ranking: DataFrame, data: SplitData, *, metrics: tuple[str, ...] | None = None) -> RankingMetrics:
        # Persisted: a ranking (an ALS scoring pass, or item-CF's joins) feeds the lists and the coverage.
        top = materialize(ranking.where(F.col("rank") <= self.settings.k))
        try:
            extra = {} if metrics is None else {"metrics": metrics}
            return ranking_metrics(top, data.relevant, users=data.users, k=self.settings.k,
                                   catalog_size=data.train_items, **extra)
        finally:
            top.unpersist()

    def rankings(self, data: SplitData, *, model: ALSModel | None, itemcf: ItemCfParams | None,
                 weights: Sequence[float]) -> dict[str, DataFrame]:
        """Top-k rankings of ALS (given a model), item-CF (given params) and a hybrid per ALS weight.

        The hybrid draws on both sources' deeper lists (``CANDIDATE_FACTOR * k``), cached for the
        weights; the caller unpersists the frames (:func:`release_rankings`).
        """
        k = self.settings.k
        depth = CANDIDATE_FACTOR * k if weights else k
        out: dict[str, DataFrame] = {}
        als = materialize(self.als_ranking(model, data, k=depth)) if model is not None else None
        cf = materialize(self.itemcf_ranking(data, itemcf, k=depth)) if itemcf is not None else None
        if als is not None:
            out[ALS_KIND] = als
        if cf is not None:
            out[ITEMCF_KIND] = cf
        if als is not None and cf is not None:
            for w in weights:
                out[hybrid_label(w)] = blend(als, cf, als_weight=w, k=k)
        return out

    def evaluate(self, data: SplitData, rankings: Mapping[str, DataFrame], *, baselines: bool) -> Evaluation:
        metrics = {name: self.score(ranking, data) for name, ranking in rankings.items()}
        if baselines:
            metrics["popular_in_category"] = self.score(self.baseline_ranking(data, by_category=True), data)
            metrics["popular"] = self.score(self.baseline_ranking(data, by_category=False), data)
        return Evaluation(split=data.name, metrics=metrics, users_evaluated=data.users_evaluated,
                          users_with_relevant=data.users_with_relevant)

    def score_choice(self, data: SplitData, choice: RecommenderChoice) -> float:
        """NDCG@k of ``choice`` trained on ``data``'s training pairs (the champion, on today's split)."""
        model = self.fit(data, choice.als) if choice.kind != ITEMCF_KIND else None
        itemcf = choice.itemcf if choice.kind != ALS_KIND else None
        weights = [choice.als_weight] if choice.kind == HYBRID_KIND else []
        ranked = self.rankings(data, model=model, itemcf=itemcf, weights=weights)
        try:
            name = hybrid_label(choice.als_weight) if choice.kind == HYBRID_KIND else choice.kind
            return self.score(ranked[name], data, metrics=("ndcg",)).ndcg
        finally:
            release_rankings(ranked)

    # -- the three steps

    def validate(self, grid: Sequence[AlsParams]) -> tuple[RecommenderChoice, list[TuningPoint], dict[str, float]]:
        """Choose on the validation window: the ALS search, then item-CF and the hybrids against it."""
        s = self.settings
        kinds = set(s.recommenders)
        candidates, rounds = plan(grid, budget=s.tuning_budget, seed=s.seed)
        if len(candidates) == 1 and kinds == {ALS_KIND}:
            # Nothing to choose between: no validation pass.
            choice = RecommenderChoice(kind=ALS_KIND, als=candidates[0], itemcf=self.itemcf_params, als_weight=1.0,
                                       similar_items_source=ALS_KIND)
            return choice, [], {}
        data = self.split("validation", train_cutoff=self.validation_start, end=self.test_start)
        try:
            def fit_and_score(params: AlsParams) -> tuple[float, float, ALSModel]:
                started = time.perf_counter()
                model = self.fit(data, params)
                ndcg = self.score(self.als_ranking(model, data, k=s.k), data, metrics=("ndcg",)).ndcg
                return ndcg, time.perf_counter() - started, model

            def run_round(step, items):  # noqa: ANN001, ANN202 - tuning.RoundRunner
                collect_ml_garbage()   # the models of dropped candidates, released before the round's fits
                return concurrently(step, items, parallelism=s.tuning_parallelism, spark=self.events.sparkSession)

            winner, model, points = successive_halving(candidates, rounds, fit_and_score, run_round=run_round)
            use_itemcf = bool(kinds & {ITEMCF_KIND, HYBRID_KIND})
            weights = list(s.hybrid_weights) if HYBRID_KIND in kinds else []
            ranked = self.rankings(data, model=model, itemcf=self.itemcf_params if use_itemcf else None,
                                   weights=weights)
            try:
                scores = {name: self.score(ranking, data, metrics=("ndcg",)).ndcg for name, ranking in ranked.items()
                          if name != ALS_KIND}
            finally:
                release_rankings(ranked)
            scores[ALS_KIND] = next(p.ndcg for p in reversed(points) if p.params == winner)
        finally:
            data.release()
        choice = choose_recommender(winner, scores, kinds=kinds, hybrid_weights=s.hybrid_weights,
                                    itemcf=self.itemcf_params)
        return choice, points, scores

    def run(self, grid: Sequence[AlsParams]) -> tuple[TrainedRecommender, SplitData]:
        """Validate, evaluate the choice on the test window, fit ALS on everything before the cut-off.

        Returns the result and the test split, still persisted (for the champion's evaluation on the
        same data); call its ``release()`` when done.
        """
        choice, tuning, validation = self.validate(grid)
        test = self.test_split()
        kinds = set(self.settings.recommenders)
        hybrid_weight = best_hybrid_weight(validation, self.settings.hybrid_weights)
        ranked = self.rankings(test, model=self.fit(test, choice.als),
                               itemcf=choice.itemcf if kinds & {ITEMCF_KIND, HYBRID_KIND} else None,
                               weights=[] if hybrid_weight is None else [hybrid_weight])
        try:
            named = {(HYBRID_KIND if name.startswith(HYBRID_KIND) else name): frame for name, frame in ranked.items()}
            evaluation = self.evaluate(test, named, baselines=True)
        finally:
            release_rankings(ranked)
        full = RatingsCache(self.pairs_before(self.cutoff))
        try:
            ratings = full.ratings(choice.als.weights)
            fit = self.fit_settings_for(full.count(choice.als.weights))
            started = time.perf_counter()
            model = fit_als(ratings, choice.als, fit)
            seconds = time.perf_counter() - started
            counts = ratings.agg(F.count(F.lit(1)), F.countDistinct(USER_IDX), F.countDistinct(ITEM_IDX)).first()
        finally:
            full.release()
        cutoffs = {"validation_start": self.validation_start.isoformat(), "test_start": self.test_start.isoformat(),
                   "cutoff": self.cutoff.isoformat()}
        return TrainedRecommender(choice=choice, model=model, tuning=tuning, validation=validation, test=evaluation,
                                  test_hybrid_weight=hybrid_weight, fit=fit, fit_seconds=seconds,
                                  training_pairs=int(counts[0]),
                                  training_users=int(counts[1]), training_items=int(counts[2]), cutoffs=cutoffs), test


def choose_recommender(als: AlsParams, scores: Mapping[str, float], *, kinds: set[str],
                       hybrid_weights: Sequence[float], itemcf: ItemCfParams) -> RecommenderChoice:
    """The recommender with the best validation NDCG among ``kinds`` (ties: ALS, item-CF, hybrids in order).

    Args:
        als: the ALS parameters the search chose.
        scores: validation NDCG@k by name: ``als``, ``itemcf``, ``hybrid w=<weight>``.

    ``similar_items`` come from item-CF when its own validation NDCG beats ALS's, else from ALS.
    """
    options = [(ALS_KIND, 1.0)]
    if ITEMCF_KIND in kinds and ITEMCF_KIND in scores:
        options.append((ITEMCF_KIND, 0.0))
    if HYBRID_KIND in kinds:
        options += [(HYBRID_KIND, w) for w in hybrid_weights if hybrid_label(w) in scores]

    def value(option: tuple[str, float]) -> float:
        name = hybrid_label(option[1]) if option[0] == HYBRID_KIND else option[0]
        v = scores.get(name, math.nan)
        return -math.inf if math.isnan(v) else v

    kind, weight = max(options, key=lambda o: (value(o), -options.index(o)))
    cf_better = ITEMCF_KIND in scores and value((ITEMCF_KIND, 0.0)) > value((ALS_KIND, 1.0))
    return RecommenderChoice(kind=kind, als=als, itemcf=itemcf, als_weight=weight,
                             similar_items_source=ITEMCF_KIND if cf_better else ALS_KIND)


def best_hybrid_weight(validation: Mapping[str, float], weights: Sequence[float]) -> float | None:
    """The hybrid weight with the best validation NDCG (ties: listed first); None when none was scored."""
    scored = [(validation[hybrid_label(w)], -i, w) for i, w in enumerate(weights)
              if hybrid_label(w) in validation and not math.isnan(validation[hybrid_label(w)])]
    return max(scored)[2] if scored else None


def release_rankings(rankings: Mapping[str, DataFrame]) -> None:
    for frame in rankings.values():
        frame.unpersist()
