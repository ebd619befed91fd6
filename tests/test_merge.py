"""Legacy TRACE lines joined to packets and merged with nftables paths, without a kernel:
hand-written trace events and TRACE lines in, packet paths out."""

from __future__ import annotations

import ipaddress

import pytest

from nftrace.trace.events import PacketHeaders, TraceEvent
from nftrace.iptables.legacy import LegacyRuleset
from nftrace.iptables.merge import (LegacyPathBuilder, LegacyTrail, MergedPathBuilder, last_tables_on_exit_hooks, merge_hooks,
                           merge_steps)
from nftrace.trace.identity import packet_identity
from nftrace.kernel.monitor import EventsLost
from nftrace.iptables.nflog import LegacyTraceEvent
from nftrace.trace.paths import PathBuilder, Step, deciding_accept
from nftrace.trace.ruleset import RulesetSnapshot, priority_value

OWN = "nftrace_1_abcdef"
CLIENT, ROUTER, SERVER = (ipaddress.ip_address(a) for a in ("10.77.1.2", "10.77.1.1", "10.77.2.2"))

SAVE = """*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:CLIENTS - [0:0]
:SSH - [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -s 10.77.1.0/24 -j CLIENTS
-A CLIENTS -p tcp -m tcp --dport 22 -j SSH
-A CLIENTS -p tcp -m tcp --dport 25 -j DROP
-A CLIENTS -p udp -m udp --dport 5000 -j ACCEPT
-A CLIENTS -p tcp -m tcp --dport 2222 -g SSH
-A SSH -s 10.77.1.3/32 -j ACCEPT
-A FORWARD -p tcp -m tcp --dport 443 -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -o r-server -j MASQUERADE
COMMIT
"""

NFT = """table inet fw { # handle 1
\tchain input { # handle 1
\t\ttype filter hook input priority filter + 10; policy accept;
\t\ttcp dport 22 accept # handle 2
\t\tcounter # handle 3
\t}
\tchain pre { # handle 4
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\tcounter # handle 5
\t}
}
"""


@pytest.fixture
def legacy():
    return LegacyRuleset.parse("ip", SAVE)


@pytest.fixture
def snapshot():
    return RulesetSnapshot(NFT)


def packet(dport=25, proto=6, ip_id=7, seq=1000, src=CLIENT, dst=ROUTER):
    return PacketHeaders(src, dst, proto, 60, 40000, dport, tcp_flags=2 if proto == 6 else None, ip_id=ip_id,
                         tcp_seq=seq if proto == 6 else None, tcp_ack=0 if proto == 6 else None)


def line(table, chain, kind, number, hook, pkt):
    return LegacyTraceEvent("ip", table, chain, kind, number, hook, iif=2, packet=pkt)


def nft(trace_id, table, chain, kind="rule", verdict="continue", handle=None, pkt=None, target=None, family="inet"):
    return TraceEvent(trace_id, family, table, chain, kind, verdict, handle=handle, target=target, nfproto=2,
                      iif=2 if pkt is not None else None, packet=pkt)


def marked(trace_id, pkt):
    """What nftrace's own chains send for a packet that arrives: the mark chain's run."""
    return [nft(trace_id, OWN, "mark_prerouting", "policy", "accept", pkt=pkt)]


def observed(trace_id, hook, pkt):
    return nft(trace_id, OWN, f"obs_{hook}", "policy", "accept", pkt=pkt)


def summary_of(path):
    return [(s.backend, s.table, s.chain, s.type, s.rule_number if s.backend != "nft" else s.handle, s.verdict, s.depth)
            for s in path.steps]


# -- joining lines to nftables paths ---------------------------------------------------------


def test_legacy_drop_finishes_the_nft_path_at_once_with_the_legacy_rule(legacy, snapshot):
    pkt = packet(25)
    merged = MergedPathBuilder(PathBuilder(snapshot), snapshot, legacy)
    for event in marked(1, pkt) + [nft(1, "fw", "pre", pkt=pkt, handle=5), nft(1, "fw", "pre", "policy", "accept"),
                                   observed(1, "prerouting", pkt)]:
        assert merged.feed(event) == []
    [path] = merged.feed_legacy([
        line("raw", "PREROUTING", "policy", 1, "prerouting", pkt),
        line("filter", "INPUT", "rule", 2, "input", pkt),
        line("filter", "CLIENTS", "rule", 2, "input", pkt),
    ])
    assert (path.verdict, path.complete, path.incomplete_reason) == ("drop", True, None)
    assert path.decided_by.location() == "iptables filter CLIENTS rule 2: -A CLIENTS -p tcp -m tcp --dport 25 -j DROP"
    assert path.hooks == ["prerouting", "input"]
    assert summary_of(path) == [
        ("iptables-legacy", "raw", "PREROUTING", "policy", None, "accept", 0),
        ("nft", "fw", "pre", "rule", 5, "continue", 0),
        ("nft", "fw", "pre", "policy", None, "accept", 0),
        ("iptables-legacy", "filter", "INPUT", "rule", 2, "jump", 0),
        ("iptables-legacy", "filter", "CLIENTS", "rule", 2, "drop", 1),
    ]
    assert merged.open_packets == 0


