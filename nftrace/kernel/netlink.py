"""Netlink as nftrace reads it: the constants, datagrams split into messages, and attributes
read from an nla_map-style description.

The constants are the kernel's numbers, written here rather than imported from pyroute2:
importing any part of pyroute2 imports its whole package first (0.1 s, a third of nftrace's
start-up), so its message classes are imported where they are used, when they are; a test
checks every number here against pyroute2's.

Pure: nothing here opens a socket, so recorded datagrams read exactly like live ones. The
sockets are in monitor.py (trace events, ruleset changes) and iptables/nflog.py (TRACE lines).

Attributes are read by a compact table made from an nla_map (the form pyroute2's message
classes use): attribute number → (name, how to read it). Only the attributes a caller asks for
are in the table; the others are skipped unread, which is what makes the live decoding of
trace events an order of magnitude faster than pyroute2's classes (they stay the reference).
"""

from __future__ import annotations

import importlib.util
import struct
from typing import Iterable, Iterator, Optional

from ..errors import EnvironmentProblem


__all__ = [
    "NETLINK_ADD_MEMBERSHIP", "NETLINK_NETFILTER", "NLM_F_ACK", "NLM_F_REQUEST", "NLMSG_ERROR", "SOL_NETLINK",
    "NFNL_SUBSYS_NFTABLES", "NFNL_SUBSYS_ULOG", "NFNLGRP_NFTABLES", "NFNLGRP_NFTRACE",
    "NFT_MSG_DELTABLE", "NFT_MSG_NEWGEN", "NFT_MSG_TRACE", "NFPROTO_NAMES",
    "SO_RCVBUFFORCE", "NLA_TYPE_MASK", "NLMSG_HEADER_SIZE", "NFGENMSG_END",
    "compact_table", "decode_datagram", "message_type", "read_attributes",
]

# linux/netlink.h
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
# linux/netfilter/nfnetlink.h
NFNL_SUBSYS_ULOG = 4
NFNL_SUBSYS_NFTABLES = 10
NFNLGRP_NFTABLES = 7
NFNLGRP_NFTRACE = 9
# linux/netfilter/nf_tables.h
NFT_MSG_DELTABLE = 2
NFT_MSG_NEWGEN = 15
NFT_MSG_TRACE = 17
# linux/netfilter.h
NFPROTO_INET, NFPROTO_IPV4, NFPROTO_ARP, NFPROTO_NETDEV, NFPROTO_BRIDGE, NFPROTO_IPV6 = 1, 2, 3, 5, 7, 10
# asm-generic/socket.h; Python's socket module does not name it.
SO_RCVBUFFORCE = 33
NLA_TYPE_MASK = 0xFFFF & ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)
NLMSG_HEADER_SIZE = 16
NFGENMSG_END = NLMSG_HEADER_SIZE + 4  # nlmsghdr + nfgenmsg: where a netfilter message's attributes start

# nfgenmsg.nfgen_family, as nftables names the families of its tables.
NFPROTO_NAMES = {NFPROTO_INET: "inet", NFPROTO_IPV4: "ip", NFPROTO_ARP: "arp", NFPROTO_NETDEV: "netdev",
                 NFPROTO_BRIDGE: "bridge", NFPROTO_IPV6: "ip6"}

_STRING, _BYTES, _FIXED, _NESTED = range(4)
_FIXED_FORMATS = {"uint8": "B", "be16": ">H", "be32": ">I", "sbe32": ">i", "be64": ">Q"}
_NLA_HEADER = struct.Struct("=HH")
_NLMSG_HEADER = struct.Struct("=IH")
_NLMSG_LENGTH = struct.Struct("=I")


def require_pyroute2() -> None:
    """pyroute2 is imported when first used, maybe in the middle of a run: a run makes sure at
    its start that it can be, rather than fail there."""
    if importlib.util.find_spec("pyroute2") is None:
        raise EnvironmentProblem("pyroute2 is missing: pip install pyroute2 (or reinstall nftrace)")


def message_type(subsystem: int, message: int) -> int:
    """nlmsg_type of a netfilter message: the nfnetlink subsystem in the high byte."""
    return (subsystem << 8) | message


def compact_table(attributes, nested: Optional[dict] = None, wanted: Optional[Iterable[str]] = None) -> dict:
    """attribute number -> (name, how to read it, struct or nested table), for the attributes of
    an nla_map-style map that are `wanted` (None: all of them); the others are not in the table
    and are skipped. Attributes of type `none` carry nothing and are never read."""
    wanted = None if wanted is None else frozenset(wanted)
    table = {}
    for number, (name, kind) in enumerate(attributes):
        if kind == "none" or (wanted is not None and name not in wanted):
            continue
        if kind == "asciiz":
            table[number] = (name, _STRING, None)
        elif kind == "cdata":
            table[number] = (name, _BYTES, None)
        elif kind in _FIXED_FORMATS:
            table[number] = (name, _FIXED, struct.Struct(_FIXED_FORMATS[kind]))
        elif nested is not None and kind in nested:
            table[number] = (name, _NESTED, compact_table(nested[kind], wanted=wanted))
        else:
            raise ValueError(f"{name}: no compact decoder for attribute type {kind!r}")
    return table


def read_attributes(data: bytes, offset: int, end: int, table: dict) -> dict:
    """The attributes between offset and end that `table` knows, read the way pyroute2 reads
    them (first occurrence wins; asciiz stripped of NULs, UTF-8 when it decodes). A fixed-size
    attribute too short for its type is left out rather than read past its end."""
    attrs: dict = {}
    header = _NLA_HEADER.unpack_from
    while offset + 4 <= end:
        length, number = header(data, offset)
        if length < 4:
            length = 4
        elif offset + length > end:
            length = end - offset
        entry = table.get(number & NLA_TYPE_MASK)
        if entry is not None:
            name, how, codec = entry
            if name not in attrs:
                if how == _FIXED:
                    if length - 4 >= codec.size:
                        attrs[name] = codec.unpack_from(data, offset + 4)[0]
                elif how == _STRING:
                    value = data[offset + 4:offset + length].strip(b"\0")
                    try:
                        attrs[name] = value.decode("utf-8")
                    except UnicodeDecodeError:
                        attrs[name] = value
                elif how == _BYTES:
                    attrs[name] = data[offset + 4:offset + length]
                else:
                    attrs[name] = read_attributes(data, offset + 4, offset + length, codec)
        offset += (length + 3) & ~3
    return attrs


def read_message(raw: bytes, table: dict) -> dict:
    """The attributes of one netfilter message (nlmsghdr and nfgenmsg first) that `table` knows."""
    end = min(len(raw), _NLMSG_LENGTH.unpack_from(raw, 0)[0])
    return read_attributes(raw, NFGENMSG_END, end, table)


def decode_datagram(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Yield (nlmsg_type, message bytes) for each netlink message in one datagram."""
    offset, end = 0, len(data)
    header = _NLMSG_HEADER.unpack_from
    while offset + NLMSG_HEADER_SIZE <= end:
        length, msg_type = header(data, offset)
        if length < NLMSG_HEADER_SIZE or offset + length > end:
            break
        yield msg_type, data[offset : offset + length]
        offset += (length + 3) & ~3
