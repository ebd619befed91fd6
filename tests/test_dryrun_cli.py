"""`nftrace why --dry-run` as a user runs it, against a lab router with an ordinary office
ruleset (tests/data/router.nft): the answer, its marking, candidate rulesets, established
connections, and bad input, which is one line, exit 2, and leaves nothing behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, closed_to_neighbour_discovery, lab_topology, nftrace
from nftrace.lab.topology import in_netns
from nftrace.dryrun.sandbox import NETNS_RUN_DIR, SANDBOX_PREFIX, load_ruleset_file, read_candidate

pytestmark = pytest.mark.kernel

ROUTER_RULESET = REPO / "tests" / "data" / "router.nft"
WEB = ("--from", "10.77.1.2", "--to", "10.77.2.2", "--proto", "tcp", "--dport", "443")
DMZ_TO_LAN_HTTP = ("--from", "10.77.2.2", "--to", "10.77.1.2", "--proto", "tcp", "--dport", "80")

CANDIDATE = """flush ruleset
table inet candidate {
    chain forward {
        type filter hook forward priority filter; policy accept;
        tcp dport 443 drop comment "web closed for maintenance"
    }
}
"""


@pytest.fixture(scope="module")
def router():
    with lab_topology("dcli", lambda topo: load_ruleset_file(topo.router, read_candidate(ROUTER_RULESET))) as topology:
        yield topology.router


def all_sandboxes() -> set:
    return {name for name in os.listdir(NETNS_RUN_DIR) if name.startswith(SANDBOX_PREFIX)}


def sandboxes() -> set:
    """Sandboxes of processes that are gone: what a finished nftrace run must not leave. (Live
    ones belong to other runs on the machine, e.g. a concurrent `nftrace test`.)"""
    from nftrace.kernel.system import pid_alive

    return {name for name in all_sandboxes() if not pid_alive(int(name[len(SANDBOX_PREFIX):].split("-")[0]))}


def dry(router, *args):
    return nftrace("--netns", router, "why", *args, "--dry-run", "--json")


def test_dry_run_is_marked_as_such_in_json(router):
    result = dry(router, *WEB)
    assert result.returncode == 0, result.stderr
    document = result.json
    assert document["mode"] == "dry-run" and document["netns"] == router
    assert document["dry_run"]["injected"]["iif"] == "r-client"
    assert document["dry_run"]["ruleset"] == "copy"
    assert document["dry_run"]["sandbox"].startswith(SANDBOX_PREFIX)
    assert any("conntrack" in item for item in document["dry_run"]["not_copied"])


def test_live_runs_say_live(router):
    result = nftrace("--netns", router, "why", *WEB, "--timeout", "1", "--json")
    assert result.json["mode"] == "live" and result.json["dry_run"] is None


def test_human_answer_comes_first_and_says_it_is_a_dry_run(router):
    result = nftrace("--netns", router, "why", *WEB, "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.match(r"^ACCEPT 10\.77\.1\.2:\d+ → 10\.77\.2\.2:443 tcp  accepted by inet filter lan_to_dmz rule handle \d+: "
                    r"meta l4proto \. th dport @dmz_services accept$", lines[0]), lines[0]
    assert any(line.strip().startswith(f"dry run: sandbox copy of netns {router}") for line in lines)


def test_rule_handles_are_the_targets_own(router):
    decided = dry(router, *WEB).json["packets"][0]["decided_by"]
    listing = in_netns(router, ["nft", "-a", "list", "chain", "inet", "filter", "lan_to_dmz"]).stdout
    assert f"{decided['text']} # handle {decided['handle']}" in listing


def test_candidate_ruleset_answers_instead_of_the_current_one(router, tmp_path):
    candidate = tmp_path / "new.nft"
    candidate.write_text(CANDIDATE)
    before = in_netns(router, ["nft", "-a", "list", "ruleset"]).stdout
    result = nftrace("--netns", router, "why", *WEB, "--dry-run", "--ruleset", str(candidate), "--json")
    assert result.returncode == 0, result.stderr
    packet = result.json["packets"][0]
    assert packet["verdict"] == "drop"
    assert (packet["decided_by"]["table"], packet["decided_by"]["text"]) == (
        "candidate", 'tcp dport 443 drop comment "web closed for maintenance"')
    assert result.json["dry_run"]["ruleset"] == str(candidate)
    assert in_netns(router, ["nft", "-a", "list", "ruleset"]).stdout == before
    assert dry(router, *WEB).json["packets"][0]["verdict"] == "accept"


def test_candidate_in_iptables_save_form_is_recognised(router, tmp_path):
    candidate = tmp_path / "rules.v4"
    candidate.write_text("*filter\n:FORWARD DROP [0:0]\n-A FORWARD -p tcp --dport 80 -j ACCEPT\nCOMMIT\n")
    result = nftrace("--netns", router, "why", *WEB, "--dry-run", "--ruleset", str(candidate),
                     "--ruleset-kind", "iptables-nft", "--json")
    assert result.returncode == 0, result.stderr
    decided = result.json["packets"][0]["decided_by"]
    assert (decided["table"], decided["chain"], decided["type"], decided["verdict"]) == ("filter", "FORWARD", "policy",
                                                                                          "drop")


def test_established_connection_is_let_through_where_a_new_one_is_not(router):
    new = dry(router, *DMZ_TO_LAN_HTTP).json["packets"][0]
    established = nftrace("--netns", router, "why", *DMZ_TO_LAN_HTTP, "--dry-run", "--state", "established",
                          "--json").json
    assert (new["verdict"], new["decided_by"]["type"]) == ("drop", "policy")
    packet = established["packets"][0]
    assert packet["verdict"] == "accept"
    assert packet["decided_by"]["text"] == "ct state established,related accept"
    assert established["dry_run"]["state"] == "established"
    assert packet["conntrack"][0]["state"] == "established"


def test_a_new_packet_through_conntrack_rules_carries_the_conntrack_warning(router):
    warnings = dry(router, *WEB).json["warnings"]
    assert any("conntrack table starts empty" in warning for warning in warnings)


def test_locally_sent_flow_starts_in_the_output_hook(router):
    packet = dry(router, "--from", "10.77.2.1", "--to", "10.77.2.2", "--proto", "udp", "--dport", "514").json["packets"][0]
    assert packet["hooks"] == ["output"]
    assert packet["decided_by"]["text"] == 'oifname "r-server" udp dport 514 drop comment "no syslog to the dmz"'


def test_iif_says_where_a_packet_from_afar_arrives(router):
    packet = dry(router, "--from", "192.0.2.7", "--to", "10.77.2.2", "--proto", "tcp", "--dport", "443",
                 "--iif", "r-client").json["packets"][0]
    assert packet["packet"]["iif"] == "r-client"
    assert packet["decided_by"]["chain"] == "lan_to_dmz"


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_invalid_candidate_is_the_parsers_message_with_file_and_line(router, tmp_path):
    bad = tmp_path / "bad.nft"
    bad.write_text("table inet t {\n  chain c {\n    tcp dport 22 acccept\n  }\n}\n")
    before = sandboxes()
    line = one_line_error(nftrace("--netns", router, "why", *WEB, "--dry-run", "--ruleset", str(bad), "--json"))
    assert re.match(rf"^nftrace: --ruleset: {re.escape(str(bad))}:3:\d+(-\d+)?: Error: ", line), line
    assert sandboxes() == before


def test_unreadable_candidate_is_one_line(router, tmp_path):
    before = sandboxes()
    line = one_line_error(nftrace("--netns", router, "why", *WEB, "--dry-run", "--ruleset", str(tmp_path / "none.nft")))
    assert line == f"nftrace: --ruleset: cannot read {tmp_path / 'none.nft'}: No such file or directory"
    assert sandboxes() == before


def test_iptables_candidate_that_does_not_load_is_one_line(router, tmp_path):
    bad = tmp_path / "bad.rules"
    bad.write_text("*filter\n-A FORWARD -p tcp --dport 80 -j NOSUCHTARGET\nCOMMIT\n")
    line = one_line_error(nftrace("--netns", router, "why", *WEB, "--dry-run", "--ruleset", str(bad),
                                  "--ruleset-kind", "iptables-nft"))
    assert line.startswith(f"nftrace: --ruleset: {bad}: iptables-nft-restore:")


@pytest.mark.parametrize("args,message", [
    (("--from", "10.77.1.2", "--to", "10.77.2.2", "--dry-run"), "give --proto"),
    (("--from", "10.77.1.0/24", "--to", "10.77.2.2", "--proto", "tcp", "--dport", "1", "--dry-run"), "one address"),
    (WEB + ("--ruleset", "x.nft"), "go with --dry-run"),
    (WEB + ("--dry-run", "--state", "half-open"), "--state"),
    (("--from", "192.0.2.7", "--to", "10.77.2.2", "--proto", "tcp", "--dport", "443", "--dry-run"), "no route back"),
    (WEB + ("--dry-run", "--", "true"), "no COMMAND"),
])
def test_bad_dry_run_requests_are_one_line_and_leave_nothing(router, args, message):
    before = sandboxes()
    line = one_line_error(nftrace("--netns", router, "why", *args))
    assert message in line
    assert sandboxes() == before


def test_sigterm_while_the_sandbox_is_built_removes_it(router, tmp_path):
    big = tmp_path / "big.nft"
    rules = "".join(f"    tcp dport {1000 + i} ip saddr 192.0.2.{i % 250} drop\n" for i in range(100_000))
    big.write_text("table inet big {\n  chain input {\n    type filter hook input priority 0;\n" + rules + "  }\n}\n")
    process = subprocess.Popen([sys.executable, "-m", "nftrace", "--netns", router, "why", *WEB, "--dry-run",
                                "--ruleset", str(big), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    prefix = f"{SANDBOX_PREFIX}{process.pid}-"
    deadline = time.monotonic() + 20
    while not any(name.startswith(prefix) for name in all_sandboxes()) and process.poll() is None:
        assert time.monotonic() < deadline, "no sandbox appeared"
        time.sleep(0.01)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr
    assert not any(name.startswith(prefix) for name in all_sandboxes())


BRIDGED_RULESET = """
table inet host {
    chain input {
        type filter hook input priority filter; policy drop;
        tcp dport 22 accept
    }
    chain output {
        type filter hook output priority filter; policy drop;
        meta skuid 0 udp dport 53 accept
    }
}
"""


@pytest.fixture
def bridged_host(netns):
    """A host whose address sits on a bridge (one port, up), with a rule on socket owners."""
    host = netns("brh")
    for command in (["ip", "link", "add", "br0", "type", "bridge"], ["ip", "link", "add", "port0", "type", "veth",
                    "peer", "name", "port0-peer"], ["ip", "link", "set", "port0", "master", "br0"],
                    ["ip", "address", "add", "10.88.0.1/24", "dev", "br0"], ["ip", "link", "set", "br0", "up"],
                    ["ip", "link", "set", "port0", "up"], ["ip", "link", "set", "port0-peer", "up"]):
        in_netns(host, command)
    in_netns(host, ["nft", "-f", "-"], input=BRIDGED_RULESET)
    return host


def test_a_packet_for_a_bridge_arrives_through_a_port_of_its_copy(bridged_host):
    result = nftrace("--netns", bridged_host, "why", "--from", "10.88.0.5", "--to", "10.88.0.1", "--proto", "tcp",
                     "--dport", "22", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    [packet] = result.json["packets"]
    assert result.json["dry_run"]["injected"]["iif"] == "port0"
    assert packet["packet"]["iif"] == "port0" and packet["verdict"] == "accept"
    assert packet["hooks"][:2] == ["prerouting", "input"]  # the bridge's, then the device's own
    assert packet["decided_by"]["text"] == "tcp dport 22 accept"
    assert any("has not learnt where" in warning for warning in result.json["warnings"])
    assert not any("br0" in item for item in result.json["dry_run"]["not_copied"])


def test_a_packet_through_an_interface_that_is_only_approximated_carries_a_warning(netns):
    host = netns("vlh")
    for command in (["ip", "link", "add", "base0", "type", "veth", "peer", "name", "base0-peer"],
                    ["ip", "link", "add", "link", "base0", "name", "mv7", "type", "macvlan"],
                    ["ip", "address", "add", "10.88.7.1/24", "dev", "mv7"],
                    ["ip", "link", "set", "base0", "up"], ["ip", "link", "set", "mv7", "up"]):
        in_netns(host, command)
    in_netns(host, ["nft", "-f", "-"], input=BRIDGED_RULESET)
    result = nftrace("--netns", host, "why", "--from", "10.88.7.5", "--to", "10.88.7.1", "--proto", "tcp",
                     "--dport", "22", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    assert result.json["packets"][0]["packet"]["iif"] == "mv7"
    assert any("mv7 is a macvlan" in warning for warning in result.json["warnings"])
    assert any("mv7 is a macvlan" in item for item in result.json["dry_run"]["not_copied"])


def test_a_rule_on_socket_owners_on_the_path_carries_a_warning(bridged_host):
    result = nftrace("--netns", bridged_host, "why", "--from", "10.88.0.1", "--to", "10.88.0.5", "--proto", "udp",
                     "--dport", "53", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    packet = result.json["packets"][0]
    assert (packet["verdict"], packet["decided_by"]["text"]) == ("accept", "meta skuid 0 udp dport 53 accept")
    assert any("socket owners" in warning for warning in result.json["warnings"])


def test_no_packet_seen_exits_3_and_says_why_when_the_interface_is_down(netns):
    host = netns("down")
    in_netns(host, ["ip", "link", "add", "wan0", "type", "veth", "peer", "name", "wan0-peer"])
    in_netns(host, ["ip", "address", "add", "10.89.0.1/24", "dev", "wan0"])
    result = nftrace("--netns", host, "why", "--from", "10.89.0.5", "--to", "10.89.0.1", "--proto", "udp",
                     "--dport", "53", "--iif", "wan0", "--dry-run", "--json")
    assert result.returncode == 3, result.stderr
    assert result.json["packets"] == []
    assert "interface wan0 is down in netns" in " ".join(result.json["warnings"])


def test_a_locally_sent_packet_without_a_route_is_the_senders_error_and_routings_reason(router):
    result = nftrace("--netns", router, "why", "--from", "10.77.1.1", "--to", "192.0.2.1", "--proto", "udp",
                     "--dport", "53", "--dry-run")
    assert result.returncode == 3
    assert result.stderr.splitlines() == [
        "nftrace inject: cannot send the dry run's packet: Network is unreachable",
        "no packet of 10.77.1.1 → 192.0.2.1:53 udp was seen",
        'warning: routing refuses to send it, so no packet reaches netfilter (the sender gets "Network is '
        'unreachable"): no route covers the destination in any routing table, not even a default route']


# -- IPv6: the sender's neighbour solicitation comes first --------------------------------------


ND_BLOCKED = "flush ruleset\n" + closed_to_neighbour_discovery("candidate")
ND_ALLOWED = ND_BLOCKED.replace("ct state established,related accept",
                                "ct state established,related accept\n        icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept")
WEB6 = ("--from", "fd77:1::2", "--to", "fd77:2::2", "--proto", "tcp", "--dport", "443")


def test_an_ipv6_flow_whose_senders_neighbour_solicitation_is_dropped_is_said_to_never_come(router, tmp_path):
    """The forward chain accepts the flow, but the input chain drops the client's neighbour
    solicitation for the router: live, no packet of it would ever arrive."""
    candidate = tmp_path / "nd-blocked.nft"
    candidate.write_text(ND_BLOCKED)
    result = dry(router, *WEB6, "--ruleset", str(candidate))
    assert result.returncode == 0, result.stderr
    assert result.packets[0]["verdict"] == "accept"
    solicitation = result.json["dry_run"]["neighbour_solicitation"]
    assert solicitation == {"src": "fd77:1::2", "target": "fd77:1::1", "iif": "r-client", "verdict": "drop",
                            "answer": "dropped by inet candidate input policy drop"}
    assert any(warning.startswith("fd77:1::2 must first find fd77:1::1's link-layer address, and the ruleset drops its "
                                  "neighbour solicitation on r-client (dropped by inet candidate input policy drop)")
               for warning in result.json["warnings"]), result.json["warnings"]


def test_a_neighbour_solicitation_let_in_has_no_warning_and_ipv4_asks_none(router, tmp_path):
    candidate = tmp_path / "nd-allowed.nft"
    candidate.write_text(ND_ALLOWED)
    result = dry(router, *WEB6, "--ruleset", str(candidate))
    assert result.returncode == 0, result.stderr
    assert result.json["dry_run"]["neighbour_solicitation"]["verdict"] == "accept"
    assert not any("neighbour solicitation" in warning for warning in result.json["warnings"])
    assert dry(router, *WEB, "--ruleset", str(candidate)).json["dry_run"]["neighbour_solicitation"] is None


ND_FROM_LAN_ONLY = ND_BLOCKED.replace(
    "ct state established,related accept",
    'ct state established,related accept\n        iifname "r-client" icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept')


def test_a_flow_whose_next_hops_neighbour_advertisement_is_dropped_is_said_to_go_no_further(router, tmp_path):
    """The client's solicitation comes in on the LAN side, but on the way out the router asks
    for the server's address, and the input chain drops the server's answer."""
    candidate = tmp_path / "nd-lan-only.nft"
    candidate.write_text(ND_FROM_LAN_ONLY)
    result = dry(router, *WEB6, "--ruleset", str(candidate))
    assert result.returncode == 0, result.stderr
    assert result.packets[0]["verdict"] == "accept"
    assert result.json["dry_run"]["neighbour_solicitation"]["verdict"] == "accept"
    assert result.json["dry_run"]["neighbour_answer"]["verdict"] == "accept"  # nothing filters the way out
    assert result.json["dry_run"]["next_hop_solicitation"] == {
        "src": "fd77:2::1", "target": "fd77:2::2", "oif": "r-server", "verdict": "accept",
        "answer": "accepted: no chain of the ruleset gave a verdict on its path (output, postrouting)"}
    assert result.json["dry_run"]["next_hop_advertisement"] == {
        "src": "fd77:2::2", "target": "fd77:2::1", "iif": "r-server", "verdict": "drop",
        "answer": "dropped by inet candidate input policy drop"}
    assert any(warning.startswith(f"to send the flow on through r-server, netns {router} must first find fd77:2::2's "
                                  "link-layer address, and the ruleset drops the neighbour advertisement that "
                                  "answers (dropped by inet candidate input policy drop)")
               for warning in result.json["warnings"]), result.json["warnings"]


def test_neighbour_discovery_that_the_output_chain_drops_is_said_both_ways(router, tmp_path):
    candidate = tmp_path / "nd-output-closed.nft"
    candidate.write_text(ND_ALLOWED.replace("    chain forward {", "    chain output {\n        type filter hook output "
                                            "priority filter; policy drop;\n    }\n    chain forward {"))
    result = dry(router, *WEB6, "--ruleset", str(candidate))
    assert result.returncode == 0, result.stderr
    warnings = result.json["warnings"]
    assert any(warning.startswith(f"fd77:1::2 must first find fd77:1::1's link-layer address, and the ruleset drops "
                                  f"the neighbour advertisement netns {router} answers with, out through r-client "
                                  "(dropped by inet candidate output policy drop)") for warning in warnings), warnings
    assert any(warning.startswith(f"to send the flow on through r-server, netns {router} must first find fd77:2::2's "
                                  "link-layer address, and the ruleset drops its neighbour solicitation out through "
                                  "r-server (dropped by inet candidate output policy drop)") for warning in warnings)


def test_a_flow_to_the_box_itself_waits_for_no_next_hop(router, tmp_path):
    candidate = tmp_path / "nd-lan-only.nft"
    candidate.write_text(ND_FROM_LAN_ONLY)
    result = dry(router, "--from", "fd77:1::2", "--to", "fd77:1::1", "--proto", "tcp", "--dport", "22",
                 "--ruleset", str(candidate))
    assert result.returncode == 0, result.stderr
    assert result.json["dry_run"]["next_hop_advertisement"] is None


def test_a_source_behind_a_gateway_is_asked_for_by_the_gateway(router, tmp_path):
    in_netns(router, ["ip", "-6", "route", "replace", "fd99::/64", "via", "fd77:1::2", "dev", "r-client"])
    candidate = tmp_path / "nd-blocked.nft"
    candidate.write_text(ND_BLOCKED)
    result = dry(router, "--from", "fd99::5", "--to", "fd77:2::2", "--proto", "tcp", "--dport", "443",
                 "--ruleset", str(candidate))
    assert result.returncode == 0, result.stderr
    assert result.json["dry_run"]["neighbour_solicitation"]["src"] == "fd77:1::2"
