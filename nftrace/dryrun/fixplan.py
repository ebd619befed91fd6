"""What to change so that a flow gets the verdict asked for: the candidates, as commands.

Pure: a packet's path (in the target's names), the flow as the user gave it and the verdict
asked for in; changes out, each one command line that a POSIX shell runs as it is. Whether a
change works is not decided here: nftrace.dryrun.fix applies it in a sandbox copy and lets
the kernel say.

An admin's change, in the order they would reach for it:
- a set element: the packet's address or port added to the named set of a rule that failed
  on that one lookup (a near miss), when that rule gives the verdict asked for;
- one rule that matches exactly the flow as given (`--from/--to/--proto/--sport/--dport/
  --iif/--oif`), with the verdict asked for, placed where it takes effect: just before the
  rule that decided (in the chain that decided; above the rule that jumps into an anonymous
  chain, which no command can name), or at the end of a chain whose policy decided; a drop
  for a packet that the kernel dropped after netfilter, before the step that let it through,
  and where no chain that filters let it through, in a base chain of its own.
  A field that NAT rewrote before that hook is matched as the kernel saw it there.
A comment names nftrace and the date, so the rule is easy to find and to take out again.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass, replace
from typing import Collection, Optional

from ..flow import Flow
from ..protocols import PORT_PROTOCOLS
from ..kernel.anonchains import is_anonymous_chain
from ..trace.paths import NAT_TIER, PacketPath, Step, accept_tier, deciding_accept

VERDICTS = ("accept", "drop")
COMMENT_PREFIX = "nftrace fix"
NFT_COMMENT_MAX = 128
# Hooks where a packet has an input or an output interface.
IIF_HOOKS = frozenset({"ingress", "prerouting", "input", "forward", "postrouting"})
OIF_HOOKS = frozenset({"forward", "output", "postrouting", "egress"})
# Where a packet that no chain filtered gets a chain of its own, in this order of preference.
NEW_CHAIN_HOOKS = ("input", "forward", "output", "prerouting")
_PLAIN_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_ELEMENT_RE = re.compile(r"^[0-9A-Za-z:./\- ]+$")
_MAP_LOOKUP_RE = re.compile(r"\b(v?map)\s+@")


class NoChange(Exception):
    """No change of the asked kind can be made for this path; the message says why."""


@dataclass(frozen=True)
class FlowMatch:
    """The flow as given, with the fields NAT rewrote before the deciding hook as the kernel saw them."""

    version: int
    src: str
    dst: str
    proto: Optional[str] = None
    sport: Optional[int] = None
    dport: Optional[int] = None
    iif: Optional[str] = None
    oif: Optional[str] = None
    established: bool = False  # only packets of a connection conntrack knows (the flow's answers)

    def nft(self, family: str) -> str:
        """The match as nft rule text: `ip saddr 10.0.0.5 ip daddr 10.0.0.9 tcp dport 22`."""
        l3 = "ip6" if self.version == 6 else "ip"
        words = []
        if self.iif:
            words.append(f'iifname "{self.iif}"')
        if self.oif:
            words.append(f'oifname "{self.oif}"')
        words += [f"{l3} saddr {self.src}", f"{l3} daddr {self.dst}"]
        if self.proto in PORT_PROTOCOLS and (self.sport or self.dport):
            if self.sport:
                words.append(f"{self.proto} sport {self.sport}")
            if self.dport:
                words.append(f"{self.proto} dport {self.dport}")
        elif self.proto:
            words.append(f"meta l4proto {'ipv6-icmp' if self.proto == 'icmpv6' else self.proto}")
        if self.established:
            words.append("ct state established")
        return " ".join(words)

    def iptables(self) -> list[str]:
        """The match as iptables arguments."""
        args = []
        if self.iif:
            args += ["-i", self.iif]
        if self.oif:
            args += ["-o", self.oif]
        args += ["-s", self.src, "-d", self.dst]
        if self.proto:
            args += ["-p", "ipv6-icmp" if self.proto == "icmpv6" else self.proto]
            if self.proto in PORT_PROTOCOLS:
                if self.sport:
                    args += ["--sport", str(self.sport)]
                if self.dport:
                    args += ["--dport", str(self.dport)]
        if self.established:
            args += ["-m", "conntrack", "--ctstate", "ESTABLISHED"]
        return args

    def describe(self) -> str:
        """`10.77.1.2 -> 10.77.2.2 tcp dport 25` (ASCII: it goes into rule comments)."""
        text = f"{self.src} -> {self.dst}"
        if self.proto:
            text += f" {self.proto}"
        if self.sport:
            text += f" sport {self.sport}"
        if self.dport:
            text += f" dport {self.dport}"
        if self.iif:
            text += f" in {self.iif}"
        if self.oif:
            text += f" out {self.oif}"
        if self.established:
            text += " established"
        return text


@dataclass(frozen=True)
class Placement:
    """Where a new rule goes: before one rule of a chain, or at the end of the chain."""

    hook: Optional[str]
    backend: str  # nft | iptables-legacy
    family: str
    table: str
    chain: str
    handle: Optional[int] = None  # nft: before this rule; None: at the end
    rule_number: Optional[int] = None  # iptables: before this rule number; None: at the end
    iptables_nft: bool = False  # an iptables-nft table: iptables writes it, so iptables edits it
    base_table: Optional[str] = None  # the base chain the packet ran under (for managers)
    base_chain: Optional[str] = None
    new_base_chain: bool = False  # nft: the command makes the table and the chain, on `hook`

    def where(self) -> str:
        if self.backend == "iptables-legacy":
            return f"{iptables_tool(self.family, legacy=True)} {self.table} {self.chain}"
        return f"{self.family} {self.table} {self.chain}"

    def describe(self) -> str:
        if self.new_base_chain:
            return f"a new chain {self.where()} (hook {self.hook}, policy accept)"
        if self.backend == "iptables-legacy" or self.iptables_nft:
            position = f"as rule {self.rule_number}" if self.rule_number else "at the end"
        else:
            position = f"before rule handle {self.handle}" if self.handle is not None else "at the end"
        return f"{self.where()}, {position}"


@dataclass(frozen=True)
class Change:
    """One change to the target's firewall, and the shell line that makes it."""

    kind: str  # rule | element
    verdict: str
    summary: str  # what it does, for people
    placement: Optional[Placement] = None  # rule
    rule: Optional[str] = None  # rule: the nft text of the rule (match, verdict, comment)
    iptables_args: tuple = ()  # rule in iptables tables: match, comment and target arguments
    set_name: Optional[str] = None  # element
    element: Optional[str] = None
    used_in: Optional[Placement] = None  # element: the rule that looks the set up (the set is in its table)
    scope: str = ""  # what else it changes, in words
    match_text: str = ""  # rule: what it matches, in words
    legacy_iptables_is_default: bool = True  # `iptables` means the legacy tool on this machine

    @property
    def set_family(self) -> Optional[str]:
        return self.used_in.family if self.used_in else None

    @property
    def set_table(self) -> Optional[str]:
        return self.used_in.table if self.used_in else None

    def command(self, handle: Optional[int] = None, rule_number: Optional[int] = None) -> str:
        """The shell line. `handle`/`rule_number` replace the target's (the sandbox has its own)."""
        if self.kind == "element":
            return "nft " + shlex.quote(f"add element {self.set_family} {self.set_table} {self.set_name} "
                                        f"{{ {self.element} }}")
        placement = self.placement
        if placement.backend == "iptables-legacy" or placement.iptables_nft:
            legacy = placement.backend == "iptables-legacy"
            tool = iptables_tool(placement.family, legacy=legacy,
                                 default_is_legacy=self.legacy_iptables_is_default)
            number = rule_number if rule_number is not None else placement.rule_number
            where = ["-I", placement.chain, str(number)] if number else ["-A", placement.chain]
            table = [] if placement.table == "filter" else ["-t", placement.table]
            return shlex.join([tool, *table, *where, *self.iptables_args])
        target = handle if handle is not None else placement.handle
        where = f"{placement.family} {placement.table} {placement.chain}"
        if target is not None:
            text = f"insert rule {where} position {target} {self.rule}"
        else:
            text = f"add rule {where} {self.rule}"
        if placement.new_base_chain:
            # `add` leaves a table or chain that exists as it is: the line can be run again.
            text = (f"add table {placement.family} {placement.table}; add chain {where} {{ type filter hook "
                    f"{placement.hook} priority filter; policy accept; }}; {text}")
        return "nft " + shlex.quote(text)

    def to_json(self) -> dict:
        return {"kind": self.kind, "summary": self.summary, "command": self.command(), "scope": self.scope,
                "where": self.placement.where() if self.placement else f"{self.set_family} {self.set_table} set "
                                                                          f"{self.set_name}"}


