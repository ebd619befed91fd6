"""Pairing kernel drops with packet paths: which traced packet did the kernel free, and why.

Why the order of reading matters: the kernel queues a packet's trace events on nftrace's
netlink socket while netfilter runs, before the packet can be freed; bpftrace learns of the
drop only after that. So once the socket has been read empty after a drop (`note_drained`),
every event of the dropped packet has been read. Until then, under a backlog, its events may
still be queued: a drop newer than the last time the socket was read empty never closes an
open packet (it may be a later packet of the same flow whose end is still unread), nor makes
`drops` build what it holds back.

The same fact bounds how long before its packet was read a drop can have happened: a
packet's events read after the socket was last read empty were queued, so the packet was
dropped, after that moment. Under a backlog that is long before the packet is read: the
pairing window reaches back to it (`PacketSignature.earliest`), not a fixed second; and no
further: an older drop is another packet's (one whose events were lost, say).

Pure: drops come in as `KernelDrop` records (reasons.py), whatever read them.

A flood of one flow files thousands of packets a second under the same headers: every index
here keeps each header key's items in time order, and a drop is compared with the few items
nearest to it in time, never with all of them.
"""

from __future__ import annotations

import bisect
from collections import deque
from itertools import islice
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from ..protocols import PORT_PROTOCOL_NUMBERS, endpoint_text, protocol_name
from ..trace.paths import PacketPath, verdict_before_kernel_drop
from .reasons import KernelDrop, explain, header_key
from .routing import RouteQuestions

# A drop happens after its packet's trace events were generated; nftrace reads those events
# some time later. So a drop may precede the first reading by that delay: back to the last
# time the socket was read empty before it, and never further (EARLY only before the socket
# was first read empty); and it follows the last event by little more than the kernel's own
# work (LATE).
MATCH_EARLY_SECONDS = 1.0
MATCH_LATE_SECONDS = 0.25
# How long a packet that netfilter accepted waits for a drop before its answer is given.
HOLD_SECONDS = 0.3
# How long drops and answered packets are remembered for pairing.
REMEMBER_SECONDS = 10.0
REMEMBER_MAX = 4096
# A drop is compared with this many items on each side of its time, among those filed under
# its headers.
NEIGHBOURS = 4
# Shapes whose headers are kept (PacketSignature.of).
SHAPES_KEPT = 1024


