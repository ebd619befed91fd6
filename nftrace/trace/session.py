"""`nftrace why`: put trace rules in, read events while traffic flows, take the rules out.

Everything that changes the kernel is undone by an UndoStack (signals.py), and SIGTERM/SIGHUP
end a run as Ctrl-C does, through it; a second signal never cuts the undoing short, and a
failing undo step never hides the error that ended the run. SIGKILL is covered by the trace
table's `flags owner`. The watcher of kernel drops (drops/dropwatch.py: an eBPF program, held
by file descriptors that die with nftrace; or a bpftrace process) is stopped the same way, and
goes with nftrace on SIGKILL.
"""

from __future__ import annotations

import select
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Optional

from ..iptables.backends import BackendPlan, LegacyTracing, SilencedTraceLines, make_path_builder, plan_backend
from ..errors import EnvironmentProblem, KernelError, TraceTableGone
from .events import TraceEvent
from ..flow import Flow, one_address
from ..drops.bpftrace import DropReasonsUnavailable, KernelDropWatcher
from ..drops.dropwatch import start_drop_watcher
from ..drops.correlator import DropCorrelator
from ..drops.routing import (RouteQuestions, explain_reverse_check, explain_unanswered, explain_unsent,
                             reverse_path_check)
from ..iptables.legacy import legacy_tables
from ..kernel import runner
from ..kernel.monitor import (READ_BATCH, EventsLost, MonitorItem, ReadEarlier, RulesetChanged, TableDeleted,
                              TraceMonitor)
from ..kernel.nft import NftContext
from .nearmiss_live import LiveRuleBook, NearMissAnnotator, nft_lister
from .collection import CollectionBetweenReads
from .crossing import CrossingJoiner, assign_namespace
from .parts import NamespacePart
from .paths import PacketPath, PathBuilder
from .shapes import PathShapes
from ..kernel.netlink import require_pyroute2
from ..kernel.rcvbuf import loss_warning, receive_buffer_size
from .report import TraceReport
from .ruleset import RulesetSnapshot
from ..signals import Interrupted, SignalsAsExceptions, UndoStack, raise_if_stopped, stop_signal
from ..kernel.netns import NamespaceRequest
from ..kernel.nsexec import NamespaceCaller
from ..kernel.system import enter_namespace_fd, interface_index, interface_links, interface_names, require_net_admin
from ..kernel.tracetable import DEFAULT_MAX_RATE, TraceTable, nat_hooks, remove_leftover_tables
from ..iptables.xtnft import IptablesNftText

COMMAND_GRACE_SECONDS = 0.5
POLL_SECONDS = 0.2
# Rounds of reading start at most this often while nftrace keeps up (see _follow).
ROUND_SECONDS = 0.01


@dataclass
class TraceOptions:
    flow: Flow
    netns: Optional[str] = None  # one namespace by name (a dry run's sandbox); see `namespaces`
    count: int = 10
    timeout: float = 60.0
    max_rate: int = DEFAULT_MAX_RATE
    command: list = field(default_factory=list)
    idle_seconds: float = 2.0
    rcvbuf: Optional[int] = None  # None: sized from max_rate, or NFTRACE_RCVBUF (rcvbuf.py)
    drop_reasons: bool = True  # watch the kernel's drops of traced packets (drops/dropwatch.py), if it can
    backend: str = "auto"  # auto | nft | iptables (see backends.py)
    counted: bool = False  # count matched and traced packets in the trace table (`drops`)
    near_misses: bool = True  # explain each answer with its near misses (a dry run's helpers may not need them)
    # The namespaces to trace (--netns, --pid, --container, --all-netns); None: `netns`, or
    # the one nftrace runs in. The first is where the traffic command runs.
    namespaces: Optional[NamespaceRequest] = None

    def request(self) -> NamespaceRequest:
        if self.namespaces is not None:
            return self.namespaces
        return NamespaceRequest(netns=(self.netns,) if self.netns else ())


