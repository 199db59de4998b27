"""``GET /v1/usage`` through the running shim, with totals a real worker wrote."""

from __future__ import annotations

import aiohttp

from tests.integration.enforcement_helpers import shim_factory  # noqa: F401 - fixture
from tests.integration.pipeline_helpers import redis_usage, start_worker, wait_for

ADMIN = "admin-token-for-tests-only"
TIERS = {"pro": {"monthly_tokens": 1_000_000, "monthly_budget_usd": "10.00"}}
MESSAGES = [{"role": "user", "content": "Name some words."}]
# Per request: 11 prompt tokens (3 + "user" 1 + 4 + 3, o200k_base) and the 20
# asked for; mock-small costs $0.10 in and $0.40 out per 1M tokens.
INPUT, OUTPUT = 11, 20


async def get(url: str, token: str | None) -> tuple[int, dict, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers=headers) as response:
            text = await response.text()
            return response.status, await response.json(content_type=None), text


async def test_usage_endpoint_is_scoped_to_the_key_and_open_to_the_admin(shim_factory, cli_process) -> None:  # noqa: F811
    shim = await shim_factory(TIERS, shim={"admin_token": ADMIN})
    start_worker(cli_process, shim.config, shim.config_path, "worker")
    acme_key, beta_key = shim.new_key("acme", "pro"), shim.new_key("beta", "pro")
    for key, count in ((acme_key, 2), (beta_key, 1)):
        client = shim.client(key)
        for _ in range(count):
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=20)
        await client.close()
    period = shim.period()
    acme = wait_for(lambda: (h := redis_usage(shim.config, "acme", period)).get("requests") == "2" and h, what="acme totals")
    wait_for(lambda: redis_usage(shim.config, "beta", period).get("requests") == "1", what="beta totals")
    url = f"{shim.base_url}/usage"

    status, body, text = await get(url, acme_key)
    assert status == 200, body
    assert (body["object"], body["customer"], body["tier"], body["period"]) == ("usage", "acme", "pro", period)
    usage = body["usage"]
    assert {name: usage[name] for name in ("requests", "refused", "input_tokens", "output_tokens", "total_tokens", "cost_usd")} == {
        "requests": 2, "refused": 0, "input_tokens": 2 * INPUT, "output_tokens": 2 * OUTPUT,
        "total_tokens": 2 * (INPUT + OUTPUT), "cost_usd": "0.000018200000",
    }
    assert (usage["input_tokens"], usage["cost_usd"]) == (int(acme["input_tokens"]), acme["cost_usd"])
    # The worker's write that brought these totals released the reservations they include.
    assert body["reserved"] == {"tokens": 0, "cost_usd": "0.000000000000"}
    assert body["limits"] == {"monthly_tokens": 1_000_000, "monthly_budget_usd": "10.000000000000"}
    assert body["remaining"] == {"tokens": 1_000_000 - 2 * (INPUT + OUTPUT), "budget_usd": "9.999981800000"}
    assert "beta" not in text and acme_key not in text and acme_key.split("_")[1] not in text

    status, body, text = await get(url, beta_key)
    assert status == 200 and body["customer"] == "beta" and body["usage"]["requests"] == 1 and "acme" not in text

    # A key never reads another customer.
    status, body, text = await get(f"{url}?customer=beta", acme_key)
    assert status == 403 and body["error"]["code"] == "permission_denied" and "beta\"" not in text
    # The admin token reads any customer, one at a time.
    status, body, _ = await get(f"{url}?customer=beta", ADMIN)
    assert status == 200 and body["customer"] == "beta" and body["usage"]["requests"] == 1
    status, body, _ = await get(url, ADMIN)
    assert status == 400
    status, body, _ = await get(f"{url}?customer=nobody", ADMIN)
    assert status == 404
    # Bad or missing credentials: 401, OpenAI-style.
    for token in ("qm_000000000000_wrong", ADMIN + "x", None):
        status, body, _ = await get(f"{url}?customer=acme", token)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body, _ = await get(f"{url}?period=March", acme_key)
    assert status == 400 and "YYYY-MM" in body["error"]["message"]
