"""Security of the gateway as a client meets it: real `samserve gateway` processes over real gRPC with TLS
(certificates made here by the openssl CLI), mutual TLS, certificate rotation without a restart, API keys with
tenants (UNAUTHENTICATED / PERMISSION_DENIED, revocation, health open), reflection on and off, refused start-ups,
and Triton and Redis listening on loopback only.

Most gateways here point at a Triton port nobody answers: authentication decides before the models are needed,
and a call let through answers UNAVAILABLE (models not ready), which is how it shows it passed. One test runs the
whole path (mutual TLS + key, the typed client and the CLI) against the tiny model's Triton."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from samserve.client.typed_client import PromptSpec, SamServeClient
from samserve.core.api import SERVICE_NAME, pb, pb_grpc
from samserve.core.settings import ClientSettings
from samserve.launch.redis_server import RedisServer, RedisTls
from samserve.security.tls import client_channel
from samserve.transport.status import STATUS_DETAILS_HEADER
from samserve_dev.certificates import Certificate, issue, make_ca, presented_certificate
from samserve_dev.images import new_image
from samserve_dev.jwts import new_key, token, write_jwks
from samserve_dev.local_stack import free_port
from samserve_dev.locust import run_headless
from samserve_dev.metrics import sample, scrape
from samserve_dev.polling import wait_until
from samserve_dev.sockets import is_loopback, listening

SAMSERVE = str(Path(sys.executable).parent / "samserve")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Certificate]:
    """A server CA with two server certificates (the second for rotation), a client CA with one client
    certificate, and an unrelated CA."""
    root = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, other_ca = make_ca(root, "server-ca"), make_ca(root, "client-ca"), make_ca(root, "other")
    return {
        "server_ca": server_ca, "client_ca": client_ca, "other_ca": other_ca,
        "server": issue(server_ca, root, "gateway"), "server2": issue(server_ca, root, "gateway-rotated"),
        "client": issue(client_ca, root, "client", server=False),
    }


@pytest.fixture
def nowhere() -> str:
    """A Triton address nobody answers on."""
    return f"127.0.0.1:{free_port()}"


def _health(channel: grpc.Channel) -> str:
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def _code(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def _tls_files(pki: dict[str, Certificate], folder: Path, mutual: bool = False) -> dict[str, object]:
    """The gateway's TLS settings, on copies of the files in ``folder`` (a test may rotate them)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "tls.crt", folder / "tls.key"
    shutil.copy(pki["server"].cert, cert)
    shutil.copy(pki["server"].key, key)
    settings: dict[str, object] = {"tls_cert_file": cert, "tls_key_file": key}
    if mutual:
        settings["tls_client_ca_file"] = pki["client_ca"].cert
    return settings


def test_tls_serves_and_plaintext_is_refused(gateway_factory, nowhere, pki, tmp_path):
    client = ClientSettings(ca_file=pki["server_ca"].cert)
    gateway = gateway_factory(nowhere, None, wait_serving=False, client=client, **_tls_files(pki, tmp_path / "tls"))
    assert gateway.health() == "NOT_SERVING"  # answered over TLS, the CA verified the certificate for 127.0.0.1
    assert presented_certificate("127.0.0.1", gateway.port) == pki["server"].der()
    with grpc.insecure_channel(gateway.target) as plain:
        assert _code(lambda: _health(plain)).code() == grpc.StatusCode.UNAVAILABLE
    with client_channel(gateway.target, ca_file=pki["other_ca"].cert) as untrusting:
        assert _code(lambda: _health(untrusting)).code() == grpc.StatusCode.UNAVAILABLE
    assert "(TLS, auth OFF" in gateway.log()


def test_a_plaintext_health_port_serves_probes_and_nothing_else(gateway_factory, nowhere, pki, tmp_path):
    """With TLS (and keys) on the API port, Kubernetes' built-in gRPC probe reaches health on its own port."""
    health_port = free_port()
    client = ClientSettings(ca_file=pki["server_ca"].cert, server_name="localhost")
    gateway_factory(nowhere, None, client=client, wait_serving=False, health_port=health_port,
                    **_tls_files(pki, tmp_path / "tls"))
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        assert _health(channel) == "NOT_SERVING"  # no Triton: the gateway's health, in plaintext
        refused = _code(lambda: pb_grpc.SegmentAnythingStub(channel).Embed(pb.EmbedRequest(image=b"x"), timeout=10))
    assert refused.code() == grpc.StatusCode.UNIMPLEMENTED


