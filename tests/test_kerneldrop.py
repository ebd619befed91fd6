"""Kernel drops, NAT and conntrack in the answer: the pure logic, from hand-written events.

The kernel-backed counterparts are in test_kernel_drops.py.
"""

from __future__ import annotations

import ipaddress
import re

import pytest

from nftrace.trace.events import ConntrackInfo, PacketHeaders, TraceEvent
from nftrace.drops.bpftrace import KernelSymbols, bpftrace_program
from nftrace.drops.correlator import REMEMBER_MAX, DropCorrelator, attach_drop
from nftrace.drops.reasons import KernelDrop, explain, has_reason_field, parse_drop_line, parse_reason_names
from nftrace.trace.paths import HookObservation, PacketPath, PathBuilder, Step, finalise_path, nat_rewrites
from nftrace.trace.report import accepted_by_connection, conntrack_json, packet_json, summary
from nftrace.trace.ruleset import ChainInfo

CLIENT, ROUTER, SERVER = (ipaddress.ip_address(a) for a in ("10.77.1.2", "10.77.1.1", "10.77.2.2"))
TRACE_TABLE = "nftrace_1_abcdef"

FORMAT = """name: kfree_skb
ID: 2310
format:
	field:void * skbaddr;	offset:8;	size:8;	signed:0;
	field:void * location;	offset:16;	size:8;	signed:0;
	field:enum skb_drop_reason reason;	offset:36;	size:4;	signed:0;

print fmt: "skbaddr=%p location=%pS reason: %s", REC->skbaddr, REC->location, __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, { 12, "NETFILTER_DROP" }, { 16, "IP_RPFILTER" })
"""


def tcp(src=CLIENT, dst=ROUTER, sport=40000, dport=8081) -> PacketHeaders:
    return PacketHeaders(src, dst, 6, 60, sport, dport)


def drop(reason="NO_SOCKET", at=10.0, src=CLIENT, dst=ROUTER, sport=40000, dport=8081, proto=6) -> KernelDrop:
    return KernelDrop(at, reason, "tcp_v4_rcv+0x91", src, dst, proto, sport, dport)


def observation(hook, packet=None, ct=None, table=TRACE_TABLE, chain=None, iif=3, oif=None) -> HookObservation:
    own = table == TRACE_TABLE
    return HookObservation(hook, table, chain or f"obs_{hook}", packet, iif, oif, None, ct, own)


def rule_step(hook, text, verdict="accept", family="inet", table="fw", chain="input", handle=7) -> Step:
    return Step(hook, family, table, chain, "rule", handle, 1, text, verdict)


def accepted_at_input(first=10.0, last=10.0, packet=None) -> PacketPath:
    packet = packet or tcp()
    return PacketPath(1, observations=[observation("prerouting", packet), observation("input", packet)],
                      hooks=["prerouting", "input"], verdict="accept", complete=True,
                      first_seen=first, last_seen=last)


# -- what bpftrace prints, read back -------------------------------------------------------------


def test_reason_names_come_from_the_tracepoint_format():
    assert parse_reason_names(FORMAT) == {2: "NOT_SPECIFIED", 3: "NO_SOCKET", 12: "NETFILTER_DROP",
                                          16: "IP_RPFILTER"}


def test_a_format_without_reason_field_is_recognised():
    assert has_reason_field(FORMAT)
    assert not has_reason_field(FORMAT.replace("enum skb_drop_reason reason;", "unsigned short protocol;"))


def test_drop_line_gives_reason_name_headers_and_time():
    line = "nftrace-drop 1123729402057 3 18446744071595833937 4 10.77.1.2 10.77.1.1 6 36894 8081"
    parsed = parse_drop_line(line, parse_reason_names(FORMAT))
    assert parsed == KernelDrop(1123.729402057, "NO_SOCKET", "0xffffffff82033a51", CLIENT, ROUTER, 6, 36894, 8081)


def test_drop_line_of_ipv6_packet():
    line = "nftrace-drop 5000000000 3 18446744071596779103 6 fd77:1::2 fd77:1::1 6 59260 8081"
    parsed = parse_drop_line(line, {3: "NO_SOCKET"})
    assert (str(parsed.src), str(parsed.dst), parsed.dport) == ("fd77:1::2", "fd77:1::1", 8081)


def test_drop_line_of_portless_protocol_has_no_ports():
    parsed = parse_drop_line("nftrace-drop 5000000000 16 4096 4 10.77.9.9 10.77.1.1 1 2048 1234", {16: "IP_RPFILTER"})
    assert (parsed.proto, parsed.sport, parsed.dport) == (1, None, None)


def test_unknown_reason_number_keeps_the_number():
    parsed = parse_drop_line("nftrace-drop 1 999 4096 4 10.77.1.2 10.77.1.1 17 1 2", {})
    assert parsed.reason == "reason-999"


@pytest.mark.parametrize("line", ["Attaching 1 probe...", "nftrace-drop 1 2 3", "nftrace-drop x 3 4 4 a b 6 1 2"])
def test_other_lines_are_not_drops(line):
    assert parse_drop_line(line, {}) is None


