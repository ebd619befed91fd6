"""Trace events as the kernel sends them (NFT_MSG_TRACE), decoded into typed records.

The wire format is described once, declaratively, as a pyroute2 message class
(`nft_trace_msg`); `decode_trace_event` turns one decoded message into a `TraceEvent`.
Nothing here opens a socket, so recorded datagrams decode exactly like live ones.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Optional

from pyroute2.netlink import nla
from pyroute2.netlink.nfnetlink import nfgen_msg

# NFT_MSG_TRACE within the nftables subsystem: nlmsg_type = (NFNL_SUBSYS_NFTABLES << 8) | 17.
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_TRACE = 17
NFT_MSG_NEWGEN = 15
NFT_MSG_DELTABLE = 2
NFT_MSG_DELCHAIN = 5
TRACE_MESSAGE_TYPE = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_TRACE

# nfgenmsg.nfgen_family: the family of the table the event comes from.
TABLE_FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}
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


class nft_trace_msg(nfgen_msg):
    """NFT_MSG_TRACE, every NFTA_TRACE_* attribute of include/uapi/linux/netfilter/nf_tables.h."""

    prefix = "NFTA_TRACE_"
    nla_map = (
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

    class verdict(nla):
        prefix = "NFTA_VERDICT_"
        nla_map = (
            ("NFTA_VERDICT_UNSPEC", "none"),
            ("NFTA_VERDICT_CODE", "sbe32"),
            ("NFTA_VERDICT_CHAIN", "asciiz"),
            ("NFTA_VERDICT_CHAIN_ID", "be32"),
        )


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class ConntrackInfo:
    """The packet's conntrack entry as one base chain saw it (kernels with NFTA_TRACE_CT_*)."""

    state: Optional[str]
    direction: Optional[str] = None
    id: Optional[int] = None
    status: tuple = ()


@dataclass(frozen=True)
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
        length, ip_id = struct.unpack_from("!HH", network, 2)
        proto = network[9]
        src = ipaddress.IPv4Address(network[12:16])
        dst = ipaddress.IPv4Address(network[16:20])
    elif version == 6 and len(network) >= 40:
        length = struct.unpack_from("!H", network, 4)[0] + 40
        proto = network[6]
        src = ipaddress.IPv6Address(network[8:24])
        dst = ipaddress.IPv6Address(network[24:40])
    else:
        return None
    sport = dport = icmp_type = icmp_code = tcp_flags = tcp_seq = tcp_ack = None
    if transport:
        if proto in (6, 17, 132, 136) and len(transport) >= 4:
            sport, dport = struct.unpack_from("!HH", transport, 0)
            if proto == 6 and len(transport) >= 14:
                tcp_seq, tcp_ack = struct.unpack_from("!II", transport, 4)
                tcp_flags = transport[13]
        elif proto in (1, 58) and len(transport) >= 2:
            icmp_type, icmp_code = transport[0], transport[1]
    return PacketHeaders(src, dst, proto, length, sport, dport, icmp_type, icmp_code, tcp_flags, ip_id, tcp_seq, tcp_ack)


def _ct_state_name(bits: int) -> str:
    names = [name for bit, name in CT_STATES if bits & bit]
    return ",".join(names) if names else f"0x{bits:x}"


def decode_trace_event(msg: nft_trace_msg) -> TraceEvent:
    """Turn one decoded NFT_MSG_TRACE into a TraceEvent."""
    get = msg.get_attr
    nfproto = get("NFTA_TRACE_NFPROTO")
    verdict = target = queue_num = None
    verdict_attr = get("NFTA_TRACE_VERDICT")
    if verdict_attr is not None:
        code = verdict_attr.get_attr("NFTA_VERDICT_CODE")
        if code is not None:
            verdict, queue_num = verdict_name(code)
        target = verdict_attr.get_attr("NFTA_VERDICT_CHAIN")
    trace_type = TRACE_TYPES.get(get("NFTA_TRACE_TYPE"), "unknown")
    if trace_type == "policy" and get("NFTA_TRACE_POLICY") is not None:
        verdict, _ = verdict_name(get("NFTA_TRACE_POLICY"))
    elif trace_type == "return" and verdict is None:
        verdict = "return"
    packet = parse_packet_headers(nfproto, get("NFTA_TRACE_NETWORK_HEADER"), get("NFTA_TRACE_TRANSPORT_HEADER"))
    ct = None
    ct_state = get("NFTA_TRACE_CT_STATE")
    if ct_state is not None:
        direction = get("NFTA_TRACE_CT_DIRECTION")
        status = get("NFTA_TRACE_CT_STATUS") or 0
        ct = ConntrackInfo(
            state=_ct_state_name(ct_state),
            direction=None if direction is None else ("original", "reply")[direction & 1],
            id=get("NFTA_TRACE_CT_ID"),
            status=tuple(name for bit, name in CT_STATUS_BITS if status & bit),
        )
    return TraceEvent(
        trace_id=get("NFTA_TRACE_ID"),
        family=TABLE_FAMILIES.get(msg["nfgen_family"], str(msg["nfgen_family"])),
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


def decode_datagram(data: bytes):
    """Yield (nlmsg_type, message bytes) for each netlink message in one datagram."""
    offset, end = 0, len(data)
    while offset + 16 <= end:
        length, msg_type = struct.unpack_from("=IH", data, offset)
        if length < 16 or offset + length > end:
            break
        yield msg_type, data[offset : offset + length]
        offset += (length + 3) & ~3


def decode_trace_message(raw: bytes) -> TraceEvent:
    msg = nft_trace_msg(raw)
    msg.decode()
    return decode_trace_event(msg)