def test_a_hook_only_legacy_tables_ran_shows_the_interfaces_of_their_first_line(legacy, snapshot):
    """No chain of nftables (nor of nftrace's) ran at input: the TRACE line's interfaces are all
    there is, and the hook once showed none."""
    from nftrace.trace.render import render_packet

    pkt = packet(25)
    merged = MergedPathBuilder(PathBuilder(snapshot), snapshot, legacy)
    for event in marked(1, pkt) + [observed(1, "prerouting", pkt)]:
        merged.feed(event)
    [path] = merged.feed_legacy([line("filter", "INPUT", "rule", 2, "input", pkt),
                                 line("filter", "CLIENTS", "rule", 2, "input", pkt)])
    assert {observation.hook for observation in path.observations} == {"prerouting"}
    assert "\n  input  in eth1\n    iptables filter INPUT\n" in render_packet(path, {2: "eth1"})


def test_path_finished_by_trace_events_waits_for_the_lines_read_after_them(legacy, snapshot):
    pkt = packet(5000, proto=17)
    merged = MergedPathBuilder(PathBuilder(snapshot), snapshot, legacy)
    events = marked(1, pkt) + [observed(1, "prerouting", pkt), nft(1, "fw", "input", pkt=pkt, handle=3),
                               nft(1, "fw", "input", "policy", "accept"), observed(1, "input", pkt)]
    assert [merged.feed(event) for event in events] == [[], [], [], [], []]
    [path] = merged.feed_legacy([
        line("filter", "INPUT", "rule", 2, "input", pkt),
        line("filter", "CLIENTS", "rule", 3, "input", pkt),
    ])
    # Legacy filter (priority 0) runs before inet fw input (filter + 10).
    assert summary_of(path) == [
        ("iptables-legacy", "filter", "INPUT", "rule", 2, "jump", 0),
        ("iptables-legacy", "filter", "CLIENTS", "rule", 3, "accept", 1),
        ("nft", "fw", "input", "rule", 3, "continue", 0),
        ("nft", "fw", "input", "policy", None, "accept", 0),
    ]
    assert (path.verdict, path.complete) == ("accept", True)


def test_accepted_packet_is_decided_by_the_last_accepting_rule_of_both(legacy, snapshot):
    pkt = packet(5000, proto=17)
    merged = MergedPathBuilder(PathBuilder(snapshot), snapshot, legacy)
    for event in marked(1, pkt) + [observed(1, "prerouting", pkt), nft(1, "fw", "input", pkt=pkt, handle=3),
                                   nft(1, "fw", "input", "policy", "accept"), observed(1, "input", pkt)]:
        merged.feed(event)
    [path] = merged.feed_legacy([
        line("filter", "INPUT", "rule", 2, "input", pkt),
        line("filter", "CLIENTS", "rule", 3, "input", pkt),
        line("nat", "INPUT", "policy", 1, "input", pkt),
    ])
    assert path.verdict == "accept" and path.complete
    assert path.decided_by.location() == "iptables filter CLIENTS rule 3: -A CLIENTS -p udp -m udp --dport 5000 -j ACCEPT"
    assert [s.table for s in path.steps] == ["filter", "filter", "fw", "fw", "nat"]


def test_lines_go_to_the_oldest_packet_that_can_take_them(legacy, snapshot):
    # Two UDP datagrams of one flow with identical headers (IPv4 id 0, same length).
    first, second = packet(5000, proto=17, ip_id=0), packet(5000, proto=17, ip_id=0)
    merged = MergedPathBuilder(PathBuilder(snapshot), snapshot, legacy)
    for event in marked(1, first) + [observed(1, "prerouting", first)]:
        merged.feed(event)
    merged.feed_legacy([line("filter", "INPUT", "rule", 2, "input", first)])
    for event in marked(2, second):
        merged.feed(event)
    merged.feed_legacy([line("raw", "PREROUTING", "policy", 1, "prerouting", second),
                        line("filter", "CLIENTS", "rule", 3, "input", first)])
    merged.feed(observed(1, "input", first))
    [path] = merged.feed_legacy([])
    assert path.trace_id == 1
    assert [(s.table, s.chain) for s in path.steps if s.backend != "nft"] == [("filter", "INPUT"), ("filter", "CLIENTS")]
    [later] = merged.flush()
    assert [(s.table, s.chain) for s in later.steps] == [("raw", "PREROUTING")]