def test_location_is_function_plus_offset(tmp_path):
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text("ffffffff82033a90 T tcp_v4_err\nffffffff820339c0 T tcp_v4_rcv\nffffffff82000000 d some_data\n")
    symbols = KernelSymbols(str(kallsyms))
    assert symbols.location(0xFFFFFFFF82033A51) == "tcp_v4_rcv+0x91"
    assert symbols.location(0x1000) == "0x1000"


def test_a_drop_location_is_looked_up_when_an_answer_shows_it_not_when_the_drop_is_read(tmp_path):
    # A lookup reads /proc/kallsyms (tens of ms): at the first drop of a flood, read at once,
    # it held the event loop long enough for a 16 MiB buffer to overflow.
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text("ffffffff820339c0 T tcp_v4_rcv\n")
    symbols = KernelSymbols(str(kallsyms))
    parsed = parse_drop_line("nftrace-drop 1123729402057 3 18446744071595833937 4 10.77.1.2 10.77.1.1 6 36894 8081",
                             {3: "NO_SOCKET"}, symbols)
    assert parsed.location == "0xffffffff82033a51" and not symbols._cache
    path = PacketPath(1, complete=True, verdict="accept")
    attach_drop(path, parsed)
    assert path.kernel_drop["location"] == "tcp_v4_rcv+0x91"


def test_the_program_is_made_for_one_namespace_and_nothing_else_changes_with_it():
    one, other = bpftrace_program(4026532246), bpftrace_program(4026532247)
    assert one != other and one.replace("4026532246", "4026532247") == other


def test_every_line_the_program_prints_is_a_drop_line_the_parser_reads():
    # The program's printf formats, filled as bpftrace fills them: nsecs, reason, location,
    # version, source, destination, protocol, ports. (Which packets it reports is for the
    # kernel to show: test_kernel_drops.py.)
    formats = re.findall(r'printf\("([^"]*)\\n"', bpftrace_program(4026532246))
    values = {4: ("10.77.1.2", "10.77.1.1"), 6: ("fd77:1::2", "fd77:1::1")}
    assert len(formats) == 2
    for text in formats:
        version = int(text.split()[4])
        src, dst = values[version]
        filled = text.replace("%llu", "10000000000", 1).replace("%u", "3", 1).replace("%lu", "18446744071596571217", 1)
        filled = filled.replace("%s", src, 1).replace("%s", dst, 1).replace("%u %u %u", "6 40000 8081", 1)
        parsed = parse_drop_line(filled, {3: "NO_SOCKET"})
        assert parsed is not None, filled
        assert (parsed.time, parsed.reason, str(parsed.src), str(parsed.dst), parsed.proto, parsed.sport,
                parsed.dport) == (10.0, "NO_SOCKET", src, dst, 6, 40000, 8081)


# -- plain words ---------------------------------------------------------------------------------


def test_no_socket_names_protocol_and_port():
    assert explain(drop("NO_SOCKET")) == "nothing listens on tcp/8081 in this namespace"


def test_rp_filter_names_source_and_interface():
    text = explain(drop("IP_RPFILTER", src=ipaddress.ip_address("10.77.9.9")), iif="r-client")
    assert "10.77.9.9" in text and "r-client" in text and "rp_filter" in text


def test_the_code_that_freed_the_packet_tells_a_ttl_run_out_from_an_invalid_header():
    expired = KernelDrop(10.0, "IP_INHDR", "ip_forward+0x2c0", CLIENT, ROUTER, 17, 40000, 33434)
    assert explain(expired).startswith("its TTL ran out here: it came in with TTL 1 and cannot be forwarded")
    assert explain(KernelDrop(10.0, "IP_INHDR", "ip_rcv_core+0x1b2", CLIENT, ROUTER, 17)) == "invalid IP header"


def test_ipv6_multicast_for_a_group_nothing_here_joined_is_said_so_not_freed_without_a_reason():
    mld = KernelDrop(10.0, "NOT_SPECIFIED", "ip6_mc_input+0x15e", ipaddress.ip_address("fe80::1"),
                     ipaddress.ip_address("ff02::16"), 0)
    assert explain(mld).startswith("multicast to a group that nothing here has joined: not for this host")
    assert explain(KernelDrop(10.0, "NOT_SPECIFIED", "kfree_skb_list+0x10", CLIENT, ROUTER, 17)) == \
        "the kernel freed it without saying why"


def test_a_packet_purged_with_its_sockets_queue_is_said_so():
    # Seen on every real-world ruleset's `drops` run: a server that closes a connection unread.
    assert explain(drop("QUEUE_PURGE")).startswith("the queue it waited in was emptied at once (its socket closed")


def test_unlisted_tcp_reason_falls_back_to_its_family():
    assert explain(drop("TCP_OFO_DROP")) == "TCP's own checks refused it"


def test_unknown_reason_points_to_the_kernel_enum():
    assert "skb_drop_reason" in explain(drop("SOMETHING_NEW"))


# -- pairing drops with packets ------------------------------------------------------------------


def test_accepted_packet_is_held_until_its_drop_comes():
    correlator = DropCorrelator()
    path = accepted_at_input()
    assert correlator.hold([path], now=10.0) == []
    correlator.add_drops([drop(at=10.001)])
    assert correlator.release(now=10.05) == [path]
    assert path.kernel_drop == {"reason": "NO_SOCKET", "location": "tcp_v4_rcv+0x91",
                                "explain": "nothing listens on tcp/8081 in this namespace"}
    assert path.verdict == "accept"
    assert summary(path) == ("accepted by every chain, then dropped by the kernel: NO_SOCKET — "
                             "nothing listens on tcp/8081 in this namespace")


