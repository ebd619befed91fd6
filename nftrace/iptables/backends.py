"""Which parts of netfilter a run traces (`--backend auto|nft|iptables`), and the legacy side
of a run.

- nft: nftrace's own table marks the flow and its trace events tell the path; iptables-nft
  rules are nftables rules and are traced with it.
- iptables: legacy x_tables only, for kernels without nf_tables: TRACE rules in the raw table
  mark the flow, and TRACE lines (through nfnetlink_log) alone tell the path.
- auto: nft where nf_tables works, and legacy tables of the flow's family, when the namespace
  has any, are traced too: nftrace's mark chain sets the trace bit that makes legacy tables
  report, so a packet gets one path through both, in hook order. Without nf_tables: iptables.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import EnvironmentProblem, InputError
from ..flow import Flow
from ..protocols import iptables_command
from .iptctrace import TraceRules, remove_leftover_trace_rules
from .legacy import FAMILIES, legacy_tables
from .merge import LegacyPathBuilder, MergedPathBuilder, last_tables_on_exit_hooks
from .nflog import (NFNETLINK_LOG, LegacyTraceEvent, NflogListener, conntrack_log_invalid, in_initial_netns,
                    restore_leftover_loggers)
from .rulehistory import RulesetHistory
from .xtstate import RulesetObserver
from ..kernel.system import interface_names
from ..signals import SignalsHeld, UndoStack, undo_after
from ..trace.paths import PacketPathBuilder, PathBuilder
from ..trace.shapes import PathShapes

BACKENDS = ("auto", "nft", "iptables")


@dataclass(frozen=True)
class BackendPlan:
    nft: bool  # nftrace's trace table and nftables trace events
    legacy: Optional[str] = None  # ip / ip6: the family whose legacy tables report TRACE lines
    trace_rules: bool = False  # legacy TRACE rules set the trace bit (no nftables at all)
    # Families whose legacy tables see traced packets but are not traced (`nftrace drops`):
    # their TRACE lines are kept out of the kernel log (SilencedTraceLines).
    silenced: tuple = ()

    @property
    def name(self) -> str:
        """What the JSON document's `backend` says."""
        if self.nft and self.legacy:
            return "nft+iptables-legacy"
        return "nft" if self.nft else "iptables-legacy"


def parse_backend(text: str) -> str:
    choice = (text or "").strip().lower()
    if choice not in BACKENDS:
        raise InputError(f"--backend: '{text}' is not one of {', '.join(BACKENDS)}")
    return choice


def plan_backend(choice: str, flow: Flow, nft_problem: Optional[str], tables: list,
                 warnings: Optional[list] = None) -> BackendPlan:
    """Decide from what the namespace has: `nft_problem` says why nf_tables cannot be used
    (None: it can), `tables` are the namespace's legacy tables of the flow's family."""
    family = flow.nft_family
    command = iptables_command(family)
    if choice == "iptables":
        if not tables:
            raise EnvironmentProblem(f"--backend iptables: this namespace has no legacy {command} tables "
                                     "(iptables-nft rules are nftables rules: use --backend nft or auto)")
        return BackendPlan(nft=False, legacy=family, trace_rules=True)
    if nft_problem is None:
        if choice == "nft":
            if tables and warnings is not None:
                warnings.append(f"legacy {command} tables ({', '.join(tables)}) are not traced with --backend nft")
            return BackendPlan(nft=True)
        return BackendPlan(nft=True, legacy=family if tables else None)
    if choice == "auto":
        if tables:
            return BackendPlan(nft=False, legacy=family, trace_rules=True)
        raise EnvironmentProblem(f"{nft_problem}, and this namespace has no legacy {command} tables to trace instead")
    raise EnvironmentProblem(nft_problem)


