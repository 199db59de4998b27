"""The ledger's schema as numbered migrations, and the table recording them.

A database at any earlier shape is brought forward by the steps it has not
recorded: every statement is ``IF NOT EXISTS``, so a ledger created before
the migrations table existed (it records nothing) goes through all of them
and keeps its rows. Step 1 is the schema as it stood when versioning began;
later steps add what older ledgers lack. A change to the schema is a new
step at the end, never an edit of a step already released.

The embedded chDB store applies the steps itself when it opens its
directory; a ClickHouse server gets them only from ``quotameter migrate``
(``server_schema``), and its store refuses to start behind them.

With ``services.history_cluster`` the same steps run ``ON CLUSTER`` on
Replicated engines (one ZooKeeper / Keeper path per table and shard).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.history.schema import DATABASE, EVENTS, ROLLUPS, rollup_select, sql_string

TABLE = f"{DATABASE}.schema_migrations"
ZOOKEEPER_PATH = "/clickhouse/tables/{shard}/{database}/"


@dataclass(frozen=True)
class Layout:
    """One server (``cluster`` empty) or Replicated tables ON CLUSTER ``cluster``."""

    cluster: str = ""

    @property
    def on_cluster(self) -> str:
        return f" ON CLUSTER {sql_string(self.cluster)}" if self.cluster else ""

    def engine(self, kind: str, table: str) -> str:
        """``kind`` (a MergeTree family engine), Replicated on a cluster; the
        path's macros are expanded by each server from its own config."""
        if not self.cluster:
            return kind
        return f"Replicated{kind}({sql_string(ZOOKEEPER_PATH + table)}, '{{replica}}')"


SINGLE = Layout()


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    build: Callable[[Layout], list[str]]

    def statements(self, layout: Layout = SINGLE) -> list[str]:
        return self.build(layout)


def bootstrap(layout: Layout = SINGLE) -> list[str]:
    """The database and the migrations table, before any step."""
    return [
        f"CREATE DATABASE IF NOT EXISTS {DATABASE}{layout.on_cluster}",
        f"CREATE TABLE IF NOT EXISTS {TABLE}{layout.on_cluster} ("
        "version UInt32, name String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3))"
        f" ENGINE = {layout.engine('ReplacingMergeTree', 'schema_migrations')} ORDER BY version",
    ]


def _ledger(layout: Layout) -> list[str]:
    statements = [
        f"""CREATE TABLE IF NOT EXISTS {EVENTS}{layout.on_cluster} (
    id String,
    time DateTime64(3, 'UTC'),
    customer String,
    api_key_id String,
    tier LowCardinality(String),
    route LowCardinality(String),
    status UInt16,
    decision LowCardinality(String),
    reason Nullable(String),
    model_requested Nullable(String),
    model_served Nullable(String),
    upstream Nullable(String),
    input_tokens UInt64,
    output_tokens UInt64,
    cached_tokens UInt64,
    reasoning_tokens UInt64,
    cache_write_tokens UInt64 DEFAULT 0,
    cost_usd Decimal(38, 12),
    price_version LowCardinality(String),
    upstream_cost_usd Nullable(Decimal(38, 12)),
    usage_source LowCardinality(String),
    streamed Bool,
    latency_ms Float64,
    ttft_ms Nullable(Float64),
    request_bytes UInt64,
    response_bytes UInt64,
    source String,
    late Bool DEFAULT false,
    kafka_partition Int32 DEFAULT -1,
    kafka_offset Int64 DEFAULT -1,
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3),
    end_user String DEFAULT '',
    project String DEFAULT '',
    tags Map(String, String)
)
ENGINE = {layout.engine('ReplacingMergeTree', 'events')}
PARTITION BY toYYYYMM(time)
ORDER BY (customer, id)"""
    ]
    for name, column, column_type, expr in ROLLUPS:
        statements.append(
            f"""CREATE TABLE IF NOT EXISTS {DATABASE}.{name}_store{layout.on_cluster} (
    customer String,
    tier LowCardinality(String),
    model LowCardinality(String),
    {column} {column_type},
    requests UInt64,
    refused UInt64,
    input_tokens UInt64,
    output_tokens UInt64,
    cached_tokens UInt64,
    reasoning_tokens UInt64,
    cost_usd Decimal(38, 12),
    events UInt64
)
ENGINE = {layout.engine('SummingMergeTree', f'{name}_store')}
PARTITION BY toYYYYMM({column})
ORDER BY (customer, model, tier, {column})"""
        )
        statements.append(
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {DATABASE}.{name}{layout.on_cluster}"
            f" TO {DATABASE}.{name}_store AS" + rollup_select(column, expr, EVENTS)
        )
    return statements


