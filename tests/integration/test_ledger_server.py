"""``quotameter ledger-server``: one process owns the chDB ledger, others use
it through ClickHouse's HTTP interface with the ClickHouse store.

A real server process on a free port; the clients are clickhouse-connect's
HTTP client, as ``services.history_url`` configures it.
"""

from __future__ import annotations

import gzip
import socket
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import clickhouse_connect
import pytest
from clickhouse_connect import common as clickhouse_common
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError

from pipeline.history import open_store, schema
from pipeline.history.chdb_server import READY_LINE
from pipeline.history.chdb_store import CLEAN_MARKER
from pipeline.history.clickhouse_store import ClickHouseHistory
from pipeline.history.store import HistoryError, QueryRejected
from quotameter.aggregate import PricedEvent, format_usd, price_batch
from quotameter.config import parse_config
from quotameter.embedded.procs import ManagedProcess, free_port
from quotameter.events import RequestData, UsageEvent
from quotameter.periods import BillingCalendar
from quotameter.pricing import PriceTable
from tests.conftest import CliRunner

UTC_MONTHS = BillingCalendar("UTC", 1)

AT = datetime(2025, 3, 10, 12, 30, tzinfo=UTC)
CONFIG = parse_config({"tiers": {"pro": {}}, "prices": [
    {"model": "m", "input_per_million_usd": "1.00", "output_per_million_usd": "3.00"}]})
START_TIMEOUT_S = 60


def priced(count: int, customer: str, start: int = 0, input_tokens: int = 10) -> list[PricedEvent]:
    events = [
        UsageEvent(id=f"ev-{customer}-{n}", source="t", subject=customer, time=AT, data=RequestData(
            api_key_id="k", tier="pro", route="/v1/chat/completions", status=200, decision="admitted",
            model_requested="m", model_served="m", usage_source="upstream", input_tokens=input_tokens, output_tokens=5))
        for n in range(start, start + count)
    ]
    return price_batch(events, PriceTable(list(CONFIG.prices)))


def cost_of(batch: list[PricedEvent]) -> str:
    return format_usd(sum((p.cost.usd for p in batch), Decimal(0)))


@dataclass
class Ledger:
    proc: ManagedProcess
    url: str
    port: int
    directory: Path


def start_ledger(proc: ManagedProcess, directory: Path, port: int) -> Ledger:
    ready = READY_LINE.format(host="127.0.0.1", port=port)
    proc.wait_until(lambda: ready in proc.log_path.read_text(), START_TIMEOUT_S, "the ready line")
    return Ledger(proc, f"http://127.0.0.1:{port}", port, directory)


def server_argv(directory: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "quotameter", "ledger-server", "--history-dir", str(directory), "--port", str(port)]


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    """One server for the module (tests use their own customers and tables)."""
    base = tmp_path_factory.mktemp("ledger-server")
    port = free_port()
    proc = ManagedProcess("ledger-server", server_argv(base / "history", port), base / "ledger-server.log").start()
    try:
        yield start_ledger(proc, base / "history", port)
    finally:
        proc.stop()


@pytest.fixture
def client(ledger: Ledger) -> Iterator[Client]:
    raw = clickhouse_connect.get_client(host="127.0.0.1", port=ledger.port, autogenerate_session_id=False)
    yield raw
    raw.close()


