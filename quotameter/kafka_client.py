"""How every Kafka client of the product connects: ``services.kafka_*`` as
aiokafka keyword arguments and as Faust's ``broker_credentials``.

The shim's producer, the worker's Faust app, its DLQ and alerts producers,
its admin and offset-repair clients all take their options from here, so a
cluster that needs SASL or TLS is configured once. The password never leaves
these dicts: nothing here logs it, and errors name settings, not values.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from aiokafka.errors import (
    BrokerResponseError,
    KafkaConnectionError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context

from quotameter.config import KafkaSecurityProtocol, Services

if TYPE_CHECKING:
    from faust.types.auth import CredentialsT

_SASL = (KafkaSecurityProtocol.SASL_PLAINTEXT, KafkaSecurityProtocol.SASL_SSL)
_TLS = (KafkaSecurityProtocol.SSL, KafkaSecurityProtocol.SASL_SSL)

# A real cluster: every in-sync replica has the event before it counts as
# sent, a dead leader is retried after a short pause rather than in a spin.
REQUEST_TIMEOUT_MS = 15_000
RETRY_BACKOFF_MS = 200


def ssl_context(services: Services) -> ssl.SSLContext | None:
    """The TLS context of SSL / SASL_SSL (None otherwise): verifies the
    brokers against kafka_ssl_cafile (else the system's CAs) and presents the
    client certificate, if any."""
    if services.kafka_security_protocol not in _TLS:
        return None
    return create_ssl_context(
        cafile=str(services.kafka_ssl_cafile) if services.kafka_ssl_cafile else None,
        certfile=str(services.kafka_ssl_certfile) if services.kafka_ssl_certfile else None,
        keyfile=str(services.kafka_ssl_keyfile) if services.kafka_ssl_keyfile else None,
    )


def client_options(services: Services) -> dict[str, Any]:
    """Keyword arguments of any aiokafka client (producer, consumer, admin)."""
    protocol = services.kafka_security_protocol
    options: dict[str, Any] = {"bootstrap_servers": services.kafka_bootstrap, "security_protocol": protocol.value}
    if protocol in _SASL:
        assert services.kafka_sasl_password is not None  # the config's validator insists
        options |= {
            "sasl_mechanism": services.kafka_sasl_mechanism.value,
            "sasl_plain_username": services.kafka_sasl_username,
            "sasl_plain_password": services.kafka_sasl_password.get_secret_value(),
        }
    context = ssl_context(services)
    if context is not None:
        options["ssl_context"] = context
    return options


def producer_options(services: Services, **overrides: Any) -> dict[str, Any]:
    """An AIOKafkaProducer's keyword arguments: connection, acks=all, and
    idempotence where the brokers support it (``kafka_idempotence``)."""
    return client_options(services) | {
        "acks": "all",
        "enable_idempotence": services.kafka_idempotence,
        "request_timeout_ms": REQUEST_TIMEOUT_MS,
        "retry_backoff_ms": RETRY_BACKOFF_MS,
    } | overrides


def faust_credentials(services: Services) -> CredentialsT | None:
    """Faust's ``broker_credentials`` for the same settings (None: plaintext)."""
    from faust.auth import SASLCredentials, SSLCredentials  # only the worker imports Faust

    protocol = services.kafka_security_protocol
    if protocol in _SASL:
        assert services.kafka_sasl_password is not None
        return SASLCredentials(
            username=services.kafka_sasl_username,
            password=services.kafka_sasl_password.get_secret_value(),
            ssl_context=ssl_context(services),
            mechanism=services.kafka_sasl_mechanism.value,
        )
    if protocol == KafkaSecurityProtocol.SSL:
        return SSLCredentials(ssl_context(services))
    return None


def explain(exc: BaseException, services: Services) -> str:
    """What a failure to connect most likely means, naming the settings to
    check (aiokafka reports a refused login as a closed connection, or worse)."""
    protocol = services.kafka_security_protocol
    where = f"Kafka at {services.kafka_bootstrap} (services.kafka_bootstrap)"
    if isinstance(exc, ssl.SSLError) or (isinstance(exc.__cause__, ssl.SSLError)):
        return (f"{where}: TLS failed ({exc}); check services.kafka_ssl_cafile "
                "(the CA that signed the brokers' certificates) and kafka_ssl_certfile / kafka_ssl_keyfile")
    if protocol in _SASL and isinstance(exc, (SaslAuthenticationFailed, UnsupportedSaslMechanismError, KeyError)):
        # KeyError: aiokafka's SCRAM client reading a refusal as a server proof.
        return (f"{where} refused the login of services.kafka_sasl_username {services.kafka_sasl_username!r} "
                f"with services.kafka_sasl_mechanism {services.kafka_sasl_mechanism}: check the username, "
                "services.kafka_sasl_password and the mechanism the brokers enable")
    if isinstance(exc, KafkaConnectionError):
        hints = [f"services.kafka_security_protocol (now {protocol}: does the listener want TLS, SASL?)"]
        if protocol in _TLS:
            hints.append("services.kafka_ssl_cafile (the CA of the brokers' certificates) and "
                         "kafka_ssl_certfile / kafka_ssl_keyfile (a listener that wants a client certificate)")
        if protocol in _SASL:
            hints.append("services.kafka_sasl_username, kafka_sasl_password and kafka_sasl_mechanism")
        return f"{where} closed the connection or is unreachable ({exc}); check the address, {'; '.join(hints)}"
    if services.kafka_idempotence and isinstance(exc, BrokerResponseError):
        # An idempotent producer starts with InitProducerId, which some
        # brokers refuse (Tansu 0.6 answers UnknownError).
        return (f"{where} refused to start an idempotent producer ({type(exc).__name__}: {exc}); "
                "if the brokers do not support it, set services.kafka_idempotence to false")
    return f"{where}: {type(exc).__name__}: {exc}"
