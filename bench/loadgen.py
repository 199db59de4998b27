"""The load generator of bench/proxy_bench.py, run as its own process so it
never shares an event loop with what it measures. Prints one JSON line.

    open:   fixed arrival rate (open loop); latency counts from the *scheduled*
            send time, so a stalled server cannot hide its queueing delay. A
            failed request (an error status, a refused or reset connection, a
            timeout) is counted and ranks as slower than every answer in the
            percentiles: 1 % failures make the p99 a failure, never a number
            that leaves them out.
    closed: N connections, each sending its next request when the last answer
            ended; reports completed requests per second.

It runs on uvloop when installed (as the shim does), so that the generator
keeps its schedule at 1,000 requests/s on a small machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time

import aiohttp

try:
    import uvloop
except ImportError:  # asyncio's own loop: a slower generator, the same measurement
    uvloop = None

MESSAGES = [{"role": "user", "content": "Say something short."}]
API = "chat"  # or "responses": the same 16-token answer through the Responses API (--api)


def _body(stream: bool) -> bytes:
    if API == "responses":
        return json.dumps({"model": "mock-small", "input": MESSAGES, "max_output_tokens": 16, "stream": stream}).encode()
    return json.dumps({"model": "mock-small", "messages": MESSAGES, "max_tokens": 16, "stream": stream}).encode()


FAILURES: dict[str, int] = {}
WARM_UP = 20


async def _one(session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes) -> bool:
    async with session.post(url, data=body, headers=headers) as response:
        await response.read()  # the whole answer, stream or not: latency to the last byte
        if response.status != 200:
            FAILURES[str(response.status)] = FAILURES.get(str(response.status), 0) + 1
        return response.status == 200


async def open_loop(url: str, key: str, rate: float, duration_s: float, stream: bool) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body, count = _body(stream), int(rate * duration_s)
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        # Warm the pools of every hop; these answers are metered too (the bench checks the ledger).
        warmed = sum([await _one(session, url, headers, body) for _ in range(WARM_UP)])

        async def fire(scheduled: float) -> None:
            nonlocal errors
            try:
                ok = await _one(session, url, headers, body)
            except (aiohttp.ClientError, TimeoutError) as exc:
                FAILURES[type(exc).__name__] = FAILURES.get(type(exc).__name__, 0) + 1
                ok = False
            # A failure ranks above every answer: it cannot improve a percentile.
            latencies.append((time.perf_counter() - scheduled) * 1000 if ok else math.inf)
            errors += not ok

        start = time.perf_counter() + 0.05
        tasks = []
        for i in range(count):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(fire(scheduled)))
        last_sent = time.perf_counter()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {"count": count, "ok": count - errors, "warm_up_ok": warmed, "errors": errors, "sent_rps": count / (last_sent - start),
            "achieved_rps": count / elapsed, **_percentiles(latencies)}


async def closed_loop(url: str, key: str, connections: int, duration_s: float, stream: bool) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = _body(stream)
    done = errors = 0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        for _ in range(20):
            await _one(session, url, headers, body)
        deadline = time.perf_counter() + duration_s

        async def worker() -> None:
            nonlocal done, errors
            while time.perf_counter() < deadline:
                try:
                    ok = await _one(session, url, headers, body)
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                done, errors = done + ok, errors + (not ok)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - start
    return {"count": done, "errors": errors, "rps": done / elapsed}


def _percentiles(sorted_ms: list[float]) -> dict[str, float]:
    if not sorted_ms:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}

    def at(q: float) -> float:
        return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]

    # JSON has no infinity: a failed percentile is null.
    return {name: (None if math.isinf(value) else value)
            for name, value in (("p50_ms", at(0.50)), ("p99_ms", at(0.99)), ("max_ms", sorted_ms[-1]))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["open", "closed"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", default="none")
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--api", choices=["chat", "responses"], default="chat", help="the body's API shape")
    parser.add_argument("--prompt-kb", type=float, default=0, help="a prompt of about this many KB of English")
    args = parser.parse_args()
    global API, MESSAGES
    API = args.api
    if args.prompt_kb:
        words = "the quota of each customer holds while the gateway meters every token it serves. "
        MESSAGES = [{"role": "user", "content": (words * (int(args.prompt_kb * 1024) // len(words) + 1))}]
    loop_factory = uvloop.new_event_loop if uvloop is not None else None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        if args.mode == "open":
            result = runner.run(open_loop(args.url, args.key, args.rate, args.duration, args.stream))
        else:
            result = runner.run(closed_loop(args.url, args.key, args.connections, args.duration, args.stream))
    print(json.dumps({**result, "failures": FAILURES}), flush=True)


if __name__ == "__main__":
    main()
