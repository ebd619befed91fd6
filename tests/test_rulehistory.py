"""Which legacy ruleset a TRACE line is read against when the rules change while nftrace
traces (nftrace.iptables.rulehistory), without a kernel: observations of the tables and lines
with the window of observations they were read between, as LegacyTracing.read gives them.

The rule: a line means what it meant in the rules it can have met, never what the rules
say when nftrace gets to read it."""

from __future__ import annotations

import ipaddress

import pytest

from nftrace.iptables.legacy import LegacyRuleset
from nftrace.iptables.nflog import LegacyTraceEvent
from nftrace.iptables.rulehistory import RulesetHistory
from nftrace.trace.events import PacketHeaders

BEFORE = """*filter
:INPUT DROP [0:0]
-A INPUT -p udp -m udp --dport 5001 -j DROP
-A INPUT -p udp -m udp --dport 5000 -j ACCEPT
COMMIT
"""
# Rule 1 deleted: the ACCEPT is rule 1 now, and there is no rule 2.
DELETED = """*filter
:INPUT DROP [0:0]
-A INPUT -p udp -m udp --dport 5000 -j ACCEPT
COMMIT
"""
# A rule inserted on top: rule 2 is the DROP for 5001 now.
INSERTED = """*filter
:INPUT DROP [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A INPUT -p udp -m udp --dport 5001 -j DROP
-A INPUT -p udp -m udp --dport 5000 -j ACCEPT
COMMIT
"""
# Rule 2 replaced by one that the same packet also matches.
REPLACED = """*filter
:INPUT DROP [0:0]
-A INPUT -p udp -m udp --dport 5001 -j DROP
-A INPUT -p udp -j DROP
COMMIT
"""
# Another chain changed: INPUT reads the same.
ELSEWHERE = BEFORE.replace("COMMIT", ":OTHER - [0:0]\n-A OTHER -j RETURN\nCOMMIT")

UDP_5000 = PacketHeaders(ipaddress.ip_address("10.77.1.2"), ipaddress.ip_address("10.77.1.1"), 17, 29, 40000, 5000)


class Observed:
    """A RulesetHistory fed as LegacyTracing feeds it: observations of named rulesets, at given times."""

    def __init__(self, **texts):
        self.history = RulesetHistory("ip", {2: "r-client"})
        self.fingerprints = {name: name.encode() for name in texts}
        for name, text in texts.items():
            self.history.learn(self.fingerprints[name], LegacyRuleset.parse("ip", text))

    def observe(self, name: str, at: float) -> int:
        return self.history.record(self.fingerprints[name], at)


def line(position, window, stamp=None, read_at=None, kind="rule", packet=UDP_5000):
    return LegacyTraceEvent("ip", "filter", "INPUT", kind, position, "input", iif=2, packet=packet, timestamp=stamp,
                            seen_between=window, read_at=read_at)


def rule_of(resolution):
    if resolution is None or resolution.rule is None:
        return None
    return resolution.rule.number, resolution.rule.text, resolution.verdict


def test_a_line_read_after_a_rule_above_it_was_deleted_is_named_by_the_rules_it_met():
    seen = Observed(before=BEFORE, deleted=DELETED)
    first = seen.observe("before", 10.0)
    last = seen.observe("deleted", 12.5)
    # The ACCEPT was rule 2 when the packet passed; the rules read now have no rule 2.
    assert rule_of(seen.history.resolve_line(line(2, (first, last)))) == (
        2, "-A INPUT -p udp -m udp --dport 5000 -j ACCEPT", "accept")
    assert seen.history.notes() == []


def test_a_line_whose_position_means_another_rule_now_is_named_by_the_rule_that_matched_its_packet():
    seen = Observed(before=BEFORE, inserted=INSERTED)
    window = (seen.observe("before", 10.0), seen.observe("inserted", 12.5))
    # Rule 2 is the DROP for 5001 now; the packet, to 5000, cannot have matched it.
    assert rule_of(seen.history.resolve_line(line(2, window))) == (
        2, "-A INPUT -p udp -m udp --dport 5000 -j ACCEPT", "accept")


def test_the_packets_timestamp_places_the_line_after_the_observations_finished_before_it():
    seen = Observed(before=BEFORE, replaced=REPLACED)
    first = seen.observe("before", 10.0)
    seen.observe("replaced", 11.0)
    last = seen.observe("replaced", 12.0)
    # Both rule 2s match the packet; it arrived after the new rules were seen in place.
    assert rule_of(seen.history.resolve_line(line(2, (first, last), stamp=11.5, read_at=12.0))) == (
        2, "-A INPUT -p udp -j DROP", "drop")
    # Arrived before: either rules can have met it.
    assert seen.history.resolve_line(line(2, (first, last), stamp=10.5, read_at=12.0)) is None


