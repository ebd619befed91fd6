"""nftrace's own nftables table: mark chains that switch tracing on for the flow, and
observation chains that show the packet where nothing else can.

- mark chains at prerouting and output, priority -350, before raw (-300), conntrack
  (-200) and NAT: they see the packet as it arrived or was sent, and set `meta nftrace`
  for the flow only, under a kernel-side rate limit;
- observation chains, last priority, on the exit hooks (input, postrouting: their event says
  that netfilter let the packet through, and shows it as it leaves) and on the hooks where
  NAT may rewrite it unseen (prerouting and output, when the namespace has NAT chains there:
  a packet that vanishes after a DNAT is known by its new headers). Everywhere else the
  first chain of the next hook shows the packet as the hook left it (trace/paths.py); and
  postrouting's goes once the ruleset is known to run nothing there (hook_ends);
- conntrack chains, right after conntrack on prerouting and output, where legacy iptables
  tables are traced: the mark chain runs before conntrack, and a legacy table that drops the
  packet sends no trace event, so without them no event of such a packet carries its
  conntrack state. Where only nftables chains decide, the first of them after conntrack
  carries it, and nothing is added.

Every chain of the table ends on an `accept` rule: the kernel then sends one event per
packet and chain, where a chain that falls off its end sends two (end of rules, policy).
Each event costs the kernel an allocation and the reader its decoding: under a flood, the
events per packet decide whether nftrace keeps up.

The table is created with `flags owner` where the kernel has it, so that the kernel deletes
it when nftrace's netlink socket closes, even on SIGKILL. Its name carries the pid, so that
`nftrace cleanup` (and every later run) can tell a dead run's leftover from a live one's.
Everything the user typed reaches the kernel as JSON values, never as nft command text.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import secrets
from typing import TYPE_CHECKING, Optional

from ..errors import KernelError
from ..flow import Flow, PROTOCOL_NUMBERS
from .nft import NftContext
from ..signals import SignalsHeld, UndoStack, undo_after
from .system import pid_alive

if TYPE_CHECKING:
    from ..trace.ruleset import RulesetSnapshot

# Every table an nftrace run makes is named nftrace_<pid>_<hex>: the ruleset snapshot leaves
# them out of paths, and cleanup finds a dead run's by the pid.
TRACE_TABLE_PREFIX = "nftrace_"
# Its chains: mark_<hook> set the trace bit, obs_<hook> observe the end of a hook, ct_<hook> the
# conntrack state (the path builder reads the hook from the name).
MARK_CHAIN_PREFIX = "mark_"
OBSERVE_CHAIN_PREFIX = "obs_"
CONNTRACK_CHAIN_PREFIX = "ct_"

MARK_PRIORITY = -350
INGRESS_MARK_PRIORITY = -10000
OBSERVE_PRIORITY = 2**31 - 1
CONNTRACK_OBSERVE_PRIORITY = -199  # NF_IP_PRI_CONNTRACK + 1: conntrack has given the packet its state
MARK_HOOKS = ("prerouting", "output")
OBSERVE_HOOKS = ("prerouting", "input", "forward", "output", "postrouting")
# Bridge hooks where a bridged frame's path ends (input: up to the bridge device itself;
# postrouting: out of a port) or that a frame routed out through a bridge device passes.
BRIDGE_OBSERVE_HOOKS = ("input", "forward", "output", "postrouting")
# Observed always: their observation is where an accepted packet's path ends.
EXIT_OBSERVE_HOOKS = ("input", "postrouting")
# Observed when the namespace has NAT chains on them (DNAT happens there).
NAT_OBSERVE_HOOKS = ("prerouting", "output")
ACCEPT = {"accept": None}
# Named counters of a counted table (`drops`): packets that matched, and those traced.
MATCHED_COUNTER = "matched"
TRACED_COUNTER = "traced"
DEFAULT_MAX_RATE = 100
OWNER_WARNING = ("nftrace's table could not be tied to its process with 'flags owner' ({reason}): it is removed "
                 "on every exit but SIGKILL; after a SIGKILL, 'nftrace cleanup' (or the next run) removes it")
_owner_warned = False
_NAME_RE = re.compile(rf"^{TRACE_TABLE_PREFIX}(\d+)_[0-9a-f]+$")


def is_trace_table(name: str) -> bool:
    """Whether a table is an nftrace run's (this one's, another live one's, or a leftover)."""
    return name.startswith(TRACE_TABLE_PREFIX)


