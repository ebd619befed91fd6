"""Drops by the kernel's routing, against the real kernel: a router namespace whose routes
refuse some destinations (blackhole, unreachable, prohibit, a policy rule, no route at all),
whose forwarding can be switched off, whose reverse-path filter can be switched on, and whose
routes and interfaces have MTUs smaller than the client's packets.

The kernel frees all of these packets with reasons that do not say which refusal it was
(NOT_SPECIFIED for most, IP_INADDRERRORS "invalid destination" with forwarding off), or that
say what but not where (IP_RPFILTER, PKT_TOO_BIG): the answer must name the route, the rule,
the sysctl or the MTU that did it (drops/routing.py).
"""

from __future__ import annotations

import contextlib
import json

import pytest

from conftest import lab_topology, load_ruleset, nftrace, traffic, why
from nftrace.lab.topology import (CLIENT_V4, CLIENT_V6, ROUTER_CLIENT_V4, ROUTER_SERVER_V4, SERVER_V4, SERVER_V6,
                                  in_netns)
from test_drops import Drops, send

pytestmark = pytest.mark.kernel

ROUTER_RULESET = """
table inet fw {
    chain mangle {
        type filter hook prerouting priority mangle; policy accept;
        ip daddr 10.77.2.2 udp dport 5001 meta mark set 0x10
    }
    chain forward {
        type filter hook forward priority filter; policy accept;
        udp dport 7 drop
    }
}
"""
ROUTES = (
    ["ip", "route", "add", "blackhole", "10.99.0.0/24"],
    ["ip", "route", "add", "unreachable", "10.98.0.0/24"],
    ["ip", "route", "add", "prohibit", "10.97.0.0/24", "table", "100"],
    ["ip", "rule", "add", "to", "10.97.0.0/24", "lookup", "100", "priority", "90"],
    ["ip", "rule", "add", "to", "10.95.0.0/24", "prohibit", "priority", "100"],
    ["ip", "rule", "add", "fwmark", "0x10", "blackhole", "priority", "110"],
    ["ip", "-6", "route", "add", "blackhole", "fd99:1::/64"],
    ["ip", "-6", "route", "add", "prohibit", "fd99:3::/64"],
    ["ip", "route", "add", "10.88.0.0/24", "via", SERVER_V4],  # replies to the client's 10.88.0.5 go the wrong way
    ["ip", "route", "add", "10.94.0.0/24", "via", SERVER_V4, "mtu", "1300"],
    ["ip", "-6", "route", "add", "fd94::/64", "via", SERVER_V6, "mtu", "1280"],
)
# Sources on the client that the router routes elsewhere (10.88/16: toward the server) or
# nowhere (10.89/16): the reverse-path filter's cases.
WRONG_WAY_SOURCE, NO_WAY_BACK_SOURCE = "10.88.0.5", "10.89.0.5"


@pytest.fixture(scope="module")
def lab():
    def setup(topo):
        load_ruleset(topo.router, ROUTER_RULESET)
        for command in ROUTES:
            in_netns(topo.router, command)
        for source in (WRONG_WAY_SOURCE, NO_WAY_BACK_SOURCE):
            in_netns(topo.client, ["ip", "address", "add", f"{source}/32", "dev", "eth0"])
        # ARP from such a source gets no answer where rp_filter is on (the router checks its
        # sender address the same way): the client knows the router's address already.
        mac = in_netns(topo.router, ["cat", "/sys/class/net/r-client/address"]).stdout.strip()
        in_netns(topo.client, ["ip", "neigh", "replace", ROUTER_CLIENT_V4, "lladdr", mac, "dev", "eth0", "nud", "permanent"])

    with lab_topology("routes", setup) as topo:
        yield topo


def udp_to(lab, destination: str, port: int = 5000, source: str = "", send: tuple = ()) -> dict:
    """The one packet of a UDP datagram from the client (from `source`, or its own address) to
    `destination`, as `why --json` answers it; `send`: more options of the traffic command."""
    source = source or (CLIENT_V6 if ":" in destination else CLIENT_V4)
    result = why(lab, "--from", source, "--to", destination, "--proto", "udp", "--dport", str(port),
                 command=traffic(lab.client, "udp", destination, str(port), "--source", source, *send))
    packet = result.packets[0]
    if packet.get("kernel_drop") is None and any("kernel drop reasons unavailable" in w for w in result.json["warnings"]):
        pytest.skip("bpftrace cannot watch kernel drops here")
    return packet


