"""Quota state in Redis: each customer's period totals, as absolute values.

Every write is one run of ``usage_state.lua`` per (customer, period), all of a
batch pipelined in one round trip. The script writes whole totals (never
INCRBY) guarded by a version (the totals' event count), and in the same
atomic step releases the shim's reservations of the event ids those totals
now include (see ``quotameter.redis_keys``). Writing the same batch twice, a
retry or a replay leaves the same hash; an older state never overwrites a
newer one.

On a Redis Cluster the batch's pipeline is split by redis-py per primary
(each script's keys share its customer's slot). A cluster pipeline neither takes
``evalsha`` nor loads scripts first as a plain one does: the raw EVALSHA goes
in, and a NOSCRIPT answer loads the script on
every primary and sends the batch again (harmless: the writes are absolute and
versioned, see above).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from quotameter.aggregate import Totals
from quotameter.redis_keys import USAGE_FIELDS, RedisKeys
from quotameter.redis_pool import is_cluster

log = logging.getLogger(__name__)

PeriodKey = tuple[str, str]  # (customer, billing period YYYY-MM)
SCRIPT = (Path(__file__).parent / "usage_state.lua").read_text()


def usage_hash(totals: Totals, updated_ms: int) -> dict[str, str]:
    """The fields of ``{p}:usage:{customer}:{period}``: USAGE_FIELDS, refused,
    version (= events), updated_ms."""
    record = totals.to_record()
    record["cost_micro_usd"] = totals.cost_micro_usd
    fields = {name: str(record[name]) for name in USAGE_FIELDS}
    fields["refused"] = str(totals.refused)
    fields["version"] = str(totals.events)
    fields["updated_ms"] = str(updated_ms)
    return fields


@dataclass
class _Pending:
    totals: Totals
    ids: set[str] = field(default_factory=set)
    force: bool = False


class UsageWriter:
    """Writes period totals in one pipelined round trip per batch.

    A failed write is kept and retried with the next batch (newer totals of
    the same key replace it; the ids to release accumulate), so a Redis
    outage delays quota state but never stops the pipeline: the ledger, not
    Redis, is the record.
    """

    def __init__(self, client: Redis, keys: RedisKeys, clock_ms: Callable[[], int]) -> None:
        self.client = client
        self.keys = keys
        self.clock_ms = clock_ms
        self._script = client.register_script(SCRIPT)
        self._pending: dict[PeriodKey, _Pending] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def write(
        self, totals: Mapping[PeriodKey, Totals], ids: Mapping[PeriodKey, Iterable[str]] | None = None, *, force: bool = False
    ) -> bool:
        for key, value in totals.items():
            held = self._pending.get(key)
            if held is None or force or value.events >= held.totals.events:
                entry = _Pending(value, held.ids if held else set(), force)
                self._pending[key] = entry
            (held or self._pending[key]).ids.update((ids or {}).get(key, ()))
        return await self.flush()

    async def flush(self) -> bool:
        if not self._pending:
            return True
        batch, self._pending = self._pending, {}
        try:
            await self._send(batch)
        except NoScriptError as exc:
            if not is_cluster(self.client):
                return self._keep(batch, exc)
            try:
                await self.client.script_load(SCRIPT)  # on every primary
                await self._send(batch)
            except (RedisError, OSError) as exc:
                return self._keep(batch, exc)
        except (RedisError, OSError) as exc:
            return self._keep(batch, exc)
        return True

    async def _send(self, batch: dict[PeriodKey, _Pending]) -> None:
        now_ms = self.clock_ms()
        cluster = is_cluster(self.client)
        pipe = self.client.pipeline(transaction=False)
        for (customer, period), entry in batch.items():
            keys = self.keys
            fields = [part for pair in usage_hash(entry.totals, now_ms).items() for part in pair]
            names = [
                keys.usage(customer, period),
                keys.pending(customer, period),
                keys.pending_expiry(customer, period),
                keys.reserved(customer, period),
            ]
            args = [entry.totals.events, int(entry.force), len(fields), *fields, *sorted(entry.ids)]
            if cluster:  # its pipeline refuses evalsha(): the raw command routes by the keys
                pipe.execute_command("EVALSHA", self._script.sha, len(names), *names, *args)
            else:
                await self._script(keys=names, args=args, client=pipe)
        await pipe.execute()

    def _keep(self, batch: dict[PeriodKey, _Pending], exc: Exception) -> bool:
        log.warning("quota state not written to Redis (%d keys kept for the next batch): %s", len(batch), exc)
        for key, entry in batch.items():
            newer = self._pending.get(key)
            if newer is None:
                self._pending[key] = entry
            else:
                newer.ids |= entry.ids
        return False

    async def close(self) -> None:
        await self.flush()
        await self.client.aclose()
