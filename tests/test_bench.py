"""The benchmark keeps working: a tiny run of bench/run.py end to end, and its pure parts.

The smoke run floods 2,000 packets and snapshots a 1,000-rule ruleset; it checks what the
run found (every packet's path rebuilt by nftrace, nothing lost silently, nothing left
behind), never how fast: figures are for the benchmark to print, not for tests to assert.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import nftmonitor
from bench.costs import generated_ruleset
from conftest import REPO

PACKET_LINE = ('trace id {id} inet nftrace_12_abcdef mark_prerouting packet: iif "r-client" ip saddr 10.77.1.2 '
               'ip daddr 10.77.2.2 ip id {ipid} udp sport 40000 udp dport 5000 \n')
PATH_LINES = [
    "trace id {id} inet nftrace_12_abcdef mark_prerouting unknown rule handle 2 (verdict continue)\n",
    "trace id {id} inet nftrace_12_abcdef mark_prerouting policy accept \n",
    "trace id {id} inet fw forward rule udp dport 5000 counter packets {n} bytes {b} accept (verdict accept)\n",
    "trace id {id} inet nftrace_12_abcdef obs_postrouting policy accept \n",
]


def monitor_lines(trace_id: str, ipid: int, upto: int = len(PATH_LINES)) -> list[str]:
    lines = [PACKET_LINE.format(id=trace_id, ipid=ipid)]
    return lines + [line.format(id=trace_id, n=ipid, b=ipid * 35) for line in PATH_LINES[:upto]]


def test_nft_monitor_packets_are_told_apart_when_a_trace_id_is_reused():
    output = nftmonitor.parse(monitor_lines("aa", 1) + monitor_lines("aa", 2))
    assert len(output.paths) == 2
    assert output.paths[0] == output.paths[1]


def test_nft_monitor_path_missing_events_is_not_complete():
    complete = nftmonitor.parse(monitor_lines("aa", 1))
    reference = nftmonitor.reference_path(complete)
    output = nftmonitor.parse(monitor_lines("bb", 2, upto=2) + monitor_lines("cc", 3))
    assert nftmonitor.complete_paths(output, reference) == 1


def test_nft_monitor_loss_notices_are_counted_without_a_number():
    output = nftmonitor.parse(monitor_lines("aa", 1) + ["# ERROR: We lost some netlink events!\n"] * 2)
    assert output.loss_notices == 2


def test_generated_ruleset_has_the_rules_asked_for():
    text = generated_ruleset(2500)
    assert sum(1 for line in text.splitlines() if line.startswith("    ") and "jump" not in line) == 2500
    assert "{ " not in "".join(line for line in text.splitlines() if "dport" in line)
    assert "tcp dport { " in generated_ruleset(10, anonymous_sets=True)


@pytest.mark.kernel
def test_benchmark_runs_end_to_end_on_a_small_flood(tmp_path):
    figures = tmp_path / "figures.json"
    before = set(namespaces())
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--packets", "2000", "--rulesets", "1000",
         "--no-anonymous-sets", "--startup-runs", "1", "--decode-events", "5000", "--json", str(figures)],
        capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout
    for row in ("complete packet paths rebuilt", "events lost, as reported by each", "CPU seconds", "peak memory",
                "trace rules installed", "snapshot", "events/s", "Targets"):
        assert row in table, table
    data = json.loads(figures.read_text())
    flood = data["flood"]
    assert flood["sent"] == 2000
    assert flood["nftrace"]["complete"] == 2000
    assert flood["nftrace"]["silent_loss"] is False
    assert flood["monitor"]["complete"] > 0  # nft monitor's output was read
    assert data["default_rate"]["nftrace"]["kernel_drops"] == 0
    assert data["paced"]["nftrace"]["complete"] == data["paced"]["sent"] == 2000
    assert "Paced flood" in table
    assert data["snapshots"][0]["rules"] >= 1000
    for run in ("nftrace", "capped"):  # its own receive buffer, then 16 MiB
        drops = data["drops"][run]
        assert drops["drops_reported"] == drops["rule_counter"] == 200  # one in ten of 2,000, every one reported
    assert data["drops"]["admin"]["rule_counter"] == 200
    assert "drops reported" in table
    assert [name for name in namespaces() if name not in before and name.startswith("nftbench")] == []


def namespaces() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listing.splitlines() if line.strip()]
