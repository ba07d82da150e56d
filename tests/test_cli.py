"""The command line, the job entry points and the Databricks bundle that calls them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from inboxlift.cli import build_parser, main
from inboxlift.pipeline import GENERATED_SHOP_ONLY, RUN_ALL, STAGES

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "deploy" / "databricks.yml"
BUNDLE_VARIABLES = {"${bundle.target}": "dev", "${workspace.file_path}": "/Workspace/Users/x/.bundle/inboxlift/dev/files"}


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


def _bundle_tasks() -> list[dict]:
    bundle = yaml.safe_load(BUNDLE.read_text())
    return [task for job in bundle["resources"]["jobs"].values() for task in job["tasks"]]


def _substitute(values: list[str]) -> list[str]:
    out = []
    for value in values:
        for var, sample in BUNDLE_VARIABLES.items():
            value = value.replace(var, sample)
        assert "${" not in value, f"unknown bundle variable in {value!r}"
        out.append(value)
    return out


def test_bundle_targets_and_wheel():
    bundle = yaml.safe_load(BUNDLE.read_text())
    assert set(bundle["targets"]) == {"dev", "prod"}
    assert bundle["artifacts"]["inboxlift_wheel"]["type"] == "whl"
    for task in _bundle_tasks():
        assert {"whl": "../dist/*.whl"} in task["libraries"]


def test_every_stage_of_run_all_is_a_bundle_task():
    keys = [task["task_key"] for task in _bundle_tasks()]
    assert [k for k in keys if k in RUN_ALL] == [s for s in RUN_ALL if s not in GENERATED_SHOP_ONLY]
    assert not set(keys) & set(GENERATED_SHOP_ONLY)


@pytest.mark.parametrize("task", _bundle_tasks(), ids=lambda t: t["task_key"])
def test_bundle_task_entry_point_exists_and_accepts_its_arguments(task):
    job_file = (BUNDLE.parent / task["spark_python_task"]["python_file"]).resolve()
    assert job_file.is_file(), f"{job_file} does not exist"
    spec = importlib.util.spec_from_file_location(f"job_{task['task_key']}", job_file)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(job_file.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(job_file.parent))
    assert module.STAGE == task["task_key"] and module.STAGE in STAGES
    args = build_parser({}).parse_args(["run", module.STAGE, *_substitute(task["spark_python_task"]["parameters"])])
    assert args.env == "dev" and args.stage == module.STAGE
    assert (ROOT / "conf" / f"{args.env}.yml").is_file()


def test_bundle_checkpoint_dir_is_each_targets_setting():
    # ALS checkpoints where the cluster's spark.checkpoint.dir says; each target's value is the
    # spark.checkpoint_dir of its settings file, so the two cannot drift apart.
    bundle = yaml.safe_load(BUNDLE.read_text())
    spark_conf = bundle["resources"]["jobs"]["inboxlift_pipeline"]["job_clusters"][0]["new_cluster"]["spark_conf"]
    assert spark_conf["spark.checkpoint.dir"] == "${var.checkpoint_dir}"
    for target, spec in bundle["targets"].items():
        settings = yaml.safe_load((ROOT / "conf" / f"{target}.yml").read_text())
        assert spec["variables"]["checkpoint_dir"] == settings["spark"]["checkpoint_dir"]
