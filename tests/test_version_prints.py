"""nftrace reads what each supported release's nftables and iptables print the same way.

tests/data/prints/ holds the prints of the rulesets of rules/ and tests/data/ by Debian 12 (nft 1.0.6,
iptables 1.8.9) and Debian 13 (nft 1.1.3, iptables 1.8.11), recorded with
tests/record_prints.py. Between them, nft prints the same rules differently: matches in
another order and `-p tcp` as `ip protocol tcp` (iptables-nft 1.8.11 writes them so),
`burst 5 packets` of a limit, numbers in hex, a nat chain's priority by name. The kernel, and so the trace events, is the one the
machine runs: only user space differs. Pure: no kernel.
"""

from __future__ import annotations

import json

import pytest

from conftest import REPO
from nftrace.iptables.legacy import parse_save
from nftrace.lab.lab import list_scenarios
from nftrace.lab.rulematch import names_rule
from nftrace.trace.ruleset import parse_ruleset_listing, priority_value

PRINTS = REPO / "tests" / "data" / "prints"
RELEASES = {"Debian 12": "nft-1.0.6", "Debian 13": "nft-1.1.3"}
SCENARIOS = [scenario.name for scenario in list_scenarios() + list_scenarios(REPO / "tests" / "data")]


def prints(release: str, scenario: str, kind: str) -> str:
    return (PRINTS / RELEASES[release] / f"{scenario}.{kind}").read_text()


def listing(release: str, scenario: str):
    return parse_ruleset_listing(prints(release, scenario, "listing"))


def test_every_scenario_was_recorded_on_both_releases():
    for release, directory in RELEASES.items():
        recorded = {path.name.split(".")[0] for path in (PRINTS / directory).glob("*.listing")}
        assert recorded == set(SCENARIOS), release
        assert (PRINTS / directory / "VERSIONS").read_text().startswith(f"nftables v{directory[4:]} ")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_both_releases_list_the_same_chains_and_rules(scenario):
    tables12, chains12, rules12 = listing("Debian 12", scenario)
    tables13, chains13, rules13 = listing("Debian 13", scenario)
    assert tables12 == tables13
    assert rules12.keys() == rules13.keys()
    assert {key: rule.number for key, rule in rules12.items()} == {key: rule.number for key, rule in rules13.items()}
    assert chains12.keys() == chains13.keys()
    for key, chain in chains12.items():
        other = chains13[key]
        assert (chain.type, chain.hook, chain.policy, chain.devices, chain.rules) == \
               (other.type, other.hook, other.policy, other.devices, other.rules), key
        assert priority_value(chain.priority, chain.family) == priority_value(other.priority, other.family), key


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_rules_text_from_one_release_names_it_in_the_other_and_no_other_rule(scenario):
    _, _, rules12 = listing("Debian 12", scenario)
    _, _, rules13 = listing("Debian 13", scenario)
    for key, rule in rules12.items():
        same_chain = [other for other_key, other in rules13.items() if other_key[:3] == key[:3]]
        for other in same_chain:
            named = other.handle == rule.handle
            assert names_rule(rule.text, other.text, None, rule.family) == named, (rule.text, other.text)
            assert names_rule(other.text, rule.text, None, rule.family) == named, (other.text, rule.text)


def test_the_docker_rule_of_the_issue_reads_the_same_in_both_prints():
    old = 'iifname != "r-server" oifname "r-server" ip daddr 10.77.2.2 tcp dport 80 counter accept'
    new = 'ip daddr 10.77.2.2 iifname != "r-server" oifname "r-server" tcp dport 80 counter accept'
    assert old in prints("Debian 12", "docker", "listing") and new in prints("Debian 13", "docker", "listing")
    assert names_rule(old, new, None) and names_rule(new, old, None)


@pytest.mark.parametrize("scenario", [name for name in SCENARIOS if (PRINTS / "nft-1.0.6" / f"{name}.save").exists()])
def test_iptables_save_reads_the_same_in_both_releases(scenario):
    assert parse_save(prints("Debian 12", scenario, "save")) == parse_save(prints("Debian 13", scenario, "save"))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_json_listings_hold_the_same_objects(scenario):
    """Objects in another order, a netdev chain's `dev` (1.1.3 only), the order of an
    iptables-nft rule's matches and its `-p tcp` (`ip protocol`, a payload, in 1.1.3;
    `meta l4proto` before) differ; what the rulebook keys on and evaluates does not."""
    ip_protocol = json.dumps({"payload": {"protocol": "ip", "field": "protocol"}}, sort_keys=True)
    l4proto = json.dumps({"meta": {"key": "l4proto"}}, sort_keys=True)

    def objects(release):
        document = json.loads(prints(release, scenario, "json"))
        found = {}
        for item in document["nftables"]:
            (kind, body), = item.items()
            if kind != "metainfo":
                key = (kind, body["family"], body.get("table"), body.get("chain"), body.get("name"), body.get("handle"))
                exprs = [json.dumps(expr, sort_keys=True) for expr in body.get("expr", [])]
                if body["family"] == "ip":
                    exprs = [expr.replace(ip_protocol, l4proto) for expr in exprs]
                found[key] = sorted(exprs)
        return found

    assert objects("Debian 12") == objects("Debian 13")
