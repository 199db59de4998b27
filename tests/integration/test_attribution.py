"""Spend by API key, end user, project and tag, through the standalone shim
(real process) in front of the mock model, a real worker and its chDB ledger.

The official openai client sends the attribution (``user=``,
``safety_identifier``, ``extra_headers``); what each client was served
(``usage`` of its answers, streamed or not) is summed per key, end user,
project and tag, and the ledger and ``GET /v1/usage?start_time=…`` must show
exactly those sums. Hostile values are refused with a 400 naming them, or,
when they are allowed (quotes, commas, SQL, unicode), come back byte for byte.
One shim and one worker serve the whole module."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from gateway_shim.keystore import create_key
from quotameter.aggregate import format_usd
from quotameter.config import DEFAULT_CONFIG, Config, load_config
from quotameter.embedded.procs import ManagedProcess, free_port
from quotameter.redis_keys import RedisKeys
from tests.conftest import merge
from tests.integration.pipeline_helpers import READY_LINE, health_status, http_json, wait_for

ADMIN = "admin-token-for-attribution-tests"
INGEST = "ingest-token-for-attribution-tests"
MESSAGES = [{"role": "user", "content": "Say some words."}]
# mock-small: $0.10 in, $0.40 out per 1M tokens (the example config).
INPUT_PER_TOKEN, OUTPUT_PER_TOKEN = Decimal("0.0000001"), Decimal("0.0000004")
# Allowed, and kept byte for byte: quotes, commas, SQL, CSV formula, unicode.
ODD_USER = "o'brien \"the\", ');DROP TABLE quotameter.events;-- =cmd|' josé 日本 😀"


class Stack:
    def __init__(self, config: Config, config_path: Path, procs: list[ManagedProcess]) -> None:
        self.config = config
        self.config_path = config_path
        self.procs = procs
        self.names = RedisKeys(config.services.redis_prefix)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.config.shim.port}/v1"

    def key(self, customer: str, project: str | None = None, tier: str = "pro") -> str:
        import redis

        client = redis.Redis.from_url(self.config.services.redis_url)
        try:
            return create_key(client, self.names, customer, tier, project=project).plaintext
        finally:
            client.close()

    def client(self, key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=20)

    def ledger(self, sql: str) -> list[dict[str, Any]]:
        status, body = http_json(f"{self.config.services.worker_url}/query", sql, config=self.config)
        assert status == 200, body
        return body["rows"]

    def wait_rows(self, customer: str, count: int) -> None:
        sql = f"SELECT count() AS n FROM quotameter.events WHERE customer = '{customer}'"
        wait_for(lambda: int(self.ledger(sql)[0]["n"]) >= count, 40, f"{count} ledger rows of {customer}")
        assert int(self.ledger(sql)[0]["n"]) == count

    async def usage(self, token: str, **query: Any) -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{self.base_url}/usage", params={k: str(v) for k, v in query.items()},
                                   headers={"Authorization": f"Bearer {token}"}) as response:
                return response.status, await response.json(content_type=None)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str, kafka_bootstrap: str) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("attribution")
    unique = uuid.uuid4().hex[:10]
    mock_port = free_port()
    document = merge(yaml.safe_load(DEFAULT_CONFIG.read_text()), {
        "tiers": {"pro": {}, "tight": {"requests_per_minute": 2}},
        "upstream": {"url": f"http://127.0.0.1:{mock_port}/v1"},
        "shim": {"port": free_port(), "instance": f"shim-{unique}", "spool_dir": str(root / "spool"),
                 "drain_timeout_s": 2, "admin_token": ADMIN, "ingest_token": INGEST},
        "pipeline": {"ledger_flush_ms": 200},
        "services": {"redis_url": redis_url, "redis_prefix": f"qm{unique}", "kafka_bootstrap": kafka_bootstrap,
                     "events_topic": f"events-{unique}", "history_dir": str(root / "history"),
                     "worker_url": f"http://127.0.0.1:{free_port()}", "worker_app_id": f"qm-{unique}"},
    })
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    config = load_config(path)
    env = {"QUOTAMETER_CONFIG": str(path)}
    procs: list[ManagedProcess] = []

    def start(name: str, *args: str) -> ManagedProcess:
        proc = ManagedProcess(name, [sys.executable, "-m", "quotameter", *args], root / f"{name}.log", env=env).start()
        procs.append(proc)
        return proc

    try:
        # All three at once: the worker's start is the long one.
        mock, shim, worker = start("mock", "mock-llm", "--port", str(mock_port)), start("shim", "proxy"), start("worker", "worker")
        mock.wait_port("127.0.0.1", mock_port)
        shim.wait_port("127.0.0.1", config.shim.port)
        worker.wait_until(lambda: health_status(config) == 200, 60, "/healthz 200")
        assert worker.log_path.read_text().count(READY_LINE) == 1
        yield Stack(config, path, procs)
    finally:
        for proc in reversed(procs):
            proc.stop()


class Served:
    """What the clients were served, summed per attribution: the expectation."""

    def __init__(self) -> None:
        self.sums: dict[tuple, Counter] = defaultdict(Counter)

    def add(self, key_id: str, user: str | None, project: str | None, team: str | None, usage: Any) -> None:
        self.sums[(key_id, user, project, team)].update(
            {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens, "requests": 1})

    def by(self, *positions: int) -> dict[tuple, Counter]:
        out: dict[tuple, Counter] = defaultdict(Counter)
        for group, sums in self.sums.items():
            out[tuple(group[p] for p in positions)].update(sums)
        return out


def cost(sums: Counter) -> str:
    return format_usd(sums["input_tokens"] * INPUT_PER_TOKEN + sums["output_tokens"] * OUTPUT_PER_TOKEN)


def key_id(key: str) -> str:
    return key.split("_")[1]


async def traffic(stack: Stack, customer: str) -> tuple[Served, list[str]]:
    """Requests from two keys (one bound to a project), several end users, tags and
    projects, JSON and streamed; returns what was served and the keys."""
    plain, bound = stack.key(customer), stack.key(customer, project="proj-bound")
    served = Served()
    clients = {plain: stack.client(plain), bound: stack.client(bound)}
    try:
        async def chat(key: str, who: str | None, project: str | None, team: str | None, max_tokens: int,
                       stream: bool = False, **extra: Any) -> None:
            headers = {}
            if team is not None:
                headers["x-quotameter-tags"] = f"team={team}, feature=autocomplete"
            if project is not None:
                headers["x-quotameter-project"] = project
            headers.update(extra.pop("extra_headers", {}))
            client = clients[key]
            if stream:
                chunks = await client.chat.completions.create(
                    model="mock-small", messages=MESSAGES, max_tokens=max_tokens, stream=True,
                    stream_options={"include_usage": True}, extra_headers=headers, **extra)
                usage = None
                async for chunk in chunks:
                    usage = chunk.usage or usage
            else:
                answer = await client.chat.completions.create(
                    model="mock-small", messages=MESSAGES, max_tokens=max_tokens, extra_headers=headers, **extra)
                usage = answer.usage
            assert usage is not None and usage.completion_tokens > 0
            served.add(key_id(key), who, "proj-bound" if key == bound else project, team, usage)

        await asyncio.gather(
            chat(plain, "alice", None, "search", 7, user="alice"),
            chat(plain, "alice", "proj-a", "search", 9, stream=True, user="alice"),
            chat(plain, "bob", "proj-a", "ads", 5, extra_body={"safety_identifier": "bob"}),
            # The header wins over the body's user.
            chat(plain, "carol", None, "ads", 11, user="not-carol", extra_headers={"x-quotameter-user": "carol"}),
            chat(plain, None, None, None, 4),
            chat(plain, "=1+2", None, "ads", 2, user="=1+2"),  # a formula, to a spreadsheet
            chat(bound, "alice", "proj-other", "search", 6, user="alice"),  # the key's project wins
            chat(bound, ODD_USER, None, "search", 3, stream=True, user=ODD_USER),
            chat(bound, "bob", None, None, 8, user="bob"),
        )
    finally:
        for client in clients.values():
            await client.close()
    return served, [plain, bound]


def as_expected(groups: dict[tuple, Counter]) -> dict[tuple, dict[str, Any]]:
    return {g: {"input_tokens": s["input_tokens"], "output_tokens": s["output_tokens"],
                "num_model_requests": s["requests"], "cost_usd": cost(s)} for g, s in groups.items()}


def flatten(page: dict[str, Any], *fields: str) -> dict[tuple, dict[str, Any]]:
    """Results of every bucket, summed per group (a group may straddle buckets)."""
    out: dict[tuple, Counter] = defaultdict(Counter)
    for bucket in page["data"]:
        assert bucket["object"] == "bucket" and bucket["end_time"] > bucket["start_time"]
        for result in bucket["results"]:
            group = tuple(result["tags"][f[4:]] if f.startswith("tag:") else result[f] for f in fields)
            out[group].update({"input_tokens": result["input_tokens"], "output_tokens": result["output_tokens"],
                               "num_model_requests": result["num_model_requests"]})
            out[group]["micro"] += int(Decimal(result["cost_usd"]) * 10**12)
    return {g: {"input_tokens": s["input_tokens"], "output_tokens": s["output_tokens"],
                "num_model_requests": s["num_model_requests"], "cost_usd": format_usd(Decimal(s["micro"]) / 10**12)}
            for g, s in out.items()}


ACME = "attr-acme"


@pytest.fixture(scope="module")
async def acme(stack: Stack) -> tuple[Served, list[str], int]:
    """The module's traffic, in the ledger: what was served, the keys, when it began."""
    began = int(time.time())
    served, keys = await traffic(stack, ACME)
    stack.wait_rows(ACME, 9)
    return served, keys, began