def test_accepted_packet_without_drop_is_answered_after_the_hold():
    correlator = DropCorrelator(hold_seconds=0.3)
    path = accepted_at_input()
    correlator.hold([path], now=10.0)
    assert correlator.release(now=10.2) == []
    assert correlator.release(now=10.31) == [path]
    assert path.kernel_drop is None


def test_a_held_packet_waits_until_the_drops_were_read_after_its_hold_ended():
    correlator = DropCorrelator(hold_seconds=0.3)
    path = accepted_at_input()
    correlator.hold([path], now=10.0)
    correlator.note_drops_read(10.25)
    assert correlator.release(now=10.4) == []  # a drop made at 10.3 may still be unread
    correlator.note_drops_read(10.31)
    assert correlator.release(now=10.4) == [path]


def test_a_packet_whose_events_were_queued_long_before_they_were_read_waits_from_then():
    """Under a backlog, its drop (if any) came just after its events were queued: long read."""
    correlator = DropCorrelator(hold_seconds=0.3)
    path = accepted_at_input(first=12.0, last=12.0)
    correlator.note_drops_read(11.99)
    assert correlator.hold([path], now=12.0, queued_by=11.5) == [path]


def test_a_packet_queued_long_before_still_gets_a_drop_read_since():
    correlator = DropCorrelator(hold_seconds=0.3)
    path = accepted_at_input(first=12.0, last=12.0)
    correlator.add_drops([drop(at=11.501)])
    correlator.note_drops_read(11.99)
    assert correlator.hold([path], now=12.0, queued_by=11.5) == [path]
    assert path.kernel_drop["reason"] == "NO_SOCKET"


def test_a_packet_whose_wait_is_over_still_comes_out_behind_one_that_waits():
    correlator = DropCorrelator(hold_seconds=0.3)
    waiting, late_read = accepted_at_input(first=12.0, last=12.0), accepted_at_input(first=12.0, last=12.0)
    correlator.note_drops_read(12.0)
    assert correlator.hold([waiting], now=12.0) == []
    assert correlator.hold([late_read], now=12.01, queued_by=11.0) == []
    correlator.note_drops_read(12.31)
    assert correlator.release(now=12.31) == [waiting, late_read]


@pytest.mark.parametrize("read_behind", [4.0, 0.1])
def test_packets_read_behind_the_kernel_take_the_oldest_drops_that_fit_in_the_order_they_come(read_behind):
    """Read after they were queued (seconds after, under a backlog; or a tenth of a second, less
    than a packet's wait, but more than the gap between two packets), the packets of one flow
    come in the order their drops were made, drops read before them (the nearest to the
    reading would be the newest, a later packet's, and leave the oldest to no one)."""
    correlator = DropCorrelator(hold_seconds=0.3)
    correlator.add_drops([KernelDrop(10.0 + n / 1000, "NO_SOCKET", f"tcp_v4_rcv+0x{n}", CLIENT, ROUTER, 6, 40000, 8081)
                          for n in range(6)])
    read = 10.0 + read_behind
    correlator.note_drops_read(read)
    packets = [accepted_at_input(first=read, last=read) for _ in range(6)]
    ready = correlator.hold(packets, now=read, queued_after=9.99, queued_by=10.01)
    assert ready == packets
    assert [path.kernel_drop["location"] for path in packets] == [f"tcp_v4_rcv+0x{n}" for n in range(6)]


def test_a_backlog_s_packet_takes_no_drop_made_before_it_was_queued():
    correlator = DropCorrelator(hold_seconds=0.3)
    correlator.add_drops([drop(at=9.5)])
    correlator.note_drops_read(11.0)
    path = accepted_at_input(first=14.0, last=14.0)
    correlator.hold([path], now=14.0, queued_after=9.99, queued_by=10.01)
    assert path.kernel_drop is None


def test_drops_are_read_no_further_than_there_is_room_to_keep_them():
    correlator = DropCorrelator()
    assert correlator.room == REMEMBER_MAX
    correlator.add_drops([drop(at=10.0 + n / 10000, sport=n) for n in range(REMEMBER_MAX)])
    assert correlator.room == 0


def test_making_room_forgets_only_drops_older_than_a_whole_round_of_reads_since_an_empty_socket():
    correlator = DropCorrelator()
    correlator.add_drops([drop(at=10.0), drop(at=12.0)])
    correlator.note_drained(11.0)
    assert correlator.forget_stale() == 0  # one empty read only: a packet closed as vanished may still want it
    correlator.note_drained(11.5)
    assert correlator.forget_stale() == 1
    assert correlator.room == REMEMBER_MAX - 1


def test_a_drop_whose_packet_may_still_be_unread_is_not_forgotten_for_its_age():
    correlator = DropCorrelator()
    correlator.add_drops([drop(at=10.0)])
    assert correlator.release(now=30.0) == []
    assert correlator.room == REMEMBER_MAX - 1  # the sockets were never read empty since
    correlator.note_drained(20.0)
    correlator.release(now=30.0)
    assert correlator.room == REMEMBER_MAX


