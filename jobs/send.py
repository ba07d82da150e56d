"""Entry point of the `send` stage (a Databricks spark_python_task); arguments as `inboxlift run send --help`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _entry import run_stage  # noqa: E402

STAGE = "send"

if __name__ == "__main__":
    sys.exit(run_stage(STAGE))
