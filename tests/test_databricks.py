"""Running on Databricks without the repository: dbutils from the session for ``dbsecret:`` references,
clear errors for a missing secret, Unity Catalog names, the checkpoint directory and its cleanup, the
wheel task entry point and the notebook widgets.

Databricks itself is not here: a small stand-in for its ``dbutils`` (a secret store and widgets) is
passed where Databricks would provide one; everything else is the product's own code."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import sys
import types
from pathlib import Path

import pytest

from conftest import settings_in
from inboxlift.checkpoints import remove_stale_checkpoints
from inboxlift.cli import build_context, job_main
from inboxlift.notebook import WIDGETS, open_notebook, read_widgets, widget_arguments
from inboxlift.pipeline import STAGES
from inboxlift.session import align_checkpoint_dir
from inboxlift.settings import SettingsError, load_settings, resolve_secret
from inboxlift.workspace import dbutils_for

ROOT = Path(__file__).resolve().parents[1]
ON_DATABRICKS = {"DATABRICKS_RUNTIME_VERSION": "17.3"}
SIGNING_KEY = "k" * 40


class _Secrets:
    def __init__(self, store: dict[tuple[str, str], str]) -> None:
        self.store = store
        self.asked: list[tuple[str, str]] = []

    def get(self, scope: str, key: str) -> str:
        self.asked.append((scope, key))
        if (scope, key) not in self.store:
            # What Databricks answers for a key that is not there (a JVM exception, no common type).
            raise RuntimeError(f"Secret does not exist with scope: {scope} and key: {key}")
        return self.store[(scope, key)]


class _Widgets:
    def __init__(self, given: dict[str, str]) -> None:
        self.given = dict(given)
        self.declared: dict[str, str] = {}

    def text(self, name: str, default: str, label: str) -> None:
        self.declared[name] = default
        self.given.setdefault(name, default)

    def get(self, name: str) -> str:
        return self.given[name]


class _DBUtils:
    def __init__(self, secrets: dict[tuple[str, str], str] | None = None, widgets: dict[str, str] | None = None,
                 spark=None) -> None:
        self.secrets = _Secrets(secrets or {})
        self.widgets = _Widgets(widgets or {})
        self.spark = spark


def _databricks_settings(base_settings, tmp_path, *, smtp: str, signing: str):
    settings = settings_in(base_settings, tmp_path, backend="deltars")
    return dataclasses.replace(
        settings, env="dev",
        secrets=dataclasses.replace(settings.secrets, smtp_password=smtp, signing_key=signing),
        delivery=dataclasses.replace(settings.delivery, relay_host="smtp.relay.example", username="inboxlift"))


@pytest.fixture
def runtime_dbutils(monkeypatch):
    """A Databricks Runtime's ``pyspark.dbutils`` module, whose DBUtils(spark) holds two secrets."""
    module = types.ModuleType("pyspark.dbutils")
    store = {("inboxlift-dev", "smtp-password"): "relay-password", ("inboxlift-dev", "signing-key"): SIGNING_KEY}
    module.DBUtils = lambda spark: _DBUtils(store, spark=spark)
    monkeypatch.setitem(sys.modules, "pyspark.dbutils", module)
    return store


def test_on_databricks_the_context_gets_dbutils_from_the_session(spark, base_settings, tmp_path, runtime_dbutils):
    settings = _databricks_settings(base_settings, tmp_path, smtp="dbsecret:inboxlift-dev/smtp-password",
                                    signing="dbsecret:inboxlift-dev/signing-key")
    ctx = build_context(settings, now="2026-11-20T12:00:00", environ=ON_DATABRICKS)
    assert isinstance(ctx.dbutils, _DBUtils) and ctx.dbutils.spark is spark
    # Off Databricks the context has none, even where the module could be imported.
    assert build_context(settings, now=None, environ={}).dbutils is None


