"""The states of a delivery attempt and the ``deliveries`` table's columns (README "Sending")."""

from __future__ import annotations

from pyspark.sql.types import IntegerType, StringType, StructField, StructType, TimestampType

DELIVERIES_TABLE = "deliveries"
DELIVERIES_KEY = ["message_id", "attempt"]

SENT, DEFERRED, BOUNCED, FAILED, SKIPPED, UNKNOWN = "sent", "deferred", "bounced", "failed", "skipped", "unknown"
STATES = (SENT, DEFERRED, BOUNCED, FAILED, SKIPPED, UNKNOWN)
# A message whose latest attempt ended so is never sent again by itself (unknown: --resend-unknown).
FINAL_STATES = (SENT, BOUNCED, FAILED)

# Where a row comes from: an SMTP transaction of a send run, or a delivery status notification.
ORIGIN_SMTP, ORIGIN_DSN = "smtp", "dsn"

# Reasons (the ``reason`` column). Failed without the relay: the message cannot be sent as it is.
INVALID_ADDRESS = "invalid_address"          # the recipient fails validation again (email-validator)
INVALID_SENDER = "invalid_sender"            # the envelope sender (return path / from) is no address
HEADER_LINE_BREAK = "header_line_break"      # a header value, the subject or an address holds CR/LF
BAD_MESSAGE = "bad_message"                  # render.eml.message_bytes refused the row (the error in smtp_reply)
# Failed by the relay's answer.
SENDER_REFUSED = "sender_refused"            # 5xx to MAIL FROM: about our sender, not the recipient
RETRIES_EXHAUSTED = "retries_exhausted"      # a 4xx at the last of delivery.max_attempts (untried ones not counted)
UNEXPECTED_REPLY = "unexpected_reply"
# Deferred.
THROTTLED = "throttled"                      # 421/451/452 still after delivery.throttle_retries in-task retries
TEMPORARY = "temporary"                      # another 4xx
RELAY_UNAVAILABLE = "relay_unavailable"      # the task could not (re)connect; messages left untouched
CONNECTION_LOST = "connection_lost"          # lost before the content went out, still after retries
CONSENT_CHANGED = "consent_changed"          # the user changed their preferences during the run: not sent
# Deferred without the relay ever having the message: such attempts do not count towards max_attempts.
UNTRIED_REASONS = (RELAY_UNAVAILABLE, CONNECTION_LOST, CONSENT_CHANGED)
# Bounced.
REJECTED = "rejected"                        # 5xx to RCPT or to the content
DSN_BOUNCE = "dsn"                           # a delivery status notification said the address fails
# Unknown.
NO_REPLY = "no_reply"                        # the content went out, the reply never came
INTERRUPTED = "interrupted"                  # started by a run or task that died before the reply
# Skipped (besides the consent reasons of inboxlift.consent.BLOCK_REASONS).
EXPIRED = "expired"                          # not attempted within delivery.max_delay_hours of send_at

# 421 service closing, 451 local error, 452 insufficient storage / too many: "slow down".
THROTTLE_CODES = (421, 451, 452)

DELIVERIES_SCHEMA = StructType([
    StructField("message_id", StringType()),
    StructField("attempt", IntegerType()),          # 1, 2, ... per message
    StructField("run_id", StringType()),            # the send run (or the bounce import) that wrote it
    StructField("state", StringType()),             # STATES
    StructField("reason", StringType()),            # why, beyond the state (above, or a consent reason)
    StructField("smtp_code", IntegerType()),        # the relay's reply code; null without one
    StructField("smtp_reply", StringType()),        # the relay's reply text, or the error
    StructField("relay", StringType()),             # host:port
    StructField("attempted_at", TimestampType()),
    StructField("next_attempt_at", TimestampType()),  # deferred: not before this
    StructField("campaign_id", StringType()),
    StructField("user_id", StringType()),
    StructField("email_hash", StringType()),        # inboxlift.consent.email_hash of the recipient
    StructField("origin", StringType()),            # smtp | dsn
    StructField("report_id", StringType()),         # dsn: the report's id (sha256 of its bytes)
])
