"""iptables rules (as iptables-save prints them) evaluated against a packet. Pure logic.

The matches admins use most are evaluated: `-s`/`-d` (lists, prefixes), `-p`, `-i`/`-o`
(with the `+` wildcard), `--sport`/`--dport` of the tcp, udp and sctp matches (ranges),
`--syn`, `-m multiport`, `-m conntrack --ctstate/--ctstatus/--ctdir`, `-m state`, `-m mark`,
`-m icmp`/`-m icmp6`, `-m iprange`, and `-m set --match-set` against the ipsets of the
namespace (hash:ip, hash:net and hash:ip,port / hash:net,port sets, with their `nomatch`
exceptions). `!` negates the option
it stands before. Every other match (limit, recent, hashlimit, connlimit, addrtype, owner,
string, time, physdev, ...) is unknown, as are the ipsets of other types. `-m comment` is
no match. Options after `-j`/`-g` belong to the target.

Conditions speak iptables-save's words in `expr` (`-s 10.77.1.0/28`, `-m multiport --dports
80,443`) and nft's in `field` (`ip saddr`, `tcp dport`), so that near misses of both kinds
read alike.
"""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass, field
from typing import Optional

from ..trace.matching import (ICMP_TYPES, ICMPV6_TYPES, Condition, PacketView, RuleEvaluation, protocol_number,
                              protocol_text, unknown, wildcard_name_matches)
from ..trace.nearmiss import RuleVerdict

CT_STATES = {"NEW": "new", "ESTABLISHED": "established", "RELATED": "related", "INVALID": "invalid",
             "UNTRACKED": "untracked"}
CT_STATUSES = {"EXPECTED": "expected", "SEEN_REPLY": "seen-reply", "ASSURED": "assured", "CONFIRMED": "confirmed"}
TCP_FLAG_BITS = {"FIN": 0x01, "SYN": 0x02, "RST": 0x04, "PSH": 0x08, "ACK": 0x10, "URG": 0x20, "ALL": 0x3F,
                 "NONE": 0}
TARGET_VERDICTS = {"ACCEPT": "accept", "DROP": "drop", "REJECT": "drop", "RETURN": "return"}
NO_MATCH_MODULES = frozenset({"comment"})


@dataclass
class IpSet:
    """One ipset as `ipset save` prints it: its type and members.

    `excluded`: the entries added with `nomatch` (hash:net types), exceptions carved out of a
    wider entry: the kernel decides by the most specific entry an address falls in, so
    10.0.0.2 is not in a set of 10.0.0.0/24 and 10.0.0.0/28 nomatch. `netmask`: a hash:ip
    made with `netmask 24` stores (and `ipset save` prints) 10.0.0.0 for 10.0.0.5, and the
    kernel masks the packet's address the same way before it looks it up.
    """

    name: str
    type: str
    members: list = field(default_factory=list)  # each the member's text (`10.0.0.1,tcp:80`)
    excluded: list = field(default_factory=list)
    netmask: Optional[int] = None  # hash:ip `netmask 24`: members stand for their /24


def parse_ipset_save(text: str) -> dict:
    """`ipset save` → {name: IpSet}. Options after a member (`timeout 300`, `comment "..."`,
    counters) say nothing about membership, except `nomatch`."""
    sets: dict = {}
    for line in text.splitlines():
        words = _split(line)
        if len(words) >= 3 and words[0] == "create":
            options = dict(zip(words[3::2], words[4::2]))
            netmask = options.get("netmask")
            sets[words[1]] = IpSet(words[1], words[2], netmask=int(netmask) if netmask and netmask.isdigit() else None)
        elif len(words) >= 3 and words[0] == "add" and words[1] in sets:
            ipset = sets[words[1]]
            (ipset.excluded if "nomatch" in words[3:] else ipset.members).append(words[2])
    return sets


def _ports(text: str) -> list[tuple[int, int]]:
    ranges = []
    for part in text.split(","):
        low, _, high = part.partition(":")
        ranges.append((int(low or 0), int(high or 65535) if _ else int(low)))
    return ranges


def _port_text(value: Optional[int]) -> str:
    return "?" if value is None else str(value)


