"""The main command end to end on a tiny generated shop (the suite's one run-all, on Spark Connect:
tests/run_all_shop.py), the notebooks and the logged models on its result, and the import command's
refusal of an export that does not match its mapping."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

from inboxlift.cli import main
from inboxlift.pipeline import RUN_ALL
from run_all_shop import ITEMS, USERS, set_args, shop_settings

ROOT = Path(__file__).resolve().parents[1]


# The notebooks and commands here run in this process, on the suite's classic session.
pytestmark = pytest.mark.usefixtures("spark")


def _overrides(work: Path) -> list[str]:
    """The run-all's lake and stores without its Connect session: how a notebook here reads its result."""
    return set_args(shop_settings(work))


def _table_rows(stdout: str) -> dict[str, int]:
    """Rows per table from the table listing run-all prints at the end."""
    listing = stdout.split("== tables", 1)[1].split("where things are:", 1)[0]
    rows = {}
    for line in listing.splitlines()[2:]:
        parts = line.split()
        if len(parts) >= 2:
            rows[parts[0]] = int(parts[1].replace(",", ""))
    return rows


def test_run_all_generates_then_runs_every_stage_in_order(run_all):
    stdout = run_all.stdout
    assert run_all.done.returncode == 0, stdout[-3000:] + run_all.done.stderr[-5000:]
    headers = [line.split(":")[0][3:] for line in stdout.splitlines() if line.startswith("== ")]
    assert headers == ["generate", *RUN_ALL, "tables"]
    # Each stage says how long it took, in the order it ran.
    took = re.findall(r"^  (\S+) took (\d+\.\d)s$", stdout, flags=re.MULTILINE)
    assert [name for name, _ in took] == list(RUN_ALL)


def test_run_all_tables_hold_every_user_once(run_all):
    rows = _table_rows(run_all.stdout)
    # No dirty records were generated: every user is accepted, gets one feature row and one segment.
    assert rows["users"] == USERS
    assert rows["user_features"] == USERS
    assert rows["user_segments"] == USERS
    assert rows["products"] == ITEMS and rows["item_features"] == ITEMS
    assert "events_quarantine" not in rows or rows["events_quarantine"] == 0
    assert rows["events"] > 0 and rows["interactions"] > 0


def test_the_searches_sample_refit_and_halving_ran_on_connect(run_all):
    """segment-train searched on a sample and refitted on all users; recommend-train's first halving round
    fitted both ALS candidates (side by side) and its second round the survivor."""
    stdout = run_all.stdout
    searched = re.search(r"k searched on (\d+) of (\d+) users", stdout)
    assert searched, stdout[-3000:]
    assert 0 < int(searched.group(1)) < int(searched.group(2)) == USERS
    assert re.search(r"segment: %d users assigned" % USERS, stdout)
    rounds = re.findall(r"^\s+(\d)\s+rank=(\d+) ", stdout, re.M)
    assert sorted(rank for number, rank in rounds if number == "1") == ["4", "8"]
    assert [number for number, _ in rounds if number == "2"] == ["2"]


def test_run_all_delivers_mail_into_the_embedded_relay(run_all):
    """The loop ends with mail sent: the embedded relay stored what the send stage reports as sent."""
    import mailbox

    work, stdout = run_all.work, run_all.stdout
    sent = re.search(r"due \d+ = sent (\d+)", stdout)
    stored = re.search(r"embedded relay \S+ \(now stopped\): (\d+) messages stored", stdout)
    assert sent and stored, stdout[-3000:]
    assert int(sent.group(1)) > 0 and int(stored.group(1)) == int(sent.group(1))
    assert len(mailbox.Maildir(str(work / "output" / "sent"), create=False)) == int(sent.group(1))


def test_run_all_ends_with_where_things_are(run_all):
    work, stdout = run_all.work, run_all.stdout
    where = stdout.split("where things are:", 1)[1]
    assert f"lake (Delta tables): {work / 'lake'}" in where
    assert f"sqlite:///{work / 'mlflow.db'}" in where
    assert f"outputs (emails):    {work / 'output'}" in where


