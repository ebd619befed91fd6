"""A snapshot of the nftables ruleset: rule text and chain facts, looked up by handle.

Trace events name a rule by (family, table, chain, handle) only; the text an admin reads
comes from here. The listing is nft's own text (`nft -a -s -t list ruleset`), so a rule reads
exactly as `nft -a list ruleset` prints it, without counter values or set elements.
Handles are unique only within one table's lifetime, so a refreshed snapshot keeps the
rules of a table that still exists (same table handle) as deleted, and forgets the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Optional

from ..kernel.tracetable import is_trace_table


_TABLE_RE = re.compile(r"^table (\S+) (.+?) \{ # handle (\d+)(?: .*)?$")  # an owned table: "# handle 5 progname nftrace"
_TABLE_NAME_RE = re.compile(r"^table (\S+) (.+?) \{")
_CHAIN_RE = re.compile(r"^chain (.+?) \{ # handle (\d+)$")
_BASE_RE = re.compile(r"^type (\S+) hook (\S+)(?: .*?)? priority ([^;]+);(?: policy (\S+);)?")
_RULE_RE = re.compile(r"^(.*) # handle (\d+)$")
_DEVICES_RE = re.compile(r' hook \S+ (?:device "?([^" ]+)"?|devices = \{ ([^}]*) \})')


# nft's named priorities for the ip, ip6 and inet families, and for the bridge family, where
# the same names stand for other numbers. Which chains nft prints by name changes between
# versions (1.1 prints `srcnat` for a nat input chain at 100, 1.0.6 printed `100`): both
# forms read the same.
PRIORITY_NAMES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}
BRIDGE_PRIORITY_NAMES = {"dstnat": -300, "filter": -200, "out": 100, "srcnat": 300}
_PRIORITY_RE = re.compile(r"^\s*(-?\d+|[a-z]+)\s*(?:([+-])\s*(\d+))?\s*$")


def priority_value(text: Optional[str], family: str = "inet") -> Optional[int]:
    """A base chain's priority as nft prints it, as a number: `filter - 10` → -10, `-350` → -350,
    `dstnat` → -100 (-300 in the bridge family); None when it cannot be read."""
    match = _PRIORITY_RE.match(text or "")
    if match is None:
        return None
    base, sign, offset = match.groups()
    names = BRIDGE_PRIORITY_NAMES if family == "bridge" else PRIORITY_NAMES
    value = int(base) if base.lstrip("-").isdigit() else names.get(base)
    if value is None:
        return None
    if sign:
        value += int(offset) if sign == "+" else -int(offset)
    return value


@dataclass(frozen=True)
class InlineRule:
    """A rule of an anonymous chain (`jump { ... }`), which nft prints without a handle."""

    text: str
    inline: tuple = ()  # its own anonymous chain's rules, when it opens one


@dataclass(frozen=True)
class RuleInfo:
    family: str
    table: str
    chain: str
    handle: int
    text: str
    number: int  # position in its chain, from 1, as iptables counts rules
    deleted: bool = False
    inline: tuple = ()  # InlineRule: the rules of the anonymous chain this rule opens, in order


@dataclass
class ChainInfo:
    family: str
    table: str
    name: str
    hook: Optional[str] = None
    priority: Optional[str] = None
    policy: Optional[str] = None
    type: Optional[str] = None
    rules: list = field(default_factory=list)
    devices: tuple = ()  # ingress/egress chains: the interfaces they are attached to

    @property
    def is_base(self) -> bool:
        return self.hook is not None


def _unquote(name: str) -> str:
    return name[1:-1] if len(name) >= 2 and name[0] == name[-1] == '"' else name


@dataclass
class TableOutline:
    """A table's flags and the names of its chains, sets and maps (what a JSON listing of it
    one object at a time needs: see NftContext.list_ruleset)."""

    flags: tuple = ()
    objects: list = field(default_factory=list)  # (kind, name): chain, set, map


def parse_ruleset_listing(text: str, outline: Optional[dict] = None) -> tuple[dict, dict, dict]:
    """Parse `nft -a -s -t list ruleset` into (tables, chains, rules); `outline`, when given,
    gets each table's TableOutline.

    nft indents with one tab per level: tables at 0, their objects at 1, a chain's rules and
    base-chain line at 2. Blocks other than chains (sets, maps, flowtables, objects) are
    skipped by indentation, so their contents never look like rules.
    """
    tables: dict = {}
    chains: dict = {}
    rules: dict = {}
    family = table = None
    chain: Optional[ChainInfo] = None
    block: Optional[list] = None  # (depth, line) of an anonymous chain being read, its opening line first

    def add_rule(text: str, handle: int, inline: tuple = ()) -> None:
        chain.rules.append(handle)
        rules[(family, table, chain.name, handle)] = RuleInfo(family, table, chain.name, handle, text,
                                                              len(chain.rules), inline=inline)

    for line in text.splitlines():
        if line.startswith("\t\t\t") or not line.startswith("\t\t"):
            depth = len(line) - len(line.lstrip("\t"))
        else:
            depth = 2  # a rule, most lines of a big ruleset: no need to count
        body = line.strip()
        if not body:
            continue
        if block is not None:
            # `jump {` ... `} # handle N`: one rule whose anonymous chain nft prints inline.
            if depth == 2 and body.startswith("}"):
                head, marker, handle = body.rpartition(" # handle ")
                if marker and handle.isdecimal() and chain is not None:
                    inline = _fold_block(block[1:], 3)
                    add_rule(_folded_text(block[0][1], inline, head[1:].strip()), int(handle), inline)
                block = None
            else:
                block.append((depth, body))
            continue
        if depth == 2 and chain is not None and chain.rules:
            # A chain's base-chain line comes before its first rule: from then on only rules.
            head, marker, handle = body.rpartition(" # handle ")
            if marker and handle.isdecimal():
                add_rule(head.strip(), int(handle))
            elif body.endswith("{"):
                block = [(depth, body)]
            continue
        if depth == 0:
            match = _TABLE_RE.match(body)
            if match:
                family, table = match.group(1), _unquote(match.group(2))
                tables[(family, table)] = int(match.group(3))
                if outline is not None:
                    outline[(family, table)] = TableOutline()
            chain = None
        elif depth == 1:
            match = _CHAIN_RE.match(body)
            if match and table is not None:
                chain = ChainInfo(family, table, _unquote(match.group(1)))
                chains[(family, table, chain.name)] = chain
                if outline is not None:
                    outline[(family, table)].objects.append(("chain", chain.name))
            elif body != "}":
                chain = None
                if outline is not None and (family, table) in outline:
                    _outline_line(outline[(family, table)], body)
        elif depth == 2 and chain is not None:
            base = _BASE_RE.match(body)
            if base and not chain.rules and chain.hook is None:
                chain.type, chain.hook, chain.priority, chain.policy = base.groups()
                chain.priority = chain.priority.strip()
                devices = _DEVICES_RE.search(body)
                if devices:
                    listed = devices.group(1) or devices.group(2)
                    chain.devices = tuple(d.strip().strip('"') for d in listed.split(",") if d.strip())
                continue
            match = _RULE_RE.match(body)
            if match:
                add_rule(match.group(1).strip(), int(match.group(2)))
            elif body.endswith("{"):
                block = [(depth, body)]
    return tables, chains, rules


_SET_RE = re.compile(r"^(set|map) (.+?) \{")


def _outline_line(table: TableOutline, body: str) -> None:
    if body.startswith("flags "):
        table.flags = tuple(flag.strip() for flag in body[len("flags "):].rstrip(";").split(","))
        return
    match = _SET_RE.match(body)
    if match:
        table.objects.append((match.group(1), _unquote(match.group(2))))


def _fold_block(entries: list, depth: int) -> tuple:
    """The rules of an anonymous chain, from nft's indented lines; a nested block folded in."""
    folded = []
    index = 0
    while index < len(entries):
        line_depth, body = entries[index]
        index += 1
        if line_depth != depth:
            continue
        if not body.endswith("{"):
            folded.append(InlineRule(body))
            continue
        inner = []
        while index < len(entries) and not (entries[index][0] == depth and entries[index][1].startswith("}")):
            inner.append(entries[index])
            index += 1
        tail = entries[index][1][1:].strip() if index < len(entries) else ""
        index += 1
        nested = _fold_block(inner, depth + 1)
        folded.append(InlineRule(_folded_text(body, nested, tail), nested))
    return tuple(folded)


