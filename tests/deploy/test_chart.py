"""The chart, rendered for every profile: Kubernetes' schemas (--strict), the custom resources' CRD schemas,
checkov, yamllint, and the properties the design relies on (transports, probes, ports, scaling, policies)."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, cast

import grpc
import jsonschema
import pytest
import yaml
from google.protobuf import text_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tritonclient.grpc import model_config_pb2

from samserve.core import model_spec
from samserve.core.settings import GatewaySettings, StackSettings
from samserve.transport.http.transcoding import Transcoder
from samserve_build import tensorrt
from samserve_build.settings import BuildSettings
from tests.deploy.conftest import (
    CHART,
    NAMESPACE,
    PROFILES_DIR,
    RELEASE,
    REPO,
    REQUIRED_PROFILES,
    Rendered,
    documents,
    helm_template,
    profiles,
    run,
    tool,
    values,
)

KUBERNETES_VERSION = "1.30.0"
SCHEMAS = Path(__file__).parent / "crd_schemas"
CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.monitoring.coreos.com_v1.json",
                    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.monitoring.coreos.com_v1.json",
                    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject.keda.sh_v1alpha1.json"}
BUILT_IN_GROUPS = {"v1", "apps/v1", "batch/v1", "policy/v1", "autoscaling/v2", "networking.k8s.io/v1"}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod["spec"].get("initContainers", []) + pod["spec"]["containers"]


def gateway_container(rendered: Rendered) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod template, gateway container) of the pods that serve the API."""
    for _, pod in rendered.pod_templates():
        for container in pod["spec"]["containers"]:
            if container["name"] == "gateway":
                return pod, container
    raise AssertionError(f"{rendered.profile}: no gateway container")


def test_every_profile_renders(rendered):
    assert REQUIRED_PROFILES <= set(rendered), sorted(rendered)
    for result in rendered.values():
        kinds = {d["kind"] for d in result.documents}
        assert {"Deployment", "Service", "NetworkPolicy"} <= kinds, (result.profile, kinds)


def test_kubernetes_validate_strict(rendered):
    paths = [str(r.path) for r in rendered.values()]
    result = run([tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, "--quiet", *paths], check=False)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if line.strip() and "Couldn't find schema for kind" not in line]
    assert result.returncode == 0 and not problems, "\n".join(problems)
    # Only the custom resources lack a built-in schema, and each of them has its CRD schema here.
    unknown = {(d["apiVersion"], d["kind"]) for r in rendered.values() for d in r.documents
               if d["apiVersion"] not in BUILT_IN_GROUPS}
    assert unknown <= set(CUSTOM_RESOURCES), unknown


def test_kubernetes_validate_rejects_an_unknown_field(rendered, tmp_path):
    deployment = copy.deepcopy(rendered["default"].named("Deployment", "triton"))
    deployment["spec"]["template"]["spec"]["containers"][0]["startupProbes"] = {}
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(deployment))
    result = run([tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(path)], check=False)
    assert result.returncode != 0, result.stdout


def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / CUSTOM_RESOURCES[(api_version, kind)]).read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_custom_resources_match_their_crd_schemas(rendered):
    seen = set()
    for result in rendered.values():
        for document in result.documents:
            key = (document["apiVersion"], document["kind"])
            if key in CUSTOM_RESOURCES:
                errors = [e.message for e in crd_validator(*key).iter_errors(document)]
                assert not errors, (result.profile, key, errors)
                seen.add(key)
    assert seen == set(CUSTOM_RESOURCES), seen


@pytest.mark.parametrize("kind,edit", [
    ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(intervall="15s")),
    ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(interval="15 seconds")),
    ("PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].update(alert="Both")),
    ("PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].pop("expr")),
])
def test_crd_schemas_reject_mistakes(rendered, kind, edit):
    document = copy.deepcopy(rendered["default"].of_kind(kind)[0])
    edit(document)
    assert list(crd_validator(document["apiVersion"], kind).iter_errors(document))


def test_keda_schema_rejects_a_trigger_without_metadata(rendered):
    document = copy.deepcopy(rendered["keda"].of_kind("ScaledObject")[0])
    document["spec"]["triggers"][0].pop("metadata")
    assert list(crd_validator(document["apiVersion"], "ScaledObject").iter_errors(document))


def test_checkov_fails_nothing_beyond_the_listed_skips(rendered, tmp_path):
    skips = yaml.safe_load((REPO / "deploy" / "helm" / "checkov-skips.yaml").read_text())
    assert all(s["id"] and len(s["reason"]) > 40 for s in skips), skips
    folder = tmp_path / "manifests"
    folder.mkdir()
    for result in rendered.values():
        (folder / result.path.name).write_text(result.path.read_text())
    result = run([tool("checkov"), "-d", str(folder), "--framework", "kubernetes", "--quiet", "--compact",
                  "-o", "json"], timeout_s=300, check=False)
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [(c["check_id"], c["resource"], c["file_path"]) for r in reports for c in r["results"]["failed_checks"]]
    listed = {s["id"] for s in skips}
    unexpected = sorted({f for f in failed if f[0] not in listed})
    assert not unexpected, unexpected
    assert listed == {f[0] for f in failed}, f"skips no longer needed: {listed - {f[0] for f in failed}}"
    passed = sum(r["summary"]["passed"] for r in reports)
    assert passed > 100, passed     # checkov did look at the manifests


def test_yamllint(rendered):
    config = REPO / "deploy" / "helm" / ".yamllint"
    paths = [str(CHART / "values.yaml"), str(CHART / "Chart.yaml"), str(PROFILES_DIR), *(str(r.path) for r in
                                                                                         rendered.values())]
    run([tool("yamllint"), "--strict", "-c", str(config), *paths])


def test_helm_lint():
    run([tool("helm"), "lint", "--strict", str(CHART)])


def test_prometheus_rule_is_the_observability_rules_file(rendered):
    source = REPO / "deploy" / "observability" / "rules.yml"
    assert (CHART / "files" / "rules.yml").resolve() == source.resolve()
    for result in rendered.values():
        (rule,) = result.of_kind("PrometheusRule")
        assert rule["spec"] == yaml.safe_load(source.read_text()), result.profile


