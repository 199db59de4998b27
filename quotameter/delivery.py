"""End-to-end delivery: the ledger, not the broker, acknowledges an event.

Every shim numbers the events it spools (gateway_shim/spool.py: dense
sequence numbers, one series per spool, named by the spool's random id) and
sends both with each Kafka record as headers: a record of one event names
its seq; a record carrying a batch of events names the seq of each, in the
batch's order, as ranges (``SEQS_HEADER``). Once a worker has an event's
row in the ledger (or knows the ledger had it: a duplicate), it sets the
event's bit in a Redis bitmap of that spool:

    {p}:ledgered:{spool}:{block}   bit (seq mod BLOCK_BITS) of block seq // BLOCK_BITS

The shim reads the bits above its watermark, moves the watermark past every
contiguous set bit, and only then forgets the events below it. A bit is only
ever set after the ledger has the row, so a set bit is a true "in the ledger";
a lost bit (Redis restarted from an older snapshot) only makes the shim send
the event again, which the worker's dedupe drops, setting the bit again.

Why Redis and not a query of the ledger from the shim: every shim already
talks to Redis, the ledger may be chDB inside a worker process, and a few
bytes per thousand events answer "how far is the ledger contiguous" for one
GETRANGE whatever the number of workers or partitions.

Pure: names and bit arithmetic only. Redis bit offsets count from the most
significant bit of byte 0, as SETBIT and BITFIELD do.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from enum import StrEnum

SPOOL_HEADER = "quotameter-spool"  # the spool's id (hex), ASCII
SEQ_HEADER = "quotameter-seq"  # the event's sequence number in that spool, ASCII decimal
# A batch record's sequence numbers, one per event in order, as ASCII runs:
# "7-9,12,15-16" is 7, 8, 9, 12, 15, 16. A partition's events of one turn of
# the sender are mostly consecutive, so the header stays a few bytes.
SEQS_HEADER = "quotameter-seqs"

BLOCK_BITS = 1 << 20  # one key per 2^20 events: 128 KiB at most
MARK_TTL_S = 14 * 24 * 3600  # a spool gone for two weeks leaves nothing behind


class AckMode(StrEnum):
    """When the shim may forget a spooled event (``shim.delivery``)."""

    LEDGER = "ledger"  # once the ledger has it: nothing is lost if the broker keeps nothing
    BROKER = "broker"  # once Kafka acknowledged it (acks=all): only for a broker that persists and replicates


def block_of(seq: int) -> tuple[int, int]:
    """(block, bit within the block) of a sequence number."""
    return divmod(seq, BLOCK_BITS)


def marks_by_block(seqs: Iterable[int]) -> dict[int, list[int]]:
    """Bit offsets to set, grouped by block."""
    out: dict[int, list[int]] = {}
    for seq in seqs:
        block, bit = divmod(seq, BLOCK_BITS)
        out.setdefault(block, []).append(bit)
    return out


MAX_RUN_BITS = 63  # the widest unsigned field BITFIELD sets (u63)


def bit_runs(bits: Iterable[int]) -> list[tuple[int, int]]:
    """``bits`` as runs of consecutive offsets, (first, length), each at most
    MAX_RUN_BITS long: setting a run's field to all ones sets exactly those
    bits, one BITFIELD subcommand for up to 63 events instead of one each."""
    runs: list[tuple[int, int]] = []
    first = length = 0
    for bit in sorted(set(bits)):
        if length and bit == first + length and length < MAX_RUN_BITS:
            length += 1
            continue
        if length:
            runs.append((first, length))
        first, length = bit, 1
    if length:
        runs.append((first, length))
    return runs


def set_bits(data: bytes, first_bit: int) -> Iterator[int]:
    """The offsets (``first_bit`` + position) of the set bits in ``data``,
    where ``data[0]`` holds bits ``first_bit`` .. ``first_bit + 7``."""
    for index, byte in enumerate(data):
        if not byte:
            continue
        base = first_bit + index * 8
        for position in range(8):
            if byte & (0x80 >> position):
                yield base + position


def delivery_headers(spool_id: bytes, seq: int) -> list[tuple[str, bytes]]:
    return [(SPOOL_HEADER, spool_id), (SEQ_HEADER, str(seq).encode())]


def format_seqs(seqs: Sequence[int]) -> bytes:
    """``seqs`` (increasing) as runs, see SEQS_HEADER."""
    runs: list[str] = []
    start = previous = None
    for seq in seqs:
        if previous is not None and seq == previous + 1:
            previous = seq
            continue
        if start is not None:
            runs.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = seq
    if start is not None:
        runs.append(str(start) if start == previous else f"{start}-{previous}")
    return ",".join(runs).encode()


def parse_seqs(raw: bytes | str) -> list[int] | None:
    """The sequence numbers of a SEQS_HEADER, or None when it is malformed."""
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    out: list[int] = []
    try:
        for run in text.split(","):
            first, dash, last = run.partition("-")
            low = int(first)
            high = int(last) if dash else low
            if low < 0 or high < low or high - low > MAX_RUN:
                return None
            out.extend(range(low, high + 1))
    except ValueError:
        return None
    return out


MAX_RUN = 1 << 16  # no run longer than a record may hold events: a header cannot make a worker build huge lists


def batch_delivery_headers(spool_id: bytes, seqs: Sequence[int]) -> list[tuple[str, bytes]]:
    return [(SPOOL_HEADER, spool_id), (SEQS_HEADER, format_seqs(seqs))]


def read_seqs(headers: object) -> tuple[str, list[int]] | None:
    """(spool id, the seq of every event) from a record's headers, one event's
    or a batch's; None for events that did not come from a shim's spool."""
    if not headers:
        return None
    pairs = headers.items() if hasattr(headers, "items") else headers
    for name, value in pairs:  # type: ignore[union-attr]
        if name == SEQS_HEADER:
            break
    else:
        single = read_headers(headers)
        return None if single is None else (single[0], [single[1]])
    spool_id = _spool_id(headers)
    seqs = parse_seqs(value) if value else None
    if spool_id is None or seqs is None:
        return None
    return spool_id, seqs


def _spool_id(headers: object) -> str | None:
    pairs = headers.items() if hasattr(headers, "items") else headers
    for name, value in pairs:  # type: ignore[union-attr]
        if name == SPOOL_HEADER and value:
            try:
                spool_id = value.decode("ascii") if isinstance(value, bytes) else str(value)
            except UnicodeDecodeError:
                return None
            return spool_id if spool_id.isalnum() else None
    return None


def read_headers(headers: object) -> tuple[str, int] | None:
    """(spool id, seq) from a record's headers (a Mapping or (name, value)
    pairs, as Faust and aiokafka give them), or None for an event that did
    not come from a shim's spool."""
    if not headers:
        return None
    pairs = headers.items() if hasattr(headers, "items") else headers
    spool = seq = None
    for name, value in pairs:  # type: ignore[union-attr]
        if name == SPOOL_HEADER:
            spool = value
        elif name == SEQ_HEADER:
            seq = value
    if not spool or seq is None:
        return None
    try:
        spool_id = spool.decode("ascii") if isinstance(spool, bytes) else str(spool)
        number = int(seq)
    except (UnicodeDecodeError, ValueError):
        return None
    if number < 0 or not spool_id.isalnum():
        return None
    return spool_id, number
