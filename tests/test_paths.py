"""The path builder: from the kernel's interleaved trace events to one path per packet.

Each trap of KERNEL-FACTS.md is a test here: trace ids reused by later packets, implicit
returns, goto, policies, several tables on one hook, lost events, events of other packets.
"""

from __future__ import annotations

import random

import pytest
from pathkit import OWN, end_of_chain, event, first, headers, mark, observe, policy, recorded, rule

from nftrace.flow import parse_flow
from nftrace.trace.paths import PathBuilder
from nftrace.trace.report import summary
from nftrace.trace.ruleset import RulesetSnapshot

LISTING = """table inet fw { # handle 1
	chain zone { # handle 2
		ip saddr 10.0.0.5 accept # handle 5
		return # handle 6
	}
	chain leaf { # handle 4
		tcp dport 9999 accept # handle 10
	}
	chain input { # handle 3
		type filter hook input priority filter; policy drop;
		jump zone # handle 7
		tcp dport 22 drop # handle 8
		tcp dport 2323 goto leaf # handle 9
		tcp dport 80 accept # handle 11
	}
	chain prerouting { # handle 12
		type filter hook prerouting priority filter; policy accept;
		tcp dport 22 counter # handle 13
	}
}
table ip extra { # handle 2
	chain input { # handle 1
		type filter hook input priority filter - 10; policy accept;
		tcp dport 4444 drop # handle 2
	}
}
"""
SNAPSHOT = RulesetSnapshot(LISTING)


def build(events, snapshot=SNAPSHOT, keep=None):
    builder = PathBuilder(snapshot, keep=keep)
    paths = []
    for index, item in enumerate(events):
        paths.extend(builder.feed(item, now=index * 0.001))
    return paths + builder.flush()


def only(paths):
    assert len(paths) == 1, paths
    return paths[0]


def steps(path):
    return [(s.chain, s.type, s.handle, s.verdict) for s in path.steps]


# -- the recorded kernel stream -----------------------------------------------------------------

EXPECTED_RECORDED = {
    22: ("accept", "ssh_zone", "rule"),
    9090: ("drop", "input", "rule"),
    8080: ("accept", "web", "rule"),
    2323: ("drop", "reject_zone", "rule"),
    5353: ("drop", "input", "policy"),
    443: ("accept", "forward", "rule"),
    8443: ("drop", "forward", "policy"),
}


def verdicts_by_port(paths):
    return {p.first_packet.dport: (p.verdict, p.decided_by.chain, p.decided_by.type) for p in paths}


def test_recorded_kernel_stream_gives_the_kernels_verdicts():
    snapshot, events, _ = recorded()
    assert verdicts_by_port(build(events, snapshot)) == EXPECTED_RECORDED


def test_interleaving_packets_does_not_change_any_path():
    snapshot, events, _ = recorded()
    by_id = {}
    for item in events:
        by_id.setdefault(item.trace_id, []).append(item)
    rng = random.Random(7)
    queues = [list(v) for v in by_id.values()]
    shuffled = []
    while queues:
        queue = rng.choice(queues)
        shuffled.append(queue.pop(0))
        if not queue:
            queues.remove(queue)
    assert verdicts_by_port(build(shuffled, snapshot)) == EXPECTED_RECORDED


# -- chains, jumps, returns, gotos, policies --------------------------------------------------


def test_falling_off_a_called_chain_is_an_implicit_return():
    events = [*mark(1), *observe(1, "prerouting"),
              first(1, "input", 7, "jump", "zone"), end_of_chain(1, "zone"), end_of_chain(1, "input"),
              policy(1, "input", "drop")]
    path = only(build(events))
    assert steps(path) == [("input", "rule", 7, "jump"), ("zone", "return", None, "return"),
                           ("input", "policy", None, "drop")]
    assert [s.depth for s in path.steps] == [0, 1, 0]
    assert path.verdict == "drop" and path.decided_by.type == "policy"
    assert summary(path) == "dropped by inet fw input policy drop"


