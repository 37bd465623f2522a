"""Memory limits for a child process, the strongest this machine allows: a cgroup (v2, else v1: what a container's
limit is; over it the kernel OOM-kills the process) or, without cgroup rights, RLIMIT_DATA (allocations over it fail,
MemoryError in Python, and the process lives). :func:`memory_limit` picks the first available of
:data:`MEMORY_LIMITS`; :func:`peak_rss_bytes` reads a live process's peak resident memory."""

from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path

from samserve_dev.local_stack import free_port


class MemoryLimit:
    """Puts a process under a memory limit; reports its peak and whether the limit killed it."""

    name = "none"

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes

    def apply(self, pid: int) -> None:
        raise NotImplementedError

    def peak_bytes(self) -> int | None:
        return None

    def oom_kills(self) -> int | None:
        return None

    def close(self) -> None:
        pass


class CgroupV1Limit(MemoryLimit):
    """cgroup v1 memory controller (what a container's memory limit is): over the limit the kernel OOM-kills."""

    name = "cgroup-v1 memory.limit_in_bytes"
    ROOT = Path("/sys/fs/cgroup/memory")

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(limit_bytes)
        self.group = self.ROOT / f"samserve-soak-{os.getpid()}-{free_port()}"
        self.group.mkdir()
        (self.group / "memory.limit_in_bytes").write_text(str(limit_bytes))

    @classmethod
    def available(cls) -> bool:
        return os.access(cls.ROOT, os.W_OK) and (cls.ROOT / "memory.limit_in_bytes").exists()

    def apply(self, pid: int) -> None:
        (self.group / "cgroup.procs").write_text(str(pid))

    def peak_bytes(self) -> int | None:
        return int((self.group / "memory.max_usage_in_bytes").read_text())

    def oom_kills(self) -> int | None:
        for line in (self.group / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.group.rmdir()


class CgroupV2Limit(CgroupV1Limit):
    """cgroup v2 ``memory.max`` (``memory.peak`` where the kernel has it)."""

    name = "cgroup-v2 memory.max"
    ROOT = Path("/sys/fs/cgroup")

    def __init__(self, limit_bytes: int) -> None:
        MemoryLimit.__init__(self, limit_bytes)
        self.group = self.ROOT / f"samserve-soak-{os.getpid()}-{free_port()}"
        self.group.mkdir()
        (self.group / "memory.max").write_text(str(limit_bytes))

    @classmethod
    def available(cls) -> bool:
        controllers = cls.ROOT / "cgroup.subtree_control"
        return os.access(cls.ROOT, os.W_OK) and controllers.exists() and "memory" in controllers.read_text()

    def peak_bytes(self) -> int | None:
        peak = self.group / "memory.peak"
        return int(peak.read_text()) if peak.exists() else None

    def oom_kills(self) -> int | None:
        for line in (self.group / "memory.events").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return None


class RlimitData(MemoryLimit):
    """RLIMIT_DATA (private writable memory, thread stacks and heap included): allocations over it fail
    (MemoryError in Python) instead of the process being killed."""

    name = "RLIMIT_DATA"

    @classmethod
    def available(cls) -> bool:
        return True

    def apply(self, pid: int) -> None:
        resource.prlimit(pid, resource.RLIMIT_DATA, (self.limit_bytes, self.limit_bytes))


MEMORY_LIMITS: list[type[CgroupV2Limit] | type[CgroupV1Limit] | type[RlimitData]] = [
    CgroupV2Limit, CgroupV1Limit, RlimitData]
"""Tried in order: the first available one is used (a cgroup is what Kubernetes enforces)."""


def memory_limit(limit_bytes: int) -> MemoryLimit:
    """The first available kind of :data:`MEMORY_LIMITS`, set to ``limit_bytes`` (call ``close`` after use)."""
    kind = next(kind for kind in MEMORY_LIMITS if kind.available())
    return kind(limit_bytes)


def peak_rss_bytes(pid: int) -> int | None:
    """VmHWM of a live process."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None
