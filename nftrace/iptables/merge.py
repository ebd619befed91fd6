"""Legacy iptables TRACE lines joined to packets, and their steps merged into packet paths.

Pure logic: TRACE lines and nftables paths in, paths out; nothing here touches the kernel.

A TRACE line carries no trace id, only the packet. It is joined to a packet by the header
fields NAT leaves alone (`trace/identity.py`: IP version, protocol, length, IPv4 id, TCP
sequence and acknowledgement numbers, ICMP type), and when several open packets share them,
to the oldest one that can take the line: a line continues the table that is running, or
starts a table that runs later than the packet's last one (hooks in order, then priority),
or is the packet's way back in after it left through loopback.
On hosts with nf_tables, nftrace's mark chain sets the trace bit, so the nftables path of
the packet exists before its first TRACE line; without nf_tables (TRACE rules), the lines
alone make the path.

Steps of both are put in the order the kernel ran them: by hook, then by the priority of
the nftables base chain or the x_tables table (raw -300, mangle -150, nat -100/100, filter 0,
security 50). At equal priority the kernel runs the one registered last first, which nftrace
cannot see: legacy steps go first then.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Protocol

from ..trace.events import FINAL_VERDICTS, TERMINAL_VERDICTS
from ..trace.identity import packet_identity
from .legacy import BACKEND, CHAIN_HOOKS, TABLE_HOOKS, Resolution, table_priority
from ..kernel.monitor import EventsLost
from .nflog import LegacyTraceEvent
from ..trace.paths import (EXIT_HOOKS, HOOK_RANK, HookObservation, PacketPath, PathBuilder, RuleLookup, Step,
                           finalise_path, verdict_before_kernel_drop)
from ..trace.jumpstack import JumpStack
from ..trace.ruleset import priority_value

HOOK_CHAINS = {hook: chain for chain, hook in CHAIN_HOOKS.items()}
# A packet sent to a local address leaves through loopback and comes back in at prerouting.
LOOPBACK_IFINDEXES = frozenset({1})


class LegacyResolver(Protocol):
    """What a TRACE line stands for: a fixed LegacyRuleset, or the rules as they were when
    the line was made (rulehistory.RulesetHistory)."""

    def resolve_line(self, event: LegacyTraceEvent) -> Optional[Resolution]: ...


def legacy_position(step_or_event) -> tuple[int, int]:
    hook = step_or_event.hook
    return (HOOK_RANK.get(hook, -1), table_priority(step_or_event.table, hook))


def hook_passes(hooks: list) -> list[int]:
    """For each hook a packet passed, in order, how often it had looped back before: a hook
    earlier than the one before it means the packet came back in through loopback."""
    passes, count, previous = [], 0, None
    for hook in hooks:
        if previous is not None and HOOK_RANK[hook] < HOOK_RANK[previous]:
            count += 1
        passes.append(count)
        previous = hook
    return passes


class LegacyTrail:
    """The legacy steps of one packet, built from its TRACE lines in the order they came.

    Keeps a jump stack per table run (trace/jumpstack.py), as the kernel does not say when a
    caller resumes.
    """

    def __init__(self, identity: Optional[tuple]):
        self.identity = identity
        self.steps: list[Step] = []
        self.observations: list[HookObservation] = []
        self.hooks: list[str] = []
        self.final: Optional[Step] = None  # the drop / queue that ended the packet
        self.positions: list[tuple[int, int, int]] = []  # (loop pass, hook rank, priority) of each step
        self.passes = 0  # times the packet came back in through loopback
        self.run: Optional[tuple[str, Optional[str]]] = None  # (table, hook) running now
        self.run_over = False
        self.run_verdict: Optional[str] = None  # accept / drop / ... that ended the run
        self._position: Optional[tuple[int, int, int]] = None
        self._stack: Optional[JumpStack] = None

    def takes(self, event: LegacyTraceEvent) -> bool:
        """Whether `event` can be this packet's next line."""
        if self.final is not None:
            return False
        if (event.table, event.hook) == self.run and not self.run_over:
            return True
        if self._position is None or (self.passes,) + legacy_position(event) > self._position:
            return True
        return self._loops_back(event)

    def _loops_back(self, event: LegacyTraceEvent) -> bool:
        """The packet left through loopback and this line is its way back in (at prerouting, or
        at input when no legacy table runs at prerouting)."""
        return (event.hook in ("prerouting", "input") and event.iif in LOOPBACK_IFINDEXES and bool(self.hooks)
                and self.hooks[-1] in ("output", "postrouting"))

    def add(self, event: LegacyTraceEvent, resolution: Optional[Resolution]) -> None:
        if (event.table, event.hook) != self.run or self.run_over:
            if self._position is not None and (self.passes,) + legacy_position(event) <= self._position \
                    and self._loops_back(event):
                self.passes += 1
            self._start_run(event)
        stack = self._stack
        depth = stack.enter(event.chain)
        if resolution is None:
            # The rules changed and the new ones could not be read: say what the kernel said.
            kind = event.type
            resolution = Resolution(kind, None, "unknown")
            number = event.rule_number if kind == "rule" else None
        else:
            kind = resolution.type
            number = resolution.rule.number if resolution.rule is not None else None
            if resolution.rule is not None and resolution.rule.own:
                return
        text = resolution.rule.text if resolution.rule is not None else None
        if kind == "policy":
            depth = 0
        step = Step(hook=event.hook, family=event.family, table=event.table, chain=event.chain, type=kind, handle=None,
                    rule_number=number, text=text, verdict=resolution.verdict, target=resolution.target, depth=depth,
                    iptables=text, backend=BACKEND)
        self.steps.append(step)
        self.positions.append(self._position)
        if kind == "policy":
            self.run_over = True
        elif kind == "return" or resolution.verdict == "return":
            stack.ret()
        elif resolution.verdict == "jump" and resolution.target:
            stack.jump(resolution.target)
        elif resolution.verdict == "goto" and resolution.target:
            stack.goto(resolution.target)
        if resolution.verdict in TERMINAL_VERDICTS:
            self.run_over = True
        if self.run_over:
            self.run_verdict = resolution.verdict
        if resolution.verdict in FINAL_VERDICTS:
            self.final = step

    def _start_run(self, event: LegacyTraceEvent) -> None:
        self.run = (event.table, event.hook)
        self.run_over = False
        self.run_verdict = None
        self._position = (self.passes,) + legacy_position(event)
        self._stack = JumpStack(HOOK_CHAINS.get(event.hook or "", event.chain))
        if event.hook and (not self.hooks or self.hooks[-1] != event.hook or self._loops_back(event)):
            self.hooks.append(event.hook)
        self.observations.append(HookObservation(event.hook, event.table, event.chain, event.packet, event.iif,
                                                 event.oif, event.mark, None, False))


def _nft_positions(steps: list, hooks: list, lookup: RuleLookup) -> list[tuple[int, int, int]]:
    """Each nftables step's place in the kernel's order: its loop pass (from the path's
    hooks), its hook, then its base chain's priority."""
    passes = hook_passes(hooks)
    positions = []
    current: tuple[int, int, int] = (0, -1, 0)
    index = 0
    for step in steps:
        if step.hook is not None:
            found = next((i for i in range(index, len(hooks)) if hooks[i] == step.hook), None)
            index = found if found is not None else index
            loop = passes[index] if found is not None else current[0]
            rank = HOOK_RANK[step.hook]
            priority = current[2] if (loop, rank) == current[:2] else 0
            if step.depth == 0 or step.type == "policy":
                chain = lookup.chain(step.family, step.table, step.chain)
                if chain is not None and chain.is_base:
                    found_priority = priority_value(chain.priority, chain.family)
                    priority = found_priority if found_priority is not None else priority
            current = (loop, rank, priority)
        positions.append(current)
    return positions


def merge_steps(nft_steps: list, nft_hooks: list, trail: "LegacyTrail", lookup: RuleLookup) -> list:
    """Both step lists, each in its own order, interleaved in the kernel's order."""
    merged = []
    legacy = list(zip(trail.positions, trail.steps))
    index = 0
    for position, step in zip(_nft_positions(nft_steps, nft_hooks, lookup), nft_steps):
        while index < len(legacy) and legacy[index][0] <= position:
            merged.append(legacy[index][1])
            index += 1
        merged.append(step)
    merged.extend(step for _, step in legacy[index:])
    return merged


def merge_hooks(first: list, second: list) -> list:
    """The hooks of both lists in the order the packet passed them, loops through loopback kept."""
    keyed = {(loop, HOOK_RANK[hook], hook) for hooks in (first, second) for loop, hook in zip(hook_passes(hooks), hooks)}
    return [hook for _, _, hook in sorted(keyed)]


def merge_trail(path: PacketPath, trail: LegacyTrail, lookup: RuleLookup) -> PacketPath:
    """Put a packet's legacy steps into its nftables path and say again what decided it."""
    if not trail.steps:
        return path
    path.steps = merge_steps(path.steps, path.hooks, trail, lookup)
    path.hooks = merge_hooks(path.hooks, trail.hooks)
    path.legacy_observations = trail.observations
    if path.incomplete_reason == "events lost":
        return path
    if trail.final is not None:
        path.complete = True
        path.incomplete_reason = None
        path.verdict = trail.final.verdict
        path.decided_by = trail.final
    elif path.complete and path.verdict == "accept":
        path.decided_by = None
        finalise_path(path, lookup)
    return path


class MergedPathBuilder:
    """nftables trace events build each packet's path; legacy TRACE lines add their steps.

    Feed each batch of trace events, then the TRACE lines read after it. The two come on two
    sockets, so the order of reading is not the order of writing, but it is bounded:
    - every line that the kernel wrote before a trace event is read by then: a path that
      trace events finished waits for the lines read after them, and a legacy DROP finishes
      its path at once;
    - so that a DROP does not finish a path before the trace events the kernel wrote ahead of
      it (nftrace's conntrack chain at prerouting), the session reads the trace events once
      more after reading lines, before feeding them;
    - a line can be read before the trace event of its packet's mark chain (the packet
      came between the two reads): it waits for the next batch of trace events, and is
      given up, counted, after PENDING_SECONDS.
    """

    PENDING_SECONDS = 1.0

    def __init__(self, builder: PathBuilder, lookup: RuleLookup, resolver: LegacyResolver):
        self.builder = builder
        self.lookup = lookup
        self.resolver = resolver
        self.unmatched_lines = 0
        self._trails: dict[int, LegacyTrail] = {}
        self._held: list[PacketPath] = []
        self._pending: list[tuple[float, LegacyTraceEvent]] = []

    def feed(self, event, now: float = 0.0) -> list:
        self._held.extend(self.builder.feed(event, now))
        return []

    def feed_legacy(self, items: Iterable, now: float = 0.0) -> list:
        # The packets a line can belong to, by identity, oldest first: no path starts while
        # lines are read, so one index serves the whole batch.
        candidates: dict = {}
        for path in self._held + self.builder.open_paths():
            candidates.setdefault(packet_identity(path.first_packet), []).append(path)
        waiting, self._pending = self._pending, []
        for seen, line in waiting:
            if not self._attach(line, candidates):
                self._pending.append((seen, line))
        for item in items:
            if isinstance(item, EventsLost):
                self.builder.mark_loss()
            elif not self._attach(item, candidates):
                self._pending.append((now, item))
        return self._release()

    def expire(self, now: float) -> list:
        kept = [(seen, line) for seen, line in self._pending if now - seen < self.PENDING_SECONDS]
        self.unmatched_lines += len(self._pending) - len(kept)
        self._pending = kept
        self._held.extend(self.builder.expire(now))
        return self._release()

    def flush(self) -> list:
        self.unmatched_lines += len(self._pending)
        self._pending = []
        self._held.extend(self.builder.flush())
        return self._release()

    def mark_loss(self) -> None:
        self.builder.mark_loss()

    def socket_drained(self) -> None:
        self.builder.socket_drained()

    def forget_shapes(self) -> None:
        self.builder.forget_shapes()

    def close_vanished(self, vanished: Callable[[PacketPath], bool]) -> list:
        self._held.extend(self.builder.close_vanished(vanished))
        return self._release()

    def release_looped(self) -> list:
        self._held.extend(self.builder.release_looped())
        return self._release()

    @property
    def open_packets(self) -> int:
        return self.builder.open_packets

    def _attach(self, event: LegacyTraceEvent, candidates: dict) -> bool:
        """Add the line to its packet's trail; False when no packet can take it (yet)."""
        identity = packet_identity(event.packet)
        for path in candidates.get(identity, ()) if identity is not None else ():
            trail = self._trails.get(id(path)) or LegacyTrail(identity)
            if not trail.takes(event):
                continue
            self._trails[id(path)] = trail
            trail.add(event, self.resolver.resolve_line(event))
            if trail.final is not None:
                # Closing an open path hands it back; a held one is already closed (returns nothing).
                self._held.extend(self.builder.finish_packet(path))
            return True
        return False

    def _release(self) -> list:
        done, self._held = self._held, []
        return [self._merged(path) for path in done]

    def _merged(self, path: PacketPath) -> PacketPath:
        trail = self._trails.pop(id(path), None)
        return merge_trail(path, trail, self.lookup) if trail is not None else path


@dataclass
class _LegacyPacket:
    path: PacketPath  # shares its observations with the trail
    trail: LegacyTrail
    last_seen: float
    kept: Optional[bool] = None  # decided on its first line


class LegacyPathBuilder:
    """Packet paths from legacy TRACE lines alone (no nf_tables: TRACE rules set the bit).

    A packet ends with a DROP or queue, when the last table on its exit hook (input or
    postrouting) lets it through, or when it goes idle; an idle packet whose last table at
    an exit hook accepted it went through netfilter.
    """

    # Every line starts or continues a packet of its own here: none is left unmatched.
    unmatched_lines = 0

    def __init__(self, resolver: LegacyResolver, keep: Optional[Callable[[PacketPath], bool]] = None,
                 idle_seconds: float = 2.0, last_tables: Optional[dict] = None):
        self.resolver = resolver
        self.keep = keep
        self.idle_seconds = idle_seconds
        self.last_tables = last_tables or {}  # exit hook → the table that runs last there
        self._open: dict[int, _LegacyPacket] = {}  # by path id, oldest first
        self._by_identity: dict[Optional[tuple], list] = {}
        self._ids = itertools.count(1)

    def feed(self, event, now: float = 0.0) -> list:
        """No nf_tables, no trace events: TRACE lines alone make the paths."""
        return []

    def feed_legacy(self, items: Iterable, now: float = 0.0) -> list:
        done = []
        for item in items:
            if isinstance(item, EventsLost):
                self.mark_loss()
                continue
            packet = self._packet_for(item, now)
            trail = packet.trail
            trail.add(item, self.resolver.resolve_line(item))
            packet.last_seen = now
            if packet.kept is None:
                packet.kept = self.keep is None or self.keep(packet.path)
            if trail.final is not None or self._went_through(trail, at_end=False):
                done.extend(self._close(packet))
        return done

    def expire(self, now: float) -> list:
        done = []
        for packet in list(self._open.values()):
            if now - packet.last_seen >= self.idle_seconds:
                done.extend(self._close(packet))
        return done

    def flush(self) -> list:
        done = []
        for packet in list(self._open.values()):
            done.extend(self._close(packet))
        return done

    def mark_loss(self) -> None:
        for packet in self._open.values():
            packet.path.incomplete_reason = "events lost"

    def socket_drained(self) -> None:
        """Nothing to do: an overflow marks the packets open then (see mark_loss)."""

    def forget_shapes(self) -> None:
        """Nothing to do: legacy paths are always built (trace/shapes.py is for nftables events)."""

    def close_vanished(self, vanished: Callable[[PacketPath], bool]) -> list:
        """Close the open packets the kernel dropped after netfilter let them through."""
        done = []
        for packet in list(self._open.values()):
            drop = vanished(packet.path) if packet.kept and packet.trail.final is None else None
            if drop:
                packet.path.complete = True
                packet.path.verdict = verdict_before_kernel_drop(getattr(drop, "reason", None))
                packet.path.vanished_after = packet.trail.hooks[-1] if packet.trail.hooks else "its first hook"
                done.extend(self._close(packet))
        return done

    def release_looped(self) -> list:
        """A packet that comes back in through loopback starts a path of its own here."""
        return []

    @property
    def open_packets(self) -> int:
        return sum(1 for packet in self._open.values() if packet.kept)

    def _packet_for(self, event: LegacyTraceEvent, now: float) -> _LegacyPacket:
        """The oldest open packet that can take the line, or a new one."""
        identity = packet_identity(event.packet)
        same = self._by_identity.setdefault(identity, [])
        for packet in same:
            if packet.trail.takes(event):
                return packet
        trail = LegacyTrail(identity)
        packet = _LegacyPacket(PacketPath(next(self._ids), observations=trail.observations), trail, now)
        self._open[packet.path.trace_id] = packet
        same.append(packet)
        return packet

    def _went_through(self, trail: LegacyTrail, at_end: bool) -> bool:
        """Netfilter let the packet go: an exit hook's last table (or, once idle, any table
        at an exit hook) ended its run on accept."""
        if trail.run is None or not trail.run_over or trail.run_verdict != "accept":
            return False
        table, hook = trail.run
        if hook not in EXIT_HOOKS:
            return False
        if at_end:
            return True
        # Out through loopback, the packet comes back in at prerouting: not the end yet.
        leaving_by_loopback = hook == "postrouting" and trail.observations[-1].oif in LOOPBACK_IFINDEXES
        return self.last_tables.get(hook) == table and not leaving_by_loopback

    def _close(self, packet: _LegacyPacket) -> list:
        del self._open[packet.path.trace_id]
        same = self._by_identity[packet.trail.identity]
        same.remove(packet)
        if not same:
            del self._by_identity[packet.trail.identity]
        if not packet.kept:
            return []
        path, trail = packet.path, packet.trail
        path.steps = trail.steps
        path.hooks = trail.hooks
        if path.incomplete_reason != "events lost" and not path.complete:
            if trail.final is not None:
                path.complete, path.verdict, path.decided_by = True, trail.final.verdict, trail.final
            elif self._went_through(trail, at_end=True):
                path.complete, path.verdict = True, "accept"
            else:
                path.incomplete_reason = "went idle"
        finalise_path(path)
        return [path]


def last_tables_on_exit_hooks(tables: Iterable[str]) -> dict:
    """For input and postrouting, the present table that runs last there."""
    last = {}
    for hook in EXIT_HOOKS:
        present = [table for table in tables if hook in TABLE_HOOKS.get(table, ())]
        if present:
            last[hook] = max(present, key=lambda table: table_priority(table, hook))
    return last


__all__ = [
    "LegacyPathBuilder",
    "LegacyTrail",
    "MergedPathBuilder",
    "last_tables_on_exit_hooks",
    "merge_hooks",
    "merge_steps",
    "merge_trail",
]
