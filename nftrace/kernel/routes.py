"""Asking the namespace's routing, over rtnetlink, what `ip route get [fibmatch]`, `ip route
show table all type T`, `ip rule` and `ip neigh get` ask it: about a packet the kernel dropped
in routing, one the reverse-path filter dropped (the route back), one too big for the route out
(its MTU), one it refused to send, and the next hop of one it let through (drops/routing.py
says why, and says the answers in words).

The questions go to the namespace of the calling thread: a trace session's thread is in the
namespace it traces, where the kernel drops it reports were made. drops/routing.py's
RouteQuestions decides which drops are asked about, and how often.
"""

from __future__ import annotations

import fcntl
import ipaddress
import itertools
import socket
import struct
from typing import Iterator, Optional

from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, SOL_NETLINK
from pyroute2.netlink.rtnl import RTM_GETNEIGH, RTM_GETROUTE, RTM_GETRULE, RTM_NEWNEIGH, RTM_NEWROUTE, RTM_NEWRULE, rt_type
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg, states as neighbour_states
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from ..drops.routing import (PATH_MTU, REFUSALS, REVERSE_PATH, RP_FILTER_MODES, MtuFacts, ReversePathFacts,
                             RouteBack, RoutingFacts)
from .netlink import decode_datagram


def _attribute_numbers(nla_map) -> dict:
    """name → number, from a pyroute2 nla_map (positional, or with the numbers in it)."""
    return {entry[-2]: entry[0] if len(entry) == 3 else number for number, entry in enumerate(nla_map)}


RTA = _attribute_numbers(rtmsg.nla_map)
FRA = _attribute_numbers(fibmsg.nla_map)
NDA = _attribute_numbers(ndmsg.nla_map)
# Neighbour states (NUD_*) of a next hop that has not answered ARP or neighbour discovery.
UNANSWERED = {neighbour_states["incomplete"]: "INCOMPLETE", neighbour_states["failed"]: "FAILED"}
# linux/netlink.h: the kernel checks a dump request's header and filters by it (the route
# type here) instead of sending every route: a full BGP table is a million of them.
NETLINK_GET_STRICT_CHK = 12
_NLMSG = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
# struct rtmsg and struct fib_rule_hdr: four bytes, table, three bytes (rtmsg: protocol,
# scope, type; fib_rule_hdr: two reserved, action), flags.
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=B3xiHBB")  # struct ndmsg: family, ifindex, state, flags, type
_RTNEXTHOP = struct.Struct("=HBBi")  # struct rtnexthop: length, flags, hops, interface index
_TABLE_NAMES = {253: "default", 254: "main", 255: "local"}
RTM_F_FIB_MATCH = 0x2000  # linux/rtnetlink.h: answer with the route in the table, not the lookup's result
RTAX_MTU = 2  # linux/rtnetlink.h: the route's MTU among its metrics
SIOCGIFMTU = 0x8921
_sequence = itertools.count(1)
ANSWER_SECONDS = 1.0


def routing_facts(question: str, src: ipaddress._BaseAddress, dst: ipaddress._BaseAddress,
                  iif_index: Optional[int], iif: Optional[str], mark: Optional[int] = None):
    """What routing says now of a packet from `src` to `dst` that came in on `iif` (index and
    name) with `mark`, that the kernel dropped: the `question` of drops/routing.py's
    question_for (RoutingFacts, ReversePathFacts, MtuFacts)."""
    with _rtnetlink() as sock:
        if question == REVERSE_PATH:
            return _reverse_path(sock, src, iif, mark)
        if question == PATH_MTU:
            return _path_mtu(sock, src, dst, iif_index, mark)
        error, _ = _route_get(sock, dst, src, iif_index, mark)
        return _facts(sock, dst, error, _forwarding_off(dst.version, iif))


def sending_facts(src: ipaddress._BaseAddress, dst: ipaddress._BaseAddress) -> Optional[RoutingFacts]:
    """What routing says now of a packet that this namespace sends from `src` to `dst`
    (`ip route get DST from SRC`); None where `src` is not an address of the namespace."""
    with _rtnetlink() as sock:
        error, route = _route_get(sock, src, None, None)
        if error or route is None or route[0] != rt_type["local"]:
            return None
        error, _ = _route_get(sock, dst, src, None)
        return _facts(sock, dst, error, None)


