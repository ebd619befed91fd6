"""Kernel drops after netfilter, watched by an eBPF program of nftrace's own (no bpftrace).

What bpftrace.py's program does, without bpftrace: bpftrace compiles its program with LLVM
at every start (three quarters of a CPU second and 110 MiB, half a second before it watches),
on every run of `why` and `drops`. This program is assembled in Python (kernel/ebpf.py) and
attached at once, at the raw tracepoint `kfree_skb` (no tracefs needed):
- it looks at a freed packet only if it carries the trace bit (`skb->nf_trace`, set by
  nftrace's mark chains), and only in the traced namespace (the packet's device's, or its
  socket's, namespace inode);
- it hands over, through a ring buffer that nftrace reads in place: the time (CLOCK_MONOTONIC,
  as time.monotonic), the drop reason, the code location, the network header's first 40
  bytes and the transport header's first 4 (ports), read here into a KernelDrop.

The offsets of the kernel's structures come from its BTF (kernel/btf.py), the reason names
from its `enum skb_drop_reason`. Where any of it is missing, `start` raises
DropReasonsUnavailable and the session falls back on bpftrace (bpftrace.py).
"""

from __future__ import annotations

import os
import struct
from typing import Callable, Optional

from ..errors import KernelError
from ..kernel import ebpf
from ..kernel.btf import Btf, BtfError
from ..kernel.ebpf import R0, R1, R2, R3, R4, R6, R7, R8, R9, R10
from ..kernel.system import current_netns
from ..trace.events import kept_address
from ..protocols import PORT_PROTOCOL_NUMBERS
from .bpftrace import BPFTRACE_ENV, DropReasonsUnavailable, KernelDropWatcher, KernelSymbols
from .reasons import KernelDrop

WATCHER_ENV = "NFTRACE_DROP_WATCHER"  # "bpftrace": bpftrace even where nftrace's own program loads
TRACEPOINT = "kfree_skb"  # its arguments: skb, location, reason (and, since 6.12, the receiving socket)
REASON_PREFIX = "SKB_DROP_REASON_"
RING_BYTES = 1 << 22  # 4 MiB: 52,000 drops not read yet (80 bytes each, with the ring's header)
RECORD = struct.Struct("=QQII40s4s4x")  # time, location, reason, unused, network header, transport's first 4 bytes
NETWORK_HEADER = 40

# The record on the program's stack, and two scratch slots.
_RECORD_AT = -8 - RECORD.size
_BYTE, _WORD = -8, _RECORD_AT - 8
# Where each field read is, by the kernel's BTF.
_FIELDS = {"nf_trace": ("sk_buff", "nf_trace"), "dev": ("sk_buff", "dev"), "sk": ("sk_buff", "sk"),
           "head": ("sk_buff", "head"), "network_header": ("sk_buff", "network_header"),
           "device_net": ("net_device", "nd_net.net"), "socket_net": ("sock", "__sk_common.skc_net.net"),
           "inum": ("net", "ns.inum")}


def _read(p: ebpf.Program, size: int, into: int, pointer: int, offset: int, failed: str) -> None:
    """Stack slot `into` = `size` bytes of kernel memory at register `pointer` + `offset`."""
    p.mov(R1, R10).add_imm(R1, into).mov_imm(R2, size).mov(R3, pointer).add_imm(R3, offset)
    p.call(ebpf.PROBE_READ_KERNEL).jump_if_imm("!=", R0, 0, failed)


