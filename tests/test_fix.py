"""`nftrace why ... --fix accept|drop`, judged the way an admin would: the printed commands are
pasted into the live lab router (run by `sh -c`, exactly as printed), real traffic is sent, and
the flow now gets the verdict asked for while every other flow of the scenario keeps its own.

Each case builds its own lab (client, router, server in namespaces of the test's own) and
removes it. Nothing is ever applied to the router by nftrace itself: the test checks that too.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Optional

import pytest

from conftest import closed_to_neighbour_discovery, nftrace, ruleset_state, unique_name
from nftrace.lab.expectations import FlowExpectation, load_expectations
from nftrace.lab.lab import Lab, Scenario, find_scenario, traffic_command, why_arguments

pytestmark = pytest.mark.kernel


@pytest.fixture
def lab(tmp_path):
    """A factory: the lab running a scenario (rules/NAME, or a ruleset file of the test's own)."""
    made = []

    def running(scenario: Scenario) -> Lab:
        lab = Lab(unique_name("fix"), state_dir=tmp_path / "state")
        made.append(lab)
        lab.up(scenario, listen_seconds=300)
        return lab

    try:
        yield running
    finally:
        for lab in made:
            lab.down()


def own_scenario(tmp_path: Path, name: str, ruleset: str, flows: list[dict], kind: str = "nft") -> Scenario:
    """A scenario of the test's own: a ruleset and its flows, in the rules/ format."""
    suffix = ".nft" if kind == "nft" else ".rules"
    (tmp_path / f"{name}{suffix}").write_text(ruleset)
    (tmp_path / f"{name}.expect.toml").write_text(expectation_text(f"{name}{suffix}", flows, kind))
    return Scenario(load_expectations(tmp_path / f"{name}.expect.toml"))


def expectation_text(ruleset: str, flows: list[dict], kind: str = "nft") -> str:
    lines = [f'ruleset = "{ruleset}"', f'ruleset_kind = "{kind}"']
    for flow in flows:
        lines.append("[[flow]]")
        for key, value in flow.items():
            lines.append(f"{key} = {value}" if isinstance(value, int) else f'{key} = "{value}"')
    return "\n".join(lines) + "\n"


def flow_entry(expectation: FlowExpectation) -> dict:
    flow = expectation.flow.to_json()
    entry = {"name": expectation.name, "from": flow["src"], "to": flow["dst"], "proto": flow["proto"],
             "expect": expectation.expect, "sender": expectation.sender}
    for key in ("sport", "dport", "iif", "oif"):
        if flow[key] is not None:
            entry[key] = flow[key]
    return {key: value for key, value in entry.items() if value is not None}


def keep_file(tmp_path: Path, scenario: Scenario, but: FlowExpectation) -> Path:
    """The scenario's other flows, as a --keep file."""
    path = tmp_path / "keep.expect.toml"
    others = [flow_entry(flow) for flow in scenario.flows if flow.name != but.name]
    path.write_text(expectation_text(str(scenario.ruleset), others, scenario.kind))
    return path


def flow_named(scenario: Scenario, name: str) -> FlowExpectation:
    return next(flow for flow in scenario.flows if flow.name == name)


def fix_arguments(lab: Lab, expectation: FlowExpectation, verdict: str, keep: Optional[Path], dry_run: bool) -> list:
    args = why_arguments(lab.topology, expectation, as_json=True)
    split = args.index("--")
    options = ["--fix", verdict] + (["--keep", str(keep)] if keep else [])
    if dry_run:
        # A dry run sends its own packet: no traffic command.
        return [*args[:split], *options, "--dry-run"]
    return [*args[:split], *options, *args[split:]]


def propose(lab: Lab, expectation: FlowExpectation, verdict: str, keep: Optional[Path] = None,
            dry_run: bool = True) -> dict:
    """Run `nftrace why --fix`, check that the router was not touched, return the packet's fix."""
    before = ruleset_state(lab.topology.router)
    result = nftrace(*fix_arguments(lab, expectation, verdict, keep, dry_run), timeout=180)
    assert result.returncode == 0, result.stderr
    assert ruleset_state(lab.topology.router) == before, "--fix changed the target's ruleset"
    fix = result.packets[0]["fix"]
    assert fix["proven"], fix
    return fix


def paste(commands: list[str]) -> None:
    """What an admin does with the answer: run each line in a POSIX shell, as printed."""
    for command in commands:
        result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{command}: {result.stderr}"


def live_verdict(lab: Lab, expectation: FlowExpectation) -> str:
    """The verdict the kernel gives a real packet of the flow, sent from its sender."""
    result = nftrace(*why_arguments(lab.topology, expectation, as_json=True))
    assert result.returncode == 0, result.stderr
    packets = result.packets
    assert len(packets) == 1, result.stdout
    return packets[0]["verdict"]


def real_traffic(lab: Lab, expectation: FlowExpectation) -> str:
    """What the sender's socket says: connected, timeout, refused..."""
    result = subprocess.run(traffic_command(lab.topology, expectation), capture_output=True, text=True, timeout=30)
    return result.stdout.strip()


def assert_others_keep_their_verdicts(lab: Lab, scenario: Scenario, but: FlowExpectation) -> None:
    changed = [(flow.name, flow.expect, verdict) for flow in scenario.flows if flow.name != but.name
               if (verdict := live_verdict(lab, flow)) != flow.expect]
    assert not changed, changed


# -- a rule ----------------------------------------------------------------------------------------

def test_a_flow_dropped_by_a_rule_is_let_through_by_one_rule_before_it_proven_live(lab, tmp_path):
    scenario = find_scenario("nat-router")
    router = lab(scenario)
    mail = flow_named(scenario, "a LAN host sends mail directly (dropped by a rule)")
    fix = propose(router, mail, "accept", keep=keep_file(tmp_path, scenario, mail), dry_run=False)
    assert [change["kind"] for change in fix["changes"]] == ["rule"]
    assert "insert rule inet filter forward position" in fix["commands"][0]
    assert fix["after"]["verdict"] == "accept" and fix["after"]["decided_by"]["new"] is True
    assert fix["kept"] == len(scenario.flows) - 1
    paste(fix["commands"])
    assert live_verdict(router, mail) == "accept"
    assert real_traffic(router, mail) == "connected"
    assert_others_keep_their_verdicts(router, scenario, mail)


def test_an_accepted_flow_is_dropped_by_one_rule_and_nothing_else_changes(lab, tmp_path):
    scenario = find_scenario("nat-router")
    router = lab(scenario)
    web = flow_named(scenario, "a LAN host browses the web (accepted, masqueraded)")
    fix = propose(router, web, "drop", keep=keep_file(tmp_path, scenario, web))
    assert fix["after"]["verdict"] == "drop"
    assert " drop comment \"nftrace fix " in fix["commands"][0]
    paste(fix["commands"])
    assert live_verdict(router, web) == "drop"
    assert real_traffic(router, web) == "timeout"
    assert_others_keep_their_verdicts(router, scenario, web)


def test_a_port_forward_is_fixed_where_the_packet_is_after_dnat(lab, tmp_path):
    scenario = find_scenario("nat-router")
    router = lab(scenario)
    forward = flow_named(scenario, "the internet reaches the NAS through a port forward (NATed)")
    fix = propose(router, forward, "drop", keep=keep_file(tmp_path, scenario, forward))
    # The forward chain sees the NAS's address and port, not the router's 2222.
    assert "ip daddr 10.77.1.2 tcp dport 22 drop" in fix["commands"][0]
    paste(fix["commands"])
    assert live_verdict(router, forward) == "drop"
    assert_others_keep_their_verdicts(router, scenario, forward)


# -- a set element ---------------------------------------------------------------------------------

def test_a_near_miss_on_a_set_lookup_is_fixed_by_adding_the_packets_value_to_the_set(lab, tmp_path):
    scenario = find_scenario("sets-and-maps")
    router = lab(scenario)
    missing = flow_named(scenario, "a port missing from the map meets the policy")
    fix = propose(router, missing, "accept", keep=keep_file(tmp_path, scenario, missing))
    assert fix["commands"] == [f"ip netns exec {router.topology.router} nft 'add element inet filter trusted "
                               f"{{ 10.77.1.2 . tcp . 8443 }}'"]
    assert fix["after"]["decided_by"]["text"].startswith("ip saddr . meta l4proto . th dport @trusted accept")
    paste(fix["commands"])
    assert live_verdict(router, missing) == "accept"
    assert_others_keep_their_verdicts(router, scenario, missing)


# A zone chain of OpenWrt's fw4 with a set of its own, as fw4 writes them from /etc/config/firewall.
FW4_SET = """
table inet fw4 {
    set admins { type ipv4_addr; elements = { 10.77.1.9 } }
    chain input {
        type filter hook input priority filter; policy drop;
        iifname "r-client" jump input_lan
    }
    chain input_lan {
        ip saddr @admins tcp dport 22 accept
    }
}
"""


def test_a_set_element_in_a_managers_table_says_that_the_manager_rewrites_it(lab, tmp_path):
    flows = [{"name": "ssh from a LAN host", "from": "10.77.1.2", "to": "10.77.1.1", "proto": "tcp", "dport": 22,
              "expect": "drop"}]
    scenario = own_scenario(tmp_path, "fw4set", FW4_SET, flows)
    router = lab(scenario)
    ssh = flow_named(scenario, "ssh from a LAN host")
    fix = propose(router, ssh, "accept")
    assert fix["commands"] == [f"ip netns exec {router.topology.router} nft 'add element inet fw4 admins "
                               f"{{ 10.77.1.2 }}'"]
    (note,) = fix["managers"]
    assert note["manager"] == "fw4" and "fw4 reload" in note["note"] and "firewall.@rule[-1].src=lan" in note["hint"]
    paste(fix["commands"])
    assert live_verdict(router, ssh) == "accept"


SETS = """
table inet filter {
    set web_ports { type inet_service; elements = { 80, 443 } }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        tcp dport @web_ports accept comment "web"
    }
}
"""


def test_a_set_element_that_would_open_a_kept_flow_gives_way_to_a_rule_for_the_flow_alone(lab, tmp_path):
    flows = [{"name": "the client to 8080", "from": "10.77.1.2", "to": "10.77.2.2", "proto": "tcp", "dport": 8080,
              "expect": "drop"},
             {"name": "the server to the client's 8080", "sender": "server", "from": "10.77.2.2", "to": "10.77.1.2",
              "proto": "tcp", "dport": 8080, "expect": "drop"},
             {"name": "web", "from": "10.77.1.2", "to": "10.77.2.2", "proto": "tcp", "dport": 443, "expect": "accept"}]
    scenario = own_scenario(tmp_path, "web-ports", SETS, flows)
    router = lab(scenario)
    wanted = flow_named(scenario, "the client to 8080")
    fix = propose(router, wanted, "accept", keep=keep_file(tmp_path, scenario, wanted))
    assert [change["kind"] for change in fix["changes"]] == ["rule"]
    assert any("would make --keep flow 'the server to the client's 8080'" in w for w in fix["warnings"]), fix
    paste(fix["commands"])
    assert real_traffic(router, wanted) == "connected"
    assert_others_keep_their_verdicts(router, scenario, wanted)


# -- two deciders ----------------------------------------------------------------------------------

TWO_TABLES = """
table inet filter {
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "r-client" tcp dport 443 accept comment "LAN to the web"
    }
}
table ip guard {
    chain forward {
        type filter hook forward priority filter + 10; policy accept;
        tcp dport 8080 drop comment "no proxies"
    }
}
"""


def test_a_flow_dropped_in_two_tables_gets_a_rule_in_each_and_the_whole_path_is_proven(lab, tmp_path):
    flows = [{"name": "the client to a proxy", "from": "10.77.1.2", "to": "10.77.2.2", "proto": "tcp", "dport": 8080,
              "expect": "drop"},
             {"name": "web", "from": "10.77.1.2", "to": "10.77.2.2", "proto": "tcp", "dport": 443, "expect": "accept"},
             {"name": "another proxy port", "from": "10.77.1.2", "to": "10.77.2.2", "proto": "tcp", "dport": 9090,
              "expect": "drop"},
             {"name": "the server to the client's proxy", "sender": "server", "from": "10.77.2.2", "to": "10.77.1.2",
              "proto": "tcp", "dport": 8080, "expect": "drop"}]
    scenario = own_scenario(tmp_path, "two-tables", TWO_TABLES, flows)
    router = lab(scenario)
    proxy = flow_named(scenario, "the client to a proxy")
    fix = propose(router, proxy, "accept", keep=keep_file(tmp_path, scenario, proxy))
    assert [change["where"] for change in fix["changes"]] == ["inet filter forward", "ip guard forward"]
    # An accept is said by the last base chain that accepted it: the second new rule.
    assert (fix["after"]["decided_by"]["table"], fix["after"]["decided_by"]["new"]) == ("guard", True)
    paste(fix["commands"])
    assert real_traffic(router, proxy) == "connected"
    assert_others_keep_their_verdicts(router, scenario, proxy)


# -- legacy iptables -------------------------------------------------------------------------------

def test_a_legacy_iptables_drop_is_fixed_with_iptables_insert_before_the_rule(lab, tmp_path):
    scenario = find_scenario("legacy-iptables")
    router = lab(scenario)
    telnet = flow_named(scenario, "telnet from the LAN, rejected in LAN_IN")
    fix = propose(router, telnet, "accept", keep=keep_file(tmp_path, scenario, telnet))
    (command,) = fix["commands"]
    assert " -I LAN_IN 2 " in command and command.split()[4] in ("iptables", "iptables-legacy")
    assert fix["after"]["decided_by"]["backend"] == "iptables-legacy"
    paste(fix["commands"])
    assert live_verdict(router, telnet) == "accept"
    assert_others_keep_their_verdicts(router, scenario, telnet)


def test_a_legacy_policy_drop_is_fixed_by_appending_and_dropping_works_too(lab, tmp_path):
    scenario = find_scenario("legacy-iptables")
    router = lab(scenario)
    inward = flow_named(scenario, "outside into the LAN meets the FORWARD policy")
    fix = propose(router, inward, "accept", keep=keep_file(tmp_path, scenario, inward))
    assert " -A FORWARD " in fix["commands"][0]
    paste(fix["commands"])
    assert live_verdict(router, inward) == "accept"
    outward = flow_named(scenario, "the LAN goes out")
    fix = propose(router, outward, "drop")
    paste(fix["commands"])
    assert live_verdict(router, outward) == "drop"


# -- the answers -----------------------------------------------------------------------------------

STATELESS = """
table inet filter {
    chain forward {
        type filter hook forward priority filter; policy drop;
        iifname "r-client" tcp dport 443 accept comment "LAN to the web"
        iifname "r-server" tcp sport 443 accept comment "the web's answers"
    }
}
"""


def test_a_flow_whose_answers_are_dropped_too_gets_a_rule_for_them_and_no_more(lab, tmp_path):
    # Nothing listens on the server's 7070: the answer that comes back is the server's refusal
    # (a RST), which is as much an answer as a SYN-ACK; before the fix nothing comes back at all.
    flows = [{"name": "the client to 7070", "from": "10.77.1.2", "to": "10.77.2.2", "proto": "tcp", "dport": 7070,
              "expect": "drop"},
             {"name": "web", "from": "10.77.1.2", "to": "10.77.2.2", "proto": "tcp", "dport": 443, "expect": "accept"},
             {"name": "a new connection from the server's 7070 to the client", "sender": "server",
              "from": "10.77.2.2", "to": "10.77.1.2", "proto": "tcp", "sport": 7070, "dport": 5000, "expect": "drop"}]
    scenario = own_scenario(tmp_path, "stateless", STATELESS, flows)
    router = lab(scenario)
    wanted = flow_named(scenario, "the client to 7070")
    assert real_traffic(router, wanted) == "timeout"
    fix = propose(router, wanted, "accept", keep=keep_file(tmp_path, scenario, wanted))
    assert len(fix["commands"]) == 2
    assert "ip saddr 10.77.2.2 ip daddr 10.77.1.2 tcp sport 7070 ct state established accept" in fix["commands"][1]
    assert fix["after"]["reply"]["verdict"] == "accept" and fix["after"]["reply"]["decided_by"]["new"]
    paste(fix["commands"])
    assert real_traffic(router, wanted) == "refused"
    assert_others_keep_their_verdicts(router, scenario, wanted)


# -- IPv6: the sender's neighbour solicitation comes first ------------------------------------------

ND_DROPPED_FORWARD_OPEN = closed_to_neighbour_discovery("filter")
ND_DROPPED = ND_DROPPED_FORWARD_OPEN.replace("policy accept;", "policy drop;\n        ct state established,related accept")
ND_FROM_LAN_ONLY = ND_DROPPED_FORWARD_OPEN.replace(
    "ct state established,related accept",
    'ct state established,related accept\n        iifname "r-client" icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept')
ND_DROPPED_LEGACY = """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
"""
WEB6 = {"name": "web over IPv6", "from": "fd77:1::2", "to": "fd77:2::2", "proto": "tcp", "dport": 443,
        "expect": "drop"}


def forget_neighbours(lab: Lab) -> None:
    """As after a reboot: client and router must find their neighbours' link-layer addresses again."""
    for namespace in (lab.topology.client, lab.topology.router):
        subprocess.run(["ip", "-n", namespace, "neigh", "flush", "all"], check=True)


def test_an_ipv6_flow_whose_neighbour_solicitation_is_dropped_gets_neighbour_discovery_let_in_too(lab, tmp_path):
    """A rule in the forward chain alone lets the flow through in the sandbox and changes nothing
    in real traffic: the input chain drops the client's neighbour solicitation for the router,
    so no packet of the flow is ever sent (nor the server's advertisement, when the router asks
    for its address). The fix lets neighbour discovery in and proves that the solicitation comes
    in; pasted, the flow connects."""
    scenario = own_scenario(tmp_path, "nd", ND_DROPPED, [WEB6])
    router = lab(scenario)
    web = scenario.flows[0]
    fix = propose(router, web, "accept")
    flow_rule, discovery = fix["commands"]
    assert discovery.endswith("nft 'add rule inet filter input icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert }"
                              " accept comment \"nftrace fix " + fix_date(discovery) + ": accept neighbour discovery\"'")
    assert fix["after"]["neighbour_solicitation"]["verdict"] == "accept"
    assert fix["after"]["neighbour_solicitation"]["decided_by"]["new"] is True
    assert fix["after"]["next_hop_advertisement"]["decided_by"]["new"] is True  # the same rule
    assert "neighbour discovery through: every neighbour's solicitations and advertisements" in fix["scope"]
    paste([flow_rule])
    forget_neighbours(router)
    assert real_traffic(router, web) == "timeout"
    paste([discovery])
    forget_neighbours(router)
    assert real_traffic(router, web) == "connected"


def test_a_flow_the_ruleset_lets_through_still_gets_neighbour_discovery_let_in_where_it_is_dropped(lab, tmp_path):
    """Not "nothing to change": without its sender's neighbour solicitation the flow never comes."""
    scenario = own_scenario(tmp_path, "nd-forward-open", ND_DROPPED_FORWARD_OPEN, [WEB6])
    router = lab(scenario)
    web = scenario.flows[0]
    fix = propose(router, web, "accept")
    assert fix["needed"] is True and len(fix["commands"]) == 1 and "nd-neighbor-solicit" in fix["commands"][0]
    assert fix["after"]["verdict"] == "accept" and fix["after"]["neighbour_solicitation"]["verdict"] == "accept"
    paste(fix["commands"])
    forget_neighbours(router)
    assert real_traffic(router, web) == "connected"


def test_a_flow_whose_next_hops_neighbour_advertisement_is_dropped_gets_neighbour_discovery_let_in(lab, tmp_path):
    """Neighbour discovery is let in from the LAN only: the router never learns the server's
    link-layer address, and the flow, let through by the forward chain, goes no further."""
    web4 = {**WEB6, "name": "web over IPv4", "from": "10.77.1.2", "to": "10.77.2.2", "expect": "accept"}
    scenario = own_scenario(tmp_path, "nd-lan-only", ND_FROM_LAN_ONLY, [WEB6, web4])
    router = lab(scenario)
    web = flow_named(scenario, "web over IPv6")
    forget_neighbours(router)
    assert real_traffic(router, web) == "timeout"
    fix = propose(router, web, "accept", keep=keep_file(tmp_path, scenario, web))
    assert fix["kept"] == 1
    assert len(fix["commands"]) == 1 and "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert }" in fix["commands"][0]
    assert fix["after"]["neighbour_solicitation"]["decided_by"]["new"] is False  # let in already
    assert fix["after"]["reply"]["verdict"] == "accept"  # the flow's answer, not one to neighbour discovery
    assert fix["after"]["next_hop_advertisement"]["decided_by"]["new"] is True
    paste(fix["commands"])
    forget_neighbours(router)
    assert real_traffic(router, web) == "connected"


ND_OUTPUT_CLOSED = ND_FROM_LAN_ONLY.replace('iifname "r-client" icmpv6', "icmpv6").replace(
    "    chain forward {",
    "    chain output {\n        type filter hook output priority filter; policy drop;\n"
    "        ct state established,related accept\n    }\n    chain forward {")


def test_neighbour_discovery_the_router_sends_itself_is_let_out_where_the_output_chain_drops_it(lab, tmp_path):
    """Neighbour discovery comes in, but the output chain drops what the router sends itself:
    its answer to the client's solicitation, and its own solicitation for the server."""
    scenario = own_scenario(tmp_path, "nd-output-closed", ND_OUTPUT_CLOSED, [WEB6])
    router = lab(scenario)
    web = scenario.flows[0]
    forget_neighbours(router)
    assert real_traffic(router, web) == "timeout"
    fix = propose(router, web, "accept")
    assert len(fix["commands"]) == 1 and "add rule inet filter output icmpv6 type" in fix["commands"][0]
    after = fix["after"]
    assert (after["neighbour_answer"]["decided_by"]["new"], after["next_hop_solicitation"]["decided_by"]["new"]) == (
        True, True)
    paste(fix["commands"])
    forget_neighbours(router)
    assert real_traffic(router, web) == "connected"


def test_neighbour_discovery_dropped_by_legacy_ip6tables_gets_a_rule_for_each_message(lab, tmp_path):
    scenario = own_scenario(tmp_path, "nd-legacy", "table inet unused {\n}\n", [WEB6])
    router = lab(scenario)
    subprocess.run(["ip", "netns", "exec", router.topology.router, "ip6tables-legacy-restore"], input=ND_DROPPED_LEGACY,
                   text=True, check=True)
    web = scenario.flows[0]
    fix = propose(router, web, "accept")
    assert len(fix["commands"]) == 3
    for command, message in zip(fix["commands"][1:], ("neighbour-solicitation", "neighbour-advertisement")):
        assert "ip6tables" in command and f"-p ipv6-icmp -m icmp6 --icmpv6-type {message}" in command
    assert fix["after"]["neighbour_solicitation"]["verdict"] == "accept"
    paste(fix["commands"])
    forget_neighbours(router)
    assert real_traffic(router, web) == "connected"


def fix_date(command: str) -> str:
    return command.split("nftrace fix ", 1)[1].split(":", 1)[0]


# -- where no command can name the chain, and whose chains they are ----------------------------------

ANONYMOUS = """
table inet filter {
    set admins { type ipv4_addr; elements = { 10.77.1.9 } }
    chain forward {
        type filter hook forward priority filter; policy accept;
        ct state established,related accept
        tcp dport 22 jump { ip saddr @admins accept; log prefix "ssh refused: "; drop; }
    }
}
"""


def test_a_drop_inside_an_anonymous_chain_is_fixed_above_the_rule_that_jumps_into_it(lab, tmp_path):
    flows = [{"name": "ssh from the client", "from": "10.77.1.2", "to": "10.77.2.2", "proto": "tcp", "dport": 22,
              "expect": "drop"},
             {"name": "ssh from the server's side", "sender": "server", "from": "10.77.2.2", "to": "10.77.1.2",
              "proto": "tcp", "dport": 22, "expect": "drop"},
             {"name": "web", "from": "10.77.1.2", "to": "10.77.2.2", "proto": "tcp", "dport": 443, "expect": "accept"}]
    scenario = own_scenario(tmp_path, "anonymous", ANONYMOUS, flows)
    router = lab(scenario)
    ssh = flow_named(scenario, "ssh from the client")
    fix = propose(router, ssh, "accept", keep=keep_file(tmp_path, scenario, ssh))
    listing = subprocess.run(["ip", "netns", "exec", router.topology.router, "nft", "-a", "list", "chain", "inet",
                              "filter", "forward"], capture_output=True, text=True).stdout
    jump = next(line for line in listing.splitlines() if "tcp dport 22 jump {" in line)
    handle = listing.split("} # handle ")[1].split()[0]
    assert jump and f"insert rule inet filter forward position {handle} " in fix["commands"][0]
    paste(fix["commands"])
    assert real_traffic(router, ssh) == "connected"
    assert_others_keep_their_verdicts(router, scenario, ssh)


def test_a_fix_in_firewalld_chains_says_a_reload_undoes_it_and_gives_firewalld_s_own_command(lab, tmp_path):
    scenario = find_scenario("firewalld-zones")
    router = lab(scenario)
    cockpit = flow_named(scenario, "cockpit from the public zone is rejected after the zone chains return")
    fix = propose(router, cockpit, "accept")
    (note,) = fix["managers"]
    assert note["manager"] == "firewalld" and note["proven"] is False and "reload" in note["note"]
    assert note["hint"].startswith("firewall-cmd --zone=public --add-rich-rule=")
    paste(fix["commands"])
    assert live_verdict(router, cockpit) == "accept"


# A port forward to an address the router has no route to: the kernel drops what netfilter let through.
FORWARD_TO_NOWHERE = """table ip nat {
    chain prerouting {
        type nat hook prerouting priority dstnat;
        tcp dport 2222 dnat to 192.0.2.99:22
    }
}
table inet filter {
    chain input {
        type filter hook input priority filter; policy accept;
    }
}
"""


NOWHERE_FLOWS = [{"name": "a port forward to nowhere", "from": "10.77.1.2", "to": "10.77.1.1", "proto": "tcp",
                  "dport": 2222, "expect": "accept"},
                 {"name": "web, routed through no chain", "from": "10.77.1.2", "to": "10.77.2.2", "proto": "tcp",
                  "dport": 80, "expect": "accept"},
                 {"name": "mail, routed through no chain", "from": "10.77.1.2", "to": "10.77.2.2", "proto": "tcp",
                  "dport": 25, "expect": "accept"}]


def test_a_drop_asked_of_a_packet_the_kernel_drops_after_a_port_forward_gets_a_chain_that_filters(lab, tmp_path):
    scenario = own_scenario(tmp_path, "nowhere", FORWARD_TO_NOWHERE, NOWHERE_FLOWS)
    router = lab(scenario)
    forward = flow_named(scenario, "a port forward to nowhere")
    fix = propose(router, forward, "drop")
    # No rule decided: netfilter let it through (a NAT chain, which sees a connection's first
    # packet only) and routing dropped it. The drop goes in a filter chain of its own on the
    # hook, after the port forward: it matches the address and port the packet was sent on to.
    assert fix["after"]["verdict"] == "drop" and fix["after"]["decided_by"]["new"] is True
    (command,) = fix["commands"]
    assert "add chain inet filter prerouting { type filter hook prerouting priority filter; policy accept; }" \
           in command
    assert "ip saddr 10.77.1.2 ip daddr 192.0.2.99 tcp dport 22 drop" in command
    paste(fix["commands"])
    assert live_verdict(router, forward) == "drop"


def test_a_drop_asked_of_a_packet_no_chain_filtered_gets_a_base_chain_of_its_own(lab, tmp_path):
    scenario = own_scenario(tmp_path, "nowhere", FORWARD_TO_NOWHERE, NOWHERE_FLOWS)
    router = lab(scenario)
    web = flow_named(scenario, "web, routed through no chain")
    fix = propose(router, web, "drop", keep=keep_file(tmp_path, scenario, web))
    # inet filter exists, with no chain on forward: the line adds one (and the table, were it missing).
    (command,) = fix["commands"]
    assert "'add table inet filter; add chain inet filter forward { type filter hook forward priority filter; " \
           "policy accept; }; add rule inet filter forward ip saddr 10.77.1.2 ip daddr 10.77.2.2 tcp dport 80 drop" \
           in command
    assert fix["after"]["decided_by"]["new"] is True
    paste(fix["commands"])
    assert live_verdict(router, web) == "drop"
    assert real_traffic(router, web) == "timeout"
    assert live_verdict(router, flow_named(scenario, "mail, routed through no chain")) == "accept"


KUBE_PROXY = """
table ip kube-proxy {
    set cluster-ips { type ipv4_addr; elements = { 172.30.0.41 } }
    chain filter-input {
        type filter hook input priority -110; policy accept;
        ct state new ip daddr @cluster-ips reject
    }
    chain filter-forward {
        type filter hook forward priority -110; policy accept;
        ct state new ip daddr @cluster-ips reject
    }
}
"""
KUBE_FLOWS = [{"name": "ssh to the node", "from": "10.77.1.2", "to": "10.77.1.1", "proto": "tcp", "dport": 22,
               "expect": "accept"},
              {"name": "web through the node", "from": "10.77.1.2", "to": "10.77.2.2", "proto": "tcp", "dport": 80,
               "expect": "accept"}]


def test_a_drop_asked_of_a_packet_kube_proxy_let_through_goes_in_a_table_kube_proxy_does_not_rewrite(lab, tmp_path):
    scenario = own_scenario(tmp_path, "kube", KUBE_PROXY, KUBE_FLOWS)
    router = lab(scenario)
    ssh = flow_named(scenario, "ssh to the node")
    fix = propose(router, ssh, "drop")
    (command,) = fix["commands"]
    assert "'add table inet filter; add chain inet filter input { type filter hook input priority filter; " \
           "policy accept; }; add rule inet filter input " in command and "kube-proxy" not in command
    assert fix["managers"] == []
    paste(fix["commands"])
    assert live_verdict(router, ssh) == "drop"
    assert live_verdict(router, flow_named(scenario, "web through the node")) == "accept"


# -- iptables-nft ----------------------------------------------------------------------------------

def test_iptables_nft_tables_are_changed_with_iptables_by_position_and_at_the_end(lab, tmp_path):
    scenario = find_scenario("docker")
    router = lab(scenario)
    redis = flow_named(scenario, "the admin's DOCKER-USER rule keeps redis private")
    fix = propose(router, redis, "accept", keep=keep_file(tmp_path, scenario, redis))
    (command,) = fix["commands"]
    assert " -I DOCKER-USER 1 " in command and " nft " not in command
    paste(fix["commands"])
    assert live_verdict(router, redis) == "accept"
    unpublished = flow_named(scenario, "an unpublished container port falls through DOCKER to the FORWARD policy")
    fix = propose(router, unpublished, "accept")
    (command,) = fix["commands"]
    assert " -A FORWARD " in command and " nft " not in command
    assert any(note["manager"] == "docker" and "DOCKER-USER" in note["hint"] for note in fix["managers"])
    paste(fix["commands"])
    assert live_verdict(router, unpublished) == "accept"
    others = [flow for flow in scenario.flows if flow.name not in (redis.name, unpublished.name)]
    assert [(flow.name, live_verdict(router, flow)) for flow in others] == [(flow.name, flow.expect) for flow in others]
