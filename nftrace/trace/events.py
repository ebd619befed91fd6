"""Trace events as the kernel sends them (NFT_MSG_TRACE), decoded into typed records.

The wire format is described once, declaratively, as two nla_map-style attribute maps
(`TRACE_ATTRIBUTES`, `VERDICT_ATTRIBUTES`). Two decoders are made from them: pyroute2's
message class (`pyroute2_trace_message_class`, the reference, every attribute) and a compact
table that reads only the attributes a `TraceEvent` is made of (the live path: an order of
magnitude faster, which is what lets nftrace drain a flood). Both end in `event_from_attributes`, and
the tests decode the same recorded datagrams both ways and compare.
Nothing here opens a socket, so recorded datagrams decode exactly like live ones.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Optional

from ..kernel.netlink import (NFGENMSG_END, NFNL_SUBSYS_NFTABLES, NFPROTO_NAMES, NFT_MSG_TRACE, NLA_TYPE_MASK,
                              NLMSG_HEADER_SIZE, compact_table, message_type, read_attributes, read_message)
from ..protocols import ICMP_PROTOCOL_NUMBERS, PORT_PROTOCOL_NUMBERS, PROTOCOL_NUMBERS

IPPROTO_TCP = PROTOCOL_NUMBERS["tcp"]

TRACE_MESSAGE_TYPE = message_type(NFNL_SUBSYS_NFTABLES, NFT_MSG_TRACE)

# nfgenmsg.nfgen_family: the family of the table the event comes from.
TABLE_FAMILIES = NFPROTO_NAMES
TRACE_TYPES = {1: "policy", 2: "return", 3: "rule"}

# Verdict codes: netfilter's NF_* (>= 0) and nf_tables' NFT_* (< 0).
VERDICT_NAMES = {
    0: "drop",
    1: "accept",
    2: "stolen",
    3: "queue",
    4: "repeat",
    5: "stop",
    -1: "continue",
    -2: "break",
    -3: "jump",
    -4: "goto",
    -5: "return",
}
# Verdicts after which a base chain's run is over for this packet.
TERMINAL_VERDICTS = frozenset({"accept", "drop", "queue", "stolen", "stop"})
# Verdicts after which the packet is gone for good.
FINAL_VERDICTS = frozenset({"drop", "queue", "stolen"})

# Bits of NFTA_TRACE_CT_STATE, as nft's `ct state` uses them.
CT_STATES = ((1, "invalid"), (2, "established"), (4, "related"), (8, "new"), (64, "untracked"))
CT_STATUS_BITS = (
    (1 << 0, "expected"),
    (1 << 1, "seen-reply"),
    (1 << 2, "assured"),
    (1 << 3, "confirmed"),
    (1 << 4, "snat"),
    (1 << 5, "dnat"),
    (1 << 7, "snat-done"),
    (1 << 8, "dnat-done"),
    (1 << 9, "dying"),
    (1 << 12, "untracked"),
    (1 << 14, "helper"),
    (1 << 15, "offload"),
)


# The wire format, described once: NFT_MSG_TRACE's attributes (include/uapi/linux/netfilter/
# nf_tables.h, NFTA_TRACE_*) in attribute-number order, with pyroute2's type names. The pyroute2
# message class below and the compact decoding table are both made from these two maps.
TRACE_ATTRIBUTES = (
    ("NFTA_TRACE_UNSPEC", "none"),
    ("NFTA_TRACE_TABLE", "asciiz"),
    ("NFTA_TRACE_CHAIN", "asciiz"),
    ("NFTA_TRACE_RULE_HANDLE", "be64"),
    ("NFTA_TRACE_TYPE", "be32"),
    ("NFTA_TRACE_VERDICT", "verdict"),
    ("NFTA_TRACE_ID", "be32"),
    ("NFTA_TRACE_LL_HEADER", "cdata"),
    ("NFTA_TRACE_NETWORK_HEADER", "cdata"),
    ("NFTA_TRACE_TRANSPORT_HEADER", "cdata"),
    ("NFTA_TRACE_IIF", "be32"),
    ("NFTA_TRACE_IIFTYPE", "be16"),
    ("NFTA_TRACE_OIF", "be32"),
    ("NFTA_TRACE_OIFTYPE", "be16"),
    ("NFTA_TRACE_MARK", "be32"),
    ("NFTA_TRACE_NFPROTO", "be32"),
    ("NFTA_TRACE_POLICY", "be32"),
    ("NFTA_TRACE_PAD", "none"),
    ("NFTA_TRACE_CT_ID", "be32"),
    ("NFTA_TRACE_CT_DIRECTION", "uint8"),
    ("NFTA_TRACE_CT_STATUS", "be32"),
    ("NFTA_TRACE_CT_STATE", "be32"),
)
# NFTA_TRACE_VERDICT's nested attributes (NFTA_VERDICT_*).
VERDICT_ATTRIBUTES = (
    ("NFTA_VERDICT_UNSPEC", "none"),
    ("NFTA_VERDICT_CODE", "sbe32"),
    ("NFTA_VERDICT_CHAIN", "asciiz"),
    ("NFTA_VERDICT_CHAIN_ID", "be32"),
)
# The attributes a TraceEvent is made of; the fast decoder skips every other one unread.
USED_ATTRIBUTES = frozenset({
    "NFTA_TRACE_TABLE", "NFTA_TRACE_CHAIN", "NFTA_TRACE_RULE_HANDLE", "NFTA_TRACE_TYPE", "NFTA_TRACE_VERDICT",
    "NFTA_TRACE_ID", "NFTA_TRACE_NETWORK_HEADER", "NFTA_TRACE_TRANSPORT_HEADER", "NFTA_TRACE_IIF",
    "NFTA_TRACE_OIF", "NFTA_TRACE_MARK", "NFTA_TRACE_NFPROTO", "NFTA_TRACE_POLICY", "NFTA_TRACE_CT_ID",
    "NFTA_TRACE_CT_DIRECTION", "NFTA_TRACE_CT_STATUS", "NFTA_TRACE_CT_STATE",
    "NFTA_VERDICT_CODE", "NFTA_VERDICT_CHAIN",
})


@functools.lru_cache(maxsize=None)
def pyroute2_trace_message_class():
    """NFT_MSG_TRACE as a pyroute2 message class (the reference decoder), made from the map;
    pyroute2 is imported when the reference is first used (kernel/netlink.py says why)."""
    from pyroute2.netlink import nla
    from pyroute2.netlink.nfnetlink import nfgen_msg

    class nft_trace_msg(nfgen_msg):
        prefix = "NFTA_TRACE_"
        nla_map = TRACE_ATTRIBUTES

        class verdict(nla):
            prefix = "NFTA_VERDICT_"
            nla_map = VERDICT_ATTRIBUTES

    return nft_trace_msg


# The records below are made by the million under a flood: plain dataclasses with slots
# (a frozen one costs a microsecond more to make), compared and hashed by value, never
# changed once made.
@dataclass(slots=True, unsafe_hash=True)
class PacketHeaders:
    """What the truncated network and transport headers of an event say about the packet."""

    src: Optional[ipaddress._BaseAddress]
    dst: Optional[ipaddress._BaseAddress]
    proto: Optional[int]
    length: Optional[int] = None
    sport: Optional[int] = None
    dport: Optional[int] = None
    icmp_type: Optional[int] = None
    icmp_code: Optional[int] = None
    tcp_flags: Optional[int] = None
    # Fields that NAT leaves alone: with `length`, they tell one packet from the next of the
    # same flow when nothing else does (legacy TRACE lines carry no trace id).
    ip_id: Optional[int] = None  # IPv4 identification
    tcp_seq: Optional[int] = None
    tcp_ack: Optional[int] = None


@dataclass(slots=True, unsafe_hash=True)
class ConntrackInfo:
    """The packet's conntrack entry as one base chain saw it (kernels with NFTA_TRACE_CT_*)."""

    state: Optional[str]
    direction: Optional[str] = None
    id: Optional[int] = None
    status: tuple = ()


