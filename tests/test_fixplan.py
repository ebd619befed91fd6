"""The pure part of --fix: where a rule takes effect, what it matches, the command lines a shell
runs as they are, set elements from near misses, and the managers' notes and hints."""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import replace

import pytest

from nftrace.dryrun.fixplan import (Change, FlowMatch, NoChange, Placement, element_change, flow_match,
                                    neighbour_discovery_changes, placement_for, rule_change)
from nftrace.dryrun.managers import manager_of
from nftrace.flow import parse_flow
from nftrace.trace.events import PacketHeaders
from nftrace.trace.nearmiss import Mismatch, NearMiss
from nftrace.trace.paths import HookObservation, PacketPath, Step

DATE = "2025-06-01"
FLOW = parse_flow("10.77.1.2", "10.77.2.2", "tcp", None, 25)


def packet(src="10.77.1.2", dst="10.77.2.2", sport=40000, dport=25) -> PacketHeaders:
    return PacketHeaders(ipaddress.ip_address(src), ipaddress.ip_address(dst), 6, 60, sport, dport)


def observation(hook, table, chain, headers=None) -> HookObservation:
    return HookObservation(hook, table, chain, headers or packet(), 2, 3, None, None, own=False)


def path_of(*steps, decided=None, observations=(), verdict="drop") -> PacketPath:
    path = PacketPath(1, steps=list(steps), observations=list(observations), hooks=["prerouting", "forward"],
                      verdict=verdict, complete=True)
    path.decided_by = decided if decided is not None else (steps[-1] if steps else None)
    return path


def step(chain, type="rule", handle=None, number=None, text=None, verdict="drop", target=None, depth=0,
         table="filter", hook="forward", backend="nft", iptables=None, family="inet") -> Step:
    return Step(hook, family, table, chain, type, handle, number, text, verdict, target=target, depth=depth,
                backend=backend, iptables=iptables)


# -- where the rule goes ------------------------------------------------------------------------

def test_a_rule_goes_just_before_the_rule_that_decided():
    decided = step("forward", handle=12, number=4, text="tcp dport 25 drop")
    placement = placement_for(path_of(decided))
    assert (placement.chain, placement.handle) == ("forward", 12)


def test_a_rule_goes_at_the_end_of_the_chain_whose_policy_decided():
    placement = placement_for(path_of(step("forward", type="policy")))
    assert (placement.chain, placement.handle, placement.rule_number) == ("forward", None, None)


def test_a_drop_in_an_anonymous_chain_is_fixed_above_the_rule_that_jumps_into_it():
    jump = step("forward", handle=7, number=1, text="tcp dport 22 jump { log; drop; }", verdict="jump",
                target="__chain458")
    drop = step("__chain458", handle=118, number=2, text="drop", depth=1)
    placement = placement_for(path_of(jump, drop))
    assert (placement.chain, placement.handle) == ("forward", 7)


def test_a_drop_in_a_jumped_to_chain_is_fixed_in_that_chain():
    jump = step("forward", handle=3, number=1, verdict="jump", target="lan_in")
    drop = step("lan_in", handle=9, number=2, depth=1)
    placement = placement_for(path_of(jump, drop))
    assert (placement.chain, placement.handle, placement.base_chain) == ("lan_in", 9, "forward")


def kernel_dropped(*steps) -> PacketPath:
    """Let through by netfilter, dropped by the kernel after the last hook it ran (no route)."""
    path = path_of(*steps, verdict="accept")
    path.decided_by = None
    path.kernel_drop = {"reason": "IP_INNOROUTES"}
    return path


def test_a_packet_the_kernel_drops_after_netfilter_cannot_be_let_through_by_a_rule():
    path = kernel_dropped(step("prerouting", type="policy", verdict="accept", hook="prerouting"))
    with pytest.raises(NoChange, match="the kernel dropped it after netfilter .IP_INNOROUTES.; a ruleset change "
                                       "cannot let it through"):
        placement_for(path, verdict="accept")


def test_a_drop_asked_of_a_packet_the_kernel_drops_later_goes_before_the_step_that_let_it_through():
    policy = step("prerouting", type="policy", verdict="accept", table="fw4", hook="prerouting")
    placement = placement_for(kernel_dropped(policy), verdict="drop")
    assert (placement.table, placement.chain, placement.handle, placement.new_base_chain) == (
        "fw4", "prerouting", None, False)