def check_interfaces(flow: Flow) -> None:
    """--iif and --oif name interfaces of the (first) namespace traced."""
    for name, option in ((flow.iif, "--iif"), (flow.oif, "--oif")):
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

    parts: list  # NamespacePart, the first one nftrace's own thread is in
    legacy: Optional[LegacyTracing]
    joiner: Optional[CrossingJoiner]  # a trace across several namespaces: joins each packet's parts
    on_packet: Callable[[PacketPath], None]
    on_batch: Optional[Callable[[], None]]
    deadline: Optional[float]  # --timeout, on the monotonic clock, from when tracing is ready
    collection: CollectionBetweenReads = field(default_factory=CollectionBetweenReads)

    @property
    def primary(self) -> NamespacePart:
        return self.parts[0]

    @property
    def live(self) -> list:
        return [part for part in self.parts if not part.ended]

    def part(self, label: Optional[str]) -> NamespacePart:
        parts = self.parts
        if len(parts) == 1:
            return parts[0]
        return next((part for part in parts if part.label == label), parts[0])


def _routes():
    """kernel/routes.py, imported when routing is first asked about: it imports pyroute2, whose
    package costs a run a tenth of a second before its trace rules go in (kernel/netlink.py)."""
    from ..kernel import routes

    return routes


def _routing_facts(*args, **kwargs):
    return _routes().routing_facts(*args, **kwargs)


