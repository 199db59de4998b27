"""The shim's upstream session keeps no cookies: a ``Set-Cookie`` in one
customer's answer must never ride on another customer's request. The model
server is named by host name (``localhost``), as in production: aiohttp's
cookie jar ignores cookies of bare IP addresses, which hid this."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway_shim.upstream import Upstream
from quotameter.config import Upstream as UpstreamConfig


async def test_a_cookie_set_for_one_request_is_not_sent_with_the_next() -> None:
    seen: list[str | None] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        response = web.json_response({"ok": True})
        response.set_cookie("session", f"customer-{len(seen)}")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    upstream = Upstream(UpstreamConfig(url=f"http://localhost:{port}/v1"))
    await upstream.start()
    try:
        for customer in ("acme", "globex"):
            client_request = make_mocked_request("POST", "/v1/chat/completions", headers={"X-Customer": customer})
            async with upstream.open(client_request, "/chat/completions", b"{}") as response:
                assert response.status == 200
                assert response.headers["Set-Cookie"].startswith("session=customer-")  # passed on to its client
        assert seen == [None, None]
    finally:
        await upstream.close()
        await runner.cleanup()
