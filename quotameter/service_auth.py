"""The admin token of the internal endpoints that read or change data: the
worker's HTTP views, the built-in dashboard and ``quotameter ledger-server``
(``services.admin_token``).

Each server holds a ``TokenGate``; each caller sends ``gate.headers()``. The
token is accepted as ``Authorization: Bearer``, as the password of HTTP
Basic auth (what a browser prompts for, and what clickhouse-connect sends
with ``services.history_url``'s user and password) or as ClickHouse's
``X-ClickHouse-Key``; always compared in constant time. Without a token a
server answers anyone, so it may only listen on loopback (``require_token_off_loopback``).
No I/O here.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from collections.abc import Mapping

from pydantic import SecretStr

from quotameter.errors import ConfigError

SETTING = "services.admin_token"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is reachable from this machine only.
    A name other than ``localhost`` counts as reachable: it may resolve anywhere."""
    host = host.strip().strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def require_token_off_loopback(host: str, gate: TokenGate, what: str) -> None:
    """Refuse to serve ``what`` on a non-loopback ``host`` without a token: it
    would hand the ledger to whoever reaches the port."""
    if not gate.enabled and not is_loopback(host):
        raise ConfigError(
            f"{what} would listen on {host or 'every address'}, reachable from other machines, without "
            f"authentication: set {SETTING} (or QUOTAMETER_SERVICES__ADMIN_TOKEN, or services.admin_token_file), "
            f"or listen on 127.0.0.1"
        )


def presented_tokens(headers: Mapping[str, str]) -> list[str]:
    """Every token a request presents: Bearer, Basic's password, X-ClickHouse-Key."""
    found: list[str] = []
    scheme, _, value = (headers.get("Authorization") or "").strip().partition(" ")
    value = value.strip()
    if value and scheme.lower() == "bearer":
        found.append(value)
    elif value and scheme.lower() == "basic":
        try:
            found.append(base64.b64decode(value, validate=True).decode("utf-8").partition(":")[2])
        except (binascii.Error, UnicodeDecodeError):
            pass
    key = headers.get("X-ClickHouse-Key")
    if key:
        found.append(key)
    return found


class TokenGate:
    """``services.admin_token`` on the serving side and the calling side."""

    def __init__(self, token: SecretStr | None) -> None:
        value = token.get_secret_value() if token is not None else ""
        self._token = value.encode("utf-8") if value else None

    @classmethod
    def from_services(cls, services: object) -> TokenGate:
        return cls(getattr(services, "admin_token", None))

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def allows(self, headers: Mapping[str, str]) -> bool:
        """True without a token; else whether the request presents it."""
        if self._token is None:
            return True
        # Every presented value is compared, so timing says nothing of which matched.
        matched = False
        for token in presented_tokens(headers):
            matched |= hmac.compare_digest(token.encode("utf-8", "surrogateescape"), self._token)
        return matched

    def headers(self) -> dict[str, str]:
        """What a caller sends: the token as a Bearer, or nothing when none is set."""
        return {"Authorization": f"Bearer {self._token.decode()}"} if self._token is not None else {}

    def __repr__(self) -> str:  # never the token
        return f"TokenGate(enabled={self.enabled})"
