"""`nftrace drops` builds a packet's path only when the packet can be a drop (drops/deferred.py).

The reference is the path builder fed every event: whatever it finds dropped must come out
the same with deferral, and a packet that the kernel drops after netfilter must still be
there to pair with. tests/data/router-flows.json holds real datagrams of flows the router's
ruleset accepts and drops (tests/record_trace.py); a flood is made of real bytes with new
trace ids, and the loopback case is encoded in the kernel's attribute order.
"""

from __future__ import annotations

import ipaddress
import json
import struct
from pathlib import Path

import pytest

from nftrace.drops.deferred import DeferredPackets
from nftrace.drops.eventstash import (ACCEPTED, RECORD_HEADER, RECORD_SIZE, StashedPacket, queue_records,
                                     split_record)
from nftrace.errors import InputError
from nftrace.kernel.monitor import EventsLost, ReadEarlier
from nftrace.kernel.netlink import decode_datagram
from nftrace.trace.events import TRACE_MESSAGE_TYPE, decode_trace_message, pyroute2_trace_message_class
from nftrace.trace.paths import PathBuilder
from nftrace.trace.report import packet_json
from nftrace.trace.ruleset import RulesetSnapshot

DATA = Path(__file__).parent / "data"
RECORDING = json.loads((DATA / "router-flows.json").read_text())
SNAPSHOT = RulesetSnapshot(RECORDING["listing"])
OWN = "nftrace_100_abcdef"


def recorded() -> list[bytes]:
    return [raw for line in RECORDING["datagrams"] for kind, raw in decode_datagram(bytes.fromhex(line))
            if kind == TRACE_MESSAGE_TYPE]


def with_trace_id(raw: bytes, trace_id: int) -> bytes:
    """The same event for another packet: the kernel puts the id at a fixed place (events.py)."""
    return raw[:40] + struct.pack(">I", trace_id) + raw[44:]


def build_all(datagrams: list, now: float = 1.0) -> list:
    """The reference: every event to the path builder."""
    builder = PathBuilder(SNAPSHOT)
    paths = []
    for raw in datagrams:
        paths += builder.feed(decode_trace_message(raw), now)
    return paths + builder.flush()


def feed(builder: PathBuilder, items, now: float) -> list:
    """What the session does with the items DeferredPackets gives (trace/session.py _dispatch)."""
    paths = []
    for item in items:
        if isinstance(item, ReadEarlier):
            for event, when in item.timed():
                paths += builder.feed(event, when)
        elif isinstance(item, EventsLost):
            builder.mark_loss()
        else:
            paths += builder.feed(item, now)
    return paths


def build_deferred(datagrams: list, now: float = 1.0, **options) -> tuple[list, DeferredPackets, list]:
    """Through DeferredPackets, as `drops` reads them: (paths built, the deferral, packets let go)."""
    builder = PathBuilder(SNAPSHOT)
    unbuilt = []
    deferred = DeferredPackets(builder, on_unbuilt=unbuilt.append, **options)
    return feed(builder, deferred.read(datagrams, now), now), deferred, unbuilt


def as_json(paths: list) -> list:
    return [packet_json(path, {}) for path in paths]


def dropped(paths: list) -> list:
    return [path for path in paths if path.complete and path.verdict == "drop"]


def test_every_recorded_drop_is_built_as_without_deferral():
    reference = build_all(recorded())
    paths, _, _ = build_deferred(recorded())
    assert dropped(reference)  # the recording drops by rule, policy and reject
    assert as_json(dropped(paths)) == as_json(dropped(reference))


def test_accepted_packets_are_not_built_and_are_counted_when_let_go():
    reference = build_all(recorded())
    accepted = [path for path in reference if path.verdict == "accept"]
    paths, deferred, unbuilt = build_deferred(recorded())
    assert accepted and not [path for path in paths if path.verdict == "accept"]
    assert deferred.held == len(accepted)
    deferred.finish()
    assert sum(unbuilt) == len(accepted) and deferred.held == 0


def test_a_kernel_drop_sends_every_held_packet_on_in_the_order_it_came():
    datagrams = recorded()
    builder = PathBuilder(SNAPSHOT)
    deferred = DeferredPackets(builder)
    paths = feed(builder, deferred.read(datagrams, 1.0), 1.0)
    deferred.suspend(1.0)  # a kernel drop that nothing built explains: what is held may be its packet
    paths += feed(builder, deferred.read((), 2.0), 2.0)
    paths += builder.flush()
    assert sorted(map(json.dumps, as_json(paths))) == sorted(map(json.dumps, as_json(build_all(datagrams))))
    assert deferred.held == 0


