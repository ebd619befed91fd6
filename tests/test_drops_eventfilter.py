"""The kernel keeps, for `nftrace drops`, exactly the trace events its answer needs.

Three trace sockets listen side by side in a router namespace while real flows cross its
ruleset (jumps, gotos, a verdict map, returns, accepts, rule drops, a reject, policy drops):
one unfiltered, one with drops' classic socket filter, one with its kernel stash. The filtered
socket must receive exactly the events that `needed` (the rule, stated in Python) picks out of
the unfiltered one, and those events must still give every packet the verdict and the
deciding rule that all its events give; the stash must hand over those of the dropped packets
only, and hold those of the accepted ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import NamedTuple

import pytest

from conftest import REPO, lab_topology, load_ruleset, traffic
from test_live_nftables import ROUTER_RULESET
from nftrace.drops.eventfilter import drops_event_filter
from nftrace.kernel.sockfilter import Program
from nftrace.kernel.tracetable import is_trace_table
from nftrace.lab.topology import ROUTER_CLIENT_V4, SERVER_V4
from nftrace.trace.events import decode_trace_message
from nftrace.trace.paths import PathBuilder
from nftrace.trace.ruleset import RulesetSnapshot

# (proto, host, port): each reaches the router's ruleset a different way.
FLOWS = (
    ("tcp", ROUTER_CLIENT_V4, "22"),  # jump, accept in the called chain
    ("tcp", ROUTER_CLIENT_V4, "9090"),  # verdict map: drop
    ("tcp", ROUTER_CLIENT_V4, "8080"),  # verdict map: jump, counter accept
    ("tcp", ROUTER_CLIENT_V4, "2323"),  # goto, reject
    ("udp", ROUTER_CLIENT_V4, "5353"),  # jump, off the end, policy drop
    ("tcp", ROUTER_CLIENT_V4, "4444"),  # a drop in another table's base chain
    ("tcp", SERVER_V4, "443"),  # forwarded, accepted
    ("tcp", SERVER_V4, "8443"),  # forwarded, policy drop
)

LISTENERS = r"""
import json, sys, time
from nftrace.drops.eventfilter import drops_event_filter
from nftrace.flow import parse_flow
from nftrace.kernel.monitor import TraceMonitor
from nftrace.kernel.nft import NftContext
from nftrace.kernel.tracetable import TraceTable
from nftrace.drops.eventstash import EventStash
every, filtered, stashed = TraceMonitor(), TraceMonitor(), TraceMonitor()
filtered.keep_only(drops_event_filter(), "drops' filter")
stashed.hold_back(EventStash({1}))
nft = NftContext()
table = TraceTable(nft, parse_flow("0.0.0.0/0", "0.0.0.0/0"), max_rate=0)
table.install()
table.observe(frozenset())
listing = nft.list_ruleset()
print("ready", flush=True)
sys.stdin.readline()
time.sleep(0.5)
read = {}
for name, monitor in (("every", every), ("filtered", filtered), ("stashed", stashed)):
    read[name] = [d.hex() for d in monitor.read_raw() if d is not None]
