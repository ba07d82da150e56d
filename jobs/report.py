"""Entry point of the `report` stage (a Databricks spark_python_task); arguments as `inboxlift run report --help`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _entry import run_stage  # noqa: E402

STAGE = "report"

if __name__ == "__main__":
    sys.exit(run_stage(STAGE))
