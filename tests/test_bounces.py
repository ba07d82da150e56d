"""``import-bounces``: DSNs (RFC 3464) and ARF complaints (RFC 5965) from a Maildir or an mbox into
suppressions, deliveries and bounce_quarantine; samples in tests/data/bounces/ (written for these tests)."""

from __future__ import annotations

import hashlib
import mailbox
from pathlib import Path

import pytest
from chispa import assert_df_equality

from inboxlift.delivery.bounces import parse_report
from inboxlift.stages.bounces import run_import_bounces

from test_send import OUTBOX, USERS, message, mid, user

SAMPLES = Path(__file__).resolve().parent / "data" / "bounces"


@pytest.fixture(autouse=True)
def utc_session(spark):
    spark.conf.set("spark.sql.session.timeZone", "UTC")


def sha(address: str) -> str:
    return hashlib.sha256(address.encode()).hexdigest()


def test_parse_report_reads_dsns_and_arf_and_keeps_what_it_cannot_read():
    rows = {p.name: parse_report(p.read_bytes(), source=p.name) for p in sorted(SAMPLES.glob("*.eml"))}
    summary = {name: [(r["kind"], r.get("message_id"), r.get("recipient"), r.get("status"), r.get("reason"))
                      for r in found] for name, found in rows.items()}
    assert summary == {
        "arf_complaint.eml": [("complaint", "c1-cara@shop.example", "cara@mail.example", "abuse", None)],
        "auto_reply.eml": [("unreadable", None, None, None, "not_a_report")],
        "dsn_delayed.eml": [("delay", None, "full@mail.example", "4.2.2", None)],
        "dsn_hard_bounce.eml": [("bounce", "c1-ghost@shop.example", "ghost@mail.example", "5.1.1", None)],
        "dsn_unmatched.eml": [("bounce", None, "stranger@other.example", "5.1.1", None)],
    }
    assert all(r["raw"] == (SAMPLES / n).read_bytes() for n, found in rows.items() for r in found)
    # flufl.bounce 6.0.0's Yale detector raises on a message without a From header: kept, with the error.
    empty = parse_report(b"", source="empty")
    assert [(r["kind"], r["reason"], r["raw"]) for r in empty] == [("unreadable", "unparseable", b"")]
    assert empty[0]["diagnostic"].startswith("IndexError")


def test_import_from_a_maildir_then_an_mbox_writes_once_and_keeps_the_unreadable(ctx, spark, tmp_path):
    ctx.lake.append("outbox", spark.createDataFrame([message("ghost"), message("cara"), message("bo")], OUTBOX))
    ctx.lake.append("users", spark.createDataFrame([user("ghost"), user("cara"), user("bo"), user("full")], USERS))
    maildir = mailbox.Maildir(str(tmp_path / "bounces"), create=True)
    for sample in sorted(SAMPLES.glob("*.eml")):
        maildir.add(sample.read_bytes())

    report = run_import_bounces(ctx, path=tmp_path / "bounces")
    again = run_import_bounces(ctx, path=tmp_path / "bounces")

    assert report.kinds == {"bounce": 2, "delay": 1, "complaint": 1, "unreadable": 1} and report.messages == 5
    # The delay notice names no Message-ID: it matches user "full" by address (counted; it writes nothing).
    assert (report.matched_by_message_id, report.matched_by_address) == (2, 1)
    assert report.quarantined == {"not_a_report": 1, "unmatched": 1}
    assert report.suppressions_added == {"bounced": 1, "complained": 1} and report.deliveries_added == 1
    # Importing the same mailbox again adds nothing.
    assert (again.suppressions_added, again.deliveries_added, again.kinds) == ({}, 0, report.kinds)
    assert_df_equality(
        ctx.lake.read("suppressions").select("user_id", "email_hash", "scope", "reason", "source"),
        spark.createDataFrame([("ghost", sha("ghost@mail.example"), "all", "bounced", mid("ghost")),
                               ("cara", sha("cara@mail.example"), "all", "complained", mid("cara"))],
                              "user_id string, email_hash string, scope string, reason string, source string"),
        ignore_row_order=True, ignore_nullable=True)
    bounced = ctx.lake.read("deliveries").collect()
    assert [(r.message_id, r.attempt, r.state, r.reason, r.origin, r.smtp_reply, r.user_id) for r in bounced] == [
        (mid("ghost"), 1, "bounced", "dsn", "dsn", "5.1.1 smtp; 550 5.1.1 user unknown", "ghost")]
    kept = {r.reason: r for r in ctx.lake.read("bounce_quarantine").collect()}
    assert sorted(kept) == ["not_a_report", "unmatched"] and ctx.lake.read("bounce_quarantine").count() == 2
    assert kept["not_a_report"].raw == (SAMPLES / "auto_reply.eml").read_bytes()
    assert kept["unmatched"].diagnostic == "stranger@other.example"

    # An mbox: a bounce naming no Message-ID matches the user by address; a broken message is kept.
    box = mailbox.mbox(str(tmp_path / "more.mbox"), create=True)
    box.add((SAMPLES / "dsn_unmatched.eml").read_bytes().replace(b"stranger@other.example", b"bo@mail.example"))
    box.add(b"Content-Type: multipart/report; report-type=delivery-status; boundary=\"x\"\r\n\r\n--x\r\n")
    box.close()
    from_mbox = run_import_bounces(ctx, path=tmp_path / "more.mbox")
    assert from_mbox.kinds == {"bounce": 1, "unreadable": 1} and from_mbox.matched_by_address == 1
    assert from_mbox.suppressions_added == {"bounced": 1} and from_mbox.deliveries_added == 0
    assert from_mbox.quarantined == {"no_failed_recipient": 1}
    assert ctx.lake.read("bounce_quarantine").count() == 3


def test_a_complaint_naming_only_its_message_blocks_the_address_that_message_went_to(ctx, spark, tmp_path):
    ctx.lake.append("outbox", spark.createDataFrame([message("cara")], OUTBOX))
    ctx.lake.append("users", spark.createDataFrame([user("cara")], USERS))
    # The ARF sample without Original-Rcpt-To and without the quoted To: only the Message-ID is left.
    raw = (SAMPLES / "arf_complaint.eml").read_bytes()
    raw = raw.replace(b"Original-Rcpt-To: <cara@mail.example>\r\n", b"").replace(b"To: cara@mail.example\r\n", b"")
    assert b"cara@mail.example" not in raw
    maildir = mailbox.Maildir(str(tmp_path / "fbl"), create=True)
    maildir.add(raw)
    report = run_import_bounces(ctx, path=tmp_path / "fbl")
    assert report.kinds == {"complaint": 1} and report.matched_by_message_id == 1
    assert report.suppressions_added == {"complained": 1}
    # The suppression holds for the mailbox (its hash), not only for the user.
    rows = [(r.user_id, r.email_hash, r.reason) for r in ctx.lake.read("suppressions").collect()]
    assert rows == [("cara", sha("cara@mail.example"), "complained")]


def test_a_path_that_is_no_mailbox_is_a_clear_error(ctx, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a Maildir"):
        run_import_bounces(ctx, path=tmp_path / "nowhere")