read["dumped"] = [[d.hex() for d in packet.datagrams] for packet in stashed.stash.dump()]
table.remove()
json.dump({"listing": listing, **read}, sys.stdout)
"""


def needed(event) -> bool:
    """The events `drops` reads (nftrace/drops/eventfilter.py), as a rule on decoded events."""
    if event.starts_base_chain or is_trace_table(event.table):
        return True
    if event.type == "return":
        return False
    if event.type == "policy":
        return event.verdict != "accept"
    return event.verdict not in ("accept", "continue", "jump", "goto", "return")


class Captured(NamedTuple):
    every: list  # the unfiltered socket's events
    filtered: list  # the classic filter's
    snapshot: RulesetSnapshot
    stashed: list  # the stash's records (and socket), as events
    dumped: list  # the stash's packets left at the end, each a list of events


@pytest.fixture(scope="module")
def captured() -> Captured:
    with lab_topology("evfilter", lambda topo: load_ruleset(topo.router, ROUTER_RULESET)) as lab:
        listeners = subprocess.Popen(["ip", "netns", "exec", lab.router, sys.executable, "-c", LISTENERS],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={"PYTHONPATH": str(REPO)})
        try:
            assert listeners.stdout.readline().strip() == "ready"
            for proto, host, port in FLOWS:
                subprocess.run(traffic(lab.client, proto, host, port, *(["--timeout", "0.5"] if proto == "tcp" else [])),
                               capture_output=True, timeout=30)
            out, _ = listeners.communicate("done\n", timeout=60)
        finally:
            if listeners.poll() is None:
                listeners.kill()
        data = json.loads(out)
    every = [decode_trace_message(bytes.fromhex(d)) for d in data["every"]]
    filtered = [decode_trace_message(bytes.fromhex(d)) for d in data["filtered"]]
    stashed = [decode_trace_message(bytes.fromhex(d)) for d in data["stashed"]]
    dumped = [[decode_trace_message(bytes.fromhex(d)) for d in packet] for packet in data["dumped"]]
    return Captured(every, filtered, RulesetSnapshot(data["listing"]), stashed, dumped)


def test_the_kernel_keeps_exactly_the_events_drops_needs(captured):
    every, filtered = captured.every, captured.filtered
    assert filtered == [event for event in every if needed(event)]
    assert len(filtered) < len(every)


def test_the_discarded_events_are_the_ones_that_say_a_packet_went_on(captured):
    every, filtered = captured.every, captured.filtered
    discarded = [event for event in every if event not in filtered]
    kinds = {(event.type, event.verdict) for event in discarded}
    # an accept in a called chain, the end of a chain's rules, a base chain's accept policy
    assert {("rule", "accept"), ("rule", "continue"), ("policy", "accept")} <= kinds, kinds
    assert not any(event.starts_base_chain or is_trace_table(event.table) for event in discarded)


def _paths(events, snapshot) -> dict:
    builder = PathBuilder(snapshot)
    paths = []
    for event in events:
        paths += builder.feed(event)
    paths += builder.flush()
    return {(path.first_packet.dport if path.first_packet else None, path.trace_id): path for path in paths}


def test_every_packet_keeps_its_verdict_and_its_deciding_rule(captured):
    every, filtered, snapshot = captured.every, captured.filtered, captured.snapshot
    full, lean = _paths(every, snapshot), _paths(filtered, snapshot)
    assert full.keys() == lean.keys()
    assert _same_answers(full, lean) >= 5  # 9090, 2323 (reject), 5353, 4444, 8443, and their retries


def _dropped_ids(events, snapshot) -> set:
    return {trace_id for (_, trace_id), path in _paths(events, snapshot).items() if path.verdict == "drop"}


def test_the_kernel_stash_hands_over_exactly_the_events_of_dropped_packets(captured):
    """eventstash.py: what the classic filter keeps, of the packets that ended in a drop, and
    nothing of the others."""
    every, filtered, snapshot, stashed = captured.every, captured.filtered, captured.snapshot, captured.stashed
    dropped = _dropped_ids(every, snapshot)
    assert len(dropped) >= 5
    assert stashed == [event for event in filtered if event.trace_id in dropped]
    full, lean = _paths(every, snapshot), _paths(stashed, snapshot)
    assert _same_answers({key: path for key, path in full.items() if key[1] in dropped}, lean) == len(dropped)


def test_the_kernel_stash_keeps_the_accepted_packets_until_asked(captured):
    """After a kernel drop that no packet explains, `drops` takes what is stashed: the
    accepted packets, each with the events the classic filter keeps."""
    every, filtered, snapshot, dumped = captured.every, captured.filtered, captured.snapshot, captured.dumped
    dropped = _dropped_ids(every, snapshot)
    accepted = {event.trace_id for event in every} - dropped
    assert {packet[0].trace_id for packet in dumped} == accepted
    for packet in dumped:
        assert packet == [event for event in filtered if event.trace_id == packet[0].trace_id]


def _same_answers(full: dict, lean: dict) -> int:
    """Every packet of `full` has in `lean` the same verdict, and a dropped one the same
    deciding rule and hooks; returns how many were dropped."""
    assert full.keys() == lean.keys()
    dropped = 0
    for key, path in full.items():
        assert (lean[key].verdict, lean[key].complete) == (path.verdict, path.complete), key
        if path.verdict == "drop":
            dropped += 1
            mine, theirs = lean[key].decided_by, path.decided_by
            assert (mine.family, mine.table, mine.chain, mine.handle, mine.text, mine.hook, mine.type) == \
                (theirs.family, theirs.table, theirs.chain, theirs.handle, theirs.text, theirs.hook, theirs.type), key
            assert lean[key].hooks == path.hooks, key
    return dropped


def test_a_program_jumps_to_its_labels_and_refuses_what_it_cannot_encode():
    program = Program().load_constant(1).jump_if_equal(1, true="yes").discard().label("yes").accept()
    code = program.assemble()
    assert len(code) == 8 * len(program) == 32
    assert code[8 + 2] == 1  # jeq's true offset skips the discard
    with pytest.raises(ValueError, match="undefined label"):
        Program().jump_if_equal(0, true="nowhere").assemble()
    with pytest.raises(ValueError, match="defined twice"):
        Program().label("a").label("a")
    far = Program().jump_if_equal(0, true="end")
    for _ in range(300):
        far.discard()
    with pytest.raises(ValueError, match="out of a jump's reach"):
        far.label("end").accept().assemble()


def test_drops_filter_fits_in_classic_bpf():
    assert 0 < len(drops_event_filter()) < 4096  # BPF_MAXINSNS
