"""The spool's file format, replay order, acknowledgement and recovery, on a
temporary directory (no services)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway_shim.spool import Spool, SpoolLocked, SpoolRecord, decode_records, encode_record


def _fill(spool: Spool, count: int, size: int = 100) -> list[SpoolRecord]:
    return [spool.append(f"c{i % 3}".encode(), 1_700_000_000_000 + i, bytes([i % 251]) * size) for i in range(count)]


def test_record_round_trip_and_corruption_is_detected() -> None:
    records = [SpoolRecord(7, b"acme", 123, b'{"id":"a"}'), SpoolRecord(8, b"", -1, b"")]
    data = b"".join(encode_record(r) for r in records)
    decoded, stopped = decode_records(data)
    assert [r for _, r in decoded] == records and stopped == len(data)
    flipped = bytearray(data)
    flipped[-len(encode_record(records[1])) - 1] ^= 0xFF  # last byte of the first record's value
    decoded, stopped = decode_records(bytes(flipped))
    assert decoded == [] and stopped == 0
    decoded, stopped = decode_records(data[:-3])  # a torn tail
    assert [r for _, r in decoded] == records[:1]


def test_replays_in_order_across_segments_and_restarts(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1000).open()
    written = _fill(spool, 50)
    assert len(list(tmp_path.glob("*.seg"))) > 5
    assert spool.read(0, 1000) == written
    assert spool.read(10, 5) == written[10:15]
    assert spool.read(15, 100) == written[15:]  # resumes from the hint
    assert spool.read(3, 2) == written[3:5]  # and still seeks backwards
    for record in written[:20]:
        spool.ack(record.seq)
    spool.ack(30)  # out of order: the watermark waits for 20..29
    assert spool.watermark == 20 and spool.depth == 29
    spool.close()

    again = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1000).open()
    assert again.watermark == 20 and again.next_seq == 50
    assert again.read(again.watermark, 1000) == written[20:]  # 30 comes again: a duplicate, not a loss
    assert again.append(b"k", 1, b"v").seq == 50
    again.close()


def test_acknowledged_segments_are_deleted_after_the_cursor(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1000).open()
    written = _fill(spool, 40)
    before = spool.size_bytes
    for record in written:
        spool.ack(record.seq)
    spool.checkpoint()
    assert (tmp_path / "cursor").read_text().strip() == "40"
    assert len(list(tmp_path.glob("*.seg"))) == 1 and spool.size_bytes < before
    assert spool.depth == 0 and spool.read(spool.watermark, 10) == []
    spool.close()
    again = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1000).open()
    assert again.depth == 0 and again.next_seq == 40
    again.close()


def test_a_torn_tail_is_cut_and_appends_continue(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20).open()
    written = _fill(spool, 5)
    spool.close()
    [segment] = tmp_path.glob("*.seg")
    os.truncate(segment, segment.stat().st_size - 10)  # a power loss mid-record
    again = Spool(tmp_path, max_bytes=1 << 20).open()
    assert again.next_seq == 4 and again.read(0, 10) == written[:4]
    assert again.append(b"k", 2, b"after").seq == 4
    assert [r.value for r in again.read(0, 10)][-1] == b"after"
    again.close()


def test_a_lost_cursor_replays_everything_on_disk(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20).open()
    written = _fill(spool, 6)
    for record in written[:4]:
        spool.ack(record.seq)
    spool.close()
    (tmp_path / "cursor").unlink()
    again = Spool(tmp_path, max_bytes=1 << 20).open()
    assert again.read(again.watermark, 10) == written  # duplicates, never a loss
    again.close()


def test_full_is_reported_and_the_directory_is_locked(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=2000).open()
    assert not spool.full
    _fill(spool, 25)
    assert spool.full and spool.stats()["full"] is True and spool.stats()["depth"] == 25
    with pytest.raises(SpoolLocked):
        Spool(tmp_path, max_bytes=2000).open()
    spool.sync()
    spool.close()
    Spool(tmp_path, max_bytes=2000).open().close()  # the lock went with the owner


def test_a_corrupt_middle_segment_is_skipped_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=600).open()
    written = _fill(spool, 20)
    segments = sorted(tmp_path.glob("*.seg"))
    data = bytearray(segments[1].read_bytes())
    data[30] ^= 0xFF
    segments[1].write_bytes(bytes(data))
    got = spool.read(0, 100)
    second_first = int(segments[1].name.split(".")[0])
    third_first = int(segments[2].name.split(".")[0])
    assert [r.seq for r in got] == [r.seq for r in written if not second_first <= r.seq < third_first]
    assert "corrupt" in caplog.text
    spool.close()
