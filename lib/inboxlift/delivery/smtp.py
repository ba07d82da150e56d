"""One SMTP connection to the relay (``smtplib``): STARTTLS or implicit TLS, AUTH, one transaction
at a time, and where in the transaction a failure happened.

Where matters for exactly-once: until the relay has said 354 and the content is on its way, a lost
connection or a timeout cannot have delivered the message (try again); once the content's final
``.`` was handed to the socket, the relay may have accepted it even if its reply never arrives
(``may_have_delivered``: the message is ``unknown``, never sent again by itself).
"""

from __future__ import annotations

import re
import smtplib
import ssl
from dataclasses import dataclass, field
from typing import Callable

from inboxlift.settings import DeliverySettings

MAIL, RCPT, DATA, CONTENT, REPLY = "mail", "rcpt", "data", "content", "reply"
_LEADING_DOT = re.compile(rb"(?m)^\.")


class RelayError(RuntimeError):
    """The relay cannot be used as configured: unreachable, no TLS, AUTH refused."""


@dataclass(frozen=True)
class RelayConfig:
    """Where and how to connect; small and picklable (it travels to every task)."""

    host: str
    port: int
    security: str = "starttls"          # starttls | tls | none
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_ca_file: str | None = None
    helo_name: str | None = None
    connect_timeout: float = 30.0
    command_timeout: float = 120.0

    @property
    def name(self) -> str:
        """``host:port``, the ``relay`` column of ``deliveries``."""
        return f"{self.host}:{self.port}"

    @classmethod
    def from_settings(cls, settings: DeliverySettings, *, password: str | None, host: str | None = None,
                      port: int | None = None, security: str | None = None) -> "RelayConfig":
        return cls(host=host or settings.relay_host, port=port or settings.relay_port,
                   security=security or settings.security, username=settings.username, password=password,
                   tls_ca_file=settings.tls_ca_file, helo_name=settings.helo_name,
                   connect_timeout=settings.connect_timeout_seconds,
                   command_timeout=settings.command_timeout_seconds)

    def tls_context(self) -> ssl.SSLContext:
        # Certificates and host names are always verified: a relay with a certificate this machine
        # does not trust needs its CA in delivery.tls_ca_file, never an unverified connection.
        return ssl.create_default_context(cafile=self.tls_ca_file)


@dataclass(frozen=True)
class Reply:
    """The outcome of one transaction: the relay's code and text (``code`` None: no reply, the
    connection failed), the phase it ended in, and whether the relay may hold the message."""

    code: int | None
    text: str
    phase: str
    may_have_delivered: bool = False


def _text(message: bytes | str) -> str:
    raw = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
    return " ".join(raw.split())[:500]


def wire_data(message: bytes) -> bytes:
    """The DATA payload: leading dots doubled (RFC 5321 4.5.2), a final CRLF, then ``.`` CRLF."""
    # Most messages have no line starting with a dot: a substring search is far cheaper than the
    # regex's scan of every line, and the message is then copied once, with its terminator.
    payload = _LEADING_DOT.sub(b"..", message) if message[:1] == b"." or b"\n." in message else message
    return payload + (b".\r\n" if payload.endswith(b"\r\n") else b"\r\n.\r\n")


