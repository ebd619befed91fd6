"""Protocol numbers and the words for them, shared by everything that reads or writes packets.

Pure data and text: the flow spec, the trace-event decoder, the drop correlator, the packet
crafter and the renderers all take their numbers and their way of writing an endpoint from
here, so that none of them retypes a table another one already has.
"""

from __future__ import annotations

from typing import Optional, Union

# IANA protocol numbers, as they appear in the IP header; the names are nftrace's --proto words.
PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "sctp": 132}
PROTOCOL_NAMES = {number: name for name, number in PROTOCOL_NUMBERS.items()}
# --proto words whose packets have ports (--sport/--dport make sense).
PORT_PROTOCOLS = ("tcp", "udp", "sctp")
# Protocols with ports that --proto does not name, but a packet may carry and a rule match.
OTHER_PORT_PROTOCOLS = {"dccp": 33, "udplite": 136}
# Protocol numbers whose transport header starts with source and destination port.
PORT_PROTOCOL_NUMBERS = frozenset({PROTOCOL_NUMBERS[name] for name in PORT_PROTOCOLS} | set(OTHER_PORT_PROTOCOLS.values()))
ICMP_PROTOCOL_NUMBERS = frozenset({PROTOCOL_NUMBERS["icmp"], PROTOCOL_NUMBERS["icmpv6"]})


def protocol_name(number: Optional[int]) -> Optional[str]:
    """`tcp` for 6; the number as text for a protocol without a --proto word; None for None."""
    if number is None:
        return None
    return PROTOCOL_NAMES.get(number, str(number))


def endpoint_text(address, port: Optional[int]) -> str:
    """`10.0.0.5:22`, `[fd00::5]:22`, `10.0.0.5` without a port, `?` without an address."""
    if address is None:
        return "?"
    text = f"[{address}]" if address.version == 6 and port else str(address)
    return f"{text}:{port}" if port else text


def iptables_command(family: Union[str, int]) -> str:
    """`iptables` or `ip6tables` for a family: nftables' `ip`/`ip6`, or the IP version 4/6."""
    if family in ("ip", 4):
        return "iptables"
    if family in ("ip6", 6):
        return "ip6tables"
    raise ValueError(f"no iptables command for family {family!r}")
