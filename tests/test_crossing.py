"""A packet's parts in several namespaces joined into one answer, without a kernel: segments
as each namespace's path builder finishes them in, joined packets out."""

from __future__ import annotations

import ipaddress

from nftrace.trace.crossing import CrossingJoiner, assign_namespace, join_segments
from nftrace.trace.events import PacketHeaders
from nftrace.trace.paths import HookObservation, PacketPath, Step

CLIENT, PUBLIC, SERVER, OTHER = (ipaddress.ip_address(a) for a in ("10.77.1.2", "10.77.1.1", "10.77.2.2", "10.77.1.9"))


def headers(dst=PUBLIC, dport=2222, src=CLIENT, sport=40000, ip_id=7, seq=1000):
    return PacketHeaders(src, dst, 6, 60, sport, dport, tcp_flags=2, ip_id=ip_id, tcp_seq=seq, tcp_ack=0)


def step(hook, chain, verdict, handle=5, table="filter", kind="rule"):
    return Step(hook=hook, family="inet", table=table, chain=chain, type=kind, handle=handle, rule_number=1,
                text=f"{chain} rule", verdict=verdict)


def segment(netns, hooks, packets, verdict, steps=(), decided_by=None, trace_id=1):
    """A finished path of one namespace: `packets` are the headers seen at each hook."""
    path = PacketPath(trace_id)
    path.hooks = list(hooks)
    path.observations = [HookObservation(hook, "nftrace_1_abc", f"obs_{hook}", packet, 2, 3, None, None, True)
                         for hook, packet in zip(hooks, packets)]
    path.steps = list(steps)
    path.verdict, path.complete = verdict, verdict != "unknown"
    path.decided_by = decided_by
    path.first_seen = path.last_seen = 1.0
    return assign_namespace(path, netns)


def router_segment(ip_id=7, trace_id=1):
    """DNAT of PUBLIC:2222 to SERVER:22 at prerouting, accepted in forward: it leaves for the server."""
    before, after = headers(ip_id=ip_id), headers(SERVER, 22, ip_id=ip_id)
    forward = step("forward", "forward", "accept", handle=11)
    return segment("R", ["prerouting", "forward", "postrouting"], [before, after, after], "accept",
                   steps=[step("prerouting", "prerouting", "accept", 3, table="nat"), forward], decided_by=forward,
                   trace_id=trace_id)


def server_segment(ip_id=7, trace_id=2, verdict="drop"):
    arriving = headers(SERVER, 22, ip_id=ip_id)
    decision = step("input", "input", verdict, handle=4)
    return segment("S", ["prerouting", "input"], [arriving, arriving], verdict, steps=[decision],
                   decided_by=decision, trace_id=trace_id)


def is_the_flow(path):
    """The flow asked about: CLIENT → PUBLIC:2222 (as the router sees it first)."""
    packet = path.first_packet
    return packet.src == CLIENT and packet.dst == PUBLIC and packet.dport == 2222


def drained(joiner, now):
    joiner.socket_drained(now)
    return joiner.expire(now)


def test_a_packet_dnatted_to_another_namespace_is_one_answer_decided_where_it_was_dropped():
    joiner = CrossingJoiner(starts=is_the_flow)
    assert joiner.add(router_segment(), 1.0) == []  # it left: its next part may come
    assert joiner.add(server_segment(), 1.01) == []  # the router's part may have had an earlier one
    [packet] = drained(joiner, 1.3)
    assert packet.verdict == "drop"
    assert packet.decided_by.netns == "S" and packet.decided_by.chain == "input"
    assert [(s.netns, s.hook, s.verdict) for s in packet.steps] == [
        ("R", "prerouting", "accept"), ("R", "forward", "accept"), ("S", "input", "drop")]
    assert [segment.netns for segment in packet.segments] == ["R", "S"]
    assert packet.hooks == ["prerouting", "forward", "postrouting", "prerouting", "input"]


def test_parts_read_in_the_wrong_order_are_put_in_the_order_the_packet_met_them():
    joiner = CrossingJoiner(starts=is_the_flow)
    assert joiner.add(server_segment(), 1.0) == []  # came from a link: its first part may still be unread
    joiner.add(router_segment(), 1.01)
    [packet] = drained(joiner, 1.3)
    assert [segment.netns for segment in packet.segments] == ["R", "S"]
    assert packet.first_packet.dst == PUBLIC