def test_a_timestamp_later_than_the_reading_is_not_trusted():
    seen = Observed(before=BEFORE, replaced=REPLACED)
    first = seen.observe("before", 10.0)
    last = seen.observe("replaced", 11.0)
    assert seen.history.resolve_line(line(2, (first, last), stamp=50.0, read_at=12.0)) is None


def test_a_line_the_change_could_have_met_either_way_is_unknown_and_a_warning_names_both_rules():
    seen = Observed(before=BEFORE, replaced=REPLACED)
    window = (seen.observe("before", 10.0), seen.observe("replaced", 12.0))
    assert seen.history.resolve_line(line(2, window)) is None
    assert seen.history.resolve_line(line(2, window)) is None
    [note] = seen.history.notes()
    assert note == ("the legacy rules of iptables filter INPUT changed while packets were traced, and 2 TRACE "
                    "line(s) could have been made by the rules before or after the change (rule 2: -A INPUT -p udp "
                    "-m udp --dport 5000 -j ACCEPT; or rule 2: -A INPUT -p udp -j DROP): those steps say unknown")


def test_a_change_elsewhere_leaves_the_line_its_one_meaning():
    seen = Observed(before=BEFORE, elsewhere=ELSEWHERE)
    window = (seen.observe("before", 10.0), seen.observe("elsewhere", 12.0))
    assert rule_of(seen.history.resolve_line(line(2, window))) == (
        2, "-A INPUT -p udp -m udp --dport 5000 -j ACCEPT", "accept")
    policy = seen.history.resolve_line(line(3, window, kind="policy"))
    assert (policy.type, policy.verdict) == ("policy", "drop")


def test_only_the_observations_in_the_lines_window_count():
    seen = Observed(before=BEFORE, deleted=DELETED)
    seen.observe("before", 10.0)
    first = seen.observe("deleted", 11.0)
    last = seen.observe("deleted", 12.0)
    assert rule_of(seen.history.resolve_line(line(1, (first, last)))) == (
        1, "-A INPUT -p udp -m udp --dport 5000 -j ACCEPT", "accept")


def test_rules_nftrace_saw_but_could_not_read_make_the_line_unknown():
    seen = Observed(before=BEFORE)
    first = seen.observe("before", 10.0)
    last = seen.history.record(b"never read", 12.0)
    assert seen.history.resolve_line(line(2, (first, last))) is None
    assert "rules nftrace could not read in time" in seen.history.notes()[0]


@pytest.mark.parametrize("position,kind", [(9, "rule"), (5, "policy")])
def test_a_line_no_observed_ruleset_has_is_unknown_without_a_warning(position, kind):
    seen = Observed(before=BEFORE, deleted=DELETED)
    window = (seen.observe("before", 10.0), seen.observe("deleted", 12.0))
    assert seen.history.resolve_line(line(position, window, kind=kind)) is None
    assert seen.history.notes() == []


def test_observations_of_unchanged_rules_are_one_run():
    seen = Observed(before=BEFORE)
    for at in range(1000):
        seen.observe("before", float(at))
    assert rule_of(seen.history.resolve_line(line(2, (0, 999)))) == (
        2, "-A INPUT -p udp -m udp --dport 5000 -j ACCEPT", "accept")
    assert len(seen.history.candidates(line(2, (0, 999)))) == 1


def test_a_rule_the_kernel_would_have_labelled_otherwise_did_not_make_the_line():
    # ipt_do_table labels a line of an unconditional ACCEPT, DROP or RETURN `policy` (built-in
    # chain) or `return`, and a line of any other rule `rule`.
    seen = Observed(closed=BEFORE.replace("COMMIT", "-A INPUT -j DROP\nCOMMIT"),
                    narrowed=BEFORE.replace("COMMIT", "-A INPUT -p tcp -j DROP\nCOMMIT"))
    window = (seen.observe("closed", 10.0), seen.observe("narrowed", 12.0))
    telnet = PacketHeaders(UDP_5000.src, UDP_5000.dst, 6, 40, 40000, 23)
    assert rule_of(seen.history.resolve_line(line(3, window, kind="rule", packet=telnet))) == (
        3, "-A INPUT -p tcp -j DROP", "drop")
    assert rule_of(seen.history.resolve_line(line(3, window, kind="policy", packet=telnet))) == (
        3, "-A INPUT -j DROP", "drop")
