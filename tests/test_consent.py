"""Mail permission and the suppressions table's rules, on hand-written rows (inboxlift.consent)."""

from __future__ import annotations

import datetime as dt
import hashlib

from chispa import assert_df_equality

from inboxlift.consent import SUPPRESSIONS_SCHEMA, suppression_updates, with_mail_permission

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
USERS = "user_id string, email string, email_consent boolean"
RECIPIENTS = "campaign_id string, campaign_type string, user_id string"
EVENTS = "event_id string, event_type string, event_ts timestamp, user_id string, campaign_type string"


def sha(address: str) -> str:
    return hashlib.sha256(address.encode("utf-8")).hexdigest()


def at(day: int, hour: int = 0) -> dt.datetime:
    return dt.datetime(2026, 11, day, hour, tzinfo=UTC)


def row(user_id, reason, scope="all", *, since=at(1), lifted_at=None, email_hash=None, source="s"):
    return (user_id, email_hash, scope, reason, source, since, lifted_at, at(1))


def permission(spark, recipients, users, suppressions, **kwargs):
    frame = with_mail_permission(spark.createDataFrame(recipients, RECIPIENTS),
                                 users=spark.createDataFrame(users, USERS),
                                 suppressions=(spark.createDataFrame(suppressions, SUPPRESSIONS_SCHEMA)
                                               if suppressions is not None else None), now=NOW, **kwargs)
    return {(r.campaign_id, r.user_id): r.blocked_reason for r in frame.collect()}


def test_permission_gives_the_first_reason_that_applies(spark):
    users = [("ok", "ok@mail.example", True), ("off", "off@mail.example", False), ("null", "null@mail.example", None),
             ("unsub", "u@mail.example", True), ("picks_only", "p@mail.example", True),
             ("lifted", "l@mail.example", True), ("lifts_later", "ll@mail.example", True),
             ("both", "b@mail.example", True), ("manual", "m@mail.example", True),
             ("twin", " Shared@Mail.EXAMPLE ", True), ("complained_twin", "c@mail.example", True),
             ("unsub_twin", "t@mail.example", True), ("off_and_unsub", "ou@mail.example", False)]
    suppressions = [
        row("unsub", "unsubscribed"),
        row("picks_only", "unsubscribed", scope="weekly_picks"),
        row("lifted", "unsubscribed", lifted_at=at(10)),
        row("lifts_later", "unsubscribed", lifted_at=at(25)),          # lifted after now: still in force
        row("both", "bounced"), row("both", "unsubscribed", scope="win_back"),
        row("manual", "manual"),
        # Facts about a mailbox hold for every user with the address; an unsubscribe is the person's.
        row("gone_user", "bounced", email_hash=sha("shared@mail.example")),
        row("other", "complained", email_hash=sha("c@mail.example")),
        row("other2", "unsubscribed", email_hash=sha("t@mail.example")),
        row("off_and_unsub", "unsubscribed"),
    ]
    recipients = [("picks", "weekly_picks", u) for u, _, _ in users] + [
        ("picks", "weekly_picks", "deleted"), ("picks", "weekly_picks", None),
        ("back", "win_back", "picks_only"), ("back", "win_back", "both")]
    got = permission(spark, recipients, users, suppressions)
    assert got == {
        ("picks", "ok"): None, ("picks", "off"): "no_consent", ("picks", "null"): "no_consent",
        ("picks", "unsub"): "unsubscribed", ("picks", "picks_only"): "unsubscribed",
        ("back", "picks_only"): None,                              # unsubscribed from weekly picks only
        ("picks", "lifted"): None, ("picks", "lifts_later"): "unsubscribed",
        ("picks", "both"): "bounced", ("back", "both"): "unsubscribed",   # unsubscribed comes before bounced
        ("picks", "manual"): "suppressed", ("picks", "twin"): "bounced", ("picks", "complained_twin"): "complained",
        ("picks", "unsub_twin"): None, ("picks", "off_and_unsub"): "no_consent",
        ("picks", "deleted"): "unknown_user", ("picks", None): "unknown_user",
    }


