"""The Faust app of one worker: settings, the events topic and the tables.

Tables keep one value per customer, keyed like the events topic (the
customer id as raw utf-8 bytes, values as JSON) so a table's changelog partition matches the events
partition when both use the default partitioner. They are created with
``use_partitioner=True`` because ``stream.take`` / ``take_events`` bodies run
outside a current event, where Faust cannot pick the source partition.

    month-usage   customer → {"YYYY-MM": totals record, …}   (billing periods)
    minute-usage  customer → {"minute": ISO UTC minute, …totals}  (current minute only)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import faust

from quotameter.config import Config

TOPIC_PARTITIONS = 4
SESSION_TIMEOUT_S = 10.0
COMMIT_INTERVAL_S = 1.0


def worker_address(config: Config) -> tuple[str, int]:
    url = urlsplit(config.services.worker_url)
    return url.hostname or "127.0.0.1", url.port or 6066


def worker_data_dir(config: Config) -> Path:
    """Faust's own data directory, beside the history directory."""
    history = Path(config.services.history_dir).resolve()
    return history.parent / f"worker-{config.services.worker_app_id}"


@dataclass
class FaustParts:
    app: faust.App
    events_topic: faust.TopicT
    months: faust.Table
    minutes: faust.Table


def build_app(config: Config) -> FaustParts:
    services = config.services
    host, port = worker_address(config)
    app = faust.App(
        services.worker_app_id,
        broker=f"kafka://{services.kafka_bootstrap}",
        store="memory://",  # rocksdb fails its offset check on Tansu (see DESIGN.md)
        datadir=str(worker_data_dir(config)),
        topic_partitions=TOPIC_PARTITIONS,
        broker_session_timeout=SESSION_TIMEOUT_S,
        broker_heartbeat_interval=1.0,
        broker_commit_interval=COMMIT_INTERVAL_S,
        consumer_auto_offset_reset="earliest",
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=True,
        web_bind=host,
        web_host=host,
        web_port=port,
        web_in_thread=False,
        autodiscover=False,
    )
    events_topic = app.topic(services.events_topic, key_type=bytes, value_type=bytes)
    months = app.Table(
        "month-usage",
        key_type=bytes,  # value_type stays None: plain JSON (a dict type breaks recovery)
        partitions=TOPIC_PARTITIONS,
        use_partitioner=True,
        help="customer → billing period → usage totals",
    )
    minutes = app.Table(
        "minute-usage",
        key_type=bytes,  # value_type stays None: plain JSON (a dict type breaks recovery)
        partitions=TOPIC_PARTITIONS,
        use_partitioner=True,
        help="customer → usage totals of the current UTC minute",
    )
    return FaustParts(app, events_topic, months, minutes)
