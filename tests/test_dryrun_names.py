"""A dry run speaks the target's names: rule handles and the kernel's names of anonymous chains.

The kernel names an anonymous chain (`jump { ... }`) `__chainN` with one counter for the whole
machine, so the sandbox's copy of a ruleset always has other numbers than the target. The
answer must name the target's chain, the one `nft` and the live trace name, never the copy's.
"""

from __future__ import annotations

import pytest

from conftest import load_ruleset, nftrace, traffic
from nftrace.dryrun.names import TargetNames
from nftrace.kernel.anonchains import KernelChain, anonymous_positions, chains_with_blocks
from nftrace.trace.paths import PacketPath, Step

# Anonymous chains in two chains, the first one a verdict `log ... drop` block as in nftables'
# own sample ruleset, and a named chain between them so that handles interleave.
RULESET = """
table inet filter {
    set admins { type ipv4_addr; elements = { 10.77.9.9 } }
    chain forward {
        type filter hook forward priority filter; policy drop;
        tcp dport 22 jump { ip saddr @admins accept; log prefix "ssh refused: "; drop; }
        tcp dport 80 jump { ip saddr 10.77.9.0/24 accept; counter; }
        jump web
    }
    chain web {
        tcp dport 443 jump { counter; accept; }
    }
}
"""
SSH = ("--from", "10.77.1.2", "--to", "10.77.2.2", "--proto", "tcp", "--dport", "22")
HTTP = ("--from", "10.77.1.2", "--to", "10.77.2.2", "--proto", "tcp", "--dport", "80")
HTTPS = ("--from", "10.77.1.2", "--to", "10.77.2.2", "--proto", "tcp", "--dport", "443")


# -- pure ---------------------------------------------------------------------------------------

def test_only_chains_that_open_anonymous_blocks_are_asked_for():
    listing = ("table inet filter { # handle 1\n\tchain forward { # handle 1\n\t\ttcp dport 22 jump {\n"
               "\t\t\tdrop\n\t\t} # handle 3\n\t}\n\tchain other { # handle 4\n\t\taccept # handle 5\n\t}\n}\n")
    assert chains_with_blocks(listing) == [("inet", "filter", "forward")]


def test_an_anonymous_chain_is_placed_by_the_rules_that_lead_to_it():
    chains = [KernelChain("inet", "f", "fwd", [7, 11], {11: "__chain4"}), KernelChain("inet", "f", "__chain4", [9, 10])]
    assert anonymous_positions(chains) == {("inet", "f", "__chain4"): ("inet", "f", "fwd", (2,))}


def test_sandbox_names_become_the_targets_by_place_in_the_ruleset():
    target = [KernelChain("inet", "f", "fwd", [7, 11], {7: "__chain3", 11: "__chain4"}),
              KernelChain("inet", "f", "__chain3", [4, 5, 6]), KernelChain("inet", "f", "__chain4", [9, 10])]
    sandbox = [KernelChain("inet", "f", "fwd", [7, 11], {7: "__chain90", 11: "__chain91"}),
               KernelChain("inet", "f", "__chain90", [4, 5, 6]), KernelChain("inet", "f", "__chain91", [20, 21])]
    names = TargetNames("", target, "", sandbox)
    jump = Step("forward", "inet", "f", "fwd", "rule", 11, 2, "tcp dport 80 jump { ... }", "jump", target="__chain91")
    inner = Step("forward", "inet", "f", "__chain91", "rule", 21, None, None, "drop", depth=1)
    path = PacketPath(1, steps=[jump, inner], decided_by=inner)
    names.translate(path)
    translated_jump, translated_inner = path.steps
    assert (translated_jump.target, translated_inner.chain, translated_inner.handle,
            translated_inner.rule_number) == ("__chain4", "__chain4", 10, 2)
    assert path.decided_by is translated_inner
    assert path.decided_by.location().startswith("inet f __chain4 rule handle 10")


def test_translating_replaces_steps_and_leaves_the_ones_other_paths_share_alone():
    """Paths made from one shape share their steps (trace/shapes.py)."""
    chains = [KernelChain("inet", "f", "fwd", [7], {7: "__chain3"}), KernelChain("inet", "f", "__chain3", [4])]
    sandbox = [KernelChain("inet", "f", "fwd", [7], {7: "__chain90"}), KernelChain("inet", "f", "__chain90", [40])]
    names = TargetNames("", chains, "", sandbox)
    inner = Step("forward", "inet", "f", "__chain90", "rule", 40, None, None, "drop", depth=1)
    first, second = PacketPath(1, steps=[inner], decided_by=inner), PacketPath(2, steps=[inner], decided_by=inner)
    names.translate(first)
    names.translate(second)
    assert inner.chain == "__chain90" and inner.handle == 40
    assert [(path.steps[0].chain, path.steps[0].handle) for path in (first, second)] == [("__chain3", 4)] * 2


# -- against the kernel -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def router():
    from conftest import unique_name
    from nftrace.lab.topology import Topology

    topology = Topology(unique_name("names"))
    topology.up()
    try:
        load_ruleset(topology.router, RULESET)
        topology.start_listeners([22, 80, 443], [], 120)
        yield topology
    finally:
        topology.down()


def live(topology, flow, port):
    result = nftrace("--netns", topology.router, "why", *flow, "--count", "1", "--timeout", "10", "--json", "--",
                     *traffic(topology.client, "tcp", "10.77.2.2", str(port), "--timeout", "1"))
    assert result.returncode == 0, result.stderr
    return result.packets[0]


def dry(topology, flow):
    result = nftrace("--netns", topology.router, "why", *flow, "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    return result.packets[0]


def places(packet):
    return [(s["chain"], s["handle"], s["rule_number"], s["target"], s["verdict"]) for s in packet["steps"]]


@pytest.mark.kernel
@pytest.mark.parametrize("flow, port", [(SSH, 22), (HTTP, 80), (HTTPS, 443)], ids=["drop-in-block", "return", "nested-jump"])
def test_dry_run_names_the_chains_and_handles_the_live_trace_names(router, flow, port):
    expected, got = live(router, flow, port), dry(router, flow)
    assert places(got) == places(expected)
    assert any(s["chain"].startswith("__chain") for s in got["steps"])
    assert got["decided_by"]["chain"] == expected["decided_by"]["chain"]


@pytest.mark.kernel
def test_the_rule_that_dropped_it_in_an_anonymous_chain_has_its_text(router):
    packet = dry(router, SSH)
    decided = packet["decided_by"]
    assert (decided["chain"].startswith("__chain"), decided["text"], decided["rule_number"]) == (True, "drop", 3)
    jump = packet["steps"][0]
    assert jump["text"] == 'tcp dport 22 jump { ip saddr @admins accept; log prefix "ssh refused: "; drop; }'
