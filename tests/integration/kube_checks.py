"""Checks of a built kustomize overlay (kube_manifests.build). Each returns the
problems it found, one sentence each, so a test can assert none on the
shipped overlays and at least one on a deliberately broken copy."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate

from gateway_shim.server import SHUTDOWN_TIMEOUT_S
from pipeline.alerts import ALERT_TOPIC_PARTITIONS, alert_topic
from pipeline.app import worker_data_dir
from pipeline.retry import RETRY_S
from pipeline.worker import dlq_topic
from quotameter.config import Config
from quotameter.windows import Granularity
from tests.integration.kube_manifests import (
    PodView,
    Resource,
    config_file_only,
    matches,
    named,
    of_kind,
    pod_spec,
    pod_view,
    secret_data,
    workloads,
)

# The newest Kubernetes whose schemas kubernetes-validate ships (its version follows Kubernetes').
KUBERNETES_VERSION = kubernetes_validate.latest_version()
OPERATOR_KINDS = ("KafkaTopic", "ClickHouseInstallation", "ClickHouseKeeperInstallation")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
SHIM, WORKER, MIGRATE = "quotameter-shim", "quotameter-worker", "quotameter-migrate"
DEFAULT_PORTS = {"http": 80, "https": 443, "redis": 6379, "rediss": 6379, "clickhouse": 8123, "clickhouses": 8443}


# --- schemas ---------------------------------------------------------------

def schemas(resources: list[Resource]) -> list[str]:
    """Built-in kinds against Kubernetes' own schemas (strict: an unknown field
    is an error); the operators' kinds by hand, see operator_resources."""
    problems = []
    for resource in resources:
        if resource["kind"] in OPERATOR_KINDS:
            continue
        try:
            kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(part) for part in exc.path)
            problems.append(f"{resource['kind']} {resource['metadata']['name']}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{resource['kind']} {resource['apiVersion']}: no schema in Kubernetes {KUBERNETES_VERSION}")
    return problems


def operator_resources(resources: list[Resource]) -> list[str]:
    """The CRDs kubernetes-validate has no schema for, checked by hand against
    the fields their operators document: Strimzi's KafkaTopic (v1beta2:
    label strimzi.io/cluster; spec.partitions >= 1, spec.replicas 1..32767,
    spec.config, spec.topicName) and Altinity's ClickHouseInstallation /
    ClickHouseKeeperInstallation (spec required; configuration.clusters[]
    with a name and a layout of shardsCount / replicasCount; zookeeper.nodes[]
    host and port; templates named where they are used)."""
    problems: list[str] = []
    for topic in of_kind(resources, "KafkaTopic"):
        problems += _kafka_topic(topic)
    for chi in of_kind(resources, "ClickHouseInstallation"):
        problems += _clickhouse_installation(chi)
    for chk in of_kind(resources, "ClickHouseKeeperInstallation"):
        problems += _keeper_installation(chk)
    return problems


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _kafka_topic(topic: Resource) -> list[str]:
    name = topic["metadata"]["name"]
    where = f"KafkaTopic {name}"
    problems = []
    if topic["apiVersion"] not in ("kafka.strimzi.io/v1beta2", "kafka.strimzi.io/v1"):
        problems.append(f"{where}: apiVersion {topic['apiVersion']} is not one Strimzi serves")
    if not DNS_SUBDOMAIN.match(name) or len(name) > 253:
        problems.append(f"{where}: metadata.name is not a DNS subdomain")
    if not (topic["metadata"].get("labels") or {}).get("strimzi.io/cluster"):
        problems.append(f"{where}: no strimzi.io/cluster label (the Topic Operator ignores it)")
    spec = topic.get("spec")
    if not isinstance(spec, dict):
        return [*problems, f"{where}: no spec"]
    unknown = set(spec) - {"partitions", "replicas", "config", "topicName"}
    if unknown:
        problems.append(f"{where}: unknown spec fields {sorted(unknown)}")
    if not _int_in(spec.get("partitions"), 1, 2**31 - 1):
        problems.append(f"{where}: spec.partitions must be an integer >= 1")
    if not _int_in(spec.get("replicas"), 1, 32767):
        problems.append(f"{where}: spec.replicas must be an integer in 1..32767")
    if not isinstance(spec.get("config", {}), dict):
        problems.append(f"{where}: spec.config must be a mapping")
    if not isinstance(spec.get("topicName", name), str):
        problems.append(f"{where}: spec.topicName must be a string")
    return problems


