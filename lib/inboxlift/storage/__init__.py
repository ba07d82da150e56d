"""The one door to tables. Library code reads and writes tables only through :class:`Lake`."""

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

__all__ = [
    "ConcurrentWriteError", "Lake", "MergeSourceError", "PredicateViolationError", "SchemaMismatchError",
    "StorageError", "TableInfo", "TableNames", "TableNotFoundError", "TableRef", "UnsupportedTableError",
    "WriteId", "WriteResult", "choose_backend",
]
