"""``services.redis_url`` taken apart: which topology, which nodes (no I/O).

    redis://  rediss://  unix://                       one Redis or Valkey
    redis+cluster://[user:pass@]h:p[,h:p…][/]           Redis Cluster (startup nodes)
    redis+sentinel://[user:pass@]h:p[,h:p…]/<master>[/db]   Sentinel

with ``rediss+cluster`` / ``rediss+sentinel`` for TLS. The clients are built
from it in quotameter/redis_pool.py; config validation calls it so a
malformed URL is reported by ``check-config``, not at the first request.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote


@dataclass(frozen=True, slots=True)
class RedisTopology:
    """``services.redis_url`` taken apart: ``kind`` "single", "cluster" or "sentinel"."""

    kind: str
    tls: bool
    nodes: tuple[tuple[str, int], ...] = ()  # cluster startup nodes, or the sentinels
    username: str | None = None
    password: str | None = None
    master: str = ""  # Sentinel: the monitored master's name
    db: int = 0


def topology(url: str) -> RedisTopology:
    """Parse ``url``; ValueError with what is wrong for a malformed cluster or sentinel URL."""
    scheme, sep, rest = url.partition("://")
    base, _, kind = scheme.partition("+")
    if not sep or base not in ("redis", "rediss", "unix") or kind not in ("", "cluster", "sentinel"):
        raise ValueError(f"unknown Redis URL scheme {scheme!r}: use redis, rediss, redis+cluster or redis+sentinel")
    if not kind:
        return RedisTopology("single", base == "rediss")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(secret) if colon else None)
    nodes = tuple(_host_port(part, 26379 if kind == "sentinel" else 6379) for part in hosts.split(",") if part)
    if not nodes:
        raise ValueError(f"a {scheme}:// URL names no host")
    parts = [p for p in path.split("?")[0].split("/") if p]
    if kind == "cluster":
        if parts:
            raise ValueError("a Redis Cluster has no databases: end the redis+cluster:// URL after its hosts")
        return RedisTopology("cluster", base == "rediss", nodes, username, password)
    if not parts or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError("a redis+sentinel:// URL ends with /<master name>, then optionally /<db>")
    return RedisTopology("sentinel", base == "rediss", nodes, username, password, unquote(parts[0]),
                         int(parts[1]) if len(parts) == 2 else 0)


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, _, port = text[1:].partition("]")
        return host, int(port.lstrip(":") or default_port)
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    return host, int(port or default_port)
