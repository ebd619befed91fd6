"""When a trace event read now was queued, at the latest: a bound that lets the packets of a
backlog go without waiting for a kernel drop that would have come long ago.

A packet that netfilter accepted waits for a kernel drop before its answer is given
(drops/correlator.py: HOLD_SECONDS), since the drop follows its trace events within a moment
but is read from another source. The wait is counted from when nftrace read the packet's
events: under a backlog that is seconds after the kernel queued them, and their drops, if
any, were read long before. On the bench's flood such waits held thousands of finished packets
at a time, for nothing: a tenth of nftrace's CPU.

The kernel does not time trace events. So a socket filter counts every datagram offered to
the socket (`QueueCounter`: an eBPF program that keeps every datagram whole), and nftrace
samples the count once per round of reads (`QueueClock.sample`): every datagram counted by
then was queued before that moment. The socket is read in the order datagrams were queued,
and a datagram the kernel dropped for lack of room was counted first (the filter runs
before the room is checked): so the n-th datagram read, plus those dropped so far, was the
n-th offered at the latest, queued before the first sample whose count reached n; and it was
at least the n-th offered (those dropped only push it later), queued after the last sample
whose count was below n. Both bounds place a backlog's packets in time, where their reading
cannot: the kernel drops that follow them are paired by those times (drops/correlator.py).

Where no eBPF program can be loaded, or another filter is on the socket (`drops` has its
own), nothing bounds it: the time a packet was read stands in, as before.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from typing import Optional

from . import ebpf
from .ebpf import R0, R1, R6

_OFFERED = 0  # the counter's index


class QueueCounter:
    """An eBPF socket filter that counts the datagrams offered to a socket and keeps them all."""

    def __init__(self) -> None:
        self.counters = ebpf.Counters(1, "the count of trace datagrams")
        try:
            program = ebpf.Program().mov(R6, R1)
            self.counters.add(program, _OFFERED, None, -4)
            program.load(4, R0, R6, 0).exit()  # __sk_buff.len: the whole datagram
            self._fd: Optional[int] = ebpf.load(program, "the counter of trace datagrams")
        except BaseException:
            self.counters.close()
            raise

    def attach(self, sock: socket.socket) -> None:
        ebpf.attach(sock, self._fd, "the counter of trace datagrams")

    def offered(self) -> int:
        return self.counters.read(_OFFERED)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.counters.close()


class QueueClock:
    """Samples of (datagrams offered so far, when), and the bound they give a datagram read."""

    def __init__(self) -> None:
        self._samples: deque = deque()  # (offered, when), both rising
        self._before: Optional[float] = None  # the time of the latest sample forgotten

    def sample(self, offered: int, when: float) -> None:
        """`offered` datagrams were counted before `when` (read the count first)."""
        if not self._samples or offered > self._samples[-1][0]:
            self._samples.append((offered, when))

    def queued_by(self, offered: int) -> Optional[float]:
        """When the `offered`-th datagram (counting from 1) had been queued, at the latest; None
        if no sample counted it yet. Positions asked for never go down: samples before the one
        found are forgotten."""
        self._forget_below(offered)
        return self._samples[0][1] if self._samples else None

    def queued_after(self, offered: int) -> Optional[float]:
        """When the `offered`-th datagram had not been queued yet: the time of the latest
        sample that did not count it (None: no such sample). Positions asked for never go down."""
        self._forget_below(offered)
        return self._before

    def _forget_below(self, offered: int) -> None:
        samples = self._samples
        while samples and samples[0][0] < offered:
            self._before = samples.popleft()[1]