def test_after_a_kernel_drop_every_event_goes_straight_on_for_a_while():
    builder = PathBuilder(SNAPSHOT)
    deferred = DeferredPackets(builder, keep_seconds=10.0)
    deferred.suspend(1.0, seconds=10.0)
    items = list(deferred.read(recorded(), 5.0))
    assert len(items) == len(recorded()) and deferred.held == 0
    list(deferred.read(recorded(), 11.5))
    assert deferred.held > 0


def flood(packets: int) -> list:
    """`packets` copies of the recorded forwarded, accepted packet, each under a trace id of its own."""
    forward = [raw for raw in recorded() if decode_trace_message(raw).trace_id == _forwarded_id()]
    return [with_trace_id(raw, 1000 + n) for n in range(packets) for raw in forward]


def _forwarded_id() -> int:
    path = next(path for path in build_all(recorded()) if path.verdict == "accept" and "forward" in path.hooks)
    return path.trace_id


def test_packets_held_as_accepted_stay_bounded_under_a_flood():
    paths, deferred, unbuilt = build_deferred(flood(300), keep_packets=100)
    assert paths == []
    assert deferred.held == 100 and sum(unbuilt) == 200


def test_accepted_packets_are_let_go_once_too_old_for_a_kernel_drop():
    builder = PathBuilder(SNAPSHOT)
    unbuilt = []
    deferred = DeferredPackets(builder, keep_seconds=10.0, on_unbuilt=unbuilt.append)
    list(deferred.read(flood(5), 1.0))
    list(deferred.read((), 10.9))
    assert deferred.held == 5
    list(deferred.read((), 11.0))
    assert deferred.held == 0 and sum(unbuilt) == 5


def test_a_packet_still_open_when_it_goes_idle_is_let_go():
    start = [raw for raw in flood(1) if "mark_" in decode_trace_message(raw).chain]
    builder = PathBuilder(SNAPSHOT)
    unbuilt = []
    deferred = DeferredPackets(builder, on_unbuilt=unbuilt.append)
    assert list(deferred.read(start, 1.0)) == []
    assert deferred.held == 1
    list(deferred.read((), 1.0 + builder.idle_seconds))
    assert deferred.held == 0 and unbuilt == [1]


def test_a_lost_event_lets_go_of_the_packets_still_open_and_keeps_the_accepted():
    start = [raw for raw in flood(1) if "mark_" in decode_trace_message(raw).chain]
    builder = PathBuilder(SNAPSHOT)
    unbuilt = []
    deferred = DeferredPackets(builder, on_unbuilt=unbuilt.append)
    items = list(deferred.read(flood(2) + [with_trace_id(raw, 5) for raw in start] + [None], 1.0))
    assert len(items) == 1 and isinstance(items[0], EventsLost)
    assert deferred.held == 2 and unbuilt == [1]


def kernel_message(trace_id: int, chain: str, verdict: int, oif: int = 0, handle: int = 0, table: str = OWN) -> bytes:
    """An NFT_MSG_TRACE with its attributes in the kernel's order (nft_trace_notify)."""
    attrs = [("NFTA_TRACE_NFPROTO", 2), ("NFTA_TRACE_TYPE", 3), ("NFTA_TRACE_ID", trace_id),
             ("NFTA_TRACE_CHAIN", chain), ("NFTA_TRACE_TABLE", table)]
    if handle:
        attrs.append(("NFTA_TRACE_RULE_HANDLE", handle))
    attrs.append(("NFTA_TRACE_VERDICT", {"attrs": [("NFTA_VERDICT_CODE", verdict)]}))
    if oif:
        network = bytes([0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0]) + ipaddress.ip_address("10.77.1.1").packed \
            + ipaddress.ip_address("10.77.1.1").packed
        attrs += [("NFTA_TRACE_OIF", oif), ("NFTA_TRACE_OIFTYPE", 772), ("NFTA_TRACE_NETWORK_HEADER", network),
                  ("NFTA_TRACE_TRANSPORT_HEADER", struct.pack(">HHHH", 40000, 53, 8, 0))]
    msg = pyroute2_trace_message_class()()
    msg["header"]["type"] = TRACE_MESSAGE_TYPE
    msg["nfgen_family"] = 1
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data[: msg["header"]["length"]])


