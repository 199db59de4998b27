"""deploy/compose/compose.yaml, checked without a Docker engine: against the
Compose Specification's JSON schema (as check-jsonschema ships it), every
quotameter container's settings through quotameter's own Config, and what
points at what (depends_on, mounted files, ports, hosts, the Kafka quorum).

The file is read as `docker compose` reads it from its directory after
`cp example.env .env`: YAML anchors and merge keys, then ``${VAR}``
interpolation from example.env.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from dotenv import dotenv_values

from pipeline.history.clickhouse_store import parse_history_url
from quotameter.cli import app
from quotameter.config import ENV_PREFIX, Config, load_config
from tests.integration.packaging_helpers import REPO, stages
from tests.integration.prometheus_binaries import binary

COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
IMAGE = "quotameter:0.1.0"
CONFIG_TARGET = "/etc/quotameter/config.yaml"
KAFKA_SERVICES = {"kafka-1", "kafka-2", "kafka-3"}
# The ledger's schema command arrives with the ClickHouse migrations.
COMMANDS = {command.name for command in app.registered_commands} | {"migrate"}

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR; $$ is a literal $.
_VARIABLE = re.compile(r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, variables: dict[str, str]) -> Any:
    """Compose's interpolation of every string in the parsed file."""
    if isinstance(value, dict):
        return {key: interpolate(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, variables) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("plain")
        op, arg = match.group("op"), match.group("arg")
        present = variables.get(name)
        empty = present is None or (present == "" and op is not None and op.startswith(":"))
        if op in (":-", "-") and empty:
            return arg
        if op in (":?", "?") and empty:
            raise AssertionError(f"compose would refuse to start: {name}: {arg}")
        return present or ""

    return _VARIABLE.sub(replace, value)


def load(path: Path = COMPOSE_FILE, env_path: Path = COMPOSE_DIR / "example.env") -> dict[str, Any]:
    variables = {k: v for k, v in dotenv_values(env_path).items() if v is not None}
    return interpolate(yaml.safe_load(path.read_text()), variables)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load()


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def quotameter_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The shims, workers and the migrate job (not the mock model)."""
    return {
        name: service for name, service in services(compose).items()
        if service.get("image") == IMAGE and service["command"][0] in {"proxy", "worker", "migrate"}
    }


def environment(service: dict[str, Any]) -> dict[str, str]:
    """env_file, then environment on top, as compose builds it."""
    env: dict[str, str] = {}
    for name in [service["env_file"]] if isinstance(service.get("env_file"), str) else service.get("env_file", []):
        env.update({k: v or "" for k, v in dotenv_values(COMPOSE_DIR / name).items()})
    given = service.get("environment", {})
    if isinstance(given, list):
        given = dict(item.split("=", 1) for item in given)
    env.update({k: "" if v is None else str(v) for k, v in given.items()})
    return env


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """target -> host path of the service's bind mounts (not named volumes)."""
    out: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            out[target] = (COMPOSE_DIR / source).resolve()
    return out


@pytest.fixture
def service_config(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Config of one service: its mounted file, its environment and nothing else."""

    def parse(service: dict[str, Any]) -> Config:
        for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
            monkeypatch.delenv(name)
        env = environment(service)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert env.get(f"{ENV_PREFIX}CONFIG") == CONFIG_TARGET, "the image reads its config from /etc/quotameter/config.yaml"
        mounted = bind_mounts(service)
        assert CONFIG_TARGET in mounted, f"no config file is mounted at {CONFIG_TARGET}"
        return load_config(mounted[CONFIG_TARGET])

    yield parse


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


# ---------------------------------------------------------------- the schema


def test_the_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    # Located through the distribution's file list: importing check_jsonschema
    # loads its CLI, which needs a newer click than typer's.
    spec = [f for f in metadata.files("check-jsonschema") or [] if f.name == "compose-spec.json"]
    assert len(spec) == 1, "check-jsonschema ships no compose-spec.json: `make test` installs it"
    schema = json.loads(spec[0].read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])


# ---------------------------------------------------------------- quotameter's settings


def test_every_quotameter_service_is_a_valid_config_pointing_at_the_compose_services(
    compose: dict[str, Any], service_config: Any
) -> None:
    all_services = services(compose)
    ours = quotameter_services(compose)
    assert {s["command"][0] for s in ours.values()} == {"proxy", "worker", "migrate"}
    assert sum(s["command"][0] == "proxy" for s in ours.values()) == 2
    assert sum(s["command"][0] == "worker" for s in ours.values()) == 2
    for name, service in ours.items():
        config = service_config(service)
        where = f"service {name}"
        redis_url = urlsplit(config.services.redis_url)
        assert (redis_url.scheme, redis_url.hostname, redis_url.port) == ("redis", "redis", 6379), where
        assert redis_url.password == environment(all_services["redis"])["REDIS_PASSWORD"], where
        brokers = [host_port(a) for a in config.services.kafka_bootstrap.split(",")]
        assert {h for h, _ in brokers} == KAFKA_SERVICES and {p for _, p in brokers} == {19092}, where
        history = urlsplit(config.services.history_url.get_secret_value())
        clickhouse = environment(all_services["clickhouse"])
        # As the store reads it (its own parser), and the password as the server has it.
        server = parse_history_url(config.services.history_url.get_secret_value())
        assert (server.host, server.port, server.username, server.secure) == ("clickhouse", 8123, clickhouse["CLICKHOUSE_USER"], False), where
        assert (history.password, history.path) == (clickhouse["CLICKHOUSE_PASSWORD"], f"/{clickhouse['CLICKHOUSE_DB']}"), where
        assert config.services.admin_token is not None and config.services.admin_token.get_secret_value(), where
        assert urlsplit(config.upstream.url).hostname in all_services, where
        command = service["command"][0]
        if command == "proxy":
            assert config.shim.instance == name, where
            assert config.shim.host == "0.0.0.0", where
            published = {host_port(p)[1] for p in service["ports"]}
            assert published == {config.shim.port}, f"{where}: publishes {published}, listens on {config.shim.port}"
            assert urlsplit(config.services.worker_url).hostname in all_services, where
            mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
            assert mounts.get(str(config.shim.spool_dir)) == f"{name}-spool", f"{where}: its spool is not its own volume"
        if command == "worker":
            worker = urlsplit(config.services.worker_url)
            assert (worker.hostname, worker.port) == ("0.0.0.0", 6066), where
            assert environment(service)["HEALTHCHECK_URL"] == f"http://127.0.0.1:{worker.port}/healthz", where
    shim_instances = [service_config(s).shim.instance for s in ours.values() if s["command"][0] == "proxy"]
    assert len(set(shim_instances)) == len(shim_instances)


def test_every_command_is_one_the_image_runs(compose: dict[str, Any]) -> None:
    for name, service in services(compose).items():
        if service.get("image") == IMAGE:
            assert service["command"][0] in COMMANDS, f"{name}: quotameter has no command {service['command'][0]}"
            assert service.get("build") == "../..", f"{name} builds the image from the repository root"


def test_no_secret_is_written_in_the_compose_file() -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    secret_name = re.compile(r"PASSWORD|TOKEN|SECRET|_KEY$")
    for name, service in raw["services"].items():
        env = service.get("environment", {})
        for variable, value in (env.items() if isinstance(env, dict) else ()):
            value = str(value)
            if secret_name.search(variable) or urlsplit(value).password:
                assert re.search(r"\$\{\w+:\?", value), f"{name}: {variable} holds a secret that does not come from .env"
    # The shared settings of the quotameter containers (a merge key) too.
    for variable, value in raw["x-quotameter-env"].items():
        if secret_name.search(variable) or urlsplit(str(value)).password:
            assert re.search(r"\$\{\w+:\?", str(value)), f"{variable} holds a secret that does not come from .env"


# ---------------------------------------------------------------- what points at what


def healthchecked(service: dict[str, Any]) -> bool:
    if "healthcheck" in service:
        return not service["healthcheck"].get("disable", False)
    return service.get("image") == IMAGE and stages()[-1].last("HEALTHCHECK") is not None


def test_every_dependency_names_a_service_that_can_satisfy_it(compose: dict[str, Any]) -> None:
    all_services = services(compose)
    for name, service in all_services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in all_services, f"{name} depends on {dependency}, which is not a service"
            if condition["condition"] == "service_healthy":
                assert healthchecked(all_services[dependency]), f"{name} waits for {dependency} to be healthy: it has no healthcheck"
            if condition["condition"] == "service_completed_successfully":
                assert all_services[dependency].get("restart") == "no", f"{name} waits for {dependency} to exit: it is restarted"
    for name, service in quotameter_services(compose).items():
        if service["command"][0] != "migrate":
            condition = service["depends_on"].get("migrate", {}).get("condition")
            assert condition == "service_completed_successfully", f"{name} starts before the ledger's schema is applied"


def test_every_mounted_file_exists(compose: dict[str, Any]) -> None:
    named = set(compose.get("volumes", {}))
    for name, service in services(compose).items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in named, f"{name} mounts volume {source}, which is not declared"
        for target, path in bind_mounts(service).items():
            assert path.exists(), f"{name} mounts {path} at {target}: no such file"
        env_files = service.get("env_file", [])
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            assert (COMPOSE_DIR / env_file).is_file(), f"{name}: no env file {env_file}"
        if "build" in service:
            assert (COMPOSE_DIR / service["build"] / "Dockerfile").is_file(), f"{name}: no Dockerfile in {service['build']}"


def test_no_two_services_publish_the_same_host_port(compose: dict[str, Any]) -> None:
    taken: dict[tuple[str, int], str] = {}
    for name, service in services(compose).items():
        for port in service.get("ports", []):
            parts = str(port).split(":")
            address, host_port_ = (parts[0], int(parts[1])) if len(parts) == 3 else ("0.0.0.0", int(parts[0]))
            for other in (address, "0.0.0.0") if address != "0.0.0.0" else ("0.0.0.0", *{a for a, _ in taken}):
                assert (other, host_port_) not in taken, f"{name} and {taken.get((other, host_port_))} both publish port {host_port_}"
            taken[(address, host_port_)] = name


def test_the_kafka_brokers_form_one_quorum_advertising_their_own_names(compose: dict[str, Any]) -> None:
    brokers = {name: environment(s) for name, s in services(compose).items() if s.get("image", "").startswith("apache/kafka:")}
    assert set(brokers) == KAFKA_SERVICES
    voters = {env["KAFKA_CONTROLLER_QUORUM_VOTERS"] for env in brokers.values()}
    assert len(voters) == 1 and len({env["CLUSTER_ID"] for env in brokers.values()}) == 1
    expected = {f"{env['KAFKA_NODE_ID']}@{name}:9093" for name, env in brokers.items()}
    assert set(voters.pop().split(",")) == expected
    for name, env in brokers.items():
        assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{name}:19092", name
        assert int(env["KAFKA_MIN_INSYNC_REPLICAS"]) == 2 and int(env["KAFKA_DEFAULT_REPLICATION_FACTOR"]) == 3, name


def test_grafana_has_every_variable_its_provisioning_reads(compose: dict[str, Any]) -> None:
    grafana = services(compose)["grafana"]
    provisioning = bind_mounts(grafana)["/etc/grafana/provisioning"]
    wanted = {m for f in provisioning.rglob("*.yaml") for m in re.findall(r"\$\{(\w+)\}", f.read_text())}
    env = environment(grafana)
    assert wanted and wanted <= set(env), f"Grafana lacks {wanted - set(env)}"
    assert env["CLICKHOUSE_HOST"] in services(compose)
    assert env["CLICKHOUSE_PASSWORD"] == environment(services(compose)["clickhouse"])["CLICKHOUSE_GRAFANA_PASSWORD"]
    assert "grafana-clickhouse-datasource" in env["GF_INSTALL_PLUGINS"]


def test_prometheus_scrapes_every_shim_and_worker_and_its_config_checks(compose: dict[str, Any], tmp_path: Path) -> None:
    prometheus = services(compose)["prometheus"]
    mounts = bind_mounts(prometheus)
    document = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    targets = {t for job in document["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    expected = {
        f"{name}:{8080 if s['command'][0] == 'proxy' else 6066}"
        for name, s in quotameter_services(compose).items() if s["command"][0] in {"proxy", "worker"}
    }
    assert targets == expected
    # Laid out as in the container, then checked by promtool (rule files included).
    for target, path in mounts.items():
        (tmp_path / Path(target).name).write_bytes(path.read_bytes())
    checked = subprocess.run(
        [binary("promtool"), "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True, timeout=30, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
