"""TRACE rules in the legacy raw table, through python-iptables: how packets get the trace bit
where the kernel has no nf_tables (or with `--backend iptables`).

`-t raw -I PREROUTING` (and `OUTPUT`) `<the flow> -m limit ... -m comment --comment "nftrace
trace rule, pid N" -j TRACE`: first in their chains, so that every later rule is traced, and
marked with the pid so that `nftrace cleanup`, or the next run, removes what a killed run left.
Their positions are left out of the rule numbers nftrace shows (see legacy.py).

python-iptables is imported only here, and only when needed. Two of its habits matter:
opening a table that does not exist creates it (and x_tables tables cannot be removed again),
and building a rule's target opens every table to see whether the target is a chain. So the
tables it may open are limited to those that exist; the raw table is created only when it is
missing and the TRACE rules need it, and the run then says so.
"""

from __future__ import annotations

import ctypes
import itertools
import os
from contextlib import contextmanager
from typing import Optional

from ..errors import EnvironmentProblem, KernelError
from ..flow import Flow
from ..protocols import PORT_PROTOCOLS, PROTOCOL_NUMBERS, iptables_command
from .legacy import OWN_COMMENT, LegacyRuleset, legacy_tables, own_rule_pid, read_legacy_ruleset
from ..kernel.system import pid_alive
from ..signals import SignalsHeld
from ..kernel.tracetable import mark_hooks

# The legacy table the TRACE rules go in: raw runs first, before conntrack and NAT.
TRACE_RULES_TABLE = "raw"
HOOK_CHAINS = {"prerouting": "PREROUTING", "output": "OUTPUT"}


def load_iptc():
    try:
        import iptc  # python-iptables: Debian's python3-iptables, or the `iptables` extra of nftrace
    except ImportError:
        raise EnvironmentProblem(
            "python-iptables is not installed, and legacy TRACE rules need it: apt-get install python3-iptables"
        ) from None
    except Exception as err:  # noqa: BLE001 - XTablesError/OSError; iptc's classes are out of reach when its import fails
        raise EnvironmentProblem(f"python-iptables cannot load libiptc/libxtables: {err}") from None
    _read_option_tables_with_their_real_stride(iptc)
    return iptc


def _option_entry_stride(iptc) -> Optional[int]:
    """The size of an option-table entry in the libxtables loaded, read from the `limit`
    extension's table, whose second entry is `limit-burst`: 48 bytes before libxtables
    1.8.11, 56 since (it added `base`). None when neither holds."""
    module = iptc.xtables.xtables(iptc.xtables.NFPROTO_IPV4).find_match("limit")
    if not module or not module[0].x6_options:
        return None
    start = ctypes.addressof(module[0].x6_options.contents)
    for stride in (ctypes.sizeof(iptc.xtables.xt_option_entry), ctypes.sizeof(_EntryWithBase(iptc))):
        # The name pointer of the second entry; with the wrong stride this reads `base` and
        # padding (zeros), never a pointer to follow.
        name = ctypes.c_void_p.from_address(start + stride).value
        if name and ctypes.string_at(name) == b"limit-burst":
            return stride
    return None


def _EntryWithBase(iptc):
    class EntryWithBase(ctypes.Structure):
        _fields_ = [*iptc.xtables.xt_option_entry._fields_, ("base", ctypes.c_uint)]

    return EntryWithBase


def _read_option_tables_with_their_real_stride(iptc) -> None:
    """python-iptables (1.0.1 and 1.2.0) reads an extension's option table as an array of its
    own `xt_option_entry`, which lacks the `base` member that libxtables 1.8.11 (Debian 13)
    added: past the first option it reads the wrong bytes, and `--dport` or `--limit-burst`
    become "no such parameter" (python-iptables issue #353). Where the entries of the loaded
    libxtables are longer than python-iptables' struct, its lookup is replaced by one that
    steps over the real entries and hands back python-iptables' view of the one found."""
    xtables = iptc.xtables.xtables
    if getattr(xtables, "_nftrace_stride", None) is not None:
        return
    entry_class = iptc.xtables.xt_option_entry
    stride = _option_entry_stride(iptc) or ctypes.sizeof(entry_class)
    if stride != ctypes.sizeof(entry_class):

        def option_lookup(_xtables, entries, name):
            start = ctypes.addressof(entries.contents)
            for index in itertools.count():
                entry = entry_class.from_address(start + index * stride)
                if not entry.name:
                    return None
                if entry.name == name:
                    return entry

        xtables._option_lookup = option_lookup
    xtables._nftrace_stride = stride


@contextmanager
def _raw_table(iptc, family: str):
    """The raw table of the family, open, with python-iptables kept away from tables that do
    not exist while it is.

    python-iptables asks its module function `is_table_available` (`is_table6_available`)
    which tables to open, and opening one creates it. Replacing that function for the time
    the table is in use is the one way that works on every version: Debian 12 and 13 ship
    python-iptables 1.0.1, whose only cache of the answer is that function; 1.2.0 added a
    cache (`Table.existing_table_names`) that the function reads, so the function still
    decides."""
    module, check = (iptc.ip4tc, "is_table_available") if family == "ip" else (iptc.ip6tc, "is_table6_available")
    present = set(legacy_tables(family)) | {TRACE_RULES_TABLE}
    original = getattr(module, check)
    setattr(module, check, present.__contains__)
    try:
        table = (iptc.Table if family == "ip" else iptc.Table6)(TRACE_RULES_TABLE)
        table.autocommit = False
        table.refresh()
        yield table
    finally:
        setattr(module, check, original)


