"""What the benchmark measures with: namespaces entered and left, netlink sockets seen from
/proc, ruleset commits timed as they happen, and child processes' CPU and memory.

Nothing here changes a firewall: the only sockets opened are listeners, and they are opened
inside the namespaces the benchmark made.
"""

from __future__ import annotations

import ctypes
import os
import select
import socket
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

from nftrace.kernel.system import enter_namespace

CLONE_NEWNET = 0x40000000
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTABLES = 7
NFNLGRP_NFTRACE = 9
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWTABLE = 0
NFT_MSG_NEWRULE = 6
NFT_MSG_NEWGEN = 15


@contextmanager
def inside_netns(name: str) -> Iterator[None]:
    """Run the block in /run/netns/NAME, then come back; sockets opened inside stay there."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        enter_namespace(name)
        try:
            yield
        finally:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "cannot return to the benchmark's own network namespace")
    finally:
        os.close(home)


@dataclass(frozen=True)
class NetlinkSocket:
    """One row of /proc/PID/net/netlink: a socket of that process."""

    protocol: int
    port_id: int
    groups: int
    queued_bytes: int  # Rmem: what the kernel holds for the reader right now
    drops: int  # messages the kernel dropped on this socket because it was full
    inode: int

    @property
    def traces(self) -> bool:
        return self.protocol == NETLINK_NETFILTER and bool(self.groups & (1 << (NFNLGRP_NFTRACE - 1)))


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def netlink_sockets(pid: int) -> list[NetlinkSocket]:
    """The netlink sockets process `pid` holds, as the kernel of its namespace counts them."""
    inodes = _socket_inodes(pid)
    sockets = []
    try:
        with open(f"/proc/{pid}/net/netlink") as table:
            next(table)
            for line in table:
                fields = line.split()
                if len(fields) < 10 or int(fields[9]) not in inodes:
                    continue
                sockets.append(NetlinkSocket(int(fields[1]), int(fields[2]), int(fields[3], 16), int(fields[4]),
                                             int(fields[8]), int(fields[9])))
    except OSError:
        return []
    return sockets


def trace_sockets(pid: int) -> list[NetlinkSocket]:
    return [sock for sock in netlink_sockets(pid) if sock.traces]


def wait_for_trace_listener(pid: int, timeout: float) -> bool:
    """True once process `pid` has a socket in the trace group (it will not miss events)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if trace_sockets(pid):
            return True
        time.sleep(0.01)
    return False


def rss_bytes(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def own_usage(pid: int) -> tuple[Optional[float], Optional[int]]:
    """CPU seconds and peak resident memory of process `pid` itself, children not included
    (its wait4 figures include the children it reaped, such as nftrace's bpftrace)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        peak = None
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
        return cpu, peak
    except (OSError, ValueError, IndexError):
        return None, None


class CommitWatcher:
    """Sees every ruleset commit of one namespace the moment the kernel announces it.

    A subscriber to NFNLGRP_NFTABLES gets the new objects of a transaction and then its
    NEWGEN message: the time that message arrives is when the change took effect.
    """

    def __init__(self, netns: str):
        with inside_netns(netns):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((0, 0))
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)

    def _messages(self, timeout: float) -> Iterator[tuple[float, int, bytes]]:
        """(arrival time, message type, message) until `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return
            data = self.sock.recv(1 << 16)
            arrived = time.monotonic()
            offset = 0
            while offset + 16 <= len(data):
                length, msg_type = struct.unpack_from("=IH", data, offset)
                if length < 16:
                    break
                if msg_type >> 8 == NFNL_SUBSYS_NFTABLES:
                    yield arrived, msg_type & 0xFF, data[offset:offset + length]
                offset += (length + 3) & ~3

    def wait_for_commit(self, table_prefix: str, kinds: tuple[int, ...], timeout: float) -> Optional[float]:
        """Arrival time of the commit that created a rule (or table) in a table named table_prefix*."""
        seen = False
        for arrived, kind, message in self._messages(timeout):
            if kind in kinds and (_first_string(message) or "").startswith(table_prefix):
                seen = True
            elif kind == NFT_MSG_NEWGEN and seen:
                return arrived
        return None

    def drain(self, seconds: float) -> None:
        """Let the messages of the next `seconds` go by (a removal, a probe's own changes)."""
        for _ in self._messages(seconds):
            pass

    def rules_installed(self, table_prefix: str, timeout: float) -> Optional[float]:
        return self.wait_for_commit(table_prefix, (NFT_MSG_NEWRULE,), timeout)

    def table_added(self, table_prefix: str, timeout: float) -> Optional[float]:
        return self.wait_for_commit(table_prefix, (NFT_MSG_NEWTABLE,), timeout)

    def close(self) -> None:
        self.sock.close()


def _first_string(message: bytes) -> Optional[str]:
    """Attribute 1 of a NEWTABLE/NEWRULE message: the table's name."""
    offset = 20
    while offset + 4 <= len(message):
        length, nla_type = struct.unpack_from("=HH", message, offset)
        if length < 4:
            return None
        if nla_type & 0x3FFF == 1:
            return message[offset + 4:offset + length].rstrip(b"\0").decode("utf-8", "replace")
        offset += (length + 3) & ~3
    return None


@dataclass
class Finished:
    """How a measured child process ended and what it cost."""

    exit_code: int
    cpu_seconds: float
    max_rss_bytes: int
    wall_seconds: float
    rss_samples: list = field(default_factory=list)


def exited(pid: int) -> bool:
    """Whether child `pid` has ended, without reaping it (its rusage is still to be read)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def reap(pid: int, started: float) -> Finished:
    """wait4(2) the child: its exit code, its own CPU time and its peak resident memory."""
    _, status, usage = os.wait4(pid, 0)
    return Finished(os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024,
                    time.monotonic() - started)
