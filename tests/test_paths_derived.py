"""Paths from the events nftrace's table sends now: one `accept` event per own chain, and
observation chains only on the exit hooks (and where NAT is). The end of every other hook is
derived from the next hook's first chain; the answer reads as with an observation everywhere.

Pure: hand-written trace events, as the kernel sends them for such a table.
"""

from __future__ import annotations

import ipaddress

from nftrace.trace.events import ConntrackInfo, PacketHeaders, TraceEvent
from nftrace.trace.paths import HookObservation, PathBuilder, _ct_before_hook
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


def test_snat_that_ran_before_the_first_chain_seen_at_postrouting_is_postroutings_not_forwards():
    # A connection's later packet: conntrack applies its masquerade at postrouting (no NAT
    # chain runs), or a legacy nat table does, before nftrace's observation chain, the first
    # chain seen there. The end of forward, derived from that chain's event, shows the new
    # source; forward rewrites nothing, so the change is postrouting's.
    rewritten = PacketHeaders(ipaddress.ip_address("10.77.2.1"), ipaddress.ip_address("10.77.2.2"), 6, 60, 40000, 80)
    [path] = build([
        event(OWN, "mark_prerouting", handle=2, packet=headers(), iif=2),
        event("fw", "forward", handle=2, packet=headers(), iif=2, oif=3, ct=NEW),
        event(OWN, "obs_postrouting", handle=5, packet=rewritten, iif=2, oif=3, ct=NEW),
    ])
    assert [o.hook for o in path.observations if o.derived] == ["prerouting", "forward"]
    assert [(change["hook"], change["field"], change["to"], change["kind"]) for change in path.nat] == [
        ("postrouting", "src", "10.77.2.1:40000", None)]


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


# -- conntrack state before a hook ---------------------------------------------------------------

MASQUERADED = ConntrackInfo("new", "original", 7, ("snat",))


def test_a_packet_a_legacy_table_dropped_has_its_conntrack_state_from_the_conntrack_chain():
    """The mark chain runs before conntrack and the legacy table sends nothing: only the
    conntrack chain (where legacy tables are traced) says the state."""
    [path] = build([
        event(OWN, "mark_prerouting", handle=2, packet=headers(), iif=2),
        event(OWN, "ct_prerouting", handle=4, packet=headers(), iif=2, ct=NEW),
    ])
    assert path.hooks == ["prerouting"] and not path.complete
    assert [(entry["hook"], entry["state"]) for entry in conntrack_json(path)] == [("prerouting", "new")]
    assert [(o.chain, o.own) for o in path.observations] == [("mark_prerouting", True), ("ct_prerouting", True)]


def test_a_masquerade_on_the_way_out_is_not_read_back_into_the_hooks_before():
    """The NAT chain's event already has the `snat` bit its rule set; forward (derived from
    that event) did not have it."""
    listing = LISTING.replace("table inet fw", """table ip masq { # handle 4
\tchain postrouting { # handle 1
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tmasquerade # handle 2
\t}
}
table inet fw""")
    builder = PathBuilder(RulesetSnapshot(listing))
    paths = []
    for item in [event(OWN, "mark_prerouting", handle=2, packet=headers(), iif=2),
                 event(OWN, "ct_prerouting", handle=4, packet=headers(), iif=2, ct=NEW),
                 event("masq", "postrouting", handle=2, packet=headers(), iif=2, oif=3, ct=MASQUERADED, family="ip"),
                 event(OWN, "obs_postrouting", handle=5, packet=headers(), iif=2, oif=3, ct=MASQUERADED)]:
        paths += builder.feed(item)
    [path] = paths + builder.flush()
    assert [(entry["hook"], entry["status"]) for entry in conntrack_json(path)] == [
        ("prerouting", []), ("forward", []), ("postrouting", ["snat"])]


def test_ct_before_hook_strips_only_the_nat_bits_the_hook_itself_sets():
    before = [HookObservation("prerouting", OWN, "ct_prerouting", None, 2, None, 0, NEW, True)]
    assert _ct_before_hook(MASQUERADED, "postrouting", False, before) == NEW  # set here: not there before
    assert _ct_before_hook(MASQUERADED, "postrouting", True, []) == NEW  # a NAT chain's own doing
    # Nothing said before, no NAT chain: the bit may be older than the hook, so it stays.
    assert _ct_before_hook(MASQUERADED, "postrouting", False, []) == MASQUERADED
    # An established connection masqueraded long ago keeps its bit.
    established = ConntrackInfo("established", "original", 7, ("snat", "snat-done"))
    kept = [HookObservation("prerouting", OWN, "ct_prerouting", None, 2, None, 0, established, True)]
    assert _ct_before_hook(established, "postrouting", True, kept) == established
    # Destination NAT bits are prerouting's and output's, not postrouting's.
    dnat = ConntrackInfo("new", "original", 7, ("dnat",))
    assert _ct_before_hook(dnat, "postrouting", True, []) == dnat
    assert _ct_before_hook(dnat, "output", True, []) == ConntrackInfo("new", "original", 7, ())
    assert _ct_before_hook(None, "postrouting", True, before) is None
