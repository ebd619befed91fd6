"""The netlink socket that receives trace events and ruleset changes in one namespace.

One raw NETLINK_NETFILTER socket joins NFNLGRP_NFTRACE (trace events) and, once the
trace rules are in, NFNLGRP_NFTABLES (ruleset changes). Both arrive on the same socket, so
a generation change is seen in order with the trace events around it. The socket is read
in batches of up to READ_BATCH datagrams per wake-up, without waiting in between: the kernel
queues datagrams, and a reader that takes one per wake-up falls behind under a flood, while
one that drains a backlog of a million events in a single call never lets its caller expire
finished packets. How big the receive buffer may grow is decided in rcvbuf.py.

Where events were lost: the kernel reports an overflow (ENOBUFS) once, and stays silent about
later ones until the socket has been read empty, which under a sustained flood may never
happen. Its drop counter (SO_MEMINFO) says every one. So after reading each batch, before
handing it out, the monitor reads that counter: events lost since the last batch lie after
everything read before this batch (they were lost after it was read), so a loss is reported
in front of the batch. And they lie before everything queued after now: once as many bytes
as the socket holds now have been read past this batch, every datagram read was queued after
the loss (`LossWindow`), and packets that start there are whole again. The socket counts
what it holds in the kernel's memory per datagram (truesize): the datagram and its struct
sk_buff, so each datagram read is counted as its length and SKB_OVERHEAD, less than that.
"""

from __future__ import annotations

import errno
import functools
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Union

from ..errors import KernelError
from ..trace.events import TRACE_MESSAGE_TYPE, TraceEvent, decode_trace_message
from .netlink import (NETLINK_ADD_MEMBERSHIP, NETLINK_NETFILTER, NFNL_SUBSYS_NFTABLES, NFNLGRP_NFTABLES,
                      NFNLGRP_NFTRACE, NFT_MSG_DELTABLE, NFT_MSG_NEWGEN, SO_RCVBUFFORCE, SOL_NETLINK, compact_table,
                      decode_datagram, message_type, read_message)
from .sockfilter import Program, attach

DELTABLE_TYPE = message_type(NFNL_SUBSYS_NFTABLES, NFT_MSG_DELTABLE)
NEWGEN_TYPE = message_type(NFNL_SUBSYS_NFTABLES, NFT_MSG_NEWGEN)
# Receive buffer of a monitor made without a size (nftrace's runs size theirs with rcvbuf.py).
UNSIZED_RCVBUF = 64 * 1024 * 1024
# Datagrams read per call of read(): enough to make the wake-up cost nothing, few enough that
# the caller gets control back every few tens of milliseconds while it drains a backlog.
READ_BATCH = 4096
_NLMSG_HEADER = struct.Struct("=IH")
# getsockopt(SO_MEMINFO): u32 sk_meminfo[SK_MEMINFO_VARS] (linux/sock_diag.h).
SO_MEMINFO = 55
_MEMINFO = struct.Struct("=9I")
_MEMINFO_RMEM_ALLOC, _MEMINFO_DROPS = 0, 8
# A lower bound of what a queued datagram costs the socket besides its bytes: struct sk_buff
# (232 bytes on 6.x, over 200 on every kernel), without its shared info (320 more).
SKB_OVERHEAD = 200


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
    """The socket overflowed since the previous batch: events after everything read before
    this one are gone (see the module)."""