def unanswered_next_hop(dst: ipaddress._BaseAddress) -> Optional[tuple]:
    """(next hop, output interface index, neighbour state) where the next hop toward `dst` has
    not answered ARP or neighbour discovery (INCOMPLETE: still asked; FAILED: never answered);
    None where it has, or no neighbour is involved."""
    with _rtnetlink() as sock:
        error, route = _route_get(sock, dst, None, None)
        if error or route is None or route[0] != rt_type["unicast"]:
            return None
        attributes = route[1]
        oif = _number(attributes, RTA["RTA_OIF"])
        gateway = attributes.get(RTA["RTA_GATEWAY"])
        hop = ipaddress.ip_address(gateway) if gateway else dst
        if oif is None:
            return None
        header = _NDMSG.pack(_family(hop), oif, 0, 0, 0)
        for msg_type, body in _exchange(sock, RTM_GETNEIGH, NLM_F_REQUEST, header + _attribute(NDA["NDA_DST"], hop.packed)):
            if msg_type == RTM_NEWNEIGH and len(body) >= _NDMSG.size:
                state = _NDMSG.unpack_from(body)[2]
                return (hop, oif, UNANSWERED[state]) if state in UNANSWERED else None
        return None


def _family(address) -> int:
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


def _rtnetlink() -> socket.socket:
    """A socket for the questions; an answer that never comes is a timeout (OSError), never a
    trace that hangs."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
    sock.settimeout(ANSWER_SECONDS)
    return sock


def _facts(sock: socket.socket, dst, error: int, forwarding_off: Optional[str]) -> RoutingFacts:
    """The refusal that a lookup's `error` names, with the routes (or rules) that make it."""
    family = _family(dst)
    refusal = REFUSALS.get(error)
    routes = rules = ()
    if refusal in rt_type:  # blackhole, unreachable, prohibit (not: no route)
        number = rt_type[refusal]
        routes = _covering_routes(sock, family, dst, number)
        if not routes:  # a policy rule's action, numbered as the route types are (fib_rules.h FR_ACT_*)
            rules = tuple(text for action, text in _rules(sock, family) if action == number)
    return RoutingFacts(error, routes, rules, forwarding_off)


def _reverse_path(sock: socket.socket, src, iif: Optional[str], mark: Optional[int]) -> Optional[ReversePathFacts]:
    """The route back to `src` and the rp_filter setting in force on `iif`; None where the
    filter is off (the settings changed since the drop)."""
    settings = {name: _sysctl_number(f"ipv4/conf/{name}/rp_filter") for name in ("all", iif) if name}
    mode = max(settings.values(), default=0)
    if mode not in RP_FILTER_MODES:
        return None
    in_force = tuple(f"net.ipv4.conf.{name}.rp_filter = {mode}" for name, value in settings.items() if value == mode)
    lower = settings.get(iif, mode) if iif else mode
    overridden = f"net.ipv4.conf.{iif}.rp_filter = {lower}" if lower < mode else None
    vmark = any(_sysctl_number(f"ipv4/conf/{name}/src_valid_mark") for name in ("all", iif) if name)
    return ReversePathFacts(mode, in_force, overridden, _route_back(sock, src, mark if vmark else None))


def route_back(src: ipaddress._BaseAddress, mark: Optional[int] = None) -> RouteBack:
    """The route that replies to `src` would take (with `mark`), in this thread's namespace."""
    with _rtnetlink() as sock:
        return _route_back(sock, src, mark)


def _route_back(sock: socket.socket, src, mark: Optional[int]) -> RouteBack:
    error, route = _route_get(sock, src, None, None, mark, whole_route=True)
    text, oifs = _route_words(route) if route is not None else (None, ())
    return RouteBack(error, text, oifs)


def _path_mtu(sock: socket.socket, src, dst, iif_index: Optional[int], mark: Optional[int]) -> Optional[MtuFacts]:
    """The MTU of the route that forwards `src` → `dst` in on `iif_index`: the route's own
    (RTAX_MTU: an `mtu` on the route or a path MTU learned) or its output interface's."""
    error, route = _route_get(sock, dst, src, iif_index, mark)
    if error or route is None:
        return None
    oif = _number(route[1], RTA["RTA_OIF"])
    name = _interface_name(oif) if oif else None
    route_mtu = _metric(route[1], RTAX_MTU)
    if route_mtu:
        return MtuFacts(route_mtu, name, from_route=True)
    mtu = _interface_mtu(name) if name else None
    return MtuFacts(mtu, name) if mtu else None