@pytest.mark.parametrize("destination, cause, words", [
    ("10.99.0.1", "blackhole", "a blackhole route drops it silently: blackhole 10.99.0.0/24 table main"),
    ("10.98.0.1", "unreachable", "an unreachable route drops it and answers ICMP host unreachable: "
                                 "unreachable 10.98.0.0/24 table main"),
    ("10.97.0.1", "prohibit", "a prohibit route drops it and answers ICMP administratively prohibited: "
                              "prohibit 10.97.0.0/24 table 100"),
    ("10.95.0.1", "prohibit", "a policy routing rule drops it and answers ICMP administratively prohibited: "
                              "ip rule 100: from all to 10.95.0.0/24 prohibit"),
    ("10.96.0.1", "no route", "no route covers the destination in any routing table, not even a default route"),
    ("fd99:1::1", "blackhole", "a blackhole route drops it silently: blackhole fd99:1::/64 table main"),
    ("fd99:3::1", "prohibit", "a prohibit route drops it and answers ICMP administratively prohibited: "
                              "prohibit fd99:3::/64 table main"),
])
def test_a_packet_that_routing_refuses_is_answered_with_the_route_or_rule_that_refused_it(lab, destination, cause,
                                                                                           words):
    packet = udp_to(lab, destination)
    assert (packet["verdict"], packet["decided_by"], packet["hooks"]) == ("accept", None, ["prerouting"])
    drop = packet["kernel_drop"]
    assert drop["routing"]["cause"] == cause
    assert drop["explain"] == words
    assert packet["summary"].endswith(f"then the kernel dropped it: {drop['reason']} — {words}")


def test_a_policy_rule_that_selects_by_mark_is_found_with_the_mark_the_ruleset_set(lab):
    packet = udp_to(lab, SERVER_V4, port=5001)
    assert packet["kernel_drop"]["explain"] == \
        "a policy routing rule drops it silently: ip rule 110: from all fwmark 0x10 blackhole"


@pytest.mark.parametrize("destination, sysctl, words", [
    (SERVER_V4, "net.ipv4.conf.r-client.forwarding", "forwarding is off on r-client (net.ipv4.conf.r-client.forwarding = 0)"
                                                    ": routed packets are dropped"),
    (SERVER_V6, "net.ipv6.conf.all.forwarding", "IPv6 forwarding is off (net.ipv6.conf.all.forwarding = 0): routed "
                                               "packets are dropped"),
])
def test_forwarding_off_is_named_not_an_invalid_destination(lab, destination, sysctl, words):
    """The kernel says IP_INADDRERRORS ("invalid destination address") for a routed packet
    where forwarding is off: the usual reason a new router forwards nothing."""
    in_netns(lab.router, ["sysctl", "-qw", f"{sysctl}=0"])
    try:
        packet = udp_to(lab, destination)
    finally:
        in_netns(lab.router, ["sysctl", "-qw", f"{sysctl}=1"])
    drop = packet["kernel_drop"]
    assert drop["reason"] == "IP_INADDRERRORS"
    assert drop["routing"] == {"cause": "forwarding off", "routes": [], "rules": [], "sysctl": f"{sysctl} = 0"}
    assert drop["explain"].startswith(words)


def test_a_dry_run_names_the_route_from_the_sandbox_copy_and_no_rule_can_let_the_packet_through(lab):
    result = nftrace("--netns", lab.router, "why", "--dry-run", "--fix", "accept", "--json", "--from", CLIENT_V4,
                     "--to", "10.99.0.1", "--proto", "udp", "--dport", "5000", "--iif", "r-client", timeout=120)
    assert result.returncode == 0, result.stderr
    [packet] = result.packets
    if packet.get("kernel_drop") is None:
        pytest.skip("bpftrace cannot watch kernel drops here")
    assert packet["kernel_drop"]["routing"]["routes"] == ["blackhole 10.99.0.0/24 table main"]
    fix = packet["fix"]
    assert (fix["needed"], fix["proven"], fix["commands"]) == (True, False, [])
    assert fix["reason"] == ("the ruleset lets it through already, and the kernel drops it after netfilter: "
                             "NOT_SPECIFIED — a blackhole route drops it silently: blackhole 10.99.0.0/24 table main; "
                             "no ruleset change can let it through")