def iptables_tool(family: str, legacy: bool, default_is_legacy: bool = True) -> str:
    """`iptables` where it is the right flavour on this machine, else `iptables-legacy`/`-nft`."""
    base = "ip6tables" if family == "ip6" else "iptables"
    if legacy:
        return base if default_is_legacy else f"{base}-legacy"
    return f"{base}-nft" if default_is_legacy else base


def fix_comment(verdict: str, match: FlowMatch, date: str) -> str:
    text = f"{COMMENT_PREFIX} {date}: {verdict} {match.describe()}"
    return text if len(text) <= NFT_COMMENT_MAX else text[:NFT_COMMENT_MAX - 3] + "..."


def is_fix_rule(text: Optional[str]) -> bool:
    """A rule that a fix being proven added (its comment says so)."""
    return bool(text) and f'"{COMMENT_PREFIX} ' in text


# -- where the packet was decided ----------------------------------------------------------------


def base_chain_of(path: PacketPath, index: int) -> Optional[Step]:
    """The base chain's step that the step at `index` ran under (the depth-0 step before it)."""
    step = path.steps[index]
    for earlier in reversed(path.steps[: index + 1]):
        if earlier.depth == 0 and earlier.hook == step.hook and earlier.backend == step.backend:
            return earlier
    return None


