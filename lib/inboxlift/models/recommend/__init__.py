"""Recommendations: implicit ALS (Spark ML), item-based CF and their hybrid; docs/recommend.md.

- :mod:`.data`: id maps, (user, item) confidences from events, evaluation windows;
- :mod:`.als`: the ALS estimator, its cluster settings, cached ratings, blocked top-k;
- :mod:`.tuning`: the rank-scaled grid and successive halving on validation;
- :mod:`.itemcf`: co-occurrence similarity, item-based scores, the hybrid blend;
- :mod:`.baselines`: popularity baselines and the fallback chain;
- :mod:`.evaluate`: ranking metrics (Spark ML's ``RankingEvaluator``);
- :mod:`.training`: validation, test and final fit, the choice of recommender;
- :mod:`.serving`: each user's list: the served recommender, new arrivals, fallbacks, exclusions;
- :mod:`.tracking`: MLflow logging.

The stages that read and write tables are in :mod:`inboxlift.stages.recommend`.
"""