def test_a_drop_forgotten_without_a_packet_is_told_of_and_a_netfilter_drop_is_not():
    correlator = DropCorrelator()
    told = []
    correlator.on_unpaired = lambda forgotten, record: told.append((forgotten.reason, record["explain"]))
    path = accepted_at_input()
    correlator.add_drops([drop(at=10.001), drop(at=11.0, dport=9999), drop("NETFILTER_DROP", at=11.5, dport=7)])
    correlator.hold([path], now=10.0)
    correlator.release(now=10.5)
    correlator.forget_unpaired()
    assert path.kernel_drop["reason"] == "NO_SOCKET"
    assert told == [("NO_SOCKET", "nothing listens on tcp/9999 in this namespace")]
    assert correlator.room == REMEMBER_MAX


def test_a_bound_later_than_the_reading_changes_nothing():
    correlator = DropCorrelator(hold_seconds=0.3)
    path = accepted_at_input()
    correlator.note_drops_read(10.0)
    assert correlator.hold([path], now=10.0, queued_by=11.0) == []
    correlator.note_drops_read(10.31)
    assert correlator.release(now=10.31) == [path]


def test_end_of_run_releases_every_held_packet():
    correlator = DropCorrelator()
    path = accepted_at_input()
    correlator.hold([path], now=10.0)
    assert correlator.release(now=10.0, everything=True) == [path]


def test_drop_of_other_packet_is_not_attached():
    correlator = DropCorrelator()
    path = accepted_at_input()
    correlator.hold([path], now=10.0)
    correlator.add_drops([drop(at=10.001, sport=40001)])
    assert correlator.release(now=10.05) == []
    assert path.kernel_drop is None


def test_drop_long_after_the_packet_is_not_attached():
    correlator = DropCorrelator()
    path = accepted_at_input(first=10.0, last=10.0)
    correlator.hold([path], now=10.0)
    correlator.add_drops([drop(at=11.0)])  # a retransmission's drop, a second later
    assert path.kernel_drop is None


def test_drop_matches_the_packet_after_nat():
    rewritten = tcp(dst=SERVER, dport=80)
    path = PacketPath(1, observations=[observation("prerouting", tcp(dport=8080)),
                                       observation("prerouting", rewritten, chain="obs_prerouting"),
                                       observation("forward", rewritten), observation("postrouting", rewritten)],
                      hooks=["prerouting", "forward", "postrouting"], verdict="accept", complete=True,
                      first_seen=10.0, last_seen=10.0)
    correlator = DropCorrelator()
    correlator.hold([path], now=10.0)
    correlator.add_drops([drop("QDISC_DROP", at=10.01, dst=SERVER, dport=80)])
    assert path.kernel_drop["reason"] == "QDISC_DROP"


def test_packet_dropped_by_a_rule_is_answered_at_once_without_netfilter_drop():
    correlator = DropCorrelator()
    step = rule_step("input", "tcp dport 8081 drop", verdict="drop")
    path = PacketPath(1, steps=[step], observations=[observation("prerouting", tcp())], hooks=["prerouting", "input"],
                      verdict="drop", decided_by=step, complete=True, first_seen=10.0, last_seen=10.0)
    correlator.add_drops([drop("NETFILTER_DROP", at=10.0)])
    assert correlator.hold([path], now=10.0) == [path]
    assert path.kernel_drop is None
    assert summary(path) == "dropped by inet fw input rule handle 7: tcp dport 8081 drop"


def test_answers_keep_the_order_in_which_packets_finished():
    correlator = DropCorrelator(hold_seconds=0.3)
    accepted = accepted_at_input()
    step = rule_step("input", "tcp dport 8081 drop", verdict="drop")
    dropped = PacketPath(2, steps=[step], observations=[observation("prerouting", tcp(sport=40001))],
                         hooks=["prerouting", "input"], verdict="drop", decided_by=step, complete=True,
                         first_seen=10.1, last_seen=10.1)
    assert correlator.hold([accepted], now=10.0) == []
    assert correlator.hold([dropped], now=10.1) == []
    assert correlator.release(now=10.31) == [accepted, dropped]


def test_drop_after_the_answer_becomes_a_note():
    correlator = DropCorrelator()
    path = accepted_at_input()
    correlator.hold([path], now=10.0)
    assert correlator.release(now=10.3) == [path]
    correlator.add_drops([drop("NEIGH_FAILED", at=13.0)])
    correlator.release(now=13.01)
    assert len(correlator.notes) == 1
    assert correlator.notes[0].startswith("the kernel dropped packet 10.77.1.2:40000 → 10.77.1.1:8081 tcp "
                                          "(trace id 00000001) after its answer was given: NEIGH_FAILED")
    assert path.kernel_drop is None


# -- a packet that vanishes after a hook ---------------------------------------------------------


class Lookup:
    def rule(self, family, table, chain, handle):
        return None

    def chain(self, family, table, chain):
        return None


def base_chain_event(chain, packet, trace_id=0x51, iif=3) -> TraceEvent:
    """The first event of one of nftrace's own base chains: a policy accept with headers."""
    return TraceEvent(trace_id, "inet", TRACE_TABLE, chain, "policy", "accept", nfproto=2, iif=iif, packet=packet)