@dataclass
class LossWindow:
    """Where a socket's losses lie in the stream of bytes read from it (see the module).

    Pure: the monitor tells it what it read and what the kernel's counters said."""

    position: int = 0  # bytes read so far, each datagram counted with SKB_OVERHEAD
    drops: int = 0  # the kernel's drop counter, as last seen
    clean_from: int = 0  # everything read from here on was queued after the last loss

    def observe(self, drops: int, queued: int, batch: int, overrun: bool = False) -> bool:
        """Counters read after reading a `batch` of bytes (`overrun`: the reads said ENOBUFS),
        with at most `queued` bytes still in the socket: whether events were lost since the
        previous batch was read."""
        if drops <= self.drops and not overrun:
            return False
        self.drops = max(drops, self.drops)
        self.clean_from = self.position + batch + queued
        return True

    def advance(self, size: int) -> None:
        self.position += size

    @property
    def behind(self) -> bool:
        """Everything queued before the last loss has been read."""
        return self.position >= self.clean_from


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
                   limit: Optional[int] = None) -> list[Optional[bytes]]:
    """The datagrams queued on a non-blocking socket now (at most `limit`), in a list (built
    faster than a generator yields); an overrun (ENOBUFS) is a None in it. `buffer` may be a
    memoryview, which slices without copying."""
    datagrams: list[Optional[bytes]] = []
    append, receive = datagrams.append, sock.recv_into
    left = -1 if limit is None else limit
    while left:
        left -= 1
        try:
            size = receive(buffer)
        except BlockingIOError:
            break
        except OSError as err:
            if err.errno == errno.ENOBUFS:
                append(None)
                continue
            raise KernelError(f"reading {what} failed: {err.strerror}") from None
        append(bytes(buffer[:size]))
    return datagrams