def test_a_drop_is_not_put_in_a_nat_chain_which_sees_only_a_connections_first_packet():
    masquerade = step("postrouting", handle=5, number=1, text="masquerade", verdict="accept", table="nat",
                      hook="postrouting", family="ip")
    masquerade = replace(masquerade, in_nat_chain=True)
    placement = placement_for(path_of(masquerade, verdict="accept"), verdict="drop")
    assert (placement.family, placement.table, placement.chain, placement.new_base_chain) == (
        "inet", "filter", "forward", True)
    # Legacy iptables refuses DROP in its nat table anyway.
    legacy = step("POSTROUTING", number=1, text="-A POSTROUTING -j MASQUERADE", verdict="accept", table="nat",
                  hook="postrouting", family="ip", backend="iptables-legacy")
    assert placement_for(path_of(legacy, verdict="accept"), verdict="drop").new_base_chain


def test_a_drop_asked_of_a_packet_kube_proxy_let_through_goes_in_a_base_chain_of_its_own():
    # kube-proxy writes its table again within seconds: a rule there would not last.
    policy = step("filter-input", type="policy", verdict="accept", table="kube-proxy", hook="input", family="ip")
    placement = placement_for(path_of(policy, verdict="accept"), verdict="drop")
    assert (placement.family, placement.table, placement.chain, placement.new_base_chain) == (
        "inet", "filter", "forward", True)
    service = step("KUBE-SERVICES", handle=None, number=3, text="-A KUBE-SERVICES -j ACCEPT", verdict="accept",
                   table="filter", family="ip", backend="iptables-legacy")
    assert placement_for(path_of(service, verdict="accept"), verdict="drop").new_base_chain


def test_a_drop_asked_of_a_packet_no_chain_filtered_goes_in_a_base_chain_of_its_own():
    path = kernel_dropped()  # through prerouting and forward, no chain of the ruleset on the way
    change = rule_change(FLOW, path, "drop", DATE)
    placement = change.placement
    assert (placement.family, placement.table, placement.chain, placement.hook) == ("inet", "filter", "forward",
                                                                                    "forward")
    assert shlex.split(change.command()) == [
        "nft", "add table inet filter; add chain inet filter forward { type filter hook forward priority filter; "
        "policy accept; }; add rule inet filter forward ip saddr 10.77.1.2 ip daddr 10.77.2.2 tcp dport 25 drop "
        f'comment "nftrace fix {DATE}: drop 10.77.1.2 -> 10.77.2.2 tcp dport 25"']
    assert change.summary.endswith("in a new chain inet filter forward (hook forward, policy accept)")


def test_a_drop_asked_of_a_bridged_frame_gets_no_inet_chain_which_it_would_not_reach():
    path = kernel_dropped()
    path.observations = [replace(observation(hook, "nftrace_1_ab", f"obs_{hook}"), family="bridge")
                         for hook in ("prerouting", "forward")]
    with pytest.raises(NoChange, match="no chain of the ruleset let it through.*the kernel drops it already, after "
                                       "netfilter .IP_INNOROUTES."):
        placement_for(path, verdict="drop")


# -- what it matches -------------------------------------------------------------------------------

def test_the_rule_matches_exactly_the_flow_as_given():
    flow = parse_flow("10.77.1.0/24", "10.77.2.2", "tcp", None, 25, "r-client")
    decided = step("forward", type="policy")
    path = path_of(decided, observations=[observation("forward", "filter", "forward")])
    match = flow_match(flow, path, placement_for(path))
    assert match.nft("inet") == 'iifname "r-client" ip saddr 10.77.1.0/24 ip daddr 10.77.2.2 tcp dport 25'
    assert match.iptables() == ["-i", "r-client", "-s", "10.77.1.0/24", "-d", "10.77.2.2", "-p", "tcp", "--dport", "25"]


def test_a_destination_that_dnat_rewrote_is_matched_as_the_deciding_hook_saw_it():
    flow = parse_flow("10.77.2.2", "10.77.2.1", "tcp", None, 2222)
    decided = step("forward", type="policy")
    seen = observation("forward", "filter", "forward", packet("10.77.2.2", "10.77.1.2", 40000, 22))
    path = path_of(decided, observations=[observation("prerouting", "nat", "prerouting",
                                                      packet("10.77.2.2", "10.77.2.1", 40000, 2222)), seen])
    match = flow_match(flow, path, placement_for(path))
    assert (match.dst, match.dport) == ("10.77.1.2", 22)


