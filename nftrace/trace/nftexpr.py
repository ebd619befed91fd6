"""nftables rules as libnftables' JSON describes them, evaluated against a packet and printed
back as nft text. Pure logic.

A rule's `expr` list mixes match expressions (`{"match": {"op", "left", "right"}}`),
statements that also decide whether the rule goes on (limit, quota, ct count, meters: they
depend on state the trace does not report, so they are unknown), other statements (counter,
log, mangle, NAT, set updates: no effect on matching), and one verdict.

What can be evaluated is what the kernel reported at the hook (see PacketView): addresses,
protocol, ports, icmp type and code, tcp flags, length, interface names, mark, conntrack
state, status and direction; set and map membership with the elements of the listing
(prefixes, ranges, concatenations, anonymous sets, interval sets); negations and
comparisons. Everything else (fib, socket, rt, numgen, hashes, extension headers, tcp
options, `meta time`, `ct original ...`, raw payload) is unknown.

JSON of nft 1.0.6 and 1.1.x: the same schema (json_schema_version 1); values come as
numbers or nft's symbolic words, both are accepted.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, Callable, Optional

from .matching import (ICMP_TYPES, ICMPV6_TYPES, PAYLOAD_PROTOCOLS, Condition, PacketView, protocol_number, protocol_text, unknown, wildcard_name_matches)
from .nearmiss import RuleVerdict

# Set elements by (family, table, set name); None when the set is not known.
SetElements = Callable[[str, str, str], Optional[list]]

VERDICT_KEYS = ("accept", "drop", "reject", "jump", "goto", "return", "continue", "queue", "vmap")
NAT_KEYS = ("snat", "dnat", "masquerade", "redirect")
# Statements that do not take part in matching.
STATEMENTS = frozenset(VERDICT_KEYS + NAT_KEYS + (
    "counter", "log", "mangle", "set", "map", "notrack", "ct helper", "ct timeout", "ct expectation", "dup", "fwd",
    "tproxy", "synproxy", "flow", "secmark", "last", "xt target", "meta", "ct", "objref", "tcp option",
))
# Statements that match or not on state nftrace cannot see.
STATEFUL_MATCHES = ("limit", "quota", "ct count", "meter", "connlimit", "numgen")
UNQUALIFIED_META = frozenset({"iif", "oif", "iifname", "oifname", "iifgroup", "oifgroup"})
TCP_FLAGS = {"fin": 0x01, "syn": 0x02, "rst": 0x04, "psh": 0x08, "ack": 0x10, "urg": 0x20, "ecn": 0x40, "cwr": 0x80}


class _Absent:
    """The packet has no such field (a tcp port of a udp packet, an IPv4 address of an IPv6
    packet): the expression is false, and `shown` says what the packet is instead."""

    def __init__(self, shown: str, reason: str):
        self.shown = shown
        self.reason = reason


_UNKNOWN = object()


# -- text, as nft prints it -------------------------------------------------------------------


def left_text(left: Any) -> str:
    if isinstance(left, dict):
        if "payload" in left:
            payload = left["payload"]
            if "protocol" in payload:
                return f"{payload['protocol']} {payload['field']}"
            return f"@{payload.get('base', 'nh')},{payload.get('offset')},{payload.get('len')}"
        if "meta" in left:
            key = left["meta"].get("key")
            return key if key in UNQUALIFIED_META else f"meta {key}"
        if "ct" in left:
            ct = left["ct"]
            parts = ["ct"] + [ct[part] for part in ("dir", "family") if ct.get(part)] + [ct.get("key", "?")]
            return " ".join(parts)
        if "concat" in left:
            return " . ".join(left_text(item) for item in left["concat"])
        for operator in ("&", "|", "^", "<<", ">>"):
            if operator in left:
                one, other = left[operator]
                return f"{left_text(one)} {operator} {value_text(other)}"
        if "fib" in left:
            fib = left["fib"]
            flags = " . ".join(fib.get("flags", []) if isinstance(fib.get("flags"), list) else [fib.get("flags", "")])
            return f"fib {flags} {fib.get('result', '')}".replace("  ", " ").strip()
        if "socket" in left:
            return f"socket {left['socket'].get('key', '')}".strip()
        if "rt" in left:
            return f"rt {left['rt'].get('key', '')}".strip()
        if "numgen" in left:
            numgen = left["numgen"]
            return f"numgen {numgen.get('mode', '')} mod {numgen.get('mod', '')}"
        if "osf" in left:
            return f"osf {left['osf'].get('key', 'name')}"
        if "tcp option" in left:
            option = left["tcp option"]
            return f"tcp option {option.get('name', '')} {option.get('field', '')}".strip()
        if "exthdr" in left:
            exthdr = left["exthdr"]
            return f"{exthdr.get('name', 'exthdr')} {exthdr.get('field', '')}".strip()
        for key, value in left.items():
            if isinstance(value, dict) and "key" in value:
                return f"{key} {value['key']}"
            return key
    return value_text(left)


def value_text(value: Any, quote: bool = False, hexadecimal: bool = False) -> str:
    if isinstance(value, str):
        return f'"{value}"' if quote and not value.startswith("@") else value
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, int):
        return f"0x{value:08x}" if hexadecimal else str(value)
    if isinstance(value, list):
        return ",".join(value_text(item, quote, hexadecimal) for item in value)
    if isinstance(value, dict):
        if "prefix" in value:
            return f"{value_text(value['prefix']['addr'])}/{value['prefix']['len']}"
        if "range" in value:
            low, high = value["range"]
            return f"{value_text(low, quote, hexadecimal)}-{value_text(high, quote, hexadecimal)}"
        if "set" in value:
            items = value["set"] if isinstance(value["set"], list) else [value["set"]]
            return "{ " + ", ".join(element_text(item, quote, hexadecimal) for item in items) + " }"
        if "concat" in value:
            return " . ".join(value_text(item, quote, hexadecimal) for item in value["concat"])
        if "elem" in value:
            return value_text(value["elem"].get("val"), quote, hexadecimal)
        for operator in ("|", "&"):
            if operator in value:
                return f" {operator} ".join(value_text(item, quote, hexadecimal) for item in value[operator])
        if len(value) == 1:
            key, inner = next(iter(value.items()))
            if inner is None:
                return key
            if isinstance(inner, dict) and "target" in inner:
                return f"{key} {inner['target']}"
    return str(value)


def element_text(element: Any, quote: bool = False, hexadecimal: bool = False) -> str:
    if isinstance(element, list) and len(element) == 2:  # a map element: key : data
        return f"{value_text(element[0], quote, hexadecimal)} : {value_text(element[1])}"
    return value_text(element, quote, hexadecimal)


def _quoted(left: Any) -> bool:
    return isinstance(left, dict) and "meta" in left and left["meta"].get("key") in ("iifname", "oifname", "iif", "oif")


def _hexadecimal(left: Any) -> bool:
    return isinstance(left, dict) and (left.get("meta", {}).get("key") == "mark" or left.get("ct", {}).get("key") == "mark")


def match_text(match: dict) -> str:
    left = match.get("left")
    op = match.get("op", "==")
    right = match.get("right")
    if isinstance(right, bool):  # an existence test: `fib saddr . iif oif missing`, `exthdr ... exists`
        right = "exists" if right else "missing"
    else:
        right = value_text(right, _quoted(left), _hexadecimal(left))
    operator = "" if op in ("==", "in") else f"{op} "
    return f"{left_text(left)} {operator}{right}"


def statement_text(expr: dict) -> str:
    """A statement that is not a match, as nft prints it (for the unknown ones mostly)."""
    key, body = next(iter(expr.items()))
    if key == "match":
        return match_text(body)
    if key == "limit" and isinstance(body, dict):
        over = "over " if body.get("inv") else ""
        unit = f" {body['rate_unit']}" if body.get("rate_unit") and body.get("rate_unit") != "packets" else ""
        burst = f" burst {body['burst']} packets" if body.get("burst") not in (None, 0, 5) else ""
        return f"limit rate {over}{body.get('rate')}{unit}/{body.get('per', 'second')}{burst}"
    if key == "quota" and isinstance(body, dict):
        over = "over " if body.get("inv") else ""
        return f"quota {over}{body.get('val')} {body.get('val_unit', 'bytes')}"
    if key == "ct count" and isinstance(body, dict):
        over = "over " if body.get("inv") else ""
        return f"ct count {over}{body.get('val')}"
    if key == "xt" and isinstance(body, dict):
        return f"xt {body.get('type', 'match')} {body.get('name', '?')}"
    if key == "meter" and isinstance(body, dict):
        return f"meter {body.get('name', '')}".strip()
    if body is None:
        return key
    return key


def rule_text(exprs: list, comment: Optional[str] = None) -> str:
    """A rule's text from its JSON, when nft's own listing is not at hand."""
    parts = []
    for expr in exprs:
        key, body = next(iter(expr.items()))
        if key == "counter":
            parts.append("counter")
        elif key in ("accept", "drop", "continue", "return"):
            parts.append(key)
        elif key in ("jump", "goto"):
            parts.append(f"{key} {body.get('target')}")
        elif key == "vmap":
            parts.append(f"{left_text(body.get('key'))} vmap {value_text(body.get('data'))}")
        else:
            parts.append(statement_text(expr))
    if comment:
        parts.append(f'comment "{comment}"')
    return " ".join(parts)


# -- verdicts -----------------------------------------------------------------------------------


def verdict_of(value: Any) -> RuleVerdict:
    """A verdict as JSON (`{"accept": null}`, `{"jump": {"target": "web"}}`)."""
    if isinstance(value, dict) and len(value) == 1:
        key, body = next(iter(value.items()))
        if key in ("accept", "drop", "return", "continue"):
            return RuleVerdict(key)
        if key in ("jump", "goto") and isinstance(body, dict):
            return RuleVerdict(key, body.get("target"))
    if isinstance(value, str) and value in ("accept", "drop", "return", "continue"):
        return RuleVerdict(value)
    return RuleVerdict("other")


def rule_verdict(exprs: list) -> RuleVerdict:
    """What the rule does when every expression matched: its last verdict statement."""
    verdict = RuleVerdict("continue")
    for expr in exprs:
        key = next(iter(expr))
        if key == "reject":
            verdict = RuleVerdict("drop", reject=True)
        elif key in ("accept", "drop", "return", "continue", "jump", "goto"):
            verdict = verdict_of(expr)
        elif key == "vmap":
            verdict = RuleVerdict("vmap")
        elif key in ("queue",) + NAT_KEYS:
            verdict = RuleVerdict("other")
    return verdict


# -- the packet's value for a left-hand side ---------------------------------------------------


def _kind_and_value(left: Any, view: PacketView):
    """(kind, value, field): kind says how the right side is read (addr, int, proto, ifname,
    str, flags, tcpflags, tuple); value is the packet's, _UNKNOWN or an _Absent."""
    if isinstance(left, dict) and "payload" in left:
        payload = left["payload"]
        protocol, name = payload.get("protocol"), payload.get("field")
        field = f"{protocol} {name}"
        if protocol is None:
            return None, _UNKNOWN, left_text(left)
        if protocol in ("ip", "ip6"):
            version = 4 if protocol == "ip" else 6
            if view.version is None:
                return None, _UNKNOWN, field
            if view.version != version:
                return None, _Absent(f"IPv{view.version}", f"{field}: the packet is IPv{view.version}"), field
            if name in ("saddr", "daddr"):
                value = view.src if name == "saddr" else view.dst
                return "addr", value if value is not None else _UNKNOWN, field
            if name in ("protocol", "nexthdr"):
                return "proto", view.proto if view.proto is not None else _UNKNOWN, field
            if name == "length" and protocol == "ip":
                return "int", view.length if view.length is not None else _UNKNOWN, field
            if name == "version":
                return "int", version, field
            return None, _UNKNOWN, field
        if protocol == "th" or protocol in PAYLOAD_PROTOCOLS:
            if view.proto is None:
                return None, _UNKNOWN, field
            wanted_proto = PAYLOAD_PROTOCOLS.get(protocol)
            if protocol == "th" and not view.has_ports and name in ("sport", "dport"):
                shown = protocol_text(view.proto)
                return None, _Absent(shown, f"{field}: the packet is {shown}, without ports"), field
            if wanted_proto is not None and view.proto != wanted_proto:
                shown = protocol_text(view.proto)
                return None, _Absent(shown, f"{field}: the packet is {shown}, not {protocol}"), field
            if name in ("sport", "dport"):
                value = view.sport if name == "sport" else view.dport
                return "port", value if value is not None else _UNKNOWN, field
            if protocol in ("icmp", "icmpv6") and name in ("type", "code"):
                value = view.icmp_type if name == "type" else view.icmp_code
                return (f"{protocol}-type" if name == "type" else "int"), value if value is not None else _UNKNOWN, field
            if protocol == "tcp" and name == "flags":
                return "tcpflags", view.tcp_flags if view.tcp_flags is not None else _UNKNOWN, field
            return None, _UNKNOWN, field
        return None, _UNKNOWN, field
    if isinstance(left, dict) and "meta" in left:
        key = left["meta"].get("key")
        field = left_text(left)
        known = {
            "iifname": ("ifname", view.iifname), "oifname": ("ifname", view.oifname),
            "iif": ("ifname", view.iifname), "oif": ("ifname", view.oifname),
            "mark": ("int", view.mark), "l4proto": ("proto", view.proto), "nfproto": ("str", view.nfproto),
            "length": ("int", view.length),
            "protocol": ("str", {4: "ip", 6: "ip6"}.get(view.version or 0)),
        }
        if key in known:
            kind, value = known[key]
            return kind, value if value is not None else _UNKNOWN, field
        return None, _UNKNOWN, field
    if isinstance(left, dict) and "ct" in left:
        ct = left["ct"]
        field = left_text(left)
        if ct.get("dir") or ct.get("family"):
            return None, _UNKNOWN, field
        key = ct.get("key")
        if key == "state":
            return "flags", frozenset({view.ct_state}) if view.ct_state else _UNKNOWN, field
        if key == "status":
            return "flags", view.ct_status if view.ct_status is not None else _UNKNOWN, field
        if key == "direction":
            return "str", view.ct_direction if view.ct_direction else _UNKNOWN, field
        return None, _UNKNOWN, field
    if isinstance(left, dict) and "concat" in left:
        parts = [_kind_and_value(item, view) for item in left["concat"]]
        field = " . ".join(part[2] for part in parts)
        for part in parts:
            if isinstance(part[1], _Absent):
                return None, part[1], field
        if any(part[1] is _UNKNOWN for part in parts):
            return None, _UNKNOWN, field
        return ("tuple", tuple(part[0] for part in parts)), tuple(part[1] for part in parts), field
    if isinstance(left, dict) and "&" in left:
        inner, mask = left["&"]
        kind, value, field = _kind_and_value(inner, view)
        if kind == "int" and isinstance(value, int) and isinstance(mask, int):
            return "int", value & mask, left_text(left)
        if kind == "tcpflags" and isinstance(value, int):
            bits = _tcp_flag_bits(mask)
            if bits is not None:
                return "tcpflags", value & bits, left_text(left)
        if isinstance(value, _Absent):
            return None, value, left_text(left)
        return None, _UNKNOWN, left_text(left)
    return None, _UNKNOWN, left_text(left)


