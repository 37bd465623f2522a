"""Several hosts on one machine, for the multi-host test: each host is a network namespace with its own loopback and
one veth pair to a bridge in the root namespace (whose address is the test process, the client host). Root only.

Hosts run :mod:`samserve_dev.netns_host`; everything another host reaches goes through that host's delaying
relay, so a connection between two hosts has ``delay_s`` added each way. Traffic goes to loopback and to the
addresses made here. Names carry this process's id, so a leftover from a crashed run does not collide; all of it
(processes, namespaces, the bridge, shared-memory regions of killed gateways) goes on exit."""

from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from samserve_dev import netns_host

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
SHM = Path("/dev/shm")
SHM_PREFIXES = ("samserve", "triton_python_backend_shm_region_")
"""Name prefixes of the shared-memory regions of a gateway (samserve.triton.transports) and of Triton's python backend:
a
killed pod leaves them behind."""


class NamespacesUnavailable(RuntimeError):
    """This machine does not let the test make network namespaces (not root, or no CAP_SYS_ADMIN / CAP_NET_ADMIN)."""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _pids_in(namespace: str) -> list[int]:
    listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    return [int(pid) for pid in listed.stdout.split()]


def _shared_memory_regions() -> set[str]:
    return {path.name for path in SHM.iterdir() if path.name.startswith(SHM_PREFIXES)}


def check_namespaces() -> None:
    """Raise :class:`NamespacesUnavailable`, with the reason, where this machine refuses what :class:`Network`
    does: a namespace, a bridge, and a veth pair into the namespace (a container may allow one and not another)."""
    if os.geteuid() != 0:
        raise NamespacesUnavailable("network namespaces need root")
    probe = f"ssprobe{os.getpid() % 100000}"
    steps = [["netns", "add", probe], ["link", "add", probe, "type", "bridge"],
             ["link", "add", f"{probe}v", "type", "veth", "peer", "name", "eth0", "netns", probe],
             ["link", "set", f"{probe}v", "master", probe, "up"]]
    try:
        for step in steps:
            done = subprocess.run(["ip", *step], capture_output=True, text=True)
            if done.returncode != 0:
                raise NamespacesUnavailable(f"`ip {' '.join(step)}` refused: {done.stderr.strip()}")
    finally:
        for undo in (["link", "del", f"{probe}v"], ["link", "del", probe], ["netns", "del", probe]):
            subprocess.run(["ip", *undo], capture_output=True)


@dataclasses.dataclass
class Host:
    name: str
    namespace: str
    address: str
    veth: str
    """This host's end of its veth pair, in the root namespace."""
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def gateway_target(self) -> str:
        return f"{self.address}:{netns_host.GATEWAY_PORT}"

    @property
    def triton_url(self) -> str:
        return f"{self.address}:{netns_host.TRITON_GRPC_PORT}"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.address}:{netns_host.REDIS_PORT}/0"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


