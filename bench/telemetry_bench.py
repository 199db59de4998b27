"""What the shim's telemetry costs a request: the standalone proxy with
telemetry off beside the same proxy with it on, same run, same load.

    .venv/bin/python bench/telemetry_bench.py            # ~4 minutes
    .venv/bin/python bench/telemetry_bench.py --quick    # under a minute, noisy

The whole product runs (redis-server, broker, worker, mock model with 0 token
delay) with two shims in front of the same mock, key and tier (every limit
kind, none reached): "off" (``telemetry.metrics: false``, no access line, no
``OTEL_*``) and "on" (``/metrics`` served and scraped every 5 s, OTLP/HTTP
metrics and traces to a local sink, traces sampled at 10 %:
``OTEL_TRACES_SAMPLER=parentbased_traceidratio``,
``OTEL_TRACES_SAMPLER_ARG=0.1``; with ``--access-log console|json``, the
access line too). Load comes from bench/loadgen.py in its
own process: open loop at fixed rates (p50 / p99 to the last byte from the
scheduled send time) and a closed loop (throughput), JSON and streamed,
off and on taking turns to go first, so both see the same machine.
Targets: on adds <= 0.2 ms p50, and keeps >= 95 % of off's throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import redis
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.attach_bench import BENCH_TIER, Stack, _load, _python  # noqa: E402
from gateway_shim.keystore import create_key  # noqa: E402
from quotameter.config import DEFAULT_CONFIG  # noqa: E402
from quotameter.embedded.broker import broker_process  # noqa: E402
from quotameter.embedded.procs import ManagedProcess, free_port  # noqa: E402
from quotameter.embedded.redis_server import redis_process  # noqa: E402
from quotameter.redis_keys import RedisKeys  # noqa: E402

TARGET_ADDED_P50_MS, TARGET_THROUGHPUT = 0.2, 0.95
SAMPLED = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
SCRAPE_EVERY_S = 5.0  # tighter than a usual Prometheus scrape interval (15 s to 1 min)
PAUSE_S = 1.0  # between cells: the worker catches up with the last cell's events
WARM_UP_S = 6.0  # past the span processor's first export (OTEL_BSP_SCHEDULE_DELAY, 5 s)


def _order(turn: int) -> tuple[str, str]:
    """Off first, then on first: neither always runs after the other's load."""
    return ("off", "on") if turn % 2 == 0 else ("on", "off")


def _start(work: Path, access_log: str, otlp_on: bool = True) -> tuple[Stack, dict[str, int], int]:
    """The product with a shim "off" and a shim "on": (stack, shim ports, the OTLP sink's port)."""
    redis_port, broker_port, mock_port, worker_port, sink_port = (free_port() for _ in range(5))
    ports = {"off": free_port(), "on": free_port()}
    stack = Stack(work, [], mock_port, ports["off"], None, "")
    stack.start(redis_process(redis_port, work / "redis", work / "redis.log", persist=False), redis_port)
    stack.start(broker_process(broker_port, work / "broker.log"), broker_port)
    env = {"PYTHONPATH": str(ROOT)}
    stack.start(ManagedProcess("mock", _python("-m", "quotameter", "mock-llm", "--port", str(mock_port)),
                               work / "mock.log", env=env), mock_port)
    stack.start(ManagedProcess("otlp-sink", _python(str(ROOT / "bench" / "otlp_sink.py"), "--port", str(sink_port)),
                               work / "sink.log", env=env), sink_port)
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    document["tiers"]["bench"] = BENCH_TIER
    document["upstream"] = {"url": f"http://127.0.0.1:{mock_port}/v1"}
    document["services"] = {**document["services"], "redis_url": f"redis://127.0.0.1:{redis_port}/0",
                            "kafka_bootstrap": f"127.0.0.1:{broker_port}", "events_topic": "bench-events",
                            "history_dir": str(work / "history"), "worker_url": f"http://127.0.0.1:{worker_port}"}
    worker_config = work / "worker.yaml"
    worker_config.write_text(yaml.safe_dump({**document, "telemetry": {"metrics": False}}, sort_keys=False))
    stack.start(ManagedProcess("worker", _python("-m", "quotameter", "worker"), work / "worker.log",
                               env={**env, "QUOTAMETER_CONFIG": str(worker_config)}), worker_port, timeout_s=90)
    otlp = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", **SAMPLED} if otlp_on else {}
    on = {"metrics": True, "access_log": access_log != "off", "log_format": "json" if access_log == "json" else "console"}
    for name, telemetry, extra in (("off", {"metrics": False, "access_log": False}, {}), ("on", on, otlp)):
        shim = {**document.get("shim", {}), "port": ports[name], "spool_dir": str(work / f"spool-{name}"),
                "instance": f"bench-{name}"}
        path = work / f"shim-{name}.yaml"
        path.write_text(yaml.safe_dump({**document, "shim": shim, "telemetry": telemetry}, sort_keys=False))
        # The off shim must not pick up OTEL_* from the bench's own environment.
        clean = {k: "" for k in os.environ if k.startswith("OTEL_")} if name == "off" else {}
        stack.start(ManagedProcess(f"shim-{name}", _python("-m", "quotameter", "proxy"), work / f"shim-{name}.log",
                                   env={**env, **clean, "QUOTAMETER_CONFIG": str(path), **extra}), ports[name])
    client = redis.Redis(port=redis_port)
    stack.key = create_key(client, RedisKeys(document["services"]["redis_prefix"]), "bench", "bench").plaintext
    client.close()
    return stack, ports, sink_port


