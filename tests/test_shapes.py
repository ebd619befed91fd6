"""Paths made from the shape of an earlier packet's events are the paths the builder builds.

Pure logic. The reference is PathBuilder without shapes: every stream here, real recordings
replayed as later packets of the same flows and hand-written streams that interleave, reuse
trace ids, lose events and go idle, must give the same answers, in JSON, both ways.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pathkit import DATA, first, headers, mark, observe, recorded, rule
from test_paths import SNAPSHOT
from test_properties import arbitrary_events, interleaved_packets

from nftrace.flow import parse_flow
from nftrace.trace.events import TraceEvent, decode_trace_message
from nftrace.trace.jsonstream import JsonStream
from nftrace.trace.paths import PathBuilder
from nftrace.trace.report import TraceReport, packet_json
from nftrace.trace.shapes import PathShapes


def shaped(event: TraceEvent) -> TraceEvent:
    """A hand-written event with the shape the decoder would give it: every field the builder
    reads, none of those that only tell packets apart (trace id, IPv4 id, TCP sequence)."""
    packet = event.packet and replace(event.packet, ip_id=None, tcp_seq=None, tcp_ack=None)
    fields = (event.family, event.table, event.chain, event.type, event.verdict, event.handle, event.target,
              event.nfproto, event.iif, event.oif, event.mark, packet, event.ct, event.queue_num)
    return replace(event, shape=fields)


def build(stream, shapes: bool, loss_at=(), idle_at=None, snapshot=SNAPSHOT, hook_ends=None) -> tuple[list, PathBuilder]:
    """Feed `stream` ((event, time) pairs); the kernel reports a loss before each index in
    `loss_at`; expiry runs at `idle_at`. The paths finished, in order, and the builder."""
    builder = PathBuilder(snapshot, idle_seconds=1.0, shapes=PathShapes() if shapes else None, hook_ends=hook_ends)
    paths = []
    for index, (event, now) in enumerate(stream):
        if index in loss_at:
            builder.mark_loss()
        paths += builder.feed(event, now)
        if idle_at is not None and index == idle_at:
            paths += builder.expire(now + 5)
    return paths + builder.flush(), builder


def documents(paths) -> list:
    return [json.dumps(packet_json(path, {2: "eth0", 3: "eth1"})) for path in paths]


def same_answers(stream, **options) -> PathBuilder:
    """Both ways, the same packets, in any order (expiry and the end of a run close the packets
    still open in an order of their own)."""
    reference, _ = build(stream, shapes=False, **options)
    made, builder = build(stream, shapes=True, **options)
    assert sorted(documents(made)) == sorted(documents(reference))
    return builder


def later_packet(events: list, trace_id: int, ip_id: int) -> list:
    """The same packet again: another trace id, its own IPv4 id and TCP sequence number."""
    return [replace(event, trace_id=trace_id,
                    packet=event.packet and replace(event.packet, ip_id=ip_id, tcp_seq=ip_id * 1000))
            for event in events]


def accepted_packet(trace_id: int, dport: int = 22) -> list:
    packet = headers(dport=dport)
    return [shaped(event) for event in [
        *mark(trace_id, packet=packet), *observe(trace_id, "prerouting", packet=packet),
        first(trace_id, "input", 7, "jump", "zone", packet=packet), rule(trace_id, "zone", 5, "accept"),
        *observe(trace_id, "input", packet=packet)]]


# -- real recordings ------------------------------------------------------------------------------


def test_the_packets_of_a_real_recording_met_again_get_the_paths_the_builder_builds():
    snapshot, events, _ = recorded()
    stream = list(events)
    for round_number in (1, 2):
        stream += [replace(event, trace_id=event.trace_id ^ (round_number << 28),
                           packet=event.packet and replace(event.packet, ip_id=round_number))
                   for event in events]
    made = {}
    for shapes in (False, True):
        builder = PathBuilder(snapshot, shapes=PathShapes() if shapes else None)
        paths = [path for event in stream for path in builder.feed(event, 1.0)] + builder.flush()
        made[shapes] = paths
    assert documents(made[True]) == documents(made[False])
    assert builder.shapes.built >= len(made[True]) // 2  # the second and third rounds, nearly all


def test_a_flood_of_one_flow_is_built_once():
    """Each packet of a real recording, sent again 20 times: every copy is made from its shape."""
    snapshot, events, _ = recorded()
    assert all(event.shape is not None for event in events)
    for trace_id in sorted({event.trace_id for event in events})[:10]:
        packet = [event for event in events if event.trace_id == trace_id]
        flood = [event for number in range(1, 21) for event in later_packet(packet, 1000 + number, number)]
        reference, _ = build([(event, 1.0) for event in packet + flood], shapes=False, snapshot=snapshot)
        made, builder = build([(event, 1.0) for event in packet + flood], shapes=True, snapshot=snapshot)
        assert documents(made) == documents(reference)
        finished_first = reference[0].complete and reference[0].trace_id == trace_id
        assert builder.shapes.built == (20 if finished_first else 0)


# -- what a path made from a shape holds -----------------------------------------------------------


def test_a_path_made_from_a_shape_has_its_own_packet_headers_and_trace_id():
    stream = [(event, 1.0) for event in accepted_packet(1)]
    stream += [(event, 2.0) for event in later_packet(accepted_packet(1), 2, ip_id=42)]
    paths, builder = build(stream, shapes=True)
    assert builder.shapes.built == 1
    later = paths[1]
    assert later.trace_id == 2 and later.shape is not None
    assert {observation.packet.ip_id for observation in later.observations} == {42}
    assert {observation.packet.tcp_seq for observation in later.observations} == {42000}
    assert (later.first_seen, later.last_seen) == (2.0, 2.0)


def test_a_path_made_from_a_shape_is_the_callers_own_but_for_its_steps():
    """Steps are shared by the paths of a shape: what callers set on one (its namespace, its
    iptables form) is the same for all of them; a step that must differ is replaced."""
    stream = [(event, 1.0) for event in accepted_packet(1) + accepted_packet(2) + accepted_packet(3)]
    builder = PathBuilder(SNAPSHOT, shapes=PathShapes())
    paths = [path for event, now in stream for path in builder.feed(event, now)]
    for path in paths[:2]:  # what callers do to a path they are given: none of it reaches the next
        path.steps[0] = replace(path.steps[0], netns="elsewhere")
        path.observations[0].mark = 9
        path.hooks.append("output")
        path.nat.append({"hook": "input"})
        path.kernel_drop = {"reason": "NO_SOCKET"}
    assert paths[2].steps[0].netns is None and paths[2].observations[0].mark is None
    assert paths[2].hooks == ["prerouting", "input"] and paths[2].nat == [] and paths[2].kernel_drop is None
    assert paths[2].decided_by is paths[2].steps[-1]
    assert paths[2].steps[-1] is paths[1].steps[-1]
    assert paths[0].steps[-1] is not paths[1].steps[-1]  # the first was built, the others made from its shape


def test_events_that_leave_the_known_shapes_are_built_from_the_packets_first():
    dropped = [shaped(event) for event in [
        *mark(2), *observe(2, "prerouting"), first(2, "input", 7, "jump", "zone"), rule(2, "zone", 6, "return"),
        rule(2, "input", 8, "drop")]]
    stream = [(event, 1.0) for event in accepted_packet(1) + dropped]
    builder = same_answers(stream)
    assert builder.shapes.built == 0


def test_a_packet_of_another_port_is_another_shape():
    stream = [(event, 1.0) for event in accepted_packet(1, dport=22) + accepted_packet(2, dport=23)]
    assert same_answers(stream).shapes.built == 0


def test_a_loss_while_a_known_packet_is_open_leaves_it_incomplete():
    stream = [(event, 1.0) for event in accepted_packet(1) + accepted_packet(2)]
    paths, _ = build(stream, shapes=True, loss_at=(len(stream) - 2,))
    assert [(path.trace_id, path.complete, path.incomplete_reason) for path in paths] == \
        [(1, True, None), (2, False, "events lost")]
    same_answers(stream, loss_at=(len(stream) - 2,))


def test_a_known_packet_that_goes_idle_ends_as_the_builder_ends_it():
    second = accepted_packet(2)[:-2]  # its input observation never comes
    stream = [(event, 1.0) for event in accepted_packet(1) + second]
    paths, _ = build(stream, shapes=True, idle_at=len(stream) - 1)
    assert [(path.trace_id, path.incomplete_reason) for path in paths] == [(1, None), (2, "went idle")]
    same_answers(stream, idle_at=len(stream) - 1)


def test_a_ruleset_change_forgets_every_shape():
    builder = PathBuilder(SNAPSHOT, shapes=PathShapes())
    for event in accepted_packet(1):
        builder.feed(event, 1.0)
    builder.forget_shapes()
    paths = [path for event in accepted_packet(2) for path in builder.feed(event, 1.0)]
    assert len(paths) == 1 and paths[0].shape is None


# -- any stream ----------------------------------------------------------------------------------


@settings(max_examples=200)
@given(st.lists(arbitrary_events.map(shaped), max_size=60), st.lists(st.integers(0, 59), max_size=2))
def test_any_event_stream_gives_the_same_answers_both_ways(events, losses):
    same_answers([(event, index * 0.01) for index, event in enumerate(events * 2)], loss_at=set(losses))


# Chains of the generated events taken for the last of their hooks, postrouting unobserved.
HOOK_ENDS = {("input", 2): ("inet", "fw", "input"), ("prerouting", 2): ("inet", "nftrace_100_abcdef", "mark_prerouting")}


@settings(max_examples=200)
@given(st.lists(arbitrary_events.map(lambda event: shaped(replace(event, nfproto=2))), max_size=60))
def test_any_event_stream_gives_the_same_answers_both_ways_where_packets_leave_unobserved(events):
    same_answers([(event, index * 0.01) for index, event in enumerate(events * 2)], hook_ends=HOOK_ENDS)


@settings(max_examples=200)
@given(interleaved_packets(), st.integers(0, 3))
def test_interleaved_packets_met_again_give_the_same_answers_both_ways(case, rounds):
    stream, _ = case
    events = [shaped(event) for event in stream]
    for round_number in range(1, rounds + 1):
        events += [replace(event, trace_id=event.trace_id + 10 * round_number) for event in events[:len(stream)]]
    same_answers([(event, index * 0.001) for index, event in enumerate(events)])


# -- JSON written once per shape --------------------------------------------------------------------


def stream_text(paths) -> list:
    out = io.StringIO()
    stream = JsonStream(out, TraceReport(flow=parse_flow("10.0.0.5", "10.0.0.9", "tcp", None, 22)))
    for path in paths:
        stream.packet(path)
    stream.finish()
    return json.loads(out.getvalue())["packets"]


def test_the_json_of_a_known_shape_is_the_json_of_its_path():
    stream = [(event, 1.0) for number in range(1, 5) for event in later_packet(accepted_packet(1), number, number)]
    paths, builder = build(stream, shapes=True)
    assert builder.shapes.built == 3
    paths[2].kernel_drop = {"reason": "NO_SOCKET"}  # added to one path: its JSON says it
    paths[3].steps[0].iptables = "-A INPUT -j zone"
    documents_written = stream_text(paths)
    assert documents_written == [packet_json(path, {}) for path in paths]
    assert [document["trace_id"] for document in documents_written] == ["00000001", "00000002", "00000003",
                                                                        "00000004"]


def test_a_trace_id_in_a_rules_text_is_not_taken_for_the_packets():
    """The third packet's JSON is the second's, kept for their shape, with its own trace id."""
    paths, _ = build([(event, 1.0) for number in (1, 2, 3) for event in later_packet(accepted_packet(1), number, 1)],
                     shapes=True)
    for path in paths:
        path.steps[0].text = 'meta comment "00000002"'
    assert stream_text(paths) == [packet_json(path, {}) for path in paths]


# -- the decoder's shapes ---------------------------------------------------------------------------


def test_events_differing_only_in_trace_id_and_ip_id_have_one_shape():
    raws = [bytes.fromhex(line) for line in (DATA / "trace_datagrams.hex").read_text().split()]
    raw = next(raw for raw in raws if (decode_trace_message(raw).packet or headers(src="::1", dst="::2")).src.version == 4)
    event = decode_trace_message(raw)
    other = bytearray(raw)
    trace_id_at = raw.index(event.trace_id.to_bytes(4, "big"))
    other[trace_id_at:trace_id_at + 4] = (event.trace_id ^ 0xFFFF).to_bytes(4, "big")
    network = raw.index(event.packet.src.packed + event.packet.dst.packed) - 12
    other[network + 4] ^= 0xFF  # the IPv4 id
    again = decode_trace_message(bytes(other))
    assert again.trace_id != event.trace_id and again.packet.ip_id != event.packet.ip_id
    assert again.shape == event.shape
    other[network + 19] ^= 0x01  # the destination address
    assert decode_trace_message(bytes(other)).shape != event.shape


def test_kernel_drop_pairing_reads_a_shapes_headers_once():
    from nftrace.drops.correlator import DropCorrelator

    stream = [(event, 1.0) for number in (1, 2, 3) for event in later_packet(accepted_packet(1), number, number)]
    paths, _ = build(stream, shapes=True)
    correlator = DropCorrelator()
    signatures = [correlator._signature(path) for path in paths]
    assert [signature.trace_id for signature in signatures] == [1, 2, 3]
    read = {(signature.headers, signature.keys, signature.iif, signature.dropped_by_rule, signature.left_netfilter)
            for signature in signatures}
    assert len(read) == 1 and len(correlator._shapes) == 1
    (headers_read, _, iif, dropped_by_rule, left_netfilter), = read
    assert headers_read[0][3:] == (40000, 22) and iif == 2 and not dropped_by_rule and left_netfilter


class CountedWrites(io.StringIO):
    """An unbuffered stdout (PYTHONUNBUFFERED): each write is a write(2)."""

    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, text):
        self.writes += 1
        return super().write(text)


def test_a_batch_of_packets_is_one_write_even_to_an_unbuffered_stdout():
    paths, _ = build([(event, 1.0) for number in range(1, 101) for event in later_packet(accepted_packet(1), number, 1)],
                     shapes=True)
    out = CountedWrites()
    stream = JsonStream(out, TraceReport(flow=parse_flow("10.0.0.5", "10.0.0.9", "tcp", None, 22)))
    for path in paths[:50]:
        stream.packet(path)
    stream.flush()
    assert out.writes == 2  # the document's head, then the batch
    assert out.getvalue().count("\n") == 51  # every packet of the batch is out, one per line
    for path in paths[50:]:
        stream.packet(path)
    stream.finish()
    assert out.writes == 3
    assert len(json.loads(out.getvalue())["packets"]) == 100


def test_a_backlog_released_at_once_is_written_in_pieces_not_held_whole():
    paths, _ = build([(event, 1.0) for number in range(1, 101) for event in later_packet(accepted_packet(1), number, 1)],
                     shapes=True)
    out = CountedWrites()
    stream = JsonStream(out, TraceReport(flow=parse_flow("10.0.0.5", "10.0.0.9", "tcp", None, 22)))
    stream.HELD_CHARACTERS = 10 * len(json.dumps(packet_json(paths[0], {})))
    for path in paths:
        stream.packet(path)
    assert 9 <= out.writes <= 11  # the head, and one write each 10 packets or so, before any flush
    stream.finish()
    assert len(json.loads(out.getvalue())["packets"]) == 100


class InterruptedAfterWriting(io.StringIO):
    """A stdout whose write is followed by Ctrl-C: the handler runs as the write returns."""

    def __init__(self):
        super().__init__()
        self.interrupt_next_write = False

    def write(self, text):
        written = super().write(text)
        if self.interrupt_next_write:
            self.interrupt_next_write = False
            raise KeyboardInterrupt
        return written


def test_a_batch_whose_write_ctrl_c_followed_is_not_written_again_at_the_end():
    """A reader that stops nftrace as soon as it sees a packet (Ctrl-C right after the write)
    gets that packet once, not again when the document is closed."""
    paths, _ = build([(event, 1.0) for number in range(1, 4) for event in later_packet(accepted_packet(1), number, 1)],
                     shapes=True)
    out = InterruptedAfterWriting()
    stream = JsonStream(out, TraceReport(flow=parse_flow("10.0.0.5", "10.0.0.9", "tcp", None, 22)))
    stream.packet(paths[0])
    stream.flush()
    stream.packet(paths[1])
    out.interrupt_next_write = True
    with pytest.raises(KeyboardInterrupt):
        stream.flush()
    stream.packet(paths[2])  # answered on the way out
    stream.finish()
    assert [packet["trace_id"] for packet in json.loads(out.getvalue())["packets"]] == ["00000001", "00000002",
                                                                                     "00000003"]