def _tcp_flag_bits(value: Any) -> Optional[int]:
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return TCP_FLAGS.get(value)
    if isinstance(value, list):
        bits = [_tcp_flag_bits(item) for item in value]
        return None if None in bits else sum(bits)
    if isinstance(value, dict) and "|" in value:
        return _tcp_flag_bits(value["|"])
    return None


def _scalar(kind: Any, raw: Any):
    """A right-hand scalar in the packet's terms; None when it cannot be read."""
    try:
        if kind == "addr":
            return ipaddress.ip_address(raw)
        if kind == "port":
            if isinstance(raw, int):
                return raw
            text = str(raw)
            return int(text) if text.isdigit() else socket.getservbyname(text)
        if kind == "int":
            return int(raw, 0) if isinstance(raw, str) else int(raw)
        if kind == "proto":
            return protocol_number(raw)
        if kind in ("icmp-type", "icmpv6-type"):
            if isinstance(raw, int):
                return raw
            table = ICMP_TYPES if kind == "icmp-type" else ICMPV6_TYPES
            return int(raw) if str(raw).isdigit() else table.get(str(raw))
        if kind == "tcpflags":
            return _tcp_flag_bits(raw)
        if kind in ("str", "ifname"):
            return str(raw)
    except (ValueError, TypeError, OSError):
        return None
    return None


