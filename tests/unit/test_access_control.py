"""The pure parts of access control: the admin token gate, the bind rule,
the failed-authentication limiter (time injected) and secrets from files."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from gateway_shim.auth_failures import AuthFailures
from gateway_shim.errors import TooManyAuthFailures
from quotameter.config import DEFAULT_CONFIG, parse_config
from quotameter.errors import ConfigError
from quotameter.service_auth import TokenGate, is_loopback, require_token_off_loopback

TOKEN = "t0ken-for-tests"


def basic(password: str, user: str = "quotameter") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_the_gate_takes_the_token_as_bearer_basic_password_or_clickhouse_key() -> None:
    gate = TokenGate(SecretStr(TOKEN))
    assert gate.allows({"Authorization": f"Bearer {TOKEN}"})
    assert gate.allows({"Authorization": f"bearer  {TOKEN} "})
    assert gate.allows(basic(TOKEN)) and gate.allows(basic(TOKEN, user=""))
    assert gate.allows({"X-ClickHouse-User": "default", "X-ClickHouse-Key": TOKEN})
    for wrong in ({}, {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": TOKEN}, basic(TOKEN[:-1]),
                  {"Authorization": "Basic !!!"}, {"Authorization": f"Token {TOKEN}"}, basic("", user=TOKEN)):
        assert not gate.allows(wrong), wrong
    assert gate.headers() == {"Authorization": f"Bearer {TOKEN}"}
    assert TOKEN not in repr(gate)


def test_without_a_token_the_gate_is_open_and_callers_send_nothing() -> None:
    gate = TokenGate(None)
    assert gate.allows({}) and gate.headers() == {} and not gate.enabled
    assert not TokenGate(SecretStr("")).enabled


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("10.1.2.3", False), ("worker.internal", False),
])
def test_only_loopback_runs_without_a_token(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    if loopback:
        require_token_off_loopback(host, TokenGate(None), "the worker")
    else:
        with pytest.raises(ConfigError, match="services.admin_token"):
            require_token_off_loopback(host, TokenGate(None), "the worker")
    require_token_off_loopback(host, TokenGate(SecretStr(TOKEN)), "the worker")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_n_failures_a_minute_then_429_until_one_ages_out() -> None:
    clock = Clock()
    failures = AuthFailures(20, 100, [], clock)
    for _ in range(20):
        failures.check("192.0.2.1")
        failures.failed("192.0.2.1")
    with pytest.raises(TooManyAuthFailures) as refused:
        failures.check("192.0.2.1")
    assert refused.value.status == 429 and 2.9 < refused.value.retry_after_s <= 3.0  # 60 s / 20
    failures.check("192.0.2.2")  # another address is unaffected
    clock.now += 3.01
    failures.check("192.0.2.1")  # one failure aged out: one more try
    failures.failed("192.0.2.1")
    with pytest.raises(TooManyAuthFailures):
        failures.check("192.0.2.1")
    clock.now += 60
    failures.check("192.0.2.1")


def test_a_slow_guesser_is_never_blocked_and_zero_means_no_limit() -> None:
    clock = Clock()
    failures = AuthFailures(20, 100, [], clock)
    for _ in range(100):
        failures.check("192.0.2.1")
        failures.failed("192.0.2.1")
        clock.now += 3.0
    off = AuthFailures(0, 100, [], clock)
    for _ in range(100):
        off.failed("192.0.2.1")
    off.check("192.0.2.1")
    assert len(off) == 0


def test_memory_is_bounded_and_ipv6_counts_per_64() -> None:
    clock = Clock()
    failures = AuthFailures(2, 1000, [], clock)
    for n in range(5000):
        failures.failed(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}")
    assert len(failures) == 1000
    for n in range(2):
        failures.failed(f"2001:db8:1:2::{n + 1}")
    with pytest.raises(TooManyAuthFailures):
        failures.check("2001:db8:1:2:ffff::9")  # same /64
    failures.check("2001:db8:1:3::1")


class Request:
    def __init__(self, remote: str, forwarded: str | None = None) -> None:
        self.remote = remote
        self.headers = {"X-Forwarded-For": forwarded} if forwarded is not None else {}


def test_forwarded_for_is_believed_from_trusted_proxies_only() -> None:
    failures = AuthFailures(20, 100, ["127.0.0.1", "10.0.0.0/8"])
    assert failures.client_of(Request("127.0.0.1", "6.6.6.6, 192.0.2.7")) == "192.0.2.7"
    assert failures.client_of(Request("10.2.3.4", " 192.0.2.8 ")) == "192.0.2.8"
    assert failures.client_of(Request("192.0.2.9", "192.0.2.7")) == "192.0.2.9"  # not a trusted peer
    assert failures.client_of(Request("127.0.0.1", "not-an-address")) == "127.0.0.1"
    assert failures.client_of(Request("127.0.0.1")) == "127.0.0.1"
    assert AuthFailures(20, 100, []).client_of(Request("127.0.0.1", "192.0.2.7")) == "127.0.0.1"


def _config(**sections: object) -> object:
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for name, values in sections.items():
        document[name] = {**document.get(name, {}), **values}
    return parse_config(document)


def test_secrets_come_from_files(tmp_path: Path) -> None:
    (tmp_path / "admin").write_text(f"  {TOKEN}\n")
    (tmp_path / "ingest").write_text("ingest-secret\n")
    config = _config(services={"admin_token_file": str(tmp_path / "admin")},
                     shim={"ingest_token_file": str(tmp_path / "ingest"), "trusted_proxies": ["10.0.0.0/8"]})
    assert config.services.admin_token.get_secret_value() == TOKEN
    assert config.shim.ingest_token.get_secret_value() == "ingest-secret"
    assert TOKEN not in repr(config) and "ingest-secret" not in repr(config)
    with pytest.raises(ConfigError, match="admin_token or admin_token_file, not both"):
        _config(services={"admin_token": "x", "admin_token_file": str(tmp_path / "admin")})
    with pytest.raises(ConfigError, match="admin_token_file: cannot read"):
        _config(services={"admin_token_file": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="admin_token_file: .* is empty"):
        _config(shim={"admin_token_file": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match="shim.trusted_proxies"):
        _config(shim={"trusted_proxies": ["10.0.0.0/33"]})
