"""The netlink socket that receives trace events and ruleset changes in one namespace.

One raw NETLINK_NETFILTER socket joins NFNLGRP_NFTRACE (trace events) and, once the
trace rules are in, NFNLGRP_NFTABLES (ruleset changes). Both arrive on the same socket, so
a generation change is seen in order with the trace events around it. The socket is read
in batches of up to READ_BATCH datagrams per wake-up, without waiting in between: the kernel
queues datagrams, and a reader that takes one per wake-up falls behind under a flood, while
one that drains a backlog of a million events in a single call never lets its caller expire
finished packets. How big the receive buffer may grow is decided in rcvbuf.py.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from dataclasses import dataclass
from typing import Iterator, Optional, Union

from pyroute2.netlink.nfnetlink.nftsocket import nft_gen_msg, nft_table_msg

from ..errors import KernelError
from ..trace.events import TRACE_MESSAGE_TYPE, TraceEvent, decode_trace_message
from .netlink import (NETLINK_ADD_MEMBERSHIP, NETLINK_NETFILTER, NFNL_SUBSYS_NFTABLES, NFNLGRP_NFTABLES,
                      NFNLGRP_NFTRACE, NFT_MSG_DELTABLE, NFT_MSG_NEWGEN, SO_RCVBUFFORCE, SOL_NETLINK, compact_table,
                      decode_datagram, message_type, read_message)
from .sockfilter import Program, attach

DELTABLE_TYPE = message_type(NFNL_SUBSYS_NFTABLES, NFT_MSG_DELTABLE)
NEWGEN_TYPE = message_type(NFNL_SUBSYS_NFTABLES, NFT_MSG_NEWGEN)
# The one attribute of each ruleset notice that nftrace reads, from pyroute2's maps of them.
_GENERATION = compact_table(nft_gen_msg.nla_map, wanted={"NFTA_GEN_ID"})
_TABLE_NAME = compact_table(nft_table_msg.nla_map, wanted={"NFTA_TABLE_NAME"})
# Receive buffer of a monitor made without a size (nftrace's runs size theirs with rcvbuf.py).
UNSIZED_RCVBUF = 64 * 1024 * 1024
# Datagrams read per call of read(): enough to make the wake-up cost nothing, few enough that
# the caller gets control back every few tens of milliseconds while it drains a backlog.
READ_BATCH = 4096
_NLMSG_HEADER = struct.Struct("=IH")


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


@dataclass(frozen=True)
class ReadEarlier:
    """One packet's trace events that were read earlier and held back (`nftrace drops` holds
    the events of packets that are not drops, drops/deferred.py): the first was read at
    `first`, the others by `last`."""

    events: tuple
    first: float
    last: float

    def timed(self) -> Iterator[tuple]:
        """(event, when it was read), as the path builder is fed."""
        for index, event in enumerate(self.events):
            yield event, self.first if index == 0 else self.last


MonitorItem = Union[TraceEvent, RulesetChanged, TableDeleted, EventsLost, ReadEarlier]


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


def read_datagrams(sock: socket.socket, buffer, what: str = "trace events",
                   limit: Optional[int] = None) -> Iterator[Optional[bytes]]:
    """The datagrams queued on a non-blocking socket now (at most `limit`); an overrun
    (ENOBUFS) yields None. `buffer` may be a memoryview, which slices without copying."""
    left = -1 if limit is None else limit
    while left:
        left -= 1
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

    def __init__(self, rcvbuf: int = UNSIZED_RCVBUF):
        self.sock = open_netfilter_socket(rcvbuf)
        self._join(NFNLGRP_NFTRACE)
        self.rcvbuf = rcvbuf
        self.overruns = 0
        self._buffer = bytearray(1 << 20)
        self._view = memoryview(self._buffer)
        self._inode = os.fstat(self.sock.fileno()).st_ino

    def _join(self, group: int) -> None:
        try:
            self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        except OSError as err:
            raise KernelError(f"cannot join netfilter netlink group {group}: {err.strerror}") from None

    def watch_ruleset(self) -> None:
        """Also receive ruleset changes (joined after nftrace's own changes are in)."""
        self._join(NFNLGRP_NFTABLES)

    def keep_only(self, program: Program, what: str) -> None:
        """From now on the kernel queues only the datagrams `program` keeps (sockfilter.py)."""
        attach(self.sock, program, what)

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

    @property
    def drained(self) -> bool:
        """Nothing is queued on the socket now (reads come in batches: a backlog may remain)."""
        ready, _, _ = select.select([self.sock], [], [], 0)
        return not ready

    def read_raw(self, limit: Optional[int] = None) -> Iterator[Optional[bytes]]:
        """The datagrams queued now (at most `limit`); an overrun yields None, is counted, and
        reading goes on."""
        for datagram in read_datagrams(self.sock, self._view, limit=limit):
            if datagram is None:
                self.overruns += 1
            yield datagram

    def read(self, limit: Optional[int] = READ_BATCH) -> Iterator[MonitorItem]:
        """Decode what is queued now (up to `limit` datagrams; None: until the socket is empty)
        into trace events and ruleset notices."""
        header = _NLMSG_HEADER.unpack_from
        for datagram in self.read_raw(limit):
            if datagram is None:
                yield EventsLost()
                continue
            length, msg_type = header(datagram, 0) if len(datagram) >= 16 else (0, 0)
            if msg_type == TRACE_MESSAGE_TYPE and length == len(datagram):
                # The kernel sends each trace event in a datagram of its own.
                yield decode_trace_message(datagram)
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
            yield RulesetChanged(read_message(raw, _GENERATION).get("NFTA_GEN_ID"))
        elif msg_type == DELTABLE_TYPE:
            name = read_message(raw, _TABLE_NAME).get("NFTA_TABLE_NAME") or ""
            yield TableDeleted(raw[16], name if isinstance(name, str) else name.decode("utf-8", "replace"))