def _clusters(where: str, spec: Any) -> tuple[list[dict], list[str]]:
    if not isinstance(spec, dict):
        return [], [f"{where}: spec is required"]
    clusters = (spec.get("configuration") or {}).get("clusters")
    if not isinstance(clusters, list) or not clusters:
        return [], [f"{where}: spec.configuration.clusters must list at least one cluster"]
    problems = []
    for index, cluster in enumerate(clusters):
        if not isinstance(cluster.get("name"), str) or not DNS_LABEL.match(cluster.get("name", "")):
            problems.append(f"{where}: clusters[{index}].name must be a DNS label")
        for count in ("shardsCount", "replicasCount"):
            value = (cluster.get("layout") or {}).get(count, 1)
            if not _int_in(value, 1, 2**31 - 1):
                problems.append(f"{where}: clusters[{index}].layout.{count} must be an integer >= 1")
    return clusters, problems


def _clickhouse_installation(chi: Resource) -> list[str]:
    where = f"ClickHouseInstallation {chi['metadata']['name']}"
    if chi["apiVersion"] != "clickhouse.altinity.com/v1":
        return [f"{where}: apiVersion must be clickhouse.altinity.com/v1"]
    spec = chi.get("spec")
    clusters, problems = _clusters(where, spec)
    if not clusters:
        return problems
    nodes = (spec["configuration"].get("zookeeper") or {}).get("nodes") or []
    if any((c.get("layout") or {}).get("replicasCount", 1) > 1 for c in clusters) and not nodes:
        problems.append(f"{where}: replicas need configuration.zookeeper.nodes (Keeper) to replicate")
    for node in nodes:
        if not isinstance(node.get("host"), str) or not _int_in(node.get("port", 2181), 1, 65535):
            problems.append(f"{where}: zookeeper node {node} needs a host and a port 1..65535")
    for key, value in (spec["configuration"].get("users") or {}).items():
        if "/" not in key:
            problems.append(f"{where}: users key {key!r} is not <user>/<setting>")
        if isinstance(value, dict) and not {"name", "key"} <= set((value.get("valueFrom") or {}).get("secretKeyRef") or {}):
            problems.append(f"{where}: users.{key} needs valueFrom.secretKeyRef with name and key")
    claims = {t.get("name") for t in (spec.get("templates") or {}).get("volumeClaimTemplates") or []}
    for level, templates in [("defaults", (spec.get("defaults") or {}).get("templates") or {}),
                             *[(f"cluster {c['name']}", c.get("templates") or {}) for c in clusters]]:
        for use in ("dataVolumeClaimTemplate", "logVolumeClaimTemplate"):
            if use in templates and templates[use] not in claims:
                problems.append(f"{where}: {level} uses {use} {templates[use]!r}, not in templates.volumeClaimTemplates")
    return problems


def _keeper_installation(chk: Resource) -> list[str]:
    where = f"ClickHouseKeeperInstallation {chk['metadata']['name']}"
    if chk["apiVersion"] != "clickhouse-keeper.altinity.com/v1":
        return [f"{where}: apiVersion must be clickhouse-keeper.altinity.com/v1"]
    clusters, problems = _clusters(where, chk.get("spec"))
    for cluster in clusters:
        if (cluster.get("layout") or {}).get("replicasCount", 1) % 2 == 0:
            problems.append(f"{where}: an even number of Keeper replicas adds no fault tolerance")
    return problems


# --- wiring inside the overlay ----------------------------------------------

