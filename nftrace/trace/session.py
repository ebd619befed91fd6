"""`nftrace why`: put trace rules in, read events while traffic flows, take the rules out.

Everything that changes the kernel is undone by an UndoStack (signals.py), and SIGTERM/SIGHUP
end a run as Ctrl-C does, through it; a second signal never cuts the undoing short, and a
failing undo step never hides the error that ended the run. SIGKILL is covered by the trace
table's `flags owner`. The optional bpftrace that
reports kernel drops (drops/bpftrace.py) is stopped the same way, and dies with nftrace on SIGKILL.
"""

from __future__ import annotations

import select
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from ..iptables.backends import BackendPlan, LegacyTracing, make_path_builder, plan_backend
from ..errors import EnvironmentProblem, KernelError, TraceTableGone
from .events import TraceEvent
from ..flow import Flow
from ..drops.bpftrace import DropReasonsUnavailable, KernelDropWatcher, start_drop_watcher
from ..drops.correlator import DropCorrelator
from ..iptables.legacy import legacy_tables
from ..kernel import runner
from ..kernel.monitor import EventsLost, MonitorItem, RulesetChanged, TableDeleted, TraceMonitor
from ..kernel.nft import NftContext
from .nearmiss_live import LiveRuleBook, NearMissAnnotator, nft_lister
from .paths import PacketPath, PacketPathBuilder
from ..kernel.rcvbuf import loss_warning, receive_buffer_size
from .report import TraceReport
from .ruleset import RulesetSnapshot
from ..signals import Interrupted, SignalsAsExceptions, UndoStack
from ..kernel.system import enter_namespace, interface_index, interface_links, interface_names, require_net_admin
from ..kernel.tracetable import DEFAULT_MAX_RATE, TraceTable, nat_hooks, remove_leftover_tables
from ..iptables.xtnft import IptablesNftText

COMMAND_GRACE_SECONDS = 0.5
POLL_SECONDS = 0.2


@dataclass
class TraceOptions:
    flow: Flow
    netns: Optional[str] = None
    count: int = 10
    timeout: float = 60.0
    max_rate: int = DEFAULT_MAX_RATE
    command: list = field(default_factory=list)
    idle_seconds: float = 2.0
    rcvbuf: Optional[int] = None  # None: sized from max_rate, or NFTRACE_RCVBUF (rcvbuf.py)
    drop_reasons: bool = True  # watch the kernel's drops of traced packets (bpftrace), if it can
    backend: str = "auto"  # auto | nft | iptables (see backends.py)
    counted: bool = False  # count matched and traced packets in the trace table (`drops`)
    near_misses: bool = True  # explain each answer with its near misses (a dry run's helpers may not need them)


def prepare_namespace(options: TraceOptions) -> None:
    """Checks that need no kernel change, in the order a user would fix them."""
    require_net_admin()
    if options.netns:
        enter_namespace(options.netns)
    for name, option in ((options.flow.iif, "--iif"), (options.flow.oif, "--oif")):
        if name:
            interface_index(name, option)


def open_nftables() -> NftContext:
    nft = NftContext()
    try:
        nft.run("list chains")  # not `list tables`: nft 1.0.6 fetches the whole ruleset for that
    except KernelError as err:
        raise EnvironmentProblem(f"nf_tables is not available in this kernel or namespace ({err})") from None
    return nft


@dataclass
class _Run:
    """What one run of `TraceSession.run` set up, and what its loop reads and feeds."""

    nft: Optional[NftContext]
    snapshot: Optional[RulesetSnapshot]
    monitor: Optional[TraceMonitor]
    table: Optional[TraceTable]
    legacy: Optional[LegacyTracing]
    builder: PacketPathBuilder
    on_packet: Callable[[PacketPath], None]
    on_batch: Optional[Callable[[], None]]
    deadline: Optional[float]  # --timeout, on the monotonic clock