def test_packet_that_vanished_after_prerouting_is_closed_by_its_drop():
    spoofed = tcp(src=ipaddress.ip_address("10.77.9.9"))
    builder = PathBuilder(Lookup())
    for chain in ("mark_prerouting", "obs_prerouting"):
        assert builder.feed(base_chain_event(chain, spoofed), now=20.0) == []
    correlator = DropCorrelator(interfaces={3: "r-client"})
    correlator.add_drops([drop("IP_RPFILTER", at=20.0, src=spoofed.src)])
    correlator.note_drained(20.005)
    closed = builder.close_vanished(correlator.vanished)
    assert [path.trace_id for path in closed] == [0x51]
    ready = correlator.hold(closed, now=20.01)
    path = ready[0]
    assert (path.complete, path.verdict, path.decided_by, path.incomplete_reason) == (True, "accept", None, None)
    assert path.kernel_drop["reason"] == "IP_RPFILTER"
    assert "r-client" in path.kernel_drop["explain"]
    assert summary(path).startswith("no rule dropped it: it passed every chain up to prerouting, "
                                    "then the kernel dropped it: IP_RPFILTER — reverse-path filter")
    assert builder.open_packets == 0


def test_a_packet_closed_by_a_later_packet_under_its_trace_id_still_gets_its_drop_read_after():
    """The kernel reuses trace ids: the next datagram of a flow can start under the id of one
    that vanished after prerouting before the drop of that one was read. Closed then as
    incomplete, it waits for its drop like an accepted packet, and gets it."""
    builder = PathBuilder(Lookup())
    builder.feed(base_chain_event("mark_prerouting", tcp()), now=20.0)
    [first] = builder.feed(base_chain_event("mark_prerouting", tcp()), now=20.02)
    assert (first.complete, first.incomplete_reason) == (False, "went idle")
    correlator = DropCorrelator()
    assert correlator.hold([first], now=20.021) == []
    correlator.add_drops([drop("NOT_SPECIFIED", at=20.0005)])
    [answered] = correlator.release(now=20.03)
    assert answered is first
    assert (first.complete, first.verdict, first.vanished_after) == (True, "accept", "prerouting")
    assert first.kernel_drop["reason"] == "NOT_SPECIFIED"
    assert builder.open_packets == 1  # the second datagram, still waiting for its own drop


def test_a_packet_whose_events_were_lost_is_not_held_for_a_drop():
    path = accepted_at_input()
    path.complete, path.verdict, path.incomplete_reason = False, "unknown", "events lost"
    assert DropCorrelator().hold([path], now=10.0) == [path]


def test_open_packet_without_a_matching_drop_stays_open():
    builder = PathBuilder(Lookup())
    builder.feed(base_chain_event("mark_prerouting", tcp()), now=20.0)
    correlator = DropCorrelator()
    correlator.add_drops([drop(at=20.0, dport=9999)])
    assert builder.close_vanished(correlator.vanished) == []
    assert builder.open_packets == 1


# -- NAT ----------------------------------------------------------------------------------------


def test_dnat_is_reported_at_prerouting_with_its_rule():
    dnat = rule_step("prerouting", "tcp dport 8080 dnat ip to 10.77.2.2:80", family="ip", table="nat", chain="pre")
    original, rewritten = tcp(dport=8080), tcp(dst=SERVER, dport=80)
    observations = [observation("prerouting", original, chain="mark_prerouting"),
                    observation("prerouting", original, table="nat", chain="pre"),
                    observation("prerouting", rewritten), observation("forward", rewritten)]
    assert nat_rewrites(observations, [dnat]) == [{
        "hook": "prerouting", "field": "dst", "from": "10.77.1.1:8080", "to": "10.77.2.2:80", "kind": "dnat",
        "rule": "ip nat pre rule handle 7: tcp dport 8080 dnat ip to 10.77.2.2:80",
    }]


def test_a_legacy_iptables_dnat_target_is_the_rule_that_rewrote_not_the_connections_mapping():
    dnat = Step("prerouting", "ip", "nat", "DOCKER", "rule", None, 1,
                "-A DOCKER ! -i bridge1 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.77.2.2:80", "accept",
                backend="iptables-legacy")
    changes = nat_rewrites([observation("prerouting", tcp(dport=8080), chain="mark_prerouting"),
                            observation("prerouting", tcp(dst=SERVER, dport=80))], [dnat])
    assert (changes[0]["kind"], changes[0]["rule"]) == ("dnat", dnat.location())
    masquerade = Step("postrouting", "ip", "nat", "POSTROUTING", "rule", None, 2,
                      "-A POSTROUTING -s 10.77.1.0/24 ! -o docker0 -j MASQUERADE", "accept", backend="iptables-legacy")
    changes = nat_rewrites([observation("forward", tcp(dst=SERVER)),
                            observation("postrouting", tcp(src=ipaddress.ip_address("10.77.2.1"), dst=SERVER))],
                           [masquerade])
    assert changes[0]["kind"] == "masquerade"