def _address_match(field: str, flow: Flow, network) -> Optional[dict]:
    if network is None or network.prefixlen == 0:
        return None
    right = (
        str(network.network_address)
        if network.prefixlen == network.max_prefixlen
        else {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}
    )
    return {"match": {"op": "==", "left": {"payload": {"protocol": flow.nft_family, "field": field}}, "right": right}}


# How each family's chains tell IPv4 from IPv6: inet/ip/ip6 chains by the hook's protocol,
# bridge and netdev chains (which see frames) by the frame's ether type.
_L3_KEYS = {"bridge": ("protocol", {4: "ip", 6: "ip6"}), "netdev": ("protocol", {4: "ip", 6: "ip6"})}
_INET_L3 = ("nfproto", {4: "ipv4", 6: "ipv6"})


def flow_match(flow: Flow, hook: str, family: str = "inet", end: Optional[str] = None) -> list[dict]:
    """The nft JSON expressions that match the flow at a mark hook of a `family` chain.

    `end` "src" or "dst" matches that end of the flow alone (its address and port): a
    namespace that a packet of the flow reaches after NAT sees one end rewritten (see
    mark_ends). --iif/--oif name interfaces of the IP layer: bridge and netdev chains see
    ports and devices instead, and do not match them."""
    key, words = _L3_KEYS.get(family, _INET_L3)
    if flow.ip_version is not None:
        exprs = [{"match": {"op": "==", "left": {"meta": {"key": key}}, "right": words[flow.ip_version]}}]
    elif family in _L3_KEYS:  # frames: IP ones only (`drops` without an address: both families)
        exprs = [{"match": {"op": "==", "left": {"meta": {"key": key}}, "right": {"set": list(words.values())}}}]
    else:
        exprs = []  # inet, ip, ip6 chains see IP packets only
    for side, field, network in (("src", "saddr", flow.src), ("dst", "daddr", flow.dst)):
        match = _address_match(field, flow, network) if end in (None, side) else None
        if match:
            exprs.append(match)
    if flow.proto:
        exprs.append({"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": PROTOCOL_NUMBERS[flow.proto]}})
    for side, field, port in (("src", "sport", flow.sport), ("dst", "dport", flow.dport)):
        if port is not None and end in (None, side):
            exprs.append({"match": {"op": "==", "left": {"payload": {"protocol": flow.proto, "field": field}}, "right": port}})
    if family in ("inet", "ip", "ip6"):
        if hook == "prerouting" and flow.iif:
            exprs.append({"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": flow.iif}})
        if hook == "output" and flow.oif:
            exprs.append({"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": flow.oif}})
    return exprs


def mark_ends(flow: Flow, relaxed: bool) -> tuple:
    """Which mark rules a chain gets: the whole flow (None), or, in a trace across several
    namespaces (`relaxed`), one rule per end of the flow that says something: a packet
    DNATed on its way here keeps its source, a packet SNATed keeps its destination. What
    such a rule marks beyond the flow is not answered unless it continues a packet of the
    flow (trace/crossing.py)."""
    if not relaxed:
        return (None,)
    return flow.constrained_ends() or (None,)


def mark_hooks(flow: Flow) -> tuple[str, ...]:
    """A packet that arrives on --iif is never a locally sent one: no output mark then."""
    return ("prerouting",) if flow.iif else MARK_HOOKS


