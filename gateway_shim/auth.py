"""Bearer-key authentication with a short in-process cache.

A cache hit saves the HGETALL and the hash check, so an admitted request
costs one Redis round trip (the admission script). The cache never decides
revocation: the admission script reads the key's ``revoked`` flag on every
request, and a revoked key is dropped from here on the spot. What a cached
record can hold stale for up to ``ttl_s`` is the key's tier.

Concurrent misses of one key share one lookup: a burst on a key not cached
yet costs one HGETALL, not one per request.

A presented key that is wrong counts against the client's address
(``auth_failures``); an address over its limit is refused before any lookup.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import redis.asyncio as aioredis

from gateway_shim.auth_failures import AuthFailures
from gateway_shim.errors import InvalidApiKey
from gateway_shim.keystore import KeyRecord, authenticate
from quotameter.redis_keys import RedisKeys

_MISSING = ("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'"
            " (or as 'x-api-key: YOUR_KEY' to /v1/messages).")
_INVALID = "Incorrect API key provided. Create one with 'quotameter keys create'."


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Authenticator:
    def __init__(
        self, client: aioredis.Redis, names: RedisKeys, ttl_s: float = 30.0, max_entries: int = 10_000,
        failures: AuthFailures | None = None,
    ):
        self._client = client
        self.failures = failures if failures is not None else AuthFailures(0, 1, [])
        self._names = names
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        # Keyed by a digest of the presented key: the plaintext is not kept.
        self._cache: dict[bytes, tuple[KeyRecord, float]] = {}
        self._lookups: dict[bytes, asyncio.Future[KeyRecord | None]] = {}

    def client_of(self, request: object) -> str:
        """The address failures are counted against (``AuthFailures.client_of``)."""
        return self.failures.client_of(request)

    async def authenticate(self, authorization: str | None, client: str | None = None) -> KeyRecord:
        """The key's record, or InvalidApiKey; TooManyAuthFailures while ``client``
        (its address, None: not counted) is over its limit."""
        self.failures.check(client)
        token = bearer_token(authorization)
        if token is None:
            raise InvalidApiKey(_MISSING)
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached and cached[1] > now:
            return cached[0]
        lookup = self._lookups.get(digest)
        if lookup is None:
            lookup = self._lookups[digest] = asyncio.ensure_future(authenticate(self._client, self._names, token))
            lookup.add_done_callback(lambda done: self._looked_up(digest, done))
        # Shielded: a client that goes away does not cancel the others' lookup.
        record = await asyncio.shield(lookup)
        if record is None:
            self._cache.pop(digest, None)
            self.failures.failed(client)
            raise InvalidApiKey(_INVALID)
        if len(self._cache) >= self._max_entries:
            self._cache.clear()  # crude, bounded; a busy shim refills it in one TTL
        self._cache[digest] = (record, now + self._ttl_s)
        return record

    def _looked_up(self, digest: bytes, lookup: asyncio.Future[KeyRecord | None]) -> None:
        if self._lookups.get(digest) is lookup:
            del self._lookups[digest]
        if not lookup.cancelled():
            lookup.exception()  # seen, even when every waiter went away

    def forget(self, key_id: str) -> None:
        """Drop a key (it was found revoked)."""
        for digest in [d for d, (record, _) in self._cache.items() if record.key_id == key_id]:
            del self._cache[digest]

    @staticmethod
    def invalid() -> InvalidApiKey:
        return InvalidApiKey(_INVALID)