@dataclass(slots=True, unsafe_hash=True)
class TraceEvent:
    """One NFT_MSG_TRACE: a rule that matched, a chain that returned, or a policy applied.

    `packet`, `iif`/`oif` and `ct` are only sent on the first event of each base-chain run;
    their presence is what marks the start of a new base chain for this packet.
    """

    trace_id: int
    family: str
    table: str
    chain: str
    type: str
    verdict: Optional[str]
    handle: Optional[int] = None
    target: Optional[str] = None
    nfproto: Optional[int] = None
    iif: Optional[int] = None
    oif: Optional[int] = None
    mark: Optional[int] = None
    packet: Optional[PacketHeaders] = None
    ct: Optional[ConntrackInfo] = None
    queue_num: Optional[int] = field(default=None, compare=False)
    # What the path builder reads of the event, as one hashable key: the same for events that
    # differ only in trace id, IPv4 id and TCP sequence numbers (trace/shapes.py). None: not
    # known (an event not decoded from a template).
    shape: object = field(default=None, compare=False, repr=False)

    @property
    def starts_base_chain(self) -> bool:
        return self.packet is not None or self.iif is not None or self.oif is not None


def verdict_name(code: int) -> tuple[str, Optional[int]]:
    """Verdict name and queue number; NF_QUEUE keeps the queue number in the high 16 bits."""
    if code >= 0:
        base = code & 0xFF
        queue_num = (code >> 16) if base == 3 else None
        return VERDICT_NAMES.get(base, f"verdict-{base}"), queue_num
    return VERDICT_NAMES.get(code, f"verdict-{code}"), None


