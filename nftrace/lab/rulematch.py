"""How an expectation names a rule, and how that is held against the rule nftrace named: by
what stays the same when nftables or iptables is upgraded, never by nft's exact print.

nft prints a rule from its bytecode, and that print changes between versions for the same
rule: iptables-nft 1.8.11 emits the matches of `-A DOCKER -d 10.77.2.2/32 ! -i r-server -o
r-server ...` in another order than 1.8.9 did, so nft 1.1.3 prints `ip daddr 10.77.2.2
iifname != "r-server" oifname "r-server" tcp dport 80 counter accept` where 1.0.6 printed
`iifname != "r-server" oifname "r-server" ip daddr 10.77.2.2 tcp dport 80 counter accept`.
A firewall's regression tests must not fail because the nft binary changed. So a wanted text
matches the rule when it is

- the rule's comment (`comment "..."` in nft, `-m comment --comment ...` in iptables), or
- its iptables form, for iptables-nft and legacy rules (`-A CHAIN ...`, as iptables-save
  prints it: canonical in every version), compared with runs of blanks collapsed, or
- its nft text, compared in canonical form: blanks collapsed, the elements of `{ ... }` sets
  in sorted order, numbers in decimal, a default that one version prints and the other
  leaves out dropped (`burst 5 packets` of a limit), `ip protocol X` read as `meta l4proto X`
  in an ip table (iptables-nft 1.8.11 writes `-p tcp` as the first, 1.8.9 as the second),
  and the matches before the rule's first statement as a set, since a rule matches when all
  of them do, whatever their order. Statements and the verdict (`counter`, `log`, `meta mark
  set`, `accept`, `jump`, ...) stay in order: their order is the rule's meaning. A text this
  reading cannot split into matches is compared whole.
"""

from __future__ import annotations

import re
from typing import Optional

# Selectors that take one field word: `ip daddr`, `tcp dport`, `meta l4proto`, ...
_PROTOCOLS = frozenset("""ip ip6 tcp udp udplite sctp dccp icmp icmpv6 igmp ether vlan arp th ah esp comp ipcomp
    mh frag hbh dst rt srh gre gretap geneve vxlan meta socket""".split())
# Selectors of one word: `iifname "eth0"`, `mark 0x1`, ...
_SINGLE_WORD = frozenset("""iifname oifname iif oif iiftype oiftype iifgroup oifgroup mark skuid skgid nfproto l4proto
    priority length protocol pkttype cpu cgroup rtclassid ibrname obrname ibriport obriport""".split())
_CT_DIRECTIONS = frozenset(("original", "reply"))
# `meta mark set 1`, `th dport vmap @services`: a statement that starts with a selector.
_STATEMENT_AFTER_SELECTOR = frozenset(("set", "vmap"))
_RELATIONS = frozenset("== != < > <= >= eq ne lt gt le ge".split())
_BITWISE = frozenset("& | ^ and or xor << >> lshift rshift".split())
_HEX = re.compile(r"^0x[0-9a-fA-F]+$")
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\{[^{}]*\}|\([^()]*\)|\S+')


def blanks_collapsed(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _token(raw: str) -> str:
    """One token in canonical form: a set's elements sorted, their blanks collapsed; a hex
    number in decimal (nft 1.1.3 prints `ip frag-off & 0x1fff != 0x0` where 1.0.6 printed
    `& 8191 != 0`)."""
    if raw.startswith("{") and raw.endswith("}"):
        elements = sorted(blanks_collapsed(element) for element in raw[1:-1].split(",") if element.strip())
        return "{ " + ", ".join(elements) + " }"
    if raw.startswith("(") and raw.endswith(")"):
        return "(" + blanks_collapsed(raw[1:-1]) + ")"
    if _HEX.match(raw):
        return str(int(raw, 16))
    return raw


def _without_defaults(tokens: list[str]) -> list[str]:
    """`limit rate N/unit burst 5 packets` is what 1.0.6 printed as `limit rate N/unit`: 5
    packets is the default burst, printed by nft 1.1 and left out before."""
    kept = []
    index = 0
    while index < len(tokens):
        if tokens[index:index + 3] == ["burst", "5", "packets"] and "limit" in tokens[max(0, index - 5):index]:
            index += 3
            continue
        kept.append(tokens[index])
        index += 1
    return kept


def _selector_length(tokens: list[str], start: int) -> int:
    """How many words the selector at `start` has (0: it is not a selector: a statement)."""
    word = tokens[start]
    if word in _SINGLE_WORD:
        return 1
    if word in _PROTOCOLS:
        return 2
    if word == "ct":
        return 3 if start + 1 < len(tokens) and tokens[start + 1] in _CT_DIRECTIONS else 2
    return 0


def _match_at(tokens: list[str], start: int) -> Optional[int]:
    """The end of the match (selector, operators, value) that starts at `start`, or None
    when what starts there is a statement (`counter`, `accept`, `meta mark set 1`, ...)."""
    length = _selector_length(tokens, start)
    index = start + length
    while length and index + 1 < len(tokens) and tokens[index] == ".":  # meta l4proto . th dport @services
        length = _selector_length(tokens, index + 1)
        index += 1 + length
    if not length or index >= len(tokens) or tokens[index] in _STATEMENT_AFTER_SELECTOR:
        return None
    if tokens[index] in _BITWISE and index + 1 < len(tokens):
        index += 2
    if index < len(tokens) and tokens[index] in _RELATIONS:
        index += 1
    index += 1  # the value
    if index + 1 < len(tokens) and tokens[index] == "/":  # tcp flags syn / syn,ack
        index += 2
    return index if index <= len(tokens) else None


def _same_protocol_match(match: str, family: Optional[str]) -> str:
    """In a table of the ip family, `ip protocol tcp` and `meta l4proto tcp` match the same
    packets: iptables-nft 1.8.11 writes the first for `-p tcp`, 1.8.9 wrote the second."""
    if family == "ip" and match.startswith("ip protocol "):
        return "meta l4proto " + match[len("ip protocol "):]
    return match


def canonical_nft(text: str, family: Optional[str] = None) -> tuple:
    """The rule's matches before its first statement as a sorted tuple, then the rest in order."""
    tokens = _without_defaults([_token(raw) for raw in _TOKEN.findall(text)])
    matches = []
    index = 0
    while index < len(tokens):
        end = _match_at(tokens, index)
        if end is None:
            break
        matches.append(_same_protocol_match(" ".join(tokens[index:end]), family))
        index = end
    return tuple(sorted(matches)), tuple(tokens[index:])


def rule_comment(text: str) -> Optional[str]:
    """The comment of a rule, in nft's print or iptables-save's."""
    found = (re.search(r'\bcomment "((?:[^"\\]|\\.)*)"', text)
             or re.search(r'--comment (?:"((?:[^"\\]|\\.)*)"|(\S+))', text))
    if not found:
        return None
    return next(group for group in found.groups() if group is not None)


def names_rule(wanted: str, text: Optional[str], iptables: Optional[str], family: Optional[str] = None) -> bool:
    """Whether `wanted` (an expectation's `text`) names the rule nft prints as `text` and
    iptables-save as `iptables`, in a table of `family`: by comment, iptables form, or
    canonical nft text."""
    wanted = blanks_collapsed(wanted)
    for form in (text, iptables):
        if form and rule_comment(form) == wanted:
            return True
    if iptables and blanks_collapsed(iptables) == wanted:
        return True
    return bool(text) and canonical_nft(text, family) == canonical_nft(wanted, family)
