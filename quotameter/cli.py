"""The ``quotameter`` command: run the parts, manage keys, read usage.

Heavy imports stay inside the commands so ``quotameter --help`` is instant.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from quotameter.config import Config, load_config
from quotameter.errors import QuotameterError
from quotameter.periods import period_of

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Usage metering and quota enforcement for LLM APIs.")
keys_app = typer.Typer(no_args_is_help=True, help="Create, revoke and list API keys.")
app.add_typer(keys_app, name="keys")

err = Console(stderr=True)
ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", envvar="QUOTAMETER_CONFIG", help="YAML config (default: the bundled example)."),
]


def _config(path: Path | None) -> Config:
    try:
        return load_config(path)
    except QuotameterError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


def _redis(config: Config):  # noqa: ANN202 - redis.Redis
    import redis

    return redis.Redis.from_url(config.services.redis_url, socket_connect_timeout=3)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/] {message}")
    return typer.Exit(code)


@app.command("check-config")
def check_config(file: Annotated[Path, typer.Argument(help="The YAML file to check.")]) -> None:
    """Validate a config file; print what it defines, or every error with its path."""
    config = _config(file)
    tiers = ", ".join(config.tiers)
    models = ", ".join(sorted({p.model for p in config.prices})) or "none"
    typer.echo(f"{file}: OK — tiers: {tiers}; priced models: {models}")


@keys_app.command("create")
def keys_create(
    customer: Annotated[str, typer.Option(help="Customer id the key bills to.")],
    tier: Annotated[str, typer.Option(help="Tier from the config.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print key id, customer and tier too.")] = False,
    config_path: ConfigOption = None,
) -> None:
    """Create an API key. The key is shown once, on stdout; only its hash is stored."""
    from gateway_shim.keystore import create_key
    from quotameter.redis_keys import RedisKeys

    config = _config(config_path)
    if tier not in config.tiers:
        raise _fail(f"unknown tier {tier!r}; configured tiers: {', '.join(config.tiers)}", 2)
    try:
        new = create_key(_redis(config), RedisKeys(config.services.redis_prefix), customer, tier)
    except Exception as exc:  # redis.ConnectionError and friends
        raise _fail(f"cannot reach Redis at {config.services.redis_url}: {exc}") from None
    if as_json:
        typer.echo(json.dumps({"key": new.plaintext, "key_id": new.key_id, "customer": customer, "tier": tier}))
    else:
        typer.echo(new.plaintext)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key id (the part after 'qm_').")],
    config_path: ConfigOption = None,
) -> None:
    """Revoke a key: the shim refuses it with 401 from the next request on."""
    from gateway_shim.keystore import revoke_key
    from quotameter.redis_keys import RedisKeys

    config = _config(config_path)
    try:
        found = revoke_key(_redis(config), RedisKeys(config.services.redis_prefix), key_id)
    except Exception as exc:
        raise _fail(f"cannot reach Redis at {config.services.redis_url}: {exc}") from None
    if not found:
        raise _fail(f"no key with id {key_id!r}")
    typer.echo(f"revoked {key_id}")


@keys_app.command("list")
def keys_list(config_path: ConfigOption = None) -> None:
    """List key ids with their customer, tier and state (never the keys)."""
    from gateway_shim.keystore import list_keys
    from quotameter.redis_keys import RedisKeys

    config = _config(config_path)
    try:
        records = list_keys(_redis(config), RedisKeys(config.services.redis_prefix))
    except Exception as exc:
        raise _fail(f"cannot reach Redis at {config.services.redis_url}: {exc}") from None
    for record in records:
        typer.echo(f"{record.key_id}\t{record.customer}\t{record.tier}\t{'revoked' if record.revoked else 'active'}")


@app.command("usage")
def usage(
    customer: Annotated[str, typer.Option(help="Customer id.")],
    month: Annotated[Optional[str], typer.Option(help="Billing period YYYY-MM (default: the current one).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    config_path: ConfigOption = None,
) -> None:
    """A customer's usage for a month: the ClickHouse ledger beside Redis's quota state."""
    from quotameter.usage_report import gather_usage, render_usage

    config = _config(config_path)
    period = month or period_of(datetime.now(UTC), config.billing.timezone)
    try:
        report = gather_usage(config, customer, period)
    except QuotameterError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(report, sort_keys=True))
    else:
        render_usage(report, Console())


@app.command("mock-llm")
def mock_llm(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8081,
    token_delay_ms: Annotated[float, typer.Option(help="Delay between streamed tokens.")] = 0.0,
) -> None:
    """Run the built-in OpenAI-compatible mock model server."""
    from quotameter.embedded.mock_llm import serve

    serve(host=host, port=port, token_delay_ms=token_delay_ms)


@app.command("proxy")
def proxy(config_path: ConfigOption = None) -> None:
    """Run the shim as a proxy in front of the configured upstream."""
    from gateway_shim.server import serve

    serve(_config(config_path))


@app.command("worker")
def worker(config_path: ConfigOption = None) -> None:
    """Run a pipeline worker (Faust): aggregate events, write quota state and history."""
    from pipeline.worker import serve

    serve(_config(config_path))


@app.command("up")
def up(
    config_path: ConfigOption = None,
    data_dir: Annotated[Path, typer.Option(help="Where the embedded stack keeps its data and logs.")] = Path("var"),
    upstream_url: Annotated[
        Optional[str],
        typer.Option(envvar="UPSTREAM_URL", help="Put the shim in front of this endpoint instead of the mock."),
    ] = None,
) -> None:
    """Run the whole embedded stack in the foreground; Ctrl-C stops all of it."""
    from quotameter.embedded.stack import run_stack

    try:
        sys.exit(run_stack(config_path, data_dir, upstream_url))
    except QuotameterError as exc:
        raise _fail(str(exc)) from None
