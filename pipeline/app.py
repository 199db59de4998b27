"""The Faust app of one worker: settings, the events topic and the tables.

Tables keep one value per customer, keyed like the events topic (the
customer id as raw utf-8 bytes, values as JSON) so a table's changelog partition matches the events
partition when both use the default partitioner. They are created with
``use_partitioner=True`` because ``stream.take`` / ``take_events`` bodies run
outside a current event, where Faust cannot pick the source partition.

    usage-minute / usage-hour / usage-day / usage-period
        customer → ``quotameter.windows.WindowRecord`` as JSON: the customer's
        buckets of that size (all models and per model), with the offset
        watermark that makes a redelivery harmless
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import faust

from quotameter.config import Config, Services
from quotameter.kafka_client import faust_credentials
from quotameter.windows import Granularity

# The default of services.kafka_topic_partitions.
TOPIC_PARTITIONS: int = Services.model_fields["kafka_topic_partitions"].default
COMMIT_INTERVAL_S = 1.0
# Faust asks the broker to hold each fetch up to 1.5 s. Tansu holds an empty
# fetch that long even when records arrive meanwhile (p50 421 ms from send to
# receipt at 20 events/s, 25 ms with 100 ms), which alone broke the 1 s
# freshness target. A full fetch still returns at once.
FETCH_MAX_WAIT_MS = 100


def worker_address(config: Config) -> tuple[str, int]:
    url = urlsplit(config.services.worker_url)
    return url.hostname or "127.0.0.1", url.port or 6066


def worker_data_dir(config: Config) -> Path:
    """Faust's own data directory, beside the history directory."""
    history = Path(config.services.history_dir).resolve()
    return history.parent / f"worker-{config.services.worker_app_id}"


def table_name(granularity: Granularity) -> str:
    return f"usage-{granularity.value}"


def changelog_topics(config: Config) -> list[str]:
    """The tables' changelog topics, named as Faust names them."""
    return [f"{config.services.worker_app_id}-{table_name(g)}-changelog" for g in Granularity]


@dataclass
class FaustParts:
    app: faust.App
    events_topic: faust.TopicT
    tables: dict[Granularity, faust.Table]


def build_app(config: Config) -> FaustParts:
    services = config.services
    host, port = worker_address(config)
    app = faust.App(
        services.worker_app_id,
        broker=f"kafka://{services.kafka_bootstrap}",
        broker_credentials=faust_credentials(services),
        store="memory://",  # rocksdb fails its offset check on Tansu (see DESIGN.md)
        datadir=str(worker_data_dir(config)),
        # The tables' changelogs: partitioned like the events topic, replicated
        # like every topic the product creates, or made outside with
        # kafka_create_topics false (pipeline.worker checks they exist).
        topic_partitions=services.kafka_topic_partitions,
        topic_replication_factor=services.kafka_replication_factor,
        topic_allow_declare=services.kafka_create_topics,
        broker_session_timeout=config.pipeline.session_timeout_s,
        broker_heartbeat_interval=1.0,
        broker_commit_interval=COMMIT_INTERVAL_S,
        consumer_auto_offset_reset="earliest",
        # Tansu reports a changelog's latest offset one short at times, so a
        # worker that wrote a changelog partition and gets it back fails
        # Faust's check (persisted 57 > highwater 56) and crashes. The check
        # guards nothing here: every record is rebuilt from the ledger on its
        # first touch after an assignment (pipeline.window_tables).
        recovery_consistency_check=False,
        # On SIGTERM Faust would wait for every event taken to be acked, but
        # acks come from the ledger flush, whose timer stops first: the wait
        # only ran out (10 s and a SIGKILL). The service's on_stop writes the
        # buffered rows instead; their events stay unacked and a restart
        # skips them by the ledger lookup (pipeline.worker.SinkService).
        stream_wait_empty=False,
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=True,
        web_bind=host,
        web_host=host,
        web_port=port,
        web_in_thread=False,
        # Faust's own pages would serve table contents and key placement to
        # anyone: only pipeline.web's views are served, behind the admin token.
        web_tables_enabled=False,
        web_router_enabled=False,
        web_graph_enabled=False,
        web_stats_enabled=False,
        autodiscover=False,
    )
    _shorten_fetch_wait(app)
    events_topic = app.topic(services.events_topic, key_type=bytes, value_type=bytes)
    tables = {
        granularity: app.Table(
            table_name(granularity),
            key_type=bytes,  # value_type stays None: plain JSON (a dict type breaks recovery)
            partitions=services.kafka_topic_partitions,
            use_partitioner=True,
            help=f"customer → usage per {granularity.value}, all models and per model",
        )
        for granularity in Granularity
    }
    return FaustParts(app, events_topic, tables)


def _shorten_fetch_wait(app: faust.App) -> None:
    """Give the consumer Faust creates a FETCH_MAX_WAIT_MS fetch wait (Faust
    has no setting for it: the value is set on the client before it starts)."""
    thread = app.consumer._thread
    create = thread._create_worker_consumer

    def create_worker_consumer(transport: object) -> object:
        consumer = create(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer

    thread._create_worker_consumer = create_worker_consumer
