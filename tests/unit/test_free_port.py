"""free_port() with a range: never a port it handed out, never one listened on."""

from __future__ import annotations

import socket

import pytest

from quotameter.embedded import procs
from quotameter.errors import ServiceError


@pytest.fixture
def ports(monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    # A range of its own, apart from the one this xdist worker's tests use.
    low, high = 32_700, 32_709  # ten ports above the workers' ranges, below the ephemeral one
    monkeypatch.setenv(procs.PORTS_ENV, f"{low}-{high}")
    monkeypatch.setattr(procs, "_next_port", None)
    return low, high


def test_ports_come_from_the_range_and_are_not_handed_out_twice(ports: tuple[int, int]) -> None:
    low, high = ports
    picked = [procs.free_port() for _ in range(high - low + 1)]
    assert sorted(picked) == list(range(low, high + 1))  # each once, before the range wraps


def test_a_port_listened_on_is_skipped(ports: tuple[int, int]) -> None:
    low, high = ports
    first = procs.free_port()
    taken = low if first == high else first + 1
    with socket.create_server(("127.0.0.1", taken)):
        assert procs.free_port() != taken


def test_a_range_with_every_port_taken_is_an_error(ports: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    low, _ = ports
    with socket.create_server(("127.0.0.1", low)):
        monkeypatch.setenv(procs.PORTS_ENV, f"{low}-{low}")
        with pytest.raises(ServiceError, match="no free port"):
            procs.free_port()


@pytest.mark.parametrize("span", ["20000", "b-c", "30000-20000", "0-10"])
def test_a_malformed_range_is_named(span: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(procs.PORTS_ENV, span)
    with pytest.raises(ServiceError, match="QUOTAMETER_PORTS"):
        procs.free_port()


def test_without_a_range_the_kernel_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(procs.PORTS_ENV, raising=False)
    port = procs.free_port()
    with socket.create_server(("127.0.0.1", port)):  # it was free
        pass
