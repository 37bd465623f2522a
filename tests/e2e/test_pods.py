"""The chart's cpu profile, rendered by helm and its pods started from the e2e images by ``podman kube play``
(tools/samserve_dev/kube_play.py says what is translated and why): Redis, then both Triton pods at once (each with its
gateway sidecar, and its prepare init container exporting the shipped model into the shared claim, so the two
prepares race as they would on a ReadWriteMany volume). Then clients use them as they would in a cluster:

- every probe of every container answers as the chart configures it, and each pod was SERVING within its startup
  probe's budget (cold start: container start to SERVING, recorded);
- Embed, Segment and GenerateMasks over gRPC (round robin over both pods, an API key made by ``samserve keys``),
  the HTTP API and the web page through the gateway container;
- the masks equal those of ``samserve-build prepare`` + ``samserve up`` (what ``make up`` runs) on the same image;
- a 60 s Locust run with 0 failures;
- one pod killed under load while the client carries on through the other, then started again (warm start).

Figures go to bench/results/pods_cpu.json.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.common import write_e2e_results
from samserve.client.typed_client import PromptSpec, SamServeClient
from samserve.core.settings import ClientSettings
from samserve_build import scenes
from samserve_dev.browser import (
    DEMO_SCENE,
    DEMO_SCENE_INDEX,
    DEMO_SCENE_SIZE,
    click_image,
    drawn_mask,
    iou,
    launch_chromium,
    wait_state,
)
from samserve_dev.containers import REDIS_IMAGE, ensure_base, podman
from samserve_dev.kube_play import Cluster, PlannedPod, probe
from samserve_dev.local_stack import free_port
from samserve_dev.locust import run_headless
from samserve_dev.polling import wait_until
from tests.deploy.conftest import CHART, NAMESPACE, PROFILES_DIR, RELEASE, tool

IMAGE = DEMO_SCENE.read_bytes()
"""The page's demo scene (a held-out scene of the shipped model's generator): its objects give the prompts."""
OBJECTS = sorted(scenes.generate_scene(scenes.EVAL_SEED_OFFSET + DEMO_SCENE_INDEX, size=DEMO_SCENE_SIZE).instances,
                 key=lambda instance: -instance.area)
POINTS = [scenes.farthest_interior_point(instance.mask) for instance in OBJECTS]


def _box(mask: np.ndarray) -> tuple[float, float, float, float]:
    rows, cols = np.nonzero(mask)
    return float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())


PROMPTS = [PromptSpec(points=[POINTS[0]], labels=[1]), PromptSpec(box=_box(OBJECTS[1].mask), multimask_output=False),
           PromptSpec(points=[POINTS[2], POINTS[0]], labels=[1, 0])]
SERVICE = "samserve.v1.SegmentAnything"
LOCUST_SECONDS = 60
KILL_LOAD_MAX_SECONDS = 240
FIGURES: dict[str, object] = {}


@dataclasses.dataclass
class Release:
    cluster: Cluster
    token: str
    tritons: list[PlannedPod]

    @property
    def target(self) -> str:
        """Every gateway pod, as a headless Service's DNS answer would list them (clients balance round robin)."""
        return "ipv4:///" + ",".join(f"{p.address}:{p.port('gateway', 'grpc')}" for p in self.tritons)

    def client(self) -> SamServeClient:
        return SamServeClient(self.target, timeout_s=120, security=ClientSettings(token=self.token))


def render() -> str:
    """The cpu profile as a platform team renders it; only Redis' image names the local stand-in."""
    redis_repository, redis_tag = REDIS_IMAGE.name.split(":")
    result = subprocess.run([tool("helm"), "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                             "-f", str(PROFILES_DIR / "cpu.yaml"),
                             "--set", f"images.redis.repository={redis_repository}",
                             "--set", f"images.redis.tag={redis_tag}"],
                            capture_output=True, text=True, timeout=120, check=True)
    return result.stdout


