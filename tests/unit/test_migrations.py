"""The ledger's migrations: the exact SQL of each layout, run for real on chDB.

chDB cannot run ON CLUSTER (it has no cluster nor Keeper), so the replicated
statements are checked as text and parsed by ClickHouse's own parser
(``EXPLAIN AST``, chDB's engine); the single-server ones are run.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import chdb
import pytest
import yaml
from chdb.session import Session

from pipeline.history import migrations, schema
from pipeline.history.chdb_store import ChdbHistory
from pipeline.history.server_schema import ServerSchema, readonly_user_sql
from pipeline.history.store import HistoryError
from quotameter.config import parse_config
from quotameter.errors import ConfigError

CLUSTER = migrations.Layout("prod")

# The events table as the first pipeline release created it, before any
# column was added on start.
FIRST_LEDGER = f"""CREATE TABLE {schema.EVENTS} (
    id String, time DateTime64(3, 'UTC'), customer String, api_key_id String, tier LowCardinality(String),
    route LowCardinality(String), status UInt16, decision LowCardinality(String), reason Nullable(String),
    model_requested Nullable(String), model_served Nullable(String), upstream Nullable(String),
    input_tokens UInt64, output_tokens UInt64, cached_tokens UInt64, reasoning_tokens UInt64,
    cost_usd Decimal(38, 12), price_version LowCardinality(String), upstream_cost_usd Nullable(Decimal(38, 12)),
    usage_source LowCardinality(String), streamed Bool, latency_ms Float64, ttft_ms Nullable(Float64),
    request_bytes UInt64, response_bytes UInt64, source String, ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
) ENGINE = ReplacingMergeTree PARTITION BY toYYYYMM(time) ORDER BY (customer, id)"""
OLD_ROW = (f"INSERT INTO {schema.EVENTS} (id, time, customer, api_key_id, tier, route, status, decision, input_tokens, "
           "output_tokens, cached_tokens, reasoning_tokens, cost_usd, price_version, usage_source, streamed, latency_ms, "
           "request_bytes, response_bytes, source) VALUES ('old-1', '2025-03-10 12:00:00', 'acme', 'k', 'pro', "
           "'/v1/chat/completions', 200, 'admitted', 1000, 250, 0, 0, 0.001750000001, 'v1', 'upstream', false, 1.5, 10, "
           "20, 'shim-1')")


def test_replicated_statements_exactly() -> None:
    assert migrations.bootstrap(CLUSTER) == [
        "CREATE DATABASE IF NOT EXISTS quotameter ON CLUSTER 'prod'",
        "CREATE TABLE IF NOT EXISTS quotameter.schema_migrations ON CLUSTER 'prod' (version UInt32, name String, "
        "applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) ENGINE = ReplicatedReplacingMergeTree("
        "'/clickhouse/tables/{shard}/{database}/schema_migrations', '{replica}') ORDER BY version",
    ]
    events, hourly_store, hourly, daily_store, daily = migrations.MIGRATIONS[0].statements(CLUSTER)
    assert events.startswith("CREATE TABLE IF NOT EXISTS quotameter.events ON CLUSTER 'prod' (\n    id String,\n")
    assert events.endswith(
        "\n    tags Map(String, String)\n)\n"
        "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/events', '{replica}')\n"
        "PARTITION BY toYYYYMM(time)\nORDER BY (customer, id)"
    )
    for store, name, column in ((hourly_store, "usage_hourly", "hour"), (daily_store, "usage_daily", "day")):
        assert store.startswith(f"CREATE TABLE IF NOT EXISTS quotameter.{name}_store ON CLUSTER 'prod' (\n")
        assert store.endswith(
            f"\nENGINE = ReplicatedSummingMergeTree('/clickhouse/tables/{{shard}}/{{database}}/{name}_store', "
            f"'{{replica}}')\nPARTITION BY toYYYYMM({column})\nORDER BY (customer, model, tier, {column})"
        )
    assert hourly.startswith("CREATE MATERIALIZED VIEW IF NOT EXISTS quotameter.usage_hourly ON CLUSTER 'prod' "
                             "TO quotameter.usage_hourly_store AS\n    SELECT customer, tier, ")
    assert daily.startswith("CREATE MATERIALIZED VIEW IF NOT EXISTS quotameter.usage_daily ON CLUSTER 'prod' "
                            "TO quotameter.usage_daily_store AS\n    SELECT customer, tier, ")
    assert migrations.MIGRATIONS[1].statements(CLUSTER) == [
        "ALTER TABLE quotameter.events ON CLUSTER 'prod' ADD COLUMN IF NOT EXISTS cache_write_tokens UInt64 DEFAULT 0 "
        "AFTER reasoning_tokens",
        "ALTER TABLE quotameter.events ON CLUSTER 'prod' ADD COLUMN IF NOT EXISTS late Bool DEFAULT false AFTER source",
        "ALTER TABLE quotameter.events ON CLUSTER 'prod' ADD COLUMN IF NOT EXISTS kafka_partition Int32 DEFAULT -1 "
        "AFTER late",
        "ALTER TABLE quotameter.events ON CLUSTER 'prod' ADD COLUMN IF NOT EXISTS kafka_offset Int64 DEFAULT -1 "
        "AFTER kafka_partition",
    ]
    assert migrations.MIGRATIONS[2].statements(CLUSTER) == [
        "ALTER TABLE quotameter.events ON CLUSTER 'prod' ADD COLUMN IF NOT EXISTS end_user String DEFAULT ''",
        "ALTER TABLE quotameter.events ON CLUSTER 'prod' ADD COLUMN IF NOT EXISTS project String DEFAULT ''",
        "ALTER TABLE quotameter.events ON CLUSTER 'prod' ADD COLUMN IF NOT EXISTS tags Map(String, String)",
    ]
    # The single-server statements are the same ones, without the cluster
    # and the replication (the engines' Keeper path and replica).
    replication = re.compile(r"Replicated(\w+)\('/clickhouse/tables/\{shard\}/\{database\}/(\w+)', '\{replica\}'\)")
    for replicated, single in zip(migrations.script(None, CLUSTER), migrations.script(None), strict=True):
        assert replication.sub(r"\1", replicated.replace(" ON CLUSTER 'prod'", "")) == single
    assert "Replicated" not in " ".join(migrations.script(None)) and "ON CLUSTER" not in " ".join(migrations.script(None))


def test_every_statement_parses_in_clickhouse(tmp_path: Path) -> None:
    """ClickHouse's parser (chDB's engine) reads every statement of both layouts."""
    user = readonly_user_sql("grafana", "pw", CLUSTER, salt="s")
    for statement in [*migrations.script(None, CLUSTER), *migrations.script(None), *user]:
        tree = chdb.query(f"EXPLAIN AST {statement}", "TSVRaw").bytes().decode()
        assert tree.split()[0] in ("CreateQuery", "AlterQuery", "InsertQuery", "CreateUserQuery", "GrantQuery"), statement


def test_a_cluster_name_is_quoted_and_checked() -> None:
    assert migrations.Layout("it's").on_cluster == " ON CLUSTER 'it\\'s'"
    config = parse_config({"tiers": {"pro": {}}, "services": {"history_cluster": "prod_1.eu-west"}})
    assert config.services.history_cluster == "prod_1.eu-west"
    with pytest.raises(ConfigError, match="history_cluster"):
        parse_config({"tiers": {"pro": {}}, "services": {"history_cluster": "prod' SETTINGS x=1 --"}})


def test_steps_run_once_and_record_their_version() -> None:
    ran: list[str] = []
    steps = migrations.apply(ran.append, None)
    assert [m.version for m in steps] == [1, 2, 3, 4] == [m.version for m in migrations.MIGRATIONS]
    assert ran[:2] == migrations.bootstrap() and ran == list(migrations.script(None))
    assert ran[-1] == "INSERT INTO quotameter.schema_migrations (version, name) VALUES (4, 'Kafka position: index within the record')"
    ran.clear()
    assert migrations.apply(ran.append, 4) == [] and ran == []  # up to date: nothing runs
    assert [m.version for m in migrations.apply(ran.append, 1)] == [2, 3, 4]
    assert not any(s.startswith("CREATE") for s in ran)  # the table exists: no bootstrap, no step 1


def test_a_fresh_chdb_ledger_is_migrated_to_the_latest_version(tmp_path: Path) -> None:
    store = ChdbHistory(tmp_path / "history")
    try:
        assert [m.version for m in store.migrated] == [1, 2, 3, 4]
        rows = store.query(f"SELECT version, name FROM {migrations.TABLE} ORDER BY version")
        assert rows == [{"version": m.version, "name": m.name} for m in migrations.MIGRATIONS]
    finally:
        store.close()
    again = ChdbHistory(tmp_path / "history")  # reopened: nothing to do
    try:
        assert again.migrated == []
        assert again.query(f"SELECT count() AS n FROM {migrations.TABLE}") == [{"n": 4}]
    finally:
        again.close()


def _shape(path: Path) -> list[dict]:
    session = Session(str(path))
    try:
        text = session.query(
            "SELECT name, create_table_query FROM system.tables WHERE database = 'quotameter' ORDER BY name",
            "JSONEachRow").bytes().decode()
    finally:
        session.close()
    return [json.loads(line) for line in text.splitlines()]


def test_a_ledger_from_the_first_release_is_brought_forward_with_its_rows(tmp_path: Path) -> None:
    """The same steps a server gets from `quotameter migrate`, run by the chDB
    store on open: the old ledger ends up exactly like a new one."""
    fresh = tmp_path / "fresh"
    ChdbHistory(fresh).close()

    old = tmp_path / "old"
    session = Session(str(old))
    session.query(f"CREATE DATABASE {schema.DATABASE}")
    session.query(FIRST_LEDGER)
    session.query(OLD_ROW)
    session.close()

    store = ChdbHistory(old)
    try:
        assert [m.version for m in store.migrated] == [1, 2, 3, 4]
        row = store.query(f"SELECT id, input_tokens, output_tokens, toString(cost_usd) AS cost, cache_write_tokens, "
                          f"late, kafka_partition, kafka_offset, kafka_index, end_user, project, tags FROM {schema.EVENTS}")
        assert row == [{"id": "old-1", "input_tokens": 1000, "output_tokens": 250, "cost": "0.001750000001",
                        "cache_write_tokens": 0, "late": False, "kafka_partition": -1, "kafka_offset": -1, "kafka_index": 0,
                        "end_user": "", "project": "", "tags": {}}]
        # No clean-close marker in a directory from then: its last month's
        # rollups were rebuilt from the ledger, the old row included.
        assert store.repaired_months == [202503]
        assert store.query("SELECT day, sum(input_tokens) AS i, toString(sum(cost_usd)) AS c "
                           "FROM quotameter.usage_daily_store GROUP BY day") == [
            {"day": "2025-03-10", "i": 1000, "c": "0.001750000001"}]
    finally:
        store.close()
    assert _shape(old) == _shape(fresh)


def test_the_readonly_user_statements_exactly() -> None:
    salt = "0123456789abcdef"
    digest = hashlib.sha256(b"s3cret pass" + salt.encode()).hexdigest()
    identified = (f"IDENTIFIED WITH sha256_hash BY '{digest}' SALT '{salt}' DEFAULT DATABASE quotameter "
                  "SETTINGS readonly = 1, max_execution_time CHANGEABLE_IN_READONLY")
    assert readonly_user_sql("grafana", "s3cret pass", salt=salt) == [
        f"CREATE USER IF NOT EXISTS grafana {identified}",
        f"ALTER USER grafana {identified}",
        "GRANT SELECT ON quotameter.* TO grafana",
    ]
    assert readonly_user_sql("grafana", "s3cret pass", CLUSTER, salt=salt) == [
        f"CREATE USER IF NOT EXISTS grafana ON CLUSTER 'prod' {identified}",
        f"ALTER USER grafana ON CLUSTER 'prod' {identified}",
        "GRANT ON CLUSTER 'prod' SELECT ON quotameter.* TO grafana",
    ]
    generated = readonly_user_sql("grafana", "s3cret pass")
    assert "s3cret" not in " ".join(generated)
    assert generated != readonly_user_sql("grafana", "s3cret pass")  # a new salt each time
    for bad in ("graf ana", "x; DROP USER default", "1st", ""):
        with pytest.raises(HistoryError, match="user name"):
            readonly_user_sql(bad, "pw")
    with pytest.raises(HistoryError, match="password is empty"):
        readonly_user_sql("grafana", "")


def test_server_ddl_waits_for_every_replica_and_mutation() -> None:
    """Each statement returns once applied everywhere: a step is recorded only then."""

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[str, object]] = []

        def command(self, cmd: str, parameters: object = None, data: object = None, settings: object = None) -> str:
            self.calls.append((cmd, settings))
            return ""

    client = Recorder()
    ServerSchema(client, "clickhouse://qm@db:8123", CLUSTER).run(migrations.MIGRATIONS[2].statements(CLUSTER)[0])
    assert client.calls == [(migrations.MIGRATIONS[2].statements(CLUSTER)[0], {"alter_sync": 2, "mutations_sync": 2})]


def test_grafana_reads_as_the_readonly_user_only_what_it_is_granted() -> None:
    """The provisioned datasource takes the read-only user from the
    environment, and every ledger panel reads only the database it may read."""
    grafana = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
    (source,) = yaml.safe_load((grafana / "provisioning" / "datasources" / "clickhouse.yaml").read_text())["datasources"]
    assert (source["jsonData"]["username"], source["secureJsonData"]["password"]) == (
        "${CLICKHOUSE_USER}", "${CLICKHOUSE_PASSWORD}")
    assert source["jsonData"]["defaultDatabase"] == schema.DATABASE
    grant = readonly_user_sql("grafana", "pw")[-1]
    assert grant == f"GRANT SELECT ON {schema.DATABASE}.* TO grafana"
    tables: set[str] = set()
    for board in grafana.glob("dashboards/*.json"):
        for sql in re.findall(r'"rawSql": "((?:[^"\\]|\\.)*)"', board.read_text()):
            tables |= set(re.findall(r"\b(?:FROM|JOIN)\s+([A-Za-z_][\w.]*)", json.loads(f'"{sql}"'), re.IGNORECASE))
    assert tables and {t.split(".")[0] for t in tables} == {schema.DATABASE}, tables
