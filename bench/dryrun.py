#!/usr/bin/env python3
"""Benchmark: how long `nftrace why --dry-run` takes for rulesets of 100, 1,000 and 10,000 rules.

Run as root from the repository: `python bench/dryrun.py [--runs N] [--sizes 100,1000,10000]`.
A lab (client, router, server namespaces) is built; the router gets a ruleset of N rules whose
last one accepts the flow, so that the traced packet meets every rule; the lab is removed at
the end. It prints, per size, the wall time of the whole command (what a user waits for) and,
from an in-process run, the time of each phase: reading the router's state, building the
sandbox (copying and loading the ruleset), and tracing the packet. Target: under 1 s for
1,000 rules. Figures only, no pass/fail.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nftrace.dryrun.session import DryRun, DryRunRequest  # noqa: E402
from nftrace.flow import parse_flow  # noqa: E402
from nftrace.lab.topology import CLIENT_V4, ROUTER_CLIENT_V4, Topology, in_netns  # noqa: E402
from nftrace.dryrun.netstate import read_network_state  # noqa: E402
from nftrace.kernel.nft import NftContext  # noqa: E402
from nftrace.kernel.nsexec import call_in_namespace  # noqa: E402
from nftrace.trace.report import TraceReport  # noqa: E402
from nftrace.trace.ruleset import RulesetSnapshot  # noqa: E402
from nftrace.dryrun.sandbox import Sandbox  # noqa: E402


def ruleset(size: int) -> str:
    """N rules in one input chain (with a jump into a second chain halfway), the last accepting ssh."""
    half = size // 2
    first = "".join(f"        ip saddr 198.51.{(i // 250) % 250}.{i % 250 + 1} tcp dport {1024 + i % 60000} drop\n"
                    for i in range(half))
    second = "".join(f"        ip saddr 203.0.{(i // 250) % 250}.{i % 250 + 1} udp dport {1024 + i % 60000} drop\n"
                     for i in range(size - half - 2))
    return ("flush ruleset\ntable inet fw {\n"
            "    set blocked { type ipv4_addr; elements = { 192.0.2.1, 192.0.2.2 } }\n"
            f"    chain more {{\n{second}    }}\n"
            "    chain input {\n        type filter hook input priority filter; policy drop;\n"
            f"{first}        jump more\n        tcp dport 22 accept\n    }}\n}}\n")


def cli_seconds(router: str) -> float:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "nftrace", "--netns", router, "why", "--from", CLIENT_V4, "--to",
                             ROUTER_CLIENT_V4, "--proto", "tcp", "--dport", "22", "--dry-run", "--json"],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    elapsed = time.monotonic() - started
    if result.returncode != 0 or '"verdict": "accept"' not in result.stdout:
        raise SystemExit(f"dry run failed: {result.stderr.strip() or result.stdout[:300]}")
    return elapsed


def phases(router: str) -> dict:
    times = {}
    started = time.monotonic()
    state = read_network_state(router)
    times["read"] = time.monotonic() - started
    started = time.monotonic()
    box = Sandbox(state)
    box.build()
    times["build"] = time.monotonic() - started
    box.close()
    dry = DryRun(DryRunRequest(router))
    dry.open()
    try:
        flow = parse_flow(CLIENT_V4, ROUTER_CLIENT_V4, "tcp", None, 22)
        started = time.monotonic()
        seen = dry.trace(flow, TraceReport(flow=flow), lambda path: None)
        times["trace"] = time.monotonic() - started
        assert seen == 1
    finally:
        dry.close()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="command runs per size (default 5)")
    parser.add_argument("--sizes", default="100,1000,10000", help="comma-separated rule counts")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/dryrun.py: run as root (it builds network namespaces)", file=sys.stderr)
        return 2
    topology = Topology(f"bdry{os.getpid()}")
    topology.up()
    try:
        print(f"nftrace why --dry-run, {args.runs} runs per size, {os.cpu_count()} CPUs")
        print(f"{'rules':>7}  {'median s':>8}  {'min s':>6}  {'max s':>6}  {'read s':>6}  {'build s':>7}  {'trace s':>7}")
        for size in (int(s) for s in args.sizes.split(",")):
            in_netns(topology.router, ["nft", "-f", "-"], input=ruleset(size), timeout=300)
            loaded = len(call_in_namespace(topology.router, lambda: RulesetSnapshot.take(NftContext())).rules)
            times = [cli_seconds(topology.router) for _ in range(args.runs)]
            phase = phases(topology.router)
            print(f"{loaded:>7}  {statistics.median(times):>8.3f}  {min(times):>6.3f}  {max(times):>6.3f}  "
                  f"{phase['read']:>6.3f}  {phase['build']:>7.3f}  {phase['trace']:>7.3f}", flush=True)
    finally:
        topology.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
