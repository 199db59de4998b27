"""The configuration: one YAML file, validated, with environment overrides.

Every key is checked (unknown keys are errors) and an error names the path
of the offending value, e.g. ``tiers.free.requests_per_minute``. Any value can
be overridden from the environment with the ``QUOTAMETER_`` prefix and ``__``
between levels: ``QUOTAMETER_SERVICES__REDIS_URL=redis://…``.
"""

from __future__ import annotations

import os
from datetime import date
from functools import cached_property
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from ipaddress import ip_network
from typing import Annotated, Any, ClassVar, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from quotameter.delivery import AckMode
from quotameter.errors import ConfigError
from quotameter.labels import MAX_TAGS
from quotameter.periods import BillingCalendar
from quotameter.redis_url import topology

ENV_PREFIX = "QUOTAMETER_"
DEFAULT_CONFIG = Path(__file__).parent / "example.yaml"

Money = Annotated[Decimal, Field(ge=0, max_digits=24, decimal_places=12)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _SecretFiles(_Strict):
    """Secrets that may also come from a file: ``NAME_file`` (a path, e.g. a
    mounted Kubernetes or Docker secret) is read into ``NAME`` at load time,
    stripped of surrounding whitespace. Setting both is an error."""

    _secret_files: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name in cls._secret_files:
            path = data.get(f"{name}_file")
            if path in (None, ""):
                continue
            if data.get(name):
                raise ValueError(f"set {name} or {name}_file, not both")
            try:
                text = Path(path).read_text().strip()
            except OSError as exc:
                raise ValueError(f"{name}_file: cannot read {path}: {exc.strerror}") from None
            if not text:
                raise ValueError(f"{name}_file: {path} is empty")
            data = {**data, name: text}
        return data


class TokenCount(StrEnum):
    """Which tokens a tokens/min limit counts."""

    INPUT = "input"
    OUTPUT = "output"
    TOTAL = "total"


class RateAlgorithm(StrEnum):
    """How a per-minute window is enforced. Neither admits 2x at a boundary."""

    GCRA = "gcra"  # smooth: one slot every window/limit, burst up to the limit
    SLIDING_WINDOW = "sliding_window"  # the previous minute weighted by its overlap


class FailMode(StrEnum):
    OPEN = "open"  # keep serving; an in-process limiter stands in for Redis
    CLOSED = "closed"  # answer 503 until Redis is back


class LimitOverrides(_Strict):
    """Limits that replace the tier's for one customer (``customers:``) or one
    key (stored on the key record by ``quotameter keys create``). Unset = inherit."""

    requests_per_minute: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    concurrent_requests: PositiveInt | None = None
    monthly_tokens: PositiveInt | None = None
    monthly_budget_usd: Money | None = None
    allowed_models: list[str] | None = None


class Customer(LimitOverrides):
    """One customer's overrides, replacing the tier's values for them."""


class KeyOverrides(_Strict):
    """Limits of one key, checked on top of its customer's (a key can be held
    tighter, never looser). Period quotas are per customer, so none here."""

    requests_per_minute: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    concurrent_requests: PositiveInt | None = None
    allowed_models: list[str] | None = None


class ModelLimits(_Strict):
    """Limits for one model within a tier, on top of the tier-wide ones."""

    requests_per_minute: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    # The worst-case completion reserved when a request names no max_tokens.
    default_max_tokens: PositiveInt | None = None


class FailModes(_Strict):
    """What each limit kind does while Redis is unreachable."""

    requests_per_minute: FailMode = FailMode.OPEN
    tokens_per_minute: FailMode = FailMode.OPEN
    concurrent_requests: FailMode = FailMode.OPEN
    monthly_tokens: FailMode = FailMode.OPEN
    monthly_budget_usd: FailMode = FailMode.OPEN


class Fallback(_Strict):
    """Serve a cheaper model instead of refusing once the budget is spent."""

    model: str = Field(min_length=1)
    # Fallback traffic may spend this much past the budget (0: only what is left).
    extra_budget_usd: Money = Decimal(0)


class BatchQueue(_Strict):
    """Batch-priority keys wait here (per shim process) instead of getting 429."""

    max_wait_s: float = Field(default=30.0, gt=0)
    max_depth: PositiveInt = 100
    # Concurrency slots batch traffic may never take, so interactive requests
    # find one free instead of waiting behind batch work.
    interactive_reserved_concurrency: NonNegativeInt = 0


class PerUserLimits(_Strict):
    """Limits on each end user of a customer (the request's ``user`` /
    ``safety_identifier`` or ``x-quotameter-user``), checked in the same
    admission as the customer's: an end user can be held tighter than the
    customer, never looser. State is per (customer, end user)."""

    requests_per_minute: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    # Tokens (input + output) per calendar day in billing.timezone, counted by
    # the shim itself: reserved at admission, corrected to the true usage by
    # the settle (the pipeline keeps no per-user totals in Redis).
    tokens_per_day: PositiveInt | None = None
    # A request naming no end user is refused 400; otherwise it is held to the
    # customer's limits only.
    require_user: bool = False


class Tier(_Strict):
    """One customer tier. ``None`` on a limit means unlimited."""

    requests_per_minute: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    tokens_per_minute_counts: TokenCount = TokenCount.TOTAL
    rate_algorithm: RateAlgorithm = RateAlgorithm.GCRA
    concurrent_requests: PositiveInt | None = None
    monthly_tokens: PositiveInt | None = None
    monthly_budget_usd: Money | None = None
    upgrade_hint: str = ""
    allowed_models: list[str] | None = None
    models: dict[str, ModelLimits] = {}
    default_max_tokens: PositiveInt = 4096
    quota_status: Literal[402, 429] = 429
    # End a stream cleanly when it would carry the customer past the budget
    # or token quota (a request without max_tokens is then admitted with what
    # is left, and cut there).
    cut_streams: bool = False
    fallback: Fallback | None = None
    queue: BatchQueue | None = None
    fail_modes: FailModes = FailModes()
    # A reservation of a request that never finishes stops counting after this;
    # a settled one (true usage awaiting the pipeline) after settled_ttl_s.
    reservation_ttl_s: float = Field(default=900.0, gt=0)
    settled_ttl_s: float = Field(default=3600.0, gt=0)
    # Limits on each end user of the customer (see PerUserLimits); None: none.
    per_user: PerUserLimits | None = None
    # Usage alerts at these percentages of monthly_tokens and of
    # monthly_budget_usd; unset = ``alerts.thresholds_pct``, [] = none.
    alert_thresholds_pct: list[Annotated[int, Field(ge=1, le=1000)]] | None = None


class Rates(_Strict):
    """USD per one million tokens of each kind.

    Cached and cache-write tokens are part of the input tokens, reasoning tokens
    part of the output tokens (as OpenAI reports them); each kind without a
    rate of its own is priced at its parent's rate.
    """

    input_per_million_usd: Money
    output_per_million_usd: Money
    cached_input_per_million_usd: Money | None = None
    cache_write_per_million_usd: Money | None = None
    reasoning_per_million_usd: Money | None = None


class ModelPrice(Rates):
    """A model's rates, in force from ``effective_from`` (UTC date) on."""

    model: str = Field(min_length=1)
    aliases: list[str] = []
    effective_from: date = date(1970, 1, 1)

    @property
    def version(self) -> str:
        return f"{self.model}@{self.effective_from.isoformat()}"


class StripeExport(_Strict):
    """``quotameter export --format stripe``: meter events for Stripe Billing."""

    # quotameter customer id -> Stripe customer id (cus_…); an export fails
    # naming every customer with usage and no entry here.
    customers: dict[str, Annotated[str, Field(min_length=1)]] = {}
    # What to meter -> the Stripe meter's event_name ("{model}" in it is
    # replaced by the model: one meter per model). Quantities: requests, and
    # the billed token components input, cached_input, cache_write, output,
    # reasoning (input excludes cached / cache-write, output excludes reasoning).
    meters: dict[
        Literal["requests", "input", "cached_input", "cache_write", "output", "reasoning"],
        Annotated[str, Field(min_length=1, max_length=100)],
    ] = {
        "input": "quotameter_input_tokens",
        "cached_input": "quotameter_cached_input_tokens",
        "cache_write": "quotameter_cache_write_tokens",
        "output": "quotameter_output_tokens",
        "reasoning": "quotameter_reasoning_tokens",
    }
    window: Literal["hour", "day"] = "day"


class Billing(_Strict):
    currency: str = "USD"
    timezone: str = "UTC"
    # A period starts on this day of the month at midnight in ``timezone`` (a
    # day past a short month's end means its last day) and is named for the
    # month it starts in: with 15, "2026-11" is Nov 15 - Dec 15.
    anchor_day: int = Field(default=1, ge=1, le=31)
    # A period is final (exported without --draft) this long after it ends,
    # or after pipeline.late_grace_s if that is longer: late events may land
    # in it until then.
    finalize_after_hours: float = Field(default=48.0, ge=0)
    stripe: StripeExport = StripeExport()

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @cached_property
    def calendar(self) -> BillingCalendar:
        """The one billing calendar every reader and writer of periods uses."""
        return BillingCalendar.from_config(self)


class Upstream(_Strict):
    url: str = "http://127.0.0.1:8081/v1"
    api_key: SecretStr | None = None
    # Who serves the models, as OpenTelemetry's GenAI conventions name it
    # (gen_ai.provider.name on the shim's spans and metrics): openai,
    # anthropic, azure.ai.openai, aws.bedrock, … (vLLM speaks openai's API).
    provider: str = Field(default="openai", min_length=1, max_length=64)
    # Silence: how long the upstream may send no bytes, or only keep-alive
    # comments in a stream, before the shim gives up on it.
    timeout_s: float = Field(default=600.0, gt=0)
    # The longest a stream may run, whatever it carries: it is then ended
    # after its last whole event (event reason "stream_too_long").
    max_stream_s: float = Field(default=3600.0, gt=0)
    # The largest JSON answer, or single SSE event, taken from the upstream:
    # past it, a 502 (a stream is ended after its last whole event).
    max_response_bytes: PositiveInt = 64 * 1024 * 1024
    # Connections the shim keeps open to the upstream at once; requests past
    # it wait for a free one (never refused).
    max_connections: PositiveInt = 1000


class Shim(_SecretFiles):
    _secret_files: ClassVar[tuple[str, ...]] = ("admin_token", "ingest_token")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # Connections the kernel queues before the shim accepts them (capped by
    # net.core.somaxconn); a burst past it sees connects retried, seconds late.
    listen_backlog: PositiveInt = 1024
    instance: str = "shim-1"
    # Usage events are written ahead to this spool and kept until Kafka has
    # them (gateway_shim/spool.py). One directory per shim instance.
    spool_dir: Path = Path("var/spool")
    spool_max_bytes: PositiveInt = 1024 * 1024 * 1024
    # Group commit: fdatasync the spool this often (power-loss window); 0 = leave it to the kernel.
    spool_fsync_interval_ms: int = Field(default=10, ge=0, le=10_000)
    # Spool full: "refuse" new requests with 503 (nothing served unbilled) or "drop" their events.
    spool_full: Literal["refuse", "drop"] = "refuse"
    # The sender gathers events this long between turns, so each turn sends one
    # Kafka record per partition carrying many events. Shorter: each request
    # sooner in the ledger, but a produce request per few events, each paid by
    # the shim, the broker and the worker (bench/shim_cost.py: at 200 requests/s
    # 5 ms cost the product 1.7 ms more CPU per request than 50 ms).
    event_linger_ms: int = Field(default=50, ge=0, le=1000)
    # When a spooled event may be forgotten: "ledger" once the ledger holds it
    # (a worker confirms through Redis; needed when the broker keeps nothing,
    # as the embedded one), "broker" once Kafka acknowledged it (acks=all; only
    # for a broker that persists and replicates). See quotameter/delivery.py.
    delivery: AckMode = AckMode.LEDGER
    # "ledger" delivery: events Kafka took that the ledger still lacks after
    # this long are sent again (a broker that lost them, a skipped offset);
    # the wait doubles, up to 8x, while nothing reaches the ledger.
    redeliver_after_ms: int = Field(default=15_000, ge=1_000)
    # On SIGTERM: how long the shim waits for in-flight requests, then for its
    # spooled events to be delivered, before it exits (the rest stay spooled).
    drain_timeout_s: float = Field(default=10.0, ge=0)
    # Bearer token that may read any customer's GET /v1/usage?customer=ID
    # (unset: no admin reads). It travels on the public port: a token of its
    # own, apart from services.admin_token. Prefer QUOTAMETER_SHIM__ADMIN_TOKEN
    # or admin_token_file (a path read at start).
    admin_token: SecretStr | None = None
    admin_token_file: Path | None = None
    # Bearer token of POST /v1/events, where other gateways report usage
    # (unset: the endpoint answers 404). Prefer QUOTAMETER_SHIM__INGEST_TOKEN
    # or ingest_token_file.
    ingest_token: SecretStr | None = None
    ingest_token_file: Path | None = None
    # Key guessing: a client address that presents this many wrong API keys,
    # ingest or admin tokens within a minute gets 429 for every request until
    # its failures age out (the proxy, /v1/check, /v1/events, /v1/usage
    # together). Counted in each shim process, not across shims. 0: no limit.
    auth_failures_per_minute: NonNegativeInt = 20
    # Client addresses tracked at once (the least recent is forgotten first):
    # the limiter's memory stays bounded whatever the traffic.
    auth_failures_max_clients: PositiveInt = 100_000
    # Peers (addresses or CIDRs) trusted to name the client in X-Forwarded-For:
    # the proxy in front of /v1/check (nginx auth_request, Traefik forwardAuth…)
    # or a TLS terminator. From them, the last X-Forwarded-For address is the
    # client; from anyone else, the connection's own address. Empty: never.
    trusted_proxies: list[str] = []
    # Largest POST /v1/events body (413 past it), and most events in one batch.
    ingest_max_bytes: PositiveInt = 1024 * 1024
    ingest_max_events: PositiveInt = 1000
    # Envoy's ext_proc gRPC service (gateway_shim/ext_proc.py) on host:this port,
    # served by the shim's own process and event loop. None: not served.
    ext_proc_port: int | None = Field(default=None, ge=0, le=65535)
    # POST /v1/events/kong (Kong's http-log entries, same token and limits): who the
    # customer is. consumer_username / consumer_custom_id: the consumer Kong
    # authenticated (ids derive from Kong's request id; x-quotameter-* headers are
    # ignored, as a client could send them). header: x-quotameter-customer and
    # x-quotameter-event-id, which Kong sets from a /v1/check admission, so the
    # report settles it (gateway_shim/kong_log.py).
    kong_customer_from: Literal["consumer_username", "consumer_custom_id", "header"] = "consumer_username"
    # Tier recorded on Kong's events when no check admission named one (alerts
    # read the tier's thresholds); empty: none, the customer's overrides only.
    kong_tier: str = ""
    # Hostile or malformed requests on the proxied routes (gateway_shim/request_checks.py,
    # request_body.py). A body larger than max_body_bytes is refused 413 (its
    # Content-Length up front, else while it streams in); per-route overrides,
    # e.g. {"/v1/embeddings": 33554432}.
    max_body_bytes: PositiveInt = 16 * 1024 * 1024
    max_body_bytes_by_route: dict[str, PositiveInt] = {}
    # A client that has not sent its whole body after this long is cut with 408 (slowloris).
    client_body_timeout_s: float = Field(default=60.0, gt=0)
    # JSON nested deeper than this is refused 400 (Python's parser recurses: ~1000 would crash it).
    max_json_depth: int = Field(default=64, ge=2, le=500)
    # Chat messages per request, and content parts per message, past which a request is refused 400.
    max_messages: PositiveInt = 10_000
    max_content_parts: PositiveInt = 1_000
    # Bodies larger than this are parsed and counted off the event loop (in a thread),
    # so one large prompt does not stall every other request.
    parse_in_thread_bytes: PositiveInt = 1024 * 1024
    # Header limits (aiohttp's): a request line or header longer than
    # max_header_bytes, or more than max_headers headers, is answered 400.
    max_header_bytes: PositiveInt = 8190
    max_headers: PositiveInt = 128
    # Other /v1/ paths the shim proxies as they are, unmetered (a valid key still
    # needed), e.g. ["/v1/files", "/v1/files/*"]; "*" matches any characters.
    # Any other unknown path is refused 404.
    passthrough_routes: list[str] = []
    # Attribution (gateway_shim/attribution.py): the headers naming who a request's
    # spend is for. The end-user header wins over the body's user fields; a key
    # created with --project wins over the project header. A tags header reads
    # "team=search,feature=autocomplete", at most max_tags of them; a bad one is a 400.
    end_user_header: str = Field(default="x-quotameter-user", pattern=r"^[A-Za-z0-9-]{1,64}$")
    project_header: str = Field(default="x-quotameter-project", pattern=r"^[A-Za-z0-9-]{1,64}$")
    tags_header: str = Field(default="x-quotameter-tags", pattern=r"^[A-Za-z0-9-]{1,64}$")
    max_tags: int = Field(default=MAX_TAGS, ge=0, le=MAX_TAGS)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or CIDR") from None
        return value


class KafkaSecurityProtocol(StrEnum):
    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"


class KafkaSaslMechanism(StrEnum):
    PLAIN = "PLAIN"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    SCRAM_SHA_512 = "SCRAM-SHA-512"


class Services(_SecretFiles):
    _secret_files: ClassVar[tuple[str, ...]] = ("admin_token", "kafka_sasl_password")

    redis_url: str = "redis://127.0.0.1:6390/0"
    redis_prefix: str = "qm"
    # Each process's Redis connection pool: a call finding every connection
    # busy waits up to redis_pool_timeout_ms for one (a burst is not an outage).
    redis_max_connections: PositiveInt = 100
    redis_pool_timeout_ms: PositiveInt = 2000

    @field_validator("redis_url")
    @classmethod
    def _redis_topology(cls, value: str) -> str:
        topology(value)  # one server, a cluster or Sentinel (README: Redis); raises what is wrong
        return value

    kafka_bootstrap: str = "127.0.0.1:9092"
    events_topic: str = "quotameter.events"
    # How every Kafka client of the product (the shim's producer, the worker's
    # consumers, producers and admin client) reaches the brokers
    # (quotameter/kafka_client.py). SASL_* needs kafka_sasl_username and a
    # password; SSL / SASL_SSL verify the brokers against kafka_ssl_cafile
    # (empty: the system's CAs), and present kafka_ssl_certfile + keyfile
    # when the brokers ask for a client certificate (mTLS).
    kafka_security_protocol: KafkaSecurityProtocol = KafkaSecurityProtocol.PLAINTEXT
    kafka_sasl_mechanism: KafkaSaslMechanism = KafkaSaslMechanism.PLAIN
    kafka_sasl_username: str = ""
    # Prefer QUOTAMETER_SERVICES__KAFKA_SASL_PASSWORD or kafka_sasl_password_file.
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_password_file: Path | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    # Topics the product creates when missing (the events, dead-letter and
    # alerts topics, the worker's table changelogs). The tables are
    # partitioned like the events topic, so an events topic with another
    # partition count stops the worker. false: topics are managed outside
    # (e.g. Strimzi KafkaTopic); a missing one is then an error naming it.
    kafka_topic_partitions: PositiveInt = 4
    kafka_replication_factor: PositiveInt = 1
    kafka_create_topics: bool = True
    # Idempotent producers (no duplicates from the producer's own retries).
    # Off by default: the embedded broker (Tansu 0.6) refuses InitProducerId.
    # Turn it on for Apache Kafka, MSK, Confluent, Redpanda.
    kafka_idempotence: bool = False
    # The worker owns the history store; the CLI reads through it here.
    history_dir: Path = Path("var/history")
    worker_url: str = "http://127.0.0.1:6066"
    # The built-in dashboard (`quotameter dashboard`, started by `quotameter up`).
    dashboard_url: str = "http://127.0.0.1:8090"
    worker_app_id: str = "quotameter"
    # The ledger: empty = embedded chDB in history_dir; else a ClickHouse
    # server, clickhouse://user:password@host:8123/quotameter (clickhouses:// = TLS).
    history_url: SecretStr = SecretStr("")
    # A ClickHouse cluster name (remote_servers): `quotameter migrate` then
    # creates Replicated tables ON CLUSTER it. Empty: one server.
    history_cluster: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]{0,128}$")
    # Bearer token of the internal endpoints that read or change data: the
    # worker's (all but /healthz), the built-in dashboard's (all but /healthz;
    # a browser sends it as the password of HTTP Basic auth) and
    # `quotameter ledger-server`'s (the password of services.history_url).
    # One token for all three: the same operator runs them, and the CLI and
    # the dashboard, which call them, read it from here. Unset: they answer
    # anyone, so each refuses to start on an address other than loopback.
    # Prefer QUOTAMETER_SERVICES__ADMIN_TOKEN or admin_token_file.
    admin_token: SecretStr | None = None
    admin_token_file: Path | None = None

    @field_validator("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a file")
        return value

    @model_validator(mode="after")
    def _kafka_security(self) -> Services:
        protocol = self.kafka_security_protocol
        sasl = protocol in (KafkaSecurityProtocol.SASL_PLAINTEXT, KafkaSecurityProtocol.SASL_SSL)
        tls = protocol in (KafkaSecurityProtocol.SSL, KafkaSecurityProtocol.SASL_SSL)
        password = self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else ""
        if sasl and not (self.kafka_sasl_username and password):
            raise ValueError(
                f"services.kafka_security_protocol {protocol} needs services.kafka_sasl_username "
                "and services.kafka_sasl_password (or kafka_sasl_password_file)"
            )
        if not sasl and (self.kafka_sasl_username or password):
            raise ValueError(
                "services.kafka_sasl_username / kafka_sasl_password are set but "
                f"services.kafka_security_protocol is {protocol}: use SASL_SSL or SASL_PLAINTEXT"
            )
        tls_files = [name for name in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile") if getattr(self, name)]
        if tls_files and not tls:
            raise ValueError(
                f"services.{tls_files[0]} is set but services.kafka_security_protocol is {protocol}: use SSL or SASL_SSL"
            )
        if bool(self.kafka_ssl_certfile) != bool(self.kafka_ssl_keyfile):
            raise ValueError("services.kafka_ssl_certfile and services.kafka_ssl_keyfile go together (a client certificate and its key)")
        return self


class Alerts(_Strict):
    """Usage alerts: each threshold fires once per customer, billing period and
    kind (tokens, budget) as an event on ``topic`` and a signed webhook."""

    enabled: bool = True
    thresholds_pct: list[Annotated[int, Field(ge=1, le=1000)]] = [50, 80, 90, 100]
    topic: str = ""  # empty: "<services.events_topic>.alerts"
    webhook_url: str = ""  # empty: no webhook, the topic only
    webhook_secret: SecretStr | None = None  # HMAC-SHA256 key of the signature header
    webhook_timeout_s: float = Field(default=5.0, gt=0)
    webhook_max_attempts: PositiveInt = 6
    webhook_backoff_initial_s: float = Field(default=0.5, gt=0)
    webhook_backoff_max_s: float = Field(default=30.0, gt=0)
    # Fired alerts are listed (``quotameter alerts``) from Redis for this long.
    retention_days: PositiveInt = 400

    @model_validator(mode="after")
    def _signed(self) -> Alerts:
        if self.webhook_url and (self.webhook_secret is None or not self.webhook_secret.get_secret_value()):
            raise ValueError("alerts.webhook_url needs alerts.webhook_secret (webhooks are always signed)")
        if self.webhook_url and not self.webhook_url.startswith(("http://", "https://")):
            raise ValueError(f"alerts.webhook_url must be an http(s) URL, not {self.webhook_url!r}")
        return self


class Pipeline(_Strict):
    """How a pipeline worker batches, deduplicates and treats late events."""

    # A batch closes at this many events or after this long: Redis is written
    # once per batch, so batch_max_wait_ms bounds its staleness.
    batch_max_events: PositiveInt = 5000
    batch_max_wait_ms: int = Field(default=250, ge=10, le=250)
    # The ledger (ClickHouse) is written at this many rows or this age,
    # always before the events' offsets are committed.
    ledger_batch_rows: PositiveInt = 5000
    ledger_flush_ms: int = Field(default=1000, ge=10, le=60_000)
    # Event ids answered from memory after they reached the ledger; older
    # duplicates are found in the ledger itself (dedupe is exact either way).
    dedupe_window_s: float = Field(default=600.0, ge=0)
    dedupe_window_max_ids: PositiveInt = 500_000
    # An event this much older than its customer's newest event is late: it is
    # still counted and kept in the ledger, and flagged (ledger column late).
    late_grace_s: float = Field(default=3600.0, ge=0)
    # Malformed events go here with the reason; empty: "<events_topic>.dlq".
    dlq_topic: str = ""
    # A killed worker's partitions move to the others after this long.
    session_timeout_s: float = Field(default=10.0, ge=3, le=300)


class Supervisor(_Strict):
    """How ``quotameter up`` restarts a crashed part of the embedded stack and
    how long its shutdown may take (quotameter/embedded/supervisor.py)."""

    # Wait before a restart: doubles per crash up to the cap, and starts over
    # once the part has run this long after its readiness check passed.
    restart_backoff_initial_s: float = Field(default=0.5, gt=0)
    restart_backoff_max_s: float = Field(default=15.0, gt=0)
    healthy_after_s: float = Field(default=60.0, gt=0)
    # This many crashes within the window: the part is not restarted again.
    max_crashes: PositiveInt = 5
    crash_window_s: float = Field(default=120.0, gt=0)
    # Ctrl-C: past this, whatever has not stopped is killed.
    shutdown_timeout_s: float = Field(default=90.0, gt=0)


class Telemetry(_Strict):
    """What the shim and the worker tell an operator (telemetry/). Exporters,
    sampling and the service's name are set the OpenTelemetry way, by the
    ``OTEL_*`` environment variables (README, "Telemetry")."""

    # json: one object per line, for a log shipper; console: for a person.
    log_format: Literal["console", "json"] = "console"
    access_log: bool = True  # one line per request (logger quotameter.access)
    metrics: bool = True  # GET /metrics on the shim and the worker, Prometheus text
    # Metrics never carry a customer id unless this is set: a label per
    # customer multiplies every series by the number of customers.
    customer_labels: bool = False


class Config(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    billing: Billing = Billing()
    tiers: dict[str, Tier]
    customers: dict[str, Customer] = {}
    prices: list[ModelPrice] = []
    # Rates for a model missing from ``prices``; its events are flagged, never
    # dropped. Without it such events cost 0 and are flagged "unpriced".
    default_price: Rates | None = None
    upstream: Upstream = Upstream()
    shim: Shim = Shim()
    services: Services = Services()
    pipeline: Pipeline = Pipeline()
    alerts: Alerts = Alerts()
    supervisor: Supervisor = Supervisor()
    telemetry: Telemetry = Telemetry()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file (the file arrives as init kwargs).
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if not self.tiers:
            raise ValueError("at least one tier is required")
        seen: set[tuple[str, date]] = set()
        for price in self.prices:
            for name in (price.model, *price.aliases):
                if (name, price.effective_from) in seen:
                    raise ValueError(f"model {name!r} is priced twice from {price.effective_from}")
                seen.add((name, price.effective_from))
        for name, tier in self.tiers.items():
            if tier.fallback and tier.allowed_models is not None and tier.fallback.model not in tier.allowed_models:
                raise ValueError(f"tiers.{name}.fallback.model {tier.fallback.model!r} is not in its allowed_models")
        return self

    def tier(self, name: str) -> Tier:
        try:
            return self.tiers[name]
        except KeyError:
            raise ConfigError(f"unknown tier {name!r}; configured tiers: {', '.join(self.tiers)}") from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(part) for part in err["loc"]) or "<root>"
        lines.append(f"  {path}: {err['msg']}")
    return "\n".join(lines)


def parse_config(document: dict[str, Any], origin: str = "<config>") -> Config:
    try:
        return Config(**document)
    except ValidationError as exc:
        raise ConfigError(f"{origin} is invalid:\n{_describe(exc)}") from None
    except TypeError as exc:  # e.g. a top-level key that is not a string
        raise ConfigError(f"{origin} is invalid: {exc}") from None


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the YAML file at ``path`` (default: ``$QUOTAMETER_CONFIG``, else the example)."""
    path = Path(path or os.environ.get(f"{ENV_PREFIX}CONFIG") or DEFAULT_CONFIG)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        document = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return parse_config(document, origin=str(path))