def _route_get(sock: socket.socket, dst, src, iif_index: Optional[int], mark: Optional[int] = None,
               whole_route: bool = False) -> tuple:
    """(errno, (route type, attributes, prefix length, table)) of `ip route get [fibmatch] DST
    [from SRC] [iif IIF] [mark MARK]`: errno 0 when it finds a route. `whole_route` (fibmatch)
    answers with the route in the table (its prefix, its next hops) instead of the one-address
    route the kernel makes of it."""
    family = _family(dst)
    attributes = _attribute(RTA["RTA_DST"], dst.packed)
    if src is not None:
        attributes += _attribute(RTA["RTA_SRC"], src.packed)
    if iif_index:
        attributes += _attribute(RTA["RTA_IIF"], _U32.pack(iif_index))
    if mark:
        attributes += _attribute(RTA["RTA_MARK"], _U32.pack(mark))
    flags = RTM_F_FIB_MATCH if whole_route else 0
    header = _RTMSG.pack(family, dst.max_prefixlen, src.max_prefixlen if src is not None else 0, 0, 0, 0, 0, 0, flags)
    for msg_type, body in _exchange(sock, RTM_GETROUTE, NLM_F_REQUEST, header + attributes):
        if msg_type == NLMSG_ERROR:
            return -struct.unpack_from("=i", body)[0], None
        if msg_type == RTM_NEWROUTE and len(body) >= _RTMSG.size:
            _, dst_len, _, _, table, _, _, kind, _ = _RTMSG.unpack_from(body)
            found = _attributes(body, _RTMSG.size)
            return 0, (kind, found, dst_len, _number(found, RTA["RTA_TABLE"]) or table)
    return 0, None


def _route_words(route: tuple) -> tuple:
    """(the route as `ip route` prints it, the names of the interfaces it leaves through)."""
    kind, attributes, dst_len, table = route
    prefix = attributes.get(RTA["RTA_DST"])
    words = [f"{ipaddress.ip_address(prefix)}/{dst_len}" if prefix and dst_len else "default"]
    if kind != rt_type["unicast"]:
        words.insert(0, rt_type.get(kind, str(kind)))
    hops = list(_next_hops(attributes))
    for gateway, oif in hops:
        words += (["nexthop"] if len(hops) > 1 else []) + (["via", gateway] if gateway else []) + \
            (["dev", _interface_name(oif)] if oif else [])
    if table not in (None, 254):
        words += ["table", str(_TABLE_NAMES.get(table, table))]
    return " ".join(words), tuple(dict.fromkeys(_interface_name(oif) for _, oif in hops if oif))


def _next_hops(attributes: dict) -> Iterator[tuple]:
    """(gateway or None, output interface index) of each next hop: one, or each of a multipath
    route's (RTA_MULTIPATH: struct rtnexthop, then its own attributes)."""
    multipath = attributes.get(RTA["RTA_MULTIPATH"])
    if multipath is None:
        gateway = attributes.get(RTA["RTA_GATEWAY"])
        yield (str(ipaddress.ip_address(gateway)) if gateway else None), _number(attributes, RTA["RTA_OIF"])
        return
    offset = 0
    while offset + _RTNEXTHOP.size <= len(multipath):
        length, _, _, oif = _RTNEXTHOP.unpack_from(multipath, offset)
        if length < _RTNEXTHOP.size:
            break
        gateway = _attributes(multipath[:offset + length], offset + _RTNEXTHOP.size).get(RTA["RTA_GATEWAY"])
        yield (str(ipaddress.ip_address(gateway)) if gateway else None), oif
        offset += (length + 3) & ~3


def _metric(attributes: dict, number: int) -> Optional[int]:
    """One of a route's metrics (RTA_METRICS, nested), e.g. RTAX_MTU."""
    metrics = attributes.get(RTA["RTA_METRICS"])
    return _number(_attributes(metrics, 0), number) if metrics else None


def _interface_name(index: int) -> str:
    try:
        return socket.if_indextoname(index)
    except OSError:  # gone since
        return str(index)