def placement_for(path: PacketPath, iptables_nft_tables: Collection = (), verdict: Optional[str] = None) -> Placement:
    """Where a rule takes effect for this packet: before the rule that decided it, in its chain,
    or at the end of the chain whose policy decided. Raises NoChange with the reason.

    A drop asked for a packet that netfilter let through goes before the step that let it
    through, also when the kernel dropped the packet later (no socket, no route: there is no
    deciding step), so that the firewall drops it whatever the kernel would do next; where no
    chain that filters let it through, or kube-proxy's (which it writes again within seconds),
    in a base chain of its own (`verdict`: the one asked): a drop there is as final.

    `iptables_nft_tables`: (family, table) of the tables iptables-nft writes; a step of one of
    them with an iptables form says so too, but a policy has none."""
    step = path.decided_by
    if verdict == "drop" and path.complete and path.verdict == "accept":
        step = step or deciding_accept(path.steps)
        if step is None or accept_tier(step) == NAT_TIER or kube_proxy_owns(step.table, step.chain):
            return _new_base_chain(path)
    if step is None:
        raise NoChange(_undecided_reason(path, verdict))
    index = _index_of(path, step)
    base = base_chain_of(path, index)
    common = dict(hook=step.hook, backend=step.backend, family=step.family, table=step.table,
                  iptables_nft=step.backend == "nft" and (step.iptables is not None
                                                          or (step.family, step.table) in iptables_nft_tables),
                  base_table=base.table if base else step.table, base_chain=base.chain if base else step.chain)
    if step.type == "policy":
        return Placement(chain=step.chain, **common)
    if step.type != "rule":
        raise NoChange(f"the packet was decided by {step.location()}, where no rule can be put before it")
    chain, handle, number = step.chain, step.handle, step.rule_number
    while step.backend == "nft" and is_anonymous_chain(chain):
        # No command names an anonymous chain: the rule goes above the one that jumps into it.
        jump = next((s for s in reversed(path.steps[:index]) if s.target == chain and s.verdict in ("jump", "goto")),
                    None)
        if jump is None:
            raise NoChange(f"the packet was decided in the anonymous chain {chain}, and the rule that jumps "
                           f"into it is not on its path")
        index = _index_of(path, jump)
        chain, handle, number = jump.chain, jump.handle, jump.rule_number
    if step.backend == "nft" and handle is None:
        raise NoChange(f"the rule that decided ({step.location()}) has no handle to put a rule before")
    if step.backend != "nft" and number is None:
        raise NoChange(f"the rule that decided ({step.location()}) has no number to put a rule before")
    return Placement(chain=chain, handle=handle, rule_number=number, **common)


_KUBE_CHAIN_RE = re.compile(r"^KUBE-")


def kube_proxy_owns(table: str, chain: str) -> bool:
    """kube-proxy's nftables table, or its KUBE-* chains of iptables."""
    return table == "kube-proxy" or bool(_KUBE_CHAIN_RE.match(chain))


def _new_base_chain(path: PacketPath) -> Placement:
    """No chain that filters let the packet through (none at all, or NAT chains only, which see
    only a connection's first packet): a drop gets a base chain of its own, `inet filter` as
    /etc/nftables.conf has it, on the hook where admins filter (input, forward or output; else
    prerouting, for a packet that the kernel dropped right after it)."""
    # Bridged frames skip the inet hooks (unless br_netfilter is on): only the hooks where the
    # packet was seen as IP count.
    hooks = {observation.hook for observation in path.observations
             if observation.family in (None, "ip", "ip6", "inet")} if path.observations else set(path.hooks)
    hook = next((hook for hook in NEW_CHAIN_HOOKS if hook in hooks), None)
    if hook is None:
        raise NoChange(_undecided_reason(path, "drop"))
    return Placement(hook=hook, backend="nft", family="inet", table="filter", chain=hook, base_table="filter",
                     base_chain=hook, new_base_chain=True)