def watch_program(fields: dict, netns_inode: int, ring: ebpf.RingBuffer, lost: ebpf.Counters) -> ebpf.Program:
    """The raw-tracepoint program (see the module); `fields`: _FIELDS' names → btf.Field;
    `lost`: one counter, the drops that found the ring full."""
    p = ebpf.Program()
    p.mov(R6, R1).load(8, R7, R6, 0)  # the tracepoint's arguments; R7: the skb
    trace = fields["nf_trace"]
    _read(p, 1, _BYTE, R7, trace.offset, "out")
    p.load(1, R0, R10, _BYTE).rsh_imm(R0, trace.bit).and_imm(R0, 1).jump_if_imm("==", R0, 0, "out")
    # Its namespace: its device's, or, without a device, its socket's.
    _read(p, 8, _WORD, R7, fields["dev"].offset, "out")
    p.load(8, R8, R10, _WORD).jump_if_imm("==", R8, 0, "by_socket")
    _read(p, 8, _WORD, R8, fields["device_net"].offset, "out")
    p.jump("have_net")
    p.label("by_socket")
    _read(p, 8, _WORD, R7, fields["sk"].offset, "out")
    p.load(8, R8, R10, _WORD).jump_if_imm("==", R8, 0, "out")
    _read(p, 8, _WORD, R8, fields["socket_net"].offset, "out")
    p.label("have_net")
    p.load(8, R8, R10, _WORD).jump_if_imm("==", R8, 0, "out")
    _read(p, 4, _WORD, R8, fields["inum"].offset, "out")
    p.load(4, R0, R10, _WORD).mov32_imm(R1, netns_inode).jump_if("!=", R0, R1, "out")
    # The record: time, location, reason, headers.
    for offset in range(0, RECORD.size, 8):
        p.store_imm(8, R10, _RECORD_AT + offset, 0)
    p.call(ebpf.KTIME_GET_NS).store(8, R10, _RECORD_AT, R0)
    p.load(8, R0, R6, 8).store(8, R10, _RECORD_AT + 8, R0)
    p.load(8, R0, R6, 16).store(4, R10, _RECORD_AT + 16, R0)
    _read(p, 8, _WORD, R7, fields["head"].offset, "out")
    p.load(8, R8, R10, _WORD)
    _read(p, 2, _WORD, R7, fields["network_header"].offset, "out")
    p.load(2, R0, R10, _WORD).add(R8, R0)  # R8: the network header
    _read(p, NETWORK_HEADER, _RECORD_AT + 24, R8, 0, "out")
    p.load(1, R0, R10, _RECORD_AT + 24).mov(R9, R0).rsh_imm(R9, 4)
    p.jump_if_imm("==", R9, 6, "ipv6").jump_if_imm("!=", R9, 4, "emit")
    p.and_imm(R0, 15).lsh_imm(R0, 2).mov(R9, R0).jump("ports")  # IPv4: the header's length
    p.label("ipv6").mov_imm(R9, NETWORK_HEADER)
    p.label("ports").add(R8, R9)
    _read(p, 4, _RECORD_AT + 24 + NETWORK_HEADER, R8, 0, "emit")
    p.label("emit")
    p.load_map(R1, ring.fd).mov(R2, R10).add_imm(R2, _RECORD_AT).mov_imm(R3, RECORD.size).mov_imm(R4, 0)
    p.call(ebpf.RINGBUF_OUTPUT).jump_if_imm("==", R0, 0, "out")
    lost.add(p, 0, None, _WORD)
    p.label("out").mov_imm(R0, 0).exit()
    return p


def parse_record(record: bytes, reason_names: dict, symbols=None) -> Optional[KernelDrop]:
    """A record of the program as a KernelDrop; None if its header is neither IPv4 nor IPv6."""
    nanoseconds, location, reason, _, network, ports = RECORD.unpack_from(record)
    version = network[0] >> 4
    if version == 4:
        proto, src, dst = network[9], network[12:16], network[16:20]
    elif version == 6:
        proto, src, dst = network[6], network[8:24], network[24:40]
    else:
        return None
    sport, dport = struct.unpack(">HH", ports) if proto in PORT_PROTOCOL_NUMBERS else (None, None)
    return KernelDrop(time=nanoseconds / 1e9, reason=reason_names.get(reason, f"reason-{reason}"),
                      location=f"0x{location:x}", src=kept_address(bytes(src)), dst=kept_address(bytes(dst)),
                      proto=proto, sport=sport, dport=dport, symbols=symbols)