def _interface_mtu(name: str) -> Optional[int]:
    """The interface's MTU (SIOCGIFMTU), in the calling thread's namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            answer = fcntl.ioctl(probe, SIOCGIFMTU, struct.pack("16si", name.encode()[:15], 0))
        except OSError:
            return None
    return struct.unpack_from("16si", answer)[1]


def _covering_routes(sock: socket.socket, family: int, dst, route_type: int) -> tuple:
    """The routes of `route_type` in any table whose prefix holds `dst`, longest prefix first,
    as `ip route` prints them; the kernel sends only routes of that type (strict dump)."""
    found = []
    header = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, route_type, 0)
    for msg_type, body in _exchange(sock, RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, header):
        if msg_type != RTM_NEWROUTE or len(body) < _RTMSG.size:
            continue
        _, dst_len, _, _, table, _, _, kind, _ = _RTMSG.unpack_from(body)
        if kind != route_type:
            continue
        attributes = _attributes(body, _RTMSG.size)
        prefix = attributes.get(RTA["RTA_DST"], b"\0" * (dst.max_prefixlen // 8))
        network = ipaddress.ip_network((ipaddress.ip_address(prefix), dst_len), strict=False)
        if dst in network:
            table = _U32.unpack(attributes[RTA["RTA_TABLE"]])[0] if RTA["RTA_TABLE"] in attributes else table
            where = "default" if dst_len == 0 else str(network)
            found.append((dst_len, f"{rt_type[route_type]} {where} table {_TABLE_NAMES.get(table, table)}"))
    found.sort(key=lambda item: -item[0])
    return tuple(text for _, text in found)


def _rules(sock: socket.socket, family: int) -> Iterator[tuple]:
    """(action, the rule as `ip rule` prints it: priority, the selectors nftrace reads, action)."""
    for msg_type, body in _exchange(sock, RTM_GETRULE, NLM_F_REQUEST | NLM_F_DUMP,
                                    _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
        if msg_type != RTM_NEWRULE or len(body) < _RTMSG.size:
            continue
        _, dst_len, src_len, _, _, _, _, action, _ = _RTMSG.unpack_from(body)
        attributes = _attributes(body, _RTMSG.size)
        words = [f"{_number(attributes, FRA['FRA_PRIORITY']) or 0}:", "from"]
        source, destination = attributes.get(FRA["FRA_SRC"]), attributes.get(FRA["FRA_DST"])
        words.append(f"{ipaddress.ip_address(source)}/{src_len}" if source else "all")
        if destination:
            words += ["to", f"{ipaddress.ip_address(destination)}/{dst_len}"]
        for name, word in (("FRA_IIFNAME", "iif"), ("FRA_OIFNAME", "oif")):
            if FRA[name] in attributes:
                words += [word, attributes[FRA[name]].rstrip(b"\0").decode("utf-8", "replace")]
        if FRA["FRA_FWMARK"] in attributes:
            words += ["fwmark", hex(_number(attributes, FRA["FRA_FWMARK"]))]
        yield action, " ".join(words + [rt_type.get(action, str(action))])


def _exchange(sock: socket.socket, msg_type: int, flags: int, payload: bytes) -> Iterator[tuple]:
    """Send one request; yield (type, body) of each answer to it, up to the end of a dump or
    the one answer (or error) of a request."""
    sequence = next(_sequence)
    sock.send(_NLMSG.pack(_NLMSG.size + len(payload), msg_type, flags, sequence, 0) + payload)
    while True:
        for kind, message in decode_datagram(sock.recv(1 << 16)):
            if _NLMSG.unpack_from(message)[3] != sequence:
                continue
            if kind == NLMSG_DONE:
                return
            yield kind, message[_NLMSG.size:]
            if not flags & NLM_F_DUMP or kind == NLMSG_ERROR:
                return


def _attribute(number: int, value: bytes) -> bytes:
    length = _NLA.size + len(value)
    return _NLA.pack(length, number) + value + b"\0" * (-length % 4)


def _attributes(body: bytes, offset: int) -> dict:
    found = {}
    while offset + _NLA.size <= len(body):
        length, number = _NLA.unpack_from(body, offset)
        if length < _NLA.size:
            break
        found.setdefault(number & 0x3FFF, body[offset + _NLA.size:offset + length])
        offset += (length + 3) & ~3
    return found


def _number(attributes: dict, number: int) -> Optional[int]:
    value = attributes.get(number)
    return _U32.unpack(value[:4])[0] if value is not None and len(value) >= 4 else None


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


def _sysctl_number(key: str) -> int:
    value = _sysctl(key)
    return int(value) if value and value.lstrip("-").isdigit() else 0