@dataclass(slots=True, eq=False)
class PacketSignature:
    """What pairing a drop with a packet needs, and all that is kept of an answered packet.

    Made for every packet a flood finishes, and never changed once made (not frozen: a frozen
    dataclass costs a microsecond more to make)."""

    trace_id: int
    headers: tuple  # (src, dst, proto, sport, dport) at each hook where they were seen, NAT included
    first_seen: float  # when nftrace read its first event, and its last
    last_seen: float
    dropped_by_rule: bool
    iif: Optional[int]
    keys: tuple = ()  # `headers` as header_key()s
    # Netfilter let it through to its end (nftrace's observation chain, last on the exit hook,
    # saw it leave): no netfilter drop can follow, so a NETFILTER_DROP is never its.
    left_netfilter: bool = False
    # The earliest its drop can have happened: its events were queued after this.
    earliest: float = float("-inf")
    # Its events were queued by then (kernel/queuetime.py), maybe long before they were read; its
    # drop came soon after. Packets of the same headers are read in the order their drops were
    # made, and each takes its drop as it comes: the oldest drop that fits is this one's. The
    # nearest to its reading is a later packet's as soon as the reading lags the kernel by more
    # than the gap between two packets (a burst read a tenth of a second behind took the newest
    # drops, packet after packet, and left the oldest to no one).
    queued_by: Optional[float] = None

    @classmethod
    def of(cls, path: PacketPath, earliest: Optional[float] = None, shapes: Optional[dict] = None,
           queued_by: Optional[float] = None) -> "PacketSignature":
        """`shapes`: what was read of paths made from a known shape (trace/shapes.py), by shape:
        every path of one shape has the same headers, interfaces and verdict."""
        read = shapes.get(path.shape) if shapes is not None and path.shape is not None else None
        if read is None:
            read = cls._read(path)
            if shapes is not None and path.shape is not None:
                if len(shapes) >= SHAPES_KEPT:
                    shapes.clear()
                shapes[path.shape] = read
        headers, keys, dropped_by_rule, iif, left_netfilter = read
        return cls(path.trace_id, headers, path.first_seen, path.last_seen or path.first_seen, dropped_by_rule, iif,
                   keys, left_netfilter, path.first_seen - MATCH_EARLY_SECONDS if earliest is None else earliest,
                   queued_by)

    @staticmethod
    def _read(path: PacketPath) -> tuple:
        headers, keys = [], []
        for observation in path.observations:
            packet = observation.packet
            if packet is None:
                continue
            ports = packet.proto in PORT_PROTOCOL_NUMBERS
            fields = (packet.src, packet.dst, packet.proto, packet.sport if ports else None,
                      packet.dport if ports else None)
            key = header_key(*fields)
            if key not in keys:
                keys.append(key)
                headers.append(fields)
        return (tuple(headers), tuple(keys), path.verdict == "drop" and path.decided_by is not None,
                path.interface_index("iif"), path.complete and path.verdict == "accept" and path.vanished_after is None)

    def matches(self, drop: KernelDrop, late_seconds: float = MATCH_LATE_SECONDS) -> bool:
        """Same packet: the headers it had at some hook (before or after NAT), a time that fits.

        A NETFILTER_DROP of a packet that a traced rule dropped says nothing the rule did not
        (see `echoes`), and one of a packet that left netfilter is another packet's (in a flood
        of one flow, the echo of a rule drop whose events were lost would match every packet).
        """
        if drop.reason == "NETFILTER_DROP" and (self.dropped_by_rule or self.left_netfilter):
            return False
        return self.fits(drop, late_seconds)

    def echoes(self, drop: KernelDrop) -> bool:
        """The kernel's own record of the drop that a traced rule made: nothing to report."""
        return drop.reason == "NETFILTER_DROP" and self.dropped_by_rule and self.fits(drop)

    def fits(self, drop: KernelDrop, late_seconds: float = MATCH_LATE_SECONDS) -> bool:
        if drop.key not in self.keys:
            return False
        latest = self.last_seen if self.queued_by is None else min(self.last_seen, self.queued_by)
        return self.earliest <= drop.time <= latest + late_seconds

    def distance(self, drop: KernelDrop) -> float:
        if drop.time < self.first_seen:
            return self.first_seen - drop.time
        return max(0.0, drop.time - self.last_seen)


def _nearest(candidates: Iterable, drop: KernelDrop, late_seconds: float = MATCH_LATE_SECONDS, test=None):
    """The candidate (anything with a `.signature`) that the drop fits best, or None."""
    test = test or (lambda signature: signature.matches(drop, late_seconds))
    matching = [item for item in candidates if test(item.signature)]
    return min(matching, key=lambda item: item.signature.distance(drop)) if matching else None


def kernel_drop_record(drop: KernelDrop, iif_index: Optional[int], interfaces: Optional[dict] = None,
                       routing: Optional[RouteQuestions] = None, mark: Optional[int] = None) -> dict:
    """The drop as an answer shows it: reason, code location, plain words, and for a drop that
    routing has a say in what routing says of it (`routing`, drops/routing.py: the route that
    refused it, the route back that rp_filter weighed, the MTU it met; `mark`: the packet's)."""
    iif = (interfaces or {}).get(iif_index) if iif_index else None
    record = {"reason": drop.reason, "location": drop.code_location(), "explain": explain(drop, iif)}
    facts = routing(drop, iif_index, iif, mark) if routing is not None else None
    words = facts.explain(drop, iif) if facts is not None else None
    if words is not None:
        record["routing"] = facts.to_json()
        record["explain"] = words
    return record


