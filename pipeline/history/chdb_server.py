"""The embedded stack's shared ledger: ClickHouse's HTTP interface over chDB.

A chDB data directory can be opened by one process only, so several workers
on one machine cannot each open the ledger. ``quotameter ledger-server``
owns the directory and answers the part of ClickHouse's HTTP interface that
clickhouse-connect uses; the workers set ``services.history_url`` to
``http://127.0.0.1:8123`` and write through ``ClickHouseHistory`` as they
would to a ClickHouse server. Every statement runs in ClickHouse's engine
(chDB); only the HTTP framing is ours.

It is not a production ClickHouse, and production points
``services.history_url`` at a real server. Here: one credential,
``services.admin_token``, which a request presents as the password of HTTP
Basic auth (what clickhouse-connect sends from
``clickhouse://quotameter:TOKEN@host:8123``), as ``X-ClickHouse-Key`` or as
a Bearer; any user name. Without a token it answers anyone, so it refuses to
listen anywhere but loopback. Whoever holds the token may do what a
ClickHouse admin may (write, file(), url()…): it is the workers' credential.
No TLS, one statement at a time, requests and results held in memory, and
``session_id`` is accepted but not honoured: every request runs on the same
two chDB sessions, so ``SET`` and ``USE`` are refused (they would outlive the
request) and settings are passed with the request instead.

A request, read as ClickHouse reads it:

    query           in the URL, the POST body, or both (URL part, a newline,
                    then the body: an INSERT's data, text or binary, after a
                    gzip / deflate / lz4 / zstd Content-Encoding is undone),
                    or a multipart form field
    FORMAT X        at the end of a query selects the output format; else
                    ``default_format`` or TabSeparated
    param_<name>    the value of a ``{name:Type}`` placeholder, bound by the
                    engine from ClickHouse's escaped text form, never spliced
                    into the SQL
    readonly        1 or 2 (and every GET): run on a read-only session, where
                    a write fails with the engine's own Code 164
    database        the current database for this request
    any other name  a setting for this request (SET before, reset after),
                    except transport ones (session_id, query_id, …) ignored

Answers carry X-ClickHouse-Query-Id, -Summary, -Timezone and, for a statement
that returns rows, -Format. Errors are ``Code: N. DB::Exception: …`` with the
X-ClickHouse-Exception-Code header and the HTTP status ClickHouse gives that
code, so clickhouse-connect raises its DatabaseError with the code.
"""

from __future__ import annotations

import asyncio
import errno
import gzip
import json
import re
import signal
import uuid
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from pipeline.history.chdb_store import ChdbHistory
from pipeline.history.schema import sql_string
from pipeline.history.store import HistoryError
from quotameter.errors import ServiceError
from quotameter.service_auth import TokenGate, require_token_off_loopback

READY_LINE = "quotameter ledger-server ready on http://{host}:{port}"
MAX_REQUEST_BYTES = 1 << 30  # an INSERT arrives whole; aiohttp's default is 1 MiB
DEFAULT_FORMAT = "TabSeparated"

# URL parameters that steer the HTTP exchange rather than the query: ignored
# (besides the ones read below), as are http_* settings.
TRANSPORT_PARAMS = frozenset(
    {
        "buffer_size",
        "cancel_http_readonly_queries_on_client_close",
        "client_protocol_version",  # clickhouse-connect's probe then keeps protocol 0
        "enable_http_compression",  # answers are never compressed; clients accept that
        "password",
        "query_id",
        "quota_key",
        "role",
        "send_progress_in_http_headers",
        "session_check",
        "session_id",
        "session_timeout",
        "user",
        "wait_end_of_query",  # answers are always buffered whole
    }
)
RESULT_KINDS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS", "CHECK"})
SESSION_STATE_KINDS = frozenset({"SET", "USE"})

