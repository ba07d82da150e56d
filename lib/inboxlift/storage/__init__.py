"""The one door to tables. Library code reads and writes tables only through :class:`Lake`.

The names below load on first use (PEP 562): Spark imports :mod:`inboxlift.storage.deltars_source`,
and so this package, in a fresh Python worker for every delta-rs write (the writer's set-up and
its commit run on the driver in processes of their own), and the settings behind :class:`Lake`
would cost each of them imports the writer never uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "TableInfo": "base", "WriteId": "base", "WriteResult": "base",
    "ConcurrentWriteError": "errors", "MergeSourceError": "errors", "PredicateViolationError": "errors",
    "SchemaMismatchError": "errors", "StorageError": "errors", "TableNotFoundError": "errors",
    "UnsupportedTableError": "errors",
    "Lake": "lake", "choose_backend": "lake",
    "TableNames": "names", "TableRef": "names",
}

__all__ = sorted(_WHERE)

if TYPE_CHECKING:
    from inboxlift.storage.base import TableInfo, WriteId, WriteResult
    from inboxlift.storage.errors import (
        ConcurrentWriteError,
        MergeSourceError,
        PredicateViolationError,
        SchemaMismatchError,
        StorageError,
        TableNotFoundError,
        UnsupportedTableError,
    )
    from inboxlift.storage.lake import Lake, choose_backend
    from inboxlift.storage.names import TableNames, TableRef


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