def _mark_chain_commands(family: str, name: str, flow: Flow, max_rate: int, hook: str, suffix: str = "",
                         ends: tuple = (None,), counted: bool = False, **attach) -> list[dict]:
    """A chain on `hook` whose rules (one per end, see mark_ends) switch tracing on for the flow."""
    chain = f"{MARK_CHAIN_PREFIX}{hook}{suffix}"
    return [{"add": {"chain": {"family": family, "table": name, "name": chain, "type": "filter", "hook": hook,
                               "policy": "accept", **attach}}}] + \
        _mark_rule_commands(family, name, flow, max_rate, hook, suffix, ends, counted)


def _mark_rule_commands(family: str, name: str, flow: Flow, max_rate: int, hook: str, suffix: str = "",
                        ends: tuple = (None,), counted: bool = False, counted_elsewhere: tuple = ()) -> list[dict]:
    """The rules of a mark chain (see _mark_chain_commands); each ends on accept.

    `counted`: the rule counts the packets that match (MATCHED_COUNTER, before the rate limit)
    and those it marks (TRACED_COUNTER, after it), so that a run can say how many packets it
    did not trace. A packet counts once: at prerouting, packets that come in on `lo` were
    counted (and marked, or not) at output, and the trace bit crosses loopback; so were
    packets that come in on `counted_elsewhere`, the devices marked at ingress."""
    chain = f"{MARK_CHAIN_PREFIX}{hook}{suffix}"
    commands = []
    for end in ends:
        exprs = flow_match(flow, hook, family, end)
        if counted and hook == "prerouting" and family == "inet":
            counted_before = (("lo",) if "output" in mark_hooks(flow) else ()) + tuple(counted_elsewhere)
            if counted_before:
                exprs.append({"match": {"op": "!=", "left": {"meta": {"key": "iifname"}},
                                        "right": {"set": list(counted_before)}}})
        if counted:
            exprs.append({"counter": MATCHED_COUNTER})
        if max_rate:
            exprs.append({"limit": {"rate": max_rate, "per": "second", "burst": max_rate}})
        if counted:
            exprs.append({"counter": TRACED_COUNTER})
        exprs.append({"mangle": {"key": {"meta": {"key": "nftrace"}}, "value": 1}})
        exprs.append(ACCEPT)
        commands.append({"add": {"rule": {"family": family, "table": name, "chain": chain, "expr": exprs}}})
    return commands


def _observe_chain_commands(family: str, name: str, hook: str, suffix: str = "", prefix: str = OBSERVE_CHAIN_PREFIX,
                            prio: int = OBSERVE_PRIORITY, **attach) -> list[dict]:
    chain = f"{prefix}{hook}{suffix}"
    return [{"add": {"chain": {"family": family, "table": name, "name": chain, "type": "filter",
                               "hook": hook, "prio": prio, "policy": "accept", **attach}}},
            {"add": {"rule": {"family": family, "table": name, "chain": chain, "expr": [ACCEPT]}}}]


def observation_hooks(nat_hooks) -> tuple[str, ...]:
    """The hooks that get an observation chain for NAT, given the hooks where the namespace has
    NAT (the exit hooks' come with the table: see TraceTable.observe_exit for postrouting's)."""
    return tuple(hook for hook in NAT_OBSERVE_HOOKS if hook in nat_hooks)


# The IP protocols (NFPROTO_IPV4, NFPROTO_IPV6) and the table families whose chains see them.
IP_PROTOCOL_FAMILIES = {2: ("inet", "ip"), 10: ("inet", "ip6")}
# The selectors before `set` that write metadata, not headers: `meta mark set`, `ct mark set`,
# `ct original zone set` (every trace event carries the mark).
_METADATA = ("meta", "ct")