class LegacyTracing:
    """The legacy side of a run: nfnetlink_log bound and listened to, the legacy rulesets as
    they change (rulehistory.py), and (without nftables) the TRACE rules. Leaving the `with`
    block undoes all of it."""

    # While lines are awaited, the tables are observed at least this often (seconds): a line's
    # packet timestamp then places it after the observations finished before it arrived.
    OBSERVE_INTERVAL = 0.1

    def __init__(self, plan: BackendPlan, flow: Flow, max_rate: int, warnings: list):
        self.plan = plan
        self.family = plan.legacy
        self.flow = flow
        self.max_rate = max_rate
        self.warnings = warnings
        self.listener: Optional[NflogListener] = None
        self.rules: Optional[TraceRules] = None
        self.history: Optional[RulesetHistory] = None
        self._observer: Optional[RulesetObserver] = None
        self._floor = 0  # the latest observation before the previous drain of the socket began

    def __enter__(self) -> "LegacyTracing":
        cleaned = restore_leftover_loggers() + remove_leftover_trace_rules(self.family)
        if cleaned:
            self.warnings.append(f"undid what killed nftrace runs left: {'; '.join(cleaned)}")
        try:
            with SignalsHeld():  # the binding and the object that undoes it go together
                self.listener = NflogListener((self.family,))
            self.warnings.extend(kernel_log_warnings(self.listener.previous_loggers()))
            if self.plan.trace_rules:
                self.rules = TraceRules(self.family, self.flow, self.max_rate)
                self.rules.install()
                if self.rules.created_raw_table:
                    self.warnings.append(f"the legacy {iptables_command(self.family)} raw table did not exist and was "
                                         "created for the TRACE rules; the kernel keeps it (empty) after the run")
            self.history = RulesetHistory(self.family, interface_names())
            self._observer = RulesetObserver(self.family, self.history)
            # Nothing of this run sets the trace bit before this observation, except TRACE
            # rules just put in: lines of the first drain are read against it and later ones.
            self._floor = self._observer.observe()
        except BaseException as err:
            undo_after(err, self.__exit__)
            raise
        return self

    def __exit__(self, *exc) -> None:
        """TRACE rules out first (they make the lines), then the listener and the loggers."""
        with UndoStack() as undo:
            if self.listener is not None:
                undo.callback(self.listener.close)
            if self.rules is not None:
                undo.callback(self.rules.remove)
            if self._observer is not None:
                undo.callback(self._observer.close)

    def fileno(self) -> int:
        return self.listener.fileno()

    def read(self) -> list:
        """Every TRACE line queued now, each with the observations of the tables that bound
        when it was made (rulehistory.py); call it often, lines or not."""
        observer, history = self._observer, self.history
        if time.time() - history.latest_finished >= self.OBSERVE_INTERVAL:
            observer.observe()
        began = history.latest
        items = list(self.listener.read())
        if any(isinstance(item, LegacyTraceEvent) for item in items):
            read_at = time.time()
            window = (self._floor, observer.observe())
            items = [dataclasses.replace(item, seen_between=window, read_at=read_at)
                     if isinstance(item, LegacyTraceEvent) else item for item in items]
        self._floor = began
        return items

    def notes(self) -> list[str]:
        """Warnings about lines that could not be read against one ruleset."""
        return self.history.notes() if self.history is not None else []

    def lost_messages(self) -> int:
        return self.listener.dropped_messages() or self.listener.overruns

    def tables(self) -> list:
        return legacy_tables(self.family)


def kernel_log_warnings(previous: dict) -> list[str]:
    """What the kernel log missed while nfnetlink_log stood in for its loggers (`previous`:
    family → the logger bound before), said where someone asked for it: in the machine's own
    namespace, conntrack's log of invalid packets. LOG rules are not affected (nflog.py); a
    helper's drop messages and other tracers' TRACE lines are too rare for a warning on every
    run (the README says it)."""
    replaced = sorted({name for name in previous.values() if name not in ("NONE", NFNETLINK_LOG)})
    invalid = conntrack_log_invalid() if replaced and in_initial_netns() else 0
    if not invalid:
        return []
    return [f"while nftrace ran, conntrack's log of invalid packets (nf_conntrack_log_invalid = {invalid}) went to "
            f"nftrace, not to the kernel log: nfnetlink_log stood in for {' and '.join(replaced)} (bound again now)"]


class SilencedTraceLines:
    """The TRACE lines of legacy tables that a run does not trace, kept out of the kernel log.

    Every packet a run traces has the trace bit, and x_tables write a line for each rule it
    meets to the nf_log logger of its family: in the machine's own namespace (in any, with
    nf_log_all_netns), the kernel log, a line per rule per packet. For the run, nfnetlink_log
    stands in for that logger, and NFLOG group 0 is left free: with nobody on it the lines go
    nowhere, and a `why` started meanwhile can take it (it skips the lines of packets not its
    own). Bound before anything sets the trace bit; undone, and recorded for `cleanup`, as
    LegacyTracing's binding is."""

    def __init__(self, families: tuple, warnings: list):
        self.families = families
        self.warnings = warnings
        self.listener: Optional[NflogListener] = None

    def __enter__(self) -> "SilencedTraceLines":
        cleaned = restore_leftover_loggers()
        if cleaned:
            self.warnings.append(f"undid what killed nftrace runs left: {'; '.join(cleaned)}")
        with SignalsHeld():
            self.listener = NflogListener(self.families, hold_group=False)
        self.warnings.extend(kernel_log_warnings(self.listener.previous_loggers()))
        return self

    def __exit__(self, *exc) -> None:
        if self.listener is not None:
            self.listener.close()


def clean_up_legacy() -> list[str]:
    """What killed runs left in this namespace's legacy side: nf_log bindings and TRACE rules."""
    done = [f"restored {item}" for item in restore_leftover_loggers()]
    for family in FAMILIES:
        done.extend(f"removed {item}" for item in remove_leftover_trace_rules(family))
    return done


def make_path_builder(plan: BackendPlan, snapshot, legacy: Optional[LegacyTracing],
                      keep: Callable, idle_seconds: float, hook_ends: Optional[dict] = None,
                      **devices) -> PacketPathBuilder:
    """The path builder for the plan: nftables events, legacy TRACE lines, or both merged.
    `devices`: the bridges and egress devices nftables paths follow; `hook_ends`: where
    packets leave unobserved (both PathBuilder's)."""
    if not plan.nft:
        return LegacyPathBuilder(legacy.history, keep=keep, idle_seconds=idle_seconds,
                                 last_tables=last_tables_on_exit_hooks(legacy.tables()))
    # Legacy TRACE lines join a packet's nftables path while it is built: every one is built.
    shapes = PathShapes() if legacy is None else None
    builder = PathBuilder(snapshot, keep=keep, idle_seconds=idle_seconds, shapes=shapes, hook_ends=hook_ends,
                          **devices)
    if legacy is None:
        return builder
    return MergedPathBuilder(builder, snapshot, legacy.history)