def test_a_bounce_holds_for_its_address_and_a_complaint_follows_the_person_to_a_new_one(spark):
    users = [("moved", "new@mail.example", True), ("stayed", "kept@mail.example", True),
             ("no_hash", "x@mail.example", True), ("complained_moved", "new2@mail.example", True)]
    suppressions = [
        row("moved", "bounced", email_hash=sha("old@mail.example")),          # the old mailbox bounced
        row("stayed", "bounced", email_hash=sha("kept@mail.example")),
        row("no_hash", "bounced"),                                            # address unknown: the user's
        row("complained_moved", "complained", email_hash=sha("old2@mail.example")),
    ]
    got = permission(spark, [("picks", "weekly_picks", u) for u, _, _ in users], users, suppressions)
    assert got == {("picks", "moved"): None, ("picks", "stayed"): "bounced", ("picks", "no_hash"): "bounced",
                   ("picks", "complained_moved"): "complained"}


def test_permission_without_a_suppressions_table_and_with_a_fixed_campaign_type(spark):
    users = [("a", "a@mail.example", True), ("b", "b@mail.example", False)]
    got = permission(spark, [("c", "ignored", "a"), ("c", "ignored", "b"), ("c", "ignored", "x")], users, None)
    assert got == {("c", "a"): None, ("c", "b"): "no_consent", ("c", "x"): "unknown_user"}
    got = permission(spark, [("c", None, "a")], users, [row("a", "unsubscribed", scope="birthday")],
                     campaign_type="birthday")
    assert got == {("c", "a"): "unsubscribed"}


def test_permission_keeps_the_recipients_columns_and_rows_and_an_empty_input_stays_empty(spark):
    users = spark.createDataFrame([("a", "a@mail.example", True)], USERS)
    # Several suppressions of one user, and a user on several rows: one output row per input row.
    suppressions = spark.createDataFrame([row("a", "bounced"), row("a", "complained"),
                                          row("a", "unsubscribed", scope="weekly_picks")], SUPPRESSIONS_SCHEMA)
    recipients = spark.createDataFrame([("c1", "weekly_picks", "a"), ("c2", "weekly_picks", "a")], RECIPIENTS)
    out = with_mail_permission(recipients, users=users, suppressions=suppressions, now=NOW)
    assert out.columns == [*recipients.columns, "blocked_reason"]
    assert sorted(tuple(r) for r in out.collect()) == [("c1", "weekly_picks", "a", "unsubscribed"),
                                                       ("c2", "weekly_picks", "a", "unsubscribed")]
    empty = with_mail_permission(spark.createDataFrame([], RECIPIENTS), users=users, suppressions=suppressions,
                                 now=NOW)
    assert empty.isEmpty() and empty.columns == [*recipients.columns, "blocked_reason"]


MESSAGES = "message_id string, campaign_type string, user_id string, to_email string"


def test_a_message_is_checked_for_the_address_it_goes_to_and_that_address_must_still_be_current(spark):
    users = spark.createDataFrame([("u1", "new@mail.example", True), ("u2", "old@mail.example", True),
                                   ("u3", "b@mail.example", True), ("u4", None, True),
                                   ("u5", "Five@Mail.example", True)], USERS)
    # u2 complained from old@, the address u1 had when u1's message was rendered.
    suppressions = spark.createDataFrame([row("u2", "complained", email_hash=sha("old@mail.example"))],
                                         SUPPRESSIONS_SCHEMA)
    messages = spark.createDataFrame([
        ("m1", "weekly_picks", "u1", "old@mail.example"),     # rendered before u1's address changed
        ("m2", "weekly_picks", "u1", "new@mail.example"),
        ("m3", "weekly_picks", "u2", "old@mail.example"),
        ("m4", "weekly_picks", "u3", "a@mail.example"),       # an abandoned address, suppressed nowhere
        ("m5", "weekly_picks", "u4", "d@mail.example"),       # the user has no address now
        ("m6", "weekly_picks", "u3", None),
        ("m7", "weekly_picks", "u5", " five@MAIL.example"),   # the same address, written otherwise
    ], MESSAGES)
    out = with_mail_permission(messages, users=users, suppressions=suppressions, now=NOW, address="to_email")
    assert out.columns == [*messages.columns, "blocked_reason"]
    assert {r.message_id: r.blocked_reason for r in out.collect()} == {
        "m1": "complained", "m2": None, "m3": "complained", "m4": "address_changed", "m5": "address_changed",
        "m6": "address_changed", "m7": None}
    # Without a suppressions table the address must still be current.
    out = with_mail_permission(messages, users=users, suppressions=None, now=NOW, address="to_email")
    assert {r.message_id: r.blocked_reason for r in out.collect()}["m1"] == "address_changed"


