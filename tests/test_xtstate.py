"""The legacy x_tables tables as the kernel hands them over (nftrace.iptables.xtstate), and the
timestamps of TRACE lines: what lets nftrace read each TRACE line against the rules it met
(nftrace.iptables.rulehistory). Each check runs in a namespace of its own, in a process of
its own there (/proc/net follows a process's main thread)."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO
from nftrace.lab.topology import in_netns

pytestmark = pytest.mark.kernel

RULES = """*filter
:INPUT ACCEPT [0:0]
-A INPUT -p udp -m udp --dport 5001 -j DROP
-A INPUT -p udp -m udp --dport 5000 -j ACCEPT
COMMIT
"""

FINGERPRINTS = f"""
import json, socket, subprocess, sys
sys.path.insert(0, {str(REPO)!r})
from nftrace.iptables.xtstate import TableReader

def iptables(*args):
    subprocess.run(["iptables-legacy", *args], check=True)

seen = {{}}
with TableReader("ip") as reader, TableReader("ip6") as reader6:
    seen["start"] = reader.fingerprint().hex()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(3):
            sock.sendto(b"x", ("127.0.0.1", 5000))
    seen["counted"] = subprocess.run(["iptables-legacy-save", "-c"], capture_output=True, text=True).stdout
    seen["after traffic"] = reader.fingerprint().hex()
    iptables("-I", "INPUT", "1", "-p", "tcp", "--dport", "22", "-j", "ACCEPT")
    seen["inserted"] = reader.fingerprint().hex()
    iptables("-D", "INPUT", "1")
    seen["deleted again"] = reader.fingerprint().hex()
    iptables("-R", "INPUT", "2", "-p", "udp", "--dport", "5002", "-j", "ACCEPT")
    seen["replaced"] = reader.fingerprint().hex()
    iptables("-P", "INPUT", "DROP")
    seen["policy"] = reader.fingerprint().hex()
    seen["ip6 empty"] = reader6.fingerprint().hex()
    seen["ip6 again"] = reader6.fingerprint().hex()
print(json.dumps(seen))
"""


def test_a_fingerprint_changes_with_the_rules_and_only_with_them(netns):
    ns = netns("xt")
    in_netns(ns, ["iptables-legacy-restore"], input=RULES)
    seen = json.loads(in_netns(ns, [sys.executable, "-c", FINGERPRINTS]).stdout)
    assert "[3:" in seen.pop("counted"), "the datagrams did not pass the rules"
    assert seen["after traffic"] == seen["start"] == seen["deleted again"]
    changed = [seen[name] for name in ("start", "inserted", "replaced", "policy")]
    assert len(set(changed)) == len(changed)
    assert seen["ip6 empty"] == seen["ip6 again"]
    # Reading creates no table: the namespace still has no legacy IPv6 table.
    assert in_netns(ns, ["cat", "/proc/net/ip6_tables_names"]).stdout == ""


LINES = f"""
import json, select, socket, subprocess, sys, time
sys.path.insert(0, {str(REPO)!r})
from nftrace.iptables.nflog import LegacyTraceEvent, NflogListener

lines = []
with NflogListener(("ip",)) as listener:
    subprocess.run(["iptables-legacy", "-t", "raw", "-A", "OUTPUT", "-p", "udp", "--dport", "5000", "-j", "TRACE"],
                   check=True)
    sent = time.time()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"x", ("127.0.0.1", 5000))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(line.hook == "input" for line in lines):
        select.select([listener], [], [], 0.5)
        lines += [item for item in listener.read() if isinstance(item, LegacyTraceEvent)]
    read = time.time()
print(json.dumps({{"sent": sent, "read": read, "lines": [(line.hook, line.timestamp) for line in lines]}}))
"""


def test_trace_lines_carry_when_their_packet_arrived_at_prerouting_input_and_forward(netns):
    """rulehistory.py relies on it: NFULA_TIMESTAMP, never later than the line."""
    ns = netns("ts")
    in_netns(ns, ["iptables-legacy-restore"], input=RULES)
    seen = json.loads(in_netns(ns, [sys.executable, "-c", LINES]).stdout)
    hooks = {hook for hook, _ in seen["lines"]}
    assert {"output", "prerouting", "input"} <= hooks, seen
    for hook, stamp in seen["lines"]:
        if hook in ("prerouting", "input", "forward"):
            assert seen["sent"] - 0.01 <= stamp <= seen["read"], (hook, stamp, seen)
        else:
            assert stamp is None, (hook, stamp)