def add_api_key(cluster: Cluster, root: Path) -> str:
    """The gateway's keys Secret, made as an operator would: `samserve keys add`, then the file as the Secret."""
    (gateway_env,) = {tuple((e["name"], e.get("value")) for e in p.container("gateway")["env"])
                      for p in cluster.pods_of("triton")}
    assert ("SAMSERVE_AUTH", "api-keys") in gateway_env
    keys = root / "keys.json"
    token = subprocess.run([str(Path(sys.executable).parent / "samserve"), "keys", "add", "--tenant", "e2e",
                            "--file", str(keys)], capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    (secret,) = {v["secret"]["secretName"] for p in cluster.pods for v in p.document["spec"]["volumes"]
                 if v["name"] == "api-keys"}
    cluster.add_secret(secret, {"keys.json": keys.read_bytes()})
    return token


def add_missing_secrets(cluster: Cluster) -> None:
    """Secrets the pods name that the release does not render (Redis' password when an existing Secret is
    expected): made here with a random password, as an operator would."""
    referenced = {v["secret"]["secretName"] for p in cluster.pods for v in p.document["spec"].get("volumes", [])
                  if "secret" in v}
    referenced |= {e["valueFrom"]["secretKeyRef"]["name"] for p in cluster.pods
                   for c in [*p.document["spec"].get("initContainers", []), *p.document["spec"]["containers"]]
                   for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    for name in referenced - set(cluster.secrets):
        assert "redis" in name, f"the release needs Secret {name} that nobody makes"
        cluster.add_secret(name, {"password": os.urandom(16).hex().encode()})


def serving(pod: PlannedPod) -> bool:
    readiness = pod.container("gateway")["readinessProbe"]
    return probe(pod, "gateway", readiness, timeout_s=2)


def start_budget_s(pod: PlannedPod, container: str) -> float:
    startup = pod.container(container)["startupProbe"]
    return float(startup["periodSeconds"] * startup["failureThreshold"])


def wait_serving(cluster: Cluster, pod: PlannedPod, started: float) -> float:
    """Seconds from ``started`` until the pod's gateway says SERVING (within the startup probe's budget)."""
    budget = start_budget_s(pod, "triton")
    deadline = started + budget
    while time.monotonic() < deadline:
        if serving(pod):
            return time.monotonic() - started
        state = podman("pod", "inspect", "--format", "{{.State}}", pod.name, check=False).stdout.strip()
        assert state not in ("Exited", "Dead", "Error"), f"{pod.name} is {state}:\n{cluster.logs(pod)}"
        time.sleep(0.5)
    raise AssertionError(f"{pod.name} not SERVING within its startup budget {budget} s:\n{cluster.logs(pod)}")


@pytest.fixture(scope="module")
def release(built_images, tmp_path_factory) -> Iterator[Release]:
    ensure_base(REDIS_IMAGE)
    root = tmp_path_factory.mktemp("pods")
    cluster = Cluster(render(), root, NAMESPACE)
    cluster.teardown()  # what an interrupted earlier run left
    root.mkdir(parents=True, exist_ok=True)
    token = add_api_key(cluster, root)
    add_missing_secrets(cluster)
    cluster.ensure_network()
    cluster.create_claims()
    try:
        for pod in cluster.pods_of("redis"):
            cluster.play(pod)
            wait_until(lambda pod=pod: probe(pod, "redis", pod.container("redis")["readinessProbe"]), bool,
                       f"{pod.name} ready", timeout_s=60, interval_s=0.2)
        tritons = cluster.pods_of("triton")
        assert len(tritons) == 2, [p.name for p in cluster.pods]
        # Both at once: their prepare init containers fill the one claim concurrently.
        with concurrent.futures.ThreadPoolExecutor(len(tritons)) as pool:
            starts = list(pool.map(cluster.play, tritons))
            serving_after = list(pool.map(lambda pair: wait_serving(cluster, *pair), zip(tritons, starts, strict=True)))
        FIGURES["cold_start_s"] = {p.name: round(s, 1) for p, s in zip(tritons, serving_after, strict=True)}
        yield Release(cluster, token, tritons)
    finally:
        if FIGURES:
            write_e2e_results("pods_cpu.json", {
                "what": "the chart's cpu profile (helm template) played by podman kube play from the e2e images",
                "profile": "deploy/helm/profiles/cpu.yaml", **FIGURES})
        cluster.teardown()


def test_every_probe_answers_as_the_chart_configures_it(release):
    for pod in release.cluster.pods:
        for container in pod.document["spec"]["containers"]:
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                if kind in container:
                    assert probe(pod, container["name"], container[kind]), (pod.name, container["name"], kind)
    for name, seconds in FIGURES["cold_start_s"].items():  # type: ignore[union-attr]
        (pod,) = [p for p in release.tritons if p.name == name]
        assert seconds < start_budget_s(pod, "triton"), (name, seconds)


def test_pods_run_locked_down_as_the_chart_says(release):
    """Each container's first process: uid 65532, no capabilities at all, a read-only root; /dev/shm memory-backed
    where it is mounted (read inside the containers, with the image's Python or the Redis image's shell)."""
    for pod in release.cluster.pods:
        for container in pod.document["spec"]["containers"]:
            name = f"{pod.name}-{container['name']}"
            read_only = podman("inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", name).stdout.strip()
            assert read_only == "true", name
            status = podman("exec", name, "cat", "/proc/1/status", "/proc/mounts").stdout
            fields = dict(line.split(":", 1) for line in status.splitlines() if line.startswith(("Uid", "Cap")))
            assert fields["Uid"].split()[:2] == ["65532", "65532"], (name, fields["Uid"])
            for capability in ("CapPrm", "CapEff", "CapBnd"):
                assert int(fields[capability], 16) == 0, (name, capability, fields[capability])
            mounts = {line.split()[1]: line.split()[2] for line in status.splitlines() if line.count(" ") >= 5}
            if any(m["mountPath"] == "/dev/shm" for m in container.get("volumeMounts", [])):
                assert mounts["/dev/shm"] == "tmpfs", (name, mounts["/dev/shm"])


def test_grpc_embed_segment_and_generate_masks(release):
    client = release.client()
    embedded = client.embed(IMAGE)
    assert (embedded.height, embedded.width) == DEMO_SCENE_SIZE
    answers = client.segment(embedded.image_id, PROMPTS)
    assert len(answers) == len(PROMPTS)
    assert all(a.masks.any() for a in answers), "a prompt on the scene got an empty mask"
    # The shipped model's card thresholds (the page prefills them too).
    everything = client.generate_masks(embedded.image_id, timeout_s=300, pred_iou_thresh=0.2,
                                       stability_score_thresh=0.5)
    assert everything.annotations, "segment everything found no mask on the scene"
    FIGURES["generate_masks_count"] = len(everything.annotations)


def test_http_api_and_page_through_the_gateway(release):
    pod = release.tritons[0]
    base = f"http://{pod.address}:{pod.port('gateway', 'http')}"
    headers = {"authorization": f"Bearer {release.token}"}
    with httpx.Client(base_url=base, timeout=120) as http:
        model = http.get("/v1/model", headers=headers)
        assert model.status_code == 200, model.text
        assert http.get("/v1/model").status_code == 401
        x, y = map(float, POINTS[0])
        body = {"imageBytes": base64.b64encode(IMAGE).decode(),
                "prompts": [{"points": [{"x": x, "y": y, "label": "POINT_LABEL_FOREGROUND"}]}]}
        segment = http.post("/v1/images:segment", json=body, headers=headers)
        assert segment.status_code == 200, segment.text
        assert segment.json()["results"], segment.text
        page = http.get("/")
        assert page.status_code == 200 and "<html" in page.text.lower(), page.text[:300]
        script = http.get("/app.js")
        assert script.status_code == 200 and len(script.content) > 10_000


def test_the_page_from_a_pod_draws_the_servers_mask(release):
    """The web page as a person uses it, in chromium, from a pod's gateway: the key given on the page, the demo
    scene embedded, a click decoded in the browser with the decoder the pod hands out; the drawn mask is the
    server's Segment mask for the same click."""
    pod = release.tritons[0]
    errors: list[str] = []
    with launch_chromium() as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"http://{pod.address}:{pod.port('gateway', 'http')}/")
        wait_state(page, "idle")
        page.click("details summary")
        page.fill("#token", release.token)
        page.press("#token", "Enter")
        page.click("#demo")
        wait_state(page, "ready")
        click_image(page, *POINTS[0])
        drawn = drawn_mask(page)
        token = page.evaluate("window.samserveApp.currentMask()")["token"]
        context.close()
    assert not errors, errors
    (server,) = release.client().segment(IMAGE, [PromptSpec(points=[POINTS[0]], labels=[1])])
    expected = server.masks[server.token_index.index(token)]
    assert drawn.any() and iou(drawn, expected) >= 0.99


@pytest.mark.timeout(900)
def test_masks_equal_those_of_make_up(release, tmp_path):
    """`samserve-build prepare` then `samserve up` on this machine (cpu-onnxruntime, the profile's target; the
    shipped model): the same image and prompts give the same masks and scores."""
    env = dict(os.environ, SAMSERVE_WORKDIR=str(tmp_path), SAMSERVE_MODEL_VARIANT="scenes",
               SAMSERVE_TARGET="cpu-onnxruntime", SAMSERVE_AUTH="off")
    ports = {name: free_port() for name in ("SAMSERVE_TRITON_HTTP_PORT", "SAMSERVE_TRITON_GRPC_PORT",
                                            "SAMSERVE_TRITON_METRICS_PORT", "SAMSERVE_GATEWAY_PORT",
                                            "SAMSERVE_METRICS_PORT", "SAMSERVE_REDIS_SERVER_PORT",
                                            "SAMSERVE_HTTP_PORT")}
    env.update({k: str(v) for k, v in ports.items()})
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "samserve-build"), "prepare"], env=env, check=True, capture_output=True, timeout=600)
    up = subprocess.Popen([str(bin_dir / "samserve"), "up"], env=env, stdout=open(tmp_path / "up.log", "wb"),
                          stderr=subprocess.STDOUT)
    try:
        local = SamServeClient(f"127.0.0.1:{ports['SAMSERVE_GATEWAY_PORT']}", timeout_s=120)

        def answer() -> list | None:
            try:
                return local.segment(IMAGE, PROMPTS)
            except Exception:  # noqa: BLE001 - UNAVAILABLE until Triton's models load
                assert up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
                return None

        expected = wait_until(answer, lambda a: a is not None, "`samserve up` answering", timeout_s=300,
                              interval_s=1)
        got = release.client().segment(IMAGE, PROMPTS)
        for mine, theirs in zip(got, expected, strict=True):
            assert mine.masks.shape == theirs.masks.shape and np.array_equal(mine.masks, theirs.masks)
            np.testing.assert_allclose(mine.predicted_iou, theirs.predicted_iou, atol=1e-5)
        FIGURES["masks_equal_make_up"] = {"prompts": len(PROMPTS),
                                          "mask_pixels": int(sum(a.masks.sum() for a in got))}
    finally:
        up.terminate()
        up.wait(timeout=60)