class _Rule:
    """The tokens of one `-A` line, read option by option."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.index = 0

    def next(self) -> Optional[str]:
        if self.index >= len(self.tokens):
            return None
        token = self.tokens[self.index]
        self.index += 1
        return token

    def peek(self) -> Optional[str]:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def module_options(self) -> list[str]:
        """The tokens still to come of the current match, up to the next `-m` or the target:
        what a match's later flags (`--return-nomatch`) change in its earlier test."""
        rest = self.tokens[self.index:]
        end = next((i for i, token in enumerate(rest) if token in ("-m", "--match", "-j", "-g")), len(rest))
        return rest[:end]


def rule_verdict(text: str, user_chains: frozenset) -> RuleVerdict:
    tokens = _split(text)
    for index, token in enumerate(tokens[:-1]):
        if token in ("-j", "-g"):
            target = tokens[index + 1]
            if target in user_chains:
                return RuleVerdict("goto" if token == "-g" else "jump", target)
            if target in TARGET_VERDICTS:
                return RuleVerdict(TARGET_VERDICTS[target], reject=target == "REJECT")
            return RuleVerdict("other") if target in ("QUEUE", "NFQUEUE", "DNAT", "SNAT", "MASQUERADE", "REDIRECT",
                                                      "NETMAP") else RuleVerdict("continue")
    return RuleVerdict("continue")


