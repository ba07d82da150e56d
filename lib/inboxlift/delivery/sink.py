"""The embedded relay of the local mode: an ``aiosmtpd`` server on loopback that keeps every message.

``inboxlift run send`` and ``run-all`` start it when ``delivery.relay_host`` is ``embedded`` (the
default of ``conf/local.yml``): it listens on 127.0.0.1 on a free port the system picks, stores each
message it accepts in a Maildir (``paths.output_dir/sent``; any mail client or Python's ``mailbox``
reads it), and stops when the stage ends. It is a sink, not a relay: nothing leaves the machine.
"""

from __future__ import annotations

import mailbox
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from aiosmtpd.controller import Controller

from inboxlift.delivery.smtp import RelayConfig

LOOPBACK = "127.0.0.1"


class MaildirHandler:
    """Stores each message's bytes as received, after ``Return-Path`` and ``Delivered-To`` lines
    (what a mail delivery agent adds), in a Maildir's ``new/`` folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        # ``mailbox.Maildir(create=True)`` makes tmp/new/cur only when the folder itself is new: an
        # existing (e.g. empty) folder would refuse every message, so the three are made here.
        for sub in ("tmp", "new", "cur"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.maildir = mailbox.Maildir(str(self.folder), create=False)
        self.accepted = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        trace = (f"Return-Path: <{envelope.mail_from}>\r\n"
                 + "".join(f"Delivered-To: {rcpt}\r\n" for rcpt in envelope.rcpt_tos)).encode("ascii", "replace")
        self.maildir.add(trace + envelope.original_content)
        self.accepted += 1
        return "250 2.0.0 stored"


class LoopbackController(Controller):
    """aiosmtpd's threaded controller on a port the system picks (``port=0``); ``port`` is the real
    one once :meth:`start` returns."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        # A fixed server name: no DNS look-up of this machine's name.
        super().__init__(handler, hostname=LOOPBACK, port=0, server_hostname="localhost", **kwargs)

    def _trigger_server(self) -> None:
        # The server is bound by now: read its port before the readiness check connects to it.
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


@contextmanager
def embedded_relay(folder: str | Path) -> Iterator[tuple[RelayConfig, MaildirHandler]]:
    """Run the Maildir sink for the duration of the block; yields the relay to send to and the handler."""
    handler = MaildirHandler(folder)
    controller = LoopbackController(handler)
    controller.start()
    try:
        yield RelayConfig(host=LOOPBACK, port=controller.port, security="none", helo_name="localhost"), handler
    finally:
        controller.stop()
