"""The packet as one hook saw it, and what one match expression says about it.

Shared by the evaluators of nftables rules (trace/nftexpr.py) and of iptables rules
(iptables/xtmatch.py): both turn a rule into `Condition`s, one per match expression, each
true, false, or unknown (None) for the packet. Pure logic.

`unknown` is a real answer, not a failure: a rate limit, a quota, a socket lookup, a fib
lookup, the time of day... depend on state the trace does not report, and guessing them
would make up an explanation the kernel never gave.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Optional

from ..protocols import OTHER_PORT_PROTOCOLS, PORT_PROTOCOL_NUMBERS, PROTOCOL_NAMES, PROTOCOL_NUMBERS

# Protocol names nft and iptables print, beyond the flow's own.
PROTOCOLS = dict(PROTOCOL_NUMBERS, **{"ipv6-icmp": 58, "icmp6": 58, "igmp": 2, "gre": 47, "esp": 50, "ah": 51,
                                     "udplite": 136, "dccp": 33, "ipip": 4, "ospf": 89, "vrrp": 112})
# Protocols whose header carries the port (or icmp) fields, as nft names them in `payload`.
PAYLOAD_PROTOCOLS = {**PROTOCOL_NUMBERS, **OTHER_PORT_PROTOCOLS}

ICMP_TYPES = {
    "echo-reply": 0, "destination-unreachable": 3, "source-quench": 4, "redirect": 5, "echo-request": 8,
    "router-advertisement": 9, "router-solicitation": 10, "time-exceeded": 11, "parameter-problem": 12,
    "timestamp-request": 13, "timestamp-reply": 14, "info-request": 15, "info-reply": 16,
    "address-mask-request": 17, "address-mask-reply": 18,
}
ICMPV6_TYPES = {
    "destination-unreachable": 1, "packet-too-big": 2, "time-exceeded": 3, "parameter-problem": 4,
    "echo-request": 128, "echo-reply": 129, "mld-listener-query": 130, "mld-listener-report": 131,
    "mld-listener-done": 132, "mld-listener-reduction": 132, "nd-router-solicit": 133, "nd-router-advert": 134,
    "nd-neighbor-solicit": 135, "nd-neighbor-advert": 136, "nd-redirect": 137, "router-renumbering": 138,
    "mld2-listener-report": 143,
}


def protocol_number(value) -> Optional[int]:
    """`tcp`, `6`, 6 → 6; None for a name nftrace does not know."""
    if isinstance(value, int):
        return value
    text = str(value).strip().lower()
    if text.isdigit():
        return int(text)
    return PROTOCOLS.get(text)


def protocol_text(number: Optional[int]) -> str:
    if number is None:
        return "?"
    return PROTOCOL_NAMES.get(number, str(number))


@dataclass(frozen=True)
class PacketView:
    """What a rule at one hook can test, as the kernel reported it there.

    None means not reported (not "zero"): an expression on such a field is unknown.
    `ct_state` is one of nft's words (new, established, related, invalid, untracked).
    """

    hook: Optional[str]
    version: Optional[int]  # 4 or 6
    src: Optional[ipaddress._BaseAddress] = None
    dst: Optional[ipaddress._BaseAddress] = None
    proto: Optional[int] = None
    sport: Optional[int] = None
    dport: Optional[int] = None
    icmp_type: Optional[int] = None
    icmp_code: Optional[int] = None
    tcp_flags: Optional[int] = None
    length: Optional[int] = None
    iifname: Optional[str] = None  # "" when the hook has no input interface (output)
    oifname: Optional[str] = None  # "" before routing chose one (prerouting, input)
    mark: Optional[int] = None
    ct_state: Optional[str] = None
    ct_status: Optional[frozenset] = None
    ct_direction: Optional[str] = None

    @property
    def nfproto(self) -> Optional[str]:
        return {4: "ipv4", 6: "ipv6"}.get(self.version or 0)

    @property
    def has_ports(self) -> bool:
        return self.proto in PORT_PROTOCOL_NUMBERS


@dataclass(frozen=True)
class Condition:
    """One match expression of a rule, evaluated against a packet.

    `matched` is True, False, or None (cannot be evaluated from what the kernel reported).
    `expr` is the expression as the ruleset prints it (nft's words, or iptables-save's);
    `field` the normalised thing it tests (`ip saddr`, `tcp dport`, `iifname`, `ct state`,
    `meta mark`, ...); `packet` the packet's value in the same notation; `wanted` what the
    expression wanted (`10.77.1.0/28`, `@allowed`, `{ 22, 80 }`); `set_name` the named set
    (or ipset) a lookup used; `negated` for `!=` / `!`; `reason` the sentence that explains a
    false one; `other_protocol`: the packet has no such field at all (a tcp port of a udp
    packet, an IPv4 address of an IPv6 packet): another packet, not another value, would match.
    """

    expr: str
    matched: Optional[bool]
    field: Optional[str] = None
    packet: Optional[str] = None
    wanted: Optional[str] = None
    set_name: Optional[str] = None
    negated: bool = False
    reason: Optional[str] = None
    other_protocol: bool = False


def unknown(expr: str, field_name: Optional[str] = None) -> Condition:
    return Condition(expr, None, field_name)


@dataclass
class RuleEvaluation:
    """A rule's match expressions against one packet, in rule order."""

    conditions: list = field(default_factory=list)

    @property
    def failed(self) -> list:
        return [c for c in self.conditions if c.matched is False]

    @property
    def unknown(self) -> list:
        return [c for c in self.conditions if c.matched is None]

    @property
    def matches(self) -> Optional[bool]:
        """True when every expression matched, False when one failed, else None."""
        if self.failed:
            return False
        return None if self.unknown else True


def wildcard_name_matches(pattern: str, name: Optional[str], wildcard: str) -> Optional[bool]:
    """Interface names: `eth*` (nft) and `eth+` (iptables) match every name with that prefix."""
    if name is None:
        return None
    if pattern.endswith(wildcard):
        return name.startswith(pattern[:-1])
    return name == pattern