# exceptionCodeToHTTPStatus.cpp, by the error names the engine puts at the end
# of its messages; any other error is a 500.
_STATUS_BY_ERROR = {
    **dict.fromkeys(
        (
            "BAD_ARGUMENTS CANNOT_COMPILE_REGEXP CANNOT_PARSE_TEXT CANNOT_PARSE_ESCAPE_SEQUENCE CANNOT_PARSE_QUOTED_STRING "
            "CANNOT_PARSE_DATE CANNOT_PARSE_DATETIME CANNOT_PARSE_NUMBER CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING "
            "CANNOT_PARSE_IPV4 CANNOT_PARSE_IPV6 CANNOT_PARSE_INPUT_ASSERTION_FAILED CANNOT_PARSE_UUID DUPLICATE_COLUMN "
            "ILLEGAL_COLUMN UNKNOWN_ELEMENT_IN_AST UNKNOWN_TYPE_OF_AST_NODE THERE_IS_NO_COLUMN TOO_DEEP_AST TOO_BIG_AST "
            "UNEXPECTED_AST_STRUCTURE SYNTAX_ERROR INCORRECT_DATA TYPE_MISMATCH VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE"
        ).split(),
        400,
    ),
    **dict.fromkeys(
        (
            "UNKNOWN_TABLE UNKNOWN_FUNCTION UNKNOWN_IDENTIFIER UNKNOWN_TYPE UNKNOWN_STORAGE UNKNOWN_DATABASE "
            "UNKNOWN_SETTING UNKNOWN_DIRECTION_OF_SORTING UNKNOWN_AGGREGATE_FUNCTION UNKNOWN_FORMAT "
            "UNKNOWN_DATABASE_ENGINE UNKNOWN_TYPE_OF_QUERY UNKNOWN_ROLE"
        ).split(),
        404,
    ),
    "QUERY_IS_TOO_LARGE": 413,
    "NOT_IMPLEMENTED": 501,
    "SOCKET_TIMEOUT": 503,
    "CANNOT_OPEN_FILE": 503,
    "CANNOT_SCHEDULE_TASK": 503,
    "TIMEOUT_EXCEEDED": 408,
    "AUTHENTICATION_FAILED": 401,
}
_ENGINE_CODE = re.compile(r"^Code: (\d+)\.")
_ERROR_NAME = re.compile(r"\(([A-Z][A-Z0-9_]+)\)\s*$")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ClickHouseError(Exception):
    """An error answered as ClickHouse does: ``Code: N. DB::Exception: text. (NAME)``."""

    def __init__(self, code: int, name: str, text: str, *, message: str | None = None) -> None:
        self.code = code
        self.name = name
        self.message = message or f"Code: {code}. DB::Exception: {text}. ({name})"
        super().__init__(self.message)

    @classmethod
    def from_engine(cls, exc: Exception) -> ClickHouseError:
        """chDB's messages are ClickHouse's already; anything else is a 1001."""
        message = str(exc).strip()
        code, name = _ENGINE_CODE.match(message), _ERROR_NAME.search(message)
        if code is None:
            return cls(1001, "STD_EXCEPTION", f"{type(exc).__name__}: {message}")
        return cls(int(code.group(1)), name.group(1) if name else "", "", message=message)

    @property
    def http_status(self) -> int:
        return _STATUS_BY_ERROR.get(self.name, 500)


# -- the statement ----------------------------------------------------------

_TOKENS = re.compile(
    r"""(?P<skip>\s+|--[^\n]*|\#[ !][^\n]*|/\*.*?\*/)
      |(?P<quoted>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*"|`(?:[^`\\]|\\.|``)*`)
      |(?P<word>[A-Za-z_][A-Za-z0-9_]*)
      |(?P<semicolon>;)
      |(?P<other>.)""",
    re.VERBOSE | re.DOTALL,
)


@dataclass(frozen=True)
class Statement:
    kind: str  # the first keyword, upper case; "" for an empty query
    output_format: str | None  # a non-INSERT's FORMAT clause
    second_statement_at: int | None  # where a second statement starts, if any

    @property
    def returns_rows(self) -> bool:
        return self.kind in RESULT_KINDS


def parse_statement(sql: str) -> Statement:
    """Enough of ClickHouse's lexer to find the statement's kind, its FORMAT
    and a second statement. An INSERT's data, after its ``FORMAT name``, is not
    read (a VALUES list is: it is SQL, and ``; DROP …`` may follow it)."""
    tokens: list[tuple[str, str]] = []  # (group, text) of the first statement
    for match in _TOKENS.finditer(sql):
        group = match.lastgroup or ""
        if group == "skip":
            continue
        if tokens and tokens[-1][0] == "semicolon":
            return Statement(_kind(tokens), None, match.start())
        tokens.append((group, match.group()))
        if _insert_data_starts(tokens):
            break
    if tokens and tokens[-1][0] == "semicolon":
        tokens.pop()
    kind = _kind(tokens)
    return Statement(kind, None if kind == "INSERT" else _format_clause(tokens), None)


