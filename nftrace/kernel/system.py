"""The process's place on the machine: privileges, network namespace, interfaces.

`enter_namespace` moves the whole process into /run/netns/NAME with setns(2), before any
socket or libnftables context exists, so that every socket nftrace opens afterwards, and
the traffic command it starts, live in that namespace. It never creates a namespace.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import EnvironmentProblem, InputError
from . import runner

NETNS_RUN_DIR = "/run/netns"
# Where nftrace keeps what must outlive a run: the nf_log loggers a run replaced (put back by
# `nftrace cleanup` after a SIGKILL), the lab's scenario state.
STATE_DIR = Path(os.environ.get("NFTRACE_STATE_DIR", "/run/nftrace"))
CLONE_NEWNET = 0x40000000
CAP_NET_ADMIN = 12
SO_NETNS_COOKIE = 71  # asm-generic/socket.h; Python's socket module does not name it
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


def netns_exists(name: str) -> bool:
    """Whether /run/netns/NAME exists (a named namespace; see nflog.netns_inode_in_use for one
    known by inode)."""
    return os.path.exists(os.path.join(NETNS_RUN_DIR, name))


def namespace_path(name: str) -> str:
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise InputError(f"--netns: '{name}' is not a valid namespace name")
    path = os.path.join(NETNS_RUN_DIR, name)
    if not os.path.exists(path):
        raise InputError(f"--netns: network namespace '{name}' does not exist (see 'ip netns list')")
    return path


def enter_namespace(name: str) -> None:
    path = namespace_path(name)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        enter_namespace_fd(fd, f"network namespace '{name}'")
    finally:
        os.close(fd)


def enter_namespace_fd(fd: int, shown: str) -> None:
    """Move the calling thread into the network namespace open as `fd` (`shown` names it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise EnvironmentProblem(f"cannot enter {shown}: {os.strerror(err)}")


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


def current_netns() -> int:
    """The inode of the calling thread's network namespace (a worker thread may be in another
    one than the process): what state files are named by, what bpftrace filters on."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def netns_cookie() -> Optional[int]:
    """The calling thread's namespace's cookie (SO_NETNS_COOKIE, Linux 5.14): unlike its inode,
    never reused by a later namespace. None where the kernel has no cookies."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
        except OSError:
            return None


def _stat_fields(pid: int) -> list:
    """/proc/PID/stat from the state on (field 3): comm may hold spaces and parentheses, the
    state follows the last ')'."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return stat.read().rpartition(b")")[2].split()


def process_start(pid: int) -> Optional[int]:
    """When the process started, in clock ticks after boot (/proc/PID/stat field 22): with the
    pid, it names one process, not whichever gets the pid later. None where /proc cannot say."""
    try:
        return int(_stat_fields(pid)[19])
    except (OSError, IndexError, ValueError):
        return None


def pid_alive(pid: int, started: Optional[int] = None) -> bool:
    """Whether a process exists: tells a live nftrace run's leftovers from a killed one's.

    A zombie is dead: a run killed with SIGKILL stays one until its parent waits for it (a
    script that never does, an init that reaps late), its sockets and bindings already gone;
    what it left is left, and a run started meanwhile must undo it, not take it for a live
    run's (it would bind the kernel log's logger over the killed run's and keep it bound).
    `started` (process_start, recorded with the pid): a process that got the pid since is not
    the one that recorded it."""
    try:
        fields = _stat_fields(pid)
        if started is not None and len(fields) > 19 and fields[19] != str(started).encode():
            return False
        return fields[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass  # no /proc: the process table alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Link:
    """An interface of the namespace as `ip -d link` describes it."""

    index: int
    name: str
    kind: Optional[str] = None  # bridge, veth, vlan, ...; None for a physical device
    master: Optional[str] = None  # the bridge (or bond) it is a port of


def parse_links(ip_json: str) -> list[Link]:
    """`ip -d -j link show` → links."""
    links = []
    for entry in json.loads(ip_json or "[]"):
        linkinfo = entry.get("linkinfo") or {}
        links.append(Link(int(entry["ifindex"]), entry["ifname"], linkinfo.get("info_kind"), entry.get("master")))
    return links


def interface_links() -> list[Link]:
    """The interfaces of the calling thread's namespace, with their kind (empty if `ip` fails)."""
    try:
        result = runner.run(["ip", "-d", "-j", "link", "show"], check=False, timeout=10)
    except runner.CommandFailed:
        return []
    return parse_links(result.stdout) if result.returncode == 0 else []