class Network:
    """A bridge ``10.213.<k>.1/24`` (the client) and hosts ``.2``, ``.3``, ... added by :meth:`start_host`; with
    :meth:`start_dns`, names (:meth:`publish`) that clients resolve through a DNS host (:meth:`dns_target`)."""

    def __init__(self, workdir: Path, delay_s: float) -> None:
        self.workdir = Path(workdir)
        self.delay_s = delay_s
        self.tag = str(os.getpid() % 100000)
        self.subnet = f"10.213.{os.getpid() % 250 + 1}"
        self.bridge = f"ssbr{self.tag}"
        self.client_address = f"{self.subnet}.1"
        self.hosts: dict[str, Host] = {}
        self._shm_before: set[str] = set()
        self._dns: Host | None = None
        self._records: dict[str, list[str]] = {}

    def __enter__(self) -> Network:
        self._shm_before = _shared_memory_regions()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.client_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return self

    def start_host(self, name: str, role: str, **options: str) -> Host:
        """Make namespace ``name`` on the bridge and run ``role`` of :mod:`samserve_dev.netns_host` in it (its
        ``options`` as ``--key value``); returns once the host printed READY."""
        host = Host(name, f"samserve-{self.tag}-{name}", f"{self.subnet}.{len(self.hosts) + 2}",
                    f"ss{self.tag}{name}"[:15])
        self.hosts[name] = host
        _ip("netns", "add", host.namespace)
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.namespace)
        _ip("link", "set", host.veth, "master", self.bridge, "up")
        _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", host.namespace, "link", "set", "eth0", "up")
        _ip("-n", host.namespace, "link", "set", "lo", "up")
        workdir = self.workdir / name
        workdir.mkdir(parents=True, exist_ok=True)
        arguments = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
        host.log_path = workdir / "host.log"
        host.process = subprocess.Popen(
            ["ip", "netns", "exec", host.namespace, sys.executable, "-m", "samserve_dev.netns_host", role,
             f"--address={host.address}", f"--delay-s={self.delay_s}", f"--workdir={workdir}", *arguments],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=open(host.log_path, "wb"),
        )
        self._wait_ready(host)
        return host

    def start_dns(self, name: str = "dns") -> Host:
        """Host ``name`` as the network's DNS server (role ``dns`` of :mod:`samserve_dev.netns_host`), with no
        records yet."""
        records = self.workdir / name / "records.json"
        records.parent.mkdir(parents=True, exist_ok=True)
        netns_host.write_records(records, {})
        self._dns = self.start_host(name, "dns", records=str(records))
        return self._dns

    def publish(self, name: str, hosts: list[Host]) -> None:
        """From now on the DNS host answers ``name`` with the addresses of ``hosts`` (as a headless Service's
        records change when its ready pods change)."""
        assert self._dns is not None, "start_dns first"
        self._records[name] = [host.address for host in hosts]
        netns_host.write_records(self.workdir / self._dns.name / "records.json", self._records)

    def dns_target(self, name: str, port: int) -> str:
        """A gRPC target resolving ``name`` through the DNS host (``dns://server/name:port``)."""
        assert self._dns is not None, "start_dns first"
        return f"dns://{self._dns.address}:{netns_host.DNS_PORT}/{name}:{port}"

    def _wait_ready(self, host: Host) -> None:
        assert host.process is not None and host.process.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        line = b""
        while not line.startswith(b"READY "):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or host.process.poll() is not None:
                raise AssertionError(f"host {host.name} not ready (exit {host.process.poll()}):\n{host.log()}")
            if select.select([host.process.stdout], [], [], remaining)[0]:
                line = host.process.stdout.readline()
        json.loads(line[len(b"READY "):])

    def kill(self, name: str, unplug: bool = False) -> None:
        """Every process of host ``name`` gets SIGKILL at once (a pod dying; nothing shuts down cleanly); returns
        once they are gone. ``unplug``: its link goes too, so its address no longer answers at all (as when a
        node is lost), instead of refusing connections."""
        host = self.hosts[name]
        if unplug:
            _ip("-n", host.namespace, "link", "del", "eth0")
        pids = _pids_in(host.namespace)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        assert host.process is not None
        host.process.wait(timeout=STOP_TIMEOUT_S)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _pids_in(host.namespace):
            assert time.monotonic() < deadline, f"{host.namespace} still has processes {_pids_in(host.namespace)}"
            time.sleep(0.05)

    def _stop(self, host: Host) -> None:
        if host.process is not None and host.process.poll() is None:
            host.process.send_signal(signal.SIGTERM)
            try:
                host.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        if _pids_in(host.namespace):
            self.kill(host.name)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for host in self.hosts.values():
            self._stop(host)
            # The link first: a namespace outlives its name while the kernel still holds its sockets (a FIN to a
            # host that went silent is retried for minutes), and its veth pair with it.
            subprocess.run(["ip", "link", "del", host.veth], capture_output=True)
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        for leftover in _shared_memory_regions() - self._shm_before:
            (SHM / leftover).unlink(missing_ok=True)
