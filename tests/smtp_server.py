"""A real SMTP server on loopback for the delivery tests: ``aiosmtpd`` with a scripted handler.

The script maps a recipient address to what the server does with that recipient's messages, in
order (one action per transaction; the last action repeats):

- ``"250"``: accept (the message is recorded in ``received``);
- ``"421"``, ``"451"``, ``"452"``, ``"450"``: answer that code after the data;
- ``"rcpt550"``: refuse the recipient at RCPT with 550 5.1.1;
- ``"drop"``: close the connection after the data, without a reply;
- ``"slow"``: wait ``slow_seconds`` after the data, then accept;
- ``"hold"``: after the data, wait until ``release`` is set (``held`` counts the waiting ones).

``hold_after=N`` holds every message after the first N accepted; ``hold_quit`` holds QUIT until
``release``. ``open`` counts transactions between MAIL and the reply to their data: the messages in
flight.
"""

from __future__ import annotations

import asyncio
import email
import threading
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import policy
from typing import Iterator

from inboxlift.delivery.sink import LoopbackController


@dataclass
class Received:
    mail_from: str
    rcpt: str
    content: bytes

    @property
    def message_id(self) -> str:
        return email.message_from_bytes(self.content, policy=policy.compat32)["Message-ID"]


@dataclass
class ScriptedHandler:
    script: dict[str, list[str]] = field(default_factory=dict)
    default: str = "250"
    slow_seconds: float = 0.0
    received: list[Received] = field(default_factory=list)
    transactions: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    held: int = 0
    hold_after: int | None = None
    release: threading.Event = field(default_factory=threading.Event)
    holding: threading.Event = field(default_factory=threading.Event)
    hold_quit: bool = False
    quitting: threading.Event = field(default_factory=threading.Event)
    open: int = 0

    def _action(self, rcpt: str) -> str:
        n = self.transactions[rcpt]
        actions = self.script.get(rcpt, [self.default])
        return actions[min(n, len(actions) - 1)]

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        self.open += 1
        return "250 OK"

    async def handle_QUIT(self, server, session, envelope):
        # Only a session that delivered something is held: the driver's relay check (connect,
        # EHLO, QUIT before any task sends) goes through at once.
        if self.hold_quit and getattr(session, "delivered", 0):
            self.quitting.set()
            while not self.release.is_set():
                await asyncio.sleep(0.05)
        return "221 Bye"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self._action(address) == "rcpt550":
            self.transactions[address] += 1
            self.open -= 1
            return "550 5.1.1 <%s>: no such mailbox" % address
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        rcpt = envelope.rcpt_tos[0]
        action = self._action(rcpt)
        self.transactions[rcpt] += 1
        if self.hold_after is not None and len(self.received) >= self.hold_after:
            action = "hold"
        if action != "hold":
            self.open -= 1
        if action in ("421", "450", "451", "452"):
            return {"421": "421 4.7.0 try again later, closing", "450": "450 4.2.1 mailbox busy",
                    "451": "451 4.3.0 local error", "452": "452 4.2.2 mailbox full"}[action]
        if action == "drop":
            server.transport.abort()
            return "250 never seen"
        if action == "slow":
            await asyncio.sleep(self.slow_seconds)
        if action == "hold":
            self.held += 1
            self.holding.set()
            while not self.release.is_set():
                await asyncio.sleep(0.05)
            server.transport.abort()
            return "421 never seen"
        self.received.append(Received(envelope.mail_from, rcpt, envelope.original_content))
        session.delivered = getattr(session, "delivered", 0) + 1
        return "250 2.0.0 queued"


@contextmanager
def smtp_server(handler: ScriptedHandler, **smtp_options) -> Iterator[int]:
    """Run the scripted server on loopback; yields its port."""
    controller = LoopbackController(handler, **smtp_options)
    controller.start()
    try:
        yield controller.port
    finally:
        handler.release.set()
        controller.stop()