async def test_spend_lands_in_the_ledger_and_usage_history_by_every_dimension(stack: Stack, acme) -> None:
    customer = ACME
    served, keys, began = acme

    # The ledger: each attribution's tokens, to the token, what its clients were served.
    rows = stack.ledger(f"""
        SELECT api_key_id, end_user, project, tags['team'] AS team, tags['feature'] AS feature,
               sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, count() AS requests
        FROM quotameter.events FINAL WHERE customer = '{customer}'
        GROUP BY api_key_id, end_user, project, team, feature""")
    ledger = {(r["api_key_id"], r["end_user"] or None, r["project"] or None, r["team"] or None):
              Counter({"input_tokens": int(r["input_tokens"]), "output_tokens": int(r["output_tokens"]),
                       "requests": int(r["requests"])}) for r in rows}
    assert ledger == dict(served.sums)
    assert {r["feature"] for r in rows} == {"autocomplete", ""}  # the second tag, where tags were sent
    # A key never reaches the ledger; its id does.
    text = str(stack.ledger(f"SELECT * FROM quotameter.events WHERE customer = '{customer}'"))
    assert all(key not in text and key.split("_", 2)[2] not in text for key in keys)

    span = {"start_time": began - 5, "end_time": int(time.time()) + 5}
    # Each group_by alone, then together, against the served sums.
    for group_by, positions, fields in (
        ("api_key", (0,), ("api_key_id",)), ("user", (1,), ("user",)), ("project", (2,), ("project",)),
        ("tag:team", (3,), ("tag:team",)), ("user,tag:team", (1, 3), ("user", "tag:team")),
        ("api_key,user,project,tag:team", (0, 1, 2, 3), ("api_key_id", "user", "project", "tag:team")),
    ):
        status, page = await stack.usage(keys[0], **span, bucket_width="1h", group_by=group_by)
        assert status == 200, page
        assert page["object"] == "page" and page["has_more"] is False and page["next_page"] is None
        assert flatten(page, *fields) == as_expected(served.by(*positions)), group_by
    status, page = await stack.usage(keys[0], **span, bucket_width="1d", group_by="model")
    assert status == 200 and flatten(page, "model") == as_expected({("mock-small",): served.by()[()]}), page

    # Minute buckets: each event counts in the minute the ledger stamped it.
    times = stack.ledger(f"""SELECT toUnixTimestamp(time) AS at, input_tokens, output_tokens, end_user
        FROM quotameter.events FINAL WHERE customer = '{customer}'""")
    per_minute: dict[tuple, Counter] = defaultdict(Counter)
    for row in times:
        per_minute[(int(row["at"]) // 60 * 60, row["end_user"] or None)].update(
            {"input_tokens": int(row["input_tokens"]), "output_tokens": int(row["output_tokens"])})
    status, page = await stack.usage(keys[1], **span, bucket_width="1m", group_by="user")
    assert status == 200, page
    got = {(b["start_time"], r["user"]): Counter({"input_tokens": r["input_tokens"], "output_tokens": r["output_tokens"]})
           for b in page["data"] for r in b["results"]}
    assert got == dict(per_minute)
    assert [b["start_time"] for b in page["data"]] == list(range((began - 5) // 60 * 60, span["end_time"], 60))

    # Paging: one bucket a page, the cursor walks them all and ends.
    seen, cursor = [], None
    for _ in range(10):
        extra = {"page": cursor} if cursor else {}
        status, page = await stack.usage(keys[0], **span, bucket_width="1m", limit=1, **extra)
        assert status == 200 and len(page["data"]) == 1, page
        seen.append(page["data"][0]["start_time"])
        if not page["has_more"]:
            break
        cursor = page["next_page"]
    assert seen == list(range((began - 5) // 60 * 60, span["end_time"], 60))

    # Access: a key reads its own customer only; the admin token any.
    other = stack.key("attr-other")
    status, page = await stack.usage(other, **span, group_by="user")
    assert status == 200 and all(not b["results"] for b in page["data"]), page
    status, body = await stack.usage(other, **span, customer=customer)
    assert status == 403, body
    status, page = await stack.usage(ADMIN, **span, customer=customer, bucket_width="1h", group_by="user")
    assert status == 200 and flatten(page, "user") == as_expected(served.by(1))


async def test_hostile_attribution_is_refused_with_a_400_and_bills_nothing(stack: Stack) -> None:
    customer = "attr-hostile"
    key = stack.key(customer)
    client = stack.client(key)
    refused = [
        ({"x-quotameter-tags": "team=a'b"}, {}, "x-quotameter-tags"),
        ({"x-quotameter-tags": "team=a,team=b"}, {}, "x-quotameter-tags"),
        ({"x-quotameter-tags": "team"}, {}, "x-quotameter-tags"),
        ({"x-quotameter-tags": "te am=x"}, {}, "x-quotameter-tags"),
        ({"x-quotameter-tags": ",".join(f"k{n}=v" for n in range(17))}, {}, "x-quotameter-tags"),
        ({"x-quotameter-tags": "team=" + "v" * 129}, {}, "x-quotameter-tags"),
        ({"x-quotameter-project": "p" * 257}, {}, "x-quotameter-project"),
        ({}, {"user": "u" * 257}, "user"),
        ({}, {"user": "line\nbreak"}, "user"),
        ({}, {"safety_identifier": "nul\x00"}, "safety_identifier"),
        ({}, {"user": " padded "}, "user"),
    ]
    try:
        for headers, body, param in refused:
            with pytest.raises(openai.BadRequestError) as caught:
                await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=3,
                                                     extra_headers=headers, extra_body=body)
            error = caught.value.body
            assert caught.value.status_code == 400 and error["param"] == param, (headers, body, error)
            assert error["code"] in ("invalid_value", "too_many_items"), error
        # The bounds themselves pass: 256 characters of end user, 16 tags, 128 characters of value.
        ok = await client.chat.completions.create(
            model="mock-small", messages=MESSAGES, max_tokens=3, user="u" * 256,
            extra_headers={"x-quotameter-tags": ",".join(f"k{n:02d}=v" for n in range(15)) + ",z=" + "v" * 128})
    finally:
        await client.close()
    stack.wait_rows(customer, len(refused) + 1)
    rows = stack.ledger(f"""SELECT status, reason, end_user, length(tags) AS tags, input_tokens + output_tokens AS tokens
        FROM quotameter.events FINAL WHERE customer = '{customer}' ORDER BY status""")
    assert [(r["status"], r["end_user"], int(r["tags"])) for r in rows] == [(200, "u" * 256, 16)] + [(400, "", 0)] * len(refused)
    assert int(rows[0]["tokens"]) == ok.usage.total_tokens and all(int(r["tokens"]) == 0 for r in rows[1:])
    # A refused attribution still counts as a request, as a malformed body does: no free 400s past the limit.
    tight = stack.client(stack.key("attr-tight", tier="tight"))
    try:
        for _ in range(2):
            with pytest.raises(openai.BadRequestError):
                await tight.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=3,
                                                    extra_headers={"x-quotameter-tags": "bad tag"})
        with pytest.raises(openai.RateLimitError):
            await tight.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=3)
    finally:
        await tight.close()
    # The history counts the one request the model answered, under its end user and tags.
    status, page = await stack.usage(key, start_time=int(time.time()) - 120, bucket_width="1h", group_by="user,tag:z")
    assert status == 200, page
    assert flatten(page, "user", "tag:z") == {("u" * 256, "v" * 128): {
        "input_tokens": ok.usage.prompt_tokens, "output_tokens": ok.usage.completion_tokens, "num_model_requests": 1,
        "cost_usd": format_usd(ok.usage.prompt_tokens * INPUT_PER_TOKEN + ok.usage.completion_tokens * OUTPUT_PER_TOKEN)}}


async def test_usage_history_refuses_bad_parameters(stack: Stack) -> None:
    key = stack.key("attr-params")
    now = int(time.time())
    for query, word in (
        ({"bucket_width": "1w"}, "bucket_width"), ({"group_by": "tag:te'am"}, "tag"),
        ({"group_by": "customer"}, "group_by"), ({"group_by": "user,user"}, "twice"),
        ({"end_time": now - 10**6}, "end_time"), ({"limit": 32}, "limit"), ({"page": "page_1"}, "page"),
        ({"page": "1' OR 1=1"}, "page"), ({"start_time": "-5"}, "start_time"),
    ):
        status, body = await stack.usage(key, **({"start_time": now - 60} | query))
        assert status == 400 and word in body["error"]["message"], (query, body)
    # The admin token names any customer: a hostile one is only a name that has no usage.
    status, page = await stack.usage(ADMIN, start_time=now - 60, customer="x' OR '1'='1", group_by="user")
    assert status == 200 and all(not b["results"] for b in page["data"]), page


def test_a_ledger_written_before_attribution_gains_its_columns_on_start(tmp_path: Path) -> None:
    from chdb.session import Session

    from pipeline.history import migrations, schema
    from pipeline.history.chdb_store import ChdbHistory
    from quotameter.aggregate import price_batch
    from quotameter.events import RequestData, UsageEvent
    from quotameter.pricing import PriceTable

    new_columns = ",\n    end_user String DEFAULT '',\n    project String DEFAULT '',\n    tags Map(String, String)"
    events_table = migrations.MIGRATIONS[0].statements()[0]
    old_table = events_table.replace(new_columns, "")
    assert old_table != events_table and "end_user" not in old_table
    path = tmp_path / "history"
    path.mkdir()
    session = Session(str(path))
    session.query(migrations.DDL[0])
    session.query(old_table)
    session.query(f"INSERT INTO {schema.EVENTS} (id, time, customer, api_key_id, tier, route, status, decision, "
                  "input_tokens, output_tokens, cached_tokens, reasoning_tokens, cost_usd, price_version, usage_source, "
                  "streamed, latency_ms, request_bytes, response_bytes, source) VALUES "
                  "('old-1', '2026-11-02 10:00:00', 'acme', 'k1', 'pro', '/v1/chat/completions', 200, 'admitted', "
                  "10, 5, 0, 0, 0.000003, 'v1', 'upstream', false, 1.0, 1, 1, 'shim-1')")
    session.close()

    config = load_config(DEFAULT_CONFIG)
    event = UsageEvent(id="new-1", source="shim-1", subject="acme", time="2026-11-02T11:00:00Z", data=RequestData(
        api_key_id="k1", tier="pro", route="/v1/chat/completions", status=200, decision="admitted",
        model_requested="mock-small", input_tokens=20, output_tokens=7, end_user=ODD_USER, project="p1",
        tags={"feature": "x", "team": "search"}))
    store = ChdbHistory(path)  # runs the DDL: the ALTERs add the columns
    try:
        store.insert_events(price_batch([event], PriceTable(list(config.prices), config.default_price)))
        rows = store.query(f"SELECT id, end_user, project, tags, input_tokens FROM {schema.EVENTS} FINAL ORDER BY id")
    finally:
        store.close()
    assert rows == [
        {"id": "new-1", "end_user": ODD_USER, "project": "p1", "tags": {"feature": "x", "team": "search"}, "input_tokens": 20},
        {"id": "old-1", "end_user": "", "project": "", "tags": {}, "input_tokens": 10},
    ]


def test_export_breaks_spend_down_by_key_user_and_tag_with_totals_unchanged(stack: Stack, acme) -> None:
    import csv
    import io

    from quotameter.export import ReconciliationFailed, run_export

    served, keys, _ = acme
    month = stack.config.billing.calendar.current(datetime.now(UTC))

    def export(*by: str) -> list[dict[str, str]]:
        # The export reconciles every customer of the month: the events of the tests before
        # this one may still be on their way to the ledger, and it refuses until they land.
        deadline = time.monotonic() + 30
        while True:
            try:
                done = run_export(stack.config, month, "csv", datetime.now(UTC), draft=True, by=by)
                return list(csv.DictReader(io.StringIO(done.text)))
            except ReconciliationFailed:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    plain = [r for r in export() if r["customer"] == ACME]
    broken = [r for r in export("api_key", "user", "tag:team") if r["customer"] == ACME]
    lines = [r for r in broken if r["record"] == "line"]
    got: dict[tuple, Counter] = defaultdict(Counter)
    for row in lines:
        user = row["user"].removeprefix("'") if row["user"].startswith("'=") else row["user"]
        got[(row["api_key_id"], user or None, row["tag:team"] or None)].update(
            {"input_tokens": int(row["input_tokens"]), "output_tokens": int(row["output_tokens"]),
             "requests": int(row["requests"])})
    assert dict(got) == dict(served.by(0, 1, 3))
    assert "'=1+2" in [r["user"] for r in lines] and ODD_USER in [r["user"] for r in lines]
    # The customer's total record is the same with or without the breakdown.
    total = lambda rows: {k: v for k, v in next(r for r in rows if r["record"] == "customer_total").items()  # noqa: E731
                          if k not in ("api_key_id", "user", "tag:team")}
    assert total(broken) == total(plain) and int(total(plain)["input_tokens"]) == served.by()[()]["input_tokens"]
    assert sum(Decimal(r["amount_exact"]) for r in lines) == Decimal(total(plain)["amount_exact"])


async def test_reported_events_carry_attribution_and_bad_values_are_refused(stack: Stack) -> None:
    from tests.integration.test_ingest import BATCH, event, post

    customer = "attr-reported"
    stack.config = stack.config.model_copy(update={"shim": stack.config.shim.model_copy(update={"ingest_token": INGEST})})
    good = [event(f"rep-{n}-{uuid.uuid4().hex[:6]}", customer, 100 + n, 10 + n, end_user=user, project="proj-r",
                  tags={"team": "search"}) for n, user in enumerate([ODD_USER, "dave"])]
    bad = event("rep-bad", customer, 1, 1, tags={"team": "a'b"})
    status, body = await post(stack.config, [good[0], bad], BATCH, token=INGEST)
    assert status == 400 and body["error"]["param"] == "events[1].data.tags", body
    assert await post(stack.config, good, BATCH, token=INGEST) == (202, {"accepted": 2})
    stack.wait_rows(customer, 2)
    status, page = await stack.usage(ADMIN, customer=customer, start_time=int(time.time()) - 120, bucket_width="1h",
                                     group_by="user,project,tag:team")
    assert status == 200, page
    assert {(r["user"], r["project"], r["tags"]["team"]): (r["input_tokens"], r["output_tokens"])
            for b in page["data"] for r in b["results"]} == {
        (ODD_USER, "proj-r", "search"): (100, 10), ("dave", "proj-r", "search"): (101, 11)}
