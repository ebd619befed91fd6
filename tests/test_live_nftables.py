"""`nftrace why` against the real kernel: a router namespace with a real ruleset, real
packets from a client namespace, and the answer checked rule by rule.

The kernel decides; these tests only state what nftables' documented semantics say it must
have decided, and that nftrace names the rule that did it.
"""

from __future__ import annotations

import re
import sys

import pytest

from conftest import lab_topology, load_ruleset, nftrace, ruleset_state, traffic, why
from nftrace.lab.topology import CLIENT_V4, CLIENT_V6, ROUTER_CLIENT_V4, ROUTER_CLIENT_V6, ROUTER_SERVER_V4, SERVER_V4

pytestmark = pytest.mark.kernel

ROUTER_RULESET = """
table inet fw {
    set admins { type ipv4_addr; elements = { 10.77.1.2 } }
    set blocked6 { type ipv6_addr; elements = { fd77:1::2 } }
    map services { type inet_service : verdict; elements = { 8080 : jump web, 9090 : drop } }
    chain web { tcp dport 8080 counter accept; }
    chain ssh_zone { ip saddr @admins accept; return; }
    chain udp_zone { udp dport 5000 accept; }
    chain reject_zone { tcp dport 2323 reject with tcp reset; }
    chain input {
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        iif "lo" accept
        icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept
        tcp dport 22 jump ssh_zone
        tcp dport vmap @services
        tcp dport 2323 goto reject_zone
        udp dport 5353 jump udp_zone
        ip6 saddr @blocked6 tcp dport 80 drop
        tcp dport 80 accept
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "r-client" oifname "r-server" tcp dport 443 accept
    }
    chain output {
        type filter hook output priority filter; policy accept;
        tcp dport 25 drop
    }
}
table ip extra {
    chain input {
        type filter hook input priority filter - 10; policy accept;
        tcp dport 4444 drop
    }
}
"""


@pytest.fixture(scope="module")
def lab():
    with lab_topology("live", lambda topo: load_ruleset(topo.router, ROUTER_RULESET)) as topo:
        yield topo


def rule_handle(lab, family, table, chain, text):
    """The handle of the rule whose text is `text`, as `nft -a list` shows it."""
    from nftrace.lab.topology import in_netns

    listing = in_netns(lab.router, ["nft", "-a", "-s", "list", "chain", family, table, chain]).stdout
    for line in listing.splitlines():
        match = re.match(r"^\s*(.*) # handle (\d+)$", line)
        if match and match.group(1).strip() == text:
            return int(match.group(2))
    raise AssertionError(f"no rule '{text}' in {family} {table} {chain}:\n{listing}")


def tcp_from_client(lab, port, host=ROUTER_CLIENT_V4):
    return traffic(lab.client, "tcp", host, str(port), "--timeout", "1")


def test_input_accept_after_jump_names_the_rule_in_the_called_chain(lab):
    packet = why(lab, "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "tcp", "--dport", "22",
                 command=tcp_from_client(lab, 22)).packet
    assert packet["verdict"] == "accept"
    decided = packet["decided_by"]
    assert (decided["family"], decided["table"], decided["chain"], decided["type"]) == ("inet", "fw", "ssh_zone", "rule")
    assert decided["text"] == "ip saddr @admins accept"
    assert decided["handle"] == rule_handle(lab, "inet", "fw", "ssh_zone", "ip saddr @admins accept")
    assert decided["hook"] == "input"
    assert packet["hooks"] == ["prerouting", "input"]
    jump = next(step for step in packet["steps"] if step["verdict"] == "jump")
    assert (jump["chain"], jump["target"], jump["text"]) == ("input", "ssh_zone", "tcp dport 22 jump ssh_zone")
    assert packet["summary"].startswith("accepted by inet fw ssh_zone rule handle")


def test_verdict_map_drop_is_decided_by_the_vmap_rule(lab):
    packet = why(lab, "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "tcp", "--dport", "9090",
                 command=tcp_from_client(lab, 9090)).packet
    assert packet["verdict"] == "drop"
    assert packet["decided_by"]["text"] == "tcp dport vmap @services"
    assert packet["decided_by"]["verdict"] == "drop"
    assert packet["summary"] == (
        f"dropped by inet fw input rule handle {packet['decided_by']['handle']}: tcp dport vmap @services"
    )


