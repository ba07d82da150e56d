"""Reading what comes back after sending: delivery status notifications (RFC 3464) and complaint
feedback reports (ARF, RFC 5965), one raw message at a time. Plain Python: Spark calls it per
partition (``mapInArrow``) in ``inboxlift import-bounces``.

Which addresses failed, and whether permanently, is ``flufl.bounce``'s answer (``all_failures``: RFC
3464 DSNs and the non-standard formats of many mail servers); the rest is the standard ``email``
package: the failed message's ``Message-ID`` (from its ``message/rfc822`` or
``text/rfc822-headers`` part), each recipient's ``Status`` and ``Diagnostic-Code``, and an ARF
report's ``Feedback-Type`` and ``Original-Rcpt-To``. A message that is neither gives one
``unreadable`` row with the reason; nothing is dropped.
"""

from __future__ import annotations

import datetime as dt
import email
import hashlib
import mailbox
from email import policy
from email.message import Message
from email.parser import HeaderParser
from email.utils import parseaddr, parsedate_to_datetime
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import unquote, urlparse

import pyarrow as pa
from flufl.bounce import all_failures

from inboxlift.addresses import ascii_address

BOUNCE, DELAY, COMPLAINT, UNREADABLE = "bounce", "delay", "complaint", "unreadable"
# Why a message is unreadable (kept in bounce_quarantine with its bytes).
NOT_A_REPORT = "not_a_report"            # neither a DSN nor an ARF report (an auto-reply, spam...)
NO_RECIPIENT = "no_failed_recipient"     # a report naming no address we could read
UNPARSEABLE = "unparseable"              # the parser or a detector failed on it
UNMATCHED = "unmatched"                  # readable, but no outbox message or user matches it

REPORT_SCHEMA = pa.schema([
    pa.field("report_id", pa.string()),       # sha256 of the raw message: the same report is one id
    pa.field("source", pa.string()),          # the file (mbox: file#key)
    pa.field("kind", pa.string()),            # bounce | delay | complaint | unreadable
    pa.field("message_id", pa.string()),      # the reported message's Message-ID, without <>
    pa.field("recipient", pa.string()),       # the failed or complaining address (ASCII form)
    pa.field("status", pa.string()),          # DSN Status (5.1.1) or ARF Feedback-Type (abuse)
    pa.field("diagnostic", pa.string()),      # DSN Diagnostic-Code, or the parse error
    pa.field("reported_at", pa.timestamp("us", tz="UTC")),  # the report's Date header
    pa.field("reason", pa.string()),          # unreadable: why
    pa.field("raw", pa.binary()),             # the message's bytes
])
REPORT_DDL = ("report_id string, source string, kind string, message_id string, recipient string, status string, "
              "diagnostic string, reported_at timestamp, reason string, raw binary")


def _clean_id(value: Any) -> str | None:
    if not value:
        return None
    text = str(value).strip()
    if text.startswith("<") and ">" in text:
        text = text[1:text.index(">")]
    return text or None


def _original_headers(msg: Message) -> Message | None:
    """The headers of the message the report is about (``message/rfc822`` or ``text/rfc822-headers``)."""
    for part in msg.walk():
        kind = part.get_content_type()
        if kind == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list) and payload:
                return payload[0]
        elif kind == "text/rfc822-headers":
            text = part.get_payload(decode=True) or b""
            return HeaderParser(policy=policy.compat32).parsestr(text.decode("utf-8", "replace"))
    return None


def _address(value: Any) -> str | None:
    """``rfc822; a@b``, ``<a@b>`` or ``a@b`` -> the ASCII address, or the bare text if it is none."""
    if value is None:
        return None
    text = str(value)
    if ";" in text:
        text = text.split(";", 1)[1]
    bare = parseaddr(text.strip())[1] or text.strip()
    return ascii_address(bare) or bare.lower() or None


def _recipient_fields(msg: Message) -> dict[str, tuple[str | None, str | None]]:
    """address -> (Status, Diagnostic-Code) from the DSN's per-recipient blocks."""
    fields: dict[str, tuple[str | None, str | None]] = {}
    for part in msg.walk():
        if part.get_content_type() != "message/delivery-status" or not part.is_multipart():
            continue
        for block in part.get_payload():
            address = _address(block.get("original-recipient") or block.get("final-recipient"))
            final = _address(block.get("final-recipient"))
            status = (block.get("status") or "").strip() or None
            diagnostic = " ".join(str(block.get("diagnostic-code") or "").split()) or None
            for name in {address, final} - {None}:
                fields[name] = (status, diagnostic)
    return fields


