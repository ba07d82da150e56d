"""Outbox rows as the bytes that leave: multipart/alternative (text, then HTML), SMTP line ends.

:func:`message_bytes` is the one place a message's wire form is made: ``.eml`` export writes it and
the send stage hands the same bytes to SMTP. It is deterministic (the same row gives the same bytes:
the MIME boundary is a hash of the bodies, the bodies are quoted-printable).

Headers that carry URLs or ids (``Message-ID``, ``List-Unsubscribe``, ``List-Unsubscribe-Post``) are
written as plain ASCII, never RFC 2047-encoded: mailbox providers read them raw, and an encoded
``List-Unsubscribe`` is no one-click unsubscribe. Python's header folding encodes any word longer
than its line limit (78), which a signed URL always is, so these lines are written here, folded
only between list items (after a comma) when a line would pass 78 characters. Text headers
(``From`` with its display name, ``Subject``) go through the email package's folding, which encodes
non-ASCII as RFC 2047 words, as it should.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any, Mapping

from inboxlift.addresses import ascii_address
from inboxlift.render.message import one_line

_POLICY = policy.SMTP
# Headers of the outbox's headers map written in this order, then any X- header by name (Date, To
# and Subject come from columns). All but From are URLs or ids: raw ASCII, never encoded.
HEADER_ORDER = ("From", "Message-ID", "List-Unsubscribe", "List-Unsubscribe-Post")
FOLD_AT = 78
MAX_LINE = 998
_EXTRA_HEADER = re.compile(r"X-[A-Za-z0-9][A-Za-z0-9-]*")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")
_ANGLE_LIST = re.compile(r"<[^<>\s]*>(?:\s*,\s*<[^<>\s]*>)*")
_ANGLE_ITEM = re.compile(r"<[^<>\s]*>")


class MessageError(ValueError):
    """An outbox row that cannot become a standards-correct message (no ``To:`` is ever guessed)."""


def raw_header(name: str, value: Any) -> bytes | None:
    """``Name: value`` + CRLF as ASCII, never encoded; None when the value is not printable ASCII or
    a line would pass 998 characters. A list of ``<...>`` items (``List-Unsubscribe``) is written
    ``<a>, <b>`` and folded after its commas when the line would pass 78 characters."""
    text = one_line(value)
    if not _PRINTABLE_ASCII.fullmatch(text):
        return None
    if _ANGLE_LIST.fullmatch(text):
        items = _ANGLE_ITEM.findall(text)
        text = ", ".join(items)
        if len(name) + 2 + len(text) > FOLD_AT:
            text = ",\r\n ".join(items)
    line = f"{name}: {text}"
    if any(len(part) > MAX_LINE for part in line.split("\r\n")):
        return None
    return line.encode("ascii") + b"\r\n"


def _required_raw(name: str, value: Any) -> bytes:
    line = raw_header(name, value)
    if line is None:
        raise MessageError(f"header {name} must be printable ASCII in lines of at most {MAX_LINE} characters")
    return line


def _folded(name: str, value: Any) -> bytes:
    # The header registry's folding (what the generator does for a message's headers): non-ASCII
    # text as RFC 2047 words, addresses parsed, lines at most 78 characters where possible.
    return _POLICY.header_factory(name, one_line(value)).fold(policy=_POLICY).encode("ascii")


def _bodies(text: str, html: str) -> bytes:
    """The multipart/alternative entity (its MIME-Version and Content-Type headers, then the parts)."""
    body = EmailMessage(policy=_POLICY)
    # Quoted-printable: 7-bit, lines of at most 76 characters, and the same bytes on every run.
    body.set_content(text, subtype="plain", charset="utf-8", cte="quoted-printable")
    body.add_alternative(html, subtype="html", charset="utf-8", cte="quoted-printable")
    # "=_" never starts a quoted-printable line (a literal "=" is written "=3D"), and the hash ties
    # the boundary to the bodies: deterministic, and no body can hold it.
    digest = hashlib.sha256(text.encode("utf-8") + b"\x00" + html.encode("utf-8")).hexdigest()[:32]
    body.set_boundary(f"=_{digest}")
    return body.as_bytes(policy=_POLICY)


def message_bytes(row: Mapping[str, Any]) -> bytes:
    """An outbox row (``to_email, subject, text, html, headers, send_at``, optionally ``message_id``
    and ``from_email``) as the message's bytes, CRLF line ends.

    Every value passes :func:`one_line` once more (the outbox may have been written by something other
    than this renderer) and the recipient is validated again: a CR/LF never reaches a header and an
    invalid address never becomes a ``To:``.

    Raises:
        MessageError: the address is invalid, a URL/id header is not ASCII, or the headers map names
            a header this function does not write (anything but ``HEADER_ORDER`` and ``X-...``).
    """
    headers = dict(row.get("headers") or {})
    to_email = ascii_address(row.get("to_email"))
    if to_email is None:
        raise MessageError("to_email is not a valid address")
    unknown = sorted(n for n in headers if n not in HEADER_ORDER and not _EXTRA_HEADER.fullmatch(str(n)))
    if unknown:
        raise MessageError(f"the headers map holds header(s) {unknown} (only {list(HEADER_ORDER)} and X-...)")
    if "Message-ID" not in headers and row.get("message_id"):
        headers["Message-ID"] = f"<{row['message_id']}>"
    lines = [_folded("From", headers.pop("From", row.get("from_email"))), _required_raw("To", to_email),
             _folded("Subject", row.get("subject"))]
    send_at = row.get("send_at")
    if isinstance(send_at, dt.datetime):
        lines.append(_required_raw("Date", format_datetime(
            send_at if send_at.tzinfo else send_at.replace(tzinfo=dt.timezone.utc))))
    for name in HEADER_ORDER[1:]:
        if name in headers:
            lines.append(_required_raw(name, headers.pop(name)))
    for name in sorted(headers):
        # Ids and ASCII values raw (an encoded id helps nobody); other text as RFC 2047 words.
        lines.append(raw_header(name, headers[name]) or _folded(name, headers[name]))
    return b"".join(lines) + _bodies(row.get("text") or "", row.get("html") or "")


def eml_bytes(row: Mapping[str, Any]) -> bytes:
    """An ``.eml`` file's bytes: :func:`message_bytes`."""
    return message_bytes(row)
