"""``quotameter migrate``: the ledger's schema on a ClickHouse server.

The migrations themselves are in ``migrations`` (shared with the chDB store);
here they run over clickhouse-connect against ``services.history_url``, and
the read-only user for Grafana and the dashboards is made.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Callable
from typing import Any

from pipeline.history import migrations
from pipeline.history.clickhouse_store import OUTPUT, call, connect, parse_history_url
from pipeline.history.schema import DATABASE, sql_string
from pipeline.history.store import HistoryError

# Each statement waits for every replica (ALTER) and mutation before the
# next one runs, so a step is recorded only once it is applied everywhere.
DDL_SETTINGS = {"alter_sync": 2, "mutations_sync": 2}
USER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
ACCESS_DENIED_CODES = (497,)  # ACCESS_DENIED (chDB: no writable user storage; a server: no grant)


class ServerSchema:
    """The migrations of one server (or cluster, through ``layout``)."""

    def __init__(self, client: Any, where: str, layout: migrations.Layout = migrations.SINGLE) -> None:
        self.client = client
        self.where = where
        self.layout = layout

    @classmethod
    def from_url(cls, url: str, cluster: str = "", **timeouts: float) -> ServerSchema:
        address = parse_history_url(url)
        return cls(connect(address, **timeouts), address.display, migrations.Layout(cluster))

    def _rows(self, sql: str) -> list[dict[str, Any]]:
        raw = call(self.where, self.client.raw_query, sql, settings=OUTPUT, fmt="JSONEachRow")
        text = raw.decode() if isinstance(raw, bytes) else raw
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def run(self, sql: str) -> None:
        call(self.where, self.client.command, sql, settings=DDL_SETTINGS)

    def applied(self) -> int | None:
        return migrations.applied_version(self._rows)

    def migrate(
        self,
        on_step: Callable[[migrations.Migration], None] = lambda _m: None,
        on_done: Callable[[migrations.Migration], None] = lambda _m: None,
    ) -> list[migrations.Migration]:
        return migrations.apply(self.run, self.applied(), self.layout, on_step, on_done)

    def repair(self) -> list[str]:
        """The ledger's tables that were missing, now created again."""
        missing = migrations.missing_tables(self._rows)
        if missing:
            migrations.reapply(self.run, self.layout)
        return missing

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing a broken connection: nothing left to do
            pass


def readonly_user_sql(name: str, password: str, layout: migrations.Layout = migrations.SINGLE,
                      salt: str | None = None) -> list[str]:
    """Statements making ``name`` a user that can only read the ledger.

    The password never leaves this process: the server gets its salted
    SHA-256 (``sha256_hash … SALT``, what ``sha256_password`` stores), so
    neither the statements, a dry run nor the server's query log hold it.
    ``readonly = 1`` forbids writes and setting changes, except
    ``max_execution_time``, which Grafana's ClickHouse plugin sets on every
    query (the server honours CHANGEABLE_IN_READONLY only with
    ``access_control_improvements.settings_constraints_replace_previous``).
    Run again, it sets the new password and keeps other grants.
    """
    if not USER_NAME.fullmatch(name):
        raise HistoryError(f"user name {name!r}: letters, digits and _, starting with a letter or _")
    if not password:
        raise HistoryError("the read-only user's password is empty")
    salt = salt if salt is not None else secrets.token_hex(16)
    digest = hashlib.sha256((password + salt).encode()).hexdigest()
    identified = (
        f"IDENTIFIED WITH sha256_hash BY {sql_string(digest)} SALT {sql_string(salt)}"
        f" DEFAULT DATABASE {DATABASE} SETTINGS readonly = 1, max_execution_time CHANGEABLE_IN_READONLY"
    )
    return [
        f"CREATE USER IF NOT EXISTS {name}{layout.on_cluster} {identified}",
        f"ALTER USER {name}{layout.on_cluster} {identified}",
        f"GRANT{layout.on_cluster} SELECT ON {DATABASE}.* TO {name}",
    ]


def is_access_refusal(exc: HistoryError) -> bool:
    """The server cannot or will not create users for this connection's user."""
    text = str(exc)
    return any(f"Code: {code}." in text for code in ACCESS_DENIED_CODES)
