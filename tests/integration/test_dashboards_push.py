"""`quotameter dashboards push` against a tiny real HTTP server standing in for Grafana."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from dashboards.catalog import config_constants
from dashboards.grafana import build_all
from dashboards.push import GrafanaPushError, push_dashboards
from quotameter.config import DEFAULT_CONFIG, load_config


class FakeGrafana:
    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.folders: dict[str, str] = {}
        self.saved: list[dict[str, Any]] = []
        self.auth: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/folders/{uid}", self.get_folder)
        app.router.add_post("/api/folders", self.create_folder)
        app.router.add_post("/api/dashboards/db", self.save)
        return app

    def _refuse(self, request: web.Request) -> web.Response | None:
        self.auth.append(request.headers.get("Authorization", ""))
        if self.status == 401:
            return web.json_response({"message": "invalid API key"}, status=401)
        return None

    async def get_folder(self, request: web.Request) -> web.Response:
        if (refused := self._refuse(request)) is not None:
            return refused
        uid = request.match_info["uid"]
        if uid not in self.folders:
            return web.json_response({"message": "folder not found"}, status=404)
        return web.json_response({"uid": uid, "title": self.folders[uid]})

    async def create_folder(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.folders[body["uid"]] = body["title"]
        return web.json_response({"uid": body["uid"], "title": body["title"]})

    async def save(self, request: web.Request) -> web.Response:
        if self.status == 412:
            return web.json_response({"message": "The dashboard has been changed by someone else",
                                      "status": "version-mismatch"}, status=412)
        body = await request.json()
        self.saved.append(body)
        uid = body["dashboard"]["uid"]
        return web.json_response({"status": "success", "uid": uid, "url": f"/d/{uid}/x", "version": 1})


@pytest.fixture
async def grafana(request: pytest.FixtureRequest) -> Iterator[tuple[FakeGrafana, str]]:
    fake = FakeGrafana(getattr(request, "param", 200))
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    yield fake, str(server.make_url("")).rstrip("/")
    await server.close()


def _dashboards() -> dict[str, dict[str, Any]]:
    return build_all(config_constants(load_config(DEFAULT_CONFIG)))


async def _push(url: str) -> list[str]:
    import asyncio

    return await asyncio.get_running_loop().run_in_executor(None, push_dashboards, url, "tok-123", _dashboards())


async def test_push_creates_the_folder_and_overwrites_by_uid(grafana: tuple[FakeGrafana, str]) -> None:
    fake, url = grafana
    urls = await _push(url)
    assert fake.folders == {"quotameter": "quotameter"}
    assert [s["dashboard"]["uid"] for s in fake.saved] == ["quotameter-billing", "quotameter-quotas",
                                                           "quotameter-operations", "quotameter-service-health"]
    assert all(s["overwrite"] is True and s["folderUid"] == "quotameter" for s in fake.saved)
    assert fake.auth[0] == "Bearer tok-123"
    assert urls[0] == f"{url}/d/quotameter-billing/x"
    await _push(url)  # again: the folder is found, not created twice
    assert len(fake.saved) == 8


@pytest.mark.parametrize("grafana", [401], indirect=True)
async def test_a_refused_token_is_a_clear_error(grafana: tuple[FakeGrafana, str]) -> None:
    _, url = grafana
    with pytest.raises(GrafanaPushError, match=r"answered 401 .*invalid API key.*service-account token"):
        await _push(url)


@pytest.mark.parametrize("grafana", [412], indirect=True)
async def test_a_version_mismatch_is_a_clear_error(grafana: tuple[FakeGrafana, str]) -> None:
    _, url = grafana
    with pytest.raises(GrafanaPushError, match=r"answered 412 while saving dashboard 'quotameter-billing'.*push again"):
        await _push(url)


@pytest.mark.parametrize("grafana", [401], indirect=True)
async def test_cli_push_exits_non_zero_with_the_reason(grafana: tuple[FakeGrafana, str]) -> None:
    import asyncio

    _, url = grafana
    command = [sys.executable, "-m", "quotameter", "dashboards", "push", "--url", url, "--token", "bad"]
    proc = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 1, (out, err)
    assert "answered 401" in err.decode()  # the reason reaches the operator


def test_unreachable_grafana_is_a_clear_error() -> None:
    from quotameter.embedded.procs import free_port

    with pytest.raises(GrafanaPushError, match="cannot reach Grafana"):
        push_dashboards(f"http://127.0.0.1:{free_port()}", "tok", _dashboards())