def test_without_the_runtime_module_or_a_configured_sdk_there_is_no_dbutils(spark, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyspark.dbutils", None)   # import fails, as off Databricks
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", "/nonexistent/databrickscfg")
    for name in [n for n in os.environ if n.startswith("DATABRICKS_") and n != "DATABRICKS_CONFIG_FILE"]:
        monkeypatch.delenv(name)
    assert dbutils_for(spark) is None
    chosen = _DBUtils()
    assert dbutils_for(spark, providers=(lambda s: None, lambda s: chosen, lambda s: _DBUtils())) is chosen


def _send_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    STAGES["send"].add_arguments(parser)
    return parser.parse_args([])


def _render_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    STAGES["render"].add_arguments(parser)
    return parser.parse_args([])


def test_send_and_render_read_their_secrets_through_the_contexts_dbutils(spark, base_settings, tmp_path,
                                                                        runtime_dbutils):
    settings = _databricks_settings(base_settings, tmp_path, smtp="dbsecret:inboxlift-dev/smtp-password",
                                    signing="dbsecret:inboxlift-dev/signing-key")
    ctx = build_context(settings, now="2026-11-20T12:00:00", environ=ON_DATABRICKS)
    # Past the secrets, each stage stops at its first missing table (nothing was planned here).
    with pytest.raises(FileNotFoundError, match="outbox"):
        STAGES["send"].run(ctx, _send_args())
    with pytest.raises(Exception) as render_error:
        STAGES["render"].run(ctx, _render_args())
    assert not isinstance(render_error.value, SettingsError), render_error.value
    assert ctx.dbutils.secrets.asked == [("inboxlift-dev", "smtp-password"), ("inboxlift-dev", "signing-key")]


def test_a_missing_databricks_secret_is_an_error_naming_the_reference(spark, base_settings, tmp_path, runtime_dbutils):
    settings = _databricks_settings(base_settings, tmp_path, smtp="dbsecret:inboxlift-dev/no-such-key",
                                    signing="dbsecret:other-scope/signing-key")
    ctx = build_context(settings, now="2026-11-20T12:00:00", environ=ON_DATABRICKS)
    with pytest.raises(SettingsError, match=r"'dbsecret:inboxlift-dev/no-such-key'.*no key 'no-such-key' in the "
                                            r"secret scope 'inboxlift-dev'"):
        STAGES["send"].run(ctx, _send_args())
    with pytest.raises(SettingsError, match=r"'dbsecret:other-scope/signing-key'"):
        STAGES["render"].run(ctx, _render_args())


def test_secret_references_off_databricks():
    with pytest.raises(SettingsError, match=r"'dbsecret:shop/smtp' is in the Databricks secret scope 'shop', but "
                                            r"this run has no dbutils.*use an env:NAME reference"):
        resolve_secret("dbsecret:shop/smtp", environ={"X": "1"})
    with pytest.raises(SettingsError, match="environment variable SMTP_PW is not set"):
        resolve_secret("env:SMTP_PW", environ={})
    assert resolve_secret("env:SMTP_PW", environ={"SMTP_PW": "pw"}) == "pw"
    empty = _DBUtils({("shop", "smtp"): ""})
    with pytest.raises(SettingsError, match="'smtp' in the secret scope 'shop' is empty"):
        resolve_secret("dbsecret:shop/smtp", environ={}, dbutils=empty)


def test_unity_catalog_model_names_must_be_three_part():
    for name in ("inboxlift-recommender", "marketing.recommender", "cat.sch.inboxlift-recommender"):
        with pytest.raises(SettingsError, match="'recommend.registered_model'.*three-part"):
            load_settings("dev", conf_dir=ROOT / "conf", overrides={"recommend.registered_model": name})
    # Local names stay as they are (a local registry takes any name).
    local = load_settings("local", conf_dir=ROOT / "conf")
    assert (local.segments.registered_model, local.recommend.registered_model) == \
        ("inboxlift-segments", "inboxlift-recommender")
    assert local.storage.catalog is None


def test_catalog_placeholders_follow_the_schema_and_need_one():
    dev = load_settings("dev", conf_dir=ROOT / "conf", overrides={"storage.schema": "dev_jane_marketing"})
    assert dev.segments.registered_model == "inboxlift_dev.dev_jane_marketing.inboxlift_segments"
    assert dev.paths.landing_dir == "/Volumes/inboxlift_dev/dev_jane_marketing/landing"
    assert dev.delivery.journal_dir == "/Volumes/inboxlift_dev/dev_jane_marketing/delivery"
    prod = load_settings("prod", conf_dir=ROOT / "conf")
    assert prod.spark.checkpoint_dir == "/Volumes/inboxlift/marketing/checkpoints"
    with pytest.raises(SettingsError, match=r"'paths.output_dir' is '/Volumes/\{catalog\}/x'.*storage.catalog"):
        load_settings("local", conf_dir=ROOT / "conf", overrides={"paths.output_dir": "/Volumes/{catalog}/x"})


def test_an_existing_sessions_checkpoint_dir_is_checked_not_silently_ignored(spark, base_settings, tmp_path):
    current = spark.conf.get("spark.checkpoint.dir")
    assert current == str(Path(base_settings.spark.checkpoint_dir).absolute())
    assert align_checkpoint_dir(spark, base_settings.spark.checkpoint_dir) == f"checkpoints: {current}"
    note = align_checkpoint_dir(spark, str(tmp_path / "elsewhere"))
    # Spark refuses to change it once started; the session keeps its own, and the note says so.
    assert note.startswith(f"checkpoints: {current} (spark.checkpoint_dir {tmp_path / 'elsewhere'} can only be set")
    assert spark.conf.get("spark.checkpoint.dir") == current


def _age(path: Path, when: dt.datetime) -> None:
    stamp = when.timestamp()
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.utime(os.path.join(root, name), (stamp, stamp))
    os.utime(path, (stamp, stamp))


def test_maintenance_removes_checkpoint_folders_nothing_wrote_to_lately(tmp_path):
    now = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.timezone.utc)
    root = tmp_path / "checkpoints"
    for name, hours_ago in (("old-app", 30), ("recent-app", 2), ("old-but-touched", 48)):
        rdd = root / name / "rdd-7"
        rdd.mkdir(parents=True)
        (rdd / "part-00000").write_bytes(b"x")
        _age(root / name, now - dt.timedelta(hours=hours_ago))
    # A run still checkpointing: its folder is old, a file in it was written an hour ago.
    _age(root / "old-but-touched" / "rdd-7" / "part-00000", now - dt.timedelta(hours=1))
    (root / "stray-file").write_text("not a checkpoint folder")
    removed = remove_stale_checkpoints(str(root), now=now, older_than=dt.timedelta(hours=24))
    assert removed == ["old-app"]
    assert sorted(p.name for p in root.iterdir()) == ["old-but-touched", "recent-app", "stray-file"]
    assert remove_stale_checkpoints(str(tmp_path / "absent"), now=now, older_than=dt.timedelta(hours=1)) == []


