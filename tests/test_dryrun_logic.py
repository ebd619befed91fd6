"""The pure parts of the dry run: reading the tools' text, crafting packets, planning where the
packet enters, mapping handles, and the warnings for what the sandbox cannot copy."""

from __future__ import annotations

import struct

import pytest

from nftrace.dryrun.names import TargetNames
from nftrace.dryrun.session import (CONNTRACK_CAVEAT, check_dry_run_flow, conntrack_entry_argv, path_caveats,
                                    plan_injection)
from nftrace.errors import InputError
from nftrace.flow import parse_flow
from nftrace.dryrun.inject import (TCP_ACK, TCP_SYN, Injection, crc32c, ethernet_frame, icmp_echo, internet_checksum,
                            ipv4_packet, sctp_init, tcp_segment, transport, udp_datagram)
from nftrace.dryrun.netstate import (Address, FdbEntry, Interface, NetworkState, RouteLookup, parse_fdb,
                              parse_interfaces, parse_nexthop_lines, parse_route_lines, parse_rule_lines,
                              parse_socket_table, parse_vlans, sandbox_table_text, split_tables)
from nftrace.trace.paths import PacketPath, Step
from nftrace.trace.ruleset import RulesetSnapshot
from nftrace.dryrun.sandbox import IPTABLES_SAVE_RE, _NAME_RE, read_candidate
from nftrace.dryrun.testing import deciding_rule_text


# -- reading a namespace ------------------------------------------------------------------------

def test_multipath_route_lines_join_their_route():
    text = "10.11.0.0/16 \n\tnexthop via 10.9.0.2 dev d0 weight 1 \n\tnexthop via 10.9.0.3 dev d0 weight 2 \n"
    assert parse_route_lines(text, 4) == ["10.11.0.0/16 nexthop via 10.9.0.2 dev d0 weight 1 nexthop via 10.9.0.3 dev d0 weight 2"]


def test_route_state_words_and_lifetimes_are_dropped():
    text = ("default via fe80::1 dev eth0 proto ra metric 1024 expires 1784sec hoplimit 64 pref medium\n"
            "10.0.0.0/8 via 10.9.0.2 dev d0 linkdown\n")
    assert parse_route_lines(text, 6)[0] == "::/0 via fe80::1 dev eth0 proto ra metric 1024 hoplimit 64 pref medium"
    assert parse_route_lines(text, 4)[1] == "10.0.0.0/8 via 10.9.0.2 dev d0"


def test_default_route_says_its_family():
    assert parse_route_lines("default via 10.0.0.1 dev eth0\n", 4) == ["0.0.0.0/0 via 10.0.0.1 dev eth0"]
    assert parse_route_lines("unreachable default dev lo metric 1024\n", 6) == ["unreachable ::/0 dev lo metric 1024"]


def test_route_through_a_nexthop_object_keeps_only_the_object():
    assert parse_route_lines("10.13.0.0/16 nhid 5 via 10.9.0.7 dev d0 \n", 4) == ["10.13.0.0/16 nhid 5"]


def test_nexthop_groups_come_after_the_nexthops_they_use():
    text = "id 3 group 1/2\nid 1 via 10.9.0.7 dev d0 scope link\nid 2 via 10.9.0.8 dev d0 scope link\n"
    assert parse_nexthop_lines(text) == ["id 1 via 10.9.0.7 dev d0", "id 2 via 10.9.0.8 dev d0", "id 3 group 1/2"]


def test_policy_rules_become_replayable_with_their_preference():
    text = "0:\tfrom all lookup local\n32765:\tfrom all fwmark 0x1 lookup 100\n100:\tfrom all iif ghost [detached] lookup 7\n"
    assert parse_rule_lines(text) == ["pref 0 from all lookup local", "pref 32765 from all fwmark 0x1 lookup 100",
                                      "pref 100 from all iif ghost lookup 7"]


