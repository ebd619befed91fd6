"""The rules/ corpus as files: every scenario is complete, loadable and says something.

No kernel here; tests/test_scenarios.py runs every flow against it.
"""

from __future__ import annotations

import re

import pytest

from nftrace.lab.expectations import EXPECTATION_SUFFIX, load_expectations
from nftrace.lab.lab import list_scenarios, rules_dir

RULES = rules_dir()
SCENARIOS = list_scenarios()
BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}


def test_rules_has_at_least_eight_scenarios():
    assert len(SCENARIOS) >= 8, [scenario.name for scenario in SCENARIOS]


def test_every_ruleset_file_has_its_expectations_and_the_other_way_round():
    rulesets = {path.name for path in RULES.iterdir() if path.suffix in (".nft", ".rules")}
    named = {scenario.ruleset.name for scenario in SCENARIOS}
    assert rulesets == named
    assert all(scenario.ruleset.parent == RULES for scenario in SCENARIOS)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_scenario_states_an_accepted_and_a_dropped_flow(scenario):
    verdicts = {flow.expect for flow in scenario.flows}
    assert {"accept", "drop"} <= verdicts


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_scenario_flows_have_distinct_names(scenario):
    names = [flow.name for flow in scenario.flows]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_every_drop_says_whether_a_rule_or_a_policy_decided(scenario):
    for flow in scenario.flows:
        if flow.expect == "drop":
            assert flow.type is not None or flow.text is not None, flow.name


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_ruleset_file_says_what_it_is_in_a_comment(scenario):
    text = scenario.ruleset.read_text()
    assert re.search(r"^#\s+\S", text, re.MULTILINE), "an admin reads the file: it starts by saying what it is"


def test_the_corpus_covers_the_layouts_admins_meet():
    kinds = {scenario.kind for scenario in SCENARIOS}
    assert {"nft", "iptables-nft", "iptables-legacy"} <= kinds
    texts = {scenario.name: scenario.ruleset.read_text() for scenario in SCENARIOS}
    everything = "\n".join(texts.values())
    for needle in ("masquerade", "dnat to", "DOCKER-USER", "goto filter_IN_", "vmap", "icmpv6 type", "hook ingress"):
        assert needle in everything, needle
    assert any(re.search(r"policy drop", text) for text in texts.values())


def test_the_docker_layout_is_loaded_through_iptables_nft():
    assert BY_NAME["docker"].kind == "iptables-nft"


def test_the_legacy_scenario_is_loaded_through_iptables_legacy_and_expected_to_pass():
    legacy = BY_NAME["legacy-iptables"]
    assert legacy.kind == "iptables-legacy"
    assert not any(flow.xfail for flow in legacy.flows)


def test_only_flows_with_a_stated_reason_are_expected_to_fail():
    for scenario in SCENARIOS:
        for flow in scenario.flows:
            assert flow.xfail is None or len(flow.xfail) > 10


def test_the_demo_traces_one_accepted_one_rule_drop_one_policy_drop_and_one_nat():
    from nftrace.lab.demo import DEMO_SCENARIO

    flows = [flow for flow in BY_NAME[DEMO_SCENARIO].flows if flow.demo]
    assert any(flow.expect == "accept" for flow in flows)
    assert any(flow.expect == "drop" and flow.type == "rule" for flow in flows)
    assert any(flow.expect == "drop" and flow.type == "policy" for flow in flows)
    assert any(flow.dnat or flow.snat for flow in flows)
    assert not any(flow.xfail for flow in flows)


def test_expectation_files_are_named_after_their_scenario():
    for path in RULES.glob(f"*{EXPECTATION_SUFFIX}"):
        assert load_expectations(path).name == path.name[: -len(EXPECTATION_SUFFIX)]
