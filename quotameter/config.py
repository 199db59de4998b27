"""The configuration: one YAML file, validated, with environment overrides.

Every key is checked (unknown keys are errors) and an error names the path
of the offending value, e.g. ``tiers.free.requests_per_minute``. Any value can
be overridden from the environment with the ``QUOTAMETER_`` prefix and ``__``
between levels: ``QUOTAMETER_SERVICES__REDIS_URL=redis://…``.
"""

from __future__ import annotations

import os
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from quotameter.errors import ConfigError

ENV_PREFIX = "QUOTAMETER_"
DEFAULT_CONFIG = Path(__file__).parent / "example.yaml"

Money = Annotated[Decimal, Field(ge=0, max_digits=24, decimal_places=12)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tier(_Strict):
    """One customer tier. ``None`` on a limit means unlimited."""

    requests_per_minute: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    monthly_tokens: PositiveInt | None = None
    monthly_budget_usd: Money | None = None
    upgrade_hint: str = ""
    allowed_models: list[str] | None = None


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


class Billing(_Strict):
    currency: str = "USD"
    timezone: str = "UTC"


class Upstream(_Strict):
    url: str = "http://127.0.0.1:8081/v1"
    api_key: SecretStr | None = None
    timeout_s: float = Field(default=600.0, gt=0)


class Shim(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    instance: str = "shim-1"


class Services(_Strict):
    redis_url: str = "redis://127.0.0.1:6390/0"
    redis_prefix: str = "qm"
    kafka_bootstrap: str = "127.0.0.1:9092"
    events_topic: str = "quotameter.events"
    # The worker owns the history store; the CLI reads through it here.
    history_dir: Path = Path("var/history")
    worker_url: str = "http://127.0.0.1:6066"
    worker_app_id: str = "quotameter"


class Config(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    billing: Billing = Billing()
    tiers: dict[str, Tier]
    prices: list[ModelPrice] = []
    # Rates for a model missing from ``prices``; its events are flagged, never
    # dropped. Without it such events cost 0 and are flagged "unpriced".
    default_price: Rates | None = None
    upstream: Upstream = Upstream()
    shim: Shim = Shim()
    services: Services = Services()

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
