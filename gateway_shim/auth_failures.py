"""Failed authentications per client address: key guessing gets 429.

A client address may present ``shim.auth_failures_per_minute`` wrong API
keys, ingest or admin tokens a minute (the proxy, /v1/check, /v1/events and
/v1/usage share one count); past that, every request from it is refused with
``TooManyAuthFailures`` before any key is looked at, so a guess that happens
to be right is refused too and the answer tells nothing. One failure's worth
of time later (60 s / N) it may try again: a GCRA over failures, one
timestamp per address.

In-process: each shim counts for itself (N shims behind a balancer let N
times as many guesses through). Memory is bounded: at most
``shim.auth_failures_max_clients`` addresses, the least recently failing
forgotten first; an address that never fails is never stored. IPv6 clients
count per /64, the block a single host usually holds.

The client address is the connection's, or, when the connection comes from
one of ``shim.trusted_proxies``, the last address of X-Forwarded-For (what
that proxy appended: the address it saw). Nothing else is believed, so a
client cannot pick its own address. Envoy's ext_proc stream comes from Envoy
itself, which appends the address it saw (deploy/envoy/ext_proc.yaml sets
``use_remote_address``): there the last X-Forwarded-For entry is the client.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway_shim.errors import TooManyAuthFailures
from quotameter.config import Shim

WINDOW_S = 60.0


class AuthFailures:
    def __init__(
        self, per_minute: int, max_clients: int, trusted_proxies: list[str], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_minute = per_minute
        self._interval_s = WINDOW_S / per_minute if per_minute else 0.0
        self._max_clients = max_clients
        self._trusted = [ipaddress.ip_network(entry, strict=False) for entry in trusted_proxies]
        self._clock = clock
        self._tat: OrderedDict[str, float] = OrderedDict()  # client -> when its failures will have aged out
        self.refused = 0

    @classmethod
    def from_config(cls, shim: Shim) -> AuthFailures:
        return cls(shim.auth_failures_per_minute, shim.auth_failures_max_clients, shim.trusted_proxies)

    def client_of(self, request: Any) -> str:
        """The client address of an aiohttp request (see the module doc)."""
        peer = request.remote or ""
        if self._trusted:
            forwarded = request.headers.get("X-Forwarded-For")
            if forwarded and self._is_trusted(peer):
                last = forwarded.rsplit(",", 1)[-1].strip()
                try:
                    return str(ipaddress.ip_address(last))
                except ValueError:
                    pass  # not an address: the peer's own stands
        return peer

    @staticmethod
    def last_forwarded(forwarded: str | None) -> str | None:
        """The last address of an X-Forwarded-For value (what the proxy appended), or None."""
        if not forwarded:
            return None
        try:
            return str(ipaddress.ip_address(forwarded.rsplit(",", 1)[-1].strip()))
        except ValueError:
            return None

    def _is_trusted(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    @staticmethod
    def _key(client: str) -> str:
        if ":" not in client:
            return client
        try:
            return str(ipaddress.ip_network(f"{client}/64", strict=False))
        except ValueError:
            return client

    def check(self, client: str | None) -> None:
        """Raise TooManyAuthFailures while ``client`` is over its limit."""
        if not self._tat or client is None or not self.per_minute:
            return
        tat = self._tat.get(self._key(client))
        if tat is None:
            return
        wait_s = tat - self._clock() - (WINDOW_S - self._interval_s)
        if wait_s > 0:
            self.refused += 1
            raise TooManyAuthFailures(wait_s)

    def failed(self, client: str | None) -> None:
        """Count one wrong key or token presented by ``client``."""
        if client is None or not self.per_minute:
            return
        key, now = self._key(client), self._clock()
        tat = max(self._tat.pop(key, now), now) + self._interval_s
        self._tat[key] = tat  # now the most recent
        while len(self._tat) > self._max_clients:
            self._tat.popitem(last=False)

    def __len__(self) -> int:
        return len(self._tat)


_SHARED = web.AppKey("auth_failures", AuthFailures)


def shared(app: web.Application, shim: Shim) -> AuthFailures:
    """The one limiter of this shim's app; the first caller (at build time) makes it."""
    found = app.get(_SHARED)
    if found is None:
        found = app[_SHARED] = AuthFailures.from_config(shim)
    return found