def test_explicit_return_rule_is_a_rule_step_with_its_text():
    events = [*mark(1), *observe(1, "prerouting"),
              first(1, "input", 7, "jump", "zone"), rule(1, "zone", 6, "return"), rule(1, "input", 8, "drop")]
    path = only(build(events))
    assert steps(path)[1] == ("zone", "rule", 6, "return")
    assert path.steps[1].text == "return"
    assert path.decided_by.text == "tcp dport 22 drop"
    assert summary(path) == "dropped by inet fw input rule handle 8: tcp dport 22 drop"


def test_goto_from_a_base_chain_returns_straight_to_its_policy():
    events = [*mark(1), *observe(1, "prerouting"),
              first(1, "input", 9, "goto", "leaf"), end_of_chain(1, "leaf"), policy(1, "input", "drop")]
    path = only(build(events))
    assert steps(path) == [("input", "rule", 9, "goto"), ("leaf", "return", None, "return"),
                           ("input", "policy", None, "drop")]
    assert path.steps[0].target == "leaf"
    assert path.decided_by.type == "policy"


def test_accept_in_a_called_chain_decides_once_the_packet_is_delivered():
    events = [*mark(1), *observe(1, "prerouting"),
              first(1, "input", 7, "jump", "zone"), rule(1, "zone", 5, "accept"), *observe(1, "input")]
    path = only(build(events))
    assert path.complete and path.verdict == "accept"
    assert path.decided_by.location() == "inet fw zone rule handle 5: ip saddr 10.0.0.5 accept"
    assert path.hooks == ["prerouting", "input"]


def test_policy_accept_decides_when_no_rule_accepted():
    events = [*mark(1), *observe(1, "prerouting"), first(1, "input", None), policy(1, "input", "accept"),
              *observe(1, "input")]
    path = only(build(events, RulesetSnapshot(LISTING.replace("policy drop", "policy accept"))))
    assert path.verdict == "accept"
    assert summary(path) == "accepted by inet fw input policy accept"


def test_an_earlier_table_accepting_does_not_stop_a_later_one_from_dropping():
    events = [*mark(1, packet=headers(dport=4444)), *observe(1, "prerouting"),
              first(1, "input", 11, "accept"), rule(1, "input", 2, "drop", table="extra", family="ip")]
    events[-1] = first(1, "input", 2, "drop", table="extra", family="ip", packet=headers(dport=4444))
    path = only(build(events))
    assert path.verdict == "drop"
    assert (path.decided_by.family, path.decided_by.table) == ("ip", "extra")
    assert [s.table for s in path.steps] == ["fw", "extra"]


def test_no_chain_on_the_path_means_accepted_with_nobody_deciding():
    events = [*mark(1), *observe(1, "prerouting"), *observe(1, "input")]
    path = only(build(events, RulesetSnapshot("")))
    assert path.verdict == "accept" and path.decided_by is None
    assert summary(path) == "accepted: no chain of the ruleset gave a verdict on its path (prerouting, input)"


def test_nftraces_own_chains_are_never_steps():
    events = [*mark(1), *observe(1, "prerouting"), first(1, "input", 8, "drop")]
    path = only(build(events))
    assert all(not s.table.startswith("nftrace_") for s in path.steps)
    assert path.observations[0].table == OWN


def test_every_step_knows_its_hook():
    events = [*mark(1), first(1, "prerouting", 13), end_of_chain(1, "prerouting"), policy(1, "prerouting", "accept"),
              *observe(1, "prerouting"), first(1, "input", 8, "drop")]
    path = only(build(events))
    assert [(s.chain, s.hook) for s in path.steps] == [("prerouting", "prerouting"), ("prerouting", "prerouting"),
                                                       ("input", "input")]


def test_a_base_chain_unknown_to_the_snapshot_gets_the_hook_of_the_next_observation():
    events = [*mark(1), *observe(1, "prerouting"), first(1, "newchain", 99, "continue", table="newtable"),
              policy(1, "newchain", "accept", table="newtable"), *observe(1, "input")]
    path = only(build(events))
    assert [s.hook for s in path.steps] == ["input", "input"]
    assert path.steps[0].text is None
    assert "rule text unknown" in path.steps[0].location()


# -- which packet is which --------------------------------------------------------------------