def _index_of(path: PacketPath, step: Step) -> int:
    for index, candidate in enumerate(path.steps):
        if candidate is step:
            return index
    return path.steps.index(step)


def kernel_drop_words(path: PacketPath) -> str:
    """The kernel's drop of the packet as a reason says it: `NO_SOCKET — nothing listens on ...`."""
    reason, words = path.kernel_drop.get("reason"), path.kernel_drop.get("explain")
    return f"{reason} — {words}" if words else str(reason)


def _undecided_reason(path: PacketPath, verdict: Optional[str]) -> str:
    if not path.complete:
        return "the packet's path is incomplete: what decided it is not known"
    if path.kernel_drop and verdict == "drop":
        reason = path.kernel_drop.get("reason")
        return (f"no chain of the ruleset let it through, so there is none to put a rule in; the kernel drops it "
                f"already, after netfilter ({reason})")
    if path.kernel_drop:
        return (f"no rule dropped it: the kernel dropped it after netfilter ({kernel_drop_words(path)}); "
                f"a ruleset change cannot let it through")
    if path.verdict == "drop":
        return "no rule dropped it: something outside the ruleset did (routing, rp_filter, no socket, ...)"
    return "no chain of the ruleset decided it: there is no chain on its path to put a rule in"


# -- the flow, as the deciding hook saw it ---------------------------------------------------------


def observed_packet(path: PacketPath, placement: Placement):
    """The headers of the packet as the deciding base chain saw them (else as its hook left them)."""
    for observation in path.observations:
        if (observation.hook, observation.table, observation.chain) == (placement.hook, placement.base_table,
                                                                        placement.base_chain) \
                and observation.packet is not None:
            return observation.packet
    own = [o for o in path.observations if o.hook == placement.hook and o.packet is not None]
    return own[-1].packet if own else None


def flow_match(flow: Flow, path: PacketPath, placement: Placement) -> FlowMatch:
    """Exactly the flow as given; where NAT rewrote a field before this hook, its value there."""
    packet = observed_packet(path, placement)

    def address(given, seen) -> str:
        if seen is not None and ipaddress.ip_address(seen) not in given:
            return str(seen)  # rewritten on the way: only the rewritten value reaches this hook
        return str(given.network_address) if given.prefixlen == given.max_prefixlen else str(given)

    def port(given, seen) -> Optional[int]:
        if given is not None and seen is not None and seen != given:
            return seen
        return given

    src = address(flow.src, packet.src if packet else None)
    dst = address(flow.dst, packet.dst if packet else None)
    sport = port(flow.sport, packet.sport if packet else None)
    dport = port(flow.dport, packet.dport if packet else None)
    iif = flow.iif if placement.hook in IIF_HOOKS else None
    oif = flow.oif if placement.hook in OIF_HOOKS else None
    return FlowMatch(flow.ip_version, src, dst, flow.proto, sport, dport, iif, oif)


# -- the changes -------------------------------------------------------------------------------


def reversed_flow(flow: Flow) -> Flow:
    """The flow's answers: from where it goes, back to where it comes from."""
    return Flow(src=flow.dst, dst=flow.src, proto=flow.proto, sport=flow.dport, dport=flow.sport, iif=flow.oif,
                oif=flow.iif)


def rule_change(flow: Flow, path: PacketPath, verdict: str, date: str, legacy_is_default: bool = True,
                established: bool = False, iptables_nft_tables: Collection = ()) -> Change:
    """One rule that gives exactly this flow `verdict`, where it takes effect; `established`:
    only to packets of connections conntrack knows (for the answers of a flow let through)."""
    placement = placement_for(path, iptables_nft_tables, verdict)
    match = replace(flow_match(flow, path, placement), established=established)
    for name in (match.iif, match.oif):
        if name and '"' in name:
            raise NoChange(f"the interface name {name!r} cannot be written in a rule")
    comment = fix_comment(verdict, match, date)
    rule = f'{match.nft(placement.family)} {verdict} comment "{comment}"'
    target = "ACCEPT" if verdict == "accept" else "DROP"
    iptables_args = (*match.iptables(), "-m", "comment", "--comment", comment, "-j", target)
    if placement.backend == "nft" and not placement.iptables_nft and not _PLAIN_NAME_RE.match(placement.chain):
        raise NoChange(f"the chain name {placement.chain!r} cannot be written in an nft command")
    return Change("rule", verdict, f"{verdict} {match.describe()} in {placement.describe()}", placement=placement,
                  rule=rule, iptables_args=iptables_args, match_text=match.describe(),
                  scope=f"the new rule matches only {match.describe()}",
                  legacy_iptables_is_default=legacy_is_default)


