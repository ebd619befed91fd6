"""Differential tests against the kernel: for every flow of every expectation file (the
scenarios in rules/ and the files in tests/data/), a dry run with no traffic at all and a
live trace of a real packet in the lab give the same verdict, the same deciding rule (its
handle in the router included), and the same path through hooks and chains.

The lab's router loads the file's ruleset; the live packet comes from the flow's sender
(client, server, or the router itself) with the flow's source address. The dry run copies
the router into a sandbox and must leave the router's ruleset and counters as they were.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest

from conftest import REPO, lab_topology, nftrace
from nftrace.lab.expectations import load_expectations
from nftrace.lab.topology import in_netns
from nftrace.dryrun.sandbox import load_ruleset_file, read_candidate

pytestmark = pytest.mark.kernel

LIVE_SENDER = str(REPO / "tests" / "live_sender.py")
LIVE_PROTOCOLS = ("tcp", "udp", "icmp", "icmpv6")


def expectation_files() -> list[Path]:
    """tests/data/ always; rules/ once the lab scenarios are there (none is no failure)."""
    return sorted((REPO / "tests" / "data").glob("*.expect.toml")) + sorted((REPO / "rules").glob("*.expect.toml"))


def cases() -> list:
    """Every flow the lab can send live (tests/live_sender.py has no SCTP)."""
    found = []
    for path in expectation_files():
        for index, flow in enumerate(load_expectations(path).flows):
            if flow.flow.proto in LIVE_PROTOCOLS:
                found.append(pytest.param(path, index, id=f"{path.parent.name}/{path.name}:{flow.name}"))
    return found


class Labs:
    """One lab at a time, for the expectation file whose flows are being run."""

    def __init__(self):
        self.path = None
        self.topology = None
        self._stack = contextlib.ExitStack()

    def get(self, path: Path):
        if path != self.path:
            self.close()
            file = load_expectations(path)
            self.topology, self.path = self._stack.enter_context(lab_topology("dif")), path
            load_ruleset_file(self.topology.router, read_candidate(file.ruleset, file.ruleset_kind))
            self._add_source_addresses(file)
        return self.topology

    def _add_source_addresses(self, file) -> None:
        """Each flow's source address on its sender, so that a real packet can carry it."""
        topology = self.topology
        for flow in file.flows:
            namespace = getattr(topology, flow.sender)
            address = flow.flow.src.network_address
            present = in_netns(namespace, ["ip", "-j", "address", "show"]).stdout
            if f'"{address}"' in present:
                continue
            device = "eth0" if flow.sender != "router" else "lo"
            length = 32 if address.version == 4 else 128
            in_netns(namespace, ["ip", "address", "add", f"{address}/{length}", "dev", device,
                                 *(["nodad"] if address.version == 6 else [])])

    def close(self) -> None:
        self._stack.close()
        self.topology = self.path = None


@pytest.fixture(scope="module")
def labs():
    holder = Labs()
    try:
        yield holder
    finally:
        holder.close()


def flow_args(flow) -> list[str]:
    args = ["--from", str(flow.src.network_address), "--to", str(flow.dst.network_address)]
    for option, value in (("--proto", flow.proto), ("--sport", flow.sport), ("--dport", flow.dport),
                          ("--iif", flow.iif), ("--oif", flow.oif)):
        if value is not None:
            args += [option, str(value)]
    return args


def live_command(topology, expectation) -> list[str]:
    flow = expectation.flow
    argv = [sys.executable, LIVE_SENDER, str(flow.src.network_address), str(flow.dst.network_address), flow.proto,
            str(flow.dport or 0), str(flow.sport or 0)]
    if expectation.sender == "router":
        return argv  # nftrace runs inside the router, and so does its traffic command
    return ["ip", "netns", "exec", getattr(topology, expectation.sender), *argv]


def essentials(result) -> dict:
    """What must agree: the packet's verdict, its deciding rule, its path. Each side must have
    seen the packet: two runs that both saw nothing agree on nothing."""
    assert result.returncode == 0, result.stderr
    assert len(result.packets) == 1, result.stdout
    packet = result.packets[0]
    decided = packet["decided_by"] or {}
    return {
        "verdict": packet["verdict"],
        "hooks": packet["hooks"],
        "decided_by": {key: decided.get(key) for key in ("hook", "family", "table", "chain", "type", "handle",
                                                           "text", "verdict")},
        "steps": [(s["hook"], s["family"], s["table"], s["chain"], s["type"], s["handle"], s["verdict"], s["target"])
                  for s in packet["steps"]],
        "nat": [(n["hook"], n["field"], _nat_target(n)) for n in packet["nat"]],
    }


def _nat_target(change: dict) -> str:
    """Where NAT sent the packet; an ephemeral source port that NAT kept differs between any two
    packets, so it reads as "kept"."""
    before_port, after = change["from"].rpartition(":")[2], change["to"]
    address, _, port = after.rpartition(":")
    return f"{address}:kept" if port == before_port else after


@pytest.mark.parametrize("path,index", cases())
def test_dry_run_and_live_trace_agree(labs, path, index):
    expectation = load_expectations(path).flows[index]
    topology = labs.get(path)
    args = flow_args(expectation.flow)
    live = nftrace("--netns", topology.router, "why", *args, "--count", "1", "--timeout", "8", "--json", "--",
                   *live_command(topology, expectation))
    before = in_netns(topology.router, ["nft", "-a", "list", "ruleset"]).stdout
    dry = nftrace("--netns", topology.router, "why", *args, "--dry-run", "--json")
    assert in_netns(topology.router, ["nft", "-a", "list", "ruleset"]).stdout == before
    assert dry.json["mode"] == "dry-run" and live.json["mode"] == "live"
    assert essentials(dry) == essentials(live)