_ADDRESS_CACHE_SIZE = 4096
_addresses: dict = {}


def kept_address(value) -> ipaddress._BaseAddress:
    """The address object for 4 or 16 raw bytes, or for its text (as bpftrace prints it); a
    flow has few addresses, so they are kept."""
    address = _addresses.get(value)
    if address is None:
        if len(_addresses) >= _ADDRESS_CACHE_SIZE:
            _addresses.clear()
        address = _addresses[value] = ipaddress.ip_address(value)
    return address


def parse_packet_headers(nfproto: Optional[int], network: Optional[bytes], transport: Optional[bytes]) -> Optional[PacketHeaders]:
    """Read addresses, protocol and ports from the kernel's header copies.

    The kernel copies at most 40 bytes of network and 20 of transport header. IPv6
    extension headers are not walked: the transport header the kernel sends already
    starts at the L4 offset it found, and `proto` then says which extension came first.
    """
    if not network:
        return None
    version = network[0] >> 4
    src = dst = proto = length = ip_id = None
    if version == 4 and len(network) >= 20:
        length, ip_id = _PORTS.unpack_from(network, 2)
        proto = network[9]
        src = kept_address(network[12:16])
        dst = kept_address(network[16:20])
    elif version == 6 and len(network) >= 40:
        length = _U16.unpack_from(network, 4)[0] + 40
        proto = network[6]
        src = kept_address(network[8:24])
        dst = kept_address(network[24:40])
    else:
        return None
    sport = dport = icmp_type = icmp_code = tcp_flags = tcp_seq = tcp_ack = None
    if transport:
        if proto in PORT_PROTOCOL_NUMBERS and len(transport) >= 4:
            sport, dport = _PORTS.unpack_from(transport, 0)
            if proto == IPPROTO_TCP and len(transport) >= 14:
                tcp_seq, tcp_ack = _SEQ_ACK.unpack_from(transport, 4)
                tcp_flags = transport[13]
        elif proto in ICMP_PROTOCOL_NUMBERS and len(transport) >= 2:
            icmp_type, icmp_code = transport[0], transport[1]
    return PacketHeaders(src, dst, proto, length, sport, dport, icmp_type, icmp_code, tcp_flags, ip_id, tcp_seq, tcp_ack)


