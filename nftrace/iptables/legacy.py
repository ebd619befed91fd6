"""Legacy iptables (x_tables): which tables a namespace has, their rules as iptables-save
prints them, and what a TRACE line says about a rule.

A TRACE line names table, chain and the rule's position in its chain, nothing more: no
verdict, no rule text. Both come from the ruleset, read with `iptables-legacy-save`, so a
rule reads exactly as the admin wrote it (`-A CLIENTS -p tcp -m tcp --dport 25 -j DROP`),
and its verdict is its target's. Legacy tables have no change notification: which reading of
the rules a line is read against is rulehistory.py's question.

Counting rules: the kernel numbers every rule of a chain, nftrace's own TRACE rules
included; `number` is the position an admin sees without them (`iptables -L --line-numbers`
when nftrace is not running). A line for the slot after a chain's last rule is its policy (a
built-in chain) or its implicit return (a user chain). The kernel also labels an
unconditional ACCEPT/DROP/RETURN rule `policy` or `return`: the position tells them apart.
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass, field
from typing import Optional

from ..errors import EnvironmentProblem
from ..kernel import runner
from ..protocols import iptables_command

# Of the calling thread's namespace (/proc/net follows the process's first thread).
TABLE_NAME_FILES = {"ip": "/proc/thread-self/net/ip_tables_names", "ip6": "/proc/thread-self/net/ip6_tables_names"}
FAMILIES = ("ip", "ip6")
BACKEND = "iptables-legacy"

# Built-in chains and the hooks they run on.
CHAIN_HOOKS = {"PREROUTING": "prerouting", "INPUT": "input", "FORWARD": "forward", "OUTPUT": "output",
               "POSTROUTING": "postrouting"}
# Which hooks each table registers, and at which priority (NF_IP_PRI_* / NF_IP6_PRI_*).
TABLE_HOOKS = {
    "raw": ("prerouting", "output"),
    "mangle": ("prerouting", "input", "forward", "output", "postrouting"),
    "nat": ("prerouting", "input", "output", "postrouting"),
    "filter": ("input", "forward", "output"),
    "security": ("input", "forward", "output"),
}
TABLE_PRIORITIES = {"raw": -300, "mangle": -150, "filter": 0, "security": 50}
NAT_PRIORITIES = {"prerouting": -100, "output": -100, "input": 100, "postrouting": 100}

# What a target does to the packet, in nftables' verdict words. Targets not listed (LOG, MARK,
# CT, TCPMSS, ...) let the packet go on to the next rule.
TARGET_VERDICTS = {
    "ACCEPT": "accept",
    "DROP": "drop",
    "REJECT": "drop",
    "RETURN": "return",
    "QUEUE": "queue",
    "NFQUEUE": "queue",
    "DNAT": "accept",
    "SNAT": "accept",
    "MASQUERADE": "accept",
    "REDIRECT": "accept",
    "NETMAP": "accept",
}
POLICY_VERDICTS = {"ACCEPT": "accept", "DROP": "drop"}

OWN_COMMENT = "nftrace trace rule, pid {pid}"
_OWN_COMMENT_RE = re.compile(r"^nftrace trace rule, pid (\d+)$")


def table_priority(table: str, hook: Optional[str]) -> int:
    """Where a legacy table runs on a hook relative to nftables chains (same priority scale)."""
    if table == "nat":
        return NAT_PRIORITIES.get(hook or "", 0)
    return TABLE_PRIORITIES.get(table, 0)


def own_rule_pid(comment: Optional[str]) -> Optional[int]:
    """The pid in the comment of an nftrace TRACE rule; None for anybody else's rule."""
    match = _OWN_COMMENT_RE.match(comment or "")
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class LegacyRule:
    table: str
    chain: str
    position: int  # the kernel's count, nftrace's own rules included
    number: Optional[int]  # the admin's count; None for nftrace's own rules
    text: str  # as iptables-save prints it
    target: Optional[str] = None
    goto: bool = False
    comment: Optional[str] = None

    @property
    def own(self) -> bool:
        return self.target == "TRACE" and own_rule_pid(self.comment) is not None


@dataclass
class LegacyChain:
    table: str
    name: str
    policy: Optional[str] = None  # ACCEPT / DROP for built-in chains, None for user chains
    rules: list = field(default_factory=list)

    @property
    def builtin(self) -> bool:
        return self.policy is not None


@dataclass(frozen=True)
class Resolution:
    """What one TRACE line means: which step, with which verdict."""

    type: str  # rule | policy | return
    rule: Optional[LegacyRule]
    verdict: str
    target: Optional[str] = None


