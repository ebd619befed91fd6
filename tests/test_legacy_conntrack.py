"""The conntrack state of a packet that only legacy iptables decides, from the real kernel.

nftrace's mark chain runs before conntrack, so its event carries no conntrack state, and a
legacy table that drops the packet sends no nftables event at all: on a host whose ruleset is
legacy iptables only (the lab's legacy-iptables scenario), the state must come from nftrace's
conntrack chains. A new connection is `new` from prerouting on, whether the packet is then
accepted or dropped, live and in a dry run.
"""

from __future__ import annotations

import pytest

from conftest import lab_topology, nftrace, traffic, why
from nftrace.lab.lab import find_scenario, load_scenario
from nftrace.lab.topology import CLIENT_V4, ROUTER_CLIENT_V4, ROUTER_SERVER_V4, SERVER_V4

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def lab():
    with lab_topology("lct", lambda topo: load_scenario(find_scenario("legacy-iptables"), topo.router)) as topo:
        yield topo


def states(packet) -> dict:
    return {entry["hook"]: entry["state"] for entry in packet["conntrack"]}


def flow(src, dst, port):
    return ("--from", src, "--to", dst, "--proto", "tcp", "--dport", str(port))


# (sender, source, destination, port, verdict): the scenario's flows that legacy rules decide.
DROPPED_IN_INPUT = ("client", CLIENT_V4, ROUTER_CLIENT_V4, 23, "drop")  # LAN_IN rejects telnet
ACCEPTED_IN_INPUT = ("client", CLIENT_V4, ROUTER_CLIENT_V4, 22, "accept")  # LAN_IN lets ssh in
DROPPED_IN_FORWARD = ("server", SERVER_V4, CLIENT_V4, 22, "drop")  # the FORWARD policy


@pytest.mark.parametrize("sender,src,dst,port,verdict", [DROPPED_IN_INPUT, ACCEPTED_IN_INPUT, DROPPED_IN_FORWARD])
def test_a_new_connection_is_new_at_prerouting_live(lab, sender, src, dst, port, verdict):
    command = traffic(getattr(lab, sender), "tcp", dst, str(port), "--timeout", "1")
    packet = why(lab, *flow(src, dst, port), command=command).packet
    assert packet["verdict"] == verdict
    assert packet["decided_by"]["backend"] == "iptables-legacy"
    assert states(packet)["prerouting"] == "new", packet["conntrack"]


@pytest.mark.parametrize("sender,src,dst,port,verdict", [DROPPED_IN_INPUT, ACCEPTED_IN_INPUT, DROPPED_IN_FORWARD])
def test_a_new_connection_is_new_at_prerouting_in_a_dry_run(lab, sender, src, dst, port, verdict):
    result = nftrace("--netns", lab.router, "why", *flow(src, dst, port), "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    packet = result.json["packets"][0]
    assert packet["verdict"] == verdict
    assert states(packet)["prerouting"] == "new", packet["conntrack"]


def test_a_locally_sent_packet_is_new_at_output(lab):
    command = traffic(lab.router, "tcp", SERVER_V4, "443", "--timeout", "1")
    packet = why(lab, *flow(ROUTER_SERVER_V4, SERVER_V4, 443), command=command).packet
    assert packet["verdict"] == "accept"
    assert states(packet)["output"] == "new", packet["conntrack"]