def _element_matches(kind: Any, value: Any, element: Any) -> Optional[bool]:
    """Whether the packet's value is this set element (a value, a prefix, a range, a concatenation)."""
    if isinstance(element, dict):
        if "elem" in element:
            return _element_matches(kind, value, element["elem"].get("val"))
        if "prefix" in element:
            try:
                network = ipaddress.ip_network(f"{element['prefix']['addr']}/{element['prefix']['len']}", strict=False)
            except ValueError:
                return None
            return value in network if isinstance(value, ipaddress._BaseAddress) and value.version == network.version \
                else False
        if "range" in element:
            low, high = (_scalar(kind, bound) for bound in element["range"])
            if low is None or high is None:
                return None
            try:
                return low <= value <= high
            except TypeError:
                return False
        if "concat" in element and isinstance(kind, tuple):
            results = [_element_matches(k, v, e) for k, v, e in zip(kind[1], value, element["concat"])]
            if False in results:
                return False
            return None if None in results else True
        if "set" in element:
            return _membership(kind, value, element["set"])
        return None
    if kind == "ifname":
        return wildcard_name_matches(str(element), value, "*")
    if kind == "flags":
        return str(element) in value
    expected = _scalar(kind, element)
    if expected is None:
        return None
    return value == expected


def _membership(kind: Any, value: Any, elements: Any) -> Optional[bool]:
    if not isinstance(elements, list):
        elements = [elements]
    undecided = False
    for element in elements:
        if isinstance(element, list) and len(element) == 2:
            element = element[0]  # a map element: only its key counts
        found = _element_matches(kind, value, element)
        if found:
            return True
        undecided = undecided or found is None
    return None if undecided else False


