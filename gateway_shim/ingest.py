"""``POST /v1/events``: usage reported by a gateway quotameter does not proxy.

    POST /v1/events
    Authorization: Bearer <shim.ingest_token>
    Content-Type: application/cloudevents+json          one event
                  application/cloudevents-batch+json    a JSON array of events

The events (quotameter.request.v1, gateway_shim/cloudevents.py) take the path
of the shim's own: written to the spool (``EventEmitter.emit``) and kept there
until the ledger confirms them, so an answer 202 means the usage will be
billed, and billed once per event id: the pipeline drops an id it has seen.
A reporter that got no answer, or a 503, sends the same events again.

Answers, in the order they are checked: 404 with no ingest token configured
(the endpoint does not exist), 429 while the client's address is over
``shim.auth_failures_per_minute`` (gateway_shim/auth_failures.py), 401 for a
missing or wrong token (a wrong one counts there), 503 while the
spool refuses (as the proxy does), 415, 413 (body or batch too large), 400
(naming the field and the event's index), else 202 ``{"accepted": N}``.

``POST /v1/events/kong`` takes Kong's http-log entries (one, or a JSON array)
with the same token, limits and answers; gateway_shim/kong_log.py maps those
with AI usage to the same events, and the answer 202 also counts the entries
``skipped`` (no AI usage: not an LLM call).

An event whose ``id`` is the event id of an admission of ``/v1/check``
settles that reservation with the event's usage before it is spooled
(gateway_shim/check_tickets.py); any other event settles nothing, as nothing
was reserved for it (see README, "Reporting usage from elsewhere"). Such a
report without usage is counted first, from the prompt the check counted and
the text the gateway says it delivered (gateway_shim/counted_reports.py), and
spooled and settled with that count.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable

from aiohttp import web

from gateway_shim.auth import bearer_token
from gateway_shim.auth_failures import AuthFailures, shared
from gateway_shim.check_tickets import CheckTickets
from gateway_shim.cloudevents import parse_reports
from gateway_shim.counted_reports import Delivered
from gateway_shim.emitter import EventEmitter
from gateway_shim.errors import IngestDisabled, InvalidApiKey, MeteringUnavailable, PayloadTooLarge, ShimError, error_response
from gateway_shim.kong_log import CustomerFrom, KongSettings, parse_kong_log
from quotameter.config import Config
from quotameter.events import EncodedEvent

log = logging.getLogger("gateway_shim.ingest")
_READ_CHUNK = 64 * 1024
# A body's events, figures for the answer beyond "accepted", and the text each event
# says was delivered (None: none said).
Parsed = tuple[list[EncodedEvent], dict[str, int], list[Delivered | None]]


class Ingest:
    def __init__(
        self, config: Config, emitter: Callable[[], EventEmitter], tickets: Callable[[], CheckTickets] | None = None,
        failures: AuthFailures | None = None,
    ) -> None:
        shim = config.shim
        self._failures = failures if failures is not None else AuthFailures(0, 1, [])
        token = shim.ingest_token.get_secret_value() if shim.ingest_token is not None else ""
        self._token = token.encode() if token else None
        self.max_bytes = shim.ingest_max_bytes
        self.max_events = shim.ingest_max_events
        self._emitter = emitter
        self._tickets = tickets
        self._kong = KongSettings(CustomerFrom(shim.kong_customer_from), shim.kong_tier)

    async def handle(self, request: web.Request, guard: Callable[[web.Request], web.Response | None]) -> web.Response:
        """``POST /v1/events``: CloudEvents."""
        def parse(content_type: str, raw: bytes) -> Parsed:
            events, delivered = parse_reports(content_type, raw, self.max_events)
            return events, {}, delivered

        return await self._take(request, guard, parse)

    async def handle_kong(self, request: web.Request, guard: Callable[[web.Request], web.Response | None]) -> web.Response:
        """``POST /v1/events/kong``: Kong's http-log entries."""
        def parse(content_type: str, raw: bytes) -> Parsed:
            batch = parse_kong_log(content_type, raw, self.max_events, self._kong)
            return batch.events, {"skipped": batch.skipped}, [None] * len(batch.events)

        return await self._take(request, guard, parse)

    async def _take(
        self, request: web.Request, guard: Callable[[web.Request], web.Response | None],
        parse: Callable[[str, bytes], Parsed],
    ) -> web.Response:
        try:
            self._authenticate(request.headers.get("Authorization"), self._failures.client_of(request))
        except ShimError as exc:
            return error_response(exc)
        refused = guard(request)  # the spool refuses: nothing can be recorded
        if refused is not None:
            return refused
        try:
            raw = await self._read(request)
            content_type = request.content_type if "Content-Type" in request.headers else ""
            events, counts, delivered = parse(content_type, raw)
            if self._tickets is not None:
                # Before spooling, as the proxy settles before it emits; a checked admission's
                # report without usage comes back counted. A resend after a 503 finds the
                # tickets taken: its events are only ingested (uncounted).
                events = await self._tickets().settle_reported(events, delivered)
            self._spool(events)
        except ShimError as exc:
            return error_response(exc)
        return web.json_response({"accepted": len(events), **counts}, status=202)

    def _authenticate(self, authorization: str | None, client: str) -> None:
        if self._token is None:
            raise IngestDisabled("POST /v1/events is not enabled on this gateway (no shim.ingest_token is set).")
        self._failures.check(client)
        token = bearer_token(authorization)
        # Constant time: the token's bytes never leak through the comparison's duration.
        if token is None or not hmac.compare_digest(token.encode("utf-8", "surrogateescape"), self._token):
            if token is not None:
                self._failures.failed(client)
            raise InvalidApiKey("Missing or incorrect ingest token. Send Authorization: Bearer <shim.ingest_token>.")

    async def _read(self, request: web.Request) -> bytes:
        too_large = PayloadTooLarge(
            f"The request body is larger than {self.max_bytes} bytes (shim.ingest_max_bytes). Send smaller batches."
        )
        if request.content_length is not None and request.content_length > self.max_bytes:
            raise too_large
        body = bytearray()
        while chunk := await request.content.read(_READ_CHUNK):  # chunked bodies carry no length
            body += chunk
            if len(body) > self.max_bytes:
                raise too_large
        return bytes(body)

    def _spool(self, events: list[EncodedEvent]) -> None:
        emitter = self._emitter()
        dropped = emitter.dropped
        for event in events:
            emitter.emit(event)
        lost = emitter.dropped - dropped
        if lost:
            # Spool full in "drop" mode, or the disk failed: the events that made it are
            # spooled, and a resend of the whole request is billed once per id.
            log.error("%d of %d reported usage events could not be spooled", lost, len(events))
            error = MeteringUnavailable(
                f"{lost} of {len(events)} events could not be recorded. Send the same events again later."
            )
            error.retry_after_s = 5
            raise error


def register(
    app: web.Application, config: Config, emitter: Callable[[web.Application], EventEmitter],
    guard: Callable[[web.Request], web.Response | None],
    tickets: Callable[[web.Application], CheckTickets] | None = None,
) -> None:
    """Add ``POST /v1/events`` and ``/v1/events/kong`` (before the proxy's catch-all). ``emitter`` finds the
    shim's event emitter once the app runs, ``tickets`` the check endpoint's
    admissions to settle; ``guard`` is the server's spool guard."""
    ingest = Ingest(config, lambda: emitter(app), None if tickets is None else lambda: tickets(app),
                    shared(app, config.shim))

    async def events(request: web.Request) -> web.Response:
        return await ingest.handle(request, guard)

    async def kong_events(request: web.Request) -> web.Response:
        return await ingest.handle_kong(request, guard)

    app.router.add_post("/v1/events", events)
    app.router.add_post("/v1/events/kong", kong_events)
