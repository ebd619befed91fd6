"""Paths of packets met before, found again by the shape of their events.

Under a flood, packet after packet meets the same rules with the same verdicts, through the
same interfaces, with the same addresses, ports and conntrack entry: only the trace id, the
IPv4 id and the TCP sequence numbers differ, and the path builder reads none of them. So its
work for such a packet is the work it did for the first one. `PathShapes` keeps, for each
sequence of event shapes (TraceEvent.shape) whose packet the builder finished, a copy of the
path it built, and makes the next such packet's path from it: the same steps, hooks, verdict
and NAT, with this packet's trace id, times and headers (each observation takes the headers of
the event it was made from, so nothing that tells packets apart is copied from another).

The builder's answer for a packet depends on that packet's events alone as long as it consults
nothing else: no loss pending, no path waiting for its way back in (loopback, a bridge
device), the ruleset unchanged (PathBuilder forgets every shape when it changes). Where a
packet's events leave the known shapes, the builder is fed them from the packet's first: it
builds what it would have built without this module.
"""

from __future__ import annotations

from typing import Optional

from .paths import HookObservation, PacketPath, Step

# Distinct event sequences kept; a flood of one flow needs a handful. Past this, start over.
MAX_NODES = 4096


class ShapeNode:
    """The event shapes of a packet so far; `path` is set where the builder finished it."""

    __slots__ = ("children", "path", "sources", "decided")

    def __init__(self) -> None:
        self.children: dict = {}
        self.path: Optional[PacketPath] = None
        self.sources: tuple = ()  # for each observation: the index of the event whose headers it has (-1: none)
        self.decided: int = -1  # index of the deciding step (-1: none)


class PathShapes:
    """The known shapes, as a tree: one level per event of a packet."""

    def __init__(self, max_nodes: int = MAX_NODES) -> None:
        self.max_nodes = max_nodes
        self.root = ShapeNode()
        self.nodes = 0
        self.built = 0  # paths made from a known shape

    def forget(self) -> None:
        self.root = ShapeNode()
        self.nodes = 0

    def record(self, events: list, path: PacketPath) -> None:
        """The builder finished `path` from `events` (all with a shape): keep a copy of it for
        the next packet whose events have the same shapes."""
        if path.segments or path.legacy_observations or path.kernel_drop or path.near_misses or path.fix:
            return  # not the builder's alone
        packets = {id(event.packet): number for number, event in enumerate(events) if event.packet is not None}
        sources = []
        for observation in path.observations:
            if observation.packet is None:
                sources.append(-1)
            elif id(observation.packet) in packets:
                sources.append(packets[id(observation.packet)])
            else:
                return  # headers that came from elsewhere: not this packet's events alone
        decided = -1
        if path.decided_by is not None:
            decided = next((number for number, step in enumerate(path.steps) if step is path.decided_by), None)
            if decided is None:
                return
        if self.nodes + len(events) > self.max_nodes:
            self.forget()
        node = self.root
        for event in events:
            child = node.children.get(event.shape)
            if child is None:
                child = node.children[event.shape] = ShapeNode()
                self.nodes += 1
            node = child
        if node.path is None:
            node.sources, node.decided = tuple(sources), decided
            node.path = self._copy(node, path, [event.packet for event in events], path.trace_id,
                                   path.first_seen, path.last_seen, own_steps=True)

    def start(self, shape) -> Optional[ShapeNode]:
        return self.root.children.get(shape)

    def build(self, node: ShapeNode, events: list, first_seen: float, last_seen: float) -> PacketPath:
        """The path of a packet whose events have the shapes that lead to `node` (a finished one)."""
        self.built += 1
        return self._copy(node, node.path, [event.packet for event in events], events[0].trace_id,
                          first_seen, last_seen)

    @staticmethod
    def _copy(node: ShapeNode, path: PacketPath, packets: list, trace_id: int, first_seen: float,
              last_seen: float, own_steps: bool = False) -> PacketPath:
        """A path of its own (callers annotate what they are given): new observations and lists;
        the records they hold (headers, conntrack) are never changed once made.

        Its steps are the shape's own (`own_steps`: new ones, for the shape's path itself): what
        callers set on a step (its namespace, its iptables form) is the same for every path of
        a shape, and a step that must differ is replaced in its path, not changed
        (dryrun/names.py). Copying them was a few per cent of the work of a flood's packet."""
        if own_steps:
            steps = [Step(s.hook, s.family, s.table, s.chain, s.type, s.handle, s.rule_number, s.text, s.verdict,
                          s.target, s.depth, s.rule_deleted, s.iptables, s.in_nat_chain, s.backend, s.netns)
                     for s in path.steps]
        else:
            steps = list(path.steps)
        observations = [HookObservation(o.hook, o.table, o.chain, packets[source] if source >= 0 else None,
                                        o.iif, o.oif, o.mark, o.ct, o.own, o.netns, o.family, o.derived)
                        for o, source in zip(path.observations, node.sources)]
        return PacketPath(
            trace_id, steps, observations, hooks=list(path.hooks), verdict=path.verdict,
            decided_by=steps[node.decided] if node.decided >= 0 else None, complete=path.complete,
            incomplete_reason=path.incomplete_reason, nat=[dict(change) for change in path.nat],
            first_seen=first_seen, last_seen=last_seen, netns=path.netns, interfaces=path.interfaces,
            vanished_after=path.vanished_after, marked_by=set(path.marked_by), shape=node,
        )