def test_drops_counts_each_refusal_apart_though_the_kernel_gives_them_one_reason(lab):
    run = Drops(lab, "--max-rate", "0", "--duration", "5", "--json")
    for destination, count in (("10.99.0.1", 5), ("10.97.0.1", 3)):
        send(lab, 5000, destination, count, rate=50)
    code, out, err = run.finish()
    assert code == 0, err
    document = json.loads(out)
    if any("kernel drop reasons unavailable" in warning for warning in document["warnings"]):
        pytest.skip("bpftrace cannot watch kernel drops here")
    counted = {(entry["reason"], entry["routing"]["cause"], entry["packets"]) for entry in document["kernel_drops"]}
    assert counted == {("NOT_SPECIFIED", "blackhole", 5), ("NOT_SPECIFIED", "prohibit", 3)}


# -- the reverse-path filter ------------------------------------------------------------------------


RP_FILTER_ALL, RP_FILTER_IIF = "net.ipv4.conf.all.rp_filter", "net.ipv4.conf.r-client.rp_filter"


@contextlib.contextmanager
def rp_filter(lab, on_all: int, on_iif: int):
    """The router's rp_filter for a test (conf.all and conf.r-client), then the old settings."""
    settings = {RP_FILTER_ALL: on_all, RP_FILTER_IIF: on_iif}
    old = {key: in_netns(lab.router, ["sysctl", "-n", key]).stdout.strip() for key in settings}
    try:
        for key, value in settings.items():
            in_netns(lab.router, ["sysctl", "-qw", f"{key}={value}"])
        yield
    finally:
        for key, value in old.items():
            in_netns(lab.router, ["sysctl", "-qw", f"{key}={value}"])


def test_strict_rp_filter_names_the_interface_replies_would_leave_through(lab):
    with rp_filter(lab, 0, 1):
        packet = udp_to(lab, SERVER_V4, source=WRONG_WAY_SOURCE)
    drop = packet["kernel_drop"]
    assert (packet["verdict"], packet["hooks"], drop["reason"]) == ("accept", ["prerouting"], "IP_RPFILTER")
    assert drop["routing"] == {"cause": "reverse path", "mode": "strict", "sysctls": [f"{RP_FILTER_IIF} = 1"],
                               "overrides": None, "route": f"10.88.0.0/24 via {SERVER_V4} dev r-server",
                               "oifs": ["r-server"]}
    assert drop["explain"].startswith(
        f"reverse-path filter (strict, {RP_FILTER_IIF} = 1): replies would leave through r-server (10.88.0.0/24 via "
        f"{SERVER_V4} dev r-server), not r-client where it came in;")


def test_rp_filter_off_on_the_interface_is_named_as_overridden_by_conf_all(lab):
    with rp_filter(lab, 1, 0):
        packet = udp_to(lab, SERVER_V4, source=WRONG_WAY_SOURCE)
    assert packet["kernel_drop"]["explain"].startswith(
        f"reverse-path filter (strict, {RP_FILTER_ALL} = 1, which overrides {RP_FILTER_IIF} = 0): replies would leave")


def test_loose_rp_filter_lets_a_wrong_way_source_in_and_drops_one_with_no_way_back(lab):
    with rp_filter(lab, 0, 2):
        passed = udp_to(lab, SERVER_V4, source=WRONG_WAY_SOURCE)
        dropped = udp_to(lab, SERVER_V4, source=NO_WAY_BACK_SOURCE)
    assert (passed["verdict"], passed["hooks"][-1], passed.get("kernel_drop")) == ("accept", "postrouting", None)
    assert dropped["kernel_drop"]["explain"] == (
        f"reverse-path filter (loose, {RP_FILTER_IIF} = 2): no route leads back to its source (`ip route get` answers "
        f"no route), so replies could not be sent; a route back to it lets it in")


# -- a rule's reverse-path check (nft's fib) ---------------------------------------------------------


