"""Beyond netfilter, against the real kernel: drops after every chain accepted (closed port,
reverse-path filter), NAT rewrites along the path, and conntrack state, in a router namespace.

The kernel decides; these tests state what it must have done (nothing listens on the port,
rp_filter is on, the DNAT rule rewrites the destination) and that nftrace says so.
"""

from __future__ import annotations

import os
import re
import sys

import pytest

from conftest import lab_topology, load_ruleset, nftrace, traffic, why
from nftrace.drops.bpftrace import KernelDropWatcher
from nftrace.lab.topology import (CLIENT_V4, CLIENT_V6, ROUTER_CLIENT_V4, ROUTER_CLIENT_V6, ROUTER_SERVER_V4, SERVER_V4,
                                  SERVER_V6, in_netns)

pytestmark = pytest.mark.kernel

SPOOFED_V4 = "10.77.9.9"  # an extra address of the client that the router has no route back to

ROUTER_RULESET = """
table ip nat {
    chain pre {
        type nat hook prerouting priority dstnat; policy accept;
        iifname "r-client" tcp dport 8080 dnat to 10.77.2.2:80
    }
    chain post {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "r-server" ip saddr 10.77.1.0/24 tcp dport 443 masquerade
    }
}
table inet fw {
    chain input {
        type filter hook input priority filter; policy accept;
        tcp dport 9090 drop
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        tcp dport { 80, 443 } accept
    }
}
"""


@pytest.fixture(scope="module")
def lab():
    """Router with NAT and filter rules, strict rp_filter, a server listening on 80 and 443
    (the lab's own listeners, which `down` ends)."""
    def setup(topo):
        load_ruleset(topo.router, ROUTER_RULESET)
        in_netns(topo.router, ["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1", "net.ipv4.conf.r-client.rp_filter=1"])
        in_netns(topo.client, ["ip", "addr", "add", f"{SPOOFED_V4}/32", "dev", "eth0"])
        topo.start_listeners([80, 443], [], 300)

    with lab_topology("drops", setup) as topo:
        yield topo


def tcp_to(lab, host, port, *args):
    return traffic(lab.client, "tcp", host, str(port), "--timeout", "1", *args)


def closed_port(lab, extra=(), env=None):
    return why(lab, "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "tcp", "--dport", "8081",
               command=tcp_to(lab, ROUTER_CLIENT_V4, 8081), extra=extra, env=env)


def netns_inode(name: str) -> int:
    return os.stat(f"/run/netns/{name}").st_ino


# -- kernel drops -------------------------------------------------------------------------------


def test_connect_to_closed_port_is_accepted_then_dropped_no_socket(lab):
    result = closed_port(lab)
    packet = result.packets[0]
    assert packet["verdict"] == "accept"
    assert packet["complete"] is True
    assert packet["kernel_drop"]["reason"] == "NO_SOCKET"
    assert packet["kernel_drop"]["location"].startswith("tcp_v4_rcv+0x")
    assert packet["kernel_drop"]["explain"] == "nothing listens on tcp/8081 in this namespace"
    assert packet["summary"].endswith(", then dropped by the kernel: NO_SOCKET — nothing listens on tcp/8081 in this namespace")
    assert result.json["warnings"] == []


def test_udp_to_closed_port_over_ipv6_is_dropped_no_socket(lab):
    result = why(lab, "--from", CLIENT_V6, "--to", ROUTER_CLIENT_V6, "--proto", "udp", "--dport", "5353",
                 command=traffic(lab.client, "udp", ROUTER_CLIENT_V6, "5353"))
    drop = result.packets[0]["kernel_drop"]
    assert (drop["reason"], drop["explain"]) == ("NO_SOCKET", "nothing listens on udp/5353 in this namespace")


def test_a_backlog_of_packets_the_kernel_drops_gets_every_drop_paired_with_its_packet(lab):
    """A burst read behind the kernel: its drops are read long before its packets' events, more
    of them than the pairing keeps in hand (4,096), and older than a second when their packets
    come; each packet still gets its drop (the watcher's ring holds the rest back, and the
    socket's datagram count says when each packet was queued), none a late note."""
    burst = 8000
    result = why(lab, "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "udp", "--dport", "5009",
                 command=traffic(lab.client, "udp", ROUTER_CLIENT_V4, "5009", "--count", str(burst),
                                 "--rate", "0"), count=burst, extra=["--max-rate", "0"])
    assert [packet["kernel_drop"] and packet["kernel_drop"]["reason"] for packet in result.packets] == ["NO_SOCKET"] * burst
    assert result.json["warnings"] == []


