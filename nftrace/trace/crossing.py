"""One packet across several network namespaces: its parts joined in the order it met them.

Pure logic: finished per-namespace paths in, joined packet paths out.

Why joining is needed: a veth scrubs a packet that crosses into another namespace, and the
scrub clears the trace bit; the next namespace's own mark chain sets it again, and the trace
id there differs (it hashes the input interface). So each namespace's path builder makes a
path of its own for the packet — a *segment* — and this module puts them together.

How: a segment that leaves its namespace (accepted at postrouting or egress) ends with the
headers the packet left with; the packet's segment in the next namespace starts with the
same headers (`identity.crossing_key`: the packet's identity, and its addresses and ports as
NAT left them). Segments come from several sockets, so their order of arrival is not the
packet's: a segment that leaves waits for its successor, and one that arrived from a link
waits for its predecessor, each for JOIN_SECONDS and until every socket was read empty after
that (the kernel queued a predecessor's events before the packet crossed). When several
packets share a key, the oldest waiting one is taken.

A packet that never reaches the next namespace (dropped, routed elsewhere, or out to a
namespace nftrace does not trace) ends where it ended. A chain of segments is answered when
one of them is the flow asked about (`starts`); the others were marked only because one of
their ends matched (see tracetable's relaxed marks) and are forgotten.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from .identity import crossing_key
from .paths import PacketPath, accept_tier, choose_accept

JOIN_SECONDS = 0.2
# Hooks after which a packet that netfilter let through is on a link, on its way out.
LEAVING_HOOKS = frozenset({"postrouting", "egress"})
# Hooks a packet that came in from a link is first seen at.
ARRIVING_HOOKS = frozenset({"ingress", "prerouting"})


def assign_namespace(path: PacketPath, netns: Optional[str]) -> PacketPath:
    """Say in which namespace a path (its steps, its observations) ran."""
    path.netns = netns
    for step in path.steps:
        step.netns = netns
    for observation in path.observations:
        observation.netns = netns
    return path


def last_packet(path: PacketPath):
    """The headers the packet had when its path ended (after every NAT on it)."""
    for observation in reversed(path.observations):
        if observation.packet is not None:
            return observation.packet
    return None


def leaves(path: PacketPath) -> bool:
    """Netfilter let it out of its namespace: it may go on in another one."""
    return path.complete and path.verdict == "accept" and bool(path.hooks) and path.hooks[-1] in LEAVING_HOOKS


def arrived(path: PacketPath) -> bool:
    """It came in on a link (not sent by a local socket): it may come from another namespace."""
    hook = next((o.hook for o in path.observations if o.hook is not None), None)
    return hook in ARRIVING_HOOKS


def join_segments(segments: list, lookups: Optional[Mapping] = None) -> PacketPath:
    """One path from a packet's segments, in the order it met them.

    The verdict is the last segment's (where the packet ended); an accepted packet is
    decided by the most telling accept of all its segments (paths.choose_accept), each
    step's tier read in its own namespace's ruleset."""
    first, last = segments[0], segments[-1]
    path = PacketPath(first.trace_id)
    path.segments = list(segments)
    for segment in segments:
        path.steps.extend(segment.steps)
        path.observations.extend(segment.observations)
        path.hooks.extend(segment.hooks)
        path.nat.extend(dict(change, netns=segment.netns) for change in segment.nat)
    path.complete = all(segment.complete for segment in segments)
    path.incomplete_reason = next((s.incomplete_reason for s in segments if s.incomplete_reason), None)
    path.verdict = last.verdict if path.complete else "unknown"
    path.kernel_drop = last.kernel_drop
    path.first_seen = min(s.first_seen for s in segments if s.first_seen) if any(s.first_seen for s in segments) else 0.0
    path.last_seen = max(s.last_seen for s in segments)
    if path.verdict == "accept":
        lookups = lookups or {}
        path.decided_by = choose_accept([(step, accept_tier(step, lookups.get(segment.netns)))
                                         for segment in segments for step in segment.steps if step.verdict == "accept"])
    elif path.complete:
        path.decided_by = last.decided_by
    return path


@dataclass(eq=False)
class _Chain:
    """Segments of one packet joined so far; waiting at either end for more."""

    segments: list
    head_key: Optional[tuple] = None  # waiting for a predecessor that left with these headers
    tail_key: Optional[tuple] = None  # waiting for a successor that arrives with these headers
    head_since: float = 0.0
    tail_since: float = 0.0

    @property
    def waiting(self) -> bool:
        return self.head_key is not None or self.tail_key is not None


@dataclass
class CrossingJoiner:
    """Joins finished segments from every traced namespace into packets.

    `add` each segment as its namespace's builder finishes it (its `netns` set), call
    `socket_drained` whenever every socket has been read empty, `expire` regularly and
    `flush` at the end; each returns the packets that are complete now.
    """

    starts: Callable[[PacketPath], bool]  # is this segment the flow asked about?
    lookups: Mapping = field(default_factory=dict)  # netns -> its ruleset (RuleLookup)
    window: float = JOIN_SECONDS
    _tails: dict = field(default_factory=dict)  # key -> deque of chains waiting for a successor
    _heads: dict = field(default_factory=dict)  # key -> deque of chains waiting for a predecessor
    _waiting: deque = field(default_factory=deque)  # (since, chain), oldest first
    _drained_at: float = float("-inf")

    def add(self, segment: PacketPath, now: float) -> list:
        predecessor = self._take(self._tails, crossing_key(segment.first_packet)) if arrived(segment) else None
        successor = self._take(self._heads, crossing_key(last_packet(segment))) if leaves(segment) else None
        chain = _Chain((predecessor.segments if predecessor else []) + [segment]
                       + (successor.segments if successor else []))
        if predecessor is not None:
            chain.head_key, chain.head_since = predecessor.head_key, predecessor.head_since
        elif arrived(segment):
            chain.head_key, chain.head_since = crossing_key(segment.first_packet), now
        if successor is not None:
            chain.tail_key, chain.tail_since = successor.tail_key, successor.tail_since
        elif leaves(segment):
            chain.tail_key, chain.tail_since = crossing_key(last_packet(segment)), now
        for other in (predecessor, successor):
            if other is not None:
                self._forget(other)
        if chain.head_key is not None:
            self._heads.setdefault(chain.head_key, deque()).append(chain)
        if chain.tail_key is not None:
            self._tails.setdefault(chain.tail_key, deque()).append(chain)
        if chain.waiting:
            self._waiting.append((now, chain))
            return []
        return self._answer(chain)

    def socket_drained(self, now: float) -> None:
        """Every socket was read empty at `now`: what the kernel queued before is in."""
        self._drained_at = now

    def expire(self, now: float) -> list:
        """Stop waiting where the window has passed and the sockets were drained since."""
        done = []
        limit = self._drained_at - self.window
        while self._waiting and self._waiting[0][0] <= limit:
            _, chain = self._waiting.popleft()
            if not chain.waiting:
                continue  # joined into another chain since, or answered
            if chain.head_key is not None and chain.head_since <= limit:
                self._remove(self._heads, chain.head_key, chain)
                chain.head_key = None
            if chain.tail_key is not None and chain.tail_since <= limit:
                self._remove(self._tails, chain.tail_key, chain)
                chain.tail_key = None
            if chain.waiting:
                self._waiting.append((max(chain.head_since, chain.tail_since), chain))
            else:
                done.extend(self._answer(chain))
        return done

    def flush(self) -> list:
        """The end of the run: every chain is answered as it is."""
        done = []
        for _, chain in self._waiting:
            if chain.waiting:
                self._forget(chain)
                done.extend(self._answer(chain))
        self._waiting.clear()
        return done

    @property
    def holding(self) -> int:
        """Chains still waiting for a part."""
        return sum(1 for _, chain in self._waiting if chain.waiting)

    # -- bookkeeping ----------------------------------------------------------------------

    @staticmethod
    def _take(index: dict, key: Optional[tuple]) -> Optional[_Chain]:
        if key is None:
            return None
        queue = index.get(key)
        if not queue:
            return None
        chain = queue.popleft()
        if not queue:
            del index[key]
        return chain

    @staticmethod
    def _remove(index: dict, key: tuple, chain: _Chain) -> None:
        queue = index.get(key)
        if queue is None:
            return
        try:
            queue.remove(chain)
        except ValueError:
            return
        if not queue:
            del index[key]

    def _forget(self, chain: _Chain) -> None:
        """Take a chain out of both indexes (it joined another, or is answered)."""
        if chain.head_key is not None:
            self._remove(self._heads, chain.head_key, chain)
        if chain.tail_key is not None:
            self._remove(self._tails, chain.tail_key, chain)
        chain.head_key = chain.tail_key = None

    def _answer(self, chain: _Chain) -> list:
        if not any(self.starts(segment) for segment in chain.segments):
            return []
        return [join_segments(chain.segments, self.lookups)]


__all__ = ["CrossingJoiner", "JOIN_SECONDS", "arrived", "assign_namespace", "join_segments", "last_packet", "leaves"]
