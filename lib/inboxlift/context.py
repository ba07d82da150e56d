"""What every stage receives: the session, the settings, the lake and the clock."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyspark.sql import SparkSession

from inboxlift.clock import Clock
from inboxlift.settings import Settings
from inboxlift.storage import Lake


@dataclass(frozen=True)
class RunContext:
    spark: SparkSession
    settings: Settings
    lake: Lake
    clock: Clock
    # Databricks' dbutils (for dbsecret: references), None elsewhere: see inboxlift.workspace.
    dbutils: Any = None