def test_interfaces_carry_addresses_mtu_state_and_kind():
    text = ('[{"ifindex":3,"ifname":"wan0","flags":["BROADCAST","UP"],"mtu":1492,"link_type":"ether",'
            '"address":"02:00:00:00:00:01","master":"br0","linkinfo":{"info_kind":"vlan"},"addr_info":['
            '{"family":"inet","local":"10.9.0.5","address":"10.9.0.6","prefixlen":32,"scope":"global","label":"wan0:1"},'
            '{"family":"inet6","local":"fd00::1","prefixlen":64,"scope":"global","noprefixroute":true}]}]')
    [wan] = parse_interfaces(text)
    assert (wan.name, wan.index, wan.mtu, wan.up, wan.kind, wan.master) == ("wan0", 3, 1492, True, "vlan", "br0")
    assert wan.addresses[0].replace_command("wan0") == "address replace 10.9.0.5 peer 10.9.0.6/32 label wan0:1 dev wan0"
    assert wan.addresses[1].replace_command("wan0") == "address replace fd00::1/64 noprefixroute nodad dev wan0"


def test_listening_tcp_and_bound_udp_sockets_are_read_from_proc():
    tcp = ("  sl  local_address rem_address   st\n"
           "   0: 0100007F:0016 00000000:0000 0A 00000000:00000000\n"
           "   1: 0100007F:0017 0200007F:D431 01 00000000:00000000\n")
    udp = ("  sl  local_address rem_address   st\n"
           "   0: 00000000:0035 00000000:0000 07 00000000:00000000\n"
           "   1: 00000000:0036 0200007F:0035 07 00000000:00000000\n")
    assert [(l.address, l.port) for l in parse_socket_table(tcp, "tcp", 4)] == [("127.0.0.1", 22)]
    assert [(l.address, l.port) for l in parse_socket_table(udp, "udp", 4)] == [("0.0.0.0", 53)]
    tcp6 = ("  sl  local_address rem_address st\n"
            "   0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 0\n")
    assert [(l.address, l.port) for l in parse_socket_table(tcp6, "tcp", 6)] == [("::1", 80)]


LISTING = """table inet fw { # handle 7
\tflags owner,persist
\tset admins { # handle 2
\t\ttype ipv4_addr
\t\telements = { 10.0.0.1 }
\t}

\tflowtable ft { # handle 3
\t\thook ingress priority filter
\t\tdevices = { eth0 }
\t\tflags offload
\t}

\tchain input { # handle 1
\t\ttype filter hook input priority filter; policy drop;
\t\tip saddr @admins counter packets 3 bytes 180 accept # handle 5
\t\ttcp dport 22 drop # handle 9
\t}
}
table ip filter { # handle 8
\tchain INPUT { # handle 1
\t\ttype filter hook input priority filter; policy accept;
\t\txt match recent counter packets 0 bytes 0 drop # handle 2
\t}
}
"""


def test_listing_splits_into_tables_and_spots_iptables_nft_compat_rules():
    blocks = split_tables(LISTING)
    assert [(b.family, b.name, b.uses_xtables) for b in blocks] == [("inet", "fw", False), ("ip", "filter", True)]


def test_sandbox_copy_drops_owner_and_offload_flags_and_says_so():
    text, changes = sandbox_table_text(split_tables(LISTING)[0])
    assert "owner" not in text and "persist" not in text and "offload" not in text
    assert "counter packets 3 bytes 180" in text and "elements = { 10.0.0.1 }" in text
    assert changes == ["flowtable offload of table inet fw (hardware offload)"]


def test_target_handles_are_found_by_rule_position():
    sandbox = LISTING.replace("# handle 9", "# handle 4")
    assert TargetNames(LISTING, [], sandbox, []).handle("inet", "fw", "input", 4, 2) == (9, 2)


