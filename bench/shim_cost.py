"""The shim's cost per request as users run it: `quotameter up` (Redis, the
broker, a worker with its ledger, the shim, the dashboard) in front of a
separate instant mock model, a tier with every limit kind set (requests/min,
tokens/min, concurrency, monthly tokens, budget: all high enough to admit
everything), open-loop load from bench/loadgen.py in its own process.

    .venv/bin/python bench/shim_cost.py                     # ~3 minutes
    .venv/bin/python bench/shim_cost.py --rates 500 --duration 20 --hold   # then profile the shim's PID

For each cell (JSON and streaming, each rate) it reports direct (the mock)
and through the shim p50 / p99 to the last byte, what the shim adds, the
errors, and the shim process's CPU time per request (user + system, read
from /proc before and after the cell). Every process is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quotameter.config import DEFAULT_CONFIG  # noqa: E402
from quotameter.embedded.procs import ManagedProcess, free_port  # noqa: E402

TIER = "limited"
# Every limit kind, each far above what a few minutes at 1,000 req/s can use.
LIMITS = {
    "requests_per_minute": 10_000_000,
    "tokens_per_minute": 10_000_000_000,
    "concurrent_requests": 100_000,
    "monthly_tokens": 10_000_000_000_000,
    "monthly_budget_usd": "100000000.00",
    "cut_streams": True,
}
TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def _child_running(parent: int, last_arg: str) -> int:
    """The PID of ``parent``'s child whose command line ends with ``last_arg``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == parent and argv[-2:-1] == [last_arg.encode()]:
            return int(entry.name)
    raise RuntimeError(f"no child of {parent} runs {last_arg!r}")


def _config(work: Path, mock_port: int) -> Path:
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    document["tiers"] = {TIER: LIMITS}
    document["customers"] = {}
    document["upstream"] = {"url": f"http://127.0.0.1:{mock_port}/v1"}
    ports = {name: free_port() for name in ("shim", "redis", "broker", "worker", "dashboard")}
    document["shim"] = {**document.get("shim", {}), "port": ports["shim"]}
    document["services"] = {**document["services"], "redis_url": f"redis://127.0.0.1:{ports['redis']}/0",
                            "kafka_bootstrap": f"127.0.0.1:{ports['broker']}",
                            "worker_url": f"http://127.0.0.1:{ports['worker']}",
                            "dashboard_url": f"http://127.0.0.1:{ports['dashboard']}"}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _up(work: Path, config: Path, mock_port: int) -> tuple[subprocess.Popen[str], str, str]:
    """`quotameter up` in front of the mock; its process, the shim's /v1 base and the tier's demo key."""
    up = subprocess.Popen(
        [sys.executable, "-m", "quotameter", "up", "--config", str(config), "--data-dir", str(work / "var"),
         "--upstream-url", f"http://127.0.0.1:{mock_port}/v1"],
        stdout=subprocess.PIPE, text=True, start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    base = key = ""
    deadline = time.monotonic() + 180
    assert up.stdout is not None
    for line in up.stdout:
        if "quotameter ready on" in line:
            base = line.split("ready on ", 1)[1].split()[0]
        if line.strip().startswith(TIER) and "customer" in line:
            key = line.split()[-1]
        if "Ctrl-C stops everything" in line or time.monotonic() > deadline:
            break
    if not (base and key):
        up.send_signal(signal.SIGINT)
        raise RuntimeError("quotameter up did not come up (see its logs under the data dir)")
    return up, base, key


def _load(url: str, key: str, rate: int, duration_s: float, stream: bool) -> dict[str, object]:
    flags = ["--stream"] if stream else []
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "loadgen.py"), "open", "--url", url, "--key", key,
                          "--rate", str(rate), "--duration", str(duration_s), *flags],
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="The shim's added latency and CPU per request, as users run it.")
    parser.add_argument("--rates", default="200,500")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per open-loop cell")
    parser.add_argument("--modes", default="json,stream")
    parser.add_argument("--hold", action="store_true", help="print the shim's PID and wait 5 s before the load")
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory(prefix="qm-shimcost-") as tmp:
        work = Path(tmp)
        mock_port = free_port()
        mock = ManagedProcess("mock", [sys.executable, "-m", "quotameter", "mock-llm", "--port", str(mock_port)],
                              work / "mock.log", env={"PYTHONPATH": str(ROOT)}).start()
        up = None
        try:
            mock.wait_port("127.0.0.1", mock_port, timeout_s=30)
            up, base, key = _up(work, _config(work, mock_port), mock_port)
            shim_pid = _child_running(up.pid, "proxy")
            print(f"shim pid {shim_pid}; {os.cpu_count()} cores shared by load, mock, shim, redis, broker, worker; "
                  f"{args.duration:g} s per cell, tier with every limit kind", flush=True)
            if args.hold:
                time.sleep(5)
            print(f"{'mode':<7}{'rate':>6} | {'direct p50':>10}{'p99':>8} | {'shim p50':>9}{'p99':>8} | "
                  f"{'added p50':>9}{'p99':>8} | {'errors':>6} | {'shim CPU µs/req':>15}")
            for mode in args.modes.split(","):
                stream = mode == "stream"
                for rate in rates:
                    direct = _load(f"http://127.0.0.1:{mock_port}/v1/chat/completions", "none", rate,
                                   args.duration, stream)
                    cpu0 = _cpu_s(shim_pid)
                    shim = _load(f"{base}/chat/completions", key, rate, args.duration, stream)
                    cpu_us = (_cpu_s(shim_pid) - cpu0) / (int(shim["count"]) + 20) * 1e6  # + the warm-up
                    errors = int(direct["errors"]) + int(shim["errors"])
                    print(f"{mode:<7}{rate:>6} | {direct['p50_ms']:>10.2f}{direct['p99_ms']:>8.2f} | "
                          f"{shim['p50_ms']:>9.2f}{shim['p99_ms']:>8.2f} | "
                          f"{shim['p50_ms'] - direct['p50_ms']:>+9.2f}{shim['p99_ms'] - direct['p99_ms']:>+8.2f} | "
                          f"{errors:>6} | {cpu_us:>15.0f}", flush=True)
                    if shim.get("failures"):
                        print(f"    shim failures: {shim['failures']}")
        finally:
            if up is not None:
                up.send_signal(signal.SIGINT)  # drains every part it started
                try:
                    up.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    up.send_signal(signal.SIGINT)  # a second Ctrl-C kills what is left
                    up.wait(timeout=30)
            mock.stop()


if __name__ == "__main__":
    main()
