"""The fixed costs around the event path: start-up, CLI import, ruleset snapshots, decoding.

Each function returns plain figures (seconds, rates); run.py prints them.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

from bench.probes import CommitWatcher, inside_netns
from nftrace.lab.topology import in_netns, run
from nftrace.kernel.system import enter_namespace


@dataclass
class StartupResult:
    nftrace_seconds: list  # start of `nftrace why` -> its trace rules committed
    nft_seconds: list  # start of a bare `nft add table` -> the table committed


def startup(netns: str, runs: int) -> StartupResult:
    """Time from process start to the kernel announcing the commit, nftrace vs a bare nft."""
    watcher = CommitWatcher(netns)
    nftrace_times, nft_times = [], []
    try:
        for _ in range(runs):
            started = time.monotonic()
            process = subprocess.Popen([sys.executable, "-m", "nftrace", "--netns", netns, "why", "--from", "10.77.1.2",
                                        "--to", "10.77.2.2", "--timeout", "0.2", "--json"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
            installed = watcher.rules_installed("nftrace_", 15)
            process.wait(30)
            if installed is not None:
                nftrace_times.append(installed - started)
            watcher.drain(0.3)  # nftrace's removal of its table
            started = time.monotonic()
            process = subprocess.Popen(["nft", "add", "table", "inet", "nftbench_probe"],
                                       preexec_fn=lambda: enter_namespace(netns), stdin=subprocess.DEVNULL)
            added = watcher.table_added("nftbench_probe", 15)
            process.wait(30)
            if added is not None:
                nft_times.append(added - started)
            in_netns(netns, ["nft", "delete", "table", "inet", "nftbench_probe"])
            watcher.drain(0.1)
    finally:
        watcher.close()
    return StartupResult(nftrace_times, nft_times)


def _wall(argv: list, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def import_times(runs: int = 5) -> dict:
    """Median wall time of a Python that only imports, minus one that does nothing."""
    bare = _wall([sys.executable, "-c", "pass"], runs)
    cli = _wall([sys.executable, "-c", "import nftrace.cli"], runs)
    why = _wall([sys.executable, "-c", "import nftrace.cli, nftrace.trace.session, nftrace.trace.render, nftrace.trace.report"], runs)
    version = _wall([sys.executable, "-m", "nftrace", "--version"], runs)
    return {"python": bare, "import nftrace.cli": cli - bare, "import what `why` loads": why - bare,
            "nftrace --version": version}


def generated_ruleset(rules: int, anonymous_sets: bool = False, per_chain: int = 1000) -> str:
    """A ruleset of `rules` rules in chains of `per_chain`, jumped to from two base chains.

    The rules mix the shapes real rulesets have (addresses, ports, interfaces, marks,
    conntrack states, counters, reject); no two are the same. With `anonymous_sets`, one
    rule in five matches an anonymous set (`tcp dport { 8026, 8027 }`): nft 1.0.6 fetches
    every set's elements with a request of its own to list a ruleset, which makes the
    listing several times slower.
    """
    lines = ["table inet big {"]
    chains = (rules + per_chain - 1) // per_chain
    for chain in range(chains):
        lines.append(f"  chain c{chain} {{")
        for n in range(chain * per_chain, min(rules, (chain + 1) * per_chain)):
            port = 1024 + n % 60000
            shape = n % 5
            if shape == 0:
                lines.append(f"    ip saddr 10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255} tcp dport {port} accept")
            elif shape == 1:
                lines.append(f"    ip6 daddr fd00::{n:x} udp dport {port} counter drop")
            elif shape == 2 and anonymous_sets:
                lines.append(f"    iifname \"veth{n % 100}\" tcp dport {{ {port}, {port + 1} }} accept")
            elif shape == 2:
                lines.append(f"    iifname \"veth{n % 100}\" tcp dport {port} accept")
            elif shape == 3:
                lines.append(f"    meta mark 0x{n:x} ct state established,related accept")
            else:
                lines.append(f"    ip daddr 192.168.{(n >> 8) & 255}.{n & 255} meta l4proto udp counter reject")
        lines.append("  }")
    for hook in ("input", "forward"):
        lines.append(f"  chain {hook} {{ type filter hook {hook} priority filter; policy accept;")
        for chain in range(chains):
            lines.append(f"    meta mark and 0xff == {chain % 256} jump c{chain}")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


@dataclass
class SnapshotResult:
    rules: int
    anonymous_sets: bool
    load_seconds: float  # nft -f of the generated ruleset (for scale; not nftrace's)
    listing_seconds: float  # libnftables: `list ruleset` (nft's own work)
    parse_seconds: float  # nftrace: parsing the listing into rule texts and chain facts
    lookup_ns: float  # one rule-text lookup by (family, table, chain, handle)
    rules_installed_after: Optional[float]  # nftrace start -> trace rules in, on this ruleset

    @property
    def snapshot_seconds(self) -> float:
        return self.listing_seconds + self.parse_seconds


def snapshot_cost(netns: str, rules: int, anonymous_sets: bool = False, runs: int = 3) -> SnapshotResult:
    """Load a generated ruleset into `netns` and time RulesetSnapshot.take's two halves."""
    from nftrace.kernel.nft import NftContext
    from nftrace.trace.ruleset import RulesetSnapshot

    text = generated_ruleset(rules, anonymous_sets)
    started = time.perf_counter()
    run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=text, timeout=900)
    load_seconds = time.perf_counter() - started
    listings, parses = [], []
    with inside_netns(netns):
        nft = NftContext()
        for _ in range(runs):
            started = time.perf_counter()
            listing = nft.list_ruleset()
            listed = time.perf_counter()
            snapshot = RulesetSnapshot(listing)
            listings.append(listed - started)
            parses.append(time.perf_counter() - listed)
            if listed - started > 2:
                break  # slow enough that one run says it
        del nft
    keys = list(snapshot.rules)
    started = time.perf_counter()
    for family, table, chain, handle in keys:
        snapshot.rule(family, table, chain, handle)
    lookup_ns = (time.perf_counter() - started) / max(1, len(keys)) * 1e9
    return SnapshotResult(len(keys), anonymous_sets, load_seconds, statistics.median(listings),
                          statistics.median(parses), lookup_ns, startup_on(netns))