def test_dashboard_and_locust_config_maps_are_the_repository_files(rendered):
    dashboard = rendered["default"].named("ConfigMap", "dashboard")
    assert json.loads(dashboard["data"]["samserve.json"]) == json.loads(
        (REPO / "deploy" / "observability" / "grafana-dashboard.json").read_text())
    locust = rendered["keda"].named("ConfigMap", "locustfile")
    assert locust["data"]["locustfile.py"] + "\n" == (REPO / "bench" / "locustfile.py").read_text()
    assert set(locust["data"]) == {"locustfile.py"}  # its seeded images come from the image's samserve_dev
    for link in (CHART / "files").iterdir():
        assert link.is_symlink() and link.resolve().is_relative_to(REPO) and link.resolve().exists(), link
        assert not link.resolve().is_relative_to(REPO / "tests"), f"{link}: the chart ships no test code"


def test_ports_match_the_settings_defaults():
    chart = values("default")
    gateway, stack = GatewaySettings(), StackSettings()
    assert chart["gateway"]["ports"]["grpc"] == gateway.gateway_port
    assert chart["gateway"]["ports"]["http"] == gateway.http_port
    assert chart["gateway"]["ports"]["metrics"] == gateway.metrics_port
    assert chart["triton"]["ports"] == {"http": stack.triton_http_port, "grpc": stack.triton_grpc_port,
                                        "metrics": stack.triton_metrics_port}
    assert chart["gateway"]["shutdownGraceSeconds"] == gateway.shutdown_grace_s


def test_every_samserve_variable_is_a_setting(rendered):
    gateway_fields = {f"SAMSERVE_{name.upper()}" for name in GatewaySettings.model_fields}
    build_fields = {f"SAMSERVE_{name.upper()}" for name in BuildSettings.model_fields}
    for result in rendered.values():
        for _, pod in result.pod_templates():
            for container in containers(pod):
                names = {n for n in env_of(container) if n.startswith("SAMSERVE_") and
                         not n.startswith("SAMSERVE_CLIENT_")}
                allowed = gateway_fields if container["name"] == "gateway" else build_fields
                assert names <= allowed, (result.profile, container["name"], names - allowed)


def test_gateway_probes_use_its_ports(rendered):
    for result in rendered.values():
        _, gateway = gateway_container(result)
        env = env_of(gateway)
        grpc_probe = gateway["readinessProbe"]["grpc"]
        assert grpc_probe["service"] == "samserve.v1.SegmentAnything"
        if "SAMSERVE_TLS_CERT_FILE" in env:     # TLS on the API port: probes on the plaintext health port
            assert str(grpc_probe["port"]) == env["SAMSERVE_HEALTH_PORT"], result.profile
        else:
            assert str(grpc_probe["port"]) == env["SAMSERVE_GATEWAY_PORT"], result.profile
        ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
        assert str(ports["grpc"]) == env["SAMSERVE_GATEWAY_PORT"]
        assert str(ports["http"]) == env["SAMSERVE_HTTP_PORT"]
        assert str(ports["metrics"]) == env["SAMSERVE_METRICS_PORT"]
        assert env["SAMSERVE_GATEWAY_HOST"] == "0.0.0.0"
        # Liveness does not depend on Triton (its health reflects Triton's models).
        assert "grpc" not in gateway["livenessProbe"]


def test_sidecar_uses_shared_memory_and_the_deployment_grpc(rendered):
    for result in rendered.values():
        mode = values(result.profile)["gateway"]["mode"]
        pod, gateway = gateway_container(result)
        env = env_of(gateway)
        names = [c["name"] for c in pod["spec"]["containers"]]
        dshm = [v for v in pod["spec"]["volumes"] if v["name"] == "dshm"]
        if mode == "sidecar":
            assert names == ["triton", "gateway"], names
            assert env["SAMSERVE_EMBEDDING_TRANSPORT"] == "shm"
            assert env["SAMSERVE_TRITON_HOST"] == "127.0.0.1"
            assert dshm and dshm[0]["emptyDir"]["medium"] == "Memory"
            for container in pod["spec"]["containers"]:
                assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"], container["name"]
        else:
            assert mode == "deployment" and names == ["gateway"], (mode, names)
            assert env["SAMSERVE_EMBEDDING_TRANSPORT"] == "grpc"
            # Every Triton pod by DNS (a headless Service), so the gateways balance over all of them.
            headless = result.named("Service", "triton-headless")
            assert env["SAMSERVE_TRITON_HOST"] == f"dns:///{headless['metadata']['name']}"
            assert headless["spec"]["clusterIP"] == "None"
            assert [p["port"] for p in headless["spec"]["ports"]] == [int(env["SAMSERVE_TRITON_GRPC_PORT"])]
            labels = result.named("Deployment", "triton")["spec"]["template"]["metadata"]["labels"]
            assert headless["spec"]["selector"].items() <= labels.items()
            assert not dshm


def test_sidecar_gateways_hand_the_served_decoder_to_browsers(rendered):
    """The web page decodes in the browser with the served decoder (`samserve up` offers the repository's): a
    sidecar beside the model volume mounts it read-only and names its decoder folder; without the volume, none."""
    for result in rendered.values():
        chart = values(result.profile)
        pod, gateway = gateway_container(result)
        env = env_of(gateway)
        has_volume = any(v["name"] == "models" for v in pod["spec"]["volumes"])
        if chart["gateway"]["mode"] == "sidecar" and has_volume:
            assert env["SAMSERVE_CLIENT_DECODER_DIR"] == "/models/repository/sam_decoder/1", result.profile
            assert {"name": "models", "mountPath": "/models", "readOnly": True} in gateway["volumeMounts"]
        else:
            assert "SAMSERVE_CLIENT_DECODER_DIR" not in env, result.profile
            assert not [m for m in gateway["volumeMounts"] if m["name"] == "models"], result.profile


