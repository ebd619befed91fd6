"""Near misses, as pure logic: hand-built packets and rules in libnftables' JSON (the schema
`nft -j -a list ruleset` prints on nft 1.0.6 and 1.1.x) or iptables-save text, one behaviour
per test. The kernel-backed proof (a dry run of the packet changed as the explanation says
is decided by that rule) is in test_nearmiss_kernel.py.
"""

from __future__ import annotations

import io
import ipaddress

import pytest

from nftrace.iptables.legacy import parse_save
from nftrace.iptables.xtmatch import parse_ipset_save, rule_conditions
from nftrace.trace.colour import Style, colour_wanted, parse_colour_choice
from nftrace.trace.events import ConntrackInfo, PacketHeaders
from nftrace.trace.matching import PacketView
from nftrace.trace.nearmiss import find_near_misses
from nftrace.trace.nearmiss_live import LiveRuleBook, NearMissAnnotator, NftCommandLister
from nftrace.trace.paths import HookObservation, PacketPath, Step
from nftrace.trace.render import render_packet
from nftrace.trace.report import packet_json
from nftrace.trace.rulebook import RuleBook
from nftrace.errors import InputError, NftraceError

INTERFACES = {2: "lan0", 3: "wan0"}


# -- rules in libnftables' JSON ------------------------------------------------------------------


def payload(protocol, field):
    return {"payload": {"protocol": protocol, "field": field}}


def meta(key):
    return {"meta": {"key": key}}


def ct(key):
    return {"ct": {"key": key}}


def match(left, right, op="=="):
    return {"match": {"op": op, "left": left, "right": right}}


def prefix(address, length):
    return {"prefix": {"addr": address, "len": length}}


ACCEPT, DROP, COUNTER = {"accept": None}, {"drop": None}, {"counter": {"packets": 0, "bytes": 0}}


def jump(chain):
    return {"jump": {"target": chain}}


def ruleset(*items, family="inet", table="fw"):
    """A JSON listing: ("chain", name) and ("rule", chain, handle, [expr...]), ("set", name, elements)."""
    document = [{"table": {"family": family, "name": table, "handle": 1}}]
    for item in items:
        if item[0] == "chain":
            document.append({"chain": {"family": family, "table": table, "name": item[1], "handle": 1}})
        elif item[0] == "set":
            document.append({"set": {"family": family, "table": table, "name": item[1], "type": "ipv4_addr",
                                     "handle": 2, "elem": item[2]}})
        elif item[0] == "map":
            document.append({"map": {"family": family, "table": table, "name": item[1], "type": "inet_service",
                                     "map": "verdict", "handle": 3, "elem": item[2]}})
        else:
            _, chain, handle, exprs = item
            document.append({"rule": {"family": family, "table": table, "chain": chain, "handle": handle,
                                      "expr": exprs}})
    book = RuleBook()
    book.add_nft_json({"nftables": document})
    return book


# -- packets and paths ---------------------------------------------------------------------------


def headers(src="10.77.1.50", dst="10.77.2.2", proto=6, sport=40000, dport=8080):
    return PacketHeaders(ipaddress.ip_address(src), ipaddress.ip_address(dst), proto, 60, sport, dport)


def observation(hook="forward", chain="forward", packet=None, iif=2, oif=3, mark=None, state="new", table="fw"):
    conntrack = ConntrackInfo(state, "original") if state else None
    return HookObservation(hook, table, chain, packet or headers(), iif, oif, mark, conntrack, False)


def step(chain, handle=None, verdict="continue", type="rule", depth=0, hook="forward", target=None, table="fw",
         family="inet", number=None):
    return Step(hook, family, table, chain, type, handle, number if number is not None else handle, None, verdict,
                target, depth)


def path(steps, observations=None, verdict=None):
    """A finished packet: its verdict and deciding step are those of its last step."""
    result = PacketPath(1, steps=list(steps), observations=list(observations or [observation()]))
    result.hooks = list(dict.fromkeys(s.hook for s in steps))
    result.complete = True
    last = steps[-1]
    result.verdict = verdict or last.verdict
    result.decided_by = last
    return result


def policy_drop(chain="forward", hook="forward", table="fw", family="inet"):
    return step(chain, None, "drop", "policy", hook=hook, table=table, family=family)


def view(**fields):
    values = dict(hook="forward", version=4, src=ipaddress.ip_address("10.77.1.50"),
                  dst=ipaddress.ip_address("10.77.2.2"), proto=6, sport=40000, dport=8080, length=60,
                  iifname="lan0", oifname="wan0", mark=0, ct_state="new", ct_status=frozenset(),
                  ct_direction="original")
    values.update(fields)
    return PacketView(**values)


def only_rule_conditions(book, chain="forward", packet=None):
    return book.rules("nft", "inet", "fw", chain)[0].evaluate(packet or view()).conditions


# -- the issue's example -----------------------------------------------------------------------


ISSUE_RULE = [match(payload("ip", "saddr"), prefix("10.77.1.0", 28)), match(payload("tcp", "dport"), 8080), ACCEPT]


def test_a_source_outside_the_prefix_is_the_one_failed_expression_of_the_accept_rule():
    book = ruleset(("chain", "forward"), ("rule", "forward", 9, ISSUE_RULE))
    [near] = find_near_misses(path([policy_drop()]), book, INTERFACES)
    assert (near.chain, near.handle, near.verdict) == ("forward", 9, "accept")
    [mismatch] = near.mismatches
    assert (mismatch.expr, mismatch.packet, mismatch.wanted, mismatch.first) == (
        "ip saddr 10.77.1.0/28", "10.77.1.50", "10.77.1.0/28", True)
    assert mismatch.field == "ip saddr"
    assert mismatch.reason == "ip saddr 10.77.1.50 is not in 10.77.1.0/28"
    assert near.matched == ("tcp dport 8080",)
    assert near.unknown == ()


