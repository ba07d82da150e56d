"""The review-sentiment model trained, evaluated, logged and scored on Spark Connect.

The suite's run-all on Connect generates a shop too small to have labelled reviews, so its features
stage skips the model; this runs ``fit_sentiment`` and ``score_reviews`` on a local Connect server of
their own (in a subprocess, after the run-all, whose server holds the same port).
"""

from __future__ import annotations

import json

from run_all_shop import run_script

SCRIPT = r"""
import datetime as dt, json, sys
from inboxlift.models.sentiment import SentimentParams, fit_sentiment, score_reviews
from inboxlift.session import build_session
from inboxlift.settings import MlflowSettings, SparkSettings

work = sys.argv[1]
info = build_session(SparkSettings(remote="local[2]", driver_memory="2g", shuffle_partitions=2,
                                   checkpoint_dir=f"{work}/checkpoints"), environ={"CI": "true"})
spark = info.spark
positive = ["love it", "excellent quality", "works perfectly", "great value", "highly recommend", "fast delivery",
            "非常好", "质量很好"]
negative = ["broke after a week", "terrible quality", "waste of money", "very disappointed", "arrived damaged",
            "does not work", "质量太差", "很失望"]
rows = [(f"{kind}{copy}-{i}", f"u{i}", item, dt.datetime(2026, 11, 1), rating, text)
        for copy in range(4)
        for kind, item, rating, texts in (("p", "i1", 5, positive), ("n", "i2", 1, negative))
        for i, text in enumerate(texts)]
schema = "event_id string, user_id string, item_id string, event_ts timestamp, rating int, review_text string"
fit = fit_sentiment(spark.createDataFrame(rows, schema),
                    params=SentimentParams(min_reviews=4, max_iter=10, num_features=1024),
                    mlflow_settings=MlflowSettings(tracking_uri=f"sqlite:///{work}/mlflow.db",
                                                   artifact_location=f"{work}/artifacts"),
                    as_of=dt.date(2026, 11, 20))
new = spark.createDataFrame([("x1", "u9", "i1", dt.datetime(2026, 11, 2), None, "works perfectly, great value"),
                             ("x2", "u9", "i2", dt.datetime(2026, 11, 2), None, "arrived damaged, waste of money")],
                            schema)
scored = score_reviews(new, model=fit.model, threshold=0.5, run_id=fit.run_id, as_of=dt.date(2026, 11, 20))
labels = {r["event_id"]: r["sentiment_label"] for r in scored.collect()}
print(json.dumps({"connect": info.is_connect, "counts": fit.counts, "metrics": fit.metrics,
                  "logged": bool(fit.run_id and fit.model_uri), "labels": labels}), flush=True)
spark.stop()
"""


def test_the_sentiment_model_trains_evaluates_and_scores_on_connect(tmp_path, after_run_all):
    done = run_script(SCRIPT, str(tmp_path), cwd=tmp_path, timeout=240,
                      hung="the sentiment script on Connect did not finish in 240 s")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["connect"] is True and result["logged"] is True
    counts = result["counts"]
    # 4 copies of 8 five-star and 8 one-star reviews, split by a hash of the event id: every one counted once
    assert counts["train_positive"] + counts["test_positive"] == 32
    assert counts["train_negative"] + counts["test_negative"] == 32
    assert min(counts.values()) > 0
    # The two classes share no word: the held-out reviews (scored once and kept) are all right
    assert result["metrics"] == {"test_auc_roc": 1.0, "test_f1_weighted": 1.0, "test_f1_negative": 1.0,
                                 "test_f1_positive": 1.0, "test_accuracy": 1.0}
    assert result["labels"] == {"x1": 1, "x2": 0}