def _reported_at(msg: Message) -> dt.datetime | None:
    try:
        when = parsedate_to_datetime(msg["Date"]) if msg["Date"] else None
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).astimezone(dt.timezone.utc)


def _feedback(msg: Message) -> Message | None:
    for part in msg.walk():
        if part.get_content_type() == "message/feedback-report":
            payload = part.get_payload()
            if isinstance(payload, list) and payload:
                return payload[0]
            # A report built without the email package's message/* parsing: fields as text.
            return HeaderParser(policy=policy.compat32).parsestr(str(payload))
    return None


def parse_report(raw: bytes, *, source: str) -> list[dict[str, Any]]:
    """The rows of one raw message (:data:`REPORT_SCHEMA`): one per failed recipient of a DSN
    (``bounce`` permanent, ``delay`` temporary), one for a complaint, or one ``unreadable``."""
    report_id = hashlib.sha256(raw).hexdigest()
    # The bytes travel with every row: a report that matches nothing is kept whole too.
    base = {"report_id": report_id, "source": source, "raw": raw}

    def unreadable(reason: str, detail: str | None = None) -> list[dict[str, Any]]:
        return [{**base, "kind": UNREADABLE, "reason": reason, "diagnostic": detail}]

    try:
        msg = email.message_from_bytes(raw, policy=policy.compat32)
        reported_at = _reported_at(msg)
        original = _original_headers(msg)
        message_id = _clean_id(original["Message-ID"]) if original is not None else None
        feedback = _feedback(msg)
        if feedback is not None:
            recipient = _address(feedback["Original-Rcpt-To"]) or (
                _address(original["To"]) if original is not None else None)
            if recipient is None and message_id is None:
                return unreadable(NO_RECIPIENT, "the complaint names neither the recipient nor the message")
            kind = (feedback["Feedback-Type"] or "abuse").strip().lower()
            return [{**base, "kind": COMPLAINT, "message_id": message_id, "recipient": recipient, "status": kind,
                     "reported_at": reported_at}]
        temporary, permanent = all_failures(msg)
        fields = _recipient_fields(msg)
    except Exception as exc:  # noqa: BLE001 - a message that breaks a parser is quarantined, the rest go on
        return unreadable(UNPARSEABLE, f"{type(exc).__name__}: {exc}"[:500])
    rows = []
    for kind, addresses in ((BOUNCE, permanent), (DELAY, temporary)):
        for raw_address in sorted(addresses):
            recipient = _address(raw_address.decode("ascii", "replace"))
            status, diagnostic = fields.get(recipient or "", (None, None))
            rows.append({**base, "kind": kind, "message_id": message_id, "recipient": recipient, "status": status,
                         "diagnostic": diagnostic, "reported_at": reported_at})
    if rows:
        return rows
    if msg.get_content_type() == "multipart/report":
        return unreadable(NO_RECIPIENT, "a report without a failed recipient flufl.bounce could read")
    return unreadable(NOT_A_REPORT, f"a {msg.get_content_type()} message, not a delivery or feedback report")


def _local_path(uri: str) -> str:
    parsed = urlparse(uri)
    return unquote(parsed.path) if parsed.scheme in ("", "file") else uri


def _messages(rows: Iterable[dict[str, Any]], *, mbox: bool) -> Iterator[tuple[bytes, str]]:
    for row in rows:
        if not mbox:
            yield row["content"], row["path"]
            continue
        box = mailbox.mbox(_local_path(row["path"]), create=False)
        try:
            for key in box.iterkeys():
                yield box.get_bytes(key), f"{row['path']}#{key}"
        finally:
            box.close()


def report_batches(batches: Iterable[pa.RecordBatch], *, mbox: bool) -> Iterator[pa.RecordBatch]:
    """The ``mapInArrow`` function over Spark ``binaryFile`` rows (``path``, and ``content`` for a
    Maildir's message files; an mbox file is opened by its path and split with ``mailbox.mbox``)."""
    for batch in batches:
        out: list[dict[str, Any]] = []
        for raw, source in _messages(batch.to_pylist(), mbox=mbox):
            out.extend(parse_report(raw, source=source))
        if out:
            yield pa.RecordBatch.from_pylist(out, schema=REPORT_SCHEMA)


def mailbox_kind(path: str | Path) -> str:
    """``maildir`` (a folder with ``cur``/``new``) or ``mbox`` (a file).

    Raises:
        FileNotFoundError: the path is neither.
    """
    folder = Path(path)
    if folder.is_dir() and ((folder / "new").is_dir() or (folder / "cur").is_dir()):
        return "maildir"
    if folder.is_file():
        return "mbox"
    raise FileNotFoundError(f"{path} is neither a Maildir (a folder with cur/ and new/) nor an mbox file")