def test_segments_notebook_runs_on_the_result(run_all, capsys, monkeypatch):
    work = run_all.work
    monkeypatch.setattr(sys, "argv", ["segments.py", *_overrides(work)])
    runpy.run_path(str(ROOT / "notebooks" / "segments.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "inboxlift-segments version 1" in out
    plots = sorted(p.name for p in (work / "output" / "segments").glob("*.png"))
    assert plots == ["k_search.png", "segment_profiles.png"]
    assert all((work / "output" / "segments" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    # The last cell lists users per segment; together they are every user.
    counts = []
    for line in reversed(out.strip().splitlines()):
        match = re.fullmatch(r"\s*\d+  \S.*?\s+(\d+)", line)
        if not match:
            break
        counts.append(int(match.group(1)))
    assert len(counts) >= 2 and sum(counts) == USERS


def test_import_refuses_an_export_without_a_mapped_column(spark, tmp_path, capsys):
    export = tmp_path / "clicks.csv"
    # RetailRocket's columns without "itemid", which ingest.imports.clickstream.item_id names.
    export.write_text("timestamp,visitorid,event,transactionid\n1433221332117,257597,view,\n")
    code = main(["import", "--shape", "clickstream", str(export), *_overrides(tmp_path)], environ={})
    assert code == 2
    err = capsys.readouterr().err
    assert "item_id -> 'itemid'" in err
    assert not (tmp_path / "lake" / "events").exists()


def _run_notebook(name: str, work: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *_overrides(work)])
    runpy.run_path(str(ROOT / "notebooks" / f"{name}.py"), run_name="__main__")


def test_features_notebook_runs_on_the_result(run_all, capsys, monkeypatch):
    work = run_all.work
    _run_notebook("features", work, monkeypatch)
    out = capsys.readouterr().out
    assert f"{USERS} users" in out
    # Every user is counted once per feature: with a value or without.
    counts = re.findall(r"^(\w+)\s+(\d+) users with a value,\s+(\d+) without$", out, flags=re.M)
    assert len(counts) == 12 and all(int(with_) + int(without) == USERS for _, with_, without in counts)
    # The RFM grid's last column is mean spend; its users column adds up to every user.
    grid = out.split("plots written:", 1)[1].splitlines()[2:]
    assert sum(int(line.split()[-2]) for line in grid if line.strip()) == USERS
    plots = sorted(p.name for p in (work / "output" / "features").glob("*.png"))
    assert plots == ["distributions.png", "rfm_grid.png"]


def test_recommendations_notebook_runs_on_the_result(run_all, capsys, monkeypatch):
    work = run_all.work
    _run_notebook("recommendations", work, monkeypatch)
    out = capsys.readouterr().out
    assert "inboxlift-recommender version 1" in out
    # The metrics table has the champion's recommenders and the popularity baseline(s) as rows.
    table = out.split("serving", 1)[1].split("plots written:", 1)[0]
    assert "popular" in table and "ndcg_at_10" in table
    assert len(re.findall(r"^=== user \S+: history$", out, flags=re.M)) == 3
    assert len(re.findall(r"^--- user \S+: recommendations$", out, flags=re.M)) == 3
    assert (work / "output" / "recommendations" / "metrics_vs_baselines.png").read_bytes()[:4] == b"\x89PNG"


# Run in a fresh interpreter: nothing of inboxlift importable (the editable install's path entry and
# finder removed), then each model loaded from its own folder, which must bring the code it needs.
_LOAD_AND_SCORE = r"""
import importlib.util, json, sys
from pathlib import Path
sys.path[:] = [p for p in sys.path if not (Path(p or ".") / "inboxlift" / "__init__.py").is_file()]
sys.meta_path[:] = [f for f in sys.meta_path if "inboxlift" not in getattr(f, "__module__", "")]
assert importlib.util.find_spec("inboxlift") is None, "inboxlift is importable before any model is loaded"
import mlflow.pyfunc, pandas as pd
SAMPLE = {"integer": 0, "long": 0, "double": 1.0, "float": 1.0, "string": "great value, works well",
          "boolean": False}
results = {}
for folder in sys.argv[1:]:
    model = mlflow.pyfunc.load_model(folder)
    row = pd.DataFrame({spec.name: pd.Series([SAMPLE[spec.type.name]], dtype=spec.type.to_pandas())
                        for spec in model.metadata.get_input_schema().inputs})
    scored = model.predict(row)
    import inboxlift
    results[folder] = {"rows": len(scored), "inboxlift": inboxlift.__file__}
print(json.dumps(results))
"""


def test_every_logged_model_loads_and_scores_where_the_library_is_not_installed(run_all, tmp_path):
    import json
    import os
    import subprocess

    import mlflow

    work = run_all.work
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    folders, runs_with_models = [], set()
    for run in client.search_runs(experiments):
        for entry in client.list_artifacts(run.info.run_id):
            if entry.is_dir and any(f.path.endswith("/MLmodel") for f in client.list_artifacts(run.info.run_id, entry.path)):
                runs_with_models.add(run.info.run_id)
                folders.append(mlflow.artifacts.download_artifacts(
                    run_id=run.info.run_id, artifact_path=entry.path, dst_path=str(tmp_path / run.info.run_id),
                    tracking_uri=f"sqlite:///{work / 'mlflow.db'}"))
    champions = {client.get_model_version_by_alias(name, "champion").run_id
                 for name in ("inboxlift-segments", "inboxlift-recommender")}
    assert champions <= runs_with_models
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", _LOAD_AND_SCORE, *folders], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for folder in folders:
        assert results[folder]["rows"] == 1
        # The library that loaded is the copy inside a model folder (code_paths), not an installed one.
        assert results[folder]["inboxlift"].startswith(str(tmp_path)), results[folder]
        assert (Path(folder) / "code" / "inboxlift" / "__init__.py").is_file()
