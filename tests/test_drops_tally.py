"""The drops tally: which finished packets count, under what, and how flows are kept.

Pure: packet paths made by hand, as the path builder and the kernel-drop correlator leave them.
"""

from __future__ import annotations

import ipaddress

from nftrace.drops import tally as tally_module
from nftrace.drops.report import DropsReport
from nftrace.drops.tally import DropTally, TraceCounts, drop_kind
from nftrace.flow import parse_filter
from nftrace.trace.events import PacketHeaders
from nftrace.trace.paths import HookObservation, PacketPath, Step

INTERFACES = {3: "eth0"}


def packet(sport=40000, dport=22, src="10.0.0.5", dst="10.0.0.9") -> PacketHeaders:
    return PacketHeaders(ipaddress.ip_address(src), ipaddress.ip_address(dst), 6, 60, sport, dport)


def step(chain="input", handle=7, kind="rule", verdict="drop", text="tcp dport 22 drop") -> Step:
    return Step("input", "inet", "filter", chain, kind, handle, 1, text, verdict)


def path(verdict="drop", decided_by=None, kernel_drop=None, complete=True, headers=None) -> PacketPath:
    made = PacketPath(1, verdict=verdict, decided_by=decided_by, complete=complete, kernel_drop=kernel_drop)
    made.observations.append(HookObservation("prerouting", "nftrace_1_a", "mark_prerouting", headers or packet(),
                                             3, None, None, None, True))
    return made


def test_a_rule_drop_counts_under_its_rule_with_its_flow():
    tally = DropTally()
    assert tally.add(path(decided_by=step()), INTERFACES) == "rule"
    [rule] = tally.rules_json()
    assert rule["packets"] == 1
    assert rule["decided_by"]["handle"] == 7 and rule["decided_by"]["text"] == "tcp dport 22 drop"
    assert rule["flows"] == [{"src": "10.0.0.5", "dst": "10.0.0.9", "proto": "tcp", "sport": 40000, "dport": 22,
                              "iif": "eth0", "packets": 1}]


def test_accepted_and_incomplete_packets_are_not_drops():
    tally = DropTally()
    assert tally.add(path(verdict="accept", decided_by=step(verdict="accept")), INTERFACES) is None
    assert tally.add(path(verdict="unknown", complete=False), INTERFACES) is None
    assert (tally.packets, tally.seen, tally.rules_json()) == (0, 2, [])


def test_a_kernel_drop_after_netfilter_counts_under_its_reason_not_under_the_accepting_rule():
    tally = DropTally()
    dropped = path(verdict="accept", decided_by=step(verdict="accept"),
                   kernel_drop={"reason": "NO_SOCKET", "location": "udp_rcv", "explain": "nothing listens"})
    assert drop_kind(dropped) == "kernel"
    tally.add(dropped, INTERFACES)
    assert tally.rules_json() == []
    [reason] = tally.kernel_drops_json()
    assert (reason["reason"], reason["packets"], reason["explain"]) == ("NO_SOCKET", 1, "nothing listens")


def test_a_reason_is_explained_in_the_packets_words_only_while_they_share_them():
    def no_socket(port):
        return path(verdict="accept", decided_by=step(verdict="accept"), headers=packet(dport=port),
                    kernel_drop={"reason": "NO_SOCKET", "location": "tcp_v4_rcv",
                                 "explain": f"nothing listens on tcp/{port} in this namespace"})

    tally = DropTally()
    tally.add(no_socket(22), INTERFACES)
    tally.add(no_socket(22), INTERFACES)
    assert tally.kernel_drops_json()[0]["explain"] == "nothing listens on tcp/22 in this namespace"
    tally.add(no_socket(80), INTERFACES)  # not "tcp/80" for all three, nor "tcp/22"
    tally.add(no_socket(22), INTERFACES)
    [reason] = tally.kernel_drops_json()
    assert (reason["packets"], reason["explain"]) == (4, "nothing listens on their destination ports in this namespace")


