"""nftrace's own trace rules as the kernel receives them (JSON commands), without a kernel."""

from __future__ import annotations

from nftrace.flow import parse_flow
from nftrace.kernel.tracetable import (bridge_table_commands, egress_commands, flow_match, hook_ends, mark_ends,
                                       rule_writes_headers, trace_table_commands)
from nftrace.trace.ruleset import RulesetSnapshot

FLOW = parse_flow("10.0.0.5", "10.0.0.9", "tcp", None, 22)


def keys(exprs):
    """What each match compares: ('meta', 'nfproto'), ('payload', 'daddr'), ..."""
    found = []
    for expr in exprs:
        left = expr["match"]["left"]
        kind = next(iter(left))
        found.append((kind, left[kind].get("key") or left[kind].get("field"), expr["match"]["right"]))
    return found


def test_ip_chains_tell_the_family_by_the_hooks_protocol_and_bridge_chains_by_the_ether_type():
    assert keys(flow_match(FLOW, "prerouting"))[0] == ("meta", "nfproto", "ipv4")
    assert keys(flow_match(FLOW, "prerouting", "bridge"))[0] == ("meta", "protocol", "ip")
    assert keys(flow_match(parse_flow("fd00::1", "fd00::2"), "egress", "netdev"))[0] == ("meta", "protocol", "ip6")


def test_bridge_and_netdev_chains_do_not_match_ip_interface_names():
    flow = parse_flow("10.0.0.5", "10.0.0.9", iif="eth0")
    assert ("meta", "iifname", "eth0") in keys(flow_match(flow, "prerouting"))
    assert all(key[1] != "iifname" for key in keys(flow_match(flow, "prerouting", "bridge")))


def test_a_trace_across_namespaces_marks_each_end_of_the_flow_on_its_own():
    assert mark_ends(FLOW, relaxed=False) == (None,)
    assert mark_ends(FLOW, relaxed=True) == ("src", "dst")
    src_end = keys(flow_match(FLOW, "prerouting", end="src"))
    assert ("payload", "saddr", "10.0.0.5") in src_end and all(k[1] not in ("daddr", "dport") for k in src_end)
    dst_end = keys(flow_match(FLOW, "prerouting", end="dst"))
    assert ("payload", "daddr", "10.0.0.9") in dst_end and ("payload", "dport", 22) in dst_end


def test_an_end_that_says_nothing_gets_no_rule_of_its_own():
    """A rule for an unconstrained end would mark every packet of the protocol."""
    assert mark_ends(parse_flow("0.0.0.0/0", "10.0.0.9", "tcp", None, 22), relaxed=True) == ("dst",)
    assert mark_ends(parse_flow("0.0.0.0/0", "0.0.0.0/0", "tcp"), relaxed=True) == (None,)


def test_egress_devices_get_a_mark_chain_before_their_chains_and_an_observation_after():
    commands = [c["add"]["chain"] for c in egress_commands("nftrace_1_abc", FLOW, 100, ["eth0", "eth1"]) if "chain" in c["add"]]
    assert [(c["name"], c["dev"], c["prio"]) for c in commands] == [
        ("mark_egress@0", "eth0", -10000), ("obs_egress@0", "eth0", 2**31 - 1),
        ("mark_egress@1", "eth1", -10000), ("obs_egress@1", "eth1", 2**31 - 1)]
    assert all(c["family"] == "netdev" and c["hook"] == "egress" for c in commands)


def test_bridge_frames_are_marked_at_bridge_prerouting_before_the_rulesets_chains():
    chains = [c["add"]["chain"] for c in bridge_table_commands("nftrace_1_abc", FLOW, 100) if "chain" in c["add"]]
    assert chains[0]["name"] == "mark_prerouting" and chains[0]["prio"] == -350 and chains[0]["family"] == "bridge"
    assert {c["hook"] for c in chains[1:]} == {"input", "forward", "output", "postrouting"}



def chains(commands):
    return [(c["add"]["chain"]["name"], c["add"]["chain"]["prio"]) for c in commands if "chain" in c["add"]]


def test_conntrack_chains_follow_conntrack_on_the_marked_hooks_only_where_legacy_tables_are_traced():
    plain = chains(trace_table_commands("inet", "nftrace_1_abc", FLOW, 100))
    assert not any(name.startswith("ct_") for name, _ in plain)  # nftables alone: no event more
    with_legacy = chains(trace_table_commands("inet", "nftrace_1_abc", FLOW, 100, conntrack=True))
    assert with_legacy == plain + [("ct_prerouting", -199), ("ct_output", -199)]


def test_a_flow_that_arrives_on_an_interface_has_no_conntrack_chain_on_output():
    flow = parse_flow("10.0.0.5", "10.0.0.9", iif="eth0")
    assert [name for name, _ in chains(trace_table_commands("inet", "nftrace_1_abc", flow, 100, conntrack=True))
            if name.startswith("ct_")] == ["ct_prerouting"]