def test_handles_in_a_path_become_the_targets_own():
    step = Step("input", "inet", "fw", "input", "rule", 4, 2, "tcp dport 22 drop", "drop")
    path = PacketPath(1, steps=[step], decided_by=step)
    TargetNames(LISTING, [], LISTING.replace("# handle 9", "# handle 4"), []).translate(path)
    assert path.decided_by.handle == 9


# -- crafting packets ---------------------------------------------------------------------------

def test_crc32c_matches_the_standard_check_value():
    assert crc32c(b"123456789") == 0xE3069283


def test_a_correct_checksum_sums_to_zero():
    packet = ipv4_packet("10.0.0.1", "10.0.0.2", 6, b"")
    assert internet_checksum(packet[:20]) == 0
    assert internet_checksum(icmp_echo(7)) == 0


@pytest.mark.parametrize("src,dst", [("10.0.0.1", "10.0.0.2"), ("fd00::1", "fd00::2")])
def test_tcp_and_udp_checksums_cover_the_pseudo_header(src, dst):
    from nftrace.dryrun.inject import _pseudo_header

    for proto, segment in ((6, tcp_segment(src, dst, 40000, 22, TCP_SYN, 1)), (17, udp_datagram(src, dst, 40000, 53))):
        assert internet_checksum(_pseudo_header(src, dst, proto, len(segment)) + segment) == 0


def test_syn_carries_linux_options_and_ack_carries_none():
    syn = tcp_segment("10.0.0.1", "10.0.0.2", 40000, 22, TCP_SYN, 1, mss=1460)
    ack = tcp_segment("10.0.0.1", "10.0.0.2", 40000, 22, TCP_ACK, 1, 2)
    assert (syn[12] >> 4, syn[13], syn[20:24]) == (10, TCP_SYN, bytes([2, 4, 0x05, 0xB4]))
    assert (ack[12] >> 4, ack[13]) == (5, TCP_ACK)


def test_sctp_init_checksum_is_crc32c_little_endian():
    packet = sctp_init(5000, 38412, 1234, 99)
    stored = struct.unpack("<I", packet[8:12])[0]
    assert stored == crc32c(packet[:8] + b"\0\0\0\0" + packet[12:])
    assert packet[12] == 1  # INIT


def test_frame_is_addressed_to_the_input_interface():
    injection = Injection("10.0.0.1", "10.0.0.2", "udp", 40000, 53, iif="eth0", netns="h", peer="p2",
                          src_mac="02:00:00:00:00:01", dst_mac="02:00:00:00:00:02")
    frame = ethernet_frame(injection)
    assert frame[:6] == bytes.fromhex("020000000002") and frame[6:12] == bytes.fromhex("020000000001")
    assert frame[12:14] == b"\x08\x00" and frame[14 + 9] == 17


def test_a_neighbour_solicitation_goes_to_the_solicited_node_group_with_the_senders_mac():
    from nftrace.dryrun.inject import _pseudo_header, multicast_mac, neighbour_solicitation, solicited_node

    group = solicited_node("fd77:1::abcd:1")
    assert (group, multicast_mac(group)) == ("ff02::1:ffcd:1", "33:33:ff:cd:00:01")
    message = neighbour_solicitation("fd77:1::2", "fd77:1::abcd:1", "02:00:00:00:00:05")
    assert (message[0], message[8:24], message[24:32]) == (
        135, bytes.fromhex("fd77000100000000 00000000abcd0001"), bytes.fromhex("0101 020000000005"))
    assert internet_checksum(_pseudo_header("fd77:1::2", group, 58, len(message)) + message) == 0
    frame = ethernet_frame(Injection("fd77:1::2", group, "icmpv6", iif="eth0", netns="h", peer="p2",
                                     src_mac="02:00:00:00:00:05", dst_mac=multicast_mac(group),
                                     nd_target="fd77:1::abcd:1"))
    assert frame[14 + 7] == 255  # hop limit: a receiver ignores neighbour discovery with any other