def test_mutual_tls_refuses_a_client_without_a_certificate(gateway_factory, nowhere, pki, tmp_path):
    client = ClientSettings(ca_file=pki["server_ca"].cert, cert_file=pki["client"].cert,
                            key_file=pki["client"].key)
    gateway = gateway_factory(nowhere, None, wait_serving=False, client=client,
                              **_tls_files(pki, tmp_path / "tls", mutual=True))
    assert gateway.health() == "NOT_SERVING"  # with its client certificate
    with client_channel(gateway.target, ca_file=pki["server_ca"].cert) as anonymous:
        assert _code(lambda: _health(anonymous)).code() == grpc.StatusCode.UNAVAILABLE
    stranger = issue(pki["other_ca"], tmp_path, "stranger", server=False)  # a certificate of another CA
    with client_channel(gateway.target, ca_file=pki["server_ca"].cert, cert_file=stranger.cert,
                        key_file=stranger.key) as foreign:
        assert _code(lambda: _health(foreign)).code() == grpc.StatusCode.UNAVAILABLE
    assert "(mutual TLS" in gateway.log()


def test_rotated_certificate_reaches_new_connections_without_a_restart(gateway_factory, nowhere, pki, tmp_path):
    files = _tls_files(pki, tmp_path / "tls")
    client = ClientSettings(ca_file=pki["server_ca"].cert)
    gateway = gateway_factory(nowhere, None, wait_serving=False, client=client, **files)
    assert presented_certificate("127.0.0.1", gateway.port) == pki["server"].der()
    assert presented_certificate("127.0.0.1", gateway.http_port) == pki["server"].der()  # the HTTP port too
    with gateway.channel() as kept:
        assert _health(kept) == "NOT_SERVING"
        # Rotate as a Secret update does: each file replaced whole (in between, key and certificate disagree:
        # the gateway keeps the old pair until both fit).
        for source, target in ((pki["server2"].cert, files["tls_cert_file"]), (pki["server2"].key,
                                                                                  files["tls_key_file"])):
            staged = Path(str(target) + ".new")
            shutil.copy(source, staged)
            os.replace(staged, target)
        wait_until(lambda: presented_certificate("127.0.0.1", gateway.port) == pki["server2"].der(), bool,
                   "the rotated certificate on a new connection", timeout_s=30)
        wait_until(lambda: presented_certificate("127.0.0.1", gateway.http_port) == pki["server2"].der(), bool,
                   "the rotated certificate on a new HTTPS connection", timeout_s=30)
        assert _health(kept) == "NOT_SERVING"  # the connection opened before still works
    assert gateway.health() == "NOT_SERVING"  # a new verified channel: the new certificate chains to the CA
    assert gateway.process is not None and gateway.process.poll() is None  # the same process all along
    assert "TLS certificate files re-read" in gateway.log()
    assert "TLS certificate files re-read for the HTTP port" in gateway.log()


