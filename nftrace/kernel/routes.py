"""Asking the namespace's routing about a dropped packet, as `ip route get DST from SRC iif
IIF`, `ip route show table all` and `ip rule` ask it (drops/routing.py says why).

The questions go to the namespace of the calling thread: a trace session's thread is in the
namespace it traces, where the kernel drops it reports were made. drops/routing.py's
RouteQuestions decides which drops are asked about, and how often.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Optional

from ..drops.routing import REFUSALS, RoutingFacts

# The refusing route types (linux/rtnetlink.h RTN_*), numbered as the rule actions that
# refuse (fib_rules.h FR_ACT_*) are.
_REFUSING_TYPES = {"blackhole": 6, "unreachable": 7, "prohibit": 8}
_TABLE_NAMES = {253: "default", 254: "main", 255: "local"}


def routing_facts(src: ipaddress._BaseAddress, dst: ipaddress._BaseAddress, iif_index: Optional[int]) -> RoutingFacts:
    """What routing says now of a packet from `src` to `dst` that came in on `iif_index`."""
    from pyroute2 import IPRoute  # imported when routing dropped a packet: 80 ms nftrace mostly never spends
    from pyroute2.netlink.exceptions import NetlinkError

    family = socket.AF_INET6 if dst.version == 6 else socket.AF_INET
    with IPRoute() as ipr:
        iif = _interface_name(ipr, iif_index)
        forwarding_off = _forwarding_off(dst.version, iif)
        question = {"dst": str(dst), "src": str(src)}
        if iif_index:
            question["iif"] = iif_index
        try:
            ipr.route("get", family=family, **question)
            error = 0
        except NetlinkError as err:
            error = err.code
        refusal = REFUSALS.get(error)
        routes = rules = ()
        if refusal in _REFUSING_TYPES:
            number = _REFUSING_TYPES[refusal]
            routes = _covering_routes(ipr.get_routes(family=family), dst, number)
            if not routes:
                rules = tuple(_rule_text(rule) for rule in ipr.get_rules(family=family) if rule["action"] == number)
    return RoutingFacts(error, routes, rules, forwarding_off)


def _interface_name(ipr, index: Optional[int]) -> Optional[str]:
    if not index:
        return None
    links = ipr.get_links(index)
    return links[0].get_attr("IFLA_IFNAME") if links else None


def _forwarding_off(version: int, iif: Optional[str]) -> Optional[str]:
    """The sysctl that turns forwarding off for the packet, as `sysctl` prints it; None if on.
    IPv4 forwards per interface (conf.IIF.forwarding); IPv6 for all (conf.all.forwarding),
    unless the interface has force_forwarding."""
    if version == 4:
        keys = [f"ipv4/conf/{iif}/forwarding"] if iif else []
    else:
        keys = ["ipv6/conf/all/forwarding"]
        if iif and _sysctl(f"ipv6/conf/{iif}/force_forwarding") == "1":
            keys = []
    for key in keys:
        if _sysctl(key) == "0":
            return f"net.{key.replace('/', '.')} = 0"
    return None


def _sysctl(key: str) -> Optional[str]:
    try:
        with open(f"/proc/sys/net/{key}") as value:
            return value.read().strip()
    except OSError:
        return None


def _covering_routes(routes, dst: ipaddress._BaseAddress, route_type: int) -> tuple:
    """The routes of `route_type` whose prefix holds `dst`, longest prefix first, as text."""
    found = []
    for route in routes:
        if route["type"] != route_type:
            continue
        prefix = route.get_attr("RTA_DST")
        network = ipaddress.ip_network(f"{prefix}/{route['dst_len']}" if prefix else
                                       ("::/0" if dst.version == 6 else "0.0.0.0/0"), strict=False)
        if dst in network:
            table = route.get_attr("RTA_TABLE") or route["table"]
            found.append((network.prefixlen, _route_text(route_type, network, table)))
    found.sort(key=lambda item: -item[0])
    return tuple(text for _, text in found)


def _route_text(route_type: int, network, table: int) -> str:
    kind = next(name for name, number in _REFUSING_TYPES.items() if number == route_type)
    where = "default" if network.prefixlen == 0 else str(network)
    return f"{kind} {where} table {_TABLE_NAMES.get(table, table)}"


def _rule_text(rule) -> str:
    """A policy rule as `ip rule` prints it (the selectors nftrace reads, then the action)."""
    words = [f"{rule.get_attr('FRA_PRIORITY') or 0}:"]
    source, destination = rule.get_attr("FRA_SRC"), rule.get_attr("FRA_DST")
    words += ["from", f"{source}/{rule['src_len']}" if source else "all"]
    if destination:
        words += ["to", f"{destination}/{rule['dst_len']}"]
    for attribute, word in (("FRA_IIFNAME", "iif"), ("FRA_OIFNAME", "oif"), ("FRA_FWMARK", "fwmark")):
        value = rule.get_attr(attribute)
        if value is not None:
            words += [word, hex(value) if attribute == "FRA_FWMARK" else str(value)]
    action = next(name for name, number in _REFUSING_TYPES.items() if number == rule["action"])
    return " ".join(words + [action])