def test_ipv6_multicast_not_for_this_host_counts_apart_from_the_kernels_other_unspecified_drops():
    def freed(location, explanation):
        return path(verdict="accept", decided_by=step(verdict="accept"),
                    kernel_drop={"reason": "NOT_SPECIFIED", "location": location, "explain": explanation})

    multicast = "multicast to a group that nothing here has joined: not for this host"
    tally = DropTally()
    tally.add(freed("ip6_mc_input+0x15e", multicast), INTERFACES)
    tally.add(freed("kfree_skb_list+0x10", "the kernel freed it without saying why"), INTERFACES)
    tally.add(freed("ip6_mc_input+0x15e", multicast), INTERFACES)
    assert [(reason["reason"], reason["packets"], reason["explain"]) for reason in tally.kernel_drops_json()] == [
        ("NOT_SPECIFIED", 2, multicast), ("NOT_SPECIFIED", 1, "the kernel freed it without saying why")]


def test_every_reason_explained_with_a_packets_values_has_words_for_many_packets():
    from nftrace.drops.reasons import REASON_EXPLANATIONS, explain_many

    for reason, words in REASON_EXPLANATIONS.items():
        assert explain_many(reason) and "{" not in explain_many(reason), reason
        if "{" not in words:
            assert explain_many(reason) == words
    assert explain_many("A_REASON_NFTRACE_DOES_NOT_KNOW") is None


def test_rules_are_ranked_by_packets_and_flows_by_count():
    tally = DropTally()
    for _ in range(3):
        tally.add(path(decided_by=step(handle=9), headers=packet(sport=1)), INTERFACES)
    tally.add(path(decided_by=step(handle=7)), INTERFACES)
    tally.add(path(decided_by=step(handle=9), headers=packet(sport=2)), INTERFACES)
    rules = tally.rules_json()
    assert [(rule["decided_by"]["handle"], rule["packets"]) for rule in rules] == [(9, 4), (7, 1)]
    assert [(flow["sport"], flow["packets"]) for flow in rules[0]["flows"]] == [(1, 3), (2, 1)]


def test_a_policy_drop_is_its_own_entry():
    tally = DropTally()
    tally.add(path(decided_by=step(handle=None, kind="policy", text=None)), INTERFACES)
    tally.add(path(decided_by=step()), INTERFACES)
    assert sorted(rule["decided_by"]["type"] for rule in tally.rules_json()) == ["policy", "rule"]


def test_flows_beyond_the_limit_are_counted_as_other_flows(monkeypatch):
    monkeypatch.setattr(tally_module, "FLOWS_KEPT", 2)
    tally = DropTally()
    for sport in (1, 2, 3, 3, 1):
        tally.add(path(decided_by=step(), headers=packet(sport=sport)), INTERFACES)
    [rule] = tally.rules_json(flows=None)
    assert rule["packets"] == 5
    assert [(flow["sport"], flow["packets"]) for flow in rule["flows"]] == [(1, 2), (2, 1)]
    assert rule["other_flows"] == 2


def test_counts_over_the_rate_limit_make_a_sample_and_say_so():
    report = DropsReport(flow=parse_filter(), max_rate=100, counts=TraceCounts(matched=3000, traced=200))
    assert (report.traced, report.not_traced, report.sampled) == (200, 2800, True)
    assert report.sample_note().startswith("counts are a sample: 2,800 of 3,000 matching packets were over "
                                           "--max-rate 100/s")
    exact = DropsReport(flow=parse_filter(), max_rate=0, counts=TraceCounts(matched=50, traced=50))
    assert (exact.not_traced, exact.sampled, exact.sample_note()) == (0, False, None)


def test_the_document_has_the_fields_scripts_read():
    report = DropsReport(flow=parse_filter(None, None, "tcp", None, 22), netns="router",
                         counts=TraceCounts(10, 10))
    report.tally.add(path(decided_by=step()), INTERFACES)
    document = report.to_json()
    assert {"mode", "netns", "filter", "duration", "traced", "not_traced", "lost_events", "rules", "kernel_drops",
            "warnings"} <= set(document)
    assert document["mode"] == "drops"
    assert document["filter"] == {"src": None, "dst": None, "proto": "tcp", "sport": None, "dport": 22, "iif": None,
                                  "oif": None}


