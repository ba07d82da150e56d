"""Shared by the job files: run one stage through the same code as ``inboxlift run STAGE``."""

from __future__ import annotations

import sys
from typing import Sequence


def run_stage(stage: str, argv: Sequence[str] | None = None) -> int:
    from inboxlift.cli import main

    args = list(sys.argv[1:] if argv is None else argv)
    return main(["run", stage, *args])
