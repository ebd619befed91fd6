"""Property: for random small rulesets (chains, jumps, gotos, returns, named sets, verdict
maps, policies) and random flows, a dry run and a live trace of a real packet agree on the
verdict, the deciding rule and the path.

Bounded on purpose: a few dozen examples in one reusable lab, each loaded into the router
with `flush ruleset` first.
"""

from __future__ import annotations

import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO, lab_topology, nftrace
from nftrace.lab.topology import CLIENT_V4, ROUTER_CLIENT_V4, SERVER_V4, in_netns
from test_dryrun_differential import essentials

pytestmark = pytest.mark.kernel

PORTS = (22, 80, 443, 5353)
LIVE_SENDER = str(REPO / "tests" / "live_sender.py")


@st.composite
def rulesets(draw) -> str:
    """A table with two base chains and up to three regular chains; jumps only go to chains
    further down the list, so that there is never a loop."""
    regular = [f"c{index}" for index in range(draw(st.integers(0, 3)))]
    ports = draw(st.lists(st.sampled_from(PORTS), min_size=1, max_size=3, unique=True))

    def matches():
        return st.sampled_from([
            "", "tcp dport 22 ", "tcp dport 80 ", "udp dport 5353 ", "tcp dport @ports ", "meta l4proto udp ",
            f"ip saddr {CLIENT_V4} ", 'iifname "r-client" ', "ip daddr 10.77.2.0/24 ", "th dport != 443 ",
        ])

    def verdicts(position: int, base: bool):
        later = regular[position + 1:] if not base else regular
        choices = ["accept", "drop", "counter", "reject"]
        choices += [f"jump {name}" for name in later] + [f"goto {name}" for name in later]
        if not base:
            choices.append("return")
        return st.sampled_from(choices)

    def rules(position: int, base: bool) -> list[str]:
        lines = []
        for _ in range(draw(st.integers(0 if not base else 1, 4))):
            if draw(st.integers(0, 5)) == 0:
                later = regular[position + 1:] if not base else regular
                targets = ["accept", "drop"] + [f"jump {name}" for name in later]
                entries = ", ".join(f"{port} : {draw(st.sampled_from(targets))}" for port in PORTS[:3])
                lines.append(f"tcp dport vmap {{ {entries} }}")
            else:
                lines.append(draw(matches()) + draw(verdicts(position, base)))
        return lines

    body = [f"    set ports {{ type inet_service; elements = {{ {', '.join(map(str, ports))} }} }}"]
    for position, name in enumerate(regular):
        body.append(f"    chain {name} {{\n" + "".join(f"        {line}\n" for line in rules(position, False)) + "    }")
    for hook in ("input", "forward"):
        policy = draw(st.sampled_from(["accept", "drop"]))
        lines = "".join(f"        {line}\n" for line in rules(-1, True))
        body.append(f"    chain {hook} {{\n        type filter hook {hook} priority filter; policy {policy};\n{lines}    }}")
    return "flush ruleset\ntable inet h {\n" + "\n".join(body) + "\n}\n"


flows = st.tuples(st.sampled_from(["tcp", "udp"]), st.sampled_from(PORTS), st.sampled_from([ROUTER_CLIENT_V4, SERVER_V4]))


@pytest.fixture(scope="module")
def lab():
    with lab_topology("prop") as topology:
        yield topology


@settings(max_examples=20, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ruleset=rulesets(), flow_list=st.lists(flows, min_size=1, max_size=2, unique=True))
def test_dry_run_agrees_with_the_kernel_on_random_rulesets(lab, ruleset, flow_list):
    in_netns(lab.router, ["nft", "-f", "-"], input=ruleset)
    for proto, port, destination in flow_list:
        args = ["--from", CLIENT_V4, "--to", destination, "--proto", proto, "--dport", str(port)]
        sender = ["ip", "netns", "exec", lab.client, sys.executable, LIVE_SENDER, CLIENT_V4, destination, proto, str(port)]
        live = nftrace("--netns", lab.router, "why", *args, "--count", "1", "--timeout", "8", "--json", "--", *sender)
        dry = nftrace("--netns", lab.router, "why", *args, "--dry-run", "--json")
        assert essentials(dry) == essentials(live), ruleset
