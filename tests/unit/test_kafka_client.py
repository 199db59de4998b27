"""services.kafka_* as aiokafka options and Faust credentials
(quotameter.kafka_client), and the combinations the config refuses."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import faust
import pytest
import yaml
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed, UnknownError

from pipeline.app import build_app, changelog_topics
from quotameter.config import DEFAULT_CONFIG, Services, load_config, parse_config
from quotameter.errors import ConfigError
from quotameter.kafka_client import client_options, explain, faust_credentials, producer_options
from tests.tls_certs import TlsFiles, make_ca


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_ca(tmp_path_factory.mktemp("ca"))


def config_with(services: dict[str, Any]) -> Any:
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    document.setdefault("services", {}).update(services)
    return parse_config(document, origin="test.yaml")


def test_plaintext_is_the_default_and_adds_nothing() -> None:
    services = Services()
    assert client_options(services) == {"bootstrap_servers": "127.0.0.1:9092", "security_protocol": "PLAINTEXT"}
    assert faust_credentials(services) is None
    options = producer_options(services)
    assert options["acks"] == "all"
    assert options["enable_idempotence"] is False  # the embedded broker refuses InitProducerId


def test_sasl_scram_over_tls_reaches_aiokafka_and_faust(tls: TlsFiles) -> None:
    services = Services(
        kafka_bootstrap="b-1.example:9096,b-2.example:9096",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="quotameter",
        kafka_sasl_password="pw-1",
        kafka_ssl_cafile=tls.ca,
        kafka_idempotence=True,
    )
    options = client_options(services)
    context = options.pop("ssl_context")
    assert options == {
        "bootstrap_servers": "b-1.example:9096,b-2.example:9096",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "quotameter",
        "sasl_plain_password": "pw-1",
    }
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "quotameter test CA"),),)]
    assert producer_options(services, linger_ms=5)["enable_idempotence"] is True

    credentials = faust_credentials(services)
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.username, credentials.password) == ("quotameter", "pw-1")
    assert credentials.mechanism.value == "SCRAM-SHA-512"
    assert credentials.protocol.value == "SASL_SSL"
    assert credentials.ssl_context is not None


def test_mutual_tls_presents_the_client_certificate(tls: TlsFiles) -> None:
    services = Services(kafka_security_protocol="SSL", kafka_ssl_cafile=tls.ca,
                        kafka_ssl_certfile=tls.client_cert, kafka_ssl_keyfile=tls.client_key)
    assert client_options(services)["security_protocol"] == "SSL"
    credentials = faust_credentials(services)
    assert isinstance(credentials, faust.SSLCredentials)
    assert credentials.protocol.value == "SSL"
    # A key that does not match the certificate fails here, at start.
    with pytest.raises(ssl.SSLError):
        client_options(Services(kafka_security_protocol="SSL", kafka_ssl_certfile=tls.client_cert,
                                kafka_ssl_keyfile=tls.server_key))


def test_the_faust_app_gets_credentials_partitions_and_replication(tls: TlsFiles, tmp_path: Path) -> None:
    config = config_with({
        "kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "SCRAM-SHA-256",
        "kafka_sasl_username": "u", "kafka_sasl_password": "p", "kafka_topic_partitions": 6,
        "kafka_replication_factor": 3, "kafka_create_topics": False, "history_dir": str(tmp_path / "h"),
    })
    loop = asyncio.new_event_loop()  # Faust's app and tables take the current loop, as in the worker
    asyncio.set_event_loop(loop)
    parts = None
    try:
        parts = build_app(config)
        conf = parts.app.conf
        assert isinstance(conf.broker_credentials, faust.SASLCredentials)
        assert conf.broker_credentials.mechanism.value == "SCRAM-SHA-256"
        assert (conf.topic_partitions, conf.topic_replication_factor, conf.topic_allow_declare) == (6, 3, False)
        assert {t.partitions for t in parts.tables.values()} == {6}
        # The names the worker requires when it may not create them are Faust's own.
        names = sorted(t.changelog_topic.get_topic_name() for t in parts.tables.values())
        assert names == sorted(changelog_topics(config))
    finally:
        asyncio.set_event_loop(None)
        loop.close()
        if parts is not None:
            parts.app.consumer._thread.thread_loop.close()  # the consumer thread's own loop, never started


def test_the_password_can_come_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "kafka-password"
    secret.write_text("from-a-file\n")
    config = config_with({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_username": "u",
                          "kafka_sasl_password_file": str(secret)})
    assert client_options(config.services)["sasl_plain_password"] == "from-a-file"
    assert "from-a-file" not in repr(config.services)


def test_the_password_file_can_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "mounted"
    secret.write_text("mounted-secret")
    monkeypatch.setenv("QUOTAMETER_SERVICES__KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("QUOTAMETER_SERVICES__KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("QUOTAMETER_SERVICES__KAFKA_SASL_PASSWORD_FILE", str(secret))
    assert client_options(load_config(DEFAULT_CONFIG).services)["sasl_plain_password"] == "mounted-secret"


def test_environment_variables_set_the_security(monkeypatch: pytest.MonkeyPatch, tls: TlsFiles) -> None:
    monkeypatch.setenv("QUOTAMETER_SERVICES__KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("QUOTAMETER_SERVICES__KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("QUOTAMETER_SERVICES__KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("QUOTAMETER_SERVICES__KAFKA_SASL_PASSWORD", "pw-env")
    monkeypatch.setenv("QUOTAMETER_SERVICES__KAFKA_SSL_CAFILE", str(tls.ca))
    monkeypatch.setenv("QUOTAMETER_SERVICES__KAFKA_REPLICATION_FACTOR", "3")
    services = load_config(DEFAULT_CONFIG).services
    assert (services.kafka_security_protocol, services.kafka_sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-256")
    assert client_options(services)["sasl_plain_password"] == "pw-env"
    assert (services.kafka_ssl_cafile, services.kafka_replication_factor) == (tls.ca, 3)


BAD = [
    ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_username": "u"}, "needs services.kafka_sasl_username and services.kafka_sasl_password"),
    ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_password": "p"}, "needs services.kafka_sasl_username"),
    ({"kafka_sasl_username": "u", "kafka_sasl_password": "p"}, "kafka_security_protocol is PLAINTEXT"),
    ({"kafka_security_protocol": "SSL", "kafka_ssl_certfile": "CLIENT"}, "kafka_ssl_certfile and services.kafka_ssl_keyfile go together"),
    ({"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "/nonexistent/ca.pem"}, "services.kafka_ssl_cafile: Value error, /nonexistent/ca.pem is not a file"),
    ({"kafka_ssl_cafile": "CA"}, "services.kafka_ssl_cafile is set but services.kafka_security_protocol is PLAINTEXT"),
    ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_username": "u", "kafka_sasl_password_file": "/nonexistent/pw"}, "kafka_sasl_password_file: cannot read /nonexistent/pw"),
    ({"kafka_security_protocol": "TLS"}, "services.kafka_security_protocol"),
    ({"kafka_sasl_mechanism": "GSSAPI"}, "services.kafka_sasl_mechanism"),
    ({"kafka_topic_partitions": 0}, "services.kafka_topic_partitions"),
]


@pytest.mark.parametrize(("services", "message"), BAD)
def test_bad_combinations_name_the_setting(services: dict[str, Any], message: str, tls: TlsFiles) -> None:
    files = {"CA": str(tls.ca), "CLIENT": str(tls.client_cert)}
    services = {k: files.get(v, v) if isinstance(v, str) else v for k, v in services.items()}
    with pytest.raises(ConfigError) as info:
        config_with(services)
    assert message in str(info.value)


def test_failures_are_explained_by_the_settings_and_never_show_the_password() -> None:
    sasl = Services(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                    kafka_sasl_username="svc", kafka_sasl_password="hunter2")
    refused = explain(SaslAuthenticationFailed("Authentication failed"), sasl)
    assert "services.kafka_sasl_username 'svc'" in refused and "services.kafka_sasl_password" in refused
    assert "SCRAM-SHA-512" in refused
    closed = explain(KafkaConnectionError("Unable to bootstrap"), Services())
    assert "services.kafka_security_protocol" in closed and "PLAINTEXT" in closed
    tls = explain(ssl.SSLCertVerificationError("certificate verify failed"), Services())
    assert "services.kafka_ssl_cafile" in tls
    idempotent = explain(UnknownError(), Services(kafka_idempotence=True))
    assert "set services.kafka_idempotence to false" in idempotent
    assert "kafka_idempotence" not in explain(UnknownError(), Services())
    assert all("hunter2" not in text for text in (refused, closed, tls))
