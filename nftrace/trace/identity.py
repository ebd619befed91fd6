"""A packet's identity: what tells one packet from another where no trace id can.

Two places need it, and both read the same header fields:
- a legacy iptables TRACE line carries no trace id, only the packet: it is joined to the
  packet's nftables path by the fields NAT leaves alone (`packet_identity`);
- the kernel clears the trace bit when a packet crosses a veth into another network
  namespace (the skb is scrubbed), and the trace id hashes the input interface: the packet's
  part in the next namespace is joined to its part in the one it left by the same fields,
  and by the addresses and ports as NAT left them there (`crossing_key`): the headers a
  packet leaves one namespace with are the headers it enters the next one with.
"""

from __future__ import annotations

from typing import Optional

from .events import PacketHeaders


def packet_identity(packet: Optional[PacketHeaders]) -> Optional[tuple]:
    """The header fields that NAT does not rewrite: IP version, protocol, length, IPv4 id,
    TCP sequence and acknowledgement numbers, ICMP type and code."""
    if packet is None or packet.src is None:
        return None
    return (packet.src.version, packet.proto, packet.length, packet.ip_id, packet.tcp_seq, packet.tcp_ack,
            packet.icmp_type, packet.icmp_code)


def crossing_key(packet: Optional[PacketHeaders]) -> Optional[tuple]:
    """The packet's identity and its addresses and ports as they are now: equal for the
    headers it left a namespace with and those it arrived with in the next one (TTL and
    checksums, which routing changes, are not read)."""
    identity = packet_identity(packet)
    if identity is None:
        return None
    return identity + (packet.src, packet.dst, packet.sport, packet.dport)
