"""The one packet of a dry run: crafted here, sent into the sandbox.

Two ways in, as on a real machine:
- from the wire: a whole Ethernet frame written with an AF_PACKET socket on the helper end
  of the veth that carries the input interface's name, addressed to that interface's MAC.
  The helper needs no address, route or TCP stack, and sends exactly one packet: no
  retransmission, no handshake of its own;
- from the host: a socket in the sandbox, for a flow that starts on the box itself (a real
  connect() or sendto(), so that the packet leaves through the output path as the box's own
  packets do; a raw socket where the packet must belong to an established connection).

Building packets is pure (bytes in, bytes out) and tested on its own; sending is the small
`send()` below, run as `python -m nftrace.dryrun.inject '<json>'` so that it can be the traffic
command of a trace session.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import socket
import struct
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from ..protocols import PROTOCOL_NUMBERS

TCP_SYN, TCP_ACK = 0x02, 0x10
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
DEFAULT_TTL = 64
ND_HOP_LIMIT = 255  # neighbour discovery's: a receiver drops ND messages with any other (RFC 4861 7.1.1)
PAYLOAD = b"nftrace dry run\n"
SYN_WINDOW = 64240  # Linux's initial window
IP_DF = 0x4000


@dataclass(frozen=True)
class Injection:
    """The packet of a dry run and where it enters the sandbox."""

    src: str
    dst: str
    proto: str
    sport: Optional[int] = None
    dport: Optional[int] = None
    state: str = "new"  # new | established | reply (the other side's answer to a packet sent before)
    iif: Optional[str] = None  # None: sent by a socket of the sandbox itself
    netns: Optional[str] = None  # helper namespace that holds `peer`
    peer: Optional[str] = None
    src_mac: Optional[str] = None
    dst_mac: Optional[str] = None
    mtu: int = 1500
    icmp_id: int = 0
    seq: int = 0
    ack: int = 0
    # A neighbour solicitation for this address (proto icmpv6, dst its solicited-node address):
    # what the sender asks before its first packet to this host or through it. With `nd_advert`,
    # the neighbour advertisement of this address instead, to dst: a neighbour's answer to the
    # box's own solicitation (of the next hop it forwards to, say).
    nd_target: Optional[str] = None
    nd_advert: bool = False

    @property
    def family(self) -> int:
        return 6 if ":" in self.src else 4

    @property
    def local(self) -> bool:
        return self.iif is None

    def command(self) -> list[str]:
        """argv that sends it: the traffic command of the trace session."""
        return [sys.executable, "-m", "nftrace.dryrun.inject", json.dumps(asdict(self))]


# -- checksums ---------------------------------------------------------------------------


def internet_checksum(data: bytes) -> int:
    """RFC 1071: one's complement of the one's complement sum of 16-bit words."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo_header(src: str, dst: str, proto: int, length: int) -> bytes:
    source, destination = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if source.version == 4:
        return source.packed + destination.packed + struct.pack("!BBH", 0, proto, length)
    return source.packed + destination.packed + struct.pack("!I3xB", length, proto)


def _with_checksum(segment: bytes, offset: int, src: str, dst: str, proto: int, zero_means_none: bool = False) -> bytes:
    checksum = internet_checksum(_pseudo_header(src, dst, proto, len(segment)) + segment)
    if zero_means_none and checksum == 0:
        checksum = 0xFFFF  # UDP: 0 would mean "no checksum"
    return segment[:offset] + struct.pack("!H", checksum) + segment[offset + 2:]


_CRC32C_TABLE = []
for _byte in range(256):
    _crc = _byte
    for _ in range(8):
        _crc = (_crc >> 1) ^ 0x82F63B78 if _crc & 1 else _crc >> 1
    _CRC32C_TABLE.append(_crc)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the SCTP checksum."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- transport headers ----------------------------------------------------------------------


def tcp_segment(src: str, dst: str, sport: int, dport: int, flags: int, seq: int, ack: int = 0,
                mss: int = 1460, payload: bytes = b"") -> bytes:
    """A TCP segment with a valid checksum. A SYN carries the options Linux sends."""
    if flags & TCP_SYN:
        options = struct.pack("!BBH", 2, 4, mss) + struct.pack("!BB", 4, 2) + struct.pack("!BBII", 8, 10, 1, 0) \
            + struct.pack("!BBBB", 1, 3, 3, 7)
        window = SYN_WINDOW
    else:
        options = b""
        window = 502
    offset = (20 + len(options)) // 4
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, offset << 4, flags, window, 0, 0) + options
    return _with_checksum(header + payload, 16, src, dst, PROTOCOL_NUMBERS["tcp"])


