"""Errors raised by the storage layer, the same for both backends."""

from __future__ import annotations


class StorageError(RuntimeError):
    """Base class of storage errors."""


class TableNotFoundError(StorageError):
    pass


class SchemaMismatchError(StorageError):
    """The DataFrame's columns do not match the table's."""

    def __init__(self, table: str, *, missing: list[str], extra: list[str], changed: list[str]) -> None:
        self.missing, self.extra, self.changed = missing, extra, changed
        parts = []
        if missing:
            parts.append(f"missing from the data: {', '.join(missing)}")
        if extra:
            parts.append(f"not in the table: {', '.join(extra)}")
        if changed:
            parts.append(f"different types: {', '.join(changed)}")
        hint = " (pass merge_schema=True to add new columns)" if extra and not missing and not changed else ""
        super().__init__(f"schema of the data does not match table {table!r}: " + "; ".join(parts) + hint)


class ConcurrentWriteError(StorageError):
    """Another writer committed a conflicting change first; the table is intact, retry the write."""


class PredicateViolationError(StorageError):
    """Rows written with overwrite(where=...) must all satisfy the predicate."""


class MergeSourceError(StorageError):
    """The merge source is not usable (duplicate keys, missing key columns)."""


class UnsupportedTableError(StorageError):
    """The table uses a Delta feature this backend cannot read correctly."""
