"""Kernel drop reasons: what each reason means, and the lines the bpftrace program prints.

Pure: nothing here runs a process or reads the kernel. `dropwatch.py` watches the kernel's
drops with nftrace's own program (or `bpftrace.py`, which prints these lines); `correlator.py`
pairs the drops with packet paths.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Optional

from ..protocols import PORT_PROTOCOL_NUMBERS, protocol_name
from ..trace.events import kept_address

DROP_PREFIX = "nftrace-drop"

# Plain words for the reasons an admin meets. Placeholders: {proto} {dport} {src} {dst} {iif}.
REASON_EXPLANATIONS = {
    "NOT_SPECIFIED": "the kernel freed it without saying why",
    "NO_SOCKET": "nothing listens on {proto}/{dport} in this namespace",
    "SOCKET_CLOSE": "the receiving socket was closed before it read the packet",
    "SOCKET_FILTER": "a socket filter (BPF program on the receiving socket) rejected it",
    "SOCKET_RCVBUFF": "the receiving socket's buffer was full (the application does not read fast enough)",
    "SOCKET_BACKLOG": "the receiving socket's backlog was full",
    "PKT_TOO_SMALL": "the packet is shorter than its headers say",
    "TCP_CSUM": "bad TCP checksum",
    "UDP_CSUM": "bad UDP checksum",
    "IP_CSUM": "bad IP header checksum",
    "ICMP_CSUM": "bad ICMP checksum",
    "NETFILTER_DROP": "netfilter dropped it outside the traced chains (iptables-legacy, conntrack or NAT)",
    "OTHERHOST": "the frame was addressed to another host's MAC address",
    "IP_INHDR": "invalid IP header",
    "IP_RPFILTER": "reverse-path filter: replies to {src} would not leave through {iif} "
                   "(net.ipv4.conf.{iif_key}.rp_filter / conf.all.rp_filter)",
    "UNICAST_IN_L2_MULTICAST": "unicast IP packet in a link-layer multicast or broadcast frame",
    "XFRM_POLICY": "an IPsec (xfrm) policy refused it",
    "IP_NOPROTO": "this host has no handler for IP protocol {proto}",
    "PROTO_MEM": "the protocol's memory limit was reached",
    "TCP_FLAGS": "TCP flags not valid for the connection's state",
    "TCP_ZEROWINDOW": "the receiver's TCP window is zero",
    "TCP_OLD_DATA": "TCP data already received (a duplicate)",
    "TCP_OVERWINDOW": "TCP data beyond the receive window",
    "TCP_RFC7323_PAWS": "TCP timestamp older than the connection's (PAWS check)",
    "TCP_LISTEN_OVERFLOW": "the listening socket's accept queue is full",
    "TCP_OLD_SEQUENCE": "TCP sequence number older than the window",
    "TCP_INVALID_SEQUENCE": "TCP sequence number outside the window",
    "TCP_INVALID_ACK_SEQUENCE": "TCP acknowledges data that was never sent",
    "TCP_RESET": "TCP reset for this connection",
    "TCP_INVALID_SYN": "unexpected TCP SYN on an existing connection",
    "TCP_CLOSE": "the TCP connection is closed",
    "IP_OUTNOROUTES": "no route to {dst} for a locally sent packet",
    "IP_INNOROUTES": "no route to {dst}: the packet cannot be forwarded",
    "IP_INADDRERRORS": "invalid destination address {dst}",
    "IP_LOCAL_SOURCE": "the source {src} is one of this host's own addresses",
    "IP_INVALID_SOURCE": "invalid source address {src} (multicast, broadcast or zero)",
    "IP_LOCALNET": "127.0.0.0/8 address on a non-loopback interface (net.ipv4.conf.*.route_localnet)",
    "IP_INVALID_DEST": "invalid destination address {dst}",
    "IPV6DISABLED": "IPv6 is disabled on the interface",
    "BPF_CGROUP_EGRESS": "a cgroup BPF program refused to send it",
    "NEIGH_CREATEFAIL": "no neighbour entry could be created for the next hop",
    "NEIGH_FAILED": "the next hop did not answer ARP / neighbour discovery (no host there)",
    "NEIGH_QUEUEFULL": "too many packets were waiting for the next hop's ARP / neighbour answer",
    "NEIGH_DEAD": "the next hop's neighbour entry was being removed",
    "NEIGH_HH_FILLFAIL": "the link-layer header for the next hop could not be built",
    "TC_EGRESS": "a tc filter dropped it on the way out",
    "TC_INGRESS": "a tc filter dropped it on the way in",
    "SECURITY_HOOK": "a security module (SELinux, AppArmor, ...) refused it",
    "QDISC_DROP": "the interface's queue (qdisc) was full",
    "CPU_BACKLOG": "the CPU's input backlog was full (net.core.netdev_max_backlog)",
    "XDP": "an XDP program dropped it",
    "UNHANDLED_PROTO": "no handler for its protocol",
    "NOMEM": "the kernel ran out of memory",
    "PKT_TOO_BIG": "larger than the path MTU and not allowed to be fragmented",
    "DUP_FRAG": "a duplicate fragment",
    "FRAG_REASM_TIMEOUT": "the other fragments did not arrive in time",
    "FRAG_TOO_FAR": "a fragment too far from the others",
    "NO_TX_TARGET": "no device to send it on",
    "QUEUE_PURGE": "the queue it waited in was emptied at once (its socket closed before reading it, or a device or "
                   "connection torn down)",
    "DEV_READY": "the interface was not ready (down, or its driver not set up)",
    "DEV_HDR": "the interface's driver found its link-layer header or metadata invalid",
    "FULL_RING": "the interface's ring buffer was full",
    "HDR_TRUNC": "its headers are truncated",
    "INVALID_PROTO": "its protocol is not valid where it came in",
    "SKB_CSUM": "its checksum could not be computed",
    "SKB_GSO_SEG": "segmenting it (a large GSO packet) failed",
    "SKB_UCOPY_FAULT": "copying its data from the sending program failed",
    "PACKET_SOCK_ERROR": "a packet socket (tcpdump, a DHCP client, ...) could not take it",
    "TC_CHAIN_NOTFOUND": "a tc filter sent it to a tc chain that does not exist",
    "TC_RECLASSIFY_LOOP": "tc reclassified it too many times (a loop in the tc filters)",
    "TC_COOKIE_ERROR": "tc lost its classification state",
    "VXLAN_INVALID_HDR": "invalid VXLAN header",
    "VXLAN_VNI_NOT_FOUND": "no VXLAN device here has its VNI",
    "VXLAN_ENTRY_EXISTS": "the VXLAN forwarding entry exists already",
    "TUNNEL_TXINFO": "the tunnel has nowhere to send it (no transmit information)",
    "MAC_INVALID_SOURCE": "invalid source MAC address (multicast or zero)",
    "LOCAL_MAC": "its source MAC address is this host's own (a frame that looped back)",
    "MAC_IEEE_MAC_CONTROL": "an IEEE 802.3 MAC control frame (a pause frame), never forwarded",
    "BRIDGE_INGRESS_STP_STATE": "the bridge port it came in on is not forwarding (STP: blocking, listening or "
                                "disabled)",
    "ARP_PVLAN_DISABLE": "an ARP packet between ports of a private VLAN (proxy_arp_pvlan off)",
    "RECURSION_LIMIT": "too many nested sends (devices stacked in a loop, such as a tunnel routed over itself)",
    "PFMEMALLOC": "it came from the kernel's emergency memory reserve, which only memory-reclaim sockets may use",
    "CAKE_FLOOD": "the cake queueing discipline dropped it (flood protection)",
    "DUALPI2_STEP_DROP": "the dualpi2 queueing discipline dropped it (its queue over the step threshold)",
    "PSP_INPUT": "a PSP encryption policy refused it on the way in",
    "PSP_OUTPUT": "a PSP encryption policy refused it on the way out",
}
# Where one reason has several causes, the code that freed the packet tells which: (function,
# reason) → the sentence for that cause, before the reason's own.
LOCATION_EXPLANATIONS = {
    ("ip_forward", "IP_INHDR"): "its TTL ran out here: it came in with TTL 1 and cannot be forwarded (the sender "
                                "gets ICMP time exceeded; traceroute does it on purpose, a routing loop by accident)",
    ("ip6_forward", "IP_INHDR"): "its hop limit ran out here: it came in with hop limit 1 and cannot be forwarded "
                                 "(the sender gets ICMPv6 time exceeded; traceroute does it on purpose, a routing "
                                 "loop by accident)",
    # IPv6 multicast input: no socket or interface here is a member of the group, and no
    # multicast routing forwards it (ip6_mc_input). Every IPv6 link carries such packets.
    ("ip6_mc_input", "NOT_SPECIFIED"): "multicast to a group that nothing here has joined: not for this host (an "
                                       "IPv6 link carries such packets all the time: MLD reports to ff02::16, "
                                       "solicitations for the routers or for other hosts' addresses)",
}
# Families of reasons: when a reason has no sentence of its own, its prefix gives one.
REASON_PREFIX_EXPLANATIONS = (
    ("TCP_MD5", "TCP MD5 signature check failed"),
    ("TCP_AO", "TCP authentication option check failed"),
    ("TCP_", "TCP's own checks refused it"),
    ("NEIGH_", "the next hop's link-layer address could not be found"),
    ("QDISC_", "the interface's queueing discipline dropped it"),
    ("FQ_", "the fq queueing discipline dropped it (a band, flow or time-horizon limit)"),
    ("IPV6_", "invalid IPv6 packet"),
    ("IP_", "the IP layer refused it"),
)


def header_key(src, dst, proto: Optional[int], sport: Optional[int], dport: Optional[int]) -> tuple:
    """Headers as a dictionary key: addresses as (version, integer), which hash in C, where an
    address object hashes in Python (a flood files thousands of packets a second by them)."""
    return (src.version if src is not None else 0, int(src) if src is not None else None,
            int(dst) if dst is not None else None, proto, sport, dport)


@dataclass(frozen=True)
class KernelDrop:
    """One traced packet freed by the kernel with a drop reason, as the tracepoint saw it."""

    time: float  # CLOCK_MONOTONIC seconds: comparable with time.monotonic()
    reason: str
    location: str  # the code that freed it: `function+0xoffset`, or its address `0x…` until looked up
    src: Optional[ipaddress._BaseAddress]
    dst: Optional[ipaddress._BaseAddress]
    proto: Optional[int]
    sport: Optional[int] = None
    dport: Optional[int] = None
    symbols: Optional[object] = field(default=None, compare=False, repr=False)  # bpftrace.KernelSymbols
    key: tuple = field(init=False, compare=False, repr=False)  # its headers as header_key() files them

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", header_key(*self.headers()))

    def code_location(self) -> str:
        """`function+0xoffset`, looked up when an answer shows the drop, not when it is read:
        a lookup reads /proc/kallsyms (60 ms), and most drops never show (under a flood of rule
        drops, each one's NETFILTER_DROP echo); read at once, the first of them held the event
        loop long enough for a 16 MiB socket buffer to overflow."""
        if self.symbols is not None and self.location.startswith("0x"):
            return self.symbols.location(int(self.location, 16))
        return self.location

    def headers(self) -> tuple:
        return (self.src, self.dst, self.proto, self.sport, self.dport)


_SYMBOLIC_RE = re.compile(r'\{\s*(\d+)\s*,\s*"(\w+)"\s*\}')


def parse_reason_names(format_text: str) -> dict[int, str]:
    """Reason number → name, from the `__print_symbolic` table of the tracepoint's format."""
    return {int(number): name for number, name in _SYMBOLIC_RE.findall(format_text)}


def has_reason_field(format_text: str) -> bool:
    return re.search(r"field:[^;]*\breason;", format_text) is not None


def parse_drop_line(line: str, reason_names: dict[int, str], symbols=None) -> Optional[KernelDrop]:
    """One line of the bpftrace program; None for anything else bpftrace printed."""
    parts = line.split()
    if len(parts) != 10 or parts[0] != DROP_PREFIX:
        return None
    try:
        nsecs, reason, address = int(parts[1]), int(parts[2]), int(parts[3])
        src, dst = kept_address(parts[5]), kept_address(parts[6])
        proto, sport, dport = int(parts[7]), int(parts[8]), int(parts[9])
    except ValueError:
        return None
    ports = proto in PORT_PROTOCOL_NUMBERS
    return KernelDrop(
        time=nsecs / 1e9,
        reason=reason_names.get(reason, f"reason-{reason}"),
        location=f"0x{address:x}",
        src=src,
        dst=dst,
        proto=proto,
        sport=sport if ports else None,
        dport=dport if ports else None,
        symbols=symbols,
    )


# The explanations above that name the packet's own values, for packets of different values
# counted under one reason (`nftrace drops`): said of them all, without the values.
GROUP_EXPLANATIONS = {
    "NO_SOCKET": "nothing listens on their destination ports in this namespace",
    "IP_RPFILTER": "reverse-path filter: replies to their sources would not leave through the interfaces they "
                   "came in on (rp_filter)",
    "IP_NOPROTO": "this host has no handler for their IP protocols",
    "IP_OUTNOROUTES": "no route to their destinations, for locally sent packets",
    "IP_INNOROUTES": "no route to their destinations: the packets cannot be forwarded",
    "IP_INADDRERRORS": "invalid destination addresses",
    "IP_LOCAL_SOURCE": "their sources are this host's own addresses",
    "IP_INVALID_SOURCE": "invalid source addresses (multicast, broadcast or zero)",
    "IP_INVALID_DEST": "invalid destination addresses",
}


def explain_many(reason: str) -> Optional[str]:
    """The reason in plain words for packets whose own explanations differ; None when the
    words would need one packet's values."""
    if reason in GROUP_EXPLANATIONS:
        return GROUP_EXPLANATIONS[reason]
    template = REASON_EXPLANATIONS.get(reason)
    return template if template is not None and "{" not in template else None


class _SafeFormat(dict):
    def __missing__(self, key: str) -> str:
        return "?"


def function_of(location: str) -> str:
    """`ip_error+0x94` → `ip_error`."""
    return location.split("+", 1)[0]


def location_cause(location: Optional[str], reason: str) -> Optional[str]:
    """The function that freed the packet, where it tells one cause of the reason from the
    others (LOCATION_EXPLANATIONS); None otherwise. `drops` counts such drops apart."""
    function = function_of(location or "")
    return function if (function, reason) in LOCATION_EXPLANATIONS else None


def explain(drop: KernelDrop, iif: Optional[str] = None) -> str:
    """The drop reason in plain words, with the packet's own addresses and port filled in."""
    template = LOCATION_EXPLANATIONS.get((function_of(drop.code_location()), drop.reason)) or \
        REASON_EXPLANATIONS.get(drop.reason)
    if template is None:
        template = next((text for prefix, text in REASON_PREFIX_EXPLANATIONS if drop.reason.startswith(prefix)),
                        "see enum skb_drop_reason in the kernel's include/net/dropreason-core.h")
    values = _SafeFormat(
        proto=protocol_name(drop.proto) or "?",
        dport=drop.dport if drop.dport is not None else "?",
        src=drop.src,
        dst=drop.dst,
        iif=iif or "the interface it came in on",
        iif_key=iif or "IFACE",
    )
    return template.format_map(values)
