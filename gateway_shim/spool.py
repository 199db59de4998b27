"""The on-disk write-ahead spool of usage events.

Every event is appended here *before* it is handed to Kafka, and stays until
it is delivered: in the ledger (``shim.delivery: ledger``, the default) or
acknowledged by Kafka (``broker``). The directory holds:

    LOCK                     flock'ed by the one shim that owns the spool
    ID                       the spool's random id: with a seq, it names an event
                             for the ledger's confirmations (quotameter/delivery.py)
    00000000000000000042.seg segments, named by the sequence number of their first record
    cursor                   the acknowledged watermark: every seq below it is delivered

A record is ``header | key | value``; the header is ``<IIQqH``: value length,
CRC-32 (of seq, timestamp, key length, key and value), sequence number,
Kafka timestamp in ms, key length. Sequence numbers are dense and increase
by one per record across segments, so "everything below N is acknowledged"
is one integer.

What a crash at each step causes:

1. ``append``: one ``os.write`` of the whole record to the open segment. Once
   it returns the record is in the kernel's page cache: a SIGKILL of the shim
   (or any crash of the process) cannot lose it. A power loss or kernel crash
   can, until step 2 ran.
2. ``sync`` (group commit, every ``spool_fsync_interval_ms``, in a thread):
   fdatasync of the segments written since the last sync, and of the
   directory when a segment was created. After it, the records survive a
   power loss too. A record torn by a power loss is found by its CRC on the
   next start; the tail from there on is cut off (those events are the only
   loss, and only on power loss within one sync interval).
3. ``ack``: a record is delivered (the ledger confirmed it, or Kafka
   acknowledged it); the watermark moves past every contiguous acknowledged
   seq (in memory).
4. ``checkpoint`` (every few hundred ms): the watermark is written to
   ``cursor`` (temp file + rename), then segments wholly below it are deleted.
   A crash before the rename replays records acknowledged since the last
   checkpoint: duplicates, which the pipeline drops by event id. A lost or
   unreadable cursor replays every segment still on disk: duplicates again,
   never a loss. Segments are deleted only after the cursor that covers them.
"""

from __future__ import annotations

import bisect
from collections import deque
import fcntl
import logging
import os
import struct
import uuid
import zlib
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger("gateway_shim.spool")

_HEADER = struct.Struct("<IIQqH")  # value_len, crc32, seq, timestamp_ms, key_len
_CRC_PREFIX = struct.Struct("<QqH")  # the header fields the CRC covers
_SUFFIX = ".seg"
_MAX_KEY_BYTES = 0xFFFF


class SpoolRecord(NamedTuple):
    seq: int
    key: bytes
    timestamp_ms: int
    value: bytes


class SpoolLocked(OSError):
    """Another process owns this spool directory. Give every shim instance its
    own ``shim.spool_dir``."""


def encode_record(record: SpoolRecord) -> bytes:
    if len(record.key) > _MAX_KEY_BYTES:
        raise ValueError(f"spool key longer than {_MAX_KEY_BYTES} bytes")
    prefix = _CRC_PREFIX.pack(record.seq, record.timestamp_ms, len(record.key))
    crc = zlib.crc32(record.value, zlib.crc32(record.key, zlib.crc32(prefix)))
    header = _HEADER.pack(len(record.value), crc, record.seq, record.timestamp_ms, len(record.key))
    return header + record.key + record.value


def decode_records(data: bytes, offset: int = 0) -> tuple[list[tuple[int, SpoolRecord]], int]:
    """The whole records in ``data`` from ``offset``: ``[(end_offset, record)]``
    and the offset where decoding stopped (a torn or corrupt record, or the end)."""
    out: list[tuple[int, SpoolRecord]] = []
    while offset + _HEADER.size <= len(data):
        value_len, crc, seq, timestamp_ms, key_len = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        end = start + key_len + value_len
        if end > len(data):
            break
        key, value = data[start : start + key_len], data[start + key_len : end]
        prefix = _CRC_PREFIX.pack(seq, timestamp_ms, key_len)
        if zlib.crc32(value, zlib.crc32(key, zlib.crc32(prefix))) != crc:
            break
        out.append((end, SpoolRecord(seq, key, timestamp_ms, value)))
        offset = end
    return out, offset


