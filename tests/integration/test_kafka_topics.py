"""Topics made outside the product (services.kafka_create_topics: false):
the worker names every missing one and stops, the shim spools and says
which topic it waits for (without making a broker that auto-creates topics
create it), and once an operator made them both run on them. An events
topic partitioned otherwise than the tables stops the worker."""

from __future__ import annotations

import asyncio

from pipeline.alerts import alert_topic
from pipeline.app import changelog_topics
from pipeline.worker import dlq_topic
from tests.integration.enforcement_helpers import ShimFactory, shim_factory  # noqa: F401
from tests.integration.kafka_helpers import (
    FAST_JOIN, TIERS, assert_ledger_holds, list_topics, make_topics, serve, worker_failure,
)
from tests.integration.pipeline_helpers import start_worker, wait_for


async def test_topics_made_outside_are_required_then_used(
    shim_factory: ShimFactory, cli_process, kafka_bootstrap: str
) -> None:
    shim = await shim_factory(TIERS, services={"kafka_create_topics": False}, **FAST_JOIN)
    config = shim.config
    services = config.services
    said = await asyncio.to_thread(worker_failure, cli_process, shim.config_path, "worker-no-topics")
    every = [services.events_topic, dlq_topic(config), *changelog_topics(config), alert_topic(config)]
    assert (f"error: Kafka topic(s) {', '.join(every)} missing on {kafka_bootstrap}, and "
            "services.kafka_create_topics is false") in said, said

    # The shim spools what it serves meanwhile and says which topic is missing;
    # asking the broker about it never makes a broker that auto-creates topics create it.
    served = await serve(shim, "outside-customer", 2)
    shim_log = shim.process.log_path
    await asyncio.to_thread(wait_for, lambda: f"Kafka topic {services.events_topic} does not exist and "
                            "services.kafka_create_topics is false" in shim_log.read_text(), 10.0, "the shim's error")
    assert services.events_topic not in await list_topics(services)

    # The operator makes the topics (as Strimzi KafkaTopics would), then the worker starts on them.
    await make_topics(services, {**dict.fromkeys(every, 4), dlq_topic(config): 1, alert_topic(config): 1})
    await asyncio.to_thread(start_worker, cli_process, config, shim.config_path, "worker")
    await asyncio.to_thread(assert_ledger_holds, config, "outside-customer", served)




async def test_an_events_topic_partitioned_otherwise_stops_the_worker(config_factory, cli_process) -> None:
    config, path = config_factory({"tiers": TIERS})
    services = config.services
    await make_topics(services, {services.events_topic: 2})
    said = await asyncio.to_thread(worker_failure, cli_process, path, "worker-other-partitions")
    assert (f"error: topic {services.events_topic} has 2 partitions but services.kafka_topic_partitions is 4: "
            "the tables are partitioned like the events topic, set it to 2") in said, said


async def test_idempotence_a_broker_refuses_is_named(shim_factory: ShimFactory, cli_process, kafka_bootstrap: str) -> None:
    # Tansu 0.6 refuses InitProducerId: what an operator sees who turns it on there.
    shim = await shim_factory(TIERS, services={"kafka_idempotence": True})
    said = await asyncio.to_thread(worker_failure, cli_process, shim.config_path, "worker-idempotent")
    named = (f"Kafka at {kafka_bootstrap} (services.kafka_bootstrap) refused to start an idempotent producer "
             "(UnknownError")
    assert f"error: {named}" in said and "set services.kafka_idempotence to false" in said, said
    assert len(await serve(shim, "idempotent-customer", 1)) == 1  # served, its event spooled
    shim_log = shim.process.log_path
    await asyncio.to_thread(wait_for, lambda: named in shim_log.read_text(), 10.0, "the shim to name idempotence")