_U16 = struct.Struct("!H")
_PORTS = struct.Struct("!HH")  # also IPv4 total length and id
_SEQ_ACK = struct.Struct("!II")


@functools.lru_cache(maxsize=256)
def _ct_state_name(bits: int) -> str:
    names = [name for bit, name in CT_STATES if bits & bit]
    return ",".join(names) if names else f"0x{bits:x}"


@functools.lru_cache(maxsize=256)
def _ct_status_names(status: int) -> tuple:
    return tuple(name for bit, name in CT_STATUS_BITS if status & bit)


def event_from_attributes(family: int, attrs: dict) -> TraceEvent:
    """Turn the attributes of one NFT_MSG_TRACE (name -> value, the verdict nested as a dict)
    into a TraceEvent. Both decoders end here, so they cannot disagree on meaning."""
    get = attrs.get
    nfproto = get("NFTA_TRACE_NFPROTO")
    verdict = target = queue_num = None
    verdict_attr = get("NFTA_TRACE_VERDICT")
    if verdict_attr is not None:
        code = verdict_attr.get("NFTA_VERDICT_CODE")
        if code is not None:
            verdict, queue_num = verdict_name(code)
        target = verdict_attr.get("NFTA_VERDICT_CHAIN")
    trace_type = TRACE_TYPES.get(get("NFTA_TRACE_TYPE"), "unknown")
    if trace_type == "policy" and get("NFTA_TRACE_POLICY") is not None:
        verdict, _ = verdict_name(get("NFTA_TRACE_POLICY"))
    elif trace_type == "return" and verdict is None:
        verdict = "return"
    network = get("NFTA_TRACE_NETWORK_HEADER")
    packet = parse_packet_headers(nfproto, network, get("NFTA_TRACE_TRANSPORT_HEADER")) if network else None
    ct = None
    ct_state = get("NFTA_TRACE_CT_STATE")
    if ct_state is not None:
        direction = get("NFTA_TRACE_CT_DIRECTION")
        ct = ConntrackInfo(
            state=_ct_state_name(ct_state),
            direction=None if direction is None else ("original", "reply")[direction & 1],
            id=get("NFTA_TRACE_CT_ID"),
            status=_ct_status_names(get("NFTA_TRACE_CT_STATUS") or 0),
        )
    return TraceEvent(
        trace_id=get("NFTA_TRACE_ID"),
        family=TABLE_FAMILIES.get(family, str(family)),
        table=get("NFTA_TRACE_TABLE"),
        chain=get("NFTA_TRACE_CHAIN"),
        type=trace_type,
        verdict=verdict,
        handle=get("NFTA_TRACE_RULE_HANDLE"),
        target=target,
        nfproto=nfproto,
        iif=get("NFTA_TRACE_IIF"),
        oif=get("NFTA_TRACE_OIF"),
        mark=get("NFTA_TRACE_MARK"),
        packet=packet,
        ct=ct,
        queue_num=queue_num,
    )


# -- the reference decoder: pyroute2's classes, made from the attribute maps ----------------

def _used_names(attributes) -> list:
    return [name for name, _ in attributes if name in USED_ATTRIBUTES]


def decode_trace_event(msg) -> TraceEvent:
    """Turn one NFT_MSG_TRACE decoded by pyroute2's class (`pyroute2_trace_message_class`) into a
    TraceEvent."""
    attrs = {}
    for name in _used_names(TRACE_ATTRIBUTES):
        value = msg.get_attr(name)
        if value is not None:
            attrs[name] = value
    verdict = attrs.get("NFTA_TRACE_VERDICT")
    if verdict is not None:
        nested = {}
        for name in _used_names(VERDICT_ATTRIBUTES):
            value = verdict.get_attr(name)
            if value is not None:
                nested[name] = value
        attrs["NFTA_TRACE_VERDICT"] = nested
    return event_from_attributes(msg["nfgen_family"], attrs)