class Spool:
    """Append, read back in order, acknowledge, and forget what Kafka holds.

    One thread appends, acknowledges and checkpoints; ``run_sync`` and ``read``
    may run in a worker thread meanwhile (``read`` stops below the ``next_seq``
    it saw, so it never meets a record being written).
    """

    def __init__(
        self, directory: Path, max_bytes: int, segment_bytes: int | None = None, durable: bool = True
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        # Whole segments count against max_bytes, so one is at most an eighth of it.
        self.segment_bytes = segment_bytes or min(max(max_bytes // 8, 1024), 64 * 1024 * 1024)
        self.durable = durable  # False: no fdatasync, the kernel writes back when it likes
        self._segments: list[int] = []  # first seq of each segment on disk, ascending
        self._sizes: dict[int, int] = {}
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._retired: list[int] = []  # fds of full segments, closed after their sync
        self._dir_dirty = False
        self._dirty = False
        self._acked: set[int] = set()  # acknowledged seqs above the watermark
        self._cursor_written = -1
        self._read_hint: tuple[int, int, int] | None = None
        self.next_seq = 0
        self.watermark = 0
        self.spool_id = b""  # ASCII hex, read or made by open()
        # (seq, timestamp_ms) of the records appended since open and not yet delivered,
        # for the age of the oldest (a gauge); what open replayed has its first time apart.
        self._times: deque[tuple[int, int]] = deque()
        self._opened_at_seq = 0
        self._replayed_oldest_ms: int | None = None

    # -- lifecycle --------------------------------------------------------

    def open(self) -> Spool:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolLocked(f"spool {self.directory} is in use by another process") from None
        self.spool_id = self._read_or_make_id()
        self._segments = sorted(int(p.name[: -len(_SUFFIX)]) for p in self.directory.glob(f"*{_SUFFIX}"))
        self._sizes = {first: self._path(first).stat().st_size for first in self._segments}
        self.watermark = self._read_cursor()
        if self._segments:
            self.next_seq = self._recover_tail(self._segments[-1])
            self.watermark = min(max(self.watermark, self._segments[0]), self.next_seq)
        else:
            self.next_seq = self.watermark
        self._cursor_written = self.watermark
        self._open_segment(self._segments[-1] if self._segments else self.next_seq)
        self._opened_at_seq = self.next_seq
        if self.depth:
            first = self.read(self.watermark, 1)
            self._replayed_oldest_ms = first[0].timestamp_ms if first else None
            log.warning("spool %s holds %d unacknowledged events (seq %d..%d): replaying them",
                        self.directory, self.depth, self.watermark, self.next_seq - 1)
        return self

    def close(self) -> None:
        self.checkpoint()
        self.sync()  # also closes the segments the checkpoint retired
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None

    # -- the hot path -------------------------------------------------------

    def append(self, key: bytes, timestamp_ms: int, value: bytes) -> SpoolRecord:
        """Write one record (one ``os.write``); SIGKILL-safe once it returns."""
        assert self._fd is not None, "Spool.open() was not called"
        record = SpoolRecord(self.next_seq, key, timestamp_ms, value)
        data = encode_record(record)
        first = self._segments[-1]
        if self._sizes[first] and self._sizes[first] + len(data) > self.segment_bytes:
            first = self._rotate()
        written = os.write(self._fd, data)
        if written != len(data):  # a short write to a regular file: the disk is full
            os.ftruncate(self._fd, self._sizes[first])
            raise OSError(28, "short write to the spool (disk full?)")
        self._sizes[first] += written
        self._dirty = True
        self.next_seq += 1
        self._times.append((record.seq, timestamp_ms))
        return record

    def ack(self, seq: int) -> None:
        if seq < self.watermark:
            return
        self._acked.add(seq)
        while self.watermark in self._acked:
            self._acked.discard(self.watermark)
            self.watermark += 1
        times = self._times
        while times and times[0][0] < self.watermark:
            times.popleft()

    def oldest_ms(self) -> int | None:
        """The time (Unix ms) of the oldest undelivered record, None when all are delivered.
        Read from another thread (a metrics collection): a stale answer is harmless."""
        if self.watermark >= self.next_seq:
            return None
        if self.watermark < self._opened_at_seq:
            return self._replayed_oldest_ms
        try:
            return self._times[0][1]
        except IndexError:
            return None

    def is_acked(self, seq: int) -> bool:
        return seq < self.watermark or seq in self._acked

    # -- background ---------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return self._dirty or bool(self._retired) or self._dir_dirty

    def take_sync_work(self) -> tuple[list[int], int | None, bool]:
        """What the next sync must flush; call on the thread that appends."""
        work = (self._retired, self._fd, self._dir_dirty)
        self._retired, self._dir_dirty, self._dirty = [], False, False
        return work

    def run_sync(self, work: tuple[list[int], int | None, bool]) -> None:
        """fdatasync ``work`` (safe in a worker thread while appends go on)."""
        retired, fd, dir_dirty = work
        for old in retired:
            if self.durable:
                os.fdatasync(old)
            os.close(old)
        if fd is not None and self.durable:
            os.fdatasync(fd)
        if dir_dirty and self.durable:
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def sync(self) -> None:
        self.run_sync(self.take_sync_work())

    def checkpoint(self) -> None:
        """Persist the watermark, then delete the segments wholly below it."""
        if self.watermark != self._cursor_written:
            tmp = self.directory / "cursor.tmp"
            tmp.write_text(f"{self.watermark}\n")
            os.replace(tmp, self.directory / "cursor")
            self._cursor_written = self.watermark
        if self.watermark == self.next_seq and self._sizes[self._segments[-1]]:
            self._rotate()  # all acknowledged: start afresh so the old segment can go
        while len(self._segments) > 1 and self._segments[1] <= self._cursor_written:
            first = self._segments.pop(0)
            self._path(first).unlink(missing_ok=True)
            del self._sizes[first]

    def read(self, from_seq: int, limit: int) -> list[SpoolRecord]:
        """Up to ``limit`` records from ``from_seq`` on, in order (safe in a thread)."""
        segments, end_seq = list(self._segments), self.next_seq
        out: list[SpoolRecord] = []
        index, offset = max(bisect.bisect_right(segments, from_seq) - 1, 0), 0
        hint = self._read_hint  # where the last read stopped, to resume without rescanning
        if hint is not None and hint[0] == from_seq and hint[1] in segments:
            index, offset = segments.index(hint[1]), hint[2]
        while index < len(segments) and len(out) < limit and from_seq < end_seq:
            buf = b""
            try:
                with open(self._path(segments[index]), "rb") as f:
                    f.seek(offset)
                    while len(out) < limit and from_seq < end_seq:
                        chunk = f.read(1 << 20)
                        if not chunk:
                            break
                        buf += chunk
                        records, stopped = decode_records(buf)
                        consumed = 0
                        for end, record in records:
                            if record.seq >= end_seq or len(out) >= limit:
                                break
                            consumed = end
                            if record.seq >= from_seq:
                                out.append(record)
                                from_seq = record.seq + 1
                        offset += consumed
                        buf = buf[consumed:]
                        if consumed < stopped:
                            break
            except FileNotFoundError:  # deleted under us: wholly acknowledged
                pass
            if len(out) >= limit or from_seq >= end_seq:
                break
            index, offset = index + 1, 0  # this segment is exhausted
            if index < len(segments) and from_seq < segments[index]:
                if buf:
                    log.error("spool segment %d is corrupt: events seq %d..%d are lost",
                              segments[index - 1], from_seq, segments[index] - 1)
                from_seq = segments[index]
        self._read_hint = (from_seq, segments[index], offset) if index < len(segments) else None
        return out

    # -- figures ------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Events written and not yet acknowledged by Kafka."""
        return self.next_seq - self.watermark - len(self._acked)

    @property
    def size_bytes(self) -> int:
        return sum(self._sizes.values())

    @property
    def full(self) -> bool:
        return self.size_bytes >= self.max_bytes

    def stats(self) -> dict[str, object]:
        return {
            "dir": str(self.directory),
            "depth": self.depth,
            "bytes": self.size_bytes,
            "max_bytes": self.max_bytes,
            "segments": len(self._segments),
            "full": self.full,
        }

    # -- internals ----------------------------------------------------------

    def _path(self, first: int) -> Path:
        return self.directory / f"{first:020d}{_SUFFIX}"

    def _open_segment(self, first: int) -> None:
        if not self._segments or self._segments[-1] != first:
            self._segments.append(first)
            self._sizes[first] = 0
            self._dir_dirty = True
        self._fd = os.open(self._path(first), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _rotate(self) -> int:
        assert self._fd is not None
        self._retired.append(self._fd)  # fdatasync'ed and closed by the next sync
        self._open_segment(self.next_seq)
        return self.next_seq

    def _read_or_make_id(self) -> bytes:
        path = self.directory / "ID"
        try:
            found = path.read_bytes().strip()
            if found.isalnum():
                return found
        except FileNotFoundError:
            pass
        # A new spool (or an unreadable id: a new series, and the seqs below
        # the cursor are delivered whatever their old id was).
        made = uuid.uuid4().hex.encode()
        tmp = self.directory / "ID.tmp"
        tmp.write_bytes(made + b"\n")
        os.replace(tmp, path)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return made

    def _read_cursor(self) -> int:
        try:
            return int((self.directory / "cursor").read_text().strip())
        except (OSError, ValueError):
            return 0  # replay whatever is on disk: duplicates at worst

    def _recover_tail(self, first: int) -> int:
        path = self._path(first)
        data = path.read_bytes()
        records, stopped = decode_records(data)
        if stopped < len(data):
            log.error("spool %s: torn or corrupt tail at byte %d of %d (a power loss?): cut off",
                      path.name, stopped, len(data))
            os.truncate(path, stopped)
            self._sizes[first] = stopped
        return records[-1][1].seq + 1 if records else first
