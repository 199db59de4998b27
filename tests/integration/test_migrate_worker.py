"""A worker on a ClickHouse server whose schema is behind: it refuses to start
and says to run ``quotameter migrate``; once migrated it starts, and a
request made with the official openai client lands in the server's ledger,
to the token.

Real processes: ``quotameter ledger-server`` (ClickHouse's HTTP interface,
with a password), the worker, the CLI, the shim and the mock model; the
session's Redis and broker.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import clickhouse_connect

from pipeline.history import migrations, schema
from pipeline.history.chdb_server import READY_LINE
from pipeline.history.clickhouse_store import ClickHouseHistory
from quotameter.embedded.procs import free_port
from tests.conftest import CliRunner
from tests.integration.enforcement_helpers import MESSAGES, PROMPT_TOKENS, ShimFactory, shim_factory  # noqa: F401
from tests.integration.pipeline_helpers import start_worker, wait_for
from tests.unit.test_migrations import FIRST_LEDGER, OLD_ROW

TOKEN = "worker-ledger-t0ken"
EXIT_TIMEOUT_S = 60


async def test_a_worker_refuses_a_ledger_behind_its_schema_until_migrated(shim_factory: ShimFactory,  # noqa: F811
                                                                          cli_process: CliRunner, tmp_path: Path,
                                                                          unique: str) -> None:
    port = free_port()
    ledger = cli_process("ledger", "ledger-server", "--history-dir", str(tmp_path / "ledger"), "--port", str(port),
                         env={"QUOTAMETER_SERVICES__ADMIN_TOKEN": TOKEN})
    await asyncio.to_thread(ledger.wait_until, lambda: READY_LINE.format(host="127.0.0.1", port=port)
                            in ledger.log_path.read_text(), 60, "the ledger server's ready line")
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
    shim = await shim_factory({}, services={"history_url": url})

    refused = cli_process("worker-refused", "worker", config_path=shim.config_path)
    assert refused.proc is not None and await asyncio.to_thread(refused.proc.wait, EXIT_TIMEOUT_S) == 1
    log = " ".join(refused.log_tail().split())
    assert (f"error: the ClickHouse ledger at clickhouse://quotameter@127.0.0.1:{port} has no quotameter schema yet: "
            "run `quotameter migrate`") in log
    assert TOKEN not in refused.log_path.read_text()

    migrate = cli_process("migrate", "migrate", config_path=shim.config_path)
    assert migrate.proc is not None and await asyncio.to_thread(migrate.proc.wait, EXIT_TIMEOUT_S) == 0
    assert f"migrated from version 0 to {migrations.LATEST}" in migrate.log_path.read_text()

    await asyncio.to_thread(start_worker, cli_process, shim.config, shim.config_path, "worker")
    customer = f"acme-{unique}"
    async with shim.client(shim.new_key(customer, "pro")) as client:
        served = await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=7)
    assert served.usage is not None and served.usage.prompt_tokens == PROMPT_TOKENS

    store = ClickHouseHistory.from_url(url, read_only=True)
    try:
        usage = await asyncio.to_thread(
            wait_for, lambda: (u := store.usage(customer, shim.period(), shim.config.billing.calendar))["events"] and u,
            30, "the event in the server's ledger")
    finally:
        store.close()
    assert (usage["events"], usage["requests"], usage["input_tokens"], usage["output_tokens"]) == (
        1, 1, served.usage.prompt_tokens, served.usage.completion_tokens)