def udp_datagram(src: str, dst: str, sport: int, dport: int, payload: bytes = PAYLOAD) -> bytes:
    datagram = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return _with_checksum(datagram, 6, src, dst, PROTOCOL_NUMBERS["udp"], zero_means_none=True)


def icmp_echo(ident: int, seq: int = 1, payload: bytes = PAYLOAD, reply: bool = False) -> bytes:
    message = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, seq) + payload
    return message[:2] + struct.pack("!H", internet_checksum(message)) + message[4:]


def icmpv6_echo(src: str, dst: str, ident: int, seq: int = 1, payload: bytes = PAYLOAD, reply: bool = False) -> bytes:
    message = struct.pack("!BBHHH", 129 if reply else 128, 0, 0, ident, seq) + payload
    return _with_checksum(message, 2, src, dst, PROTOCOL_NUMBERS["icmpv6"])


def neighbour_solicitation(src: str, target: str, src_mac: str) -> bytes:
    """ICMPv6 type 135 (RFC 4861 4.3) for `target`, to its solicited-node address, with the
    sender's link-layer address: what a host sends before its first packet to a neighbour."""
    message = struct.pack("!BBHI16s", 135, 0, 0, 0, ipaddress.IPv6Address(target).packed)
    message += struct.pack("!BB6s", 1, 1, _mac_bytes(src_mac))  # option 1: source link-layer address
    return _with_checksum(message, 2, src, solicited_node(target), PROTOCOL_NUMBERS["icmpv6"])


def neighbour_advertisement(src: str, dst: str, target: str, src_mac: str) -> bytes:
    """ICMPv6 type 136 (RFC 4861 4.4) for `target`, solicited and overriding, with its link-layer
    address: how a neighbour answers a solicitation."""
    solicited_override = 0x60000000
    message = struct.pack("!BBHI16s", 136, 0, 0, solicited_override, ipaddress.IPv6Address(target).packed)
    message += struct.pack("!BB6s", 2, 1, _mac_bytes(src_mac))  # option 2: target link-layer address
    return _with_checksum(message, 2, src, dst, PROTOCOL_NUMBERS["icmpv6"])


def solicited_node(address: str) -> str:
    """ff02::1:ffXX:XXXX, the multicast group a neighbour solicitation for `address` goes to."""
    low = ipaddress.IPv6Address(address).packed[13:]
    return str(ipaddress.IPv6Address(bytes.fromhex("ff0200000000000000000001ff") + low))


def multicast_mac(address: str) -> str:
    """33:33 and the group's last four bytes (RFC 2464 7)."""
    return ":".join(f"{octet:02x}" for octet in b"\x33\x33" + ipaddress.IPv6Address(address).packed[12:])


def sctp_init(sport: int, dport: int, tag: int, tsn: int) -> bytes:
    """An SCTP packet with one INIT chunk (the first packet of an association)."""
    chunk = struct.pack("!BBHIIHHI", 1, 0, 20, tag, 106496, 10, 65535, tsn)
    packet = struct.pack("!HHII", sport, dport, 0, 0) + chunk
    return packet[:8] + struct.pack("<I", crc32c(packet)) + packet[12:]


