"""What the shim adds to a request, measured as users run it:

    .venv/bin/python bench/proxy_bench.py                    # ~9 minutes: 20 s cells (>= 5,000 samples at 500/s+)
    .venv/bin/python bench/proxy_bench.py --quick            # ~2 minutes: 3 s cells, p99 noisy
    .venv/bin/python bench/proxy_bench.py --rates 500 --modes json
    .venv/bin/python bench/proxy_bench.py --apis chat,responses --rate 200   # streams per API

The whole product runs (bench/product.py): redis-server, the embedded broker,
a worker writing the ledger, the mock model (0 token delay) and the shim, plus
a bare pass-through proxy (bench/bare_proxy.py) on the same HTTP stack and
event loop as the shim. Each load is sent straight to the mock ("direct"),
through the bare proxy, through the shim with a key whose tier has every
limit kind ("shim": the prompt counted, reserved, settled, metered; nothing
refused) and with a key whose tier has none ("shim, no limits").

Load comes from bench/loadgen.py in a separate process: open loop at a fixed
arrival rate, latency to the last byte from each request's scheduled send
time. Failed requests are counted per cell and rank above every answer in
the percentiles (so 1 % failures show as a failed p99). A cell lasts 20 s or
until 5,000 requests, whichever is sooner. At the end the ledger must hold
every request the shim served and no reservation may be left unsettled.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.product import Stack, start_product  # noqa: E402
from quotameter.embedded.procs import ManagedProcess, free_port  # noqa: E402

TARGET_P50_MS, TARGET_P99_MS = 1.0, 5.0
CELL_S, CELL_SAMPLES, QUICK_CELL_S = 20.0, 5000, 3.0
OUTPUT_TOKENS = 16  # loadgen asks for max_tokens 16; the mock answers exactly that many
SETUPS = ("direct", "bare", "shim", "shim-nolimits")
API_PATHS = {"chat": "/chat/completions", "responses": "/responses"}


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _start_bare(stack: Stack) -> str:
    port = free_port()
    stack.start(ManagedProcess("bare", _python(str(ROOT / "bench" / "bare_proxy.py"), "--port", str(port),
                                               "--upstream", f"http://127.0.0.1:{stack.mock_port}"),
                               stack.work / "bare.log", env={"PYTHONPATH": str(ROOT)}), port)
    return f"http://127.0.0.1:{port}/v1"


def _targets(stack: Stack, bare: str) -> dict[str, tuple[str, str]]:
    """Each setup's /v1 base and the key it sends."""
    shim = f"http://127.0.0.1:{stack.shim_port}/v1"
    return {"direct": (f"http://127.0.0.1:{stack.mock_port}/v1", stack.keys["limited"]),
            "bare": (bare, stack.keys["limited"]),
            "shim": (shim, stack.keys["limited"]),
            "shim-nolimits": (shim, stack.keys["unlimited"])}


def _load(*args: str) -> dict[str, Any]:
    out = subprocess.run(_python(str(ROOT / "bench" / "loadgen.py"), *args), capture_output=True, text=True,
                         timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cell_seconds(rate: int, quick: bool) -> float:
    return QUICK_CELL_S if quick else min(CELL_S, CELL_SAMPLES / rate)


def _ms(value: float | None) -> str:
    return "failed" if value is None else f"{value:.2f}"


def _added(shim: float | None, base: float | None) -> str:
    return "failed" if shim is None or base is None else f"{shim - base:+.2f}"


def _served(cells: list[dict[str, Any]]) -> int:
    return sum(int(cell["ok"] + cell["warm_up_ok"]) for cell in cells)


def main() -> int:
    parser = argparse.ArgumentParser(description="Latency the shim adds, with the whole product running.")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_CELL_S:.0f} s cells (p99 noisy)")
    parser.add_argument("--rates", default="50,200,500,1000", help="open-loop arrival rates, requests/s")
    parser.add_argument("--modes", default="json,stream", help="json, stream or both")
    parser.add_argument("--apis", help="compare streams of these APIs (e.g. chat,responses) at --rate instead")
    parser.add_argument("--rate", type=int, default=200, help="with --apis: the arrival rate")
    args = parser.parse_args()
    if args.apis:
        return _compare_apis(args.apis.split(","), args.rate, args.quick)
    rates = [int(rate) for rate in args.rates.split(",")]
    modes = [mode.strip() for mode in args.modes.split(",")]

    print(f"proxy bench: loopback, {os.cpu_count()} CPU cores shared by the load generator, mock, bare proxy, "
          "shim, worker, redis-server and broker (compare columns within one run)")
    print(("QUICK: " if args.quick else "") + "open loop, cells of " +
          ", ".join(f"{cell_seconds(r, args.quick):.0f} s at {r}/s" for r in rates) +
          "; latency to the last byte from the scheduled send time; 16-token answers, mock token delay 0\n",
          flush=True)
    rows: list[tuple[str, int, dict[str, dict[str, Any]]]] = []
    with tempfile.TemporaryDirectory(prefix="qm-bench-") as tmp:
        stack = start_product(Path(tmp))
        try:
            targets = _targets(stack, _start_bare(stack))
            for mode in modes:
                for rate in rates:
                    cell = {}
                    for setup in SETUPS:
                        base, key = targets[setup]
                        cell[setup] = _load("open", "--url", base + API_PATHS["chat"], "--key", key, "--rate",
                                            str(rate), "--duration", str(cell_seconds(rate, args.quick)),
                                            *(["--stream"] if mode == "stream" else []))
                        result = cell[setup]
                        print(f"  {mode:<6} {rate:>5}/s {setup:<14} p50 {_ms(result['p50_ms']):>8} "
                              f"p99 {_ms(result['p99_ms']):>8} ms  failed {result['errors']}/{result['count']}",
                              flush=True)
                    rows.append((mode, rate, cell))
            metered = _check_metered(stack, rows)
        finally:
            stack.stop()
    met = _report(rows)
    print(metered)
    return 0 if met else 1