def test_an_input_interface_is_not_matched_where_packets_have_none():
    flow = parse_flow("10.77.1.1", "10.77.2.2", "udp", None, 53, "r-client")
    decided = step("output", type="policy", hook="output")
    path = path_of(decided)
    assert flow_match(flow, path, placement_for(path)).iif is None


def test_icmp_is_matched_by_protocol():
    match = FlowMatch(6, "fd77:1::2", "fd77:2::2", "icmpv6")
    assert match.nft("inet") == "ip6 saddr fd77:1::2 ip6 daddr fd77:2::2 meta l4proto ipv6-icmp"


# -- the commands --------------------------------------------------------------------------------

def test_an_nft_command_is_one_shell_word_after_nft_and_says_nftrace_and_the_date():
    change = rule_change(FLOW, path_of(step("forward", handle=12, number=4)), "accept", DATE)
    argv = shlex.split(change.command())
    assert argv[0] == "nft" and len(argv) == 2
    assert argv[1] == ('insert rule inet filter forward position 12 ip saddr 10.77.1.2 ip daddr 10.77.2.2 tcp dport 25 '
                       'accept comment "nftrace fix 2025-06-01: accept 10.77.1.2 -> 10.77.2.2 tcp dport 25"')


def test_the_sandbox_runs_the_same_line_with_its_own_handle():
    change = rule_change(FLOW, path_of(step("forward", handle=12, number=4)), "accept", DATE)
    assert change.command(handle=40) == change.command().replace("position 12", "position 40")


def test_a_policy_decision_appends_the_rule():
    change = rule_change(FLOW, path_of(step("forward", type="policy")), "drop", DATE)
    assert shlex.split(change.command())[1].startswith("add rule inet filter forward ip saddr 10.77.1.2")
    assert " drop comment " in change.command()


def test_a_legacy_rule_is_inserted_by_number_with_iptables():
    decided = step("LAN_IN", handle=None, number=2, backend="iptables-legacy", family="ip", hook="input",
                   iptables="-A LAN_IN -p tcp -m tcp --dport 23 -j REJECT")
    change = rule_change(FLOW, path_of(decided), "accept", DATE, legacy_is_default=True)
    assert shlex.split(change.command()) == [
        "iptables", "-I", "LAN_IN", "2", "-s", "10.77.1.2", "-d", "10.77.2.2", "-p", "tcp", "--dport", "25",
        "-m", "comment", "--comment", "nftrace fix 2025-06-01: accept 10.77.1.2 -> 10.77.2.2 tcp dport 25",
        "-j", "ACCEPT"]


def test_legacy_rules_name_the_legacy_tool_where_iptables_means_iptables_nft():
    decided = step("FORWARD", type="policy", backend="iptables-legacy", family="ip", table="nat", hook="forward")
    change = rule_change(FLOW, path_of(decided), "drop", DATE, legacy_is_default=False)
    assert shlex.split(change.command())[:4] == ["iptables-legacy", "-t", "nat", "-A"]


def test_a_dropped_neighbour_solicitation_gets_the_standard_rule_for_both_messages_where_it_was_dropped():
    change, = neighbour_discovery_changes(path_of(step("input", type="policy", hook="input")), DATE)
    assert shlex.split(change.command()) == [
        "nft", "add rule inet filter input icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept "
               "comment \"nftrace fix 2025-06-01: accept neighbour discovery\""]
    assert "every neighbour's solicitations and advertisements" in change.scope


def test_neighbour_discovery_in_legacy_ip6tables_takes_a_rule_for_each_message():
    decided = step("INPUT", handle=None, number=1, backend="iptables-legacy", family="ip6", hook="input",
                   iptables="-A INPUT -j DROP")
    commands = [shlex.split(change.command()) for change in neighbour_discovery_changes(path_of(decided), DATE)]
    assert [command[:4] + command[6:10] for command in commands] == [
        ["ip6tables", "-I", "INPUT", "1", "-m", "icmp6", "--icmpv6-type", "neighbour-solicitation"],
        ["ip6tables", "-I", "INPUT", "1", "-m", "icmp6", "--icmpv6-type", "neighbour-advertisement"]]


def test_iptables_nft_tables_are_edited_with_iptables():
    decided = step("FORWARD", type="policy", family="ip", iptables=":FORWARD DROP")
    change = rule_change(FLOW, path_of(decided), "accept", DATE, legacy_is_default=False)
    assert shlex.split(change.command())[:3] == ["iptables", "-A", "FORWARD"]


