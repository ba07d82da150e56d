"""The recommend stages: ``recommend-train`` (tune, evaluate, log, register, promote) and ``recommend`` (score).

``run_recommend_train`` extends the id maps, then (:class:`~inboxlift.models.recommend.training.RecommenderTraining`)
searches ALS on the validation window, scores item-based CF and the hybrid there and chooses the
recommender to serve, evaluates every recommender on the test window beside the ``popular`` and
``popular_in_category`` baselines, fits ALS on all events before the cut-off and logs everything in
one MLflow run. The ALS model is registered under ``recommend.registered_model`` with the choice in
its run's params; it takes the alias ``champion`` only if the served recommender's test NDCG@k beats
the champion's *on the same split* (the champion's choice retrained on the same training data and
scored on the same test window), otherwise ``challenger``.

``run_recommend`` loads the ``champion`` and its choice and writes, replacing each table:

- ``recommendations``: ``user_id, rank, item_id, score, source, model_version, run_id, scored_at``,
  ``top_n`` rows per user of ``user_features`` (fewer only when the catalogue runs out);
- ``similar_items``: ``item_id, rank, similar_item_id, score, source, model_version, run_id`` — by cosine
  of ALS item factors or by co-occurrence (item-based CF), whichever won on validation; in-stock only;
- ``content_similar_items``: ``item_id, rank, similar_item_id, score`` — content similarity within
  the top-level category, in-stock neighbours only.

A user's list is filled in this order: the served recommender (``als``, ``hybrid`` or ``itemcf``), up to
``content_slots`` new arrivals (in-stock items with ``item_features.is_new_arrival``) most similar by content
to the user's strongest interactions, then ``popular_in_category`` and ``popular``. Every source skips
items the user bought (except ``consumable_categories``), reviewed negatively, or that are out of stock.
The id maps ``id_map_users`` (``user_id, user_idx``) and ``id_map_items`` (``item_id, item_idx``)
only grow: an id keeps its index for ever.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import mlflow
from mlflow import MlflowClient
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from inboxlift.context import RunContext
from inboxlift.models import registry
from inboxlift.models.recommend.als import als_top_k, checkpoint_dir
from inboxlift.models.recommend.baselines import item_popularity, popularity_candidates, user_top_categories
from inboxlift.models.recommend.data import (
    CONFIDENCE,
    INTERACTION_TYPES,
    ITEM_ID,
    ITEM_IDX,
    USER_ID,
    USER_IDX,
    decayed_pairs,
    new_id_rows,
    to_indexes,
)
from inboxlift.models.recommend.evaluate import metric_name
from inboxlift.models.recommend.itemcf import SIMILAR_ITEM_IDX, item_similarities, recent_baskets
from inboxlift.models.recommend.tracking import CHOSEN, MODEL_ARTIFACT, load_als, log_recommender, log_scoring
from inboxlift.models.recommend.training import (
    ALS_KIND,
    ITEMCF_KIND,
    RecommenderChoice,
    RecommenderTraining,
    TrainedRecommender,
)
from inboxlift.models.recommend.serving import (
    SOURCES,
    assemble_recommendations,
    content_rows,
    recommendation_exclusions,
    served_rows,
)
from inboxlift.models.recommend.tuning import param_grid
from inboxlift.models.similar import (
    FEATURES,
    GROUP,
    ID,
    content_similar,
    content_vectors,
    similar_items,
)
from inboxlift.models.tracking import tracked_run, tracking_client
from inboxlift.session import materialize
from inboxlift.transforms.features_common import cutoff_of, latest_row_per_key
from inboxlift.transforms.features_returns import net_of_returns

EVENTS, PRODUCTS = "events", "products"
USER_FEATURES, ITEM_FEATURES, INTERACTIONS, REVIEW_SENTIMENT = (
    "user_features", "item_features", "interactions", "review_sentiment")
USER_MAP, ITEM_MAP = "id_map_users", "id_map_items"
RECOMMENDATIONS, SIMILAR_ITEMS, CONTENT_SIMILAR_ITEMS = "recommendations", "similar_items", "content_similar_items"
RECOMMENDATION_COLUMNS = ["user_id", "rank", "item_id", "score", "source", "model_version", "run_id", "scored_at"]
SIMILAR_COLUMNS = ["item_id", "rank", "similar_item_id", "score", "source", "model_version", "run_id"]
CONTENT_SIMILAR_COLUMNS = ["item_id", "rank", "similar_item_id", "score"]


class NoChampionError(RuntimeError):
    """Scoring found no ``champion`` version of the recommender: run recommend-train first."""


def promotion_metric(k: int) -> str:
    """The served recommender's test NDCG@k, the champion's retrained on the same split beside it."""
    return f"promotion/test_served_{metric_name('ndcg', k)}_same_split"


@dataclass(frozen=True)
class IdMapUpdate:
    table: str
    version: int
    added: int


@dataclass(frozen=True)
class RecommendTrainReport:
    run_id: str
    model_name: str
    version: str
    promotion: registry.Promotion
    trained: TrainedRecommender
    id_maps: tuple[IdMapUpdate, ...]

    def lines(self) -> list[str]:
        t = self.trained
        fit = t.fit
        lines = [f"recommend-train: run {self.run_id}, {self.model_name} version {self.version} -> "
                 f"{self.promotion.alias}",
                 f"  {self.promotion.reason}",
                 f"  serves {t.choice.label}; similar_items from {t.choice.similar_items_source}",
                 f"  ALS fit on {t.training_pairs} pairs ({t.training_users} users, {t.training_items} items) in "
                 f"{t.fit_seconds:.1f}s ({fit.num_user_blocks}x{fit.num_item_blocks} blocks)"]
        for m in self.id_maps:
            lines.append(f"  {m.table}: {m.added} new ids (table version {m.version})")
        if t.tuning:
            k = next(iter(t.test.metrics.values())).k
            lines.append(f"  validation NDCG@{k} (ALS by successive halving: round, iterations):")
            for point in t.tuning:
                mark = " <-" if point.params == t.choice.als else ""
                lines.append(f"    {point.round + 1}  {point.params.label:<68}{point.ndcg:>8.4f}{mark}")
            for name, value in t.validation.items():
                if name != ALS_KIND:
                    lines.append(f"       {name:<68}{value:>8.4f}")
        lines.append(f"  test window ({t.cutoffs.get('test_start', '?')} .. {t.cutoffs.get('cutoff', '?')}):")
        lines += ["  " + line for line in t.test.table()]
        return lines

    def summary(self) -> str:
        return "\n".join(self.lines())

    def __str__(self) -> str:
        return self.summary()


@dataclass(frozen=True)
class RecommendReport:
    model_name: str
    version: str
    run_id: str
    users: int
    rows: int
    rows_by_source: dict[str, int]
    # Share of users whose first recommendation comes from each source.
    users_by_first_source: dict[str, int]
    users_without_rows: int
    similar_items_rows: int
    content_similar_rows: int
    id_maps: tuple[IdMapUpdate, ...] = field(default_factory=tuple)

    def lines(self) -> list[str]:
        lines = [f"recommend: {self.rows} rows for {self.users} users from {self.model_name} version {self.version} "
                 f"(champion, run {self.run_id}) into {RECOMMENDATIONS}"]
        lines.append(f"  {'source':<21}{'rows':>9}{'users (first row)':>19}{'share':>8}")
        for source in SOURCES:
            users = self.users_by_first_source.get(source, 0)
            share = users / self.users if self.users else 0.0
            lines.append(f"  {source:<21}{self.rows_by_source.get(source, 0):>9}{users:>19}{share:>8.1%}")
        if self.users_without_rows:
            lines.append(f"  users without any recommendation (nothing left to recommend): {self.users_without_rows}")
        lines.append(f"  {SIMILAR_ITEMS}: {self.similar_items_rows} rows; {CONTENT_SIMILAR_ITEMS}: "
                     f"{self.content_similar_rows} rows")
        return lines

    def summary(self) -> str:
        return "\n".join(self.lines())

    def __str__(self) -> str:
        return self.summary()


def _read(ctx: RunContext, name: str) -> DataFrame:
    return ctx.lake.read_required(name, needed_by="the recommend stages", hint="run ingest and features first")


def _client(ctx: RunContext) -> MlflowClient:
    return tracking_client(ctx.settings.mlflow)


# ---- id maps -----------------------------------------------------------------------------------

def update_id_map(ctx: RunContext, table: str, ids: DataFrame, *, id_col: str, idx_col: str) -> IdMapUpdate:
    """Give the ids of ``ids`` not yet in ``table`` the next free indexes; existing rows never change."""
    existing = ctx.lake.read(table) if ctx.lake.exists(table) else None
    unseen = ids.select(id_col).where(F.col(id_col).isNotNull()).distinct()
    if existing is not None:
        unseen = unseen.join(existing.select(id_col), on=id_col, how="left_anti")
    unseen = unseen.persist()
    try:
        # Most runs add nothing (or few ids): checking first spares numbering an empty set.
        if existing is not None and unseen.isEmpty():
            return IdMapUpdate(table=table, version=ctx.lake.version(table), added=0)
        fresh = new_id_rows(unseen, existing=existing, id_col=id_col, idx_col=idx_col)
        result = ctx.lake.append(table, fresh.select(id_col, idx_col))
        added = result.rows_written if result.rows_written is not None else unseen.count()
    finally:
        unseen.unpersist()
    return IdMapUpdate(table=table, version=ctx.lake.version(table), added=added)


def update_id_maps(ctx: RunContext, *, users: DataFrame, items: DataFrame) -> tuple[IdMapUpdate, IdMapUpdate]:
    """Extend ``id_map_users`` and ``id_map_items`` with the user and item ids given."""
    return (update_id_map(ctx, USER_MAP, users.select(USER_ID), id_col=USER_ID, idx_col=USER_IDX),
            update_id_map(ctx, ITEM_MAP, items.select(ITEM_ID), id_col=ITEM_ID, idx_col=ITEM_IDX))


def _maps(ctx: RunContext, updates: tuple[IdMapUpdate, IdMapUpdate]) -> tuple[DataFrame, DataFrame]:
    # Read at the versions just written, so every step of the run sees the same maps.
    users, items = updates
    return ctx.lake.read(USER_MAP, version=users.version), ctx.lake.read(ITEM_MAP, version=items.version)


# ---- training ----------------------------------------------------------------------------------

def run_recommend_train(ctx: RunContext) -> RecommendTrainReport:
    """Choose, evaluate against the baselines, log and register the recommender; promote it if it beats the champion."""
    s, fs = ctx.settings.recommend, ctx.settings.features
    # Purchases net of returns, as the features count them (a cancelled order is no interaction).
    events, item_features = _read(ctx, EVENTS).transform(net_of_returns), _read(ctx, ITEM_FEATURES)
    cutoff = cutoff_of(ctx.clock.today())
    interaction_events = events.where(F.col("event_type").isin(*INTERACTION_TYPES)).where(
        F.col("event_ts") < F.lit(cutoff).cast("timestamp"))
    known = interaction_events.where(F.col(USER_ID).isNotNull() & F.col(ITEM_ID).isNotNull())
    id_maps = update_id_maps(ctx, users=known.select(USER_ID),
                             items=item_features.select(ITEM_ID).unionByName(known.select(ITEM_ID)))
    user_map, item_map = _maps(ctx, id_maps)
    weights = (fs.view_weight, fs.cart_weight, fs.purchase_weight)
    training = RecommenderTraining(events=events, item_categories=item_features.select(ITEM_ID, "category"),
                                   user_map=user_map, item_map=item_map, settings=s, cutoff=cutoff,
                                   default_weights=weights, half_life_days=fs.half_life_days)
    grid = param_grid(s, default_weights=weights)
    data = {"events_version": ctx.lake.version(EVENTS), "item_features_version": ctx.lake.version(ITEM_FEATURES),
            "id_map_users_version": id_maps[0].version, "id_map_items_version": id_maps[1].version,
            "as_of": ctx.clock.today().isoformat(), "checkpoint_dir": checkpoint_dir(ctx.spark) or "(none)"}
    run_name = f"recommend-train {ctx.clock.now():%Y-%m-%dT%H:%MZ}"
    metric = promotion_metric(s.k)
    with tracked_run(ctx.settings.mlflow, run_name=run_name, tags={"inboxlift.stage": "recommend-train"}) as run:
        trained, test = training.run(grid)
        try:
            examples = example_recommendations(trained, user_map=user_map, item_map=item_map, n_users=s.example_users,
                                               k=s.k, block_size=s.user_block_size, chunk_size=s.item_block_size)
            log_recommender(trained, data=data, settings=s, examples=examples)
            client = MlflowClient(tracking_uri=mlflow.get_tracking_uri(), registry_uri=mlflow.get_registry_uri())
            version = registry.register_model_version(
                client, name=s.registered_model, run_id=run.info.run_id, artifact_path=MODEL_ARTIFACT,
                tags={"recommender": trained.choice.kind, "params": trained.choice.label,
                      "id_map_users_version": str(id_maps[0].version),
                      "id_map_items_version": str(id_maps[1].version)},
                description=f"implicit ALS serving {trained.choice.label}")

            def champion_score(champion_version) -> float | None:
                # The champion's own choice, retrained on this split's training data and scored on this
                # test window: a model trained on later data would otherwise have seen the test window.
                choice = RecommenderChoice.from_params(client.get_run(champion_version.run_id).data.params, CHOSEN)
                if choice is None:
                    return None
                if choice == trained.choice:
                    return trained.score
                return training.score_choice(test, choice)

            promotion = registry.promote(client, s.registered_model, str(version.version), score=trained.score,
                                         metric=metric, higher_is_better=True, champion_score_fn=champion_score)
        finally:
            test.release()
        registry.log_promotion(
            promotion, champion_metric=f"promotion/champion_test_served_{metric_name('ndcg', s.k)}_same_split")
    return RecommendTrainReport(run_id=run.info.run_id, model_name=s.registered_model, version=str(version.version),
                                promotion=promotion, trained=trained, id_maps=id_maps)


def example_recommendations(trained: TrainedRecommender, *, user_map: DataFrame, item_map: DataFrame, n_users: int,
                            k: int, block_size: int, chunk_size: int) -> dict[str, list[dict]]:
    """Top-k of a few users (the smallest ``xxhash64(user_id)`` the model knows): user ids only, no personal data."""
    if n_users <= 0:
        return {}
    known = trained.model.userFactors.select(F.col("id").alias(USER_IDX))
    chosen = (user_map.join(known, on=USER_IDX, how="inner")
              .orderBy(F.xxhash64(USER_ID), USER_ID).limit(n_users).select(USER_IDX))
    rows = (als_top_k(trained.model, chosen, k=k, block_size=block_size, chunk_size=chunk_size)
            .join(user_map, on=USER_IDX, how="inner").join(item_map, on=ITEM_IDX, how="inner")
            .select(USER_ID, "rank", ITEM_ID, "score").orderBy(USER_ID, "rank").collect())  # n_users x k rows
    examples: dict[str, list[dict]] = {}
    for r in rows:
        examples.setdefault(r[USER_ID], []).append({"rank": r["rank"], "item_id": r[ITEM_ID],
                                                    "score": round(float(r["score"]), 6)})
    return examples


# ---- scoring -----------------------------------------------------------------------------------

def negative_reviews(ctx: RunContext, user_features: DataFrame) -> DataFrame:
    """Negatively reviewed (user, item) pairs: every scored review, plus user_features' list."""
    listed = user_features.select(USER_ID, F.explode_outer("negatively_reviewed_item_ids").alias(ITEM_ID)) \
        if "negatively_reviewed_item_ids" in user_features.columns else None
    scored = None
    if ctx.lake.exists(REVIEW_SENTIMENT):
        reviews = ctx.lake.read(REVIEW_SENTIMENT)
        if "is_negative" in reviews.columns:
            scored = reviews.where(F.col("is_negative")).select(USER_ID, ITEM_ID)
    frames = [f for f in (listed, scored) if f is not None]
    if not frames:
        return user_features.select(USER_ID, F.lit(None).cast("string").alias(ITEM_ID)).limit(0)
    out = frames[0]
    for frame in frames[1:]:
        out = out.unionByName(frame)
    return out.where(F.col(ITEM_ID).isNotNull()).distinct()