def _packet_text(kind: Any, value: Any) -> str:
    if isinstance(value, _Absent):
        return value.shown
    if kind == "ifname":
        return f'"{value}"' if value else "(none)"
    if kind == "proto":
        return protocol_text(value)
    if kind == "flags":
        return ",".join(sorted(value)) if value else "(none)"
    if kind == "int" and isinstance(value, int):
        return str(value)
    if isinstance(kind, tuple) and isinstance(value, tuple):
        return " . ".join(_packet_text(k, v) for k, v in zip(kind[1], value))
    return str(value)


def evaluate_match(match: dict, view: PacketView, sets: SetElements, family: str, table: str) -> Condition:
    left, right, op = match.get("left"), match.get("right"), match.get("op", "==")
    expr = match_text(match)
    kind, value, field = _kind_and_value(left, view)
    if isinstance(left, dict) and "meta" in left and left["meta"].get("key") == "mark":
        value_shown = f"0x{value:08x}" if isinstance(value, int) else None
    else:
        value_shown = None
    set_name = right[1:] if isinstance(right, str) and right.startswith("@") else None
    wanted = value_text(right, _quoted(left), _hexadecimal(left))
    if value is _UNKNOWN:
        return Condition(expr, None, field, set_name=set_name, wanted=wanted)
    negated = op == "!="
    if isinstance(value, _Absent):
        # The packet lacks the header: the match fails, negated or not (nft's dependency).
        return Condition(expr, False, field, value.shown, wanted, set_name, negated, value.reason, True)
    shown = value_shown or _packet_text(kind, value)
    if op in ("<", ">", "<=", ">="):
        expected = _scalar(kind, right)
        if expected is None or not isinstance(value, int):
            return Condition(expr, None, field, shown, wanted, set_name)
        result = {"<": value < expected, ">": value > expected, "<=": value <= expected, ">=": value >= expected}[op]
        return Condition(expr, result, field, shown, wanted, set_name,
                         reason=None if result else f"{field} {shown} is not {op} {wanted}")
    if set_name is not None:
        elements = sets(family, table, set_name)
        found = None if elements is None else _membership(kind, value, elements)
    elif isinstance(right, dict) and "set" in right:
        found = _membership(kind, value, right["set"])
    elif kind == "flags":
        wanted_flags = right if isinstance(right, list) else [right]
        found = any(str(flag) in value for flag in wanted_flags)
    elif kind == "tcpflags" and op == "in":
        bits = _tcp_flag_bits(right)
        found = None if bits is None else bool(value & bits)
    else:
        found = _element_matches(kind, value, right)
    if found is None:
        return Condition(expr, None, field, shown, wanted, set_name)
    result = (not found) if negated else found
    several = set_name is not None or (isinstance(right, dict) and any(k in right for k in ("set", "prefix", "range")))
    if negated:
        reason = f"{field} {shown} is excluded by {expr}"
    elif kind == "flags" and isinstance(right, list) and len(right) > 1:
        reason = f"{field} {shown} is none of {wanted}"
    else:
        reason = f"{field} {shown} is {'not in' if several else 'not'} {wanted}"
    return Condition(expr, result, field, shown, wanted, set_name, negated, reason)


