"""Run settings: one typed object per run, loaded from ``conf/<env>.yml``.

Loading validates every key against the dataclasses below: an unknown key or
a value of the wrong type is a :class:`SettingsError` naming the key and the
file it came from. Values can be overridden from the command line
(``--set storage.lake_dir=/tmp/lake``) and from environment variables
(``INBOXLIFT__STORAGE__LAKE_DIR=/tmp/lake``); the environment mapping is
passed in by the caller, never read here.

Secrets are never values in these files: a secret setting holds a reference,
``env:NAME`` or ``dbsecret:scope/key``, resolved by :func:`resolve_secret`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

ENV_PREFIX = "INBOXLIFT__"


class SettingsError(ValueError):
    """A settings file, override or secret reference is invalid."""


@dataclass(frozen=True)
class SparkSettings:
    """How the local session is sized. Ignored where a session already exists (Databricks)."""

    master: str = "local[*]"
    # "auto" sizes the driver from the machine's memory; otherwise a JVM size like "8g".
    driver_memory: str = "auto"
    # 0 means "twice the cores" locally; tests use 1.
    shuffle_partitions: int = 0
    log_level: str = "WARN"
    ui_enabled: bool = True
    checkpoint_dir: str = "var/checkpoints"
    extra_conf: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StorageSettings:
    """Where tables live and which Delta backend writes them."""

    # auto: native Delta when its jars are on the classpath, delta-rs otherwise.
    backend: Literal["auto", "native", "deltars"] = "auto"
    # Local and path-based deployments: tables are folders under this directory.
    lake_dir: str = "var/lake"
    # Databricks / Unity Catalog: tables are catalog.schema.table; set both to use names.
    catalog: str | None = None
    schema: str | None = None
    # Target size of files written by optimize/compaction.
    target_file_mb: int = 128
    # Retention used by vacuum when none is given (Delta's default is 7 days).
    vacuum_retention_hours: int = 168


@dataclass(frozen=True)
class MlflowSettings:
    tracking_uri: str = "sqlite:///var/mlflow/mlflow.db"
    registry_uri: str | None = None
    artifact_location: str | None = "var/mlflow/artifacts"
    experiment: str = "inboxlift"


@dataclass(frozen=True)
class PathSettings:
    """Files outside the lake: where landing files arrive and outputs are written."""

    landing_dir: str = "var/landing"
    output_dir: str = "var/output"


@dataclass(frozen=True)
class SecretSettings:
    """References to secrets, never the secrets themselves."""

    smtp_password: str = "env:INBOXLIFT_SMTP_PASSWORD"
    signing_key: str = "env:INBOXLIFT_SIGNING_KEY"


@dataclass(frozen=True)
class GenerateSettings:
    """Synthetic shop data for the embedded mode (``inboxlift generate``); owned by the generator."""

    seed: int = 42
    users: int = 2000
    items: int = 300
    days: int = 120
    dirty_rate: float = 0.01
    gzip: bool = False
    # The planted truth (taste groups, active hours) lives apart from the landing files; no stage reads it.
    truth_dir: str = "var/truth"


@dataclass(frozen=True)
class IngestSettings:
    """Validation and import of landing files (``inboxlift run ingest``); owned by ingest."""

    # Money is stored as decimal(12, 2); strings longer than this are rejected.
    max_string_length: int = 2000
    # The shop's first day: events before it are quarantined (as are events after "now" + skew).
    shop_opened: str = "2020-01-01"
    future_skew_minutes: int = 10


@dataclass(frozen=True)
class Settings:
    env: str = "local"
    spark: SparkSettings = field(default_factory=SparkSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    mlflow: MlflowSettings = field(default_factory=MlflowSettings)
    paths: PathSettings = field(default_factory=PathSettings)
    secrets: SecretSettings = field(default_factory=SecretSettings)
    generate: GenerateSettings = field(default_factory=GenerateSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)

    def with_overrides(self, overrides: Mapping[str, Any], *, source: str = "overrides") -> "Settings":
        """A copy with dotted-key overrides applied (``{"storage.lake_dir": "/x"}``), validated."""
        raw = dataclasses.asdict(self)
        for dotted, value in overrides.items():
            _set_dotted(raw, dotted, value, source)
        return _build(Settings, raw, source=source, path="")


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            raise SettingsError(f"{source}: unknown setting '{dotted}'")
        if typing.get_origin(_field_hints_at(Settings, parts[: i + 1])) is dict:
            # Keys of a free mapping (spark.extra_conf) may themselves contain dots.
            child[".".join(parts[i + 1:])] = value
            return
        node = child
    if parts[-1] not in node:
        raise SettingsError(f"{source}: unknown setting '{dotted}'")
    node[parts[-1]] = value


def _field_hints_at(cls: Any, parts: list[str]) -> Any:
    tp: Any = cls
    for part in parts:
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, *, source: str, path: str) -> Any:
    origin = typing.get_origin(tp)
    where = f"{source}: setting '{path}'"
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise SettingsError(f"{where} must be a mapping, got {type(value).__name__}")
        return _build(tp, dict(value), source=source, path=path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise SettingsError(f"{where} must not be null (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source=source, path=path)
            except SettingsError as exc:
                errors.append(str(exc))
        raise SettingsError(f"{where} expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise SettingsError(f"{where} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise SettingsError(f"{where} expected a list, got {type(value).__name__}")
        return [_coerce(item_tp, v, source=source, path=f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise SettingsError(f"{where} expected a mapping, got {type(value).__name__}")
        return {
            _coerce(key_tp, k, source=source, path=f"{path}.{k}"): _coerce(val_tp, v, source=source, path=f"{path}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise SettingsError(f"{where} expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise SettingsError(f"{where} expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise SettingsError(f"{where} expected a number, got {value!r}")
    if tp is str:
        # YAML reads 2024-01-01 as a date, 10 as an int, false as a bool; string settings take them as text.
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
        if hasattr(value, "isoformat"):
            return value.isoformat()
        raise SettingsError(f"{where} expected a string, got {value!r}")
    raise SettingsError(f"{where} has an unsupported type {_type_name(tp)}")


def _build(cls: Any, raw: Mapping[str, Any], *, source: str, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        dotted = ", ".join(f"'{path + '.' if path else ''}{k}'" for k in unknown)
        raise SettingsError(f"{source}: unknown setting {dotted}; known here: {', '.join(sorted(known))}")
    kwargs = {
        name: _coerce(hints[name], value, source=source, path=f"{path}.{name}" if path else name)
        for name, value in raw.items()
    }
    return cls(**kwargs)


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key.path=value``; the value is read as YAML so numbers and booleans keep their type."""
    if "=" not in text:
        raise SettingsError(f"override '{text}' must look like section.key=value")
    key, raw_value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise SettingsError(f"override '{text}' has no key")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    return key, value


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Overrides from ``INBOXLIFT__SECTION__KEY=value`` variables."""
    overrides = {}
    for name, raw in environ.items():
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            dotted = name[len(ENV_PREFIX):].lower().replace("__", ".")
            overrides[dotted] = parse_override(f"{dotted}={raw}")[1]
    return overrides


def load_settings(
    env: str = "local",
    *,
    conf_dir: str | Path = "conf",
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Load ``conf_dir/<env>.yml`` over the defaults, then environment, then explicit overrides.

    Args:
        env: the environment name; its file must exist.
        conf_dir: the folder holding the YAML files.
        overrides: dotted keys from the command line; they win over everything.
        environ: the process environment, for ``INBOXLIFT__...`` overrides (none read if omitted).
    """
    path = Path(conf_dir) / f"{env}.yml"
    if not path.is_file():
        available = sorted(p.stem for p in Path(conf_dir).glob("*.yml")) if Path(conf_dir).is_dir() else []
        raise SettingsError(f"no settings file {path} (environments found: {', '.join(available) or 'none'})")
    data = _read_yaml(path)
    if "env" in data and data["env"] != env:
        raise SettingsError(f"{path}: setting 'env' is {data['env']!r} but the file is for {env!r}")
    data = _deep_merge({"env": env}, data)
    settings = _build(Settings, data, source=str(path), path="")
    if environ:
        from_env = env_overrides(environ)
        if from_env:
            settings = settings.with_overrides(from_env, source="environment (INBOXLIFT__...)")
    if overrides:
        settings = settings.with_overrides(overrides, source="command line (--set)")
    return settings


def resolve_secret(reference: str, *, environ: Mapping[str, str], dbutils: Any = None) -> str:
    """The secret a reference points at: ``env:NAME`` or ``dbsecret:scope/key``.

    Raises:
        SettingsError: the reference is malformed or the secret is not set.
    """
    kind, _, name = reference.partition(":")
    if kind == "env" and name:
        value = environ.get(name)
        if not value:
            raise SettingsError(f"secret {reference!r}: environment variable {name} is not set")
        return value
    if kind == "dbsecret" and "/" in name:
        if dbutils is None:
            raise SettingsError(f"secret {reference!r} needs Databricks (dbutils), which this run does not have")
        scope, key = name.split("/", 1)
        return dbutils.secrets.get(scope=scope, key=key)
    raise SettingsError(f"secret reference {reference!r} must be 'env:NAME' or 'dbsecret:scope/key'")
