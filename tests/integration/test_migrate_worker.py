"""A worker on a ClickHouse server whose schema is behind: it refuses to start
and says to run ``quotameter migrate``; after the migration it starts.

Real processes: ``quotameter ledger-server`` (ClickHouse's HTTP interface,
with a password), the worker, the CLI; the session's Redis and broker.
"""

from __future__ import annotations

from pathlib import Path

import clickhouse_connect

from pipeline.history import migrations, schema
from pipeline.history.chdb_server import READY_LINE
from quotameter.embedded.procs import free_port
from tests.conftest import CliRunner, ConfigFactory
from tests.integration.pipeline_helpers import start_worker
from tests.unit.test_migrations import FIRST_LEDGER, OLD_ROW

TOKEN = "worker-ledger-t0ken"
EXIT_TIMEOUT_S = 60


def test_a_worker_refuses_a_ledger_behind_its_schema_until_migrated(config_factory: ConfigFactory,
                                                                      cli_process: CliRunner, tmp_path: Path) -> None:
    port = free_port()
    ledger = cli_process("ledger", "ledger-server", "--history-dir", str(tmp_path / "ledger"), "--port", str(port),
                         env={"QUOTAMETER_SERVICES__ADMIN_TOKEN": TOKEN})
    ledger.wait_until(lambda: READY_LINE.format(host="127.0.0.1", port=port) in ledger.log_path.read_text(), 60,
                      "the ledger server's ready line")
    admin = clickhouse_connect.get_client(host="127.0.0.1", port=port, username="quotameter", password=TOKEN,
                                          autogenerate_session_id=False)
    try:  # the ledger as the first release left it
        admin.command(f"DROP DATABASE {schema.DATABASE}")
        admin.command(f"CREATE DATABASE {schema.DATABASE}")
        admin.command(FIRST_LEDGER)
        admin.command(OLD_ROW)
    finally:
        admin.close()
    url = f"clickhouse://quotameter:{TOKEN}@127.0.0.1:{port}"
    config, path = config_factory({"services": {"history_url": url}})

    refused = cli_process("worker-refused", "worker", config_path=path)
    assert refused.proc is not None and refused.proc.wait(EXIT_TIMEOUT_S) == 1
    log = " ".join(refused.log_tail().split())
    assert (f"error: the ClickHouse ledger at clickhouse://quotameter@127.0.0.1:{port} has no quotameter schema yet: "
            "run `quotameter migrate`") in log
    assert TOKEN not in refused.log_path.read_text()

    migrate = cli_process("migrate", "migrate", config_path=path)
    assert migrate.proc is not None and migrate.proc.wait(EXIT_TIMEOUT_S) == 0, migrate.log_tail()
    assert f"migrated from version 0 to {migrations.LATEST}" in migrate.log_path.read_text()

    worker = start_worker(cli_process, config, path, "worker")  # /healthz 200
    assert worker.alive()