def test_the_wheel_task_entry_point_fails_the_task_on_an_error(capsys):
    conf = str(ROOT / "conf")
    with pytest.raises(SystemExit) as failed:
        job_main(["settings", "--env", "no-such-env", "--conf-dir", conf])
    assert failed.value.code == 2
    assert "no settings file" in capsys.readouterr().err
    assert job_main(["settings", "--env", "prod", "--conf-dir", conf]) is None


def test_widgets_are_declared_with_defaults_and_become_the_commands_options():
    dbutils = _DBUtils(widgets={"env": "prod", "as_of": "2026-11-01", "schema": "dev_jane_marketing"})
    values = read_widgets(dbutils)
    assert dbutils.widgets.declared == {name: default for name, (default, _) in WIDGETS.items()}
    assert widget_arguments(values) == ["--env", "prod", "--set", "storage.schema=dev_jane_marketing",
                                        "--as-of", "2026-11-01"]
    assert widget_arguments(read_widgets(_DBUtils())) == ["--env", "dev"]


def test_a_notebook_on_databricks_reads_its_widgets_and_keeps_the_notebooks_dbutils(spark, base_settings, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setitem(sys.modules, "pyspark.dbutils", None)
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", "/nonexistent/databrickscfg")
    dbutils = _DBUtils(widgets={"env": "local", "as_of": "2026-11-01"})
    notebook = open_notebook(dbutils, environ={"INBOXLIFT_CONF_DIR": str(ROOT / "conf"),
                                               "INBOXLIFT__STORAGE__LAKE_DIR": str(tmp_path / "lake"),
                                               **ON_DATABRICKS})
    assert notebook.as_of == dt.date(2026, 11, 1) and notebook.day == dt.date(2026, 11, 1)
    assert notebook.ctx.settings.env == "local"
    assert notebook.ctx.settings.storage.lake_dir == str(tmp_path / "lake")
    assert notebook.ctx.dbutils is dbutils
