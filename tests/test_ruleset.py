"""The ruleset snapshot: rule text exactly as `nft -a list ruleset` prints it, by handle."""

from nftrace.trace.ruleset import RulesetSnapshot, parse_ruleset_listing

LISTING = """table inet filter { # handle 1
	set admins { # handle 4
		type ipv4_addr
		elements = { 10.0.0.5, 10.0.0.6 }
	}

	map portmap { # handle 5
		type inet_service : verdict
		elements = { 80 : jump web, 443 : jump web }
	}

	chain web { # handle 1
		tcp dport 80 counter accept # handle 6
	}

	chain input { # handle 3
		type filter hook input priority filter; policy drop;
		ct state established,related accept # handle 9
		tcp dport vmap @portmap # handle 12
		meta l4proto icmp accept comment "icmp ok" # handle 14
	}
}
table ip nat { # handle 2
	chain pre { # handle 1
		type nat hook prerouting priority dstnat; policy accept;
		tcp dport 8080 dnat to 10.0.0.9:80 # handle 2
	}
}
"""


def test_rules_are_keyed_by_family_table_chain_handle_with_their_position():
    snapshot = RulesetSnapshot(LISTING)
    rule = snapshot.rule("inet", "filter", "input", 14)
    assert rule.text == 'meta l4proto icmp accept comment "icmp ok"'
    assert rule.number == 3
    assert snapshot.rule("ip", "nat", "pre", 2).text == "tcp dport 8080 dnat to 10.0.0.9:80"
    assert snapshot.rule("inet", "filter", "input", 2) is None


def test_base_chains_know_their_hook_priority_and_policy():
    snapshot = RulesetSnapshot(LISTING)
    chain = snapshot.chain("inet", "filter", "input")
    assert (chain.hook, chain.priority, chain.policy, chain.type) == ("input", "filter", "drop", "filter")
    assert snapshot.chain("inet", "filter", "web").is_base is False


def test_set_and_map_contents_never_look_like_rules():
    _, chains, rules = parse_ruleset_listing(LISTING)
    assert set(chains) == {("inet", "filter", "web"), ("inet", "filter", "input"), ("ip", "nat", "pre")}
    assert len(rules) == 5


def test_refresh_keeps_deleted_rules_of_a_table_that_still_exists():
    snapshot = RulesetSnapshot(LISTING)
    snapshot.refresh(LISTING.replace("\t\ttcp dport 80 counter accept # handle 6\n", ""))
    rule = snapshot.rule("inet", "filter", "web", 6)
    assert rule is not None and rule.deleted
    assert not snapshot.rule("inet", "filter", "input", 9).deleted


def test_refresh_forgets_rules_of_a_table_that_was_recreated():
    snapshot = RulesetSnapshot(LISTING)
    recreated = LISTING.replace("table ip nat { # handle 2", "table ip nat { # handle 7").replace(
        "\t\ttcp dport 8080 dnat to 10.0.0.9:80 # handle 2\n", ""
    )
    snapshot.refresh(recreated)
    assert snapshot.rule("ip", "nat", "pre", 2) is None


def test_trace_tables_are_recognised_by_name():
    snapshot = RulesetSnapshot(LISTING + "table inet nftrace_123_abcdef { # handle 9\n}\n")
    assert list(snapshot.trace_tables()) == [("inet", "nftrace_123_abcdef")]


def test_ingress_chains_know_their_devices():
    snapshot = RulesetSnapshot("""table netdev edge { # handle 1
	chain one { # handle 2
		type filter hook ingress device "r-server" priority -500; policy accept;
	}
	chain two { # handle 3
		type filter hook ingress devices = { d0, d1 } priority -500; policy accept;
	}
}
table inet nftrace_1_abcdef { # handle 2
	chain mark_ingress@0 { # handle 1
		type filter hook ingress device "eth9" priority -10000; policy accept;
	}
}
""")
    assert snapshot.chain("netdev", "edge", "one").devices == ("r-server",)
    assert snapshot.chain("netdev", "edge", "two").devices == ("d0", "d1")
    assert snapshot.ingress_devices() == ["d0", "d1", "r-server"]  # nftrace's own chains are not the ruleset's


def test_an_owned_table_is_read_with_its_own_chains():
    """nft names the owning program after the handle; the table's chains are its own, not the
    table's before it."""
    listing = ("table inet filter { # handle 1\n\tchain input { # handle 1\n"
               "\t\ttype filter hook input priority filter; policy accept;\n\t}\n}\n"
               "table inet nftrace_7_abc { # handle 2 progname nftrace\n\tflags owner\n\n"
               "\tchain mark_prerouting { # handle 1\n"
               "\t\ttype filter hook prerouting priority -350; policy accept;\n\t}\n}\n")
    snapshot = RulesetSnapshot(listing)
    assert ("inet", "nftrace_7_abc") in snapshot.tables
    assert snapshot.chain("inet", "nftrace_7_abc", "mark_prerouting").hook == "prerouting"
    assert snapshot.chain("inet", "filter", "mark_prerouting") is None
    outline: dict = {}
    parse_ruleset_listing(listing, outline)
    assert outline[("inet", "nftrace_7_abc")].flags == ("owner",)
    assert outline[("inet", "filter")].objects == [("chain", "input")]