def rule_writes_headers(text: str) -> bool:
    """Whether a rule, as nft lists it, may rewrite the packet's headers: a payload or header
    field set (`ip dscp set cs1`, `@nh,8,8 set 1`, `tcp option maxseg size set rt mtu`), or
    an iptables target that nft cannot show (`xt target TCPMSS`)."""
    if "xt target" in text:
        return True
    if " set " not in text:
        return False  # most rules: read once per ruleset change, a big ruleset's are many
    words = text.split()
    for index, word in enumerate(words):
        if word != "set" or index == 0:
            continue
        if words[index - 1].startswith("@"):
            return True
        if words[max(0, index - 3)] not in _METADATA and words[max(0, index - 2)] not in _METADATA:
            return True
    return False


def _writes_headers(snapshot: "RulesetSnapshot") -> bool:
    def texts(rules):
        for rule in rules:
            yield rule.text
            yield from texts(rule.inline)
    return any(rule_writes_headers(text) for text in texts(snapshot.rules.values()))


def hook_ends(snapshot: "RulesetSnapshot", own_chains: list, nfprotos: tuple = (2, 10)) -> Optional[dict]:
    """Where nftrace need not observe IP postrouting, the base chain that ends forward and
    output for each IP protocol in `nfprotos`: {(hook, nfproto): (family, table, chain)}.
    None where it must observe it.

    A packet that the last base chain of forward or of output accepts goes to postrouting.
    Where no base chain of the IP families runs there, nothing of netfilter sees it again: the
    packet has left as it left that chain, and an observation chain would cost an event per
    packet to say only that (under a flood, a fifth of the events). That holds when the last
    chain is known: one chain at the highest priority of its hook (the kernel runs chains of
    equal priority in the order they were added, which a listing does not give), whose
    priority reads as a number, counting nftrace's own chains there (`own_chains`: family,
    table, chain, hook, priority); a forward hook without chains leaves a forwarded packet
    unseen after prerouting. And when no rule may rewrite the packet's headers, which only
    an event at postrouting would show. Legacy tables, bridges and egress chains are the
    caller's to rule out (their packets' ends are not an accept of an IP hook)."""
    from ..trace.ruleset import priority_value  # the snapshot's module imports this one

    chains = [(chain.family, chain.table, chain.name, chain.hook, priority_value(chain.priority, chain.family))
              for chain in snapshot.chains.values() if chain.is_base and not is_trace_table(chain.table)]
    if any(chain[3] == "postrouting" and chain[0] in ("inet", "ip", "ip6") for chain in chains) \
            or _writes_headers(snapshot):
        return None
    chains += own_chains
    ends = {}
    for hook in ("forward", "output"):
        for nfproto in nfprotos:
            on_hook = [chain for chain in chains if chain[3] == hook and chain[0] in IP_PROTOCOL_FAMILIES[nfproto]]
            if not on_hook or any(chain[4] is None for chain in on_hook):
                return None
            last = max(chain[4] for chain in on_hook)
            at_last = [chain for chain in on_hook if chain[4] == last]
            if len(at_last) != 1:
                return None
            ends[(hook, nfproto)] = at_last[0][:3]
    return ends


def nat_hooks(snapshot: "RulesetSnapshot", legacy_nat: bool = False) -> frozenset:
    """Hooks with NAT chains: nftables base chains of type nat (iptables-nft's included), and
    every NAT hook when a legacy iptables nat table exists."""
    hooks = {chain.hook for chain in snapshot.chains.values() if chain.type == "nat" and chain.hook
             and not is_trace_table(chain.table)}
    if legacy_nat:
        hooks.update(("prerouting", "output", "input", "postrouting"))
    return frozenset(hooks)


