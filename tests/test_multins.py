"""One trace across several network namespaces, against the real kernel.

The lab's router DNATs a port to the server, and the server has a firewall of its own: the
packet is marked in each namespace (a veth scrubs the trace bit) and its parts are joined
into one answer. Every namespace touched must be left as it was, whatever ends the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, load_ruleset, nftrace, ruleset_state, traffic
from nftrace.lab.topology import CLIENT_V4, ROUTER_CLIENT_V4, SERVER_V4, in_netns, netns_exists, run

pytestmark = pytest.mark.kernel

ROUTER = """
table ip nat {
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        tcp dport 2222 dnat to 10.77.2.2:22
        tcp dport 2323 dnat to 10.77.2.2:23
    }
}
table inet filter {
    chain forward {
        type filter hook forward priority filter; policy drop;
        tcp dport 23 counter drop
        ct status dnat accept
    }
}
"""
SERVER = """
table inet host {
    chain input {
        type filter hook input priority filter; policy accept;
        tcp dport 22 counter drop
    }
}
"""
FLOW = ("--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "tcp")


@pytest.fixture
def lab(topology):
    load_ruleset(topology.router, ROUTER)
    load_ruleset(topology.server, SERVER)
    return topology


def states(lab):
    return {ns: ruleset_state(ns) for ns in (lab.router, lab.server)}


def why(lab, *args, dport="2222", command=None, env=None):
    before = states(lab)
    result = nftrace(*args, "why", *FLOW, "--dport", dport, "--count", "1", "--timeout", "15", "--json", "--",
                     *(command or traffic(lab.client, "tcp", ROUTER_CLIENT_V4, dport)), env=env)
    assert states(lab) == before, "a ruleset changed"
    return result


def where(packet):
    return [(step["netns"], step["hook"], step["table"], step["verdict"]) for step in packet["steps"]]


def test_a_dnat_to_another_namespace_is_one_packet_decided_where_it_was_dropped(lab):
    result = why(lab, "--netns", lab.router, "--netns", lab.server)
    assert result.returncode == 0, result.stderr
    [packet] = result.packets
    assert packet["verdict"] == "drop"
    assert packet["decided_by"]["netns"] == lab.server
    assert (packet["decided_by"]["table"], packet["decided_by"]["text"]) == ("host", "tcp dport 22 counter drop")
    assert where(packet) == [(lab.router, "prerouting", "nat", "accept"), (lab.router, "forward", "filter", "accept"),
                             (lab.server, "input", "host", "drop")]
    assert [part["netns"] for part in packet["namespaces"]] == [lab.router, lab.server]
    assert packet["nat"][0]["netns"] == lab.router and packet["nat"][0]["to"] == f"{SERVER_V4}:22"
    assert result.json["namespaces"] == [lab.router, lab.server]
    assert packet["summary"].startswith(f"dropped in netns {lab.server} by inet host input")


def test_the_namespaces_may_be_given_in_any_order(lab):
    result = why(lab, "--netns", lab.server, "--netns", lab.router)
    assert result.returncode == 0, result.stderr
    [packet] = result.packets
    assert [part["netns"] for part in packet["namespaces"]] == [lab.router, lab.server]
    assert packet["decided_by"]["netns"] == lab.server


def test_a_packet_that_never_reaches_the_next_namespace_ends_where_it_ended(lab):
    result = why(lab, "--netns", lab.router, "--netns", lab.server, dport="2323")
    assert result.returncode == 0, result.stderr
    [packet] = result.packets
    assert packet["verdict"] == "drop" and packet["decided_by"]["netns"] == lab.router
    assert packet["decided_by"]["text"] == "tcp dport 23 counter drop"
    assert [part["netns"] for part in packet["namespaces"]] == [lab.router]


def test_the_text_answer_groups_hooks_under_each_namespace(lab):
    before = states(lab)
    result = nftrace("--netns", lab.router, "--netns", lab.server, "why", *FLOW, "--dport", "2222", "--count", "1",
                     "--timeout", "15", "--", *traffic(lab.client, "tcp", ROUTER_CLIENT_V4, "2222"))
    assert states(lab) == before
    lines = result.stdout.splitlines()
    assert lines[1] == f"  netns {lab.router}" and f"  netns {lab.server}" in lines
    assert lines.index(f"  netns {lab.server}") > lines.index("    forward  in r-client out r-server  ct new (original)")


@pytest.fixture
def server_process(lab):
    """A process of the server's namespace (bounded: it ends by itself)."""
    process = subprocess.Popen(["ip", "netns", "exec", lab.server, "sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and process.pid not in _pids_in(lab.server):
            time.sleep(0.02)
        yield process.pid
    finally:
        process.kill()
        process.wait()


def _pids_in(ns):
    result = run(["ip", "netns", "pids", ns], check=False)
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def test_pid_names_the_namespace_of_a_process(lab, server_process):
    result = why(lab, "--netns", lab.router, "--pid", str(server_process))
    assert result.returncode == 0, result.stderr
    [packet] = result.packets
    assert packet["decided_by"]["netns"] == f"pid:{server_process}"
    assert "the namespace of pid" in packet["summary"]


def test_the_same_namespace_named_twice_is_traced_once(lab, server_process):
    result = why(lab, "--netns", lab.router, "--netns", lab.server, "--pid", str(server_process))
    assert result.returncode == 0, result.stderr
    assert result.json["namespaces"] == [lab.router, lab.server]
    assert any("traced once" in warning for warning in result.json["warnings"])


# -- nothing left in any namespace ---------------------------------------------------------------


def start(lab, *namespaces, env=None):
    """nftrace across `namespaces`, in a process group of its own (as a shell runs a command,
    so that Ctrl-C reaches it), once its trace rules are in."""
    args = [arg for ns in namespaces for arg in ("--netns", ns)]
    process = subprocess.Popen([sys.executable, "-m", "nftrace", *args, "why", *FLOW, "--count", "0", "--timeout", "30"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})))
    line = process.stderr.readline()
    assert line.startswith("tracing "), line + process.stderr.read()
    for ns in namespaces:
        assert "nftrace_" in in_netns(ns, ["nft", "list", "tables"]).stdout, ns
    return process


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_remove_the_trace_rules_from_every_namespace(lab, signum, status):
    before = states(lab)
    process = start(lab, lab.router, lab.server)
    os.killpg(process.pid, signum)  # as a terminal's Ctrl-C reaches it: the whole process group
    _, stderr = process.communicate(timeout=20)
    assert "; trace rules removed\n" in stderr, stderr
    # Known flake, under investigation: about one whole-file run in ten here, a Ctrl-C run ends
    # killed by SIGINT (-2) after saying "interrupted; trace rules removed" and removing them
    # (never reproduced alone, in 100 runs). A shell reports both endings as status 130.
    assert process.returncode in ((status, -signum) if signum == signal.SIGINT else (status,)), stderr
    assert states(lab) == before