def decode_trace_message_pyroute2(raw: bytes) -> TraceEvent:
    """The reference: pyroute2 decodes every attribute of the map (about 60 µs an event)."""
    msg = pyroute2_trace_message_class()(raw)
    msg.decode()
    return decode_trace_event(msg)


# -- the live decoder: a compact table made from the same maps ------------------------------

TRACE_DECODER = compact_table(TRACE_ATTRIBUTES, {"verdict": VERDICT_ATTRIBUTES}, wanted=USED_ATTRIBUTES)


def decode_trace_message(raw: bytes) -> TraceEvent:
    """One NFT_MSG_TRACE (nlmsghdr included) into a TraceEvent, reading only the attributes
    a TraceEvent is made of (a few µs an event).

    The kernel sends what the rule, chain and verdict say first, and what the packet says
    (interfaces, headers, conntrack) last, on the first event of a base chain's run only.
    The first part is the same for every packet that meets the same rule with the same
    verdict: it is decoded once and found again by its bytes (`TraceTemplate`), so an event
    without packet information costs a dictionary lookup, and one with it the reading of
    its packet part alone."""
    layout = trace_layout(raw)
    if layout is None:
        return event_from_attributes(raw[16], read_message(raw, TRACE_DECODER))
    trace_id, template, packet_at, end = layout
    if packet_at >= end:
        return template.event(trace_id)
    return template.with_packet_part(trace_id, raw, packet_at, end)


# The kernel puts NFPROTO, TYPE and then ID first (nf_tables_trace.c: nft_trace_notify), so the
# trace id's attribute header is at a fixed place; checked on every message, never assumed.
_ID_NUMBER = [name for name, _ in TRACE_ATTRIBUTES].index("NFTA_TRACE_ID")
_ID_OFFSET = NFGENMSG_END + 16
_ID_END = _ID_OFFSET + 8
_ID_HEADER = struct.pack("=HH", 8, _ID_NUMBER)
_ID_VALUE = struct.Struct(">I")  # NFTA_TRACE_ID is be32 (TRACE_ATTRIBUTES)
_MESSAGE_LENGTH = struct.Struct("=I")
_ATTRIBUTE_HEADER = struct.Struct("=HH")
# What the packet says: sent after everything else, on a base chain's first event only.
PACKET_ATTRIBUTES = frozenset({
    "NFTA_TRACE_LL_HEADER", "NFTA_TRACE_NETWORK_HEADER", "NFTA_TRACE_TRANSPORT_HEADER", "NFTA_TRACE_IIF",
    "NFTA_TRACE_IIFTYPE", "NFTA_TRACE_OIF", "NFTA_TRACE_OIFTYPE", "NFTA_TRACE_CT_ID", "NFTA_TRACE_CT_DIRECTION",
    "NFTA_TRACE_CT_STATUS", "NFTA_TRACE_CT_STATE",
})
_PACKET_NUMBERS = frozenset(number for number, (name, _) in enumerate(TRACE_ATTRIBUTES) if name in PACKET_ATTRIBUTES)
_TEMPLATE_CACHE_SIZE = 4096
_templates: dict = {}
# The first bytes after the trace id (the chain's name) -> where packet parts started after them.
_BOUNDARY_PREFIX = 24
_BOUNDARIES_PER_PREFIX = 8
_boundaries: dict = {}


