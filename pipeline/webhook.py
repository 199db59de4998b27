"""Signed webhook delivery with bounded retries.

Every POST carries

    Content-Type:          application/json
    Idempotency-Key:       the alert id (the same on every attempt and worker)
    Quotameter-Signature:  t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + raw body)>

The timestamp is signed with the body (as Stripe does), so a receiver that
checks ``verify_signature`` with a tolerance rejects a replayed request; each
attempt is signed afresh. 5xx, 408, 429, timeouts and connection errors are
retried with exponential backoff and jitter, up to ``max_attempts`` in all;
any other answer ends the delivery (2xx delivered, 4xx rejected).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from pipeline import telemetry

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Quotameter-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
DEFAULT_TOLERANCE_S = 300
RETRY_STATUSES = frozenset({408, 429})


def sign(secret: bytes, body: bytes, timestamp_s: int) -> str:
    mac = hmac.new(secret, f"{timestamp_s}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp_s},v1={mac}"


def verify_signature(
    secret: bytes, body: bytes, header: str, now_s: float, tolerance_s: float = DEFAULT_TOLERANCE_S
) -> bool:
    """What a receiver checks: some v1 signature matches the raw body and its
    timestamp is within ``tolerance_s`` of ``now_s``."""
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            signatures.append(value)
    if timestamp is None or not signatures or abs(now_s - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, candidate) for candidate in signatures)


def backoff_s(attempt: int, initial_s: float, max_s: float, rand: Callable[[], float] = random.random) -> float:
    """The wait after failed attempt ``attempt`` (1-based): "equal jitter", half
    of the exponential step fixed and half random, so waits still grow."""
    step = min(max_s, initial_s * 2 ** (attempt - 1))
    return step / 2 + rand() * step / 2


@dataclass(frozen=True, slots=True)
class Delivery:
    delivered: bool
    attempts: int
    status: int | None  # the last HTTP status, None when no answer came
    error: str = ""


class WebhookSender:
    """POSTs signed bodies to one URL. One aiohttp session, opened lazily in
    the running loop; ``close()`` ends it."""

    def __init__(
        self,
        url: str,
        secret: bytes,
        *,
        timeout_s: float = 5.0,
        max_attempts: int = 6,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        clock_s: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.url = url
        self._secret = secret
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._clock_s = clock_s
        self._sleep = sleep
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self._session

    async def deliver(self, body: bytes, idempotency_key: str) -> Delivery:
        status: int | None = None
        error = ""
        for attempt in range(1, self.max_attempts + 1):
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "quotameter-alerts/1",
                IDEMPOTENCY_HEADER: idempotency_key,
                SIGNATURE_HEADER: sign(self._secret, body, int(self._clock_s())),
            }
            try:
                async with self._client().post(self.url, data=body, headers=headers) as response:
                    status = response.status
                    await response.read()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                status, error = None, f"{type(exc).__name__}: {exc}".rstrip(": ")
            else:
                if 200 <= status < 300:
                    telemetry.webhook_delivery("delivered")
                    return Delivery(True, attempt, status)
                error = f"HTTP {status}"
                if status < 500 and status not in RETRY_STATUSES:
                    log.warning("webhook %s rejected %s with %s; not retrying", self.url, idempotency_key, error)
                    telemetry.webhook_delivery("failed")
                    return Delivery(False, attempt, status, error)
            if attempt < self.max_attempts:
                telemetry.webhook_delivery("retried")
                wait_s = backoff_s(attempt, self.backoff_initial_s, self.backoff_max_s)
                log.info("webhook %s attempt %d for %s failed (%s); retrying in %.2fs",
                         self.url, attempt, idempotency_key, error, wait_s)
                await self._sleep(wait_s)
        log.error("webhook %s gave up on %s after %d attempts: %s", self.url, idempotency_key, self.max_attempts, error)
        telemetry.webhook_delivery("failed")
        return Delivery(False, self.max_attempts, status, error)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