class EbpfDropWatcher:
    """The drops of traced packets in one namespace, as bpftrace.KernelDropWatcher gives them
    (same methods), from nftrace's own program: ready as soon as it is started."""

    ready = True

    def __init__(self, ring: ebpf.RingBuffer, lost: ebpf.Counters, program_fd: int, link_fd: int, reason_names: dict):
        self.ring, self._lost, self._program_fd, self._link_fd = ring, lost, program_fd, link_fd
        self.reason_names = reason_names
        self.symbols = KernelSymbols()
        self.ended = False

    @classmethod
    def start(cls, netns_inode: Optional[int] = None, ring_bytes: int = RING_BYTES) -> "EbpfDropWatcher":
        try:
            btf = Btf.load()
            fields = {name: btf.field(*where) for name, where in _FIELDS.items()}
            reasons = {number: name[len(REASON_PREFIX):]
                       for name, number in btf.enum_values("skb_drop_reason").items() if name.startswith(REASON_PREFIX)}
        except BtfError as err:
            raise DropReasonsUnavailable(str(err)) from None
        inode = current_netns() if netns_inode is None else netns_inode
        ring = lost = program_fd = None
        try:
            ring = ebpf.RingBuffer(ring_bytes, "nftrace's ring of kernel drops")
            lost = ebpf.Counters(1, "nftrace's count of kernel drops not recorded")
            program_fd = ebpf.load(watch_program(fields, inode, ring, lost), "the kernel drop watcher",
                                   ebpf.PROG_TYPE_RAW_TRACEPOINT)
            link_fd = ebpf.attach_raw_tracepoint(TRACEPOINT, program_fd, "the kernel drop watcher")
        except KernelError as err:
            if program_fd is not None:
                os.close(program_fd)
            for made in (ring, lost):
                if made is not None:
                    made.close()
            raise DropReasonsUnavailable(str(err)) from None
        return cls(ring, lost, program_fd, link_fd, reasons)

    def fileno(self) -> int:
        return self.ring.fileno()

    def wait_ready(self, timeout: float = 0.0) -> None:
        """Attached when started."""

    @property
    def lost(self) -> int:
        """Drops that found the ring full (nftrace fell behind reading it): not recorded."""
        return 0 if self.ended else self._lost.read(0)

    def failure(self) -> str:
        return "the kernel drop watcher stopped"

    def read(self, limit: Optional[int] = None) -> list:
        """The drops recorded since the last read (at most `limit`: the others wait in the ring,
        which holds RING_BYTES of them)."""
        if self.ended:
            return []
        drops = (parse_record(record, self.reason_names, self.symbols) for record in self.ring.records(limit))
        return [drop for drop in drops if drop is not None]

    def close(self) -> None:
        if self.ended:
            return
        self.ended = True
        os.close(self._link_fd)
        os.close(self._program_fd)
        self.ring.close()
        self._lost.close()

    def __enter__(self) -> "EbpfDropWatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_watcher(netns_inode: Optional[int] = None):
    """nftrace's own watcher; bpftrace's where it cannot load, or where asked for
    (NFTRACE_DROP_WATCHER=bpftrace, or NFTRACE_BPFTRACE naming one)."""
    if os.environ.get(WATCHER_ENV) != "bpftrace" and not os.environ.get(BPFTRACE_ENV):
        try:
            return EbpfDropWatcher.start(netns_inode)
        except DropReasonsUnavailable:
            pass
    return KernelDropWatcher.start(netns_inode=netns_inode)


def start_drop_watcher(warn: Callable[[str], None]):
    """A watcher for the current namespace, or None after one warning saying why not."""
    try:
        return start_watcher()
    except DropReasonsUnavailable as err:
        warn(f"kernel drop reasons unavailable: {err}")
        return None
