"""Making sure the events topic exists before the worker subscribes to it."""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from quotameter.errors import ServiceError

log = logging.getLogger(__name__)

TOPIC_ALREADY_EXISTS = 36


async def ensure_topic(bootstrap: str, name: str, partitions: int) -> None:
    """Create ``name`` with ``partitions`` partitions unless it exists.

    An existing topic is left as it is (its partition count is the producer's
    business); a topic created concurrently by someone else is fine too.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        await admin.start()
    except Exception as exc:
        await admin.close()
        raise ServiceError(f"cannot reach the Kafka broker at {bootstrap}: {exc}") from None
    try:
        if name in await admin.list_topics():
            return
        response = await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        for topic, code, *rest in response.topic_errors:
            if code not in (0, TOPIC_ALREADY_EXISTS):
                message = rest[0] if rest else ""
                raise ServiceError(f"cannot create topic {topic!r} on {bootstrap}: error {code} {message}")
        log.info("created topic %s with %d partitions", name, partitions)
    finally:
        await admin.close()