def test_one_line_per_drop_names_the_flow_the_interface_and_the_rule():
    from nftrace.drops.render import drop_line

    line = drop_line(path(decided_by=step()), INTERFACES, now=0)
    assert line.endswith(" DROP   10.0.0.5:40000 → 10.0.0.9:22 tcp in eth0  "
                         "dropped by inet filter input rule handle 7: tcp dport 22 drop")
    kernel = path(verdict="accept", decided_by=step(verdict="accept", text="tcp dport 22 accept"),
                  kernel_drop={"reason": "NO_SOCKET", "location": "tcp_v4_rcv", "explain": "nothing listens"})
    assert " KERNEL 10.0.0.5:40000 → 10.0.0.9:22 tcp in eth0  accepted by " in drop_line(kernel, INTERFACES, now=0)


def test_the_live_table_ranks_rules_and_shows_the_rate_since_the_last_refresh():
    from nftrace.drops.render import LiveTable

    report = DropsReport(flow=parse_filter())
    table = LiveTable(report, width=200)
    report.tally.add(path(decided_by=step()), INTERFACES)
    first = table.render(now=10.0, elapsed=1.0)
    for _ in range(4):
        report.tally.add(path(decided_by=step(handle=9, text="udp dport 53 drop")), INTERFACES)
    second = table.render(now=12.0, elapsed=3.0).splitlines()
    assert "1 dropped of 1 traced packets" in first
    rows = [line for line in second if "inet filter input" in line]
    assert "udp dport 53 drop" in rows[0] and rows[0].split()[:2] == ["4", "2.0"]
    assert "tcp dport 22 drop" in rows[1] and rows[1].split()[:2] == ["1", "0.0"]
    assert rows[0].endswith("10.0.0.5:40000 → 10.0.0.9:22 tcp in eth0")


def test_the_summary_gives_each_rule_its_top_flows_and_says_whether_counts_are_exact():
    from nftrace.drops.render import render_summary

    report = DropsReport(flow=parse_filter(), counts=TraceCounts(matched=5, traced=5), duration=2.0)
    for sport in (1, 1, 2):
        report.tally.add(path(decided_by=step(), headers=packet(sport=sport)), INTERFACES)
    text = render_summary(report)
    assert "3 dropped of 5 traced packets (0 matching packets not traced)" in text
    assert "counts are exact" in text
    assert "        3  dropped by inet filter input rule handle 7: tcp dport 22 drop" in text
    assert "10.0.0.5:1 → 10.0.0.9:22 tcp in eth0" in text


def test_a_drops_session_counts_traces_nftables_and_takes_every_packet():
    from nftrace.drops.run import DropsSession
    from nftrace.trace.session import TraceOptions

    options = TraceOptions(flow=parse_filter(), count=10, backend="auto")
    DropsSession(options, DropsReport(flow=options.flow))
    assert (options.counted, options.count, options.backend) == (True, 0, "nft")


def test_drops_names_the_legacy_tables_it_does_not_trace_and_keeps_their_trace_lines_out_of_the_kernel_log(
        monkeypatch):
    """It once refused the machine's own namespace wherever a legacy table existed, empty or
    not: their TRACE lines would have gone to the kernel log (now kept out: SilencedTraceLines)."""
    from nftrace.drops import run as drops_run
    from nftrace.trace.session import TraceOptions

    monkeypatch.setattr(drops_run, "open_nftables", lambda: object())
    monkeypatch.setattr(drops_run, "legacy_tables", lambda family: ["filter", "nat"] if family == "ip" else [])
    options = TraceOptions(flow=parse_filter())
    session = drops_run.DropsSession(options, DropsReport(flow=options.flow))
    _, plan = session._plan()
    assert (plan.nft, plan.legacy, plan.silenced) == (True, None, ("ip",))
    assert session.report.warnings == ["legacy iptables tables are not traced by drops: iptables (filter, nat)"]


