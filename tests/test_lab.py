"""`nftrace lab up|down|status|load`, through the real command line, against the kernel.

Each test's lab has a unique prefix and is removed afterwards whatever happens.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from conftest import NftraceResult, nftrace, ruleset_state, unique_name, without_admin_rights
from nftrace.lab.lab import LEGACY_BUILTIN_CHAINS, Lab, legacy_reset_text, rules_dir
from nftrace.lab.topology import SERVER_V4, in_netns, netns_exists


@pytest.fixture
def prefix():
    name = unique_name("lab")
    try:
        yield name
    finally:
        if os.geteuid() == 0:
            Lab(name).down()


def without_root(*args: str) -> NftraceResult:
    """nftrace run without the rights of root (as is, when the tests themselves are not root)."""
    return nftrace(*args, wrapper=without_admin_rights() if os.geteuid() == 0 else ())


def test_lab_up_refuses_to_run_without_root_in_one_line(prefix):
    result = without_root("lab", "up", "--prefix", prefix)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "nftrace: nftrace lab needs root to create network namespaces and load rulesets; run it with sudo"]
    assert not netns_exists(f"{prefix}-router")


def test_lab_load_without_netns_is_refused_before_touching_anything():
    result = nftrace("lab", "load", "host-firewall")
    assert result.returncode == 2
    assert "--netns" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_lab_commands_refuse_netns_since_the_lab_makes_its_own():
    for command in ("up", "down", "status"):
        result = nftrace("--netns", "somewhere", "lab", command)
        assert result.returncode == 2
        assert result.stderr.strip() == (f"nftrace: --netns does not apply to 'lab {command}': "
                                         "the lab makes its own namespaces")


def test_a_scenario_given_twice_two_ways_is_refused_before_anything_is_made(prefix):
    result = nftrace("lab", "up", "nat-router", "--scenario", "host-firewall", "--prefix", prefix)
    assert result.returncode == 2
    assert result.stderr.strip() == "nftrace: two scenarios given (nat-router and --scenario host-firewall): give one"
    assert not netns_exists(f"{prefix}-router")


def test_a_prefix_that_cannot_name_namespaces_is_refused():
    result = nftrace("lab", "status", "--prefix", "../etc")
    assert result.returncode == 2
    assert result.stderr.startswith("nftrace: --prefix: '../etc' is not a usable name")


def test_legacy_reset_text_names_every_builtin_chain_with_policy_accept():
    assert legacy_reset_text("nat") == (":PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                                        ":POSTROUTING ACCEPT [0:0]\n").join(["*nat\n", "COMMIT\n"])
    assert set(LEGACY_BUILTIN_CHAINS) == {"filter", "nat", "mangle", "raw", "security"}


@pytest.mark.kernel
class TestLabAgainstTheKernel:
    def test_up_builds_client_router_server_with_the_scenario_on_the_router(self, prefix):
        result = nftrace("lab", "up", "--prefix", prefix, "--scenario", "nat-router", "--listen-seconds", "120")
        assert result.returncode == 0, result.stderr
        assert all(netns_exists(f"{prefix}-{role}") for role in ("client", "router", "server"))
        tables = in_netns(f"{prefix}-router", ["nft", "list", "tables"]).stdout.split("\n")
        assert {"table ip nat", "table inet filter"} <= set(tables)
        assert f"lab {prefix}: up, scenario nat-router" in result.stdout

    def test_the_servers_listeners_answer_through_the_router(self, prefix):
        assert nftrace("lab", "up", "--prefix", prefix, "--scenario", "nat-router", "--listen-seconds", "120").returncode == 0
        answer = in_netns(f"{prefix}-client", [sys.executable, "-m", "nftrace.lab.traffic", "tcp", SERVER_V4, "80"])
        assert answer.stdout.strip() == "connected"

    def test_up_again_changes_nothing(self, prefix):
        nftrace("lab", "up", "--prefix", prefix, "--listen-seconds", "120")
        lab = Lab(prefix)
        before = (ruleset_state(f"{prefix}-router"), lab.topology.listener_pids())
        again = nftrace("lab", "up", "--prefix", prefix, "--listen-seconds", "120")
        assert again.returncode == 0
        assert "already up with scenario host-firewall: nothing to do" in again.stderr
        assert (ruleset_state(f"{prefix}-router"), lab.topology.listener_pids()) == before

    def test_up_with_another_scenario_replaces_the_routers_ruleset_in_place(self, prefix):
        nftrace("lab", "up", "--prefix", prefix, "--scenario", "legacy-iptables", "--listen-seconds", "120")
        listeners = Lab(prefix).topology.listener_pids()
        result = nftrace("lab", "up", "sets-and-maps", "--prefix", prefix, "--listen-seconds", "120")  # as an argument
        assert result.returncode == 0, result.stderr
        assert "loaded scenario sets-and-maps" in result.stderr
        assert "set blocklist" in ruleset_state(f"{prefix}-router")
        legacy = in_netns(f"{prefix}-router", ["iptables-legacy-save", "-t", "filter"]).stdout
        assert "-A " not in legacy and ":INPUT ACCEPT" in legacy, "the legacy rules must be gone"
        assert Lab(prefix).topology.listener_pids() == listeners

    def test_up_reloads_a_scenario_whose_file_was_edited(self, prefix, tmp_path):
        rules = tmp_path / "rules"
        shutil.copytree(rules_dir(), rules)
        env = {"NFTRACE_RULES": str(rules)}
        assert nftrace("lab", "up", "--prefix", prefix, "--listen-seconds", "120", env=env).returncode == 0
        ruleset = rules / "host-firewall.nft"
        ruleset.write_text(ruleset.read_text().replace('comment "web"', 'comment "web, edited"'))
        result = nftrace("lab", "up", "--prefix", prefix, "--listen-seconds", "120", env=env)
        assert "loaded scenario host-firewall" in result.stderr
        assert 'comment "web, edited"' in ruleset_state(f"{prefix}-router")

    def test_status_says_what_runs_and_a_command_to_try(self, prefix):
        nftrace("lab", "up", "--prefix", prefix, "--scenario", "firewalld-zones", "--listen-seconds", "120")
        status = nftrace("lab", "status", "--prefix", prefix)
        assert status.returncode == 0
        assert f"lab {prefix}: up, scenario firewalld-zones (firewalld-zones.nft, nft)" in status.stdout
        assert f"nftrace --netns {prefix}-router why --from 10.77.1.2" in status.stdout
        assert "listening on the server" in status.stdout

    def test_status_of_a_lab_that_is_down_exits_3(self, prefix):
        status = nftrace("lab", "status", "--prefix", prefix)
        assert status.returncode == 3
        assert status.stdout.startswith(f"lab {prefix}: down")

    def test_down_removes_listeners_namespaces_and_state(self, prefix):
        nftrace("lab", "up", "--prefix", prefix, "--listen-seconds", "120")
        lab = Lab(prefix)
        listeners = lab.topology.listener_pids()
        assert listeners and lab.state_file.exists()
        result = nftrace("lab", "down", "--prefix", prefix)
        assert result.returncode == 0
        assert not any(netns_exists(name) for name in lab.topology.namespaces)
        assert not lab.state_file.exists()
        assert not any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/cmdline").read() for pid in listeners)
        assert nftrace("lab", "down", "--prefix", prefix).stdout.strip() == "nothing to remove"

    def test_an_unknown_scenario_is_refused_and_nothing_is_made(self, prefix):
        result = nftrace("lab", "up", "--prefix", prefix, "--scenario", "no-such-thing")
        assert result.returncode == 2
        assert "no scenario 'no-such-thing' (known: docker, " in result.stderr
        assert not netns_exists(f"{prefix}-router")

    def test_a_half_made_lab_is_rebuilt(self, prefix):
        from nftrace.lab.topology import run

        run(["ip", "netns", "add", f"{prefix}-router"])
        result = nftrace("lab", "up", "--prefix", prefix, "--listen-seconds", "120")
        assert result.returncode == 0, result.stderr
        assert Lab(prefix).status().up

    def test_load_replaces_the_ruleset_of_the_namespace_given(self, netns):
        name = netns("load")
        assert nftrace("--netns", name, "lab", "load", "legacy-iptables").returncode == 0
        assert "-A LAN_IN" in in_netns(name, ["iptables-legacy-save"]).stdout
        result = nftrace("--netns", name, "lab", "load", "docker")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"loaded scenario docker (docker.rules, iptables-nft) into {name}"
        assert "-A LAN_IN" not in in_netns(name, ["iptables-legacy-save"]).stdout
        assert "chain DOCKER-USER" in ruleset_state(name)


def test_a_paced_sender_sends_at_the_rate_asked_never_faster():
    """The lab's traffic at --rate keeps to the rate on average, where a sleep per datagram
    (each longer than asked) fell far short of it; never faster (a burst only makes up for a
    sender that fell behind, by at most CATCH_UP_SECONDS)."""
    import socket
    import time

    from nftrace.lab.traffic import CATCH_UP_SECONDS, udp_send

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        receiver.bind(("127.0.0.1", 0))
        started = time.monotonic()
        sent = udp_send("127.0.0.1", receiver.getsockname()[1], count=300, rate=3000)
        took = time.monotonic() - started
    assert sent == 300
    assert took >= 299 / 3000 - CATCH_UP_SECONDS
