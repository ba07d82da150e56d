"""Entry point of the `simulate-responses` stage (generated shop only, so no task of the Databricks bundle);
arguments as `inboxlift run simulate-responses --help`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _entry import run_stage  # noqa: E402

STAGE = "simulate-responses"

if __name__ == "__main__":
    sys.exit(run_stage(STAGE))