def test_a_trace_id_reused_by_a_later_packet_starts_a_new_path():
    ack = headers(sport=40000, dport=80)
    events = [*mark(5, packet=headers(dport=80)), *observe(5, "prerouting"), first(5, "input", 11, "accept"),
              *observe(5, "input"),
              *mark(5, packet=ack), *observe(5, "prerouting", packet=ack), first(5, "input", 11, "accept", packet=ack),
              *observe(5, "input", packet=ack)]
    paths = build(events)
    assert len(paths) == 2
    assert all(p.complete and p.verdict == "accept" for p in paths)
    assert [len(p.steps) for p in paths] == [1, 1]


def test_a_reused_id_seen_again_at_the_mark_chain_splits_an_unfinished_packet():
    events = [*mark(5), *observe(5, "prerouting"),  # vanished after prerouting (routing, rp_filter, ...)
              *mark(5), *observe(5, "prerouting"), first(5, "input", 8, "drop")]
    paths = build(events)
    assert [p.complete for p in paths] == [False, True]
    assert paths[0].verdict == "unknown" and paths[0].incomplete_reason == "went idle"
    assert summary(paths[0]).startswith("not seen after prerouting")
    assert paths[1].verdict == "drop"


def test_events_of_several_packets_are_grouped_by_trace_id():
    a = [*mark(1), *observe(1, "prerouting"), first(1, "input", 8, "drop")]
    b = [*mark(2, packet=headers(dport=80)), *observe(2, "prerouting"),
         first(2, "input", 11, "accept", packet=headers(dport=80)), *observe(2, "input")]
    interleaved = [x for pair in zip(a, b) for x in pair] + b[len(a):]
    paths = build(interleaved)
    assert {p.trace_id: p.verdict for p in paths} == {1: "drop", 2: "accept"}


def test_the_middle_of_a_path_without_its_start_is_ignored():
    events = [rule(9, "input", 8, "drop")]
    assert build(events) == []


def test_packets_not_of_the_flow_are_dropped_at_their_first_headers():
    flow = parse_flow("10.0.0.5", "10.0.0.9", "tcp", dport=80)

    def keep(path):
        p = path.first_packet
        return flow.matches(p.src, p.dst, p.proto, p.sport, p.dport)

    events = [*mark(1), *observe(1, "prerouting"), first(1, "input", 8, "drop"),
              *mark(2, packet=headers(dport=80)), *observe(2, "prerouting"),
              first(2, "input", 11, "accept", packet=headers(dport=80)), *observe(2, "input")]
    paths = build(events, keep=keep)
    assert [p.trace_id for p in paths] == [2]


# -- what could not be seen -------------------------------------------------------------------


def test_a_packet_open_when_events_were_lost_is_incomplete_never_a_verdict():
    builder = PathBuilder(SNAPSHOT)
    for item in [*mark(1), *observe(1, "prerouting"), first(1, "input", 7, "jump", "zone")]:
        builder.feed(item)
    builder.mark_loss()
    (path,) = builder.feed(policy(1, "input", "drop"))
    assert not path.complete and path.verdict == "unknown" and path.decided_by is None
    assert path.incomplete_reason == "events lost"
    assert summary(path).startswith("incomplete: trace events were lost")


def test_quiet_packets_are_closed_by_expiry():
    builder = PathBuilder(SNAPSHOT, idle_seconds=2.0)
    for item in [*mark(1), *observe(1, "prerouting")]:
        builder.feed(item, now=10.0)
    assert builder.expire(11.0) == []
    (path,) = builder.expire(12.5)
    assert path.incomplete_reason == "went idle"
    assert builder.open_packets == 0


def test_nat_rewrites_are_read_from_headers_between_hooks():
    forwarded = headers(dst="10.0.1.2", dport=80)
    events = [*mark(1, packet=headers(dport=8080)), *observe(1, "prerouting", packet=forwarded),
              *observe(1, "forward", packet=forwarded, oif=3), *observe(1, "postrouting", packet=forwarded, oif=3)]
    path = only(build(events, RulesetSnapshot("")))
    assert [(n["hook"], n["field"], n["from"], n["to"]) for n in path.nat] == [
        ("prerouting", "dst", "10.0.0.9:8080", "10.0.1.2:80")]
    assert path.hooks == ["prerouting", "forward", "postrouting"]


