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
    """One direction of traffic: the packets whose trace the user wants to read.

    `why` always has both addresses. `drops` may have none at all (every packet, IPv4 and
    IPv6): a missing address matches any, and `ip_version` is None when nothing (address,
    icmp or icmpv6) ties the flow to one family.
    """

    src: Optional[IPNetwork]
    dst: Optional[IPNetwork]
    proto: Optional[str] = None
    sport: Optional[int] = None
    dport: Optional[int] = None
    iif: Optional[str] = None
    oif: Optional[str] = None

    @property
    def ip_version(self) -> Optional[int]:
        for network in (self.src, self.dst):
            if network is not None:
                return network.version
        return {"icmp": 4, "icmpv6": 6}.get(self.proto or "")

    @property
    def nft_family(self) -> str:
        """The nftables keyword for the L3 protocol: `ip` or `ip6` (`inet` for both)."""
        return {4: "ip", 6: "ip6"}.get(self.ip_version, "inet")

    @property
    def nfprotos(self) -> tuple[int, ...]:
        """The kernel's numbers (NFPROTO_IPV4, NFPROTO_IPV6) of the IP protocols it may have."""
        return {4: (2,), 6: (10,)}.get(self.ip_version, (2, 10))

    def matches(self, src, dst, proto: Optional[int], sport: Optional[int], dport: Optional[int]) -> bool:
        """Whether a packet with these header fields belongs to the flow.

        Used on the headers of a packet's first traced hook, so that two nftrace runs in the
        same namespace, whose trace events every listener receives, each keep only their own.
        """
        if src is None or dst is None:
            return False
        if (self.src is not None and src not in self.src) or (self.dst is not None and dst not in self.dst):
            return False
        if self.src is None and self.dst is None and self.ip_version is not None and src.version != self.ip_version:
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
                     if (network is not None and network.prefixlen) or port is not None)

    def matches_an_end(self, src, dst, proto: Optional[int], sport: Optional[int], dport: Optional[int]) -> bool:
        """Whether one end of a packet is the flow's: its source (address and port), or its
        destination. A packet of the flow that NAT rewrote on its way keeps one end (DNAT keeps
        the source, SNAT the destination); an end the flow says nothing about is not one."""
        if src is None or dst is None:
            return False
        if self.proto is not None and proto != PROTOCOL_NUMBERS[self.proto]:
            return False
        if self.ip_version is not None and src.version != self.ip_version:
            return False
        ends = self.constrained_ends()
        if not ends:
            return True
        if "src" in ends and (self.src is None or src in self.src) and (self.sport is None or sport == self.sport):
            return True
        return "dst" in ends and (self.dst is None or dst in self.dst) and (self.dport is None or dport == self.dport)

    def to_json(self) -> dict:
        return {
            "src": _network_text(self.src) if self.src is not None else None,
            "dst": _network_text(self.dst) if self.dst is not None else None,
            "proto": self.proto,
            "sport": self.sport,
            "dport": self.dport,
            "iif": self.iif,
            "oif": self.oif,
        }

    def describe(self) -> str:
        """Short human form: `10.0.0.5 → 10.0.0.9:22 tcp`; `any → any:53 udp in eth0`."""
        src = (_network_text(self.src) if self.src is not None else "any") + (f":{self.sport}" if self.sport else "")
        dst = (_network_text(self.dst) if self.dst is not None else "any") + (f":{self.dport}" if self.dport else "")
        interfaces = "".join(f" {word} {name}" for word, name in (("in", self.iif), ("out", self.oif)) if name)
        return f"{src} → {dst}" + (f" {self.proto}" if self.proto else "") + interfaces


def shown(text: str, limit: int = 60) -> str:
    """User input as it may appear in a one-line message: escaped, and cut if very long."""
    escaped = text.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."


def one_address(network: Optional[IPNetwork]):
    """The address of a network that is one address (a /32 or /128); None for a prefix or none."""
    if network is None or network.prefixlen != network.max_prefixlen:
        return None
    return network.network_address


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


def parse_filter(
    src: Optional[str] = None,
    dst: Optional[str] = None,
    proto: Optional[str] = None,
    sport: Optional[int] = None,
    dport: Optional[int] = None,
    iif: Optional[str] = None,
    oif: Optional[str] = None,
) -> Flow:
    """`drops`' filter: a flow whose every part is optional (none at all: every packet)."""
    src_net = parse_address(src, "--from") if src is not None else None
    dst_net = parse_address(dst, "--to") if dst is not None else None
    return _checked_flow(src, dst, src_net, dst_net, proto, sport, dport, iif, oif)


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
    return _checked_flow(src, dst, parse_address(src, "--from"), parse_address(dst, "--to"), proto, sport, dport,
                         iif, oif)


def _checked_flow(src, dst, src_net, dst_net, proto, sport, dport, iif, oif) -> Flow:
    if src_net is not None and dst_net is not None and src_net.version != dst_net.version:
        raise InputError(
            f"--from {shown(src)} is IPv{src_net.version} but --to {shown(dst)} is IPv{dst_net.version}: "
            "one flow has one family"
        )
    version = (src_net or dst_net).version if (src_net or dst_net) is not None else None
    if proto is not None:
        proto = proto.lower()
        if proto not in PROTOCOL_NUMBERS:
            raise InputError(f"--proto: '{shown(proto)}' is not one of {', '.join(PROTOCOL_NUMBERS)}")
        if proto == "icmp" and version == 6:
            raise InputError("--proto icmp is IPv4; use --proto icmpv6 with IPv6 addresses")
        if proto == "icmpv6" and version == 4:
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