@dataclass(slots=True, eq=False)
class TraceTemplate:
    """The part of a trace event that is the same for every packet meeting the same rule of
    the same chain with the same verdict (and mark): everything but the trace id and the
    packet information. Decoded once per distinct part."""

    attributes: dict  # as read_attributes read them: name -> value
    family: int  # nfgenmsg.nfgen_family
    static: TraceEvent  # the event without packet information, trace id 0
    # Where the network and transport headers' copies lay in packet parts met after it.
    layouts: list = field(default_factory=list)
    # No attribute of a packet part came before the trace id (the kernel sends none there).
    packet_free: bool = True

    def __post_init__(self) -> None:
        self.packet_free = not self.attributes.keys() & PACKET_ATTRIBUTES

    def event(self, trace_id: int) -> TraceEvent:
        """The event of a packet that sends nothing about itself here (not a base chain's first)."""
        s = self.static
        return TraceEvent(trace_id, s.family, s.table, s.chain, s.type, s.verdict, s.handle, s.target, s.nfproto,
                          s.iif, s.oif, s.mark, s.packet, s.ct, s.queue_num, self)

    def with_packet_part(self, trace_id: int, raw: bytes, packet_at: int, end: int) -> TraceEvent:
        """The event of a message whose packet part starts at `packet_at`. A packet part met
        before but for what tells one packet from the next (`KnownPacketPart`) is not read
        again: only those fields are."""
        for layout in self.layouts:
            key = packet_part_key(self, raw, packet_at, end, layout)
            known = _packet_parts.get(key)
            if known is not None:
                return known.event(self.static, trace_id, raw, packet_at, layout)
        event = self.with_packet(trace_id, read_attributes(raw, packet_at, end, TRACE_DECODER), raw[16])
        if event.shape is None:
            return event  # read in full (attributes a packet part does not hold): not kept
        layout = header_spans(raw, packet_at, end)
        if layout not in self.layouts:
            if len(self.layouts) >= _LAYOUTS_PER_TEMPLATE:
                del self.layouts[0]
            self.layouts.append(layout)
        if len(_packet_parts) >= _PACKET_PART_CACHE_SIZE:
            _packet_parts.clear()
        _packet_parts[packet_part_key(self, raw, packet_at, end, layout)] = KnownPacketPart.of(event)
        return event

    def with_packet(self, trace_id: int, packet_attributes: dict, family: int) -> TraceEvent:
        """The event with what its packet part says (`packet_attributes`, read after the
        template's): as event_from_attributes would make it from both (the first occurrence
        of an attribute wins, as everywhere)."""
        if not (self.packet_free and packet_attributes.keys() <= PACKET_ATTRIBUTES):
            merged = dict(packet_attributes)
            merged.update(self.attributes)
            return event_from_attributes(family, merged | {"NFTA_TRACE_ID": trace_id})
        s = self.static
        get = packet_attributes.get
        network = get("NFTA_TRACE_NETWORK_HEADER")
        packet = parse_packet_headers(s.nfproto, network, get("NFTA_TRACE_TRANSPORT_HEADER")) if network else None
        ct_state = get("NFTA_TRACE_CT_STATE")
        ct_direction, ct_id, ct_status = get("NFTA_TRACE_CT_DIRECTION"), get("NFTA_TRACE_CT_ID"), get("NFTA_TRACE_CT_STATUS")
        ct = None if ct_state is None else _conntrack(ct_state, ct_direction, ct_id, ct_status)
        iif, oif = get("NFTA_TRACE_IIF"), get("NFTA_TRACE_OIF")
        shape = (self, iif, oif, ct_state, ct_direction, ct_id, ct_status)
        if packet is not None:
            # The addresses as sent (hashing bytes is cheaper than hashing address objects).
            shape += (network[12:20] if network[0] >> 4 == 4 else network[8:40], packet.proto, packet.length,
                      packet.sport, packet.dport, packet.icmp_type, packet.icmp_code, packet.tcp_flags)
        return TraceEvent(trace_id, s.family, s.table, s.chain, s.type, s.verdict, s.handle, s.target, s.nfproto,
                          iif, oif, s.mark, packet, ct, s.queue_num, shape)


_NETWORK_NUMBER = [name for name, _ in TRACE_ATTRIBUTES].index("NFTA_TRACE_NETWORK_HEADER")
_TRANSPORT_NUMBER = [name for name, _ in TRACE_ATTRIBUTES].index("NFTA_TRACE_TRANSPORT_HEADER")
_LAYOUTS_PER_TEMPLATE = 4
_PACKET_PART_CACHE_SIZE = 4096
_packet_parts: dict = {}


