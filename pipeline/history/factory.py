"""Opening the configured history store: a ClickHouse server when
``services.history_url`` is set, else the embedded chDB directory."""

from __future__ import annotations

from pipeline.history.store import HistoryStore
from quotameter.config import Config


def open_store(config: Config, *, read_only: bool = False) -> HistoryStore:
    """Raises HistoryError naming the store when it cannot be opened.

    ``read_only`` opens for reading only: chDB then needs an existing
    directory; a server store skips its DDL and refuses inserts.
    """
    url = config.services.history_url.get_secret_value().strip()
    if url:
        from pipeline.history.clickhouse_store import ClickHouseHistory

        return ClickHouseHistory.from_url(url, read_only=read_only)
    from pipeline.history.chdb_store import ChdbHistory

    return ChdbHistory(config.services.history_dir, read_only=read_only)
