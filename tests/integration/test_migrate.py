"""``quotameter migrate`` and the server store against ClickHouse's HTTP interface.

The server is ``quotameter ledger-server`` (ClickHouse's engine behind its
HTTP interface; no ClickHouse server installs here), with a password and a
time zone other than UTC, as a production server may have. The CLI runs as a
real process; the store talks through clickhouse-connect's HTTP client.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import clickhouse_connect
import pytest
from clickhouse_connect.driver.client import Client

from pipeline.history import migrations, schema
from pipeline.history.chdb_server import READY_LINE
from pipeline.history.clickhouse_store import ClickHouseHistory, SchemaNotReady
from pipeline.history.server_schema import ServerSchema
from pipeline.history.store import HistoryError
from quotameter.aggregate import PricedEvent, format_usd, price_batch
from quotameter.config import parse_config
from quotameter.embedded.procs import ManagedProcess, free_port
from quotameter.events import RequestData, UsageEvent
from quotameter.periods import BillingCalendar
from quotameter.pricing import PriceTable
from tests.unit.test_migrations import FIRST_LEDGER, OLD_ROW

TOKEN = "ledger-t0ken-not-for-logs"
SERVER_TZ = "Asia/Kolkata"  # UTC+5:30: its midnight is 18:30 UTC
UTC_MONTHS = BillingCalendar("UTC", 1)
CLI_TIMEOUT_S = 60
PRICES = PriceTable(list(parse_config({"tiers": {"pro": {}}, "prices": [
    {"model": "m", "input_per_million_usd": "1.234567", "output_per_million_usd": "3.000001"}]}).prices))


@dataclass
class Ledger:
    port: int
    url: str  # with the password
    display: str  # as messages show it
    reference: list[tuple[str, str]]  # the tables of a ledger created at the latest version


def _tables(client: Client) -> list[tuple[str, str]]:
    rows = client.query(f"SELECT name, create_table_query FROM system.tables WHERE database = '{schema.DATABASE}' "
                        "ORDER BY name").result_rows
    return [(name, query) for name, query in rows]


def admin(port: int) -> Client:
    return clickhouse_connect.get_client(host="127.0.0.1", port=port, username="quotameter", password=TOKEN,
                                         autogenerate_session_id=False)


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    base = tmp_path_factory.mktemp("migrate")
    port = free_port()
    proc = ManagedProcess(
        "ledger-server",
        [sys.executable, "-m", "quotameter", "ledger-server", "--history-dir", str(base / "history"), "--port", str(port)],
        base / "ledger-server.log",
        env={"QUOTAMETER_SERVICES__ADMIN_TOKEN": TOKEN, "TZ": SERVER_TZ},
    ).start()
    try:
        ready = READY_LINE.format(host="127.0.0.1", port=port)
        proc.wait_until(lambda: ready in proc.log_path.read_text(), 60, "the ready line")
        client = admin(port)
        try:
            reference = _tables(client)  # the server's chDB store created them at the latest version
        finally:
            client.close()
        yield Ledger(port, f"clickhouse://quotameter:{TOKEN}@127.0.0.1:{port}",
                     f"clickhouse://quotameter@127.0.0.1:{port}", reference)
    finally:
        proc.stop()


@pytest.fixture
def client(ledger: Ledger) -> Iterator[Client]:
    raw = admin(ledger.port)
    yield raw
    raw.close()


def migrate(url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``quotameter migrate ARGS`` as a real process, its output unwrapped."""
    full_env = os.environ | {"QUOTAMETER_SERVICES__HISTORY_URL": url, "COLUMNS": "200"} | (env or {})
    full_env.pop("QUOTAMETER_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "quotameter", "migrate", *args], env=full_env, capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S)


def one_line(text: str) -> str:
    return " ".join(text.split())


def priced(customer: str, specs: list[tuple[str, int, int]]) -> list[PricedEvent]:
    """One event per (time, input tokens, output tokens)."""
    events = [
        UsageEvent(id=f"ev-{customer}-{n}", source="t", subject=customer, time=at, data=RequestData(
            api_key_id="k", tier="pro", route="/v1/chat/completions", status=200, decision="admitted",
            model_requested="m", usage_source="upstream", input_tokens=tokens_in, output_tokens=tokens_out))
        for n, (at, tokens_in, tokens_out) in enumerate(specs)
    ]
    return price_batch(events, PRICES)


def cost(batch: list[PricedEvent]) -> str:
    return format_usd(sum((p.cost.usd for p in batch), Decimal(0)))


def reset(client: Client, shape: str) -> None:
    """Leave the server's ledger at ``shape``."""
    client.command(f"DROP DATABASE IF EXISTS {schema.DATABASE}")
    if shape == "empty server":
        return
    client.command(f"CREATE DATABASE {schema.DATABASE}")
    client.command(FIRST_LEDGER)
    client.command(OLD_ROW)
    if shape == "version 1 recorded":  # a ledger whose last migrate ran step 1 only
        for statement in migrations.bootstrap() + migrations.MIGRATIONS[0].statements():
            client.command(statement)
        client.command(migrations.record(migrations.MIGRATIONS[0]))


@pytest.mark.parametrize(("shape", "applied", "rows_before"),
                         # "version 1 recorded": the dry-run and read-only user tests migrate from it
                         [("empty server", 0, 0), ("first release", 0, 1)])
def test_migrate_brings_a_ledger_at_any_earlier_shape_forward(ledger: Ledger, client: Client, unique: str,
                                                              shape: str, applied: int, rows_before: int) -> None:
    reset(client, shape)
    with pytest.raises(SchemaNotReady) as refused:
        ClickHouseHistory.from_url(ledger.url)
    assert "run `quotameter migrate`" in str(refused.value) and TOKEN not in str(refused.value)

    run = migrate(ledger.url)
    assert run.returncode == 0, run.stderr
    steps = re.findall(rf"applying (\d)/{migrations.LATEST}: ", run.stdout)
    assert steps == [str(m.version) for m in migrations.MIGRATIONS[applied:]]
    assert f"{ledger.display}: migrated from version {applied} to {migrations.LATEST}" in one_line(run.stdout)
    assert TOKEN not in run.stdout + run.stderr
    assert _tables(client) == ledger.reference  # exactly the shape of a new ledger

    # The store opens now, and the ledger answers to the token what it was given.
    store = ClickHouseHistory.from_url(ledger.url)
    try:
        at = datetime(2025, 3, 10, 12, 30, tzinfo=UTC)
        batch = priced(f"c-{unique}", [(at, 1000, 250), (at, 7, 3)])
        store.insert_events(batch)
        store.insert_events(batch)  # retried
        usage = store.usage(f"c-{unique}", "2025-03", UTC_MONTHS)
        assert (usage["events"], usage["input_tokens"], usage["output_tokens"]) == (2, 1007, 253)
        assert usage["cost_usd"] == cost(batch)
        old = store.usage("acme", "2025-03", UTC_MONTHS)  # the row written before the migration
        assert (old["events"], old["input_tokens"], old["cost_usd"]) == (rows_before, 1000 * rows_before,
                                                                          "0.001750000001" if rows_before else "0.000000000000")
    finally:
        store.close()

    if shape != "first release":
        return  # one second run is enough (each CLI run costs a process start)
    again = migrate(ledger.url)
    assert again.returncode == 0, again.stderr
    assert one_line(again.stdout) == f"{ledger.display}: schema version {migrations.LATEST}, up to date"
    recorded = client.query(f"SELECT version FROM {migrations.TABLE} FINAL ORDER BY version").result_rows
    assert recorded == [(m.version,) for m in migrations.MIGRATIONS]


def test_dry_run_prints_the_sql_and_changes_nothing(ledger: Ledger, client: Client) -> None:
    reset(client, "version 1 recorded")
    before = _tables(client)
    run = migrate(ledger.url, "--dry-run")
    assert run.returncode == 0, run.stderr
    printed = [block.strip() for block in run.stdout.split(";\n") if block.strip()]
    header, *statements = printed[0].split("\n", 1)
    assert header == f"-- {ledger.display}: schema version 1, this quotameter has {migrations.LATEST}"
    expected = []
    for migration in migrations.MIGRATIONS[1:]:
        expected += [f"-- {migration.version}: {migration.name}\n" + migration.statements()[0],
                     *migration.statements()[1:], migrations.record(migration)]
    assert [statements[0], *printed[1:]] == expected
    assert _tables(client) == before
    assert migrate(ledger.url).returncode == 0  # and for real afterwards

    # Without a server: a cluster's whole script, from nothing, for review.
    offline = migrate("", "--dry-run", "--from-version", "0", env={"QUOTAMETER_SERVICES__HISTORY_CLUSTER": "prod"})
    assert offline.returncode == 0, offline.stderr
    lines = [line for line in offline.stdout.split(";\n") if line.strip()]
    assert lines[0].startswith(f"-- not connected (cluster prod): schema version 0, this quotameter has {migrations.LATEST}\n")
    statements = [re.sub(r"^(-- .*\n)+", "", block.strip()) for block in lines]
    assert statements == list(migrations.script(None, migrations.Layout("prod")))


def test_refusals_name_the_server_never_the_password(ledger: Ledger) -> None:
    wrong = f"clickhouse://quotameter:not-the-{TOKEN}@127.0.0.1:{ledger.port}"
    run = migrate(wrong)
    assert run.returncode == 1
    message = one_line(run.stderr)
    assert message.startswith(
        f"error: the ClickHouse ledger at {ledger.display} refused the user and password of services.history_url: ")
    assert "Code: 516. DB::Exception: Authentication failed" in message
    assert TOKEN not in run.stdout + run.stderr

    closed = free_port()
    run = migrate(f"clickhouse://quotameter:{TOKEN}@127.0.0.1:{closed}")
    assert run.returncode == 1
    assert one_line(run.stderr).startswith(f"error: cannot reach the ClickHouse ledger at clickhouse://quotameter@127.0.0.1:{closed}: ")
    assert TOKEN not in run.stdout + run.stderr

    run = migrate("")
    assert run.returncode == 2 and "services.history_url is empty" in one_line(run.stderr)


def test_a_server_that_does_not_answer_times_out(ledger: Ledger) -> None:
    """Accepts the connection and never answers (a hung server, a black-holing proxy)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(HistoryError) as info:
            ClickHouseHistory.from_url(f"clickhouse://u:{TOKEN}@127.0.0.1:{port}", connect_timeout_s=2,
                                       send_receive_timeout_s=2)
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()
    assert time.monotonic() - started < 15
    assert str(info.value).startswith(f"the ClickHouse ledger at clickhouse://u@127.0.0.1:{port} did not answer in time: ")
    assert TOKEN not in str(info.value)


def test_the_readonly_user_sql_is_printed_when_the_server_cannot_make_users(ledger: Ledger, client: Client,
                                                                              tmp_path: Path) -> None:
    reset(client, "version 1 recorded")
    password = "gr@fana pass"
    run = migrate(ledger.url, "--create-readonly-user", "grafana", env={"QUOTAMETER_READONLY_PASSWORD": password})
    # The schema went forward; the user is for an operator who may manage users.
    assert run.returncode == 1
    assert f"{ledger.display}: migrated from version 1 to {migrations.LATEST}" in one_line(run.stdout)
    assert "Code: 497" in run.stderr and "cannot manage users" in one_line(run.stderr)
    create, alter, grant = [line for line in run.stdout.splitlines() if re.match(r"(CREATE|ALTER) USER|GRANT", line)]
    digest, salt = re.fullmatch(
        r"CREATE USER IF NOT EXISTS grafana IDENTIFIED WITH sha256_hash BY '([0-9a-f]{64})' SALT '([0-9a-f]{32})' "
        r"DEFAULT DATABASE quotameter SETTINGS readonly = 1, max_execution_time CHANGEABLE_IN_READONLY;", create).groups()
    assert digest == hashlib.sha256((password + salt).encode()).hexdigest()
    assert alter == create.replace("CREATE USER IF NOT EXISTS", "ALTER USER")
    assert grant == "GRANT SELECT ON quotameter.* TO grafana;"
    assert "gr@fana" not in run.stdout + run.stderr and TOKEN not in run.stdout + run.stderr

    secret_file = tmp_path / "readonly-password"
    secret_file.write_text(password + "\n")
    by_file = migrate(ledger.url, "--create-readonly-user", "grafana", "--readonly-password-file", str(secret_file),
                      "--dry-run")
    assert by_file.returncode == 0, by_file.stderr
    assert f"-- {ledger.display}: schema version {migrations.LATEST}" in by_file.stdout
    salt = re.search(r"SALT '([0-9a-f]{32})'", by_file.stdout).group(1)
    assert hashlib.sha256((password + salt).encode()).hexdigest() in by_file.stdout

    nothing = migrate(ledger.url, "--create-readonly-user", "grafana", env={"QUOTAMETER_READONLY_PASSWORD": ""})
    assert nothing.returncode == 2 and "needs a password" in one_line(nothing.stderr)


def test_types_and_time_zones_through_the_http_interface(ledger: Ledger, client: Client, unique: str) -> None:
    """A server in Asia/Kolkata: the ledger's times stay UTC, Decimal(38, 12)
    sums exact, 64-bit counts and LowCardinality / Nullable columns as written."""
    reset(client, "empty server")
    schema_client = ServerSchema.from_url(ledger.url)
    try:
        schema_client.migrate()
    finally:
        schema_client.close()
    assert client.server_tz is not None and str(client.server_tz) == SERVER_TZ

    customer = f"t-{unique}"
    march_end = datetime(2025, 3, 31, 23, 30, tzinfo=UTC)  # April 1st 05:00 in Kolkata
    april = datetime(2025, 4, 1, 0, 10, tzinfo=UTC)
    huge = 2**60  # past 2^53: a float would round it
    batch = priced(customer, [(march_end, 1, 1), (march_end, huge, 0), (april, 3, 2)])
    store = ClickHouseHistory.from_url(ledger.url)
    try:
        store.insert_events(batch)
        march = store.usage(customer, "2025-03", UTC_MONTHS)
        assert (march["events"], march["input_tokens"], march["output_tokens"]) == (2, huge + 1, 1)
        assert march["cost_usd"] == cost(batch[:2])
        assert Decimal(march["cost_usd"]) == (Decimal(huge + 1) * Decimal("1.234567") + Decimal("3.000001")) / 10**6
        assert store.usage(customer, "2025-04", UTC_MONTHS)["input_tokens"] == 3

        rows = store.query(f"SELECT time, model_served, reason, tier, input_tokens, cost_usd FROM {schema.EVENTS} "
                           f"WHERE customer = '{customer}' ORDER BY time, input_tokens")
        assert [r["time"] for r in rows] == ["2025-03-31 23:30:00.000"] * 2 + ["2025-04-01 00:10:00.000"]
        assert [r["model_served"] for r in rows] == [None] * 3 and [r["reason"] for r in rows] == [None] * 3
        assert [r["tier"] for r in rows] == ["pro"] * 3
        assert rows[1]["input_tokens"] == huge  # an int: the server's JSON quoting of 64-bit ints is pinned off
        days = store.query(f"SELECT toString(day) AS day, sum(input_tokens) AS i FROM {schema.DATABASE}.usage_daily_store "
                           f"WHERE customer = '{customer}' GROUP BY day ORDER BY day")
        assert days == [{"day": "2025-03-31", "i": huge + 1}, {"day": "2025-04-01", "i": 3}]  # UTC days
    finally:
        store.close()

    native = client.query(f"SELECT time, cost_usd, tier, reason FROM {schema.EVENTS} WHERE customer = '{customer}' "
                          "ORDER BY time, input_tokens")
    assert [t.name for t in native.column_types] == [
        "DateTime64(3, 'UTC')", "Decimal(38, 12)", "LowCardinality(String)", "Nullable(String)"]
    # Naive, in the column's zone (UTC), not the server's: 23:30, not 05:00.
    assert [row[0] for row in native.result_rows] == [t.replace(tzinfo=None) for t in (march_end, march_end, april)]
    assert [row[1] for row in native.result_rows] == [p.cost.usd for p in batch]
    assert [row[2:] for row in native.result_rows] == [("pro", None)] * 3
    # What the pinned setting prevents: a server (or profile) quoting 64-bit ints.
    quoted = client.raw_query(f"SELECT sum(input_tokens) AS n FROM {schema.EVENTS} WHERE customer = '{customer}'",
                              fmt="JSONEachRow", settings={"output_format_json_quote_64bit_integers": 1})
    assert quoted.strip() == b'{"n":"%d"}' % (huge + 4)


def test_a_table_gone_under_a_running_store_says_to_migrate(ledger: Ledger, client: Client) -> None:
    reset(client, "empty server")
    target = ServerSchema.from_url(ledger.url)
    try:
        target.migrate()
    finally:
        target.close()
    store = ClickHouseHistory.from_url(ledger.url)
    try:
        client.command(f"DROP TABLE {schema.EVENTS}")  # an operator's mistake, a restore gone wrong…
        with pytest.raises(SchemaNotReady) as info:
            store.usage("acme", "2025-03", UTC_MONTHS)
    finally:
        store.close()
    message = str(info.value)
    assert message.startswith(f"ClickHouse ledger at {ledger.display}: ") and "Code: 60." in message
    assert message.endswith("; run `quotameter migrate` (it applies the schema to services.history_url)")
    # Recorded as migrated, yet a table is missing: the steps run again.
    run = migrate(ledger.url)
    assert run.returncode == 0, run.stderr
    assert one_line(run.stdout) == (
        f"{ledger.display}: schema version {migrations.LATEST}, but events missing: created again")
    assert _tables(client) == ledger.reference
    assert one_line(migrate(ledger.url).stdout).endswith("up to date")