class _Scraper(threading.Thread):
    """Prometheus's part: GET /metrics every SCRAPE_EVERY_S, as a scrape config would."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.url, self.scrapes, self.bytes = f"http://127.0.0.1:{port}/metrics", 0, 0
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(SCRAPE_EVERY_S):
            with urllib.request.urlopen(self.url, timeout=5) as response:
                self.bytes = len(response.read())
            self.scrapes += 1

    def stop(self) -> None:
        self._stop.set()


def main() -> None:
    parser = argparse.ArgumentParser(description="Latency and throughput of the shim with telemetry off and on.")
    parser.add_argument("--quick", action="store_true", help="one rate, JSON only, 2 s cells: under a minute")
    parser.add_argument("--no-otlp", action="store_true", help="'on' serves /metrics only: no OTLP, no traces")
    parser.add_argument("--rates", default="200,500", help="open-loop arrival rates (requests/s)")
    parser.add_argument("--access-log", choices=["off", "console", "json"], default="off",
                        help="the access line in 'on' too (one per request, to its log file)")
    args = parser.parse_args()
    if args.quick:
        duration_s, closed_s, rates, modes = 2.0, 2.0, [200], [False]
    else:
        duration_s, closed_s, rates, modes = 8.0, 8.0, [int(r) for r in args.rates.split(",")], [False, True]
    connections = 32
    print(f"telemetry bench: {os.cpu_count()} CPU cores shared by the load generator, mock, worker, broker, "
          f"redis-server and both shims; open loop {duration_s:.0f} s per cell, closed loop {connections} "
          f"connections {closed_s:.0f} s; 16-token answers; access line in 'on': {args.access_log}\n", flush=True)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qm-telemetry-bench-") as tmp:
        stack, ports, sink_port = _start(Path(tmp), args.access_log, not args.no_otlp)
        scraper = _Scraper(ports["on"])
        scraper.start()
        try:
            open_cells: dict[tuple[bool, int, str], dict[str, float]] = {}
            closed_cells: dict[tuple[bool, str], dict[str, float]] = {}
            for name in ("off", "on"):  # warm both up: first connections, and 'on''s first span export
                _load("open", "--url", f"http://127.0.0.1:{ports[name]}/v1/chat/completions", "--key", stack.key,
                      "--rate", str(rates[0]), "--duration", str(WARM_UP_S))
            time.sleep(PAUSE_S)
            turn = 0
            for stream in modes:
                flags = ["--stream"] if stream else []
                for rate in rates:
                    for name in _order(turn):
                        url = f"http://127.0.0.1:{ports[name]}/v1/chat/completions"
                        open_cells[(stream, rate, name)] = _load("open", "--url", url, "--key", stack.key, "--rate",
                                                                 str(rate), "--duration", str(duration_s), *flags)
                        time.sleep(PAUSE_S)
                    turn += 1
                for name in _order(turn):
                    url = f"http://127.0.0.1:{ports[name]}/v1/chat/completions"
                    closed_cells[(stream, name)] = _load("closed", "--url", url, "--key", stack.key, "--connections",
                                                         str(connections), "--duration", str(closed_s), *flags)
                    time.sleep(PAUSE_S)
                turn += 1
            with urllib.request.urlopen(f"http://127.0.0.1:{sink_port}/stats", timeout=5) as response:
                sink = json.loads(response.read())
        finally:
            scraper.stop()
            for proc in reversed(stack.procs):
                proc.stop()
    _report(open_cells, closed_cells, modes, rates)
    print(f"\n'on' exported {sink['traces']} trace and {sink['metrics']} metric batches over OTLP "
          f"({sink['bytes']} bytes); /metrics scraped {scraper.scrapes} times ({scraper.bytes} bytes each); "
          f"{time.monotonic() - began:.0f} s in all")


def _report(open_cells: dict[tuple[bool, int, str], dict[str, float]],
            closed_cells: dict[tuple[bool, str], dict[str, float]], modes: list[bool], rates: list[int]) -> None:
    head = (f"{'mode':<7}{'rate/s':>7} | {'off p50':>8}{'p99':>8} | {'on p50':>8}{'p99':>8} | "
            f"{'added p50':>9}{'p99':>8} | errors")
    print(head)
    print("-" * len(head))
    added = []
    for stream in modes:
        for rate in rates:
            off, on = open_cells[(stream, rate, "off")], open_cells[(stream, rate, "on")]
            added.append(on["p50_ms"] - off["p50_ms"])
            print(f"{'stream' if stream else 'json':<7}{rate:>7} | {off['p50_ms']:>8.2f}{off['p99_ms']:>8.2f} | "
                  f"{on['p50_ms']:>8.2f}{on['p99_ms']:>8.2f} | {added[-1]:>+9.2f}{on['p99_ms'] - off['p99_ms']:>+8.2f}"
                  f" | {int(off['errors'] + on['errors'])}")
    print("(ms, to the last byte)\n")
    print(f"{'mode':<7} | {'off req/s':>9} | {'on req/s':>9} | on/off")
    ratios = []
    for stream in modes:
        off, on = closed_cells[(stream, "off")], closed_cells[(stream, "on")]
        ratios.append(on["rps"] / off["rps"] if off["rps"] else float("nan"))
        print(f"{'stream' if stream else 'json':<7} | {off['rps']:>9.0f} | {on['rps']:>9.0f} | {ratios[-1]:>6.1%}"
              f"   errors {int(off['errors'] + on['errors'])}")
    met_latency = all(a <= TARGET_ADDED_P50_MS for a in added)
    met_throughput = all(r >= TARGET_THROUGHPUT for r in ratios)
    print(f"\ntargets: added p50 <= {TARGET_ADDED_P50_MS} ms: {'ok' if met_latency else 'MISSED'}; "
          f"throughput >= {TARGET_THROUGHPUT:.0%} of off: {'ok' if met_throughput else 'MISSED'}")


if __name__ == "__main__":
    main()