def _kind(tokens: list[tuple[str, str]]) -> str:
    if not tokens:
        return ""
    text = tokens[0][1]
    return "SELECT" if text == "(" else text.upper()


def _insert_data_starts(tokens: list[tuple[str, str]]) -> bool:
    """``INSERT INTO t [(…)] [SETTINGS …] FORMAT name``: the data comes next."""
    if len(tokens) < 3 or tokens[-1][0] != "word" or tokens[-2][1].upper() != "FORMAT" or _kind(tokens) != "INSERT":
        return False
    return not any(text.upper() in ("SELECT", "WITH", "VALUES") for group, text in tokens if group == "word")


def _format_clause(tokens: list[tuple[str, str]]) -> str | None:
    """The name in a trailing ``FORMAT name [SETTINGS …]`` (so a column named
    ``format`` is not one)."""
    for i in range(len(tokens) - 2, 0, -1):
        if tokens[i][1].upper() == "FORMAT" and tokens[i + 1][0] == "word":
            if i + 2 == len(tokens) or tokens[i + 2][1].upper() == "SETTINGS":
                return tokens[i + 1][1]
    return None


# -- the request --------------------------------------------------------------


@dataclass
class QueryRequest:
    sql: bytes
    params: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    read_only: bool = False
    database: str = ""
    default_format: str = DEFAULT_FORMAT


@dataclass(frozen=True)
class Answer:
    body: bytes
    output_format: str | None  # None: the statement returns no rows
    summary: dict[str, str]


def decompress(body: bytes, encoding: str) -> bytes:
    """Undo a request's Content-Encoding (clickhouse-connect compresses inserts)."""
    encoding = encoding.strip().lower()
    try:
        if encoding in ("", "identity"):
            return body
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
        if encoding == "lz4":
            import lz4.frame

            # clickhouse-connect sends one frame per block: read them all.
            out, rest = bytearray(), body
            while rest:
                decoder = lz4.frame.LZ4FrameDecompressor()
                out += decoder.decompress(rest)
                rest = decoder.unused_data
            return bytes(out)
        if encoding == "zstd":
            try:
                from compression import zstd  # type: ignore[import-not-found]  # Python 3.14+
            except ImportError:
                from backports import zstd  # type: ignore[import-not-found,no-redef]
            return zstd.decompress(body)
    except ImportError as exc:
        raise ClickHouseError(36, "BAD_ARGUMENTS", f"Content-Encoding {encoding} needs the {exc.name} package") from None
    except Exception as exc:  # each codec raises its own error type
        raise ClickHouseError(271, "CANNOT_DECOMPRESS", f"cannot decode the {encoding} request body: {exc}") from None
    raise ClickHouseError(36, "BAD_ARGUMENTS", f"Unknown HTTP Content-Encoding: {encoding}")


async def read_request(request: web.Request) -> QueryRequest:
    fields = dict(request.query)
    body = b""
    if request.content_type == "multipart/form-data":
        for name, value in (await request.post()).items():
            if not isinstance(value, str):
                raise ClickHouseError(48, "NOT_IMPLEMENTED", "external data (file parts) is not supported by this server")
            fields[name] = value
    elif request.method == "POST":
        body = decompress(await request.read(), request.headers.get("Content-Encoding", ""))
    if "1" in (fields.get("compress"), fields.get("decompress")):
        raise ClickHouseError(
            48, "NOT_IMPLEMENTED", "ClickHouse's own compress/decompress framing is not supported: use Content-Encoding"
        )
    query = fields.pop("query", "").encode()
    params = {name[len("param_") :]: value for name, value in fields.items() if name.startswith("param_")}
    settings = {
        name: value
        for name, value in fields.items()
        if not name.startswith(("param_", "http_"))
        and name not in TRANSPORT_PARAMS
        and name not in ("readonly", "database", "default_format", "compress", "decompress")
    }
    return QueryRequest(
        sql=query + b"\n" + body if query and body else query or body,
        params=params,
        settings=settings,
        read_only=request.method != "POST" or fields.get("readonly", "0") not in ("", "0"),
        database=fields.get("database") or request.headers.get("X-ClickHouse-Database", ""),
        default_format=fields.get("default_format") or request.headers.get("X-ClickHouse-Format") or DEFAULT_FORMAT,
    )


