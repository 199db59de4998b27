"""Admission path against a real redis-server: decisions/s and p50/p99 of the
admission call (every check + the reservation, one Lua round trip), beside a
bare Redis round trip (GET) measured in the same run, on the same client.

    .venv/bin/python bench/admission_bench.py [--n 20000] [--concurrency 32] [--per-user]

``--per-user``: the tier also limits each end user (requests/min, tokens/min,
tokens/day), and every call names one of 1,000 end users.

Latency is measured twice: one call at a time (loopback, nothing else in
flight), and under load, each call of the throughput run timed while
``--concurrency`` calls are in flight on one asyncio loop (one core for the
client): the p99 at the rate reported beside it. The target is a p99 at
>= 10,000 decisions/s; the line says whether this machine reached that rate.
Also reports how close to a token quota 100 racing callers land
(bench/admission_race.py; tests/integration/test_quota_race.py asserts it).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.admission_race import quota_race  # noqa: E402
from gateway_shim.admission import Admitter, Estimate  # noqa: E402
from gateway_shim.keystore import KeyRecord, create_key  # noqa: E402
from quotameter.config import Tier  # noqa: E402
from quotameter.embedded.procs import free_port  # noqa: E402
from quotameter.embedded.redis_server import redis_process  # noqa: E402
from quotameter.policy import end_user_digest, resolve  # noqa: E402
from quotameter.redis_keys import RedisKeys  # noqa: E402

PERIOD_END_MS = 4_000_000_000_000
TIER = Tier(
    requests_per_minute=10_000_000,
    tokens_per_minute=10_000_000_000,
    concurrent_requests=1_000_000,
    monthly_tokens=10**15,
    monthly_budget_usd="100000000",
)


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _latency(call, n: int) -> list[float]:  # noqa: ANN001
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        await call(i)
        samples.append((time.perf_counter() - t0) * 1e6)
    return samples


async def _throughput(call, n: int, concurrency: int) -> tuple[float, list[float]]:  # noqa: ANN001
    """Calls/s with ``concurrency`` in flight, and each call's latency (µs) under that load."""
    counter = iter(range(n))
    samples: list[float] = []

    async def worker() -> None:
        for i in counter:
            began = time.perf_counter()
            await call(i)
            samples.append((time.perf_counter() - began) * 1e6)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - t0), samples


PER_USER = {"requests_per_minute": 10_000_000, "tokens_per_minute": 10_000_000_000, "tokens_per_day": 10**15}


async def main(n: int, concurrency: int, per_user: bool) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = redis_process(port, Path(tmp) / "data", Path(tmp) / "redis.log", persist=False).start()
        try:
            proc.wait_port("127.0.0.1", port, timeout_s=20)
            url = f"redis://127.0.0.1:{port}/0"
            names = RedisKeys("bench")
            new = create_key(redis.Redis.from_url(url), names, "bench-customer", "bench")
            key = KeyRecord(new.key_id, "bench-customer", "bench", False)
            client = aioredis.Redis.from_url(url, max_connections=concurrency + 4)
            admitter = Admitter(client, names)
            policy = resolve("bench", Tier.model_validate({**TIER.model_dump(), "per_user": PER_USER}) if per_user else TIER, "mock-small")
            estimate = Estimate(120, 256, 12, "0.4")
            digests = [end_user_digest(f"user-{u}") for u in range(1000)]

            async def admit(i: int) -> None:
                user = policy.end_user(digests[i % 1000]) if per_user else None
                result = await admitter.admit(
                    key, policy, "2030-01", PERIOD_END_MS, f"ev-{i}-{time.perf_counter_ns()}",
                    int(time.time() * 1000), estimate, 60_000, user=user, day=("2030-01-01", PERIOD_END_MS),
                )
                assert result.admitted, result.reason

            async def bare(i: int) -> None:
                await client.get("bench:bare")

            await _latency(admit, 500)  # warm up: script loaded, connections open
            await _latency(bare, 500)
            bare_lat = await _latency(bare, n)
            admit_lat = await _latency(admit, n)
            bare_tput, bare_loaded = await _throughput(bare, n, concurrency)
            admit_tput, admit_loaded = await _throughput(admit, n, concurrency)
            stats = await client.info("commandstats")
            await client.aclose()
            race_client = aioredis.Redis.from_url(url, max_connections=128)
            landing = (await quota_race(race_client, names, key)).summary()
            await race_client.aclose()
        finally:
            proc.stop()
    print(f"admission bench: {n} calls each, loopback redis-server, redis-py {redis.__version__}"
          + (", per-user limits (1,000 end users)" if per_user else ""))
    print(f"{'':28} {'alone: p50 µs':>13} {'p99 µs':>7} | {'calls/s (c=' + str(concurrency) + ')':>17} "
          f"{'p50 µs':>7} {'p99 µs':>7} under that load")
    for name, lat, tput, loaded in (("bare round trip (GET)", bare_lat, bare_tput, bare_loaded),
                                    ("admission (Lua, all checks)", admit_lat, admit_tput, admit_loaded)):
        print(f"{name:28} {_pct(lat, .5):13.0f} {_pct(lat, .99):7.0f} | {tput:17,.0f} "
              f"{_pct(loaded, .5):7.0f} {_pct(loaded, .99):7.0f}")
    print(f"admission p99 under load: {_pct(admit_loaded, .99) / 1000:.2f} ms at {admit_tput:,.0f} decisions/s "
          + ("(>= 10,000/s)" if admit_tput >= 10_000 else "(this machine's client and Redis reach no more: "
             "below the 10,000/s the target is set at)"))
    print(f"admission overhead over a bare round trip: p50 +{_pct(admit_lat, .5) - _pct(bare_lat, .5):.0f} µs, "
          f"p99 +{_pct(admit_lat, .99) - _pct(bare_lat, .99):.0f} µs")
    server = {name: stats.get(f"cmdstat_{name}", {}).get("usec_per_call") for name in ("get", "evalsha")}
    print(f"server-side time per call (INFO commandstats): GET {server['get']} µs, admission script {server['evalsha']} µs"
          f" -> one Redis core could decide ~{1e6 / float(server['evalsha'] or 1):,.0f} admissions/s")
    print(landing)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--per-user", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.n, args.concurrency, args.per_user))