# ---- the table's rows ------------------------------------------------------------------------------

def updates(spark, events, current=(), users=(("u", "U@Mail.example "),)):
    out = suppression_updates(spark.createDataFrame(list(events), EVENTS),
                              current=spark.createDataFrame(list(current), SUPPRESSIONS_SCHEMA),
                              users=spark.createDataFrame(list(users), "user_id string, email string"),
                              updated_at=NOW)
    return out


def expect(spark, rows):
    return spark.createDataFrame([(u, h, s, r, src, since, lifted, NOW) for u, h, s, r, src, since, lifted in rows],
                                 SUPPRESSIONS_SCHEMA)


def test_events_become_suppressions_with_scope_and_reason(spark):
    events = [
        ("e1", "unsubscribe", at(2), "u", None),
        ("e2", "unsubscribe", at(3), "u", " Weekly_Picks "),      # a campaign type: that type only
        ("e3", "unsubscribe", at(4), "u", "weekly_pick"),         # not a type: every campaign (kept as e1's run)
        ("e4", "bounce", at(5), "u", None),
        ("e5", "complaint", at(6), "v", "birthday"),              # complaints and bounces are always "all"
        ("e6", "resubscribe", at(7), "w", None),                  # nothing to lift: no row
        ("e7", "resubscribe", at(8), "u", "birthdays"),           # unknown scope: lifts nothing
        ("e8", "email_open", at(9), "u", None),                   # not a consent event
        ("e9", "unsubscribe", None, "u", None),                   # no time: ignored
        ("e10", "unsubscribe", at(9), None, None),                # no user: ignored
    ]
    got = updates(spark, events, users=[("u", " U@Mail.example"), ("v", None)])
    hashed = sha("u@mail.example")
    assert_df_equality(got, expect(spark, [
        ("u", hashed, "all", "unsubscribed", "e1", at(2), None),
        ("u", hashed, "weekly_picks", "unsubscribed", "e2", at(3), None),
        ("u", hashed, "all", "bounced", "e4", at(5), None),
        ("v", None, "all", "complained", "e5", at(6), None),
    ]), ignore_row_order=True, ignore_nullable=True)