# -- the engine ---------------------------------------------------------------


def _quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


class LedgerEngine:
    """The chDB ledger and the two sessions requests run on. Not thread-safe:
    the server calls it from one thread only."""

    def __init__(self, path: Path) -> None:
        # ChdbHistory creates the schema and repairs rollups after a crash, as
        # a worker owning the directory would; its close marks a clean stop.
        # It is also what says how to install chDB when it is missing.
        self.history = ChdbHistory(path)
        from chdb.session import Session

        self.path = self.history.path
        try:
            self._rw = Session(str(self.path))
            self._ro = Session(f"{self.path}?mode=ro")  # readonly=2: writes fail with Code 164
        except Exception as exc:
            self.history.close()
            raise HistoryError(f"cannot open the chDB ledger at {self.path}: {exc}") from None
        version_and_zone = self._run(self._rw, "SELECT version(), timezone()").bytes().decode()
        self.version, self.timezone = version_and_zone.strip().split("\t")
        names = self._run(self._rw, "SELECT name FROM system.formats WHERE is_output").bytes().decode().split()
        self.output_formats = {name.lower(): name for name in names}

    @staticmethod
    def _run(session: Any, sql: str | bytes, fmt: str = DEFAULT_FORMAT, params: dict[str, str] | None = None) -> Any:
        try:
            return session.query(sql, fmt, params=params) if params else session.query(sql, fmt)
        except Exception as exc:  # chDB raises ChdbError (a RuntimeError) and binding errors
            raise ClickHouseError.from_engine(exc) from None

    def execute(self, request: QueryRequest) -> Answer:
        statement = parse_statement(request.sql.decode(errors="replace"))
        if not statement.kind:
            raise ClickHouseError(62, "SYNTAX_ERROR", "Empty query")
        if statement.second_statement_at is not None:
            text = f"Syntax error (Multi-statements are not allowed): failed at position {statement.second_statement_at + 1}"
            raise ClickHouseError(62, "SYNTAX_ERROR", text)
        if statement.kind in SESSION_STATE_KINDS:
            text = f"{statement.kind} would outlive this request (no sessions here): send settings or database with it"
            raise ClickHouseError(48, "NOT_IMPLEMENTED", text)
        fmt = statement.output_format or request.default_format
        fmt = self.output_formats.get(fmt.lower(), fmt)
        if statement.output_format is None and fmt not in self.output_formats.values():
            raise ClickHouseError(73, "UNKNOWN_FORMAT", f"Unknown output format {fmt}")
        session = self._ro if request.read_only else self._rw
        with self._scoped(session, request.settings, request.database):
            result = self._run(session, request.sql, fmt, request.params)
        summary = {
            "read_rows": str(result.storage_rows_read()),
            "read_bytes": str(result.storage_bytes_read()),
            "written_rows": str(result.rows_written()),
            "written_bytes": str(result.bytes_written()),
            "result_rows": str(result.rows_read()),
            "result_bytes": str(result.bytes_read()),
            "elapsed_ns": str(int(result.elapsed() * 1e9)),
        }
        return Answer(result.bytes(), fmt if statement.returns_rows else None, summary)

    @contextmanager
    def _scoped(self, session: Any, settings: dict[str, str], database: str) -> Iterator[None]:
        """Apply a request's settings and database on the shared session, and
        undo them after it, whatever happened."""
        undo: list[str] = []
        try:
            for name, value in settings.items():
                if not _IDENTIFIER.fullmatch(name):
                    raise ClickHouseError(115, "UNKNOWN_SETTING", f"Unknown setting {name!r}")
                # The value as a string literal: the engine converts it to the
                # setting's type, as it does for a URL parameter.
                self._run(session, f"SET {name} = {sql_string(value)}")
                undo.append(f"SET {name} = DEFAULT")
            if database:
                self._run(session, f"USE {_quote_identifier(database)}")
                undo.append("USE default")
            yield
        finally:
            for statement in reversed(undo):
                self._run(session, statement)

    def close(self) -> None:
        for session in (self._ro, self._rw):
            session.close()
        self.history.close()


