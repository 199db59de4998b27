"""What the shim built at startup is frozen out of the garbage collector's
walks: a full collection then costs what requests left, not the ~90k objects
of modules, config and clients (~85 ms a walk on a 2-core machine)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gateway_shim.server import build_app, freeze_startup_heap
from quotameter.config import load_config


@pytest.fixture
def unfreeze() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_the_startup_heap_is_not_walked_by_collections(unfreeze: None) -> None:
    app = build_app(load_config())
    assert any(tracked is app for tracked in gc.get_objects())
    freeze_startup_heap()
    assert not any(tracked is app for tracked in gc.get_objects())  # frozen: no collection walks it
    assert gc.get_freeze_count() >= 10_000
    later = [["made after startup"]]
    assert any(tracked is later for tracked in gc.get_objects())  # a request's objects are still collected