def _address(network) -> str:
    return f"{network.network_address}/{network.prefixlen}"


def trace_rule(iptc, family: str, flow: Flow, hook: str, max_rate: int, pid: int):
    """The python-iptables rule that sets the trace bit on the flow's packets at `hook`."""
    rule = iptc.Rule() if family == "ip" else iptc.Rule6()
    if flow.src.prefixlen:
        rule.src = _address(flow.src)
    if flow.dst.prefixlen:
        rule.dst = _address(flow.dst)
    if flow.proto:
        rule.protocol = str(PROTOCOL_NUMBERS[flow.proto])
    if hook == "prerouting" and flow.iif:
        rule.in_interface = flow.iif
    if hook == "output" and flow.oif:
        rule.out_interface = flow.oif
    if flow.proto in PORT_PROTOCOLS and (flow.sport or flow.dport):
        ports = rule.create_match(flow.proto)
        if flow.sport:
            ports.sport = str(flow.sport)
        if flow.dport:
            ports.dport = str(flow.dport)
    if max_rate:
        limit = rule.create_match("limit")
        limit.limit = f"{max_rate}/second"
        limit.limit_burst = str(max_rate)
    comment = rule.create_match("comment")
    comment.comment = OWN_COMMENT.format(pid=pid)
    rule.create_target("TRACE")
    return rule


def _rule_comment(rule) -> Optional[str]:
    for match in rule.matches:
        if match.name == "comment":
            return match.comment
    return None


def iptc_errors(iptc) -> tuple:
    return (iptc.IPTCError, iptc.XTablesError, ValueError)


def _commit(iptc, table, what: str) -> None:
    """Apply the table's pending changes in one replace; on refusal, forget them."""
    try:
        table.commit()
    except iptc_errors(iptc) as err:
        raise KernelError(f"the kernel refused {what}: {err}") from None
    finally:
        table.refresh()


class TraceRules:
    """nftrace's TRACE rules for one run; `remove()` (or leaving the `with` block) takes them out."""

    def __init__(self, family: str, flow: Flow, max_rate: int):
        self.family = family
        self.flow = flow
        self.max_rate = max_rate
        self.pid = os.getpid()
        self.created_raw_table = False
        self.installed = False
        self._iptc = None

    def install(self) -> None:
        iptc = self._iptc = load_iptc()
        self.created_raw_table = TRACE_RULES_TABLE not in legacy_tables(self.family)
        with _raw_table(iptc, self.family) as table:
            try:
                for hook in mark_hooks(self.flow):
                    iptc.Chain(table, HOOK_CHAINS[hook]).insert_rule(
                        trace_rule(iptc, self.family, self.flow, hook, self.max_rate, self.pid))
            except iptc_errors(iptc) as err:
                table.refresh()
                raise EnvironmentProblem(f"cannot build nftrace's TRACE rules with python-iptables: {err}") from None
            with SignalsHeld():  # the rules and the flag that says they are in go together
                _commit(iptc, table, "nftrace's TRACE rules")
                self.installed = True

    def remove(self) -> None:
        with SignalsHeld():
            if not self.installed:
                return
            remove_trace_rules(self._iptc, self.family, {self.pid})
            self.installed = False

    def __enter__(self) -> "TraceRules":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def remove_trace_rules(iptc, family: str, pids: set) -> int:
    """Delete the TRACE rules of runs with these pids from the raw table; return how many."""
    removed = 0
    with SignalsHeld(), _raw_table(iptc, family) as table:
        for chain in table.chains:
            for rule in list(chain.rules):
                if rule.target.name == "TRACE" and own_rule_pid(_rule_comment(rule)) in pids:
                    chain.delete_rule(rule)
                    removed += 1
        if removed:
            _commit(iptc, table, "the removal of nftrace's TRACE rules")
    return removed


def leftover_trace_rules(ruleset: LegacyRuleset) -> set:
    """Pids of dead runs whose TRACE rules are still in the ruleset."""
    return {pid for pid in (own_rule_pid(rule.comment) for rule in ruleset.own_rules()) if not pid_alive(pid)}


def remove_leftover_trace_rules(family: str) -> list[str]:
    """TRACE rules that killed runs left in this namespace, removed (python-iptables is loaded
    only when there are some)."""
    if TRACE_RULES_TABLE not in legacy_tables(family):
        return []
    pids = leftover_trace_rules(read_legacy_ruleset(family))
    if not pids:
        return []
    count = remove_trace_rules(load_iptc(), family, pids)
    if not count:
        return []
    command = iptables_command(family)
    runs = f"run{'s' if len(pids) > 1 else ''} {', '.join(map(str, sorted(pids)))}"
    return [f"{count} {command} TRACE rule{'s' if count > 1 else ''} of killed {runs}"]
