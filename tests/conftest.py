"""Shared fixtures: real services, started once per test session.

Each test gets its own Redis key prefix, Kafka topic, consumer group and
history directory through ``config_factory``, so tests never see each
other's data while sharing one redis-server and one broker.
"""

from __future__ import annotations

import copy
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from quotameter.config import DEFAULT_CONFIG, Config, load_config
from quotameter.embedded.broker import broker_process
from quotameter.embedded.procs import PORTS_ENV, ManagedProcess, free_port
from quotameter.embedded.redis_server import redis_process

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _worker_ports() -> None:
    """Each pytest-xdist worker takes its ports from a range of its own, below
    the kernel's ephemeral range: tests pick ports seconds before their services
    bind them (a worker restarted on its port, a shim started after its config),
    and from the shared range another worker could take one in between."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if worker is None or count is None:
        return
    low, high = 10_000, 32_000  # 32768 is where Linux's ephemeral range starts
    span = (high - low) // int(count)
    index = int(worker.removeprefix("gw"))
    os.environ[PORTS_ENV] = f"{low + index * span}-{low + (index + 1) * span - 1}"


_worker_ports()


@pytest.fixture(scope="session")
def service_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def redis_url(service_dir: Path) -> Iterator[str]:
    port = free_port()
    proc = redis_process(port, service_dir / "redis", service_dir / "redis.log", persist=False).start()
    proc.wait_port("127.0.0.1", port, timeout_s=20)
    yield f"redis://127.0.0.1:{port}/0"
    proc.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(service_dir: Path) -> Iterator[str]:
    port = free_port()
    proc = broker_process(port, service_dir / "broker.log").start()
    proc.wait_port("127.0.0.1", port, timeout_s=30)
    yield f"127.0.0.1:{port}"
    proc.stop()


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


ConfigFactory = Callable[..., tuple[Config, Path]]


def make_config(
    directory: Path, redis_url: str, kafka_bootstrap: str, unique: str, overrides: dict[str, Any] | None = None
) -> tuple[Config, Path]:
    """Write a config into ``directory``: the example policy, this ``unique``
    prefix / topic / app id / directories / ports, plus ``overrides``."""
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    document = merge(
        document,
        {
            # A test's teardown stops its worker before its shim: a shim's
            # events left unconfirmed then would hold it for the full drain.
            "shim": {"port": free_port(), "instance": f"shim-{unique}", "spool_dir": str(directory / "spool"),
                     "drain_timeout_s": 2},
            "services": {
                "redis_url": redis_url,
                "redis_prefix": f"qm{unique}",
                "kafka_bootstrap": kafka_bootstrap,
                "events_topic": f"events-{unique}",
                "history_dir": str(directory / "history"),
                "worker_url": f"http://127.0.0.1:{free_port()}",
                "dashboard_url": f"http://127.0.0.1:{free_port()}",
                "worker_app_id": f"qm-{unique}",
            },
        },
    )
    document = merge(document, overrides or {})
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return load_config(path), path


@pytest.fixture
def config_factory(tmp_path: Path, redis_url: str, kafka_bootstrap: str, unique: str) -> ConfigFactory:
    """Write a config for this test (``make_config``) with ``overrides``."""

    def make(overrides: dict[str, Any] | None = None) -> tuple[Config, Path]:
        return make_config(tmp_path, redis_url, kafka_bootstrap, unique, overrides)

    return make


CliRunner = Callable[..., ManagedProcess]


@pytest.fixture
def cli_process(tmp_path: Path) -> Iterator[CliRunner]:
    """Start ``quotameter ARGS…`` as a real child process; stopped after the test."""
    started: list[ManagedProcess] = []

    def start(name: str, *args: str, config_path: Path | None = None, env: dict[str, str] | None = None) -> ManagedProcess:
        full_env = dict(env or {})
        if config_path is not None:
            full_env["QUOTAMETER_CONFIG"] = str(config_path)
        proc = ManagedProcess(
            name, [sys.executable, "-m", "quotameter", *args], tmp_path / f"{name}.log", env=full_env
        ).start()
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()
