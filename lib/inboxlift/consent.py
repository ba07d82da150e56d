"""Who may be mailed now, and the ``suppressions`` table that says who may not (README "Campaigns").

One rule, one place: :func:`with_mail_permission` gives every recipient row a ``blocked_reason``
(null when the user may be mailed now). Plan, render and export call it; none re-implements it.
A user may be mailed when all of these hold:

- the user is still in ``users`` (else ``unknown_user``);
- ``users.email_consent`` is true (false or null: ``no_consent``);
- no suppression is in force for scope ``all`` or for the campaign's type (``unsubscribed``,
  ``bounced``, ``complained``; any other reason, ``soft_bounced`` or ``manual`` say, is
  ``suppressed``). A suppression for a fact about the mailbox (:data:`ADDRESS_REASONS`) also applies
  to every other user whose address has the same hash.

A message already rendered (send, export) names its ``address``, the ``to_email`` it goes to; then
also:

- a mailbox suppression for that address's hash holds, as for the user's current address;
- the address is still the user's current one (else ``address_changed``): the old one may have been
  abandoned, or recycled for somebody else.

:func:`suppression_updates` turns a batch of events into rows for the ``suppressions`` table (ingest
merges them once per batch); :func:`suppressions_from_facts` turns facts about addresses (a hard
bounce at send time, a delivery status notification, a complaint report) into rows merged with
:data:`REASSERT`. Pure DataFrame functions: no storage, no clock (``now`` is passed in).
"""

from __future__ import annotations

import datetime as dt

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType, TimestampType

from inboxlift.campaigns.definitions import CAMPAIGN_TYPES
from inboxlift.schemas import require_columns

SUPPRESSIONS_TABLE = "suppressions"
SUPPRESSION_KEY = ["user_id", "scope", "reason"]
SUPPRESSIONS_SCHEMA = StructType([
    StructField("user_id", StringType()),
    StructField("email_hash", StringType()),    # sha256 hex of the normalised address; null if unknown
    StructField("scope", StringType()),         # "all" or a campaign type
    StructField("reason", StringType()),        # unsubscribed | complained | bounced | soft_bounced | manual ...
    StructField("source", StringType()),        # what caused it: an event id, a message id
    StructField("since", TimestampType()),
    StructField("lifted_at", TimestampType()),  # null while in force
    StructField("updated_at", TimestampType()),
])

SCOPE_ALL = "all"
UNSUBSCRIBED, BOUNCED, SOFT_BOUNCED, COMPLAINED = "unsubscribed", "bounced", "soft_bounced", "complained"
NO_CONSENT, UNKNOWN_USER, SUPPRESSED = "no_consent", "unknown_user", "suppressed"
ADDRESS_CHANGED = "address_changed"
# Why a user may not be mailed, in the order they are reported (the first that applies).
# address_changed comes last: a suppression of the old address says more about why it must not be used.
BLOCK_REASONS = (UNKNOWN_USER, NO_CONSENT, UNSUBSCRIBED, BOUNCED, COMPLAINED, SUPPRESSED, ADDRESS_CHANGED)
# Facts about the mailbox, not the person: they hold for every user with that address.
ADDRESS_REASONS = (BOUNCED, SOFT_BOUNCED, COMPLAINED)
# Facts about the mailbox alone: with the address known, they stop holding for a user who moved to
# another one (a typo corrected, a new mailbox). A complaint is the person's wish too: it follows them.
MAILBOX_ONLY_REASONS = (BOUNCED, SOFT_BOUNCED)

# Event type -> the suppression it starts; resubscribe lifts an unsubscribe of the same scope.
SUPPRESSING_EVENTS = {"unsubscribe": UNSUBSCRIBED, "bounce": BOUNCED, "complaint": COMPLAINED}
LIFTING_EVENTS = {"resubscribe": UNSUBSCRIBED}
# "Only send me emails of this type" (the preference page): a resubscribe to it and to all mail, and
# an unsubscribe from every other campaign type, all at the event's time.
PREFERENCE_CHANGE = "preference_change"
CONSENT_EVENT_TYPES = (*SUPPRESSING_EVENTS, *LIFTING_EVENTS, PREFERENCE_CHANGE)
# The events a person scopes (a preference page); a bounce or a complaint is about every mail.
SCOPED_EVENTS = ("unsubscribe", "resubscribe")