class RelayConnection:
    """A connection opened on first use and re-opened after it is lost."""

    def __init__(self, relay: RelayConfig) -> None:
        self.relay = relay
        self._smtp: smtplib.SMTP | None = None
        self.opened = 0

    def open(self) -> None:
        """Connect, EHLO, STARTTLS (required when configured), AUTH (when a user is set).

        Raises:
            RelayError: the relay cannot be reached or refuses TLS or the credentials.
        """
        self.close()
        relay = self.relay
        try:
            if relay.security == "tls":
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(relay.host, relay.port, local_hostname=relay.helo_name,
                                                      timeout=relay.connect_timeout, context=relay.tls_context())
            else:
                smtp = smtplib.SMTP(relay.host, relay.port, local_hostname=relay.helo_name,
                                    timeout=relay.connect_timeout)
        except (OSError, smtplib.SMTPException) as exc:
            raise RelayError(f"cannot connect to the relay {relay.name}: {type(exc).__name__}: {exc}") from exc
        try:
            smtp.ehlo()
            if relay.security == "starttls":
                if not smtp.has_extn("starttls"):
                    raise RelayError(f"the relay {relay.name} does not offer STARTTLS (delivery.security is "
                                     "starttls: nothing is sent in clear)")
                code, message = smtp.starttls(context=relay.tls_context())
                if code != 220:
                    raise RelayError(f"the relay {relay.name} refused STARTTLS: {code} {_text(message)}")
                smtp.ehlo()
            if relay.username:
                if relay.password is None:
                    raise RelayError("delivery.username is set but no password was given (secrets.smtp_password)")
                smtp.login(relay.username, relay.password)
            if smtp.sock is not None:
                smtp.sock.settimeout(relay.command_timeout)
        except RelayError:
            _quietly_close(smtp)
            raise
        except smtplib.SMTPAuthenticationError as exc:
            _quietly_close(smtp)
            raise RelayError(f"the relay {relay.name} refused AUTH for {relay.username!r}: "
                             f"{exc.smtp_code} {_text(exc.smtp_error)}") from exc
        except smtplib.SMTPNotSupportedError as exc:
            _quietly_close(smtp)
            raise RelayError(f"the relay {relay.name} does not support AUTH: {exc}") from exc
        except (OSError, ssl.SSLError, smtplib.SMTPException) as exc:
            _quietly_close(smtp)
            raise RelayError(f"the relay {relay.name} failed during EHLO/STARTTLS/AUTH: "
                             f"{type(exc).__name__}: {exc}") from exc
        self._smtp = smtp
        self.opened += 1

    @property
    def is_open(self) -> bool:
        return self._smtp is not None

    def send(self, sender: str, recipient: str, message: bytes, *, before_content: Callable[[], None]) -> Reply:
        """One transaction: MAIL, RCPT, DATA, the content. ``before_content`` runs after the relay's
        354, just before the content goes out (the journal's ``start`` line).

        A failed MAIL, RCPT or DATA is followed by RSET so the connection can carry the next
        message; a lost connection or a 421 closes it (the next :meth:`send` needs :meth:`open`)."""
        smtp = self._smtp
        if smtp is None:
            raise RelayError("send() on a closed connection")
        phase = MAIL
        try:
            for phase, step in ((MAIL, lambda: smtp.mail(sender)), (RCPT, lambda: smtp.rcpt(recipient)),
                                (DATA, lambda: smtp.docmd("data"))):
                code, text = step()
                if code not in (250, 251, 354):
                    self._after_refusal(code)
                    return Reply(code, _text(text), phase)
            before_content()
            phase = CONTENT
            smtp.send(wire_data(message))
            # The final "." is out: from here the relay may hold the message whatever happens.
            phase = REPLY
            code, text = smtp.getreply()
        except (OSError, smtplib.SMTPException) as exc:
            self.close()
            return Reply(None, _text(f"{type(exc).__name__}: {exc}"), phase, may_have_delivered=phase == REPLY)
        if code == 421:
            self.close()
        return Reply(code, _text(text), REPLY, may_have_delivered=code == 250)

    def _after_refusal(self, code: int) -> None:
        if code == 421:
            self.close()
            return
        try:
            self._smtp.rset()  # type: ignore[union-attr]
        except (OSError, smtplib.SMTPException):
            self.close()

    def close(self) -> None:
        if self._smtp is not None:
            smtp, self._smtp = self._smtp, None
            try:
                smtp.quit()
            except (OSError, smtplib.SMTPException):
                _quietly_close(smtp)


def _quietly_close(smtp: smtplib.SMTP) -> None:
    try:
        smtp.close()
    except OSError:
        pass


def check_relay(relay: RelayConfig) -> None:
    """Connect, STARTTLS/TLS, AUTH and QUIT once, from the driver, before any task sends: a relay
    that refuses TLS or the credentials is a clear error, and no message is touched.

    Raises:
        RelayError: with what the relay said.
    """
    connection = RelayConnection(relay)
    connection.open()
    connection.close()

