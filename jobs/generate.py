"""Entry point writing synthetic landing files (dev workspaces and demos); arguments as `inboxlift generate --help`."""

import sys

from inboxlift.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