# -- HTTP ---------------------------------------------------------------------

_TEXT_TYPES = (
    (("TabSeparated", "TSV"), "text/tab-separated-values; charset=UTF-8"),
    (("CSV",), "text/csv; charset=UTF-8; header=absent"),
    (("JSON", "NDJSON"), "application/json; charset=UTF-8"),
)
_BINARY_FORMATS = (
    "Native", "RowBinary", "Parquet", "Arrow", "ORC", "Avro", "MsgPack", "BSON", "Protobuf", "Npy", "CapnProto"
)


def content_type(fmt: str) -> str:
    for prefixes, value in _TEXT_TYPES:
        if fmt.startswith(prefixes):
            return value
    return "application/octet-stream" if fmt.startswith(_BINARY_FORMATS) else "text/plain; charset=UTF-8"


class LedgerServer:
    """The HTTP face of a ``LedgerEngine``; one thread runs every statement
    (chDB sessions are not thread-safe), the event loop keeps reading."""

    def __init__(self, engine: LedgerEngine, gate: TokenGate | None = None) -> None:
        self.engine = engine
        self.gate = gate or TokenGate(None)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chdb")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.router.add_route("*", "/ping", self._ping)
        app.router.add_get("/", self._query)
        app.router.add_post("/", self._query)
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        return app

    async def _ping(self, request: web.Request) -> web.Response:
        return web.Response(text="Ok.\n")

    async def _unknown(self, request: web.Request) -> web.Response:
        text = f"There is no handle {request.path}\n\nUse / or /ping for health checks.\n"
        return web.Response(status=404, text=text)

    async def _query(self, request: web.Request) -> web.Response:
        if request.method != "POST" and "query" not in request.query:
            return web.Response(text="Ok.\n")
        headers = {
            "X-ClickHouse-Query-Id": request.query.get("query_id") or str(uuid.uuid4()),
            "X-ClickHouse-Timezone": self.engine.timezone,
        }
        try:
            if not self.gate.allows(request.headers):
                # ClickHouse's own answer to a wrong password (its HTTP status too).
                raise ClickHouseError(516, "AUTHENTICATION_FAILED", "Authentication failed: password is incorrect")
            query = await read_request(request)
            answer = await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.execute, query)
        except ClickHouseError as exc:
            headers["X-ClickHouse-Exception-Code"] = str(exc.code)
            headers["Content-Type"] = "text/plain; charset=UTF-8"
            body = f"{exc.message} (version {self.engine.version})\n"
            return web.Response(status=exc.http_status, body=body.encode(), headers=headers)
        headers["X-ClickHouse-Summary"] = json.dumps(answer.summary, separators=(",", ":"))
        if answer.output_format is not None:
            headers["X-ClickHouse-Format"] = answer.output_format
            headers["Content-Type"] = content_type(answer.output_format)
        else:
            headers["Content-Type"] = "text/plain; charset=UTF-8"
        return web.Response(body=answer.body, headers=headers)

    def close(self) -> None:
        self._executor.shutdown(wait=True)  # a statement in flight finishes first


async def _serve(server: LedgerServer, host: str, port: int) -> None:
    # auto_decompress off: aiohttp would undo gzip only; decompress() does all.
    runner = web.AppRunner(server.app(), access_log=None, shutdown_timeout=5, auto_decompress=False)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            reason = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
            raise ServiceError(f"ledger-server: cannot listen on {host}:{port}: {reason}") from None
        bound_port = runner.addresses[0][1] if runner.addresses else port
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(READY_LINE.format(host=host, port=bound_port), flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(history_dir: Path, host: str = "127.0.0.1", port: int = 8123, gate: TokenGate | None = None) -> None:
    """Serve the ledger in ``history_dir`` until SIGINT or SIGTERM (blocking).

    Raises ConfigError (before opening anything) for a non-loopback ``host``
    without a token, HistoryError when the directory cannot be opened (another
    process holds it) and ServiceError when the port is taken.
    """
    gate = gate or TokenGate(None)
    require_token_off_loopback(host, gate, "ledger-server")
    engine = LedgerEngine(history_dir)
    server = LedgerServer(engine, gate)
    try:
        asyncio.run(_serve(server, host, port))
    finally:
        server.close()
        engine.close()