# -- where postrouting goes unobserved --------------------------------------------------------------

OWN_CHAINS = [("inet", "nftrace_1_abc", "mark_prerouting", "prerouting", -350),
              ("inet", "nftrace_1_abc", "mark_output", "output", -350)]


def listing(*chains: tuple) -> RulesetSnapshot:
    """A snapshot of table inet fw with these chains: (name, base-chain line or None, rules), as
    `nft -a list ruleset` prints them."""
    lines, handle = ["table inet fw { # handle 1"], 1
    for name, base, rules in chains:
        handle += 1
        lines.append(f"\tchain {name} {{ # handle {handle}")
        if base:
            lines.append(f"\t\t{base}")
        for text in rules:
            handle += 1
            lines.append(f"\t\t{text} # handle {handle}")
        lines.append("\t}")
    return RulesetSnapshot("\n".join(lines + ["}", ""]))


FORWARD = ("forward", "type filter hook forward priority filter; policy drop;", ["tcp dport 22 accept"])


def forward_ruleset(*extra: tuple, forward_rule: str = "tcp dport 22 accept") -> RulesetSnapshot:
    return listing((FORWARD[0], FORWARD[1], [forward_rule]), *extra)


def test_with_nothing_at_postrouting_the_last_chains_of_forward_and_output_end_the_packets_way():
    ends = hook_ends(forward_ruleset(), OWN_CHAINS)
    assert ends == {("forward", 2): ("inet", "fw", "forward"), ("forward", 10): ("inet", "fw", "forward"),
                    ("output", 2): ("inet", "nftrace_1_abc", "mark_output"),
                    ("output", 10): ("inet", "nftrace_1_abc", "mark_output")}


def test_the_chain_of_highest_priority_is_the_last_and_nftraces_own_count():
    later = ("late", "type filter hook forward priority filter + 10; policy accept;", [])
    output = ("out", "type filter hook output priority filter; policy accept;", [])
    ends = hook_ends(forward_ruleset(later, output), OWN_CHAINS + [("inet", "nftrace_1_abc", "obs_output", "output",
                                                                   2**31 - 1)], nfprotos=(2,))
    assert ends == {("forward", 2): ("inet", "fw", "late"), ("output", 2): ("inet", "nftrace_1_abc", "obs_output")}


def test_postrouting_stays_observed_where_something_could_happen_there_unseen():
    cases = {
        "a chain at postrouting": forward_ruleset(("post", "type filter hook postrouting priority 0;", [])),
        "a nat chain there": forward_ruleset(("masq", "type nat hook postrouting priority srcnat;", ["masquerade"])),
        "two chains at the top priority": forward_ruleset(("twin", "type filter hook forward priority 0;", [])),
        "no chain at forward": RulesetSnapshot(""),
        "a rule that rewrites headers": forward_ruleset(forward_rule="ip dscp set cs1"),
        "a raw payload write": forward_ruleset(forward_rule="@nh,8,8 set 0x10"),
        "an iptables target nft cannot show": forward_ruleset(forward_rule='xt target "TCPMSS"'),
    }
    for case, snapshot in cases.items():
        assert hook_ends(snapshot, OWN_CHAINS) is None, case


def test_marks_and_conntrack_fields_written_are_not_headers():
    snapshot = forward_ruleset(forward_rule="meta mark set 0x1 ct mark set meta mark meta nftrace set 1 accept")
    assert hook_ends(snapshot, OWN_CHAINS) is not None


def test_an_ip_family_forward_chain_ends_ipv4_packets_only():
    snapshot = RulesetSnapshot("table ip fw { # handle 1\n\tchain forward { # handle 2\n"
                               "\t\ttype filter hook forward priority 0; policy accept;\n\t}\n}\n")
    assert hook_ends(snapshot, OWN_CHAINS, nfprotos=(2,))[("forward", 2)] == ("ip", "fw", "forward")
    assert hook_ends(snapshot, OWN_CHAINS, nfprotos=(2, 10)) is None  # an IPv6 packet would pass unseen


def test_what_a_rule_may_rewrite_is_read_from_its_text():
    writes = ["ip dscp set cs1", "tcp dport 22 ip ttl set 64", "@nh,8,8 set 0x10", 'xt target "TCPMSS"',
              "tcp flags syn tcp option maxseg size set rt mtu", "ct state new ip6 hoplimit set 1"]
    keeps = ["meta mark set 0x1", "ct mark set meta mark", "ct original zone set 1", "meta nftrace set 1",
             "ip saddr @set accept", "tcp dport 22 accept"]
    assert [text for text in writes if not rule_writes_headers(text)] == []
    assert [text for text in keeps if rule_writes_headers(text)] == []