def test_a_packet_that_never_reaches_the_next_namespace_ends_where_it_ended():
    joiner = CrossingJoiner(starts=is_the_flow)
    joiner.add(router_segment(), 1.0)
    assert drained(joiner, 1.1) == []  # within the window
    [packet] = drained(joiner, 1.3)
    assert packet.verdict == "accept" and [s.netns for s in packet.segments] == ["R"]
    assert packet.decided_by.netns == "R" and packet.decided_by.handle == 11


def test_waiting_ends_only_once_every_socket_was_read_empty_after_the_window():
    joiner = CrossingJoiner(starts=is_the_flow)
    joiner.add(router_segment(), 1.0)
    assert joiner.expire(5.0) == []  # a backlog may still hold the server's part
    joiner.add(server_segment(), 5.0)
    [packet] = drained(joiner, 5.3)
    assert [segment.netns for segment in packet.segments] == ["R", "S"]


def test_a_packet_that_came_in_on_a_link_waits_for_a_part_before_it():
    joiner = CrossingJoiner(starts=is_the_flow)
    joiner.add(router_segment(), 1.0)
    joiner.add(server_segment(), 1.01)
    assert joiner.holding == 1  # the client's namespace, if traced, may have sent it
    assert drained(joiner, 1.1) == []


def test_a_part_marked_only_for_one_of_its_ends_is_not_answered_alone():
    joiner = CrossingJoiner(starts=is_the_flow)
    joiner.add(server_segment(), 1.0)
    assert drained(joiner, 2.0) == []
    assert joiner.holding == 0


def test_packets_of_one_flow_are_told_apart_by_their_identity():
    joiner = CrossingJoiner(starts=is_the_flow)
    joiner.add(router_segment(ip_id=7), 1.0)
    joiner.add(router_segment(ip_id=8, trace_id=3), 1.0)
    joiner.add(server_segment(ip_id=8, verdict="accept", trace_id=4), 1.01)
    joiner.add(server_segment(ip_id=7, trace_id=2), 1.02)
    first, second = sorted(drained(joiner, 1.3), key=lambda packet: packet.segments[0].trace_id)
    assert (second.verdict, second.segments[0].trace_id) == ("accept", 3)
    assert (first.verdict, first.segments[0].trace_id) == ("drop", 1)


def test_packets_with_the_same_headers_are_joined_oldest_first():
    joiner = CrossingJoiner(starts=is_the_flow)
    joiner.add(router_segment(trace_id=1), 1.0)
    joiner.add(router_segment(trace_id=3), 1.0)
    joiner.add(server_segment(trace_id=2), 1.01)
    alone, joined = sorted(drained(joiner, 1.3), key=lambda packet: len(packet.segments))
    assert [s.trace_id for s in joined.segments] == [1, 2] and [s.trace_id for s in alone.segments] == [3]


def test_a_packet_through_three_namespaces_is_joined_whatever_order_its_parts_come_in():
    joiner = CrossingJoiner(starts=is_the_flow)
    client_headers = headers()
    client = segment("C", ["output", "postrouting"], [client_headers, client_headers], "accept")
    assert joiner.add(server_segment(), 1.0) == []
    assert joiner.add(client, 1.0) == []
    [packet] = joiner.add(router_segment(), 1.0)  # nothing is missing at either end now
    assert [segment.netns for segment in packet.segments] == ["C", "R", "S"]
    assert packet.verdict == "drop" and packet.decided_by.netns == "S"


def test_a_packet_sent_by_a_local_socket_waits_for_no_earlier_part():
    joiner = CrossingJoiner(starts=lambda path: True)
    local = headers(SERVER, 22)
    decision = step("output", "output", "drop")
    [packet] = joiner.add(segment("R", ["output"], [local], "drop", [decision], decision), 1.0)
    assert packet.verdict == "drop"


def test_an_accepted_packet_is_decided_by_the_most_telling_accept_of_all_namespaces():
    router = router_segment()
    server = server_segment(verdict="accept")
    server.steps = [step("input", "input", "accept", kind="policy", handle=None)]
    packet = join_segments([router, server])
    assert packet.decided_by.netns == "R" and packet.decided_by.handle == 11  # a rule over a later policy


def test_nat_rewrites_say_in_which_namespace_they_happened():
    router = router_segment()
    router.nat = [{"hook": "prerouting", "field": "dst", "from": "10.77.1.1:2222", "to": "10.77.2.2:22",
                   "kind": "dnat", "rule": None}]
    packet = join_segments([router, server_segment()])
    assert packet.nat == [dict(router.nat[0], netns="R")]


def test_flush_answers_what_still_waits():
    joiner = CrossingJoiner(starts=is_the_flow)
    joiner.add(router_segment(), 1.0)
    [packet] = joiner.flush()
    assert packet.verdict == "accept" and joiner.holding == 0
