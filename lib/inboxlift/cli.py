"""The ``inboxlift`` command: the boundary where settings, session, lake and clock are built."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from inboxlift.clock import FixedClock, SystemClock
from inboxlift.context import RunContext
from inboxlift.pipeline import RUN_ALL, STAGES, Stage, generate_default_data, landing_is_empty
from inboxlift.session import collect_ml_garbage, ml_finalizers_at_safe_points
from inboxlift.settings import Settings, SettingsError, default_conf_dir, load_settings, parse_override


def _common(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--env", default=environ.get("INBOXLIFT_ENV", "local"),
                        help="settings file conf/<env>.yml (default: local, or $INBOXLIFT_ENV)")
    common.add_argument("--conf-dir", default=default_conf_dir(environ), help="folder of the settings files")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set storage.lake_dir=/tmp/lake (repeatable)")
    common.add_argument("--now", help="pin the clock to this UTC instant (ISO 8601), e.g. for a back-fill")
    return common


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    environ = os.environ if environ is None else environ
    common = _common(environ)
    parser = argparse.ArgumentParser(
        prog="inboxlift",
        description="Turn a shop's event data into personalised marketing emails, with Spark and Delta tables.",
        epilog="stages: " + "; ".join(f"{s.name} ({s.help})" for s in STAGES.values()),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run one pipeline stage")
    stages = run.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage in STAGES.values():
        stage_parser = stages.add_parser(stage.name, help=stage.help, parents=[common])
        stage.add_arguments(stage_parser)

    run_all = commands.add_parser("run-all", help=f"run every stage in order ({', '.join(RUN_ALL)})",
                                  parents=[common])
    run_all.add_argument("--no-generate", action="store_true",
                         help="do not generate synthetic data when the local landing folder is empty")

    commands.add_parser("tables", help="list the tables with rows, version and last write", parents=[common])

    simulate = STAGES["simulate-responses"]
    simulate.add_arguments(commands.add_parser(simulate.name, help=simulate.help, parents=[common]))

    generate = commands.add_parser("generate", help="write synthetic shop data as landing files",
                                   parents=[common])
    generate.add_argument("--users", type=int, help="number of users (default: generate.users)")
    generate.add_argument("--items", type=int, help="number of products (default: generate.items)")
    generate.add_argument("--days", type=int, help="days of activity (default: generate.days)")
    generate.add_argument("--dirty-rate", type=float, help="share of dirty records (default: generate.dirty_rate)")
    generate.add_argument("--seed", type=int, help="random seed (default: generate.seed)")
    generate.add_argument("--gzip", action="store_true", default=None, help="gzip the landing files")

    imports = commands.add_parser(
        "import", parents=[common],
        help="ingest a retailer's export (invoice lines, customers, catalogue or clickstream) through the column mapping in settings")
    imports.add_argument("--shape", required=True, choices=["invoice_lines", "customers", "catalogue", "clickstream"],
                         help="the export's shape; its columns are mapped in ingest.imports.<shape>")
    imports.add_argument("path", help="an export file, or a folder of them (files imported before are skipped)")

    export = commands.add_parser("export", parents=[common],
                                 help="write a campaign's rendered messages as .eml files (multipart/alternative)")
    export.add_argument("--campaign", required=True, help="campaign id")
    export.add_argument("--to", required=True, dest="to_dir", help="folder to write <message-id>.eml files into")
    preview = commands.add_parser("preview", parents=[common], help="write one rendered message's HTML to a file")
    preview.add_argument("--campaign", required=True, help="campaign id")
    preview.add_argument("--user", required=True, dest="user_id", help="user id")
    preview.add_argument("--out", default=None,
                         help="file to write (default: paths.output_dir/previews/<campaign>-<user>.html)")

    serve = commands.add_parser(
        "serve", parents=[common],
        help="run the tracking and preference service (clicks, opens, unsubscribes; no Spark)")
    serve.add_argument("--host", help="address to listen on (default: serve.host)")
    serve.add_argument("--port", type=int, help="TCP port (default: serve.port)")
    serve.add_argument("--workers", type=int, help="worker processes, one per core for throughput (default: serve.workers)")
    bounces = commands.add_parser(
        "import-bounces", parents=[common],
        help="read delivery status notifications and complaint reports (a Maildir or mbox) into suppressions")
    bounces.add_argument("path", help="a Maildir folder (with cur/ and new/) or an mbox file")

    commands.add_parser("settings", help="print the effective settings", parents=[common])
    return parser


def load_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    overrides = dict(parse_override(text) for text in args.overrides)
    return load_settings(args.env, conf_dir=args.conf_dir, overrides=overrides, environ=environ)


def build_context(settings: Settings, *, now: str | None, environ: Mapping[str, str]) -> RunContext:
    from inboxlift.session import build_session
    from inboxlift.storage import Lake

    info = build_session(settings.spark, environ=environ)
    print(info.describe(), flush=True)
    lake = Lake.open(info.spark, settings.storage, has_delta_jars=info.has_delta_jars)
    print(f"storage backend: {lake.backend.name}; tables at {lake.names.lake_dir or settings.storage.catalog}",
          flush=True)
    clock = FixedClock.at(now) if now else SystemClock()
    dbutils = None
    if info.is_databricks:
        from inboxlift.workspace import dbutils_for

        dbutils = dbutils_for(info.spark)
    return RunContext(spark=info.spark, settings=settings, lake=lake, clock=clock, dbutils=dbutils)


def _print_result(result: Any) -> None:
    if result is None:
        return
    if hasattr(result, "summary"):
        print(result.summary(), flush=True)
    elif isinstance(result, list):
        for line in result:
            print(f"  {line}", flush=True)
    else:
        print(result, flush=True)


def print_tables(ctx: RunContext) -> None:
    names = ctx.lake.table_names()
    if not names:
        print("no tables yet", flush=True)
        return
    print(f"{'table':<24}{'rows':>12}{'version':>9}{'files':>7}  last write (UTC)      operation", flush=True)
    for name in names:
        info = ctx.lake.info(name)
        when = info.last_write.strftime("%Y-%m-%d %H:%M:%S") if info.last_write else "-"
        print(f"{name:<24}{info.rows:>12,}{info.version:>9}{info.files:>7}  {when:<21} {info.last_operation or '-'}",
              flush=True)


def print_locations(settings: Settings) -> None:
    lake = settings.storage.lake_dir if not settings.storage.catalog else \
        f"{settings.storage.catalog}.{settings.storage.schema}"
    print("\nwhere things are:", flush=True)
    print(f"  lake (Delta tables): {Path(lake).absolute() if not settings.storage.catalog else lake}")
    print(f"  MLflow store:        {settings.mlflow.tracking_uri}"
          + (f" (artifacts in {Path(settings.mlflow.artifact_location).absolute()})"
             if settings.mlflow.artifact_location else ""))
    print(f"  landing files:       {Path(settings.paths.landing_dir).absolute()}")
    print(f"  outputs (emails):    {Path(settings.paths.output_dir).absolute()}", flush=True)


def _generate(ctx: RunContext, args: argparse.Namespace) -> Any:
    import dataclasses

    g = ctx.settings.generate
    chosen = {k: v for k, v in {
        "users": args.users, "items": args.items, "days": args.days, "dirty_rate": args.dirty_rate,
        "seed": args.seed, "gzip": args.gzip}.items() if v is not None}
    settings = dataclasses.replace(ctx.settings, generate=dataclasses.replace(g, **chosen))
    return generate_default_data(dataclasses.replace(ctx, settings=settings))


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    try:
        settings = load_from_args(args, environ)
    except SettingsError as exc:
        print(f"inboxlift: {exc}", file=sys.stderr)
        return 2
    if args.command == "settings":
        print(settings)
        return 0
    if args.command == "serve":
        return _serve(args, environ)
    ctx = build_context(settings, now=args.now, environ=environ)
    started = time.monotonic()
    try:
        with ml_finalizers_at_safe_points(ctx.spark):
            code = _dispatch(ctx, args, settings)
    except _user_errors() as exc:
        print(f"inboxlift: {exc}", file=sys.stderr)
        return 2
    finally:
        _release_session(ctx)
    print(f"done in {time.monotonic() - started:.1f}s", flush=True)
    return code or 0


def _release_session(ctx: RunContext) -> None:
    """Stop a Spark Connect client session, success or not.

    pyspark's local Connect server (``spark.remote = local[N]``) runs in this process with non-daemon
    threads: without the stop, a stage that raises leaves the command hanging instead of exiting
    with the error. A classic session is left to the interpreter's own shutdown.
    """
    from inboxlift.session import is_connect_session

    if is_connect_session(ctx.spark):
        ctx.spark.stop()


def job_main(argv: Sequence[str] | None = None) -> None:
    """The ``inboxlift-job`` entry point of a Databricks ``python_wheel_task``: a failing command fails the task.

    The task runner calls the entry point and ignores what it returns, so the exit code is raised.
    """
    code = main(argv)
    if code:
        raise SystemExit(code)


def _serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """``inboxlift serve``: the service needs no Spark session, lake or clock override."""
    if args.now:
        print("inboxlift: serve answers with the system clock; --now is for stages", file=sys.stderr)
        return 2
    overrides = dict(parse_override(text) for text in args.overrides)
    chosen = {"serve.host": args.host, "serve.port": args.port, "serve.workers": args.workers}
    overrides.update({key: value for key, value in chosen.items() if value is not None})
    try:
        settings = load_settings(args.env, conf_dir=args.conf_dir, overrides=overrides, environ=environ)
        from inboxlift.service.entry import serve

        serve(settings, environ=environ, env=args.env, conf_dir=args.conf_dir, overrides=overrides)
    except SettingsError as exc:
        print(f"inboxlift: {exc}", file=sys.stderr)
        return 2
    return 0


class CommandError(Exception):
    """A command's input names something that does not exist (reported without a traceback)."""


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean "fix the input or run an earlier stage", reported without a traceback."""
    from inboxlift.campaigns.planning import MissingInputError
    from inboxlift.delivery.journal import SendLockedError
    from inboxlift.stages.send import DeliveryError
    from inboxlift.stages.ingest import ConcurrentIngestError, ImportFormatError, ImportMappingError
    from inboxlift.stages.plan import UnknownCampaignError
    from inboxlift.stages.segments import NoChampionError

    from inboxlift.stages.recommend import NoChampionError as NoRecommenderError

    return (ImportMappingError, ImportFormatError, ConcurrentIngestError, NoChampionError, NoRecommenderError, FileNotFoundError,
            MissingInputError, UnknownCampaignError, SettingsError, CommandError, DeliveryError, SendLockedError)


def _with_stage_defaults(stage: Stage, args: argparse.Namespace) -> argparse.Namespace:
    """``args`` plus the defaults of the stage's own options, as ``inboxlift run STAGE`` would have them."""
    parser = argparse.ArgumentParser(add_help=False)
    stage.add_arguments(parser)
    return argparse.Namespace(**{**vars(parser.parse_args([])), **vars(args)})


