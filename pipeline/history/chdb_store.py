"""The ledger in chDB: ClickHouse's engine in-process, MergeTree on disk.

A chDB data directory can be opened by one process at a time (a second one
fails with "Error initializing EmbeddedServer"): the worker owns it while it
runs, and other processes read through the worker's web server.

Opening it for writing applies the schema's migrations it lacks (the same
steps ``quotameter migrate`` applies to a server).

A clean close leaves a marker file in the directory. Opening it for writing
without the marker means the last writer was killed, perhaps between an
insert's table part and its rollups' parts: the rollups of the months
written last are then recomputed from the ledger before anything else runs.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from pipeline.history import migrations, schema
from pipeline.history.store import HistoryError, QueryRejected, UsageRow
from quotameter.aggregate import PricedEvent
from quotameter.periods import BillingCalendar

MAX_QUERY_ROWS = 10_000
CLEAN_MARKER = "quotameter-closed-cleanly"


def _session(target: str):  # noqa: ANN202 - chdb.session.Session
    # Imported here: a production install has no chDB (services.history_url).
    try:
        from chdb.session import Session
    except ImportError:
        raise HistoryError(
            "the embedded ledger needs chDB: pip install 'quotameter[embedded]', "
            "or point services.history_url at a ClickHouse server"
        ) from None

    try:
        return Session(target)
    except Exception as exc:  # chDB raises RuntimeError / ChdbError
        raise HistoryError(f"cannot open the chDB ledger at {target}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_INSERT_ARROW = schema.insert_from("Python(_ledger_rows)")
_UINT16_MAX = 65_535


@functools.cache
def _arrow_types() -> dict[str, Any]:
    """LEDGER_COLUMNS name -> the Arrow type of its column (``schema.column_kind``)."""
    import pyarrow as pa  # noqa: PLC0415 - shipped with chDB

    kinds = {"text": pa.string(), "float": pa.float64(), "bool": pa.bool_(), "map": pa.map_(pa.string(), pa.string())}
    return {name: kinds.get(schema.column_kind(name), pa.int64()) for name in schema.LEDGER_COLUMNS}


def _arrow_rows(batch: Sequence[PricedEvent]) -> Any:
    """The batch's ledger rows as an Arrow table (``schema.ledger_columns``),
    or None when some value does not fit it (a count beyond Int64, a status
    beyond UInt16, a lone surrogate in a text): those batches go as JSON rows.

    The engine reads the columns as they are, which cost it half the CPU of
    parsing the same rows from JSON text."""
    import pyarrow as pa  # noqa: PLC0415 - shipped with chDB

    types = _arrow_types()
    arrays = {}
    try:
        for name, values in zip(schema.LEDGER_COLUMNS, schema.ledger_columns(batch), strict=True):
            if name == "status" and not all(0 <= status <= _UINT16_MAX for status in values):
                return None
            if name == "tags":
                values = [list(tags.items()) for tags in values]
            arrays[name] = pa.array(values, types[name])
    except (pa.ArrowException, OverflowError, TypeError, ValueError, UnicodeError):
        return None
    return pa.table(arrays)


class ChdbHistory:
    """``HistoryStore`` over a chDB directory.

    ``read_only=True`` opens an existing directory for reading only (the CLI
    when no worker runs). Otherwise the directory and table are created, and
    a second, read-only session serves ``query``: a write that slipped past
    the SELECT check still fails there.
    """

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = Path(path).resolve()
        self._lock = threading.Lock()
        if read_only:
            if not (self.path / "metadata").is_dir():
                raise HistoryError(f"no chDB ledger at {self.path} (has a worker ever run with this history_dir?)")
            self._rw = None
        else:
            existed = (self.path / "metadata").is_dir()
            self.path.mkdir(parents=True, exist_ok=True)
            self._rw = _session(str(self.path))
            self.migrated = self.migrate()
            marker = self.path / CLEAN_MARKER
            if existed and not marker.exists():
                self.repaired_months = self.repair_rollups()
            marker.unlink(missing_ok=True)
        # readonly=1, not the 2 of mode=ro alone: no settings changes, no table
        # functions (file(), url()…), besides no writes.
        self._ro = _session(f"{self.path}?mode=ro&readonly=1")
        # The dedupe lookups' own session: they hand their ids to the engine as
        # a column through chDB's Python() table function, which readonly=1
        # refuses. Only ``known_ids`` uses it, with its fixed statement.
        self._lookups = None if self._rw is None else _session(str(self.path))

    repaired_months: list[int] = []
    migrated: list[migrations.Migration] = []

    def migrate(self) -> list[migrations.Migration]:
        """Bring the directory's schema forward (the embedded store owns it)."""
        applied = migrations.applied_version(
            lambda sql: self._json_rows(self._run(self._rw, sql, fmt="JSONEachRow"))
        )
        return migrations.apply(lambda sql: self._run(self._rw, sql), applied)

    def repair_rollups(self) -> list[int]:
        """Recompute the rollups of the months written last (see the module doc)."""
        months = [int(row["month"]) for row in self._json_rows(self._run(self._rw, schema.RECENT_MONTHS, fmt="JSONEachRow"))]
        for month in months:
            for statement in schema.rollup_rebuild(month):
                self._run(self._rw, statement)
        return months

    def _run(self, session: Any, sql: str, params: dict[str, str] | None = None, fmt: str = "CSV") -> str:
        try:
            result = session.query(sql, fmt, params=params) if params else session.query(sql, fmt)
        except Exception as exc:
            raise HistoryError(f"chDB ledger at {self.path}: {_first_line(exc)}") from None
        return result.bytes().decode() if hasattr(result, "bytes") else str(result)

    def insert_events(self, batch: Sequence[PricedEvent]) -> None:
        if not batch:
            return
        if self._rw is None:
            raise HistoryError(f"the chDB ledger at {self.path} is open read-only")
        _ledger_rows = _arrow_rows(batch)  # noqa: F841 - read by name: Python(_ledger_rows)
        with self._lock:
            if _ledger_rows is not None:
                self._run(self._rw, _INSERT_ARROW)
            else:
                self._run(self._rw, schema.INSERT_ROWS + schema.ledger_lines(batch))

    def known_ids(self, customers: Sequence[str], ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """Of ``ids`` (events of ``customers``), those the ledger holds, with
        the Kafka (partition, offset) their row was written from.

        The ids travel as an Arrow column read by ``Python(_known_ids)``, not
        as literals in the statement: parsing and analysing thousands of
        literals cost the engine more than the lookup itself."""
        if not ids:
            return {}
        if self._lookups is None:
            text = self._run(self._ro, schema.known_ids(customers, ids), fmt="JSONCompactEachRow")
        else:
            import pyarrow  # noqa: PLC0415 - shipped with chDB

            _known_ids = pyarrow.table({"id": pyarrow.array(ids, pyarrow.string())})  # noqa: F841 - read by name
            sql = schema.known_ids_in(customers, "SELECT id FROM Python(_known_ids)")
            text = self._run(self._lookups, sql, fmt="JSONCompactEachRow")
        known: dict[str, tuple[int, int]] = {}
        for line in text.splitlines():
            event_id, partition, offset = orjson.loads(line)
            known[event_id] = (int(partition), int(offset))
        return known

    def usage(self, customer: str, period: str, calendar: BillingCalendar) -> UsageRow:
        params = schema.usage_params(customer, period, calendar)
        rows = self._json_rows(self._run(self._ro, schema.USAGE, params, fmt="JSONEachRow"))
        return schema.usage_row(customer, period, rows[0] if rows else None)

    def query(self, sql: str) -> list[dict[str, Any]]:
        text = schema.read_only_select(sql)
        if text is None:
            raise QueryRejected("only a single SELECT (or WITH … SELECT) statement is allowed, without FORMAT")
        rows = self._json_rows(self._run(self._ro, text, fmt="JSONEachRow"))
        return rows[:MAX_QUERY_ROWS]

    def select(self, sql: str, params: dict[str, str]) -> list[dict[str, Any]]:
        """One of our own SELECTs, its ``{name:Type}`` placeholders bound by the engine."""
        return self._json_rows(self._run(self._ro, sql, params, fmt="JSONEachRow"))[:MAX_QUERY_ROWS]

    def explain_ast(self, sql: str) -> str:
        """The engine's parse tree of ``sql`` (parsed, never run): ``sql_guard`` reads it."""
        return self._run(self._ro, f"EXPLAIN AST {sql}", fmt="TSVRaw")

    @staticmethod
    def _json_rows(text: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def close(self) -> None:
        with self._lock:
            clean = self._rw is not None
            for session in (self._lookups, self._ro, self._rw):
                if session is not None:
                    session.close()
            self._lookups = self._ro = self._rw = None
            if clean:
                (self.path / CLEAN_MARKER).touch()
