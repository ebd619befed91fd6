"""The flow the user asks about, validated before anything touches the kernel."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Optional, Union

from .errors import InputError
from .protocols import PORT_PROTOCOLS, PROTOCOL_NUMBERS

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IFNAMSIZ = 16


@dataclass(frozen=True)
class Flow:
    """One direction of traffic: the packets whose trace the user wants to read."""

    src: IPNetwork
    dst: IPNetwork
    proto: Optional[str] = None
    sport: Optional[int] = None
    dport: Optional[int] = None
    iif: Optional[str] = None
    oif: Optional[str] = None

    @property
    def ip_version(self) -> int:
        return self.src.version

    @property
    def nft_family(self) -> str:
        """The nftables keyword for the L3 protocol: `ip` or `ip6`."""
        return "ip" if self.ip_version == 4 else "ip6"

    def matches(self, src, dst, proto: Optional[int], sport: Optional[int], dport: Optional[int]) -> bool:
        """Whether a packet with these header fields belongs to the flow.

        Used on the headers of a packet's first traced hook, so that two nftrace runs in the
        same namespace, whose trace events every listener receives, each keep only their own.
        """
        if src is None or dst is None or src not in self.src or dst not in self.dst:
            return False
        if self.proto is not None and proto != PROTOCOL_NUMBERS[self.proto]:
            return False
        if self.sport is not None and sport != self.sport:
            return False
        if self.dport is not None and dport != self.dport:
            return False
        return True

    def constrained_ends(self) -> tuple:
        """The ends ("src", "dst") that the flow says something about: an address prefix or a port."""
        return tuple(end for end, network, port in (("src", self.src, self.sport), ("dst", self.dst, self.dport))
                     if network.prefixlen or port is not None)

    def matches_an_end(self, src, dst, proto: Optional[int], sport: Optional[int], dport: Optional[int]) -> bool:
        """Whether one end of a packet is the flow's: its source (address and port), or its
        destination. A packet of the flow that NAT rewrote on its way keeps one end (DNAT keeps
        the source, SNAT the destination); an end the flow says nothing about is not one."""
        if src is None or dst is None:
            return False
        if self.proto is not None and proto != PROTOCOL_NUMBERS[self.proto]:
            return False
        if src.version != self.src.version:
            return False
        ends = self.constrained_ends()
        if not ends:
            return True
        if "src" in ends and src in self.src and (self.sport is None or sport == self.sport):
            return True
        return "dst" in ends and dst in self.dst and (self.dport is None or dport == self.dport)

    def to_json(self) -> dict:
        return {
            "src": _network_text(self.src),
            "dst": _network_text(self.dst),
            "proto": self.proto,
            "sport": self.sport,
            "dport": self.dport,
            "iif": self.iif,
            "oif": self.oif,
        }

    def describe(self) -> str:
        """Short human form: `10.0.0.5 → 10.0.0.9:22 tcp`."""
        src = _network_text(self.src) + (f":{self.sport}" if self.sport else "")
        dst = _network_text(self.dst) + (f":{self.dport}" if self.dport else "")
        return f"{src} → {dst}" + (f" {self.proto}" if self.proto else "")


def shown(text: str, limit: int = 60) -> str:
    """User input as it may appear in a one-line message: escaped, and cut if very long."""
    escaped = text.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."


def _network_text(network: IPNetwork) -> str:
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def parse_address(text: str, option: str) -> IPNetwork:
    """`10.0.0.5`, `10.0.0.0/24`, `fd00::1`, `fd00::/64`; host bits set is an error, not a guess."""
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as err:
        # ipaddress says "has host bits set" or "... does not appear to be an IPv4 or IPv6 network".
        reason = "not IPv4 or IPv6" if "does not appear" in str(err) else shown(str(err))
        raise InputError(f"{option}: '{shown(text)}' is not an IP address or prefix ({reason})") from None


def parse_port(value: Optional[int], option: str) -> Optional[int]:
    if value is None:
        return None
    if not 1 <= value <= 65535:
        raise InputError(f"{option}: port {value} is out of range 1-65535")
    return value


def parse_interface(name: Optional[str], option: str) -> Optional[str]:
    """Syntax only; whether it exists is checked inside the target namespace."""
    if name is None:
        return None
    if not name or len(name) >= IFNAMSIZ or "/" in name or any(c.isspace() for c in name) or "\0" in name:
        raise InputError(f"{option}: '{shown(name)}' is not a valid interface name")
    return name


def parse_flow(
    src: str,
    dst: str,
    proto: Optional[str] = None,
    sport: Optional[int] = None,
    dport: Optional[int] = None,
    iif: Optional[str] = None,
    oif: Optional[str] = None,
) -> Flow:
    """Validate everything the user typed; raise InputError with the one line to show."""
    src_net = parse_address(src, "--from")
    dst_net = parse_address(dst, "--to")
    if src_net.version != dst_net.version:
        raise InputError(
            f"--from {shown(src)} is IPv{src_net.version} but --to {shown(dst)} is IPv{dst_net.version}: "
            "one flow has one family"
        )
    if proto is not None:
        proto = proto.lower()
        if proto not in PROTOCOL_NUMBERS:
            raise InputError(f"--proto: '{shown(proto)}' is not one of {', '.join(PROTOCOL_NUMBERS)}")
        if proto == "icmp" and src_net.version == 6:
            raise InputError("--proto icmp is IPv4; use --proto icmpv6 with IPv6 addresses")
        if proto == "icmpv6" and src_net.version == 4:
            raise InputError("--proto icmpv6 is IPv6; use --proto icmp with IPv4 addresses")
    sport = parse_port(sport, "--sport")
    dport = parse_port(dport, "--dport")
    if (sport is not None or dport is not None) and proto not in PORT_PROTOCOLS:
        raise InputError("--sport/--dport need --proto tcp, udp or sctp")
    return Flow(
        src=src_net,
        dst=dst_net,
        proto=proto,
        sport=sport,
        dport=dport,
        iif=parse_interface(iif, "--iif"),
        oif=parse_interface(oif, "--oif"),
    )