def test_an_element_command_adds_the_packets_value_to_the_set():
    near = NearMiss("inet", "filter", "input", "input", 5, 2, "ip saddr @admins tcp dport 22 accept", "accept",
                    mismatches=(Mismatch("ip saddr @admins", "10.77.1.2", True, "ip saddr", "admins"),))
    change = element_change(near, "accept")
    assert shlex.split(change.command()) == ["nft", "add element inet filter admins { 10.77.1.2 }"]


@pytest.mark.parametrize("near", [
    NearMiss("inet", "f", "input", "input", 5, 2, "tcp dport vmap @services", "accept",
             mismatches=(Mismatch("tcp dport vmap @services", "8443", True, "tcp dport", "services"),)),
    NearMiss("inet", "f", "input", "input", 5, 2, "ip saddr @admins tcp dport 22 accept", "accept",
             mismatches=(Mismatch("ip saddr @admins", "10.77.1.2", True, "ip saddr", "admins"),
                         Mismatch("tcp dport 22", "25", False, "tcp dport"))),
    NearMiss("inet", "f", "input", "input", 5, 2, "ip saddr @admins drop", "drop",
             mismatches=(Mismatch("ip saddr @admins", "10.77.1.2", True, "ip saddr", "admins"),)),
    NearMiss("inet", "f", "input", "input", 5, 2, "ip saddr 10.0.0.0/8 accept", "accept",
             mismatches=(Mismatch("ip saddr 10.0.0.0/8", "192.0.2.1", True, "ip saddr"),)),
], ids=["a map", "two mismatches", "the other verdict", "no set"])
def test_only_a_single_failed_set_lookup_of_a_rule_with_the_asked_verdict_becomes_an_element(near):
    assert element_change(near, "accept") is None


# -- managers ------------------------------------------------------------------------------------

def placement(table, chain, hook="input", family="inet", base=None) -> Placement:
    return Placement(hook, "nft", family, table, chain, base_table=table, base_chain=base or chain)


MATCH = FlowMatch(4, "10.77.2.2", "10.77.2.1", "tcp", None, 9090)


def test_firewalld_says_a_reload_undoes_the_edit_and_gives_a_rich_rule_for_the_zone():
    note = manager_of(placement("firewalld", "filter_INPUT"), MATCH, "accept", {"filter_IN_public", "filter_INPUT"})
    assert "reload" in note.note
    assert note.hint.startswith("firewall-cmd --zone=public --add-rich-rule='rule family=\"ipv4\" source address="
                                "\"10.77.2.2\" destination address=\"10.77.2.1\" port port=\"9090\" protocol=\"tcp\" "
                                "accept'")
    assert "--permanent" in note.hint


def test_ufw_gets_its_own_allow_command():
    note = manager_of(placement("filter", "ufw-user-input", family="ip"), MATCH, "accept")
    assert note.hint == "ufw allow from 10.77.2.2 to 10.77.2.1 port 9090 proto tcp"
    routed = manager_of(placement("filter", "ufw-user-forward", hook="forward", family="ip"), MATCH, "drop")
    assert routed.hint == "ufw route deny from 10.77.2.2 to 10.77.2.1 port 9090 proto tcp"


def test_docker_points_at_docker_user():
    note = manager_of(placement("filter", "DOCKER", hook="forward", family="ip", base="FORWARD"), MATCH, "accept")
    assert "DOCKER-USER" in note.note
    assert note.hint == "iptables -I DOCKER-USER -s 10.77.2.2 -d 10.77.2.1 -p tcp --dport 9090 -j ACCEPT"


def test_a_set_element_in_a_managers_table_gets_its_note_as_a_rule_there_would():
    near = NearMiss("ip", "kube-proxy", "cluster-ips-check", "prerouting", 24, 1, "ip daddr @cluster-ips accept",
                    "accept", mismatches=(Mismatch("ip daddr @cluster-ips", "10.180.0.1", True, "ip daddr",
                                                   "cluster-ips"),))
    change = element_change(near, "accept")
    note = manager_of(change.used_in, MATCH, "accept")
    assert note.manager == "kube-proxy"
    assert note.note.startswith("kube-proxy resynchronises table ip kube-proxy within seconds")


def test_no_drop_is_made_by_an_element_of_kube_proxys_sets_which_it_writes_again_within_seconds():
    near = NearMiss("ip", "kube-proxy", "cluster-ips-check", "prerouting", 24, 1, "ip daddr @cluster-ips reject",
                    "drop", mismatches=(Mismatch("ip daddr @cluster-ips", "10.180.0.1", True, "ip daddr",
                                                 "cluster-ips"),))
    assert element_change(near, "drop") is None


