"""nftrace's own nftables table: mark chains that switch tracing on for the flow, and
observation chains that show every hook the packet passes.

- mark chains at prerouting and output, priority -350, before raw (-300), conntrack
  (-200) and NAT: they see the packet as it arrived or was sent, and set `meta nftrace`
  for the flow only, under a kernel-side rate limit;
- observation chains, no rules, policy accept, last priority, at every hook: their events
  tell the path builder which hook the packet passed, and the headers it left it with.

The table is created with `flags owner` where the kernel has it, so that the kernel deletes
it when nftrace's netlink socket closes, even on SIGKILL. Its name carries the pid, so that
`nftrace cleanup` (and every later run) can tell a dead run's leftover from a live one's.
Everything the user typed reaches the kernel as JSON values, never as nft command text.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
from typing import TYPE_CHECKING, Optional

from ..errors import KernelError
from ..flow import Flow, PROTOCOL_NUMBERS
from .nft import NftContext
from ..signals import SignalsHeld, undo_after
from .system import pid_alive

if TYPE_CHECKING:
    from ..trace.ruleset import RulesetSnapshot

# Every table an nftrace run makes is named nftrace_<pid>_<hex>: the ruleset snapshot leaves
# them out of paths, and cleanup finds a dead run's by the pid.
TRACE_TABLE_PREFIX = "nftrace_"
# Its chains: mark_<hook> set the trace bit, obs_<hook> observe (the path builder reads the hook
# from the name).
MARK_CHAIN_PREFIX = "mark_"
OBSERVE_CHAIN_PREFIX = "obs_"

MARK_PRIORITY = -350
INGRESS_MARK_PRIORITY = -10000
OBSERVE_PRIORITY = 2**31 - 1
MARK_HOOKS = ("prerouting", "output")
OBSERVE_HOOKS = ("prerouting", "input", "forward", "output", "postrouting")
DEFAULT_MAX_RATE = 100
OWNER_WARNING = ("nftrace's table could not be tied to its process with 'flags owner' ({reason}): it is removed "
                 "on every exit but SIGKILL; after a SIGKILL, 'nftrace cleanup' (or the next run) removes it")
_owner_warned = False
_NAME_RE = re.compile(rf"^{TRACE_TABLE_PREFIX}(\d+)_[0-9a-f]+$")


def is_trace_table(name: str) -> bool:
    """Whether a table is an nftrace run's (this one's, another live one's, or a leftover)."""
    return name.startswith(TRACE_TABLE_PREFIX)


def _address_match(field: str, flow: Flow, network) -> Optional[dict]:
    if network.prefixlen == 0:
        return None
    right = (
        str(network.network_address)
        if network.prefixlen == network.max_prefixlen
        else {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}
    )
    return {"match": {"op": "==", "left": {"payload": {"protocol": flow.nft_family, "field": field}}, "right": right}}


def flow_match(flow: Flow, hook: str) -> list[dict]:
    """The nft JSON expressions that match the flow at a mark hook."""
    nfproto = "ipv4" if flow.ip_version == 4 else "ipv6"
    exprs = [{"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": nfproto}}]
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
                         **attach) -> list[dict]:
    """A chain on `hook` whose one rule switches tracing on for the flow."""
    chain = f"{MARK_CHAIN_PREFIX}{hook}{suffix}"
    exprs = flow_match(flow, hook)
    if max_rate:
        exprs.append({"limit": {"rate": max_rate, "per": "second", "burst": max_rate}})
    exprs.append({"mangle": {"key": {"meta": {"key": "nftrace"}}, "value": 1}})
    return [{"add": {"chain": {"family": family, "table": name, "name": chain, "type": "filter", "hook": hook,
                               "policy": "accept", **attach}}},
            {"add": {"rule": {"family": family, "table": name, "chain": chain, "expr": exprs}}}]


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


def trace_table_commands(family: str, name: str, flow: Flow, max_rate: int) -> list[dict]:
    commands = []
    for hook in mark_hooks(flow):
        commands += _mark_chain_commands(family, name, flow, max_rate, hook, prio=MARK_PRIORITY)
    for hook in OBSERVE_HOOKS:
        commands.append({"add": {"chain": {"family": family, "table": name, "name": f"{OBSERVE_CHAIN_PREFIX}{hook}", "type": "filter",
                                           "hook": hook, "prio": OBSERVE_PRIORITY, "policy": "accept"}}})
    return commands


class TraceTable:
    """The trace rules of one run; `remove()` (or leaving the `with` block) takes them out."""

    family = "inet"

    def __init__(self, nft: NftContext, flow: Flow, max_rate: int = DEFAULT_MAX_RATE):
        self.nft = nft
        self.flow = flow
        self.max_rate = max_rate
        self.name = f"{TRACE_TABLE_PREFIX}{os.getpid()}_{secrets.token_hex(3)}"
        self.installed = False
        # Why the table could not be tied to nftrace's socket (None: it is): said once per process.
        self.owner_warning: Optional[str] = None

    def install(self) -> None:
        """Create the table and its chains; on any failure (a signal included) leave nothing behind."""
        try:
            with SignalsHeld():  # the table and the flag that says it exists go in together
                self._add_table()
                self.installed = True
            self.nft.run_json(trace_table_commands(self.family, self.name, self.flow, self.max_rate))
        except BaseException as err:
            undo_after(err, self.remove)
            raise

    def _add_table(self) -> None:
        global _owner_warned
        comment = f'comment "nftrace trace rules, pid {os.getpid()}; nftrace cleanup removes them"'
        try:
            if os.environ.get("NFTRACE_TABLE_OWNER", "1") == "0":
                raise KernelError("owner flag turned off by NFTRACE_TABLE_OWNER=0")
            self.nft.run(f"add table {self.family} {self.name} {{ flags owner; {comment}; }}")
            return
        except KernelError as err:
            # Kernels before 5.12 have no owner flag: cleanup then rests on nftrace itself
            # (and on `nftrace cleanup` after a SIGKILL). NFTRACE_TABLE_OWNER=0 forces this path.
            reason = str(err)
        self.nft.run(f"add table {self.family} {self.name} {{ {comment}; }}")
        if not _owner_warned:
            _owner_warned = True
            self.owner_warning = OWNER_WARNING.format(reason=reason)

    def mark_ingress(self, devices: list[str]) -> None:
        """Also set the trace bit at ingress on these interfaces (see ingress_mark_commands)."""
        commands = ingress_mark_commands(self.family, self.name, self.flow, self.max_rate, devices)
        if commands:
            self.nft.run_json(commands)

    def remove(self) -> None:
        with SignalsHeld():
            if not self.installed:
                return
            try:
                self.nft.run(f"delete table {self.family} {self.name}")
            except KernelError as err:
                if err.errno != errno.ENOENT:  # already gone: deleted by someone else, or by the kernel
                    raise
            self.installed = False

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