def header_spans(raw: bytes, offset: int, end: int) -> tuple:
    """(start, end) of the network header's copy and of the transport header's, relative to
    `offset`, as read_attributes reads them (the first of each; (0, 0) for one not sent); then
    the three spans around them, in order (the last one's end left open)."""
    spans = {_NETWORK_NUMBER: (0, 0), _TRANSPORT_NUMBER: (0, 0)}
    header = _ATTRIBUTE_HEADER.unpack_from
    at = offset
    while at + 4 <= end:
        length, number = header(raw, at)
        if length < 4:
            length = 4
        elif at + length > end:
            length = end - at
        number &= NLA_TYPE_MASK
        if spans.get(number) == (0, 0):
            spans[number] = (at + 4 - offset, at + length - offset)
        at += (length + 3) & ~3
    network, transport = spans[_NETWORK_NUMBER], spans[_TRANSPORT_NUMBER]
    first, second = sorted((network, transport))
    return network, transport, (first[0], first[1], second[0], second[1])


def packet_part_key(template: TraceTemplate, raw: bytes, packet_at: int, end: int, layout: tuple) -> tuple:
    """What a packet part says, but for the fields that tell one packet from the next: its
    bytes with the two header copies left out, and of those copies what parse_packet_headers
    reads, except the IPv4 id and TCP sequence numbers. Two messages with equal keys have their
    attributes at the same places (their headers are among the bytes compared), and read the
    same but for those fields."""
    (network_at, network_end), (transport_at, transport_end), (first_at, first_end, second_at, second_end) = layout
    network = raw[packet_at + network_at:packet_at + network_end]
    transport = raw[packet_at + transport_at:packet_at + transport_end]
    outside = (raw[packet_at:packet_at + first_at] + raw[packet_at + first_end:packet_at + second_at]
               + raw[packet_at + second_end:end])
    return template, end - packet_at, outside, _read_part(network, transport)


def _read_part(network: bytes, transport: bytes) -> bytes:
    """The bytes of the header copies that parse_packet_headers reads for the fields that do not
    change from packet to packet of a flow."""
    if len(network) >= 20 and network[0] >> 4 == 4:
        proto, read = network[9], network[:4] + network[6:10] + network[12:20]
    elif len(network) >= 40 and network[0] >> 4 == 6:
        proto, read = network[6], network[:40]
    else:
        return network + b"|" + transport  # no headers read from these: nothing to leave out
    if proto == IPPROTO_TCP:
        return read + transport[:4] + transport[12:14]
    if proto in PORT_PROTOCOL_NUMBERS:
        return read + transport[:4]
    if proto in ICMP_PROTOCOL_NUMBERS:
        return read + transport[:2]
    return read


@dataclass(slots=True, eq=False)
class KnownPacketPart:
    """What a packet part met before said, for the next message whose key is the same."""

    headers: Optional[tuple]  # PacketHeaders' fields but ip_id, tcp_seq, tcp_ack (None: no headers)
    ip_id: bool  # read from the network header (IPv4)
    tcp_numbers: bool  # read from the transport header (TCP, 14 bytes or more)
    iif: Optional[int]
    oif: Optional[int]
    ct: Optional[ConntrackInfo]
    shape: tuple

    @classmethod
    def of(cls, event: TraceEvent) -> "KnownPacketPart":
        p = event.packet
        headers = None if p is None else (p.src, p.dst, p.proto, p.length, p.sport, p.dport, p.icmp_type,
                                          p.icmp_code, p.tcp_flags)
        return cls(headers, p is not None and p.ip_id is not None, p is not None and p.tcp_seq is not None,
                   event.iif, event.oif, event.ct, event.shape)

    def event(self, s: TraceEvent, trace_id: int, raw: bytes, packet_at: int, layout: tuple) -> TraceEvent:
        """The event of a message with this key: its own trace id, IPv4 id and TCP numbers, read
        where parse_packet_headers reads them."""
        packet = None
        if self.headers is not None:
            ip_id = tcp_seq = tcp_ack = None
            if self.ip_id:
                ip_id = _U16.unpack_from(raw, packet_at + layout[0][0] + 4)[0]
            if self.tcp_numbers:
                tcp_seq, tcp_ack = _SEQ_ACK.unpack_from(raw, packet_at + layout[1][0] + 4)
            packet = PacketHeaders(*self.headers, ip_id, tcp_seq, tcp_ack)
        return TraceEvent(trace_id, s.family, s.table, s.chain, s.type, s.verdict, s.handle, s.target, s.nfproto,
                          self.iif, self.oif, s.mark, packet, self.ct, s.queue_num, self.shape)


