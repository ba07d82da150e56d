"""Signed link tokens: unsubscribe (``/u/``), click (``/c/``) and open (``/o/``) links (docs/render.md).

Rendering issues them; the tracking service (issue 20) verifies them. Plain Python (hmac, hashlib,
base64): importable without Spark, settings or the environment; the key and the clock are passed in.

A token is ``base64url(body || mac)``, unpadded:

- ``body`` = format version (one byte, 1) || issued-at (4 bytes, big-endian seconds since the Unix
  epoch) || the purpose's fields in a fixed order, each an unsigned LEB128 length followed by that
  many bytes of UTF-8 (the position of a click as an LEB128 number). Lengths make the encoding
  unambiguous: ``("a", "bc")`` and ``("ab", "c")`` never share bytes, so never share a signature.
- ``mac`` = the first 16 bytes of HMAC-SHA256(key, ``b"inboxlift-link\\0" + purpose + b"\\0" + body``).
  The purpose in the MAC input keeps a token of one kind from verifying as another.

Verification decodes strictly (canonical base64url, minimal lengths, no trailing bytes, valid UTF-8),
compares the MAC in constant time and returns a typed payload, or None for anything else. Whether a
token is too old is decided per purpose: unsubscribe tokens never expire (RFC 8058: a one-click link
in a years-old email must still work, and a stolen one can only unsubscribe its own recipient);
click and open tokens are refused after ``max_age`` (``render.tracking_token_max_age_days``).
The tracking service verifies with a :class:`Verifier`: the same answers, with the key's HMAC set up
once per purpose instead of once per token.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import re
import struct
from dataclasses import dataclass
from typing import Callable
from urllib.parse import parse_qsl, urlsplit

FORMAT_VERSION = 1
MIN_KEY_BYTES = 32
MAC_BYTES = 16
UNSUBSCRIBE = "unsubscribe"
CLICK = "click"
OPEN = "open"
# The path segment of each purpose's links: <base>/u/<token>, <base>/c/<token>, <base>/o/<token>.gif.
PATH_SEGMENTS = {UNSUBSCRIBE: "u", CLICK: "c", OPEN: "o"}
OPEN_SUFFIX = ".gif"
# A field longer than this is refused when issuing and when verifying (product URLs are capped at
# 2,048 characters by render.links.is_web_url); a token longer than MAX_TOKEN_CHARS is not decoded.
MAX_FIELD_BYTES = 4096
MAX_TOKEN_CHARS = 8192
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_SEXTETS = {c: n for n, c in enumerate(_B64URL_ALPHABET)}
# By the token's length mod 4 (1 is never a length): the padding binascii wants, and the bits of the
# last character that carry no data (they must be 0, or one token would have several spellings).
_PADDING = (b"", b"", b"==", b"=")
_SPARE_BITS = (0, 0, 0b1111, 0b11)
_URL_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_ISSUED_AT = struct.Struct(">I")


@dataclass(frozen=True)
class UnsubscribeToken:
    """What an unsubscribe link names: the message, its campaign (and type, for "unsubscribe from this
    kind of email"), the user and the variant."""

    message_id: str
    campaign_id: str
    campaign_type: str
    user_id: str
    variant: str
    issued_at: dt.datetime


@dataclass(frozen=True)
class ClickToken:
    """What a click link names. ``position`` is the link's place in the email: 0 the call to action,
    1.. the product cards in the order shown. ``target`` is the signed URL to redirect to."""

    message_id: str
    campaign_id: str
    user_id: str
    variant: str
    position: int
    item_id: str
    target: str
    issued_at: dt.datetime

    @property
    def target_hash(self) -> str:
        """The target URL's SHA-256, first 16 hex digits: an id for the link that holds no URL."""
        return hashlib.sha256(self.target.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class OpenToken:
    """What an open pixel names."""

    message_id: str
    campaign_id: str
    user_id: str
    variant: str
    issued_at: dt.datetime


def check_key(key: bytes) -> None:
    """Raises ValueError unless ``key`` is bytes of at least :data:`MIN_KEY_BYTES`."""
    if not isinstance(key, (bytes, bytearray)) or len(key) < MIN_KEY_BYTES:
        raise ValueError(f"a signing key must be at least {MIN_KEY_BYTES} bytes")


def _uvarint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(value: str | None) -> bytes:
    data = (value or "").encode("utf-8")
    if len(data) > MAX_FIELD_BYTES:
        raise ValueError(f"a token field is {len(data)} bytes; at most {MAX_FIELD_BYTES}")
    return _uvarint(len(data)) + data


def _seconds(instant: dt.datetime) -> int:
    aware = instant if instant.tzinfo else instant.replace(tzinfo=dt.timezone.utc)
    return int((aware - _EPOCH).total_seconds())


def _mac(key: bytes, purpose: str, body: bytes) -> bytes:
    # hmac.digest is the one-shot (OpenSSL) path: ~3x faster than an HMAC object, same bytes.
    return hmac.digest(key, b"inboxlift-link\x00" + purpose.encode("ascii") + b"\x00" + body, "sha256")[:MAC_BYTES]


def _seal(key: bytes, purpose: str, body: bytes) -> str:
    return base64.urlsafe_b64encode(body + _mac(key, purpose, body)).rstrip(b"=").decode("ascii")


class MessageTokens:
    """The tokens of one message. The fields every token of a message shares (version, issued-at,
    message, campaign, user, variant) are encoded once; an email carries a dozen tokens."""

    __slots__ = ("_key", "_head")

    def __init__(self, *, key: bytes, issued_at: dt.datetime, message_id: str, campaign_id: str, user_id: str,
                 variant: str | None) -> None:
        check_key(key)
        self._key = bytes(key)
        self._head = (bytes((FORMAT_VERSION,)) + _ISSUED_AT.pack(_seconds(issued_at)) + _field(message_id)
                      + _field(campaign_id) + _field(user_id) + _field(variant))

    def unsubscribe(self, campaign_type: str | None) -> str:
        return _seal(self._key, UNSUBSCRIBE, self._head + _field(campaign_type))

    def click(self, position: int, item_id: str | None, target: str) -> str:
        if position < 0:
            raise ValueError("a link position is 0 or more")
        return _seal(self._key, CLICK, self._head + _uvarint(position) + _field(item_id) + _field(target))

    def open(self) -> str:
        return _seal(self._key, OPEN, self._head)


def issue_unsubscribe(*, key: bytes, issued_at: dt.datetime, message_id: str, campaign_id: str,
                      campaign_type: str | None, user_id: str, variant: str | None) -> str:
    return MessageTokens(key=key, issued_at=issued_at, message_id=message_id, campaign_id=campaign_id,
                         user_id=user_id, variant=variant).unsubscribe(campaign_type)


def issue_click(*, key: bytes, issued_at: dt.datetime, message_id: str, campaign_id: str, user_id: str,
                variant: str | None, position: int, item_id: str | None, target: str) -> str:
    return MessageTokens(key=key, issued_at=issued_at, message_id=message_id, campaign_id=campaign_id,
                         user_id=user_id, variant=variant).click(position, item_id, target)


def issue_open(*, key: bytes, issued_at: dt.datetime, message_id: str, campaign_id: str, user_id: str,
               variant: str | None) -> str:
    return MessageTokens(key=key, issued_at=issued_at, message_id=message_id, campaign_id=campaign_id,
                         user_id=user_id, variant=variant).open()


class _Malformed(Exception):
    pass


def _number(data: bytes, at: int) -> tuple[int, int]:
    """The LEB128 number at ``data[at:]`` and where it ends; minimal encodings only, so a number (and
    so a token) has exactly one encoding."""
    value, shift, end = 0, 0, len(data)
    while True:
        if at >= end or shift > 28:
            raise _Malformed
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and shift:
                raise _Malformed
            return value, at
        shift += 7


def _texts(data: bytes, at: int, count: int) -> tuple[list[str], int]:
    """``count`` length-prefixed UTF-8 fields from ``data[at:]`` and where they end."""
    out, end = [], len(data)
    for _ in range(count):
        if at >= end:
            raise _Malformed
        size = data[at]
        if size < 0x80:  # a one-byte length: every field the issuer writes under 128 bytes
            at += 1
        else:
            size, at = _number(data, at)
        if size > MAX_FIELD_BYTES or at + size > end:
            raise _Malformed
        try:
            out.append(data[at:at + size].decode("utf-8"))
        except UnicodeDecodeError:
            raise _Malformed from None
        at += size
    return out, at


_HEADER_BYTES = 1 + _ISSUED_AT.size


def _opened(token: str, mac: Callable[[bytes], bytes]) -> tuple[bytes, dt.datetime] | None:
    """The body of a genuine token whose MAC is ``mac(body)``, and its issued-at; None otherwise."""
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS or not _B64URL.fullmatch(token):
        return None
    tail = len(token) % 4
    if tail == 1 or _SEXTETS[token[-1]] & _SPARE_BITS[tail]:
        return None
    # binascii straight from the URL alphabet's bytes: base64.urlsafe_b64decode does the same in
    # several more steps, and the check above replaces re-encoding to compare spellings.
    try:
        raw = binascii.a2b_base64(token.encode("ascii").translate(_URL_TO_STANDARD) + _PADDING[tail])
    except (binascii.Error, ValueError):
        return None
    if len(raw) < _HEADER_BYTES + MAC_BYTES or raw[0] != FORMAT_VERSION:
        return None
    body = raw[:-MAC_BYTES]
    if not hmac.compare_digest(raw[-MAC_BYTES:], mac(body)):
        return None
    return body, _EPOCH + dt.timedelta(seconds=_ISSUED_AT.unpack_from(body, 1)[0])


def _fresh(issued_at: dt.datetime, now: dt.datetime, max_age: dt.timedelta | None) -> bool:
    if max_age is None:
        return True
    aware = now if now.tzinfo else now.replace(tzinfo=dt.timezone.utc)
    return aware - issued_at <= max_age


def _unsubscribe_payload(opened: tuple[bytes, dt.datetime] | None) -> UnsubscribeToken | None:
    if opened is None:
        return None
    body, issued_at = opened
    try:
        (message_id, campaign_id, user_id, variant, campaign_type), at = _texts(body, _HEADER_BYTES, 5)
    except _Malformed:
        return None
    if at != len(body):
        return None
    return UnsubscribeToken(message_id=message_id, campaign_id=campaign_id, campaign_type=campaign_type,
                            user_id=user_id, variant=variant, issued_at=issued_at)


def _click_payload(opened: tuple[bytes, dt.datetime] | None, now: dt.datetime,
                   max_age: dt.timedelta | None) -> ClickToken | None:
    if opened is None:
        return None
    body, issued_at = opened
    try:
        (message_id, campaign_id, user_id, variant), at = _texts(body, _HEADER_BYTES, 4)
        position, at = _number(body, at)
        (item_id, target), at = _texts(body, at, 2)
    except _Malformed:
        return None
    if at != len(body) or not _fresh(issued_at, now, max_age):
        return None
    return ClickToken(message_id=message_id, campaign_id=campaign_id, user_id=user_id, variant=variant,
                      position=position, item_id=item_id, target=target, issued_at=issued_at)


def _open_payload(opened: tuple[bytes, dt.datetime] | None, now: dt.datetime,
                  max_age: dt.timedelta | None) -> OpenToken | None:
    if opened is None:
        return None
    body, issued_at = opened
    try:
        (message_id, campaign_id, user_id, variant), at = _texts(body, _HEADER_BYTES, 4)
    except _Malformed:
        return None
    if at != len(body) or not _fresh(issued_at, now, max_age):
        return None
    return OpenToken(message_id=message_id, campaign_id=campaign_id, user_id=user_id, variant=variant,
                     issued_at=issued_at)


def _one_shot_mac(key: bytes, purpose: str) -> Callable[[bytes], bytes]:
    check_key(key)
    return lambda body: _mac(key, purpose, body)


def verify_unsubscribe(token: str, *, key: bytes) -> UnsubscribeToken | None:
    """The payload of a genuine unsubscribe token (they never expire); None for anything else."""
    return _unsubscribe_payload(_opened(token, _one_shot_mac(key, UNSUBSCRIBE)))


def verify_click(token: str, *, key: bytes, now: dt.datetime, max_age: dt.timedelta | None) -> ClickToken | None:
    """The payload of a genuine click token issued at most ``max_age`` before ``now`` (None: no limit);
    None for anything else."""
    return _click_payload(_opened(token, _one_shot_mac(key, CLICK)), now, max_age)


def verify_open(token: str, *, key: bytes, now: dt.datetime, max_age: dt.timedelta | None) -> OpenToken | None:
    """The payload of a genuine open token issued at most ``max_age`` before ``now``; None otherwise."""
    return _open_payload(_opened(token, _one_shot_mac(key, OPEN)), now, max_age)


def _keyed_mac(keyed: hmac.HMAC) -> Callable[[bytes], bytes]:
    def mac(body: bytes) -> bytes:
        state = keyed.copy()
        state.update(body)
        return state.digest()[:MAC_BYTES]
    return mac


class Verifier:
    """The ``verify_*`` functions for one key, for a server that verifies every request.

    Each purpose's HMAC has its key and MAC prefix absorbed once; a verification copies that state
    and adds the body, which costs less than keying HMAC afresh (``_mac``) each time. Same answers.
    """

    __slots__ = ("_macs",)

    def __init__(self, key: bytes) -> None:
        check_key(key)
        self._macs = {purpose: _keyed_mac(hmac.new(bytes(key), b"inboxlift-link\x00" + purpose.encode("ascii")
                                                   + b"\x00", hashlib.sha256)) for purpose in PATH_SEGMENTS}

    def unsubscribe(self, token: str) -> UnsubscribeToken | None:
        return _unsubscribe_payload(_opened(token, self._macs[UNSUBSCRIBE]))

    def click(self, token: str, *, now: dt.datetime, max_age: dt.timedelta | None) -> ClickToken | None:
        return _click_payload(_opened(token, self._macs[CLICK]), now, max_age)

    def open(self, token: str, *, now: dt.datetime, max_age: dt.timedelta | None) -> OpenToken | None:
        return _open_payload(_opened(token, self._macs[OPEN]), now, max_age)


def single_values(query: str) -> dict[str, str] | None:
    """A query string (or a form body) as a dict; None when a parameter appears more than once.

    A repeated parameter is ambiguous (servers and frameworks disagree on which one wins), so it is
    refused rather than resolved.
    """
    pairs = parse_qsl(query, keep_blank_values=True)
    values = dict(pairs)
    return values if len(values) == len(pairs) else None


def link_url(base_url: str, purpose: str, token: str) -> str:
    """``<base_url>/<segment>/<token>`` (``.gif`` after an open token); ``base_url`` without a trailing slash."""
    return f"{base_url}/{PATH_SEGMENTS[purpose]}/{token}{OPEN_SUFFIX if purpose == OPEN else ''}"


def link_token(url: str, purpose: str) -> str | None:
    """The token of a ``purpose`` link (``.../u/<token>``, ``.../c/<token>``, ``.../o/<token>.gif``);
    None when the URL is no such link or its query string repeats a parameter.

    Links carry no query string; one appended on the way (a mail gateway's, say) is ignored unless it
    repeats a parameter.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    if parts.query and single_values(parts.query) is None:
        return None
    head, _, last = parts.path.rpartition("/")
    if head.rpartition("/")[2] != PATH_SEGMENTS[purpose]:
        return None
    if purpose == OPEN:
        if not last.endswith(OPEN_SUFFIX):
            return None
        last = last[:-len(OPEN_SUFFIX)]
    return last or None


def verify_unsubscribe_url(url: str, *, key: bytes) -> UnsubscribeToken | None:
    token = link_token(url, UNSUBSCRIBE)
    return verify_unsubscribe(token, key=key) if token else None


def verify_click_url(url: str, *, key: bytes, now: dt.datetime, max_age: dt.timedelta | None) -> ClickToken | None:
    token = link_token(url, CLICK)
    return verify_click(token, key=key, now=now, max_age=max_age) if token else None


def verify_open_url(url: str, *, key: bytes, now: dt.datetime, max_age: dt.timedelta | None) -> OpenToken | None:
    token = link_token(url, OPEN)
    return verify_open(token, key=key, now=now, max_age=max_age) if token else None
