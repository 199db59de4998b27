"""Admission on one Redis beside a three-primary Redis Cluster: calls/s with
``--concurrency`` in flight and the p50 / p99 of one call at a time, for the
shim's pipelined script path (one connection per primary on the cluster) and
for redis-py's cluster client (what a per-node pipe saves).

    .venv/bin/python bench/cluster_admission_bench.py [--n 5000] [--concurrency 32] [--customers 30]

Calls rotate over ``--customers`` customers, so on the cluster they spread
over the primaries. Prints figures; not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402

from bench.admission_bench import TIER, PERIOD_END_MS, _latency, _pct, _throughput  # noqa: E402
from gateway_shim.admission import Admitter, Estimate  # noqa: E402
from gateway_shim.cluster_pipe import script_pipe  # noqa: E402
from gateway_shim.keystore import KeyRecord, create_key  # noqa: E402
from quotameter.config import Services  # noqa: E402
from quotameter.embedded.procs import free_port  # noqa: E402
from quotameter.embedded.redis_server import redis_process  # noqa: E402
from quotameter.policy import resolve  # noqa: E402
from quotameter.redis_keys import RedisKeys  # noqa: E402
from quotameter.redis_pool import redis_client, sync_redis  # noqa: E402
from tests.integration.redis_cluster import start_cluster  # noqa: E402


async def measure(url: str, pipelined: bool, n: int, concurrency: int, customers: int) -> tuple[float, float, float]:
    services = Services(redis_url=url)
    names = RedisKeys("bench")
    sync = sync_redis(services)
    keys = []
    for c in range(customers):
        new = create_key(sync, names, f"bench-{c}", "bench")
        keys.append(KeyRecord(new.key_id, f"bench-{c}", "bench", False))
    sync.close()
    client = redis_client(services)
    pipe = script_pipe(url) if pipelined else None
    admitter = Admitter(client, names, pipe)
    policy = resolve("bench", TIER, "mock-small")
    estimate = Estimate(120, 256, 12, "0.4")

    async def admit(i: int) -> None:
        result = await admitter.admit(keys[i % customers], policy, "2030-01", PERIOD_END_MS,
                                      f"ev-{i}-{time.perf_counter_ns()}", int(time.time() * 1000), estimate, 60_000)
        assert result.admitted, result.reason

    await _latency(admit, 300)  # warm up
    lat = await _latency(admit, n)
    tput = await _throughput(admit, n, concurrency)
    if pipe is not None:
        await pipe.close()
    await client.aclose()
    return _pct(lat, .5), _pct(lat, .99), tput


async def main(n: int, concurrency: int, customers: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        single = redis_process(port, Path(tmp) / "single", Path(tmp) / "single.log", persist=False).start()
        cluster = None
        try:
            single.wait_port("127.0.0.1", port, timeout_s=20)
            cluster = start_cluster(Path(tmp) / "cluster")
            rows = [
                ("one Redis, pipelined", f"redis://127.0.0.1:{port}/0", True),
                ("cluster, pipelined per primary", cluster.url, True),
                ("cluster, redis-py RedisCluster", cluster.url, False),
            ]
            results = [(name, await measure(url, piped, n, concurrency, customers)) for name, url, piped in rows]
        finally:
            single.stop()
            for proc in cluster.processes if cluster else ():
                proc.stop()
    print(f"admission: {n} calls each over {customers} customers, redis-py {redis.__version__}, loopback")
    print(f"{'':34} {'p50 µs':>8} {'p99 µs':>8} {'calls/s (c=' + str(concurrency) + ')':>18}")
    for name, (p50, p99, tput) in results:
        print(f"{name:34} {p50:8.0f} {p99:8.0f} {tput:18,.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--customers", type=int, default=30)
    args = parser.parse_args()
    asyncio.run(main(args.n, args.concurrency, args.customers))