NIXOS_RPFILTER = """
table inet rpcheck {
    chain rpfilter {
        type filter hook prerouting priority mangle + 10; policy drop;
        fib saddr . mark . iif oif exists accept
    }
}
"""
FIREWALLD_RPFILTER = """flush ruleset
table inet candidate {
    chain filter_PREROUTING {
        type filter hook prerouting priority filter + 10; policy accept;
        fib saddr . mark . iif oif missing drop
    }
}
"""


def test_a_packet_dropped_for_want_of_a_passing_reverse_path_check_names_the_route_back(lab):
    """NixOS's reverse-path filter: an accept rule that checks the route back, and a drop
    policy. The near miss is the check (found by elimination), and the route back it found is
    said."""
    load_ruleset(lab.router, NIXOS_RPFILTER)
    try:
        result = why(lab, "--from", WRONG_WAY_SOURCE, "--to", SERVER_V4, "--proto", "udp", "--dport", "5000",
                     command=traffic(lab.client, "udp", SERVER_V4, "5000", "--source", WRONG_WAY_SOURCE))
    finally:
        in_netns(lab.router, ["nft", "delete", "table", "inet", "rpcheck"])
    [packet] = result.packets
    assert (packet["verdict"], packet["decided_by"]["type"]) == ("drop", "policy")
    assert packet["near_misses"][0]["mismatches"][0]["expr"] == "fib saddr . mark . iif oif exists"
    assert (f"the reverse-path check `fib saddr . mark . iif oif exists` finds the route back to {WRONG_WAY_SOURCE} "
            f"through r-server (10.88.0.0/24 via {SERVER_V4} dev r-server), not r-client where the packet came in"
            ) in result.json["warnings"]