def test_masquerade_is_reported_at_postrouting():
    masquerade = rule_step("postrouting", 'oifname "r-server" masquerade', family="ip", table="nat", chain="post")
    before, after = tcp(dst=SERVER), tcp(src=ipaddress.ip_address("10.77.2.1"), dst=SERVER)
    changes = nat_rewrites([observation("forward", before), observation("postrouting", after)], [masquerade])
    assert [(c["hook"], c["field"], c["from"], c["to"], c["kind"]) for c in changes] == [
        ("postrouting", "src", "10.77.1.2:40000", "10.77.2.1:40000", "masquerade")]


def test_rewrite_without_a_nat_rule_is_the_connections_mapping():
    changes = nat_rewrites([observation("prerouting", tcp(dport=8080), chain="mark_prerouting"),
                            observation("prerouting", tcp(dst=SERVER, dport=80))],
                           [rule_step("prerouting", "ct status dnat accept")])
    assert (changes[0]["kind"], changes[0]["rule"]) == (None, None)


def test_nat_rule_accept_does_not_decide_the_verdict():
    steps = [rule_step("forward", "tcp dport 80 accept", chain="forward", handle=4),
             Step("postrouting", "ip", "nat", "post", "policy", None, None, None, "accept")]

    class NatLookup(Lookup):
        def chain(self, family, table, chain):
            return ChainInfo(family, table, chain, hook="postrouting", type="nat") if table == "nat" else None

    path = PacketPath(1, steps=steps, observations=[observation("forward", tcp())], verdict="accept", complete=True)
    finalise_path(path, NatLookup())
    assert path.decided_by is steps[0]


# -- conntrack ----------------------------------------------------------------------------------


def established_path() -> PacketPath:
    ct = ConntrackInfo("established", "original", 99, ("seen-reply", "assured", "confirmed"))
    step = rule_step("forward", "ct state established,related accept", chain="forward", handle=2)
    return PacketPath(1, steps=[step],
                      observations=[observation("prerouting", tcp(), chain="mark_prerouting"),
                                    observation("prerouting", tcp(), ct=ct), observation("forward", tcp(), ct=ct),
                                    observation("postrouting", tcp(), ct=ct)],
                      hooks=["prerouting", "forward", "postrouting"], verdict="accept", decided_by=step,
                      complete=True)


def test_conntrack_state_is_given_per_hook():
    entries = conntrack_json(established_path())
    assert [(e["hook"], e["state"], e["direction"], e["id"]) for e in entries] == [
        ("prerouting", "established", "original", 99), ("forward", "established", "original", 99),
        ("postrouting", "established", "original", 99)]


def test_acceptance_only_because_of_an_earlier_connection_is_said():
    path = established_path()
    assert accepted_by_connection(path) == "established"
    assert summary(path) == ("accepted by inet fw forward rule handle 2: ct state established,related accept"
                             " — only because it belongs to an earlier connection (ct state established)")
    assert packet_json(path, {})["accepted_by_connection"] == "established"


def test_rule_that_also_accepts_new_connections_is_not_credited_to_the_connection():
    path = established_path()
    path.decided_by.text = "ct state new,established tcp dport 22 accept"
    assert accepted_by_connection(path) is None


def test_invalid_state_is_read_from_the_rule_that_matched_it():
    step = rule_step("prerouting", "ct state invalid drop", verdict="drop", chain="pre")
    path = PacketPath(1, steps=[step], observations=[observation("prerouting", tcp())], hooks=["prerouting"],
                      verdict="drop", decided_by=step, complete=True)
    assert conntrack_json(path) == [{"hook": "prerouting", "state": "invalid", "direction": None, "status": [],
                                     "id": None, "netns": None}]


def test_packet_json_carries_nat_and_kernel_drop():
    path = accepted_at_input()
    path.kernel_drop = {"reason": "NO_SOCKET", "location": "tcp_v4_rcv+0x91", "explain": "x"}
    document = packet_json(path, {})
    assert document["kernel_drop"]["reason"] == "NO_SOCKET"
    assert document["nat"] == []
    assert document["verdict"] == "accept"



def test_a_flood_of_one_flow_with_rule_drops_leaves_no_drop_unpaired_and_no_note():
    """One flow, 3,000 packets in batches of 100 as the socket is read, every tenth dropped by
    a rule: each rule drop's NETFILTER_DROP echo (read with the batch) is consumed, accepted
    packets get no drop, and nothing is left over to be mistaken for a late drop."""
    correlator = DropCorrelator()
    step = rule_step("forward", "udp dport 5001 drop", verdict="drop", chain="forward")
    answered = []
    for batch in range(30):
        echoes = []
        for number in range(batch * 100, batch * 100 + 100):
            at = 10.0 + number * 0.0001
            packet = tcp(sport=40000, dport=5001)
            if number % 10 == 0:
                path = PacketPath(number, steps=[step], observations=[observation("prerouting", packet)],
                                  hooks=["prerouting", "forward"], verdict="drop", decided_by=step, complete=True,
                                  first_seen=at, last_seen=at)
                echoes.append(drop("NETFILTER_DROP", at=at, dport=5001))
            else:
                path = accepted_at_input(at, at, packet)
            answered += correlator.hold([path], now=at)
        correlator.add_drops(echoes)
        answered += correlator.release(now=10.0 + batch * 0.01)
    answered += correlator.release(now=20.0, everything=True)
    assert len(answered) == 3000
    assert [path.trace_id for path in answered if path.kernel_drop is not None] == []
    assert correlator.notes == []
    assert correlator.vanished(accepted_at_input(20.0, 20.0, tcp(sport=40000, dport=5001))) is None


