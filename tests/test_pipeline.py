"""The main command end to end on a tiny generated shop, the segments notebook on its result, and
the import command's refusal of an export that does not match its mapping."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

from inboxlift.cli import main
from inboxlift.pipeline import RUN_ALL

ROOT = Path(__file__).resolve().parents[1]
USERS = 150


def _overrides(work: Path) -> list[str]:
    settings = {
        "storage.lake_dir": work / "lake",
        "storage.backend": "deltars",
        "mlflow.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "mlflow.artifact_location": work / "artifacts",
        "paths.landing_dir": work / "landing",
        "paths.output_dir": work / "output",
        "generate.truth_dir": work / "truth",
        "delivery.journal_dir": work / "delivery",
        "generate.users": USERS,
        "generate.items": 40,
        "generate.days": 28,
        "generate.dirty_rate": 0.0,
        "segments.k_max": 4,
        "segments.stability_seeds": "[7]",
    }
    out = ["--conf-dir", str(ROOT / "conf")]
    for key, value in settings.items():
        out += ["--set", f"{key}={value}"]
    return out


@pytest.fixture(scope="module")
def run_all(spark, tmp_path_factory):
    """``inboxlift run-all`` on an empty local lake: it generates a shop, then runs every stage."""
    work = tmp_path_factory.mktemp("run_all")
    capture = work / "stdout.txt"
    saved = sys.stdout
    with capture.open("w") as out:
        sys.stdout = out
        try:
            code = main(["run-all", *_overrides(work), "--now", "2026-11-20T12:00:00"], environ={})
        finally:
            sys.stdout = saved
    return work, code, capture.read_text()


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
    work, code, stdout = run_all
    assert code == 0, stdout
    headers = [line.split(":")[0][3:] for line in stdout.splitlines() if line.startswith("== ")]
    assert headers == ["generate", *RUN_ALL, "tables"]


def test_run_all_tables_hold_every_user_once(run_all):
    work, _, stdout = run_all
    rows = _table_rows(stdout)
    # No dirty records were generated: every user is accepted, gets one feature row and one segment.
    assert rows["users"] == USERS
    assert rows["user_features"] == USERS
    assert rows["user_segments"] == USERS
    assert rows["products"] == 40 and rows["item_features"] == 40
    assert "events_quarantine" not in rows or rows["events_quarantine"] == 0
    assert rows["events"] > 0 and rows["interactions"] > 0


def test_run_all_delivers_mail_into_the_embedded_relay(run_all):
    """The loop ends with mail sent: the embedded relay stored what the send stage reports as sent."""
    import mailbox

    work, _, stdout = run_all
    sent = re.search(r"due \d+ = sent (\d+)", stdout)
    stored = re.search(r"embedded relay \S+ \(now stopped\): (\d+) messages stored", stdout)
    assert sent and stored, stdout[-3000:]
    assert int(sent.group(1)) > 0 and int(stored.group(1)) == int(sent.group(1))
    assert len(mailbox.Maildir(str(work / "output" / "sent"), create=False)) == int(sent.group(1))


def test_run_all_ends_with_where_things_are(run_all):
    work, _, stdout = run_all
    where = stdout.split("where things are:", 1)[1]
    assert f"lake (Delta tables): {work / 'lake'}" in where
    assert f"sqlite:///{work / 'mlflow.db'}" in where
    assert f"outputs (emails):    {work / 'output'}" in where


def test_segments_notebook_runs_on_the_result(run_all, capsys, monkeypatch):
    work, _, _ = run_all
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
