"""deploy/databricks.yml, resolved per target as the Databricks CLI would, checked with the
``databricks-bundles`` resource classes and against the code: entry points, dependencies, variables,
Unity Catalog names, volumes, and no local path in a Databricks target. Also: the wheel carries conf/
and no Spark of its own."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from databricks.bundles.jobs import Job
from databricks.bundles.schemas import Schema
from databricks.bundles.volumes import Volume

from inboxlift.cli import build_parser
from inboxlift.notebook import WIDGETS
from inboxlift.pipeline import GENERATED_SHOP_ONLY, RUN_ALL, STAGES
from inboxlift.settings import THREE_PART_NAME, load_settings
from inboxlift.storage.names import TableNames

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "deploy" / "databricks.yml"
TARGETS = ["dev", "prod"]
USER = "jane.doe@shop.example"      # the deploying user, as ${workspace.current_user.userName}
SERVICE_PRINCIPAL = "6f1c2b7e-0000-4000-8000-00000000abcd"
# Stages that exist for the generated shop only and must not run on a real one.
LOCAL_ONLY_STAGES = set(GENERATED_SHOP_ONLY)
REFERENCE = re.compile(r"\$\{([^}]+)\}")


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _short_name(user: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", user.split("@")[0].lower())


def resolve(target: str, *, variables: dict[str, str] | None = None) -> dict[str, Any]:
    """The bundle for ``target``: the target merged over the top level, development mode's per-user
    prefix on names, and every ``${...}`` replaced; an unresolvable reference fails the test."""
    raw = yaml.safe_load(BUNDLE.read_text())
    spec = raw["targets"][target]
    bundle = _merge({k: v for k, v in raw.items() if k != "targets"},
                    {k: v for k, v in spec.items() if k not in {"variables", "mode", "default"}})
    declared = raw["variables"]
    values = {name: d.get("default") for name, d in declared.items()}
    values.update(spec.get("variables", {}))
    values.update(variables or {})
    development = spec.get("mode") == "development"
    if development:   # development mode prefixes UC resource names per user (dev_<short name>_)
        for schema in bundle["resources"]["schemas"].values():
            schema["name"] = f"dev_{_short_name(USER)}_{schema['name']}"

    def lookup(ref: str) -> Any:
        parts = ref.split(".")
        if parts[0] == "var":
            assert parts[1] in declared, f"${{{ref}}} names no declared variable"
            value = values[parts[1]]
            assert value is not None, f"variable {parts[1]} has no value for target {target}"
            return value
        if ref == "bundle.target":
            return target
        if ref == "bundle.name":
            return raw["bundle"]["name"]
        if ref == "workspace.current_user.userName":
            return USER
        if parts[0] == "resources":
            node: Any = bundle
            for part in parts:
                node = node[part]
            return node
        raise AssertionError(f"${{{ref}}} is not a reference this bundle may use")

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: fill(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v) for v in node]
        if isinstance(node, str):
            for _ in range(5):   # references to resources can hold references themselves
                if not REFERENCE.search(node):
                    break
                whole = REFERENCE.fullmatch(node)
                node = lookup(whole.group(1)) if whole else REFERENCE.sub(lambda m: str(lookup(m.group(1))), node)
                if not isinstance(node, str):
                    return node
        return node

    resolved = fill(bundle)
    resolved["mode"] = spec.get("mode")
    return resolved


def _prod_values() -> dict[str, str]:
    return {"service_principal": SERVICE_PRINCIPAL}


@pytest.fixture(scope="module", params=TARGETS)
def bundle(request) -> tuple[str, dict[str, Any]]:
    target = request.param
    return target, resolve(target, variables=_prod_values() if target == "prod" else None)


def _jobs(resolved: dict[str, Any]) -> dict[str, Job]:
    return {key: Job.from_dict(copy.deepcopy(job)) for key, job in resolved["resources"]["jobs"].items()}


def _stage_tasks(job: Job) -> dict[str, Any]:
    return {t.task_key: t for t in job.tasks if t.python_wheel_task is not None}


def _settings_for(target: str, parameters: list[str]):
    """The settings a task loads: its command line's common options parsed by the ``inboxlift`` parser
    (as ingest's: the settings options are every stage's, and one stage may be on another branch)."""
    args = build_parser({}).parse_args(["run", "ingest", *parameters[2:]])
    overrides = dict(o.split("=", 1) for o in args.overrides)
    return args, load_settings(args.env, conf_dir=ROOT / "conf", overrides=overrides, environ={})


def test_every_resource_is_a_valid_databricks_resource(bundle):
    target, resolved = bundle
    resources = resolved["resources"]
    jobs = _jobs(resolved)
    assert set(jobs) == {"inboxlift_pipeline", "inboxlift_maintenance"}
    schemas = {k: Schema.from_dict(copy.deepcopy(v)) for k, v in resources["schemas"].items()}
    volumes = {k: Volume.from_dict(copy.deepcopy(v)) for k, v in resources["volumes"].items()}
    assert set(volumes) == {"landing", "output", "checkpoints", "delivery"}
    for volume in volumes.values():
        assert volume.schema_name == schemas["marketing"].name and volume.catalog_name == schemas["marketing"].catalog_name


def test_targets_dev_in_development_mode_prod_in_production_with_run_as_and_root_path():
    raw = yaml.safe_load(BUNDLE.read_text())
    assert raw["targets"]["dev"]["mode"] == "development"
    prod = raw["targets"]["prod"]
    assert prod["mode"] == "production"
    assert prod["run_as"] == {"service_principal_name": "${var.service_principal}"}
    assert "default" not in raw["variables"]["service_principal"], "the service principal must be given for prod"
    resolved = resolve("prod", variables=_prod_values())
    assert resolved["workspace"]["root_path"].startswith(f"/Workspace/Users/{SERVICE_PRINCIPAL}/.bundle/inboxlift/")
    with pytest.raises(AssertionError, match="service_principal has no value"):
        resolve("prod")


def test_every_stage_task_runs_a_stage_the_cli_knows_with_arguments_it_accepts(bundle):
    target, resolved = bundle
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    unknown = []
    for job in _jobs(resolved).values():
        for key, task in _stage_tasks(job).items():
            wheel = task.python_wheel_task
            assert wheel.package_name == "inboxlift"
            assert scripts.get(wheel.entry_point) == "inboxlift.cli:job_main", wheel.entry_point
            params = list(wheel.parameters)
            assert params[:2] == ["run", key], f"task {key} runs {params[:2]}"
            if key not in STAGES:
                unknown.append(key)
                continue
            build_parser({}).parse_args(params)   # exits (fails the test) on an option the stage lacks
            assert [lib.whl for lib in task.libraries] == ["../dist/*.whl"]
    assert not unknown, f"tasks whose stage does not exist: {unknown}"


def test_the_pipeline_job_has_every_stage_in_dependency_order_and_maintenance_its_own_schedule(bundle):
    target, resolved = bundle
    jobs = _jobs(resolved)
    pipeline, maintenance = jobs["inboxlift_pipeline"], jobs["inboxlift_maintenance"]
    tasks = {t.task_key: t for t in pipeline.tasks}
    clusters = {c.job_cluster_key for c in pipeline.job_clusters}
    for task in pipeline.tasks:
        assert task.job_cluster_key in clusters
        for dependency in task.depends_on:
            assert dependency.task_key in tasks, f"{task.task_key} depends on unknown task {dependency.task_key}"
    stage_tasks = set(_stage_tasks(pipeline))
    expected = [s for s in RUN_ALL if s not in LOCAL_ONLY_STAGES]
    assert set(expected) == stage_tasks, "the job's stage tasks are run-all's stages, local-only ones aside"
    assert not stage_tasks & LOCAL_ONLY_STAGES

    def upstream(key: str) -> set[str]:
        seen: set[str] = set()
        todo = [d.task_key for d in tasks[key].depends_on]
        while todo:
            name = todo.pop()
            assert name != key, f"dependency cycle through {key}"
            if name not in seen:
                seen.add(name)
                todo += [d.task_key for d in tasks[name].depends_on]
        return seen

    order = expected
    for key in stage_tasks:
        # Every stage before this one in run-all's order feeds it, except the other model branch.
        before = set(order[:order.index(key)])
        branch = {"segment-train", "segment"} if key.startswith("recommend") else \
            {"recommend-train", "recommend"} if key.startswith("segment") else set()
        assert upstream(key) == before - branch, key
    assert "maintain" not in tasks
    assert [t.task_key for t in maintenance.tasks] == ["maintain"]
    assert maintenance.schedule.quartz_cron_expression != pipeline.schedule.quartz_cron_expression
    paused = {job.schedule.pause_status.value for job in jobs.values()}
    assert paused == ({"PAUSED"} if target == "dev" else {"UNPAUSED"})


def test_job_clusters_are_policy_friendly_and_set_the_checkpoint_dir_of_the_settings(bundle):
    target, resolved = bundle
    for job in _jobs(resolved).values():
        for cluster in job.job_clusters:
            spec = cluster.new_cluster
            assert spec.apply_policy_default_values is True
            assert spec.autoscale is not None and spec.num_workers is None
            assert re.fullmatch(r"\d+\.\d+\.x-scala2\.13", spec.spark_version)
            assert spec.spark_conf["spark.speculation"] == "false"
            for key, task in _stage_tasks(job).items():
                _, settings = _settings_for(target, list(task.python_wheel_task.parameters))
                assert spec.spark_conf["spark.checkpoint.dir"] == settings.spark.checkpoint_dir


def test_runtime_is_17_3_lts_whose_spark_the_local_extra_allows():
    raw = yaml.safe_load(BUNDLE.read_text())
    assert raw["variables"]["spark_version"]["default"] == "17.3.x-scala2.13"   # Spark 4.0.0
    local = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["local"]
    assert any(re.fullmatch(r"pyspark\[ml,connect\]>=4\.0,<4\.\d+", r) for r in local), local


def test_settings_of_each_task_use_unity_catalog_names_and_declared_volumes_only(bundle):
    target, resolved = bundle
    resources = resolved["resources"]
    catalog, schema = resources["schemas"]["marketing"]["catalog_name"], resources["schemas"]["marketing"]["name"]
    volumes = {f"/Volumes/{v['catalog_name']}/{v['schema_name']}/{v['name']}" for v in resources["volumes"].values()}
    pipeline = _jobs(resolved)["inboxlift_pipeline"]
    for key, task in _stage_tasks(pipeline).items():
        args, settings = _settings_for(target, list(task.python_wheel_task.parameters))
        assert args.env == target
        assert (settings.storage.catalog, settings.storage.schema) == (catalog, schema)
        assert TableNames(settings.storage).resolve("events").location == f"{catalog}.{schema}.events"
        for model in (settings.segments.registered_model, settings.recommend.registered_model):
            assert THREE_PART_NAME.match(model) and model.startswith(f"{catalog}.{schema}.") and "{" not in model
        assert settings.mlflow.registry_uri == "databricks-uc" and settings.mlflow.artifact_location is None
        dirs = {"paths.landing_dir": settings.paths.landing_dir, "paths.output_dir": settings.paths.output_dir,
                "spark.checkpoint_dir": settings.spark.checkpoint_dir,
                "delivery.journal_dir": settings.delivery.journal_dir, "generate.truth_dir": settings.generate.truth_dir}
        for name, path in dirs.items():
            assert any(path == v or path.startswith(v + "/") for v in volumes), f"{name} {path} is on no declared volume"
        for name, reference in (("smtp_password", settings.secrets.smtp_password),
                                ("signing_key", settings.secrets.signing_key)):
            assert reference.startswith("dbsecret:"), f"secrets.{name} is {reference}"
    if target == "dev":
        assert schema == f"dev_{_short_name(USER)}_marketing"


def _strings(node: Any, path: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def test_no_local_path_leaks_into_a_databricks_target(bundle):
    import dataclasses

    target, resolved = bundle
    local = load_settings("local", conf_dir=ROOT / "conf")
    local_paths = {v for _, v in _strings(dataclasses.asdict(local)) if v.startswith(("var/", "sqlite:"))}
    assert local_paths, "the local settings should have local paths to compare with"
    task = _stage_tasks(_jobs(resolved)["inboxlift_pipeline"])["ingest"]
    _, settings = _settings_for(target, list(task.python_wheel_task.parameters))
    # storage.lake_dir is not used when tables are catalog names; campaigns_file is the wheel's own conf.
    unused = {"storage.lake_dir", "paths.campaigns_file"}
    leaks = {k: v for k, v in _strings(dataclasses.asdict(settings))
             if k not in unused and (v in local_paths or v.startswith(("var/", "./", "sqlite:", "file:")))}
    assert not leaks
    for path, value in _strings(resolved["resources"]):
        assert "/work/" not in value and not value.startswith(("var/", "conf/")), (path, value)
        if value.startswith(".."):
            assert path.endswith((".whl", "notebook_path")), (path, value)


def test_notebook_tasks_run_source_notebooks_with_their_widgets(bundle):
    target, resolved = bundle
    pipeline = _jobs(resolved)["inboxlift_pipeline"]
    notebooks = {t.task_key: t for t in pipeline.tasks if t.notebook_task is not None}
    assert set(notebooks) == {"notebook-features", "notebook-segments", "notebook-recommendations",
                              "notebook-campaign-results"}
    for key, task in notebooks.items():
        path = (BUNDLE.parent / task.notebook_task.notebook_path).resolve()
        assert path.is_file(), path
        assert path.read_text().startswith("# Databricks notebook source\n")
        assert set(task.notebook_task.base_parameters) == set(WIDGETS)
        assert task.notebook_task.base_parameters["env"] == target
        assert [lib.whl for lib in task.libraries] == ["../dist/*.whl"]
    # Notebooks land in <root>/files/notebooks/, the wheel in <root>/artifacts/.internal/ (the %pip cell's path).
    assert resolved["sync"]["paths"] == ["../notebooks"]
    assert "file_path" not in resolved.get("workspace", {}) and "artifact_path" not in resolved.get("workspace", {})


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(ROOT)],
                   check=True, capture_output=True)
    (built,) = out.glob("inboxlift-*.whl")
    return built


def test_the_wheel_carries_conf_and_no_spark_of_its_own(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    for conf in ("local.yml", "dev.yml", "prod.yml", "campaigns.yml"):
        assert f"inboxlift/conf/{conf}" in names
        assert (ROOT / "conf" / conf).is_file()
    assert "inboxlift/render/templates/en/base.html" in names
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    unconditional = [r for r in requires if "extra ==" not in r]
    for package in ("pyspark", "delta-spark", "aiosmtpd"):
        assert not any(r.startswith(package) for r in unconditional), f"{package} would be installed on Databricks"
        assert any(r.startswith(package) and 'extra == "local"' in r for r in requires), package
    assert "inboxlift-job = inboxlift.cli:job_main" in entry_points
    # The %pip cell of every notebook installs this very file (by name) from where the bundle uploads it.
    for notebook in (ROOT / "notebooks").glob("*.py"):
        assert f"# MAGIC %pip install ../../artifacts/.internal/{wheel.name}\n" in notebook.read_text(), notebook.name


def test_the_installed_wheel_finds_its_packaged_settings_without_the_repository(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    probe = (
        "import inboxlift, sys\n"
        f"assert inboxlift.__file__.startswith({str(target)!r}), inboxlift.__file__\n"
        "from inboxlift.settings import default_conf_dir, load_settings\n"
        "conf = default_conf_dir({})\n"
        "s = load_settings('prod', conf_dir=conf, overrides={'storage.schema': 'mkt'})\n"
        "print(conf); print(s.recommend.registered_model); print(s.paths.campaigns_file)\n"
    )
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    done = subprocess.run([sys.executable, "-c", probe], cwd=empty, capture_output=True, text=True,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    conf, model, campaigns = done.stdout.split()
    assert conf == str(target / "inboxlift" / "conf")
    assert model == "inboxlift.mkt.inboxlift_recommender"
    assert campaigns == str(target / "inboxlift" / "conf" / "campaigns.yml")
