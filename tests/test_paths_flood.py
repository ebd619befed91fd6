"""PathBuilder under a flood: what it keeps, for how long, and what expiry looks at.

Pure logic: hand-written events of forwarded packets (nftrace's mark and observation chains
around one ruleset rule), fed with explicit times.
"""

from __future__ import annotations

import ipaddress

from nftrace.trace.events import PacketHeaders, TraceEvent
from nftrace.trace.paths import PathBuilder
from nftrace.trace.ruleset import RulesetSnapshot

TABLE = "nftrace_1_abcdef"
PACKET = PacketHeaders(ipaddress.ip_address("10.77.1.2"), ipaddress.ip_address("10.77.2.2"), 17, 35, 40000, 5000)
SNAPSHOT = RulesetSnapshot(
    "table inet fw { # handle 1\n"
    "\tchain forward { # handle 1\n"
    "\t\ttype filter hook forward priority filter; policy drop;\n"
    "\t\tudp dport 5000 accept # handle 2\n"
    "\t}\n"
    "}\n"
)


def forwarded_packet(trace_id: int, finished: bool = True) -> list:
    """The events of one UDP packet forwarded by `inet fw forward`; without the last hook's
    observation when not `finished`."""
    events = [
        TraceEvent(trace_id, "inet", TABLE, "mark_prerouting", "rule", "continue", handle=2, nfproto=2, iif=2,
                   packet=PACKET),
        TraceEvent(trace_id, "inet", TABLE, "mark_prerouting", "policy", "accept", nfproto=2),
        TraceEvent(trace_id, "inet", TABLE, "obs_prerouting", "policy", "accept", nfproto=2, iif=2, packet=PACKET),
        TraceEvent(trace_id, "inet", "fw", "forward", "rule", "accept", handle=2, nfproto=2, iif=2, oif=3,
                   packet=PACKET),
        TraceEvent(trace_id, "inet", TABLE, "obs_forward", "policy", "accept", nfproto=2, iif=2, oif=3, packet=PACKET),
    ]
    if finished:
        events.append(TraceEvent(trace_id, "inet", TABLE, "obs_postrouting", "policy", "accept", nfproto=2, iif=2,
                                 oif=3, packet=PACKET))
    return events


def test_forwarded_packet_is_complete_when_postrouting_is_observed():
    builder = PathBuilder(SNAPSHOT)
    done = [path for event in forwarded_packet(1) for path in builder.feed(event, 0.0)]
    assert len(done) == 1
    assert (done[0].complete, done[0].verdict, done[0].hooks) == (True, "accept", ["prerouting", "forward", "postrouting"])
    assert done[0].decided_by.text == "udp dport 5000 accept"


def test_finished_packets_are_remembered_by_id_only_until_they_expire():
    builder = PathBuilder(SNAPSHOT, idle_seconds=2.0)
    for trace_id in range(1000):
        for event in forwarded_packet(trace_id):
            builder.feed(event, 0.0)
    assert builder.open_packets == 0
    assert builder.tracked_ids == 1000
    builder.expire(2.0)
    assert builder.tracked_ids == 0


def test_a_late_event_of_a_finished_packet_is_swallowed():
    builder = PathBuilder(SNAPSHOT)
    for event in forwarded_packet(1):
        builder.feed(event, 0.0)
    late = TraceEvent(1, "inet", "fw", "forward", "rule", "accept", handle=2, nfproto=2)
    assert builder.feed(late, 0.5) == []
    assert builder.open_packets == 0


def test_a_flood_of_distinct_ids_holds_only_the_packets_of_the_idle_window():
    builder = PathBuilder(SNAPSHOT, idle_seconds=2.0)
    largest = 0
    for trace_id in range(20_000):
        now = trace_id / 1000  # 1,000 packets a second for 20 seconds
        for event in forwarded_packet(trace_id):
            builder.feed(event, now)
        builder.expire(now)
        largest = max(largest, builder.tracked_ids)
    assert largest <= 2001


def test_expire_closes_the_idle_packets_and_only_them():
    builder = PathBuilder(SNAPSHOT, idle_seconds=2.0)
    for event in forwarded_packet(1, finished=False):
        builder.feed(event, 0.0)
    for event in forwarded_packet(2, finished=False):
        builder.feed(event, 1.0)
    expired = builder.expire(2.5)
    assert [path.trace_id for path in expired] == [1]
    assert (expired[0].complete, expired[0].incomplete_reason) == (False, "went idle")
    assert [path.trace_id for path in builder.expire(3.0)] == [2]


def test_a_packet_that_gets_an_event_is_not_expired_by_its_earlier_silence():
    builder = PathBuilder(SNAPSHOT, idle_seconds=2.0)
    first, *rest = forwarded_packet(1, finished=False)
    builder.feed(first, 0.0)
    for event in forwarded_packet(2, finished=False):
        builder.feed(event, 0.5)
    for event in rest:
        builder.feed(event, 1.5)  # packet 1 is now the most recently active
    assert [path.trace_id for path in builder.expire(2.6)] == [2]
    assert [path.trace_id for path in builder.expire(3.5)] == [1]


def test_a_reused_id_after_a_finished_packet_starts_a_new_packet():
    builder = PathBuilder(SNAPSHOT)
    done = [path for event in forwarded_packet(7) + forwarded_packet(7) for path in builder.feed(event, 0.0)]
    assert len(done) == 2
    assert all(path.complete for path in done)