def test_line_read_before_the_trace_event_of_its_packet_waits_for_it(legacy, snapshot):
    # The packet went through between the read of the trace events and the read of the lines.
    pkt = packet(25)
    merged = MergedPathBuilder(PathBuilder(snapshot), snapshot, legacy)
    assert merged.feed_legacy([line("raw", "PREROUTING", "policy", 1, "prerouting", pkt),
                               line("filter", "INPUT", "rule", 2, "input", pkt)], now=0.0) == []
    assert merged.expire(0.1) == []
    for event in marked(1, pkt) + [observed(1, "prerouting", pkt)]:
        merged.feed(event, now=0.2)
    [path] = merged.feed_legacy([line("filter", "CLIENTS", "rule", 2, "input", pkt)], now=0.2)
    assert [(s.table, s.chain) for s in path.steps] == [("raw", "PREROUTING"), ("filter", "INPUT"), ("filter", "CLIENTS")]
    assert path.verdict == "drop"
    assert merged.unmatched_lines == 0


def test_line_of_a_packet_nftrace_does_not_trace_is_counted_not_guessed(legacy, snapshot):
    merged = MergedPathBuilder(PathBuilder(snapshot), snapshot, legacy)
    for event in marked(1, packet(25)):
        merged.feed(event)
    assert merged.feed_legacy([line("filter", "INPUT", "rule", 2, "input", packet(25, seq=999))], now=0.0) == []
    assert merged.unmatched_lines == 0
    merged.expire(merged.PENDING_SECONDS + 0.1)
    assert merged.unmatched_lines == 1


def test_lost_lines_make_open_paths_incomplete(legacy, snapshot):
    pkt = packet(25)
    merged = MergedPathBuilder(PathBuilder(snapshot), snapshot, legacy)
    for event in marked(1, pkt):
        merged.feed(event)
    merged.feed_legacy([EventsLost()])
    [path] = merged.flush()
    assert (path.complete, path.incomplete_reason, path.verdict) == (False, "events lost", "unknown")


# -- legacy lines alone ----------------------------------------------------------------------


def legacy_builder(legacy, **kwargs):
    return LegacyPathBuilder(legacy, last_tables=last_tables_on_exit_hooks(["raw", "filter", "nat"]), **kwargs)


def test_legacy_only_drop_closes_the_packet_with_a_path_of_its_own(legacy):
    pkt = packet(25)
    builder = legacy_builder(legacy)
    done = builder.feed_legacy([line("raw", "PREROUTING", "policy", 1, "prerouting", pkt),
                                line("filter", "INPUT", "rule", 2, "input", pkt),
                                line("filter", "CLIENTS", "rule", 2, "input", pkt)])
    [path] = done
    assert (path.verdict, path.complete, path.hooks) == ("drop", True, ["prerouting", "input"])
    assert path.first_packet == pkt
    assert path.decided_by.rule_number == 2


def test_legacy_only_packet_ends_when_the_last_table_on_its_exit_hook_accepts(legacy):
    pkt = packet(5000, proto=17)
    builder = legacy_builder(legacy)
    assert builder.feed_legacy([line("filter", "INPUT", "rule", 2, "input", pkt),
                                line("filter", "CLIENTS", "rule", 3, "input", pkt)]) == []
    [path] = builder.feed_legacy([line("nat", "INPUT", "policy", 1, "input", pkt)])
    assert (path.verdict, path.complete) == ("accept", True)
    assert path.decided_by.chain == "CLIENTS"


def test_legacy_only_idle_packet_accepted_at_an_exit_hook_went_through(legacy):
    pkt = packet(5000, proto=17)
    builder = legacy_builder(legacy, idle_seconds=2)
    builder.feed_legacy([line("filter", "INPUT", "rule", 2, "input", pkt),
                         line("filter", "CLIENTS", "rule", 3, "input", pkt)], now=0.0)
    assert builder.expire(1.0) == []
    [path] = builder.expire(2.5)
    assert (path.verdict, path.complete) == ("accept", True)


