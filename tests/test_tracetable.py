"""nftrace's own trace rules as the kernel receives them (JSON commands), without a kernel."""

from __future__ import annotations

from nftrace.flow import parse_flow
from nftrace.kernel.tracetable import bridge_table_commands, egress_commands, flow_match, mark_ends, trace_table_commands

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
