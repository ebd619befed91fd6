"""Which step decided an accepted packet, when NAT chains are on its path. Pure: hand-written
trace events, as the kernel sends them for a masqueraded and a port-forwarded packet."""

from __future__ import annotations

import ipaddress

from nftrace.trace.events import PacketHeaders, TraceEvent
from nftrace.trace.paths import PathBuilder
from nftrace.trace.ruleset import RulesetSnapshot

LISTING = """table ip nat { # handle 1
\tchain prerouting { # handle 1
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tiifname "r-server" tcp dport 2222 dnat to 10.77.1.2:22 # handle 3
\t}
\tchain postrouting { # handle 2
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname "r-server" masquerade # handle 4
\t}
}
table inet filter { # handle 2
\tchain forward { # handle 1
\t\ttype filter hook forward priority filter; policy drop;
\t\tct status dnat accept # handle 2
\t\tiifname "r-client" oifname "r-server" accept # handle 3
\t}
}
table inet nftrace_1_ab { # handle 3
}
"""
OWN = "nftrace_1_ab"


def headers(src, sport, dst, dport):
    return PacketHeaders(ipaddress.ip_address(src), ipaddress.ip_address(dst), 6, 60, sport, dport)


def event(family, table, chain, type, verdict, handle=None, packet=None, iif=None, oif=None):
    return TraceEvent(7, family, table, chain, type, verdict, handle=handle, packet=packet, iif=iif, oif=oif)


def build(events):
    builder = PathBuilder(RulesetSnapshot(LISTING))
    paths = []
    for item in events:
        paths += builder.feed(item)
    return paths + builder.flush()


def test_a_masqueraded_packet_is_accepted_by_the_forward_rule_not_by_masquerade():
    out = headers("10.77.1.2", 40000, "10.77.2.2", 80)
    natted = headers("10.77.2.1", 40000, "10.77.2.2", 80)
    [path] = build([
        event("inet", OWN, "mark_prerouting", "policy", "accept", packet=out, iif=2),
        event("ip", "nat", "prerouting", "policy", "accept", packet=out, iif=2),
        event("inet", OWN, "obs_prerouting", "policy", "accept", packet=out, iif=2),
        event("inet", "filter", "forward", "rule", "accept", handle=3, packet=out, iif=2, oif=3),
        event("inet", OWN, "obs_forward", "policy", "accept", packet=out, iif=2, oif=3),
        event("ip", "nat", "postrouting", "rule", "accept", handle=4, packet=out, iif=2, oif=3),
        event("inet", OWN, "obs_postrouting", "policy", "accept", packet=natted, iif=2, oif=3),
    ])
    assert path.verdict == "accept"
    assert (path.decided_by.table, path.decided_by.chain, path.decided_by.handle) == ("filter", "forward", 3)
    assert path.nat[0]["field"] == "src"


def test_a_port_forward_is_accepted_by_the_forward_rule_not_by_the_nat_policy_after_it():
    inbound = headers("10.77.2.2", 50000, "10.77.2.1", 2222)
    natted = headers("10.77.2.2", 50000, "10.77.1.2", 22)
    [path] = build([
        event("inet", OWN, "mark_prerouting", "policy", "accept", packet=inbound, iif=3),
        event("ip", "nat", "prerouting", "rule", "accept", handle=3, packet=inbound, iif=3),
        event("inet", OWN, "obs_prerouting", "policy", "accept", packet=natted, iif=3),
        event("inet", "filter", "forward", "rule", "accept", handle=2, packet=natted, iif=3, oif=2),
        event("inet", OWN, "obs_forward", "policy", "accept", packet=natted, iif=3, oif=2),
        event("ip", "nat", "postrouting", "policy", "accept", packet=natted, iif=3, oif=2),
        event("inet", OWN, "obs_postrouting", "policy", "accept", packet=natted, iif=3, oif=2),
    ])
    assert (path.decided_by.chain, path.decided_by.handle, path.decided_by.text) == ("forward", 2, "ct status dnat accept")


def test_with_only_nat_chains_on_the_path_the_last_nat_accept_still_answers():
    inbound = headers("10.77.2.2", 50000, "10.77.2.1", 2222)
    [path] = build([
        event("inet", OWN, "mark_prerouting", "policy", "accept", packet=inbound, iif=3),
        event("ip", "nat", "prerouting", "rule", "accept", handle=3, packet=inbound, iif=3),
        event("inet", OWN, "obs_prerouting", "policy", "accept", packet=inbound, iif=3),
        event("ip", "nat", "postrouting", "policy", "accept", packet=inbound, iif=3, oif=2),
        event("inet", OWN, "obs_postrouting", "policy", "accept", packet=inbound, iif=3, oif=2),
    ])
    assert (path.decided_by.chain, path.decided_by.type) == ("postrouting", "policy")
