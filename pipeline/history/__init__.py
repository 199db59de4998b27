"""The history store: the raw event ledger (ClickHouse).

``HistoryStore`` is the interface; ``chdb_store`` the embedded implementation
(chDB: ClickHouse in-process, one process per data directory);
``clickhouse_store`` a ClickHouse server over clickhouse-connect. Both run
the same SQL (``schema``); ``open_store(config)`` picks one from
``services.history_url``.
"""

from pipeline.history.factory import open_store
from pipeline.history.store import HistoryStore, UsageRow

__all__ = ["HistoryStore", "UsageRow", "open_store"]