def test_verdict_map_jump_is_followed_into_the_chain(lab):
    packet = why(lab, "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "tcp", "--dport", "8080",
                 command=tcp_from_client(lab, 8080)).packet
    verdicts = [(s["chain"], s["verdict"], s.get("target")) for s in packet["steps"] if s["table"] == "fw"]
    assert ("input", "jump", "web") in verdicts
    assert packet["verdict"] == "accept"
    assert packet["decided_by"]["chain"] == "web"
    assert packet["decided_by"]["text"] == "tcp dport 8080 counter accept"


def test_goto_then_reject_counts_as_drop_and_says_rejected(lab):
    packet = why(lab, "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "tcp", "--dport", "2323",
                 command=tcp_from_client(lab, 2323)).packet
    assert packet["verdict"] == "drop"
    assert packet["decided_by"]["chain"] == "reject_zone"
    assert packet["decided_by"]["text"] == "tcp dport 2323 reject with tcp reset"
    assert packet["summary"].startswith("rejected by inet fw reject_zone rule handle")
    goto = next(step for step in packet["steps"] if step["verdict"] == "goto")
    assert goto["target"] == "reject_zone"


def test_chain_that_falls_off_its_end_returns_then_policy_drops(lab):
    packet = why(lab, "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "udp", "--dport", "5353",
                 command=traffic(lab.client, "udp", ROUTER_CLIENT_V4, "5353")).packet
    fw_steps = [(s["chain"], s["type"], s["verdict"]) for s in packet["steps"] if s["table"] == "fw"]
    assert fw_steps == [("input", "rule", "jump"), ("udp_zone", "return", "return"), ("input", "policy", "drop")]
    assert packet["verdict"] == "drop"
    assert packet["decided_by"]["type"] == "policy"
    assert packet["summary"] == "dropped by inet fw input policy drop"


def test_second_table_on_the_same_hook_drops_first(lab):
    packet = why(lab, "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "tcp", "--dport", "4444",
                 command=tcp_from_client(lab, 4444)).packet
    assert packet["verdict"] == "drop"
    assert (packet["decided_by"]["family"], packet["decided_by"]["table"]) == ("ip", "extra")
    assert not any(step["table"] == "fw" for step in packet["steps"])


def test_ipv6_drop_by_named_set_rule(lab):
    packet = why(lab, "--from", CLIENT_V6, "--to", ROUTER_CLIENT_V6, "--proto", "tcp", "--dport", "80",
                 command=tcp_from_client(lab, 80, ROUTER_CLIENT_V6)).packet
    assert packet["verdict"] == "drop"
    assert packet["decided_by"]["text"] == "ip6 saddr @blocked6 tcp dport 80 drop"
    assert packet["packet"]["src"] == CLIENT_V6


def test_forwarded_packet_passes_prerouting_forward_postrouting(lab):
    packet = why(lab, "--from", CLIENT_V4, "--to", SERVER_V4, "--proto", "tcp", "--dport", "443",
                 command=traffic(lab.client, "tcp", SERVER_V4, "443", "--timeout", "1")).packet
    assert packet["hooks"] == ["prerouting", "forward", "postrouting"]
    assert packet["verdict"] == "accept"
    assert packet["decided_by"]["text"] == 'iifname "r-client" oifname "r-server" tcp dport 443 accept'
    assert (packet["packet"]["iif"], packet["packet"]["oif"]) == ("r-client", "r-server")


def test_forwarded_packet_dropped_by_forward_policy(lab):
    packet = why(lab, "--from", CLIENT_V4, "--to", SERVER_V4, "--proto", "tcp", "--dport", "8443",
                 command=traffic(lab.client, "tcp", SERVER_V4, "8443", "--timeout", "1")).packet
    assert packet["verdict"] == "drop"
    assert packet["decided_by"] == {
        "hook": "forward", "family": "inet", "table": "fw", "chain": "forward", "type": "policy", "handle": None,
        "rule_number": None, "text": None, "verdict": "drop", "iptables": None, "backend": "nft", "netns": lab.router,
    }


def test_locally_sent_packet_dropped_in_output(lab):
    # The traffic command runs inside the router's namespace, like nftrace itself.
    command = [sys.executable, "-m", "nftrace.lab.traffic", "tcp", SERVER_V4, "25", "--timeout", "1"]
    packet = why(lab, "--from", ROUTER_SERVER_V4, "--to", SERVER_V4, "--proto", "tcp", "--dport", "25",
                 command=command).packet
    assert packet["hooks"] == ["output"]
    assert packet["verdict"] == "drop"
    assert packet["decided_by"]["text"] == "tcp dport 25 drop"
    assert packet["decided_by"]["hook"] == "output"


