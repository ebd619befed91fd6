"""`nftrace why` against the real kernel on iptables routers: legacy x_tables (TRACE lines
through nfnetlink_log), iptables-nft (nftables trace events, shown in iptables syntax), and
a host with both. Each run must leave the router's firewall and its nf_log bindings exactly
as they were.

The kernel decides; these tests state what iptables' documented semantics say it must have
decided, and that nftrace names the rule that did it: table, chain, rule number (legacy) or
handle (nftables), and the rule as iptables-save prints it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, firewall_state, lab_topology, load_ruleset, nftrace, traffic, unavailable, why
from nftrace.lab.topology import (CLIENT_V4, CLIENT_V6, ROUTER_CLIENT_V4, ROUTER_CLIENT_V6, ROUTER_SERVER_V4, SERVER_V4,
                            Topology, in_netns)

pytestmark = pytest.mark.kernel

RULES_V4 = """*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -p tcp -m tcp --dport 7000 -j DROP
-A PREROUTING -p udp -m udp --dport 5001 -j CT --notrack
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -p tcp -m tcp --dport 8080 -j MARK --set-xmark 0x1/0xffffffff
-A FORWARD -p tcp -m tcp --dport 8443 -j DROP
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -d 10.77.1.1/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.77.2.2:80
-A POSTROUTING -o r-server -j MASQUERADE
COMMIT
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:CLIENTS - [0:0]
:SSH - [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -s 10.77.1.0/24 -j CLIENTS
-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -i r-client -o r-server -p tcp -m tcp --dport 443 -j ACCEPT
-A FORWARD -d 10.77.2.2/32 -p tcp -m tcp --dport 80 -j ACCEPT
-A OUTPUT -p tcp -m tcp --dport 25 -j DROP
-A CLIENTS -p tcp -m tcp --dport 22 -j SSH
-A CLIENTS -p tcp -m tcp --dport 25 -j DROP
-A CLIENTS -p tcp -m tcp --dport 2323 -j REJECT --reject-with tcp-reset
-A CLIENTS -p udp -m udp --dport 5000 -j ACCEPT
-A SSH -s 10.77.1.3/32 -j ACCEPT
-A SSH -j RETURN
COMMIT
"""

RULES_V6 = """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:CLIENTS6 - [0:0]
-A INPUT -p ipv6-icmp -j ACCEPT
-A INPUT -s fd77:1::/64 -j CLIENTS6
-A CLIENTS6 -p tcp -m tcp --dport 80 -j DROP
-A CLIENTS6 -p tcp -m tcp --dport 443 -j ACCEPT
COMMIT
"""

FLAVOURS = {"legacy": ("iptables-legacy-restore", "ip6tables-legacy-restore"),
            "nft": ("iptables-nft-restore", "ip6tables-nft-restore")}


def load_rules(flavour: str, extra_nft: str = ""):
    """Lab setup: the legacy or iptables-nft rules of both families in the router (and nft rules)."""
    def setup(topo: Topology) -> None:
        v4, v6 = FLAVOURS[flavour]
        in_netns(topo.router, [v4], input=RULES_V4)
        in_netns(topo.router, [v6], input=RULES_V6)
        if extra_nft:
            load_ruleset(topo.router, extra_nft)
    return setup


@pytest.fixture(scope="module")
def legacy_lab():
    with lab_topology("iptl", load_rules("legacy")) as topo:
        yield topo


@pytest.fixture(scope="module")
def nft_lab():
    with lab_topology("iptn", load_rules("nft")) as topo:
        yield topo


def tcp_to_router(lab, port, host=ROUTER_CLIENT_V4):
    return traffic(lab.client, "tcp", host, str(port), "--timeout", "1")


def tcp_flow(port, src=CLIENT_V4, dst=ROUTER_CLIENT_V4):
    return ("--from", src, "--to", dst, "--proto", "tcp", "--dport", str(port))


def chain_steps(packet):
    return [(s["backend"], s["table"], s["chain"], s["type"], s["rule_number"], s["verdict"], s["depth"])
            for s in packet["steps"]]


LEGACY = "iptables-legacy"


# -- legacy iptables ---------------------------------------------------------------------------


def test_legacy_drop_names_table_chain_rule_number_and_save_text(legacy_lab):
    packet = why(legacy_lab, *tcp_flow(25), command=tcp_to_router(legacy_lab, 25)).packet
    assert packet["backend"] == "nft+iptables-legacy"
    assert packet["verdict"] == "drop"
    assert packet["decided_by"] == {
        "hook": "input", "family": "ip", "table": "filter", "chain": "CLIENTS", "type": "rule", "handle": None,
        "rule_number": 2, "text": "-A CLIENTS -p tcp -m tcp --dport 25 -j DROP", "verdict": "drop",
        "iptables": "-A CLIENTS -p tcp -m tcp --dport 25 -j DROP", "backend": LEGACY, "netns": legacy_lab.router,
    }
    assert packet["summary"] == "dropped by iptables filter CLIENTS rule 2: -A CLIENTS -p tcp -m tcp --dport 25 -j DROP"


def test_legacy_tables_report_in_hook_and_priority_order(legacy_lab):
    packet = why(legacy_lab, *tcp_flow(25), command=tcp_to_router(legacy_lab, 25)).packet
    assert [(s["hook"], s["table"], s["chain"], s["type"]) for s in packet["steps"]] == [
        ("prerouting", "raw", "PREROUTING", "policy"),
        ("prerouting", "mangle", "PREROUTING", "policy"),
        ("prerouting", "nat", "PREROUTING", "policy"),
        ("input", "mangle", "INPUT", "policy"),
        ("input", "filter", "INPUT", "rule"),
        ("input", "filter", "CLIENTS", "rule"),
    ]
    assert packet["hooks"] == ["prerouting", "input"]


def test_legacy_return_rule_and_end_of_chain_lead_back_to_the_drop_policy(legacy_lab):
    packet = why(legacy_lab, *tcp_flow(22), command=tcp_to_router(legacy_lab, 22)).packet
    filter_steps = [step for step in chain_steps(packet) if step[1] == "filter"]
    assert filter_steps == [
        (LEGACY, "filter", "INPUT", "rule", 3, "jump", 0),
        (LEGACY, "filter", "CLIENTS", "rule", 1, "jump", 1),
        (LEGACY, "filter", "SSH", "rule", 2, "return", 2),
        (LEGACY, "filter", "CLIENTS", "return", None, "return", 1),
        (LEGACY, "filter", "INPUT", "policy", None, "drop", 0),
    ]
    assert packet["steps"][-3]["text"] == "-A SSH -j RETURN"
    assert packet["summary"] == "dropped by iptables filter INPUT policy drop"
    assert (packet["decided_by"]["chain"], packet["decided_by"]["type"]) == ("INPUT", "policy")
    assert packet["decided_by"]["rule_number"] is None and packet["decided_by"]["type"] == "policy"


def test_legacy_reject_is_a_drop_that_says_rejected(legacy_lab):
    packet = why(legacy_lab, *tcp_flow(2323), command=tcp_to_router(legacy_lab, 2323)).packet
    assert packet["verdict"] == "drop"
    assert packet["summary"] == ("rejected by iptables filter CLIENTS rule 3: "
                                 "-A CLIENTS -p tcp -m tcp --dport 2323 -j REJECT --reject-with tcp-reset")


def test_legacy_accept_is_decided_by_the_filter_rule_not_the_nat_policy_after_it(legacy_lab):
    packet = why(legacy_lab, "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "udp", "--dport", "5000",
                 command=traffic(legacy_lab.client, "udp", ROUTER_CLIENT_V4, "5000")).packet
    assert (packet["verdict"], packet["complete"]) == ("accept", True)
    assert packet["decided_by"]["text"] == "-A CLIENTS -p udp -m udp --dport 5000 -j ACCEPT"
    assert packet["decided_by"]["rule_number"] == 4
    assert packet["steps"][-1]["table"] == "nat" and packet["steps"][-1]["type"] == "policy"


def test_legacy_raw_table_drop(legacy_lab):
    packet = why(legacy_lab, *tcp_flow(7000), command=tcp_to_router(legacy_lab, 7000)).packet
    assert packet["decided_by"]["table"] == "raw"
    assert packet["decided_by"]["rule_number"] == 1
    assert packet["hooks"] == ["prerouting"]


def test_legacy_mangle_drop_in_forward(legacy_lab):
    packet = why(legacy_lab, *tcp_flow(8443, dst=SERVER_V4), command=traffic(legacy_lab.client, "tcp", SERVER_V4, "8443",
                                                                               "--timeout", "1")).packet
    assert packet["summary"] == "dropped by iptables mangle FORWARD rule 1: -A FORWARD -p tcp -m tcp --dport 8443 -j DROP"
    assert packet["hooks"] == ["prerouting", "forward"]


def test_legacy_forward_accept_then_masquerade(legacy_lab):
    packet = why(legacy_lab, *tcp_flow(443, dst=SERVER_V4), command=traffic(legacy_lab.client, "tcp", SERVER_V4, "443",
                                                                              "--timeout", "1")).packet
    assert (packet["verdict"], packet["complete"]) == ("accept", True)
    assert packet["hooks"] == ["prerouting", "forward", "postrouting"]
    assert packet["decided_by"]["text"] == "-A FORWARD -i r-client -o r-server -p tcp -m tcp --dport 443 -j ACCEPT"
    masquerade = next(s for s in packet["steps"] if s["table"] == "nat" and s["chain"] == "POSTROUTING")
    assert (masquerade["rule_number"], masquerade["verdict"]) == (1, "accept")
    assert {"hook": "postrouting", "field": "src", "to": f"{ROUTER_SERVER_V4}:{packet['packet']['sport']}",
            "kind": "masquerade"}.items() <= packet["nat"][-1].items()


def test_legacy_dnat_is_followed_to_the_forward_rule(legacy_lab):
    packet = why(legacy_lab, *tcp_flow(8080), command=tcp_to_router(legacy_lab, 8080)).packet
    dnat = next(s for s in packet["steps"] if s["table"] == "nat" and s["chain"] == "PREROUTING")
    assert dnat["text"] == "-A PREROUTING -d 10.77.1.1/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.77.2.2:80"
    assert packet["decided_by"]["text"] == "-A FORWARD -d 10.77.2.2/32 -p tcp -m tcp --dport 80 -j ACCEPT"
    assert packet["hooks"] == ["prerouting", "forward", "postrouting"]
    (rewrite,) = [change for change in packet["nat"] if change["field"] == "dst"]
    assert (rewrite["to"], rewrite["kind"]) == (f"{SERVER_V4}:80", "dnat")
    assert rewrite["rule"] == ("iptables nat PREROUTING rule 1: -A PREROUTING -d 10.77.1.1/32 -p tcp -m tcp "
                               "--dport 8080 -j DNAT --to-destination 10.77.2.2:80")


def test_legacy_output_drop_of_a_locally_sent_packet(legacy_lab):
    command = [sys.executable, "-m", "nftrace.lab.traffic", "tcp", SERVER_V4, "25", "--timeout", "1"]
    packet = why(legacy_lab, *tcp_flow(25, src=ROUTER_SERVER_V4, dst=SERVER_V4), command=command).packet
    assert packet["hooks"] == ["output"]
    assert packet["summary"] == "dropped by iptables filter OUTPUT rule 1: -A OUTPUT -p tcp -m tcp --dport 25 -j DROP"


def test_legacy_output_policy_accept_of_a_locally_sent_packet(legacy_lab):
    command = [sys.executable, "-m", "nftrace.lab.traffic", "tcp", SERVER_V4, "80", "--timeout", "1"]
    packet = why(legacy_lab, *tcp_flow(80, src=ROUTER_SERVER_V4, dst=SERVER_V4), command=command).packet
    assert (packet["verdict"], packet["complete"]) == ("accept", True)
    assert packet["hooks"] == ["output", "postrouting"]
    assert packet["summary"] == "accepted by iptables filter OUTPUT policy accept"
    assert packet["decided_by"]["type"] == "policy" and packet["decided_by"]["backend"] == LEGACY


@pytest.mark.parametrize("backend", ["auto", "iptables"])
def test_legacy_packet_to_a_local_address_is_followed_through_loopback(legacy_lab, backend):
    command = [sys.executable, "-m", "nftrace.lab.traffic", "tcp", ROUTER_CLIENT_V4, "9", "--timeout", "1"]
    packet = why(legacy_lab, *tcp_flow(9, src=ROUTER_CLIENT_V4, dst=ROUTER_CLIENT_V4), command=command, backend=backend).packet
    assert packet["hooks"][:1] == ["output"] and packet["hooks"][-2:] == ["prerouting", "input"]
    assert (packet["verdict"], packet["decided_by"]["text"]) == ("accept", "-A INPUT -i lo -j ACCEPT")
    tables = [(s["hook"], s["table"], s["chain"]) for s in packet["steps"]]
    assert tables.index(("output", "filter", "OUTPUT")) < tables.index(("input", "filter", "INPUT"))


def test_legacy_ipv6_drop_in_a_user_chain(legacy_lab):
    packet = why(legacy_lab, *tcp_flow(80, src=CLIENT_V6, dst=ROUTER_CLIENT_V6),
                 command=tcp_to_router(legacy_lab, 80, ROUTER_CLIENT_V6)).packet
    assert packet["summary"] == "dropped by ip6tables filter CLIENTS6 rule 1: -A CLIENTS6 -p tcp -m tcp --dport 80 -j DROP"
    assert packet["decided_by"]["family"] == "ip6"


def test_legacy_ipv6_accept(legacy_lab):
    packet = why(legacy_lab, *tcp_flow(443, src=CLIENT_V6, dst=ROUTER_CLIENT_V6),
                 command=tcp_to_router(legacy_lab, 443, ROUTER_CLIENT_V6)).packet
    assert (packet["verdict"], packet["complete"]) == ("accept", True)
    assert packet["decided_by"]["text"] == "-A CLIENTS6 -p tcp -m tcp --dport 443 -j ACCEPT"


def test_human_output_names_the_legacy_rule_first(legacy_lab):
    before = firewall_state(legacy_lab.router)
    result = nftrace("--netns", legacy_lab.router, "why", *tcp_flow(25), "--count", "1", "--timeout", "15", "--",
                     *tcp_to_router(legacy_lab, 25))
    assert result.returncode == 0, result.stderr
    assert firewall_state(legacy_lab.router) == before
    lines = result.stdout.splitlines()
    assert re.match(r"^DROP\s+10\.77\.1\.2:\d+ → 10\.77\.1\.1:25 tcp  dropped by iptables filter CLIENTS rule 2: "
                    r"-A CLIENTS -p tcp -m tcp --dport 25 -j DROP$", lines[0]), lines[0]
    assert "    iptables filter INPUT" in lines
    assert any(line.strip() == "[#2] -A CLIENTS -p tcp -m tcp --dport 25 -j DROP  → drop" for line in lines)


# Rule 1 drops port 5001, rule 2 accepts 5000: the rules that change under a trace below.
DROP_5001_ACCEPT_5000 = """*filter
:INPUT DROP [0:0]
-A INPUT -p udp -m udp --dport 5001 -j DROP
-A INPUT -p udp -m udp --dport 5000 -j ACCEPT
COMMIT
"""


def test_legacy_rules_changed_mid_trace_are_named_as_they_are_now(topology):
    in_netns(topology.router, ["iptables-legacy-restore"], input=DROP_5001_ACCEPT_5000)
    send = " ".join(traffic(topology.client, "udp", ROUTER_CLIENT_V4, "5000"))
    # Rule 1 goes away between the two datagrams: the ACCEPT is rule 1 for the second one, and
    # the rule that was rule 1 must not be blamed for it.
    script = f"{send}; iptables-legacy -D INPUT 1; sleep 2.3; {send}"
    result = nftrace("--netns", topology.router, "why", "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "udp",
                     "--dport", "5000", "--count", "2", "--timeout", "20", "--json", "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    decided = [(p["verdict"], p["decided_by"]["rule_number"], p["decided_by"]["text"]) for p in result.packets]
    assert decided == [("accept", 2, "-A INPUT -p udp -m udp --dport 5000 -j ACCEPT"),
                       ("accept", 1, "-A INPUT -p udp -m udp --dport 5000 -j ACCEPT")]


@pytest.mark.parametrize("change,later", [
    # The ACCEPT is rule 1 after the change; the packet before it met it as rule 2.
    ("iptables-legacy -D INPUT 1", 1),
    # Rule 2 is the DROP for 5001 after the change, which the packet to 5000 cannot have met.
    ("iptables-legacy -I INPUT 1 -p tcp --dport 22 -j ACCEPT", 3),
])
def test_a_legacy_line_read_after_the_rules_changed_is_named_by_the_rules_it_met(topology, change, later):
    """nftrace is held (SIGSTOP) while the first datagram passes and the rules change, and
    reads that datagram's TRACE line seconds later, as on a loaded machine."""
    in_netns(topology.router, ["iptables-legacy-restore"], input=DROP_5001_ACCEPT_5000)
    send = " ".join(traffic(topology.client, "udp", ROUTER_CLIENT_V4, "5000"))
    # $PPID is nftrace: the command is its child. The trap lets it go whatever happens.
    script = (f"trap 'kill -CONT $PPID' EXIT; kill -STOP $PPID; {send}; {change}; sleep 2.5; kill -CONT $PPID; "
              f"sleep 1; {send}")
    result = nftrace("--netns", topology.router, "why", "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "udp",
                     "--dport", "5000", "--count", "2", "--timeout", "30", "--json", "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    decided = [(p["verdict"], p["decided_by"]["rule_number"], p["decided_by"]["text"]) for p in result.packets]
    assert decided == [("accept", 2, "-A INPUT -p udp -m udp --dport 5000 -j ACCEPT"),
                       ("accept", later, "-A INPUT -p udp -m udp --dport 5000 -j ACCEPT")]
    assert not any("changed while packets were traced" in warning for warning in result.json["warnings"])


def test_a_legacy_ipset_match_is_evaluated_against_the_namespace_s_ipset(topology):
    """`-m set --match-set allowed src` against the ipset as the router's namespace holds it
    (ipsets are per namespace): while the client is not in the set, the DROP policy decides
    and the near miss is that rule, failing on exactly the set membership; once the client's
    address is added, the kernel accepts by that rule."""
    router = topology.router
    make_ipset(router, "allowed", "hash:ip", ["10.77.1.99"])
    rule = accept_ssh_from_ipset(router, "allowed")
    assert_dropped_with_the_ipset_as_the_one_mismatch(topology, rule, "allowed")

    in_netns(router, ["ipset", "add", "allowed", CLIENT_V4])
    packet = why(topology, *tcp_flow(22), command=tcp_to_router(topology, 22)).packet
    assert packet["verdict"] == "accept"
    decided = packet["decided_by"]
    assert (decided["backend"], decided["chain"], decided["type"], decided["rule_number"], decided["text"]) == (
        LEGACY, "INPUT", "rule", 1, rule)


def test_a_nomatch_entry_of_a_legacy_ipset_keeps_the_client_out_of_the_wider_network(topology):
    """hash:net holds the client's /24 but carves its /30 out (`nomatch`): the kernel looks up
    the most specific entry, so the client is not in the set and the DROP policy decides."""
    router = topology.router
    make_ipset(router, "clients", "hash:net", ["10.77.1.0/24", "10.77.1.0/30 nomatch"])
    rule = accept_ssh_from_ipset(router, "clients")
    assert_dropped_with_the_ipset_as_the_one_mismatch(topology, rule, "clients")


def make_ipset(router: str, name: str, kind: str, entries: list) -> None:
    """Lab setup: ipset `name` in the router's namespace (ipsets are per namespace: made there,
    never in the machine's own)."""
    if shutil.which("ipset") is None:
        unavailable("ipset is not installed (scripts/setup.sh installs it)")
    in_netns(router, ["ipset", "create", name, kind])
    for entry in entries:
        in_netns(router, ["ipset", "add", name, *entry.split()])


def accept_ssh_from_ipset(router: str, name: str) -> str:
    """Lab setup: legacy INPUT dropping all but ssh from the sources in ipset `name`; the rule
    as iptables-save prints it."""
    rule = f"-A INPUT -p tcp -m tcp --dport 22 -m set --match-set {name} src -j ACCEPT"
    in_netns(router, ["iptables-legacy-restore"], input=f"*filter\n:INPUT DROP [0:0]\n{rule}\nCOMMIT\n")
    return rule


def assert_dropped_with_the_ipset_as_the_one_mismatch(lab: Topology, rule: str, name: str) -> None:
    """ssh from the client is dropped by the INPUT policy, and its one near miss is `rule`,
    failing on the ipset membership alone (✗), read from the router's own ipsets."""
    packet = why(lab, *tcp_flow(22), command=tcp_to_router(lab, 22)).packet
    assert packet["verdict"] == "drop"
    assert packet["summary"] == "dropped by iptables filter INPUT policy drop"
    assert (packet["decided_by"]["chain"], packet["decided_by"]["type"]) == ("INPUT", "policy")
    [near_miss] = packet["near_misses"]
    assert (near_miss["backend"], near_miss["chain"], near_miss["rule_number"], near_miss["text"],
            near_miss["verdict"]) == (LEGACY, "INPUT", 1, rule, "accept")
    [mismatch] = near_miss["mismatches"]
    assert (mismatch["expr"], mismatch["packet"], mismatch["wanted"], mismatch["field"], mismatch["set_name"],
            mismatch["first"]) == (f"-m set --match-set {name} src", CLIENT_V4, f"@{name}", "ip saddr", name, True)
    assert near_miss["unknown"] == []


# -- legacy iptables with TRACE rules (the path for kernels without nf_tables) ----------------


def test_trace_rules_give_the_same_answer_without_nftables(legacy_lab):
    packet = why(legacy_lab, *tcp_flow(25), command=tcp_to_router(legacy_lab, 25), backend="iptables").packet
    assert packet["backend"] == "iptables-legacy"
    assert packet["summary"] == "dropped by iptables filter CLIENTS rule 2: -A CLIENTS -p tcp -m tcp --dport 25 -j DROP"
    assert packet["packet"]["dport"] == 25
    assert all(step["backend"] == LEGACY for step in packet["steps"])


def test_trace_rules_keep_raw_rule_numbers_as_the_admin_counts_them(legacy_lab):
    # nftrace's TRACE rule is first in raw PREROUTING while it runs; the admin's DROP stays rule 1.
    packet = why(legacy_lab, *tcp_flow(7000), command=tcp_to_router(legacy_lab, 7000), backend="iptables").packet
    assert packet["summary"] == "dropped by iptables raw PREROUTING rule 1: -A PREROUTING -p tcp -m tcp --dport 7000 -j DROP"


def test_trace_rules_accept_completes_at_the_last_table_of_the_exit_hook(legacy_lab):
    packet = why(legacy_lab, "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "udp", "--dport", "5000",
                 command=traffic(legacy_lab.client, "udp", ROUTER_CLIENT_V4, "5000"), backend="iptables").packet
    assert (packet["verdict"], packet["complete"]) == ("accept", True)
    assert packet["decided_by"]["rule_number"] == 4


def test_trace_rules_ipv6_create_the_missing_raw_table_and_say_so(legacy_lab):
    before = firewall_state(legacy_lab.router)
    had_raw = "raw" in before["ip6_tables"]
    result = nftrace("--netns", legacy_lab.router, "why", *tcp_flow(80, src=CLIENT_V6, dst=ROUTER_CLIENT_V6), "--count",
                     "1", "--timeout", "15", "--json", "--backend", "iptables", "--",
                     *tcp_to_router(legacy_lab, 80, ROUTER_CLIENT_V6))
    assert result.returncode == 0, result.stderr
    assert [p["summary"] for p in result.packets] == [
        "dropped by ip6tables filter CLIENTS6 rule 1: -A CLIENTS6 -p tcp -m tcp --dport 80 -j DROP"]
    after = firewall_state(legacy_lab.router)
    assert any("raw table did not exist" in warning for warning in result.json["warnings"]) == (not had_raw)
    if not had_raw:
        # x_tables tables cannot be removed from userspace: an empty raw table is all that stays.
        assert after["ip6_tables"] == sorted(before["ip6_tables"] + ["raw"])
        empty_raw = "*raw\n:PREROUTING ACCEPT \n:OUTPUT ACCEPT \nCOMMIT\n"
        assert empty_raw in after["ip6tables-legacy"]
        after["ip6tables-legacy"] = after["ip6tables-legacy"].replace(empty_raw, "")
        after["ip6_tables"] = before["ip6_tables"]
    assert after == before


# -- what a killed run leaves, and two runs at once -------------------------------------------


def wait_for(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def start_nftrace(*args):
    return subprocess.Popen([sys.executable, "-m", "nftrace", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), stdin=subprocess.DEVNULL)


def test_cleanup_removes_trace_rules_and_restores_nf_log_after_sigkill(legacy_lab):
    before = firewall_state(legacy_lab.router)
    run = start_nftrace("--netns", legacy_lab.router, "why", *tcp_flow(9), "--timeout", "30", "--backend", "iptables")
    try:
        assert wait_for(lambda: "nftrace trace rule" in in_netns(legacy_lab.router, ["iptables-legacy-save"]).stdout)
    finally:
        run.kill()
        run.communicate()
    left = firewall_state(legacy_lab.router)
    assert left["nf_log"].split()[0] == "nfnetlink_log"
    assert f"nftrace trace rule, pid {run.pid}" in left["iptables-legacy"]
    result = nftrace("--netns", legacy_lab.router, "cleanup")
    assert result.returncode == 0, result.stderr
    assert "restored nf_log ip → nf_log_ipv4" in result.stdout
    assert f"removed 2 iptables TRACE rules of killed run {run.pid}" in result.stdout  # PREROUTING and OUTPUT
    assert firewall_state(legacy_lab.router) == before
    assert nftrace("--netns", legacy_lab.router, "cleanup").stdout.strip() == "nothing to clean up"


def test_a_run_started_while_a_killed_one_is_still_a_zombie_undoes_what_it_left(legacy_lab):
    before = firewall_state(legacy_lab.router)
    run = start_nftrace("--netns", legacy_lab.router, "why", *tcp_flow(9), "--timeout", "30", "--backend", "iptables")
    try:
        assert wait_for(lambda: "nftrace trace rule" in in_netns(legacy_lab.router, ["iptables-legacy-save"]).stdout)
        run.kill()
        os.waitid(os.P_PID, run.pid, os.WEXITED | os.WNOWAIT)  # dead, not yet waited for
        result = nftrace("--netns", legacy_lab.router, "why", *tcp_flow(10), "--timeout", "1", "--backend", "iptables")
    finally:
        run.kill()
        run.communicate()
    assert result.returncode == 3, result.stderr
    assert (f"warning: undid what killed nftrace runs left: nf_log ip → nf_log_ipv4; "
            f"2 iptables TRACE rules of killed run {run.pid}") in result.stderr
    assert firewall_state(legacy_lab.router) == before  # nf_log_ipv4 bound again, not nfnetlink_log


def test_second_run_in_the_namespace_is_refused_and_sigterm_undoes_the_first(legacy_lab):
    before = firewall_state(legacy_lab.router)
    first = start_nftrace("--netns", legacy_lab.router, "why", *tcp_flow(9), "--timeout", "30")
    try:
        assert wait_for(lambda: firewall_state(legacy_lab.router)["nf_log"].startswith("nfnetlink_log"))
        second = nftrace("--netns", legacy_lab.router, "why", *tcp_flow(10), "--timeout", "5", "--json")
        assert second.returncode == 2
        assert "NFLOG group 0" in second.stderr and second.stdout == ""
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=10)
        assert first.returncode == 128 + signal.SIGTERM, stderr
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert firewall_state(legacy_lab.router) == before


# What a listener received on NFLOG group 0, every message's prefix (TRACE line or not).
LISTEN_WHILE_LOGGING = """
import json, socket, time
from nftrace.iptables.nflog import PACKET_MESSAGE_TYPE, NflogListener, pyroute2_message_classes, read_logger
from nftrace.kernel.netlink import decode_datagram
with NflogListener(("ip",)) as listener:
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for port in (7, 8):
        sender.sendto(b"x", ("127.0.0.1", port))
    time.sleep(0.3)
    prefixes = []
    while True:
        try:
            datagram = listener.sock.recv(1 << 16)
        except BlockingIOError:
            break
        for msg_type, raw in decode_datagram(datagram):
            if msg_type == PACKET_MESSAGE_TYPE:
                msg = pyroute2_message_classes().packet(raw)
                msg.decode()
                prefixes.append(msg.get_attr("NFULA_PREFIX"))
    print(json.dumps({"logger": read_logger("ip"), "prefixes": prefixes}))
"""


def test_while_nftrace_stands_in_for_the_logger_only_trace_lines_reach_it_not_log_rules_lines(netns):
    """Binding nfnetlink_log as a namespace's nf_log logger takes TRACE lines (and conntrack's
    own messages) from the kernel log, not LOG rules' or nft `log` statements' lines: those name
    their logger type. nftrace once warned, in the machine's own namespace, that they went to it."""
    ns = netns("nflg")
    load_ruleset(ns, """table ip t {
        chain out {
            type filter hook output priority -400;
            udp dport 7 counter log prefix "nft-log "
            udp dport 8 meta nftrace set 1
        }
    }""")
    in_netns(ns, ["iptables-legacy", "-A", "OUTPUT", "-p", "udp", "--dport", "7", "-j", "LOG", "--log-prefix", "xt-log "])
    result = in_netns(ns, [sys.executable, "-c", LISTEN_WHILE_LOGGING], env=dict(os.environ, PYTHONPATH=str(REPO)))
    received = json.loads(result.stdout)
    assert received["logger"] == "nfnetlink_log"
    assert received["prefixes"] and all(prefix.startswith("TRACE: filter:") for prefix in received["prefixes"])
    assert "counter packets 1 " in in_netns(ns, ["nft", "list", "chain", "ip", "t", "out"]).stdout
    assert re.search(r"^\s+1\s+\d+ LOG ", in_netns(ns, ["iptables-legacy", "-vnL", "OUTPUT"]).stdout, re.M)


def start_drops(lab, duration: int = 60):
    """`nftrace drops --json` in the lab's router, watching once it returns."""
    run = start_nftrace("--netns", lab.router, "drops", "--duration", str(duration), "--json")
    banner = run.stderr.readline()
    assert banner.startswith("watching drops of"), banner + run.stderr.read()
    return run


def test_drops_keeps_legacy_trace_lines_out_of_the_kernel_log_and_names_the_tables_it_does_not_trace(legacy_lab):
    """Every packet drops traces makes legacy tables write a TRACE line per rule it meets, to the
    namespace's nf_log logger: in the machine's own namespace the kernel log, so drops refused
    to run there beside any legacy table, even an empty one. nfnetlink_log stands in while it
    runs; what legacy rules drop counts under the kernel's reason."""
    before = firewall_state(legacy_lab.router)
    run = start_drops(legacy_lab, duration=4)
    try:
        assert firewall_state(legacy_lab.router)["nf_log"].split() == ["nfnetlink_log", "nfnetlink_log"]
        subprocess.run(tcp_to_router(legacy_lab, 25), capture_output=True, timeout=30)  # CLIENTS: DROP
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, err
    document = json.loads(out)
    [named] = [warning for warning in document["warnings"] if warning.startswith("legacy iptables tables are not")]
    assert re.search(r"; ip6tables \([^)]*filter", named) and re.search(r": iptables \([^)]*filter", named)
    assert firewall_state(legacy_lab.router) == before
    if any("kernel drop reasons unavailable" in warning for warning in document["warnings"]):
        return  # bpftrace cannot watch kernel drops here: the rest is the kernel's reason
    assert document["rules"] == []
    [reason] = document["kernel_drops"]
    assert reason["reason"] == "NETFILTER_DROP"
    assert {flow["dport"] for flow in reason["flows"]} == {25}


def stop(run) -> dict:
    """SIGTERM: the end of a run by its user; the JSON document it printed."""
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=30)
    assert run.returncode in (0, 128 + signal.SIGTERM), err
    return json.loads(out)


def test_why_traces_legacy_tables_beside_a_running_drops_which_keeps_the_nf_log_binding_it_needs(legacy_lab):
    """`drops` names NETFILTER_DROP; the admin asks `why` of that flow in another terminal. Both
    bind nfnetlink_log: the one to leave last puts the old logger back."""
    before = firewall_state(legacy_lab.router)
    drops = start_drops(legacy_lab)
    try:
        packet = why(legacy_lab, *tcp_flow(25), command=tcp_to_router(legacy_lab, 25)).packet  # firewall unchanged
        assert packet["decided_by"]["iptables"] == "-A CLIENTS -p tcp -m tcp --dport 25 -j DROP"
        assert firewall_state(legacy_lab.router)["nf_log"].split() == ["nfnetlink_log", "nfnetlink_log"]
    finally:
        stop(drops)
    assert firewall_state(legacy_lab.router) == before


def test_drops_starts_beside_a_why_that_holds_the_legacy_trace_lines_and_the_last_to_leave_restores(legacy_lab):
    before = firewall_state(legacy_lab.router)
    waiting = start_nftrace("--netns", legacy_lab.router, "why", *tcp_flow(25), "--count", "1", "--timeout", "30", "--json")
    drops = None
    try:
        assert waiting.stderr.readline().startswith("tracing ")
        drops = start_drops(legacy_lab)
        subprocess.run(tcp_to_router(legacy_lab, 25), capture_output=True, timeout=30)
        out, err = waiting.communicate(timeout=30)
        assert waiting.returncode == 0, err
        [packet] = json.loads(out)["packets"]
        assert packet["decided_by"]["iptables"] == "-A CLIENTS -p tcp -m tcp --dport 25 -j DROP"
        assert firewall_state(legacy_lab.router)["nf_log"].split() == ["nfnetlink_log", "nfnetlink_log"]
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate()
        if drops is not None:
            stop(drops)
    assert firewall_state(legacy_lab.router) == before


# -- iptables-nft ------------------------------------------------------------------------------


def nft_handle(lab, family, table, chain, position):
    listing = in_netns(lab.router, ["nft", "-a", "list", "chain", family, table, chain]).stdout
    handles = [int(m.group(1)) for m in re.finditer(r"# handle (\d+)$", listing, re.M)][1:]
    return handles[position - 1]


def test_iptables_nft_drop_names_handle_rule_number_and_iptables_text(nft_lab):
    packet = why(nft_lab, *tcp_flow(25), command=tcp_to_router(nft_lab, 25)).packet
    assert packet["backend"] == "nft"
    decided = packet["decided_by"]
    assert (decided["backend"], decided["family"], decided["table"], decided["chain"]) == ("nft", "ip", "filter", "CLIENTS")
    assert decided["rule_number"] == 2
    assert decided["handle"] == nft_handle(nft_lab, "ip", "filter", "CLIENTS", 2)
    assert decided["iptables"] == "-A CLIENTS -p tcp -m tcp --dport 25 -j DROP"
    assert "drop" in decided["text"] and not decided["text"].startswith("-A")
    assert packet["summary"] == (f"dropped by ip filter CLIENTS rule handle {decided['handle']}: "
                                 "-A CLIENTS -p tcp -m tcp --dport 25 -j DROP")


def test_iptables_nft_return_rule_end_of_chain_and_policy(nft_lab):
    packet = why(nft_lab, *tcp_flow(22), command=tcp_to_router(nft_lab, 22)).packet
    steps = [(s["table"], s["chain"], s["type"], s["rule_number"], s["verdict"], s["iptables"])
             for s in packet["steps"] if s["table"] == "filter"]
    assert steps == [
        ("filter", "INPUT", "rule", 3, "jump", "-A INPUT -s 10.77.1.0/24 -j CLIENTS"),
        ("filter", "CLIENTS", "rule", 1, "jump", "-A CLIENTS -p tcp -m tcp --dport 22 -j SSH"),
        ("filter", "SSH", "rule", 2, "return", "-A SSH -j RETURN"),
        ("filter", "CLIENTS", "return", None, "return", None),
        ("filter", "INPUT", "policy", None, "drop", None),
    ]
    assert packet["summary"] == "dropped by ip filter INPUT policy drop"


def test_iptables_nft_reject(nft_lab):
    packet = why(nft_lab, *tcp_flow(2323), command=tcp_to_router(nft_lab, 2323)).packet
    assert packet["summary"].startswith("rejected by ip filter CLIENTS rule handle ")
    assert packet["summary"].endswith(": -A CLIENTS -p tcp -m tcp --dport 2323 -j REJECT --reject-with tcp-reset")


def test_iptables_nft_accept_is_decided_by_the_filter_rule_not_the_nat_chain(nft_lab):
    packet = why(nft_lab, "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "udp", "--dport", "5000",
                 command=traffic(nft_lab.client, "udp", ROUTER_CLIENT_V4, "5000")).packet
    assert packet["verdict"] == "accept"
    assert packet["decided_by"]["iptables"] == "-A CLIENTS -p udp -m udp --dport 5000 -j ACCEPT"
    assert packet["decided_by"]["rule_number"] == 4


def test_iptables_nft_forward_accept_with_masquerade(nft_lab):
    packet = why(nft_lab, *tcp_flow(443, dst=SERVER_V4), command=traffic(nft_lab.client, "tcp", SERVER_V4, "443",
                                                                          "--timeout", "1")).packet
    assert packet["hooks"] == ["prerouting", "forward", "postrouting"]
    assert packet["decided_by"]["iptables"] == "-A FORWARD -i r-client -o r-server -p tcp -m tcp --dport 443 -j ACCEPT"
    masquerade = next(s for s in packet["steps"] if s["table"] == "nat" and s["type"] == "rule")
    assert masquerade["iptables"] == "-A POSTROUTING -o r-server -j MASQUERADE"


def test_iptables_nft_output_policy_accept(nft_lab):
    command = [sys.executable, "-m", "nftrace.lab.traffic", "tcp", SERVER_V4, "80", "--timeout", "1"]
    packet = why(nft_lab, *tcp_flow(80, src=ROUTER_SERVER_V4, dst=SERVER_V4), command=command).packet
    assert packet["summary"] == "accepted by ip filter OUTPUT policy accept"


def test_iptables_nft_ipv6(nft_lab):
    packet = why(nft_lab, *tcp_flow(80, src=CLIENT_V6, dst=ROUTER_CLIENT_V6),
                 command=tcp_to_router(nft_lab, 80, ROUTER_CLIENT_V6)).packet
    decided = packet["decided_by"]
    assert (decided["family"], decided["chain"], decided["rule_number"]) == ("ip6", "CLIENTS6", 1)
    assert decided["iptables"] == "-A CLIENTS6 -p tcp -m tcp --dport 80 -j DROP"


# -- both on one host --------------------------------------------------------------------------

MIXED_LEGACY = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j DROP
-A INPUT -p tcp -m tcp --dport 80 -j LOG --log-prefix "legacy sees 80: "
COMMIT
"""
MIXED_NFT = """
table ip early {
    chain input {
        type filter hook input priority filter - 10; policy accept;
        tcp dport { 22, 25, 80 } counter
    }
}
table inet fw {
    chain input {
        type filter hook input priority filter + 10; policy accept;
        tcp dport 25 drop
        tcp dport 80 accept
    }
}
"""


@pytest.fixture(scope="module")
def mixed_lab():
    def setup(topo: Topology) -> None:
        in_netns(topo.router, ["iptables-legacy-restore"], input=MIXED_LEGACY)
        load_ruleset(topo.router, MIXED_NFT)

    with lab_topology("iptm", setup) as topo:
        yield topo


def mixed_steps(packet):
    return [(s["backend"], s["table"], s["chain"], s["type"], s["verdict"]) for s in packet["steps"] if s["hook"] == "input"]


def test_mixed_host_legacy_drop_between_two_nft_chains(mixed_lab):
    packet = why(mixed_lab, *tcp_flow(22), command=tcp_to_router(mixed_lab, 22)).packet
    assert packet["backend"] == "nft+iptables-legacy"
    assert mixed_steps(packet) == [("nft", "early", "input", "rule", "continue"),
                                   ("nft", "early", "input", "policy", "accept"),
                                   (LEGACY, "filter", "INPUT", "rule", "drop")]
    assert packet["summary"] == "dropped by iptables filter INPUT rule 1: -A INPUT -p tcp -m tcp --dport 22 -j DROP"


def test_mixed_host_nft_drop_after_the_legacy_policy(mixed_lab):
    packet = why(mixed_lab, *tcp_flow(25), command=tcp_to_router(mixed_lab, 25)).packet
    assert mixed_steps(packet) == [("nft", "early", "input", "rule", "continue"),
                                   ("nft", "early", "input", "policy", "accept"),
                                   (LEGACY, "filter", "INPUT", "policy", "accept"),
                                   ("nft", "fw", "input", "rule", "drop")]
    assert packet["decided_by"]["handle"] is not None
    assert packet["summary"].startswith("dropped by inet fw input rule handle")


def test_mixed_host_accept_through_all_three_with_a_legacy_log_rule(mixed_lab):
    packet = why(mixed_lab, *tcp_flow(80), command=tcp_to_router(mixed_lab, 80)).packet
    assert mixed_steps(packet) == [("nft", "early", "input", "rule", "continue"),
                                   ("nft", "early", "input", "policy", "accept"),
                                   (LEGACY, "filter", "INPUT", "rule", "continue"),
                                   (LEGACY, "filter", "INPUT", "policy", "accept"),
                                   ("nft", "fw", "input", "rule", "accept")]
    assert packet["summary"].startswith("accepted by inet fw input rule handle")


# -- a ruleset not written for these tests: ufw ------------------------------------------------

UFW_FILES = ("after.init", "after.rules", "after6.rules", "before.init", "before.rules", "before6.rules", "user.rules",
             "user6.rules", "ufw.conf")


def configure_ufw_namespace(etc: Path, flavour: str) -> None:
    """/etc/netns/NS/{ufw,alternatives}: `ip netns exec NS ufw` then uses its own pristine
    configuration, applies no sysctl, and runs the iptables flavour asked for."""
    (etc / "ufw" / "applications.d").mkdir(parents=True)
    for name in UFW_FILES:
        shutil.copy2(Path("/usr/share/ufw") / name, etc / "ufw" / name)
    (etc / "ufw" / "sysctl.conf").write_text("# nftrace tests: ufw changes no sysctl here\n")
    alternatives = etc / "alternatives"
    alternatives.mkdir()
    for entry in Path("/etc/alternatives").iterdir():
        if entry.is_symlink():
            (alternatives / entry.name).symlink_to(os.readlink(entry))
    for command in ("iptables", "ip6tables"):
        for suffix in ("", "-restore", "-save"):
            link = alternatives / f"{command}{suffix}"
            link.unlink(missing_ok=True)
            link.symlink_to(f"/usr/sbin/{command}-{flavour}{suffix}")


@dataclass
class UfwTopology(Topology):
    flavour: str = "legacy"  # the iptables that ufw runs in the router: legacy or nft

    def down(self) -> None:
        """The namespaces, then the router's /etc/netns files (ufw's own /etc there)."""
        super().down()
        etc = Path("/etc/netns") / self.router
        if etc.exists():
            shutil.rmtree(etc)
        with contextlib.suppress(OSError):  # not empty: other namespaces' files, not ours
            Path("/etc/netns").rmdir()


@pytest.fixture(scope="module", params=["legacy", "nft"])
def ufw_lab(request):
    if shutil.which("ufw") is None:
        unavailable("ufw is not installed (scripts/setup.sh installs it)")
    def setup(topo: UfwTopology) -> None:
        configure_ufw_namespace(Path("/etc/netns") / topo.router, topo.flavour)
        for command in (["ufw", "allow", "22/tcp"], ["ufw", "deny", "25/tcp"], ["ufw", "--force", "enable"]):
            in_netns(topo.router, command)

    with lab_topology(f"ufw{request.param[0]}", setup, UfwTopology, flavour=request.param) as topo:
        yield topo


def ufw_rule(lab, text):
    """(position in its chain, save text) of a rule of ufw's ruleset, as the flavour's save prints it."""
    save = in_netns(lab.router, [f"iptables-{lab.flavour}-save"]).stdout
    chain = text.split()[1]
    rules = [line for line in save.splitlines() if line.startswith(f"-A {chain} ")]
    return rules.index(text) + 1


def test_ufw_allow_rule_is_named_in_the_flavour_it_was_written_with(ufw_lab):
    packet = why(ufw_lab, *tcp_flow(22), command=tcp_to_router(ufw_lab, 22)).packet
    text = "-A ufw-user-input -p tcp -m tcp --dport 22 -j ACCEPT"
    decided = packet["decided_by"]
    assert (packet["verdict"], decided["chain"], decided["iptables"]) == ("accept", "ufw-user-input", text)
    assert decided["rule_number"] == ufw_rule(ufw_lab, text)
    if ufw_lab.flavour == "legacy":
        assert (decided["backend"], decided["handle"], packet["backend"]) == (LEGACY, None, "nft+iptables-legacy")
    else:
        assert (decided["backend"], packet["backend"]) == ("nft", "nft")
        assert decided["handle"] == nft_handle(ufw_lab, "ip", "filter", "ufw-user-input", decided["rule_number"])


def test_ufw_deny_rule(ufw_lab):
    packet = why(ufw_lab, *tcp_flow(25), command=tcp_to_router(ufw_lab, 25)).packet
    text = "-A ufw-user-input -p tcp -m tcp --dport 25 -j DROP"
    assert (packet["verdict"], packet["decided_by"]["iptables"]) == ("drop", text)
    assert packet["decided_by"]["rule_number"] == ufw_rule(ufw_lab, text)


def test_ufw_default_deny_is_the_input_policy_after_its_log_rule(ufw_lab):
    packet = why(ufw_lab, *tcp_flow(8080), command=tcp_to_router(ufw_lab, 8080)).packet
    where = "iptables filter" if ufw_lab.flavour == "legacy" else "ip filter"
    assert packet["summary"] == f"dropped by {where} INPUT policy drop"
    log = [s for s in packet["steps"] if "[UFW BLOCK]" in (s["iptables"] or "")]
    assert [(s["chain"], s["verdict"]) for s in log] == [("ufw-after-logging-input", "continue")]