@pytest.fixture
def keys_file(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A keys file (written by the CLI) with tenant ``full`` (every RPC) and ``segmenter`` (Segment only): the
    file and the tokens by tenant."""
    path = tmp_path / "keys.json"
    tokens = {}
    for tenant, methods in (("full", "*"), ("segmenter", "Segment")):
        done = subprocess.run([SAMSERVE, "keys", "add", "--tenant", tenant, "--methods", methods, "--file", str(path)],
                              capture_output=True, text=True, timeout=60, check=True)
        tokens[tenant] = done.stdout.strip()
        assert tokens[tenant] not in path.read_text()  # never stored in clear
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    return path, tokens


def _embed(target: str, token: str | None) -> grpc.RpcError:
    with client_channel(target, token=token) as channel:
        return _code(lambda: pb_grpc.SegmentAnythingStub(channel).Embed(pb.EmbedRequest(image=b"x"), timeout=10))


def test_api_keys_decide_who_calls_what(gateway_factory, nowhere, keys_file):
    path, tokens = keys_file
    gateway = gateway_factory(nowhere, None, wait_serving=False, auth="api-keys", api_keys_file=path)
    assert gateway.health() == "NOT_SERVING"  # health needs no key (probes)

    missing = _embed(gateway.target, None)
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED and "missing credentials" in missing.details()
    details = status_pb2.Status.FromString(dict(missing.trailing_metadata())[STATUS_DETAILS_HEADER])
    info = error_details_pb2.RequestInfo()
    assert details.code == grpc.StatusCode.UNAUTHENTICATED.value[0] and details.details[0].Unpack(info)
    assert info.request_id  # mapped by the one status table, like every error

    key_id = tokens["full"].partition(".")[0]
    for bad in (tokens["full"][:-1] + ("A" if tokens["full"][-1] != "A" else "B"), "nonsense", key_id):
        assert _embed(gateway.target, bad).code() == grpc.StatusCode.UNAUTHENTICATED
    with client_channel(gateway.target) as channel:
        basic = _code(lambda: pb_grpc.SegmentAnythingStub(channel).Embed(
            pb.EmbedRequest(image=b"x"), metadata=(("authorization", f"Basic {tokens['full']}"),), timeout=10))
    assert basic.code() == grpc.StatusCode.UNAUTHENTICATED and "malformed" in basic.details()

    denied = _embed(gateway.target, tokens["segmenter"])
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED and "'segmenter'" in denied.details()
    assert _embed(gateway.target, tokens["full"]).code() == grpc.StatusCode.UNAVAILABLE  # let through
    with client_channel(gateway.target, token=tokens["segmenter"]) as channel:
        allowed = _code(lambda: pb_grpc.SegmentAnythingStub(channel).Segment(
            pb.SegmentRequest(image_id="0" * 64), timeout=10))
    assert allowed.code() == grpc.StatusCode.UNAVAILABLE

    # Revoked with the CLI while the gateway runs: refused from the next call on.
    subprocess.run([SAMSERVE, "keys", "revoke", key_id, "--file", str(path)], check=True, timeout=60,
                   capture_output=True)
    assert _embed(gateway.target, tokens["full"]).code() == grpc.StatusCode.UNAUTHENTICATED
    assert _embed(gateway.target, tokens["segmenter"]).code() == grpc.StatusCode.PERMISSION_DENIED  # kept


def _services(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          metadata=metadata, timeout=10)
    return {s.name for r in responses for s in r.list_services_response.service}


def test_reflection_is_a_setting_and_needs_a_key(gateway_factory, nowhere, keys_file):
    path, tokens = keys_file
    off = gateway_factory(nowhere, None, wait_serving=False)
    with off.channel() as channel:
        assert _code(lambda: _services(channel)).code() == grpc.StatusCode.UNIMPLEMENTED
    on = gateway_factory(nowhere, None, wait_serving=False, reflection="true", auth="api-keys", api_keys_file=path)
    with on.channel() as channel:
        assert _code(lambda: _services(channel)).code() == grpc.StatusCode.UNAUTHENTICATED
        names = _services(channel, (("authorization", f"Bearer {tokens['segmenter']}"),))
    assert SERVICE_NAME in names and "grpc.health.v1.Health" in names


def _start_refused(tmp_path: Path, **settings: str) -> str:
    """Run `samserve gateway` with ``settings`` that must stop it: its output (the exit code is 2)."""
    env = dict(os.environ, SAMSERVE_GATEWAY_PORT=str(free_port()), SAMSERVE_METRICS_PORT=str(free_port()),
               SAMSERVE_TRITON_GRPC_PORT=str(free_port()))
    env.pop("SAMSERVE_AUTH", None)
    env.update({f"SAMSERVE_{name.upper()}": value for name, value in settings.items()})
    done = subprocess.run([SAMSERVE, "gateway"], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    return done.stderr


def test_unusable_security_settings_stop_the_gateway(pki, tmp_path, keys_file):
    assert "SAMSERVE_API_KEYS_FILE is not set" in _start_refused(tmp_path)  # auth is on unless said otherwise
    assert "does not exist" in _start_refused(tmp_path, api_keys_file=str(tmp_path / "absent.json"))
    broken = tmp_path / "broken.json"
    broken.write_text('{"keys": [{"id": "sk-0123456789ab", "tenant": "t", "methods": ["Everything"], '
                      '"sha256": "00"}]}')
    output = _start_refused(tmp_path, api_keys_file=str(broken))
    assert "keys.0.methods" in output and "keys.0.sha256" in output
    mismatched = dict(tls_cert_file=str(pki["server"].cert), tls_key_file=str(pki["server2"].key), auth="off")
    assert "TLS certificate" in _start_refused(tmp_path, **mismatched)
    assert "needs both" in _start_refused(tmp_path, tls_cert_file=str(pki["server"].cert), auth="off")
    assert "does not exist" in _start_refused(tmp_path, tls_cert_file=str(tmp_path / "none.pem"),
                                              tls_key_file=str(pki["server"].key), auth="off")
    plain_redis = dict(redis_url="redis://127.0.0.1:1/0", redis_tls_ca_file=str(pki["server_ca"].cert), auth="off")
    assert "need a rediss:// SAMSERVE_REDIS_URL" in _start_refused(tmp_path, **plain_redis)
    assert "SAMSERVE_REDIS_PASSWORD_FILE" in _start_refused(tmp_path, redis_password_file=str(tmp_path / "none"),
                                                            auth="off")


def test_auth_off_is_announced(gateway_factory, nowhere):
    gateway = gateway_factory(nowhere, None, wait_serving=False, auth="off")
    assert "WARNING" in gateway.log() and "authentication is OFF" in gateway.log()


def test_mutual_tls_and_a_key_end_to_end(gateway_factory, tiny_triton, pki, keys_file, tmp_path):
    """The typed client, the CLI and the Locust users through mutual TLS with an API key, against the real
    models."""
    path, tokens = keys_file
    client = ClientSettings(ca_file=pki["server_ca"].cert, cert_file=pki["client"].cert,
                            key_file=pki["client"].key, server_name="localhost", token=tokens["full"])
    gateway = gateway_factory(tiny_triton.url, None, client=client, auth="api-keys", api_keys_file=path,
                              **_tls_files(pki, tmp_path / "tls", mutual=True))
    image = new_image()
    with SamServeClient(gateway.target, timeout_s=120, security=client) as typed:
        embedded = typed.embed(image)
        (answer,) = typed.segment(embedded.image_id, [PromptSpec(points=[(20, 20)], labels=[1])])
    assert answer.masks.shape[0] == 3
    # HTTP on the same terms: mutual TLS with the same certificates, the same key.
    url = f"https://localhost:{gateway.http_port}/v1/images/{embedded.image_id}/embedding"
    bearer = {"authorization": f"Bearer {tokens['full']}"}
    with_certificate = ssl.create_default_context(cafile=pki["server_ca"].cert)
    with_certificate.load_cert_chain(pki["client"].cert, pki["client"].key)
    with httpx.Client(verify=with_certificate) as https:
        assert https.get(url, headers=bearer).json()["imageId"] == embedded.image_id
        assert https.get(url).status_code == 401
    without_certificate = ssl.create_default_context(cafile=pki["server_ca"].cert)
    with httpx.Client(verify=without_certificate) as https, pytest.raises(httpx.TransportError):
        https.get(url, headers=bearer)

    image_file, token_file = tmp_path / "image.png", tmp_path / "token"
    image_file.write_bytes(image)
    token_file.write_text(tokens["full"] + "\n")
    command = [SAMSERVE, "segment", str(image_file), "--point", "20,20", "--target", gateway.target,
               "--tls-ca", str(pki["server_ca"].cert), "--tls-cert", str(pki["client"].cert),
               "--tls-key", str(pki["client"].key), "--token-file", str(token_file)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and f"image {embedded.image_id[:16]}" in done.stdout, done.stderr
    denied = subprocess.run(command[:-2], capture_output=True, text=True, timeout=120)  # no key
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr

    locust = tmp_path / "locust"
    locust.mkdir()
    rows = run_headless(gateway.target, locust, "InteractiveUser", run_time_s=3, users=2,
                        SAMSERVE_CLIENT_CA_FILE=str(pki["server_ca"].cert),
                        SAMSERVE_CLIENT_CERT_FILE=str(pki["client"].cert),
                        SAMSERVE_CLIENT_KEY_FILE=str(pki["client"].key),
                        SAMSERVE_CLIENT_SERVER_NAME="localhost", SAMSERVE_CLIENT_TOKEN=tokens["full"])
    assert int(rows["Segment hot (image_id)"]["Request Count"]) > 0
    assert int(rows["Aggregated"]["Failure Count"]) == 0


def test_triton_and_redis_listen_on_loopback_only(tiny_triton, redis_server):
    """The launchers' defaults (`samserve up` is checked in test_triton, with its gateway)."""
    for process in (tiny_triton.server.process, redis_server.process):
        assert process is not None
        addresses = listening(process.pid)
        assert addresses and all(is_loopback(address) for address in addresses), addresses


def _keys_with_limits(path: Path, limits: dict[str, dict[str, float]]) -> dict[str, str]:
    """A keys file with one key per tenant of ``limits`` and those quotas: the tokens by tenant."""
    tokens = {}
    for tenant in limits:
        done = subprocess.run([SAMSERVE, "keys", "add", "--tenant", tenant, "--file", str(path)],
                              capture_output=True, text=True, timeout=60, check=True)
        tokens[tenant] = done.stdout.strip()
    document = json.loads(path.read_text())
    document["tenants"] = {tenant: quota for tenant, quota in limits.items() if quota}
    path.write_text(json.dumps(document))
    return tokens


def _refusal(call) -> tuple[grpc.RpcError, dict[str, str | bytes], status_pb2.Status]:
    error = _code(call)
    trailers = dict(error.trailing_metadata())
    return error, trailers, status_pb2.Status.FromString(trailers[STATUS_DETAILS_HEADER])


def _quota_failure(status: status_pb2.Status) -> str:
    failure = error_details_pb2.QuotaFailure()
    assert any(detail.Unpack(failure) for detail in status.details)
    return failure.violations[0].subject


def test_quotas_refuse_with_a_retry_after_per_tenant(gateway_factory, tiny_triton, tmp_path):
    """Requests, encodes and decoder prompts each have their bucket; a refusal says when to retry (trailing
    `retry-after` and RetryInfo) and what ran out (QuotaFailure); other tenants are not affected; the metrics count
    by tenant. The rates are tiny so that no bucket refills during the test."""
    path = tmp_path / "keys.json"
    tokens = _keys_with_limits(path, {
        "metered": {"requests_per_s": 0.001, "requests_burst": 4, "encodes_per_min": 0.01, "encodes_burst": 1,
                    "decoder_prompts_per_min": 0.01, "decoder_prompts_burst": 5},
        "free": {},
    })
    gateway = gateway_factory(tiny_triton.url, None, auth="api-keys", api_keys_file=path,
                              max_generate_decoder_prompts=100)
    first, second = new_image(), new_image()
    click = pb.Prompt(points=[pb.Point(x=10, y=10, label=pb.POINT_LABEL_FOREGROUND)])
    with client_channel(gateway.target, token=tokens["metered"]) as channel:
        stub = pb_grpc.SegmentAnythingStub(channel)
        embedded = stub.Embed(pb.EmbedRequest(image=first), timeout=60)  # request 1, encode 1
        error, trailers, status = _refusal(lambda: stub.Embed(pb.EmbedRequest(image=second), timeout=60))  # 2
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "encodes_per_min" in error.details()
        assert _quota_failure(status) == "tenant:metered/encodes"
        retry = error_details_pb2.RetryInfo()
        assert any(detail.Unpack(retry) for detail in status.details)
        assert float(trailers["retry-after"]) == pytest.approx(retry.retry_delay.ToNanoseconds() / 1e9, abs=1e-3)
        assert float(trailers["retry-after"]) > 1000  # one encode per 100 minutes
        # A cache hit costs no encode; 4 prompts fit the 5 decoder prompts, 4 more do not (and say when).
        stub.Segment(pb.SegmentRequest(image_id=embedded.image_id, prompts=[click] * 4), timeout=60)  # 3
        error, trailers, status = _refusal(lambda: stub.Segment(
            pb.SegmentRequest(image_id=embedded.image_id, prompts=[click] * 4), timeout=60))  # 4
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry-after" in trailers
        assert _quota_failure(status) == "tenant:metered/decoder_prompts"
        error, trailers, status = _refusal(lambda: stub.Segment(
            pb.SegmentRequest(image_id=embedded.image_id, prompts=[click]), timeout=60))  # 5: no request left
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "requests_per_s" in error.details()
        assert _quota_failure(status) == "tenant:metered/requests"
    with client_channel(gateway.target, token=tokens["free"]) as channel:
        stub = pb_grpc.SegmentAnythingStub(channel)
        for _ in range(3):
            stub.Embed(pb.EmbedRequest(image=new_image()), timeout=60)
        # The per-request cap on GenerateMasks work holds for every tenant, before anything is encoded.
        error, trailers, status = _refusal(lambda: stub.GenerateMasks(
            pb.GenerateMasksRequest(image_bytes=new_image(), points_per_side=16), timeout=60))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "256 decoder prompts" in error.details()
        assert "SAMSERVE_MAX_GENERATE_DECODER_PROMPTS" in error.details() and "retry-after" not in trailers
        assert _quota_failure(status) == "max_generate_decoder_prompts"
    samples = scrape(gateway.metrics_url)
    for limit in ("requests", "encodes", "decoder_prompts"):
        assert sample(samples, "samserve_quota_rejections_total", tenant="metered", limit=limit) == 1
    assert sample(samples, "samserve_tenant_usage_total", tenant="metered", limit="encodes") == 1
    assert sample(samples, "samserve_tenant_usage_total", tenant="free", limit="encodes") == 3
    assert sample(samples, "samserve_tenant_requests_total", tenant="metered", method="Segment",
                  code="RESOURCE_EXHAUSTED") == 2
    # The HTTP twin: the same bucket refuses with 429, Retry-After (whole seconds) and the same QuotaFailure.
    refused = httpx.get(f"{gateway.http_url}/v1/model", headers={"authorization": f"Bearer {tokens['metered']}"})
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 999  # a request per 1000 s
    body = refused.json()
    assert body["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "requests_per_s" in body["message"]
    (failure,) = (d for d in body["details"] if d["@type"] == "type.googleapis.com/google.rpc.QuotaFailure")
    assert failure["violations"][0]["subject"] == "tenant:metered/requests"


@pytest.mark.parametrize("scope", ["tenant", "shared"])
def test_cache_scope_decides_whether_tenants_see_each_others_images(gateway_factory, tiny_triton, redis_server,
                                                                    tmp_path, scope):
    """With auth on the cache is per tenant by default: tenant B neither hits nor may reference what A sent,
    even through Redis (tier 2, shared by replicas); `shared` trades that for cross-tenant hits."""
    path = tmp_path / "keys.json"
    tokens = _keys_with_limits(path, {"a": {}, "b": {}})
    settings: dict[str, object] = {"auth": "api-keys", "api_keys_file": path}
    if scope == "shared":
        settings["cache_scope"] = "shared"
    first = gateway_factory(tiny_triton.url, redis_server.url, **settings)
    second = gateway_factory(tiny_triton.url, redis_server.url, **settings)
    image = new_image()
    click = pb.Prompt(points=[pb.Point(x=10, y=10, label=pb.POINT_LABEL_FOREGROUND)])
    channels = contextlib.ExitStack()

    def stub(gateway, tenant):
        return pb_grpc.SegmentAnythingStub(channels.enter_context(client_channel(gateway.target,
                                                                                 token=tokens[tenant])))

    embedded = stub(first, "a").Embed(pb.EmbedRequest(image=image), timeout=60)
    assert not embedded.cached
    assert stub(second, "a").Embed(pb.EmbedRequest(image=image), timeout=60).cached  # same tenant, via Redis
    by_id = pb.SegmentRequest(image_id=embedded.image_id, prompts=[click])
    with_crops = pb.GenerateMasksRequest(image_id=embedded.image_id, points_per_side=2, crop_n_layers=1)
    assert stub(second, "a").GenerateMasks(with_crops, timeout=60).crops == 5  # crops from the bytes A sent
    if scope == "tenant":
        with redis_server.client() as store:  # A's bytes are kept in A's scope only
            assert store.exists(f"samserve:img:tenant=a/{embedded.image_id}")
            assert not store.exists(f"samserve:img:tenant=b/{embedded.image_id}")
        assert _code(lambda: stub(second, "b").Segment(by_id, timeout=60)).code() == grpc.StatusCode.NOT_FOUND
        assert _code(lambda: stub(second, "b").GenerateMasks(with_crops, timeout=60)).code() == \
            grpc.StatusCode.NOT_FOUND
        assert not stub(second, "b").Embed(pb.EmbedRequest(image=image), timeout=60).cached  # its own encode
    else:
        assert stub(second, "b").Segment(by_id, timeout=60).cached
        assert stub(second, "b").Embed(pb.EmbedRequest(image=image), timeout=60).cached
    assert stub(second, "b").Segment(by_id, timeout=60).cached  # now B's own entry
    channels.close()


def test_redis_with_a_password_over_tls(gateway_factory, tiny_triton, pki, tmp_path):
    """Tier 2 on a TLS-only redis-server that requires a password: the gateway stores embeddings there with the
    password from a file and the CA given; with a wrong password every request still succeeds (tier 2 counts
    errors, the embedding is computed)."""
    password = tmp_path / "redis-password"
    password.write_text("s3cret-redis\n")
    wrong = tmp_path / "wrong-password"
    wrong.write_text("guess\n")
    redis = RedisServer(free_port(), tmp_path / "redis", password="s3cret-redis",
                        tls=RedisTls(pki["server"].cert, pki["server"].key, pki["server_ca"].cert)).start()
    try:
        assert redis.url.startswith("rediss://")
        tls = {"redis_tls_ca_file": pki["server_ca"].cert}
        good = gateway_factory(tiny_triton.url, redis.url, redis_password_file=password, **tls)
        bad = gateway_factory(tiny_triton.url, redis.url, redis_password_file=wrong, **tls)
        image = new_image()
        with good.channel() as channel:
            embedded = pb_grpc.SegmentAnythingStub(channel).Embed(pb.EmbedRequest(image=image), timeout=60)
        with redis.client() as client:
            assert any(key.decode().endswith(embedded.image_id) for key in client.keys("samserve:emb:*"))
        assert sample(scrape(good.metrics_url), "samserve_cache_lookups_total", tier="l2", result="error") == 0
        with bad.channel() as channel:
            again = pb_grpc.SegmentAnythingStub(channel).Embed(pb.EmbedRequest(image=image), timeout=60)
        assert not again.cached  # not read from Redis: the wrong password is refused there
        assert sample(scrape(bad.metrics_url), "samserve_cache_lookups_total", tier="l2", result="error") >= 1
    finally:
        redis.stop()


def test_jwts_from_a_jwks_file(gateway_factory, nowhere, tmp_path):
    """A gateway configured with a JWKS file only: a token its identity provider signed is let through (answered
    UNAVAILABLE: no models behind it), a forged or expired one is UNAUTHENTICATED, a scope without the RPC is
    PERMISSION_DENIED."""
    key = new_key()
    jwks = write_jwks(tmp_path / "jwks.json", {"k1": key})
    gateway = gateway_factory(nowhere, None, wait_serving=False, auth="api-keys", jwt_jwks_file=jwks,
                              jwt_issuer="https://idp.example")
    assert _embed(gateway.target, token(key)).code() == grpc.StatusCode.UNAVAILABLE
    assert _embed(gateway.target, token(new_key())).code() == grpc.StatusCode.UNAUTHENTICATED
    expired = _embed(gateway.target, token(key, exp=0))
    assert expired.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in expired.details()
    assert _embed(gateway.target, token(key, scope="samserve:Segment")).code() == grpc.StatusCode.PERMISSION_DENIED


def test_an_answer_over_the_response_limit_is_refused_naming_it(gateway_factory, tiny_triton):
    """Masks are counted as they are made, logits before any work; a smaller answer still passes."""
    gateway = gateway_factory(tiny_triton.url, None, max_response_bytes=100_000)
    click = pb.Prompt(points=[pb.Point(x=10, y=10, label=pb.POINT_LABEL_FOREGROUND)], multimask_output=True)
    with gateway.channel() as channel:
        stub = pb_grpc.SegmentAnythingStub(channel)
        embedded = stub.Embed(pb.EmbedRequest(image=new_image()), timeout=60)
        one = stub.Segment(pb.SegmentRequest(image_id=embedded.image_id, prompts=[click]), timeout=60)
        assert len(one.results[0].masks) == 3
        with_logits = pb.SegmentRequest(image_id=embedded.image_id, prompts=[click] * 10, return_low_res_logits=True)
        logits = len(stub.Segment(pb.SegmentRequest(image_id=embedded.image_id, prompts=[click],
                                                    return_low_res_logits=True), timeout=60).results[0].masks[0]
                     .low_res_logits.data)
        assert 30 * logits > 100_000  # 10 prompts x 3 masks: over the limit before any work
        error, trailers, status = _refusal(lambda: stub.Segment(with_logits, timeout=60))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "SAMSERVE_MAX_RESPONSE_BYTES" in error.details()
        assert _quota_failure(status) == "max_response_bytes" and "retry-after" not in trailers
        many = pb.SegmentRequest(image_id=embedded.image_id, prompts=[click] * 256,
                                 mask_encoding=pb.MASK_ENCODING_RLE_AND_PNG)
        assert _code(lambda: stub.Segment(many, timeout=120)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
