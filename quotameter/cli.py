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

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Usage metering and quota enforcement for LLM APIs.")
keys_app = typer.Typer(no_args_is_help=True, help="Create, revoke and list API keys.")
app.add_typer(keys_app, name="keys")

# Errors are never folded: a path or URL split across lines cannot be searched for or pasted.
err = Console(stderr=True, soft_wrap=True)
# A period is named for the month it starts in (billing.anchor_day, billing.timezone).
PERIOD_HELP = (
    "Billing period YYYY-MM, named for the month it starts in: with billing.anchor_day 15, "
    "2026-11 is Nov 15 - Dec 15 (midnight in billing.timezone). Default: the current one."
)
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


def _redis(config: Config):  # noqa: ANN202 - redis.Redis or RedisCluster
    from quotameter.redis_pool import sync_redis

    return sync_redis(config.services)


def _fail(message: str, code: int = 1) -> typer.Exit:
    from rich.markup import escape  # a message may hold brackets: pip install 'quotameter[embedded]'

    err.print(f"[red]error:[/] {escape(message)}")
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
    priority: Annotated[str, typer.Option(help="interactive, or batch (waits in the tier's queue).")] = "interactive",
    requests_per_minute: Annotated[Optional[int], typer.Option(help="This key's own requests/min.")] = None,
    tokens_per_minute: Annotated[Optional[int], typer.Option(help="This key's own tokens/min.")] = None,
    concurrent_requests: Annotated[Optional[int], typer.Option(help="This key's own concurrency.")] = None,
    models: Annotated[Optional[str], typer.Option(help="Comma list: the only models this key may use.")] = None,
    project: Annotated[Optional[str], typer.Option(help="Project the key's spend is attributed to.")] = None,
    config_path: ConfigOption = None,
) -> None:
    """Create an API key. The key is shown once, on stdout; only its hash is stored.

    Key limits are checked on top of the customer's: they can only tighten."""
    from pydantic import ValidationError

    from gateway_shim.keystore import PRIORITIES, create_key
    from quotameter.config import KeyOverrides
    from quotameter.redis_keys import RedisKeys

    config = _config(config_path)
    if tier not in config.tiers:
        raise _fail(f"unknown tier {tier!r}; configured tiers: {', '.join(config.tiers)}", 2)
    if priority not in PRIORITIES:
        raise _fail(f"--priority must be one of {', '.join(PRIORITIES)}", 2)
    values = {
        "requests_per_minute": requests_per_minute,
        "tokens_per_minute": tokens_per_minute,
        "concurrent_requests": concurrent_requests,
        "allowed_models": [m.strip() for m in models.split(",") if m.strip()] if models else None,
    }
    try:
        limits = KeyOverrides(**values) if any(v is not None for v in values.values()) else None
    except ValidationError as exc:
        raise _fail(f"invalid key limits: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}", 2) from None
    from quotameter.labels import id_problem

    if project is not None and (problem := id_problem(project)):
        raise _fail(f"--project {problem}", 2)
    try:
        new = create_key(
            _redis(config), RedisKeys(config.services.redis_prefix), customer, tier, priority=priority, limits=limits,
            project=project,
        )
    except Exception as exc:  # redis.ConnectionError and friends
        raise _fail(f"cannot reach Redis at {config.services.redis_url}: {exc}") from None
    if as_json:
        shown = {"key": new.plaintext, "key_id": new.key_id, "customer": customer, "tier": tier}
        typer.echo(json.dumps(shown | ({"project": project} if project else {})))
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
    month: Annotated[Optional[str], typer.Option(help=PERIOD_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    config_path: ConfigOption = None,
) -> None:
    """A customer's usage in a billing period: the ClickHouse ledger beside Redis's quota state."""
    from quotameter.usage_report import gather_usage, render_usage

    config = _config(config_path)
    period = month or config.billing.calendar.current(datetime.now(UTC))
    try:
        report = gather_usage(config, customer, period)
    except QuotameterError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(report, sort_keys=True))
    else:
        render_usage(report, Console())