def test_a_neighbour_advertisement_answers_for_its_target_unicast_with_its_mac():
    from nftrace.dryrun.inject import _pseudo_header

    injection = Injection("fd77:2::2", "fd77:2::1", "icmpv6", iif="eth1", netns="h", peer="p3",
                          src_mac="02:00:00:00:00:07", dst_mac="02:00:00:00:00:01", nd_target="fd77:2::2",
                          nd_advert=True)
    frame = ethernet_frame(injection)
    message = frame[14 + 40:]
    assert (message[0], message[4:8], message[8:24], message[24:32]) == (
        136, bytes.fromhex("60000000"), bytes.fromhex("fd770002000000000000000000000002"),
        bytes.fromhex("0201 020000000007"))  # solicited, override; option 2: the target's link-layer address
    assert internet_checksum(_pseudo_header("fd77:2::2", "fd77:2::1", 58, len(message)) + message) == 0
    assert frame[14 + 7] == 255


def test_the_address_a_neighbour_resolves_is_on_its_prefix_else_link_local():
    from nftrace.dryrun.session import neighbour_target

    lan = Interface(2, "lan0", "ether", addresses=[Address(6, "fe80::1", 64, scope="link"), Address(6, "fd77:1::1", 64),
                                                   Address(6, "fd88::1", 64)])
    assert neighbour_target(lan, "fd88::5") == "fd88::1"
    assert neighbour_target(lan, "fd99::5") == "fe80::1"
    assert neighbour_target(None, "fd88::5") is None


# -- planning -----------------------------------------------------------------------------------

def _state() -> NetworkState:
    lan = Interface(2, "lan0", "ether", mac="02:00:00:00:00:aa", addresses=[Address(4, "10.0.0.1", 24)])
    lo = Interface(1, "lo", "loopback", addresses=[Address(4, "127.0.0.1", 8)])
    state = NetworkState("r", interfaces=[lo, lan])
    state.neighbours = {("lan0", "10.0.0.5"): "02:00:00:00:00:05"}
    return state


def _peers():
    from nftrace.dryrun.sandbox import PeerLink

    return {"lan0": PeerLink("lan0", "p2", "02:00:00:00:00:aa")}


def test_packet_arrives_where_the_route_back_to_its_source_points():
    flow = parse_flow("10.0.0.5", "10.0.0.1", "tcp", None, 22)
    plan = plan_injection(flow, _state(), _peers(), "h", "new", RouteLookup("lan0", None, False), token=lambda n: 0)
    assert (plan.iif, plan.peer, plan.netns, plan.dst_mac, plan.src_mac) == ("lan0", "p2", "h", "02:00:00:00:00:aa",
                                                                              "02:00:00:00:00:05")
    assert plan.sport == 32768


def test_a_flow_from_an_own_address_is_sent_from_a_local_socket():
    flow = parse_flow("10.0.0.1", "10.0.0.5", "udp", 5000, 53)
    plan = plan_injection(flow, _state(), _peers(), "h", "new", None)
    assert plan.local and plan.sport == 5000 and plan.netns is None


def test_no_route_back_and_no_iif_is_an_input_error():
    flow = parse_flow("192.0.2.1", "10.0.0.1", "tcp", None, 22)
    with pytest.raises(InputError, match="no route back to 192.0.2.1.*--iif"):
        plan_injection(flow, _state(), _peers(), "h", "new", None)


def test_unknown_iif_is_an_input_error():
    flow = parse_flow("192.0.2.1", "10.0.0.1", "tcp", None, 22, iif="wan9")
    with pytest.raises(InputError, match="no interface 'wan9'"):
        plan_injection(flow, _state(), _peers(), "h", "new", None)