def served_choice(client: MlflowClient, champion) -> RecommenderChoice:
    """The champion's choice from its run; a run logged before item-CF existed serves ALS."""
    params = client.get_run(champion.run_id).data.params
    choice = RecommenderChoice.from_params(params, CHOSEN)
    if choice is None:
        raise NoChampionError(f"champion version {champion.version} (run {champion.run_id}) has no '{CHOSEN}.*' "
                              f"parameters: run recommend-train again")
    return choice


def run_recommend(ctx: RunContext) -> RecommendReport:
    """Score every user of ``user_features`` with the champion; replace the three recommendation tables."""
    s, fs = ctx.settings.recommend, ctx.settings.features
    name = s.registered_model
    client = _client(ctx)
    champion = registry.champion(client, name)
    if champion is None:
        raise NoChampionError(f"no version of model {name!r} has the alias 'champion': run recommend-train first")
    model = load_als(f"models:/{name}/{champion.version}")
    choice = served_choice(client, champion)
    model_version, run_id = str(champion.version), champion.run_id
    cutoff = cutoff_of(ctx.clock.today())

    user_features, item_features = _read(ctx, USER_FEATURES), _read(ctx, ITEM_FEATURES)
    interactions, products = _read(ctx, INTERACTIONS), _read(ctx, PRODUCTS)
    events = _read(ctx, EVENTS).transform(net_of_returns)
    id_maps = update_id_maps(ctx, users=user_features.select(USER_ID),
                             items=item_features.select(ITEM_ID).unionByName(interactions.select(ITEM_ID)))
    user_map, item_map = _maps(ctx, id_maps)
    item_categories = item_features.select(ITEM_ID, "category")
    # Kept with materialize (locally checkpointed on Spark Connect): the frames built on these read them
    # several times, and on Connect their plans would otherwise nest past protobuf's depth limit.
    users = materialize(to_indexes(user_features.select(USER_ID), user_map=user_map))
    in_stock = materialize(to_indexes(item_features.where(F.col("is_in_stock")).select(ITEM_ID), item_map=item_map))
    exclusions = materialize(to_indexes(
        recommendation_exclusions(interactions=interactions, item_categories=item_categories,
                                  negative=negative_reviews(ctx, user_features) if s.exclude_negative_reviews else None,
                                  exclude_purchased=s.exclude_purchased,
                                  consumable_categories=s.consumable_categories),
        user_map=user_map, item_map=item_map))
    persisted = [users, in_stock, exclusions]
    try:
        baskets = None
        if choice.kind != ALS_KIND or choice.similar_items_source == ITEMCF_KIND:
            # Item-based CF needs no training: its baskets are today's latest items.
            pairs = to_indexes(decayed_pairs(events, cutoff=cutoff, half_life_days=fs.half_life_days),
                               user_map=user_map, item_map=item_map)
            baskets = materialize(recent_baskets(pairs, basket_items=choice.itemcf.basket_items))
            persisted.append(baskets)
        # The served rows and the content rows are each read three times by the assembly (counted, kept
        # apart from the other source, united): kept once, so the top-k behind them runs once.
        primary = materialize(served_rows(choice, model=model, baskets=baskets, users=users, exclusions=exclusions,
                                          in_stock=in_stock, k=s.top_n, block_size=s.user_block_size,
                                          chunk_size=s.item_block_size))
        persisted.append(primary)

        products_latest = latest_row_per_key(products, key=ITEM_ID, order_by="updated_at",
                                             columns=["name", "description", "category_path", "brand", "price"])
        vectors = materialize(to_indexes(content_vectors(products_latest, weights=s.content_weights,
                                                         text_features=s.content_text_features,
                                                         price_edges=fs.price_band_edges,
                                                         price_labels=fs.price_band_labels),
                                         item_map=item_map)
                              .select(F.col(ITEM_IDX).alias(ID), GROUP, FEATURES))
        persisted.append(vectors)
        content_similar_rows = content_similar(vectors, k=s.content_similar_items, block_size=s.user_block_size,
                                               chunk_size=s.item_block_size,
                                               candidate_ids=in_stock.select(F.col(ITEM_IDX).alias(ID)))
        # New arrivals are items launched lately (item_features.is_new_arrival), not items the model
        # happens to lack factors for: those are mostly old stock with few sales.
        new_items = to_indexes(item_features.where(F.col("is_in_stock") & F.col("is_new_arrival")).select(ITEM_ID),
                               item_map=item_map)
        interactions_idx = to_indexes(interactions.select(USER_ID, ITEM_ID, CONFIDENCE), user_map=user_map,
                                      item_map=item_map)
        strongest = Window.partitionBy(USER_IDX).orderBy(F.col(CONFIDENCE).desc(), F.col(ITEM_IDX))
        anchors = (interactions_idx.withColumn("_a", F.row_number().over(strongest))
                   .where(F.col("_a") <= s.content_anchor_items).select(USER_IDX, ITEM_IDX))
        content = materialize(content_rows(anchors=anchors, new_items=new_items, vectors=vectors,
                                           exclusions=exclusions, slots=s.content_slots,
                                           neighbours=s.content_similar_items, block_size=s.user_block_size,
                                           chunk_size=s.item_block_size))
        persisted.append(content)

        popularity = materialize(item_popularity(events, item_categories=item_categories, end=cutoff,
                                                 days=s.popularity_days, item_map=item_map,
                                                 candidate_items=in_stock))
        categories_idx = to_indexes(item_categories, item_map=item_map)
        user_categories = user_top_categories(interactions_idx, item_categories=categories_idx,
                                              n=s.fallback_categories)
        persisted.append(popularity)

        def fallback_for(needs: DataFrame, chosen: DataFrame) -> DataFrame:
            return popularity_candidates(needs, popularity=popularity, user_categories=user_categories,
                                         exclusions=exclusions.unionByName(chosen).distinct())

        ranked = assemble_recommendations(users=users, primary=primary, content=content, fallback_for=fallback_for,
                                          top_n=s.top_n)
        scored_at = F.lit(ctx.clock.now()).cast("timestamp")
        recommendations = (ranked.join(user_map, on=USER_IDX, how="inner").join(item_map, on=ITEM_IDX, how="inner")
                           .select(USER_ID, "rank", ITEM_ID, "score", "source",
                                   F.lit(model_version).alias("model_version"), F.lit(run_id).alias("run_id"),
                                   scored_at.alias("scored_at")))
        ctx.lake.overwrite(RECOMMENDATIONS, recommendations.select(*RECOMMENDATION_COLUMNS), overwrite_schema=True)

        candidate_ids = in_stock.select(F.col(ITEM_IDX).alias(ID))
        if choice.similar_items_source == ITEMCF_KIND:
            similar = item_similarities(baskets, params=dataclasses.replace(choice.itemcf, neighbours=s.similar_items),
                                        candidate_items=in_stock).withColumnRenamed(SIMILAR_ITEM_IDX,
                                                                                    "similar_item_idx")
        else:
            similar = similar_items(model.itemFactors, k=s.similar_items, block_size=s.user_block_size,
                                    chunk_size=s.item_block_size, candidate_ids=candidate_ids)
        similar_written = ctx.lake.overwrite(SIMILAR_ITEMS, _with_item_ids(similar, item_map).select(
            "item_id", "rank", "similar_item_id", F.col("score").cast("double").alias("score"),
            F.lit(choice.similar_items_source).alias("source"),
            F.lit(model_version).alias("model_version"), F.lit(run_id).alias("run_id")), overwrite_schema=True)
        content_written = ctx.lake.overwrite(
            CONTENT_SIMILAR_ITEMS, _with_item_ids(content_similar_rows, item_map).select(
                "item_id", "rank", "similar_item_id", F.col("score").cast("double").alias("score")),
            overwrite_schema=True)
    finally:
        for frame in persisted:
            frame.unpersist()

    report = _score_report(ctx, name=name, version=model_version, run_id=run_id, id_maps=id_maps,
                           written={SIMILAR_ITEMS: similar_written.rows_written,
                                    CONTENT_SIMILAR_ITEMS: content_written.rows_written})
    with tracked_run(ctx.settings.mlflow, run_name=f"recommend {ctx.clock.now():%Y-%m-%dT%H:%MZ}",
                     tags={"inboxlift.stage": "recommend", "model_version": model_version, "model_run_id": run_id,
                           "recommender": choice.kind}):
        metrics = {"users": float(report.users), "rows": float(report.rows),
                   "users_without_rows": float(report.users_without_rows)}
        for source in SOURCES:
            metrics[f"rows/{source}"] = float(report.rows_by_source.get(source, 0))
            metrics[f"users_share_first_source/{source}"] = (
                report.users_by_first_source.get(source, 0) / report.users if report.users else 0.0)
        log_scoring(metrics)
    return report


