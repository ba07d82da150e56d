"""Settings: files validate on load, errors name the key and the file, overrides apply in order."""

from __future__ import annotations

from pathlib import Path

import pytest

from inboxlift.settings import SettingsError, load_settings, parse_override, resolve_secret

ROOT = Path(__file__).resolve().parents[1]


def write_conf(tmp_path: Path, text: str, env: str = "local") -> Path:
    (tmp_path / f"{env}.yml").write_text(text, encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("env", ["local", "dev", "prod"])
def test_shipped_settings_files_load(env):
    settings = load_settings(env, conf_dir=ROOT / "conf")
    assert settings.env == env


def test_local_uses_a_folder_and_databricks_uses_catalog_names():
    local = load_settings("local", conf_dir=ROOT / "conf")
    prod = load_settings("prod", conf_dir=ROOT / "conf")
    assert (local.storage.catalog, local.storage.lake_dir) == (None, "var/lake")
    assert (prod.storage.catalog, prod.storage.schema) == ("inboxlift", "marketing")
    assert prod.secrets.smtp_password.startswith("dbsecret:")


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    conf = write_conf(tmp_path, "storage:\n  lake_dri: /tmp/x\n")
    with pytest.raises(SettingsError) as info:
        load_settings("local", conf_dir=conf)
    assert "'storage.lake_dri'" in str(info.value) and str(conf / "local.yml") in str(info.value)


def test_wrong_type_names_the_key_and_the_expected_type(tmp_path):
    conf = write_conf(tmp_path, "spark:\n  shuffle_partitions: many\n")
    with pytest.raises(SettingsError, match=r"local.yml: setting 'spark.shuffle_partitions' expected an integer, got 'many'"):
        load_settings("local", conf_dir=conf)


def test_boolean_is_not_an_integer_and_choices_are_enforced(tmp_path):
    with pytest.raises(SettingsError, match="expected an integer, got True"):
        load_settings("local", conf_dir=write_conf(tmp_path, "spark:\n  shuffle_partitions: true\n"))
    with pytest.raises(SettingsError, match="storage.backend' must be one of 'auto', 'native', 'deltars'"):
        load_settings("local", conf_dir=write_conf(tmp_path, "storage:\n  backend: parquet\n"))


def test_a_section_that_is_not_a_mapping_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match="setting 'storage' must be a mapping"):
        load_settings("local", conf_dir=write_conf(tmp_path, "storage: var/lake\n"))


def test_missing_environment_file_lists_the_ones_there(tmp_path):
    write_conf(tmp_path, "{}\n")
    with pytest.raises(SettingsError, match="environments found: local"):
        load_settings("staging", conf_dir=tmp_path)


def test_env_key_must_match_the_file(tmp_path):
    with pytest.raises(SettingsError, match="'env' is 'prod' but the file is for 'local'"):
        load_settings("local", conf_dir=write_conf(tmp_path, "env: prod\n"))


def test_overrides_apply_file_then_environment_then_command_line(tmp_path):
    conf = write_conf(tmp_path, "storage:\n  lake_dir: from-file\nspark:\n  shuffle_partitions: 3\n")
    environ = {"INBOXLIFT__STORAGE__LAKE_DIR": "from-env", "INBOXLIFT__SPARK__SHUFFLE_PARTITIONS": "5",
               "UNRELATED": "x"}
    settings = load_settings("local", conf_dir=conf, environ=environ)
    assert (settings.storage.lake_dir, settings.spark.shuffle_partitions) == ("from-env", 5)
    settings = load_settings("local", conf_dir=conf, environ=environ,
                             overrides=dict([parse_override("storage.lake_dir=from-cli")]))
    assert settings.storage.lake_dir == "from-cli"


def test_bad_override_is_an_error_naming_its_source(tmp_path):
    conf = write_conf(tmp_path, "{}\n")
    with pytest.raises(SettingsError, match=r"command line \(--set\): unknown setting 'storage.lake'"):
        load_settings("local", conf_dir=conf, overrides={"storage.lake": "x"})
    with pytest.raises(SettingsError, match="environment"):
        load_settings("local", conf_dir=conf, environ={"INBOXLIFT__SPARK__SHUFFLE_PARTITIONS": "lots"})
    with pytest.raises(SettingsError, match="must look like"):
        parse_override("storage.lake_dir")


def test_free_mappings_take_dotted_keys():
    settings = load_settings("local", conf_dir=ROOT / "conf",
                             overrides=dict([parse_override("spark.extra_conf.spark.sql.ansi.enabled=false")]))
    assert settings.spark.extra_conf == {"spark.sql.ansi.enabled": "false"}


def test_secrets_come_from_the_environment_or_databricks_only():
    assert resolve_secret("env:SMTP_PW", environ={"SMTP_PW": "s3cret"}) == "s3cret"
    with pytest.raises(SettingsError, match="SMTP_PW is not set"):
        resolve_secret("env:SMTP_PW", environ={})
    with pytest.raises(SettingsError, match="must be 'env:NAME' or 'dbsecret:scope/key'"):
        resolve_secret("hunter2", environ={})

    class Secrets:
        def get(self, scope, key):
            return f"{scope}:{key}"

    class DbUtils:
        secrets = Secrets()

    assert resolve_secret("dbsecret:shop/smtp", environ={}, dbutils=DbUtils()) == "shop:smtp"
    with pytest.raises(SettingsError, match="in the Databricks secret scope .shop., but this run has no dbutils"):
        resolve_secret("dbsecret:shop/smtp", environ={})


def test_render_and_segment_limits_are_checked(tmp_path):
    with pytest.raises(SettingsError, match="render.task_catalogue_max_items' must be 0 or more, got -1"):
        load_settings("local", conf_dir=write_conf(tmp_path, "render:\n  task_catalogue_max_items: -1\n"))
    # The collective K-means is gone: a configuration that still asks for it is told what there is.
    with pytest.raises(SettingsError, match="segments.kmeans_solver' must be one of 'row', 'block', 'auto', got 'collective'"):
        load_settings("local", conf_dir=write_conf(tmp_path, "segments:\n  kmeans_solver: collective\n"))
    zero = load_settings("local", conf_dir=write_conf(tmp_path, "render:\n  task_catalogue_max_items: 0\n"))
    assert zero.render.task_catalogue_max_items == 0 and zero.segments.kmeans_solver == "block"
