"""The expectation format (nftrace/lab/expectations.py): what a file states, and how an answer of
nftrace's JSON is held against it. Pure: no kernel."""

from __future__ import annotations

import pytest

from nftrace.errors import InputError
from nftrace.lab.expectations import load_expectations


def write(tmp_path, text, name="demo.expect.toml"):
    path = tmp_path / name
    path.write_text(text)
    (tmp_path / "demo.nft").write_text("# demo\n")
    return path


FLOW = """
[[flow]]
name = "ssh"
from = "10.77.1.2"
to = "10.77.1.1"
proto = "tcp"
dport = 22
expect = "accept"
"""


def packet(verdict="accept", chain="input", text=None, type="rule", iptables=None, nat=()):
    return {"verdict": verdict, "decided_by": {"chain": chain, "text": text, "type": type, "iptables": iptables},
            "nat": list(nat)}


def flow_with(tmp_path, extra=""):
    return load_expectations(write(tmp_path, 'ruleset = "demo.nft"\n' + FLOW + extra)).flows[0]


def test_a_matching_answer_has_no_problem(tmp_path):
    assert flow_with(tmp_path, 'chain = "input"\n').check(packet()) == []


def test_a_different_verdict_is_a_problem(tmp_path):
    assert flow_with(tmp_path).check(packet(verdict="drop")) == ["verdict drop, expected accept"]


def test_text_matches_the_rules_comment(tmp_path):
    flow = flow_with(tmp_path, 'text = "ssh from the admins"\n')
    assert flow.check(packet(text='tcp dport 22 accept comment "ssh from the admins"')) == []


def test_text_comparison_ignores_runs_of_blanks(tmp_path):
    flow = flow_with(tmp_path, "text = 'iifname \"r-client\" tcp dport 6379 counter drop'\n")
    assert flow.check(packet(text='iifname "r-client" tcp dport 6379  counter drop')) == []


def test_text_may_match_the_iptables_form(tmp_path):
    flow = flow_with(tmp_path, 'text = "ssh from the LAN"\n')
    rule = '-A LAN_IN -p tcp -m tcp --dport 22 -m comment --comment "ssh from the LAN" -j ACCEPT'
    assert flow.check(packet(iptables=rule)) == []


def test_dnat_expectation_is_met_by_a_destination_rewrite(tmp_path):
    flow = flow_with(tmp_path, 'dnat = "10.77.1.2:22"\n')
    rewrite = {"hook": "prerouting", "field": "dst", "from": "10.77.2.1:2222", "to": "10.77.1.2:22"}
    assert flow.check(packet(nat=[rewrite])) == []
    assert flow.check(packet()) == ["dnat to 10.77.1.2:22 expected, saw no NAT"]


def test_snat_to_an_address_matches_whatever_port(tmp_path):
    flow = flow_with(tmp_path, 'snat = "10.77.2.1"\n')
    rewrite = {"hook": "postrouting", "field": "src", "from": "10.77.1.2:40000", "to": "10.77.2.1:40000"}
    assert flow.check(packet(nat=[rewrite])) == []
    assert flow.check(packet(nat=[dict(rewrite, field="dst")]))


def test_a_files_xfail_applies_to_each_flow_unless_the_flow_says_otherwise(tmp_path):
    text = 'ruleset = "demo.nft"\nxfail = "backend missing"\n' + FLOW + FLOW.replace('"ssh"', '"ssh2"') + 'xfail = "other"\n'
    flows = load_expectations(write(tmp_path, text)).flows
    assert [flow.xfail for flow in flows] == ["backend missing", "other"]


def test_demo_and_sender_are_read(tmp_path):
    flow = flow_with(tmp_path, 'sender = "server"\ndemo = true\n')
    assert (flow.sender, flow.demo) == ("server", True)


def test_an_unknown_sender_is_refused(tmp_path):
    with pytest.raises(InputError, match="sender must be one of client, router, server"):
        flow_with(tmp_path, 'sender = "internet"\n')


def test_the_scenario_name_comes_from_the_file_name(tmp_path):
    assert load_expectations(write(tmp_path, 'ruleset = "demo.nft"\n' + FLOW)).name == "demo"