def test_a_flood_the_kernel_does_not_drop_files_nothing_by_headers_until_a_drop_comes():
    """Held and answered packets are filed by their headers for a drop to find them; a flood
    without drops costs no filing. A drop that comes late still finds its answered packet."""
    correlator = DropCorrelator()
    answered = []
    for number in range(2000):
        at = 10.0 + number * 0.001
        answered += correlator.hold([accepted_at_input(at, at, tcp(sport=40000 + number % 7))], now=at)
    answered += correlator.release(now=13.0)
    assert len(answered) == 2000
    indexes = (correlator._held_index, correlator._answered_index, correlator._echo_index)
    assert [index._items for index in indexes] == [{}, {}, {}]
    correlator.add_drops([drop(at=11.9995, sport=40003)])
    assert len(correlator.notes) == 1 and "40003" in correlator.notes[0]


def test_a_drop_after_a_long_flood_files_what_is_still_held_or_answered_and_nothing_gone():
    """Items wait to be filed at the end of their own queue: after 20,000 packets without a drop
    nothing is filed; the first drop files the packets still held and those answered that are
    still remembered, not the thousands released or forgotten before, and finds its packet."""
    correlator = DropCorrelator(hold_seconds=0.3)
    for number in range(20000):
        at = 10.0 + number * 0.001
        path = accepted_at_input(at, at, tcp(sport=40000 + number % 7))
        path.trace_id = number
        correlator.hold([path], now=at)
        if number % 50 == 0:
            correlator.note_drained(at)
            correlator.release(now=at)
    held, answered = correlator._held_index, correlator._answered_index
    assert held._items == {} and answered._items == {}
    last = 10.0 + 19999 * 0.001
    correlator.add_drops([drop("NO_SOCKET", at=last + 0.0001, sport=40000 + 19999 % 7)])

    def filed(index) -> int:
        return sum(len(items) for _, items in index._items.values())

    assert filed(held) == correlator.holding - 1  # the one the drop went to left the index
    assert filed(answered) == 0  # not needed yet
    correlator.add_drops([drop("NO_SOCKET", at=10.0 + 19000 * 0.001 + 0.0001, sport=40000 + 19000 % 7)])
    assert filed(answered) == 4096 - 1  # REMEMBER_MAX of them remembered; the one the drop went to left
    assert len(correlator.notes) == 1 and "40002" in correlator.notes[0]
    # 100 packets more, one dropped by a rule (held in order, waiting for nothing), then a drop:
    # filed are the packets waiting now (not the two the drops went to, nor that one), each once.
    step = rule_step("input", "tcp dport 22 drop", verdict="drop", chain="input")
    for number in range(20000, 20100):
        at = 10.0 + number * 0.001
        path = accepted_at_input(at, at, tcp(sport=40000 + number % 7))
        if number == 20050:
            path.verdict, path.decided_by, path.steps = "drop", step, [step]
        path.trace_id = number
        correlator.hold([path], now=at)
    correlator.add_drops([drop("NO_SOCKET", at=at + 0.0001, sport=40000 + 20099 % 7)])
    assert filed(held) == sum(1 for item in correlator._held if item.waiting) == correlator.holding - 3
    dropped = [path for path in correlator.release(now=at + 1.0) if path.kernel_drop is not None]
    assert [(path.trace_id, path.kernel_drop["reason"]) for path in dropped] == [(19999, "NO_SOCKET"),
                                                                                 (20099, "NO_SOCKET")]


# -- one meaning for the verdict: netfilter's, whatever the kernel did next -----------------------


def test_a_packet_netfilter_dropped_outside_the_traced_chains_is_a_drop_without_deciding_step():
    builder = PathBuilder(Lookup())
    builder.feed(base_chain_event("mark_prerouting", tcp()), now=20.0)
    correlator = DropCorrelator(interfaces={3: "r-client"})
    correlator.add_drops([drop("NETFILTER_DROP", at=20.0)])
    correlator.note_drained(20.005)
    [path] = correlator.hold(builder.close_vanished(correlator.vanished), now=20.01)
    assert (path.complete, path.verdict, path.decided_by, path.vanished_after) == (True, "drop", None, "prerouting")
    assert summary(path) == ("dropped by netfilter outside the traced chains (iptables-legacy, conntrack or NAT), "
                             "after prerouting: NETFILTER_DROP")


def test_a_packet_the_kernel_freed_mid_path_keeps_netfilters_accept_and_no_deciding_step():
    builder = PathBuilder(Lookup())
    builder.feed(base_chain_event("mark_prerouting", tcp()), now=20.0)
    correlator = DropCorrelator()
    correlator.add_drops([drop("NOT_SPECIFIED", at=20.0)])
    correlator.note_drained(20.005)
    [path] = correlator.hold(builder.close_vanished(correlator.vanished), now=20.01)
    assert (path.verdict, path.decided_by, path.kernel_drop["reason"]) == ("accept", None, "NOT_SPECIFIED")
    assert summary(path).startswith("no rule dropped it: it passed every chain up to prerouting, then the kernel "
                                    "dropped it: NOT_SPECIFIED")