def http(ledger: Ledger, sql: bytes | None = None, *, method: str = "POST", headers: dict[str, str] | None = None,
         **params: str) -> tuple[int, dict[str, str], bytes]:
    url = f"{ledger.url}/?{urllib.parse.urlencode(params)}"
    request = urllib.request.Request(url, data=sql, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


def test_the_server_creates_the_ledger_schema(ledger: Ledger) -> None:
    store = ClickHouseHistory.from_url(ledger.url, read_only=True)  # runs no DDL itself
    try:
        rows = store.query(f"SELECT name FROM system.tables WHERE database = '{schema.DATABASE}' ORDER BY name")
    finally:
        store.close()
    names = [row["name"] for row in rows]
    assert names == ["events", "schema_migrations", "usage_daily", "usage_daily_store", "usage_hourly",
                     "usage_hourly_store"]


def test_inserts_then_exact_usage_and_a_retried_batch_counts_once(ledger: Ledger, unique: str) -> None:
    store = ClickHouseHistory.from_url(ledger.url)
    try:
        mine, other = priced(3, f"acme-{unique}"), priced(2, f"other-{unique}", input_tokens=7)
        store.insert_events(mine + other)
        store.insert_events(mine)  # the sink retried the batch
        usage = store.usage(f"acme-{unique}", "2025-03", UTC_MONTHS)
        assert (usage["requests"], usage["input_tokens"], usage["output_tokens"], usage["events"]) == (3, 30, 15, 3)
        assert usage["cost_usd"] == cost_of(mine) and Decimal(usage["cost_usd"]) == Decimal("0.000075")
        assert store.usage(f"other-{unique}", "2025-03", UTC_MONTHS)["cost_usd"] == cost_of(other)
        assert store.usage(f"acme-{unique}", "2025-04", UTC_MONTHS)["events"] == 0

        # The placeholders are bound by the engine from param_*: quotes and
        # backslashes in a customer id reach it intact, and inject nothing.
        odd = f"o'dd\\\"{unique}'; DROP TABLE {schema.EVENTS}; --"
        store.insert_events(priced(2, odd))
        assert store.usage(odd, "2025-03", UTC_MONTHS)["events"] == 2
        assert store.query(f"SELECT count() AS n FROM {schema.EVENTS} WHERE customer = 'acme-{unique}'") == [{"n": 6}]
    finally:
        store.close()


def test_query_answers_rows_and_writes_are_refused(ledger: Ledger, client: Client,
                                                   unique: str) -> None:
    store = ClickHouseHistory.from_url(ledger.url)
    try:
        store.insert_events(priced(2, f"q-{unique}"))
        assert store.query(
            f"SELECT customer, count() AS n FROM {schema.EVENTS} FINAL WHERE customer = 'q-{unique}' GROUP BY customer"
        ) == [{"customer": f"q-{unique}", "n": 2}]
        with pytest.raises(QueryRejected):  # the store's own fence
            store.query(f"INSERT INTO {schema.EVENTS} (id) VALUES ('x')")
        # The server's fence: readonly=2 reaches the engine's read-only session.
        with pytest.raises(QueryRejected, match="refused a write.*Code: 164.*readonly"):
            store._call(client.raw_query, f"INSERT INTO {schema.EVENTS} (id) VALUES ('x')", settings={"readonly": 2})
    finally:
        store.close()
    status, headers, body = http(ledger, method="GET", query=f"INSERT INTO {schema.EVENTS} (id) VALUES ('x')")
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (500, "164")  # a GET is read-only, as in ClickHouse
    assert body.startswith(b"Code: 164. DB::Exception: ") and b"readonly" in body


def test_a_bad_query_raises_history_error_with_clickhouse_message(ledger: Ledger,
                                                                   client: Client) -> None:
    store = ClickHouseHistory.from_url(ledger.url, read_only=True)
    try:
        with pytest.raises(HistoryError) as info:
            store.query(f"SELECT no_such_column FROM {schema.EVENTS}")
    finally:
        store.close()
    assert not isinstance(info.value, QueryRejected)
    assert "Code: 47. DB::Exception: " in str(info.value) and "no_such_column" in str(info.value)
    with pytest.raises(DatabaseError) as raw:
        client.command("SELEC 1")
    assert raw.value.code == 62 and "Syntax error" in str(raw.value)


def test_parallel_clients_all_land(ledger: Ledger, unique: str) -> None:
    """Two stores, and one store shared by two threads (the worker's
    AsyncHistory: a writer and a reader thread). Connections expire after a
    second here instead of ten minutes: a request that clears expired
    connections from a pool another thread is using takes the socket from
    under that thread's query."""
    errors: list[BaseException] = []
    shared = ClickHouseHistory.from_url(ledger.url)

    def write(name: str, store: ClickHouseHistory | None) -> None:
        own = store or ClickHouseHistory.from_url(ledger.url)
        try:
            for n in range(20):  # several seconds: connections expire under the other threads
                own.insert_events(priced(5, f"{name}-{unique}", start=5 * n))
                own.usage(f"{name}-{unique}", "2025-03", UTC_MONTHS)  # reads interleaved with the other's writes
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)
        finally:
            if store is None:
                own.close()

    threads = [threading.Thread(target=write, args=(name, store))
               for name, store in (("a", None), ("b", None), ("c", shared), ("d", shared))]
    age = clickhouse_common.get_setting("max_connection_age")
    clickhouse_common.set_setting("max_connection_age", 1)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        clickhouse_common.set_setting("max_connection_age", age)
    try:
        assert errors == []
        for name in "abcd":
            usage = shared.usage(f"{name}-{unique}", "2025-03", UTC_MONTHS)
            assert (usage["events"], usage["input_tokens"]) == (100, 1000)
    finally:
        shared.close()