def test_a_dry_run_of_a_packet_a_reverse_path_check_dropped_names_the_route_back_in_the_sandbox(lab, tmp_path):
    candidate = tmp_path / "firewalld-rpfilter.nft"
    candidate.write_text(FIREWALLD_RPFILTER)
    result = nftrace("--netns", lab.router, "why", "--dry-run", "--json", "--ruleset", str(candidate), "--from",
                     WRONG_WAY_SOURCE, "--to", SERVER_V4, "--proto", "udp", "--dport", "5000", "--iif", "r-client",
                     timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.packets[0]["decided_by"]["text"] == "fib saddr . mark . iif oif missing drop"
    assert any(warning.startswith("the reverse-path check `fib saddr . mark . iif oif missing` finds the route back "
                                  f"to {WRONG_WAY_SOURCE} through r-server") for warning in result.json["warnings"])


def test_a_reverse_path_check_that_a_route_back_passes_says_nothing(lab):
    load_ruleset(lab.router, NIXOS_RPFILTER)
    try:
        result = why(lab, "--from", CLIENT_V4, "--to", SERVER_V4, "--proto", "udp", "--dport", "5000",
                     command=traffic(lab.client, "udp", SERVER_V4, "5000"))
    finally:
        in_netns(lab.router, ["nft", "delete", "table", "inet", "rpcheck"])
    assert result.packets[0]["verdict"] == "accept"
    assert not any("reverse-path" in warning for warning in result.json["warnings"])


# -- too big for the MTU on the way out -------------------------------------------------------------


@pytest.mark.parametrize("destination, payload, words", [
    (SERVER_V4, "1472", "larger than the MTU toward its destination (1400 on r-server) and its DF bit forbids "
                        "fragmenting it: the sender was sent ICMP fragmentation needed (mtu 1400);"),
    ("10.94.0.1", "1400", "larger than the MTU toward its destination (1300 on r-server, the route's) and its DF bit "
                          "forbids fragmenting it:"),
    (SERVER_V6, "1452", "larger than the MTU toward its destination (1400 on r-server) and IPv6 routers never "
                        "fragment: the sender was sent ICMPv6 packet too big (mtu 1400);"),
    ("fd94::1", "1400", "larger than the MTU toward its destination (1280 on r-server, the route's) and IPv6 routers "
                        "never fragment:"),
])
def test_a_packet_too_big_for_the_way_out_names_the_mtu_and_where_it_is_set(lab, destination, payload, words):
    in_netns(lab.router, ["ip", "link", "set", "r-server", "mtu", "1400"])
    try:
        packet = udp_to(lab, destination, send=("--size", payload, "--dont-fragment"))
    finally:
        in_netns(lab.router, ["ip", "link", "set", "r-server", "mtu", "1500"])
    drop = packet["kernel_drop"]
    assert (packet["verdict"], drop["reason"], drop["routing"]["cause"]) == ("accept", "PKT_TOO_BIG", "path mtu")
    assert drop["explain"].startswith(words)


# -- sent by the router itself: refused before netfilter sees a packet -------------------------------


UNSENT = ('routing refuses to send it, so no packet reaches netfilter (the sender gets "Invalid argument"): '
          'a blackhole route: blackhole 10.99.0.0/24 table main')


def test_a_packet_the_router_cannot_send_is_no_packet_and_the_route_is_named(lab):
    result = nftrace("--netns", lab.router, "why", "--from", ROUTER_SERVER_V4, "--to", "10.99.0.1", "--proto", "udp",
                     "--dport", "53", "--count", "1", "--timeout", "3", "--json", "--",
                     *traffic(lab.router, "udp", "10.99.0.1", "53"))
    assert result.returncode == 3, result.stderr
    assert result.json["packets"] == []
    assert UNSENT in result.json["warnings"]


def test_a_dry_run_of_a_packet_the_router_cannot_send_names_the_route(lab):
    result = nftrace("--netns", lab.router, "why", "--dry-run", "--from", ROUTER_SERVER_V4, "--to", "10.99.0.1",
                     "--proto", "tcp", "--dport", "53", timeout=120)
    assert result.returncode == 3, result.stderr
    assert f"warning: {UNSENT}" in result.stdout + result.stderr


def test_a_packet_from_another_host_that_never_came_is_not_blamed_on_the_routers_routes(lab):
    result = nftrace("--netns", lab.router, "why", "--from", CLIENT_V4, "--to", "10.99.0.1", "--proto", "udp",
                     "--dport", "53", "--count", "1", "--timeout", "2", "--json", "--", "true")
    assert result.returncode == 3, result.stderr
    assert not any("routing refuses" in warning for warning in result.json["warnings"])


# -- let through to a next hop that never answers ----------------------------------------------------


@pytest.mark.parametrize("destination, words", [
    ("10.77.2.99", "the next hop 10.77.2.99 on r-server has not answered ARP yet (neighbour INCOMPLETE): the kernel "
                   "holds packets for it and drops them (NEIGH_FAILED) if it never does; is the host there?"),
    ("fd77:2::99", "the next hop fd77:2::99 on r-server has not answered neighbour discovery yet (neighbour "
                   "INCOMPLETE)"),
])
def test_an_accepted_packet_to_a_host_that_is_not_there_is_said_to_wait_for_its_next_hop(lab, destination, words):
    """The kernel drops such packets only when ARP gives up, seconds after the answer: the
    answer says "accepted", and the warning why nothing arrives."""
    source = CLIENT_V6 if ":" in destination else CLIENT_V4
    result = why(lab, "--from", source, "--to", destination, "--proto", "udp", "--dport", "5000",
                 command=traffic(lab.client, "udp", destination, "5000"))
    assert result.packets[0]["verdict"] == "accept"
    assert any(warning.startswith(words) for warning in result.json["warnings"]), result.json["warnings"]


def test_an_accepted_packet_to_a_host_that_answers_has_no_next_hop_warning(lab):
    result = why(lab, "--from", CLIENT_V4, "--to", SERVER_V4, "--proto", "udp", "--dport", "5000",
                 command=traffic(lab.client, "udp", SERVER_V4, "5000"))
    assert result.packets[0]["verdict"] == "accept"
    assert not any("next hop" in warning for warning in result.json["warnings"])


def test_a_dry_run_says_nothing_of_next_hops_which_its_sandbox_copy_does_not_have(lab):
    result = nftrace("--netns", lab.router, "why", "--dry-run", "--json", "--from", CLIENT_V4, "--to", SERVER_V4,
                     "--proto", "udp", "--dport", "5000", "--iif", "r-client", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.packets[0]["verdict"] == "accept"
    assert not any("next hop" in warning for warning in result.json["warnings"])