def email_hash(email: Column) -> Column:
    """SHA-256 (hex) of the address trimmed and lower-cased; null for a null address."""
    return F.sha2(F.lower(F.trim(email)), 256)


def event_scope(campaign_type: Column, *, is_lift: Column) -> Column:
    """The scope an event names: its ``campaign_type`` when that is a known campaign type, else ``all``.

    A suppressing event with an unknown type counts for ``all`` (an opt-out is never dropped for a
    typo); a lifting event with an unknown type lifts nothing (null), so a typo never re-opens mail.
    """
    named = F.lower(F.trim(campaign_type))
    is_known = named.isin(*CAMPAIGN_TYPES)
    is_blank = F.coalesce(named == F.lit(""), F.lit(True))
    return (F.when(is_blank | (named == F.lit(SCOPE_ALL)), F.lit(SCOPE_ALL))
            .when(is_known, named)
            .when(~is_lift, F.lit(SCOPE_ALL)))


def is_in_force(now: dt.datetime) -> Column:
    """A suppression holds until it is lifted (a lift dated after ``now`` has not happened yet)."""
    return F.col("lifted_at").isNull() | (F.col("lifted_at") > F.lit(now))


def _reason_rank(reason: Column) -> Column:
    """1 unsubscribed, 2 bounced, 3 complained, 4 anything else (reported as ``suppressed``)."""
    return (F.when(reason == UNSUBSCRIBED, F.lit(1)).when(reason == BOUNCED, F.lit(2))
            .when(reason == COMPLAINED, F.lit(3)).otherwise(F.lit(4)))


def _active(suppressions: DataFrame, now: dt.datetime) -> DataFrame:
    """``user_id, scope, reason, _p_hash``: the suppressions in force."""
    require_columns(suppressions, SUPPRESSIONS_SCHEMA.fieldNames(), step="with_mail_permission (suppressions)")
    return suppressions.where(is_in_force(now)).select(
        "user_id", "scope", "reason", F.col("email_hash").alias("_p_hash"))


def _mailbox_blocks(active: DataFrame) -> DataFrame:
    """``_p_hash, scope, _p_rank``: the strongest :data:`ADDRESS_REASONS` suppression in force per
    address hash and scope (one row per key: a join on it cannot multiply rows)."""
    return (active.where(F.col("reason").isin(*ADDRESS_REASONS) & F.col("_p_hash").isNotNull())
            .groupBy("_p_hash", "scope").agg(F.min(_reason_rank(F.col("reason"))).alias("_p_rank")))


def _blocks(active: DataFrame, people: DataFrame) -> DataFrame:
    """``user_id, scope, _p_rank``: the strongest suppression in force per user and scope, by user id
    and, for :data:`ADDRESS_REASONS`, by the hash of the user's current address. A bounce whose
    address is known holds by address only (:data:`MAILBOX_ONLY_REASONS`)."""
    about_mailbox = F.col("reason").isin(*MAILBOX_ONLY_REASONS) & F.col("_p_hash").isNotNull()
    by_user = active.where(F.col("user_id").isNotNull() & ~about_mailbox).select(
        "user_id", "scope", _reason_rank(F.col("reason")).alias("_p_rank"))
    by_address = (_mailbox_blocks(active)
                  .join(people.select("user_id", "_p_hash").where(F.col("_p_hash").isNotNull()), "_p_hash",
                        how="inner")
                  .select("user_id", "scope", "_p_rank"))
    # One row per user and scope: the joins below cannot multiply recipients.
    return by_user.unionByName(by_address).groupBy("user_id", "scope").agg(F.min("_p_rank").alias("_p_rank"))