def test_open_store_with_history_url(ledger: Ledger, unique: str) -> None:
    config = parse_config({"tiers": {"pro": {}}, "services": {"history_url": ledger.url}})
    store = open_store(config)
    try:
        assert isinstance(store, ClickHouseHistory)
        batch = priced(4, f"cfg-{unique}")
        store.insert_events(batch)
        assert store.usage(f"cfg-{unique}", "2025-03", UTC_MONTHS)["cost_usd"] == cost_of(batch)
    finally:
        store.close()
    reader = open_store(config, read_only=True)
    try:
        assert reader.usage(f"cfg-{unique}", "2025-03", UTC_MONTHS)["events"] == 4
    finally:
        reader.close()


def test_the_rest_of_the_client_surface(ledger: Ledger, client: Client, unique: str) -> None:
    """Binary inserts (Native, lz4-compressed), gzip bodies, binds, settings."""
    table = f"default.t_{unique}"
    client.command(f"CREATE TABLE {table} (a UInt32, s String, d DateTime64(3, 'UTC')) ENGINE = MergeTree ORDER BY a")
    try:
        client.insert(table, [[1, "é\x00\xff", datetime(2025, 1, 1)], [2, "b", datetime(2025, 1, 2)]],
                      column_names=["a", "s", "d"])
        client.raw_insert(table, ["a", "s", "d"], gzip.compress(b"3\tc\t2025-01-03 00:00:00\n"),
                          fmt="TabSeparated", compression="gzip")
        assert client.query(f"SELECT a, s FROM {table} ORDER BY a").result_rows == [(1, "é\x00\xff"), (2, "b"), (3, "c")]
        assert client.query(f"SELECT a FROM {table} WHERE s = {{s:String}}", parameters={"s": "b"}).result_rows == [(2,)]
        assert client.query(f"SELECT a FROM {table} LIMIT 0").column_names == ("a",)
        assert client.command(f"SELECT count() FROM {table} WHERE a > 1") == 2
        assert client.raw_query("SELECT number FROM numbers(100000)", fmt="JSONEachRow",
                                settings={"max_result_rows": 10, "result_overflow_mode": "break"}).count(b"\n") < 100000
        # Settings last one request: the next one sees the default again.
        assert client.command("SELECT getSetting('max_result_rows')") == 0
        for sql, code in (("SELECT 1; SELECT 2", 62), ("SET max_threads = 1", 48), ("USE system", 48),
                          (f"SELECT * FROM {table}_missing", 60)):
            with pytest.raises(DatabaseError) as info:
                client.command(sql)
            assert info.value.code == code, sql
    finally:
        client.command(f"DROP TABLE {table}")