def test_the_text_answer_names_the_closest_rule_under_the_tree_with_crosses_and_checks():
    book = ruleset(("chain", "forward"), ("rule", "forward", 9, ISSUE_RULE))
    packet = path([policy_drop()])
    packet.near_misses = find_near_misses(packet, book, INTERFACES)
    lines = render_packet(packet, INTERFACES).splitlines()
    assert "  closest rule that would have accepted it: inet fw forward [9] " in lines[-2]
    assert lines[-1].strip().startswith("✗ ip saddr 10.77.1.50 is not in 10.77.1.0/28")
    assert lines[-1].endswith("✓ tcp dport 8080")


def test_the_json_answer_has_every_near_miss_with_its_mismatches():
    book = ruleset(("chain", "forward"), ("rule", "forward", 9, ISSUE_RULE))
    packet = path([policy_drop()])
    packet.near_misses = find_near_misses(packet, book, INTERFACES)
    [near] = packet_json(packet, INTERFACES)["near_misses"]
    assert {key: near[key] for key in ("family", "table", "chain", "handle", "rule_number", "verdict")} == {
        "family": "inet", "table": "fw", "chain": "forward", "handle": 9, "rule_number": 1, "verdict": "accept"}
    assert near["mismatches"][0]["expr"] == "ip saddr 10.77.1.0/28"
    assert near["mismatches"][0]["packet"] == "10.77.1.50"
    assert near["mismatches"][0]["first"] is True
    assert near["unknown"] == []


def test_a_packet_without_near_misses_says_so_with_an_empty_list():
    packet = path([policy_drop()])
    assert packet_json(packet, INTERFACES)["near_misses"] == []


# -- one expression at a time --------------------------------------------------------------------


def test_the_first_failing_expression_is_where_the_kernel_stopped():
    book = ruleset(("rule", "forward", 9, [match(meta("iifname"), "dmz0"), match(payload("tcp", "dport"), 22),
                                           ACCEPT]))
    failed = [c for c in only_rule_conditions(book) if c.matched is False]
    assert [c.expr for c in failed] == ['iifname "dmz0"', "tcp dport 22"]
    [near] = find_near_misses(path([policy_drop()]), book, INTERFACES)
    assert [m.first for m in near.mismatches] == [True, False]


def test_an_expression_that_cannot_be_evaluated_before_a_failure_leaves_the_stopping_point_unknown():
    rule = [{"limit": {"rate": 10, "per": "second"}}, match(payload("tcp", "dport"), 22), ACCEPT]
    book = ruleset(("rule", "forward", 9, rule))
    [near] = find_near_misses(path([policy_drop()]), book, INTERFACES)
    assert near.unknown == ("limit rate 10/second",)
    assert [m.first for m in near.mismatches] == [False]


LIMIT = {"limit": {"rate": 2, "per": "minute"}}


def test_the_one_condition_the_trace_cannot_tell_failed_when_every_other_matched():
    """The kernel ran the rule and it did not match: with all else matched, its limit was spent."""
    book = ruleset(("rule", "forward", 9, [match(payload("tcp", "dport"), 8080), LIMIT, ACCEPT]))
    packet = path([policy_drop()])
    packet.near_misses = [near] = find_near_misses(packet, book, INTERFACES)
    assert (near.unknown, near.matched) == ((), ("tcp dport 8080",))
    [failed] = near.mismatches
    assert (failed.expr, failed.first) == ("limit rate 2/minute", True)
    assert failed.reason == ("limit rate 2/minute: over the limit for this packet (every other condition matched, "
                             "and the kernel did not match the rule)")
    assert render_packet(packet, INTERFACES).splitlines()[-1].strip().startswith(
        "✗ limit rate 2/minute: over the limit for this packet")


@pytest.mark.parametrize("expr, words", [
    ({"quota": {"val": 10, "val_unit": "mbytes"}}, "quota 10 mbytes: the quota is used up"),
    (match({"fib": {"result": "oif", "flags": ["saddr", "mark", "iif"]}}, True),
     "fib saddr . mark . iif oif exists: no route back to its source leaves through the interface it came in on "
     "(reverse-path check)"),
    (match(meta("hour"), {"range": ["09:00", "17:00"]}), "meta hour 09:00-17:00: outside the rule's time window"),
    (match({"numgen": {"mode": "random", "mod": 2}}, 0), "numgen random mod 2 0: did not hold for this packet"),
])
def test_by_elimination_says_what_a_failed_quota_or_other_unknown_means(expr, words):
    book = ruleset(("rule", "forward", 9, [match(payload("tcp", "dport"), 8080), expr, ACCEPT]))
    [near] = find_near_misses(path([policy_drop()]), book, INTERFACES)
    assert near.mismatches[0].reason.startswith(words)


def test_two_conditions_the_trace_cannot_tell_stay_unknown():
    book = ruleset(("rule", "forward", 9, [match(payload("tcp", "dport"), 8080), LIMIT,
                                           {"quota": {"val": 10, "val_unit": "mbytes"}}, ACCEPT]))
    [near] = find_near_misses(path([policy_drop()]), book, INTERFACES)
    assert (near.mismatches, near.unknown) == ((), ("limit rate 2/minute", "quota 10 mbytes"))