def _rule_fields(tokens: list[str]) -> tuple[Optional[str], bool, Optional[str]]:
    """Target, whether it is a goto, and the comment of a tokenised `-A` line."""
    target, goto, comment = None, False, None
    for index, token in enumerate(tokens[:-1]):
        if token == "--comment" and comment is None:
            comment = tokens[index + 1]
        elif token in ("-j", "-g") and target is None:
            target, goto = tokens[index + 1], token == "-g"
    return target, goto, comment


def parse_save(text: str) -> dict:
    """`iptables-save` output → {(table, chain): LegacyChain}, chains and rules in kernel order."""
    chains: dict = {}
    table = None
    for line in text.splitlines():
        line = line.rstrip()
        if line.startswith("*"):
            table = line[1:].strip()
        elif table is None or not line or line.startswith("#") or line == "COMMIT":
            continue
        elif line.startswith(":"):
            name, policy = (line[1:].split() + ["-"])[:2]
            chains[(table, name)] = LegacyChain(table, name, None if policy == "-" else policy)
        elif line.startswith("-A "):
            try:
                tokens = shlex.split(line)
            except ValueError:
                tokens = line.split()
            if len(tokens) < 2:
                continue
            chain = chains.setdefault((table, tokens[1]), LegacyChain(table, tokens[1]))
            target, goto, comment = _rule_fields(tokens)
            own = target == "TRACE" and own_rule_pid(comment) is not None
            number = None if own else sum(1 for rule in chain.rules if rule.number is not None) + 1
            chain.rules.append(LegacyRule(table, tokens[1], len(chain.rules) + 1, number, line, target, goto, comment))
    return chains


class LegacyRuleset:
    """One family's legacy rules, looked up the way TRACE lines name them."""

    def __init__(self, family: str, chains: Optional[dict] = None):
        self.family = family
        self.chains = chains or {}

    @classmethod
    def parse(cls, family: str, text: str) -> "LegacyRuleset":
        return cls(family, parse_save(text))

    def chain(self, table: str, name: str) -> Optional[LegacyChain]:
        return self.chains.get((table, name))

    def own_rules(self) -> list[LegacyRule]:
        return [rule for chain in self.chains.values() for rule in chain.rules if rule.own]

    def resolve(self, table: str, chain_name: str, kind: str, position: int) -> Optional[Resolution]:
        """The step a TRACE line `table:chain:kind:position` stands for; None if this ruleset
        does not have it (the rules changed since it was read)."""
        chain = self.chain(table, chain_name)
        if chain is None or position < 1:
            return None
        if position <= len(chain.rules):
            rule = chain.rules[position - 1]
            verdict, target = self._rule_verdict(rule)
            return Resolution("rule", rule, verdict, target)
        if position != len(chain.rules) + 1 or kind == "rule":
            return None
        if kind == "policy" and chain.builtin:
            return Resolution("policy", None, POLICY_VERDICTS.get(chain.policy, chain.policy.lower()))
        if kind == "return" and not chain.builtin:
            return Resolution("return", None, "return")
        return None

    def resolve_line(self, event) -> Optional[Resolution]:
        """The step a TRACE line (nflog.LegacyTraceEvent) stands for in these rules."""
        return self.resolve(event.table, event.chain, event.type, event.rule_number)

    def _rule_verdict(self, rule: LegacyRule) -> tuple[str, Optional[str]]:
        target = rule.target
        if target is None:
            return "continue", None
        if rule.goto:
            return "goto", target
        if (rule.table, target) in self.chains:
            return "jump", target
        return TARGET_VERDICTS.get(target, "continue"), None


# -- the live namespace ---------------------------------------------------------------------


def legacy_tables(family: str) -> list[str]:
    """The x_tables tables that exist in this namespace for a family.

    Read from /proc only: opening a table by name (iptables -L, iptc.Table) creates it.
    """
    try:
        with open(TABLE_NAME_FILES[family]) as names:
            return [name.strip() for name in names if name.strip()]
    except FileNotFoundError:
        return []


def save_command(family: str) -> Optional[list[str]]:
    """`iptables-legacy-save`, or a plain `iptables-save` that is the legacy one (iptables < 1.8)."""
    base = iptables_command(family)
    path = shutil.which(f"{base}-legacy-save")
    if path:
        return [path]
    path = shutil.which(f"{base}-save")
    if path is None:
        return None
    version = runner.run([path, "--version"], check=False)
    if "nf_tables" in version.stdout + version.stderr:
        return None
    return [path]


def read_legacy_ruleset(family: str) -> LegacyRuleset:
    command = save_command(family)
    if command is None:
        raise EnvironmentProblem(f"{iptables_command(family)}-legacy-save is not installed, so legacy rules cannot be "
                                 "read (apt-get install iptables)")
    result = runner.run(command, what=f"{command[0]} failed")
    return LegacyRuleset.parse(family, result.stdout)
