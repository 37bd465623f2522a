"""The chart, rendered for every profile: Kubernetes' schemas (--strict), the custom resources' CRD schemas,
checkov, yamllint, and the properties the design relies on (transports, probes, ports, scaling, policies)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from samserve.settings import GatewaySettings, StackSettings
from samserve_build.settings import BuildSettings
from tests.deploy.conftest import (
    CHART,
    PROFILES_DIR,
    REPO,
    REQUIRED_PROFILES,
    Rendered,
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
    assert locust["data"]["images.py"] + "\n" == (REPO / "tests" / "support" / "images.py").read_text()
    for link in (CHART / "files").iterdir():
        assert link.is_symlink() and link.resolve().is_relative_to(REPO) and link.resolve().exists(), link


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
            triton_service = result.named("Service", "triton")
            assert env["SAMSERVE_TRITON_HOST"] == triton_service["metadata"]["name"]
            assert not dshm


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
        if gpus:
            assert triton["resources"]["requests"][resource] == triton["resources"]["limits"][resource] == gpus
            assert triton["image"].endswith(f"-{chart['tritonRelease']}")
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
    assert result.returncode != 0 and "never both" in result.stderr


def test_hpa_metrics_are_served_by_the_adapter_rules(rendered):
    for result in rendered.values():
        hpas = result.of_kind("HorizontalPodAutoscaler")
        if not hpas:
            continue
        adapter = yaml.safe_load(result.named("ConfigMap", "prometheus-adapter")["data"]["config.yaml"])
        served = {rule["name"]["as"] for rule in adapter["rules"]}
        assert {"samserve_triton_queue_seconds_per_request", "samserve_inflight_requests"} == served
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
        jobs = {j["metadata"]["name"]: j for j in result.of_kind("Job")}
        triton = result.named("Deployment", "triton")["spec"]["template"]["spec"]
        init = [c["name"] for c in triton.get("initContainers", [])]
        mode = chart["prepare"]["mode"]
        assert ("r-samserve-prepare" in jobs) == (mode == "job"), result.profile
        assert init == {"initContainer": ["prepare"], "job": ["wait-for-repository"], "none": []}[mode]
        for prepare in [c for c in triton.get("initContainers", []) if c["name"] == "prepare"] + [
                j["spec"]["template"]["spec"]["containers"][0] for n, j in jobs.items() if n == "r-samserve-prepare"]:
            env = env_of(prepare)
            assert env["SAMSERVE_WORKDIR"] == "/models"
            assert env["SAMSERVE_MODEL_VARIANT"] == chart["prepare"]["modelVariant"]
            assert env["SAMSERVE_TARGET"] == chart["servingTarget"]
            if chart["prepare"]["checkpoint"]:
                assert env["SAMSERVE_CHECKPOINT"] == f"/checkpoints/{chart['prepare']['checkpoint']}"


def test_tensorrt_job_matches_the_triton_release(rendered):
    result = rendered["gpu-tensorrt"]
    job = result.named("Job", "tensorrt-engines")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    release = values("gpu-tensorrt")["tritonRelease"]
    assert container["image"] == f"nvcr.io/nvidia/tensorrt:{release}-py3"
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert "bash /models/repository/build_engines.sh /models/repository" in container["args"][0]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["TRTEXEC"] == values("gpu-tensorrt")["tensorrtEngines"]["trtexec"]
    prepare = next(c for c in result.named("Job", "prepare")["spec"]["template"]["spec"]["containers"])
    prepare_env = {item["name"]: item["value"] for item in prepare["env"]}
    assert prepare_env["SAMSERVE_TENSORRT_MAJOR"] == str(values("gpu-tensorrt")["tensorrtEngines"]["tensorrtMajor"])
    triton = result.named("Deployment", "triton")["spec"]["template"]["spec"]
    wait = next(c for c in triton["initContainers"] if c["name"] == "wait-for-repository")
    assert "engines = True" in wait["args"][0]  # Triton starts once the plans are recorded
    assert not [r for r in rendered.values() if r.profile != "gpu-tensorrt" and r.of_kind("Job") and any(
        j["metadata"]["name"].endswith("tensorrt-engines") for j in r.of_kind("Job"))]


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