def test_no_elimination_where_a_matched_condition_is_a_set_that_may_have_changed_since():
    book = ruleset(("set", "admins", ["10.77.1.50"]),
                   ("rule", "forward", 9, [match(payload("ip", "saddr"), "@admins"), LIMIT, ACCEPT]))
    [near] = find_near_misses(path([policy_drop()]), book, INTERFACES)
    assert (near.mismatches, near.unknown) == ((), ("limit rate 2/minute",))


@pytest.mark.parametrize("expr, text", [
    ({"limit": {"rate": 5, "per": "second", "inv": True}}, "limit rate over 5/second"),
    ({"quota": {"val": 10, "val_unit": "mbytes"}}, "quota 10 mbytes"),
    (match({"numgen": {"mode": "random", "mod": 2}}, 0), "numgen random mod 2 0"),
    (match({"socket": {"key": "transparent"}}, 1), "socket transparent 1"),
    (match({"fib": {"result": "type", "flags": ["daddr"]}}, "local"), "fib daddr type local"),
    (match(meta("time"), 1), "meta time 1"),
    (match({"rt": {"key": "nexthop"}}, "10.0.0.1"), "rt nexthop 10.0.0.1"),
])
def test_state_the_trace_does_not_report_is_unknown_never_guessed(expr, text):
    book = ruleset(("rule", "forward", 9, [expr, ACCEPT]))
    [condition] = only_rule_conditions(book)
    assert (condition.expr, condition.matched) == (text, None)


def test_a_named_set_is_looked_up_with_its_current_elements():
    book = ruleset(("set", "allowed", ["10.77.1.2", prefix("10.77.3.0", 24)]),
                   ("rule", "forward", 9, [match(payload("ip", "saddr"), "@allowed"), ACCEPT]))
    [condition] = only_rule_conditions(book)
    assert (condition.matched, condition.set_name, condition.packet) == (False, "allowed", "10.77.1.50")
    [condition] = only_rule_conditions(book, packet=view(src=ipaddress.ip_address("10.77.3.9")))
    assert condition.matched is True


def test_an_anonymous_set_of_ports_and_ranges_is_membership():
    ports = {"set": [22, {"range": [8000, 8079]}]}
    book = ruleset(("rule", "forward", 9, [match(payload("tcp", "dport"), ports), ACCEPT]))
    [condition] = only_rule_conditions(book)
    assert (condition.expr, condition.matched, condition.packet) == ("tcp dport { 22, 8000-8079 }", False, "8080")
    assert only_rule_conditions(book, packet=view(dport=8001))[0].matched is True


def test_a_concatenation_is_looked_up_whole():
    key = {"concat": [payload("ip", "saddr"), meta("l4proto"), payload("th", "dport")]}
    book = ruleset(("set", "trusted", [{"concat": ["10.77.1.50", "tcp", 22]}]),
                   ("rule", "forward", 9, [match(key, "@trusted"), ACCEPT]))
    [condition] = only_rule_conditions(book)
    assert (condition.matched, condition.packet) == (False, "10.77.1.50 . tcp . 8080")
    assert only_rule_conditions(book, packet=view(dport=22))[0].matched is True


def test_a_negation_fails_when_the_packet_has_the_excluded_value():
    book = ruleset(("rule", "forward", 9, [match(payload("th", "dport"), 8080, "!="), ACCEPT]))
    [condition] = only_rule_conditions(book)
    assert (condition.expr, condition.matched, condition.negated) == ("th dport != 8080", False, True)


def test_a_tcp_port_of_a_udp_packet_fails_on_the_protocol():
    book = ruleset(("rule", "forward", 9, [match(payload("tcp", "dport"), 8080), ACCEPT]))
    [condition] = only_rule_conditions(book, packet=view(proto=17))
    assert (condition.matched, condition.packet) == (False, "udp")
    assert condition.reason == "tcp dport: the packet is udp, not tcp"


def test_an_ipv4_address_of_an_ipv6_packet_fails_on_the_family():
    book = ruleset(("rule", "forward", 9, [match(payload("ip", "saddr"), "10.0.0.1"), ACCEPT]))
    packet = view(version=6, src=ipaddress.ip_address("2001:db8::1"), dst=ipaddress.ip_address("2001:db8::2"))
    [condition] = only_rule_conditions(book, packet=packet)
    assert (condition.matched, condition.packet) == (False, "IPv6")


def test_an_interface_name_with_a_wildcard_matches_its_prefix():
    book = ruleset(("rule", "forward", 9, [match(meta("iifname"), "lan*"), ACCEPT]))
    [condition] = only_rule_conditions(book)
    assert (condition.expr, condition.matched) == ('iifname "lan*"', True)
    [condition] = only_rule_conditions(book, packet=view(iifname="wan0"))
    assert (condition.matched, condition.packet) == (False, '"wan0"')


def test_ct_state_is_a_set_of_states():
    book = ruleset(("rule", "forward", 9, [match(ct("state"), ["established", "related"], "in"), ACCEPT]))
    [condition] = only_rule_conditions(book)
    assert (condition.expr, condition.matched, condition.packet) == ("ct state established,related", False, "new")


def test_ct_state_is_invalid_where_the_kernel_sent_no_conntrack_for_the_packet():
    book = ruleset(("chain", "forward"),
                   ("rule", "forward", 9, [match(ct("state"), "invalid", "in"), DROP]))
    accepted = path([step("forward", None, "accept", "policy")],
                    [observation(state=None), observation(hook="postrouting", chain="post")])
    accepted.observations[1].ct = ConntrackInfo("new")
    assert find_near_misses(accepted, book, INTERFACES) == []  # it matched: the kernel would have dropped it