class TraceMonitor:
    """Receives trace events; counts every event the kernel had to drop for lack of room."""

    def __init__(self, rcvbuf: int = UNSIZED_RCVBUF, counted: bool = False):
        """`counted`: count the datagrams offered to the socket (see time_queue), from before
        it joins any group."""
        self.sock = open_netfilter_socket(rcvbuf)
        self.rcvbuf = rcvbuf
        self.overruns = 0
        self.losses = LossWindow()
        self._buffer = bytearray(1 << 20)
        self._view = memoryview(self._buffer)
        self._inode = os.fstat(self.sock.fileno()).st_ino
        self.stash = None  # see hold_back
        # See time_queue: the bounds on when the datagrams of the batch being read were queued.
        self.queued_after: Optional[float] = None
        self.queued_by: Optional[float] = None
        self._queue_counter = self._count_datagrams() if counted else None  # queuetime.QueueCounter
        self._queue_clock = None  # queuetime.QueueClock
        self._datagrams_read = 0
        try:
            self._join(NFNLGRP_NFTRACE)
        except KernelError:
            self.close()
            raise

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
        self._stop_counting()
        attach(self.sock, program, what)

    def hold_back(self, stash) -> None:
        """From now on the kernel stashes trace events (drops/eventstash.py: EventStash), and
        this monitor hands over the records it queues ahead of the socket's datagrams; it
        closes the stash with the socket."""
        self._stop_counting()
        stash.attach(self.sock)
        self.stash = stash

    def _count_datagrams(self):
        """The socket's datagram counter, attached; None where there is no eBPF here."""
        from .queuetime import QueueCounter  # eBPF: loaded only where kernel drops are paired

        try:
            counter = QueueCounter()
        except KernelError:
            return None
        try:
            counter.attach(self.sock)
        except KernelError:
            counter.close()
            return None
        return counter

    def _stop_counting(self) -> None:
        """Another filter of nftrace's replaces the counter on the socket."""
        if self._queue_counter is not None:
            self._queue_counter.close()
            self._queue_counter = self._queue_clock = None

    def time_queue(self) -> bool:
        """Sample the datagram count from now on (kernel/queuetime.py), so that `queued_by`
        bounds when each batch read was queued; False where that cannot be: the monitor was not
        `counted` (or no eBPF here), or a filter of nftrace's replaced the counter. The count
        starts before the socket joins a group: a datagram it missed (a ruleset change queued
        before it, a traced packet's event) would put every datagram read after it one place
        ahead of the count, and the last batch of a backlog after every sample: unbounded."""
        if self._queue_counter is None:
            return False
        if self._queue_clock is None:
            from .queuetime import QueueClock

            self._queue_clock = QueueClock()
        return True

    def sample_queue(self) -> None:
        """Note how many datagrams were offered to the socket by now (once per round of reads)."""
        if self._queue_clock is not None:
            offered = self._queue_counter.offered()
            self._queue_clock.sample(offered, time.monotonic())

    def fileno(self) -> int:
        return self.sock.fileno()

    def dropped_messages(self) -> int:
        """Messages the kernel dropped on this socket, from the Drops column of /proc/net/netlink.

        ENOBUFS only says that something was lost; the socket's drop counter says how much.
        """
        return self._meminfo()[1] or socket_drops(self._inode)

    def wait(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        return bool(ready)

    @property
    def drained(self) -> bool:
        """Nothing is queued on the socket now (reads come in batches: a backlog may remain)."""
        ready, _, _ = select.select([self.sock], [], [], 0)
        return not ready and (self.stash is None or self.stash.empty)

    def read_raw(self, limit: Optional[int] = None) -> Iterator[Optional[bytes]]:
        """The datagrams queued now (at most `limit`; None: until the socket is empty), in
        batches of at most READ_BATCH, each with a None in front of it where events were lost
        since the previous batch (see the module); reading goes on."""
        for batch in self._batches(limit):
            yield from batch

    def _batches(self, limit: Optional[int]) -> Iterator[list]:
        """read_raw's batches, as lists."""
        if self.stash is not None:
            yield list(self.stash.read())
        left = limit
        while left is None or left > 0:
            wanted = READ_BATCH if left is None else min(left, READ_BATCH)
            read = read_datagrams(self.sock, self._view, limit=wanted)
            batch = [datagram for datagram in read if datagram is not None]
            first = self._datagrams_read + 1  # at least the first offered after those read before
            received = len(batch)
            overruns = len(read) - received  # ENOBUFS reads: each counted as one of the batch's reads
            self.overruns += overruns
            size = sum(map(len, batch)) + SKB_OVERHEAD * received
            queued, drops = self._meminfo()
            self._datagrams_read += received
            if self._queue_clock is not None:
                # The batch's last datagram was offered at this place at the latest (those the
                # kernel dropped came before it or after), and every other one before it; its
                # first one at `first` at the earliest.
                self.queued_after = self._queue_clock.queued_after(first)
                self.queued_by = self._queue_clock.queued_by(self._datagrams_read + drops)
            if self.losses.observe(drops, queued, size, overruns > 0):
                batch.insert(0, None)
            self.losses.advance(size)
            yield batch
            if len(read) < wanted:
                return  # read empty
            if left is not None:
                left -= len(read)

    def _meminfo(self) -> tuple[int, int]:
        """(bytes queued, messages dropped) as the kernel counts them for this socket."""
        try:
            info = _MEMINFO.unpack(self.sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO.size))
        except OSError:  # not on this kernel: the overruns alone say when, the buffer's size how far
            return 2 * self.rcvbuf, 0
        return info[_MEMINFO_RMEM_ALLOC], info[_MEMINFO_DROPS]

    @property
    def behind_losses(self) -> bool:
        """Every datagram queued before the last loss has been read: packets starting now are whole."""
        return self.losses.behind

    def read(self, limit: Optional[int] = READ_BATCH) -> Iterator[MonitorItem]:
        """Decode what is queued now (up to `limit` datagrams; None: until the socket is empty)
        into trace events and ruleset notices."""
        header = _NLMSG_HEADER.unpack_from
        for batch in self._batches(limit):
            for datagram in batch:
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
        if self.stash is not None:
            self.stash.close()
        if self._queue_counter is not None:
            self._queue_counter.close()

    def __enter__(self) -> "TraceMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@functools.lru_cache(maxsize=None)
def _ruleset_notice_tables() -> tuple:
    """The one attribute of each ruleset notice that nftrace reads, from pyroute2's maps of them
    (imported with the first notice: netlink.py says why)."""
    from pyroute2.netlink.nfnetlink.nftsocket import nft_gen_msg, nft_table_msg

    return (compact_table(nft_gen_msg.nla_map, wanted={"NFTA_GEN_ID"}),
            compact_table(nft_table_msg.nla_map, wanted={"NFTA_TABLE_NAME"}))


def decode_monitor_datagram(datagram: bytes) -> Iterator[MonitorItem]:
    for msg_type, raw in decode_datagram(datagram):
        if msg_type == TRACE_MESSAGE_TYPE:
            yield decode_trace_message(raw)
        elif msg_type == NEWGEN_TYPE:
            yield RulesetChanged(read_message(raw, _ruleset_notice_tables()[0]).get("NFTA_GEN_ID"))
        elif msg_type == DELTABLE_TYPE:
            name = read_message(raw, _ruleset_notice_tables()[1]).get("NFTA_TABLE_NAME") or ""
            yield TableDeleted(raw[16], name if isinstance(name, str) else name.decode("utf-8", "replace"))