def _bridged_state() -> NetworkState:
    """br0 (10.0.0.1/24) with ports p1 and p2; the bridge learnt 10.0.0.5's MAC behind p2."""
    br0 = Interface(2, "br0", "ether", kind="bridge", mac="02:00:00:00:00:b0", up=True,
                    addresses=[Address(4, "10.0.0.1", 24)])
    p1 = Interface(3, "p1", "ether", kind="veth", mac="02:00:00:00:00:01", up=True, master="br0")
    p2 = Interface(4, "p2", "ether", kind="veth", mac="02:00:00:00:00:02", up=True, master="br0")
    state = NetworkState("sw", interfaces=[br0, p1, p2])
    state.neighbours = {("br0", "10.0.0.5"): "02:00:00:00:00:05", ("br0", "10.0.0.6"): "02:00:00:00:00:06"}
    state.fdb = [FdbEntry("02:00:00:00:00:05", "p2", "br0")]
    return state


def _bridged_peers():
    from nftrace.dryrun.sandbox import PeerLink

    return {"p1": PeerLink("p1", "h3", "02:00:00:00:00:01"), "p2": PeerLink("p2", "h4", "02:00:00:00:00:02")}


def test_a_packet_for_a_bridge_enters_through_the_port_its_source_was_learnt_on():
    flow = parse_flow("10.0.0.5", "10.0.0.1", "tcp", None, 22)
    plan = plan_injection(flow, _bridged_state(), _bridged_peers(), "h", "new", RouteLookup("br0", None, False),
                          route_to=RouteLookup("lo", None, True))
    assert (plan.iif, plan.peer, plan.src_mac, plan.dst_mac) == ("p2", "h4", "02:00:00:00:00:05", "02:00:00:00:00:b0")


def test_a_frame_between_two_hosts_of_a_bridge_is_addressed_to_the_destination_host():
    flow = parse_flow("10.0.0.5", "10.0.0.6", "udp", None, 53)
    notes = []
    plan = plan_injection(flow, _bridged_state(), _bridged_peers(), "h", "new", RouteLookup("br0", None, False),
                          route_to=RouteLookup("br0", None, False), notes=notes)
    assert (plan.iif, plan.dst_mac) == ("p2", "02:00:00:00:00:06") and notes == []


def test_a_source_the_bridge_has_not_learnt_enters_through_the_first_port_and_says_so():
    flow = parse_flow("10.0.0.9", "10.0.0.1", "tcp", None, 22)
    notes = []
    plan = plan_injection(flow, _bridged_state(), _bridged_peers(), "h", "new", RouteLookup("br0", None, False),
                          route_to=RouteLookup("lo", None, True), notes=notes)
    assert plan.iif == "p1" and "--iif PORT" in notes[0]


def test_iif_may_name_a_bridge_port():
    flow = parse_flow("10.0.0.5", "10.0.0.6", "udp", None, 53, iif="p1")
    plan = plan_injection(flow, _bridged_state(), _bridged_peers(), "h", "new", None,
                          route_to=RouteLookup("br0", None, False))
    assert (plan.iif, plan.peer, plan.dst_mac) == ("p1", "h3", "02:00:00:00:00:06")


def test_bridges_keep_their_options_ports_and_learnt_addresses():
    text = ('[{"ifindex":2,"ifname":"br0","flags":["UP"],"mtu":1500,"link_type":"ether","address":"02:00:00:00:00:b0",'
            '"linkinfo":{"info_kind":"bridge","info_data":{"stp_state":1,"vlan_filtering":1,"mcast_snooping":1,'
            '"group_fwd_mask":"0"}}}]')
    [br0] = parse_interfaces(text)
    assert br0.bridge == {"vlan_filtering": "1", "stp_state": "1"}  # defaults are not repeated
    fdb = ('[{"mac":"02:00:00:00:00:05","ifname":"p2","flags":[],"master":"br0","state":""},'
           '{"mac":"02:00:00:00:00:02","ifname":"p2","flags":[],"master":"br0","state":"permanent"},'
           '{"mac":"33:33:00:00:00:01","ifname":"br0","flags":["self"],"state":"permanent"}]')
    assert parse_fdb(fdb) == [FdbEntry("02:00:00:00:00:05", "p2", "br0")]
    vlans = parse_vlans('[{"ifname":"p1","vlans":[{"vlan":10,"flags":["PVID","Egress Untagged"]},{"vlan":20,"vlanEnd":29}]}]')
    assert [vlan.add_command(False) for vlan in vlans] == ["vlan add dev p1 vid 10 pvid untagged", "vlan add dev p1 vid 20-29"]