# Neighbour discovery as iptables and nft name its two messages.
ND_TYPES = (("nd-neighbor-solicit", "neighbour-solicitation"), ("nd-neighbor-advert", "neighbour-advertisement"))


def neighbour_discovery_changes(path: PacketPath, date: str, legacy_is_default: bool = True,
                                iptables_nft_tables: Collection = ()) -> list[Change]:
    """Rules that let neighbour discovery through, where the path of one of its messages was
    dropped (on its way in, or out for what the box sends itself).

    Not that message alone, and not on its interface alone: neighbours ask each other again
    later, in both directions, and without the answers they go unreachable (RFC 4890 asks a
    firewall to let both messages through). So the rule matches both, from and to every
    neighbour: the standard rule, not the flow's. The sandbox proves each message's way.
    """
    placement = placement_for(path, iptables_nft_tables, "accept")
    comment = f"{COMMENT_PREFIX} {date}: accept neighbour discovery"
    summary = f"accept neighbour discovery in {placement.describe()}"
    scope = "the new rule lets neighbour discovery through: every neighbour's solicitations and advertisements"
    common = dict(placement=placement, scope=scope, legacy_iptables_is_default=legacy_is_default)
    if placement.backend == "nft" and not placement.iptables_nft:
        if not _PLAIN_NAME_RE.match(placement.chain):
            raise NoChange(f"the chain name {placement.chain!r} cannot be written in an nft command")
        types = ", ".join(nft for nft, _ in ND_TYPES)
        return [Change("rule", "accept", summary, rule=f'icmpv6 type {{ {types} }} accept comment "{comment}"',
                       **common)]
    return [Change("rule", "accept", summary, iptables_args=("-p", "ipv6-icmp", "-m", "icmp6", "--icmpv6-type", name,
                                                             "-m", "comment", "--comment", comment, "-j", "ACCEPT"),
                   **common)
            for _, name in ND_TYPES]


def element_change(near_miss, verdict: str) -> Optional[Change]:
    """The packet's value added to the named set of a near miss that failed on that lookup alone
    and gives `verdict`; None when the near miss is not such a rule."""
    if getattr(near_miss, "backend", "nft") != "nft" or getattr(near_miss, "iptables", None):
        return None
    if getattr(near_miss, "unknown", None):
        return None  # an expression that could not be evaluated may fail too
    if verdict == "drop" and kube_proxy_owns(near_miss.table, near_miss.chain):
        return None  # kube-proxy writes its sets again within seconds; a drop lasts in a chain of its own
    mismatches = list(getattr(near_miss, "mismatches", []) or [])
    if len(mismatches) != 1 or not verdict_gives(near_miss.verdict, verdict):
        return None
    mismatch = mismatches[0]
    if _MAP_LOOKUP_RE.search(getattr(mismatch, "expr", "") or ""):
        return None  # a map's element needs a value too: not the packet's to give
    set_name = getattr(mismatch, "set_name", None)
    value = getattr(mismatch, "packet", None)
    if not set_name or value in (None, "") or set_name.startswith("__") or not _PLAIN_NAME_RE.match(set_name):
        return None
    value = str(value)
    if not _ELEMENT_RE.match(value):
        return None  # not a plain address, prefix, port or concatenation of those
    return Change("element", verdict, f"add {value} to set {near_miss.family} {near_miss.table} {set_name}",
                  set_name=set_name, element=value,
                  used_in=Placement(hook=near_miss.hook, backend="nft", family=near_miss.family, table=near_miss.table,
                                    chain=near_miss.chain, handle=near_miss.handle),
                  scope=f"every rule that uses @{set_name} now matches {value} too")


def verdict_gives(rule_verdict: Optional[str], asked: str) -> bool:
    """Whether a rule's verdict is the asked one (reject is a drop)."""
    if rule_verdict is None:
        return False
    word = rule_verdict.split()[0].lower()
    if asked == "drop":
        return word in ("drop", "reject")
    return word == "accept"
