"""What the shim adds to a request: latency over calling the upstream directly
and over a bare aiohttp pass-through proxy, and max throughput beside the
bare proxy. All on loopback, all in one run:

    .venv/bin/python bench/proxy_bench.py            # ~2 minutes
    .venv/bin/python bench/proxy_bench.py --quick    # ~40 s, noisier
    .venv/bin/python bench/proxy_bench.py --apis chat,responses --quick   # streams per API, ~30 s

It starts its own redis-server, Tansu broker, mock model server (0 token
delay), bare proxy and shim (real processes, stopped by PID at the end), and
drives them from bench/loadgen.py in a separate process: open loop at a fixed
arrival rate for latency, closed loop with N connections for throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway_shim.keystore import create_key  # noqa: E402
from quotameter.config import DEFAULT_CONFIG  # noqa: E402
from quotameter.embedded.broker import broker_process  # noqa: E402
from quotameter.embedded.procs import ManagedProcess, free_port  # noqa: E402
from quotameter.embedded.redis_server import redis_process  # noqa: E402
from quotameter.redis_keys import RedisKeys  # noqa: E402

TARGET_P50_MS, TARGET_P99_MS, TARGET_THROUGHPUT = 1.0, 5.0, 0.70


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _start_all(work: Path) -> tuple[list[ManagedProcess], dict[str, str], str]:
    procs: list[ManagedProcess] = []

    def start(proc: ManagedProcess, port: int) -> None:
        procs.append(proc.start())
        proc.wait_port("127.0.0.1", port, timeout_s=30)

    redis_port, broker_port, mock_port, shim_port, bare_port = (free_port() for _ in range(5))
    start(redis_process(redis_port, work / "redis", work / "redis.log", persist=False), redis_port)
    start(broker_process(broker_port, work / "broker.log"), broker_port)
    env = {"PYTHONPATH": str(ROOT)}
    start(ManagedProcess("mock", _python("-m", "quotameter", "mock-llm", "--port", str(mock_port)),
                         work / "mock.log", env=env), mock_port)
    start(ManagedProcess("bare", _python(str(ROOT / "bench" / "bare_proxy.py"), "--port", str(bare_port),
                                         "--upstream", f"http://127.0.0.1:{mock_port}"), work / "bare.log", env=env),
          bare_port)
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    document["tiers"]["bench"] = {}  # no limits: the bench measures the path, not refusals
    document["upstream"] = {"url": f"http://127.0.0.1:{mock_port}/v1"}
    document["shim"] = {**document.get("shim", {}), "port": shim_port, "spool_dir": str(work / "spool")}
    document["services"] = {**document["services"], "redis_url": f"redis://127.0.0.1:{redis_port}/0",
                            "kafka_bootstrap": f"127.0.0.1:{broker_port}", "events_topic": "bench-events",
                            "history_dir": str(work / "history")}
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(document, sort_keys=False))
    start(ManagedProcess("shim", _python("-m", "quotameter", "proxy"), work / "shim.log",
                         env={**env, "QUOTAMETER_CONFIG": str(config_path)}), shim_port)
    client = redis.Redis(port=redis_port)
    key = create_key(client, RedisKeys(document["services"]["redis_prefix"]), "bench", "bench").plaintext
    client.close()
    urls = {  # the base of each setup's /v1 (see API_PATHS)
        "direct": f"http://127.0.0.1:{mock_port}/v1",
        "bare": f"http://127.0.0.1:{bare_port}/v1",
        "shim": f"http://127.0.0.1:{shim_port}/v1",
    }
    return procs, urls, key


API_PATHS = {"chat": "/chat/completions", "responses": "/responses"}


def _load(*args: str) -> dict[str, float]:
    out = subprocess.run(_python(str(ROOT / "bench" / "loadgen.py"), *args), capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description="Latency and throughput the shim adds.")
    parser.add_argument("--quick", action="store_true", help="short runs (~40 s in all)")
    parser.add_argument("--apis", help="compare streams of these APIs (e.g. chat,responses) at one load instead")
    parser.add_argument("--rate", type=int, default=200, help="with --apis: the open loop's arrival rate")
    args = parser.parse_args()
    duration_s, closed_s, connections = (2.0, 3.0, 32) if args.quick else (6.0, 8.0, 32)
    if args.apis:
        _compare_apis(args.apis.split(","), args.rate, duration_s, closed_s, connections)
        return

    print(f"proxy bench: loopback, {os.cpu_count()} CPU cores shared by the load generator, mock, "
          f"bare proxy, shim, redis-server and broker (figures are relative, not absolute)")
    print(f"open loop {duration_s:.0f} s per cell; latency to the last byte from the scheduled send time; "
          f"16-token answers, mock token delay 0\n")
    with tempfile.TemporaryDirectory(prefix="qm-bench-") as tmp:
        procs, urls, key = _start_all(Path(tmp))
        try:
            rows = []
            urls = {setup: base + API_PATHS["chat"] for setup, base in urls.items()}
            for stream in (False, True):
                for rate in (200, 500):
                    cell: dict[str, dict[str, float]] = {}
                    for setup in ("direct", "bare", "shim"):
                        flags = ["--stream"] if stream else []
                        cell[setup] = _load("open", "--url", urls[setup], "--key", key, "--rate", str(rate),
                                            "--duration", str(duration_s), *flags)
                    rows.append((stream, rate, cell))
            throughput = {}
            for stream in (False, True):
                for setup in ("bare", "shim"):
                    flags = ["--stream"] if stream else []
                    throughput[(stream, setup)] = _load("closed", "--url", urls[setup], "--key", key,
                                                        "--connections", str(connections),
                                                        "--duration", str(closed_s), *flags)
        finally:
            for proc in reversed(procs):
                proc.stop()

    head = (f"{'mode':<7}{'rate/s':>7} | {'direct p50':>10}{'p99':>7} | {'bare p50':>9}{'p99':>7} | "
            f"{'shim p50':>9}{'p99':>7} | {'+direct p50':>11}{'p99':>7} | {'+bare p50':>9}{'p99':>7} | errors")
    print(head)
    print("-" * len(head))
    verdicts = []
    for stream, rate, cell in rows:
        d, b, s = cell["direct"], cell["bare"], cell["shim"]
        add_d50, add_d99 = s["p50_ms"] - d["p50_ms"], s["p99_ms"] - d["p99_ms"]
        add_b50, add_b99 = s["p50_ms"] - b["p50_ms"], s["p99_ms"] - b["p99_ms"]
        errors = int(d["errors"] + b["errors"] + s["errors"])
        print(f"{'stream' if stream else 'json':<7}{rate:>7} | {d['p50_ms']:>10.2f}{d['p99_ms']:>7.2f} | "
              f"{b['p50_ms']:>9.2f}{b['p99_ms']:>7.2f} | {s['p50_ms']:>9.2f}{s['p99_ms']:>7.2f} | "
              f"{add_d50:>+11.2f}{add_d99:>+7.2f} | {add_b50:>+9.2f}{add_b99:>+7.2f} | {errors}")
        verdicts.append(add_b50 <= TARGET_P50_MS and add_b99 <= TARGET_P99_MS)
        for setup in ("direct", "bare", "shim"):
            if cell[setup].get("failures"):
                print(f"    {setup} failures: {cell[setup]['failures']}")
    print("(ms; '+direct' = shim - direct, '+bare' = shim - bare pass-through)\n")

    print(f"{'mode':<7} | {'bare req/s':>10} | {'shim req/s':>10} | shim/bare   ({connections} connections, "
          f"{closed_s:.0f} s closed loop)")
    ratios = []
    for stream in (False, True):
        b, s = throughput[(stream, "bare")], throughput[(stream, "shim")]
        ratio = s["rps"] / b["rps"] if b["rps"] else float("nan")
        ratios.append(ratio)
        print(f"{'stream' if stream else 'json':<7} | {b['rps']:>10.0f} | {s['rps']:>10.0f} | {ratio:>8.0%}"
              f"   errors {int(b['errors'] + s['errors'])}")
    print(f"\ntargets: added over bare <= {TARGET_P50_MS} ms p50 and <= {TARGET_P99_MS} ms p99: "
          f"{_mark(all(verdicts))}; throughput >= {TARGET_THROUGHPUT:.0%} of bare: "
          f"{_mark(all(r >= TARGET_THROUGHPUT for r in ratios))}")


def _compare_apis(apis: list[str], rate: int, duration_s: float, closed_s: float, connections: int) -> None:
    """Streams of each API side by side, same load, same processes: what the shim
    adds to each (over the bare proxy), and its stream throughput beside the bare one."""
    print(f"API bench: 16-token streams per API, open loop {rate}/s for {duration_s:.0f} s per cell, "
          f"closed loop {connections} connections for {closed_s:.0f} s; {os.cpu_count()} CPU cores shared\n")
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="qm-bench-") as tmp:
        procs, bases, key = _start_all(Path(tmp))
        try:
            for api in apis:
                urls = {setup: base + API_PATHS[api] for setup, base in bases.items()}
                cell = {setup: _load("open", "--url", urls[setup], "--key", key, "--rate", str(rate), "--duration",
                                     str(duration_s), "--stream", "--api", api) for setup in ("direct", "bare", "shim")}
                for setup in ("bare", "shim"):
                    cell[f"{setup}-closed"] = _load("closed", "--url", urls[setup], "--key", key, "--connections",
                                                    str(connections), "--duration", str(closed_s), "--stream",
                                                    "--api", api)
                results[api] = cell
        finally:
            for proc in reversed(procs):
                proc.stop()
    head = (f"{'api':<10} | {'direct p50':>10}{'p99':>9} | {'bare p50':>9}{'p99':>9} | {'shim p50':>9}{'p99':>9} | "
            f"{'+bare p50':>9}{'p99':>9} | {'bare req/s':>10} {'shim req/s':>10} | errors")
    print(head)
    print("-" * len(head))
    for api, cell in results.items():
        d, b, s = cell["direct"], cell["bare"], cell["shim"]
        errors = int(sum(result["errors"] for result in cell.values()))
        print(f"{api:<10} | {d['p50_ms']:>10.2f}{d['p99_ms']:>9.2f} | {b['p50_ms']:>9.2f}{b['p99_ms']:>9.2f} | "
              f"{s['p50_ms']:>9.2f}{s['p99_ms']:>9.2f} | {s['p50_ms'] - b['p50_ms']:>+9.2f}"
              f"{s['p99_ms'] - b['p99_ms']:>+9.2f} | {cell['bare-closed']['rps']:>10.0f} "
              f"{cell['shim-closed']['rps']:>10.0f} | {errors}")
        for setup, result in cell.items():
            if result.get("failures"):
                print(f"    {setup} failures: {result['failures']}")
    print("(ms, to the last byte of the stream)")


if __name__ == "__main__":
    main()