def with_mail_permission(recipients: DataFrame, *, users: DataFrame, suppressions: DataFrame | None,
                         now: dt.datetime, campaign_type: str | None = None,
                         address: str | None = None) -> DataFrame:
    """``recipients`` with ``blocked_reason``: null when the user may be mailed now, else one of
    :data:`BLOCK_REASONS` (the first that applies).

    Args:
        recipients: rows with ``user_id`` and, unless ``campaign_type`` is given, ``campaign_type``.
        users: the ``users`` table (``user_id, email, email_consent``), one row per user.
        suppressions: the ``suppressions`` table, or None when it does not exist yet.
        now: suppressions lifted after this still hold.
        campaign_type: the campaign type of every row, when the rows do not carry it.
        address: the column of ``recipients`` holding the address a rendered message goes to
            (``to_email``): its mailbox suppressions hold too, and it must still be the user's
            current address (else ``address_changed``). None before rendering.
    """
    require_columns(recipients, ["user_id"] + ([] if campaign_type else ["campaign_type"])
                    + ([address] if address else []), step="with_mail_permission")
    require_columns(users, ["user_id", "email", "email_consent"], step="with_mail_permission (users)")
    people = users.select("user_id", F.lit(True).alias("_p_has_user"),
                          F.coalesce(F.col("email_consent"), F.lit(False)).alias("_p_consent"),
                          email_hash(F.col("email")).alias("_p_hash"))
    kind = F.lit(campaign_type) if campaign_type else F.col("campaign_type")
    # users is keyed by user_id (ingest merges by it): one row per recipient.
    frame = (recipients.withColumn("_p_type", kind)
             .join(people.withColumnRenamed("_p_hash", "_p_current"), "user_id", how="left"))
    if address:
        frame = frame.withColumn("_p_to", email_hash(F.col(address)))
        # A null on either side is a difference too: no current address, or a message without one.
        is_changed = ~F.col("_p_to").eqNullSafe(F.col("_p_current"))
    else:
        is_changed = F.lit(False)
    if suppressions is not None:
        active = _active(suppressions, now)
        blocks = _blocks(active, people)
        everything = blocks.where(F.col("scope") == SCOPE_ALL).select("user_id", F.col("_p_rank").alias("_p_all"))
        typed = blocks.where(F.col("scope") != SCOPE_ALL).select(
            "user_id", F.col("scope").alias("_p_type"), F.col("_p_rank").alias("_p_typed"))
        frame = frame.join(everything, "user_id", how="left").join(typed, ["user_id", "_p_type"], how="left")
        ranks = ["_p_all", "_p_typed"]
        if address:
            # The address the message goes to, whoever else holds (or held) it.
            mailbox = _mailbox_blocks(active).withColumnRenamed("_p_hash", "_p_to")
            frame = (frame
                     .join(mailbox.where(F.col("scope") == SCOPE_ALL).select(
                         "_p_to", F.col("_p_rank").alias("_p_to_all")), "_p_to", how="left")
                     .join(mailbox.where(F.col("scope") != SCOPE_ALL).select(
                         "_p_to", F.col("scope").alias("_p_type"), F.col("_p_rank").alias("_p_to_typed")),
                         ["_p_to", "_p_type"], how="left"))
            ranks += ["_p_to_all", "_p_to_typed"]
        rank = F.least(*ranks)
    else:
        rank = F.lit(None).cast("int")
    # CASE, not element_at over a literal array: Spark 4.2 answers element_at(array, NULL) with the
    # array's last element instead of null.
    by_rank = (F.when(rank == 1, F.lit(UNSUBSCRIBED)).when(rank == 2, F.lit(BOUNCED))
               .when(rank == 3, F.lit(COMPLAINED)).when(rank == 4, F.lit(SUPPRESSED)))
    reason = (F.when(~F.coalesce(F.col("_p_has_user"), F.lit(False)), F.lit(UNKNOWN_USER))
              .when(~F.col("_p_consent"), F.lit(NO_CONSENT))
              .otherwise(F.coalesce(by_rank, F.when(is_changed, F.lit(ADDRESS_CHANGED)))))
    return frame.select(*[F.col(c) for c in recipients.columns], reason.alias("blocked_reason"))


# ---- keeping the table ---------------------------------------------------------------------------

def _actions(events: DataFrame, current: DataFrame) -> DataFrame:
    """Suppress and lift actions per key: the events', and the current rows' of the keys they touch."""
    if "campaign_type" not in events.columns:
        events = events.withColumn("campaign_type", F.lit(None).cast("string"))
    events = _expand_preference_changes(events)
    kind = F.col("event_type")
    is_lift = kind.isin(*LIFTING_EVENTS)
    reasons = F.create_map(*[F.lit(x) for pair in {**SUPPRESSING_EVENTS, **LIFTING_EVENTS}.items() for x in pair])
    campaign_type = F.col("campaign_type")
    scope = F.when(kind.isin(*SCOPED_EVENTS), event_scope(campaign_type, is_lift=is_lift)).otherwise(F.lit(SCOPE_ALL))
    from_events = (events.where(kind.isin(*CONSENT_EVENT_TYPES) & F.col("user_id").isNotNull()
                                & F.col("event_ts").isNotNull())
                   .select("user_id", scope.alias("scope"),
                           F.element_at(reasons, kind).alias("reason"), is_lift.alias("is_lift"),
                           F.col("event_ts").alias("ts"), F.col("event_id").cast("string").alias("source"))
                   .where(F.col("scope").isNotNull()))
    touched = from_events.select(*SUPPRESSION_KEY).distinct()
    rows = current.join(touched, SUPPRESSION_KEY, how="left_semi")
    began = rows.select(*SUPPRESSION_KEY, F.lit(False).alias("is_lift"), F.col("since").alias("ts"), "source")
    lifted = rows.where(F.col("lifted_at").isNotNull()).select(
        *SUPPRESSION_KEY, F.lit(True).alias("is_lift"), F.col("lifted_at").alias("ts"),
        F.lit(None).cast("string").alias("source"))
    return from_events.unionByName(began).unionByName(lifted)


