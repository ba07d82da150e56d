"""Logical table names and where they live: a folder under the lake, or catalog.schema.table."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from inboxlift.settings import StorageSettings

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,127}$")


class TableNameError(ValueError):
    """A logical table name is not a lower-case identifier."""


@dataclass(frozen=True)
class TableRef:
    """One table: its logical name and its physical location.

    ``location`` is an absolute path (or object-store URI) when ``is_path``,
    otherwise a three-part ``catalog.schema.table`` name.
    """

    name: str
    location: str
    is_path: bool


class TableNames:
    """Maps logical names to locations from the storage settings."""

    def __init__(self, settings: StorageSettings) -> None:
        self._settings = settings
        self.uses_catalog = bool(settings.catalog and settings.schema)
        self.lake_dir = None if self.uses_catalog else _absolute(settings.lake_dir)

    def resolve(self, name: str) -> TableRef:
        if not _NAME.match(name):
            raise TableNameError(f"table name {name!r} must be lower-case letters, digits and _, starting with a letter")
        if self.uses_catalog:
            return TableRef(name, f"{self._settings.catalog}.{self._settings.schema}.{name}", is_path=False)
        assert self.lake_dir is not None
        return TableRef(name, f"{self.lake_dir.rstrip('/')}/{name}", is_path=True)

    def local_table_names(self) -> list[str]:
        """Names of the Delta tables present in a local lake folder."""
        if self.lake_dir is None or "://" in self.lake_dir:
            return []
        root = Path(self.lake_dir)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if (p / "_delta_log").is_dir() and _NAME.match(p.name))


def _absolute(path: str) -> str:
    if "://" in path:
        return path
    return str(Path(path).expanduser().absolute())