class TraceSession:
    """One live trace. `run(on_packet)` calls `on_packet` for each packet of the flow."""

    def __init__(self, options: TraceOptions, report: TraceReport):
        self.options = options
        self.report = report
        self.packets_seen = 0
        self._process: Optional[subprocess.Popen] = None
        self._drops: Optional[KernelDropWatcher] = None
        self._correlator: Optional[DropCorrelator] = None
        self._iptables_nft: Optional[IptablesNftText] = None
        self._near_misses: Optional[NearMissAnnotator] = None
        self._table: Optional[TraceTable] = None

    def _finishing(self, table: Optional[TraceTable]) -> None:
        """Called once the trace is over, while the trace table is still in (for its counters)."""

    def run(self, on_packet: Callable[[PacketPath], None], on_ready: Callable[[], None] = lambda: None,
            on_batch: Optional[Callable[[], None]] = None) -> None:
        """`on_batch` is called after each batch of events read: the moment to flush output."""
        options = self.options
        rcvbuf = options.rcvbuf or receive_buffer_size(options.max_rate)
        with SignalsAsExceptions():
            prepare_namespace(options)
            nft, plan = self._plan()
            self.report.backend = plan.name
            self.report.interfaces = interface_names()
            with UndoStack() as undo:
                snapshot = monitor = table = legacy = None
                if plan.nft:
                    # Tables only until the trace rules are in: a full listing of a big ruleset takes
                    # long, and it is taken once they are in anyway.
                    snapshot = RulesetSnapshot.take_tables(nft)
                    removed = remove_leftover_tables(nft, snapshot)
                    if removed:
                        self.report.warnings.append(f"removed trace tables left by killed nftrace runs: {', '.join(removed)}")
                    monitor = undo.enter_context(TraceMonitor(rcvbuf))
                drops = undo.enter_context(self._drop_watcher())
                if plan.legacy:
                    # Listening before anything sets the trace bit: no TRACE line is missed.
                    legacy = undo.enter_context(LegacyTracing(plan, options.flow, options.max_rate, self.report.warnings))
                if plan.nft:
                    table = undo.enter_context(TraceTable(nft, options.flow, options.max_rate, counted=options.counted))
                    self._table = table
                    if table.owner_warning:
                        self.report.warnings.append(table.owner_warning)
                    monitor.watch_ruleset()
                    snapshot.refresh_from(nft)
                    if snapshot.ingress_devices():
                        table.mark_ingress(snapshot.ingress_devices())
                    devices = self._follow_devices(table, snapshot)
                    table.observe(nat_hooks(snapshot, legacy_nat=self._legacy_nat(legacy)))
                    self._iptables_nft = IptablesNftText.read(snapshot)
                builder = make_path_builder(plan, snapshot, legacy, self._keep, options.idle_seconds,
                                            **(devices if plan.nft else {}))
                if options.near_misses:
                    self._near_misses = self._near_miss_annotator(nft if plan.nft else None, snapshot, plan)
                deadline = time.monotonic() + options.timeout if options.timeout else None
                run = _Run(nft, snapshot, monitor, table, legacy, builder, on_packet, on_batch, deadline)
                try:
                    self._await_drop_watcher(drops)
                    on_ready()
                    self._start_command()
                    self._loop(run)
                finally:
                    self._stop_command()
                    self._finishing(table)
                    self.report.lost_events = ((monitor.dropped_messages() or monitor.overruns) if monitor else 0) + (
                        legacy.lost_messages() if legacy else 0)
                    if self.report.lost_events:
                        self.report.warnings.append(loss_warning(self.report.lost_events, rcvbuf, options.max_rate))
                    if self._correlator is not None:
                        self.report.warnings.extend(self._correlator.notes)
                    if builder.unmatched_lines:
                        self.report.warnings.append(f"{builder.unmatched_lines} legacy TRACE lines belonged to no "
                                                    "packet of this run (packets traced by someone else's TRACE rules?)")

    def _follow_devices(self, table: TraceTable, snapshot: RulesetSnapshot) -> dict:
        """Bridged frames and egress chains: mark and observe them where the namespace has
        them; the path builder needs their interfaces' indexes. Bridges are followed where
        the ruleset has bridge chains: without, a bridged frame meets no chain of its own
        (br_netfilter's IP hooks mark and trace it as any packet)."""
        links = interface_links()
        bridges = frozenset(link.index for link in links if link.kind == "bridge") \
            if snapshot.has_base_chains("bridge") else frozenset()
        if bridges:
            try:
                table.mark_bridges()
            except KernelError as err:
                bridges = frozenset()
                self.report.warnings.append(f"bridged frames are not traced: the kernel has no nftables bridge "
                                            f"family ({err})")
        egress = snapshot.egress_devices()
        table.mark_egress(egress)
        return {"bridges": bridges,
                "egress": frozenset(link.index for link in links if link.name in egress)}

    def _plan(self) -> tuple[Optional[NftContext], BackendPlan]:
        """nftables where it works and is wanted; legacy tables of the flow's family where they exist."""
        choice = self.options.backend
        nft, problem = None, None
        if choice != "iptables":
            try:
                nft = open_nftables()
            except EnvironmentProblem as err:
                problem = str(err)
        plan = plan_backend(choice, self.options.flow, problem, legacy_tables(self.options.flow.nft_family),
                            self.report.warnings)
        return nft, plan

    @staticmethod
    def _legacy_nat(legacy: Optional[LegacyTracing]) -> bool:
        return legacy is not None and "nat" in legacy.tables()

    def _near_miss_annotator(self, nft, snapshot, plan: BackendPlan) -> NearMissAnnotator:
        """Near misses read the ruleset when the first answer needs them, never before."""

        def nft_text(family, table, chain, handle):
            rule = snapshot.rule(family, table, chain, handle) if snapshot is not None else None
            return rule.text if rule is not None and not rule.deleted else None

        def iptables_form(family, table, chain, number):
            return self._iptables_nft.text(family, table, chain, number) if self._iptables_nft is not None else None

        source = LiveRuleBook(nft_lister() if nft is not None else None, nft_text, iptables_form,
                              (plan.legacy,) if plan.legacy else ())
        return NearMissAnnotator(source, self.report.interfaces, self.report.warnings.append)

    def _drop_watcher(self):
        """bpftrace on the kernel's drops, started now so that its startup overlaps the setup;
        without it (not installed, no BTF, --no-drop-reasons) the trace goes on after one warning."""
        if not self.options.drop_reasons:
            return nullcontext()
        watcher = start_drop_watcher(self.report.warnings.append)
        return watcher if watcher is not None else nullcontext()

    def _await_drop_watcher(self, watcher: Optional[KernelDropWatcher]) -> None:
        """Traffic starts only once bpftrace watches, so that no drop of it goes unseen."""
        if watcher is None:
            return
        try:
            watcher.wait_ready()
        except DropReasonsUnavailable as err:
            watcher.close()
            self.report.warnings.append(f"kernel drop reasons unavailable: {err}")
            return
        self._drops = watcher
        self._correlator = DropCorrelator(interfaces=self.report.interfaces)

    def _read_drops(self) -> list:
        """Drop lines available now; must be read before the netlink socket is drained (see drops/correlator.py)."""
        watcher = self._drops
        if watcher is None:
            return []
        drops = watcher.read()
        if watcher.ended:
            watcher.close()
            self.report.warnings.append(f"kernel drop reasons unavailable from here on: {watcher.failure()}")
            self._drops = None
        return drops

    def _keep(self, path: PacketPath) -> bool:
        packet = path.first_packet
        return self.options.flow.matches(packet.src, packet.dst, packet.proto, packet.sport, packet.dport)

    def _wanted(self, path: PacketPath) -> bool:
        """--oif cannot be matched where the packet is marked (before routing): filter here."""
        oif = self.options.flow.oif
        if not oif:
            return True
        return self.report.interfaces.get(path.interface_index("oif") or -1) == oif

    def _start_command(self) -> None:
        if not self.options.command:
            return
        # The command's output goes to stderr, so that stdout stays nftrace's (and valid JSON).
        self._process = runner.start(self.options.command, stdout=sys.stderr.fileno(), stderr=None, user_command=True)

    def _stop_command(self) -> None:
        if self._process is not None:
            runner.stop(self._process)

    def _deliver(self, run: "_Run", paths: list, held: bool = False) -> None:
        """Hand finished paths to the caller, up to --count; a path netfilter accepted waits
        (held by the correlator) for a kernel drop that would change its answer."""
        if not paths:
            return  # most events finish no packet: nothing to hold, nothing to release
        correlator = self._correlator
        if correlator is not None and not held:
            paths = correlator.hold(paths, time.monotonic())
        count = self.options.count
        for path in paths:
            if not self._wanted(path) or (count and self.packets_seen >= count):
                continue
            if self._iptables_nft is not None:
                self._iptables_nft.annotate(path)
            if self._near_misses is not None:
                self._near_misses.annotate(path)
            self.packets_seen += 1
            run.on_packet(path)

    def _loop(self, run: "_Run") -> None:
        correlator = self._correlator
        try:
            self._follow(run)
        except (KeyboardInterrupt, Interrupted):
            # What happened up to now is still answered: events already queued on the socket,
            # and answers complete but held (for a late kernel drop, or for their way back in
            # through loopback); then the interruption goes on.
            if run.monitor is not None:
                self._dispatch(run, run.monitor.read(limit=None), stopping=True)
            if run.legacy is not None:
                self._deliver(run, run.builder.feed_legacy(run.legacy.read(), time.monotonic()))
            if correlator is not None:
                correlator.add_drops(self._read_drops())
                self._deliver(run, run.builder.close_vanished(correlator.vanished))
                self._deliver(run, correlator.release(time.monotonic(), everything=True), held=True)
            self._deliver(run, run.builder.release_looped(), held=True)
            raise
        self._deliver(run, run.builder.flush())
        if correlator is not None:
            self._deliver(run, correlator.release(time.monotonic(), everything=True), held=True)

    def _dispatch(self, run: "_Run", items: Iterable[MonitorItem], stopping: bool = False) -> bool:
        """Feed what the monitor read to the path builder; True once --count packets are out.

        `stopping`: the run is being interrupted: only what was queued is answered (no new
        ruleset snapshot, and a deleted table no longer stops anything).
        """
        count, builder = self.options.count, run.builder
        for item in items:
            if isinstance(item, TraceEvent):
                self._deliver(run, builder.feed(item, time.monotonic()))
                if not stopping and count and self.packets_seen >= count:
                    return True
            elif isinstance(item, EventsLost):
                builder.mark_loss()
            elif stopping:
                continue
            elif isinstance(item, RulesetChanged):
                run.snapshot.refresh_from(run.nft)
                self._iptables_nft = IptablesNftText.read(run.snapshot)
                run.table.observe(nat_hooks(run.snapshot, legacy_nat=self._legacy_nat(run.legacy)))
                if self._near_misses is not None:
                    self._near_misses.invalidate()
            elif isinstance(item, TableDeleted) and item.name == run.table.name:
                run.table.forget()
                raise TraceTableGone(f"nftrace's table inet {run.table.name} was deleted by someone else; stopping")
        return False

    def _follow(self, run: "_Run") -> None:
        """Read events until --count, --timeout, or the traffic command is done and settled."""
        options, correlator = self.options, self._correlator
        monitor, legacy, builder, deadline = run.monitor, run.legacy, run.builder, run.deadline
        command_done_at = None
        while True:
            now = time.monotonic()
            if options.count and self.packets_seen >= options.count:
                return
            if deadline is not None and now >= deadline:
                return
            if self._process is not None and command_done_at is None and self._process.poll() is not None:
                command_done_at = now
            # A backlog still in the socket belongs to the command's packets: read it all first.
            if command_done_at is not None and now - command_done_at >= COMMAND_GRACE_SECONDS \
                    and (monitor is None or monitor.drained):
                settled = builder.open_packets == 0 and not (correlator and correlator.holding)
                if settled or now - command_done_at >= options.idle_seconds + COMMAND_GRACE_SECONDS:
                    return
            wait = POLL_SECONDS if deadline is None else min(POLL_SECONDS, deadline - now)
            readable = self._wait([source for source in (monitor, legacy) if source is not None], wait)
            drops = self._read_drops()
            if monitor is not None and (monitor in readable or drops):
                if self._dispatch(run, monitor.read()):
                    return
                if monitor.drained:  # reads come in batches: a backlog may still be queued
                    builder.socket_drained()
            if legacy is not None and (readable or drops):
                # Read after the trace events: the TRACE lines written before them are all here.
                self._deliver(run, builder.feed_legacy(legacy.read(), time.monotonic()))
            if correlator is not None and drops:
                correlator.add_drops(drops)
                self._deliver(run, builder.close_vanished(correlator.vanished))
            self._deliver(run, builder.expire(time.monotonic()))
            if correlator is not None:
                self._deliver(run, correlator.release(time.monotonic()), held=True)
            if run.on_batch is not None:
                run.on_batch()

    def _wait(self, sources: list, timeout: float) -> list:
        """Wait for trace events, TRACE lines or kernel drops."""
        sources = sources if self._drops is None else sources + [self._drops]
        readable, _, _ = select.select(sources, [], [], max(0.0, timeout))
        return readable