def test_legacy_only_idle_packet_last_seen_at_forward_is_incomplete(legacy):
    pkt = packet(443, dst=SERVER)
    builder = legacy_builder(legacy, idle_seconds=2)
    builder.feed_legacy([line("filter", "FORWARD", "rule", 1, "forward", pkt)], now=0.0)
    [path] = builder.expire(3.0)
    assert (path.complete, path.incomplete_reason) == (False, "went idle")


def test_legacy_only_packets_of_other_flows_are_dropped_on_the_first_line(legacy):
    builder = legacy_builder(legacy, keep=lambda path: path.first_packet.dport == 25)
    builder.feed_legacy([line("raw", "PREROUTING", "policy", 1, "prerouting", packet(80))])
    assert builder.open_packets == 0
    assert builder.feed_legacy([line("filter", "INPUT", "policy", 3, "input", packet(80))]) == []
    assert builder.flush() == []


def test_returns_from_user_chains_unwind_the_jump_stack_down_to_the_policy(legacy):
    pkt = packet(22)
    [path] = legacy_builder(legacy).feed_legacy([
        line("filter", "INPUT", "rule", 2, "input", pkt),
        line("filter", "CLIENTS", "rule", 1, "input", pkt),
        line("filter", "SSH", "return", 2, "input", pkt),
        line("filter", "CLIENTS", "return", 5, "input", pkt),
        line("filter", "INPUT", "policy", 3, "input", pkt),
    ])
    assert summary_of(path) == [
        ("iptables-legacy", "filter", "INPUT", "rule", 2, "jump", 0),
        ("iptables-legacy", "filter", "CLIENTS", "rule", 1, "jump", 1),
        ("iptables-legacy", "filter", "SSH", "return", None, "return", 2),
        ("iptables-legacy", "filter", "CLIENTS", "return", None, "return", 1),
        ("iptables-legacy", "filter", "INPUT", "policy", None, "drop", 0),
    ]
    assert path.decided_by.location() == "iptables filter INPUT policy drop"


def test_goto_returns_to_the_caller_of_the_chain_that_went_there(legacy):
    pkt = packet(2222)
    trail = LegacyTrail(packet_identity(pkt))
    for event in (line("filter", "INPUT", "rule", 2, "input", pkt), line("filter", "CLIENTS", "rule", 4, "input", pkt),
                  line("filter", "SSH", "return", 2, "input", pkt), line("filter", "INPUT", "policy", 3, "input", pkt)):
        trail.add(event, legacy.resolve(event.table, event.chain, event.type, event.rule_number))
    assert [(s.chain, s.type, s.verdict, s.depth) for s in trail.steps] == [
        ("INPUT", "rule", "jump", 0), ("CLIENTS", "rule", "goto", 1), ("SSH", "return", "return", 2),
        ("INPUT", "policy", "drop", 0)]
    assert trail.final is trail.steps[-1]


def test_line_for_a_rule_the_ruleset_does_not_know_keeps_the_kernel_number():
    pkt = packet(25)
    trail = LegacyTrail(packet_identity(pkt))
    trail.add(line("filter", "INPUT", "rule", 7, "input", pkt), None)
    [step] = trail.steps
    assert (step.rule_number, step.text, step.verdict) == (7, None, "unknown")
    assert step.location() == "iptables filter INPUT rule 7: (rule text unknown)"


# -- order and decisions ---------------------------------------------------------------------


def test_priority_names_and_offsets_are_read_like_nft_prints_them():
    assert [priority_value(text) for text in ("filter", "filter + 10", "dstnat", "-350", "raw - 5", "mangle", "srcnat",
                                              "weird")] == [0, 10, -100, -350, -305, -150, 100, None]


def step(backend, table, chain, hook, kind="rule", verdict="continue", depth=0, family="ip"):
    return Step(hook=hook, family=family, table=table, chain=chain, type=kind, handle=1 if backend == "nft" else None,
                rule_number=None if backend == "nft" else 1, text=None, verdict=verdict, depth=depth, backend=backend)


def trail_of(legacy, *lines):
    trail = LegacyTrail(packet_identity(lines[0].packet))
    for event in lines:
        assert trail.takes(event), event
        trail.add(event, legacy.resolve(event.table, event.chain, event.type, event.rule_number))
    return trail