def _add_columns(*columns: str) -> Callable[[Layout], list[str]]:
    def build(layout: Layout) -> list[str]:
        return [f"ALTER TABLE {EVENTS}{layout.on_cluster} ADD COLUMN IF NOT EXISTS {column}" for column in columns]

    return build


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "ledger and its hourly / daily rollups", _ledger),
    # Ledgers created before the pipeline recorded these.
    Migration(
        2,
        "cache write tokens, late flag, Kafka position",
        _add_columns(
            "cache_write_tokens UInt64 DEFAULT 0 AFTER reasoning_tokens",
            "late Bool DEFAULT false AFTER source",
            "kafka_partition Int32 DEFAULT -1 AFTER late",
            "kafka_offset Int64 DEFAULT -1 AFTER kafka_partition",
        ),
    ),
    # Attribution ('' and {}: none given).
    Migration(
        3,
        "attribution: end user, project, tags",
        _add_columns("end_user String DEFAULT ''", "project String DEFAULT ''", "tags Map(String, String)"),
    ),
    # A record may carry a batch of events: a row's Kafka position is
    # (partition, offset, index in the record); 0 for a record of one event.
    Migration(4, "Kafka position: index within the record", _add_columns("kafka_index UInt32 DEFAULT 0 AFTER kafka_offset")),
)
LATEST = MIGRATIONS[-1].version

# Every statement of a new single-server ledger, in order (seeding test data).
DDL: tuple[str, ...] = tuple(bootstrap()) + tuple(s for m in MIGRATIONS for s in m.statements())

HAS_TABLE = (
    f"SELECT count() AS n FROM system.tables WHERE database = {sql_string(DATABASE)} AND name = 'schema_migrations'"
)
APPLIED = f"SELECT toUInt32(max(version)) AS version FROM {TABLE}"


# What the steps create: a ledger recorded as migrated but missing one of
# these (dropped by hand, a partial restore) gets the steps again.
TABLES = ("events", *(f"{name}{suffix}" for name, *_ in ROLLUPS for suffix in ("_store", "")))
PRESENT = (
    f"SELECT name FROM system.tables WHERE database = {sql_string(DATABASE)}"
    f" AND name IN ({', '.join(map(sql_string, TABLES))})"
)


def missing_tables(select: Callable[[str], list[dict]]) -> list[str]:
    present = {row["name"] for row in select(PRESENT)}
    return [name for name in TABLES if name not in present]


def reapply(run: Callable[[str], object], layout: Layout = SINGLE) -> None:
    """Every step's statements again (each IF NOT EXISTS): what is missing is
    created, the rest is left as it is."""
    for migration in MIGRATIONS:
        for statement in migration.statements(layout):
            run(statement)


def record(migration: Migration) -> str:
    return f"INSERT INTO {TABLE} (version, name) VALUES ({int(migration.version)}, {sql_string(migration.name)})"


def pending(applied: int) -> list[Migration]:
    return [m for m in MIGRATIONS if m.version > applied]


def applied_version(select: Callable[[str], list[dict]]) -> int | None:
    """The highest step recorded, 0 for a migrations table with none, None
    without the table (a ledger from before versioning, or none at all)."""
    if not int(select(HAS_TABLE)[0]["n"]):
        return None
    rows = select(APPLIED)
    return int(rows[0]["version"]) if rows else 0


def apply(
    run: Callable[[str], object],
    applied: int | None,
    layout: Layout = SINGLE,
    on_step: Callable[[Migration], None] = lambda _m: None,
    on_done: Callable[[Migration], None] = lambda _m: None,
) -> list[Migration]:
    """Run the steps after ``applied``, each recorded once all its statements
    ran (a step that failed half-way runs again whole: IF NOT EXISTS)."""
    if applied is None:
        for statement in bootstrap(layout):
            run(statement)
    steps = pending(applied or 0)
    for migration in steps:
        on_step(migration)
        for statement in migration.statements(layout):
            run(statement)
        run(record(migration))
        on_done(migration)
    return steps


def script(applied: int | None, layout: Layout = SINGLE) -> list[str]:
    """What ``apply`` would run from ``applied``, for ``--dry-run``."""
    statements: list[str] = []
    apply(statements.append, applied, layout)
    return statements