def test_a_packet_out_through_loopback_is_built_it_comes_back_in_to_be_judged():
    sent = [kernel_message(7, "mark_output", 1, oif=1, handle=3), kernel_message(7, "obs_postrouting", 1, oif=1, handle=4)]
    paths, deferred, _ = build_deferred(sent)
    assert deferred.held == 0  # built: its way back in, under a new trace id, may end in a drop


def test_a_packet_out_through_another_device_is_held_as_accepted():
    sent = [kernel_message(7, "mark_output", 1, oif=3, handle=3), kernel_message(7, "obs_postrouting", 1, oif=3, handle=4)]
    paths, deferred, _ = build_deferred(sent)
    assert paths == [] and deferred.held == 1


def test_after_a_loss_packets_that_start_before_the_socket_is_read_empty_are_let_go():
    builder = PathBuilder(SNAPSHOT)
    unbuilt = []
    deferred = DeferredPackets(builder, on_unbuilt=unbuilt.append)
    packets = flood(3)
    feed(builder, deferred.read([None] + packets, 1.0), 1.0)
    assert deferred.held == 0 and builder.open_packets == 0 and unbuilt == [1, 1, 1]
    builder.socket_drained()
    list(deferred.read(packets, 1.0))
    assert deferred.held == 3


def test_a_netfilter_drop_nothing_explains_sends_the_open_packets_on_and_keeps_the_accepted():
    start = [raw for raw in flood(1) if "mark_" in decode_trace_message(raw).chain]
    builder = PathBuilder(SNAPSHOT)
    deferred = DeferredPackets(builder)
    list(deferred.read(flood(2), 1.0))
    list(deferred.read([with_trace_id(raw, 5) for raw in start], 1.0))
    assert deferred.held == 3
    deferred.release_open()  # it may have vanished inside netfilter (conntrack dropped it)
    [item] = deferred.read((), 1.5)
    assert isinstance(item, ReadEarlier) and {event.trace_id for event in item.events} == {5}
    assert deferred.held == 2


def test_a_record_from_the_kernel_stash_reads_back_as_its_events_and_times():
    events = recorded()[:3]
    body = b"".join(events)
    header = RECORD_HEADER.pack(len(body), len(events), ACCEPTED, 0, 2_500_000_000, 2_750_000_000)
    record = (header + body).ljust(RECORD_SIZE, b"\0")
    assert split_record(record) == (events, 2.5, 2.75, True)


def test_packets_the_kernel_stashed_are_held_as_if_read_and_a_kernel_drop_sends_them_on():
    """eventstash.py: an accepted packet's events stay in the kernel; when a kernel drop that
    nothing explains asks for them, they are held here with the times the kernel noted."""
    datagrams = recorded()
    by_packet: dict = {}
    for raw in datagrams:
        by_packet.setdefault(decode_trace_message(raw).trace_id, []).append(raw)
    stashed = [StashedPacket(events, first=1.0 + n, last=1.5 + n, accepted=True)
               for n, events in enumerate(by_packet.values())]
    builder = PathBuilder(SNAPSHOT)
    deferred = DeferredPackets(builder)
    deferred.hold(stashed)
    assert deferred.held == len(stashed)
    deferred.suspend(9.0)
    items = list(deferred.read((), 9.0))
    assert [(item.first, item.last) for item in items] == [(packet.first, packet.last) for packet in stashed]
    paths = feed(builder, items, 9.0) + builder.flush()
    assert sorted(map(json.dumps, as_json(paths))) == sorted(map(json.dumps, as_json(build_all(datagrams))))


def test_the_stash_queue_size_is_a_number_of_records_or_a_clear_error(monkeypatch):
    monkeypatch.delenv("NFTRACE_STASH_RECORDS", raising=False)
    assert queue_records() == 4096
    monkeypatch.setenv("NFTRACE_STASH_RECORDS", "32")
    assert queue_records() == 32
    for bad in ("abc", "0", "-5", "99999999"):
        monkeypatch.setenv("NFTRACE_STASH_RECORDS", bad)
        with pytest.raises(InputError, match=f"^NFTRACE_STASH_RECORDS: '{bad}' is not a number of records"):
            queue_records()
