"""Email addresses: validated with the maintained ``email-validator`` package, in their ASCII form.

Plain Python, no Spark: rendering, export and settings use it (a task validates its rows' addresses).
"""

from __future__ import annotations

import functools

from email_validator import EmailNotValidError, validate_email

# Above any valid address (RFC 5321: 64 + 1 + 255 octets) even with an internationalised domain,
# whose Unicode form is shorter than its IDNA form: longer input is refused before parsing.
_MAX_INPUT_CHARS = 320


@functools.lru_cache(maxsize=16384)
def _ascii_address(value: str) -> str | None:
    try:
        # strict: RFC 5321's 64 octets for the local part too, which receiving servers may enforce.
        checked = validate_email(value, check_deliverability=False, allow_smtputf8=False, strict=True)
    except EmailNotValidError:
        return None
    return checked.ascii_email


def ascii_address(value: object) -> str | None:
    """``value`` as an address fit for a ``To:`` header and an SMTP envelope, or None when it is none.

    Syntax only (no DNS): one ``@``, a dot-atom local part of at most 64 characters (no quoting, no
    comments, no display name), a domain with a dot that is no special-use name (``.test``, ``.localhost``...). Control
    characters, spaces, commas, NUL and bidi controls are refused. An internationalised domain is
    IDNA-encoded (``a@bücher.example`` -> ``a@xn--bcher-kva.example``) and the domain lower-cased;
    a non-ASCII local part is refused, since it would need SMTPUTF8 all the way to the mailbox.
    Results are cached per process: a user in several campaigns is checked once per worker.
    """
    if not isinstance(value, str) or not value or len(value) > _MAX_INPUT_CHARS:
        return None
    return _ascii_address(value)