def _expand_preference_changes(events: DataFrame) -> DataFrame:
    """``preference_change`` events, and resubscribes to all mail, as the actions they stand for.

    - A resubscribe to ``all`` (no type, or ``all``) undoes every unsubscribe of the person, of any
      scope: it is a resubscribe to ``all`` and to each campaign type.
    - A ``preference_change`` ("only this type") names one known campaign type (another is dropped:
      a typo must not unsubscribe a person from everything); it becomes a resubscribe to ``all`` and
      to that type, and an unsubscribe from every other campaign type.

    Each action keeps the event's id and time.
    """
    columns = ["event_id", "event_type", "event_ts", "user_id", "campaign_type"]
    named = F.lower(F.trim(F.col("campaign_type")))
    kind = F.col("event_type")
    is_change = (kind == F.lit(PREFERENCE_CHANGE)) & named.isin(*CAMPAIGN_TYPES)
    is_full_resubscribe = (kind == F.lit("resubscribe")) & F.coalesce(named.isin("", SCOPE_ALL), F.lit(True))
    every_type = F.array(*[F.lit(t) for t in CAMPAIGN_TYPES])

    def action(kind_name: str, scope: Column) -> Column:
        return F.struct(F.lit(kind_name).alias("t"), scope.alias("c"))

    actions = (F.when(is_full_resubscribe, F.concat(
                   F.array(action("resubscribe", F.lit(SCOPE_ALL))),
                   F.transform(every_type, lambda t: action("resubscribe", t))))
               .otherwise(F.concat(
                   F.array(action("resubscribe", F.lit(SCOPE_ALL)), action("resubscribe", named)),
                   F.transform(F.filter(every_type, lambda t: t != named), lambda t: action("unsubscribe", t)))))
    expanded = (events.where(is_change | is_full_resubscribe)
                .select("event_id", "event_ts", "user_id", F.explode(actions).alias("_a"))
                .select("event_id", F.col("_a.t").alias("event_type"), "event_ts", "user_id",
                        F.col("_a.c").alias("campaign_type")))
    kept = events.where(~(is_change | is_full_resubscribe) & (kind != F.lit(PREFERENCE_CHANGE)))
    return kept.select(*columns).unionByName(expanded)