def attach_drop(path: PacketPath, drop: KernelDrop, interfaces: Optional[dict] = None,
                routing: Optional[RouteQuestions] = None) -> None:
    """Put the drop on the packet. A packet that vanished after netfilter (it was never seen
    leaving) is now a complete answer, with netfilter's verdict (verdict_before_kernel_drop)
    and the kernel's drop after it."""
    path.kernel_drop = kernel_drop_record(drop, path.interface_index("iif"), interfaces, routing, path.mark)
    if not path.complete and path.incomplete_reason != "events lost":
        path.complete = True
        path.verdict = verdict_before_kernel_drop(drop.reason)
        path.decided_by = None
        path.vanished_after = path.hooks[-1] if path.hooks else "its first hook"
        path.incomplete_reason = None


def _may_be_dropped_later(path: PacketPath) -> bool:
    """A drop reported after the path finished may still be its: netfilter let it through, or
    it vanished after a hook and was closed before its drop was read (a later packet of the
    flow came under the same trace id: the kernel reuses ids, see KERNEL-FACTS)."""
    if path.complete:
        return path.verdict == "accept"
    return path.incomplete_reason != "events lost" and path.first_packet is not None


class _ByHeaders:
    """Items filed under every header key of their packet, each key's items in the order of
    their packet's last event: a drop is compared only with what had its headers, and among
    those with the few nearest to it in time.

    Filing waits until a drop needs the index: under a flood that the kernel does not drop,
    nearly every item leaves before any drop comes, and is never filed. The items not filed
    yet are the last ones of their owner's queue (`queue`: items are appended to it and leave
    it from the front only), those that left the index meanwhile known by `listed`: so a
    packet costs a count here, and nothing that a flood keeps out of the cache is touched."""

    def __init__(self, queue: deque, listed: Callable[[object], bool]):
        self._items: dict = {}  # key -> ([last_seen], [item]), both in time order
        self._queue = queue
        self._listed = listed  # whether an item of the queue is still to be found here
        self._unfiled = 0  # items appended to the queue since the index was last read

    def add(self, item) -> None:
        """`item` was appended to the queue (whether it is `listed` or not)."""
        self._unfiled += 1

    def _file_every_item(self) -> None:
        latest = list(islice(reversed(self._queue), self._unfiled))  # a deque's middle is slow to index
        for item in reversed(latest):  # in the order they came
            if self._listed(item):
                self._file(item)
        self._unfiled = 0

    def _file(self, item) -> None:
        item.filed = True
        when = item.signature.last_seen
        for key in item.signature.keys:
            times, items = self._items.setdefault(key, ([], []))
            index = bisect.bisect_right(times, when)
            times.insert(index, when)
            items.insert(index, item)

    def remove(self, item) -> None:
        """`item` is no longer to be found (call before it stops being `listed`)."""
        if not item.filed:
            return  # never filed: `listed` keeps it out when it is
        item.filed = False
        when = item.signature.last_seen
        for key in item.signature.keys:
            filed = self._items.get(key)
            if filed is None:
                continue
            times, items = filed
            index = bisect.bisect_left(times, when)
            while index < len(items) and times[index] == when:
                if items[index] is item:
                    del times[index], items[index]
                    break
                index += 1
            if not items:
                del self._items[key]

    def near(self, key: tuple, when: float) -> list:
        """The items filed under `key` nearest to `when`: NEIGHBOURS on each side."""
        if self._unfiled:
            self._file_every_item()
        filed = self._items.get(key)
        if filed is None:
            return []
        times, items = filed
        index = bisect.bisect_left(times, when)
        return items[max(0, index - NEIGHBOURS):index + NEIGHBOURS]


