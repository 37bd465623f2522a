"""The chart's rendered workloads started as pods by a real container engine (``podman kube play``).

No Kubernetes API server can run here, so nothing schedules Deployments. What a kubelet would run is run instead:
each Deployment's or StatefulSet's pod template becomes one ``kind: Pod`` per replica, played by podman with the
template as rendered: its containers, init containers, commands and arguments, environment, security context
(uid 65532, read-only root file system, all capabilities dropped) and volumes. Only what podman 4.3 lacks or gets
wrong is translated, and only in the way a kubelet would do it:

- **Secrets and ConfigMaps.** podman 4.3 crashes on a ``secret`` volume without ``optional`` (podman issue 16636)
  and reads kube Secrets back in the wrong encoding (issue 16269). Each Secret or ConfigMap volume becomes a read-only
  host folder holding the same files (``items`` honoured), and each ``secretKeyRef`` the value itself.
- **emptyDir.** podman makes a named volume per volume name, shared by every pod that uses the name and never
  memory-backed. Each pod gets its own folder instead; ``medium: Memory`` is a tmpfs of ``sizeLimit``.
- **fsGroup.** podman does not apply it: the pod's writable folders and claims are owned by that group.
- **restartPolicy.** podman 4.3 applies ``Always`` to init containers too (its issue 16343): the prepare init
  container would run again and again, and podman fails to remove it. Pods run with ``OnFailure``, which restarts a
  failed container as the kubelet would and runs each init container once.
- **Ports.** podman 4.3 publishes a container's ports on the host (so two replicas collide); in a cluster they
  publish nothing, and here too the pods are reached at their own addresses: the ``ports`` lists are left out.
- **Services.** No cluster DNS: each Service's name (short and ``.<namespace>.svc.cluster.local``) is a
  ``hostAliases`` entry with the address of a pod its selector matches. Pods get static addresses on a bridge
  network of the test's own (``10.213.0.0/24``, the multi-host test's range), inside this machine.

Probes: podman 4.3 turns a liveness probe into a healthcheck that needs systemd (absent here), and ignores startup
and readiness probes. :func:`probe` performs each probe as the kubelet would, from outside the pod.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import yaml

from samserve_dev.containers import podman

NETWORK = "samserve-e2e"
SUBNET = "10.213.0"
CLUSTER_DOMAIN = "svc.cluster.local"
WORKLOADS = ("Deployment", "StatefulSet")


@dataclasses.dataclass
class PlannedPod:
    """One pod to play: its name, address, component label and the Pod document."""

    name: str
    address: str
    labels: dict[str, str]
    document: dict[str, Any]

    def container(self, name: str) -> dict[str, Any]:
        (found,) = [c for c in self.document["spec"]["containers"] if c["name"] == name]
        return found

    def port(self, container: str, name_or_number: str | int) -> int:
        """A container port by name (as probes and Services name them) or number."""
        if isinstance(name_or_number, int) or str(name_or_number).isdigit():
            return int(name_or_number)
        for port in self.container(container).get("ports", []):
            if port.get("name") == name_or_number:
                return int(port["containerPort"])
        raise KeyError(f"{self.name}/{container} has no port named {name_or_number}")


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


class Cluster:
    """The rendered manifests of one release, played pod by pod under ``root`` (host folders for Secrets and
    emptyDirs). ``replicas`` overrides a workload's replica count by name."""

    def __init__(self, manifests: str, root: Path, namespace: str, first_host: int = 10) -> None:
        self.documents = [d for d in yaml.safe_load_all(manifests) if d]
        self.root = Path(root)
        self.namespace = namespace
        self.secrets = {d["metadata"]["name"]: d for d in self.documents if d["kind"] == "Secret"}
        self.pods: list[PlannedPod] = []
        next_host = first_host
        for workload in self.of_kind(*WORKLOADS):
            template = workload["spec"]["template"]
            for index in range(self.replicas(workload)):
                name = f"{workload['metadata']['name']}-{index}"
                document = {"apiVersion": "v1", "kind": "Pod",
                            "metadata": {"name": name, "labels": dict(template["metadata"].get("labels", {}))},
                            "spec": copy.deepcopy(template["spec"])}
                self.pods.append(PlannedPod(name, f"{SUBNET}.{next_host}", document["metadata"]["labels"], document))
                next_host += 1
        self.mounted: list[Path] = []

    def replicas(self, workload: dict[str, Any]) -> int:
        """The workload's replicas; under an autoscaler (no replicas rendered) the autoscaler's minimum, which is
        what the cluster runs before any load."""
        if "replicas" in workload["spec"]:
            return int(workload["spec"]["replicas"])
        name = workload["metadata"]["name"]
        for scaler in self.of_kind("HorizontalPodAutoscaler"):
            if scaler["spec"]["scaleTargetRef"]["name"] == name:
                return int(scaler["spec"].get("minReplicas", 1))
        for scaler in self.of_kind("ScaledObject"):
            if scaler["spec"]["scaleTargetRef"]["name"] == name:
                return int(scaler["spec"].get("minReplicaCount", 1))
        return 1

    def of_kind(self, *kinds: str) -> list[dict[str, Any]]:
        return [d for d in self.documents if d["kind"] in kinds]

    def pods_of(self, component: str) -> list[PlannedPod]:
        return [p for p in self.pods if p.labels.get("app.kubernetes.io/component") == component]

    def add_secret(self, name: str, data: dict[str, bytes]) -> None:
        """A Secret the chart expects to exist (made by the operator in a real cluster)."""
        self.secrets[name] = {"kind": "Secret", "metadata": {"name": name},
                              "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}

    def secret_value(self, name: str, key: str) -> bytes:
        secret = self.secrets[name]
        if key in secret.get("stringData", {}):
            return str(secret["stringData"][key]).encode()
        return base64.b64decode(secret["data"][key])

    # -- translation ---------------------------------------------------------------------------------------------

    def _host_aliases(self) -> list[dict[str, Any]]:
        aliases = []
        for service in self.of_kind("Service"):
            selector = service["spec"].get("selector", {})
            targets = [p for p in self.pods if _matches(selector, p.labels)]
            if not targets:
                continue
            name = service["metadata"]["name"]
            qualified = f"{name}.{self.namespace}"
            aliases.append({"ip": targets[0].address,
                            "hostnames": [name, qualified, f"{qualified}.{CLUSTER_DOMAIN}"]})
        return aliases

    def config_map_value(self, name: str, key: str) -> bytes:
        (config_map,) = [d for d in self.of_kind("ConfigMap") if d["metadata"]["name"] == name]
        if key in config_map.get("binaryData", {}):
            return base64.b64decode(config_map["binaryData"][key])
        return str(config_map["data"][key]).encode()

    def _files_folder(self, pod: PlannedPod, volume: dict[str, Any]) -> Path:
        """A Secret or ConfigMap volume's files (``items`` honoured), read-only, in a folder of the pod's."""
        if "secret" in volume:
            source, name = volume["secret"], volume["secret"]["secretName"]
            document, read = self.secrets[name], self.secret_value
        else:
            source, name = volume["configMap"], volume["configMap"]["name"]
            (document,) = [d for d in self.of_kind("ConfigMap") if d["metadata"]["name"] == name]
            read = self.config_map_value
        keys = [*document.get("data", {}), *document.get("stringData", {}), *document.get("binaryData", {})]
        folder = self.root / pod.name / "files" / volume["name"]
        folder.mkdir(parents=True, exist_ok=True)
        for item in source.get("items") or [{"key": key, "path": key} for key in keys]:
            path = folder / item["path"]
            path.write_bytes(read(name, item["key"]))
            path.chmod(0o444)
        return folder

    def _empty_dir(self, pod: PlannedPod, volume: dict[str, Any], group: int | None) -> Path:
        folder = self.root / pod.name / "empty" / volume["name"]
        folder.mkdir(parents=True, exist_ok=True)
        source = volume["emptyDir"] or {}
        if source.get("medium") == "Memory":
            size = str(source.get("sizeLimit", "64Mi")).replace("Gi", "g").replace("Mi", "m")
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs", str(folder)], check=True)
            self.mounted.append(folder)
        else:
            folder.chmod(0o2775)
            if group is not None:
                os.chown(folder, 0, group)
        return folder

    def translated(self, pod: PlannedPod) -> dict[str, Any]:
        """The Pod document podman 4.3 plays as a kubelet would run the template (see the module docstring)."""
        document = copy.deepcopy(pod.document)
        spec = document["spec"]
        group = spec.get("securityContext", {}).get("fsGroup")
        spec["hostAliases"] = [*spec.get("hostAliases", []), *self._host_aliases()]
        if spec.get("restartPolicy", "Always") == "Always":
            spec["restartPolicy"] = "OnFailure"  # see the module docstring: podman would restart init containers
        for volume in spec.get("volumes", []):
            if "secret" in volume or "configMap" in volume:
                path = self._files_folder(pod, volume)
            elif "emptyDir" in volume:
                path = self._empty_dir(pod, volume, group)
            else:
                continue
            name = volume["name"]
            volume.clear()
            volume.update({"name": name, "hostPath": {"path": str(path), "type": "Directory"}})
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            container.pop("ports", None)  # podman 4.3 would publish them on the host; pods are reached by address
            for variable in container.get("env", []):
                reference = variable.get("valueFrom", {}).get("secretKeyRef")
                if reference:
                    variable.pop("valueFrom")
                    variable["value"] = self.secret_value(reference["name"], reference["key"]).decode()
        return document

    # -- running -------------------------------------------------------------------------------------------------

    def claims(self) -> Iterator[str]:
        for pod in self.pods:
            for volume in pod.document["spec"].get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    yield volume["persistentVolumeClaim"]["claimName"]

    def create_claims(self) -> None:
        """Each claim a podman volume shared by the pods that mount it (ReadWriteMany), owned by the fsGroup."""
        for claim in sorted(set(self.claims())):
            if podman("volume", "exists", claim, check=False).returncode != 0:
                podman("volume", "create", claim)
            mountpoint = podman("volume", "inspect", "--format", "{{.Mountpoint}}", claim).stdout.strip()
            groups = {p.document["spec"].get("securityContext", {}).get("fsGroup") for p in self.pods} - {None}
            for group in groups:
                os.chown(mountpoint, 0, int(group))
            os.chmod(mountpoint, 0o2775)

    def ensure_network(self) -> None:
        if podman("network", "exists", NETWORK, check=False).returncode != 0:
            podman("network", "create", "--subnet", f"{SUBNET}.0/24", NETWORK)

    def play(self, pod: PlannedPod) -> float:
        """Start ``pod``; the monotonic time just before podman started it."""
        path = self.root / f"{pod.name}.yaml"
        path.write_text(yaml.safe_dump(self.translated(pod), sort_keys=False))
        started = time.monotonic()
        podman("kube", "play", "--network", NETWORK, "--ip", pod.address, str(path), timeout_s=900)
        return started

    def remove(self, pods: Iterable[PlannedPod]) -> None:
        for pod in pods:
            podman("pod", "rm", "--force", "--time", "5", pod.name, check=False, timeout_s=120)

    def teardown(self) -> None:
        self.remove(self.pods)
        for claim in sorted(set(self.claims())):
            podman("volume", "rm", "--force", claim, check=False)
        for folder in reversed(self.mounted):
            subprocess.run(["umount", str(folder)], check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def logs(self, pod: PlannedPod) -> str:
        spec = pod.document["spec"]
        names = [c["name"] for c in [*spec.get("initContainers", []), *spec["containers"]]]
        parts = []
        for name in names:
            result = podman("logs", "--tail", "60", f"{pod.name}-{name}", check=False)
            parts.append(f"--- {pod.name}/{name}\n{result.stdout[-6000:]}{result.stderr[-6000:]}")
        return "\n".join(parts)


def probe(pod: PlannedPod, container: str, spec: dict[str, Any], timeout_s: float = 5.0) -> bool:
    """One probe as the kubelet performs it against the pod's address: httpGet (2xx/3xx), grpc (health SERVING for
    the named service), tcpSocket (connect)."""
    if "httpGet" in spec:
        get = spec["httpGet"]
        url = f"http://{pod.address}:{pod.port(container, get['port'])}{get.get('path', '/')}"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                return 200 <= response.status < 400
        except OSError:
            return False
    if "grpc" in spec:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        check = spec["grpc"]
        with grpc.insecure_channel(f"{pod.address}:{check['port']}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=check.get("service", "")), timeout=timeout_s)
            except grpc.RpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    if "tcpSocket" in spec:
        try:
            with socket.create_connection((pod.address, pod.port(container, spec["tcpSocket"]["port"])),
                                          timeout=timeout_s):
                return True
        except OSError:
            return False
    raise ValueError(f"unknown probe {spec}")
