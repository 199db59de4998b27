"""Nothing that reads or changes data answers without its credential: real
worker, dashboard, ledger-server and shim processes, as an operator runs them.

- services.admin_token guards the worker's views, the dashboard and
  ledger-server; the CLI and the dashboard send it; without one, none of them
  starts on a non-loopback address.
- Wrong keys and tokens are rate-limited per client address (429) on the
  proxy, /v1/check, /v1/events and /v1/usage.
- A revoked key is refused by the proxy and /v1/check within a second.
- /query runs only a plain SELECT over the ledger's database.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from dashboards.catalog import DASHBOARDS, config_constants
from dashboards.macros import TimeRange, Variables, expand
from dashboards.query import exact_decimals
from gateway_shim.keystore import revoke_key
from pipeline.history import schema
from pipeline.history.chdb_store import ChdbHistory
from pipeline.history.clickhouse_store import ClickHouseHistory
from pipeline.history.sql_guard import vet
from pipeline.history.store import HistoryError, QueryRejected
from quotameter import export_sql
from quotameter.config import load_config
from quotameter.embedded.procs import free_port, port_open
from quotameter.redis_keys import RedisKeys
from tests.integration.enforcement_helpers import MESSAGES, shim_factory  # noqa: F401 - fixture
from tests.integration.pipeline_helpers import ACME_EVENTS, AT, PERIOD, ledger_has, produce, start_worker, wait_for
from tests.integration.test_ingest import event

ADMIN = "service-admin-token-for-tests-only"
SHIM_ADMIN = "usage-admin-token-for-tests-only"
INGEST = "ingest-token-for-tests-only"
TIERS = {"pro": {"requests_per_minute": 1000, "monthly_tokens": 1_000_000}}

# Each must be refused by POST /query, whatever the fence that stops it.
HOSTILE_SQL = [
    "INSERT INTO quotameter.events (id, customer) VALUES ('forged', 'acme')",
    "DROP TABLE quotameter.events",
    "ALTER TABLE quotameter.events DELETE WHERE 1",
    "TRUNCATE TABLE quotameter.events",
    "CREATE TABLE quotameter.x (a Int8) ENGINE = Memory",
    "SELECT 1; DROP TABLE quotameter.events",
    "SELECT count() FROM quotameter.events SETTINGS readonly = 0",
    "SELECT name FROM system.tables",
    "SELECT name FROM system.databases",
    "SELECT * FROM information_schema.tables",
    "SELECT * FROM default.events",
    "SELECT * FROM events",
    "SELECT * FROM file('/etc/passwd', 'LineAsString')",
    "SELECT file('/etc/hostname')",
    "SELECT * FROM url('http://127.0.0.1:9/x', 'LineAsString')",
    "SELECT * FROM s3('http://127.0.0.1:9/bucket/x.csv', 'CSV')",
    "SELECT * FROM remote('127.0.0.1', system.one)",
    "SELECT * FROM numbers(10)",
    "SELECT count() FROM quotameter.events WHERE 1 IN system.numbers",
    "WITH (SELECT count() FROM system.users) AS n SELECT n",
    "SELECT * FROM quotameter.events AS e JOIN system.tables AS t ON e.customer = t.name",
    "SELECT customer FROM quotameter.events WHERE customer IN (SELECT name FROM system.tables)",
    "SELECT dictGet('d', 'a', toUInt64(1))",
    "SELECT joinGet('j', 'v', 1)",
    "SELECT sleep(3)",
]


def call(url: str, token: str | None = None, body: str | None = None, basic: bool = False) -> tuple[int, Any]:
    headers = {}
    if token is not None:
        headers["Authorization"] = (
            "Basic " + base64.b64encode(f"anyone:{token}".encode()).decode() if basic else f"Bearer {token}"
        )
    request = urllib.request.Request(url, data=body.encode() if body is not None else None, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw.decode(errors="replace")


def answers(url: str) -> bool:
    try:
        return call(url)[0] == 200
    except OSError:
        return False


def refuses_to_start(argv: list[str], env: dict[str, str], port: int) -> str:
    """Run a server that must exit before it listens; its error text."""
    done = subprocess.run([sys.executable, "-m", "quotameter", *argv], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, done.stdout + done.stderr
    assert not port_open("127.0.0.1", port)
    return done.stdout + done.stderr


# -- the worker, the CLI and the dashboard ----------------------------------------------


def test_worker_and_dashboard_need_the_admin_token_the_cli_sends_it_and_sql_stays_in_the_ledger(config_factory, cli_process, tmp_path) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN + "\n")  # a mounted secret: read at start, whitespace stripped
    config, path = config_factory({"services": {"admin_token_file": str(token_file)}})
    assert config.services.admin_token is not None and config.services.admin_token.get_secret_value() == ADMIN
    start_worker(cli_process, config, path, "worker")
    asyncio.run(produce(config, list(ACME_EVENTS)))
    worker = config.services.worker_url
    usage_url = f"{worker}/usage?customer=acme&period={PERIOD}"
    wait_for(ledger_has(config, "acme", 3), what="acme in the ledger")  # the tests' helper sends the token too

    assert call(f"{worker}/healthz")[0] == 200  # the supervisor's probe stays open
    count_sql = "SELECT count() AS n FROM quotameter.events WHERE customer = 'acme'"
    for url, body in [(f"{worker}/query", count_sql), (f"{worker}/rebuild-state?month={PERIOD}", ""),
                      (usage_url, None), (f"{worker}/stats", None), (f"{worker}/windows?customer=acme", None)]:
        for wrong in (None, "not-the-token", ADMIN + "x"):
            status, answer = call(url, wrong, body)
            assert status == 401, (url, wrong, status, answer)
            assert "services.admin_token" in json.dumps(answer)
    # Faust's own pages (table contents) are not served at all.
    assert call(f"{worker}/table/")[0] == 404 and call(f"{worker}/router/")[0] == 404

    assert call(f"{worker}/query", ADMIN, count_sql) == (200, {"rows": [{"n": 3}]})
    assert call(f"{worker}/query", ADMIN, count_sql, basic=True) == (200, {"rows": [{"n": 3}]})
    assert call(f"{worker}/rebuild-state?month={PERIOD}", ADMIN, "")[0] == 200

    # The CLI reads the token from the config and goes through the worker...
    env = {**os.environ, "QUOTAMETER_CONFIG": str(path)}
    done = subprocess.run([sys.executable, "-m", "quotameter", "rebuild-state", "--month", PERIOD],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and f"through the worker at {worker}" in done.stdout, done.stdout + done.stderr
    done = subprocess.run([sys.executable, "-m", "quotameter", "usage", "--customer", "acme", "--month", PERIOD, "--json"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert int(json.loads(done.stdout)["ledger"]["input_tokens"]) == 3000
    # ...and without it is refused (the worker holds the directory: no way around).
    done = subprocess.run([sys.executable, "-m", "quotameter", "rebuild-state", "--month", PERIOD],
                          env={**env, "QUOTAMETER_SERVICES__ADMIN_TOKEN_FILE": ""}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "answered 401" in " ".join(done.stderr.split()), done.stdout + done.stderr

    # The dashboard asks the browser for the token, and sends it to the worker.
    dashboard = cli_process("dashboard", "dashboard", config_path=path)
    dashboard_url = config.services.dashboard_url
    dashboard.wait_until(lambda: answers(f"{dashboard_url}/healthz"), 30, "dashboard /healthz")
    status, text = call(f"{dashboard_url}/dashboard/billing")
    assert status == 401 and "services.admin_token" in text
    request = urllib.request.Request(f"{dashboard_url}/api/dashboard/billing")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.headers["WWW-Authenticate"].startswith("Basic ")
    refused.value.close()
    assert call(f"{dashboard_url}/api/dashboard/billing", "wrong", basic=True)[0] == 401
    assert call(f"{dashboard_url}/static/plotly.min.js")[0] == 401
    range_ = f"from={int((AT - timedelta(days=1)).timestamp() * 1000)}&to={int((AT + timedelta(days=1)).timestamp() * 1000)}"
    status, data = call(f"{dashboard_url}/api/dashboard/billing?{range_}", ADMIN, basic=True)
    assert status == 200 and data["source"] == f"worker {worker}", data
    assert [p["error"] for p in data["panels"] if p["error"]] == []
    requests = next(p for p in data["panels"] if p["key"] == "total_requests")["rows"]
    assert requests and int(requests[0]["requests"]) == 2  # acme's two admitted requests
    status, page = call(f"{dashboard_url}/dashboard/billing?{range_}", ADMIN)  # a Bearer works too
    assert status == 200 and "<html" in page.lower()

    # /query with the token: one SELECT over the ledger's database, nothing else.
    total_sql = "SELECT count() AS n, sum(input_tokens) AS input FROM quotameter.events FINAL"
    outfile = tmp_path / "stolen.txt"
    for sql in [*HOSTILE_SQL, f"SELECT * FROM quotameter.events INTO OUTFILE '{outfile}'"]:
        for body in (sql, json.dumps({"sql": sql})):
            status, answer = call(f"{worker}/query", ADMIN, body)
            assert status == 400 and "rows" not in answer, (sql, status, answer)
    assert not outfile.exists()
    assert call(f"{worker}/query", ADMIN, total_sql) == (200, {"rows": [{"n": 3, "input": 3000}]})
    # What stays allowed: WITH names, subqueries and IN over the ledger's own tables.
    allowed = (
        "WITH acme AS (SELECT id, input_tokens FROM quotameter.events FINAL WHERE customer = 'acme') "
        "SELECT sum(input_tokens) AS input FROM acme WHERE id IN (SELECT id FROM quotameter.events)"
    )
    assert call(f"{worker}/query", ADMIN, allowed) == (200, {"rows": [{"input": 3000}]})


def test_the_guard_passes_the_products_own_queries_and_the_session_is_read_only(tmp_path) -> None:
    """The guard refuses nothing the product itself sends to /query."""
    store = ChdbHistory(tmp_path / "history")
    config = load_config()
    try:
        now = datetime.now(UTC)
        time_range = TimeRange(now - timedelta(days=7), now, interval_s=3600)
        variables = Variables(constants=config_constants(config))
        sqls = [expand(item.sql, time_range, variables) for board in DASHBOARDS for item in (*board.variables, *board.panels)]
        # As the built-in page sends them: filters the rollups lack selected (the ledger alone), money as text.
        one_key = Variables(selected={"api_key": ["key-1"], "end_user": ["u"], "project": ["p"], "tag": ["team=a"]},
                            constants=config_constants(config))
        sqls += [exact_decimals(p, expand(p.sql, time_range, one_key)) for board in DASHBOARDS for p in board.panels]
        start, end = config.billing.calendar.bounds(PERIOD)
        for name, function in inspect.getmembers(export_sql, inspect.isfunction):
            if name in ("customer_totals", "lines"):
                sqls.append(function(start, end, 100, 0))
        assert len(sqls) > 20
        for sql in sqls:
            text = schema.read_only_select(sql)
            assert text is not None, sql
            vet(store.explain_ast(text), text)
        for sql in HOSTILE_SQL[6:]:  # the SELECTs: the tree is what refuses them
            text = schema.read_only_select(sql)
            with pytest.raises((QueryRejected, HistoryError)):
                vet(store.explain_ast(text), text)
        # Past the guard, the read-only session (readonly=1) still refuses table
        # functions and settings: a fence of its own, should the guard miss one.
        for sql in ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "SELECT * FROM url('http://127.0.0.1:9/', 'CSV')",
                    "SELECT count() FROM quotameter.events SETTINGS max_threads = 1"):
            with pytest.raises(HistoryError, match="READONLY"):
                store.query(sql)
    finally:
        store.close()


@pytest.mark.parametrize("argv,what", [
    (["worker"], "the worker"),
    (["dashboard", "--host", "0.0.0.0"], "the dashboard"),
    (["ledger-server", "--host", "0.0.0.0"], "ledger-server"),
])
def test_no_token_no_listening_beyond_loopback(config_factory, tmp_path, argv, what) -> None:
    port = free_port()
    config, path = config_factory({"services": {"worker_url": f"http://0.0.0.0:{port}"}})
    args = [*argv, "--port", str(port)] if argv[0] != "worker" else argv
    if argv[0] == "ledger-server":
        args += ["--history-dir", str(tmp_path / "ledger")]
    text = " ".join(refuses_to_start(args, {"QUOTAMETER_CONFIG": str(path)}, port).split())  # unwrapped
    assert what in text and "services.admin_token" in text and "0.0.0.0" in text, text
    if argv[0] == "ledger-server":
        assert not (tmp_path / "ledger").exists()  # refused before the ledger was even opened


def test_ledger_server_takes_the_token_as_the_clickhouse_password(config_factory, cli_process, tmp_path, unique) -> None:
    config, path = config_factory({"services": {"admin_token": ADMIN}})
    port = free_port()
    server = cli_process("ledger", "ledger-server", "--history-dir", str(tmp_path / "ledger"), "--port", str(port),
                         config_path=path)
    server.wait_until(lambda: "ready on" in server.log_path.read_text(), 60, "ledger-server ready")
    base = f"http://127.0.0.1:{port}"
    assert call(f"{base}/ping")[0] == 200  # health checks stay open, as ClickHouse's
    for token in (None, "wrong"):
        status, text = call(f"{base}/?query=SELECT%201", token)
        assert status == 401 and "AUTHENTICATION_FAILED" in text, (status, text)
    assert call(f"{base}/?query=SELECT%2042", ADMIN) == (200, 42)
    with pytest.raises(HistoryError, match="516|Authentication failed"):
        ClickHouseHistory.from_url(f"clickhouse://quotameter:wrong@127.0.0.1:{port}/quotameter")
    store = ClickHouseHistory.from_url(f"clickhouse://quotameter:{ADMIN}@127.0.0.1:{port}/quotameter")
    try:
        assert store.query("SELECT count() AS n FROM quotameter.events") == [{"n": 0}]
        # The guard reads a ClickHouse server's parser as it reads chDB's.
        vet(store.explain_ast("SELECT count() FROM quotameter.events"), "SELECT count() FROM quotameter.events")
        for sql in ("SELECT name FROM system.tables", "SELECT * FROM file('/etc/passwd', 'LineAsString')",
                    "SELECT count() FROM quotameter.events SETTINGS max_threads = 1"):
            with pytest.raises(QueryRejected):
                vet(store.explain_ast(sql), sql)
    finally:
        store.close()


# -- the shim: failed authentications, revocation ---------------------------------------


async def _status(method: str, url: str, key: str | None, client: str | None = None, **kwargs: Any) -> tuple[int, Any]:
    headers = {**kwargs.pop("headers", {})}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if client is not None:
        headers["X-Forwarded-For"] = f"203.0.113.250, {client}"  # the first is the client's own claim: ignored
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, headers=headers, **kwargs) as response:
            body = await response.json(content_type=None)
            return response.status, (body, response.headers.get("Retry-After"))


def _endpoints(base: str) -> dict[str, Any]:
    """Per endpoint: a request with ``key`` as its credential."""
    chat = {"model": "mock-small", "messages": MESSAGES, "max_tokens": 5}
    return {
        "proxy": lambda key, client=None: _status("POST", f"{base}/v1/chat/completions", key, client, json=chat),
        "check": lambda key, client=None: _status("GET", f"{base}/v1/check", key, client,
                                                  headers={"X-Original-URI": "/v1/chat/completions"}),
        "usage": lambda key, client=None: _status("GET", f"{base}/v1/usage", key, client),
        "ingest": lambda key, client=None: _status("POST", f"{base}/v1/events", key, client,
                                                   json=event(f"e-{time.monotonic_ns()}", "acme", 1, 1),
                                                   headers={"Content-Type": "application/cloudevents+json"}),
    }


async def test_wrong_keys_get_429_per_client_address_on_every_endpoint(shim_factory) -> None:  # noqa: F811
    limit = 4
    shim = await shim_factory(TIERS, shim={"auth_failures_per_minute": limit, "trusted_proxies": ["127.0.0.1/32"],
                                           "ingest_token": INGEST, "admin_token": SHIM_ADMIN})
    key = shim.new_key("acme", "pro")
    base = shim.base_url.removesuffix("/v1")
    endpoints = _endpoints(base)
    good = {"proxy": key, "check": key, "usage": key, "ingest": INGEST}
    for n, (name, send) in enumerate(endpoints.items()):
        client = f"198.51.100.{n + 1}"  # each endpoint's guesser has its own address
        for attempt in range(limit):
            status, (body, _) = await send(f"qm_guess{attempt}_{'x' * 40}", client)
            assert status == 401, (name, attempt, status, body)
        status, (body, retry_after) = await send(f"qm_guess_last_{'x' * 40}", client)
        assert status == 429 and body["error"]["code"] == "too_many_authentication_failures", (name, status, body)
        assert retry_after is not None and 1 <= int(retry_after) <= 60 // limit
        # A right key from that address is refused too: a hit is not told apart from a miss...
        assert (await send(good[name], client))[0] == 429, name
        # ...everywhere on this shim...
        for other, send_other in endpoints.items():
            assert (await send_other(good[other], client))[0] == 429, (name, other)
        # ...while another address is served.
        status, (body, _) = await send(good[name], f"198.51.100.{n + 101}")
        assert status in (200, 202), (name, status, body)
    # A missing key is no guess: it is never counted.
    for _ in range(limit + 2):
        assert (await endpoints["proxy"](None, "198.51.100.200"))[0] == 401


async def test_forwarded_addresses_are_believed_only_from_trusted_proxies(shim_factory) -> None:  # noqa: F811
    limit = 3
    # The shim trusts a proxy elsewhere, not the address this test connects from.
    shim = await shim_factory(TIERS, shim={"auth_failures_per_minute": limit, "trusted_proxies": ["10.0.0.0/8"]})
    key = shim.new_key("acme", "pro")
    send = _endpoints(shim.base_url.removesuffix("/v1"))["proxy"]
    for n in range(limit):  # a guesser changing its claimed address each time
        assert (await send(f"qm_guess{n}_{'x' * 40}", f"192.0.2.{n}"))[0] == 401
    status, (body, _) = await send(key, "192.0.2.99")
    assert status == 429 and body["error"]["code"] == "too_many_authentication_failures"


async def test_a_revoked_key_is_refused_within_a_second(shim_factory) -> None:  # noqa: F811
    shim = await shim_factory(TIERS)
    key = shim.new_key("acme", "pro")
    endpoints = _endpoints(shim.base_url.removesuffix("/v1"))
    for name in ("proxy", "check", "usage"):  # cached by the proxy's authenticator (30 s)
        status, (body, _) = await endpoints[name](key)
        assert status == 200, (name, body)
    client = redis.Redis.from_url(shim.config.services.redis_url)
    try:
        revoked_at = time.monotonic()
        assert revoke_key(client, RedisKeys(shim.config.services.redis_prefix), key.split("_")[1])
    finally:
        client.close()
    for name in ("proxy", "check", "usage"):
        status, (body, _) = await endpoints[name](key)
        elapsed_s = time.monotonic() - revoked_at
        assert status == 401 and body["error"]["code"] == "invalid_api_key", (name, status, body)
        assert elapsed_s < 1.0, (name, elapsed_s)
        print(f"{name}: refused {elapsed_s * 1000:.0f} ms after the revoke")


async def test_behind_nginx_each_client_is_counted_apart(shim_factory, tmp_path) -> None:  # noqa: F811
    """nginx (deploy/nginx/quotameter.conf as shipped) appends the client's address;
    the shim trusts nginx's. Clients connect from distinct loopback addresses."""
    from tests.integration.test_nginx import TOKEN, start_nginx

    limit = 3
    shim = await shim_factory(TIERS, shim={"auth_failures_per_minute": limit, "trusted_proxies": ["127.0.0.1"],
                                           "ingest_token": TOKEN})  # nginx reports usage with it
    model_port = int(shim.config.upstream.url.split(":")[-1].split("/")[0])
    nginx, port = await asyncio.to_thread(start_nginx, tmp_path / "nginx", shim.config.shim.port, model_port)
    key = shim.new_key("acme", "pro")
    try:
        await guessers_are_counted_per_client(port, key, limit, {"x-quotameter-model": "mock-small"})
    finally:
        nginx.stop()


async def guessers_are_counted_per_client(port: int, key: str, limit: int, extra: dict[str, str] | None = None) -> None:
    """Through the proxy on ``port``, which appends the address it saw to X-Forwarded-For:
    a client forging other addresses is refused 429 after ``limit`` wrong keys, right key
    included, while another client (another loopback address) is served."""
    chat = {"model": "mock-small", "messages": MESSAGES, "max_tokens": 5}

    async def send(source: str, token: str, forged: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}", **(extra or {})}
        if forged is not None:
            headers["X-Forwarded-For"] = forged  # the client's own claim: the proxy appends the truth after it
        connector = aiohttp.TCPConnector(local_addr=(source, 0))
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat, headers=headers) as response:
                return response.status, await response.json(content_type=None)

    for n in range(limit):
        assert (await send("127.0.0.2", f"qm_guess{n}_{'x' * 40}", forged=f"192.0.2.{n}"))[0] == 401
    status, body = await send("127.0.0.2", key, forged="192.0.2.200")
    assert status == 429 and body["error"]["code"] == "too_many_authentication_failures", body
    status, body = await send("127.0.0.3", key)  # another client of the same proxy
    assert status == 200 and body["choices"], body