def test_steps_merge_by_hook_then_priority(legacy, snapshot):
    pkt = packet(80)
    nft_steps = [step("nft", "fw", "pre", "prerouting", family="inet"), step("nft", "fw", "input", "input", family="inet"),
                 step("nft", "fw", "input", "input", "policy", "accept", family="inet")]
    trail = trail_of(legacy, line("raw", "PREROUTING", "policy", 1, "prerouting", pkt),
                     line("nat", "PREROUTING", "policy", 1, "prerouting", pkt),
                     line("filter", "INPUT", "rule", 1, "input", pkt),
                     line("nat", "INPUT", "policy", 1, "input", pkt))
    merged = merge_steps(nft_steps, ["prerouting", "input"], trail, snapshot)
    assert [(s.table, s.chain) for s in merged] == [("raw", "PREROUTING"), ("fw", "pre"), ("nat", "PREROUTING"),
                                                    ("filter", "INPUT"), ("fw", "input"), ("fw", "input"),
                                                    ("nat", "INPUT")]


def test_a_packet_back_in_through_loopback_is_merged_after_its_way_out(legacy, snapshot):
    out = packet(22, src=ROUTER, dst=ROUTER)
    back = LegacyTraceEvent("ip", "raw", "PREROUTING", "policy", 1, "prerouting", iif=1, packet=out)
    trail = trail_of(legacy, line("raw", "OUTPUT", "policy", 1, "output", out),
                     line("filter", "OUTPUT", "policy", 1, "output", out),
                     back,
                     LegacyTraceEvent("ip", "filter", "INPUT", "rule", 1, "input", iif=1, packet=out))
    assert trail.passes == 1
    assert trail.hooks == ["output", "prerouting", "input"]
    nft_steps = [step("nft", "fw", "input", "input", "rule", "accept", family="inet")]
    hooks = ["output", "postrouting", "prerouting", "input"]
    merged = merge_steps(nft_steps, hooks, trail, snapshot)
    assert [(s.table, s.chain) for s in merged] == [("raw", "OUTPUT"), ("filter", "OUTPUT"), ("raw", "PREROUTING"),
                                                    ("filter", "INPUT"), ("fw", "input")]
    assert merge_hooks(hooks, trail.hooks) == hooks


def test_without_a_legacy_prerouting_table_the_way_back_in_starts_at_input(legacy):
    out = packet(22, src=ROUTER, dst=ROUTER)
    trail = trail_of(legacy, line("filter", "OUTPUT", "policy", 1, "output", out),
                     LegacyTraceEvent("ip", "filter", "INPUT", "rule", 1, "input", iif=1, packet=out))
    assert (trail.passes, trail.hooks) == (1, ["output", "input"])


def test_a_prerouting_line_from_another_interface_is_not_a_loopback_return(legacy):
    out = packet(22, src=ROUTER, dst=ROUTER)
    trail = trail_of(legacy, line("filter", "OUTPUT", "policy", 1, "output", out))
    assert not trail.takes(line("raw", "PREROUTING", "policy", 1, "prerouting", out))


def test_nat_chains_decide_an_accept_only_when_nothing_else_accepted():
    forward = step("iptables-legacy", "filter", "FORWARD", "forward", verdict="accept")
    masquerade = step("iptables-legacy", "nat", "POSTROUTING", "postrouting", verdict="accept")
    assert deciding_accept([forward, masquerade]) is forward
    assert deciding_accept([masquerade]) is masquerade


def test_filter_policy_decides_over_raw_and_mangle_policies_around_it():
    raw = step("iptables-legacy", "raw", "OUTPUT", "output", "policy", "accept")
    output = step("iptables-legacy", "filter", "OUTPUT", "output", "policy", "accept")
    mangle = step("iptables-legacy", "mangle", "POSTROUTING", "postrouting", "policy", "accept")
    assert deciding_accept([raw, output, mangle]) is output
    assert deciding_accept([raw, mangle]) is mangle


def test_nft_chain_at_mangle_priority_decides_only_without_a_filter_chain(snapshot):
    pre = step("nft", "fw", "pre", "prerouting", "policy", "accept", family="inet")
    forward = step("nft", "other", "forward", "forward", "policy", "accept", family="inet")
    assert deciding_accept([forward, pre], snapshot) is forward
    assert deciding_accept([pre], snapshot) is pre


def test_an_accepting_rule_decides_over_a_later_accepting_policy():
    rule = step("iptables-legacy", "filter", "INPUT", "input", verdict="accept")
    policy = step("nft", "fw", "input", "input", "policy", "accept", family="inet")
    assert deciding_accept([rule, policy]) is rule
    assert deciding_accept([policy]) is policy


def test_packet_identity_ignores_what_nat_rewrites():
    before = packet(80, dst=ROUTER)
    after = PacketHeaders(CLIENT, SERVER, 6, 60, 40000, 8080, tcp_flags=2, ip_id=7, tcp_seq=1000, tcp_ack=0)
    assert packet_identity(before) == packet_identity(after)
    assert packet_identity(before) != packet_identity(packet(80, seq=1001))