def suppression_updates(events: DataFrame, *, current: DataFrame, users: DataFrame,
                        updated_at: dt.datetime) -> DataFrame:
    """Rows to merge into ``suppressions`` by :data:`SUPPRESSION_KEY`: each key the events touch, as it
    stands after them.

    Events (``event_id, event_type, event_ts, user_id`` and optionally ``campaign_type``) of the
    :data:`CONSENT_EVENT_TYPES` become actions: ``unsubscribe``, ``bounce``, ``complaint`` suppress
    (an unsubscribe's scope from :func:`event_scope`, the others' ``all``); ``resubscribe`` lifts an
    ``unsubscribed`` suppression of its scope (one to ``all`` lifts every scope); a ``preference_change`` ("only this type") is a
    resubscribe to ``all`` and its type and an unsubscribe from every other type. The key's current row joins them as a suppress at
    ``since`` (and a lift at ``lifted_at``).
    In event-time order, with a suppress winning a tie, the last suppress decides: a later lift
    ends it (``lifted_at`` = the first lift after it), otherwise it is in force. ``since`` and
    ``source`` are the first suppress since the lift before that, so a late or repeated event never
    moves an opt-out forward, and a late resubscribe never lifts a later opt-out. A key only lifted,
    never suppressed, gives no row.

    Args:
        current: the ``suppressions`` table (or an empty frame with :data:`SUPPRESSIONS_SCHEMA`).
        users: ``user_id, email``: the address hashed into ``email_hash`` for a new row.
        updated_at: the writer's time (the ingest batch's planning time).
    """
    require_columns(events, ["event_id", "event_type", "event_ts", "user_id"], step="suppression_updates")
    require_columns(current, SUPPRESSIONS_SCHEMA.fieldNames(), step="suppression_updates (current)")
    require_columns(users, ["user_id", "email"], step="suppression_updates (users)")
    # Event time, then lifts before suppresses (a suppress wins a tie), then the source: a total order.
    order = F.struct("ts", (~F.col("is_lift")).alias("is_suppress"), F.coalesce("source", F.lit("")).alias("src"))
    earlier = Window.partitionBy(*SUPPRESSION_KEY).orderBy("_order").rowsBetween(Window.unboundedPreceding, -1)
    actions = (_actions(events, current).withColumn("_order", order)
               .withColumn("lifts_before", F.coalesce(F.sum(F.col("is_lift").cast("int")).over(earlier), F.lit(0))))
    suppresses = actions.where(~F.col("is_lift"))
    # The run (lifts before it) of each key's last suppress: keys without one drop out here.
    last_run = suppresses.groupBy(*SUPPRESSION_KEY).agg(F.max_by("lifts_before", "_order").alias("lifts_before"))
    run_start = suppresses.groupBy(*SUPPRESSION_KEY, "lifts_before").agg(
        F.min_by(F.struct("ts", "source"), "_order").alias("_first"))
    # The lift that ends run r is the only one with r lifts before it.
    run_end = actions.where(F.col("is_lift")).groupBy(*SUPPRESSION_KEY, "lifts_before").agg(
        F.min("ts").alias("lifted_at"))
    run_key = [*SUPPRESSION_KEY, "lifts_before"]
    state = (last_run.join(run_start, run_key, how="inner").join(run_end, run_key, how="left")
             .join(current.select(*SUPPRESSION_KEY, F.col("email_hash").alias("_old_hash")), SUPPRESSION_KEY,
                   how="left")
             .join(users.select("user_id", email_hash(F.col("email")).alias("_new_hash")), "user_id", how="left"))
    return state.select(
        "user_id",
        # A row keeps the address it was written for; a new row takes the user's address now.
        F.coalesce("_old_hash", "_new_hash").alias("email_hash"),
        "scope", "reason",
        F.col("_first.source").alias("source"),
        F.col("_first.ts").alias("since"),
        "lifted_at",
        F.lit(updated_at).cast("timestamp").alias("updated_at"),
    )


# The merge rewrites a row only when its state changed, so ``updated_at`` says when it last did.
CHANGED = ("NOT (t.since <=> s.since AND t.lifted_at <=> s.lifted_at AND t.source <=> s.source "
           "AND t.email_hash <=> s.email_hash)")


# ---- facts about an address (sending, bounce and complaint reports) ------------------------------

# A fact re-imposes a suppression of its key only when the row in force was lifted before it; a
# suppression in force keeps its first ``since`` and ``source`` (merging the same facts again changes
# nothing).
REASSERT = "t.lifted_at IS NOT NULL AND t.lifted_at <= s.since"


def suppressions_from_facts(facts: DataFrame, *, updated_at: dt.datetime) -> DataFrame:
    """``suppressions`` rows (scope ``all``) from facts ``user_id, email_hash, reason, source, since``:
    one row per user and reason, its earliest fact (then smallest source). Facts without a user are
    left out (the table's key is the user); merge the result by :data:`SUPPRESSION_KEY` with
    ``update_condition=REASSERT``."""
    require_columns(facts, ["user_id", "email_hash", "reason", "source", "since"], step="suppressions_from_facts")
    first = F.min_by(F.struct("email_hash", "source", "since"),
                     F.struct("since", F.coalesce("source", F.lit(""))))
    rows = (facts.where(F.col("user_id").isNotNull() & F.col("reason").isNotNull())
            .groupBy("user_id", "reason").agg(first.alias("_f")))
    return rows.select(
        "user_id", F.col("_f.email_hash").alias("email_hash"), F.lit(SCOPE_ALL).alias("scope"), "reason",
        F.col("_f.source").alias("source"), F.col("_f.since").alias("since"),
        F.lit(None).cast("timestamp").alias("lifted_at"), F.lit(updated_at).cast("timestamp").alias("updated_at"),
    )