def startup_on(netns: str) -> Optional[float]:
    result = startup(netns, 1)
    return result.nftrace_seconds[0] if result.nftrace_seconds else None


@dataclass
class DecodeResult:
    events: int
    pyroute2_per_second: float
    compact_per_second: float
    pipeline_per_second: float  # decode + path building + JSON, per event, as the live path does them
    pipeline_packets_per_second: float


def _rate(function: Callable[[], int], events: int) -> tuple[float, int]:
    started = time.perf_counter()
    produced = function()
    return events / (time.perf_counter() - started), produced


def decode_cost(datagrams: list, events: int, snapshot=None) -> DecodeResult:
    """Events per second in a tight loop over recorded datagrams (repeated to `events`)."""
    from nftrace.trace.jsonstream import JsonStream
    from nftrace.trace.events import decode_trace_message, decode_trace_message_pyroute2
    from nftrace.flow import parse_flow
    from nftrace.trace.paths import PathBuilder
    from nftrace.trace.report import TraceReport
    from nftrace.trace.ruleset import RulesetSnapshot
    from nftrace.trace.shapes import PathShapes

    corpus = (datagrams * (events // len(datagrams) + 1))[:events]
    reference = corpus[: max(len(datagrams), events // 10)]

    def pyroute2() -> int:
        for datagram in reference:
            decode_trace_message_pyroute2(datagram)
        return len(reference)

    def compact() -> int:
        for datagram in corpus:
            decode_trace_message(datagram)
        return len(corpus)

    def pipeline() -> int:
        flow = parse_flow("10.77.1.2", "10.77.2.2", "udp", None, None, None, None)
        with open(os.devnull, "w") as sink:
            stream = JsonStream(sink, TraceReport(flow=flow))
            builder = PathBuilder(snapshot or RulesetSnapshot(), keep=lambda path: True, shapes=PathShapes())
            clock = time.monotonic
            for datagram in corpus:
                for path in builder.feed(decode_trace_message(datagram), clock()):
                    stream.packet(path)
            for path in builder.flush():
                stream.packet(path)
            stream.finish()
            return stream.count

    pyroute2_rate, _ = _rate(pyroute2, len(reference))
    compact_rate, _ = _rate(compact, len(corpus))
    started = time.perf_counter()
    packets = pipeline()
    seconds = time.perf_counter() - started
    return DecodeResult(len(corpus), pyroute2_rate, compact_rate, len(corpus) / seconds, packets / seconds)