def rule_conditions(exprs: list, view: PacketView, sets: SetElements, family: str, table: str) -> list:
    """Each match expression and stateful match of the rule, evaluated, in rule order."""
    conditions = []
    for expr in exprs:
        key, body = next(iter(expr.items()))
        if key == "match":
            conditions.append(evaluate_match(body, view, sets, family, table))
        elif key in STATEFUL_MATCHES or (key == "xt" and isinstance(body, dict) and body.get("type") == "match"):
            conditions.append(unknown(statement_text(expr)))
        elif key not in STATEMENTS and key != "xt":
            conditions.append(unknown(statement_text(expr)))
    return conditions


def vmap_choices(exprs: list, view: PacketView, sets: SetElements, family: str, table: str) -> list:
    """A verdict map's lookup as one condition per verdict: [(Condition, RuleVerdict)].

    The condition holds when the packet's key is one of the elements that give that verdict;
    its `wanted` lists them, its `set_name` names the map (None for an anonymous one).
    """
    vmap = next((expr["vmap"] for expr in exprs if "vmap" in expr), None)
    if not isinstance(vmap, dict):
        return []
    key, data = vmap.get("key"), vmap.get("data")
    set_name = data[1:] if isinstance(data, str) and data.startswith("@") else None
    if set_name is not None:
        elements = sets(family, table, set_name)
    elif isinstance(data, dict) and "set" in data:
        elements = data["set"]
    else:
        elements = None
    if not elements:
        return []
    kind, value, field = _kind_and_value(key, view)
    groups: dict = {}
    for element in elements:
        if not (isinstance(element, list) and len(element) == 2):
            continue
        verdict = verdict_of(element[1])
        groups.setdefault(verdict, []).append(element[0])
    choices = []
    expr = f"{left_text(key)} vmap {value_text(data)}"
    for verdict, keys in groups.items():
        wanted = "{ " + ", ".join(value_text(k) for k in keys) + " }"
        if value is _UNKNOWN:
            condition = Condition(expr, None, field, wanted=wanted, set_name=set_name)
        elif isinstance(value, _Absent):
            condition = Condition(expr, False, field, value.shown, wanted, set_name, reason=value.reason,
                                  other_protocol=True)
        else:
            found = _membership(kind, value, keys)
            shown = _packet_text(kind, value)
            condition = Condition(expr, found, field, shown, wanted, set_name,
                                  reason=f"{field} {shown} is not one of {wanted} ({verdict_text(verdict)} in the map)")
        choices.append((condition, verdict))
    return choices


def verdict_text(verdict: RuleVerdict) -> str:
    return f"{verdict.kind} {verdict.target}" if verdict.target else verdict.kind
