"""The ledger on a ClickHouse server, over clickhouse-connect (HTTP).

NOT YET RUN AGAINST A REAL clickhouse-server (Debian's 18.16 is too old for
clickhouse-connect). What the tests cover: the store's own logic against a
recorded fake of the client (parameter binding, batching, deduplication
tokens, settings, error mapping); the same calls through clickhouse-connect's
in-process chDB backend; and the whole HTTP path, through clickhouse-connect's
HTTP client, against ``quotameter ledger-server`` (``chdb_server``), which
answers ClickHouse's HTTP interface from ClickHouse's own engine: ``param_*``
bound by the server, settings, readonly refusals, error codes, a wrong
password, a server in another time zone, concurrent clients
(``tests/integration/test_ledger_server.py``, ``test_migrate.py``). Still
untested: TLS, server-side users and profiles, and replication (the
deduplication tokens act only on Replicated tables or with
non_replicated_deduplication_window). Try it on a real server before relying
on it in production.

The SQL is ``schema``'s, shared with the chDB store; nothing here writes SQL.
The schema is not created here: ``quotameter migrate`` applies
``migrations`` to the server, and opening the store checks its version
(``SchemaNotReady``: run ``quotameter migrate``).

    insert_events  INSERT … FORMAT JSONCompactEachRow in chunks of INSERT_CHUNK_ROWS,
                   each with an ``insert_deduplication_token`` derived from its
                   event ids: a retried chunk is dropped by the server (on
                   Replicated tables, or with non_replicated_deduplication_window),
                   and ReplacingMergeTree + FINAL keeps totals exact either way.
    usage          ``schema.USAGE``, its ``{name:Type}`` placeholders bound by
                   the server (``param_*``), never formatted into the text.
    query          one SELECT, run with ``readonly=2``: a write that slipped
                   past ``schema.read_only_select`` is refused by the server.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from pipeline.history import migrations, schema
from pipeline.history.store import HistoryError, QueryRejected, UsageRow
from quotameter.aggregate import PricedEvent
from quotameter.periods import BillingCalendar

INSERT_CHUNK_ROWS = 10_000
MAX_QUERY_ROWS = 10_000
# Output settings a server's profile may change and the readers rely on:
# numbers as JSON numbers (64-bit ones too), times as ``YYYY-MM-DD hh:mm:ss``.
OUTPUT = {
    "output_format_json_quote_64bit_integers": 0,
    "output_format_json_quote_decimals": 0,
    "date_time_output_format": "simple",
}
READ_ONLY = {"readonly": 2} | OUTPUT  # 2: no writes, but settings may still be sent
# Inserts are synchronous and deduplicated whatever the profile says: an
# async insert may be acknowledged before it is written (the sink commits
# Kafka offsets after the ledger acknowledges), and ignores the token.
INSERT = {"insert_deduplicate": 1, "async_insert": 0}
READONLY_ERROR_CODE = 164
SCHEMA_ERROR_CODES = {60: "UNKNOWN_TABLE", 81: "UNKNOWN_DATABASE"}
# 516 since ClickHouse 20.x; 192 / 193 from older servers.
AUTH_ERROR_CODES = {516: "AUTHENTICATION_FAILED", 192: "UNKNOWN_USER", 193: "WRONG_PASSWORD"}
MIGRATE_HINT = "run `quotameter migrate` (it applies the schema to services.history_url)"


class SchemaNotReady(HistoryError):
    """The server's ledger lacks tables or migration steps this version needs.
    Run ``quotameter migrate`` against it, then start the worker again."""
INSTALL_HINT = "pip install quotameter  (clickhouse-connect is in its base install)"
SCHEMES = {"clickhouse": False, "http": False, "clickhouses": True, "https": True}


class ClientLike(Protocol):
    """The part of ``clickhouse_connect.driver.Client`` this store uses."""

    def command(self, cmd: str, parameters: Any = None, data: Any = None, settings: Any = None) -> Any: ...

    def raw_query(self, query: str, parameters: Any = None, settings: Any = None, fmt: str | None = None) -> bytes: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ServerAddress:
    host: str
    port: int
    username: str
    password: str = field(repr=False)
    secure: bool

    @property
    def display(self) -> str:
        """Where the ledger is, without the password (for messages)."""
        scheme = "clickhouses" if self.secure else "clickhouse"
        return f"{scheme}://{self.username}@{self.host}:{self.port}"


def parse_history_url(url: str) -> ServerAddress:
    """``clickhouse[s]://user:password@host[:port][/quotameter]`` (http/https too).

    The path may only name ``schema.DATABASE``: the shared SQL names its
    tables with that database, so another one would silently be ignored.
    """
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise HistoryError(f"services.history_url must start with clickhouse:// or clickhouses://, not {parts.scheme!r}://")
    if not parts.hostname:
        raise HistoryError("services.history_url names no host")
    database = parts.path.strip("/")
    if database not in ("", schema.DATABASE):
        raise HistoryError(
            f"services.history_url names database {database!r}; the ledger lives in {schema.DATABASE!r} "
            f"(end the URL with /{schema.DATABASE} or nothing)"
        )
    secure = SCHEMES[parts.scheme]
    try:
        port = parts.port or (8443 if secure else 8123)
    except ValueError as exc:
        raise HistoryError(f"services.history_url: {exc}") from None
    return ServerAddress(
        host=parts.hostname,
        port=port,
        username=unquote(parts.username or "default"),
        password=unquote(parts.password or ""),
        secure=secure,
    )


class PooledClient:
    """A clickhouse-connect client with a connection pool of its own, closed
    with it.

    Before each request clickhouse-connect clears its pool of connections
    older than ``max_connection_age`` (10 min), including those another
    thread is in the middle of using: on its process-wide default pool, a
    client in one thread took the socket from under another thread's query
    ("Bad file descriptor"). ``ClickHouseHistory`` lends each client to one
    thread at a time. The pool is ours, not ``dedicated_pool=True``: that
    one's close fails under urllib3-future (which grafana-client's niquests
    installs as ``urllib3``) and leaves its sockets open."""

    def __init__(self, client: Any, pool: Any) -> None:
        self.client = client
        self.pool = pool

    def command(self, cmd: str, parameters: Any = None, data: Any = None, settings: Any = None) -> Any:
        return self.client.command(cmd, parameters=parameters, data=data, settings=settings)

    def raw_query(self, query: str, parameters: Any = None, settings: Any = None, fmt: str | None = None) -> bytes:
        return self.client.raw_query(query, parameters=parameters, settings=settings, fmt=fmt)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.pool.clear()


def connect(address: ServerAddress, *, connect_timeout_s: float = 10, send_receive_timeout_s: float = 300) -> PooledClient:
    """A clickhouse-connect HTTP client on a pool of its own (``PooledClient``)."""
    try:
        import clickhouse_connect
        from clickhouse_connect.driver.httputil import get_pool_manager
    except ImportError:
        raise HistoryError(f"services.history_url needs the clickhouse-connect package: {INSTALL_HINT}") from None
    pool = get_pool_manager()
    try:
        client = clickhouse_connect.get_client(
            host=address.host,
            port=address.port,
            username=address.username,
            password=address.password,
            secure=address.secure,
            connect_timeout=connect_timeout_s,
            send_receive_timeout=send_receive_timeout_s,
            # No session: the store keeps no session state, and two queries
            # at once in one session are refused.
            autogenerate_session_id=False,
            pool_mgr=pool,
        )
    except Exception as exc:  # clickhouse_connect raises its own tree plus OSError
        pool.clear()
        # get_client asks the server its version: credentials are checked here.
        known = _known(address.display, exc)
        raise known or HistoryError(f"cannot reach the ClickHouse ledger at {address.display}: {_first_line(exc)}") from None
    return PooledClient(client, pool)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def call(where: str, method: Any, *args: Any, **kwargs: Any) -> Any:
    """``method(*args, **kwargs)`` with the client's errors as HistoryError
    subclasses whose message names the server (never its password)."""
    try:
        return method(*args, **kwargs)
    except HistoryError:
        raise
    except Exception as exc:  # DatabaseError, OperationalError, OSError…
        raise _known(where, exc) or HistoryError(f"ClickHouse ledger at {where}: {_first_line(exc)}") from None


def _known(where: str, exc: BaseException) -> HistoryError | None:
    """The errors that say what to do: a refused write, a missing schema,
    refused credentials, a server that does not answer."""
    code, first = _error_code(exc), _first_line(exc)
    if code == READONLY_ERROR_CODE:
        return QueryRejected(f"the ClickHouse ledger at {where} refused a write: {first}")
    if code in SCHEMA_ERROR_CODES:
        return SchemaNotReady(f"ClickHouse ledger at {where}: {first}; {MIGRATE_HINT}")
    if code in AUTH_ERROR_CODES:
        return HistoryError(f"the ClickHouse ledger at {where} refused the user and password of services.history_url: {first}")
    if "timed out" in str(exc).lower():
        return HistoryError(f"the ClickHouse ledger at {where} did not answer in time: {first}")
    return None


def _error_code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    text = str(exc)
    marker = "Code: "
    if marker in text:
        digits = text.split(marker, 1)[1].split(".", 1)[0].strip()
        if digits.isdigit():
            return int(digits)
    return None


def dedup_token(chunk: Sequence[PricedEvent]) -> str:
    """The same events in the same order give the same token."""
    digest = hashlib.sha256()
    for priced in chunk:
        digest.update(priced.event.id.encode())
        digest.update(b"\n")
    return f"qm-{digest.hexdigest()[:40]}"


class ClickHouseHistory:
    """``HistoryStore`` over clickhouse-connect clients. ``AsyncHistory``'s
    writer and reader threads call it at once: each call borrows a client no
    other thread is using (``more_clients`` opens another when all are out),
    because a client's pool may be cleared under a query by a call in
    another thread (see ``connect``)."""

    def __init__(
        self,
        client: ClientLike,
        *,
        where: str = "ClickHouse",
        read_only: bool = False,
        more_clients: Callable[[], ClientLike] | None = None,
    ) -> None:
        self.where = where
        self.read_only = read_only
        self._more_clients = more_clients
        self._lock = threading.Lock()
        self._idle = [client]
        self._opened = [client]
        self.schema_version = self._require_schema()

    @classmethod
    def from_url(cls, url: str, *, read_only: bool = False, **timeouts: float) -> ClickHouseHistory:
        """``timeouts``: ``connect_timeout_s``, ``send_receive_timeout_s`` (see ``connect``)."""
        address = parse_history_url(url)
        client = connect(address, **timeouts)
        try:
            return cls(client, where=address.display, read_only=read_only,
                       more_clients=lambda: connect(address, **timeouts))
        except BaseException:
            client.close()
            raise

    @contextmanager
    def _client(self) -> Iterator[ClientLike]:
        """A client for this thread alone until the block ends (without
        ``more_clients``, the one given client is shared)."""
        with self._lock:
            if not self._opened:
                raise HistoryError(f"the ClickHouse ledger at {self.where} was closed")
            shared = self._more_clients is None
            client = self._opened[0] if shared else self._idle.pop() if self._idle else None
        if client is None:
            client = self._call(self._more_clients)
            with self._lock:
                self._opened.append(client)
        try:
            yield client
        finally:
            if not shared:
                with self._lock:
                    self._idle.append(client)

    def _require_schema(self) -> int:
        """The schema is the operator's (``quotameter migrate``): a ledger
        behind this version is refused, one ahead (a newer release migrated
        it, whose steps only add) is used."""
        applied = migrations.applied_version(lambda sql: self._json_rows(self._select(sql, None)))
        if applied is None:
            raise SchemaNotReady(f"the ClickHouse ledger at {self.where} has no quotameter schema yet: {MIGRATE_HINT}")
        if applied < migrations.LATEST:
            raise SchemaNotReady(
                f"the ClickHouse ledger at {self.where} is at schema version {applied}, this quotameter needs "
                f"{migrations.LATEST}: {MIGRATE_HINT}"
            )
        return applied

    def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        return call(self.where, method, *args, **kwargs)

    def _run(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``client.<name>(*args, **kwargs)`` on a borrowed client."""
        with self._client() as client:
            return self._call(getattr(client, name), *args, **kwargs)

    def insert_events(self, batch: Sequence[PricedEvent]) -> None:
        if not batch:
            return
        if self.read_only:
            raise HistoryError(f"the ClickHouse ledger at {self.where} is open read-only")
        for start in range(0, len(batch), INSERT_CHUNK_ROWS):
            chunk = batch[start : start + INSERT_CHUNK_ROWS]
            body = schema.ledger_lines(chunk).encode()
            # A failure mid-batch leaves earlier chunks in: the caller retries
            # the whole batch, and those chunks dedupe (token, then FINAL).
            self._run(
                "command",
                schema.INSERT_ROWS,
                data=body,
                settings=INSERT | {"insert_deduplication_token": dedup_token(chunk)},
            )

    def known_ids(self, customers: Sequence[str], ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """Of ``ids`` (events of ``customers``), those the ledger holds, with
        the Kafka (partition, offset) their row was written from."""
        if not ids:
            return {}
        rows = self._json_rows(self._select(schema.known_ids(customers, ids), None))
        return {row["id"]: (int(row["p"]), int(row["o"])) for row in rows}

    def usage(self, customer: str, period: str, calendar: BillingCalendar) -> UsageRow:
        params = schema.usage_params(customer, period, calendar)
        rows = self._json_rows(self._select(schema.USAGE, params))
        return schema.usage_row(customer, period, rows[0] if rows else None)

    def query(self, sql: str) -> list[dict[str, Any]]:
        text = schema.read_only_select(sql)
        if text is None:
            raise QueryRejected("only a single SELECT (or WITH … SELECT) statement is allowed, without FORMAT")
        return self._json_rows(self._select(text, None, max_result_rows=MAX_QUERY_ROWS, result_overflow_mode="break"))[
            :MAX_QUERY_ROWS
        ]

    def select(self, sql: str, params: dict[str, str]) -> list[dict[str, Any]]:
        """One of our own SELECTs, its ``{name:Type}`` placeholders bound by the server."""
        rows = self._select(sql, params, max_result_rows=MAX_QUERY_ROWS, result_overflow_mode="break")
        return self._json_rows(rows)[:MAX_QUERY_ROWS]

    def explain_ast(self, sql: str) -> str:
        """The server's parse tree of ``sql`` (parsed, never run): ``sql_guard`` reads it."""
        raw = self._run("raw_query", f"EXPLAIN AST {sql}", settings=READ_ONLY, fmt="TSVRaw")
        text = raw.decode() if isinstance(raw, bytes) else raw
        # clickhouse-connect appends "FORMAT TSVRaw", which the server parses into
        # the statement's tree; ``sql`` has no FORMAT of its own (read_only_select).
        return text.rstrip("\n").removesuffix("\n Identifier TSVRaw") + "\n"

    def _select(self, sql: str, params: dict[str, str] | None, **settings: Any) -> bytes:
        return self._run("raw_query", sql, parameters=params, settings=READ_ONLY | settings, fmt="JSONEachRow")

    @staticmethod
    def _json_rows(raw: bytes | str) -> list[dict[str, Any]]:
        text = raw.decode() if isinstance(raw, bytes) else raw
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def close(self) -> None:
        with self._lock:
            opened, self._opened, self._idle = self._opened, [], []
        for client in opened:
            try:
                client.close()
            except Exception:  # closing a broken connection: nothing left to do
                pass