def _split(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


def rule_conditions(text: str, view: PacketView, family: str, ipsets: Optional[dict] = None) -> RuleEvaluation:
    """Each match of an `-A CHAIN ...` line against the packet, in order."""
    tokens = _split(text)
    if tokens[:1] == ["-A"]:
        tokens = tokens[2:]
    rule = _Rule(tokens)
    conditions: list = []
    module: Optional[str] = None
    module_tokens: list = []
    negate = False
    version = 6 if family == "ip6" else 4
    addr_field = "ip6" if version == 6 else "ip"

    def flush_unknown() -> None:
        nonlocal module_tokens
        if module_tokens:
            conditions.append(unknown(" ".join(module_tokens)))
            module_tokens = []

    while True:
        token = rule.next()
        if token is None or token in ("-j", "-g"):
            break
        if token == "!":
            negate = True
            continue
        bang = "! " if negate else ""
        if token in ("-m", "--match"):
            flush_unknown()
            module = rule.next()
            if module not in _KNOWN_MODULES and module not in NO_MATCH_MODULES:
                module_tokens = [f"-m {module}"]
            negate = False
            continue
        if module_tokens and token.startswith("--"):
            # Options of a module that cannot be evaluated: kept with it, as one unknown.
            value = rule.peek()
            module_tokens.append(f"{bang}{token}" + (f" {rule.next()}" if value and not value.startswith("-") else ""))
            negate = False
            continue
        if not token.startswith("--"):
            flush_unknown()  # a base option (-p, -s, ...): the module's options are over
            module = None if token in _BASE_OPTIONS else module
        if module in NO_MATCH_MODULES and token.startswith("--"):
            rule.next()
            negate = False
            continue
        if module == "set" and token in _SET_FLAGS:
            # Flags without a value: --return-nomatch is read with --match-set, and the counter
            # updates change no verdict.
            negate = False
            continue
        value = rule.next()
        if value is None:
            break
        plain = module is None or token in _BASE_OPTIONS or module in _PROTOCOL_MODULES
        expr = f"{bang}{token} {value}" if plain else f"-m {module} {bang}{token} {value}"
        condition = _condition(token, value, negate, expr, view, version, addr_field, module, ipsets, rule)
        if condition is not None:
            conditions.append(condition)
        negate = False
    flush_unknown()
    return RuleEvaluation(conditions)


_BASE_OPTIONS = frozenset({"-s", "--source", "-d", "--destination", "-p", "--protocol", "-i", "--in-interface",
                           "-o", "--out-interface"})
# Matches named after the protocol (`-p tcp -m tcp --dport 22`): the option alone says it all.
_PROTOCOL_MODULES = frozenset({"tcp", "udp", "sctp", "icmp", "icmp6", "icmpv6"})
# `-m set` options that take no value (xt_set's save prints them after --match-set).
_SET_FLAGS = frozenset({"--return-nomatch", "--update-counters", "--update-subcounters"})
_KNOWN_MODULES = frozenset({"tcp", "udp", "sctp", "multiport", "conntrack", "state", "mark", "icmp", "icmp6",
                            "icmpv6", "iprange", "set"})


def _result(expr: str, found: Optional[bool], negate: bool, field_name: str, packet: str, wanted: str,
            set_name: Optional[str] = None, reason: Optional[str] = None) -> Condition:
    if found is None:
        return Condition(expr, None, field_name, packet, wanted, set_name, negate)
    if negate:
        reason = f"{field_name} {packet} is excluded by {expr}"
    elif reason is None:
        several = any(mark in wanted for mark in ("/", ",", ":", "-")) and field_name not in ("iifname", "oifname")
        reason = f"{field_name} {packet} is {'not in' if several else 'not'} {wanted}"
    return Condition(expr, (not found) if negate else found, field_name, packet, wanted, set_name, negate, reason)


def _addresses_match(value, text: str) -> Optional[bool]:
    if value is None:
        return None
    for part in text.split(","):
        try:
            network = ipaddress.ip_network(part, strict=False)
        except ValueError:
            return None
        if value.version == network.version and value in network:
            return True
    return False


def _condition(token: str, value: str, negate: bool, expr: str, view: PacketView, version: int, addr_field: str,
               module: Optional[str], ipsets: Optional[dict], rule: _Rule) -> Optional[Condition]:
    if token in ("-s", "--source", "-d", "--destination"):
        source = token in ("-s", "--source")
        address = view.src if source else view.dst
        field_name = f"{addr_field} {'saddr' if source else 'daddr'}"
        return _result(expr, _addresses_match(address, value), negate, field_name, str(address), value)
    if token in ("-p", "--protocol"):
        wanted = protocol_number(value)
        if value == "all":
            return _result(expr, True, negate, "meta l4proto", protocol_text(view.proto), value)
        found = None if wanted is None or view.proto is None else view.proto == wanted
        return _result(expr, found, negate, "meta l4proto", protocol_text(view.proto), value)
    if token in ("-i", "--in-interface", "-o", "--out-interface"):
        incoming = token in ("-i", "--in-interface")
        name = view.iifname if incoming else view.oifname
        shown = f'"{name}"' if name else "(none)"
        return _result(expr, wildcard_name_matches(value, name, "+"), negate, "iifname" if incoming else "oifname",
                       shown, value)
    if module in ("tcp", "udp", "sctp") and token in ("--dport", "--destination-port", "--sport", "--source-port"):
        return _port_condition(expr, value, negate, view, module, token in ("--sport", "--source-port"))
    if module == "tcp" and token == "--syn":
        rule.index -= 1  # --syn takes no value
        return _syn(f"-m tcp {'! ' if negate else ''}--syn", negate, view)
    if module == "tcp" and token == "--tcp-flags":
        compared = rule.next() or ""
        return _tcp_flags(f"{expr} {compared}", value, compared, negate, view)
    if module == "multiport" and token in ("--dports", "--destination-ports", "--sports", "--source-ports", "--ports"):
        if token == "--ports":
            values = [view.sport, view.dport]
        else:
            values = [view.sport if token in ("--sports", "--source-ports") else view.dport]
        field_name = {"--ports": "th port"}.get(token, "th sport" if "s" == token[2] else "th dport")
        if not view.has_ports:
            shown = protocol_text(view.proto)
            return Condition(expr, False if view.proto is not None else None, field_name, shown, value,
                             reason=f"{field_name}: the packet is {shown}, without ports", other_protocol=True)
        if None in values:
            return Condition(expr, None, field_name)
        ranges = _ports(value)
        found = any(low <= port <= high for port in values for low, high in ranges)
        return _result(expr, found, negate, field_name, "/".join(_port_text(v) for v in values), value)
    if module in ("conntrack", "state") and token in ("--ctstate", "--state"):
        if view.ct_state is None:
            return Condition(expr, None, "ct state")
        states = set()
        for word in value.split(","):
            if word in ("SNAT", "DNAT"):
                states.add(word)
            else:
                states.add(CT_STATES.get(word, word.lower()))
        found = view.ct_state in states
        if not found and states & {"SNAT", "DNAT"} and view.ct_status is not None:
            found = any(word.lower() in view.ct_status for word in ("SNAT", "DNAT") if word in states)
        return _result(expr, found, negate, "ct state", view.ct_state, value)
    if module == "conntrack" and token == "--ctstatus":
        if view.ct_status is None:
            return Condition(expr, None, "ct status")
        wanted = {CT_STATUSES.get(word, word.lower()) for word in value.split(",")}
        return _result(expr, bool(wanted & view.ct_status), negate, "ct status", ",".join(sorted(view.ct_status)) or "(none)",
                       value)
    if module == "conntrack" and token == "--ctdir":
        if view.ct_direction is None:
            return Condition(expr, None, "ct direction")
        return _result(expr, view.ct_direction == value.lower(), negate, "ct direction", view.ct_direction, value)
    if module == "mark" and token == "--mark":
        mark_text, _, mask_text = value.partition("/")
        try:
            mark, mask = int(mark_text, 0), int(mask_text, 0) if mask_text else 0xFFFFFFFF
        except ValueError:
            return Condition(expr, None, "meta mark")
        if view.mark is None:
            return Condition(expr, None, "meta mark")
        return _result(expr, (view.mark & mask) == mark, negate, "meta mark", f"0x{view.mark:x}", value)
    if module in ("icmp", "icmp6", "icmpv6") and token in ("--icmp-type", "--icmpv6-type"):
        return _icmp(expr, value, negate, view, module)
    if module == "iprange" and token in ("--src-range", "--dst-range"):
        address = view.src if token == "--src-range" else view.dst
        field_name = f"{addr_field} {'saddr' if token == '--src-range' else 'daddr'}"
        try:
            low, high = (ipaddress.ip_address(part) for part in value.split("-", 1))
        except ValueError:
            return Condition(expr, None, field_name)
        if address is None:
            return Condition(expr, None, field_name)
        found = address.version == low.version and low <= address <= high
        return _result(expr, found, negate, field_name, str(address), value)
    if module == "set" and token == "--match-set":
        directions = rule.next() or "src"
        return _ipset(f"-m set {'! ' if negate else ''}--match-set {value} {directions}", value, directions, negate,
                      view, ipsets, "--return-nomatch" in rule.module_options())
    return unknown(expr)


def _other_protocol(expr: str, field_name: str, value: str, view: PacketView, wanted: str) -> Optional[Condition]:
    """The condition when the packet is not of the match's protocol (or its protocol is not
    known); None when it is, and the match's own test decides."""
    if view.proto is None:
        return Condition(expr, None, field_name)
    if view.proto != protocol_number(wanted):
        shown = protocol_text(view.proto)
        return Condition(expr, False, field_name, shown, value, reason=f"{field_name}: the packet is {shown}, not {wanted}",
                         other_protocol=True)
    return None


def _port_condition(expr: str, value: str, negate: bool, view: PacketView, module: str, source: bool) -> Condition:
    field_name = f"{module} {'sport' if source else 'dport'}"
    other = _other_protocol(expr, field_name, value, view, module)
    if other is not None:
        return other
    port = view.sport if source else view.dport
    if port is None:
        return Condition(expr, None, field_name)
    low, high = _ports(value)[0]
    return _result(expr, low <= port <= high, negate, field_name, str(port), value)


def _syn(expr: str, negate: bool, view: PacketView) -> Condition:
    if view.tcp_flags is None:
        return Condition(expr, None, "tcp flags")
    found = (view.tcp_flags & 0x17) == 0x02
    return _result(expr, found, negate, "tcp flags", f"0x{view.tcp_flags:02x}", "syn")


def _tcp_flags(expr: str, mask_text: str, compared_text: str, negate: bool, view: PacketView) -> Condition:
    def bits(text: str) -> Optional[int]:
        total = 0
        for word in text.split(","):
            if word not in TCP_FLAG_BITS:
                return None
            total |= TCP_FLAG_BITS[word]
        return total

    mask, compared = bits(mask_text), bits(compared_text)
    if view.tcp_flags is None or mask is None or compared is None:
        return Condition(expr, None, "tcp flags")
    return _result(expr, (view.tcp_flags & mask) == compared, negate, "tcp flags", f"0x{view.tcp_flags:02x}",
                   compared_text)


def _icmp(expr: str, value: str, negate: bool, view: PacketView, module: str) -> Condition:
    protocol = "icmp" if module == "icmp" else "icmpv6"
    field_name = f"{protocol} type"
    other = _other_protocol(expr, field_name, value, view, protocol)
    if other is not None:
        return other
    if value == "any":
        return _result(expr, True, negate, field_name, str(view.icmp_type), value)
    type_text, _, code_text = value.partition("/")
    table = ICMP_TYPES if module == "icmp" else ICMPV6_TYPES
    wanted = int(type_text) if type_text.isdigit() else table.get(type_text)
    if wanted is None or view.icmp_type is None:
        return Condition(expr, None, field_name)
    found = view.icmp_type == wanted and (not code_text or view.icmp_code == int(code_text))
    return _result(expr, found, negate, field_name, str(view.icmp_type), value)


def _ipset(expr: str, name: str, directions: str, negate: bool, view: PacketView, ipsets: Optional[dict],
           return_nomatch: bool = False) -> Condition:
    """`-m set --match-set NAME DIRECTIONS`: is the packet's tuple in the ipset?

    The kernel looks up the most specific entry the tuple falls in (longest prefixes first);
    when that entry was added `nomatch`, the tuple is not in the set — unless the rule says
    `--return-nomatch`, which turns exactly that case into a match.
    """
    ipset = (ipsets or {}).get(name)
    if ipset is None:
        return Condition(expr, None, "ipset", set_name=name)
    sides = directions.split(",")
    kinds = ipset.type.split(":", 1)[-1].split(",")
    if len(sides) != len(kinds) or not all(kind in ("ip", "net", "port") for kind in kinds):
        return Condition(expr, None, "ipset", set_name=name)
    values, fields = [], []
    for side, kind in zip(sides, kinds):
        if kind == "port":
            if not view.has_ports:
                return _result(expr, False, negate, "th port", protocol_text(view.proto), name, name)
            values.append((view.proto, view.sport if side == "src" else view.dport))
            fields.append(f"th {'sport' if side == 'src' else 'dport'}")
        else:
            values.append(view.src if side == "src" else view.dst)
            fields.append(f"ip {'saddr' if side == 'src' else 'daddr'}")
    if any(v is None or (isinstance(v, tuple) and None in v) for v in values):
        return Condition(expr, None, " . ".join(fields), set_name=name)

    def member_matches(member: str) -> Optional[tuple]:
        """The member's prefix lengths when the tuple is in it (its specificity), False when
        not, None when its text cannot be read."""
        parts = member.split(",")
        if len(parts) != len(kinds):
            return None
        prefixes = []
        for part, kind, value in zip(parts, kinds, values):
            if kind == "port":
                proto_text, _, port_text = part.rpartition(":")
                proto = protocol_number(proto_text or "tcp")
                low, _, high = port_text.partition("-")
                try:
                    if proto != value[0] or not int(low) <= value[1] <= int(high or low):
                        return False
                except ValueError:
                    return None
            else:
                if ipset.netmask is not None and "/" not in part:
                    part = f"{part}/{ipset.netmask}"
                found = _addresses_match(value, part)
                if not found:
                    return found
                prefixes.append(ipaddress.ip_network(part, strict=False).prefixlen)
        return tuple(prefixes)

    included = [member_matches(member) for member in ipset.members]
    excluded = [member_matches(member) for member in ipset.excluded]
    # An entry whose text cannot be read might be the most specific one: then it is unknown.
    # A tuple, empty for a set of ports alone, is a hit; False a miss, None unreadable.
    best_in = max((p for p in included if isinstance(p, tuple)), default=None)
    best_out = max((p for p in excluded if isinstance(p, tuple)), default=None)
    if best_out is not None and (best_in is None or best_out >= best_in):
        found = None if None in included else return_nomatch
    elif best_in is not None:
        found = None if None in excluded else True
    else:
        found = None if None in included else False
    shown = " . ".join(f"{v[1]}" if isinstance(v, tuple) else str(v) for v in values)
    return _result(expr, found, negate, " . ".join(fields), shown, f"@{name}", name,
                   reason=None if negate else f"{' . '.join(fields)} {shown} is not in ipset {name}")
