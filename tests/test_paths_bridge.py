"""The path builder on bridges and egress chains: the order the kernel runs their hooks in,
written as the events it sends (see tests/test_bridges.py for the same against the kernel).

Interfaces: 2 is port p1, 3 port p2, 4 the bridge br0, 5 an uplink, 6 a device with egress chains.
"""

from __future__ import annotations

from pathkit import first, mark, observe, policy, rule

from nftrace.trace.paths import PathBuilder
from nftrace.trace.ruleset import RulesetSnapshot

P1, P2, BR0, UPLINK, EGRESS_DEV = 2, 3, 4, 5, 6
LISTING = """table bridge l2 { # handle 1
	chain forward { # handle 1
		type filter hook forward priority filter; policy accept;
		udp dport 5555 drop # handle 2
	}
	chain output { # handle 3
		type filter hook output priority filter; policy accept;
	}
}
table inet fw { # handle 2
	chain forward { # handle 1
		type filter hook forward priority filter; policy accept;
		tcp dport 22 accept # handle 2
	}
	chain input { # handle 3
		type filter hook input priority filter; policy accept;
		tcp dport 23 drop # handle 4
	}
}
table netdev out { # handle 3
	chain e { # handle 1
		type filter hook egress device "eth9" priority filter; policy accept;
		tcp dport 25 drop # handle 2
	}
}
"""


def build(events, **devices):
    builder = PathBuilder(RulesetSnapshot(LISTING), bridges=frozenset({BR0}), bridge_out=True, **devices)
    paths = []
    for index, item in enumerate(events):
        paths.extend(builder.feed(item, now=index * 0.001))
    return paths, builder


def test_a_bridged_frame_with_br_netfilter_is_one_path_through_both_families():
    events = [*mark(1, family="bridge", iif=P1), *mark(1, iif=BR0), *observe(1, "prerouting", iif=BR0),
              first(1, "forward", table="l2", family="bridge", iif=P1), policy(1, "forward", "accept", table="l2", family="bridge"),
              first(1, "forward", iif=BR0), rule(1, "forward", 2, "accept"),
              *observe(1, "forward", iif=P1, family="bridge"),
              *observe(1, "postrouting", iif=None, oif=P2, family="bridge"),  # br_netfilter's IP postrouting comes after
              *observe(1, "postrouting", iif=None, oif=BR0)]
    paths, builder = build(events)
    [path] = paths
    assert path.verdict == "accept" and path.complete
    assert [(s.family, s.chain, s.verdict) for s in path.steps] == [("bridge", "forward", "accept"), ("inet", "forward", "accept")]
    assert path.hooks == ["prerouting", "forward", "postrouting"]


def test_a_plain_bridge_path_ends_at_the_bridge_postrouting_hook():
    events = [*mark(1, family="bridge", iif=P1), first(1, "forward", table="l2", family="bridge", iif=P1),
              policy(1, "forward", "accept", table="l2", family="bridge"),
              *observe(1, "forward", iif=P1, family="bridge"), *observe(1, "postrouting", iif=None, oif=P2, family="bridge")]
    [path], _ = build(events)
    assert path.verdict == "accept" and path.hooks == ["prerouting", "forward", "postrouting"]


def test_a_packet_routed_out_through_a_bridge_goes_on_at_the_bridge_output_hook_under_the_same_id():
    events = [*mark(1, iif=UPLINK), first(1, "forward", iif=UPLINK), rule(1, "forward", 2, "accept"),
              *observe(1, "postrouting", iif=None, oif=BR0),
              first(1, "output", table="l2", family="bridge", iif=None), policy(1, "output", "accept", table="l2", family="bridge"),
              *observe(1, "output", iif=None, oif=P2, family="bridge"),
              *observe(1, "postrouting", iif=None, oif=P2, family="bridge")]
    paths, builder = build(events)
    [path] = paths
    assert path.hooks == ["prerouting", "forward", "postrouting", "output", "postrouting"]
    assert [(s.family, s.chain) for s in path.steps] == [("inet", "forward"), ("bridge", "output")]
    assert builder.open_packets == 0


def test_a_frame_for_the_bridge_device_continues_under_its_new_trace_id():
    bridged = [*mark(1, family="bridge", iif=P1), *observe(1, "input", iif=P1, family="bridge")]
    local = [*mark(2, iif=BR0), first(2, "input", iif=BR0), rule(2, "input", 4, "drop")]
    paths, _ = build(bridged + local)
    [path] = paths
    assert path.verdict == "drop" and path.decided_by.chain == "input"
    assert path.hooks == ["prerouting", "input", "prerouting", "input"]
    assert path.interface_index("iif") == P1


def test_a_packet_to_a_device_with_egress_chains_ends_after_them():
    events = [*mark(1, "output"), *observe(1, "postrouting", iif=None, oif=EGRESS_DEV),
              first(1, "e", table="out", family="netdev", iif=None), rule(1, "e", 2, "drop", table="out", family="netdev")]
    paths, _ = build(events, egress=frozenset({EGRESS_DEV}))
    [path] = paths
    assert path.verdict == "drop" and path.hooks == ["output", "postrouting", "egress"]
    assert (path.decided_by.family, path.decided_by.hook) == ("netdev", "egress")


def test_the_same_mark_chain_in_two_families_is_not_a_new_packet():
    events = [*mark(1, family="bridge", iif=P1), *mark(1, iif=BR0), first(1, "input", iif=BR0), rule(1, "input", 4, "drop")]
    [path], _ = build(events)
    assert path.verdict == "drop"


def test_without_bridge_chains_after_it_a_packet_routed_out_through_a_bridge_ends_at_ip_postrouting():
    """IP postrouting runs before the next hop is resolved: the bridge hooks may come much later,
    or never (no answer to ARP), and have nothing of the ruleset's to say."""
    builder = PathBuilder(RulesetSnapshot(LISTING), bridges=frozenset({BR0}), bridge_out=False)
    events = [*mark(1, iif=UPLINK), first(1, "forward", iif=UPLINK), rule(1, "forward", 2, "accept"),
              *observe(1, "postrouting", iif=None, oif=BR0)]
    paths = [path for index, item in enumerate(events) for path in builder.feed(item, now=index * 0.001)]
    [path] = paths
    assert path.verdict == "accept" and path.hooks[-1] == "postrouting"
