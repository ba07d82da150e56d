"""The command line and the job entry points (the Databricks bundle: test_bundle.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from inboxlift.cli import build_parser, main
from inboxlift.pipeline import STAGES

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_commands_and_stages():
    out = subprocess.run([sys.executable, "-m", "inboxlift.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("run", "run-all", "tables", "generate"):
        assert command in out.stdout
    for stage in STAGES:
        assert stage in out.stdout


def test_unknown_stage_is_refused():
    with pytest.raises(SystemExit) as info:
        build_parser({}).parse_args(["run", "no-such-stage"])
    assert info.value.code == 2


def test_settings_error_exits_2_with_a_message(capsys):
    assert main(["settings", "--set", "storage.lake=x", "--conf-dir", str(ROOT / "conf")], environ={}) == 2
    assert "unknown setting 'storage.lake'" in capsys.readouterr().err


def test_tables_lists_rows_versions_and_last_operation(spark, tmp_path, capsys):
    from inboxlift.settings import load_settings
    from inboxlift.storage import Lake

    lake_dir = tmp_path / "lake"
    settings = load_settings("local", conf_dir=ROOT / "conf", overrides={"storage.lake_dir": str(lake_dir)})
    lake = Lake.open(spark, settings.storage, has_delta_jars=False)
    lake.append("users", spark.createDataFrame([("u1",), ("u2",), ("u3",)], "user_id string"))
    lake.append("users", spark.createDataFrame([("u4",)], "user_id string"))
    lake.append("events", spark.createDataFrame([], "event_id string"))
    code = main(["tables", "--conf-dir", str(ROOT / "conf"), "--set", f"storage.lake_dir={lake_dir}",
                 "--set", "storage.backend=deltars"], environ={})
    assert code == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert lines["users"][1:4] == ["4", "1", "2"]  # rows, version, files
    assert lines["events"][1:4] == ["0", "0", "0"]


@pytest.mark.parametrize("job_file", sorted(p for p in (ROOT / "jobs").glob("*.py")
                                             if not p.name.startswith("_") and p.stem not in {"run_all", "generate"}),
                         ids=lambda p: p.stem)
def test_job_files_run_a_stage_that_exists(job_file):
    # spark-submit entry points (the Databricks bundle runs the wheel's `inboxlift-job` instead: test_bundle.py).
    spec = importlib.util.spec_from_file_location(f"job_{job_file.stem}", job_file)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(job_file.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(job_file.parent))
    assert module.STAGE in STAGES and module.STAGE.replace("-", "_") == job_file.stem
    args = build_parser({}).parse_args(["run", module.STAGE, "--env", "dev"])
    assert args.stage == module.STAGE