def test_a_drop_that_no_packet_built_explains_is_unexplained():
    """`drops` builds a packet held back only when a drop is left that it may explain."""
    correlator = DropCorrelator()
    assert correlator.unexplained() is None
    correlator.add_drops([drop("NO_SOCKET", at=10.0)])
    correlator.note_drained(10.01)
    assert correlator.unexplained() == "kernel" and correlator.remembered == 1


def test_a_netfilter_drop_waits_for_the_rule_drop_it_echoes_until_the_socket_is_read_empty():
    """The echo of a rule's drop can be read before the packet's events, seconds before under
    a backlog: it is unexplained only once the trace socket has been read empty after it."""
    correlator = DropCorrelator()
    correlator.note_drained(9.0)
    correlator.add_drops([drop("NETFILTER_DROP", at=10.0)])
    assert correlator.unexplained() is None
    correlator.note_drained(13.0)
    assert correlator.unexplained() == "netfilter"


def test_a_drop_paired_with_a_packet_is_explained():
    correlator = DropCorrelator()
    correlator.hold([accepted_at_input()], 10.0)
    correlator.add_drops([drop("NO_SOCKET", at=10.1)])
    correlator.note_drained(10.2)
    assert correlator.unexplained() is None and correlator.remembered == 0


def rule_drop(at: float, packet=None, trace_id=7) -> PacketPath:
    step = rule_step("input", "udp dport 8081 drop", verdict="drop")
    return PacketPath(trace_id, steps=[step], observations=[observation("input", packet or tcp())], hooks=["input"],
                      verdict="drop", decided_by=step, complete=True, first_seen=at, last_seen=at)


def test_under_a_backlog_the_echo_of_a_rule_drop_pairs_with_it_seconds_later():
    """nftrace reads the rule's drop 3 s after bpftrace reported the kernel's NETFILTER_DROP
    of it: the socket was not read empty in between, so its events were queued after 9.0."""
    correlator = DropCorrelator()
    correlator.note_drained(9.0)
    correlator.add_drops([drop("NETFILTER_DROP", at=10.0)])
    [path] = correlator.hold([rule_drop(at=13.0)], now=13.0)
    assert path.kernel_drop is None and correlator.remembered == 1
    correlator.note_drained(13.1)
    assert correlator.unexplained() is None  # the echo was consumed


def test_under_a_backlog_a_drop_newer_than_the_last_empty_read_closes_no_open_packet():
    """A later packet of the same flow may be the one dropped: the open packet's end may
    still be queued. Once the socket has been read empty, the drop closes it."""
    builder = PathBuilder(Lookup())
    builder.feed(base_chain_event("mark_prerouting", tcp()), now=20.0)
    correlator = DropCorrelator()
    correlator.note_drained(19.0)
    correlator.add_drops([drop("NETFILTER_DROP", at=20.1)])
    assert builder.close_vanished(correlator.vanished) == []
    correlator.note_drained(21.0)
    [path] = correlator.hold(builder.close_vanished(correlator.vanished), now=21.0)
    assert (path.verdict, path.vanished_after) == ("drop", "prerouting")


def test_an_open_packet_read_after_the_socket_was_read_empty_is_not_closed_by_an_older_drop():
    """Under a burst the events of one packet were lost: only the kernel's NETFILTER_DROP of it
    arrives. A later packet of the same flow, read after the socket was last read empty and
    still open (its end still queued), was queued after that moment: the older drop is not
    its, whatever its age."""
    builder = PathBuilder(Lookup())
    correlator = DropCorrelator()
    correlator.note_drained(10.0)
    correlator.add_drops([drop("NETFILTER_DROP", at=10.2)])  # the lost packet's
    correlator.note_drained(10.3)
    assert correlator.unexplained() == "netfilter"
    builder.feed(base_chain_event("mark_prerouting", tcp()), now=10.5)
    assert builder.close_vanished(correlator.vanished) == []
    assert builder.open_packets == 1


def test_an_open_packet_that_may_have_lost_events_is_not_closed_by_a_drop():
    """Its missing end may be lost events, and the drop another packet's: it ends incomplete."""
    builder = PathBuilder(Lookup())
    builder.feed(base_chain_event("mark_prerouting", tcp()), now=20.0)
    builder.mark_loss()
    correlator = DropCorrelator()
    correlator.note_drained(19.0)
    correlator.add_drops([drop("NETFILTER_DROP", at=20.1)])
    correlator.note_drained(21.0)
    assert builder.close_vanished(correlator.vanished) == []


def test_a_netfilter_drop_is_never_put_on_a_packet_that_left_netfilter():
    """nftrace's observation chain runs last on the exit hooks: no netfilter drop can follow
    it. In a flood of one flow, the echo of a rule drop whose events were lost would otherwise
    fit every accepted packet."""
    correlator = DropCorrelator()
    assert correlator.hold([accepted_at_input(10.0, 10.0)], 10.0) == []  # held for a kernel drop
    correlator.add_drops([drop("NETFILTER_DROP", at=10.05)])
    answered = correlator.release(11.0, everything=True)
    assert [path.kernel_drop for path in answered] == [None]
    assert correlator.notes == []