@app.command("alerts")
def alerts(
    customer: Annotated[Optional[str], typer.Option(help="Only this customer (default: all).")] = None,
    month: Annotated[Optional[str], typer.Option(help=PERIOD_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output: one JSON list.")] = False,
    config_path: ConfigOption = None,
) -> None:
    """Usage alerts fired in a billing period, with their delivery state (read from Redis)."""
    from pipeline.alerts import list_alerts
    from quotameter.redis_keys import RedisKeys

    config = _config(config_path)
    calendar = config.billing.calendar
    period = month or calendar.current(datetime.now(UTC))
    try:
        calendar.validate(period)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    try:
        records = list_alerts(_redis(config), RedisKeys(config.services.redis_prefix), customer, period)
    except Exception as exc:  # redis.ConnectionError and friends
        raise _fail(f"cannot reach Redis at {config.services.redis_url}: {exc}") from None
    if as_json:
        typer.echo(json.dumps(records, sort_keys=True))
        return
    if not records:
        typer.echo(f"no alerts in {period}" + (f" for {customer}" if customer else ""))
        return
    for record in records:
        alert, data = record["alert"], record["alert"]["data"]
        if data["kind"] == "tokens":
            usage = f"{data['used_tokens']}/{data['monthly_tokens']} tokens"
        else:
            usage = f"${data['spent_usd']}/${data['monthly_budget_usd']}"
        typer.echo(
            f"{alert['time']}\t{data['customer']}\t{data['period']}\t{data['kind']} {data['threshold_pct']}%\t"
            f"{usage}\tkafka={record['kafka']}\twebhook={record['webhook']}\t{alert['id']}"
        )


@app.command("rebuild-state")
def rebuild_state_command(
    customer: Annotated[Optional[str], typer.Option(help="Only this customer (default: every customer in the ledger).")] = None,
    month: Annotated[Optional[str], typer.Option(help=PERIOD_HELP)] = None,
    force: Annotated[bool, typer.Option(help="Overwrite Redis even where it is ahead of the ledger.")] = False,
    config_path: ConfigOption = None,
) -> None:
    """Restore Redis's period totals from the ledger (through the worker when it runs)."""
    from pipeline.rebuild_cli import rebuild_from_cli

    config = _config(config_path)
    try:
        counts, via = rebuild_from_cli(config, customer, month, force)
    except (QuotameterError, ValueError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"rebuilt the quota state of {counts['customers']} customer(s) from the ledger ({via})")


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


@app.command("ledger-server")
def ledger_server(
    history_dir: Annotated[
        Optional[Path], typer.Option(help="The chDB ledger directory (default: services.history_dir).")
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; other than loopback only with services.admin_token set.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8123,
    config_path: ConfigOption = None,
) -> None:
    """Share one chDB ledger between workers: serve it over ClickHouse's HTTP interface
    (point services.history_url at clickhouse://quotameter:ADMIN_TOKEN@HOST:PORT)."""
    from pipeline.history.chdb_server import serve
    from quotameter.service_auth import TokenGate

    config = _config(config_path)
    directory = history_dir if history_dir is not None else config.services.history_dir
    try:
        serve(directory, host=host, port=port, gate=TokenGate.from_services(config.services))
    except QuotameterError as exc:
        raise _fail(str(exc)) from None


@app.command("migrate")
def migrate(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the SQL that would run; change nothing.")] = False,
    from_version: Annotated[
        Optional[int],
        typer.Option(min=0, help="With --dry-run: print the SQL from this schema version, without connecting."),
    ] = None,
    create_readonly_user: Annotated[
        Optional[str],
        typer.Option(help="Also create (or update) this user, able only to read the ledger: for Grafana and dashboards."),
    ] = None,
    readonly_password_file: Annotated[
        Optional[Path],
        typer.Option(help="File holding that user's password (else the QUOTAMETER_READONLY_PASSWORD variable)."),
    ] = None,
    config_path: ConfigOption = None,
) -> None:
    """Apply the ledger's schema migrations to the ClickHouse server in services.history_url
    (Replicated tables ON CLUSTER services.history_cluster when set). Safe to run again.

    Exit codes: 1 the server failed or refused, 2 bad configuration or arguments."""
    import logging
    import os
    import time

    from rich.console import Console
    from rich.markup import escape

    from pipeline.history import migrations
    from pipeline.history.server_schema import ServerSchema, is_access_refusal, readonly_user_sql

    config = _config(config_path)
    url = config.services.history_url.get_secret_value().strip()
    if from_version is not None and not dry_run:
        raise _fail("--from-version only goes with --dry-run: a migration reads the version from the server", 2)
    if not url and from_version is None:
        raise _fail(
            "services.history_url is empty: the embedded chDB ledger migrates itself when the worker "
            "or ledger-server opens it; migrate applies the schema to a ClickHouse server", 2
        )
    password = ""
    if create_readonly_user is not None:
        try:
            password = (readonly_password_file.read_text().strip() if readonly_password_file
                        else os.environ.get("QUOTAMETER_READONLY_PASSWORD", ""))
        except OSError as exc:
            raise _fail(f"--readonly-password-file: {exc.strerror}: {readonly_password_file}", 2) from None
        if not password:
            raise _fail("the read-only user needs a password: QUOTAMETER_READONLY_PASSWORD or --readonly-password-file", 2)
    # clickhouse-connect logs a failed request before raising it; the error below says it once.
    logging.getLogger("clickhouse_connect").setLevel(logging.CRITICAL)
    out = Console(highlight=False, soft_wrap=True)
    layout = migrations.Layout(config.services.history_cluster)
    cluster = f" (cluster {layout.cluster})" if layout.cluster else ""

    def print_sql(header: str, applied: int | None) -> None:
        out.print(f"-- {header}: schema version {applied or 0}, this quotameter has {migrations.LATEST}", markup=False)
        statements: list[str] = []
        migrations.apply(statements.append, applied, layout, on_step=lambda m: statements.append(f"-- {m.version}: {m.name}"))
        for statement in statements + user_sql:
            out.print(statement if statement.startswith("--") else statement + ";\n", markup=False)

    try:
        user_sql = readonly_user_sql(create_readonly_user, password, layout) if create_readonly_user else []
        if from_version is not None:
            # Version 0: a server without the migrations table (its bootstrap included).
            print_sql(f"not connected{cluster}", from_version or None)
            return
        target = ServerSchema.from_url(url, config.services.history_cluster)
    except QuotameterError as exc:
        raise _fail(escape(str(exc))) from None
    where = target.where + cluster
    try:
        applied = target.applied()
        if dry_run:
            print_sql(where, applied)
            return
        started: list[float] = []

        def step(migration: migrations.Migration) -> None:
            started.append(time.monotonic())
            out.print(f"applying {migration.version}/{migrations.LATEST}: {escape(migration.name)} …")

        def done(migration: migrations.Migration) -> None:
            out.print(f"  [green]done[/] {migration.version} in {time.monotonic() - started[-1]:.2f} s")

        steps = migrations.apply(target.run, applied, layout, step, done)
        if steps:
            out.print(f"{escape(where)}: migrated from version {applied or 0} to {migrations.LATEST}")
        elif missing := target.repair():
            out.print(f"{escape(where)}: schema version {applied}, but {', '.join(missing)} missing: created again")
        else:
            out.print(f"{escape(where)}: schema version {applied}, up to date")
        if user_sql:
            try:
                for statement in user_sql:
                    target.run(statement)
            except QuotameterError as exc:
                if not is_access_refusal(exc):
                    raise
                err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
                err.print("this connection cannot manage users: run these as a user that can (e.g. in clickhouse-client):")
                out.print("\n".join(s + ";" for s in user_sql), markup=False)
                raise typer.Exit(1) from None
            out.print(f"read-only user {create_readonly_user}: SELECT on the ledger, readonly = 1")
    except QuotameterError as exc:
        raise _fail(escape(str(exc))) from None
    finally:
        target.close()


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


dashboards_app = typer.Typer(no_args_is_help=True, help="Build the Grafana dashboards, or push them to a Grafana.")
app.add_typer(dashboards_app, name="dashboards")
DatasourceUidOption = Annotated[
    str, typer.Option("--datasource-uid", help="uid of the grafana-clickhouse-datasource in Grafana.")
]
PrometheusUidOption = Annotated[
    str, typer.Option("--prometheus-uid", help="uid of the Prometheus datasource (the service-health dashboard).")
]


@dashboards_app.command("build")
def dashboards_build(
    out: Annotated[Path, typer.Option("--out", help="Directory for the dashboard JSON files.")],
    datasource_uid: DatasourceUidOption = "quotameter-clickhouse",
    prometheus_uid: PrometheusUidOption = "quotameter-prometheus",
    config_path: ConfigOption = None,
) -> None:
    """Write one Grafana dashboard JSON per dashboard (Billing, Quotas, Operations, Service health) into OUT."""
    from dashboards.catalog import config_constants
    from dashboards.grafana import write_all

    config = _config(config_path)
    for path in write_all(out, config_constants(config), datasource_uid, prometheus_uid):
        typer.echo(str(path))


@dashboards_app.command("push")
def dashboards_push(
    url: Annotated[str, typer.Option("--url", envvar="GRAFANA_URL", help="Grafana base URL, e.g. http://grafana:3000.")],
    token: Annotated[
        str, typer.Option("--token", envvar="GRAFANA_TOKEN", help="A service-account token with the Editor role.")
    ],
    datasource_uid: DatasourceUidOption = "quotameter-clickhouse",
    prometheus_uid: PrometheusUidOption = "quotameter-prometheus",
    config_path: ConfigOption = None,
) -> None:
    """Push the dashboards into Grafana's 'quotameter' folder (stable uids, overwriting earlier pushes)."""
    from dashboards.catalog import config_constants
    from dashboards.grafana import build_all
    from dashboards.push import push_dashboards

    config = _config(config_path)
    try:
        pushed = push_dashboards(url, token, build_all(config_constants(config), datasource_uid, prometheus_uid))
    except QuotameterError as exc:
        raise _fail(str(exc)) from None
    for line in pushed:
        typer.echo(line)


@app.command("dashboard")
def dashboard(
    host: Annotated[Optional[str], typer.Option(help="Address to listen on (default: services.dashboard_url).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port to listen on (default: services.dashboard_url).")] = None,
    config_path: ConfigOption = None,
) -> None:
    """Serve the built-in dashboard (Billing, Quotas, Operations) at http://HOST:PORT/dashboard."""
    from urllib.parse import urlsplit

    from dashboards.server import serve

    config = _config(config_path)
    where = urlsplit(config.services.dashboard_url)
    try:
        serve(config, host=host or where.hostname or "127.0.0.1", port=port or where.port or 8090)
    except QuotameterError as exc:
        raise _fail(str(exc)) from None


# -- billing export (quotameter/export.py) ------------------------------------
@app.command("export")
def export(
    month: Annotated[
        str, typer.Option(help="Billing period YYYY-MM, named for the month it starts in (billing.anchor_day).")
    ],
    fmt: Annotated[str, typer.Option("--format", help="csv, json, or stripe (meter events as JSON lines).")] = "csv",
    out: Annotated[Optional[Path], typer.Option("--out", help="Write here (atomically) instead of stdout.")] = None,
    draft: Annotated[
        bool, typer.Option(help="Export an open period anyway, marked not final (csv, json; never stripe).")
    ] = False,
    force: Annotated[bool, typer.Option(help="Write Stripe events outside Stripe's time range anyway.")] = False,
    stripe_window: Annotated[
        Optional[str], typer.Option("--stripe-window", help="hour or day (default: billing.stripe.window).")
    ] = None,
    by: Annotated[
        Optional[str], typer.Option("--by", help="Break lines down by api_key, user, project, tag:KEY (comma list).")
    ] = None,
    config_path: ConfigOption = None,
) -> None:
    """Export a billing period's usage per customer and model, after reconciling
    the ledger, the invoice lines and Redis's totals (printed on stderr).

    A period is final billing.finalize_after_hours after it ends, by the clock.

    Exit codes: 1 a source failed, 2 bad arguments, 4 reconciliation failed (nothing written),
    3 refused: an open period (--draft exports it marked not final) or Stripe's time range (--force)."""
    import os
    import tempfile

    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from quotameter.export import FORMATS, ExportError, ExportRefused, ReconciliationFailed, run_export
    from quotameter.export_sql import breakdown

    config = _config(config_path)
    try:
        dimensions = breakdown(by or "")
    except ValueError as exc:
        raise _fail(f"--by: {exc}", 2) from None
    if dimensions and fmt == "stripe":
        raise _fail("--by exports csv or json only: Stripe meter events are per customer", 2)
    if fmt not in FORMATS:
        raise _fail(f"--format must be one of {', '.join(FORMATS)}", 2)
    if stripe_window not in (None, "hour", "day"):
        raise _fail("--stripe-window must be hour or day", 2)
    if draft and fmt == "stripe":
        raise _fail("--draft exports csv or json only: Stripe meter events are sent once, when the period is final", 2)
    try:
        config.billing.calendar.validate(month)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True, disable=not err.is_terminal,
    )
    tasks: dict[str, object] = {}

    def progress(step: str, done: int, total: int) -> None:
        if step not in tasks:
            tasks[step] = bar.add_task(step, total=total)
        bar.update(tasks[step], completed=done, total=total)  # type: ignore[arg-type]

    try:
        with bar:
            result = run_export(
                config, month, fmt, datetime.now(UTC), draft=draft, force=force, window=stripe_window, by=dimensions,
                progress=progress,
            )
    except ExportError as exc:
        # soft_wrap: long messages stay on one line each, whole numbers intact.
        err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
        code = 4 if isinstance(exc, ReconciliationFailed) else 3 if isinstance(exc, ExportRefused) else 1
        raise typer.Exit(code) from None
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True, highlight=False)
    err.print(
        f"reconciled {month} ({result.source}): ledger = lines = redis for {result.customers} customer(s)\n"
        + result.summary,
        soft_wrap=True, highlight=False, markup=False,
    )
    if out is None:
        sys.stdout.write(result.text)
        sys.stdout.flush()
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
        handle.write(result.text)
    os.replace(temp, out)
    err.print(f"wrote {result.lines} {'meter events' if fmt == 'stripe' else 'lines'} to {out}", highlight=False, soft_wrap=True)