def ingress_mark_commands(family: str, name: str, flow: Flow, max_rate: int, devices: list[str],
                          ends: tuple = (None,), counted: bool = False) -> list[dict]:
    """Ingress chains (netdev, or inet ingress) run before prerouting: a packet they drop never
    reaches the prerouting mark chain, so the trace bit is set at ingress too, on their devices,
    before them. Its rate limit is a rule of its own: a packet passes it and the prerouting one."""
    if flow.iif:
        devices = [device for device in devices if device == flow.iif]
    commands = []
    for index, device in enumerate(devices):
        # libnftables' JSON takes one device per inet ingress chain: a chain per device.
        commands += _mark_chain_commands(family, name, flow, max_rate, "ingress", f"@{index}", ends, counted,
                                         dev=device, prio=INGRESS_MARK_PRIORITY)
    if counted and devices:
        # Packets of these devices now count at ingress: the prerouting rule leaves them out,
        # in the same transaction, so that none counts twice or not at all.
        commands.append({"flush": {"chain": {"family": family, "table": name, "name": f"{MARK_CHAIN_PREFIX}prerouting"}}})
        commands += _mark_rule_commands(family, name, flow, max_rate, "prerouting", "", ends, counted,
                                        counted_elsewhere=tuple(devices))
    return commands


def egress_commands(name: str, flow: Flow, max_rate: int, devices: list[str], ends: tuple = (None,)) -> list[dict]:
    """netdev egress chains run after postrouting, as the packet is handed to its device: an
    observation chain after them on each device says that they let it go (the path ends
    there, not at postrouting), and a mark chain before them marks what no IP hook saw
    (packets sent on a packet socket)."""
    commands = []
    for index, device in enumerate(devices):
        commands += _mark_chain_commands("netdev", name, flow, max_rate, "egress", f"@{index}", ends, dev=device,
                                         prio=INGRESS_MARK_PRIORITY)
        commands += _observe_chain_commands("netdev", name, "egress", f"@{index}", dev=device)
    return commands


def bridge_table_commands(name: str, flow: Flow, max_rate: int, ends: tuple = (None,)) -> list[dict]:
    """A frame bridged between two ports passes the bridge family's hooks only (unless
    br_netfilter hands it to the IP hooks too): it is marked at bridge prerouting, and the
    bridge hooks where its path can end or turn are observed."""
    commands = _mark_chain_commands("bridge", name, flow, max_rate, "prerouting", ends=ends, prio=MARK_PRIORITY)
    for hook in BRIDGE_OBSERVE_HOOKS:
        commands += _observe_chain_commands("bridge", name, hook)
    return commands


def trace_table_commands(family: str, name: str, flow: Flow, max_rate: int, ends: tuple = (None,),
                         observe=EXIT_OBSERVE_HOOKS, counted: bool = False, conntrack: bool = False) -> list[dict]:
    """The table's chains: mark chains, observation chains on `observe`, and with `conntrack`
    the conntrack chains on the marked hooks (see the module's docstring)."""
    commands = []
    if counted:
        commands += [{"add": {"counter": {"family": family, "table": name, "name": counter}}}
                     for counter in (MATCHED_COUNTER, TRACED_COUNTER)]
    for hook in mark_hooks(flow):
        commands += _mark_chain_commands(family, name, flow, max_rate, hook, ends=ends, counted=counted,
                                         prio=MARK_PRIORITY)
    for hook in observe:
        commands += _observe_chain_commands(family, name, hook)
    for hook in mark_hooks(flow) if conntrack else ():
        commands += _observe_chain_commands(family, name, hook, prefix=CONNTRACK_CHAIN_PREFIX,
                                            prio=CONNTRACK_OBSERVE_PRIORITY)
    return commands


