"""The pure half of ledger confirmations: headers, blocks and bit offsets."""

from __future__ import annotations

from gateway_shim.confirmations import _spans
from quotameter.delivery import BLOCK_BITS, delivery_headers, marks_by_block, read_headers, set_bits


def _bitmap(bits: list[int], length: int) -> bytes:
    """What Redis holds after SETBIT of each of ``bits`` (offset 0 = the MSB of byte 0)."""
    data = bytearray(length)
    for bit in bits:
        data[bit // 8] |= 0x80 >> (bit % 8)
    return bytes(data)


def test_set_bits_reads_redis_bit_order() -> None:
    bits = [0, 7, 8, 13, 63]
    assert list(set_bits(_bitmap(bits, 8), 0)) == bits
    # A read that starts at byte 2 (bit 16) numbers from there.
    assert list(set_bits(_bitmap(bits, 8)[2:], 16)) == [63]
    assert list(set_bits(b"\x00\x00", 0)) == []


def test_marks_group_by_block() -> None:
    seqs = [5, BLOCK_BITS - 1, BLOCK_BITS, 3 * BLOCK_BITS + 2]
    assert marks_by_block(seqs) == {0: [5, BLOCK_BITS - 1], 1: [0], 3: [2]}


def test_spans_cut_at_block_edges() -> None:
    assert list(_spans(10, 20)) == [(0, 10, 19)]
    assert list(_spans(BLOCK_BITS - 2, BLOCK_BITS + 3)) == [(0, BLOCK_BITS - 2, BLOCK_BITS - 1), (1, 0, 2)]
    assert list(_spans(7, 7)) == []


def test_headers_round_trip_as_faust_and_aiokafka_give_them() -> None:
    headers = delivery_headers(b"ab12", 42)
    assert read_headers(headers) == ("ab12", 42)
    assert read_headers(tuple(headers)) == ("ab12", 42)  # aiokafka's ConsumerRecord
    assert read_headers(dict(headers)) == ("ab12", 42)  # a Mapping


def test_headers_that_name_no_spool_event_are_ignored() -> None:
    assert read_headers(None) is None
    assert read_headers([]) is None
    assert read_headers([("quotameter-seq", b"3")]) is None
    assert read_headers([("quotameter-spool", b"ab"), ("quotameter-seq", b"x")]) is None
    assert read_headers([("quotameter-spool", b"ab"), ("quotameter-seq", b"-1")]) is None
    assert read_headers([("quotameter-spool", b"a:b*"), ("quotameter-seq", b"1")]) is None  # no key injection


def test_bit_runs_cover_exactly_the_bits() -> None:
    from quotameter.delivery import MAX_RUN_BITS, bit_runs

    bits = [9, 3, 4, 5, 5, *range(100, 100 + 2 * MAX_RUN_BITS + 1), 7]
    runs = bit_runs(bits)
    assert runs[:3] == [(3, 3), (7, 1), (9, 1)]
    assert runs[3:] == [(100, MAX_RUN_BITS), (100 + MAX_RUN_BITS, MAX_RUN_BITS), (100 + 2 * MAX_RUN_BITS, 1)]
    covered = [first + i for first, length in runs for i in range(length)]
    assert covered == sorted(set(bits))
    assert bit_runs([]) == []
