"""Kafka SASL refusals, and topics made outside the product
(services.kafka_create_topics: false). Tansu's SASL (--authentication)
offers SCRAM only, and a SCRAM user cannot be created on a broker that
already wants one (its memory store starts empty), so SASL is checked by the
refusal: wrong credentials, or none, stop the worker with a message naming
the settings, and the shim says the same while it spools."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from pipeline.alerts import alert_topic
from pipeline.app import changelog_topics
from pipeline.worker import dlq_topic
from quotameter.embedded.procs import free_port
from tests.integration.enforcement_helpers import ShimFactory, shim_factory  # noqa: F401
from tests.integration.kafka_helpers import (
    FAST_JOIN, TIERS, assert_ledger_holds, list_topics, make_topics, serve, tansu, worker_failure,
)
from tests.integration.pipeline_helpers import start_worker, wait_for


@pytest.fixture(scope="module")
def sasl_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Tansu asking every client to authenticate (SASL)."""
    port = free_port()
    broker = tansu("broker-sasl", tmp_path_factory.mktemp("sasl-kafka"), port, port, "--authentication")
    yield f"127.0.0.1:{port}"
    broker.stop()


async def test_sasl_refusals_name_the_settings_and_never_the_password(
    shim_factory: ShimFactory, config_factory, cli_process, sasl_kafka: str
) -> None:
    password = "not-this-one-3f9a"
    wrong = {"kafka_bootstrap": sasl_kafka, "kafka_security_protocol": "SASL_PLAINTEXT",
             "kafka_sasl_mechanism": "SCRAM-SHA-512", "kafka_sasl_username": "metering",
             "kafka_sasl_password": password}
    shim = await shim_factory(TIERS, services=wrong)
    said = await asyncio.to_thread(worker_failure, cli_process, shim.config_path, "worker-wrong-login")
    assert (f"error: Kafka at {sasl_kafka} (services.kafka_bootstrap) refused the login of "
            "services.kafka_sasl_username 'metering' with services.kafka_sasl_mechanism SCRAM-SHA-512") in said, said
    assert "services.kafka_sasl_password" in said and password not in said

    # The shim keeps serving, spools the event, and says why Kafka does not take it.
    served = await serve(shim, "sasl-customer", 1)
    assert len(served) == 1
    shim_log = shim.process.log_path
    await asyncio.to_thread(wait_for, lambda: "refused the login of services.kafka_sasl_username 'metering'"
                            in shim_log.read_text(), 10.0, "the shim to name the login")
    assert password not in shim_log.read_text()
    health = await shim.health()
    assert health["events"]["spool"]["depth"] == 1, health

    # No SASL at all against a listener that wants it: the protocol setting is named.
    _, path = config_factory({"tiers": TIERS, "services": {"kafka_bootstrap": sasl_kafka}})
    said = await asyncio.to_thread(worker_failure, cli_process, path, "worker-no-login")
    assert "services.kafka_security_protocol (now PLAINTEXT: does the listener want TLS, SASL?)" in said, said


async def test_topics_made_outside_are_required_then_used(
    shim_factory: ShimFactory, cli_process, kafka_bootstrap: str
) -> None:
    shim = await shim_factory(TIERS, services={"kafka_create_topics": False}, **FAST_JOIN)
    config = shim.config
    services = config.services
    said = await asyncio.to_thread(worker_failure, cli_process, shim.config_path, "worker-no-topics")
    assert (f"error: Kafka topic(s) {services.events_topic} missing on {kafka_bootstrap}, and "
            "services.kafka_create_topics is false") in said, said

    # The shim spools what it serves meanwhile and says which topic is missing;
    # asking the broker about it never makes a broker that auto-creates topics create it.
    served = await serve(shim, "outside-customer", 2)
    shim_log = shim.process.log_path
    await asyncio.to_thread(wait_for, lambda: f"Kafka topic {services.events_topic} does not exist and "
                            "services.kafka_create_topics is false" in shim_log.read_text(), 10.0, "the shim's error")
    assert services.events_topic not in await list_topics(services)

    # The operator makes the topics (as a Strimzi KafkaTopic would); every one the worker uses is required.
    await make_topics(services, {services.events_topic: 4, dlq_topic(config): 1})
    said = await asyncio.to_thread(worker_failure, cli_process, shim.config_path, "worker-no-changelogs")
    rest = [*changelog_topics(config), alert_topic(config)]
    assert f"error: Kafka topic(s) {', '.join(rest)} missing" in said, said
    await make_topics(services, dict.fromkeys(rest, 4))
    await asyncio.to_thread(start_worker, cli_process, config, shim.config_path, "worker")
    await asyncio.to_thread(assert_ledger_holds, config, "outside-customer", served)


