"""The history store: the raw event ledger (ClickHouse).

``HistoryStore`` is the interface; ``chdb_store`` the embedded implementation
(chDB: ClickHouse in-process, one process per data directory). A ClickHouse
server implementation would sit beside it and use the same SQL (``schema``).
"""

from pipeline.history.store import HistoryStore, UsageRow

__all__ = ["HistoryStore", "UsageRow"]
