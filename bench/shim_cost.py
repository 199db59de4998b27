"""The shim's cost per request as users run it: `quotameter up` (Redis, the
broker, a worker with its ledger, the shim, the dashboard) in front of a
separate instant mock model, a tier with every limit kind set (requests/min,
tokens/min, concurrency, monthly tokens, budget: all high enough to admit
everything), open-loop load from bench/loadgen.py in its own process.

    .venv/bin/python bench/shim_cost.py                     # ~3 minutes
    .venv/bin/python bench/shim_cost.py --rates 500 --duration 20 --hold   # then profile the shim's PID
    .venv/bin/python bench/shim_cost.py --modes json --rates 500 --ceiling 64     # and the most it serves

For each cell (JSON and streaming, each rate) it reports direct (the mock),
through a bare pass-through on the shim's HTTP stack (bench/bare_proxy.py)
and through the shim, p50 / p99 to the last byte, what the shim adds over
the bare proxy, the errors, and the CPU time per request (user + system,
from /proc and getrusage before and after each cell) of every process the
shim's cell keeps busy: the load generator, the mock, the shim, and the rest
of the stack (redis-server, broker, worker); the bare proxy's from its own
cell. Their sum says what a request costs the machine, and so which rate
this machine's cores can serve at all. With ``--ceiling N`` it then finds
that rate: N connections in a closed loop (each sends its next request when
its answer ends) for ``--duration`` seconds, direct, through the bare proxy
and through the shim, with the requests/s served, the failures, and how
many cores the shim's process used. Every process is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def _children_cpu_s() -> float:
    """CPU time of this script's waited-for children (the load generators)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _descendants(root: int) -> list[int]:
    """Every live process under ``root``."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent:
                found.append(pid)
                frontier.append(pid)
    return found


def _name(pid: int) -> str:
    """A process's short name: `quotameter worker` is "worker", a binary its file's name."""
    argv = [arg.decode() for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if arg]
    if len(argv) > 2 and argv[1:3] == ["-m", "quotameter"]:
        return argv[3] if len(argv) > 3 else "quotameter"
    return f"{Path(argv[0]).name.split('-')[0]}:{pid}" if argv else str(pid)


def _cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += _cpu_s(pid)
        except OSError:  # gone meanwhile
            pass
    return total


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


PROMPT_KB = 0.0  # --prompt-kb


def _load(url: str, key: str, rate: int, duration_s: float, stream: bool) -> dict[str, object]:
    flags = ["--stream"] if stream else []
    if PROMPT_KB:
        flags += ["--prompt-kb", str(PROMPT_KB)]
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "loadgen.py"), "open", "--url", url, "--key", key,
                          "--rate", str(rate), "--duration", str(duration_s), *flags],
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _closed(url: str, key: str, connections: int, duration_s: float, stream: bool,
            watched: dict[str, list[int]]) -> tuple[dict[str, object], dict[str, float]]:
    """A closed-loop run: what it served, and the CPU seconds of each watched group of processes."""
    before = {name: _cpu_of(pids) for name, pids in watched.items()}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "loadgen.py"), "closed", "--url", url, "--key", key,
                          "--connections", str(connections), "--duration", str(duration_s),
                          *(["--stream"] if stream else [])],
                         capture_output=True, text=True, timeout=300, check=True)
    return (json.loads(out.stdout.strip().splitlines()[-1]),
            {name: _cpu_of(pids) - before[name] for name, pids in watched.items()})


def _cell(url: str, key: str, rate: int, duration_s: float, stream: bool,
          watched: dict[str, list[int]]) -> tuple[dict[str, object], dict[str, float]]:
    """One open-loop cell and the CPU µs per request of each watched group of processes."""
    before = {name: _cpu_of(pids) for name, pids in watched.items()}
    load0 = _children_cpu_s()
    result = _load(url, key, rate, duration_s, stream)
    requests = int(result["count"]) + 20  # + the warm-up
    cpu = {name: (_cpu_of(pids) - before[name]) / requests * 1e6 for name, pids in watched.items()}
    cpu["load"] = (_children_cpu_s() - load0) / requests * 1e6
    return result, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description="The shim's added latency and CPU per request, as users run it.")
    parser.add_argument("--rates", default="200,500")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per open-loop cell")
    parser.add_argument("--modes", default="json,stream")
    parser.add_argument("--hold", action="store_true", help="print the shim's PID and wait 5 s before the load")
    parser.add_argument("--prompt-kb", type=float, default=0, help="prompts of about this many KB (default: 5 words)")
    parser.add_argument("--ceiling", type=int, default=0, metavar="N",
                        help="then the most requests/s served, N connections in a closed loop")
    args = parser.parse_args()
    global PROMPT_KB
    PROMPT_KB = args.prompt_kb
    rates = [int(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory(prefix="qm-shimcost-") as tmp:
        work = Path(tmp)
        mock_port, bare_port = free_port(), free_port()
        mock = ManagedProcess("mock", [sys.executable, "-m", "quotameter", "mock-llm", "--port", str(mock_port)],
                              work / "mock.log", env={"PYTHONPATH": str(ROOT)}).start()
        bare = ManagedProcess("bare", [sys.executable, str(ROOT / "bench" / "bare_proxy.py"), "--port", str(bare_port),
                                       "--upstream", f"http://127.0.0.1:{mock_port}"],
                              work / "bare.log", env={"PYTHONPATH": str(ROOT)}).start()
        up = None
        try:
            mock.wait_port("127.0.0.1", mock_port, timeout_s=30)
            bare.wait_port("127.0.0.1", bare_port, timeout_s=30)
            up, base, key = _up(work, _config(work, mock_port), mock_port)
            shim_pid = _child_running(up.pid, "proxy")
            stack = [up.pid, *(pid for pid in _descendants(up.pid) if pid != shim_pid)]  # up supervises
            parts = {_name(pid): [pid] for pid in stack}
            assert mock.pid is not None and bare.pid is not None
            watched = {"mock": [mock.pid], "shim": [shim_pid], "stack": stack, **parts}
            print(f"shim pid {shim_pid}; {os.cpu_count()} cores shared by load, mock, shim, redis, broker, worker; "
                  f"{args.duration:g} s per cell, tier with every limit kind", flush=True)
            if args.hold:
                time.sleep(5)
            print(f"{'':13} | {'p50 / p99 ms to the last byte':^44} | {'added over bare':^15} |        | "
                  f"{'CPU µs per request':^38}")
            print(f"{'mode':<7}{'rate':>6} | {'direct':>13} {'bare':>14} {'shim':>14} | {'p50':>7} {'p99':>7} | "
                  f"{'errors':>6} | {'load':>6} {'mock':>6} {'bare':>6} {'shim':>6} {'stack':>6} {'sum':>6}")
            for mode in args.modes.split(","):
                stream = mode == "stream"
                for rate in rates:
                    direct, _ = _cell(f"http://127.0.0.1:{mock_port}/v1/chat/completions", "none", rate,
                                      args.duration, stream, {})
                    through_bare, bare_cpu = _cell(f"http://127.0.0.1:{bare_port}/v1/chat/completions", "none",
                                                   rate, args.duration, stream, {"bare": [bare.pid]})
                    shim, cpu = _cell(f"{base}/chat/completions", key, rate, args.duration, stream, watched)
                    errors = sum(int(cell["errors"]) for cell in (direct, through_bare, shim))
                    total = cpu["load"] + cpu["mock"] + cpu["shim"] + cpu["stack"]
                    print(f"{mode:<7}{rate:>6} | {direct['p50_ms']:>6.2f} /{direct['p99_ms']:>6.2f} "
                          f"{through_bare['p50_ms']:>6.2f} /{through_bare['p99_ms']:>6.2f} "
                          f"{shim['p50_ms']:>6.2f} /{shim['p99_ms']:>6.2f} | "
                          f"{shim['p50_ms'] - through_bare['p50_ms']:>+7.2f} "
                          f"{shim['p99_ms'] - through_bare['p99_ms']:>+7.2f} | {errors:>6} | "
                          f"{cpu['load']:>6.0f} {cpu['mock']:>6.0f} {bare_cpu['bare']:>6.0f} {cpu['shim']:>6.0f} "
                          f"{cpu['stack']:>6.0f} {total:>6.0f}", flush=True)
                    print("      the stack's part: " + ", ".join(
                        f"{name} {cpu[name]:.0f}" for name in sorted(parts, key=lambda n: -cpu[n]) if cpu[name] >= 1))
                    for name, cell in (("bare", through_bare), ("shim", shim)):
                        if cell.get("failures"):
                            print(f"    {name} failures: {cell['failures']}")
            print("sum: load + mock + shim + stack, what one request through the shim costs the machine "
                  f"({os.cpu_count()} cores: at most {os.cpu_count()} s of CPU per second)")
            if args.ceiling:
                print(f"\nceiling: {args.ceiling} connections in a closed loop, {args.duration:g} s each")
                for mode in args.modes.split(","):
                    stream = mode == "stream"
                    for name, url, cell_key in (("direct", f"http://127.0.0.1:{mock_port}/v1/chat/completions", "none"),
                                                ("bare", f"http://127.0.0.1:{bare_port}/v1/chat/completions", "none"),
                                                ("shim", f"{base}/chat/completions", key)):
                        result, cpu_s = _closed(url, cell_key, args.ceiling, args.duration, stream,
                                                {"bare": [bare.pid], "shim": [shim_pid]})
                        busy = cpu_s[name] / args.duration if name in cpu_s else float("nan")
                        print(f"{mode:<7}{name:<7} {float(result['rps']):>7.0f} requests/s  {result['errors']} failed"
                              + (f"  (its process used {busy:.2f} cores)" if name != "direct" else ""), flush=True)
        finally:
            if up is not None:
                up.send_signal(signal.SIGINT)  # drains every part it started
                try:
                    up.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    up.send_signal(signal.SIGINT)  # a second Ctrl-C kills what is left
                    up.wait(timeout=30)
            bare.stop()
            mock.stop()


if __name__ == "__main__":
    main()