def _folded_text(opening: str, inline: tuple, tail: str) -> str:
    """`tcp dport 22 jump { ip saddr 10.0.0.1 accept; drop; } comment "x"`: one line that nft
    reads back (it wants a `;` before the closing brace)."""
    inner = " ".join(f"{rule.text};" for rule in inline)
    return f"{opening} {inner} }}" + (f" {tail}" if tail else "")


class RulesetSnapshot:
    """Rule texts and chain facts, refreshed when the ruleset generation changes."""

    def __init__(self, listing: str = ""):
        self.tables, self.chains, self.rules = parse_ruleset_listing(listing)

    @classmethod
    def take(cls, nft) -> "RulesetSnapshot":
        return cls(nft.list_ruleset())

    @classmethod
    def take_tables(cls, nft) -> "RulesetSnapshot":
        """Table names only (handles unknown): enough to find leftover trace tables, and cheap
        on a ruleset of 50,000 rules, so that the trace rules go in without waiting for a full
        listing (`refresh` with one fills the rest in).

        `list chains`, not `list tables`: nft 1.0.6 fetches the whole ruleset, set elements
        included, to list tables, and only tables and chains to list chains; both name every
        table, empty ones too.
        """
        snapshot = cls()
        for line in nft.run("list chains").splitlines():
            match = _TABLE_NAME_RE.match(line)
            if match:
                snapshot.tables[(match.group(1), _unquote(match.group(2)))] = None
        return snapshot

    def refresh_from(self, nft) -> None:
        """`refresh` with nft's listing of now, and the kernel's names of its anonymous chains
        (nft never prints them; trace events use them)."""
        from ..kernel.anonchains import read_anonymous_chains

        listing = nft.list_ruleset()
        self.refresh(listing)
        self.add_anonymous_chains(read_anonymous_chains(listing))

    def refresh(self, listing: str) -> None:
        """Replace with a newer listing; rules gone from a table that still exists stay, marked deleted."""
        tables, chains, rules = parse_ruleset_listing(listing)
        for key, rule in self.rules.items():
            if key in rules:
                continue
            table_key = (rule.family, rule.table)
            if table_key in tables and tables[table_key] == self.tables.get(table_key):
                rules[key] = rule if rule.deleted else replace(rule, deleted=True)
        for key, chain in self.chains.items():
            table_key = (chain.family, chain.table)
            if key not in chains and table_key in tables and tables[table_key] == self.tables.get(table_key):
                chains[key] = chain
        self.tables, self.chains, self.rules = tables, chains, rules

    def add_anonymous_chains(self, kernel_chains: Iterable) -> None:
        """Give the rules of anonymous chains (`jump { ... }`) their text, under the names and
        handles the kernel gave them (nftrace.kernel.anonchains), which nft never prints: the
        text is the jumping rule's inline block, rule by rule in order."""
        by_key = {(c.family, c.table, c.name): c for c in kernel_chains}
        pending = [(c, handle, target) for c in by_key.values() for handle, target in c.jumps.items()]
        while pending:
            waiting = []
            for parent, handle, target in pending:
                opener = self.rules.get((parent.family, parent.table, parent.name, handle))
                child = by_key.get((parent.family, parent.table, target))
                if opener is None:
                    waiting.append((parent, handle, target))
                    continue
                if child is None:
                    continue
                info = ChainInfo(parent.family, parent.table, target)
                self.chains[child.family, child.table, target] = info
                for number, (rule_handle, inline) in enumerate(zip(child.handles, opener.inline), 1):
                    info.rules.append(rule_handle)
                    self.rules[(child.family, child.table, target, rule_handle)] = RuleInfo(
                        child.family, child.table, target, rule_handle, inline.text, number, inline=inline.inline)
            if len(waiting) == len(pending):
                break  # openers that the listing does not have: nothing more to learn
            pending = waiting

    def rule(self, family: str, table: str, chain: str, handle: int) -> Optional[RuleInfo]:
        return self.rules.get((family, table, chain, handle))

    def chain(self, family: str, table: str, chain: str) -> Optional[ChainInfo]:
        return self.chains.get((family, table, chain))

    def ingress_devices(self) -> list[str]:
        """Interfaces with ingress chains of the ruleset: they act before prerouting."""
        return self._devices_with("ingress")

    def egress_devices(self) -> list[str]:
        """Interfaces with egress chains of the ruleset: they act after postrouting."""
        return self._devices_with("egress")

    def has_base_chains(self, family: str, hooks: tuple = ()) -> bool:
        """Whether the ruleset (nftrace's own tables aside) has base chains of `family` (on one
        of `hooks`, when given)."""
        return any(chain.family == family and chain.is_base and not is_trace_table(chain.table)
                   and (not hooks or chain.hook in hooks) for chain in self.chains.values())

    def _devices_with(self, hook: str) -> list[str]:
        return sorted({device for chain in self.chains.values() if chain.hook == hook
                       and not is_trace_table(chain.table) for device in chain.devices})

    def trace_tables(self) -> Iterable[tuple[str, str]]:
        """Tables that nftrace runs made (its own, or a killed run's leftovers)."""
        return [key for key in self.tables if is_trace_table(key[1])]