def transport(injection: Injection) -> bytes:
    """The L4 part of the packet, checksummed for the injection's addresses."""
    i = injection
    reply = i.state == "reply"
    if i.proto == "tcp":
        if i.state == "established":
            return tcp_segment(i.src, i.dst, i.sport, i.dport, TCP_ACK, i.seq, i.ack)
        mss = i.mtu - (40 if i.family == 4 else 60)
        if reply:
            return tcp_segment(i.src, i.dst, i.sport, i.dport, TCP_SYN | TCP_ACK, i.seq, i.ack, mss=mss)
        return tcp_segment(i.src, i.dst, i.sport, i.dport, TCP_SYN, i.seq, mss=mss)
    if i.proto == "udp":
        return udp_datagram(i.src, i.dst, i.sport, i.dport)
    if i.proto == "icmp":
        return icmp_echo(i.icmp_id, reply=reply)
    if i.proto == "icmpv6" and i.nd_target and i.nd_advert:
        return neighbour_advertisement(i.src, i.dst, i.nd_target, i.src_mac)
    if i.proto == "icmpv6" and i.nd_target:
        return neighbour_solicitation(i.src, i.nd_target, i.src_mac)
    if i.proto == "icmpv6":
        return icmpv6_echo(i.src, i.dst, i.icmp_id, reply=reply)
    if i.proto == "sctp":
        return sctp_init(i.sport, i.dport, i.seq or 1, i.ack or 1)
    raise ValueError(f"no packet for protocol {i.proto}")


# -- network headers and frames ---------------------------------------------------------------


def ipv4_packet(src: str, dst: str, proto: int, payload: bytes, ident: int = 1, ttl: int = DEFAULT_TTL) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, IP_DF, ttl, proto, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    header = header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]
    return header + payload


def ipv6_packet(src: str, dst: str, next_header: int, payload: bytes, hop_limit: int = DEFAULT_TTL) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, hop_limit,
                       ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed) + payload


def random_mac(token: Callable[[int], int] = secrets.randbelow) -> str:
    """A locally administered unicast MAC address (`token(n)`: a random number below n)."""
    octets = [token(256) for _ in range(6)]
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{o:02x}" for o in octets)


def _mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def ethernet_frame(injection: Injection) -> bytes:
    """The whole frame as it would arrive on the input interface."""
    proto = PROTOCOL_NUMBERS[injection.proto]
    segment = transport(injection)
    if injection.family == 4:
        packet, ethertype = ipv4_packet(injection.src, injection.dst, proto, segment, ident=injection.icmp_id or 1), ETH_P_IP
    else:
        hop_limit = ND_HOP_LIMIT if injection.nd_target else DEFAULT_TTL
        packet, ethertype = ipv6_packet(injection.src, injection.dst, proto, segment, hop_limit), ETH_P_IPV6
    return _mac_bytes(injection.dst_mac) + _mac_bytes(injection.src_mac) + struct.pack("!H", ethertype) + packet


# -- sending --------------------------------------------------------------------------------


def send_frame(injection: Injection) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((injection.peer, 0))
        sock.send(ethernet_frame(injection))


def send_local(injection: Injection) -> None:
    """From a socket of the sandbox, bound to the flow's source address and port."""
    i = injection
    family = socket.AF_INET6 if i.family == 6 else socket.AF_INET
    if i.proto == "tcp" and i.state == "new":
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((i.src, i.sport or 0))
            sock.setblocking(False)
            # The SYN leaves inside connect(); closing at once means no retransmission.
            sock.connect_ex((i.dst, i.dport))
        return
    if i.proto == "udp" and i.state != "reply":
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((i.src, i.sport or 0))
            try:
                sock.sendto(PAYLOAD, (i.dst, i.dport))
            except PermissionError:
                pass  # dropped in the output path: the trace says by what
        return
    # A raw socket for the rest: a packet of a connection (an ACK, a reply) that no socket of
    # the sandbox would send by itself, with the ports and flags it needs.
    with socket.socket(family, socket.SOCK_RAW, PROTOCOL_NUMBERS[i.proto]) as sock:
        sock.bind((i.src, 0))
        payload = icmpv6_echo(i.src, i.dst, i.icmp_id, reply=i.state == "reply") if i.proto == "icmpv6" else transport(i)
        try:
            sock.sendto(payload, (i.dst, 0))
        except PermissionError:
            pass  # dropped in the output path: the trace says by what


def send(injection: Injection) -> None:
    if injection.local:
        send_local(injection)
    else:
        send_frame(injection)


def main(argv=None) -> int:
    from ..errors import NftraceError
    from ..kernel.system import enter_namespace

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m nftrace.dryrun.inject '<injection as JSON>'", file=sys.stderr)
        return 2
    injection = Injection(**json.loads(argv[0]))
    try:
        if injection.netns:
            enter_namespace(injection.netns)
        send(injection)
    except NftraceError as err:
        print(f"nftrace inject: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"nftrace inject: cannot send the dry run's packet: {err.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