def test_the_server_survives_malformed_requests(ledger: Ledger) -> None:
    with socket.create_connection(("127.0.0.1", ledger.port), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01 this is not HTTP\r\n\r\n")
        assert sock.recv(100).split(b" ")[1] == b"400"
    status, headers, body = http(ledger, b"\x1f\x8b not gzip at all", headers={"Content-Encoding": "gzip"})
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (500, "271") and b"CANNOT_DECOMPRESS" in body
    status, headers, _ = http(ledger, b"SELECT 1", headers={"Content-Encoding": "snappy-ish"})
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (400, "36")
    status, headers, body = http(ledger, b"SELECT {n:UInt8}", param_n="not a number")
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (500, "457")
    status, _, body = http(ledger, b"")
    assert status == 400 and b"Empty query" in body
    status, headers, body = http(ledger, method="GET", query="SELECT 1 + 1")
    assert (status, body, headers["X-ClickHouse-Format"]) == (200, b"2\n", "TabSeparated")
    assert urllib.request.urlopen(f"{ledger.url}/ping", timeout=10).read() == b"Ok.\n"
    assert ledger.proc.alive()


def test_stops_cleanly_and_says_why_it_cannot_start(tmp_path: Path, cli_process: CliRunner) -> None:
    directory, port = tmp_path / "history", free_port()
    ledger = start_ledger(cli_process("ledger", "ledger-server", "--history-dir", str(directory), "--port", str(port)),
                          directory, port)

    busy_port = cli_process("busy-port", "ledger-server", "--history-dir", str(tmp_path / "other"), "--port", str(port))
    assert busy_port.proc is not None and busy_port.proc.wait(START_TIMEOUT_S) != 0
    assert f"cannot listen on 127.0.0.1:{port}" in " ".join(busy_port.log_tail().split())  # unwrapped

    busy_dir = cli_process("busy-dir", "ledger-server", "--history-dir", str(directory), "--port", str(free_port()))
    assert busy_dir.proc is not None and busy_dir.proc.wait(START_TIMEOUT_S) != 0
    assert f"cannot open the chDB ledger at {directory}" in " ".join(busy_dir.log_tail().split())

    assert ledger.proc.alive() and not (directory / CLEAN_MARKER).exists()
    assert ledger.proc.stop() == 0
    assert (directory / CLEAN_MARKER).exists()


def test_usage_buckets_bind_attribution_through_the_http_interface(ledger: Ledger, unique: str) -> None:
    from pipeline.history.usage_buckets import BucketQuery

    customer, odd = f"attr-{unique}", "o'brien \"x\", ');DROP TABLE quotameter.events;-- é"
    events = [
        UsageEvent(id=f"ev-{customer}-{n}", source="t", subject=customer, time=AT, data=RequestData(
            api_key_id="k", tier="pro", route="/v1/chat/completions", status=200, decision="admitted",
            model_requested="m", usage_source="upstream", input_tokens=10 + n, output_tokens=n, end_user=user,
            tags={"team": team} if team else None))
        for n, (user, team) in enumerate([(odd, "search"), (odd, "search"), ("bob", None), (None, "ads")])
    ]
    store = ClickHouseHistory.from_url(ledger.url)
    try:
        store.insert_events(price_batch(events, PriceTable(list(CONFIG.prices))))
        start = int(AT.timestamp()) // 3600 * 3600
        query = BucketQuery(customer, start, start + 3600, 3600, ("user", "tag:team"))
        results = [query.result(row) for row in store.select(*query.sql())]
    finally:
        store.close()
    got = {(r["user"], r["tags"]["team"]): (r["input_tokens"], r["output_tokens"], r["num_model_requests"]) for r in results}
    assert got == {(None, "ads"): (13, 3, 1), ("bob", None): (12, 2, 1), (odd, "search"): (21, 1, 2)}
    assert {r["bucket_s"] for r in results} == {start}