class TraceSession:
    """One live trace. `run(on_packet)` calls `on_packet` for each packet of the flow."""

    # Its packets may leave through an unobserved postrouting (kernel/tracetable.hook_ends).
    exit_unobserved = True

    def __init__(self, options: TraceOptions, report: TraceReport, drop_watcher: Optional[KernelDropWatcher] = None):
        """`drop_watcher`: a watcher of the traced namespace that the caller started and keeps
        running across several sessions (bpftrace takes seconds to start): this session uses
        it, and leaves it running."""
        self.options = options
        self.report = report
        self.packets_seen = 0
        self.packets_accepted = 0  # of those, let through with no kernel drop seen
        self._reverse_check: Optional[tuple] = None  # (check, path): the first packet a reverse-path check dropped
        self._process: Optional[subprocess.Popen] = None
        self._shared_drops = drop_watcher
        self._drops: Optional[KernelDropWatcher] = None
        self._correlator: Optional[DropCorrelator] = None
        self._table: Optional[TraceTable] = None  # the first namespace's

    def _finishing(self, table: Optional[TraceTable]) -> None:
        """Called once the trace is over, while the trace table is still in (for its counters)."""

    def run(self, on_packet: Callable[[PacketPath], None], on_ready: Callable[[], None] = lambda: None,
            on_batch: Optional[Callable[[], None]] = None) -> None:
        """`on_batch` is called after each batch of events read: the moment to flush output."""
        options = self.options
        rcvbuf = options.rcvbuf or receive_buffer_size(options.max_rate)
        with SignalsAsExceptions():
            require_net_admin()
            require_pyroute2()
            with UndoStack() as undo:
                parts = self._enter_namespaces(undo)
                primary = parts[0]
                check_interfaces(options.flow)
                nft, plan = self._plan()
                if len(parts) > 1 and not plan.nft:
                    raise EnvironmentProblem("a trace across several namespaces needs nf_tables in each "
                                             "(--backend iptables traces one namespace)")
                self.report.backend = plan.name
                self.report.interfaces = primary.interfaces = interface_names()
                primary.nft = nft
                for part in parts[1:]:
                    part.nft = part.inside(self._open_nftables_in(part))
                    part.interfaces = part.call(interface_names)
                if plan.nft:
                    for part in parts:
                        self._listen(part, undo, rcvbuf, counted=self.options.drop_reasons and len(parts) == 1)
                legacy = None
                if plan.silenced:
                    undo.enter_context(SilencedTraceLines(plan.silenced, self.report.warnings))
                if plan.legacy:
                    # Listening before anything sets the trace bit: no TRACE line is missed.
                    legacy = undo.enter_context(LegacyTracing(plan, options.flow, options.max_rate, self.report.warnings))
                for part in parts:
                    if plan.nft:
                        self._mark(part, undo, relaxed=len(parts) > 1, legacy=legacy is not None)
                    self._build(part, plan, legacy, several=len(parts) > 1)
                # After the trace rules, which go in first (their start-up time is the one an
                # admin waits for); nftrace's own watcher is attached at once, bpftrace (where
                # it is the watcher) is waited for below.
                drops = undo.enter_context(self._drop_watcher())
                joiner = CrossingJoiner(self._keep, {part.label: part.snapshot for part in parts}) \
                    if len(parts) > 1 else None
                run = _Run(parts, legacy, joiner, on_packet, on_batch, deadline=None)
                try:
                    run.collection.start()
                    self._await_drop_watcher(drops)
                    if self._correlator is not None and joiner is None:
                        # A packet read late waits for its kernel drop from when it was queued
                        # (a joined packet's parts were queued on several sockets: from its reading).
                        for part in parts:
                            if part.monitor is not None:
                                part.monitor.time_queue()
                    # --timeout (drops: --duration) counts from here, where nftrace says it is
                    # tracing and the traffic command starts, not from before bpftrace's start
                    # (half a second), which took that much from the time asked for.
                    run.deadline = time.monotonic() + options.timeout if options.timeout else None
                    on_ready()
                    self._start_command()
                    self._loop(run)
                    if not self.packets_seen:
                        self._explain_unseen()
                    else:
                        self._explain_answers()
                finally:
                    run.collection.stop()
                    self._stop_command()
                    self._finishing(primary.table)
                    self.report.lost_events = sum((part.monitor.dropped_messages() or part.monitor.overruns)
                                                  for part in parts if part.monitor is not None) + (
                        legacy.lost_messages() if legacy else 0)
                    if self.report.lost_events:
                        self.report.warnings.append(loss_warning(self.report.lost_events, rcvbuf, options.max_rate))
                    if self._correlator is not None:
                        self.report.warnings.extend(self._correlator.notes)
                    unrecorded = self._drops.lost if self._drops is not None else 0
                    if unrecorded:
                        self.report.warnings.append(f"{unrecorded:,} kernel drops of traced packets were not recorded "
                                                    "(nftrace fell behind reading them): those packets show no "
                                                    "kernel drop")
                    if legacy is not None:
                        self.report.warnings.extend(legacy.notes())
                    if primary.builder.unmatched_lines:
                        self.report.warnings.append(f"{primary.builder.unmatched_lines} legacy TRACE lines belonged "
                                                    "to no packet of this run (packets traced by another nftrace "
                                                    "run, such as a `drops`, or by someone else's TRACE rules?)")

    # -- setting up, one namespace at a time --------------------------------------------------

    def _enter_namespaces(self, undo: UndoStack) -> list:
        """Open every namespace asked for; enter the first (the traffic command runs there);
        give each other one a thread that lives in it. Nothing is changed yet."""
        request = self.options.request()
        targets = request.resolve()
        undo.callback(targets.close)
        self.report.warnings.extend(targets.notes)
        first = targets.targets[0]
        enter_namespace_fd(first.fd, first.shown)
        parts = [NamespacePart(first.label, first)]
        for target in targets.targets[1:]:
            caller = NamespaceCaller(target.fd, target.shown)
            undo.callback(caller.close)  # after everything done through it is undone
            parts.append(NamespacePart(target.label, target, caller))
        if self.options.namespaces is not None:
            # Named by the user (a dry run names its sandbox, and keeps its answer's names).
            self.report.netns = parts[0].label
            self.report.namespaces = [part.label for part in parts]
        return parts

    @staticmethod
    def _open_nftables_in(part: NamespacePart) -> NftContext:
        try:
            return part.call(open_nftables)
        except EnvironmentProblem as err:
            raise EnvironmentProblem(f"{part.shown}: {err}") from None

    def _listen(self, part: NamespacePart, undo: UndoStack, rcvbuf: int, counted: bool) -> None:
        """The part's trace-event socket, open before its trace rules go in; `counted` where
        kernel drops may be paired with its packets (see the use of time_queue below)."""
        # Tables only until the trace rules are in: a full listing of a big ruleset takes
        # long, and it is taken once they are in anyway.
        part.snapshot = RulesetSnapshot.take_tables(part.nft)
        removed = remove_leftover_tables(part.nft, part.snapshot)
        if removed:
            where = f" in {part.shown}" if part.caller is not None or len(self.report.namespaces) > 1 else ""
            self.report.warnings.append(f"removed trace tables left by killed nftrace runs{where}: {', '.join(removed)}")
        part.monitor = undo.enter_context(part.call(TraceMonitor, rcvbuf, counted))

    def _mark(self, part: NamespacePart, undo: UndoStack, relaxed: bool, legacy: bool = False) -> None:
        """The part's trace rules; its snapshot, now with them in. --iif and --oif name interfaces
        of the first namespace: the others' rules do without; so do their conntrack chains,
        there for the legacy tables (`legacy`) that only the first namespace's trace follows."""
        flow = self.options.flow if part.caller is None else replace(self.options.flow, iif=None, oif=None)
        part.table = undo.enter_context(TraceTable(part.nft, flow, self.options.max_rate, counted=self.options.counted,
                                                   relaxed=relaxed, conntrack=legacy and part.caller is None))
        if part.caller is None:
            self._table = part.table
        if part.table.owner_warning:
            self.report.warnings.append(part.table.owner_warning)
        part.monitor.watch_ruleset()
        # In the part's namespace: the anonymous chains' names are read over a netlink socket.
        part.call(part.snapshot.refresh_from, part.nft)
        if part.snapshot.ingress_devices():
            part.table.mark_ingress(part.snapshot.ingress_devices())

    def _build(self, part: NamespacePart, plan: BackendPlan, legacy: Optional[LegacyTracing], several: bool) -> None:
        keep = self._keep_either_end if several else self._keep
        if part.caller is None:
            devices = self._follow_devices(part) if plan.nft else {}
            ends = None
            if plan.nft:
                part.table.observe(nat_hooks(part.snapshot, legacy_nat=self._legacy_nat(legacy)))
                part.exit_unobserved = self.exit_unobserved and not several and legacy is None \
                    and not devices["bridges"]
                ends = self._observe_exit(part)
            part.iptables_nft = IptablesNftText.read(part.snapshot) if plan.nft else None
            part.builder = make_path_builder(plan, part.snapshot, legacy, keep, self.options.idle_seconds,
                                             hook_ends=ends, **devices)
        else:
            devices = self._follow_devices(part)
            part.table.observe(nat_hooks(part.snapshot))
            part.iptables_nft = part.call(IptablesNftText.read, part.snapshot)
            part.builder = PathBuilder(part.snapshot, keep=keep, idle_seconds=self.options.idle_seconds,
                                       shapes=PathShapes(), **devices)
            if part.call(legacy_tables, self.options.flow.nft_family):
                self.report.warnings.append(f"legacy iptables tables of {part.shown} are not traced: a trace across "
                                            "namespaces follows nftables (iptables-nft included) in each")
        if self.options.near_misses:
            part.near_misses = self._near_miss_annotator(part, plan if part.caller is None else None)

    @staticmethod
    def _observe_exit(part: NamespacePart) -> Optional[dict]:
        """Whether the part's table observes IP postrouting (see TraceTable.observe_exit); the
        path builder's `hook_ends`. A trace across namespaces, legacy tables (now or read from
        /proc again after a change), bridges and egress chains keep it observed."""
        allowed = part.exit_unobserved and not part.snapshot.egress_devices() \
            and not any(legacy_tables(family) for family in ("ip", "ip6"))
        return part.table.observe_exit(part.snapshot, allowed)

    def _follow_devices(self, part: NamespacePart) -> dict:
        """Bridged frames and egress chains: mark and observe them where the namespace has
        them; the path builder needs their interfaces' indexes, and whether the bridge hooks
        after IP postrouting hold chains of the ruleset."""
        table, snapshot = part.table, part.snapshot
        links = part.call(interface_links)
        bridges = frozenset(link.index for link in links if link.kind == "bridge")
        if bridges:
            try:
                table.mark_bridges()
            except KernelError as err:
                bridges = frozenset()
                self.report.warnings.append(f"bridged frames are not traced: the kernel has no nftables bridge "
                                            f"family ({err})")
        egress = snapshot.egress_devices()
        table.mark_egress(egress)
        return {"bridges": bridges, "bridge_out": snapshot.has_base_chains("bridge", ("output", "postrouting")),
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

    def _near_miss_annotator(self, part: NamespacePart, plan: Optional[BackendPlan]) -> NearMissAnnotator:
        """Near misses read the ruleset when the first answer needs them, never before."""
        snapshot = part.snapshot
        nft = part.nft if plan is None or plan.nft else None

        def nft_text(family, table, chain, handle):
            rule = snapshot.rule(family, table, chain, handle) if snapshot is not None else None
            return rule.text if rule is not None and not rule.deleted else None

        def iptables_form(family, table, chain, number):
            return part.iptables_nft.text(family, table, chain, number) if part.iptables_nft is not None else None

        legacy = (plan.legacy,) if plan is not None and plan.legacy else ()
        # The lister is a command: made in the part's namespace (part.call) when it answers.
        source = LiveRuleBook(nft_lister() if nft is not None else None, nft_text, iptables_form, legacy)
        return NearMissAnnotator(source, part.interfaces, self.report.warnings.append)

    @staticmethod
    def _legacy_nat(legacy: Optional[LegacyTracing]) -> bool:
        return legacy is not None and "nat" in legacy.tables()

    def _explain_unseen(self) -> None:
        """No packet of the flow was seen. Where this namespace sends the flow itself, routing
        may have refused to: the sender got the error, and netfilter saw no packet."""
        flow = self.options.flow
        src, dst = one_address(flow.src), one_address(flow.dst)
        if flow.iif or src is None or dst is None:
            return
        try:
            facts = _routes().sending_facts(src, dst)
        except OSError:
            return
        words = explain_unsent(facts) if facts is not None else None
        if words:
            self.report.warnings.append(words)

    def _explain_answers(self) -> None:
        """What the answers leave open and the namespace's routing can tell, said once."""
        if self.packets_accepted:
            self._check_next_hop()
        if self._reverse_check is not None:
            self._explain_reverse_check(*self._reverse_check)

    def _note_answer(self, path: PacketPath) -> None:
        """Keep what _explain_answers needs of the answers: the first packet that a rule's
        reverse-path check dropped."""
        if self._reverse_check is None and (check := reverse_path_check(path)):
            self._reverse_check = (check, path)

    def _explain_reverse_check(self, check: str, path: PacketPath) -> None:
        """A packet dropped by a rule's reverse-path check (or for want of one passing): which
        route back the check found, the one thing the rule's text cannot say."""
        headers = path.first_packet
        if headers is None or headers.src is None:
            return
        try:
            back = _routes().route_back(headers.src, path.mark if " mark " in check else None)
        except OSError:
            return
        iif = (path.interfaces or self.report.interfaces).get(path.interface_index("iif") or -1)
        words = explain_reverse_check(check, back, headers.src, iif)
        if words:
            self.report.warnings.append(words)

    def _check_next_hop(self) -> None:
        """Packets of the flow were let through. Where the next hop toward its destination has
        not answered ARP, the kernel drops them seconds later (NEIGH_FAILED): maybe after the
        run is over, so the answer would read "accepted" alone. Not in a dry run: a sandbox copy
        has the target's routes, not its neighbours."""
        dst = one_address(self.options.flow.dst)
        if self.report.dry_run is not None or dst is None:
            return
        try:
            unanswered = _routes().unanswered_next_hop(dst)
        except OSError:
            return
        if unanswered is not None:
            hop, oif, state = unanswered
            self.report.warnings.append(explain_unanswered(hop, self.report.interfaces.get(oif), state))

    def _drop_watcher(self):
        """The kernel's drops watched (drops/dropwatch.py), from now; without a watcher (no eBPF,
        no bpftrace, no BTF, --no-drop-reasons) the trace goes on after one warning."""
        if not self.options.drop_reasons:
            return nullcontext()
        if self._shared_drops is not None:
            return nullcontext(self._shared_drops)
        watcher = start_drop_watcher(self.report.warnings.append)
        return watcher if watcher is not None else nullcontext()

    def _await_drop_watcher(self, watcher: Optional[KernelDropWatcher]) -> None:
        """Traffic starts only once the kernel's drops are watched, so that no drop of it goes unseen."""
        if watcher is None:
            return
        try:
            watcher.wait_ready()
        except DropReasonsUnavailable as err:
            watcher.close()
            self.report.warnings.append(f"kernel drop reasons unavailable: {err}")
            return
        if watcher is self._shared_drops:
            watcher.read()  # drops of the packets of earlier sessions, not of this one's
        self._drops = watcher
        self._correlator = DropCorrelator(interfaces=self.report.interfaces, routing=RouteQuestions(_routing_facts))

    def _read_drops(self, everything: bool = False) -> list:
        """Drop lines available now; must be read before the netlink socket is drained (see
        drops/correlator.py). No more than the correlator has room for: under a backlog, the
        rest wait in the watcher's ring until their packets are read (`everything`: the run
        ends, every trace event has been read)."""
        watcher = self._drops
        if watcher is None:
            return []
        correlator = self._correlator
        if correlator is not None and not correlator.room:
            correlator.forget_stale()
        limit = None if correlator is None or everything else correlator.room
        started = time.monotonic()
        drops = watcher.read(limit)
        if correlator is not None:
            # Every drop made before the read started is in hand, unless the read stopped at the
            # limit: then those up to the last one read.
            if limit is None or len(drops) != limit:
                correlator.note_drops_read(started)
            elif drops:
                correlator.note_drops_read(drops[-1].time)
        if watcher.ended:
            watcher.close()
            self.report.warnings.append(f"kernel drop reasons unavailable from here on: {watcher.failure()}")
            self._drops = None
        return drops

    def _keep(self, path: PacketPath) -> bool:
        packet = path.first_packet
        return self.options.flow.matches(packet.src, packet.dst, packet.proto, packet.sport, packet.dport)

    def _keep_either_end(self, path: PacketPath) -> bool:
        """Across namespaces, a packet's part after NAT has one end of the flow rewritten: it is
        built if one end matches, and answered if it continues a packet of the flow (crossing.py)."""
        packet = path.first_packet
        return self.options.flow.matches_an_end(packet.src, packet.dst, packet.proto, packet.sport, packet.dport)

    def _wanted(self, path: PacketPath) -> bool:
        """--oif cannot be matched where the packet is marked (before routing): filter here.
        It names an interface of the first namespace: where the packet left that one."""
        oif = self.options.flow.oif
        if not oif:
            return True
        first = self.report.netns
        parts = [segment for segment in path.segments if segment.netns == first] if path.segments else [path]
        return any(self.report.interfaces.get(part.interface_index("oif") or -1) == oif for part in parts)

    def _start_command(self) -> None:
        if not self.options.command:
            return
        # The command's output goes to stderr, so that stdout stays nftrace's (and valid JSON).
        self._process = runner.start(self.options.command, stdout=sys.stderr.fileno(), stderr=None, user_command=True)

    def _stop_command(self) -> None:
        process = self._process
        if process is None:
            return
        status = process.poll()  # its own end, before nftrace stops it
        runner.stop(process)
        stopped_by = stop_signal()
        if stopped_by is not None and status in (-stopped_by, 128 + stopped_by):
            return  # Ctrl-C on the terminal stopped both: not why no packet was seen
        if status and not self.packets_seen and self.report.mode == "live":  # a dry run's sender says why itself
            # The likeliest reason no packet was seen: said, not left to the command's output.
            ended = f"exited with status {status}" if status > 0 else f"was killed by signal {-status}"
            self.report.warnings.append(f"the traffic command {ended} before any packet of the flow was seen")

    def _finished(self, run: "_Run", part: NamespacePart, paths: list, held: bool = False,
                  queued: tuple = (None, None)) -> None:
        """Paths a part's builder finished: said where they ran, and, across namespaces, joined
        into packets first. `queued`: when their events were queued, at the earliest and at the
        latest (TraceMonitor.queued_after, queued_by), where that is known."""
        if not paths:
            return
        for path in paths:
            assign_namespace(path, part.label)
        if run.joiner is None:
            self._deliver(run, paths, held, queued)
            return
        now = time.monotonic()
        answers = []
        for path in paths:
            path.interfaces = part.interfaces
            answers += run.joiner.add(path, now)
        self._deliver(run, answers, held)

    def _deliver(self, run: "_Run", paths: list, held: bool = False, queued: tuple = (None, None)) -> None:
        """Hand finished paths to the caller, up to --count; a path netfilter accepted waits
        (held by the correlator) for a kernel drop that would change its answer."""
        if not paths:
            return  # most events finish no packet: nothing to hold, nothing to release
        correlator = self._correlator
        if correlator is not None and not held:
            paths = correlator.hold(paths, time.monotonic(), *queued)
        count = self.options.count
        for path in paths:
            if not self._wanted(path) or (count and self.packets_seen >= count):
                continue
            self._annotate(run, path)
            self._note_answer(path)
            self.packets_seen += 1
            if path.complete and path.verdict == "accept" and path.kernel_drop is None:
                self.packets_accepted += 1
            run.on_packet(path)

    @staticmethod
    def _annotate(run: "_Run", path: PacketPath) -> None:
        """iptables-nft forms and near misses, each part of a packet from its own namespace."""
        for segment in path.segments or [path]:
            part = run.part(segment.netns)
            if part.iptables_nft is not None:
                part.iptables_nft.annotate(segment)
            if part.near_misses is not None and not part.ended:
                part.call(part.near_misses.annotate, segment)
        if path.segments:
            path.near_misses = [near_miss for segment in path.segments for near_miss in segment.near_misses]

    def _loop(self, run: "_Run") -> None:
        correlator, primary = self._correlator, run.primary
        try:
            self._follow(run)
        except (KeyboardInterrupt, Interrupted):
            # What happened up to now is still answered: events already queued on the sockets,
            # and answers complete but held (for a late kernel drop, for their way back in
            # through loopback, or for their part in another namespace); then the interruption
            # goes on.
            for part in run.live:
                if part.monitor is not None:
                    self._dispatch(run, part, self._read_events(part, limit=None), stopping=True)
            if run.legacy is not None:
                self._read_legacy(run, stopping=True)
            if correlator is not None:
                drained_at = time.monotonic()
                if all(part.monitor.drained for part in run.live if part.monitor is not None):
                    correlator.note_drained(drained_at)
                correlator.add_drops(self._read_drops(everything=True))
                self._release_for_drops(run)
                self._finished(run, primary, primary.builder.close_vanished(correlator.vanished))
            if run.joiner is not None:
                self._deliver(run, run.joiner.flush())
            if correlator is not None:
                self._deliver(run, correlator.release(time.monotonic(), everything=True), held=True)
            for part in run.live:
                self._finished(run, part, part.builder.release_looped(), held=True)
            if run.joiner is not None:
                self._deliver(run, run.joiner.flush(), held=True)
            if correlator is not None:
                correlator.forget_unpaired()
            raise
        for part in run.live:
            self._finished(run, part, part.builder.flush())
        if run.joiner is not None:
            self._deliver(run, run.joiner.flush())
        if correlator is not None:
            self._deliver(run, correlator.release(time.monotonic(), everything=True), held=True)
            correlator.forget_unpaired()

    def _dispatch(self, run: "_Run", part: NamespacePart, items: Iterable[MonitorItem], stopping: bool = False) -> bool:
        """Feed what a part's monitor read to its path builder; True once --count packets are out.

        `stopping`: the run is being interrupted: only what was queued is answered (no new
        ruleset snapshot, and a deleted table no longer stops anything).
        """
        count, builder = self.options.count, part.builder
        monitor = part.monitor if run.joiner is None else None
        for item in items:
            if isinstance(item, TraceEvent):
                paths = builder.feed(item, time.monotonic())
                if paths:
                    self._finished(run, part, paths, queued=(monitor.queued_after, monitor.queued_by)
                                   if monitor is not None else (None, None))
                if not stopping and count and self.packets_seen >= count:
                    return True
            elif isinstance(item, ReadEarlier):
                for event, when in item.timed():
                    self._finished(run, part, builder.feed(event, when))
            elif isinstance(item, EventsLost):
                builder.mark_loss()
            elif stopping:
                continue
            elif isinstance(item, RulesetChanged):
                builder.forget_shapes()
                part.call(part.snapshot.refresh_from, part.nft)
                part.iptables_nft = part.call(IptablesNftText.read, part.snapshot)
                legacy_nat = self._legacy_nat(run.legacy) if part is run.primary else False
                part.table.observe(nat_hooks(part.snapshot, legacy_nat=legacy_nat))
                if part.exit_unobserved:
                    builder.hook_ends = self._observe_exit(part)
                if part.near_misses is not None:
                    part.near_misses.invalidate()
            elif isinstance(item, TableDeleted) and item.name == part.table.name:
                part.table.forget()
                where = f" in {part.shown}" if len(run.parts) > 1 else ""
                raise TraceTableGone(f"nftrace's table inet {part.table.name}{where} was deleted by someone else; "
                                     "stopping")
        return False

    def _read_legacy(self, run: "_Run", stopping: bool = False) -> bool:
        """Feed the legacy TRACE lines written since the last read; True once --count packets
        are out. Trace events written before these lines (the packet's conntrack chain at
        prerouting, say) may have come after the last read of events, and a legacy DROP closes
        its packet: so they are read first."""
        primary = run.primary
        lines = run.legacy.read()
        if lines and primary.monitor is not None and primary in run.live:
            events = self._read_events(primary, limit=None if stopping else READ_BATCH)
            if self._dispatch(run, primary, events, stopping=stopping):
                return True
        self._finished(run, primary, primary.builder.feed_legacy(lines, time.monotonic()))
        return False

    def _read_events(self, part: NamespacePart, limit: Optional[int] = READ_BATCH) -> Iterable[MonitorItem]:
        """What the part's monitor read now, for its path builder (`drops` holds some back)."""
        return part.monitor.read(limit)

    def _release_for_drops(self, run: "_Run") -> bool:
        """Called once the kernel drops read were paired with what was built: `drops` then
        builds the packets it held back if a drop is left that one of them may explain (True)."""
        return False

    def _end_part(self, run: "_Run", part: NamespacePart) -> None:
        """A namespace went away mid-trace: what was read of it is answered, its trace rules and
        socket go (nftrace's hold on them kept it alive), and the others go on."""
        self.report.warnings.append(f"{part.shown} went away during the trace: its part of the trace ended there")
        if part.monitor is not None:
            self._dispatch(run, part, self._read_events(part, limit=None), stopping=True)
        self._finished(run, part, part.builder.flush())
        part.ended = True
        with UndoStack() as undo:
            if part.caller is not None:
                undo.callback(part.caller.close)
            if part.monitor is not None:
                undo.callback(part.monitor.close)
            if part.table is not None:
                undo.callback(part.table.remove)

    def _follow(self, run: "_Run") -> None:
        """Read events until --count, --timeout, or the traffic command is done and settled."""
        options, correlator, primary, joiner = self.options, self._correlator, run.primary, run.joiner
        legacy, deadline = run.legacy, run.deadline
        command_done_at, round_started, caught_up = None, 0.0, False
        while True:
            raise_if_stopped()
            now = time.monotonic()
            if caught_up and now - round_started < ROUND_SECONDS:
                # Events that trickle in are read a round at a time, not one wake-up each: a
                # round costs system calls (the queue count, the drop ring, the write) whatever
                # it reads, at a few thousand packets a second most of nftrace's CPU. A backlog
                # is read without a pause; an answer comes at most this much later.
                time.sleep(ROUND_SECONDS - (now - round_started))
                raise_if_stopped()
                now = time.monotonic()
            round_started = now
            if options.count and self.packets_seen >= options.count:
                return
            if deadline is not None and now >= deadline:
                return
            for part in run.live:
                if part.gone():
                    self._end_part(run, part)
            if not run.live:
                return
            monitors = [part.monitor for part in run.live if part.monitor is not None]
            if self._process is not None and command_done_at is None and self._process.poll() is not None:
                command_done_at = now
            # A backlog still in the sockets belongs to the command's packets: read it all first.
            if command_done_at is not None and now - command_done_at >= COMMAND_GRACE_SECONDS \
                    and all(monitor.drained for monitor in monitors):
                settled = all(part.builder.open_packets == 0 for part in run.live) \
                    and not (joiner and joiner.holding) and not (correlator and correlator.holding)
                if settled or now - command_done_at >= options.idle_seconds + COMMAND_GRACE_SECONDS:
                    return
            wait = POLL_SECONDS if deadline is None else min(POLL_SECONDS, deadline - now)
            readable = self._wait(monitors + ([legacy] if legacy is not None else []), wait)
            for monitor in monitors:
                monitor.sample_queue()  # before the drops are read: see kernel/queuetime.py
            drops = self._read_drops()
            for part in run.live:
                if part.monitor is not None and (part.monitor in readable or drops):
                    if self._dispatch(run, part, self._read_events(part)):
                        return
            drained_at = time.monotonic()  # after the reads, before the checks: what is read later came after
            all_drained = True
            for part in run.live:
                monitor = part.monitor
                if monitor is None:
                    continue
                drained = monitor.drained  # reads come in batches: a backlog may still be queued
                if drained or monitor.behind_losses:
                    part.builder.socket_drained()
                all_drained = all_drained and drained
            caught_up = all_drained
            # Read after the trace events: the TRACE lines written before them are all here.
            # Read on every round, lines or not: each read observes the legacy tables.
            if legacy is not None and self._read_legacy(run):
                return
            if correlator is not None:
                if all_drained:
                    correlator.note_drained(drained_at)
                if drops:
                    correlator.add_drops(drops)
                if self._release_for_drops(run) or drops:
                    self._finished(run, primary, primary.builder.close_vanished(correlator.vanished))
            for part in run.live:
                self._finished(run, part, part.builder.expire(time.monotonic()))
            if joiner is not None:
                if all_drained:
                    joiner.socket_drained(drained_at)
                self._deliver(run, joiner.expire(time.monotonic()))
            if correlator is not None:
                self._deliver(run, correlator.release(time.monotonic()), held=True)
            run.collection.between_reads(caught_up=all_drained)
            if run.on_batch is not None:
                run.on_batch()

    def _wait(self, sources: list, timeout: float) -> list:
        """Wait for trace events, TRACE lines or kernel drops."""
        sources = sources if self._drops is None else sources + [self._drops]
        readable, _, _ = select.select(sources, [], [], max(0.0, timeout))
        return readable
