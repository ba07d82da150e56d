"""Entry point running every stage in order (local runs and single-task deployments)."""

import sys

from inboxlift.cli import main

if __name__ == "__main__":
    sys.exit(main(["run-all", *sys.argv[1:]]))
