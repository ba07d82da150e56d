"""Databricks' ``dbutils`` for a session, so ``dbsecret:scope/key`` references resolve on Databricks.

A job (``python_wheel_task``) has no ``dbutils`` global the way a notebook does; it is obtained
from the session instead: ``pyspark.dbutils.DBUtils(spark)`` where the Databricks Runtime
provides it, else the Databricks SDK's ``WorkspaceClient().dbutils`` (which reads secrets through
the workspace API with the job's own credentials). Neither touches ``sparkContext`` or the JVM
gateway, so both work on Spark Connect (shared and serverless compute). Outside Databricks there
is none, and secrets come from environment variables (``env:NAME``).
"""

from __future__ import annotations

from typing import Any, Callable

from pyspark.sql import SparkSession


def _runtime_dbutils(spark: SparkSession) -> Any | None:
    try:
        from pyspark.dbutils import DBUtils  # type: ignore[import-not-found]  # only on a Databricks Runtime
    except ImportError:
        return None
    return DBUtils(spark)


def _sdk_dbutils(spark: SparkSession) -> Any | None:
    try:
        from databricks.sdk import WorkspaceClient
    except ImportError:
        return None
    try:
        return WorkspaceClient().dbutils
    except ValueError:  # no workspace or credentials configured: not on Databricks after all
        return None


# Tried in this order; each returns None where it does not apply.
PROVIDERS: tuple[Callable[[SparkSession], Any | None], ...] = (_runtime_dbutils, _sdk_dbutils)


def dbutils_for(spark: SparkSession, *,
                providers: tuple[Callable[[SparkSession], Any | None], ...] | None = None) -> Any | None:
    """The ``dbutils`` of a Databricks session, or None when no provider can give one."""
    for provider in PROVIDERS if providers is None else providers:
        dbutils = provider(spark)
        if dbutils is not None:
            return dbutils
    return None
