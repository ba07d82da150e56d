"""Old Spark checkpoints: ALS checkpoints its factors under ``spark.checkpoint.dir`` and leaves them.

Spark writes each application's checkpoints into a folder of its own (a UUID) under the
checkpoint directory and deletes nothing when the application ends. ``inboxlift run maintain``
removes those folders once nothing has been written in them for
``spark.checkpoint_retention_hours``, so a run still checkpointing keeps its files. The directory
is a local folder, or a Unity Catalog volume (``/Volumes/...``), which Databricks mounts as files.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path


def _last_write(folder: Path) -> float:
    """The newest modification time of ``folder`` and everything in it (seconds since the epoch)."""
    newest = folder.stat().st_mtime
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            try:
                newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
            except FileNotFoundError:  # removed while we walk: Spark cleaning up after itself
                continue
    return newest


def remove_stale_checkpoints(checkpoint_dir: str, *, now: dt.datetime, older_than: dt.timedelta) -> list[str]:
    """Delete the folders under ``checkpoint_dir`` not written to since ``now - older_than``.

    Returns:
        The names of the folders removed (sorted); nothing when the directory does not exist or is
        an object-store URI this process cannot list as files.
    """
    root = Path(checkpoint_dir)
    if "://" in checkpoint_dir or not root.is_dir():
        return []
    cutoff = (now - older_than).timestamp()
    removed = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if _last_write(folder) < cutoff:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed
