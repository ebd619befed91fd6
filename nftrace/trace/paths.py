"""Rebuild each packet's path through hooks, tables, chains and rules from trace events.

Pure logic: events in, `PacketPath`s out; the kernel is not touched here, so recorded
event streams and hand-written ones test it exactly.

What the kernel does not say, and how it is rebuilt (see shared KERNEL-FACTS):
- which packet: trace ids are reused by later packets. A packet starts where one of
  nftrace's mark chains (the first chain that sees it, at prerouting or output) starts a
  base-chain run for an id whose current packet has already passed that mark chain, or
  where a finished packet's id shows up again at the start of a base chain;
- which hook: events carry table and chain only. A base chain's hook comes from the
  ruleset snapshot, or from nftrace's own chains' names; steps whose hook is still unknown
  get the hook entered next;
- what the packet looked like when a hook ended: nftrace's observation chains (last
  priority) say it on the hooks where something can change it unseen (NAT), and on the exit
  hooks. Elsewhere nothing runs between the end of one IP hook and the first chain of the
  next, so that chain's first event says it: the hook's end is derived from it (`derived`),
  and a hook that the kernel's order puts in between (forward, between prerouting and
  postrouting) is added the same way. Where legacy iptables tables may end a packet without
  an event, nftrace's conntrack chains (right after conntrack) say its conntrack state;
- returns: nothing is sent when a caller resumes after a jump, so a jump stack is kept;
  falling off the end of a chain is a rule event without handle (older kernels: a return
  event); a goto pushes nothing, so the end of a goto'd chain goes back past it;
- when a packet is done: a drop, queue or stolen verdict, or nftrace's observation chain
  at input or postrouting (netfilter has let it through), or, where nothing runs at
  postrouting and nftrace does not observe it, an accept by the last chain of forward or
  output (`hook_ends`); else it ends when it goes idle.

nftrace's own chains end on an `accept` rule, so that each sends one event per packet (a base
chain that falls off its end sends two: the end of its rules, and its policy); streams where
they end on their policy read the same.
"""

from __future__ import annotations

import functools
import re
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Optional, Protocol

from .events import FINAL_VERDICTS, TERMINAL_VERDICTS, ConntrackInfo, PacketHeaders, TraceEvent
from ..protocols import endpoint_text, iptables_command
from ..kernel.tracetable import CONNTRACK_CHAIN_PREFIX, MARK_CHAIN_PREFIX, OBSERVE_CHAIN_PREFIX, is_trace_table
from .jumpstack import JumpStack
from .ruleset import ChainInfo, RuleInfo, priority_value

HOOK_ORDER = ("ingress", "prerouting", "input", "forward", "output", "postrouting", "egress")
HOOK_RANK = {hook: rank for rank, hook in enumerate(HOOK_ORDER)}
# After nftrace's observation chain on these hooks, netfilter has nothing more to say.
EXIT_HOOKS = frozenset({"input", "postrouting"})
# Hooks a packet must have passed between two IP hooks it was seen on, in the kernel's order
# (ingress → prerouting → input, or → forward → postrouting; output → postrouting).
HOOKS_BETWEEN = {
    ("prerouting", "postrouting"): ("forward",),
    ("ingress", "input"): ("prerouting",),
    ("ingress", "forward"): ("prerouting",),
    ("ingress", "postrouting"): ("prerouting", "forward"),
}
# Hooks run before routing: no output interface yet.
BEFORE_ROUTING = frozenset({"ingress", "prerouting"})
# The conntrack status bits that NAT sets up on each hook (destination NAT where the packet
# comes in or is sent, source NAT where it leaves or is delivered).
NAT_STATUS_SET_ON = {"prerouting": frozenset({"dnat", "dnat-done"}), "output": frozenset({"dnat", "dnat-done"}),
                     "input": frozenset({"snat", "snat-done"}), "postrouting": frozenset({"snat", "snat-done"})}
MANGLE_PRIORITY = -150


class RuleLookup(Protocol):
    def rule(self, family: str, table: str, chain: str, handle: int) -> Optional[RuleInfo]: ...

    def chain(self, family: str, table: str, chain: str) -> Optional[ChainInfo]: ...


class PacketPathBuilder(Protocol):
    """What a live run feeds and takes finished paths from: nftables events alone (PathBuilder),
    legacy TRACE lines alone (iptables.merge.LegacyPathBuilder), or both (MergedPathBuilder).

    Every method that takes input returns the paths it finished, in the order they finished.
    """

    unmatched_lines: int  # legacy TRACE lines that belonged to no packet of this run

    def feed(self, event: TraceEvent, now: float = 0.0) -> list: ...

    def feed_legacy(self, items: Iterable, now: float = 0.0) -> list: ...

    def expire(self, now: float) -> list: ...

    def flush(self) -> list: ...

    def mark_loss(self) -> None: ...

    def socket_drained(self) -> None: ...

    def forget_shapes(self) -> None: ...

    def close_vanished(self, vanished: Callable[[PacketPath], bool]) -> list: ...

    def release_looped(self) -> list: ...

    @property
    def open_packets(self) -> int: ...


@dataclass(slots=True)
class Step:
    """One thing that happened to the packet in the ruleset: a rule matched, a chain returned,
    a policy applied."""

    hook: Optional[str]
    family: str
    table: str
    chain: str
    type: str  # rule | policy | return
    handle: Optional[int]
    rule_number: Optional[int]
    text: Optional[str]
    verdict: str  # continue | accept | drop | jump | goto | return | queue | stolen
    target: Optional[str] = None
    depth: int = 0
    rule_deleted: bool = False
    iptables: Optional[str] = None
    # Run under a base chain of type nat: its accept is the NAT statement's, not a filter's.
    in_nat_chain: bool = False
    backend: str = "nft"  # nft | iptables-legacy: which part of netfilter ran the chain
    netns: Optional[str] = None  # the network namespace it ran in (None: nftrace's own)

    def where(self) -> str:
        """`inet filter input`; a legacy iptables chain as `iptables filter INPUT`."""
        if self.backend == "iptables-legacy":
            return f"{iptables_command(self.family)} {self.table} {self.chain}"
        return f"{self.family} {self.table} {self.chain}"

    def location(self) -> str:
        """`inet filter input rule handle 7: tcp dport 22 drop`, the words an admin searches for."""
        where = self.where()
        if self.type == "policy":
            return f"{where} policy {self.verdict}"
        if self.type == "return" and self.handle is None:
            return f"{where} (end of chain)"
        if self.handle is not None:
            label = f"rule handle {self.handle}"
        elif self.rule_number is not None:
            label = f"rule {self.rule_number}"
        else:
            label = "rule"
        text = self.iptables or self.text
        if text is None:
            text = "(rule deleted before it could be read)" if self.rule_deleted else "(rule text unknown)"
        elif self.rule_deleted:
            text += " (since deleted)"
        return f"{where} {label}: {text}"

    def to_json(self) -> dict:
        return {
            "hook": self.hook,
            "family": self.family,
            "table": self.table,
            "chain": self.chain,
            "type": self.type,
            "handle": self.handle,
            "rule_number": self.rule_number,
            "text": self.text,
            "verdict": self.verdict,
            "target": self.target,
            "depth": self.depth,
            "rule_deleted": self.rule_deleted,
            "iptables": self.iptables,
            "backend": self.backend,
            "netns": self.netns,
        }


@dataclass(slots=True)
class HookObservation:
    """The packet as one base chain first saw it: headers, interfaces, conntrack."""

    hook: Optional[str]
    table: str
    chain: str
    packet: Optional[PacketHeaders]
    iif: Optional[int]
    oif: Optional[int]
    mark: Optional[int]
    ct: Optional[ConntrackInfo]
    own: bool  # from nftrace's own mark or observation chain
    netns: Optional[str] = None
    family: Optional[str] = None  # of the chain's table: bridge for a bridge hook, netdev for egress
    # The end of a hook that nftrace did not observe, read from the next hook's first chain.
    derived: bool = False


@dataclass(slots=True)
class PacketPath:
    """Everything nftrace learnt about one packet; rendered for people and as JSON."""

    trace_id: int
    steps: list = field(default_factory=list)
    observations: list = field(default_factory=list)
    # The packet as each legacy table run's first TRACE line gave it (iptables/merge.py): kept
    # apart, for the interfaces of hooks that no chain of nftables ran.
    legacy_observations: list = field(default_factory=list)
    hooks: list = field(default_factory=list)
    verdict: str = "unknown"
    decided_by: Optional[Step] = None
    complete: bool = False
    incomplete_reason: Optional[str] = None
    kernel_drop: Optional[dict] = None
    nat: list = field(default_factory=list)
    first_seen: float = 0.0  # when its first and latest events were read (pairs kernel drops with it)
    last_seen: float = 0.0
    netns: Optional[str] = None  # the namespace this path (or part of a path) ran in
    # A packet traced across namespaces: its part in each, in the order it met them (crossing.py).
    segments: list = field(default_factory=list)
    interfaces: Optional[dict] = None  # ifindex -> name in a segment's namespace (None: the run's own)
    # The kernel freed the packet after this hook, before netfilter was done with it (a kernel
    # drop closed the path): no step decided its fate (see verdict_before_kernel_drop).
    vanished_after: Optional[str] = None
    # nftrace tables whose mark rule set its trace bit: tells a run's own packets from those
    # that a concurrent run traced (both runs receive every trace event of the namespace).
    marked_by: set = field(default_factory=set)
    # Rules that did not match and would have changed its fate (trace/nearmiss.py), ranked;
    # filled in when the answer is delivered, not on the event path.
    near_misses: list = field(default_factory=list)
    fix: Optional[object] = None  # --fix: the proven change (nftrace.dryrun.fix.FixAnswer)
    # Made from the path of an earlier packet whose events had the same shapes (trace/shapes.py):
    # what is made of a path alone may be reused from that packet's (ShapeNode; None: built).
    shape: Optional[object] = None

    @property
    def first_packet(self) -> Optional[PacketHeaders]:
        for observation in self.observations:
            if observation.packet is not None:
                return observation.packet
        return None

    def interface_index(self, which: str) -> Optional[int]:
        """iif: the first one seen; oif: the last one seen (routing may change it)."""
        if which == "iif":
            for observation in self.observations:
                if observation.iif:
                    return observation.iif
            return None
        for observation in reversed(self.observations):
            if getattr(observation, which):
                return getattr(observation, which)
        return None

    @property
    def mark(self) -> Optional[int]:
        marks = [o.mark for o in self.observations if o.mark]
        return marks[-1] if marks else None


@dataclass(slots=True)
class _PacketState:
    trace_id: int
    path: PacketPath
    last_seen: float
    stack: Optional[JumpStack] = None  # the running base chain's jump stack
    hook: Optional[str] = None  # hook of the running base chain, None while unknown
    base_type: Optional[str] = None  # type (filter, nat, route) of the running base chain
    hook_end_seen: bool = False  # nftrace's observation chain ended the latest IP hook
    base: Optional[tuple] = None  # (family, table, chain) of the running base chain
    marks_seen: set = field(default_factory=set)
    passed: set = field(default_factory=set)  # (family, hook) of the base chains run so far
    family_hooks: dict = field(default_factory=dict)  # family -> latest hook of a chain of that family
    unhooked_from: int = 0  # first step whose hook is still unknown
    checked: bool = False
    finished: bool = False
    ignored: bool = False
    closed: bool = False
    # Its events so far, while its path is a function of them alone (trace/shapes.py).
    shaped: Optional[list] = None


@dataclass(slots=True)
class _KnownShape:
    """A packet whose events so far have shapes met before: nothing is built unless they leave
    the known shapes (then its events are fed to the builder from the first)."""

    node: object  # shapes.ShapeNode
    events: list
    times: list


@functools.lru_cache(maxsize=256)
def _own_chain_hook(chain: str) -> Optional[str]:
    for prefix in (MARK_CHAIN_PREFIX, OBSERVE_CHAIN_PREFIX, CONNTRACK_CHAIN_PREFIX):
        if chain.startswith(prefix):
            hook = chain[len(prefix):].split("@")[0]  # mark_ingress@N: one chain per device
            return hook if hook in HOOK_RANK else None
    return None


class PathBuilder:
    """Turns an interleaved stream of trace events into finished packet paths.

    `keep` decides from a packet's first headers whether it belongs to this run's flow;
    packets it rejects are forgotten at once, so a busy box costs no memory.

    Memory stays flat under a flood: a finished packet leaves nothing but its id and the time
    of its last event (`_finished`) until that id starts a new packet or goes idle; packets
    still being built (`_open`) are few. The maps are kept in order of last activity (an
    event moves its id to the end), so `expire` looks only at what went idle. `now` must not
    go backwards.
    """

    # Legacy TRACE lines are MergedPathBuilder's: this builder reads none.
    unmatched_lines = 0

    def __init__(self, lookup: RuleLookup, keep: Optional[Callable[[PacketPath], bool]] = None,
                 idle_seconds: float = 2.0, loopback_ifindexes: frozenset = frozenset({1}),
                 bridges: frozenset = frozenset(), egress: frozenset = frozenset(), bridge_out: bool = False,
                 shapes=None, hook_ends: Optional[dict] = None):
        self.lookup = lookup
        # Where nftrace does not observe IP postrouting (nothing runs there), the base chain
        # that runs last on forward and on output, by (hook, nfproto): a packet it accepts has
        # left netfilter (kernel/tracetable.hook_ends). None: postrouting is observed. Set
        # again when the ruleset changes.
        self.hook_ends = hook_ends
        # trace/shapes.PathShapes: packets whose events have shapes met before get a copy of
        # that packet's path (None: every path is built).
        self.shapes = shapes
        self._known: OrderedDict[int, _KnownShape] = OrderedDict()
        self.keep = keep
        self.idle_seconds = idle_seconds
        # `lo` is ifindex 1 in every network namespace.
        self.loopback_ifindexes = loopback_ifindexes
        # Bridge devices whose frames nftrace follows in the bridge family, and devices whose
        # egress chains it observes (ifindexes): a packet leaving through one is not done at
        # postrouting. A frame delivered up to a bridge device comes back in under a new id.
        self.bridges = bridges
        # The ruleset has bridge chains at output or postrouting: a packet routed out through a
        # bridge device goes on there after IP postrouting (which runs before the next hop is
        # resolved: without such chains, its path ends at IP postrouting, as without bridges).
        self.bridge_out = bridge_out
        self.egress = egress
        self.rejoin_ifindexes = loopback_ifindexes | bridges
        self._open: OrderedDict[int, _PacketState] = OrderedDict()
        self._finished: OrderedDict[int, float] = OrderedDict()  # trace id -> last event's time
        self.loss_pending = False
        # Paths that left through loopback, waiting for their second half (see _close).
        self._looped: OrderedDict[tuple, tuple[PacketPath, float]] = OrderedDict()

    def feed(self, event: TraceEvent, now: float = 0.0) -> list:
        """Add one event; return the packets it finished (a new packet can finish an old one)."""
        if self.shapes is None:
            return self._feed(event, now)
        trace_id = event.trace_id
        known = self._known.get(trace_id)
        if known is None:
            node = self._known_start(event)
            if node is None:
                return self._feed(event, now)
            self._finished.pop(trace_id, None)  # the id is reused by a new packet
            known = self._known[trace_id] = _KnownShape(node, [event], [now])
        else:
            node = known.node.children.get(event.shape) if event.shape is not None else None
            if node is None:
                return self._build_known(trace_id) + self._feed(event, now)
            known.node = node
            known.events.append(event)
            known.times.append(now)
            self._known.move_to_end(trace_id)
        if node.path is None:
            return []
        del self._known[trace_id]
        self._finished[trace_id] = now
        self._finished.move_to_end(trace_id)
        first_seen = known.times[0] or next((when for when in known.times if when), 0.0)  # as _feed sets it
        return [self.shapes.build(node, known.events, first_seen, now)]

    def _known_start(self, event: TraceEvent):
        """The shape node of a packet's first event, where the builder would start a packet
        that depends on its events alone (see _feed)."""
        if event.shape is None or not event.starts_base_chain or self.loss_pending or event.trace_id in self._open \
                or event.iif in self.rejoin_ifindexes or (event.trace_id in self._finished and self._late(event)):
            return None
        return self.shapes.start(event.shape)

    def _late(self, event: TraceEvent) -> bool:
        """A base chain's first event under the id of a finished packet that starts no new one.
        Where packets end at the last chain of forward or output (hook_ends), only a mark chain
        of nftrace's starts one (every packet it traces passes one first); a chain at
        postrouting after the end is the finished packet's: nftrace's observation before it was
        removed, a concurrent run's, one added there in the moments before the change is read."""
        return bool(self.hook_ends) and not (is_trace_table(event.table) and event.chain.startswith(MARK_CHAIN_PREFIX))

    def _build_known(self, trace_id: int) -> list:
        """Feed the builder a packet's events that had known shapes (they left them, or
        something needs its state): it then holds what it would have held."""
        known = self._known.pop(trace_id)
        done = []
        for event, when in zip(known.events, known.times):
            done.extend(self._feed(event, when))
        return done

    def _build_every_known(self) -> list:
        done = []
        while self._known:
            done.extend(self._build_known(next(iter(self._known))))
        return done

    def forget_shapes(self) -> None:
        """The ruleset changed: paths made from now on must read the new one."""
        if self.shapes is not None:
            self._build_every_known()  # their steps so far read the old ruleset, as they came
            self.shapes.forget()

    def _feed(self, event: TraceEvent, now: float) -> list:
        done = []
        trace_id = event.trace_id
        state = self._open.get(trace_id)
        if state is None:
            if trace_id in self._finished:
                if not event.starts_base_chain or self._late(event):
                    # A late event of a packet already finished: swallowed.
                    self._finished[trace_id] = now
                    self._finished.move_to_end(trace_id)
                    return done
                del self._finished[trace_id]  # the id is reused by a new packet
        elif self._starts_new_packet(state, event):
            done.extend(self._close(state))
            state = None
        if state is None:
            if not event.starts_base_chain:
                # The start of this packet was lost, or it was not ours: nothing sound can be
                # built from the middle of a path.
                return done
            state = _PacketState(event.trace_id, PacketPath(event.trace_id), now)
            if self.loss_pending:
                state.path.incomplete_reason = "events lost"
            elif self.shapes is not None and event.iif not in self.rejoin_ifindexes:
                state.shaped = []
            looped = self._looped.pop(_header_key(event.packet), None) if event.iif in self.rejoin_ifindexes else None
            if looped is not None:
                # The packet comes back in through loopback, or up from a bridge's ports to the
                # bridge device, under a new trace id (the id hashes the input interface): its
                # path goes on where it left off.
                state.path, state.checked = looped[0], True
                state.path.complete, state.path.verdict, state.path.decided_by = False, "unknown", None
            self._open[trace_id] = state
        else:
            self._open.move_to_end(trace_id)  # _open stays in order of last activity
        state.last_seen = now
        if state.ignored or state.closed:
            return done
        state.path.first_seen = state.path.first_seen or now
        state.path.last_seen = now
        if state.shaped is not None:
            if event.shape is None:
                state.shaped = None
            else:
                state.shaped.append(event)
        self._apply(state, event)
        if not state.checked and state.path.first_packet is not None:
            state.checked = True
            if self.keep is not None and not self.keep(state.path):
                state.ignored = True
                state.path = PacketPath(event.trace_id)
                return done
        if state.finished:
            finished = self._close(state, forget=False)
            if finished and state.shaped is not None and state.path.incomplete_reason is None:
                self.shapes.record(state.shaped, state.path)
            done.extend(finished)
        return done

    def feed_legacy(self, items: Iterable, now: float = 0.0) -> list:
        """Legacy TRACE lines are not this builder's (see MergedPathBuilder): none are read."""
        return []

    def expire(self, now: float) -> list:
        """Close packets that went quiet: whatever happened next, netfilter did not see it."""
        done = []
        known = self._known
        while known:
            trace_id = next(iter(known))
            if now - known[trace_id].times[-1] < self.idle_seconds:
                break
            done.extend(self._build_known(trace_id))
            state = self._open.pop(trace_id, None)
            if state is not None:
                done.extend(self._close(state))
        packets = self._open
        while packets:
            trace_id = next(iter(packets))
            state = packets[trace_id]
            if now - state.last_seen < self.idle_seconds:
                break  # every later packet was active more recently
            del packets[trace_id]
            done.extend(self._close(state))
        finished = self._finished
        while finished:
            trace_id = next(iter(finished))
            if now - finished[trace_id] < self.idle_seconds:
                break
            del finished[trace_id]
        looped = self._looped
        while looped:
            key = next(iter(looped))
            path, since = looped[key]
            if now - since < self.idle_seconds:
                break
            del looped[key]
            done.append(path)
        return done

    def flush(self) -> list:
        """Close every open packet (end of the run)."""
        done = self._build_every_known()
        for state in list(self._open.values()):
            done.extend(self._close(state, wait_for_loop=False))
        self._finished.clear()
        done.extend(self.release_looped())
        return done

    def release_looped(self) -> list:
        """Paths that left through loopback and are still waiting for their way back in."""
        done = [path for path, _ in self._looped.values()]
        self._looped.clear()
        return done

    def close_vanished(self, vanished: Callable[[PacketPath], object]) -> list:
        """Close the open packets that the kernel is known to have freed (`vanished` gives the
        kernel's drop, with its `reason`, or None): netfilter will send nothing more, so there
        is no idle wait. They end complete, with netfilter's verdict and no deciding step (see
        verdict_before_kernel_drop). One that may have lost events is not: its events, not the
        packet, may be what is missing, and the drop another packet's."""
        done = self._build_every_known()
        for state in list(self._open.values()):
            if state.closed or state.ignored or state.finished or state.path.first_packet is None \
                    or state.path.incomplete_reason == "events lost":
                continue
            drop = vanished(state.path)
            if drop:
                state.finished = True
                state.path.complete = True
                state.path.verdict = verdict_before_kernel_drop(getattr(drop, "reason", None))
                state.path.vanished_after = state.path.hooks[-1] if state.path.hooks else "its first hook"
                done.extend(self._close(state, forget=False, wait_for_loop=False))
        return done

    def mark_loss(self) -> None:
        """The kernel dropped events: which packets they belonged to is unknown.

        The gap lies after everything read before the loss was reported (kernel/monitor.py
        reports it in front of the batch it was found after). So every packet open now, and
        every packet that starts before everything queued before the loss has been read
        (`socket_drained`), may miss events of its own: all of them end incomplete rather
        than with a verdict that could be wrong.
        """
        self._build_every_known()  # they finish nothing: their ends are yet to come
        self.loss_pending = True
        for state in self._open.values():
            if not state.closed:
                state.path.incomplete_reason = "events lost"

    def socket_drained(self) -> None:
        """Everything queued before the last loss has been read (the socket was read empty,
        or read past what it held when the loss was found)."""
        self.loss_pending = False

    @property
    def open_packets(self) -> int:
        return len(self._known) + sum(1 for state in self._open.values() if not state.closed and not state.ignored)

    def open_paths(self) -> list:
        """Paths of this run's packets still being traced, oldest first: where steps that other
        sources saw (legacy iptables TRACE lines) belong."""
        self._build_every_known()
        return [state.path for state in self._open.values() if state.checked and not state.closed and not state.ignored]

    def finish_packet(self, path: PacketPath) -> list:
        """Another source saw the packet's end (a legacy iptables DROP): close its path now."""
        self._build_every_known()
        state = self._open.get(path.trace_id)
        if state is None or state.path is not path or state.closed:
            return []
        state.finished = True
        return self._close(state, forget=False)

    def building(self, trace_id: int) -> bool:
        """Whether the packet of this trace id is being built (its next events belong to it)."""
        if trace_id in self._known:
            return True
        state = self._open.get(trace_id)
        return state is not None and not state.closed

    @property
    def tracked_ids(self) -> int:
        """Trace ids held in memory: packets being built, and finished ones not yet expired."""
        return len(self._known) + len(self._open) + len(self._finished)

    # -- one event -------------------------------------------------------------------------

    def _starts_new_packet(self, state: _PacketState, event: TraceEvent) -> bool:
        if not event.starts_base_chain:
            return False
        if state.finished or state.closed:
            return True
        if is_trace_table(event.table) and event.chain.startswith(MARK_CHAIN_PREFIX):
            if (event.family, event.table, event.chain) in state.marks_seen:
                return True
        hook = self._base_chain_hook(event)
        # Hooks of one family only move forward for one packet; going back means a new packet
        # under a reused id. (Across families they may: a packet routed out through a bridge
        # device passes the bridge's output hook after the IP postrouting hook.)
        last = state.family_hooks.get(_hook_family(event.family))
        return hook is not None and last is not None and HOOK_RANK[hook] < HOOK_RANK[last]

    def _base_chain_hook(self, event: TraceEvent) -> Optional[str]:
        if is_trace_table(event.table):
            return _own_chain_hook(event.chain)
        chain = self.lookup.chain(event.family, event.table, event.chain)
        return chain.hook if chain is not None else None

    def _apply(self, state: _PacketState, event: TraceEvent) -> None:
        path = state.path
        own = is_trace_table(event.table)
        if event.starts_base_chain:
            state.hook = self._base_chain_hook(event)
            chain = None if own else self.lookup.chain(event.family, event.table, event.chain)
            state.base_type = chain.type if chain is not None else None
            if state.hook is not None:
                self._enter_hook(state, state.hook, event)
            state.stack = JumpStack(event.chain)
            state.base = (event.family, event.table, event.chain)
            path.observations.append(
                HookObservation(state.hook, event.table, event.chain, event.packet, event.iif, event.oif,
                                event.mark, event.ct, own, family=event.family)
            )
            if state.hook is not None:
                state.passed.add((_hook_family(event.family), state.hook))
                state.family_hooks[_hook_family(event.family)] = state.hook
            if own and event.chain.startswith(MARK_CHAIN_PREFIX):
                state.marks_seen.add((event.family, event.table, event.chain))
        elif event.mark and path.observations:
            path.observations[-1].mark = event.mark
        if own and event.handle is not None and event.type == "rule" and event.chain.startswith(MARK_CHAIN_PREFIX):
            path.marked_by.add(event.table)  # the mark rule matched: it set the trace bit
        if not own:
            self._add_step(state, event)
        elif event.chain.startswith(OBSERVE_CHAIN_PREFIX):
            if event.starts_base_chain and _hook_family(event.family) == "inet":
                state.hook_end_seen = True
            # The chain's accept rule, or its policy where the chain has no rule.
            if (event.type == "policy" or event.verdict == "accept") and self._through(state, event):
                state.finished = True
                path.complete = True
                path.verdict = "accept"
        if self.hook_ends and event.verdict == "accept" and not state.finished \
                and self.hook_ends.get((state.hook, event.nfproto)) == state.base:
            self._leave_unobserved(state)

    @staticmethod
    def _leave_unobserved(state: _PacketState) -> None:
        """The last chain of forward or output accepted the packet, and nothing of netfilter
        runs at postrouting: it is through, as that hook's first chain saw it (see hook_ends).
        Its ends of hook and postrouting are derived from that chain's first event."""
        path = state.path
        seen = next((observation for observation in reversed(path.observations) if observation.packet is not None),
                    None)
        if seen is not None:
            mark = path.observations[-1].mark
            for hook in (state.hook, "postrouting"):
                path.observations.append(HookObservation(hook, seen.table, seen.chain, seen.packet, seen.iif, seen.oif,
                                                         mark, seen.ct, own=True, family=seen.family, derived=True))
        path.hooks.append("postrouting")
        state.finished = True
        path.complete = True
        path.verdict = "accept"

    def _through(self, state: _PacketState, event: TraceEvent) -> bool:
        """Whether netfilter is done with the packet once nftrace's observation chain at this
        hook let it go: at input (delivered; from a bridge's port, up to the bridge device),
        at egress, and at postrouting unless more chains wait on its way out: the bridge
        hooks of a bridge device it is routed out through, br_netfilter's IP postrouting
        hook after the bridge's, the egress chains of its device."""
        hook = state.hook
        if hook in ("input", "egress"):
            return True
        if hook != "postrouting":
            return False
        observation = state.path.observations[-1] if state.path.observations else None
        oif = observation.oif if observation is not None else None
        if oif in self.egress:
            return False
        if _hook_family(event.family) == "bridge":
            return not (("inet", "forward") in state.passed and ("inet", "postrouting") not in state.passed)
        return oif not in self.bridges or not self.bridge_out or ("bridge", "postrouting") in state.passed

    def _enter_hook(self, state: _PacketState, hook: str, event: TraceEvent) -> None:
        """Steps whose base chain was unknown to the snapshot ran on the hook entered next.

        Moving on to a later IP hook, the packet left the previous one as this chain first
        sees it: where nftrace did not observe that hook's end, it is derived from this event,
        and so is every hook the kernel ran in between."""
        path = state.path
        for step in path.steps[state.unhooked_from:]:
            if step.hook is None:
                step.hook = hook
        state.unhooked_from = len(path.steps)
        previous = state.family_hooks.get("inet") if _hook_family(event.family) == "inet" else None
        if previous is not None and previous != hook and HOOK_RANK[hook] > HOOK_RANK[previous] \
                and path.hooks[-1:] == [previous]:
            ct = _ct_before_hook(event.ct, hook, state.base_type == "nat", path.observations)
            if not state.hook_end_seen:
                path.observations.append(_derived_observation(previous, event, ct))
            for between in HOOKS_BETWEEN.get((previous, hook), ()):
                path.hooks.append(between)
                path.observations.append(_derived_observation(between, event, ct))
        if previous != hook and _hook_family(event.family) == "inet":
            state.hook_end_seen = False
        if not path.hooks or path.hooks[-1] != hook:
            path.hooks.append(hook)

    def _add_step(self, state: _PacketState, event: TraceEvent) -> None:
        stack = state.stack
        depth = stack.enter(event.chain)
        if event.type == "policy":
            self._append(state, event, "policy", None, event.verdict or "unknown", 0)
        elif event.handle is None and event.verdict in ("continue", "return", None):
            # Falling off the end of a chain (a return event on older kernels).
            if stack.in_base_only(event.chain):
                return  # the base chain's policy event follows and says it all
            stack.ret()
            self._append(state, event, "return", None, "return", depth)
        else:
            self._append(state, event, "rule", event.handle, event.verdict or "unknown", depth)
            if event.verdict == "jump" and event.target:
                stack.jump(event.target)
            elif event.verdict == "goto" and event.target:
                # A goto replaces the running chain: its end returns to the caller's caller.
                stack.goto(event.target)
            elif event.verdict == "return":
                stack.ret()
        if event.verdict in FINAL_VERDICTS:
            state.finished = True
            state.path.complete = True
            state.path.verdict = event.verdict
            state.path.decided_by = state.path.steps[-1]

    def _append(self, state: _PacketState, event: TraceEvent, step_type: str, handle: Optional[int],
                verdict: str, depth: int) -> None:
        rule = self.lookup.rule(event.family, event.table, event.chain, handle) if handle is not None else None
        state.path.steps.append(
            Step(
                hook=state.hook,
                family=event.family,
                table=event.table,
                chain=event.chain,
                type=step_type,
                handle=handle,
                rule_number=rule.number if rule else None,
                text=rule.text if rule else None,
                verdict=verdict,
                target=event.target if verdict in ("jump", "goto") else None,
                depth=depth,
                rule_deleted=bool(rule and rule.deleted),
                in_nat_chain=state.base_type == "nat",
            )
        )

    # -- closing ---------------------------------------------------------------------------

    def _close(self, state: _PacketState, forget: bool = True, wait_for_loop: bool = True) -> list:
        """Finish a packet's path; return it unless it is not this run's.

        A finished packet's id is remembered (forget=False) until it starts a new packet or
        goes idle, so that a late event of the same packet is not mistaken for a new one; the
        rest of its state is let go at once.
        A packet that left through loopback is not finished yet: it comes back in at
        prerouting, so its path waits (until idle) for that second half.
        """
        self._open.pop(state.trace_id, None)
        if state.closed:
            return []
        state.closed = True
        if not forget:
            self._finished[state.trace_id] = state.last_seen
            self._finished.move_to_end(state.trace_id)
        path = state.path
        if state.ignored or path.first_packet is None:
            return []
        if path.incomplete_reason == "events lost":
            path.complete = False
            path.verdict = "unknown"
            path.decided_by = None
        elif not path.complete:
            path.incomplete_reason = "went idle"
        finalise_path(path, self.lookup)
        if wait_for_loop and path.complete and path.verdict == "accept" and (
                (path.hooks[-1:] == ["postrouting"] and path.interface_index("oif") in self.loopback_ifindexes)
                or _up_to_bridge_device(path)):
            last = next((o.packet for o in reversed(path.observations) if o.packet is not None), None)
            key = _header_key(last)
            self._looped[key] = (path, state.last_seen)
            self._looped.move_to_end(key)
            return []
        return [path]


def verdict_before_kernel_drop(reason: Optional[str]) -> str:
    """Netfilter's verdict on a packet that the kernel dropped after its traced chains: one rule
    for every reason. The verdict is netfilter's, and `kernel_drop` says what happened next.
    Netfilter let the packet go on (accept: every chain it passed accepted it) unless the kernel
    says that netfilter dropped it outside the traced chains (NETFILTER_DROP: conntrack, an
    untraced table). A packet that vanished before netfilter was done with it
    (`vanished_after`) has no deciding step: the kernel, not a chain, decided its fate."""
    return "drop" if reason == "NETFILTER_DROP" else "accept"


def _derived_observation(hook: str, event: TraceEvent, ct: Optional[ConntrackInfo]) -> HookObservation:
    """The end of `hook`, as the first chain of a later hook saw the packet (see the module's
    docstring); before routing there is no output interface."""
    oif = None if hook in BEFORE_ROUTING else event.oif
    return HookObservation(hook, event.table, event.chain, event.packet, event.iif, oif, event.mark, ct,
                           own=True, family=event.family, derived=True)


def _ct_before_hook(ct: Optional[ConntrackInfo], hook: str, nat_chain: bool, earlier: list) -> Optional[ConntrackInfo]:
    """The conntrack entry as the packet entered `hook`, from an event of the first chain that
    saw it there.

    Headers are rewritten after a NAT chain has run, but the status bits at once: the event
    of a NAT chain's first matching rule (`nat_chain`) already says `snat` if that rule
    masqueraded, and so does a later chain's after a legacy nat table. The kernel runs NAT
    chains only for a connection whose NAT of that kind is not set up yet, so such bits are
    this hook's doing. Where an earlier event said the entry's status, bits it did not have
    are this hook's doing in any case."""
    set_here = NAT_STATUS_SET_ON.get(hook)
    if ct is None or set_here is None or set_here.isdisjoint(ct.status):
        return ct
    before = next((observation.ct for observation in reversed(earlier) if observation.ct is not None), None)
    if before is None and not nat_chain:
        return ct
    kept = set(before.status) if before is not None else set()
    return replace(ct, status=tuple(bit for bit in ct.status if bit not in set_here or bit in kept))


def _hook_family(family: str) -> str:
    """The hooks a table's chains attach to: ip, ip6 and inet tables share the IP hooks."""
    return "inet" if family in ("ip", "ip6", "inet") else family


def _up_to_bridge_device(path: PacketPath) -> bool:
    """A bridged frame whose path ended at the bridge's input hook: it goes on up the stack
    of the bridge device itself, as a new trace id."""
    last = path.observations[-1] if path.observations else None
    return last is not None and last.family == "bridge" and last.hook == "input"


def _header_key(packet: Optional[PacketHeaders]) -> tuple:
    if packet is None:
        return ()
    return (packet.src, packet.dst, packet.proto, packet.sport, packet.dport, packet.icmp_type)


def finalise_path(path: PacketPath, lookup: Optional[RuleLookup] = None) -> None:
    """Derive the deciding step and the NAT rewrites once the path is over."""
    if path.verdict == "accept" and path.decided_by is None and path.vanished_after is None:
        path.decided_by = deciding_accept(path.steps, lookup)
    path.nat = nat_rewrites(path.observations, path.steps)


NAT_TIER = 2  # accept_tier of a NAT step: it accepts every packet it sees


def accept_tier(step: Step, lookup: Optional[RuleLookup] = None) -> int:
    """How much an accepting step says about why a packet was let through: 0 for chains that
    filter, 1 for raw and mangle tables and chains at their priorities or of type route (they
    accept nearly everything by policy), 2 for NAT (a masquerade rule, a nat chain's policy:
    they accept every packet they see)."""
    if step.backend == "iptables-legacy":
        return {"nat": NAT_TIER, "raw": 1, "mangle": 1}.get(step.table, 0)
    if _is_nat_step(step, lookup):
        return NAT_TIER
    chain = lookup.chain(step.family, step.table, step.chain) if lookup is not None else None
    if chain is None:
        return 0
    priority = priority_value(chain.priority, chain.family)
    return 1 if chain.type == "route" or (priority is not None and priority <= MANGLE_PRIORITY) else 0


def deciding_accept(steps: list, lookup: Optional[RuleLookup] = None) -> Optional[Step]:
    """The step that let an accepted packet through: the last accepting step of the most
    telling chains (see accept_tier); among chains that filter, an accepting rule over a later
    policy (on a host with two firewalls, the other one's default lets through what this
    one's rule chose to)."""
    accepting = [step for step in steps if step.verdict == "accept"]
    if len(accepting) < 2:
        return accepting[0] if accepting else None  # the common case needs no ranking
    return choose_accept([(step, accept_tier(step, lookup)) for step in accepting])


def choose_accept(accepting: list) -> Optional[Step]:
    """deciding_accept's choice among (step, accept_tier) pairs in path order: steps of
    several namespaces each need their own namespace's ruleset for their tier."""
    if not accepting:
        return None
    lowest = min(tier for _, tier in accepting)
    best = [step for step, tier in accepting if tier == lowest]
    rules = [step for step in best if step.type == "rule"] if lowest == 0 else []
    return (rules or best)[-1]


def _is_nat_step(step: Step, lookup: Optional[RuleLookup]) -> bool:
    if step.in_nat_chain or (step.text and _NAT_STATEMENT_RE.search(step.text)):
        return True
    chain = lookup.chain(step.family, step.table, step.chain) if lookup is not None else None
    return chain is not None and chain.type == "nat"


def _endpoint(packet: PacketHeaders, side: str) -> str:
    if side == "src":
        return endpoint_text(packet.src, packet.sport)
    return endpoint_text(packet.dst, packet.dport)


def _same_endpoint(one: PacketHeaders, other: PacketHeaders, side: str) -> bool:
    if side == "src":
        address, port, other_address, other_port = one.src, one.sport, other.src, other.sport
    else:
        address, port, other_address, other_port = one.dst, one.dport, other.dst, other.dport
    return port == other_port and (address is other_address or address == other_address)


# NAT statements as nft lists them (`dnat ip to 10.0.0.2:80`, `masquerade`, `redirect to :8080`),
# not the `ct status dnat` match; and iptables' NAT targets (`-j DNAT --to-destination ...`, a
# legacy table's rule as iptables-save writes it).
_NAT_STATEMENT_RE = re.compile(r"\b(snat|dnat)\b(?=\s+(?:ip6?\s+)?(?:prefix\s+)?to\b)|\b(masquerade|redirect)\b"
                               r"|-j\s+(SNAT|DNAT|MASQUERADE|REDIRECT)\b")
_NAT_KINDS = {"src": ("snat", "masquerade"), "dst": ("dnat", "redirect")}


def _nat_rule(steps: list, hook: Optional[str], side: str) -> tuple[Optional[str], Optional[Step]]:
    """The last rule on `hook` whose NAT statement rewrites `side`."""
    for step in reversed(steps):
        if step.hook != hook or step.type != "rule" or not step.text:
            continue
        for match in _NAT_STATEMENT_RE.finditer(step.text):
            kind = (match.group(1) or match.group(2) or match.group(3)).lower()
            if kind in _NAT_KINDS[side]:
                return kind, step
    return None, None


# The hooks where NAT rewrites each side: DNAT and redirect before routing (prerouting, and
# output for locally sent packets), SNAT and masquerade after it (postrouting, and input).
_REWRITTEN_AT = {"dst": ("prerouting", "output"), "src": ("postrouting", "input")}


def nat_rewrites(observations: list, steps: list = ()) -> list:
    """Each change of source or destination between consecutive hook observations.

    nftrace's observation chain runs last on every hook where NAT can happen, so a change
    shows at the hook that made it. A derived observation (the end of a hook, as the next
    hook's first chain saw the packet) counts only for a side that its hook can rewrite: NAT
    that ran unseen at the next hook before that chain (a legacy nat table; conntrack's
    mapping for a connection's later packets) would otherwise show at the hook before, such
    as forward, which rewrites nothing. `kind` and `rule` name the NAT rule on that hook
    (dnat, snat, masquerade, redirect; an nft statement or an iptables target); null means
    that no rule ran: the packet's connection already had its NAT mapping (every packet after
    a connection's first, and its replies), and conntrack applied it.
    """
    changes = []
    previous = {"src": None, "dst": None}
    for observation in observations:
        packet = observation.packet
        if packet is None:
            continue
        for side in ("src", "dst"):
            if observation.derived and observation.hook not in _REWRITTEN_AT[side]:
                continue
            before_packet, previous[side] = previous[side], packet
            if before_packet is None or _same_endpoint(before_packet, packet, side):
                continue  # the common case, decided without making text
            before, after = _endpoint(before_packet, side), _endpoint(packet, side)
            if before != after:
                kind, step = _nat_rule(steps, observation.hook, side)
                changes.append({"hook": observation.hook, "field": side, "from": before, "to": after,
                                "kind": kind,
                                "rule": step.location() if step else None})
    return changes


__all__ = [
    "HOOK_ORDER",
    "HookObservation",
    "PacketPath",
    "PacketPathBuilder",
    "PathBuilder",
    "Step",
    "TERMINAL_VERDICTS",
    "choose_accept",
    "deciding_accept",
    "finalise_path",
    "nat_rewrites",
]