class _Drops:
    """Drops not paired yet, filed by header key in time order, and in arrival order for
    forgetting the oldest."""

    def __init__(self):
        self._arrived: deque = deque()
        self._by_key: dict = {}  # key -> ([time], [drop])
        self._live: set = set()  # ids of the drops still remembered
        self.added = 0  # drops remembered, in all

    def __len__(self) -> int:
        return len(self._live)

    def add(self, drop: KernelDrop) -> None:
        self._arrived.append(drop)
        self._live.add(id(drop))
        self.added += 1
        times, drops = self._by_key.setdefault(drop.key, ([], []))
        index = bisect.bisect_right(times, drop.time)
        times.insert(index, drop.time)
        drops.insert(index, drop)

    def forget(self, drop: KernelDrop) -> None:
        if id(drop) not in self._live:
            return
        self._live.discard(id(drop))
        key = drop.key
        times, drops = self._by_key[key]
        index = bisect.bisect_left(times, drop.time)
        while index < len(drops):
            if drops[index] is drop:
                del times[index], drops[index]
                break
            index += 1
        if not drops:
            del self._by_key[key]

    def near(self, signature: PacketSignature) -> list:
        """Drops under the signature's headers whose time may fit it, nearest first."""
        found = []
        for key in signature.keys:
            filed = self._by_key.get(key)
            if filed is None:
                continue
            times, drops = filed
            low = bisect.bisect_left(times, signature.earliest)
            high = bisect.bisect_right(times, signature.last_seen + REMEMBER_SECONDS)
            middle = bisect.bisect_left(times, signature.first_seen, low, high)
            found += drops[max(low, middle - NEIGHBOURS):min(high, middle + NEIGHBOURS)]
        return found

    def oldest_fitting(self, signature: PacketSignature) -> list:
        """The oldest drops under the signature's headers from its earliest time on."""
        found = []
        for key in signature.keys:
            filed = self._by_key.get(key)
            if filed is not None:
                times, drops = filed
                low = bisect.bisect_left(times, signature.earliest)
                found += drops[low:low + 2 * NEIGHBOURS]
        return found

    def oldest(self) -> Optional[KernelDrop]:
        while self._arrived and id(self._arrived[0]) not in self._live:
            self._arrived.popleft()
        return self._arrived[0] if self._arrived else None

    def __iter__(self):
        """The drops remembered, in the order they were read (not to be changed meanwhile)."""
        return (drop for drop in self._arrived if id(drop) in self._live)


@dataclass(slots=True, eq=False)
class _Held:
    """A finished packet whose answer waits for a possible kernel drop."""

    path: PacketPath
    signature: PacketSignature
    until: float
    waiting: bool = True  # in the index by headers, waiting for a drop
    filed: bool = False  # _ByHeaders' own


@dataclass(slots=True, eq=False)
class _Answered:
    """What is kept of a packet answered as accepted: enough to place a late drop."""

    signature: PacketSignature
    at: float
    settled: bool = False  # a drop came for it since: out of the index
    filed: bool = False  # _ByHeaders' own