def test_human_answer_says_the_kernel_dropped_it(lab):
    result = nftrace("--netns", lab.router, "why", "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "tcp",
                     "--dport", "8081", "--count", "1", "--timeout", "15", "--", *tcp_to(lab, ROUTER_CLIENT_V4, 8081))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ACCEPT ")
    assert "then dropped by the kernel: NO_SOCKET — nothing listens on tcp/8081" in lines[0]
    assert any(line.strip().startswith("kernel drop: NO_SOCKET at tcp_v4_rcv+0x") for line in lines[1:])


def test_packet_dropped_by_a_rule_gets_no_kernel_drop(lab):
    result = why(lab, "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "tcp", "--dport", "9090",
                 command=tcp_to(lab, ROUTER_CLIENT_V4, 9090))
    packet = result.packets[0]
    assert packet["verdict"] == "drop"
    assert packet["decided_by"]["text"] == "tcp dport 9090 drop"
    assert packet["kernel_drop"] is None
    assert result.json["warnings"] == []


def test_spoofed_source_is_dropped_by_rp_filter_after_prerouting(lab):
    result = why(lab, "--from", SPOOFED_V4, "--to", ROUTER_CLIENT_V4, "--proto", "udp", "--dport", "5000",
                 command=traffic(lab.client, "udp", ROUTER_CLIENT_V4, "5000", "--source", SPOOFED_V4))
    packet = result.packets[0]
    assert (packet["complete"], packet["verdict"], packet["decided_by"]) == (True, "accept", None)
    assert packet["hooks"] == ["prerouting"]
    assert packet["kernel_drop"]["reason"] == "IP_RPFILTER"
    assert "r-client" in packet["kernel_drop"]["explain"]
    assert packet["summary"].startswith("no rule dropped it: it passed every chain up to prerouting, "
                                        "then the kernel dropped it: IP_RPFILTER — reverse-path filter")


@pytest.mark.parametrize("server, words", [
    (SERVER_V4, "its TTL ran out here: it came in with TTL 1"),
    (SERVER_V6, "its hop limit ran out here: it came in with hop limit 1"),
])
def test_a_datagram_whose_ttl_runs_out_is_said_so_not_an_invalid_header(lab, server, words):
    """The kernel gives IP_INHDR ("invalid IP header") to a packet it cannot forward because its
    TTL ran out (traceroute's probes, routing loops): the code that freed it tells which."""
    source = CLIENT_V6 if ":" in server else CLIENT_V4
    result = why(lab, "--from", source, "--to", server, "--proto", "udp", "--dport", "5001",
                 command=traffic(lab.client, "udp", server, "5001", "--ttl", "1"))
    drop = result.packets[0]["kernel_drop"]
    assert drop["reason"] == "IP_INHDR"
    assert drop["explain"].startswith(words)


def test_ipv6_multicast_for_a_group_the_router_has_not_joined_is_said_to_be_not_for_it(lab):
    send = ("import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); "
            "s.sendto(b'x', ('ff02::4242', 5000, 0, socket.if_nametoindex('eth0')))")
    result = why(lab, "--from", "fe80::/10", "--to", "ff02::4242", "--proto", "udp", "--dport", "5000",
                 command=["ip", "netns", "exec", lab.client, sys.executable, "-c", send])
    packet = result.packets[0]
    assert (packet["verdict"], packet["kernel_drop"]["reason"]) == ("accept", "NOT_SPECIFIED")
    assert packet["kernel_drop"]["explain"].startswith("multicast to a group that nothing here has joined: not for "
                                                       "this host")


