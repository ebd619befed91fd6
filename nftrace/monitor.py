"""The netlink socket that receives trace events and ruleset changes in one namespace.

One raw NETLINK_NETFILTER socket joins NFNLGRP_NFTRACE (trace events) and, once the
trace rules are in, NFNLGRP_NFTABLES (ruleset changes). Both arrive on the same socket, so
a generation change is seen in order with the trace events around it. The socket is read
until it is empty on every wake-up: the kernel queues datagrams, and a reader that takes one
per wake-up falls behind under a flood.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from dataclasses import dataclass
from typing import Iterator, Optional, Union

from .errors import KernelError
from .events import (
    NFNL_SUBSYS_NFTABLES,
    NFT_MSG_DELTABLE,
    NFT_MSG_NEWGEN,
    TRACE_MESSAGE_TYPE,
    TraceEvent,
    decode_datagram,
    decode_trace_message,
)

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = 33
NFNLGRP_NFTABLES = 7
NFNLGRP_NFTRACE = 9
NLMSG_ERROR = 2
NLMSG_OVERRUN = 4

DELTABLE_TYPE = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELTABLE
NEWGEN_TYPE = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN
# Default receive buffer: big enough for the default rate limit with a wide margin, small
# enough to be a reasonable amount of kernel memory on a production box.
DEFAULT_RCVBUF = 64 * 1024 * 1024


@dataclass(frozen=True)
class RulesetChanged:
    """A new ruleset generation was committed: rule texts must be read again."""

    generation: Optional[int]


@dataclass(frozen=True)
class TableDeleted:
    """A table was deleted; nftrace stops if it is its own."""

    family: int
    name: str


@dataclass(frozen=True)
class EventsLost:
    """The socket overflowed (ENOBUFS): some events between the last read and now are gone."""


MonitorItem = Union[TraceEvent, RulesetChanged, TableDeleted, EventsLost]


def _attr_string(raw: bytes, wanted: int) -> Optional[str]:
    """First NLA of type `wanted` after the nfgenmsg header, as a string (cheap, no classes)."""
    offset = 20
    while offset + 4 <= len(raw):
        length, nla_type = struct.unpack_from("=HH", raw, offset)
        if length < 4:
            return None
        if nla_type & 0x3FFF == wanted:
            return raw[offset + 4 : offset + length].rstrip(b"\0").decode("utf-8", "replace")
        offset += (length + 3) & ~3
    return None


def _attr_be32(raw: bytes, wanted: int) -> Optional[int]:
    offset = 20
    while offset + 4 <= len(raw):
        length, nla_type = struct.unpack_from("=HH", raw, offset)
        if length < 4:
            return None
        if nla_type & 0x3FFF == wanted and length >= 8:
            return struct.unpack_from("!I", raw, offset + 4)[0]
        offset += (length + 3) & ~3
    return None


def open_netfilter_socket(rcvbuf: int) -> socket.socket:
    """A non-blocking NETLINK_NETFILTER socket with a receive buffer of `rcvbuf` bytes, bound."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                             NETLINK_NETFILTER)
    except OSError as err:
        raise KernelError(f"cannot open a netfilter netlink socket: {err.strerror}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((0, 0))
    return sock


def socket_drops(inode: int) -> int:
    """Messages the kernel dropped on the netlink socket with this inode (/proc/net/netlink)."""
    try:
        with open("/proc/net/netlink") as table:
            next(table)
            for line in table:
                fields = line.split()
                if len(fields) >= 10 and int(fields[9]) == inode:
                    return int(fields[8])
    except (OSError, ValueError, StopIteration):
        pass
    return 0


def read_datagrams(sock: socket.socket, buffer: bytearray, what: str = "trace events") -> Iterator[Optional[bytes]]:
    """Every datagram queued on a non-blocking socket now; an overrun (ENOBUFS) yields None."""
    while True:
        try:
            size = sock.recv_into(buffer)
        except BlockingIOError:
            return
        except OSError as err:
            if err.errno == errno.ENOBUFS:
                yield None
                continue
            raise KernelError(f"reading {what} failed: {err.strerror}") from None
        yield bytes(buffer[:size])


class TraceMonitor:
    """Receives trace events; counts every event the kernel had to drop for lack of room."""

    def __init__(self, rcvbuf: int = DEFAULT_RCVBUF):
        self.sock = open_netfilter_socket(rcvbuf)
        self._join(NFNLGRP_NFTRACE)
        self.overruns = 0
        self._buffer = bytearray(1 << 20)
        self._inode = os.fstat(self.sock.fileno()).st_ino

    def _join(self, group: int) -> None:
        try:
            self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        except OSError as err:
            raise KernelError(f"cannot join netfilter netlink group {group}: {err.strerror}") from None

    def watch_ruleset(self) -> None:
        """Also receive ruleset changes (joined after nftrace's own changes are in)."""
        self._join(NFNLGRP_NFTABLES)

    def fileno(self) -> int:
        return self.sock.fileno()

    def dropped_messages(self) -> int:
        """Messages the kernel dropped on this socket, from the Drops column of /proc/net/netlink.

        ENOBUFS only says that something was lost; the socket's drop counter says how much.
        """
        return socket_drops(self._inode)

    def wait(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        return bool(ready)

    def read_raw(self) -> Iterator[Optional[bytes]]:
        """Every datagram queued now; an overrun yields None, is counted, and reading goes on."""
        for datagram in read_datagrams(self.sock, self._buffer):
            if datagram is None:
                self.overruns += 1
            yield datagram

    def read(self) -> Iterator[MonitorItem]:
        """Decode everything queued now into trace events and ruleset notices."""
        for datagram in self.read_raw():
            if datagram is None:
                yield EventsLost()
            else:
                yield from decode_monitor_datagram(datagram)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "TraceMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def decode_monitor_datagram(datagram: bytes) -> Iterator[MonitorItem]:
    for msg_type, raw in decode_datagram(datagram):
        if msg_type == TRACE_MESSAGE_TYPE:
            yield decode_trace_message(raw)
        elif msg_type == NEWGEN_TYPE:
            yield RulesetChanged(_attr_be32(raw, 1))
        elif msg_type == DELTABLE_TYPE:
            yield TableDeleted(raw[16], _attr_string(raw, 1) or "")
