"""The kernel holds each packet's trace events until the packet's fate is known, and hands
over only those of packets that can be drops.

`drops` traces every packet of its filter and reports the few that were dropped. The classic
socket filter (eventfilter.py) keeps the events the answer needs, but it sees one event at a
time: a packet's first events (where it was, its headers) come before anything says how it
ends, so it must keep them for every packet, and on a busy box nearly every packet is
accepted. Three events per accepted packet were what nftrace read, decoded and threw away:
under a flood, more than Python keeps up with, and a 16 MiB receive buffer holds 35 ms of it.

An eBPF socket filter can keep state. This one runs the same walk and the same choice of
events as the classic filter, and then, instead of queueing a kept event on the socket,
appends it to its packet's stash (a map keyed by trace id):
- an event that ends the packet in a drop (a rule's drop, queue or stolen verdict, a policy
  that is not accept), or that sends it out through loopback (it comes back in, and its way
  in may be the drop): the stash goes to a queue map as one record, and is let go;
- nftrace's observation chain at input or postrouting (netfilter let the packet through):
  the stash stays, marked accepted, until the map needs the room or nftrace's mark rule
  starts a packet under the same trace id (ids are reused): the kernel may still drop the
  packet after netfilter, and then `drops` asks for what is stashed (`dump`);
- every other event the classic filter keeps waits in the stash;
- datagrams that are not trace events (ruleset changes) go on the socket, as before.
After an unexplained kernel drop, `everything(True)` turns the stash off: kept events go on
the socket again, as with the classic filter, for as long as drops/deferred.py builds every
packet.

A record is the stash as the kernel had it: a header, then the packet's events as the kernel
sent them (netlink messages, one after the other), so deferred.py reads them as it reads
datagrams. A record that finds the queue full is lost: the program counts its events, and
nftrace reports them as lost events, as it does the socket's.

Where the kernel or the process cannot load eBPF, drops uses the classic filter (`available`).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from ..errors import InputError, KernelError
from ..kernel import ebpf
from ..kernel.ebpf import R0, R1, R2, R3, R4, R6, R7, R8, R9, R10
from ..kernel.netlink import NFGENMSG_END, NLA_TYPE_MASK
from ..kernel.tracetable import MARK_CHAIN_PREFIX, OBSERVE_CHAIN_PREFIX, TRACE_TABLE_PREFIX
from ..trace.events import FINAL_VERDICTS, TRACE_MESSAGE_TYPE, TRACE_TYPES, VERDICT_NAMES
from .eventfilter import FIRST_EVENT_ATTRIBUTES, GOING_ON, TRACE_NUMBERS, VERDICT_CODE, WALK_STEPS

# A stash (and a record): header, then events. 2 KiB holds a forwarded packet's kept events
# (nftrace's mark chain, a base chain's first event per hook, the end: ~300 bytes each).
RECORD_HEADER = struct.Struct("=IIIIQQ")  # bytes of events, events, flags, unused, first and last event (ns)
RECORD_SIZE = 2048
EVENTS_ROOM = RECORD_SIZE - RECORD_HEADER.size
MAX_EVENT = 512  # a trace event is at most ~400 bytes (headers are cut at 40); a longer one goes on the socket
STASH_PACKETS = 4096  # packets stashed at once (LRU: the oldest accepted go first)
QUEUE_RECORDS = 4096  # records waiting for nftrace: 8 MiB
QUEUE_RECORDS_ENV = "NFTRACE_STASH_RECORDS"  # another size (tests: a queue small enough to fill)
ACCEPTED = 1  # flags: netfilter let the packet through
LOST_EVENTS, PACKETS_ACCEPTED = range(2)  # the counters map
_BRIDGE_FAMILY = 7  # NFPROTO_BRIDGE

_TYPES = {name: number for number, name in TRACE_TYPES.items()}
_VERDICTS = {name: number for number, name in VERDICT_NAMES.items()}
# Stack slots (offsets from R10). The walk notes where each attribute is in a table of slots
# indexed by attribute type (one store at a computed offset, not a branch per type: the
# verifier follows every branch of every step of a loop, and a branch per type was more paths
# than it explores).
_READ, _KIND, _KEY, _ZERO, _NOW = -8, -16, -24, -32, -40  # _READ: up to 8 bytes read from the event
_WHERE = -256  # the table: attribute type N's offset at _WHERE + 8 * N
_TYPES_NOTED = len(TRACE_NUMBERS)


def _where(name: str) -> int:
    return _WHERE + 8 * TRACE_NUMBERS[name]


# What an event is to its packet.
_DISCARD, _WAIT, _MARK, _FINAL, _ACCEPTED = range(5)


def _be32(value: int) -> int:
    """A big-endian 32-bit attribute value as a 4-byte load on this machine reads it."""
    return struct.unpack("=I", struct.pack(">I", value & 0xFFFFFFFF))[0]


def _word(text: bytes) -> int:
    """The first 8 bytes of a name as an 8-byte load on this machine reads them."""
    return struct.unpack("=Q", text[:8].ljust(8, b"\0"))[0]


def _read(program: ebpf.Program, slot: int, plus: int, length: int, missing: str) -> None:
    """_READ = `length` bytes of the event at (the offset noted in `slot`) + `plus`; to
    `missing` if the walk did not find the attribute or the bytes are not there."""
    program.load(8, R2, R10, slot).jump_if_imm("==", R2, 0, missing)
    program.add_imm(R2, plus).mov(R1, R6).mov(R3, R10).add_imm(R3, _READ).mov_imm(R4, length)
    program.call(ebpf.SKB_LOAD_BYTES).jump_if_imm("!=", R0, 0, missing)


def _jump_if_u32(program: ebpf.Program, register: int, value: int, target: str, op: str = "==") -> None:
    """Compare a zero-extended 32-bit load with `value` (immediates are sign-extended)."""
    program.mov32_imm(R4, value).jump_if(op, register, R4, target)


def stash_program(stash: ebpf.Map, blank: ebpf.Map, queue: ebpf.Map, config: ebpf.Map, counters: ebpf.Counters,
                  loopback: Iterable[int]) -> ebpf.Program:
    """The socket filter (see the module). `blank` is an array map with one zeroed value, to
    start a stash from (a program's stack is too small for one)."""
    p = ebpf.Program()
    p.mov(R6, R1)
    # Not a trace event (a ruleset change): on the socket.
    p.mov(R1, R6).mov_imm(R2, 0).mov(R3, R10).add_imm(R3, _READ).mov_imm(R4, 8).call(ebpf.SKB_LOAD_BYTES)
    p.jump_if_imm("!=", R0, 0, "pass")
    p.load(2, R0, R10, _READ + 4).jump_if_imm("!=", R0, TRACE_MESSAGE_TYPE, "pass")
    for slot in (*(_WHERE + 8 * number for number in range(_TYPES_NOTED)), _KIND, _ZERO, _KEY, _NOW):
        p.store_imm(8, R10, slot, 0)
    _walk(p)
    _classify(p, loopback)
    p.load(8, R0, R10, _KIND).jump_if_imm("==", R0, _DISCARD, "discard")
    # Everything on the socket (after an unexplained kernel drop)?
    p.load_map(R1, config.fd).mov(R2, R10).add_imm(R2, _ZERO).call(ebpf.MAP_LOOKUP_ELEM)
    p.jump_if_imm("==", R0, 0, "pass").load(8, R0, R0, 0).jump_if_imm("!=", R0, 0, "pass")
    p.load(4, R7, R6, 0).jump_if_imm(">", R7, MAX_EVENT, "pass").jump_if_imm("<", R7, 16, "pass")  # skb->len
    _read(p, _where("NFTA_TRACE_ID"), 4, 4, "pass")
    p.load(4, R0, R10, _READ).store(4, R10, _KEY, R0)
    p.call(ebpf.KTIME_GET_NS).store(8, R10, _NOW, R0)
    _find_stash(p, stash, blank)  # R9: the stash
    # nftrace's mark rule starts a packet: an accepted one stashed under the same id is over.
    p.load(8, R0, R10, _KIND).jump_if_imm("!=", R0, _MARK, "started")
    p.load(4, R0, R9, 8).jump_if_imm("&", R0, ACCEPTED, "restart").jump("started")
    p.label("restart").store_imm(4, R9, 0, 0).store_imm(4, R9, 4, 0).store_imm(4, R9, 8, 0)
    p.label("started")
    p.load(4, R8, R9, 0).jump_if_imm("!=", R8, 0, "has_events")
    p.load(8, R0, R10, _NOW).store(8, R9, 16, R0)
    p.label("has_events")
    # Full: what is stashed goes as a record of its own (deferred.py joins them by trace id).
    p.jump_if_imm("<=", R8, EVENTS_ROOM - MAX_EVENT, "room")
    _push(p, queue, counters)
    p.mov_imm(R8, 0).store_imm(4, R9, 0, 0).store_imm(4, R9, 4, 0)
    p.load(8, R0, R10, _NOW).store(8, R9, 16, R0)
    p.label("room")  # (the verifier's proof of room: the checks again, R7 was read anew on the way)
    p.jump_if_imm(">", R8, EVENTS_ROOM - MAX_EVENT, "discard")
    p.jump_if_imm(">", R7, MAX_EVENT, "pass").jump_if_imm("<", R7, 16, "pass")
    p.mov(R1, R6).mov_imm(R2, 0).mov(R3, R9).add_imm(R3, RECORD_HEADER.size).add(R3, R8).mov(R4, R7)
    p.call(ebpf.SKB_LOAD_BYTES).jump_if_imm("!=", R0, 0, "pass")
    p.add(R8, R7).store(4, R9, 0, R8)
    p.load(4, R0, R9, 4).add_imm(R0, 1).store(4, R9, 4, R0)
    p.load(8, R0, R10, _NOW).store(8, R9, 24, R0)
    p.load(8, R0, R10, _KIND)
    p.jump_if_imm("==", R0, _FINAL, "final").jump_if_imm("==", R0, _ACCEPTED, "accepted").jump("discard")
    p.label("final")
    _push(p, queue, counters)
    p.load_map(R1, stash.fd).mov(R2, R10).add_imm(R2, _KEY).call(ebpf.MAP_DELETE_ELEM).jump("discard")
    p.label("accepted")
    p.load(4, R0, R9, 8).or_imm(R0, ACCEPTED).store(4, R9, 8, R0)
    counters.add(p, PACKETS_ACCEPTED, None, _READ)
    p.label("discard").mov_imm(R0, 0).exit()
    p.label("pass").load(4, R0, R6, 0).exit()
    return p


def _walk(p: ebpf.Program) -> None:
    """Note where each attribute is (a bounded loop over them); the registers it uses are free after."""
    p.mov_imm(R7, NFGENMSG_END).mov_imm(R8, 0)
    p.label("walk").jump_if_imm(">=", R8, WALK_STEPS, "walked").add_imm(R8, 1)
    p.load(4, R9, R6, 0).mov(R0, R7).add_imm(R0, 4).jump_if(">", R0, R9, "walked")
    p.mov(R1, R6).mov(R2, R7).mov(R3, R10).add_imm(R3, _READ).mov_imm(R4, 4).call(ebpf.SKB_LOAD_BYTES)
    p.jump_if_imm("!=", R0, 0, "walked")
    p.load(2, R1, R10, _READ).load(2, R2, R10, _READ + 2).and_imm(R2, NLA_TYPE_MASK)
    p.jump_if_imm("<", R1, 4, "walked").jump_if_imm(">=", R2, _TYPES_NOTED, "next_attribute")
    p.lsh_imm(R2, 3).add(R2, R10).store(8, R2, _WHERE, R7)
    p.label("next_attribute").add_imm(R1, 3).and_imm(R1, -4).add(R7, R1).jump("walk")
    p.label("walked")


def _classify(p: ebpf.Program, loopback: Iterable[int]) -> None:
    """_KIND = what the event is to its packet (see the module): the classic filter's choice
    of events (eventfilter.py), and for those kept, whether they end the packet."""
    p.store_imm(8, R10, _KIND, _WAIT)
    _read(p, _where("NFTA_TRACE_TYPE"), 4, 4, "classified")  # an event without a type: waits
    p.load(4, R8, R10, _READ)  # R8: the type, as read
    # nftrace's own tables.
    _read(p, _where("NFTA_TRACE_TABLE"), 4, 8, "not_own")
    p.load(8, R0, R10, _READ).load_imm64(R1, _word(TRACE_TABLE_PREFIX.encode())).jump_if("!=", R0, R1, "not_own")
    _read(p, _where("NFTA_TRACE_CHAIN"), 4, 8, "classified")
    p.load(8, R9, R10, _READ)  # R9: the chain name's first 8 bytes
    prefix = MARK_CHAIN_PREFIX.encode()
    p.mov(R0, R9).load_imm64(R1, (1 << (8 * len(prefix))) - 1).and_(R0, R1)
    p.load_imm64(R1, _word(prefix)).jump_if("!=", R0, R1, "not_mark")
    p.store_imm(8, R10, _KIND, _MARK).jump("classified")
    p.label("not_mark")
    p.mov(R1, R6).mov_imm(R2, 16).mov(R3, R10).add_imm(R3, _READ).mov_imm(R4, 1).call(ebpf.SKB_LOAD_BYTES)
    p.jump_if_imm("!=", R0, 0, "classified")
    p.load(1, R0, R10, _READ).jump_if_imm("==", R0, _BRIDGE_FAMILY, "classified")  # nfgen_family
    # An observation chain's accept (its rule, or its policy): netfilter let the packet through.
    _jump_if_u32(p, R8, _be32(_TYPES["policy"]), "let_through")
    _read(p, _where("NFTA_TRACE_VERDICT"), 4, 8, "classified")
    p.load(4, R0, R10, _READ + 4)
    _jump_if_u32(p, R0, _be32(_VERDICTS["accept"]), "classified", op="!=")
    p.label("let_through")
    p.load_imm64(R1, _word((OBSERVE_CHAIN_PREFIX + "input").encode())).jump_if("==", R9, R1, "delivered")
    p.load_imm64(R1, _word((OBSERVE_CHAIN_PREFIX + "postrouting").encode())).jump_if("!=", R9, R1, "classified")
    # Out through loopback it comes back in: its way in may be the drop, so it goes on now.
    _read(p, _where("NFTA_TRACE_OIF"), 4, 4, "ends_here")
    p.load(4, R0, R10, _READ)
    for ifindex in sorted(loopback):
        _jump_if_u32(p, R0, _be32(ifindex), "ends_here")
    p.label("delivered").store_imm(8, R10, _KIND, _ACCEPTED).jump("classified")
    p.label("ends_here").store_imm(8, R10, _KIND, _FINAL).jump("classified")
    # Everyone else's chains: a final verdict or a policy that is not accept ends the packet.
    p.label("not_own")
    _jump_if_u32(p, R8, _be32(_TYPES["policy"]), "rule", op="!=")
    _read(p, _where("NFTA_TRACE_POLICY"), 4, 4, "classified")
    p.load(4, R0, R10, _READ)
    _jump_if_u32(p, R0, _be32(_VERDICTS["accept"]), "going_on")
    p.jump("ends_here")
    p.label("rule")
    _jump_if_u32(p, R8, _be32(_TYPES["return"]), "going_on")
    _read(p, _where("NFTA_TRACE_VERDICT"), 4, 8, "classified")  # a rule without a verdict: waits
    p.load(2, R0, R10, _READ + 2).and_imm(R0, NLA_TYPE_MASK).jump_if_imm("!=", R0, VERDICT_CODE, "classified")
    p.load(4, R0, R10, _READ + 4)
    for verdict in FINAL_VERDICTS:
        _jump_if_u32(p, R0, _be32(_VERDICTS[verdict]), "ends_here")
    for verdict in GOING_ON:
        _jump_if_u32(p, R0, _be32(_VERDICTS[verdict]), "going_on")
    p.jump("classified")
    # A packet going on inside a chain: only a base chain's first event is wanted.
    p.label("going_on")
    for name in FIRST_EVENT_ATTRIBUTES:  # a base chain's first event carries one of them
        p.load(8, R0, R10, _where(name)).jump_if_imm("!=", R0, 0, "classified")
    p.store_imm(8, R10, _KIND, _DISCARD)
    p.label("classified")


def _find_stash(p: ebpf.Program, stash: ebpf.Map, blank: ebpf.Map) -> None:
    """R9 = the stash of the event's trace id, made from `blank` if there is none."""
    p.load_map(R1, stash.fd).mov(R2, R10).add_imm(R2, _KEY).call(ebpf.MAP_LOOKUP_ELEM)
    p.mov(R9, R0).jump_if_imm("!=", R9, 0, "found")
    p.load_map(R1, blank.fd).mov(R2, R10).add_imm(R2, _ZERO).call(ebpf.MAP_LOOKUP_ELEM)
    p.jump_if_imm("==", R0, 0, "pass")
    p.load_map(R1, stash.fd).mov(R2, R10).add_imm(R2, _KEY).mov(R3, R0).mov_imm(R4, 0).call(ebpf.MAP_UPDATE_ELEM)
    p.load_map(R1, stash.fd).mov(R2, R10).add_imm(R2, _KEY).call(ebpf.MAP_LOOKUP_ELEM)
    p.mov(R9, R0).jump_if_imm("==", R9, 0, "pass")
    p.label("found")


def _push(p: ebpf.Program, queue: ebpf.Map, counters: ebpf.Counters) -> None:
    """The stash (R9) goes to the queue as a record; if the queue is full, its events are counted lost."""
    p.load_map(R1, queue.fd).mov(R2, R9).mov_imm(R3, 0).call(ebpf.MAP_PUSH_ELEM)
    label = f"pushed_{len(p)}"
    p.jump_if_imm("==", R0, 0, label)
    p.load(4, R7, R9, 4)  # (R7 is free again: the event's length is read anew)
    counters.add(p, LOST_EVENTS, R7, _READ)
    p.label(label).load(4, R7, R6, 0)


@dataclass
class StashedPacket:
    """A packet's events as the kernel stashed them, handed over by `EventStash.dump`."""
    datagrams: list
    first: float  # its first and latest events, on the monotonic clock
    last: float
    accepted: bool


def split_record(record: bytes) -> tuple[list, float, float, bool]:
    """(datagrams, first, last, accepted) of a record: the events one after the other."""
    length, _count_, flags, _, first_ns, last_ns = RECORD_HEADER.unpack_from(record)
    events, at, end = [], RECORD_HEADER.size, RECORD_HEADER.size + min(length, EVENTS_ROOM)
    while at + 16 <= end:
        size = struct.unpack_from("=I", record, at)[0]
        if size < 16 or at + size > end:
            break
        events.append(record[at:at + size])
        at += (size + 3) & ~3
    # bpf_ktime_get_ns() is CLOCK_MONOTONIC, the clock of time.monotonic().
    return events, first_ns / 1e9, last_ns / 1e9, bool(flags & ACCEPTED)


class EventStash:
    """The maps and program of one trace socket's stash (see the module)."""

    def __init__(self, loopback: Iterable[int]):
        what = "nftrace's event stash"
        records = queue_records()
        self._maps: list = []
        self.program_fd: Optional[int] = None
        try:
            self.stash = self._map(ebpf.MAP_LRU_HASH, 4, RECORD_SIZE, STASH_PACKETS, what)
            blank = self._map(ebpf.MAP_ARRAY, 4, RECORD_SIZE, 1, what)
            self.queue = self._map(ebpf.MAP_QUEUE, 0, RECORD_SIZE, records, what)
            self.config = self._map(ebpf.MAP_ARRAY, 4, 8, 1, what)
            self.counters = ebpf.Counters(2, what)
            self._maps.append(self.counters)
            self.program_fd = ebpf.load(stash_program(self.stash, blank, self.queue, self.config, self.counters,
                                                      loopback), "the filter that stashes trace events")
        except BaseException:
            self.close()
            raise
        self._everything = False
        self._accepted_seen = 0

    def _map(self, *args) -> ebpf.Map:
        made = ebpf.Map(*args)
        self._maps.append(made)
        return made

    def attach(self, sock) -> None:
        ebpf.attach(sock, self.program_fd, "the filter that stashes trace events")

    @property
    def lost_events(self) -> int:
        return self.counters.read(LOST_EVENTS)

    def newly_accepted(self) -> int:
        """Packets netfilter let through since the last call (never handed over: not drops)."""
        accepted = self.counters.read(PACKETS_ACCEPTED)
        new, self._accepted_seen = accepted - self._accepted_seen, accepted
        return new

    @property
    def empty(self) -> bool:
        return self.queue.lookup(b"") is None

    def read(self) -> Iterator[bytes]:
        """The events of the records queued now, in order. A record lost (the queue was full)
        takes no event of another packet with it: no loss to mark (the counter says it)."""
        while (record := self.queue.pop()) is not None:
            yield from split_record(record)[0]

    def everything(self, on: bool) -> None:
        """Kept events on the socket (True), or stashed (False)."""
        if on != self._everything:
            self.config.update(struct.pack("=I", 0), struct.pack("=Q", int(on)))
            self._everything = on

    def dump(self) -> list:
        """Every packet stashed now (taken out of the stash), in the order of its first event."""
        packets = []
        for key in self.stash.keys():
            try:
                record = self.stash.lookup_and_delete(key)
            except KernelError:  # hash maps take it from Linux 5.14
                record = self.stash.lookup(key)
                self.stash.delete(key)
            if record is not None:
                datagrams, first, last, accepted = split_record(record)
                if datagrams:
                    packets.append(StashedPacket(datagrams, first, last, accepted))
        packets.sort(key=lambda packet: packet.first)
        return packets

    def close(self) -> None:
        for made in self._maps:
            made.close()
        self._maps = []
        if self.program_fd is not None:
            os.close(self.program_fd)
            self.program_fd = None


def queue_records() -> int:
    configured = os.environ.get(QUEUE_RECORDS_ENV)
    if not configured:
        return QUEUE_RECORDS
    if not configured.isdigit() or not 0 < int(configured) <= 1 << 20:
        raise InputError(f"{QUEUE_RECORDS_ENV}: '{configured}' is not a number of records (1 to 1048576)")
    return int(configured)

