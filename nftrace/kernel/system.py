"""The process's place on the machine: privileges, network namespace, interfaces.

`enter_namespace` moves the whole process into /run/netns/NAME with setns(2), before any
socket or libnftables context exists, so that every socket nftrace opens afterwards, and
the traffic command it starts, live in that namespace. It never creates a namespace.
"""

from __future__ import annotations

import ctypes
import os
import socket
from typing import Optional

from ..errors import EnvironmentProblem, InputError

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21


def has_capability(capability: int) -> bool:
    """Whether this process holds the capability now (CapEff): what the kernel checks, which
    the uid is not (root in a container, or with capabilities dropped, may lack it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << capability))
    except OSError:
        pass
    return os.geteuid() == 0


def require_net_admin() -> None:
    """nftrace changes the ruleset and reads trace events: both need CAP_NET_ADMIN."""
    if not has_capability(CAP_NET_ADMIN):
        raise EnvironmentProblem("nftrace needs root (CAP_NET_ADMIN) to add trace rules and read trace events; "
                                 "run it with sudo")


def namespace_path(name: str) -> str:
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise InputError(f"--netns: '{name}' is not a valid namespace name")
    path = os.path.join(NETNS_RUN_DIR, name)
    if not os.path.exists(path):
        raise InputError(f"--netns: network namespace '{name}' does not exist (see 'ip netns list')")
    return path


def enter_namespace(name: str) -> None:
    path = namespace_path(name)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise EnvironmentProblem(f"cannot enter network namespace '{name}': {os.strerror(err)}")
    finally:
        os.close(fd)


def interface_index(name: str, option: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise InputError(f"{option}: no interface '{name}' in this network namespace") from None


def interface_names() -> dict[int, str]:
    """ifindex → name in the current namespace (trace events carry indexes only)."""
    try:
        return {index: name for index, name in socket.if_nameindex()}
    except OSError:
        return {}


def interface_name(names: dict[int, str], index: Optional[int]) -> Optional[str]:
    if index is None:
        return None
    return names.get(index) or f"if{index}"


def pid_alive(pid: int) -> bool:
    """Whether a process exists: tells a live nftrace run's leftovers from a killed one's."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