class TraceTable:
    """The trace rules of one run; `remove()` (or leaving the `with` block) takes them out.

    One table per family that needs marking, all of one name: `inet` always, `bridge` where
    the namespace has bridges (`mark_bridges`), `netdev` where it has egress chains
    (`mark_egress`). `relaxed`: mark each end of the flow on its own (see mark_ends), for a
    trace across several namespaces. `conntrack`: legacy iptables tables are traced too (the
    table gets conntrack chains, see the module's docstring)."""

    family = "inet"

    def __init__(self, nft: NftContext, flow: Flow, max_rate: int = DEFAULT_MAX_RATE, relaxed: bool = False,
                 counted: bool = False, conntrack: bool = False):
        self.nft = nft
        self.flow = flow
        self.max_rate = max_rate
        self.counted = counted  # count matched and traced packets (see _mark_rule_commands)
        self.observed: tuple = EXIT_OBSERVE_HOOKS
        self.conntrack = conntrack
        self.ends = mark_ends(flow, relaxed)
        self.name = f"{TRACE_TABLE_PREFIX}{os.getpid()}_{secrets.token_hex(3)}"
        self.owner = False  # the tables are tied to nftrace's socket (flags owner)
        self.families: list[str] = []  # tables made, in order
        # Why the tables could not be tied to nftrace's socket (None: they are): said once per process.
        self.owner_warning: Optional[str] = None

    @property
    def installed(self) -> bool:
        return bool(self.families)

    def forget(self) -> None:
        """Someone else deleted the tables: nothing is left to remove."""
        self.families = []

    def install(self) -> None:
        """Create the table and its chains; on any failure (a signal included) leave nothing behind."""
        try:
            self._add_table(self.family)
        except BaseException as err:
            undo_after(err, self.remove)
            raise
        self._commit(trace_table_commands(self.family, self.name, self.flow, self.max_rate, self.ends, self.observed,
                                          self.counted, self.conntrack))

    def observe(self, nat: frozenset) -> None:
        """Add the observation chains that NAT on these hooks calls for (see observation_hooks);
        called once the ruleset is known, and again when it changes. Chains are only added:
        one observation too many costs an event, one too few a fact."""
        missing = [hook for hook in observation_hooks(nat) if hook not in self.observed]
        if missing:
            self._add_observations(missing)

    def _add_observations(self, hooks: list) -> None:
        self.nft.run_json([command for hook in hooks for command in _observe_chain_commands(self.family, self.name, hook)])
        self.observed = tuple(hook for hook in OBSERVE_HOOKS if hook in self.observed or hook in hooks)

    def own_chains(self) -> list[tuple]:
        """The mark and observation chains of the inet table (family, table, chain, hook,
        priority), for hook_ends. (Its conntrack chains are there for legacy tables, which
        keep postrouting observed.)"""
        return [(self.family, self.name, f"{MARK_CHAIN_PREFIX}{hook}", hook, MARK_PRIORITY)
                for hook in mark_hooks(self.flow)] + \
            [(self.family, self.name, f"{OBSERVE_CHAIN_PREFIX}{hook}", hook, OBSERVE_PRIORITY) for hook in self.observed]

    def observe_exit(self, snapshot: "RulesetSnapshot", allowed: bool) -> Optional[dict]:
        """Observe IP postrouting only where hook_ends finds it needed (or not `allowed`: the
        caller knows of legacy tables, bridges or egress chains); return hook_ends' answer for
        the path builder (None: observed). Called once the ruleset is known, after `observe`,
        and again when it changes. A chain removed costs nothing to a packet on its way (the
        builder lets a late observation go). One added comes with the change that calls for
        it: a packet that met the new chain at postrouting before nftrace read that change
        (the moments of its commit) is answered as through, without what the chain did."""
        ends = hook_ends(snapshot, self.own_chains(), self.flow.nfprotos) if allowed else None
        if ends is None and "postrouting" not in self.observed:
            self._add_observations(["postrouting"])
        elif ends is not None and "postrouting" in self.observed:
            chain = f"{OBSERVE_CHAIN_PREFIX}postrouting"
            self.nft.run_json([{"delete": {"chain": {"family": self.family, "table": self.name, "name": chain}}}])
            self.observed = tuple(hook for hook in self.observed if hook != "postrouting")
        return ends

    def counts(self) -> tuple[int, int]:
        """(matched, traced) packets so far, from the table's counters (see `counted`)."""
        listing = json.loads(self.nft.run(f"list counters table {self.family} {self.name}", json_output=True))
        packets = {item["counter"]["name"]: item["counter"]["packets"] for item in listing.get("nftables", [])
                   if "counter" in item}
        return packets.get(MATCHED_COUNTER, 0), packets.get(TRACED_COUNTER, 0)

    def _add_table(self, family: str) -> None:
        global _owner_warned
        if family in self.families:
            return
        comment = f'comment "nftrace trace rules, pid {os.getpid()}; nftrace cleanup removes them"'
        reason = None
        with SignalsHeld():  # a table made is a table remove() knows of
            try:
                if os.environ.get("NFTRACE_TABLE_OWNER", "1") == "0" or (self.families and not self.owner):
                    raise KernelError("owner flag turned off by NFTRACE_TABLE_OWNER=0")
                self.nft.run(f"add table {family} {self.name} {{ flags owner; {comment}; }}")
                self.owner = True
            except KernelError as err:
                # Kernels before 5.12 have no owner flag: cleanup then rests on nftrace itself
                # (and on `nftrace cleanup` after a SIGKILL). NFTRACE_TABLE_OWNER=0 forces this path.
                reason = str(err)
                self.nft.run(f"add table {family} {self.name} {{ {comment}; }}")
            self.families.append(family)
        if reason is not None and not _owner_warned:
            _owner_warned = True
            self.owner_warning = OWNER_WARNING.format(reason=reason)

    def _commit(self, commands: list[dict], family: Optional[str] = None) -> None:
        """Apply; on failure take out `family`'s table (None: every table)."""
        try:
            self.nft.run_json(commands)
        except BaseException as err:
            undo_after(err, self.remove if family is None else functools.partial(self._delete, family))
            raise

    def mark_ingress(self, devices: list[str]) -> None:
        """Also set the trace bit at ingress on these interfaces (see ingress_mark_commands)."""
        commands = ingress_mark_commands(self.family, self.name, self.flow, self.max_rate, devices, self.ends,
                                         self.counted)
        if commands:
            self._commit(commands)

    def mark_bridges(self) -> None:
        """Trace bridged frames too (see bridge_table_commands)."""
        self._add_table("bridge")
        self._commit(bridge_table_commands(self.name, self.flow, self.max_rate, self.ends), "bridge")

    def mark_egress(self, devices: list[str]) -> None:
        """Follow packets through the egress chains of these devices (see egress_commands)."""
        if not devices:
            return
        self._add_table("netdev")
        self._commit(egress_commands(self.name, self.flow, self.max_rate, devices, self.ends), "netdev")

    def remove(self) -> None:
        with UndoStack() as undo:  # every family's table, the last made first, whatever fails
            for family in self.families:
                undo.callback(self._delete, family)

    def _delete(self, family: str) -> None:
        with SignalsHeld():
            if family not in self.families:
                return
            try:
                self.nft.run(f"delete table {family} {self.name}")
            except KernelError as err:
                if err.errno != errno.ENOENT:  # already gone: deleted by someone else, or by the kernel
                    raise
            self.families.remove(family)

    def __enter__(self) -> "TraceTable":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def leftover_tables(snapshot: "RulesetSnapshot") -> list[tuple[str, str]]:
    """Trace tables whose run is gone (its pid no longer exists)."""
    leftovers = []
    for family, name in snapshot.trace_tables():
        match = _NAME_RE.match(name)
        if match and not pid_alive(int(match.group(1))):
            leftovers.append((family, name))
    return leftovers


def remove_leftover_tables(nft: NftContext, snapshot: "RulesetSnapshot") -> list[str]:
    removed = []
    for family, name in leftover_tables(snapshot):
        try:
            nft.run(f"delete table {family} {name}")
            removed.append(f"{family} {name}")
        except KernelError as err:
            if err.errno != errno.ENOENT:  # already gone: deleted by someone else, or by the kernel
                raise
    return removed
