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