@pytest.mark.timeout(LOCUST_SECONDS + 300)
def test_locust_against_the_pods_without_failures(release, tmp_path):
    stats = run_headless(release.target, tmp_path, "MixedUser", run_time_s=LOCUST_SECONDS, users=4,
                         SAMSERVE_CLIENT_TOKEN=release.token)
    total = stats["Aggregated"]
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0, total
    FIGURES["locust"] = {"scenario": "MixedUser", "users": 4, "seconds": LOCUST_SECONDS,
                         "requests": int(total["Request Count"]), "failures": int(total["Failure Count"]),
                         "requests_per_s": round(float(total["Requests/s"]), 2),
                         "p50_ms": float(total["50%"]), "p95_ms": float(total["95%"]),
                         "p99_ms": float(total["99%"])}


@pytest.mark.timeout(900)
def test_a_pod_killed_under_load_costs_no_call(release):
    client = release.client()
    image_id = client.embed(IMAGE).image_id
    victim, survivor = release.tritons[1], release.tritons[0]
    done, killed, counting = threading.Event(), threading.Event(), threading.Lock()
    failures: list[str] = []
    calls = {"before": 0, "after": 0}

    def load() -> None:
        deadline = time.monotonic() + KILL_LOAD_MAX_SECONDS
        while not done.is_set() and time.monotonic() < deadline:
            try:
                client.segment(image_id, PROMPTS[:1])
                with counting:
                    calls["after" if killed.is_set() else "before"] += 1
            except Exception as error:  # noqa: BLE001 - every failure is counted and reported
                failures.append(repr(error))

    workers = [threading.Thread(target=load) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        wait_until(lambda: calls["before"], lambda n: n >= 10, "calls before the kill", timeout_s=60, interval_s=0.1)
        killed.set()
        podman("pod", "rm", "--force", "--time", "0", victim.name)  # SIGKILL, no grace: as a lost node
        removed_at = calls["after"]
        wait_until(lambda: calls["after"], lambda n: n >= removed_at + 20, "calls after the pod was gone",
                   timeout_s=120, interval_s=0.1)
    finally:
        done.set()
        for worker in workers:
            worker.join(timeout=180)
    assert not failures, failures[:5]
    assert serving(survivor) and not serving(victim)
    FIGURES["pod_killed_under_load"] = {"calls_before": calls["before"], "calls_after": calls["after"],
                                        "failed": len(failures)}
    # Started again (the claim holds the repository: prepare finds it done).
    FIGURES["warm_start_s"] = round(wait_serving(release.cluster, victim, release.cluster.play(victim)), 1)