def test_triton_pods(rendered):
    for result in rendered.values():
        chart = values(result.profile)
        deployment = result.named("Deployment", "triton")
        pod = deployment["spec"]["template"]["spec"]
        (triton,) = [c for c in pod["containers"] if c["name"] == "triton"]
        assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        startup = triton["startupProbe"]
        assert startup["httpGet"]["path"] == "/v2/health/ready"
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model loading takes minutes"
        exit_timeout = int(next(a for a in triton["args"] if a.startswith("--exit-timeout-secs=")).split("=")[1])
        drain = triton.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert pod["terminationGracePeriodSeconds"] > exit_timeout + drain
        if chart["gateway"]["mode"] == "sidecar":
            assert drain > chart["gateway"]["shutdownGraceSeconds"]
        gpus = chart["triton"]["gpu"]["count"]
        resource = chart["triton"]["gpu"]["resource"]
        # A GPU target gets GPUs, a CPU target none; gpu-torch runs the image built with SAMSERVE_EXTRAS=gpu.
        assert bool(gpus) == chart["servingTarget"].startswith("gpu-"), result.profile
        if gpus:
            assert triton["resources"]["requests"][resource] == triton["resources"]["limits"][resource] == gpus
            suffix = {"gpu-torch": f"-{chart['tritonRelease']}-torch", "gpu-tensorrt": f"-{chart['tritonRelease']}"}
            assert triton["image"].endswith(f":0.1.0{suffix[chart['servingTarget']]}"), triton["image"]
        else:
            assert resource not in triton["resources"]["requests"] and triton["image"].endswith("-cpu")
        assert pod.get("nodeSelector", {}) == chart["triton"]["nodeSelector"]
        assert pod.get("tolerations", []) == chart["triton"]["tolerations"]
        repository = next(a for a in triton["args"] if a.startswith("--model-repository="))
        if chart["modelRepository"]["source"] == "url":
            assert repository == f"--model-repository={chart['modelRepository']['url']}"


def test_every_pod_is_non_root_with_a_read_only_root(rendered):
    for result in rendered.values():
        for workload, pod in result.pod_templates():
            assert pod["spec"]["securityContext"]["runAsNonRoot"] is True, workload["metadata"]["name"]
            assert pod["spec"]["securityContext"]["runAsUser"] >= 10000
            assert pod["spec"]["automountServiceAccountToken"] is False
            for container in containers(pod):
                context = container["securityContext"]
                assert context["readOnlyRootFilesystem"] is True, (result.profile, container["name"])
                assert context["allowPrivilegeEscalation"] is False
                assert context["capabilities"]["drop"] == ["ALL"]
                assert container["resources"]["requests"] and container["resources"]["limits"]


def test_hpa_and_keda_are_never_rendered_together(rendered):
    for result in rendered.values():
        mode = values(result.profile)["autoscaling"]["mode"]
        hpas, scaled = result.of_kind("HorizontalPodAutoscaler"), result.of_kind("ScaledObject")
        assert not (hpas and scaled), result.profile
        assert bool(hpas) == (mode == "hpa") and bool(scaled) == (mode == "keda"), result.profile
        # A scaled Deployment leaves its replica count to the autoscaler.
        for target in [h["spec"]["scaleTargetRef"]["name"] for h in hpas + scaled]:
            (deployment,) = [d for d in result.of_kind("Deployment") if d["metadata"]["name"] == target]
            assert "replicas" not in deployment["spec"], target
    assert {"hpa", "keda"} <= {values(p)["autoscaling"]["mode"] for p in rendered}
    result = helm_template(sets=("autoscaling.mode=both",), check=False)
    assert result.returncode != 0 and "/autoscaling/mode" in result.stderr, result.stderr


def test_hpa_metrics_are_served_by_the_adapter_rules(rendered):
    for result in rendered.values():
        hpas = result.of_kind("HorizontalPodAutoscaler")
        if not hpas:
            continue
        adapter = yaml.safe_load(result.named("ConfigMap", "prometheus-adapter")["data"]["config.yaml"])
        served = {rule["name"]["as"] for rule in adapter["rules"]}
        assert {"samserve_encoder_queue_seconds_per_request", "samserve_inflight_requests"} == served
        series = " ".join(rule["metricsQuery"] for rule in adapter["rules"])
        for metric in ("nv_inference_queue_duration_us", "nv_inference_request_success", "samserve_inflight_requests"):
            assert metric in series
        for hpa in hpas:
            for metric in hpa["spec"]["metrics"]:
                assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in served


def test_network_policies_select_every_pod(rendered):
    for result in rendered.values():
        policies = [p["spec"]["podSelector"]["matchLabels"] for p in result.of_kind("NetworkPolicy")]
        for workload, pod in result.pod_templates():
            labels = pod["metadata"]["labels"]
            assert any(all(labels.get(k) == v for k, v in selector.items()) for selector in policies), \
                (result.profile, workload["metadata"]["name"])


def test_triton_is_reached_only_by_gateways(rendered):
    result = rendered["separate-gateway"]
    policy = result.named("NetworkPolicy", "triton")
    grpc_rule = next(r for r in policy["spec"]["ingress"] if {"port": 8001, "protocol": "TCP"} in r["ports"])
    assert grpc_rule["from"] == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "samserve", "app.kubernetes.io/instance": "r",
        "app.kubernetes.io/component": "gateway"}}}]
    # With sidecars Triton's gRPC port is not open to any other pod.
    sidecar = rendered["default"].named("NetworkPolicy", "gateway")
    opened = {p["port"] for rule in sidecar["spec"]["ingress"] for p in rule["ports"]}
    assert 8001 not in opened and 8000 not in opened


def test_headless_service_for_client_side_round_robin(rendered):
    for result in rendered.values():
        headless = result.named("Service", "headless")
        assert headless["spec"]["clusterIP"] == "None"
        _, gateway = gateway_container(result)
        pod, _ = gateway_container(result)
        assert all(pod["metadata"]["labels"].get(k) == v for k, v in headless["spec"]["selector"].items())
    locust = rendered["keda"].named("Deployment", "locust-master")["spec"]["template"]["spec"]["containers"][0]
    host = locust["args"][locust["args"].index("--host") + 1]
    assert host == "dns:///r-samserve-headless.samserve.svc.cluster.local:50051"


def test_redis_modes(rendered):
    for result in rendered.values():
        chart = values(result.profile)
        _, gateway = gateway_container(result)
        env = env_of(gateway)
        mode = chart["redis"]["mode"]
        statefulsets = result.of_kind("StatefulSet")
        assert bool(statefulsets) == (mode == "standalone"), result.profile
        if mode == "standalone":
            assert env["SAMSERVE_REDIS_URL"].endswith("r-samserve-redis:6379/0")
        else:
            assert env["SAMSERVE_REDIS_URL"] == chart["redis"]["url"]
        assert env["SAMSERVE_REDIS_CLUSTER"] == ("true" if mode == "cluster" else "false")
        assert ("SAMSERVE_REDIS_TLS_CA_FILE" in env) == chart["redis"]["tls"]["enabled"]
        assert env["SAMSERVE_REDIS_URL"].startswith("rediss://" if chart["redis"]["tls"]["enabled"] else "redis://")
        mounts = {m["mountPath"] for m in gateway["volumeMounts"]}
        if "SAMSERVE_REDIS_PASSWORD_FILE" in env:
            assert os.path.dirname(env["SAMSERVE_REDIS_PASSWORD_FILE"]) in mounts


