"""`nftrace drops` builds a packet's path only when the packet can be a drop.

`drops` traces every packet of its filter, and reports only those that were dropped: on a
busy box nearly every traced packet is accepted, and building its path (decoding its
events, its steps, its hooks, its NAT) is work thrown away. So the trace events of a packet
wait here, undecoded, as long as nothing says that it can be a drop:
- an event with a final verdict (drop, reject, queue, stolen) sends the packet's events on
  to the path builder at once, as every later event of it;
- an event of nftrace's own observation chain at input or postrouting (netfilter let the
  packet through; not out through loopback, which brings it back in) ends it as accepted:
  its events stay here, in case the kernel drops it after netfilter;
- a NETFILTER_DROP that no packet built explains (DropCorrelator.unexplained: not the echo
  of a rule's drop): the packets still open go on (one of them vanished inside netfilter);
- a kernel drop of another reason that no packet built explains, the ruleset changing:
  every packet waiting here goes on to the path builder, in the order its first
  event came, and for REMEMBER_SECONDS after the kernel's latest drop every event does (so
  that a late drop finds its packet answered, as in `why`); the path builder and the drop
  correlator then do exactly what they do without this;
- the socket overflowing: a packet still open, or one that starts before the socket is
  read empty, may miss events: the path builder would end it incomplete, never a drop; it
  is let go at once, which is what lets nftrace catch up;
- a packet still open after `idle_seconds` went idle: the path builder would call it
  incomplete, which is never a drop.
Packets kept as accepted are bounded (the latest `keep_packets` within `keep_seconds`, as
the correlator remembers answered packets), so memory stays flat under a flood. What is
read of an event here is its trace id and the part of it that every packet meeting the same
rule shares (events.trace_layout: a dictionary lookup), and, at the observation chain, the
output interface.

Only where paths are plain: no bridge and no egress device followed (their hooks can follow
postrouting); otherwise every event goes straight on, as without this.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from typing import Callable, Iterable, Iterator, Optional

from ..kernel.monitor import EventsLost, ReadEarlier, decode_monitor_datagram
from ..kernel.netlink import NLA_TYPE_MASK
from ..kernel.tracetable import MARK_CHAIN_PREFIX, OBSERVE_CHAIN_PREFIX, is_trace_table
from ..trace.events import FINAL_VERDICTS, TRACE_ATTRIBUTES, TRACE_MESSAGE_TYPE, decode_trace_message, trace_layout
from .correlator import REMEMBER_MAX, REMEMBER_SECONDS

_NUMBERS = {name: number for number, (name, _) in enumerate(TRACE_ATTRIBUTES)}
_OIF_NUMBER = _NUMBERS["NFTA_TRACE_OIF"]
_INTERFACE_NUMBERS = frozenset(_NUMBERS[name] for name in ("NFTA_TRACE_IIF", "NFTA_TRACE_IIFTYPE", "NFTA_TRACE_OIF",
                                                           "NFTA_TRACE_OIFTYPE"))
_ATTRIBUTE_HEADER = struct.Struct("=HH")
_BE32 = struct.Struct(">I")  # NFTA_TRACE_OIF is be32 (TRACE_ATTRIBUTES)
_FINAL, _DELIVERED, _SENT, _OTHER = range(4)
_NLMSG_HEADER = struct.Struct("=IH")


class _Packet:
    """The undecoded events of one packet (one trace id, from a base chain's first event).
    A plain class with slots: one is made per packet traced, at flood rates."""

    __slots__ = ("trace_id", "first", "last", "datagrams")

    def __init__(self, trace_id: int, first: float, last: float):
        self.trace_id = trace_id
        self.first = first  # when its first and latest events were read
        self.last = last
        self.datagrams: list = []


def _kind(template) -> int:
    """What an event of this template says about its packet's fate (cached per template)."""
    event = template.static
    if event.verdict in FINAL_VERDICTS:
        return _FINAL
    if is_trace_table(event.table) and event.chain.startswith(OBSERVE_CHAIN_PREFIX) \
            and event.family in ("inet", "ip", "ip6") and (event.type == "policy" or event.verdict == "accept"):
        hook = event.chain[len(OBSERVE_CHAIN_PREFIX):]
        if hook == "input":
            return _DELIVERED
        if hook == "postrouting":
            return _SENT
    return _OTHER


class DeferredPackets:
    """Holds back the events of packets that are not known to be drops (see the module), in
    front of `builder` (trace.paths.PathBuilder): an id whose packet it has open, and every
    event while it waits for the socket to be read empty after a loss, go straight on."""

    def __init__(self, builder, keep_packets: int = REMEMBER_MAX, keep_seconds: float = REMEMBER_SECONDS,
                 on_unbuilt: Callable[[int], None] = lambda count: None):
        self.builder = builder
        self.on_unbuilt = on_unbuilt  # told of packets let go without a path (accepted, or gone idle)
        self.loopback = builder.rejoin_ifindexes
        self.idle_seconds = builder.idle_seconds
        self.keep_packets = keep_packets
        self.keep_seconds = keep_seconds
        self._open: OrderedDict = OrderedDict()  # trace id -> _Packet, in order of last activity
        self._accepted: deque = deque()  # _Packet, in the order they were accepted
        self._order: deque = deque()  # every _Packet held, in the order of its first event
        self._kinds: dict = {}  # TraceTemplate -> _FINAL | _EXIT | _OTHER
        self._straight_until = 0.0
        self._release = self._release_open = False

    @property
    def held(self) -> int:
        return len(self._open) + len(self._accepted)

    def straight(self, now: float) -> bool:
        """Every event goes straight on now (after `suspend`)."""
        return now < self._straight_until

    def hold(self, packets: Iterable) -> None:
        """Hold packets whose events the kernel stashed (eventstash.StashedPacket), as if
        their events had been read here: accepted, or still open."""
        for stashed in packets:
            layout = trace_layout(stashed.datagrams[0])
            if layout is None:
                continue
            packet = _Packet(layout[0], stashed.first, stashed.last)
            packet.datagrams = stashed.datagrams
            self._order.append(packet)
            if stashed.accepted:
                self._accepted.append(packet)
            else:
                self._open[packet.trace_id] = packet

    def suspend(self, now: float, seconds: float = REMEMBER_SECONDS) -> None:
        """Everything held goes on at the next read, and every event for `seconds` from now."""
        self._release = True
        self._straight_until = max(self._straight_until, now + seconds)

    def read(self, datagrams: Iterable[Optional[bytes]], now: float) -> Iterator:
        """What the path builder must have now, decoded (trace events and the monitor's
        notices, in order), from a batch of datagrams read from the trace socket."""
        if self._release:
            yield from self.release()
        elif self._release_open:
            self._release_open = False
            for packet in list(self._open.values()):
                yield from self._send(packet)
        header = _NLMSG_HEADER.unpack_from
        for datagram in datagrams:
            if datagram is None:
                self._lost()
                yield EventsLost()
                continue
            length, msg_type = header(datagram, 0) if len(datagram) >= 16 else (0, 0)
            if msg_type != TRACE_MESSAGE_TYPE or length != len(datagram):
                # A ruleset change: what is held is built against the rules it met.
                yield from self.release()
                yield from decode_monitor_datagram(datagram)
                continue
            if now < self._straight_until:
                yield decode_trace_message(datagram)
                continue
            if self.builder.loss_pending:
                event = self._while_lost(datagram)
            else:
                event = self._offer(datagram, now)
            if event is not None:
                yield from event
        self._expire(now)

    def _while_lost(self, datagram: bytes) -> Optional[list]:
        """After a loss, until the socket has been read empty, a packet that starts may miss
        events: the path builder would end it incomplete, never a drop, so it is let go at
        once; the packets it has open get their events (see PathBuilder.mark_loss)."""
        layout = trace_layout(datagram)
        if layout is None:
            return [decode_trace_message(datagram)]
        trace_id, template, packet_at, end = layout
        if self.builder.building(trace_id):
            return [template.event(trace_id) if packet_at >= end else decode_trace_message(datagram)]
        if packet_at < end and template.static.chain.startswith(MARK_CHAIN_PREFIX) and is_trace_table(template.static.table):
            self.on_unbuilt(1)  # a packet's first event: nftrace's mark rule
        return None

    def _offer(self, datagram: bytes, now: float) -> Optional[list]:
        """Hold the event back (None), or the events that go on now."""
        layout = trace_layout(datagram)
        if layout is None:
            return [decode_trace_message(datagram)]
        trace_id, template, packet_at, end = layout
        packet = self._open.get(trace_id)
        if packet is None:
            if packet_at >= end or self.builder.building(trace_id):
                # Not a base chain's first event (a late event of a packet already done, or the
                # middle of one whose start was not held): the path builder decides.
                return [template.event(trace_id) if packet_at >= end else decode_trace_message(datagram)]
            packet = self._open[trace_id] = _Packet(trace_id, now, now)
            self._order.append(packet)
        else:
            self._open.move_to_end(trace_id)
        packet.datagrams.append(datagram)
        packet.last = now
        kind = self._kinds.get(template)
        if kind is None:
            kind = self._kinds[template] = _kind(template)
        if kind == _FINAL:
            return self._send(packet)
        if kind == _SENT:
            oif = self._output_interface(packet, template, datagram, packet_at, end)
            if oif is None or oif in self.loopback:
                return self._send(packet)
        if kind == _SENT or kind == _DELIVERED:
            del self._open[trace_id]
            self._accepted.append(packet)
        return None

    @staticmethod
    def _output_interface(packet: _Packet, template, datagram: bytes, packet_at: int, end: int) -> Optional[int]:
        """The packet's output interface where the observation chain saw it: on this event,
        or (a chain that ends on its policy) on the chain's first event; None if not said."""
        if packet_at >= end:
            for earlier in reversed(packet.datagrams[:-1]):
                layout = trace_layout(earlier)
                if layout is None or layout[1].static.chain != template.static.chain:
                    return None
                _, _, packet_at, end = layout
                if packet_at < end:
                    datagram = earlier
                    break
            else:
                return None
        # The kernel sends the interfaces first in the packet part (nf_trace_fill_dev_info).
        header = _ATTRIBUTE_HEADER.unpack_from
        while packet_at + 8 <= end:
            length, number = header(datagram, packet_at)
            number &= NLA_TYPE_MASK
            if number == _OIF_NUMBER:
                return _BE32.unpack_from(datagram, packet_at + 4)[0] if length >= 8 else None
            if number not in _INTERFACE_NUMBERS or length < 4:
                return None
            packet_at += (length + 3) & ~3
        return None

    def _send(self, packet: _Packet) -> list:
        """A packet that can be a drop: its events go on, and every later one (the path builder
        has it open)."""
        self._open.pop(packet.trace_id, None)
        events = ReadEarlier(tuple(decode_trace_message(datagram) for datagram in packet.datagrams), packet.first,
                             packet.last)
        packet.datagrams = []
        return [events]

    def _lost(self) -> None:
        """Events were lost: a packet still open may miss some, and would end incomplete,
        never a drop (PathBuilder.mark_loss); those accepted are whole."""
        if self._open:
            self.on_unbuilt(len(self._open))
        for packet in self._open.values():
            packet.datagrams = []
        self._open.clear()

    def release_open(self) -> None:
        """The packets held still open go on at the next read (those accepted stay)."""
        self._release_open = True

    def release(self) -> Iterator:
        """Every packet held, decoded, in the order of its first event."""
        self._release = self._release_open = False
        order, self._order = self._order, deque()
        self._open.clear()
        self._accepted.clear()
        for packet in order:
            if packet.datagrams:
                yield ReadEarlier(tuple(decode_trace_message(datagram) for datagram in packet.datagrams), packet.first,
                                  packet.last)
            packet.datagrams = []

    def _expire(self, now: float) -> None:
        """Let go of what can no longer turn out a drop: packets accepted longer ago than
        `keep_seconds` (or beyond `keep_packets`), packets idle for `idle_seconds`."""
        accepted, let_go = self._accepted, 0
        while accepted and (len(accepted) > self.keep_packets or now - accepted[0].last >= self.keep_seconds):
            accepted.popleft().datagrams = []
            let_go += 1
        if let_go:
            self.on_unbuilt(let_go)
        opened = self._open
        while opened:
            packet = next(iter(opened.values()))
            if now - packet.last < self.idle_seconds:
                break
            del opened[packet.trace_id]
            packet.datagrams = []
            self.on_unbuilt(1)
        order = self._order
        while order and not order[0].datagrams:
            order.popleft()

    def finish(self) -> None:
        """The run is over: what is held was accepted, or went idle."""
        self.on_unbuilt(len(self._accepted) + len(self._open))
        self._open.clear()
        self._accepted.clear()
        self._order.clear()

