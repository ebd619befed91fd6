"""`nftrace drops`: trace every packet that matches a filter (or all of them), count the drops.

The live trace is `why`'s (trace/session.py: trace table, events, paths, kernel drops, the
same guarantees on every exit path); what differs is here:
- the trace table counts, before and after its rate limit, the packets that match, so the
  run can say how many it did not trace (read at the end, while the table is still in);
- only packets that this run's mark rule traced are counted: a concurrent `why` in the same
  namespace traces packets of its own, and every listener receives their events;
- nftables only: legacy iptables tables are named in a warning, not traced, and their TRACE
  lines kept out of the kernel log (iptables/backends.py: SilencedTraceLines);
- a packet's path is built only when the packet can be a drop (deferred.py): on a busy box
  nearly every traced packet is accepted, and costs little more than reading its events.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

from ..errors import KernelError
from ..iptables.backends import BackendPlan
from ..iptables.legacy import FAMILIES, legacy_tables
from ..protocols import iptables_command
from ..kernel.monitor import READ_BATCH
from ..kernel.tracetable import TraceTable
from ..trace.paths import PacketPath
from ..trace.session import TraceOptions, TraceSession, open_nftables
from . import eventstash
from .deferred import DeferredPackets
from .eventfilter import drops_event_filter
from .report import DropsReport
from .tally import TraceCounts

# NFTRACE_CLASSIC_FILTER=1: the classic socket filter even where eBPF works (tests, comparison).
CLASSIC_FILTER_ENV = "NFTRACE_CLASSIC_FILTER"
STASH_POLL_SECONDS = 0.05


class DropsSession(TraceSession):
    """One `nftrace drops` run; `run(on_drop, ...)` calls `on_drop` for each dropped packet."""

    # The kernel's stash and event filter keep no accept but nftrace's observations: an
    # accepted packet is known by its observation at the exit hook.
    exit_unobserved = False

    def __init__(self, options: TraceOptions, report: DropsReport):
        options.counted = True
        options.count = 0
        options.backend = "nft"
        super().__init__(options, report)
        self.started: Optional[float] = None
        self._deferred: Optional[DeferredPackets] = None
        self._stashes: list = []  # the kernel's stashes of events (eventstash.py), one per monitor
        self._stash_lost = 0
        self._remembered = 0  # the correlator's drops remembered, when held packets were last built for them

    def run(self, on_drop: Callable[[PacketPath], None], on_ready: Callable[[], None] = lambda: None,
            on_batch: Optional[Callable[[], None]] = None) -> None:
        report = self.report

        def on_packet(path: PacketPath) -> None:
            if report.tally.add(path, report.interfaces, time.monotonic()) is not None:
                on_drop(path)

        def ready() -> None:
            self.started = time.monotonic()
            on_ready()

        try:
            super().run(on_packet, ready, on_batch)
        finally:
            if self.started is not None:
                report.duration = time.monotonic() - self.started
            if self._stash_lost:
                report.lost_events += self._stash_lost
                report.warnings.append(f"{self._stash_lost:,} trace events were lost: the kernel's queue of dropped "
                                       "packets for nftrace was full (nftrace fell behind); those packets are not "
                                       "counted")
            if self._deferred is not None:
                self._deferred.finish()

    def _build(self, part, plan, legacy, several) -> None:
        """Where paths are plain (no bridge, no egress device followed: their hooks can follow
        postrouting), packets wait in DeferredPackets, and the kernel filters the events
        before any is queued: from before `drops` says it is watching."""
        super()._build(part, plan, legacy, several)
        builder = part.builder
        if part.monitor is not None and self._deferred is None and not (builder.bridges or builder.egress):
            self._deferred = DeferredPackets(builder, on_unbuilt=self.report.tally.not_built)
            self._filter_events(part.monitor, builder)

    def _read_events(self, part, limit=READ_BATCH):
        """The events of packets that can be drops (see deferred.py), of the events the answer
        needs (eventfilter.py, eventstash.py); where paths can go on past postrouting, every event."""
        if self._deferred is None:
            return super()._read_events(part, limit)
        monitor, now = part.monitor, time.monotonic()
        if monitor.stash is not None:
            monitor.stash.everything(self._deferred.straight(now))
            self.report.tally.not_built(monitor.stash.newly_accepted())
        return self._deferred.read(monitor.read_raw(limit), now)

    def _filter_events(self, monitor, builder) -> None:
        """The kernel keeps each packet's events until it is known to be a possible drop
        (eventstash.py), or, where eBPF cannot do that, drops the events `drops` does not
        read (eventfilter.py)."""
        if os.environ.get(CLASSIC_FILTER_ENV) != "1":
            try:
                stash = eventstash.EventStash(builder.rejoin_ifindexes)
                monitor.hold_back(stash)
                self._stashes.append(stash)
                return
            except KernelError:
                pass  # no eBPF here: the classic filter does the same, with more events to read
        monitor.keep_only(drops_event_filter(), "the filter of the trace events drops reads")

    def _wait(self, sources: list, timeout: float) -> list:
        """A stash's records come without waking a select: it is looked at every STASH_POLL_SECONDS."""
        stashing = [source for source in sources if getattr(source, "stash", None) is not None]
        if not stashing:
            return super()._wait(sources, timeout)
        readable = super()._wait(sources, min(timeout, STASH_POLL_SECONDS))
        return readable + [source for source in stashing if source not in readable and not source.stash.empty]

    def _release_for_drops(self, run) -> bool:
        """A kernel drop that nothing built explains may be of a packet held back: after
        netfilter, of any packet held (it is built, and every event for a while); inside
        netfilter (NETFILTER_DROP outside the traced chains), of a packet held still open,
        which is built (see deferred.py)."""
        now = time.monotonic()
        unexplained = self._correlator.unexplained() if self._deferred is not None else None
        if unexplained == "kernel":
            self._take_stashed(everything=True)
            self._deferred.suspend(now)
        elif unexplained == "netfilter" and self._correlator.remembered != self._remembered:
            self._remembered = self._correlator.remembered  # once per drop: the others are echoes of lost events
            self._take_stashed(everything=False)
            self._deferred.release_open()
        else:
            return False
        for part in run.live:
            self._dispatch(run, part, self._deferred.read((), now), stopping=True)
        return True

    def _take_stashed(self, everything: bool) -> None:
        """What the kernel stashes is held here from now (as if read): the packets it holds may
        be the one dropped. `everything`: and kept events go on the socket for a while
        (deferred.suspend), so that a packet is never half stashed, half read."""
        for stash in self._stashes:
            if everything:
                stash.everything(True)
            self._deferred.hold(stash.dump())

    def _plan(self):
        nft = open_nftables()
        present = {family: tables for family in FAMILIES if (tables := legacy_tables(family))}
        self.report.untraced_legacy = [f"{iptables_command(family)} ({', '.join(tables)})"
                                       for family, tables in present.items()]
        if present:
            self.report.warnings.append("legacy iptables tables are not traced by drops: "
                                        f"{'; '.join(self.report.untraced_legacy)}")
        if self.options.flow.oif:
            self.report.warnings.append("--oif is known only after routing: traced and not_traced count the "
                                        "matching packets of every output interface")
        return nft, BackendPlan(nft=True, silenced=tuple(present))

    def _await_drop_watcher(self, watcher) -> None:
        super()._await_drop_watcher(watcher)
        if self._correlator is not None:
            report = self.report
            self._correlator.on_late = lambda signature, kernel_drop: report.tally.add_late(
                signature, kernel_drop, report.interfaces, time.monotonic())
            self._correlator.on_unpaired = lambda drop, kernel_drop: report.tally.add_unpaired(
                drop, kernel_drop, time.monotonic())

    def _explain_answers(self) -> None:
        """A tally of drops, many flows at once: nothing to say of one packet (see TraceSession)."""

    def _note_answer(self, path) -> None:
        """Nor anything to keep for it, on the way of every dropped packet."""

    def _near_miss_annotator(self, part, plan):
        """Near misses answer `why` about one flow; a tally of drops has no use for them."""
        return None

    def _wanted(self, path: PacketPath) -> bool:
        table = self._table
        if table is None or table.name not in path.marked_by:
            return False  # traced by someone else's run (a concurrent `why`)
        return super()._wanted(path)

    def _finishing(self, table: Optional[TraceTable]) -> None:
        self._stash_lost = sum(stash.lost_events for stash in self._stashes)  # while the stashes are open
        if table is None or not table.installed:
            return
        try:
            matched, traced = table.counts()
        except KernelError as err:  # never hides what ended the run
            self.report.warnings.append(f"nftrace's counters could not be read: {err}")
            return
        self.report.counts = TraceCounts(matched=matched, traced=traced)