@pytest.mark.parametrize("args,message", [
    (("10.0.0.0/24", "10.0.0.1", "tcp", None, 22), "--from must be one address"),
    (("10.0.0.5", "10.0.0.1", None, None, None), "give --proto"),
    (("10.0.0.5", "10.0.0.1", "udp", None, None), "give --dport"),
])
def test_a_dry_run_needs_one_concrete_packet(args, message):
    with pytest.raises(InputError, match=message):
        check_dry_run_flow(parse_flow(*args), "new")


def test_established_tcp_connection_entry_is_assured_and_established():
    argv = conntrack_entry_argv(Injection("10.0.0.5", "10.0.0.1", "tcp", 40000, 22, state="established"))
    assert argv[:2] == ["conntrack", "-I"]
    assert "--state" in argv and argv[argv.index("--state") + 1] == "ESTABLISHED"
    assert argv[argv.index("-u") + 1] == "SEEN_REPLY,ASSURED"


# -- caveats ------------------------------------------------------------------------------------

CAVEAT_LISTING = """table inet fw { # handle 1
\tchain input { # handle 1
\t\ttype filter hook input priority filter; policy drop;
\t\tct state established accept # handle 2
\t\ttcp dport 22 jump owners # handle 3
\t}
\tchain owners { # handle 4
\t\tmeta skuid 1000 accept # handle 5
\t}
\tchain unused { # handle 6
\t\tsocket transparent 1 accept # handle 7
\t}
}
"""


def _path_through(*chains):
    steps = [Step("input", "inet", "fw", chain, "rule", 3, 1, None, "jump", target=target) for chain, target in chains]
    return PacketPath(1, steps=steps)


def test_a_rule_on_the_path_that_needs_what_was_not_copied_gives_a_warning():
    snapshot = RulesetSnapshot(CAVEAT_LISTING)
    caveats = path_caveats(_path_through(("input", "owners")), snapshot, "new")
    assert caveats[0] == CONNTRACK_CAVEAT
    assert any("socket owners" in caveat for caveat in caveats)
    assert not any("matches sockets" in caveat for caveat in caveats)  # chain `unused` is not on the path


def test_conntrack_warning_is_not_given_for_an_established_dry_run():
    snapshot = RulesetSnapshot(CAVEAT_LISTING)
    assert CONNTRACK_CAVEAT not in path_caveats(_path_through(("input", None)), snapshot, "established")


# -- names, files, output -------------------------------------------------------------------------

def test_sandbox_names_carry_the_pid():
    assert _NAME_RE.match("nftrace-sbx-1234-abcdef").group(1) == "1234"
    assert _NAME_RE.match("nftrace-sbx-1234-abcdef-h").group(1) == "1234"
    assert _NAME_RE.match("nftrace-sbx-1234-abcdef-lab-router")
    assert not _NAME_RE.match("nftrace-sbxx-1234-abcdef")


def test_iptables_save_text_is_told_from_nft(tmp_path):
    save = tmp_path / "rules.v4"
    save.write_text("*filter\n:INPUT DROP [0:0]\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n")
    nft = tmp_path / "rules.nft"
    nft.write_text("table inet t { chain c { type filter hook input priority 0; } }\n")
    assert IPTABLES_SAVE_RE.search(save.read_text())
    assert read_candidate(save, "iptables-legacy").kind == "iptables-legacy"
    assert read_candidate(save).kind in ("iptables-legacy", "iptables-nft")
    assert read_candidate(nft).kind == "nft"


