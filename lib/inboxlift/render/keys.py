"""The key that signs unsubscribe and click links."""

from __future__ import annotations

from typing import Any, Mapping

from inboxlift.settings import Settings, SettingsError, resolve_secret

# A key everybody can read in this file: links signed with it are forgeable, so it is used only in
# the embedded local mode (env "local") when the secret's environment variable is unset, and the
# render summary says so. Any other environment without the secret is an error.
DEV_SIGNING_KEY = b"inboxlift-DEVELOPMENT-ONLY-signing-key-not-secret"


def signing_key(settings: Settings, *, environ: Mapping[str, str], dbutils: Any = None) -> tuple[bytes, bool]:
    """``(key, is_development_key)`` from the secret ``secrets.signing_key``.

    Raises:
        SettingsError: the secret is not available and this is not a local run.
    """
    reference = settings.secrets.signing_key
    try:
        return resolve_secret(reference, environ=environ, dbutils=dbutils).encode("utf-8"), False
    except SettingsError:
        kind, _, name = reference.partition(":")
        if settings.env == "local" and kind == "env" and not environ.get(name):
            return DEV_SIGNING_KEY, True
        raise