def test_model_delivery(rendered):
    for result in rendered.values():
        chart = values(result.profile)
        job = result.job("prepare")
        triton = result.named("Deployment", "triton")["spec"]["template"]["spec"]
        init = [c["name"] for c in triton.get("initContainers", [])]
        mode = chart["prepare"]["mode"]
        assert (job is not None) == (mode == "job"), result.profile
        assert init == {"initContainer": ["prepare"], "job": ["wait-for-repository"], "none": []}[mode]
        for prepare in [c for c in triton.get("initContainers", []) if c["name"] == "prepare"] + [
                j["spec"]["template"]["spec"]["containers"][0] for j in [job] if j is not None]:
            env = env_of(prepare)
            assert env["SAMSERVE_WORKDIR"] == "/models"
            assert env["SAMSERVE_MODEL_VARIANT"] == chart["prepare"]["modelVariant"]
            assert env["SAMSERVE_TARGET"] == chart["servingTarget"]
            if chart["prepare"]["checkpoint"]:
                assert env["SAMSERVE_CHECKPOINT"] == f"/checkpoints/{chart['prepare']['checkpoint']}"


def test_tensorrt_job_matches_the_triton_release(rendered):
    result = rendered["gpu-tensorrt"]
    job = result.job("tensorrt-engines")
    assert job is not None
    (container,) = job["spec"]["template"]["spec"]["containers"]
    release = values("gpu-tensorrt")["tritonRelease"]
    assert container["image"] == f"nvcr.io/nvidia/tensorrt:{release}-py3"
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert "bash /models/repository/build_engines.sh /models/repository" in container["args"][0]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["TRTEXEC"] == values("gpu-tensorrt")["tensorrtEngines"]["trtexec"]
    prepare_job = result.job("prepare")
    assert prepare_job is not None
    prepare = next(c for c in prepare_job["spec"]["template"]["spec"]["containers"])
    prepare_env = {item["name"]: item["value"] for item in prepare["env"]}
    assert prepare_env["SAMSERVE_TENSORRT_MAJOR"] == str(values("gpu-tensorrt")["tensorrtEngines"]["tensorrtMajor"])
    triton = result.named("Deployment", "triton")["spec"]["template"]["spec"]
    wait = next(c for c in triton["initContainers"] if c["name"] == "wait-for-repository")
    assert "--tensorrt-version=10.7.0" in wait["args"]  # Triton starts once plans of its TensorRT are recorded
    assert env["EXPECTED_TENSORRT_VERSION"] == "10.7.0"     # and the Job builds no others
    assert env["EXPECTED_COMPUTE_CAPABILITY"] == values("gpu-tensorrt")["tensorrtEngines"]["computeCapability"]
    assert not [r for r in rendered.values() if r.profile != "gpu-tensorrt" and r.job("tensorrt-engines")]


