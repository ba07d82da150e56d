"""What every notebook does first: read its parameters and build the run context.

On Databricks the parameters are widgets (``env``, ``as_of``, ``catalog``, ``schema``; a job's
notebook task sets them, see ``deploy/databricks.yml``) and the settings are the ``conf/`` the wheel
carries. Run as a plain script (``python notebooks/x.py``, as CI does) they are the ``inboxlift``
command's options: ``--env``, ``--conf-dir``, ``--set``, ``--now``, and ``--as-of``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from inboxlift.context import RunContext

# Widget name -> (default, label). Empty catalog/schema: the settings file's; empty as_of: today.
WIDGETS = {
    "env": ("dev", "Environment (conf/<env>.yml)"),
    "as_of": ("", "As-of date (YYYY-MM-DD, empty: today)"),
    "catalog": ("", "Unity Catalog catalog (empty: the settings')"),
    "schema": ("", "Schema (empty: the settings')"),
}


@dataclass(frozen=True)
class Notebook:
    """A notebook's run context and the as-of date it looks at (None: the clock's today)."""

    ctx: RunContext
    as_of: dt.date | None

    @property
    def day(self) -> dt.date:
        return self.as_of or self.ctx.clock.today()


def _parse_date(text: str) -> dt.date | None:
    return dt.date.fromisoformat(text.strip()) if text and text.strip() else None


def widget_arguments(values: Mapping[str, str]) -> list[str]:
    """The ``inboxlift`` options that the widgets' values stand for."""
    args = ["--env", values.get("env") or WIDGETS["env"][0]]
    for key in ("catalog", "schema"):
        if values.get(key):
            args += ["--set", f"storage.{key}={values[key]}"]
    if values.get("as_of"):
        args += ["--as-of", values["as_of"]]
    return args


def read_widgets(dbutils: Any) -> dict[str, str]:
    """Declare the widgets (a no-op when they exist, e.g. set by a job) and read their values."""
    for name, (default, label) in WIDGETS.items():
        dbutils.widgets.text(name, default, label)
    return {name: dbutils.widgets.get(name) for name in WIDGETS}


def open_notebook(dbutils: Any = None, *, argv: Sequence[str] | None = None,
                  environ: Mapping[str, str] | None = None) -> Notebook:
    """Parameters from the widgets (with ``dbutils``) or the command line, then the run context.

    Args:
        dbutils: the notebook's ``dbutils`` on Databricks; None when run as a script.
        argv: the script's arguments (default ``sys.argv[1:]``); ignored with ``dbutils``.
        environ: the process environment (default ``os.environ``).
    """
    from inboxlift.cli import build_context, build_parser, load_from_args

    environ = os.environ if environ is None else environ
    given = widget_arguments(read_widgets(dbutils)) if dbutils is not None else list(
        sys.argv[1:] if argv is None else argv)
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--as-of", default="")
    known, rest = options.parse_known_args(given)
    # The `settings` command takes the common options; arguments a notebook host adds are ignored.
    args, _ = build_parser(environ).parse_known_args(["settings", *rest])
    settings = load_from_args(args, environ)
    ctx = build_context(settings, now=args.now, environ=environ)
    if dbutils is not None and ctx.dbutils is None:
        ctx = _with_dbutils(ctx, dbutils)
    return Notebook(ctx=ctx, as_of=_parse_date(known.as_of))


def _with_dbutils(ctx: RunContext, dbutils: Any) -> RunContext:
    import dataclasses

    return dataclasses.replace(ctx, dbutils=dbutils)
