"""Decoding NFT_MSG_TRACE: real datagrams recorded on this kernel decode into TraceEvents."""

from pathkit import recorded

from nftrace.trace.events import parse_packet_headers, verdict_name
from nftrace.kernel.monitor import RulesetChanged, TableDeleted, decode_monitor_datagram


def test_every_recorded_datagram_decodes_into_a_trace_event():
    _, events, _ = recorded()
    assert len(events) > 50
    assert all(e.table and e.chain and e.type in ("rule", "policy", "return") for e in events)


def test_the_first_event_of_a_packet_carries_its_headers_and_input_interface():
    _, events, _ = recorded()
    first = events[0]
    assert first.chain == "mark_prerouting" and first.table.startswith("nftrace_")
    assert first.starts_base_chain
    assert str(first.packet.src) == "10.77.1.2" and str(first.packet.dst) == "10.77.1.1"
    assert (first.packet.proto, first.packet.dport) == (6, 22)
    assert first.iif and first.nfproto == 2
    assert first.ct is None  # before conntrack (priority -350 < -200)


def test_later_events_of_a_base_chain_carry_no_headers():
    _, events, _ = recorded()
    assert events[1].packet is None and not events[1].starts_base_chain


def test_conntrack_state_arrives_after_conntrack_ran():
    _, events, _ = recorded()
    later = [e for e in events if e.ct is not None]
    assert later and later[0].ct.state == "new" and later[0].ct.direction == "original"


def test_jump_carries_its_target_chain():
    _, events, _ = recorded()
    jumps = [e for e in events if e.verdict == "jump"]
    assert {e.target for e in jumps} >= {"ssh_zone", "web", "udp_zone"}


def test_verdict_codes_and_queue_numbers():
    assert verdict_name(0) == ("drop", None)
    assert verdict_name(1) == ("accept", None)
    assert verdict_name(-3) == ("jump", None)
    assert verdict_name(-4) == ("goto", None)
    assert verdict_name(-5) == ("return", None)
    # NF_QUEUE with queue number 7 in the high 16 bits
    assert verdict_name(3 | (7 << 16)) == ("queue", 7)


def test_ipv6_headers():
    network = bytes([0x60, 0, 0, 0, 0, 20, 6, 64]) + bytes(15) + b"\x01" + bytes(15) + b"\x02"
    transport = (40000).to_bytes(2, "big") + (22).to_bytes(2, "big") + bytes(16)
    packet = parse_packet_headers(10, network, transport)
    assert (str(packet.src), str(packet.dst), packet.proto, packet.sport, packet.dport) == ("::1", "::2", 6, 40000, 22)
    assert packet.length == 60


def test_truncated_headers_do_not_crash():
    assert parse_packet_headers(2, b"\x45\x00", None) is None
    assert parse_packet_headers(2, b"", None) is None


def test_ruleset_notices_are_recognised():
    # NFT_MSG_NEWGEN (type 10<<8|15) with NFTA_GEN_ID 42, and NFT_MSG_DELTABLE for "nftrace_1_ab".
    def message(msg_type, family, attrs):
        body = bytes([family, 0, 0, 0]) + attrs
        return (16 + len(body)).to_bytes(4, "little") + msg_type.to_bytes(2, "little") + bytes(10) + body

    gen = message((10 << 8) | 15, 0, (8).to_bytes(2, "little") + (1).to_bytes(2, "little") + (42).to_bytes(4, "big"))
    name = b"nftrace_1_ab\0"
    attr = (4 + len(name)).to_bytes(2, "little") + (1).to_bytes(2, "little") + name
    attr += bytes((-len(attr)) % 4)
    table = message((10 << 8) | 2, 1, attr)
    assert list(decode_monitor_datagram(gen)) == [RulesetChanged(42)]
    assert list(decode_monitor_datagram(table)) == [TableDeleted(1, "nftrace_1_ab")]

