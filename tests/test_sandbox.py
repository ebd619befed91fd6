"""The sandbox against the real kernel: a namespace with a realistic network state is copied,
and the copy is compared with the original, piece by piece, with the tools an admin uses.
The original must come out of it unchanged, byte for byte."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO, lab_topology, load_ruleset, nftrace
from nftrace.lab.topology import ROUTER_CLIENT_V4, in_netns, netns_exists, run
from nftrace.dryrun.netstate import parse_route_lines, parse_rule_lines, read_network_state
from nftrace.dryrun.sandbox import Sandbox

pytestmark = pytest.mark.kernel

TARGET_RULESET = """
table inet fw {
    set admins { type ipv4_addr; elements = { 10.77.1.2, 10.77.1.3 } }
    map ports { type inet_service : verdict; elements = { 22 : accept, 23 : drop } }
    counter seen { }
    quota monthly { over 10 mbytes used 1 mbytes }
    chain input {
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        iif "r-client" ip saddr @admins counter name seen tcp dport vmap @ports
        iif "lo" accept
    }
    chain forward {
        type filter hook forward priority filter; policy accept;
        quota name monthly drop
    }
}
"""


def _target_setup(router: str) -> None:
    commands = [
        ["ip", "link", "set", "r-server", "mtu", "1400"],
        ["ip", "link", "add", "spare", "type", "veth", "peer", "name", "spare-peer"],
        ["ip", "addr", "add", "10.77.3.1/24", "dev", "spare"],
        ["ip", "addr", "add", "192.0.2.1/32", "dev", "lo"],
        ["ip", "route", "add", "198.51.100.0/24", "via", "10.77.2.2"],
        ["ip", "route", "add", "blackhole", "203.0.113.0/24"],
        ["ip", "route", "add", "default", "via", "10.77.1.2", "table", "100"],
        ["ip", "rule", "add", "fwmark", "0x1", "lookup", "100", "pref", "1000"],
        ["ip", "-6", "route", "add", "fd77:9::/64", "via", "fd77:2::2"],
        ["ip", "-6", "rule", "add", "from", "fd77:1::/64", "lookup", "100", "pref", "1001"],
        ["ip", "nexthop", "add", "id", "7", "via", "10.77.2.2", "dev", "r-server"],
        ["ip", "route", "add", "198.51.101.0/24", "nhid", "7"],
        ["sysctl", "-qw", "net.ipv4.conf.r-client.rp_filter=1", "net.ipv4.conf.r-server.accept_local=1",
         "net.ipv6.conf.r-server.forwarding=0"],
    ]
    for command in commands:
        in_netns(router, command)
    load_ruleset(router, TARGET_RULESET)
    _wait_for_ipv6_addresses(router)
    in_netns(router, ["iptables-legacy", "-A", "INPUT", "-p", "tcp", "--dport", "9999", "-c", "7", "700", "-j", "DROP"])
    in_netns(router, ["ip6tables-legacy", "-A", "INPUT", "-p", "udp", "--dport", "9999", "-c", "3", "300", "-j", "DROP"])
    in_netns(router, ["iptables-nft", "-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "--dport", "7777", "-m", "comment",
                      "--comment", "marked by iptables-nft", "-j", "MARK", "--set-mark", "7"])


def _wait_for_ipv6_addresses(ns: str) -> None:
    """Link-local addresses of a new link go through duplicate address detection first; the
    target's state is read once that is over, so that it does not change during the tests."""
    deadline = time.monotonic() + 10
    while in_netns(ns, ["ip", "-6", "address", "show", "tentative"]).stdout.strip():
        assert time.monotonic() < deadline, "IPv6 addresses stayed tentative"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def target():
    """A router namespace with routes, rules, sysctls, a ruleset, legacy tables, a listener and a connection."""
    with lab_topology("sbx", lambda topo: _target_setup(topo.router)) as topo:
        listener = subprocess.Popen(["ip", "netns", "exec", topo.router, sys.executable, "-m", "nftrace.lab.traffic",
                                     "listen-tcp", "0.0.0.0", "2222", "--seconds", "300"], stdout=subprocess.PIPE,
                                    text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        try:
            assert listener.stdout.readline().strip() == "ready"
            if shutil.which("conntrack"):
                in_netns(topo.router, ["conntrack", "-I", "-p", "tcp", "-s", "10.77.1.2", "-d", "10.77.1.1", "--sport",
                                       "40000", "--dport", "22", "--state", "ESTABLISHED", "-u", "SEEN_REPLY,ASSURED",
                                       "-t", "600"])
            yield topo
        finally:
            listener.kill()
            listener.wait()


@pytest.fixture(scope="module")
def sandbox(target):
    box = Sandbox(read_network_state(target.router))
    box.build()
    try:
        yield box
    finally:
        box.close()


def _ip(ns, *args):
    return run(["ip", "-n", ns, *args]).stdout


def test_interfaces_keep_their_names_mtu_state_mac_and_addresses(target, sandbox):
    original = {i.name: i for i in read_network_state(target.router).interfaces}
    copy = {i.name: i for i in read_network_state(sandbox.name).interfaces}
    assert set(copy) == set(original)
    for name, interface in original.items():
        assert (copy[name].mtu, copy[name].up, copy[name].mac) == (interface.mtu, interface.up, interface.mac), name
        assert set(copy[name].addresses) == set(interface.addresses), name
    assert copy["spare"].up is False and copy["r-server"].mtu == 1400


@pytest.mark.parametrize("family", [4, 6])
def test_routes_of_every_table_are_the_same(target, sandbox, family):
    def routes(ns):
        return sorted(parse_route_lines(_ip(ns, f"-{family}", "route", "show", "table", "all"), family))

    assert routes(sandbox.name) == routes(target.router)


@pytest.mark.parametrize("family", [4, 6])
def test_policy_rules_are_the_same(target, sandbox, family):
    def rules(ns):
        return parse_rule_lines(_ip(ns, f"-{family}", "rule", "show"))

    assert rules(sandbox.name) == rules(target.router)


def test_sysctls_that_decide_forwarding_and_drops_are_the_same(target, sandbox):
    original = read_network_state(target.router).sysctls
    copy = read_network_state(sandbox.name).sysctls
    assert original["ipv4/conf/r-client/rp_filter"] == "1" and original["ipv4/ip_forward"] == "1"
    differing = {path: (value, copy.get(path)) for path, value in original.items() if copy.get(path) != value}
    assert differing == {}


def test_ruleset_with_set_elements_and_stateful_objects_is_the_same(target, sandbox):
    assert in_netns(sandbox.name, ["nft", "list", "ruleset"]).stdout == in_netns(target.router, ["nft", "list", "ruleset"]).stdout


@pytest.mark.parametrize("tool", ["iptables-legacy-save", "ip6tables-legacy-save"])
def test_legacy_iptables_tables_are_the_same_with_their_counters(target, sandbox, tool):
    def saved(ns, *options):
        lines = [line for line in in_netns(ns, [tool, *options]).stdout.splitlines() if not line.startswith("#")]
        # Chain counters move with each namespace's own traffic (IPv6 neighbour discovery, MLD).
        return [re.sub(r"^(:\S+ \S+) \[\d+:\d+\]$", r"\1", line) for line in lines]

    assert saved(sandbox.name) == saved(target.router)
    # A rule that sees no traffic keeps the counters it was copied with.
    rule = [line for line in saved(target.router, "-c") if "9999" in line]
    assert rule and rule[0].startswith(("[7:700]", "[3:300]"))
    assert rule == [line for line in saved(sandbox.name, "-c") if "9999" in line]


def test_iptables_nft_tables_are_copied_with_iptables_nft(target, sandbox):
    def saved(ns):
        return [line for line in in_netns(ns, ["iptables-nft-save", "-c", "-t", "mangle"]).stdout.splitlines()
                if not line.startswith("#")]

    assert saved(sandbox.name) == saved(target.router)
    assert any('--comment "marked by iptables-nft"' in line for line in saved(sandbox.name))


def test_listening_ports_have_listeners_in_the_sandbox(sandbox):
    listening = in_netns(sandbox.name, ["ss", "-H", "-ltn"]).stdout
    assert re.search(r"0\.0\.0\.0:2222\b", listening), listening


def test_the_helper_holds_the_other_end_of_every_interface(sandbox):
    helper_links = _ip(sandbox.helper, "-o", "link", "show")
    for peer in sandbox.peers.values():
        assert f" {peer.peer}@" in helper_links


def test_close_removes_the_sandbox_and_its_helper(target):
    box = Sandbox(read_network_state(target.router))
    box.build()
    assert netns_exists(box.name) and netns_exists(box.helper)
    box.close()
    assert not netns_exists(box.name) and not netns_exists(box.helper)


def _target_fingerprint(ns: str) -> dict:
    """Everything a dry run must leave alone, as the admin's tools print it."""
    fingerprint = {
        "nft": in_netns(ns, ["nft", "-a", "list", "ruleset"]).stdout,
        "iptables": in_netns(ns, ["iptables-legacy-save", "-c"]).stdout,
        "ip6tables": in_netns(ns, ["ip6tables-legacy-save", "-c"]).stdout,
        "addresses": _ip(ns, "address", "show"),
        "routes4": _ip(ns, "-4", "route", "show", "table", "all"),
        "routes6": _ip(ns, "-6", "route", "show", "table", "all"),
        "rules": _ip(ns, "rule", "show") + _ip(ns, "-6", "rule", "show"),
        "sysctls": read_network_state(ns).sysctls,
        "sockets": in_netns(ns, ["ss", "-H", "-tuan"]).stdout,
    }
    if shutil.which("conntrack"):
        # The third column is the entry's remaining lifetime, which counts down by itself.
        entries = in_netns(ns, ["conntrack", "-L"]).stdout.splitlines()
        fingerprint["conntrack"] = sorted(re.sub(r"^(\S+\s+\d+)\s+\d+", r"\1", line) for line in entries)
    for key in ("iptables", "ip6tables"):
        fingerprint[key] = "\n".join(l for l in fingerprint[key].splitlines() if not l.startswith("#"))
    # The lab's own links keep sending IPv6 neighbour discovery and MLD packets through the
    # target's IPv6 chain policies; every rule counter, and all IPv4 counters, stay exact.
    fingerprint["ip6tables"] = re.sub(r"(?m)^(:\S+ \S+) \[\d+:\d+\]$", r"\1", fingerprint["ip6tables"])
    return fingerprint


def test_dry_runs_leave_the_target_byte_identical(target, tmp_path):
    before = _target_fingerprint(target.router)
    assert "counter packets" in before["nft"] or "used 1 mbytes" in before["nft"]
    candidate = tmp_path / "candidate.nft"
    candidate.write_text("table inet other {\n chain input { type filter hook input priority 0; policy drop; }\n}\n")
    runs = [
        ("--from", "10.77.1.2", "--to", ROUTER_CLIENT_V4, "--proto", "tcp", "--dport", "22"),
        ("--from", "10.77.1.2", "--to", "10.77.2.2", "--proto", "udp", "--dport", "53"),
        ("--from", "10.77.1.2", "--to", ROUTER_CLIENT_V4, "--proto", "tcp", "--dport", "22", "--state", "established"),
        ("--from", "10.77.1.2", "--to", ROUTER_CLIENT_V4, "--proto", "tcp", "--dport", "22", "--ruleset", str(candidate)),
    ]
    for args in runs:
        result = nftrace("--netns", target.router, "why", *args, "--dry-run", "--json")
        assert result.returncode == 0, result.stderr
        assert result.json["mode"] == "dry-run"
    assert _target_fingerprint(target.router) == before


def test_cleanup_removes_sandboxes_of_dead_runs_only(netns):
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = f"nftrace-sbx-{dead.pid}-c0ffee"
    alive = f"nftrace-sbx-{os.getpid()}-c0ffee"
    for name in (leftover, f"{leftover}-h", alive):
        run(["ip", "netns", "add", name])
    try:
        result = nftrace("--netns", netns(), "cleanup")
        assert result.returncode == 0, result.stderr
        assert f"removed dry-run sandbox namespace {leftover}" in result.stdout
        assert not netns_exists(leftover) and not netns_exists(f"{leftover}-h")
        assert netns_exists(alive)
    finally:
        for name in (leftover, f"{leftover}-h", alive):
            if netns_exists(name):
                run(["ip", "netns", "del", name], check=False)