def probes_and_selectors(resources: list[Resource]) -> list[str]:
    """Probes aim at container ports; selectors find the pods they mean; the
    PDBs, the HPA and the Services aim at Deployments that exist."""
    problems = []
    pods = {w["metadata"]["name"]: w for w in workloads(resources)}
    for name, workload in pods.items():
        labels = workload["spec"]["template"]["metadata"].get("labels") or {}
        if workload["kind"] == "Deployment" and not matches(workload["spec"]["selector"]["matchLabels"], labels):
            problems.append(f"Deployment {name}: selector does not match its pod labels")
        for container in pod_spec(workload)["containers"]:
            ports = {p.get("name") for p in container.get("ports", [])} | {p["containerPort"] for p in container.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                action = container.get(probe) or {}
                for kind in ("httpGet", "tcpSocket", "grpc"):
                    if kind in action and action[kind]["port"] not in ports:
                        problems.append(f"{name}/{container['name']}: {probe} port {action[kind]['port']} is not a container port")
    deployments = {n: w for n, w in pods.items() if w["kind"] == "Deployment"}

    def selected(selector: dict[str, str]) -> list[str]:
        return [n for n, w in deployments.items() if matches(selector, w["spec"]["template"]["metadata"].get("labels") or {})]

    for service in of_kind(resources, "Service"):
        targets = selected(service["spec"].get("selector") or {})
        if len(targets) != 1:
            problems.append(f"Service {service['metadata']['name']}: selects {targets or 'no Deployment'}")
            continue
        container_ports = [p for c in pod_spec(deployments[targets[0]])["containers"] for p in c.get("ports", [])]
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if not any(target in (p.get("name"), p["containerPort"]) for p in container_ports):
                problems.append(f"Service {service['metadata']['name']}: targetPort {target} is no port of {targets[0]}")
    for pdb in of_kind(resources, "PodDisruptionBudget"):
        if len(selected(pdb["spec"]["selector"].get("matchLabels") or {})) != 1:
            problems.append(f"PodDisruptionBudget {pdb['metadata']['name']}: selects no single Deployment")
    for policy in of_kind(resources, "NetworkPolicy"):
        selector = policy["spec"]["podSelector"].get("matchLabels") or {}
        if not any(matches(selector, w["spec"]["template"]["metadata"].get("labels") or {}) for w in pods.values()):
            problems.append(f"NetworkPolicy {policy['metadata']['name']}: its podSelector selects no pod")
    for hpa in of_kind(resources, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = deployments.get(ref["name"]) if ref["kind"] == "Deployment" else None
        if target is None:
            problems.append(f"HorizontalPodAutoscaler {hpa['metadata']['name']}: no Deployment {ref['name']}")
        elif any("cpu" not in ((c.get("resources") or {}).get("requests") or {}) for c in pod_spec(target)["containers"]):
            problems.append(f"HorizontalPodAutoscaler {hpa['metadata']['name']}: {ref['name']} has no CPU request to scale on")
        elif target["spec"].get("replicas", 1) < hpa["spec"].get("minReplicas", 1):
            problems.append(f"HorizontalPodAutoscaler {hpa['metadata']['name']}: {ref['name']} starts below minReplicas")
    return problems


def references(resources: list[Resource]) -> list[str]:
    """Every Secret and ConfigMap (and key) a pod or an operator resource names exists."""
    have = {(r["kind"], r["metadata"]["name"]): r for r in resources if r["kind"] in ("Secret", "ConfigMap")}
    problems = []

    def need(kind: str, name: str, key: str | None, who: str) -> None:
        found = have.get((kind, name))
        if found is None:
            problems.append(f"{who}: {kind} {name} does not exist")
        elif key is not None:
            data = secret_data(found) if kind == "Secret" else found.get("data") or {}
            if key not in data:
                problems.append(f"{who}: {kind} {name} has no key {key}")

    for workload in workloads(resources):
        who = f"{workload['kind']} {workload['metadata']['name']}"
        spec = pod_spec(workload)
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                need("Secret", volume["secret"]["secretName"], None, who)
            if "configMap" in volume:
                need("ConfigMap", volume["configMap"]["name"], None, who)
        for container in spec["containers"] + spec.get("initContainers", []):
            for env_from in container.get("envFrom", []):
                if "secretRef" in env_from:
                    need("Secret", env_from["secretRef"]["name"], None, who)
                if "configMapRef" in env_from:
                    need("ConfigMap", env_from["configMapRef"]["name"], None, who)
            for var in container.get("env", []):
                ref = var.get("valueFrom") or {}
                if "secretKeyRef" in ref:
                    need("Secret", ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"], who)
                if "configMapKeyRef" in ref:
                    need("ConfigMap", ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"], who)
    for chi in of_kind(resources, "ClickHouseInstallation"):
        for key, value in ((chi.get("spec") or {}).get("configuration") or {}).get("users", {}).items():
            ref = (value.get("valueFrom") or {}).get("secretKeyRef") if isinstance(value, dict) else None
            if ref:
                need("Secret", ref["name"], ref["key"], f"ClickHouseInstallation {chi['metadata']['name']} users.{key}")
    return problems


# --- the config each container loads ------------------------------------------

def container_configs(resources: list[Resource], root: Path) -> dict[str, tuple[PodView, Config]]:
    """Each workload's config as its container loads it: the mounted YAML,
    the mounted secret files, the Secrets' environment applied."""
    loaded = {}
    for workload in workloads(resources):
        name = workload["metadata"]["name"]
        container = pod_spec(workload)["containers"][0]["name"]
        view = pod_view(resources, workload, container, root / name)
        loaded[name] = (view, view.load_config())
    return loaded


def _hosts(url: str) -> tuple[str, list[str]]:
    """Scheme and host:port list of a Redis URL (Cluster and Sentinel list several)."""
    scheme, _, rest = url.partition("://")
    netloc = rest.split("/", 1)[0].rpartition("@")[2]
    return scheme, sorted(netloc.split(","))


def config_consistency(resources: list[Resource], root: Path) -> list[str]:
    problems = []
    configs = container_configs(resources, root)
    for name, (view, config) in configs.items():
        services = config.services
        file_url = config_file_only(resources, named(resources, _kind(resources, name), name),
                                    pod_spec(named(resources, _kind(resources, name), name))["containers"][0]["name"])
        file_redis = (file_url.get("services") or {}).get("redis_url")
        if file_redis and _hosts(file_redis) != _hosts(services.redis_url):
            problems.append(f"{name}: the Secret's Redis URL {_hosts(services.redis_url)} is not the config's {_hosts(file_redis)}")
        if not services.history_url.get_secret_value().startswith(("clickhouse://", "clickhouses://")):
            problems.append(f"{name}: services.history_url is no ClickHouse server (the image has no embedded chDB)")
        if name == SHIM:
            if not view.writable(config.shim.spool_dir):
                problems.append(f"{name}: shim.spool_dir {config.shim.spool_dir} is on no writable volume")
            if urlsplit(services.worker_url).hostname != WORKER:
                problems.append(f"{name}: services.worker_url {services.worker_url} is not the worker's Service")
        if name == WORKER:
            for path in (worker_data_dir(config),):
                if not view.writable(path):
                    problems.append(f"{name}: the worker's data directory {path} is on no writable volume")
            if services.admin_token is None:
                problems.append(f"{name}: services.admin_token unset: the worker refuses to listen beyond loopback")
    chis = of_kind(resources, "ClickHouseInstallation")
    if chis and WORKER in configs:
        services = configs[WORKER][1].services
        clusters = {c["name"] for chi in chis for c in chi["spec"]["configuration"]["clusters"]}
        if services.history_cluster not in clusters:
            problems.append(f"services.history_cluster {services.history_cluster!r} is none of the ClickHouse clusters {sorted(clusters)}")
        hosts = {f"clickhouse-{chi['metadata']['name']}" for chi in chis}
        if urlsplit(services.history_url.get_secret_value()).hostname not in hosts:
            problems.append(f"services.history_url is not the ClickHouseInstallation's Service {sorted(hosts)}")
    return problems


def _kind(resources: list[Resource], name: str) -> str:
    return next(w["kind"] for w in workloads(resources) if w["metadata"]["name"] == name)


def grace_periods(resources: list[Resource], root: Path) -> list[str]:
    """terminationGracePeriodSeconds outlasts the drain: the shim's preStop,
    its in-flight requests (SHUTDOWN_TIMEOUT_S) and shim.drain_timeout_s; the
    worker's last ledger write, retried up to RETRY_S, after a flush interval."""
    problems = []
    for name, (_, config) in container_configs(resources, root).items():
        workload = named(resources, _kind(resources, name), name)
        if workload["kind"] != "Deployment":
            continue
        spec = pod_spec(workload)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if name == SHIM:
            pre_stop = ((spec["containers"][0].get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
            drain = pre_stop + SHUTDOWN_TIMEOUT_S + config.shim.drain_timeout_s
        else:
            drain = config.pipeline.ledger_flush_ms / 1000 + RETRY_S
        if grace <= drain:
            problems.append(f"{name}: terminationGracePeriodSeconds {grace} does not outlast its drain ({drain:.0f} s)")
        if spec.get("restartPolicy", "Always") != "Always":
            problems.append(f"{name}: restartPolicy must be Always (the worker's exit 75 asks for a restart)")
    return problems


def read_only_roots(resources: list[Resource]) -> list[str]:
    problems = []
    for workload in workloads(resources):
        spec = pod_spec(workload)
        pod = spec.get("securityContext") or {}
        for container in spec["containers"]:
            context = {**pod, **(container.get("securityContext") or {})}
            who = f"{workload['metadata']['name']}/{container['name']}"
            if context.get("runAsUser") != 10001 or not context.get("runAsNonRoot"):
                problems.append(f"{who}: must run as the image's user 10001, non-root")
            if not context.get("readOnlyRootFilesystem") or context.get("allowPrivilegeEscalation", True):
                problems.append(f"{who}: root filesystem must be read-only and privilege escalation off")
    return problems


# --- traffic ----------------------------------------------------------------

def _port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or DEFAULT_PORTS[parts.scheme]


def _redis_ports(url: str) -> set[int]:
    return {int(host.rpartition(":")[2]) if ":" in host else 6379 for host in _hosts(url)[1]}


def _allowed(rules: list[dict], port: int, peer_labels: dict[str, str] | None = None) -> bool:
    """Whether a rule admits TCP ``port``; to a pod with ``peer_labels``, or, without, to any address."""
    for rule in rules:
        ports = rule.get("ports")
        if ports is not None and not any(p.get("protocol", "TCP") == "TCP" and p.get("port") == port for p in ports):
            continue
        peers = rule.get("to", rule.get("from"))
        if peers is None:
            return True
        for peer in peers:
            if peer_labels is not None and "podSelector" in peer and "namespaceSelector" not in peer \
                    and matches(peer["podSelector"].get("matchLabels") or {}, peer_labels):
                return True
    return False


def network_policies(resources: list[Resource], root: Path) -> list[str]:
    """Each part may reach what its config names and be reached by who needs it."""
    problems = []
    configs = container_configs(resources, root)
    policies = of_kind(resources, "NetworkPolicy")

    def policy_of(name: str) -> dict | None:
        labels = named(resources, _kind(resources, name), name)["spec"]["template"]["metadata"]["labels"]
        found = [p for p in policies if matches(p["spec"]["podSelector"].get("matchLabels") or {}, labels)]
        return found[0]["spec"] if len(found) == 1 else None

    worker_labels = named(resources, "Deployment", WORKER)["spec"]["template"]["metadata"]["labels"]
    shim_labels = named(resources, "Deployment", SHIM)["spec"]["template"]["metadata"]["labels"]
    for name, (_, config) in configs.items():
        policy = policy_of(name)
        if policy is None:
            problems.append(f"{name}: not exactly one NetworkPolicy selects it")
            continue
        services = config.services
        history = _port(services.history_url.get_secret_value())
        kafka = {int(host.rpartition(":")[2]) for host in services.kafka_bootstrap.split(",")}
        needs = {MIGRATE: {"ClickHouse": {history}},
                 SHIM: {"Redis": _redis_ports(services.redis_url), "Kafka": kafka,
                        "the model server": {_port(config.upstream.url)}},
                 WORKER: {"Redis": _redis_ports(services.redis_url), "Kafka": kafka, "ClickHouse": {history}}}[name]
        egress = policy.get("egress", [])
        if not _allowed(egress, 53) and "Egress" in policy.get("policyTypes", []):
            problems.append(f"{name}: no DNS (port 53) allowed out")
        for what, ports in needs.items():
            for port in ports:
                if not _allowed(egress, port):
                    problems.append(f"{name}: may not reach {what} on port {port}")
        if name == SHIM:
            if not _allowed(egress, _port(services.worker_url), worker_labels):
                problems.append(f"{name}: may not reach the workers on {_port(services.worker_url)} (usage history)")
            if not _allowed(policy.get("ingress", []), config.shim.port):
                problems.append(f"{name}: clients may not reach port {config.shim.port}")
    worker_policy = policy_of(WORKER)
    if worker_policy is not None:
        ingress = worker_policy.get("ingress", [])
        if not _allowed(ingress, 6066, shim_labels):
            problems.append(f"{WORKER}: the shims may not reach port 6066")
        scraped = any(peer.get("namespaceSelector") and peer.get("podSelector")
                      for rule in ingress if any(p.get("port") == 6066 for p in rule.get("ports", []))
                      for peer in rule.get("from", []))
        if not scraped:
            problems.append(f"{WORKER}: Prometheus (another namespace) may not scrape port 6066")
    return problems


# --- Strimzi topics ---------------------------------------------------------

def strimzi_topics(resources: list[Resource], root: Path) -> list[str]:
    """With topics managed by Strimzi, every topic the shim and the worker use
    is a KafkaTopic with the partitions and replicas the config expects."""
    topics = of_kind(resources, "KafkaTopic")
    if not topics:
        return []
    config = container_configs(resources, root)[WORKER][1]
    services = config.services
    problems = []
    if services.kafka_create_topics:
        problems.append("KafkaTopic resources exist but services.kafka_create_topics is true (both would create them)")
    partitions = services.kafka_topic_partitions
    expected = {services.events_topic: partitions, dlq_topic(config): 1, alert_topic(config): ALERT_TOPIC_PARTITIONS}
    # Faust's changelog of each worker table, "<app id>-<table>-changelog": the
    # tables are partitioned like the events topic.
    expected |= {f"{services.worker_app_id}-usage-{g.value}-changelog": partitions for g in Granularity}
    declared = {t["spec"].get("topicName", t["metadata"]["name"]): t for t in topics}
    for topic, count in expected.items():
        if topic not in declared:
            problems.append(f"no KafkaTopic for {topic}")
            continue
        spec = declared[topic]["spec"]
        if spec.get("partitions") != count:
            problems.append(f"KafkaTopic {topic}: {spec.get('partitions')} partitions, the config expects {count}")
        if spec.get("replicas") != services.kafka_replication_factor:
            problems.append(f"KafkaTopic {topic}: {spec.get('replicas')} replicas, services.kafka_replication_factor is "
                            f"{services.kafka_replication_factor}")
    clusters = {t["metadata"]["labels"].get("strimzi.io/cluster") for t in topics}
    hosts = {host.rpartition(":")[0] for host in services.kafka_bootstrap.split(",")}
    if len(clusters) != 1 or hosts != {f"{next(iter(clusters))}-kafka-bootstrap"}:
        problems.append(f"topics of Strimzi cluster(s) {sorted(clusters)}, but kafka_bootstrap is {services.kafka_bootstrap}")
    workers = named(resources, "Deployment", WORKER)["spec"].get("replicas", 1)
    if workers > partitions:
        problems.append(f"{workers} workers for {partitions} partitions of {services.events_topic}: some would idle")
    return problems