class DropCorrelator:
    """Pairs kernel drops with finished packet paths, before their answer is given.

    A packet that netfilter accepted is held for `hold_seconds`: the kernel may still drop
    it (a closed port is found after the input hook). A drop for a packet that is still open
    (it vanished after a hook, e.g. rp_filter after prerouting) closes it at once through
    `vanished`. A drop that comes after the packet's answer was given (a next hop that never
    answers ARP makes the kernel drop the packet seconds later) becomes a note. The kernel's
    NETFILTER_DROP of a packet that a traced rule dropped is its echo: it is consumed.

    Answers come out in the order the packets finished: while one waits, those behind it
    wait too.

    Per batch of drops: `add_drops`, then `PathBuilder.close_vanished(vanished)` and `hold`,
    then `release`; so a drop goes to an open packet before an answered one is considered.
    A caller that says when it last read the drops (`note_drops_read`) has a held packet
    released only once they were read after its wait ended; and one that knows when a
    packet's events were queued (kernel/queuetime.py: long before they were read, under a
    backlog) has its wait counted from then.
    """

    def __init__(self, interfaces: Optional[dict] = None, hold_seconds: float = HOLD_SECONDS,
                 routing: Optional[RouteQuestions] = None):
        self.interfaces = interfaces if interfaces is not None else {}
        self.hold_seconds = hold_seconds
        self.routing = routing  # asks routing about its drops (drops/routing.py); None: the reasons alone
        self.notes: list = []
        # Told of every drop that came after its packet's answer, as kernel_drop_record says it
        # (`drops` still counts it).
        self.on_late: Optional[Callable[[PacketSignature, dict], None]] = None
        # Told of every drop after netfilter (not a NETFILTER_DROP) forgotten without a packet
        # to pair it with (its packet was never built: `drops` kept its events in the kernel
        # and lost them, say), as kernel_drop_record says it: `drops` still counts it, by the
        # drop's own headers.
        self.on_unpaired: Optional[Callable[[KernelDrop, dict], None]] = None
        self._held: deque = deque()  # in the order the packets finished
        self._held_index = _ByHeaders(self._held, lambda held: held.waiting)
        self._drops = _Drops()  # not yet paired
        self._answered: deque = deque()  # answered as accepted
        self._answered_index = _ByHeaders(self._answered, lambda answered: not answered.settled)
        self._echoes: deque = deque()  # dropped by a rule: their NETFILTER_DROP is still to come
        self._echo_index = _ByHeaders(self._echoes, lambda echo: not echo.settled)
        self._drained: list = []  # when the trace sockets were read empty, the last REMEMBER_SECONDS
        self._shapes: dict = {}  # ShapeNode -> what PacketSignature.of read of its paths
        self._drops_read_at: Optional[float] = None  # None: when `release` is called

    def note_drops_read(self, when: float) -> None:
        """Every drop made before `when` has been read (and is given to add_drops next)."""
        if self._drops_read_at is None or when > self._drops_read_at:
            self._drops_read_at = when

    def note_drained(self, now: float) -> None:
        """The trace sockets were read empty at `now`: every event of a packet dropped before
        then has been read (see the module). `now` is taken after every read so far and before
        the sockets were found empty: an event read later was queued after it."""
        drained = self._drained
        if drained and now <= drained[-1]:
            return
        drained.append(now)
        if now - drained[0] > 2 * REMEMBER_SECONDS:
            del drained[:bisect.bisect_left(drained, now - REMEMBER_SECONDS)]

    @property
    def last_drained(self) -> float:
        return self._drained[-1] if self._drained else float("-inf")

    def _signature(self, path: PacketPath, queued_by: Optional[float] = None,
                   queued_after: Optional[float] = None) -> PacketSignature:
        """The path's signature, its drop no earlier than the last time the sockets were read
        empty before its first event was read, nor than `queued_after`."""
        drained = self._drained
        if not drained:  # not read empty yet this run: MATCH_EARLY_SECONDS, unless known better
            return PacketSignature.of(path, queued_after, self._shapes, queued_by)
        index = bisect.bisect_right(drained, path.first_seen)
        # Read empty before the oldest time remembered: its drop is older than any remembered.
        earliest = drained[index - 1] if index else float("-inf")
        if queued_after is not None and queued_after > earliest:
            earliest = queued_after
        return PacketSignature.of(path, earliest, self._shapes, queued_by)

    @property
    def holding(self) -> int:
        return len(self._held)

    @property
    def room(self) -> int:
        """Drops that can still be remembered unpaired before the oldest is forgotten. Under a
        backlog the drops are read long before their packets' events: a reader takes no more
        than this, and leaves the rest where they wait (the watcher's ring), so that no drop is
        forgotten before its packet is read."""
        return max(0, REMEMBER_MAX - len(self._drops))

    def forget_stale(self) -> int:
        """Forget the unpaired drops that no packet can be paired with any more, to make room:
        those made before the trace sockets were read empty, a whole round of reads ago (every
        event of their packets had been read: the packets were held, answered, or closed as
        vanished since, or their events were lost). How many were forgotten."""
        return self._forget_unpaired_before(self._drained[-2]) if len(self._drained) >= 2 else 0

    def forget_unpaired(self) -> None:
        """The end of a run: every drop still unpaired is forgotten (and told of)."""
        self._forget_unpaired_before(float("inf"))

    def _forget_unpaired_before(self, fence: float) -> int:
        forgotten = 0
        while (oldest := self._drops.oldest()) is not None and oldest.time < fence:
            self._forget_unpaired(oldest)
            forgotten += 1
        return forgotten

    def _forget_unpaired(self, drop: KernelDrop) -> None:
        self._drops.forget(drop)
        if self.on_unpaired is not None and drop.reason != "NETFILTER_DROP":
            self.on_unpaired(drop, kernel_drop_record(drop, None, self.interfaces, self.routing))

    def add_drops(self, drops: Iterable[KernelDrop]) -> None:
        for drop in drops:
            key = drop.key
            if drop.reason == "NETFILTER_DROP":
                dropped = _nearest(self._echo_index.near(key, drop.time), drop,
                                   test=lambda signature: signature.echoes(drop))
                if dropped is not None:
                    self._echo_index.remove(dropped)
                    dropped.settled = True
                    continue
            held = _nearest(self._held_index.near(key, drop.time), drop)
            if held is not None:
                attach_drop(held.path, drop, self.interfaces, self.routing)
                self._stop_waiting(held)
                continue
            answered = self._answered_for(drop)
            if answered is not None:
                self._settle(answered, drop)
                continue
            self._drops.add(drop)
        while len(self._drops) > REMEMBER_MAX:
            self._forget_unpaired(self._drops.oldest())

    def unexplained(self) -> Optional[str]:
        """Whether a drop is remembered that no packet built so far accounts for, though every
        event of its packet has been read (the sockets were read empty since): "kernel" for one
        of a reason other than NETFILTER_DROP (the kernel dropped a packet that netfilter let
        through, maybe seconds later), "netfilter" for a NETFILTER_DROP that is no echo of a
        rule's drop (the packet vanished inside netfilter, outside the traced chains); None."""
        fence, found = self.last_drained, None
        for drop in self._drops:  # in the order they were read, which is nearly their time order
            if drop.time >= fence:
                break
            if drop.reason != "NETFILTER_DROP":
                return "kernel"
            found = "netfilter"
        return found

    @property
    def remembered(self) -> int:
        """Drops remembered unpaired so far, in all (it only grows)."""
        return self._drops.added

    def vanished(self, path: PacketPath) -> Optional[KernelDrop]:
        """For PathBuilder.close_vanished: the remembered drop that accounts for an open packet,
        among those older than the last time the sockets were read empty (a newer one may be
        that of a later packet whose events are still queued)."""
        if not len(self._drops):
            return None
        return self._remembered_drop(self._signature(path), before=self.last_drained)

    def hold(self, paths: Iterable, now: float, queued_after: Optional[float] = None,
             queued_by: Optional[float] = None) -> list:
        """Pair each finished path with a remembered drop; return those whose answer is ready.
        `queued_by`: the paths' events were all queued by then (their drops came soon after);
        `queued_after`: their last events were queued after then (so were their drops)."""
        waited_from = now if queued_by is None else min(now, queued_by)
        bound = None if queued_by is None else waited_from  # see PacketSignature.queued_by
        ready = []
        for path in paths:
            signature = self._signature(path, bound, queued_after)
            drop = self._remembered_drop(signature) if len(self._drops) else None
            if drop is not None:
                self._drops.forget(drop)
                attach_drop(path, drop, self.interfaces, self.routing)
            elif signature.dropped_by_rule:
                echo = next((candidate for candidate in self._drops.near(signature) if signature.echoes(candidate)),
                            None) if len(self._drops) else None
                if echo is not None:
                    self._drops.forget(echo)
                else:
                    waiting = _Answered(signature, now)
                    self._echoes.append(waiting)
                    self._echo_index.add(waiting)
            waiting = drop is None and _may_be_dropped_later(path)
            until = waited_from + self.hold_seconds
            if not self._held and (not waiting or until <= self._cutoff(now)):
                # Its wait is over already (under a backlog, nearly every packet's) and nothing
                # waits before it: answered without being filed.
                self._remember_answered(path, signature, now)
                ready.append(path)
                continue
            held = _Held(path, signature, until if waiting else now, waiting=waiting)
            self._held.append(held)
            self._held_index.add(held)
        return ready + self._answer(self._ready(now), now) if self._held else ready

    def release(self, now: float, everything: bool = False) -> list:
        """Held paths whose drop came or whose wait is over (all of them at the end of a run);
        what is remembered for pairing is forgotten when too old (here, not in `hold`, which
        is called for every packet)."""
        ready = self._ready(now, everything)
        self._forget(now)
        return self._answer(ready, now)

    def _cutoff(self, now: float) -> float:
        """A wait that ended before this is over: the drops were read since."""
        return now if self._drops_read_at is None else min(now, self._drops_read_at)

    def _ready(self, now: float, everything: bool = False) -> list:
        ready, held = [], self._held
        now = self._cutoff(now)
        while held:
            head = held[0]
            if not (everything or not head.waiting or head.until <= now):
                break
            held.popleft()
            self._stop_waiting(head)
            ready.append(head)
        return ready

    def _stop_waiting(self, held: _Held) -> None:
        if held.waiting:
            held.waiting = False
            self._held_index.remove(held)

    def _remembered_drop(self, signature: PacketSignature, before: float = float("inf")) -> Optional[KernelDrop]:
        if signature.queued_by is not None:
            candidates = [drop for drop in self._drops.oldest_fitting(signature) if signature.matches(drop)]
            return min(candidates, key=lambda drop: drop.time) if candidates else None
        candidates = [drop for drop in self._drops.near(signature) if drop.time < before and signature.matches(drop)]
        return min(candidates, key=signature.distance) if candidates else None

    def _answer(self, ready: list, now: float) -> list:
        """Remember what a late drop could still belong to: packets answered as accepted. A
        drop remembered before the answer that fits it late is noted now."""
        for held in ready:
            self._remember_answered(held.path, held.signature, now)
        return [held.path for held in ready]

    def _remember_answered(self, path: PacketPath, signature: PacketSignature, now: float) -> None:
        if not (path.complete and path.kernel_drop is None and path.verdict == "accept"):
            return
        answered = _Answered(signature, now)
        if len(self._drops):
            late = self._late_drop(signature)
            if late is not None:
                self._drops.forget(late)
                self._settle(answered, late, filed=False)
                return
        self._answered.append(answered)
        self._answered_index.add(answered)
        if len(self._answered) > REMEMBER_MAX:
            self._expire_answered()

    def _expire_answered(self) -> None:
        answered = self._answered.popleft()
        if not answered.settled:
            self._answered_index.remove(answered)

    def _answered_for(self, drop: KernelDrop) -> Optional[_Answered]:
        return _nearest(self._answered_index.near(drop.key, drop.time), drop, REMEMBER_SECONDS)

    def _late_drop(self, signature: PacketSignature) -> Optional[KernelDrop]:
        candidates = [drop for drop in self._drops.near(signature) if signature.matches(drop, REMEMBER_SECONDS)]
        return min(candidates, key=signature.distance) if candidates else None

    def _settle(self, answered: _Answered, drop: KernelDrop, filed: bool = True) -> None:
        """A drop for a packet already answered as accepted: a note."""
        if filed:
            self._answered_index.remove(answered)
            answered.settled = True  # left in the deque, skipped when it expires
        self._late(answered.signature, drop)

    def _late(self, signature: PacketSignature, drop: KernelDrop) -> None:
        record = kernel_drop_record(drop, signature.iif, self.interfaces, self.routing)
        if self.on_late is not None:
            self.on_late(signature, record)
        src, dst, proto, sport, dport = signature.headers[0]
        packet = f"{endpoint_text(src, sport)} → {endpoint_text(dst, dport)} {protocol_name(proto)}"
        self.notes.append(
            f"the kernel dropped packet {packet} (trace id {signature.trace_id:08x}) after its answer was given: "
            f"{drop.reason} at {record['location']} — {record['explain']}"
        )

    def _forget(self, now: float) -> None:
        while True:
            oldest = self._drops.oldest()
            # Never one whose packet may still be unread (a backlog can be longer than that).
            if oldest is None or now - oldest.time < REMEMBER_SECONDS or oldest.time >= self.last_drained:
                break
            self._forget_unpaired(oldest)
        while self._answered and now - self._answered[0].at >= REMEMBER_SECONDS:
            self._expire_answered()
        while self._echoes and (now - self._echoes[0].at >= REMEMBER_SECONDS or len(self._echoes) > REMEMBER_MAX):
            waiting = self._echoes.popleft()
            if not waiting.settled:
                self._echo_index.remove(waiting)
