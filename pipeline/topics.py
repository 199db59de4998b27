"""Making sure the product's topics exist before anyone subscribes or sends.

With ``services.kafka_create_topics`` the missing ones are created with
``kafka_topic_partitions`` partitions (or the count given) and
``kafka_replication_factor`` replicas; without it they must have been made
outside (Strimzi ``KafkaTopic``, Terraform, the cluster's CLI), and a missing
one is an error naming it. Existence is read from a metadata request for all
topics: one naming a topic would make a broker that auto-creates (Tansu,
Kafka with auto.create.topics.enable) create it with its own defaults.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from quotameter.config import Services
from quotameter.errors import ServiceError
from quotameter.kafka_client import client_options, explain

log = logging.getLogger(__name__)

TOPIC_ALREADY_EXISTS = 36
ADMIN_TIMEOUT_MS = 10_000


async def ensure_topics(services: Services, names: list[str], partitions: int | None = None) -> None:
    """Create the topics of ``names`` that are missing, or with
    ``kafka_create_topics: false`` fail naming them. An existing topic is
    left as it is; one created concurrently by someone else is fine too."""
    async with _admin(services) as admin:
        existing = set(await admin.list_topics())
        missing = [name for name in names if name not in existing]
        if not missing:
            return
        if not services.kafka_create_topics:
            raise ServiceError(
                f"Kafka topic(s) {', '.join(missing)} missing on {services.kafka_bootstrap}, and "
                "services.kafka_create_topics is false: create them (e.g. a Strimzi KafkaTopic) "
                "or set it to true"
            )
        count = partitions or services.kafka_topic_partitions
        await _create(admin, missing, count, services.kafka_replication_factor, services.kafka_bootstrap)


async def topic_partitions(services: Services, name: str) -> int | None:
    """How many partitions ``name`` has (None: no such topic)."""
    async with _admin(services) as admin:
        if name not in await admin.list_topics():
            return None
        (described,) = await admin.describe_topics([name])
        return len(described["partitions"])


@asynccontextmanager
async def _admin(services: Services) -> AsyncIterator[AIOKafkaAdminClient]:
    """A started admin client; failing to start is an error naming the settings to check."""
    admin = AIOKafkaAdminClient(**client_options(services), request_timeout_ms=ADMIN_TIMEOUT_MS)
    try:
        await admin.start()
    except Exception as exc:
        await admin.close()
        raise ServiceError(explain(exc, services)) from None
    try:
        yield admin
    finally:
        await admin.close()


async def ensure_topic(bootstrap: str, name: str, partitions: int) -> None:
    """Create ``name`` on a plaintext broker unless it exists (tests, benchmarks)."""
    await ensure_topics(Services(kafka_bootstrap=bootstrap), [name], partitions)


async def _create(admin: AIOKafkaAdminClient, names: list[str], partitions: int, replication: int, where: str) -> None:
    response: Any = await admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=replication) for name in names]
    )
    for topic, code, *rest in response.topic_errors:
        if code not in (0, TOPIC_ALREADY_EXISTS):
            message = rest[0] if rest else ""
            raise ServiceError(
                f"cannot create topic {topic!r} on {where} ({partitions} partitions, "
                f"services.kafka_replication_factor {replication}): error {code} {message}"
            )
    log.info("created topic(s) %s with %d partitions, replication factor %d", ", ".join(names), partitions, replication)