def test_a_mark_is_compared_as_nft_prints_it():
    book = ruleset(("rule", "forward", 9, [match(meta("mark"), 16), ACCEPT]))
    [condition] = only_rule_conditions(book, packet=view(mark=1))
    assert (condition.expr, condition.matched, condition.packet) == ("meta mark 0x00000010", False, "0x00000001")


def test_a_comparison_says_which_side_the_packet_is_on():
    book = ruleset(("rule", "forward", 9, [match(payload("tcp", "dport"), 1024, ">="), ACCEPT]))
    [condition] = only_rule_conditions(book, packet=view(dport=80))
    assert (condition.matched, condition.reason) == (False, "tcp dport 80 is not >= 1024")


# -- which rules count -----------------------------------------------------------------------------


def test_a_dropped_packet_has_only_the_accept_rules_of_the_base_chain_that_dropped_it():
    book = ruleset(("chain", "pre"), ("chain", "forward"),
                   ("rule", "pre", 3, [match(payload("tcp", "dport"), 22), ACCEPT]),
                   ("rule", "forward", 9, ISSUE_RULE),
                   ("rule", "forward", 10, [match(payload("tcp", "dport"), 23), DROP]))
    steps = [step("pre", None, "accept", "policy", hook="prerouting"), policy_drop()]
    observations = [observation(hook="prerouting", chain="pre", oif=None), observation()]
    found = find_near_misses(path(steps, observations), book, INTERFACES)
    assert [(n.chain, n.handle) for n in found] == [("forward", 9)]


def test_an_accepted_packet_has_the_drop_and_reject_rules_of_every_chain_it_passed():
    book = ruleset(("chain", "pre"), ("chain", "forward"),
                   ("rule", "pre", 3, [match(payload("tcp", "dport"), 22), DROP]),
                   ("rule", "forward", 9, [match(payload("tcp", "dport"), 23), {"reject": None}]),
                   ("rule", "forward", 10, [match(payload("tcp", "dport"), 24), ACCEPT]))
    steps = [step("pre", None, "accept", "policy", hook="prerouting"), step("forward", None, "accept", "policy")]
    observations = [observation(hook="prerouting", chain="pre", oif=None), observation()]
    found = find_near_misses(path(steps, observations), book, INTERFACES)
    assert sorted((n.chain, n.handle, n.verdict) for n in found) == [("forward", 9, "drop"), ("pre", 3, "drop")]


def test_rules_after_the_one_that_decided_were_never_evaluated():
    book = ruleset(("chain", "forward"),
                   ("rule", "forward", 8, [match(payload("ip", "saddr"), "10.77.1.7"), ACCEPT]),
                   ("rule", "forward", 9, [match(payload("tcp", "dport"), 8080), DROP]),
                   ("rule", "forward", 10, [match(payload("ip", "saddr"), "10.77.1.8"), ACCEPT]))
    found = find_near_misses(path([step("forward", 9, "drop")]), book, INTERFACES)
    assert [n.handle for n in found] == [8]


def test_a_rule_that_matched_is_no_near_miss():
    book = ruleset(("chain", "forward"),
                   ("rule", "forward", 8, [match(payload("tcp", "dport"), 8080), COUNTER]),
                   ("rule", "forward", 9, [match(payload("tcp", "dport"), 8080), DROP]))
    accepted_rules = find_near_misses(path([step("forward", 8), policy_drop()]), book, INTERFACES)
    assert accepted_rules == []


def test_a_rule_that_the_packet_as_reported_would_match_is_left_out_rather_than_explained_wrongly():
    book = ruleset(("chain", "forward"), ("rule", "forward", 9, [match(payload("tcp", "dport"), 8080), ACCEPT]))
    assert find_near_misses(path([policy_drop()]), book, INTERFACES) == []


def test_a_jump_counts_by_what_its_target_chain_would_decide():
    book = ruleset(("chain", "forward"), ("chain", "web"),
                   ("rule", "web", 20, [match(payload("tcp", "dport"), 8080), ACCEPT]),
                   ("rule", "forward", 9, [match(meta("iifname"), "dmz0"), jump("web")]))
    [near] = find_near_misses(path([policy_drop()]), book, INTERFACES)
    assert (near.handle, near.verdict, near.target) == (9, "accept", "web")
    assert near.decided_in == "inet fw web rule handle 20: tcp dport 8080 accept"


def test_a_jump_whose_target_would_only_return_changes_nothing():
    book = ruleset(("chain", "forward"), ("chain", "web"),
                   ("rule", "web", 20, [match(payload("tcp", "dport"), 80), ACCEPT]),
                   ("rule", "forward", 9, [match(meta("iifname"), "dmz0"), jump("web")]))
    assert find_near_misses(path([policy_drop()]), book, INTERFACES) == []


def test_a_jump_whose_target_decides_on_what_the_trace_cannot_tell_is_no_near_miss():
    book = ruleset(("chain", "forward"), ("chain", "web"),
                   ("rule", "web", 20, [{"limit": {"rate": 5, "per": "second"}}, ACCEPT]),
                   ("rule", "forward", 9, [match(meta("iifname"), "dmz0"), jump("web")]))
    assert find_near_misses(path([policy_drop()]), book, INTERFACES) == []


def test_the_chains_a_packet_jumped_to_are_walked_as_the_kernel_ran_them():
    book = ruleset(("chain", "forward"), ("chain", "lan"),
                   ("rule", "forward", 9, [match(meta("iifname"), "lan0"), jump("lan")]),
                   ("rule", "lan", 20, [match(payload("tcp", "dport"), 22), ACCEPT]),
                   ("rule", "forward", 10, [match(payload("tcp", "dport"), 443), ACCEPT]))
    steps = [step("forward", 9, "jump", target="lan"), step("lan", None, "return", "return", depth=1),
             policy_drop()]
    found = find_near_misses(path(steps), book, INTERFACES)
    assert [(n.chain, n.handle) for n in found] == [("lan", 20), ("forward", 10)]