def _run_stage(ctx: RunContext, stage: Stage, args: argparse.Namespace) -> list:
    """Run one stage, print its summary and its warnings (inboxlift.diagnostics); return the warnings."""
    from inboxlift.diagnostics import diagnose_stage, report

    print(f"== {stage.name}: {stage.help}", flush=True)
    started = time.monotonic()
    result = stage.run(ctx, args)
    _print_result(result)
    warnings = diagnose_stage(ctx, stage.name, result)
    report(warnings)
    print(f"  {stage.name} took {time.monotonic() - started:.1f}s", flush=True)
    return warnings


def _dispatch(ctx: RunContext, args: argparse.Namespace, settings: Settings) -> int | None:
    if args.command == "run":
        _run_stage(ctx, STAGES[args.stage], args)
    elif args.command == "run-all":
        if (not args.no_generate and settings.env == "local"
                and landing_is_empty(settings.paths.landing_dir) and not ctx.lake.exists("events")):
            print("== generate: the local lake and landing folder are empty, so synthetic data is generated",
                  flush=True)
            _print_result(generate_default_data(ctx))
        from inboxlift.diagnostics import EMPTY_OUTBOX_EXIT, final_outbox, report

        warnings = []
        for name in RUN_ALL:
            stage = STAGES[name]
            warnings += _run_stage(ctx, stage, _with_stage_defaults(stage, args))
            collect_ml_garbage()   # the stage's models, released between stages (no RPC in flight here)
        print("\n== tables", flush=True)
        print_tables(ctx)
        print_locations(settings)
        # Ran to the end with nothing to send, for a reason the shop can fix: not a success.
        empty = final_outbox(ctx, warnings)
        report(empty)
        if empty:
            return EMPTY_OUTBOX_EXIT
    elif args.command == "tables":
        print_tables(ctx)
    elif args.command == "simulate-responses":
        _print_result(STAGES[args.command].run(ctx, args))
    elif args.command == "generate":
        _print_result(_generate(ctx, args))
    elif args.command == "export":
        from inboxlift.stages.render import export_eml

        report = export_eml(ctx, campaign_id=args.campaign, to_dir=Path(args.to_dir).absolute())
        print(report.summary(), flush=True)
    elif args.command == "preview":
        from inboxlift.stages.render import preview

        out = args.out or str(Path(settings.paths.output_dir) / "previews" / f"{args.campaign}-{args.user_id}.html")
        try:
            written = preview(ctx, campaign_id=args.campaign, user_id=args.user_id, to_path=out)
        except LookupError as exc:  # no such message: the user's input, not a bug
            raise CommandError(str(exc)) from exc
        print(f"preview written to {written}", flush=True)
    elif args.command == "import-bounces":
        from inboxlift.stages.bounces import run_import_bounces

        _print_result(run_import_bounces(ctx, path=args.path))
    elif args.command == "import":
        from inboxlift.stages.ingest import run_import

        from inboxlift.diagnostics import diagnose_stage, report

        result = run_import(ctx, shape=args.shape, path=args.path, echo=lambda text: None)
        _print_result(result)
        report(diagnose_stage(ctx, "import", result))


if __name__ == "__main__":
    sys.exit(main())
