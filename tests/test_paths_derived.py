"""Paths from the events nftrace's table sends now: one `accept` event per own chain, and
observation chains only on the exit hooks (and where NAT is). The end of every other hook is
derived from the next hook's first chain; the answer reads as with an observation everywhere.

Pure: hand-written trace events, as the kernel sends them for such a table.
"""

from __future__ import annotations

import ipaddress

from nftrace.trace.events import ConntrackInfo, PacketHeaders, TraceEvent
from nftrace.trace.paths import PathBuilder
from nftrace.trace.report import conntrack_json
from nftrace.trace.ruleset import RulesetSnapshot

OWN = "nftrace_1_ab"
OTHER = "nftrace_2_cd"
LISTING = f"""table ip nat {{ # handle 1
\tchain prerouting {{ # handle 1
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\ttcp dport 8080 dnat to 10.77.2.2:80 # handle 3
\t}}
}}
table inet fw {{ # handle 2
\tchain forward {{ # handle 1
\t\ttype filter hook forward priority filter; policy drop;
\t\ttcp dport 80 accept # handle 2
\t}}
}}
table inet {OWN} {{ # handle 3
}}
"""
NEW = ConntrackInfo("new", "original", 7, ())


def headers(dst="10.77.2.2", dport=80):
    return PacketHeaders(ipaddress.ip_address("10.77.1.2"), ipaddress.ip_address(dst), 6, 60, 40000, dport)


def event(table, chain, verdict="accept", handle=None, packet=None, iif=None, oif=None, ct=None, family="inet"):
    return TraceEvent(9, family, table, chain, "rule", verdict, handle=handle, packet=packet, iif=iif, oif=oif, ct=ct)


def build(events):
    builder = PathBuilder(RulesetSnapshot(LISTING))
    paths = []
    for item in events:
        paths += builder.feed(item)
    return paths + builder.flush()


def test_a_forwarded_packet_passes_forward_even_with_no_chain_there():
    [path] = build([
        event(OWN, "mark_prerouting", handle=2, packet=headers(), iif=2),
        event(OWN, "obs_postrouting", handle=5, packet=headers(), iif=2, oif=3, ct=NEW),
    ])
    assert (path.complete, path.verdict, path.hooks) == (True, "accept", ["prerouting", "forward", "postrouting"])
    assert [(entry["hook"], entry["state"]) for entry in conntrack_json(path)] == [
        ("prerouting", "new"), ("forward", "new"), ("postrouting", "new")]
    forward = next(o for o in path.observations if o.hook == "forward")
    assert (forward.iif, forward.oif, forward.derived) == (2, 3, True)
    prerouting_end = [o for o in path.observations if o.hook == "prerouting"][-1]
    assert prerouting_end.oif is None  # routing comes after prerouting


def test_a_dnat_without_an_observation_at_prerouting_is_still_read_at_prerouting():
    [path] = build([
        event(OWN, "mark_prerouting", handle=2, packet=headers("10.77.1.1", 8080), iif=2),
        event("nat", "prerouting", handle=3, packet=headers("10.77.1.1", 8080), iif=2, ct=NEW, family="ip"),
        event("fw", "forward", handle=2, packet=headers(), iif=2, oif=3, ct=NEW),
        event(OWN, "obs_postrouting", handle=5, packet=headers(), iif=2, oif=3, ct=NEW),
    ])
    assert path.hooks == ["prerouting", "forward", "postrouting"]
    assert [(change["hook"], change["field"], change["to"], change["kind"]) for change in path.nat] == [
        ("prerouting", "dst", "10.77.2.2:80", "dnat")]
    assert (path.verdict, path.decided_by.chain, path.decided_by.handle) == ("accept", "forward", 2)


def test_a_packet_marked_by_this_run_says_so():
    [path] = build([
        event(OTHER, "mark_prerouting", handle=2, packet=headers(), iif=2),
        event(OWN, "mark_prerouting", handle=2, packet=headers(), iif=2),
        event(OWN, "obs_postrouting", handle=5, packet=headers(), iif=2, oif=3),
    ])
    assert path.marked_by == {OWN, OTHER}
    [other_only] = build([
        event(OTHER, "mark_prerouting", handle=2, packet=headers(), iif=2),
        # Our mark rule did not match (over its rate limit): the chain's end of rules, its policy.
        event(OWN, "mark_prerouting", verdict="continue", packet=headers(), iif=2),
        TraceEvent(9, "inet", OWN, "mark_prerouting", "policy", "accept"),
        event(OTHER, "obs_postrouting", handle=5, packet=headers(), iif=2, oif=3),
    ])
    assert other_only.marked_by == {OTHER}