def test_after_sigkill_the_kernel_removes_the_trace_rules_in_every_namespace(lab):
    before = states(lab)
    process = start(lab, lab.router, lab.server)
    process.kill()
    process.wait()
    assert states(lab) == before  # flags owner: each table went with its namespace's socket


def test_without_the_owner_flag_cleanup_removes_a_killed_runs_rules_in_every_namespace(lab):
    before = states(lab)
    process = start(lab, lab.router, lab.server, env={"NFTRACE_TABLE_OWNER": "0"})
    process.kill()
    process.wait()
    assert states(lab) != before
    result = nftrace("--netns", lab.router, "--netns", lab.server, "cleanup")
    assert result.returncode == 0, result.stderr
    assert f"in netns {lab.router}" in result.stdout and f"in netns {lab.server}" in result.stdout
    assert states(lab) == before


def test_a_namespace_that_goes_away_mid_trace_ends_its_part_with_a_warning(lab, netns):
    gone = netns("gone")
    before = ruleset_state(lab.router)
    process = start(lab, lab.router, gone)
    run(["ip", "netns", "del", gone])
    run(traffic(lab.client, "tcp", ROUTER_CLIENT_V4, "2222"), check=False)
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=20)
    assert f"netns {gone} went away during the trace" in stderr
    assert "DROP" in stdout or "ACCEPT" in stdout  # the router's part goes on
    assert ruleset_state(lab.router) == before
    assert not netns_exists(gone)