def trace_layout(raw: bytes) -> Optional[tuple]:
    """(trace id, TraceTemplate, where the packet part starts, where the message ends) of one
    NFT_MSG_TRACE, reading no more than the attribute headers before the packet part; None
    for a message not laid out as the kernel lays them out (it is then decoded in full)."""
    if raw[_ID_OFFSET:_ID_OFFSET + 4] != _ID_HEADER:
        return None
    end = _MESSAGE_LENGTH.unpack_from(raw, 0)[0]
    if end > len(raw):
        end = len(raw)
    header = _ATTRIBUTE_HEADER.unpack_from
    # Where the packet part starts is found by reading attribute headers; for a template met
    # before, it is where it was then: right if the bytes before it are the template's and a
    # packet attribute starts there. Tried first: it spares a message with a packet part
    # (most of a packet's events) the lookup of its whole length below.
    prefix = raw[_ID_END:_ID_END + _BOUNDARY_PREFIX]
    for offset in _boundaries.get(prefix, ()):
        if offset + 4 <= end and header(raw, offset)[1] & NLA_TYPE_MASK in _PACKET_NUMBERS:
            template = _templates.get(raw[NLMSG_HEADER_SIZE:_ID_OFFSET] + raw[_ID_END:offset])
            if template is not None:
                return _ID_VALUE.unpack_from(raw, _ID_OFFSET + 4)[0], template, offset, end
    # An event without a packet part: the whole message past the id is the key.
    template = _templates.get(raw[NLMSG_HEADER_SIZE:_ID_OFFSET] + raw[_ID_END:end])
    if template is not None:
        return _ID_VALUE.unpack_from(raw, _ID_OFFSET + 4)[0], template, end, end
    offset = _ID_END
    while offset + 4 <= end:
        length, number = header(raw, offset)
        if number & NLA_TYPE_MASK in _PACKET_NUMBERS:
            break
        if length < 4:
            return None
        offset += (length + 3) & ~3
    key = raw[NLMSG_HEADER_SIZE:_ID_OFFSET] + raw[_ID_END:offset]
    template = _templates.get(key)
    if template is None:
        if offset < end:
            known = _boundaries.setdefault(prefix, [])
            if offset not in known and len(known) < _BOUNDARIES_PER_PREFIX:
                known.append(offset)
        attributes = read_attributes(raw, NFGENMSG_END, min(offset, end), TRACE_DECODER)
        attributes.pop("NFTA_TRACE_ID", None)
        template = TraceTemplate(attributes, raw[16], event_from_attributes(raw[16], attributes | {"NFTA_TRACE_ID": 0}))
        if len(_templates) >= _TEMPLATE_CACHE_SIZE:
            _templates.clear()
            _boundaries.clear()
        _templates[key] = template
    return _ID_VALUE.unpack_from(raw, _ID_OFFSET + 4)[0], template, offset, end


@functools.lru_cache(maxsize=1024)
def _conntrack(state: int, direction: Optional[int], ct_id: Optional[int], status: Optional[int]) -> ConntrackInfo:
    """ConntrackInfo, as event_from_attributes makes it; a flood of one connection has one."""
    return ConntrackInfo(state=_ct_state_name(state),
                         direction=None if direction is None else ("original", "reply")[direction & 1],
                         id=ct_id, status=_ct_status_names(status or 0))
