"""Reading nft's ruleset listing into rule texts and chain facts, and the cheap table list.

The listing parser is pure (a listing in, dictionaries out); `take_tables` asks a real
nf_tables in a namespace of the test's own.
"""

from __future__ import annotations

import pytest

from conftest import load_ruleset
from nftrace.trace.ruleset import RulesetSnapshot, parse_ruleset_listing

LISTING = (
    "table inet fw { # handle 4\n"
    "\tset admins { # handle 3\n"
    "\t\ttype ipv4_addr\n"
    "\t\telements = { 10.0.0.1 # handle 99 }\n"
    "\t}\n"
    "\tchain input { # handle 1\n"
    "\t\ttype filter hook input priority filter; policy drop;\n"
    "\t\tct state established,related accept # handle 5\n"
    '\t\ttcp dport 22 accept comment "ssh # handle 1" # handle 6\n'
    "\t\tip saddr @admins jump admin # handle 7\n"
    "\t}\n"
    "\tchain admin { # handle 2\n"
    "\t\taccept # handle 8\n"
    "\t}\n"
    "}\n"
)


def test_rules_are_numbered_in_chain_order_and_keyed_by_handle():
    _, _, rules = parse_ruleset_listing(LISTING)
    numbers = {key[3]: rule.number for key, rule in rules.items() if key[2] == "input"}
    assert numbers == {5: 1, 6: 2, 7: 3}
    assert rules[("inet", "fw", "admin", 8)].text == "accept"


def test_rule_text_keeps_a_comment_that_looks_like_a_handle():
    _, _, rules = parse_ruleset_listing(LISTING)
    assert rules[("inet", "fw", "input", 6)].text == 'tcp dport 22 accept comment "ssh # handle 1"'


def test_base_chain_line_gives_hook_priority_and_policy_and_is_no_rule():
    tables, chains, rules = parse_ruleset_listing(LISTING)
    chain = chains[("inet", "fw", "input")]
    assert (chain.type, chain.hook, chain.priority, chain.policy) == ("filter", "input", "filter", "drop")
    assert chains[("inet", "fw", "admin")].hook is None
    assert tables == {("inet", "fw"): 4}
    assert len(rules) == 4


def test_set_contents_are_never_taken_for_rules():
    _, _, rules = parse_ruleset_listing(LISTING)
    assert not any(key[3] == 99 for key in rules)


@pytest.mark.kernel
def test_table_list_names_every_table_even_empty_ones(netns):
    from bench.probes import inside_netns
    from nftrace.kernel.nft import NftContext

    ns = netns("tables")
    load_ruleset(ns, 'table inet fw {\n chain input { type filter hook input priority 0; }\n}\n'
                     'table ip empty {}\ntable netdev odd-name.v2 {}\n')
    with inside_netns(ns):
        snapshot = RulesetSnapshot.take_tables(NftContext())
    assert set(snapshot.tables) == {("inet", "fw"), ("ip", "empty"), ("netdev", "odd-name.v2")}
    assert not snapshot.rules and not snapshot.chains


ANONYMOUS = (
    "table inet filter { # handle 1\n"
    "\tchain forward { # handle 1\n"
    "\t\ttype filter hook forward priority filter; policy drop;\n"
    "\t\ttcp dport 22 jump {\n"
    "\t\t\tip saddr 10.0.0.1 accept\n"
    '\t\t\tlog prefix "blocked ssh: "\n'
    "\t\t\tdrop\n"
    '\t\t} comment "ssh gate" # handle 5\n'
    "\t\tudp dport 53 accept # handle 6\n"
    "\t}\n"
    "}\n"
)


def test_a_rule_that_opens_an_anonymous_chain_reads_as_one_line_nft_takes_back():
    _, _, rules = parse_ruleset_listing(ANONYMOUS)
    rule = rules[("inet", "filter", "forward", 5)]
    assert rule.text == ('tcp dport 22 jump { ip saddr 10.0.0.1 accept; log prefix "blocked ssh: "; drop; } '
                         'comment "ssh gate"')
    assert [inline.text for inline in rule.inline] == ["ip saddr 10.0.0.1 accept", 'log prefix "blocked ssh: "', "drop"]
    assert (rule.number, rules[("inet", "filter", "forward", 6)].number) == (1, 2)


def test_an_anonymous_chain_that_opens_the_chain_is_a_rule_too():
    listing = ANONYMOUS.replace("\t\tudp dport 53 accept # handle 6\n", "")
    assert [rule.handle for rule in parse_ruleset_listing(listing)[2].values()] == [5]


def test_anonymous_chains_get_their_rules_under_the_kernels_names():
    from nftrace.kernel.anonchains import KernelChain

    snapshot = RulesetSnapshot(ANONYMOUS)
    snapshot.add_anonymous_chains([KernelChain("inet", "filter", "forward", [5, 6], {5: "__chain458"}),
                                   KernelChain("inet", "filter", "__chain458", [2, 3, 4])])
    assert snapshot.rule("inet", "filter", "__chain458", 4).text == "drop"
    assert snapshot.rule("inet", "filter", "__chain458", 4).number == 3
    assert snapshot.chain("inet", "filter", "__chain458").rules == [2, 3, 4]
