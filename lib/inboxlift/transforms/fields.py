"""Field checks that protect later stages: ids, e-mail addresses, text that reaches a header or a subject.

- **Ids** (``event_id, user_id, item_id, order_id, session_id, campaign_id, message_id``) must match
  :data:`ID_PATTERN`: 1 to 128 characters, letters and digits of any script, and
  ``_ . : @ / + # = ~ -`` and the space inside; not a number written as a fraction or with an
  exponent, not ``NaN`` or ``Infinity``. So JSON arrays and objects, non-integer JSON numbers,
  and ids holding CR, LF, NUL, other control or format characters are rejected (``bad_id``).
- **E-mail addresses** are checked by ``email-validator`` (syntax only, no DNS): see
  :func:`normalise_email`.
- **Header text** (first names, product names, brands, categories): :func:`strip_unsafe_text`
  removes control characters and bidirectional/format controls; they never carry meaning in a
  name, and in a ``Subject:`` or a display name they split headers or reorder what is shown.
"""

from __future__ import annotations

import pandas as pd
from pyspark.sql import Column
from pyspark.sql import functions as F
from pyspark.sql.types import StringType

ID_COLUMNS = ("event_id", "user_id", "item_id", "order_id", "session_id", "campaign_id", "message_id")
ID_MAX_LENGTH = 128
# Java regular expression (Spark's rlike): one letter, digit or underscore, then up to 127 of
# these or the listed punctuation. A bounded repeat of one character class: no backtracking.
ID_PATTERN = r"^[\p{L}\p{Nd}_][\p{L}\p{Nd}_.:@/+#=~ -]{0,127}$"
# What a JSON number that is not an integer looks like once Spark's JSON reader has turned it into
# text (1e40 -> 1.0E40, 12.5, NaN, Infinity): an id is never one.
_NOT_INTEGER = r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$"
_NON_NUMBERS = ("nan", "infinity", "+infinity", "-infinity", "inf", "+inf", "-inf")

# C0 and C1 controls (LF and TAB become spaces; the others go, CR too, so CRLF is one space), DEL,
# and the bidirectional and format controls that reorder or hide text: LRM/RLM, ALM, LRE..RLO,
# LRI..PDI, the BOM, and the line and paragraph separators that Python's str.splitlines() treats
# as line ends. Zero-width (non-)joiners stay: some scripts and emoji need them.
_SPACED = "\n\t"
_REMOVED = (
    "".join(chr(c) for c in range(0x00, 0x20) if chr(c) not in _SPACED) + "\x7f"
    + "".join(chr(c) for c in range(0x80, 0xA0))
    + "\u200e\u200f\u061c\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029\ufeff"
)
HEADER_TEXT_COLUMNS = ("first_name", "name", "brand", "category_path")


def is_bad_id(text: Column) -> Column:
    """An id (already trimmed, not null) that does not match :data:`ID_PATTERN` or looks like a non-integer number."""
    looks_fractional = text.rlike(_NOT_INTEGER) & ~text.rlike(r"^[+-]?\d+$")
    return ~text.rlike(ID_PATTERN) | looks_fractional | F.lower(text).isin(*_NON_NUMBERS)


def strip_unsafe_text(text: Column) -> Column:
    """``text`` without control and bidi/format characters; LF and TAB become spaces, CR goes.

    ``translate`` maps character by character (no regular expression): the three spaced
    characters map to spaces, every other listed character has no counterpart and is removed.
    """
    return F.translate(text, _SPACED + _REMOVED, " " * len(_SPACED))


@F.pandas_udf(StringType())
def _normalised_emails(addresses: pd.Series) -> pd.Series:
    # Imported on the executor, once per Python worker.
    from email_validator import EmailNotValidError, validate_email

    def normalise(address: object) -> str | None:
        if address is None or (isinstance(address, float) and pd.isna(address)):
            return None
        try:
            checked = validate_email(str(address), check_deliverability=False, allow_smtputf8=False,
                                     allow_quoted_local=False, allow_domain_literal=False,
                                     allow_display_name=False)
        except EmailNotValidError:
            return None
        return (checked.ascii_email or checked.normalized).lower()

    return addresses.map(normalise)


def normalise_email(address: Column) -> Column:
    """The address as stored, or null when ``email-validator`` rejects it.

    Spark has no e-mail address parser (a regular expression cannot follow RFC 5321/5322 and IDNA),
    so this one step runs Python, vectorised over Arrow batches, on the users' addresses only.
    Rules: no display name, quoted local part or IP-literal domain; the domain must be a public
    one (a dot, not ``.test``, ``.invalid``, ``localhost``...); internationalised *domains* are
    accepted and stored in their ASCII (IDNA) form, a non-ASCII *local part* (which needs SMTPUTF8)
    is rejected; the whole address is lower-cased, so one person is one address everywhere.
    """
    return _normalised_emails(address)
