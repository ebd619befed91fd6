"""nftrace's own nftables table: mark chains that switch tracing on for the flow, and
observation chains that show the packet where nothing else can.

- mark chains at prerouting and output, priority -350, before raw (-300), conntrack
  (-200) and NAT: they see the packet as it arrived or was sent, and set `meta nftrace`
  for the flow only, under a kernel-side rate limit;
- observation chains, last priority, on the exit hooks (input, postrouting: their event says
  that netfilter let the packet through, and shows it as it leaves) and on the hooks where
  NAT may rewrite it unseen (prerouting and output, when the namespace has NAT chains there:
  a packet that vanishes after a DNAT is known by its new headers). Everywhere else the
  first chain of the next hook shows the packet as the hook left it (trace/paths.py).

Every chain of the table ends on one `accept` rule: the kernel then sends one event per
packet and chain, where a chain that falls off its end sends two (end of rules, policy).
Each event costs the kernel an allocation and the reader its decoding: under a flood, the
events per packet decide whether nftrace keeps up.

The table is created with `flags owner` where the kernel has it, so that the kernel deletes
it when nftrace's netlink socket closes, even on SIGKILL. Its name carries the pid, so that
`nftrace cleanup` (and every later run) can tell a dead run's leftover from a live one's.
Everything the user typed reaches the kernel as JSON values, never as nft command text.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from typing import Optional

from ..errors import KernelError
from ..flow import Flow, PROTOCOL_NUMBERS
from .nft import NftContext
from ..trace.ruleset import TRACE_TABLE_PREFIX, RulesetSnapshot, is_trace_table
from .system import pid_alive

MARK_PRIORITY = -350
INGRESS_MARK_PRIORITY = -10000
OBSERVE_PRIORITY = 2**31 - 1
MARK_HOOKS = ("prerouting", "output")
OBSERVE_HOOKS = ("prerouting", "input", "forward", "output", "postrouting")
# Observed always: their observation is where an accepted packet's path ends.
EXIT_OBSERVE_HOOKS = ("input", "postrouting")
# Observed when the namespace has NAT chains on them (DNAT happens there).
NAT_OBSERVE_HOOKS = ("prerouting", "output")
ACCEPT = {"accept": None}
MATCHED_COUNTER = "matched"
TRACED_COUNTER = "traced"
DEFAULT_MAX_RATE = 100
_NAME_RE = re.compile(rf"^{TRACE_TABLE_PREFIX}(\d+)_[0-9a-f]+$")


def _address_match(field: str, flow: Flow, network) -> Optional[dict]:
    if network is None or network.prefixlen == 0:
        return None
    right = (
        str(network.network_address)
        if network.prefixlen == network.max_prefixlen
        else {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}
    )
    return {"match": {"op": "==", "left": {"payload": {"protocol": flow.nft_family, "field": field}}, "right": right}}


def flow_match(flow: Flow, hook: str) -> list[dict]:
    """The nft JSON expressions that match the flow at a mark hook."""
    exprs = []
    if flow.ip_version is not None:
        nfproto = "ipv4" if flow.ip_version == 4 else "ipv6"
        exprs.append({"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": nfproto}})
    for field, network in (("saddr", flow.src), ("daddr", flow.dst)):
        match = _address_match(field, flow, network)
        if match:
            exprs.append(match)
    if flow.proto:
        exprs.append({"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": PROTOCOL_NUMBERS[flow.proto]}})
    for field, port in (("sport", flow.sport), ("dport", flow.dport)):
        if port is not None:
            exprs.append({"match": {"op": "==", "left": {"payload": {"protocol": flow.proto, "field": field}}, "right": port}})
    if hook == "prerouting" and flow.iif:
        exprs.append({"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": flow.iif}})
    if hook == "output" and flow.oif:
        exprs.append({"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": flow.oif}})
    return exprs


def mark_hooks(flow: Flow) -> tuple[str, ...]:
    """A packet that arrives on --iif is never a locally sent one: no output mark then."""
    return ("prerouting",) if flow.iif else MARK_HOOKS


def _mark_chain_commands(family: str, name: str, flow: Flow, max_rate: int, hook: str, suffix: str = "",
                         counted: bool = False, **attach) -> list[dict]:
    """A chain on `hook` whose one rule switches tracing on for the flow.

    `counted`: the rule counts the packets that match (MATCHED_COUNTER, before the rate limit)
    and those it marks (TRACED_COUNTER, after it), so that a run can say how many packets it
    did not trace. A packet counts once: at prerouting, packets that come in on `lo` were
    counted (and marked, or not) at output, and the trace bit crosses loopback."""
    chain = f"mark_{hook}{suffix}"
    exprs = flow_match(flow, hook)
    if counted:
        if hook == "prerouting" and "output" in mark_hooks(flow):
            exprs.append({"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "lo"}})
        exprs.append({"counter": MATCHED_COUNTER})
    if max_rate:
        exprs.append({"limit": {"rate": max_rate, "per": "second", "burst": max_rate}})
    if counted:
        exprs.append({"counter": TRACED_COUNTER})
    exprs.append({"mangle": {"key": {"meta": {"key": "nftrace"}}, "value": 1}})
    exprs.append(ACCEPT)
    return [{"add": {"chain": {"family": family, "table": name, "name": chain, "type": "filter", "hook": hook,
                               "policy": "accept", **attach}}},
            {"add": {"rule": {"family": family, "table": name, "chain": chain, "expr": exprs}}}]


def observation_hooks(nat_hooks) -> tuple[str, ...]:
    """The hooks that get an observation chain, given the hooks where the namespace has NAT."""
    return tuple(hook for hook in OBSERVE_HOOKS if hook in EXIT_OBSERVE_HOOKS or (hook in NAT_OBSERVE_HOOKS
                                                                                 and hook in nat_hooks))


def nat_hooks(snapshot: RulesetSnapshot, legacy_nat: bool = False) -> frozenset:
    """Hooks with NAT chains: nftables base chains of type nat (iptables-nft's included), and
    every NAT hook when a legacy iptables nat table exists."""
    hooks = {chain.hook for chain in snapshot.chains.values() if chain.type == "nat" and chain.hook
             and not is_trace_table(chain.table)}
    if legacy_nat:
        hooks.update(("prerouting", "output", "input", "postrouting"))
    return frozenset(hooks)


def observation_commands(family: str, name: str, hooks) -> list[dict]:
    commands = []
    for hook in hooks:
        chain = f"obs_{hook}"
        commands.append({"add": {"chain": {"family": family, "table": name, "name": chain, "type": "filter",
                                           "hook": hook, "prio": OBSERVE_PRIORITY, "policy": "accept"}}})
        commands.append({"add": {"rule": {"family": family, "table": name, "chain": chain, "expr": [ACCEPT]}}})
    return commands


def ingress_mark_commands(family: str, name: str, flow: Flow, max_rate: int, devices: list[str]) -> list[dict]:
    """Ingress chains (netdev, or inet ingress) run before prerouting: a packet they drop never
    reaches the prerouting mark chain, so the trace bit is set at ingress too, on their devices,
    before them. Its rate limit is a rule of its own: a packet passes it and the prerouting one."""
    if flow.iif:
        devices = [device for device in devices if device == flow.iif]
    commands = []
    for index, device in enumerate(devices):
        # libnftables' JSON takes one device per inet ingress chain: a chain per device.
        commands += _mark_chain_commands(family, name, flow, max_rate, "ingress", f"@{index}", dev=device,
                                         prio=INGRESS_MARK_PRIORITY)
    return commands


def trace_table_commands(family: str, name: str, flow: Flow, max_rate: int,
                         observe=EXIT_OBSERVE_HOOKS, counted: bool = False) -> list[dict]:
    commands = []
    if counted:
        commands += [{"add": {"counter": {"family": family, "table": name, "name": counter}}}
                     for counter in (MATCHED_COUNTER, TRACED_COUNTER)]
    for hook in mark_hooks(flow):
        commands += _mark_chain_commands(family, name, flow, max_rate, hook, counted=counted, prio=MARK_PRIORITY)
    return commands + observation_commands(family, name, observe)


class TraceTable:
    """The trace rules of one run; `remove()` (or leaving the `with` block) takes them out."""

    family = "inet"

    def __init__(self, nft: NftContext, flow: Flow, max_rate: int = DEFAULT_MAX_RATE, counted: bool = False):
        self.nft = nft
        self.flow = flow
        self.max_rate = max_rate
        self.counted = counted  # count matched and traced packets (see _mark_chain_commands)
        self.name = f"{TRACE_TABLE_PREFIX}{os.getpid()}_{secrets.token_hex(3)}"
        self.owner = False
        self.installed = False
        self.observed: tuple = EXIT_OBSERVE_HOOKS

    def install(self) -> None:
        """Create the table and its chains; on any failure leave nothing behind."""
        comment = f'comment "nftrace trace rules, pid {os.getpid()}; nftrace cleanup removes them"'
        try:
            if os.environ.get("NFTRACE_TABLE_OWNER", "1") == "0":
                raise KernelError("owner flag turned off by NFTRACE_TABLE_OWNER=0")
            self.nft.run(f"add table {self.family} {self.name} {{ flags owner; {comment}; }}")
            self.owner = True
        except KernelError:
            # Kernels before 5.12 have no owner flag: cleanup then rests on nftrace itself
            # (and on `nftrace cleanup` after a SIGKILL). NFTRACE_TABLE_OWNER=0 forces this path.
            self.nft.run(f"add table {self.family} {self.name} {{ {comment}; }}")
        self.installed = True
        try:
            self.nft.run_json(trace_table_commands(self.family, self.name, self.flow, self.max_rate, self.observed,
                                                   counted=self.counted))
        except BaseException:
            self.remove()
            raise

    def observe(self, nat: frozenset) -> None:
        """Add the observation chains that NAT on these hooks calls for (see observation_hooks);
        called once the ruleset is known, and again when it changes. Chains are only added:
        one observation too many costs an event, one too few a fact."""
        missing = [hook for hook in observation_hooks(nat) if hook not in self.observed]
        if missing:
            self.nft.run_json(observation_commands(self.family, self.name, missing))
            self.observed = tuple(hook for hook in OBSERVE_HOOKS if hook in self.observed or hook in missing)

    def counts(self) -> tuple[int, int]:
        """(matched, traced) packets so far, from the table's counters (see `counted`)."""
        listing = json.loads(self.nft.run(f"list counters table {self.family} {self.name}", json_output=True))
        packets = {item["counter"]["name"]: item["counter"]["packets"] for item in listing.get("nftables", [])
                   if "counter" in item}
        return packets.get(MATCHED_COUNTER, 0), packets.get(TRACED_COUNTER, 0)

    def mark_ingress(self, devices: list[str]) -> None:
        """Also set the trace bit at ingress on these interfaces (see ingress_mark_commands)."""
        commands = ingress_mark_commands(self.family, self.name, self.flow, self.max_rate, devices)
        if commands:
            self.nft.run_json(commands)

    def remove(self) -> None:
        if not self.installed:
            return
        try:
            self.nft.run(f"delete table {self.family} {self.name}")
        except KernelError as err:
            if "No such file" not in str(err):
                raise
        self.installed = False

    def __enter__(self) -> "TraceTable":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def leftover_tables(snapshot: RulesetSnapshot) -> list[tuple[str, str]]:
    """Trace tables whose run is gone (its pid no longer exists)."""
    leftovers = []
    for family, name in snapshot.trace_tables():
        match = _NAME_RE.match(name)
        if match and not pid_alive(int(match.group(1))):
            leftovers.append((family, name))
    return leftovers


def remove_leftover_tables(nft: NftContext, snapshot: RulesetSnapshot) -> list[str]:
    removed = []
    for family, name in leftover_tables(snapshot):
        try:
            nft.run(f"delete table {family} {name}")
            removed.append(f"{family} {name}")
        except KernelError as err:
            if "No such file" not in str(err):
                raise
    return removed