def test_ipv6_iptables_save_text_is_recognised(tmp_path):
    save = tmp_path / "rules.v6"
    save.write_text("*filter\n-A INPUT -s fd00::/64 -p tcp -j ACCEPT\nCOMMIT\n")
    assert read_candidate(save, "iptables-nft").family == 6


def test_unreadable_ruleset_is_a_one_line_input_error(tmp_path):
    with pytest.raises(InputError, match=r"^--ruleset: cannot read .*missing.nft: No such file or directory$"):
        read_candidate(tmp_path / "missing.nft")


def test_deciding_rule_text_reads_like_nft():
    assert deciding_rule_text({"decided_by": {"family": "inet", "table": "fw", "chain": "input", "type": "policy",
                                              "verdict": "drop"}}) == "inet fw input policy drop"
    assert deciding_rule_text(None) == "(no packet seen)"


# -- the other side's answer (--fix proves that it comes back) ------------------------------------

def _path_leaving(last_src, last_dst, sport, dport, hooks, oif=2):
    import ipaddress

    from nftrace.trace.events import PacketHeaders
    from nftrace.trace.paths import HookObservation

    packet = PacketHeaders(ipaddress.ip_address(last_src), ipaddress.ip_address(last_dst), 6, 60, sport, dport)
    observation = HookObservation(hooks[-1], "nftrace", "obs", packet, 3, oif, None, None, own=True)
    return PacketPath(1, observations=[observation], hooks=list(hooks), verdict="accept", complete=True)


def test_the_answer_to_a_forwarded_syn_is_a_syn_ack_arriving_where_the_syn_left():
    from nftrace.dryrun.session import reply_injection

    sent = Injection("10.9.0.7", "10.0.0.5", "tcp", 40000, 80, seq=1000, iif="wan0")
    # Masqueraded on the way out: the answer goes to the address the packet left with.
    path = _path_leaving("10.0.0.1", "10.0.0.5", 61000, 80, ["prerouting", "forward", "postrouting"])
    reply = reply_injection(sent, path, {2: "lan0"}, _state(), _peers(), "h", token=lambda n: 0)
    assert (reply.src, reply.dst, reply.sport, reply.dport) == ("10.0.0.5", "10.0.0.1", 80, 61000)
    assert (reply.iif, reply.peer, reply.src_mac, reply.state, reply.ack) == ("lan0", "p2", "02:00:00:00:00:05",
                                                                              "reply", 1001)
    segment = transport(reply)
    assert segment[13] == TCP_SYN | TCP_ACK and struct.unpack("!I", segment[8:12])[0] == 1001


def test_the_box_answers_a_packet_delivered_to_itself_from_a_local_socket():
    from nftrace.dryrun.session import reply_injection

    sent = Injection("10.0.0.5", "10.0.0.1", "udp", 5353, 53, iif="lan0")
    path = _path_leaving("10.0.0.5", "10.0.0.1", 5353, 53, ["prerouting", "input"], oif=None)
    reply = reply_injection(sent, path, {2: "lan0"}, _state(), _peers(), "h")
    assert reply.local and (reply.src, reply.sport, reply.dport) == ("10.0.0.1", 53, 5353)


def test_there_is_no_answer_to_an_established_packet_or_an_sctp_init():
    from nftrace.dryrun.session import reply_injection

    path = _path_leaving("10.0.0.5", "10.0.0.1", 5353, 53, ["prerouting", "input"], oif=None)
    for sent in (Injection("10.0.0.5", "10.0.0.1", "tcp", 1, 2, state="established"),
                 Injection("10.0.0.5", "10.0.0.1", "sctp", 1, 2)):
        assert reply_injection(sent, path, {}, _state(), _peers(), "h") is None
