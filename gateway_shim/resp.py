"""The admission and settle scripts over one auto-pipelined Redis connection.

redis-py spends ~50 µs of CPU per EVALSHA (argument encoding, the connection
pool, retries, events) and one send and one receive per call on a pooled
connection of its own. The hot path needs none of that: every script call a
turn of the event loop makes is written to one connection in one ``send``,
and the replies (Redis answers in order) are read back in bulk with hiredis.
Each script still runs atomically on its own; only the bytes share a syscall.

Failures read exactly as redis-py's do, so the enforcer's fail modes see the
same exceptions: ``redis.exceptions.ConnectionError`` when Redis cannot be
reached or drops the connection (every call in flight on it fails),
``TimeoutError`` when a reply takes longer than ``timeout_s`` (the connection
is dropped: its replies can no longer be matched), and the error replies
parsed as redis-py parses them (``NOSCRIPT`` reloads the script, ``LOADING``
is a ``BusyLoadingError``). The next call after a failure reconnects.

Only plain TCP URLs (``redis://[user:password@]host[:port][/db]``) take this
path; ``from_url`` returns None for TLS or unix sockets, and the caller keeps
redis-py. On a Redis Cluster, gateway_shim/cluster_pipe.py keeps one such pipe
per primary and routes each script to the primary that owns its slot.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Iterable
from typing import Any

import hiredis
import redis.exceptions
from redis._parsers.base import BaseParser
from redis.asyncio.connection import parse_url

_ASKING = b"*1\r\n$6\r\nASKING\r\n"
_CHECK_EVERY_S = 0.25  # how often a connection with replies outstanding checks for a stuck one


def encode_args(args: Iterable[object]) -> bytes:
    """RESP bulk strings of ``args``, encoded as redis-py encodes them."""
    out = []
    for value in args:
        kind = type(value)
        if kind is bytes:
            data = value
        elif kind is str:
            data = value.encode()
        elif kind is int:
            data = b"%d" % value
        elif kind is float:
            data = repr(value).encode()
        elif isinstance(value, bool):
            raise redis.exceptions.DataError("Invalid input of type: 'bool'. Convert to a bytes, string, int or float first.")
        elif isinstance(value, (bytes, memoryview)):
            data = bytes(value)
        elif isinstance(value, (int, float, str)):
            data = (repr(value) if isinstance(value, (int, float)) else str(value)).encode()
        else:
            raise redis.exceptions.DataError(
                f"Invalid input of type: '{type(value).__name__}'. Convert to a bytes, string, int or float first."
            )
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class Script:
    """A Lua script: its source and SHA-1, and its command prefixes."""

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()
        self._evalsha = encode_args((b"EVALSHA", self.sha))
        self._eval = encode_args((b"EVAL", self.source))

    def command(self, numkeys: int, keys: bytes, args: bytes, count: int, *, load: bool = False) -> bytes:
        """``count``: how many bulk strings ``keys`` and ``args`` hold together."""
        numkeys_arg = b"%d" % numkeys
        return b"".join((
            b"*%d\r\n" % (count + 3),
            self._eval if load else self._evalsha,
            b"$%d\r\n%s\r\n" % (len(numkeys_arg), numkeys_arg),
            keys,
            args,
        ))


class _Connection(asyncio.Protocol):
    def __init__(self, pipe: ScriptPipe) -> None:
        self._pipe = pipe
        self._reader = hiredis.Reader(protocolError=redis.exceptions.InvalidResponse, replyError=BaseParser.parse_error)
        self._waiters: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._buffer: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._watchdog: asyncio.TimerHandle | None = None
        self.closed = False

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader, waiters = self._reader, self._waiters
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except redis.exceptions.InvalidResponse as exc:
                self._fail(redis.exceptions.ConnectionError(f"Protocol error from Redis: {exc}"))
                return
            if reply is False:
                return
            if not waiters:
                self._fail(redis.exceptions.ConnectionError("Redis sent a reply nobody asked for."))
                return
            future = waiters.popleft()[0]
            if not future.done():  # a cancelled caller: its reply is read and dropped
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(redis.exceptions.ConnectionError(
            f"Connection to Redis at {self._pipe.address} lost" + (f": {exc}" if exc else ".")
        ))

    # -- calls --------------------------------------------------------------

    def call(self, command: bytes) -> asyncio.Future[Any]:
        if self.closed:
            raise redis.exceptions.ConnectionError(f"Connection to Redis at {self._pipe.address} closed.")
        future = self._loop.create_future()
        if not self._buffer:
            self._loop.call_soon(self._flush)
        self._buffer.append(command)
        self._waiters.append((future, self._loop.time()))
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(_CHECK_EVERY_S, self._check)
        return future

    def _flush(self) -> None:
        if self._buffer and self._transport is not None and not self.closed:
            data = b"".join(self._buffer)
            self._buffer.clear()
            self._transport.write(data)

    def _check(self) -> None:
        self._watchdog = None
        if self.closed or not self._waiters:
            return
        if self._loop.time() - self._waiters[0][1] > self._pipe.timeout_s:
            self._fail(redis.exceptions.TimeoutError(f"Timeout reading from Redis at {self._pipe.address}"))
            return
        self._watchdog = self._loop.call_later(_CHECK_EVERY_S, self._check)

    def _fail(self, exc: Exception) -> None:
        """Drop the connection; every call still waiting on it fails with ``exc``."""
        if not self.closed:
            self.closed = True
            self._pipe._lost(self)
            if self._transport is not None:
                self._transport.abort()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._buffer.clear()
        while self._waiters:
            future = self._waiters.popleft()[0]
            if not future.done():
                future.set_exception(exc)

    def close(self) -> None:
        self._fail(redis.exceptions.ConnectionError("Connection closed by the shim."))


class ScriptPipe:
    """Run scripts on one shared, auto-pipelined connection (see the module doc)."""

    def __init__(
        self,
        host: str,
        port: int = 6379,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        connect_timeout_s: float = 3.0,
        timeout_s: float = 5.0,
    ) -> None:
        self.host, self.port, self.db = host, port, db
        self.address = f"{host}:{port}"
        self._auth = tuple(a for a in (username, password) if a is not None)
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None

    @classmethod
    def from_url(cls, url: str, *, connect_timeout_s: float = 3.0, timeout_s: float = 5.0) -> ScriptPipe | None:
        """A pipe for a plain TCP ``redis://`` URL; None for anything else (keep redis-py)."""
        try:
            options = parse_url(url)
        except ValueError:
            return None
        if not url.startswith("redis://") or "connection_class" in options or "path" in options:
            return None
        if set(options) - {"host", "port", "db", "username", "password"}:
            return None  # query options this pipe does not apply
        return cls(
            options.get("host") or "localhost",
            int(options.get("port") or 6379),
            db=int(options.get("db") or 0),
            username=options.get("username"),
            password=options.get("password"),
            connect_timeout_s=connect_timeout_s,
            timeout_s=timeout_s,
        )

    async def evalsha(
        self, script: Script, numkeys: int, keys: bytes, args: bytes, count: int, *, slot_key: str = "",
        asking: bool = False,
    ) -> Any:
        """Run ``script`` (``keys`` and ``args`` RESP-encoded, ``count`` bulk strings in all).
        ``slot_key`` routes on a cluster (gateway_shim/cluster_pipe.py); ``asking``
        sends ASKING first, on the same connection, as a cluster's ASK redirection asks."""
        conn = self._conn
        if conn is None:
            conn = await self._connect()
        try:
            return await self._call(conn, script.command(numkeys, keys, args, count), asking)
        except redis.exceptions.NoScriptError:
            conn = self._conn or await self._connect()
            return await self._call(conn, script.command(numkeys, keys, args, count, load=True), asking)

    async def command(self, *args: object) -> Any:
        """One plain command (e.g. CLUSTER SLOTS), its reply as hiredis reads it."""
        conn = self._conn or await self._connect()
        return await conn.call(b"*%d\r\n" % len(args) + encode_args(args))

    @staticmethod
    async def _call(conn: _Connection, command: bytes, asking: bool) -> Any:
        if not asking:
            return await conn.call(command)
        # Written together, in order: ASKING applies to the very next command.
        asked, reply = await asyncio.gather(conn.call(_ASKING), conn.call(command), return_exceptions=True)
        for outcome in (asked, reply):
            if isinstance(outcome, BaseException):
                raise outcome
        return reply

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def _lost(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None

    async def _connect(self) -> _Connection:
        if self._connecting is not None:
            return await asyncio.shield(self._connecting)
        loop = asyncio.get_running_loop()
        connecting = self._connecting = loop.create_future()
        try:
            conn = await self._open(loop)
        except asyncio.CancelledError:
            connecting.cancel()
            raise
        except BaseException as exc:
            connecting.set_exception(exc)
            connecting.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        else:
            connecting.set_result(conn)
            return conn
        finally:
            self._connecting = None

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
        except TimeoutError:
            raise redis.exceptions.TimeoutError(f"Timeout connecting to Redis at {self.address}") from None
        except OSError as exc:
            raise redis.exceptions.ConnectionError(
                f"Error {exc.errno} connecting to {self.address}. {exc.strerror or exc}."
            ) from None
        setup = []
        if self._auth:
            setup.append(conn.call(b"*%d\r\n" % (len(self._auth) + 1) + encode_args((b"AUTH", *self._auth))))
        if self.db:
            setup.append(conn.call(b"*2\r\n" + encode_args((b"SELECT", self.db))))
        try:
            async with asyncio.timeout(self.timeout_s):
                for reply in setup:
                    await reply
        except redis.exceptions.ConnectionError:
            conn.close()
            raise
        except redis.exceptions.RedisError as exc:  # AUTH or SELECT refused
            conn.close()
            raise redis.exceptions.ConnectionError(f"Redis at {self.address} refused the connection setup: {exc}") from None
        except TimeoutError:
            conn.close()
            raise redis.exceptions.TimeoutError(f"Timeout setting up the connection to Redis at {self.address}") from None
        self._conn = conn
        return conn