def _check_metered(stack: Stack, rows: list[tuple[str, int, dict[str, dict[str, Any]]]]) -> str:
    """Every answer the shim served is in the ledger, to the token, and nothing is left reserved."""
    lines, ok = [], True
    for setup, tier in (("shim", "limited"), ("shim-nolimits", "unlimited")):
        served = _served([cell[setup] for _, _, cell in rows])
        usage = stack.wait_metered(tier, served)
        reserved = stack.reserved_tokens(tier)
        good = usage["requests"] == served and usage["output_tokens"] == served * OUTPUT_TOKENS and reserved == 0
        ok &= good
        lines.append(f"  {setup:<14} served {served}, ledger {usage['requests']} requests, "
                     f"{usage['input_tokens']} + {usage['output_tokens']} tokens, cost {usage['cost_usd']} USD; "
                     f"left reserved {reserved} tokens: {'ok' if good else 'MISMATCH'}")
    return ("metering (ledger vs answers served, warm-ups included):\n" + "\n".join(lines)
            + ("" if ok else "\nMETERING MISMATCH: the ledger does not hold what the shim served"))


def _report(rows: list[tuple[str, int, dict[str, dict[str, Any]]]]) -> bool:
    head = (f"\n{'mode':<6} {'load/s':>6} | {'direct p50/p99':>15} | {'bare p50/p99':>15} | {'shim p50/p99':>15} | "
            f"{'added p50/p99':>15} | {'no limits p50/p99':>17} | {'added p50/p99':>15} | "
            f"{'failures d/b/s/n':>16} | shim answered/s")
    print(head)
    print("-" * len(head))
    met = True
    for mode, rate, cell in rows:
        d, b, s, n = (cell[setup] for setup in SETUPS)
        failures = "/".join(str(cell[setup]["errors"]) for setup in SETUPS)
        pair = lambda r: f"{_ms(r['p50_ms'])} / {_ms(r['p99_ms'])}"  # noqa: E731
        added = lambda r: f"{_added(r['p50_ms'], b['p50_ms'])} / {_added(r['p99_ms'], b['p99_ms'])}"  # noqa: E731
        # Saturated: the shim answered slower than the load arrived.
        answered = f"{s['achieved_rps']:.0f}" + (" SATURATED" if s["achieved_rps"] < 0.95 * rate else "")
        print(f"{mode:<6} {rate:>6} | {pair(d):>15} | {pair(b):>15} | {pair(s):>15} | {added(s):>15} | "
              f"{pair(n):>17} | {added(n):>15} | {failures:>16} | {answered}")
        if rate <= 500:  # the targets hold up to 500/s
            within = (s["p50_ms"] is not None and s["p99_ms"] is not None and b["p50_ms"] is not None
                      and b["p99_ms"] is not None and s["p50_ms"] - b["p50_ms"] <= TARGET_P50_MS
                      and s["p99_ms"] - b["p99_ms"] <= TARGET_P99_MS and not s["errors"])
            met &= within
        for setup in SETUPS:
            if cell[setup].get("failures"):
                print(f"    {setup} failures: {cell[setup]['failures']}")
    print("(ms; 'added' = shim - bare pass-through; failures: direct/bare/shim/shim without limits; "
          "a failed percentile is one reached by failed requests)")
    print(f"target up to 500/s: added <= {TARGET_P50_MS} ms p50 and <= {TARGET_P99_MS} ms p99 with limits, "
          f"no failures: {'met' if met else 'MISSED'}")
    return met


def _compare_apis(apis: list[str], rate: int, quick: bool) -> int:
    """Streams of each API side by side, same load, same processes: what the shim
    adds to each over the bare proxy, with the limited tier."""
    seconds = cell_seconds(rate, quick)
    print(f"API bench: 16-token streams per API, open loop {rate}/s for {seconds:.0f} s per cell"
          + (" (QUICK)" if quick else "") + f"; {os.cpu_count()} CPU cores shared, whole product running\n")
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="qm-bench-") as tmp:
        stack = start_product(Path(tmp))
        try:
            targets = _targets(stack, _start_bare(stack))
            for api in apis:
                results[api] = {
                    setup: _load("open", "--url", targets[setup][0] + API_PATHS[api], "--key", targets[setup][1],
                                 "--rate", str(rate), "--duration", str(seconds), "--stream", "--api", api)
                    for setup in ("direct", "bare", "shim")
                }
        finally:
            stack.stop()
    head = (f"{'api':<10} | {'direct p50':>10}{'p99':>9} | {'bare p50':>9}{'p99':>9} | {'shim p50':>9}{'p99':>9} | "
            f"{'added p50':>9}{'p99':>9} | failures d/b/s")
    print(head)
    print("-" * len(head))
    for api, cell in results.items():
        d, b, s = cell["direct"], cell["bare"], cell["shim"]
        print(f"{api:<10} | {_ms(d['p50_ms']):>10}{_ms(d['p99_ms']):>9} | {_ms(b['p50_ms']):>9}{_ms(b['p99_ms']):>9} | "
              f"{_ms(s['p50_ms']):>9}{_ms(s['p99_ms']):>9} | {_added(s['p50_ms'], b['p50_ms']):>9}"
              f"{_added(s['p99_ms'], b['p99_ms']):>9} | {d['errors']}/{b['errors']}/{s['errors']}")
        for setup, result in cell.items():
            if result.get("failures"):
                print(f"    {setup} failures: {result['failures']}")
    print("(ms, to the last byte of the stream)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