def test_a_verdict_map_counts_by_the_verdicts_of_its_elements():
    book = ruleset(("chain", "forward"),
                   ("map", "services", [[22, ACCEPT], [25, DROP], [443, ACCEPT]]),
                   ("rule", "forward", 9, [{"vmap": {"key": payload("tcp", "dport"), "data": "@services"}}]))
    [near] = find_near_misses(path([policy_drop()]), book, INTERFACES)
    [mismatch] = near.mismatches
    assert (near.verdict, mismatch.expr, mismatch.wanted, mismatch.set_name) == (
        "accept", "tcp dport vmap @services", "{ 22, 443 }", "services")


def test_near_misses_are_ranked_by_fewest_failed_expressions():
    book = ruleset(("chain", "forward"),
                   ("rule", "forward", 8, [match(meta("iifname"), "dmz0"), match(payload("tcp", "dport"), 22),
                                           ACCEPT]),
                   ("rule", "forward", 9, ISSUE_RULE))
    found = find_near_misses(path([policy_drop()]), book, INTERFACES)
    assert [(n.handle, n.failed) for n in found] == [(9, 1), (8, 2)]


def test_a_packet_whose_fate_is_unknown_has_no_near_misses():
    book = ruleset(("chain", "forward"), ("rule", "forward", 9, ISSUE_RULE))
    packet = path([policy_drop()])
    packet.complete, packet.verdict = False, "unknown"
    assert find_near_misses(packet, book, INTERFACES) == []


# -- iptables ----------------------------------------------------------------------------------------


