"""Paths from the events nftrace's table sends now: one `accept` event per own chain, and
observation chains only on the exit hooks (and where NAT is). The end of every other hook is
derived from the next hook's first chain; the answer reads as with an observation everywhere.

Pure: hand-written trace events, as the kernel sends them for such a table.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

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


# -- postrouting left unobserved (kernel/tracetable.hook_ends) --------------------------------------

OUT_LISTING = f"""table inet fw {{ # handle 2
\tchain early {{ # handle 1
\t\ttype filter hook forward priority filter - 10; policy accept;
\t\tct state invalid drop # handle 2
\t}}
\tchain forward {{ # handle 3
\t\ttype filter hook forward priority filter; policy drop;
\t\tiifname "eth0" jump clients # handle 4
\t}}
\tchain clients {{ # handle 5
\t\ttcp dport 80 accept # handle 6
\t}}
}}
table inet {OWN} {{ # handle 3
}}
"""
ENDS = {("forward", 2): ("inet", "fw", "forward"), ("output", 2): ("inet", OWN, "mark_output")}


def build_unobserved(events, hook_ends=ENDS):
    builder = PathBuilder(RulesetSnapshot(OUT_LISTING), hook_ends=hook_ends)
    paths = []
    for when, item in enumerate(events):
        paths += builder.feed(replace(item, nfproto=2), when * 0.001)
    return paths, builder


FORWARDED = [
    event(OWN, "mark_prerouting", handle=2, packet=headers(), iif=2),
    event("fw", "early", "accept", packet=headers(), iif=2, oif=3, ct=NEW),
    event("fw", "forward", "jump", handle=4, packet=headers(), iif=2, oif=3, ct=NEW),
    event("fw", "clients", handle=6),
]


def test_a_packet_that_the_last_forward_chain_accepts_has_left_when_nothing_runs_at_postrouting():
    [path], _ = build_unobserved(FORWARDED)
    assert (path.complete, path.verdict, path.hooks) == (True, "accept", ["prerouting", "forward", "postrouting"])
    assert (path.decided_by.chain, path.decided_by.handle) == ("clients", 6)
    assert [(entry["hook"], entry["state"]) for entry in conntrack_json(path)] == [
        ("prerouting", "new"), ("forward", "new"), ("postrouting", "new")]
    leaving = path.observations[-1]
    assert (leaving.hook, leaving.oif, leaving.derived, leaving.packet) == ("postrouting", 3, True, headers())


def test_an_accept_by_an_earlier_chain_of_the_hook_is_not_the_end():
    paths, builder = build_unobserved(FORWARDED[:2])
    assert paths == [] and builder.open_packets == 1


def test_an_observation_at_postrouting_that_follows_the_end_starts_no_packet():
    """The table's observation chain is removed once the ruleset is known; packets traced
    before pass it, and a concurrent run's stays."""
    late = event(OWN, "obs_postrouting", handle=5, packet=headers(), iif=2, oif=3, ct=NEW)
    paths, builder = build_unobserved(FORWARDED + [late, replace(late, table=OTHER)])
    assert len(paths) == 1 and builder.flush() == []


def test_a_locally_sent_packet_leaves_at_the_last_chain_of_output_nftraces_mark_chain_here():
    [path], _ = build_unobserved([event(OWN, "mark_output", handle=2, packet=headers(), oif=3)])
    assert (path.complete, path.verdict, path.hooks) == (True, "accept", ["output", "postrouting"])


def test_a_packet_sent_to_loopback_still_waits_for_its_way_back_in():
    local = PacketHeaders(ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("127.0.0.1"), 6, 60, 40000, 80)
    paths, builder = build_unobserved([event(OWN, "mark_output", handle=2, packet=local, oif=1)])
    assert paths == []
    (path,) = builder.flush()
    assert path.hooks == ["output", "postrouting"]


def test_without_hook_ends_the_same_events_wait_for_postrouting():
    paths, builder = build_unobserved(FORWARDED, hook_ends=None)
    assert paths == []
    (path,) = builder.expire(10.0)
    assert (path.complete, path.incomplete_reason) == (False, "went idle")


def test_a_chain_met_at_postrouting_after_the_end_is_the_finished_packets_not_a_new_one():
    """A chain added at postrouting is met by packets before nftrace reads the change (the
    moments of its commit): their events there come after their end. Only a mark chain starts a
    packet under a finished one's id."""
    late = event("late", "post", "drop", handle=2, packet=headers(), iif=2, oif=3, ct=NEW)
    paths, builder = build_unobserved(FORWARDED + [late])
    assert len(paths) == 1 and paths[0].verdict == "accept" and builder.flush() == []
    again, _ = build_unobserved(FORWARDED + FORWARDED)  # the id reused by the next packet: two
    assert len(again) == 2
