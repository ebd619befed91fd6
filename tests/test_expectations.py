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


def packet(verdict="accept", chain="input", text=None, type="rule", iptables=None, nat=(), family="inet"):
    return {"verdict": verdict, "decided_by": {"chain": chain, "text": text, "type": type, "iptables": iptables,
                                               "family": family}, "nat": list(nat)}


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


# nft 1.0.6 and 1.1.3 print this iptables-nft rule of rules/docker.rules (tests/test_version_prints.py).
DOCKER_RULE_1_0_6 = 'iifname != "r-server" oifname "r-server" ip daddr 10.77.2.2 tcp dport 80 counter accept'
DOCKER_RULE_1_1_3 = 'ip daddr 10.77.2.2 iifname != "r-server" oifname "r-server" tcp dport 80 counter accept'
DOCKER_RULE_SAVE = "-A DOCKER -d 10.77.2.2/32 ! -i r-server -o r-server -p tcp -m tcp --dport 80 -j ACCEPT"


@pytest.mark.parametrize("written, printed", [(DOCKER_RULE_1_0_6, DOCKER_RULE_1_1_3), (DOCKER_RULE_1_1_3, DOCKER_RULE_1_0_6)])
def test_an_nft_text_written_on_one_nft_version_names_the_rule_on_the_other(tmp_path, written, printed):
    flow = flow_with(tmp_path, f"text = '{written}'\n")
    assert flow.check(packet(text=printed)) == []


def test_the_iptables_form_names_an_iptables_nft_rule_whatever_nft_prints(tmp_path):
    flow = flow_with(tmp_path, f"text = '{DOCKER_RULE_SAVE}'\n")
    assert flow.check(packet(text=DOCKER_RULE_1_1_3, iptables=DOCKER_RULE_SAVE)) == []


def test_another_address_is_another_rule(tmp_path):
    flow = flow_with(tmp_path, f"text = '{DOCKER_RULE_1_0_6.replace('10.77.2.2', '10.77.2.3')}'\n")
    assert flow.check(packet(text=DOCKER_RULE_1_1_3)) == [
        f"decided by '{DOCKER_RULE_1_1_3}', expected '{DOCKER_RULE_1_0_6.replace('10.77.2.2', '10.77.2.3')}'"]


def test_statements_keep_their_order(tmp_path):
    # A counter before a match counts packets the match then lets by: another rule.
    flow = flow_with(tmp_path, "text = 'counter tcp dport 22 drop'\n")
    assert flow.check(packet(text="tcp dport 22 counter drop"))


def test_set_elements_hex_numbers_and_a_limits_default_burst_read_the_same(tmp_path):
    flow = flow_with(tmp_path, "text = 'ip frag-off & 8191 != 0 tcp dport { 443, 80 } limit rate 10/second accept'\n")
    printed = "tcp dport { 80, 443 } ip frag-off & 0x1fff != 0x0 limit rate 10/second burst 5 packets accept"
    assert flow.check(packet(text=printed)) == []
    assert flow.check(packet(text=printed.replace("burst 5", "burst 50")))


def test_a_comment_names_its_rule_and_only_a_whole_comment_does(tmp_path):
    flow = flow_with(tmp_path, 'text = "ssh"\n')
    assert flow.check(packet(text='tcp dport 22 accept comment "ssh"')) == []
    assert flow.check(packet(text='tcp dport 22 accept comment "ssh from the admins"'))


def test_ip_protocol_and_meta_l4proto_are_the_same_match_in_an_ip_table_only(tmp_path):
    # iptables-nft 1.8.9 wrote `-p tcp` as `meta l4proto tcp`, 1.8.11 as `ip protocol tcp`.
    flow = flow_with(tmp_path, "text = 'meta l4proto tcp counter reject with tcp reset'\n")
    assert flow.check(packet(text="ip protocol tcp counter reject with tcp reset", family="ip")) == []
    assert flow.check(packet(text="ip protocol tcp counter reject with tcp reset", family="inet"))
