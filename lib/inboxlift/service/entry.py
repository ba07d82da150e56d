"""Running the service under uvicorn: the process boundary where settings, key and clock are built.

``inboxlift serve`` calls :func:`serve`. Any other ASGI host (a process manager, a Databricks App)
can run the factory directly::

    uvicorn --factory inboxlift.service.entry:app_from_environment --host 127.0.0.1 --port 8080

which reads what the command line reads: ``INBOXLIFT_ENV``, ``INBOXLIFT_CONF_DIR``, the
``INBOXLIFT__SECTION__KEY`` overrides and the signing key's secret.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

from starlette.applications import Starlette

from inboxlift.clock import SystemClock
from inboxlift.keys import signing_key
from inboxlift.service.app import build_app, events_dir
from inboxlift.settings import Settings, default_conf_dir, load_settings

log = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The command line's --set overrides, handed to worker processes (which start afresh) as JSON.
OVERRIDES_VARIABLE = "INBOXLIFT_SERVE_OVERRIDES"


def create_app(settings: Settings, *, environ: Mapping[str, str]) -> Starlette:
    """The app with the signing key from ``secrets.signing_key`` and the system clock."""
    key, is_development_key = signing_key(settings, environ=environ)
    if is_development_key:
        log.warning("links are verified with the public DEVELOPMENT key (local env, %s unset): anyone can forge "
                    "them; set the signing key before serving real mail", settings.secrets.signing_key)
    return build_app(settings=settings, key=key, clock=SystemClock())


def app_from_environment() -> Starlette:
    """uvicorn's factory: settings as ``inboxlift`` loads them, from this process's environment."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    environ = os.environ
    overrides = json.loads(environ.get(OVERRIDES_VARIABLE) or "{}")
    settings = load_settings(environ.get("INBOXLIFT_ENV", "local"), conf_dir=default_conf_dir(environ),
                             overrides=overrides, environ=environ)
    return create_app(settings, environ=environ)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """How uvicorn runs the service: behind a proxy, with no access log (URLs hold tokens, and
    addresses are personal data) and no Server header."""
    return {
        "proxy_headers": True,
        "forwarded_allow_ips": settings.serve.forwarded_allow_ips,
        "access_log": False,
        "server_header": False,
        "timeout_graceful_shutdown": 10,
        "log_level": "info",
    }


def serve(settings: Settings, *, environ: Mapping[str, str], env: str, conf_dir: str,
          overrides: Mapping[str, Any]) -> None:
    """Run the service until interrupted, with ``serve.workers`` processes on ``serve.host:serve.port``.

    One worker runs in this process; several are started by uvicorn from the factory, so the
    settings travel to them as the environment this process was given plus ``overrides``.
    """
    import uvicorn

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    serve_settings = settings.serve
    log.info("serving on %s:%d with %d worker(s); events go to %s", serve_settings.host, serve_settings.port,
             serve_settings.workers, events_dir(settings))
    options = {**uvicorn_options(settings), "host": serve_settings.host, "port": serve_settings.port}
    if serve_settings.workers == 1:
        uvicorn.run(create_app(settings, environ=environ), **options)
        return
    # Worker processes inherit os.environ; this is the command line's own process.
    os.environ.update({"INBOXLIFT_ENV": env, "INBOXLIFT_CONF_DIR": conf_dir,
                       OVERRIDES_VARIABLE: json.dumps(dict(overrides))})
    uvicorn.run("inboxlift.service.entry:app_from_environment", factory=True, workers=serve_settings.workers,
                **options)
