"""End-to-end delivery: the ledger, not the broker, acknowledges an event.

Every shim numbers the events it spools (gateway_shim/spool.py: dense
sequence numbers, one series per spool, named by the spool's random id) and
sends both with each Kafka record as headers. Once a worker has an event's
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

from collections.abc import Iterable, Iterator
from enum import StrEnum

SPOOL_HEADER = "quotameter-spool"  # the spool's id (hex), ASCII
SEQ_HEADER = "quotameter-seq"  # the event's sequence number in that spool, ASCII decimal

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
