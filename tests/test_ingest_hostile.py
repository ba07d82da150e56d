"""The hostile corpus (tests/data/hostile/ingest/) ingested in one run: file by file, what each became.

Every expectation below was worked out by hand from the files (their README says what is in
each): records accepted, records quarantined by reason, files failed; and that nothing is lost.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from conftest import ROOT, settings_in
from inboxlift.clock import FixedClock
from inboxlift.context import RunContext
from inboxlift.stages.ingest import EntityCounts, run_ingest
from inboxlift.storage import Lake

CORPUS = ROOT / "tests" / "data" / "hostile" / "ingest"

# file -> (accepted, {reason: quarantined records}); failed files separately.
EXPECTED = {
    "users/01-bom-crlf.csv": (4, {"bad_email": 2, "bad_id": 1}),
    "users/02-wrong-counts.csv": (1, {"malformed_csv": 3, "repeated_header": 1}),
    "users/04-bad-header.csv": (0, {"bad_header": 2}),
    "users/05-invalid-utf8.csv": (1, {"invalid_utf8": 1}),
    "products/01-quoted-newlines.csv": (3, {"bad_id": 1}),
    "events/01-hostile.jsonl": (3, {"bad_id": 7, "blank_line": 1, "malformed_json": 2, "invalid_utf8": 1,
                                    "unknown_user": 1}),
    "events/02-crlf.jsonl": (2, {}),
}
FAILED = {"events/03-truncated.jsonl.gz": "unreadable"}
# Spark's file listing leaves out files of 0 bytes: they hold no record, so none is lost, and
# they are taken up (as new files) once they have content.
EMPTY = ("users/03-empty.csv", "events/04-empty.jsonl")


@pytest.fixture(scope="module")
def hostile(spark, spark_info, base_settings, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    shutil.copytree(CORPUS, folder / "landing", ignore=shutil.ignore_patterns("README.md"))
    settings = settings_in(base_settings, folder)
    # The 3,000-character description is meant to be accepted.
    settings = dataclasses.replace(settings, ingest=dataclasses.replace(settings.ingest, max_string_length=5000))
    lake = Lake.open(spark, settings.storage, has_delta_jars=spark_info.has_delta_jars)
    ctx = RunContext(spark=spark, settings=settings, lake=lake, clock=FixedClock.at("2026-11-20T12:00:00"))
    printed: list[str] = []
    report = run_ingest(ctx, echo=printed.append)
    return ctx, report, printed[0], f"file:{folder / 'landing'}/"


def _by_file(rows, prefix: str) -> Counter:
    return Counter(r.source_file[len(prefix):] for r in rows)


def test_each_file_ends_as_worked_out_by_hand(hostile):
    ctx, report, _, prefix = hostile
    lake = ctx.lake
    accepted = Counter()
    for table in ("users", "products", "events"):
        # The corpus repeats no id, so each accepted record is one row of its table.
        accepted += _by_file(lake.read(table).select("source_file").collect(), prefix)
    quarantined: dict[str, Counter] = {}
    failed: dict[str, str] = {}
    for table in ("users_quarantine", "products_quarantine", "events_quarantine"):
        for r in lake.read(table).collect():
            name = r.source_file[len(prefix):]
            if r.line is None and r.record_id is None and r.reason in ("unreadable", "vanished", "changed"):
                failed[name] = r.reason
            else:
                quarantined.setdefault(name, Counter())[r.reason] += 1
    for name, (want_accepted, want_reasons) in EXPECTED.items():
        assert (accepted.get(name, 0), dict(quarantined.get(name, {}))) == (want_accepted, want_reasons), name
    assert set(accepted) | set(quarantined) <= set(EXPECTED)
    assert not set(EMPTY) & (set(accepted) | set(quarantined) | set(failed))
    assert failed == FAILED
    states = {r.rel_path: (r.state, r.reason) for r in lake.read("ingest_files").collect()}
    assert states == {**{name: ("planned", None) for name in EXPECTED},
                      **{name: ("failed", reason) for name, reason in FAILED.items()}}


def test_the_counts_reconcile_and_nothing_is_lost(hostile):
    _, report, printed, _ = hostile

    def totals(kind: str) -> tuple[int, dict[str, int]]:
        reasons: Counter = Counter()
        accepted = 0
        for name, (n, by_reason) in EXPECTED.items():
            if name.startswith(kind + "/"):
                accepted += n
                reasons.update(by_reason)
        return accepted, dict(sorted(reasons.items()))

    for kind, files, failed in (("users", 4, 0), ("products", 1, 0), ("events", 3, 1)):
        accepted, reasons = totals(kind)
        quarantined = sum(reasons.values())
        assert report.counts(kind) == EntityCounts(kind, files=files, read=accepted + quarantined, accepted=accepted,
                                                   duplicates=0, quarantined=quarantined,
                                                   quarantined_by_reason=reasons, failed_files=failed)
    assert [(f.kind, Path(f.path).name, f.reason) for f in report.failed_files] == [
        ("events", "03-truncated.jsonl.gz", "unreadable")]
    # The reason names the cause, and the summary names the file.
    assert "Unexpected end of input stream" in report.failed_files[0].detail
    assert "03-truncated.jsonl.gz: unreadable" in printed


def test_injected_and_invisible_characters_are_gone_and_addresses_normalised(hostile):
    ctx, *_ = hostile
    users = {r.user_id: (r.email, r.first_name) for r in ctx.lake.read("users").collect()}
    assert users["h1"] == ("ann@example.com", "Ann")
    # CR goes and LF becomes a space: no line break reaches a header.
    assert users["h2"] == ("bob@example.com", "Bob Bcc: victim@evil.example")
    assert users["h3"] == ("cy@example.com", "eciL")
    assert users["h6"] == ("fay@xn--bcher-kva.de", "Fay")
    products = {r.item_id: (r.name, r.brand, r.description) for r in ctx.lake.read("products").collect()}
    assert products["p1"] == ("Pan", "Acme", "Cast iron\nwith a lid, 28 cm")
    assert products["p2"][:2] == ("Mat", "Zen")
    description = products["p3"][2]
    assert len(description) == 3000 and description.startswith('A long, "quoted" line\nof text, ')
    events = {r.event_id for r in ctx.lake.read("events").collect()}
    assert events == {"e1", "e2", "12345", "e10", "e11"}
    assert ctx.lake.read("events").where(F.col("event_id") == "12345").first().user_id == "h3"