def test_human_output_starts_with_the_one_line_answer(lab):
    result = nftrace("--netns", lab.router, "why", "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "tcp",
                     "--dport", "9090", "--count", "1", "--timeout", "15", "--", *tcp_from_client(lab, 9090))
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert re.match(r"^DROP\s+10\.77\.1\.2:\d+ → 10\.77\.1\.1:9090 tcp  dropped by inet fw input rule handle \d+: "
                    r"tcp dport vmap @services$", first), first
    assert "policy" not in first
    assert "nftrace_" not in result.stdout


def test_no_matching_packet_exits_3_and_leaves_nothing(lab):
    before = ruleset_state(lab.router)
    result = nftrace("--netns", lab.router, "why", "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "tcp",
                     "--dport", "7", "--timeout", "1", "--json")
    assert result.returncode == 3
    assert result.json["packets"] == []
    assert ruleset_state(lab.router) == before


DEBIAN_WORKSTATION = "/usr/share/doc/nftables/examples/workstation.nft"


def chain_rules(ns, family, table, chain):
    """(handle, text) of every rule, as `nft -a -s list chain` prints them."""
    from nftrace.lab.topology import in_netns

    listing = in_netns(ns, ["nft", "-a", "-s", "list", "chain", family, table, chain]).stdout
    return [(int(m.group(2)), m.group(1).strip()) for m in
            (re.match(r"^\s*(.*) # handle (\d+)$", line) for line in listing.splitlines()) if m]


@pytest.fixture
def workstation(topology):
    """The router runs the workstation ruleset Debian ships with nftables: not written for these tests."""
    import os

    if not os.path.exists(DEBIAN_WORKSTATION):
        pytest.fail(f"{DEBIAN_WORKSTATION} is missing: scripts/setup.sh installs the nftables package")
    from nftrace.lab.topology import in_netns

    in_netns(topology.router, ["nft", "-f", DEBIAN_WORKSTATION])
    return topology


def test_debian_workstation_ruleset_drops_ssh_with_its_last_rule(workstation):
    packet = why(workstation, "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "tcp", "--dport", "22",
                 command=tcp_from_client(workstation, 22)).packet
    rules = chain_rules(workstation.router, "inet", "filter", "input")
    last_handle, last_text = rules[-1]
    assert last_text == "counter drop"
    assert packet["verdict"] == "drop"
    assert (packet["decided_by"]["handle"], packet["decided_by"]["text"]) == (last_handle, last_text)
    assert packet["summary"] == f"dropped by inet filter input rule handle {last_handle}: counter drop"


def test_debian_workstation_ruleset_accepts_icmpv6_echo_with_its_icmpv6_rule(workstation):
    packet = why(workstation, "--from", CLIENT_V6, "--to", ROUTER_CLIENT_V6, "--proto", "icmpv6",
                 command=traffic(workstation.client, "icmp", ROUTER_CLIENT_V6)).packet
    handle, text = next((h, t) for h, t in chain_rules(workstation.router, "inet", "filter", "input")
                        if "echo-request" in t)
    assert packet["verdict"] == "accept"
    assert (packet["decided_by"]["handle"], packet["decided_by"]["text"]) == (handle, text)
    assert packet["hooks"] == ["prerouting", "input"]


def test_local_traffic_over_loopback_is_one_packet_through_all_four_hooks(netns):
    host = netns("h")
    load_ruleset(host, """
table inet host {
    chain input {
        type filter hook input priority filter; policy accept;
        tcp dport 8080 drop
    }
}
""")
    command = [sys.executable, "-m", "nftrace.lab.traffic", "tcp", "127.0.0.1", "8080", "--timeout", "0.5"]
    result = nftrace("--netns", host, "why", "--from", "127.0.0.1", "--to", "127.0.0.1", "--proto", "tcp",
                     "--dport", "8080", "--count", "1", "--timeout", "15", "--json", "--", *command)
    assert result.returncode == 0, result.stderr
    (packet,) = result.packets
    assert packet["hooks"] == ["output", "postrouting", "prerouting", "input"]
    assert packet["verdict"] == "drop"
    assert packet["decided_by"]["text"] == "tcp dport 8080 drop"
    assert (packet["packet"]["iif"], packet["packet"]["oif"]) == ("lo", "lo")
