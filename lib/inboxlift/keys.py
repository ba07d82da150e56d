"""The key that signs unsubscribe, click and open links (:mod:`inboxlift.tokens`).

Render signs with it and the tracking service verifies with it; no Spark here, so the service
starts without loading it.
"""

from __future__ import annotations

from typing import Any, Mapping

from inboxlift.settings import Settings, SettingsError, resolve_secret
from inboxlift.tokens import MIN_KEY_BYTES

# A key everybody can read in this file: links signed with it are forgeable, so it is used only in
# the embedded local mode (env "local") when the secret's environment variable is unset, and the
# render summary says so. Any other environment without the secret is an error.
DEV_SIGNING_KEY = b"inboxlift-DEVELOPMENT-ONLY-signing-key-not-secret"


def signing_key(settings: Settings, *, environ: Mapping[str, str], dbutils: Any = None) -> tuple[bytes, bool]:
    """``(key, is_development_key)`` from the secret ``secrets.signing_key`` (its UTF-8 bytes).

    Raises:
        SettingsError: the secret is not available and this is not a local run, or it is shorter
            than :data:`~inboxlift.tokens.MIN_KEY_BYTES` bytes (in every environment: a short key
            can be guessed, and then anyone can unsubscribe anyone).
    """
    reference = settings.secrets.signing_key
    try:
        key = resolve_secret(reference, environ=environ, dbutils=dbutils).encode("utf-8")
    except SettingsError:
        kind, _, name = reference.partition(":")
        if settings.env == "local" and kind == "env" and not environ.get(name):
            return DEV_SIGNING_KEY, True
        raise
    if len(key) < MIN_KEY_BYTES:
        # The length only: an error message must never show the key.
        raise SettingsError(
            f"secret {reference!r} (secrets.signing_key) is {len(key)} bytes; a signing key must be at least "
            f"{MIN_KEY_BYTES} bytes of random data, e.g. the output of "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return key, False