def test_a_table_of_the_admins_own_has_no_manager():
    assert manager_of(placement("filter", "input"), MATCH, "accept", {"input", "lan_in"}) is None


def test_every_hint_and_command_is_one_line_a_posix_shell_splits():
    hints = [manager_of(placement(table, chain), MATCH, "accept", path).hint
             for table, chain, path in (("firewalld", "filter_IN_public_allow", ()), ("fw4", "input_wan", ()),
                                        ("filter", "ufw-user-input", ()))]
    for hint in hints:
        assert "\n" not in hint and shlex.split(hint)


def test_a_change_says_what_it_does_in_json():
    change = rule_change(FLOW, path_of(step("forward", handle=12, number=4)), "accept", DATE)
    assert isinstance(change, Change)
    data = change.to_json()
    assert data["kind"] == "rule" and data["where"] == "inet filter forward"
    assert data["scope"] == "the new rule matches only 10.77.1.2 -> 10.77.2.2 tcp dport 25"


# -- bad input is one line, exit 2, before anything is traced ---------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--fix", "maybe"], "--fix: 'maybe' is not one of accept, drop"),
    (["--keep", "flows.toml"], "--keep goes with --fix"),
    (["--fix", "accept", "--keep", "/nonexistent/keep.toml"], "--keep: /nonexistent/keep.toml: No such file or directory"),
    (["--fix", "drop", "--ruleset", "/nonexistent/new.nft"],
     "--fix changes the namespace's current ruleset: it does not go with --ruleset"),
])
def test_bad_fix_options_are_one_line_and_exit_2(args, message):
    from conftest import nftrace

    result = nftrace("why", "--from", "10.77.1.2", "--to", "10.77.2.2", "--proto", "tcp", "--dport", "25",
                     "--dry-run", *args)
    assert result.returncode == 2
    assert result.stderr.strip() == f"nftrace: {message}"


def test_firewalld_reverse_path_filter_is_its_setting_not_a_zone_rule():
    note = manager_of(placement("firewalld", "filter_PREROUTING", hook="prerouting"), MATCH, "accept",
                      {"filter_PREROUTING"})
    assert note.hint.startswith("IPv6_rpfilter=no in /etc/firewalld/firewalld.conf")


def test_firewalld_zone_drop_gets_its_rich_rule_though_every_arriving_packet_ran_the_reverse_path_filter():
    note = manager_of(placement("firewalld", "filter_IN_public", base="filter_INPUT"), MATCH, "accept",
                      {"filter_PREROUTING", "filter_INPUT", "filter_INPUT_ZONES", "filter_IN_public"})
    assert note.hint.startswith("firewall-cmd --zone=public --add-rich-rule=")


def test_nixos_reverse_path_filter_option_only_for_a_packet_dropped_under_it():
    dropped_there = manager_of(placement("nixos-fw", "rpfilter-allow", hook="prerouting", base="rpfilter"), MATCH,
                               "accept", {"rpfilter", "rpfilter-allow"})
    assert dropped_there.hint.startswith("networking.firewall.extraReversePathFilterRules = ")
    dropped_at_input = manager_of(placement("nixos-fw", "input-allow", base="input"), MATCH, "accept",
                                  {"rpfilter", "input", "input-allow"})
    assert dropped_at_input.hint.startswith("networking.firewall.allowedTCPPorts = [ 9090 ]")


def test_fw4_gets_a_uci_rule_for_the_zone_the_packet_came_from():
    note = manager_of(placement("fw4", "handle_reject", base="input"), MATCH, "accept",
                      {"input", "input_wan", "handle_reject"})
    assert "fw4 reload" in note.note
    assert note.hint.startswith("uci add firewall rule && uci set firewall.@rule[-1].name='nftrace fix' && "
                                "uci set firewall.@rule[-1].src=wan && ")
    assert note.hint.endswith("uci set firewall.@rule[-1].target=ACCEPT && uci commit firewall && fw4 reload")


def test_nixos_gets_its_configuration_option():
    note = manager_of(placement("nixos-fw", "input"), MATCH, "accept")
    assert note.hint.startswith("networking.firewall.allowedTCPPorts = [ 9090 ];")