# -- what cannot be -------------------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (("--pid", "0"), "--pid: '0' is not a process id"),
    (("--pid", "4194304999"), "--pid: no process 4194304999"),
    (("--netns", "nope-not-here", "--netns", "x"),
     "--netns: network namespace 'nope-not-here' does not exist (see 'ip netns list')"),
])
def test_a_namespace_that_cannot_be_found_is_one_line(args, message):
    result = nftrace(*args, "why", "--from", "10.0.0.1", "--to", "10.0.0.2")
    assert result.returncode == 2 and result.stderr.strip() == f"nftrace: {message}"


def test_a_container_without_any_runtime_is_one_line(tmp_path):
    result = nftrace("--container", "web", "why", "--from", "10.0.0.1", "--to", "10.0.0.2",
                     env={"PATH": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip() == ("nftrace: --container web: no container runtime found (docker, podman or ctr); "
                                     "use --pid with the container's process id instead")


def test_a_dry_run_copies_one_namespace(lab):
    result = nftrace("--netns", lab.router, "--netns", lab.server, "why", *FLOW, "--dport", "22", "--dry-run")
    assert result.returncode == 2 and "--dry-run copies one namespace" in result.stderr


def test_other_commands_work_in_one_namespace(lab):
    result = nftrace("--netns", lab.router, "--netns", lab.server, "test", "x.toml")
    assert result.returncode == 2 and "'test' works in one namespace" in result.stderr
    result = nftrace("--netns", lab.router, "--pid", "1", "drops")
    assert result.returncode == 2 and result.stderr.startswith("nftrace: 'drops' works in one namespace: give at "
                                                               "most one --netns NAME, --pid PID or --container NAME")



ALL_NETNS_SCRIPT = r"""
set -e
mount -t tmpfs nftrace-test /run/netns
ip netns add a
ip netns add b
ip -n a link set lo up
ip -n b link set lo up
ip link add eth0 netns a type veth peer name eth0 netns b
ip -n a addr add 10.98.0.1/24 dev eth0
ip -n a link set eth0 up
ip -n b addr add 10.98.0.2/24 dev eth0
ip -n b link set eth0 up
printf 'table inet host {
 chain input {
  type filter hook input priority filter; policy accept;
  udp dport 7777 counter drop
 }
}
'     | ip netns exec b nft -f -
ip netns exec a env PYTHONPATH="$REPO" "$PYTHON" -m nftrace --all-netns why --from 10.98.0.1 --to 10.98.0.2     --proto udp --dport 7777 --count 1 --timeout 15 --json -- "$PYTHON" -m nftrace.lab.traffic udp 10.98.0.2 7777     > "$OUT"
echo "a: $(ip netns exec a nft list tables | tr '
' ' ')" > "$OUT.tables"
echo "b: $(ip netns exec b nft list tables | tr '
' ' ')" >> "$OUT.tables"
"""


def test_all_netns_traces_every_named_namespace_and_this_one(tmp_path):
    """In a mount namespace of the test's own, /run/netns holds only the test's two namespaces:
    --all-netns never reaches the machine's other namespaces (or its own firewall)."""
    out = tmp_path / "answer.json"
    env = dict(os.environ, REPO=str(REPO), PYTHON=sys.executable, OUT=str(out))
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", ALL_NETNS_SCRIPT],
                            capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    assert document["namespaces"] == ["a", "b"]  # nftrace runs in a: it is named, and traced once
    [packet] = document["packets"]
    assert packet["verdict"] == "drop" and packet["decided_by"]["netns"] == "b"
    assert [part["netns"] for part in packet["namespaces"]] == ["a", "b"]
    assert (tmp_path / "answer.json.tables").read_text().splitlines() == ["a: ", "b: table inet host "]
