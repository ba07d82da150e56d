"""Who is asking: the user agent class of a request, and whether an open or click is a machine's.

Rules come from ``serve.*`` (docs/serve.md, "Machine opens and clicks"). Only the class is ever
written: neither the User-Agent header nor the client address reaches an event.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass, field

from inboxlift.settings import ServeSettings

NO_AGENT = "none"
OTHER = "other"
APPLE_PROXY = "apple_proxy"
MAX_AGENT_CHARS = 1024
KNOWN_AGENTS = 4096


@dataclass(frozen=True)
class AgentRules:
    classes: tuple[tuple[str, re.Pattern[str]], ...]
    machine_classes: frozenset[str]
    apple_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    machine_open_after: dt.timedelta
    # A handful of browsers and proxies send most requests: their classes are remembered (bounded).
    _known: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    # ...and a few addresses (the proxy's, Apple's relays): whether each is Apple's, also bounded.
    _known_addresses: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_settings(cls, serve: ServeSettings) -> "AgentRules":
        # One alternation per class: one regex search per class and request.
        classes = tuple((name, re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE))
                        for name, patterns in serve.user_agent_classes.items() if patterns)
        return cls(classes=classes, machine_classes=frozenset(serve.machine_classes),
                   apple_networks=tuple(ipaddress.ip_network(n) for n in serve.apple_proxy_networks),
                   machine_open_after=dt.timedelta(seconds=serve.machine_open_seconds))

    def classify(self, user_agent: str | None, client_ip: str | None) -> str:
        """The request's class: ``apple_proxy`` for Apple's networks, else the first class whose
        pattern is found in the user agent; ``none`` without one, ``other`` when nothing matches."""
        if client_ip and self._is_apple(client_ip):
            return APPLE_PROXY
        return self._by_agent(user_agent or "")

    def is_machine(self, ua_class: str) -> bool:
        return ua_class in self.machine_classes

    def is_machine_open(self, ua_class: str, *, issued_at: dt.datetime, opened_at: dt.datetime) -> bool:
        """A machine's class, or so soon after the token was issued that no person read it."""
        return self.is_machine(ua_class) or opened_at - issued_at <= self.machine_open_after

    def _is_apple(self, client_ip: str) -> bool:
        known = self._known_addresses.get(client_ip)
        if known is not None:
            return known
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            found = False
        else:
            found = any(address in network for network in self.apple_networks)
        if len(self._known_addresses) >= KNOWN_AGENTS:
            self._known_addresses.clear()
        self._known_addresses[client_ip] = found
        return found

    def _by_agent(self, user_agent: str) -> str:
        # Real user agents are a few hundred characters; a longer header is not searched in full.
        user_agent = user_agent[:MAX_AGENT_CHARS]
        known = self._known.get(user_agent)
        if known is not None:
            return known
        if not user_agent.strip():
            found = NO_AGENT
        else:
            found = next((name for name, pattern in self.classes if pattern.search(user_agent)), OTHER)
        if len(self._known) >= KNOWN_AGENTS:
            self._known.clear()
        self._known[user_agent] = found
        return found
