"""Admissions of the check endpoint, kept in Redis until a usage report settles them.

The check endpoint admits a request that another proxy forwards; its usage
comes back later through ``POST /v1/events``, carrying the check's event id,
and maybe to another shim process. So what the proxy's settle takes from its
in-memory ticket (the settle script's keys, the token rules, the tokens
reserved, the model for pricing) is stored beside the ``pending`` entry under
``{p}:check:{customer}:{event id}``, expiring with the reservation.

A report takes its ticket with GET and DEL in one transaction, so of two
reports of one id (a reporter's retry) only one settles. A crash between
taking it and the settle leaves the reservation to expire after its TTL.
The ticket also holds the prompt the check counted, which a report that
carries no usage is counted from (gateway_shim/counted_reports.py): so an
admission that holds nothing to settle keeps a ticket too, with that alone.
(On Redis Cluster a batch's transaction spans the customers' slots: it
would have to be split per customer, as the admission's note on clusters says.)
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from datetime import UTC, datetime

import redis.asyncio as aioredis
import redis.exceptions

from gateway_shim.admission import Admitter, SettleContext
from gateway_shim.counted_reports import Delivered, counted_report
from gateway_shim.enforcement import Ticket
from quotameter.config import Config
from quotameter.events import EncodedEvent
from quotameter.policy import micro_usd
from quotameter.pricing import PriceTable
from quotameter.redis_keys import RedisKeys

log = logging.getLogger("gateway_shim.check_tickets")


class CheckTickets:
    def __init__(self, config: Config, client: aioredis.Redis, names: RedisKeys, admitter: Admitter) -> None:
        self._client = client
        self._names = names
        self._admitter = admitter
        self._prices = PriceTable(config.prices, config.default_price)

    async def keep(self, ticket: Ticket, prompt_tokens: int) -> None:
        """Store what settling ``ticket`` takes, and the prompt a report without usage is
        counted from, for as long as its reservation lasts. An admission that holds
        nothing to settle keeps the prompt alone (its report is counted, settles nothing)."""
        stored: dict[str, object] = {"model": ticket.model, "prompt_tokens": prompt_tokens}
        context = self._admitter.settle_context(ticket.key, ticket.policy, ticket.period, ticket.reserved,
                                                ticket.user, ticket.day)
        if context is not None:
            stored.update({
                "keys": context.keys,
                "reserving": context.reserving,
                "concurrency": context.concurrency,
                "rules": context.rules,
                "reserved": context.reserved,
                "settled_ttl_ms": int(ticket.policy.tier.settled_ttl_s * 1000),
            })
        value = json.dumps(stored, separators=(",", ":"))
        ttl_ms = int(ticket.policy.tier.reservation_ttl_s * 1000)
        await self._client.set(self._names.check_ticket(ticket.key.customer, ticket.event_id), value, px=ttl_ms)

    async def settle_reported(
        self, events: list[EncodedEvent], delivered: list[Delivered | None] | None = None
    ) -> list[EncodedEvent]:
        """Settle the reservations of reported events whose ids are checked admissions;
        the rest (unknown, already settled or expired ids) are only ingested. Returns
        the events to spool: as reported, except a checked admission's report without
        usage, counted from its ticket's prompt and ``delivered``, the text its gateway
        passed to the client (gateway_shim/counted_reports.py), and settled with that.
        Runs before the events are spooled: settled first, as the proxy does, though
        the script also copes with the pipeline having them."""
        if not events:
            return events
        try:
            # GETDEL: a ticket is taken once, even by two reports racing; a cluster
            # pipeline sends each to its customer's primary.
            async with self._client.pipeline(transaction=False) as pipe:
                for event in events:
                    pipe.getdel(self._names.check_ticket(event.customer_id, event.id))
                replies = await pipe.execute()
        except (redis.exceptions.RedisError, OSError) as exc:
            # The reports are still ingested; the reservations expire after their TTL.
            log.error("cannot read check tickets (%s): %d reported events settle nothing", exc, len(events))
            return events
        spooled = list(events)
        for n, raw in enumerate(replies):
            if raw is None:
                continue
            stored = json.loads(raw)
            text = delivered[n] if delivered else None
            prompt_tokens = stored.get("prompt_tokens", stored.get("reserved", [0])[0])  # a ticket kept before it
            count = functools.partial(counted_report, events[n], prompt_tokens, stored["model"], text)
            # A long text takes milliseconds to count (tens for 256 KiB): off the event loop.
            event = spooled[n] = await asyncio.to_thread(count) if text else count()
            if "keys" not in stored:
                continue  # nothing was reserved
            try:
                await self._settle(event, stored)
            except (redis.exceptions.RedisError, OSError) as exc:
                log.error("cannot settle %s from its report (%s): its reservation expires after its TTL", event.id, exc)
        return spooled

    async def _settle(self, event: EncodedEvent, stored: dict) -> None:
        data = json.loads(event.value)["data"]
        used = (data.get("input_tokens") or 0, data.get("output_tokens") or 0)
        model = data.get("model_served") or data.get("model_requested") or stored["model"]
        cost = self._prices.cost(
            model, datetime.fromtimestamp(event.time_ms / 1000, UTC).date(),
            input_tokens=used[0], output_tokens=used[1],
            cached_tokens=data.get("cached_tokens") or 0, reasoning_tokens=data.get("reasoning_tokens") or 0,
        )
        context = SettleContext(
            keys=stored["keys"],
            reserving=stored["reserving"],
            concurrency=stored["concurrency"],
            rules=[tuple(rule) for rule in stored["rules"]],
            reserved=tuple(stored["reserved"]),
        )
        await self._admitter.settle_reported(
            context, event.id, int(time.time() * 1000), used=used, used_micro_usd=micro_usd(cost.usd),
            settled_ttl_ms=stored["settled_ttl_ms"],
        )