def _with_item_ids(pairs: DataFrame, item_map: DataFrame) -> DataFrame:
    ids = item_map.select(ITEM_IDX, ITEM_ID)
    return (pairs.join(ids, on=ITEM_IDX, how="inner")
            .join(ids.select(F.col(ITEM_IDX).alias("similar_item_idx"), F.col(ITEM_ID).alias("similar_item_id")),
                  on="similar_item_idx", how="inner"))


def _score_report(ctx: RunContext, *, name: str, version: str, run_id: str, id_maps: tuple[IdMapUpdate, ...],
                  written: dict[str, int | None]) -> RecommendReport:
    def rows(table: str) -> int:
        known = written.get(table)
        return known if known is not None else ctx.lake.read(table).count()

    counts = (ctx.lake.read(RECOMMENDATIONS).groupBy("source")
              .agg(F.count(F.lit(1)).alias("rows"), F.count(F.when(F.col("rank") == 1, True)).alias("first"))
              .collect())  # one row per source
    by_source = {r["source"]: int(r["rows"]) for r in counts}
    first = {r["source"]: int(r["first"]) for r in counts if r["first"]}
    users = ctx.lake.read(USER_FEATURES).select(USER_ID).distinct().count()
    with_rows = sum(first.values())
    return RecommendReport(model_name=name, version=version, run_id=run_id, users=users, rows=sum(by_source.values()),
                           rows_by_source=by_source, users_by_first_source=first,
                           users_without_rows=users - with_rows,
                           similar_items_rows=rows(SIMILAR_ITEMS), content_similar_rows=rows(CONTENT_SIMILAR_ITEMS),
                           id_maps=id_maps)
