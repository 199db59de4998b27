"""The ClickHouse-server history store, without a server.

No usable ClickHouse server installs here (see the module's docstring), so:
a recorded fake of the clickhouse-connect client checks the store's own
logic (SQL shared with schema, parameter binding, batching, dedup tokens,
error mapping), and clickhouse-connect's in-process chDB backend runs the
same calls on the real ClickHouse engine. The HTTP transport is tested against
`quotameter ledger-server` (tests/integration/test_ledger_server.py, test_migrate.py).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest
from clickhouse_connect.driver.binding import bind_query
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from pipeline.history import migrations, open_store, schema
from pipeline.history import clickhouse_store as store_module
from pipeline.history.chdb_store import ChdbHistory
from pipeline.history.server_schema import ServerSchema
from pipeline.history.clickhouse_store import (
    INSERT_CHUNK_ROWS,
    MAX_QUERY_ROWS,
    MIGRATE_HINT,
    READ_ONLY,
    ClickHouseHistory,
    SchemaNotReady,
    ServerAddress,
    dedup_token,
    parse_history_url,
)
from pipeline.history.store import HistoryError, QueryRejected
from quotameter.aggregate import PricedEvent, price_batch
from quotameter.config import parse_config
from quotameter.events import RequestData, UsageEvent
from quotameter.periods import BillingCalendar
from quotameter.pricing import PriceTable

UTC_MONTHS = BillingCalendar("UTC", 1)

AT = datetime(2025, 3, 10, 12, 30, tzinfo=UTC)
CONFIG = parse_config({"tiers": {"pro": {}}, "prices": [
    {"model": "m", "input_per_million_usd": "1.00", "output_per_million_usd": "3.00"}]})


def priced(count: int, customer: str = "acme", start: int = 0) -> list[PricedEvent]:
    events = [
        UsageEvent(id=f"ev-{customer}-{n}", source="t", subject=customer, time=AT, data=RequestData(
            api_key_id="k", tier="pro", route="/v1/chat/completions", status=200, decision="admitted",
            model_requested="m", model_served="m", usage_source="upstream", input_tokens=10, output_tokens=5))
        for n in range(start, start + count)
    ]
    return price_batch(events, PriceTable(list(CONFIG.prices)))


class RecordedClient:
    """Records every call; answers raw_query from ``rows``; raises ``fail`` once set.

    The schema-version queries made on opening are answered from ``version``
    (None: no migrations table) and kept apart, in ``schema_checks``."""

    def __init__(self, rows: list[dict[str, Any]] | None = None, version: int | None = migrations.LATEST) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.rows = rows or []
        self.fail: Exception | None = None
        self.closed = False
        self.version = version
        self.schema_checks: list[tuple[str, Any]] = []

    def _record(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((name, args, kwargs))
        if self.fail is not None:
            raise self.fail

    def command(self, cmd: str, parameters: Any = None, data: Any = None, settings: Any = None) -> Any:
        self._record("command", cmd, parameters=parameters, data=data, settings=settings)
        return ""

    def raw_query(self, query: str, parameters: Any = None, settings: Any = None, fmt: str | None = None) -> bytes:
        if query in (migrations.HAS_TABLE, migrations.APPLIED) and self.fail is None:
            self.schema_checks.append((query, settings))
            answer = {"n": int(self.version is not None)} if query == migrations.HAS_TABLE else {"version": self.version}
            return (json.dumps(answer) + "\n").encode()
        self._record("raw_query", query, parameters=parameters, settings=settings, fmt=fmt)
        return "".join(json.dumps(row) + "\n" for row in self.rows).encode()

    def close(self) -> None:
        self.closed = True

    def named(self, name: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        return [(args, kwargs) for called, args, kwargs in self.calls if called == name]


def test_opening_creates_nothing_and_checks_the_schema_version() -> None:
    client = RecordedClient()
    store = ClickHouseHistory(client)
    assert client.calls == [] and store.schema_version == migrations.LATEST
    assert [query for query, _ in client.schema_checks] == [migrations.HAS_TABLE, migrations.APPLIED]
    assert all(settings == READ_ONLY for _, settings in client.schema_checks)


@pytest.mark.parametrize("read_only", [False, True])
def test_a_ledger_behind_or_without_schema_is_refused_with_the_migrate_hint(read_only: bool) -> None:
    where = "clickhouse://qm@db:8123"
    with pytest.raises(SchemaNotReady) as info:
        ClickHouseHistory(RecordedClient(version=None), where=where, read_only=read_only)
    assert str(info.value) == f"the ClickHouse ledger at {where} has no quotameter schema yet: {MIGRATE_HINT}"
    with pytest.raises(SchemaNotReady) as info:
        ClickHouseHistory(RecordedClient(version=migrations.LATEST - 1), where=where, read_only=read_only)
    assert str(info.value) == (
        f"the ClickHouse ledger at {where} is at schema version {migrations.LATEST - 1}, this quotameter needs "
        f"{migrations.LATEST}: run `quotameter migrate` (it applies the schema to services.history_url)"
    )
    with pytest.raises(SchemaNotReady, match="schema version 0,"):  # the table, no step recorded
        ClickHouseHistory(RecordedClient(version=0), where=where, read_only=read_only)
    # A newer release migrated it (its steps only add): used as it is.
    assert ClickHouseHistory(RecordedClient(version=migrations.LATEST + 1)).schema_version == migrations.LATEST + 1


def test_read_only_runs_no_ddl_and_refuses_inserts() -> None:
    client = RecordedClient()
    store = ClickHouseHistory(client, read_only=True)
    assert client.calls == []
    with pytest.raises(HistoryError, match="read-only"):
        store.insert_events(priced(1))


def test_inserts_use_the_shared_statement_in_chunks_with_stable_dedup_tokens() -> None:
    client = RecordedClient()
    store = ClickHouseHistory(client)
    client.calls.clear()
    store.insert_events([])
    assert client.calls == []

    batch = priced(2 * INSERT_CHUNK_ROWS + 1)
    store.insert_events(batch)
    inserts = client.named("command")
    assert [args[0] for args, _ in inserts] == [schema.INSERT_ROWS] * 3
    bodies = [kwargs["data"].decode().split("\n") for _, kwargs in inserts]
    assert [len(body) for body in bodies] == [INSERT_CHUNK_ROWS, INSERT_CHUNK_ROWS, 1]
    assert dict(zip(schema.LEDGER_COLUMNS, json.loads(bodies[0][0]))) == schema.ledger_row(batch[0])
    assert dict(zip(schema.LEDGER_COLUMNS, json.loads(bodies[2][0]))) == schema.ledger_row(batch[-1])
    tokens = [kwargs["settings"]["insert_deduplication_token"] for _, kwargs in inserts]
    assert len(set(tokens)) == 3
    # Whatever the server's profile says: synchronous (acknowledged once
    # written) and deduplicated by the token.
    assert all(kwargs["settings"] == {"insert_deduplicate": 1, "async_insert": 0,
                                      "insert_deduplication_token": token}
               for (_, kwargs), token in zip(inserts, tokens))

    client.calls.clear()
    store.insert_events(batch)  # the batch retried: the same tokens, so the server drops it
    assert [kwargs["settings"]["insert_deduplication_token"] for _, kwargs in client.named("command")] == tokens
    assert dedup_token(batch[:2]) != dedup_token(batch[1:3])


def test_usage_binds_parameters_on_the_server_and_reads_the_row() -> None:
    client = RecordedClient(rows=[{"requests": 3, "refused": "1", "input_tokens": "30", "output_tokens": 15,
                                   "cached_tokens": 0, "reasoning_tokens": 0, "cost_usd": "0.000075", "events": 4}])
    store = ClickHouseHistory(client, read_only=True)
    row = store.usage("acme'; DROP TABLE x", "2025-03", UTC_MONTHS)
    [(args, kwargs)] = client.named("raw_query")
    assert args == (schema.USAGE,)
    assert kwargs["parameters"] == schema.usage_params("acme'; DROP TABLE x", "2025-03", UTC_MONTHS)
    assert kwargs["settings"]["readonly"] == 2 and kwargs["fmt"] == "JSONEachRow"
    assert row == schema.usage_row("acme'; DROP TABLE x", "2025-03", client.rows[0])
    assert row["refused"] == 1 and row["cost_usd"] == "0.000075000000"

    # clickhouse-connect sends these as server-side parameters (param_*),
    # leaving the statement's text untouched: no value is ever spliced into SQL.
    query, bound = bind_query(schema.USAGE, kwargs["parameters"])
    assert query == schema.USAGE.rstrip(";")
    params = kwargs["parameters"]
    assert bound == {"param_customer": "acme\\'; DROP TABLE x",  # escaped as the server's param parser expects
                     "param_start": params["start"], "param_end": params["end"]}


def test_usage_of_nobody_is_zero() -> None:
    store = ClickHouseHistory(RecordedClient(rows=[]), read_only=True)
    assert store.usage("nobody", "2025-03", UTC_MONTHS) == schema.usage_row("nobody", "2025-03", None)


def test_query_allows_one_select_read_only_and_bounded() -> None:
    client = RecordedClient(rows=[{"n": i} for i in range(MAX_QUERY_ROWS + 5)])
    store = ClickHouseHistory(client, read_only=True)
    for bad in ("INSERT INTO quotameter.events VALUES (1)", "SELECT 1; DROP TABLE t", "SELECT 1 FORMAT CSV", ""):
        with pytest.raises(QueryRejected):
            store.query(bad)
    assert client.calls == []  # refused before reaching the server
    rows = store.query("  SELECT number AS n FROM system.numbers;  ")
    assert len(rows) == MAX_QUERY_ROWS
    [(args, kwargs)] = client.named("raw_query")
    assert args == ("SELECT number AS n FROM system.numbers",)
    assert kwargs["settings"] == {"readonly": 2, "max_result_rows": MAX_QUERY_ROWS, "result_overflow_mode": "break",
                                  # what a server profile may have changed, pinned to what the readers parse
                                  "output_format_json_quote_64bit_integers": 0, "output_format_json_quote_decimals": 0,
                                  "date_time_output_format": "simple"}


def test_errors_become_history_errors_with_the_first_line_and_no_password() -> None:
    client = RecordedClient()
    store = ClickHouseHistory(client, where="clickhouse://qm@db:8123", read_only=True)
    client.fail = DatabaseError("Code: 60. DB::Exception: Table quotameter.events does not exist\nStack trace: …")
    with pytest.raises(SchemaNotReady) as info:
        store.usage("acme", "2025-03", UTC_MONTHS)
    assert str(info.value) == (
        "ClickHouse ledger at clickhouse://qm@db:8123: Code: 60. DB::Exception: Table quotameter.events does not exist; "
        + MIGRATE_HINT
    )
    client.fail = DatabaseError("Code: 81. DB::Exception: Database quotameter does not exist. (UNKNOWN_DATABASE)")
    with pytest.raises(SchemaNotReady, match="Code: 81.*run `quotameter migrate`"):
        store.query("SELECT 1")

    client.fail = DatabaseError("Code: 516. DB::Exception: qm: Authentication failed: password is incorrect, or there "
                                "is no user with such name. (AUTHENTICATION_FAILED)")
    with pytest.raises(HistoryError) as info:
        store.query("SELECT 1")
    assert str(info.value).startswith(
        "the ClickHouse ledger at clickhouse://qm@db:8123 refused the user and password of services.history_url: "
        "Code: 516. DB::Exception: qm: Authentication failed")
    client.fail = OperationalError("HTTPConnectionPool(host='db', port=8123): Read timed out. (read timeout=300)")
    with pytest.raises(HistoryError, match="^the ClickHouse ledger at clickhouse://qm@db:8123 did not answer in time: "):
        store.query("SELECT 1")

    client.fail = OperationalError("Error HTTPConnectionPool(host='db', port=8123): Max retries exceeded")
    with pytest.raises(HistoryError, match="Max retries exceeded"):
        ClickHouseHistory(client, where="x").insert_events(priced(1))

    client.fail = DatabaseError("Code: 164. DB::Exception: default: Cannot execute query in readonly mode. (READONLY)")
    with pytest.raises(QueryRejected, match="refused a write"):
        store.query("SELECT 1")


def test_history_urls() -> None:
    assert parse_history_url("clickhouse://qm:p%40ss@db.internal:9000/quotameter") == ServerAddress(
        "db.internal", 9000, "qm", "p@ss", False)
    assert parse_history_url("clickhouses://db") == ServerAddress("db", 8443, "default", "", True)
    assert parse_history_url("http://u@db/") == ServerAddress("db", 8123, "u", "", False)
    assert "p@ss" not in repr(parse_history_url("clickhouse://qm:p%40ss@db"))
    assert parse_history_url("clickhouse://qm:pw@db").display == "clickhouse://qm@db:8123"
    for bad, message in (("postgres://db", "must start with"), ("clickhouse:///x", "no host"),
                         ("clickhouse://db/other", "lives in 'quotameter'"), ("clickhouse://db:99999", "history_url")):
        with pytest.raises(HistoryError, match=message):
            parse_history_url(bad)


def test_connect_passes_the_address_and_maps_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def refuse(**kwargs: Any) -> Any:
        seen.update(kwargs)
        raise OperationalError("Error HTTPSConnectionPool(host='db', port=8443): Connection refused")

    monkeypatch.setattr(clickhouse_connect, "get_client", refuse)
    with pytest.raises(HistoryError) as info:
        ClickHouseHistory.from_url("clickhouses://qm:topsecret@db/quotameter")
    assert "clickhouses://qm@db:8443" in str(info.value) and "topsecret" not in str(info.value)
    assert seen.pop("pool_mgr") is not clickhouse_connect.driver.httputil.default_pool_manager()
    assert seen | {"connect_timeout": 0, "send_receive_timeout": 0} == {
        "host": "db", "port": 8443, "username": "qm", "password": "topsecret", "secure": True,
        "connect_timeout": 0, "send_receive_timeout": 0, "autogenerate_session_id": False}


def test_open_store_picks_the_store_from_history_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    embedded = parse_config({"tiers": {"pro": {}}, "services": {"history_dir": str(tmp_path / "h")}})
    with pytest.raises(HistoryError, match="no chDB ledger"):
        open_store(embedded, read_only=True)  # the chDB store, with no directory yet

    client = RecordedClient()
    monkeypatch.setattr(store_module, "connect", lambda address, **kw: client)
    server = parse_config({"tiers": {"pro": {}}, "services": {"history_url": "clickhouse://qm:pw@db/quotameter"}})
    assert "pw" not in repr(server.services)
    store = open_store(server)
    assert isinstance(store, ClickHouseHistory) and store.where == "clickhouse://qm@db:8123"
    assert client.named("command") == [] and len(client.schema_checks) == 2  # checked, created nothing
    store.close()
    assert client.closed


def engine_store(path: Path) -> ClickHouseHistory:
    """A store on clickhouse-connect's chDB backend, migrated as `quotameter migrate` does.

    That backend applies per-call settings with SET and restores them after;
    restoring ``readonly`` after a read-only call is itself refused (silently),
    so the opening check's readonly=2 would stay on its client: the check runs
    on a client of its own."""
    checker = clickhouse_connect.get_client(interface="chdb", path=str(path))
    assert [m.version for m in ServerSchema(checker, "chdb").migrate()] == [m.version for m in migrations.MIGRATIONS]
    store = ClickHouseHistory(checker, where="chdb")
    checker.close()
    store._opened[:] = [clickhouse_connect.get_client(interface="chdb", path=str(path))]
    return store


def test_the_same_calls_on_the_real_engine_through_clickhouse_connect(tmp_path: Path) -> None:
    """clickhouse-connect's chDB backend: the real engine behind the real
    client API (command with data, raw_query with server-side binds, settings)."""
    store = engine_store(tmp_path / "engine")
    client = store._opened[0]
    try:
        batch = priced(3) + priced(2, customer="other")
        store.insert_events(batch)
        store.insert_events(batch[:3])  # a retried batch
        usage = store.usage("acme", "2025-03", UTC_MONTHS)
        assert (usage["requests"], usage["input_tokens"], usage["output_tokens"], usage["events"]) == (3, 30, 15, 3)
        assert Decimal(usage["cost_usd"]) == 3 * (Decimal(10) * 1 + Decimal(5) * 3) / 1_000_000
        assert store.usage("acme", "2025-04", UTC_MONTHS)["events"] == 0
        assert store.usage("o'ther", "2025-03", UTC_MONTHS)["events"] == 0
        # The retry's rows are there (no merge ran): the reads above collapsed them.
        raw = store.query(f"SELECT customer, count() AS n FROM {schema.EVENTS} GROUP BY customer ORDER BY customer")
        assert raw == [{"customer": "acme", "n": 6}, {"customer": "other", "n": 2}]
        rows = store.query(f"SELECT customer, count() AS n FROM {schema.EVENTS} FINAL GROUP BY customer ORDER BY customer")
        assert rows == [{"customer": "acme", "n": 3}, {"customer": "other", "n": 2}]
        with pytest.raises(QueryRejected):
            store._call(client.raw_query, f"INSERT INTO {schema.EVENTS} (id) VALUES ('x')", settings={"readonly": 2})
    finally:
        store.close()


def test_both_stores_answer_usage_alike(tmp_path: Path) -> None:
    batch = priced(4)
    chdb_store = ChdbHistory(tmp_path / "chdb")
    try:
        chdb_store.insert_events(batch)
        expected = chdb_store.usage("acme", "2025-03", UTC_MONTHS)
    finally:
        chdb_store.close()
    server_store = engine_store(tmp_path / "engine")
    try:
        server_store.insert_events(batch)
        assert server_store.usage("acme", "2025-03", UTC_MONTHS) == expected
    finally:
        server_store.close()
