"""Bridged frames and egress chains against the real kernel: a Linux bridge with real ports,
frames sent between the hosts behind it, and the answer checked rule by rule.

A frame bridged between two ports passes the bridge family's hooks only, unless br_netfilter
(net.bridge.bridge-nf-call-iptables, per namespace) hands it to the IP hooks too; a packet
routed out through a bridge device passes the bridge's output and postrouting hooks after the
IP ones; netdev egress chains run after postrouting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, load_ruleset, nftrace, ruleset_state, traffic, unique_name
from nftrace.lab.topology import in_netns, netns_exists, run

pytestmark = pytest.mark.kernel

HOST1, HOST2, BRIDGE_ADDRESS, FAR = "10.88.0.1", "10.88.0.2", "10.88.0.254", "10.89.0.2"


class BridgeLab:
    """`switch` holds bridge br0 with ports p1 → host1 (10.88.0.1) and p2 → host2 (10.88.0.2),
    br0 itself is 10.88.0.254; `far` (10.89.0.2) is routed through the switch."""

    def __init__(self):
        prefix = unique_name("br")
        self.switch, self.host1, self.host2, self.far = (f"{prefix}-{n}" for n in ("sw", "h1", "h2", "far"))
        self.namespaces = (self.switch, self.host1, self.host2, self.far)

    def up(self) -> None:
        for ns in self.namespaces:
            run(["ip", "netns", "add", ns])
            in_netns(ns, ["ip", "link", "set", "lo", "up"])
            in_netns(ns, ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])
        sw = ["ip", "-n", self.switch]
        run([*sw, "link", "add", "br0", "type", "bridge"])
        for port, host, address in (("p1", self.host1, HOST1), ("p2", self.host2, HOST2)):
            run(["ip", "link", "add", "eth0", "netns", host, "type", "veth", "peer", "name", port, "netns", self.switch])
            run([*sw, "link", "set", port, "master", "br0"])
            run([*sw, "link", "set", port, "up"])
            in_netns(host, ["ip", "addr", "add", f"{address}/24", "dev", "eth0"])
            in_netns(host, ["ip", "link", "set", "eth0", "up"])
            in_netns(host, ["ip", "route", "add", "default", "via", BRIDGE_ADDRESS])
        run(["ip", "link", "add", "eth0", "netns", self.far, "type", "veth", "peer", "name", "up0", "netns", self.switch])
        run([*sw, "addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", "br0"])
        run([*sw, "addr", "add", "10.89.0.1/24", "dev", "up0"])
        for dev in ("br0", "up0"):
            run([*sw, "link", "set", dev, "up"])
        in_netns(self.far, ["ip", "addr", "add", f"{FAR}/24", "dev", "eth0"])
        in_netns(self.far, ["ip", "link", "set", "eth0", "up"])
        in_netns(self.far, ["ip", "route", "add", "default", "via", "10.89.0.1"])
        in_netns(self.switch, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        self.br_netfilter(False)
        # The hosts know each other's MAC, and the bridge learns where each one is, before
        # the traced frame: a frame to an unknown address would be flooded to every port.
        for host, other, address in ((self.host1, self.host2, HOST2), (self.host2, self.host1, HOST1)):
            in_netns(host, ["ip", "neigh", "replace", address, "lladdr", self.mac(other), "dev", "eth0"])
        for host, address in ((self.host1, HOST2), (self.host2, HOST1)):
            run(traffic(host, "udp", address, "9"), check=False)

    @staticmethod
    def mac(host: str) -> str:
        return json.loads(in_netns(host, ["ip", "-j", "link", "show", "eth0"]).stdout)[0]["address"]

    def br_netfilter(self, on: bool) -> None:
        in_netns(self.switch, ["sysctl", "-qw", f"net.bridge.bridge-nf-call-iptables={int(on)}"])

    def down(self) -> None:
        for ns in self.namespaces:
            if netns_exists(ns):
                run(["ip", "netns", "del", ns], check=False)


@pytest.fixture
def lab():
    bridge_lab = BridgeLab()
    try:
        bridge_lab.up()
        yield bridge_lab
    finally:
        bridge_lab.down()


def why(ns, *flow, command):
    before = ruleset_state(ns)
    result = nftrace("--netns", ns, "why", *flow, "--count", "1", "--timeout", "15", "--json", "--", *command)
    assert ruleset_state(ns) == before, "the ruleset changed"
    assert result.returncode == 0, result.stderr
    [packet] = result.packets
    return packet


def steps(packet):
    return [(step["family"], step["hook"], step["table"], step["chain"], step["verdict"]) for step in packet["steps"]]


BRIDGE_FILTER = """
table bridge l2 {
    chain forward {
        type filter hook forward priority filter; policy accept;
        udp dport 5555 counter drop
    }
    chain output {
        type filter hook output priority filter; policy accept;
        udp dport 6666 counter drop
    }
}
table inet fw {
    chain forward {
        type filter hook forward priority filter; policy accept;
        udp dport 5556 counter accept
    }
    chain input {
        type filter hook input priority filter; policy accept;
        udp dport 7777 counter drop
    }
}
"""


def test_a_frame_bridged_between_two_ports_is_decided_by_the_bridge_rule(lab):
    load_ruleset(lab.switch, BRIDGE_FILTER)
    packet = why(lab.switch, "--from", HOST1, "--to", HOST2, "--proto", "udp", "--dport", "5555",
                 command=traffic(lab.host1, "udp", HOST2, "5555"))
    assert packet["verdict"] == "drop"
    decided = packet["decided_by"]
    assert (decided["family"], decided["table"], decided["chain"], decided["hook"]) == ("bridge", "l2", "forward", "forward")
    assert decided["text"] == "udp dport 5555 counter drop"
    assert packet["packet"]["iif"] == "p1" and packet["packet"]["oif"] == "p2"
    assert all(step["family"] == "bridge" for step in packet["steps"])  # no IP hook saw it


def test_with_br_netfilter_a_bridged_frame_passes_bridge_and_ip_hooks_in_order(lab):
    load_ruleset(lab.switch, BRIDGE_FILTER)
    lab.br_netfilter(True)
    packet = why(lab.switch, "--from", HOST1, "--to", HOST2, "--proto", "udp", "--dport", "5556",
                 command=traffic(lab.host1, "udp", HOST2, "5556"))
    assert packet["verdict"] == "accept"
    assert steps(packet) == [("bridge", "forward", "l2", "forward", "accept"),
                             ("inet", "forward", "fw", "forward", "accept")]
    assert packet["decided_by"]["family"] == "inet" and packet["decided_by"]["text"] == "udp dport 5556 counter accept"
    assert packet["hooks"] == ["prerouting", "forward", "postrouting"]



# With br_netfilter a bridged frame is marked twice, by the bridge mark chain and by the IP
# one; both marks are one packet, one trace id.
DROPPED_IN_BRIDGE_AND_IN_IP = BRIDGE_FILTER + """
table inet late {
    chain forward {
        type filter hook forward priority 10; policy accept;
        udp dport 5557 counter drop
    }
}
"""


def send(lab, port, count):
    subprocess.run(traffic(lab.host1, "udp", HOST2, str(port), "--count", str(count), "--rate", "20"), check=True,
                   capture_output=True, timeout=60)


def test_with_br_netfilter_each_bridged_frame_is_one_answer_with_its_bridge_and_ip_steps(lab):
    load_ruleset(lab.switch, BRIDGE_FILTER)
    lab.br_netfilter(True)
    result = nftrace("--netns", lab.switch, "why", "--from", HOST1, "--to", HOST2, "--proto", "udp", "--dport", "5556",
                     "--count", "3", "--timeout", "15", "--json", "--",
                     *traffic(lab.host1, "udp", HOST2, "5556", "--count", "3", "--rate", "20"))
    assert result.returncode == 0, result.stderr
    # Three answers, each with both families' steps: a frame split in two would give answers
    # with one family each. (Not three trace ids: the kernel reuses them for later packets.)
    assert len(result.packets) == 3
    for packet in result.packets:
        assert steps(packet) == [("bridge", "forward", "l2", "forward", "accept"),
                                 ("inet", "forward", "fw", "forward", "accept")]


def test_with_br_netfilter_drops_counts_each_bridged_frame_once_under_the_rule_that_dropped_it(lab):
    load_ruleset(lab.switch, DROPPED_IN_BRIDGE_AND_IN_IP)
    lab.br_netfilter(True)
    process = subprocess.Popen([sys.executable, "-m", "nftrace", "--netns", lab.switch, "drops", "--max-rate", "0",
                                "--duration", "5", "--no-drop-reasons", "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
                               stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        line = process.stderr.readline()
        assert line.startswith("watching drops of"), line
        send(lab, 5557, 3)  # bridged, then dropped at the IP forward hook
        send(lab, 5555, 2)  # dropped at the bridge forward hook, after IP prerouting
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    document = json.loads(out)
    assert document["dropped"] == len(document["packets"]) == 5
    assert {(rule["decided_by"]["family"], rule["decided_by"]["table"]): rule["packets"]
            for rule in document["rules"]} == {("inet", "late"): 3, ("bridge", "l2"): 2}
    # One path per frame, with the chains of both families it passed (no chain of the ruleset
    # is on IP prerouting, where a frame that the bridge then dropped met only nftrace's).
    assert sorted((packet["packet"]["dport"], tuple(step["family"] for step in packet["steps"]))
                  for packet in document["packets"]) == [(5555, ("bridge",))] * 2 + [(5557, ("bridge", "inet", "inet"))] * 3

def test_a_packet_routed_out_through_a_bridge_device_passes_the_bridge_hooks_after_postrouting(lab):
    load_ruleset(lab.switch, BRIDGE_FILTER)
    packet = why(lab.switch, "--from", FAR, "--to", HOST2, "--proto", "udp", "--dport", "6666",
                 command=traffic(lab.far, "udp", HOST2, "6666"))
    assert packet["verdict"] == "drop"
    assert (packet["decided_by"]["family"], packet["decided_by"]["chain"]) == ("bridge", "output")
    assert packet["hooks"] == ["prerouting", "forward", "postrouting", "output"]
    assert packet["steps"][0]["family"] == "inet"  # the IP forward hook first


def test_a_frame_for_the_bridge_device_itself_goes_on_up_its_stack_in_one_path(lab):
    load_ruleset(lab.switch, BRIDGE_FILTER)
    packet = why(lab.switch, "--from", HOST1, "--to", BRIDGE_ADDRESS, "--proto", "udp", "--dport", "7777",
                 command=traffic(lab.host1, "udp", BRIDGE_ADDRESS, "7777"))
    assert packet["verdict"] == "drop"
    assert (packet["decided_by"]["family"], packet["decided_by"]["chain"]) == ("inet", "input")
    assert packet["hooks"][:2] == ["prerouting", "input"] and packet["hooks"][-1] == "input"
    assert packet["packet"]["iif"] == "p1"


EGRESS = """
table netdev out {
    chain eth0_out {
        type filter hook egress device "eth0" priority filter; policy accept;
        udp dport 5557 counter drop
    }
}
"""


def test_a_netdev_egress_drop_is_traced_after_postrouting(lab):
    load_ruleset(lab.host1, EGRESS)
    packet = why(lab.host1, "--from", HOST1, "--to", HOST2, "--proto", "udp",
                 command=traffic(lab.host1, "udp", HOST2, "5557"))
    assert packet["verdict"] == "drop"
    decided = packet["decided_by"]
    assert (decided["family"], decided["table"], decided["chain"], decided["hook"]) == ("netdev", "out", "eth0_out", "egress")
    assert packet["hooks"] == ["output", "postrouting", "egress"]


def test_a_packet_that_egress_chains_let_through_ends_after_them(lab):
    load_ruleset(lab.host1, EGRESS)
    packet = why(lab.host1, "--from", HOST1, "--to", HOST2, "--proto", "udp",
                 command=traffic(lab.host1, "udp", HOST2, "5558"))
    assert packet["verdict"] == "accept" and packet["hooks"][-1] == "egress"
    assert steps(packet) == [("netdev", "egress", "out", "eth0_out", "accept")]


def test_a_dry_run_of_a_bridged_flow_agrees_with_the_live_answer(lab):
    load_ruleset(lab.switch, BRIDGE_FILTER)
    live = why(lab.switch, "--from", HOST1, "--to", HOST2, "--proto", "udp", "--dport", "5555",
               command=traffic(lab.host1, "udp", HOST2, "5555"))
    result = nftrace("--netns", lab.switch, "why", "--from", HOST1, "--to", HOST2, "--proto", "udp", "--dport", "5555",
                     "--iif", "p1", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    [dry] = result.packets
    assert (dry["verdict"], dry["decided_by"], dry["packet"]["iif"], dry["packet"]["oif"]) == \
        (live["verdict"], live["decided_by"], "p1", "p2")
    assert not any("plain veth" in item for item in result.json["dry_run"]["not_copied"] if "br0" in item)


def test_a_dry_run_copies_br_netfilter(lab):
    load_ruleset(lab.switch, BRIDGE_FILTER)
    lab.br_netfilter(True)
    result = nftrace("--netns", lab.switch, "why", "--from", HOST1, "--to", HOST2, "--proto", "udp", "--dport", "5556",
                     "--iif", "p1", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    [dry] = result.packets
    assert steps(dry) == [("bridge", "forward", "l2", "forward", "accept"), ("inet", "forward", "fw", "forward", "accept")]


def test_a_frame_bridged_where_no_chain_filters_bridges_is_answered_all_the_same(lab):
    """No bridge chain and no br_netfilter: no chain of the ruleset sees the frame, and the
    answer says so (rather than that no packet was seen)."""
    load_ruleset(lab.switch, "table inet fw {\n chain input {\n  type filter hook input priority filter; policy drop;\n }\n}\n")
    packet = why(lab.switch, "--from", HOST1, "--to", HOST2, "--proto", "udp", "--dport", "5559",
                 command=traffic(lab.host1, "udp", HOST2, "5559"))
    assert packet["verdict"] == "accept" and packet["steps"] == []
    assert packet["summary"].startswith("accepted: no chain of the ruleset gave a verdict on its path")
    assert (packet["packet"]["iif"], packet["packet"]["oif"]) == ("p1", "p2")
