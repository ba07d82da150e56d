"""Outbox rows as standards-correct messages: multipart/alternative (text, then HTML), SMTP line ends."""

from __future__ import annotations

import datetime as dt
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any, Mapping

from inboxlift.render.message import one_line

# Headers of the outbox's headers map written in this order (Date, To and Subject come from columns).
HEADER_ORDER = ("From", "Message-ID", "List-Unsubscribe", "List-Unsubscribe-Post")


def build_message(row: Mapping[str, Any]) -> EmailMessage:
    """An outbox row (``to_email, subject, text, html, headers, send_at``) as a MIME message.

    Every header value passes :func:`one_line` once more: the outbox may have been written by
    something other than this renderer, and a CR/LF must never reach a header.
    """
    headers = dict(row.get("headers") or {})
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = one_line(headers.pop("From", row.get("from_email")))
    msg["To"] = one_line(row["to_email"])
    msg["Subject"] = one_line(row["subject"])
    send_at = row.get("send_at")
    if isinstance(send_at, dt.datetime):
        msg["Date"] = format_datetime(send_at if send_at.tzinfo else send_at.replace(tzinfo=dt.timezone.utc))
    for name in HEADER_ORDER[1:]:
        if name in headers:
            msg[name] = one_line(headers.pop(name))
    for name in sorted(headers):
        msg[one_line(name).replace(" ", "-").replace(":", "")] = one_line(headers[name])
    msg.set_content(row.get("text") or "", subtype="plain", charset="utf-8")
    msg.add_alternative(row.get("html") or "", subtype="html", charset="utf-8")
    return msg


def eml_bytes(row: Mapping[str, Any]) -> bytes:
    return build_message(row).as_bytes(policy=policy.SMTP)