def test_without_bpftrace_drop_reasons_are_unavailable_once_and_the_trace_goes_on(lab):
    result = closed_port(lab, env={"NFTRACE_BPFTRACE": "/nonexistent/bpftrace"})
    packet = result.packets[0]
    assert packet["verdict"] == "accept"
    assert packet["kernel_drop"] is None
    assert result.json["warnings"] == [
        "kernel drop reasons unavailable: NFTRACE_BPFTRACE=/nonexistent/bpftrace is not an executable bpftrace"]


def test_no_drop_reasons_option_runs_no_bpftrace(lab):
    result = closed_port(lab, extra=("--no-drop-reasons",))
    assert result.packets[0]["kernel_drop"] is None
    assert result.json["warnings"] == []


def test_bpftrace_does_not_outlive_the_run(lab):
    closed_port(lab)
    marker = f"$netns == {netns_inode(lab.router)}".encode()
    survivors = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if marker in cmdline.read():
                    survivors.append(pid)
        except OSError:
            continue
    assert survivors == []


def test_bpftrace_runs_as_a_batch_task_so_that_its_wakeups_do_not_preempt_nftrace(lab):
    # It wakes for every drop line; under a flood of drops its wake-ups preempting nftrace's
    # reading made a 16 MiB socket buffer overflow (bench/run.py).
    with KernelDropWatcher.start(netns_inode(lab.router)) as watcher:
        assert os.sched_getscheduler(watcher.process.pid) == os.SCHED_BATCH


# -- NAT ----------------------------------------------------------------------------------------


def test_dnat_port_forward_shows_the_rewritten_destination_at_prerouting(lab):
    result = why(lab, "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "tcp", "--dport", "8080",
                 command=tcp_to(lab, ROUTER_CLIENT_V4, 8080))
    packet = result.packets[0]
    assert packet["hooks"] == ["prerouting", "forward", "postrouting"]
    change = packet["nat"][0]
    assert len(packet["nat"]) == 1
    assert {key: change[key] for key in ("hook", "field", "from", "to", "kind")} == {
        "hook": "prerouting", "field": "dst", "from": f"{ROUTER_CLIENT_V4}:8080", "to": f"{SERVER_V4}:80", "kind": "dnat"}
    assert re.fullmatch(r'ip nat pre rule handle \d+: iifname "r-client" tcp dport 8080 dnat to 10\.77\.2\.2:80',
                        change["rule"])
    assert packet["verdict"] == "accept"
    assert packet["decided_by"]["text"] == "tcp dport { 80, 443 } accept"
    assert packet["packet"]["dst"] == ROUTER_CLIENT_V4  # as the client sent it


def test_masquerade_rewrites_the_source_at_postrouting(lab):
    result = why(lab, "--from", CLIENT_V4, "--to", SERVER_V4, "--proto", "tcp", "--dport", "443",
                 command=tcp_to(lab, SERVER_V4, 443))
    packet = result.packets[0]
    sport = packet["packet"]["sport"]
    assert [(c["hook"], c["field"], c["from"], c["to"], c["kind"]) for c in packet["nat"]] == [
        ("postrouting", "src", f"{CLIENT_V4}:{sport}", f"{ROUTER_SERVER_V4}:{sport}", "masquerade")]


# -- conntrack ----------------------------------------------------------------------------------


def test_later_packet_of_a_connection_is_accepted_because_it_is_established(lab):
    result = why(lab, "--from", CLIENT_V4, "--to", SERVER_V4, "--proto", "tcp", "--dport", "80", count=2,
                 command=tcp_to(lab, SERVER_V4, 80, "--send", "hello"))
    syn, ack = result.packets
    assert [(c["hook"], c["state"], c["direction"]) for c in syn["conntrack"]] == [
        ("prerouting", "new", "original"), ("forward", "new", "original"), ("postrouting", "new", "original")]
    assert syn["accepted_by_connection"] is None
    assert syn["decided_by"]["text"] == "tcp dport { 80, 443 } accept"
    assert {c["state"] for c in ack["conntrack"]} == {"established"}
    assert ack["conntrack"][0]["id"] == syn["conntrack"][0]["id"]
    assert ack["decided_by"]["text"] == "ct state established,related accept"
    assert ack["accepted_by_connection"] == "established"
    assert ack["summary"].endswith("— only because it belongs to an earlier connection (ct state established)")