def test_the_last_action_in_event_time_decides_and_late_events_change_nothing_they_should_not(spark):
    hashed = sha("u@mail.example")
    events = [
        # In one batch: unsubscribe, then resubscribe: lifted.
        ("a1", "unsubscribe", at(2), "u", "win_back"), ("a2", "resubscribe", at(3), "u", "win_back"),
        # Resubscribe, then unsubscribe: in force since the unsubscribe.
        ("b1", "resubscribe", at(2), "u", "birthday"), ("b2", "unsubscribe", at(3), "u", "birthday"),
        # A tie: the opt-out wins.
        ("c1", "resubscribe", at(4), "u", "cross_sell"), ("c2", "unsubscribe", at(4), "u", "cross_sell"),
        # A resubscribe lifts unsubscribes only, never a bounce.
        ("d1", "bounce", at(2), "u", None), ("d2", "resubscribe", at(3), "u", None),
    ]
    current = [
        # In force since day 5; a late unsubscribe of day 3 moves `since` back, to the first opt-out.
        ("u", hashed, "new_arrivals", "unsubscribed", "old", at(5), None, at(5)),
        # Lifted on day 8; a late unsubscribe of day 6 (before the lift) does not suppress again ...
        ("u", hashed, "abandoned_cart", "unsubscribed", "old", at(7), at(8), at(8)),
        # ... but one after the lift does; and a late resubscribe never lifts a later opt-out.
        ("u", hashed, "browse_abandonment", "unsubscribed", "old", at(5), at(6), at(6)),
        ("u", "kept-hash", "weekly_picks", "unsubscribed", "old", at(5), None, at(5)),
    ]
    events += [("n1", "unsubscribe", at(3), "u", "new_arrivals"), ("k1", "unsubscribe", at(6), "u", "abandoned_cart"),
               ("r1", "unsubscribe", at(9), "u", "browse_abandonment"),
               ("w1", "resubscribe", at(4), "u", "weekly_picks")]
    got = updates(spark, events, current=current)
    assert_df_equality(got, expect(spark, [
        ("u", hashed, "win_back", "unsubscribed", "a1", at(2), at(3)),
        ("u", hashed, "birthday", "unsubscribed", "b2", at(3), None),
        ("u", hashed, "cross_sell", "unsubscribed", "c2", at(4), None),
        ("u", hashed, "all", "bounced", "d1", at(2), None),
        ("u", hashed, "new_arrivals", "unsubscribed", "n1", at(3), None),
        ("u", hashed, "abandoned_cart", "unsubscribed", "k1", at(6), at(8)),
        ("u", hashed, "browse_abandonment", "unsubscribed", "r1", at(9), None),
        # A row keeps the address hash it was written with.
        ("u", "kept-hash", "weekly_picks", "unsubscribed", "old", at(5), None),
    ]), ignore_row_order=True, ignore_nullable=True)


def test_no_events_no_rows(spark):
    current = [("u", None, "all", "unsubscribed", "old", at(5), None, at(5))]
    assert updates(spark, [], current=current).isEmpty()
    assert updates(spark, [("x", "view", at(2), "u", None)], current=current).isEmpty()


def test_only_this_type_unsubscribes_from_every_other_type_and_lifts_the_rest(spark):
    hashed = sha("u@mail.example")
    current = [("u", hashed, "all", "unsubscribed", "e0", at(1), None, at(1))]
    events = [
        ("e1", "preference_change", at(2), "u", "birthday"),
        ("e2", "preference_change", at(3), "v", "no_such_type"),   # unknown type: nothing at all
    ]
    got = updates(spark, events, current=current)
    others = ["weekly_picks", "abandoned_cart", "browse_abandonment", "win_back", "new_arrivals", "cross_sell"]
    assert_df_equality(got, expect(spark, [
        # The earlier opt-out of all mail is lifted by the change; the type itself was never suppressed.
        ("u", hashed, "all", "unsubscribed", "e0", at(1), at(2)),
        *[("u", hashed, t, "unsubscribed", "e1", at(2), None) for t in others],
    ]), ignore_row_order=True, ignore_nullable=True)


def test_a_resubscribe_to_all_mail_lifts_every_unsubscribe_of_the_person_but_not_a_bounce(spark):
    hashed = sha("u@mail.example")
    current = [("u", hashed, "weekly_picks", "unsubscribed", "e0", at(1), None, at(1)),
               ("u", hashed, "all", "bounced", "e00", at(1), None, at(1))]
    got = updates(spark, [("e1", "unsubscribe", at(2), "u", None), ("e2", "resubscribe", at(3), "u", "all")],
                  current=current)
    assert_df_equality(got, expect(spark, [
        ("u", hashed, "all", "unsubscribed", "e1", at(2), at(3)),
        ("u", hashed, "weekly_picks", "unsubscribed", "e0", at(1), at(3)),
    ]), ignore_row_order=True, ignore_nullable=True)
