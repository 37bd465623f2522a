"""What TCP addresses processes listen on, read from /proc (Linux): for tests that a service binds loopback only."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after "(comm)" and the state
                found.append(int(entry.name))
    return found


def listening(pid: int) -> set[Address]:
    """The local addresses of the TCP sockets ``pid`` listens on (IPv4 and IPv6)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    addresses: set[Address] = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])
                host_order = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # 32-bit words, LE
                addresses.add(ipaddress.ip_address(host_order))
    return addresses


def is_loopback(address: Address) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback address (a dual-stack socket bound to 127.0.0.1)."""
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return address.is_loopback or (mapped is not None and mapped.is_loopback)
