"""The service's event files through the real ingest stage: properties as a map, a killed server's
files finalised on restart, every answered event accepted, a torn line quarantined, each file once."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from conftest import settings_in
from inboxlift import tokens
from inboxlift.clock import FixedClock
from inboxlift.context import RunContext
from inboxlift.schemas import EVENTS_LANDING
from inboxlift.stages.ingest import run_ingest
from inboxlift.storage import Lake
from inboxlift.transforms.ingest import Rules, parse_json_lines, to_events_table, validate_events
from service_server import KEY, Server, event_files, flood, in_progress_files

UTC = dt.timezone.utc
LINES = "source_file string, pos bigint, line string"
TARGET = "https://shop.example/p/i1"
USERS_CSV = "user_id,email,first_name,locale,timezone,country,birthday,signup_ts,email_consent,consent_ts,updated_at\n" + "".join(
    f"u{n},u{n}@mail.example,U{n},en,Europe/London,GB,,2024-01-01T00:00:00Z,true,2024-01-01T00:00:00Z,"
    "2024-01-01T00:00:00Z\n" for n in range(10))
PRODUCTS_CSV = ("item_id,name,description,category_path,brand,price,currency,image_url,url,stock,launched_at,updated_at\n"
                "i1,Mug,,Home,Acme,9.50,EUR,,https://shop.example/p/i1,3,2024-01-01,2024-01-01T00:00:00Z\n")


# ---- properties, as the transforms read them ------------------------------------------------

def test_properties_become_a_map_and_anything_but_an_object_is_quarantined(spark):
    base = {"event_type": "email_click", "event_ts": "2026-11-20T10:00:00Z", "user_id": "u1", "campaign_id": "c1",
            "message_id": "m1"}
    lines = [
        json.dumps({**base, "event_id": "e1", "properties": {"variant": "A", "link_position": "2"}}),
        json.dumps({**base, "event_id": "e2", "properties": {"link_position": 3, "is_machine_open": True,
                                                             "nested": {"a": 1}, "gone": None}}),
        json.dumps({**base, "event_id": "e3"}),
        json.dumps({**base, "event_id": "e4", "properties": {}}),
        json.dumps({**base, "event_id": "e5", "properties": "variant=A"}),
        json.dumps({**base, "event_id": "e6", "properties": [1, 2]}),
        json.dumps({**base, "event_id": "e7", "properties": 7}),
        json.dumps({**base, "event_id": "e8", "properties": None}),
    ]
    rows = spark.createDataFrame([("f", i, line) for i, line in enumerate(lines)], LINES)
    rules = Rules(now=dt.datetime(2026, 11, 20, 12, tzinfo=UTC), shop_opened=dt.datetime(2020, 1, 1, tzinfo=UTC))
    validated = validate_events(parse_json_lines(rows, fields=EVENTS_LANDING), rules=rules)
    got = {r.event_id: (r.properties, r.reasons) for r in validated.select("event_id", "properties", "reasons").collect()}
    assert got == {
        "e1": ({"variant": "A", "link_position": "2"}, []),
        # Numbers and booleans are kept as their JSON text, a nested object as its JSON.
        "e2": ({"link_position": "3", "is_machine_open": "true", "nested": '{"a":1}', "gone": None}, []),
        "e3": (None, []),
        "e4": ({}, []),
        "e5": (None, ["bad_properties"]),
        "e6": (None, ["bad_properties"]),
        "e7": (None, ["bad_properties"]),
        "e8": (None, []),
    }
    table = validated.where(F.size("reasons") == 0).withColumn("source_file", F.lit("f")).transform(
        to_events_table, ingested_at=dt.datetime(2026, 11, 20, 12))
    assert dict(table.dtypes)["properties"] == "map<string,string>"
    assert table.columns[-3:] == ["properties", "source_file", "ingested_at"]


def test_the_same_event_with_properties_in_another_key_order_is_no_conflict(spark):
    event = {"event_id": "e1", "event_type": "email_open", "event_ts": "2026-11-20T10:00:00Z", "user_id": "u1"}
    lines = [json.dumps({**event, "properties": {"a": "1", "b": "2"}}),
             json.dumps({**event, "properties": {"b": "2", "a": "1"}}),
             json.dumps({**event, "properties": {"a": "1", "b": "3"}})]
    rows = spark.createDataFrame([("f", i, line) for i, line in enumerate(lines)], LINES)
    rules = Rules(now=dt.datetime(2026, 11, 20, 12, tzinfo=UTC), shop_opened=dt.datetime(2020, 1, 1, tzinfo=UTC))
    hashes = [r.payload_hash for r in validate_events(parse_json_lines(rows, fields=EVENTS_LANDING), rules=rules)
              .orderBy("pos").collect()]
    assert hashes[0] == hashes[1] != hashes[2]


# ---- a killed server, a restart, and ingest ---------------------------------------------------

def _clicks(count: int, *, prefix: str) -> list[tuple[str, str, dict]]:
    issued = dt.datetime.now(UTC) - dt.timedelta(hours=1)
    return [("GET", "/c/" + tokens.issue_click(key=KEY.encode(), issued_at=issued, message_id=f"{prefix}-{i}",
                                              campaign_id="c1", user_id=f"u{i % 10}", variant="A",
                                              position=1, item_id="i1", target=TARGET), {})
            for i in range(count)]


def test_a_killed_server_loses_no_answered_event_and_ingest_reads_each_file_once(tmp_path, spark, spark_info,
                                                                                 base_settings):
    landing = tmp_path / "landing"
    for kind, text in (("users", USERS_CSV), ("products", PRODUCTS_CSV)):
        (landing / kind).mkdir(parents=True)
        (landing / kind / f"{kind}.csv").write_text(text, encoding="utf-8")

    first = Server(tmp_path).start()
    requests = _clicks(3000, prefix="before")
    statuses: list[int | None] = [None] * len(requests)
    flooding = threading.Thread(target=flood, args=(first.base_url, requests),
                                kwargs={"concurrency": 8, "statuses": statuses})
    flooding.start()
    deadline = time.monotonic() + 120
    while sum(s is not None for s in statuses) < 800 and time.monotonic() < deadline:
        time.sleep(0.02)
    first.kill()  # SIGKILL, mid-flood
    flooding.join(timeout=120)
    answered = {f"before-{i}" for i, s in enumerate(statuses) if s == 302}
    assert 800 <= len(answered) < len(requests), "the kill came mid-flood"
    assert set(statuses) <= {302, None}

    leftovers = in_progress_files(first.events_dir)
    assert len(leftovers) == 1, "the killed server's file is still in progress"
    # What a crash inside a write leaves (power lost, a write cut short): the start of a line.
    torn = '{"event_id":"torn-1","event_type":"email_cli'
    with open(leftovers[0], "a", encoding="utf-8") as handle:
        handle.write(torn)

    second = Server(tmp_path).start()
    assert in_progress_files(second.events_dir) == [], "the restart finalised the leftover"
    after = flood(second.base_url, _clicks(20, prefix="after"))
    assert after == [302] * 20
    assert len(in_progress_files(second.events_dir)) == 1  # the live server's own file

    on_disk = [line for path in event_files(first.events_dir) for line in path.read_text("utf-8").splitlines()]
    written = {json.loads(line)["message_id"] for line in on_disk if line != torn}
    assert answered <= written, "every answered click is on disk"
    # Clicks written but not answered before the kill may be there too; nothing else is.
    assert written <= {f"before-{i}" for i in range(len(requests))}

    settings = settings_in(base_settings, tmp_path)
    ctx = RunContext(spark=spark, settings=settings, clock=FixedClock(dt.datetime.now(UTC) + dt.timedelta(minutes=1)),
                     lake=Lake.open(spark, settings.storage, has_delta_jars=spark_info.has_delta_jars))
    # The live server's in-progress file is hidden from ingest: only finished files are read.
    report = run_ingest(ctx, echo=lambda text: None)
    events = report.counts("events")
    assert (events.read, events.accepted, events.duplicates, events.quarantined) == (
        len(on_disk), len(on_disk) - 1, 0, 1)
    assert events.quarantined_by_reason == {"malformed_json": 1}
    quarantined = ctx.lake.read("events_quarantine").select("line", "reason").collect()
    assert [(r.line, r.reason) for r in quarantined] == [(torn, "malformed_json")]
    accepted = {r.message_id for r in ctx.lake.read("events").select("message_id").collect()}
    assert accepted == written and answered <= accepted

    assert second.stop() in (0, -15)
    assert in_progress_files(second.events_dir) == []
    again = run_ingest(ctx, echo=lambda text: None)
    assert (again.counts("events").read, again.counts("events").accepted) == (20, 20)
    assert again.counts("users").files == 0, "files read before are not read again"
    # Twenty rows; chispa cannot order rows by a map column.
    clicks = ctx.lake.read("events").where(F.col("message_id").startswith("after-")).select(
        "message_id", "user_id", "item_id", "event_type", "campaign_id", "properties").collect()
    target_hash = tokens.ClickToken("", "", "", "", 0, "", TARGET, dt.datetime.now(UTC)).target_hash
    assert sorted((r.message_id, r.user_id, r.item_id, r.event_type, r.campaign_id, r.properties) for r in clicks) == \
        sorted((f"after-{i}", f"u{i % 10}", "i1", "email_click", "c1", {
            "variant": "A", "link_position": "1", "target_hash": target_hash, "ua_class": "scanner",
            "is_machine_click": "true"}) for i in range(20))