def test_every_value_is_commented():
    """Each key of values.yaml has a comment on a line above it within its block (or its parent's)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    uncommented = []
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- ") or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        above = [line_above for line_above in lines[max(0, index - 12):index] if line_above.strip()]
        commented = any(a.strip().startswith("#") and len(a) - len(a.lstrip()) <= indent + 2 for a in above[-6:])
        if not commented:
            uncommented.append(f"{index + 1}: {line}")
    assert not uncommented, "\n".join(uncommented)


def test_profiles_are_all_listed():
    assert {p.stem for p in PROFILES_DIR.glob("*.yaml")} >= REQUIRED_PROFILES
    assert set(profiles()) == {"default"} | {p.stem for p in PROFILES_DIR.glob("*.yaml")}


# --- Renders beyond the profiles: each test below fails on the chart as the outside review found it. ---

def profile(name: str) -> Path:
    return PROFILES_DIR / f"{name}.yaml"


def rendered_with(*files: str | Path, sets: tuple[str, ...] = (), **options: Any) -> Rendered:
    """The chart rendered with values files and --set assignments (helm_template's options), parsed."""
    return Rendered("custom", Path(), documents(helm_template(*files, sets=sets, **options).stdout))


def refusal(*files: str | Path, sets: tuple[str, ...] = ()) -> str:
    """helm template's error message for values that must not render."""
    result = helm_template(*files, sets=sets, check=False)
    assert result.returncode != 0, f"rendered although it must not: {files} {sets}"
    return result.stderr


def pod_volumes(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {volume["name"]: volume for volume in pod["spec"].get("volumes", [])}


def named_container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    (container,) = [c for c in containers(pod) if c["name"] == name]
    return container


CLAIM_LABEL = "samserve.dev/models-claim"
CLAIM = f"{RELEASE}-samserve-models"


def claim_pods(result: Rendered) -> dict[str, dict[str, Any]]:
    """Workload name -> pod template of every pod that mounts the chart's model claim."""
    return {workload["metadata"]["name"]: pod for workload, pod in result.pod_templates()
            if any(v.get("persistentVolumeClaim", {}).get("claimName") == CLAIM for v in pod_volumes(pod).values())}


def test_a_read_write_once_claim_keeps_every_pod_that_mounts_it_on_its_node(rendered):
    """ReadWriteOnce attaches to one node: a surge pod or a Job on another node would hang on Multi-Attach."""
    default = rendered["default"]
    assert default.named("PersistentVolumeClaim", "models")["spec"]["accessModes"] == ["ReadWriteOnce"]
    triton = default.named("Deployment", "triton")
    assert triton["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    assert "topologySpreadConstraints" not in triton["spec"]["template"]["spec"]
    # With both Jobs as well (Triton kept on one node explicitly): all of them follow the claim's other pods.
    engines = rendered_with(profile("gpu-tensorrt"), sets=("modelRepository.pvc.accessModes={ReadWriteOnce}",
                                                          "triton.topologySpread.enabled=false"))
    for result in (default, engines):
        users = claim_pods(result)
        assert f"{RELEASE}-samserve-triton" in users
        for name, pod in users.items():
            assert pod["metadata"]["labels"][CLAIM_LABEL] == CLAIM, name
            (term,) = pod["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            assert term == {"topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {CLAIM_LABEL: CLAIM}}}, name
    assert {pod["metadata"]["labels"]["app.kubernetes.io/component"] for pod in claim_pods(engines).values()} == {
        "triton", "prepare", "tensorrt-engines"}


def test_a_read_write_once_claim_refuses_pods_spread_over_nodes():
    for assignment in ("triton.replicas=3", "autoscaling.mode=hpa"):
        message = refusal(sets=(assignment,))
        assert "ReadWriteOnce" in message and "ReadWriteMany" in message and "topologySpread" in message
    together = rendered_with(sets=("triton.replicas=3", "triton.topologySpread.enabled=false"))
    assert together.named("Deployment", "triton")["spec"]["replicas"] == 3
    assert "ReadWriteOncePod" in refusal(sets=("modelRepository.pvc.accessModes={ReadWriteOncePod}",))
    assert "podAffinity" in refusal(sets=("triton.affinity.podAffinity.x=1",))


def test_a_read_write_many_claim_surges_and_spreads(rendered):
    for name in ("cpu", "gpu-torch", "gpu-tensorrt", "separate-gateway", "keda"):
        assert "ReadWriteMany" in values(name)["modelRepository"]["pvc"]["accessModes"], name
        triton = rendered[name].named("Deployment", "triton")
        assert triton["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}, name
        pod = triton["spec"]["template"]["spec"]
        assert pod["topologySpreadConstraints"] and "podAffinity" not in pod.get("affinity", {}), name


JOB_NAME = re.compile(r"^(?P<base>.+-(prepare|tensorrt-engines))-(?P<hash>[0-9a-f]{10})$")


def engine_job_names(*sets: str) -> dict[str, str]:
    result = rendered_with(profile("gpu-tensorrt"), sets=sets)
    names = {}
    for component in ("prepare", "tensorrt-engines"):
        job = result.job(component)
        assert job is not None, component
        names[component] = job["metadata"]["name"]
    return names


def test_jobs_are_named_by_their_pod_templates():
    """A Job's pod template is immutable: an upgrade that changes it needs a new Job, one that does not the same."""
    names = engine_job_names()
    assert all(JOB_NAME.match(name) for name in names.values()), names
    assert engine_job_names() == names
    exported = engine_job_names("prepare.modelVariant=vit_l")
    assert exported["prepare"] != names["prepare"] and exported["tensorrt-engines"] == names["tensorrt-engines"]
    bumped = engine_job_names("tritonRelease=25.01", "tensorrtEngines.tensorrtVersions.25\\.01=10.8.0")
    assert bumped["tensorrt-engines"] != names["tensorrt-engines"] and bumped["prepare"] == names["prepare"]
    long_release = run([tool("helm"), "template", "r" * 53, str(CHART), "-n", NAMESPACE, "-f",
                        str(profile("gpu-tensorrt"))]).stdout
    for job in [d for d in documents(long_release) if d["kind"] == "Job"]:
        name = job["metadata"]["name"]
        assert len(name) <= 63 and re.search(r"-[0-9a-f]{10}$", name), name


TINY = model_spec.ModelMetadata(
    model_id="tiny-test", variant="tiny", weights_sha256="0" * 64, image_size=64, embedding_shape=(8, 4, 4),
    low_res_mask_size=(16, 16), num_mask_tokens=4, mask_threshold=0.0, pixel_mean=(123.675, 116.28, 103.53),
    pixel_std=(58.395, 57.12, 57.375), preprocessing_version=1, exporter_version="test")
MODELS = (model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL)
FAKE_TRTEXEC = """#!/usr/bin/env bash
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v${FAKE_TENSORRT:-100700}] # trtexec $*"
for arg in "$@"; do
  case "$arg" in --saveEngine=*)
    echo plan > "${arg#--saveEngine=}"
    if [ -n "${FAKE_BUILD_FAILS:-}" ]; then exit 1; fi ;;
  esac
done
"""
FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
case "$*" in *compute_cap*) echo "${FAKE_CC:-9.0}" ;; *name*) echo "NVIDIA H100 80GB HBM3" ;; esac
"""


class EngineRepository:
    """A gpu-tensorrt repository's configs and build_engines.sh, with trtexec and nvidia-smi stand-ins."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "repository"
        for model in MODELS:
            (self.path / model / "1").mkdir(parents=True)
            (self.path / model / "config.pbtxt").write_text(
                f'name: "{model}"\nplatform: "tensorrt_plan"\nmax_batch_size: 8\n')
        tensorrt.write_script(self.path, TINY, "encoder.fp16.onnx", "decoder.batched.onnx", 10)
        tools = folder / "tools"
        tools.mkdir()
        for name, text in (("trtexec", FAKE_TRTEXEC), ("nvidia-smi", FAKE_NVIDIA_SMI)):
            (tools / name).write_text(text)
            (tools / name).chmod(0o755)
        self.env = {**os.environ, "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}"}

    def build(self, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(self.path / tensorrt.SCRIPT_FILE), str(self.path)], env={**self.env, **env},
                              capture_output=True, text=True, timeout=60)

    def records(self, model: str) -> dict[str, model_spec.EngineRecord]:
        config = text_format.Parse((self.path / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        return {key: model_spec.EngineRecord.from_json(p.string_value) for key, p in config.parameters.items()
                if key.startswith(model_spec.ENGINE_PARAMETER_PREFIX)}

    def plan(self, model: str, plan: str = "model_cc90.plan") -> Path:
        return self.path / model / "1" / plan


def test_the_engine_script_drops_a_record_with_its_plan(tmp_path):
    repository = EngineRepository(tmp_path)
    built = repository.build()
    assert built.returncode == 0, built.stderr
    for model in MODELS:
        assert repository.records(model)["samserve_engine_cc90"].tensorrt_version == "10.7.0"
        assert repository.plan(model).is_file()
    failed = repository.build(FAKE_TENSORRT="100800", FAKE_BUILD_FAILS="1")   # a new TensorRT whose build fails
    assert failed.returncode != 0
    encoder = model_spec.ENCODER_MODEL
    assert not repository.records(encoder) and not repository.plan(encoder).exists()   # neither the old nor a part
    # What the chart's Job expects is checked before anything is touched.
    assert repository.build().returncode == 0
    for env, message in (({"EXPECTED_TENSORRT_VERSION": "10.8"}, "expected TensorRT 10.8"),
                         ({"EXPECTED_COMPUTE_CAPABILITY": "8.0"}, "expected compute capability 8.0")):
        refused = repository.build(**env)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
        assert repository.records(encoder) and repository.plan(encoder).is_file()
    assert repository.build(EXPECTED_TENSORRT_VERSION="10.7", EXPECTED_COMPUTE_CAPABILITY="9.0").returncode == 0


def wait_step(result: Rendered) -> list[str]:
    """The wait-for-repository init container's arguments: the script and its options."""
    wait = named_container(result.named("Deployment", "triton")["spec"]["template"], "wait-for-repository")
    assert wait["command"] == ["/opt/samserve/bin/python", "-c"]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in wait["volumeMounts"]
    assert "--repository=/models/repository" in wait["args"]
    return wait["args"]


def ready(step: list[str], repository: Path) -> subprocess.CompletedProcess[str]:
    """The rendered wait step checking ``repository`` once (here, with this interpreter)."""
    script, *options = step
    options = [o for o in options if not o.startswith("--repository=")]
    return subprocess.run([sys.executable, "-c", script, *options, f"--repository={repository}", "--once"],
                          capture_output=True, text=True, timeout=60)


def test_triton_waits_for_plans_of_its_tensorrt_and_gpu(rendered, tmp_path):
    repository = EngineRepository(tmp_path)
    assert "--compute-capability=9.0" in wait_step(rendered["gpu-tensorrt"])     # the profile's H100 pool
    engines = wait_step(rendered_with(profile("gpu-tensorrt"), sets=("tensorrtEngines.computeCapability=",)))
    assert "--tensorrt-version=10.7.0" in engines
    assert not any(o.startswith("--compute-capability") for o in engines)
    waiting = ready(engines, repository.path)       # configs without records: the engine Job has not run
    assert waiting.returncode == 1 and "recorded: none" in waiting.stdout, waiting.stdout
    assert ready(engines, tmp_path / "empty").returncode == 1
    assert repository.build().returncode == 0
    assert ready(engines, repository.path).returncode == 0
    repository.plan(model_spec.DECODER_MODEL).unlink()              # a record without its plan is not enough
    assert ready(engines, repository.path).returncode == 1
    assert repository.build().returncode == 0
    # tritonRelease bumped: the plans on the claim are stale until the engine Job rebuilt them.
    bumped = wait_step(rendered_with(profile("gpu-tensorrt"), sets=(
        "tritonRelease=25.01", "tensorrtEngines.tensorrtVersions.25\\.01=10.8.0")))
    stale = ready(bumped, repository.path)
    assert stale.returncode == 1 and "TensorRT 10.8.0" in stale.stdout and "TensorRT 10.7.0, cc 9.0" in stale.stdout
    assert repository.build(FAKE_TENSORRT="100800", EXPECTED_TENSORRT_VERSION="10.8.0").returncode == 0
    assert ready(bumped, repository.path).returncode == 0
    assert ready(engines, repository.path).returncode == 1          # and the old release's pods would not start
    # The node pool's compute capability: a plan built on another GPU kind does not count.
    for capability, expected in (("8.0", 1), ("9.0", 0)):
        step = wait_step(rendered_with(profile("gpu-tensorrt"), sets=(
            "tritonRelease=25.01", "tensorrtEngines.tensorrtVersions.25\\.01=10.8.0",
            f"tensorrtEngines.computeCapability={capability}")))
        assert f"--compute-capability={capability}" in step
        assert ready(step, repository.path).returncode == expected, capability
    # Without engines (gpu-torch's prepare Job) the configs are enough.
    assert ready(wait_step(rendered["gpu-torch"]), repository.path).returncode == 0


def test_a_triton_release_needs_its_tensorrt_version():
    message = refusal(profile("gpu-tensorrt"), sets=("tritonRelease=25.01",))
    assert 'tensorrtEngines.tensorrtVersions has no entry for tritonRelease "25.01"' in message
    assert "tensorrtMajor=10" in refusal(profile("gpu-tensorrt"), sets=(
        "tritonRelease=25.01", "tensorrtEngines.tensorrtVersions.25\\.01=11.0.0"))
    assert rendered_with(profile("gpu-torch"), sets=("tritonRelease=25.01",)).of_kind("Deployment")  # no engines


def test_an_object_storage_repository_downloads_into_a_volume_of_its_size(rendered):
    chart = values("object-storage")["modelRepository"]
    for name, size in (("object-storage", chart["downloadSizeLimit"]), ("default", "1Gi")):
        pod = rendered[name].named("Deployment", "triton")["spec"]["template"]
        (tmp,) = [m for m in named_container(pod, "triton")["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert pod_volumes(pod)[tmp["name"]]["emptyDir"]["sizeLimit"] == size, name
    defaults = values("default")["modelRepository"]
    assert defaults["downloadSizeLimit"] == defaults["pvc"]["size"]


@pytest.mark.parametrize("assignment", ["gateway.mode=Sidecar", "redis.mode=externl", "prepare.mode=Job",
                                        "servingTarget=gpu-tensort", "autoscaling.mode=HPA",
                                        "modelRepository.source=s3", "gateway.maxConectionAgeSeconds=60",
                                        "tensorrtEngines.computeCapability=sm90"])
def test_the_values_schema_refuses_typos(assignment):
    message = refusal(sets=(assignment,))
    assert "schema" in message and assignment.split("=")[0].split(".")[-1] in message, message


def test_the_values_schema_is_draft_7_and_takes_every_profile():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    for name in profiles():
        errors = [error.message for error in jsonschema.Draft7Validator(schema).iter_errors(values(name))]
        assert not errors, (name, errors)


def test_gpu_targets_need_gpus_and_cpu_targets_none():
    for target in ("gpu-torch", "gpu-tensorrt"):
        assert f"servingTarget={target} runs on GPUs: set triton.gpu.count >= 1" in refusal(
            sets=(f"servingTarget={target}",))
    assert "servingTarget=cpu-onnxruntime runs on CPUs" in refusal(sets=("triton.gpu.count=1",))
    torch = rendered_with(sets=("servingTarget=gpu-torch", "triton.gpu.count=1"))
    image = named_container(torch.named("Deployment", "triton")["spec"]["template"], "triton")["image"]
    assert image == "samserve-triton:0.1.0-24.12-torch"


def test_gateways_close_connections_so_that_clients_find_new_pods(rendered):
    defaults = values("default")["gateway"]
    assert (defaults["maxConnectionAgeSeconds"], defaults["maxConnectionAgeGraceSeconds"]) == (300, 30)
    for result in rendered.values():
        chart = values(result.profile)["gateway"]
        env = env_of(gateway_container(result)[1])
        assert float(env["SAMSERVE_MAX_CONNECTION_AGE_S"]) == chart["maxConnectionAgeSeconds"]
        assert float(env["SAMSERVE_MAX_CONNECTION_AGE_GRACE_S"]) == chart["maxConnectionAgeGraceSeconds"]
        headless = [s for s in result.of_kind("Service") if s["metadata"]["name"].endswith("-triton-headless")]
        assert bool(headless) == (chart["mode"] == "deployment"), result.profile


def ingress_annotations(*sets: str) -> dict[str, str]:
    (ingress,) = rendered_with(sets=("ingress.enabled=true", *sets)).of_kind("Ingress")
    return cast(dict[str, str], ingress["metadata"]["annotations"])


def test_the_ingress_takes_the_gateways_bodies_and_hashes_only_when_asked(rendered):
    annotations = ingress_annotations()
    assert "nginx.ingress.kubernetes.io/upstream-hash-by" not in annotations
    assert "nginx.ingress.kubernetes.io/backend-protocol" not in annotations
    settings = GatewaySettings()
    assert values("default")["gateway"]["maxRequestBytes"] == settings.max_request_bytes
    assert env_of(gateway_container(rendered["default"])[1])["SAMSERVE_MAX_REQUEST_BYTES"] == str(
        settings.max_request_bytes)
    limit = Transcoder(cast(Any, None), settings.max_request_bytes).body_limit    # the gateway's HTTP body limit
    size = annotations["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert size.endswith("m") and limit <= int(size[:-1]) << 20 < limit + (1 << 20), size
    assert ingress_annotations("gateway.tls.enabled=true", "gateway.tls.secretName=gateway-tls")[
        "nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"
    assert ingress_annotations("ingress.upstreamHashBy=$request_uri")[
        "nginx.ingress.kubernetes.io/upstream-hash-by"] == "$request_uri"
    assert ingress_annotations("ingress.proxyBodySize=64m")["nginx.ingress.kubernetes.io/proxy-body-size"] == "64m"


def test_the_redis_password_is_never_on_a_command_line(rendered):
    for result in rendered.values():
        assert not result.of_kind("Secret"), result.profile     # the chart generates no password
        for _, pod in result.pod_templates():
            for container in containers(pod):
                words = [*container.get("command", []), *container.get("args", [])]
                assert not any(re.search(r"(^|\s)--requirepass", word) for word in words), container["name"]
                if container["name"] == "redis":
                    assert not [e for e in container.get("env", []) if "valueFrom" in e]
    config = rendered["default"].named("ConfigMap", "redis")["data"]["redis.conf"]
    assert "requirepass" not in config and "include /run/redis/auth.conf" in config.splitlines()
    assert "redis.auth.existingSecret is required" in refusal(sets=("redis.auth.existingSecret=",))


def test_redis_writes_requirepass_from_the_secret_file(rendered, tmp_path):
    pod = rendered["default"].named("StatefulSet", "redis")["spec"]["template"]
    redis = named_container(pod, "redis")
    mounts = {m["name"]: m["mountPath"] for m in redis["volumeMounts"]}
    volumes = pod_volumes(pod)
    assert volumes["secret"]["secret"]["secretName"] == values("default")["redis"]["auth"]["existingSecret"]
    assert volumes["auth"]["emptyDir"]["medium"] == "Memory"
    assert redis["command"] == ["/bin/sh", "-ec"]
    (script,) = redis["args"]
    start = f"exec redis-server {mounts['config']}/redis.conf"
    assert start in script
    # Run here: the mounts moved into tmp_path, Redis itself left out.
    (tmp_path / "secret").mkdir()
    (tmp_path / "run").mkdir()
    local = script.replace(mounts["secret"], str(tmp_path / "secret")).replace(
        mounts["auth"], str(tmp_path / "run")).replace(start, "true")
    written = tmp_path / "run" / "auth.conf"
    for password, works in (("3f9a0c-Kx.~+/=", True), ("two words", False), ("", False)):
        written.unlink(missing_ok=True)
        (tmp_path / "secret" / "password").write_text(password)
        result = subprocess.run(["/bin/sh", "-ec", local], capture_output=True, text=True, timeout=30)
        assert (result.returncode == 0) == works, (password, result.stderr)
        if works:
            assert written.read_text() == f"requirepass {password}\n" and written.stat().st_mode & 0o077 == 0
        else:
            assert not written.exists()


def test_two_renders_are_identical():
    """What GitOps tools compare: nothing random, nothing looked up in the cluster."""
    for files in ((), (profile("keda"),), (profile("gpu-tensorrt"),)):
        assert helm_template(*files).stdout == helm_template(*files).stdout, files
    unstable = {"lookup", "now", "uuidv4", "randAlphaNum", "randAlpha", "randNumeric", "randAscii", "randBytes",
                "randInt", "genPrivateKey", "genCA", "genSelfSignedCert", "genSignedCert"}
    for template in [path for path in CHART.glob("templates/**/*") if path.is_file()]:
        functions = {w for action in re.findall(r"\{\{.*?\}\}", template.read_text(), re.S)
                     for w in re.findall(r"\w+", action)}
        assert not functions & unstable, (template, functions & unstable)


def test_operator_resources_render_only_where_the_cluster_serves_them():
    bare = rendered_with(api_versions=())
    assert not bare.of_kind("ServiceMonitor") and not bare.of_kind("PrometheusRule")
    monitors = rendered_with(api_versions=("monitoring.coreos.com/v1/ServiceMonitor",))
    assert len(monitors.of_kind("ServiceMonitor")) == 1 and not monitors.of_kind("PrometheusRule")
    rules = rendered_with(api_versions=("monitoring.coreos.com/v1/PrometheusRule",))
    assert not rules.of_kind("ServiceMonitor") and len(rules.of_kind("PrometheusRule")) == 1
    result = helm_template(profile("keda"), api_versions=(), check=False)
    assert result.returncode != 0 and "--api-versions keda.sh/v1alpha1/ScaledObject" in result.stderr
    assert rendered_with(profile("keda"), api_versions=("keda.sh/v1alpha1/ScaledObject",)).of_kind("ScaledObject")


def triton_selectors(query: str) -> list[str]:
    return re.findall(r"nv_inference_\w+\{([^}]*)\}", query)


def test_triton_scales_on_the_encoder_queue_with_minutes_long_starts_in_mind(rendered):
    behavior = values("default")["autoscaling"]["behavior"]
    # Pods take minutes to start: nothing scales down before 5 minutes, nothing scales up per period under a minute.
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert all(p["periodSeconds"] >= 60 for rules in behavior.values() for p in rules["policies"])
    seen = set()
    for result in rendered.values():
        chart = values(result.profile)["autoscaling"]
        for hpa in result.of_kind("HorizontalPodAutoscaler"):
            assert hpa["spec"]["behavior"] == chart["behavior"]
            seen.add("hpa")
        for scaled in result.of_kind("ScaledObject"):
            assert scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == chart["behavior"]
            queries = [t["metadata"]["query"] for t in scaled["spec"]["triggers"] if "nv_inference" in t[
                "metadata"]["query"]]
            selectors = [s for q in queries for s in triton_selectors(q)]
            assert len(selectors) == 2 and all('model="sam_encoder"' in s for s in selectors), queries
            seen.add("keda")
        if result.of_kind("HorizontalPodAutoscaler"):
            adapter = yaml.safe_load(result.named("ConfigMap", "prometheus-adapter")["data"]["config.yaml"])
            (rule,) = [r for r in adapter["rules"] if r["seriesQuery"].startswith("nv_inference")]
            selectors = triton_selectors(rule["seriesQuery"]) + triton_selectors(rule["metricsQuery"])
            assert len(selectors) == 3 and all('model="sam_encoder"' in s for s in selectors), rule
    assert seen == {"hpa", "keda"}


def test_gateways_leave_the_endpoints_before_they_stop(rendered):
    for result in rendered.values():
        chart = values(result.profile)["gateway"]
        pod, gateway = gateway_container(result)
        assert gateway["lifecycle"]["preStop"]["sleep"]["seconds"] == chart["preStopSeconds"] > 0
        drain = chart["preStopSeconds"] + chart["shutdownGraceSeconds"]
        assert pod["spec"]["terminationGracePeriodSeconds"] > drain, result.profile
        if chart["mode"] == "sidecar":      # Triton serves the gateway's calls until it has drained
            assert named_container(pod, "triton")["lifecycle"]["preStop"]["sleep"]["seconds"] > drain
    _, gateway = gateway_container(rendered_with(sets=("gateway.preStopSeconds=0",)))
    assert "lifecycle" not in gateway       # a sleep of 0 s is invalid before Kubernetes 1.32


def test_notes_tell_how_to_reach_and_check_the_service():
    result = run([tool("helm"), "install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client"])
    notes = result.stdout.split("NOTES:", 1)[1]
    for needle in (f"dns:///{RELEASE}-samserve-headless.{NAMESPACE}.svc.cluster.local:50051",
                   f"port-forward svc/{RELEASE}-samserve", f"helm test {RELEASE}",
                   f"rollout status deployment/{RELEASE}-samserve-triton"):
        assert needle in notes, needle


@pytest.fixture
def health_server() -> Iterator[tuple[health.HealthServicer, int]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(None)


def test_helm_test_checks_the_gateways_health(rendered, health_server):
    for result in rendered.values():
        chart = values(result.profile)["gateway"]
        (pod,) = result.of_kind("Pod")
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        _, gateway = gateway_container(result)
        (check,) = pod["spec"]["containers"]
        assert check["image"] == gateway["image"] and check["command"] == ["/opt/samserve/bin/python", "-c"]
        _, target, service = check["args"]
        assert service == gateway["readinessProbe"]["grpc"]["service"]
        if chart["tls"]["enabled"]:     # the plaintext health port, on the pods themselves
            assert target == f"dns:///{RELEASE}-samserve-headless:{chart['ports']['health']}"
        else:
            assert target == f"{RELEASE}-samserve:{chart['ports']['grpc']}"
    (pod,) = rendered["default"].of_kind("Pod")
    script, _, service = pod["spec"]["containers"][0]["args"]
    servicer, port = health_server

    def health_check() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", script, f"127.0.0.1:{port}", service], capture_output=True,
                              text=True, timeout=60)

    unknown = health_check()
    assert unknown.returncode != 0 and "NOT_FOUND" in unknown.stderr
    servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert health_check().returncode == 1
    servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    serving = health_check()
    assert serving.returncode == 0 and "SERVING" in serving.stdout


def test_model_pods_run_as_the_configured_service_account(rendered):
    assert not [p for _, p in rendered["gpu-tensorrt"].pod_templates() if "serviceAccountName" in p["spec"]]
    annotation = "iam.gke.io/gcp-service-account"
    result = rendered_with(profile("gpu-tensorrt"), sets=(
        "serviceAccount.create=true", f"serviceAccount.annotations.{annotation.replace('.', chr(92) + '.')}=sam@p"))
    (account,) = result.of_kind("ServiceAccount")
    assert account["metadata"]["name"] == f"{RELEASE}-samserve" and account["automountServiceAccountToken"] is False
    assert account["metadata"]["annotations"] == {annotation: "sam@p"}
    users = {pod["metadata"]["labels"]["app.kubernetes.io/component"]: pod for pod in claim_pods(result).values()}
    assert set(users) == {"triton", "prepare", "tensorrt-engines"}
    for pod in users.values():
        assert pod["spec"]["serviceAccountName"] == f"{RELEASE}-samserve"
        assert pod["spec"]["automountServiceAccountToken"] is False
    given = rendered_with(profile("object-storage"), sets=("serviceAccount.name=models-reader",))
    assert not given.of_kind("ServiceAccount")
    triton = given.named("Deployment", "triton")["spec"]["template"]["spec"]
    assert triton["serviceAccountName"] == "models-reader"


def test_only_the_exporting_pod_mounts_the_checkpoints(rendered):
    result = rendered["gpu-torch"]          # the prepare Job exports from the checkpoint claim
    assert "checkpoints" not in pod_volumes(result.named("Deployment", "triton")["spec"]["template"])
    job = result.job("prepare")
    assert job is not None and "checkpoints" in pod_volumes(job["spec"]["template"])
    exporting = rendered_with(profile("gpu-torch"), sets=("prepare.mode=initContainer",))
    pod = exporting.named("Deployment", "triton")["spec"]["template"]
    assert "checkpoints" in pod_volumes(pod)
    assert {"name": "checkpoints", "mountPath": "/checkpoints", "readOnly": True} in named_container(
        pod, "prepare")["volumeMounts"]
