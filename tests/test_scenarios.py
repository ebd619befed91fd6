"""Every flow of every rules/ scenario, against the kernel: the lab runs the scenario on its
router, the flow's packet is sent from its sender, and nftrace's answer must be the one the
scenario's .expect.toml states (verdict, deciding chain, rule, NAT).

The kernel decides, the file states it. One lab per scenario, flows traced one after the
other with --count 1. Flows the file marks `xfail` state the right answer for a case nftrace
cannot give yet: they run, and must fail (strict: once nftrace gives that answer, the xfail
must go from the file, or the test fails).
"""

from __future__ import annotations

from typing import Optional

import pytest

from conftest import nftrace, ruleset_state, unique_name
from nftrace.lab.lab import Lab, Scenario, list_scenarios, why_arguments

pytestmark = pytest.mark.kernel

SCENARIOS = list_scenarios()
CASES = [pytest.param(scenario, flow, id=f"{scenario.name}: {flow.name}") for scenario in SCENARIOS for flow in scenario.flows]


class OneLabAtATime:
    """The lab of the scenario being tested; the next scenario's replaces it, the last is removed.

    Cases come grouped by scenario (their order in CASES), so each scenario's lab is built once.
    """

    def __init__(self, tmp_state):
        self.lab: Optional[Lab] = None
        self.scenario: Optional[str] = None
        self.tmp_state = tmp_state

    def running(self, scenario: Scenario) -> Lab:
        if self.scenario != scenario.name:
            self.close()
            self.lab = Lab(unique_name("sc"), state_dir=self.tmp_state)
            self.scenario = scenario.name
            self.lab.up(scenario, listen_seconds=600)
        return self.lab

    def close(self) -> None:
        if self.lab is not None:
            self.lab.down()
        self.lab = self.scenario = None


@pytest.fixture(scope="module")
def labs(tmp_path_factory):
    pool = OneLabAtATime(tmp_path_factory.mktemp("lab-state"))
    try:
        yield pool
    finally:
        pool.close()


@pytest.mark.parametrize("scenario, flow", CASES)
def test_nftrace_gives_the_scenario_files_answer(labs, scenario, flow, request):
    if flow.xfail:
        request.applymarker(pytest.mark.xfail(reason=flow.xfail, strict=True))
    lab = labs.running(scenario)
    before = ruleset_state(lab.topology.router)
    result = nftrace(*why_arguments(lab.topology, flow, as_json=True))
    assert ruleset_state(lab.topology.router) == before, "nftrace left something in the router's ruleset"
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr.strip()}"
    packets = result.packets
    assert len(packets) == 1, result.stdout
    problems = flow.check(packets[0])
    assert not problems, f"{packets[0]['summary']}: " + "; ".join(problems)