def test_nixos_gets_the_option_of_the_chain_that_dropped_the_packet_not_an_open_port():
    """A port is open already where the reverse-path filter dropped the packet: its rules go in
    extraReversePathFilterRules; a forwarded packet's in extraForwardRules."""
    flow = 'ip saddr 10.77.2.2 ip daddr 10.77.2.1 tcp dport 9090'
    rpfilter = manager_of(placement("nixos-fw", "rpfilter", hook="prerouting"), MATCH, "accept", {"rpfilter"})
    assert rpfilter.hint.startswith(f"networking.firewall.extraReversePathFilterRules = ''{flow} accept'';")
    assert rpfilter.hint.endswith('or checkReversePath = "loose" for every source with any route back')
    forward = manager_of(placement("nixos-fw", "forward", hook="forward"), MATCH, "drop", {"forward", "forward-allow"})
    assert forward.hint.startswith(f"networking.firewall.extraForwardRules = ''{flow} drop'';")


# -- the answer ----------------------------------------------------------------------------------

def test_a_proven_fix_says_its_commands_its_proof_and_its_scope():
    from nftrace.dryrun.fix import FixAnswer, render_fix

    change = rule_change(FLOW, path_of(step("forward", handle=12, number=4)), "accept", DATE)
    new = step("forward", text=change.rule, verdict="accept")
    answer = FixAnswer("accept", proven=True, changes=[change], netns="r1", after=path_of(new, verdict="accept"),
                       kept=3, keep_file="office.expect.toml")
    data = answer.to_json()
    assert data["commands"] == ["ip netns exec r1 " + change.command()]
    assert (data["proven"], data["kept"], data["after"]["verdict"], data["after"]["decided_by"]["new"]) == (
        True, 3, "accept", True)
    text = render_fix(answer).splitlines()
    assert text[:2] == ["fix accept: run in netns r1:", "  ip netns exec r1 " + change.command()]
    assert text[2].startswith("proven in a sandbox copy: ACCEPT by inet filter forward rule (new): ip saddr 10.77.1.2")
    assert text[3] == ("scope: the new rule matches only 10.77.1.2 -> 10.77.2.2 tcp dport 25; the 3 flows of "
                       "office.expect.toml keep their verdicts")


def test_a_fix_that_lets_neighbour_discovery_in_says_the_solicitation_comes_in_and_what_else_it_lets_in():
    from nftrace.dryrun.fix import FixAnswer, render_fix
    from nftrace.dryrun.session import NeighbourTrace

    flow_rule = rule_change(FLOW, path_of(step("forward", type="policy")), "accept", DATE)
    discovery, = neighbour_discovery_changes(path_of(step("input", type="policy", hook="input")), DATE)
    solicitation = NeighbourTrace("solicitation", parse_flow("fd77:1::2", "ff02::1:ff00:1", "icmpv6", None, None,
                                                            "r-client"), "fd77:1::2", "fd77:1::1", "r-client",
                                  path_of(step("input", text=discovery.rule, verdict="accept", hook="input"),
                                          verdict="accept"))
    answer = FixAnswer("accept", proven=True, changes=[flow_rule, discovery],
                       after=path_of(step("forward", text=flow_rule.rule, verdict="accept"), verdict="accept"),
                       neighbours={"neighbour_solicitation": solicitation})
    assert answer.to_json()["after"]["neighbour_solicitation"]["decided_by"]["new"] is True
    text = render_fix(answer).splitlines()
    assert text[4].startswith("  and the sender's neighbour solicitation comes in: ACCEPT by inet filter input "
                              "rule (new): icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept")
    assert text[5] == ("scope: the new rule matches only 10.77.1.2 -> 10.77.2.2 tcp dport 25; the new rule lets "
                       "neighbour discovery through: every neighbour's solicitations and advertisements")


def test_a_fix_that_could_not_be_proven_prints_no_command_and_says_why():
    from nftrace.dryrun.fix import FixAnswer, render_fix

    change = rule_change(FLOW, path_of(step("forward", handle=12, number=4)), "accept", DATE)
    answer = FixAnswer("accept", changes=[change], reason="the change would make --keep flow 'web' drop",
                       broken={"flow": "web", "before": "accept", "after": "drop"})
    data = answer.to_json()
    assert (data["proven"], data["commands"], data["changes"], data["scope"]) == (False, [], [], None)
    assert data["broken"]["flow"] == "web"
    assert render_fix(answer) == "fix accept: no change could be proven: the change would make --keep flow 'web' drop"