LEGACY = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:LAN - [0:0]
-A FORWARD -i lan0 -j LAN
-A FORWARD -s 10.77.1.0/28 -p tcp -m tcp --dport 8080 -j ACCEPT
-A LAN -p tcp -m multiport --dports 22,443 -m conntrack --ctstate NEW -j ACCEPT
COMMIT
"""


def legacy_step(chain, number=None, verdict="continue", type="rule", depth=0, target=None):
    result = step(chain, None, verdict, type, depth, target=target, table="filter", family="ip", number=number)
    result.backend = "iptables-legacy"
    return result


def test_legacy_iptables_rules_are_near_misses_in_their_own_words():
    book = RuleBook()
    book.add_legacy("ip", parse_save(LEGACY))
    steps = [legacy_step("FORWARD", 1, "jump", target="LAN"), legacy_step("LAN", None, "return", "return", depth=1),
             legacy_step("FORWARD", None, "drop", "policy")]
    found = find_near_misses(path(steps, [observation(chain="FORWARD", table="filter")]), book, INTERFACES)
    assert [(n.chain, n.rule_number, n.handle, n.backend) for n in found] == [
        ("LAN", 1, None, "iptables-legacy"), ("FORWARD", 2, None, "iptables-legacy")]
    assert [m.expr for m in found[1].mismatches] == ["-s 10.77.1.0/28"]
    assert found[1].matched == ("-p tcp", "--dport 8080")
    assert [m.expr for m in found[0].mismatches] == ["-m multiport --dports 22,443"]
    assert found[0].iptables == "-A LAN -p tcp -m multiport --dports 22,443 -m conntrack --ctstate NEW -j ACCEPT"


@pytest.mark.parametrize("rule, matched", [
    ("-A X ! -s 10.77.1.50 -j DROP", False),
    ("-A X -o wan+ -j DROP", True),
    ("-A X -p udp -j DROP", False),
    ("-A X -p tcp -m tcp --dport 8000:8100 -j DROP", True),
    ("-A X -m state --state ESTABLISHED,RELATED -j DROP", False),
    ("-A X -m mark --mark 0x1/0xff -j DROP", False),
    ("-A X -m iprange --src-range 10.77.1.40-10.77.1.60 -j DROP", True),
])
def test_iptables_matches_admins_use_most(rule, matched):
    evaluation = rule_conditions(rule, view(), "ip")
    assert evaluation.matches is matched


def test_an_iptables_match_nftrace_cannot_evaluate_is_unknown_with_its_options():
    evaluation = rule_conditions("-A X -m limit --limit 5/sec --limit-burst 10 -p tcp -j ACCEPT", view(), "ip")
    assert [(c.expr, c.matched) for c in evaluation.conditions] == [
        ("-m limit --limit 5/sec --limit-burst 10", None), ("-p tcp", True)]


def test_an_ipset_is_looked_up_with_its_members():
    ipsets = parse_ipset_save("create allowed hash:net family inet\nadd allowed 10.77.3.0/24\n")
    evaluation = rule_conditions("-A X -m set --match-set allowed src -j ACCEPT", view(), "ip", ipsets)
    [condition] = evaluation.conditions
    assert (condition.matched, condition.set_name, condition.packet) == (False, "allowed", "10.77.1.50")
    inside = view(src=ipaddress.ip_address("10.77.3.4"))
    assert rule_conditions("-A X -m set --match-set allowed src -j ACCEPT", inside, "ip", ipsets).matches is True


# `ipset save` as this kernel's ipset 7.17 printed it: a /24 with a nomatch /30 carved out of it
# (`ipset test np 10.0.0.2,tcp:22`: NOT in set; 10.0.0.9,tcp:22: in set), and a hash:ip with
# netmask 24 that stores 10.0.0.0 for the 10.0.0.5 added (`ipset test m 10.0.0.77`: in set).
IPSET_SAVE = """create np hash:net,port family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x9542e6db
add np 10.0.0.0/30,tcp:22 nomatch
add np 10.0.0.0/24,udp:3
add np 10.0.0.0/24,tcp:22 comment "nomatch is only a word here"
create m hash:ip family inet hashsize 1024 maxelem 65536 netmask 24 bucketsize 12 initval 0x8efaa6a7
add m 10.0.0.0
"""


@pytest.mark.parametrize("source,member", [("10.0.0.2", False), ("10.0.0.9", True), ("10.0.1.9", False)])
def test_an_ipset_entry_added_nomatch_excludes_what_it_covers_from_a_wider_entry(source, member):
    packet = view(src=ipaddress.ip_address(source), dport=22)
    rule = "-A X -m set --match-set np src,dst -j ACCEPT"
    [condition] = rule_conditions(rule, packet, "ip", parse_ipset_save(IPSET_SAVE)).conditions
    assert condition.matched is member


def test_return_nomatch_makes_the_excluded_entries_match():
    packet = view(src=ipaddress.ip_address("10.0.0.2"), dport=22)
    rule = "-A X -m set --match-set np src,dst --return-nomatch ! --update-counters -j ACCEPT"
    evaluation = rule_conditions(rule, packet, "ip", parse_ipset_save(IPSET_SAVE))
    assert [(c.expr, c.matched) for c in evaluation.conditions] == [("-m set --match-set np src,dst", True)]


def test_a_hash_ip_with_a_netmask_holds_the_whole_network_of_each_member():
    ipsets = parse_ipset_save(IPSET_SAVE)
    rule = "-A X -m set --match-set m src -j ACCEPT"
    assert rule_conditions(rule, view(src=ipaddress.ip_address("10.0.0.77")), "ip", ipsets).matches is True
    assert rule_conditions(rule, view(src=ipaddress.ip_address("10.0.1.77")), "ip", ipsets).matches is False


def test_a_set_of_ports_alone_is_looked_up_by_port():
    ipsets = parse_ipset_save("create web bitmap:port range 0-65535\nadd web 8080\n")
    rule = "-A X -m set --match-set web dst -j ACCEPT"
    assert rule_conditions(rule, view(dport=8080), "ip", ipsets).matches is True
    assert rule_conditions(rule, view(dport=8081), "ip", ipsets).matches is False


def test_iptables_nft_compat_matches_are_evaluated_in_their_iptables_form():
    rule = [match(payload("ip", "saddr"), prefix("10.77.1.0", 28)), {"xt": {"type": "match", "name": "multiport"}},
            ACCEPT]
    book = RuleBook()
    book.add_nft_json({"nftables": [{"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 4,
                                              "expr": rule}}]},
                      iptables=lambda *key: "-A FORWARD -s 10.77.1.0/28 -p tcp -m multiport --dports 80,8080 -j ACCEPT")
    [nft_rule] = book.rules("nft", "ip", "filter", "FORWARD")
    assert [(c.expr, c.matched) for c in nft_rule.evaluate(view()).conditions] == [
        ("-s 10.77.1.0/28", False), ("-p tcp", True), ("-m multiport --dports 80,8080", True)]


# -- live: read when needed, remembered by packet ------------------------------------------------------


class CountingLister:
    """Lists chains from a JSON document, and counts how often it was asked."""

    def __init__(self, *items):
        self.book = ruleset(*items)
        self.listings = []

    def chain(self, family, table, name):
        self.listings.append(name)
        rules = self.book.rules("nft", family, table, name)
        if rules is None:
            return None
        return {"nftables": [{"rule": {"family": family, "table": table, "chain": name, "handle": rule.handle,
                                       "expr": rule.exprs}} for rule in rules]}

    def set_elements(self, family, table, name):
        return self.book.set_elements(family, table, name)


def test_only_the_chains_on_the_path_are_read_once_for_many_packets_and_again_after_a_change():
    lister = CountingLister(("chain", "forward"), ("chain", "unrelated"), ("rule", "forward", 9, ISSUE_RULE),
                            ("rule", "unrelated", 30, [ACCEPT]))
    annotator = NearMissAnnotator(LiveRuleBook(lister, ipsets=dict), INTERFACES)
    for _ in range(3):
        packet = path([policy_drop()])
        annotator.annotate(packet)
        assert [n.handle for n in packet.near_misses] == [9]
    annotator.invalidate()
    annotator.annotate(path([policy_drop()]))
    assert lister.listings == ["forward", "forward"]


def test_a_ruleset_that_cannot_be_read_leaves_the_answer_alone_and_warns_once():
    class Broken:
        def chain(self, family, table, name):
            from nftrace.kernel.runner import CommandFailed
            raise CommandFailed("nft -j list chain inet fw forward: no answer within 60 s")

        def set_elements(self, family, table, name):
            return None

    warnings = []
    annotator = NearMissAnnotator(LiveRuleBook(Broken(), ipsets=dict), INTERFACES, warnings.append)
    for _ in range(2):
        packet = path([policy_drop()])
        annotator.annotate(packet)
        assert packet.near_misses == []
    assert len(warnings) == 1 and "near misses unavailable" in warnings[0]



def stand_in_nft(tmp_path, *answers):
    """An `nft` that prints these answers to successive calls (the last one from then on),
    exit 0, as libnftables 1.0.6 does when it could not print its document."""
    script = tmp_path / "nft"
    calls = tmp_path / "calls"
    lines = ["#!/bin/sh", f"n=$(cat {calls} 2>/dev/null || echo 0); echo $((n + 1)) > {calls}"]
    for number, answer in enumerate(answers):
        test = f"[ $n -ge {number} ]" if number == len(answers) - 1 else f"[ $n -eq {number} ]"
        lines.append(f"if {test}; then printf '%s' '{answer}'; exit 0; fi")
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    return str(script), calls


LISTED = '{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"chain": {"family": "inet", "table": "fw", "name": "forward"}}]}\n'


def test_a_listing_that_is_no_json_document_is_asked_for_again(tmp_path):
    command, calls = stand_in_nft(tmp_path, "\n", '{"nftables": [{"metainfo"\n', LISTED)
    document = NftCommandLister(command).chain("inet", "fw", "forward")
    assert document["nftables"][1]["chain"]["name"] == "forward"
    assert calls.read_text().strip() == "3"


def test_a_listing_that_stays_broken_is_an_error_naming_it_never_an_empty_chain(tmp_path):
    command, _ = stand_in_nft(tmp_path, "\n")
    with pytest.raises(NftraceError, match=r"^nft -j list chain inet fw forward printed no JSON document: ''$"):
        NftCommandLister(command).chain("inet", "fw", "forward")
    warnings = []
    annotator = NearMissAnnotator(LiveRuleBook(NftCommandLister(command), ipsets=dict), INTERFACES, warnings.append)
    annotator.annotate(path([policy_drop()]))
    assert warnings == ["near misses unavailable: the ruleset could not be read (nft -j list chain inet fw forward "
                        "printed no JSON document: '')"]

# -- colour ------------------------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_colour_is_on_for_a_terminal_and_off_for_a_pipe():
    assert colour_wanted("auto", Terminal(), {}) is True
    assert colour_wanted("auto", io.StringIO(), {}) is False


def test_no_color_and_a_dumb_terminal_turn_colour_off():
    assert colour_wanted("auto", Terminal(), {"NO_COLOR": "1"}) is False
    assert colour_wanted("auto", Terminal(), {"TERM": "dumb"}) is False


def test_always_and_never_override_the_terminal():
    assert colour_wanted("always", io.StringIO(), {"NO_COLOR": "1"}) is True
    assert colour_wanted("never", Terminal(), {}) is False


def test_an_unknown_colour_choice_is_a_clear_error():
    with pytest.raises(InputError, match="--color: 'rainbow' is not one of auto, always, never"):
        parse_colour_choice("rainbow")


def test_colour_marks_the_verdict_the_deciding_rule_and_the_crosses_without_changing_the_words():
    book = ruleset(("chain", "forward"), ("rule", "forward", 9, ISSUE_RULE))
    packet = path([policy_drop()])
    packet.near_misses = find_near_misses(packet, book, INTERFACES)
    coloured = render_packet(packet, INTERFACES, Style(True))
    plain = render_packet(packet, INTERFACES)
    assert "\033[1;31mDROP  \033[0m" in coloured
    assert "\033[1;31mpolicy drop\033[0m" in coloured  # the deciding step
    assert "\033[31m✗ ip saddr 10.77.1.50 is not in 10.77.1.0/28\033[0m" in coloured
    assert "\033[32m✓ tcp dport 8080\033[0m" in coloured
    import re
    assert re.sub(r"\033\[[0-9;]*m", "", coloured) == plain


def test_a_chain_that_dropped_the_packet_before_its_hook_was_observed_sees_the_headers_of_the_hook_before():
    book = RuleBook()
    book.add_legacy("ip", parse_save(LEGACY))
    steps = [legacy_step("FORWARD", 1, "jump", target="LAN"), legacy_step("LAN", None, "return", "return", depth=1),
             legacy_step("FORWARD", None, "drop", "policy")]
    prerouting = observation(hook="prerouting", chain="mark_prerouting", oif=None)
    prerouting.own = True
    found = find_near_misses(path(steps, [prerouting]), book, INTERFACES)
    assert [(n.chain, n.rule_number) for n in found] == [("LAN", 1), ("FORWARD", 2)]



LEGACY_OUTPUT = """*raw
:OUTPUT ACCEPT [0:0]
-A OUTPUT -p tcp -m tcp --dport 22 -j DROP
COMMIT
*filter
:OUTPUT DROP [0:0]
-A OUTPUT -p tcp -m multiport --dports 22,443 -m conntrack --ctstate NEW -j ACCEPT
COMMIT
"""


def own_observation(hook, chain, state):
    result = observation(hook=hook, chain=chain, oif=None, state=state, table="nftrace_1_ab")
    result.own = True
    return result


# What nftrace's table saw of a locally sent packet on output: the mark chain before conntrack
# (no state), its conntrack chain after it (where legacy tables are traced).
SENT = [own_observation("output", "mark_output", None), own_observation("output", "ct_output", "new")]


def test_a_legacy_chain_after_conntrack_sees_the_state_of_nftraces_conntrack_chain_not_the_mark_chains():
    """Read from the mark chain, the packet would have no state: `--ctstate NEW` would fail."""
    book = RuleBook()
    book.add_legacy("ip", parse_save(LEGACY_OUTPUT))
    steps = [legacy_step("OUTPUT", None, "drop", "policy")]
    steps[0].hook = "output"
    found = find_near_misses(path(steps, SENT), book, INTERFACES)
    assert [(n.table, n.chain, n.rule_number) for n in found] == [("filter", "OUTPUT", 1)]
    assert [m.expr for m in found[0].mismatches] == ["-m multiport --dports 22,443"]


def test_a_legacy_raw_chain_runs_before_conntrack_and_sees_the_packet_as_the_mark_chain_did():
    book = RuleBook()
    book.add_legacy("ip", parse_save(LEGACY_OUTPUT))
    steps = [legacy_step("OUTPUT", None, "accept", "policy")]
    steps[0].hook, steps[0].table = "output", "raw"
    found = find_near_misses(path(steps, SENT), book, INTERFACES)
    assert [(n.table, n.chain, n.rule_number) for n in found] == [("raw", "OUTPUT", 1)]
    assert [m.expr for m in found[0].mismatches] == ["--dport 22"]

def test_a_rule_only_the_connections_state_kept_from_matching_ranks_after_one_the_flow_missed():
    book = ruleset(("chain", "forward"),
                   ("rule", "forward", 7, [match(ct("state"), ["established", "related"], "in"), ACCEPT]),
                   ("rule", "forward", 8, [match(meta("iif"), "lo"), ACCEPT]),
                   ("rule", "forward", 9, [match(payload("tcp", "dport"), 8443), ACCEPT]))
    found = find_near_misses(path([policy_drop()]), book, INTERFACES)
    assert [n.handle for n in found] == [9, 7, 8]


# -- a real listing: rules/sets-and-maps.nft as nft 1.0.6 prints it (`nft -j -a list ruleset`) -------------


def recorded_book() -> RuleBook:
    import json
    from pathlib import Path
    book = RuleBook()
    book.add_nft_json(json.loads((Path(__file__).parent / "data" / "sets-and-maps.nft.json").read_text()))
    return book


def input_policy_drop(dport=23, src="10.77.1.2"):
    steps = [step("input", None, "drop", "policy", hook="input", table="filter")]
    seen = observation(hook="input", chain="input", table="filter", oif=None,
                       packet=headers(src=src, dst="10.77.1.1", dport=dport))
    return path(steps, [seen])


def test_a_recorded_listing_explains_a_dropped_port_by_the_verdict_map_and_the_concatenated_set():
    found = find_near_misses(input_policy_drop(), recorded_book(), {2: "r-client"})
    by_handle = {near.handle: near for near in found}
    vmap = by_handle[16]
    assert (vmap.verdict, vmap.target, vmap.mismatches[0].wanted) == ("accept", "dns", "{ 53 }")
    assert vmap.decided_in == 'inet filter dns rule handle 10: meta l4proto { tcp, udp } accept comment "dns"'
    trusted = by_handle[14].mismatches[0]
    assert (trusted.packet, trusted.set_name, trusted.first) == ("10.77.1.2 . tcp . 23", "trusted", True)


def test_a_recorded_interval_set_holds_the_source_of_an_accepted_packet_back_from_its_drop_rule():
    steps = [step("input", 14, "accept", hook="input", table="filter")]
    seen = observation(hook="input", chain="input", table="filter", oif=None,
                       packet=headers(src="10.77.1.2", dst="10.77.1.1", dport=22))
    [blocklist] = [near for near in find_near_misses(path(steps, [seen]), recorded_book(), {2: "r-client"})
                   if near.handle == 13]
    assert blocklist.verdict == "drop"
    assert blocklist.mismatches[0].reason == "ip saddr 10.77.1.2 is not in @blocklist"


def test_a_jumps_target_is_decided_as_if_the_jump_had_matched():
    book = ruleset(("chain", "forward"), ("chain", "from_wan"),
                   ("rule", "from_wan", 20, [match(meta("iifname"), "wan0"), DROP]),
                   ("rule", "forward", 9, [match(meta("iifname"), "wan0"), jump("from_wan")]))
    [near] = find_near_misses(path([step("forward", None, "accept", "policy")]), book, INTERFACES)
    assert (near.handle, near.verdict, near.target) == (9, "drop", "from_wan")
    assert near.decided_in == 'inet fw from_wan rule handle 20: iifname "wan0" drop'


def _evaluations_for_new_connections(monkeypatch, rule):
    import nftrace.trace.nearmiss_live as live
    calls = []
    real = live.find_near_misses
    monkeypatch.setattr(live, "find_near_misses", lambda *args: calls.append(1) or real(*args))
    lister = CountingLister(("chain", "forward"), ("rule", "forward", 9, rule))
    annotator = NearMissAnnotator(LiveRuleBook(lister, ipsets=dict), INTERFACES)
    for sport in range(40000, 40010):
        annotator.annotate(path([policy_drop()], [observation(packet=headers(sport=sport))]))
    return len(calls)


def test_new_connections_from_other_source_ports_share_one_evaluation(monkeypatch):
    # The first packet's key holds every field (no rule read yet); the next ones only what the rules test.
    assert _evaluations_for_new_connections(monkeypatch, ISSUE_RULE) == 2


def test_new_connections_are_evaluated_one_by_one_when_a_rule_tests_the_source_port(monkeypatch):
    rule = [match(payload("tcp", "sport"), 1024, "<"), ACCEPT]
    assert _evaluations_for_new_connections(monkeypatch, rule) == 10


def test_after_a_goto_chain_ends_the_walk_goes_on_in_the_caller_of_the_chain_that_went_there():
    book = ruleset(("chain", "forward"), ("chain", "lan"), ("chain", "zone"),
                   ("rule", "forward", 9, [match(meta("iifname"), "lan0"), jump("lan")]),
                   ("rule", "lan", 20, [{"goto": {"target": "zone"}}]),
                   ("rule", "lan", 21, [match(payload("tcp", "dport"), 21), ACCEPT]),
                   ("rule", "forward", 10, [match(payload("tcp", "dport"), 443), ACCEPT]))
    steps = [step("forward", 9, "jump", target="lan"), step("lan", 20, "goto", depth=1, target="zone"),
             step("zone", None, "return", "return", depth=2), policy_drop()]
    found = find_near_misses(path(steps), book, INTERFACES)
    assert [(n.chain, n.handle) for n in found] == [("forward", 10)]  # lan's rule 21 was never reached