@pytest.mark.parametrize("verdict", ["queue", "stolen"])
def test_queue_and_stolen_end_the_path(verdict):
    events = [*mark(1), *observe(1, "prerouting"), first(1, "input", 8, verdict)]
    path = only(build(events))
    assert path.verdict == verdict and path.complete


def test_headline_tree_shows_jumps_indented():
    from nftrace.trace.render import render_packet

    events = [*mark(1), *observe(1, "prerouting"),
              first(1, "input", 7, "jump", "zone"), end_of_chain(1, "zone"), rule(1, "input", 8, "drop")]
    text = render_packet(only(build(events)), {2: "eth0"})
    lines = text.splitlines()
    assert lines[0] == "DROP   10.0.0.5:40000 → 10.0.0.9:22 tcp  dropped by inet fw input rule handle 8: tcp dport 22 drop"
    assert "      [7] jump zone  → jump zone" in lines
    assert "          ↩ return (end of zone)" in lines
    assert lines[1] == "  prerouting  in eth0"


def test_when_no_packet_was_seen_a_live_trace_points_to_the_dry_run():
    from nftrace.trace.render import render_closing
    from nftrace.trace.report import TraceReport

    flow = parse_flow("10.0.0.5", "10.0.0.9", "udp", None, 9, None, None)
    assert render_closing(TraceReport(flow=flow), 0) == ("no packet of 10.0.0.5 → 10.0.0.9:9 udp was seen "
                                                        "(`--dry-run` traces a crafted one, no traffic needed)")
    dry = TraceReport(flow=flow, mode="dry-run", dry_run={"ruleset": "copy"})
    assert render_closing(dry, 0) == "no packet of 10.0.0.5 → 10.0.0.9:9 udp was seen"
    v6 = parse_flow("fd00::5", "fd00::9", "udp", None, 9, None, None)
    assert render_closing(TraceReport(flow=v6), 0).endswith(
        "(`--dry-run` traces a crafted one, no traffic needed, and the sender's neighbour solicitation before it)")


def test_a_packet_looping_through_lo_is_one_path_across_its_two_trace_ids():
    local = headers(src="127.0.0.1", dst="127.0.0.1", dport=8080)
    out = [event(3, OWN, "mark_output", handle=3, packet=local, oif=1), event(3, OWN, "mark_output", "policy", "accept"),
           *observe(3, "output", packet=local, iif=None, oif=1), *observe(3, "postrouting", packet=local, iif=None, oif=1)]
    back = [*mark(4, packet=local, iif=1), *observe(4, "prerouting", packet=local, iif=1),
            first(4, "input", 8, "drop", packet=local, iif=1)]
    path = only(build(out + back))
    assert path.hooks == ["output", "postrouting", "prerouting", "input"]
    assert path.verdict == "drop" and path.decided_by.handle == 8


def test_a_looped_packet_whose_second_half_never_comes_is_still_reported():
    local = headers(src="127.0.0.1", dst="127.0.0.1", dport=8080)
    out = [event(3, OWN, "mark_output", handle=3, packet=local, oif=1), event(3, OWN, "mark_output", "policy", "accept"),
           *observe(3, "output", packet=local, iif=None, oif=1), *observe(3, "postrouting", packet=local, iif=None, oif=1)]
    builder = PathBuilder(SNAPSHOT)
    assert [p for e in out for p in builder.feed(e, now=1.0)] == []
    (path,) = builder.expire(10.0)
    assert path.verdict == "accept" and path.hooks == ["output", "postrouting"]


def test_packets_starting_before_the_socket_is_drained_after_a_loss_are_incomplete_too():
    builder = PathBuilder(SNAPSHOT)
    builder.mark_loss()  # ENOBUFS: the gap is after what is still queued
    done = [p for e in [*mark(1), *observe(1, "prerouting"), first(1, "input", 8, "drop")] for p in builder.feed(e)]
    builder.socket_drained()
    done += [p for e in [*mark(2), *observe(2, "prerouting"), first(2, "input", 8, "drop")] for p in builder.feed(e)]
    assert [(p.trace_id, p.verdict, p.complete) for p in done] == [(1, "unknown", False), (2, "drop", True)]