def test_beside_legacy_tables_a_netfilter_drop_comes_with_the_why_that_names_its_rule():
    from nftrace.drops.render import render_summary

    report = DropsReport(flow=parse_filter(), netns="pid:42", untraced_legacy=["iptables (filter)"])
    for sport, dport in ((1, 23), (2, 25), (3, 25)):  # one flow per source port: tcp/25 is the commonest
        report.tally.add(path(verdict="drop", headers=packet(sport=sport, dport=dport),
                              kernel_drop={"reason": "NETFILTER_DROP", "location": "nf_hook_slow"}), INTERFACES)
    assert ("           legacy iptables tables are not traced by drops; to name the rule, trace the commonest "
            "destination: nftrace --pid 42 why --from 10.0.0.5 --to 10.0.0.9 --proto tcp --dport 25"
            ) in render_summary(report)
    report.untraced_legacy = []  # conntrack or NAT, then: `why` would say no more
    assert "nftrace --pid 42 why" not in render_summary(report)


def test_a_netfilter_drop_outside_the_traced_chains_is_not_said_to_be_after_netfilter():
    from nftrace.drops.render import render_summary

    report = DropsReport(flow=parse_filter(), counts=TraceCounts(matched=2, traced=2), duration=1.0)
    for reason in ("NETFILTER_DROP", "NO_SOCKET"):
        report.tally.add(path(verdict="accept", kernel_drop={"reason": reason, "location": "x", "explain": "why"}),
                         INTERFACES)
    text = render_summary(report)
    assert "        1  dropped by the kernel: NETFILTER_DROP — why" in text
    assert "        1  dropped by the kernel after netfilter: NO_SOCKET — why" in text


def test_a_kernel_drop_reported_after_its_packet_was_answered_still_counts_under_its_reason():
    from nftrace.drops.correlator import DropCorrelator
    from nftrace.drops.reasons import KernelDrop

    tally = DropTally()
    correlator = DropCorrelator()
    correlator.on_late = lambda signature, kernel_drop: tally.add_late(signature, kernel_drop, INTERFACES)
    accepted = path(verdict="accept", decided_by=step(verdict="accept"))
    accepted.first_seen = accepted.last_seen = 10.0
    [answered] = correlator.hold([accepted], now=10.0) + correlator.release(now=10.5)
    assert tally.add(answered, INTERFACES) is None
    late = KernelDrop(11.0, "NO_SOCKET", "udp_rcv", ipaddress.ip_address("10.0.0.5"),
                      ipaddress.ip_address("10.0.0.9"), 6, 40000, 22)
    correlator.add_drops([late])
    [reason] = tally.kernel_drops_json()
    assert (reason["reason"], reason["packets"]) == ("NO_SOCKET", 1)
    assert reason["flows"][0]["iif"] == "eth0" and reason["flows"][0]["dport"] == 22
    assert len(correlator.notes) == 1


def test_a_kernel_drop_whose_packet_was_never_built_counts_under_its_reason_by_its_own_headers():
    from nftrace.drops.correlator import DropCorrelator
    from nftrace.drops.reasons import KernelDrop

    tally = DropTally()
    correlator = DropCorrelator()
    correlator.on_unpaired = lambda drop, kernel_drop: tally.add_unpaired(drop, kernel_drop)
    correlator.add_drops([KernelDrop(11.0, "NO_SOCKET", "udp_rcv", ipaddress.ip_address("10.0.0.5"),
                                     ipaddress.ip_address("10.0.0.9"), 17, 40000, 53)])
    correlator.forget_unpaired()
    [reason] = tally.kernel_drops_json()
    assert (reason["reason"], reason["packets"]) == ("NO_SOCKET", 1)
    [flow] = reason["flows"]
    assert (flow["src"], flow["dst"], flow["proto"], flow["dport"], flow["iif"]) == ("10.0.0.5", "10.0.0.9", "udp", 53, None)
