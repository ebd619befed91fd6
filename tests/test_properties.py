"""Property-based tests: whatever the kernel sends, in whatever order packets interleave,
the flow parser and the path builder never crash and their answers keep their invariants."""

from __future__ import annotations

import ipaddress
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from pathkit import end_of_chain, event, first, headers, mark, observe, policy, rule
from test_paths import SNAPSHOT

from nftrace.errors import InputError
from nftrace.trace.events import TraceEvent
from nftrace.flow import parse_flow
from nftrace.trace.paths import HOOK_RANK, PathBuilder
from nftrace.trace.report import packet_json, summary

# -- the flow parser -----------------------------------------------------------------------------

addresses = st.one_of(st.ip_addresses().map(str), st.text(max_size=20))
ports = st.one_of(st.none(), st.integers(-5, 70000))
protocols = st.one_of(st.none(), st.sampled_from(["tcp", "udp", "icmp", "icmpv6", "sctp", "TCP", "gre", ""]))


@given(addresses, addresses, protocols, ports, ports)
def test_the_flow_parser_accepts_or_says_why_in_one_line(src, dst, proto, sport, dport):
    try:
        flow = parse_flow(src, dst, proto, sport, dport)
    except InputError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert flow.src.version == flow.dst.version
    for port in (flow.sport, flow.dport):
        assert port is None or 1 <= port <= 65535
    if flow.sport or flow.dport:
        assert flow.proto in ("tcp", "udp", "sctp")


@given(st.ip_addresses(v=4), st.integers(0, 32))
def test_a_valid_prefix_round_trips(address, length):
    network = ipaddress.ip_network(f"{address}/{length}", strict=False)
    flow = parse_flow(str(network), "10.0.0.1")
    assert flow.src == network


# -- the path builder: arbitrary events ----------------------------------------------------------

tables = st.sampled_from(["fw", "extra", "nftrace_100_abcdef", "other"])
chains = st.sampled_from(["input", "zone", "leaf", "prerouting", "mark_prerouting", "obs_input", "obs_prerouting",
                          "obs_forward", "obs_postrouting", "mark_output", "x"])
verdicts = st.sampled_from(["continue", "accept", "drop", "jump", "goto", "return", "queue", "stolen", None])
maybe_packet = st.one_of(st.none(), st.builds(headers, dport=st.integers(1, 65535)))

arbitrary_events = st.builds(
    TraceEvent,
    trace_id=st.integers(1, 4),
    family=st.sampled_from(["inet", "ip", "ip6"]),
    table=tables,
    chain=chains,
    type=st.sampled_from(["rule", "policy", "return", "unknown"]),
    verdict=verdicts,
    handle=st.one_of(st.none(), st.integers(1, 20)),
    target=st.one_of(st.none(), chains),
    iif=st.one_of(st.none(), st.integers(1, 3)),
    packet=maybe_packet,
)


@settings(max_examples=300)
@given(st.lists(arbitrary_events, max_size=60))
def test_any_event_stream_builds_without_crashing_and_keeps_the_invariants(events):
    builder = PathBuilder(SNAPSHOT)
    paths = []
    for index, item in enumerate(events):
        paths.extend(builder.feed(item, now=index * 0.01))
    paths.extend(builder.expire(1000.0))
    paths.extend(builder.flush())
    for path in paths:
        check_invariants(path)
        document = packet_json(path, {})
        assert json.loads(json.dumps(document)) == document  # the JSON of any path serialises, and reads back


def check_invariants(path):
    assert path.first_packet is not None
    assert not any(step.table.startswith("nftrace_") for step in path.steps)
    # Hooks only move forward, except that a packet leaving through loopback comes back in.
    segments = "|".join(path.hooks).replace("postrouting|prerouting", "postrouting/prerouting").split("/")
    for segment in segments:
        ranks = [HOOK_RANK[h] for h in segment.split("|") if h]
        assert ranks == sorted(ranks), path.hooks
    if path.complete:
        assert path.verdict in ("accept", "drop", "queue", "stolen")
        final = [s for s in path.steps if s.verdict in ("drop", "queue", "stolen")]
        if path.verdict != "accept":
            # exactly one final verdict, and it is the last step
            assert len(final) == 1 and path.steps[-1] is final[0] is path.decided_by
        elif path.decided_by is not None:
            assert path.decided_by.verdict == "accept"
    else:
        assert path.verdict == "unknown" and path.decided_by is None
    assert summary(path)


# -- the path builder: well-formed packets, shuffled ----------------------------------------------


@st.composite
def packet_events(draw, trace_id):
    """The events of one packet through SNAPSHOT's ruleset, and the verdict the kernel gives."""
    dport = draw(st.integers(1, 65535))
    packet = headers(dport=dport)
    events = [*mark(trace_id, packet=packet), *observe(trace_id, "prerouting", packet=packet)]
    path = draw(st.sampled_from(["drop-rule", "policy-drop", "accept-in-zone", "goto-leaf", "return-then-drop",
                                 "accept-rule"]))
    if path == "drop-rule":
        events += [first(trace_id, "input", 8, "drop", packet=packet)]
        return events, "drop"
    if path == "policy-drop":
        events += [first(trace_id, "input", 7, "jump", "zone", packet=packet), end_of_chain(trace_id, "zone"),
                   end_of_chain(trace_id, "input"), policy(trace_id, "input", "drop")]
        return events, "drop"
    if path == "accept-in-zone":
        events += [first(trace_id, "input", 7, "jump", "zone", packet=packet), rule(trace_id, "zone", 5, "accept"),
                   *observe(trace_id, "input", packet=packet)]
        return events, "accept"
    if path == "goto-leaf":
        events += [first(trace_id, "input", 9, "goto", "leaf", packet=packet), rule(trace_id, "leaf", 10, "accept"),
                   *observe(trace_id, "input", packet=packet)]
        return events, "accept"
    if path == "return-then-drop":
        events += [first(trace_id, "input", 7, "jump", "zone", packet=packet), rule(trace_id, "zone", 6, "return"),
                   rule(trace_id, "input", 8, "drop")]
        return events, "drop"
    events += [first(trace_id, "input", 11, "accept", packet=packet), *observe(trace_id, "input", packet=packet)]
    return events, "accept"


@st.composite
def interleaved_packets(draw):
    """Several packets, some reusing a trace id after the previous one finished, interleaved."""
    count = draw(st.integers(1, 8))
    per_id: dict[int, list] = {}
    expected = []
    for _ in range(count):
        trace_id = draw(st.integers(1, 3))
        events, verdict = draw(packet_events(trace_id))
        per_id.setdefault(trace_id, []).append(events)
        expected.append((trace_id, verdict))
    # Packets of one id follow each other; packets of different ids interleave freely.
    queues = {tid: [e for packet in packets for e in packet] for tid, packets in per_id.items()}
    stream = []
    while queues:
        tid = draw(st.sampled_from(sorted(queues)))
        take = draw(st.integers(1, 4))
        stream.extend(queues[tid][:take])
        del queues[tid][:take]
        if not queues[tid]:
            del queues[tid]
    return stream, expected


@settings(max_examples=200)
@given(interleaved_packets())
def test_interleaved_packets_each_get_the_kernels_verdict(case):
    stream, expected = case
    builder = PathBuilder(SNAPSHOT)
    paths = []
    for index, item in enumerate(stream):
        paths.extend(builder.feed(item, now=index * 0.001))
    paths.extend(builder.flush())
    for path in paths:
        check_invariants(path)
    got = sorted((p.trace_id, p.verdict) for p in paths)
    assert got == sorted(expected)
    assert all(p.complete for p in paths)


def test_unknown_event_types_are_tolerated():
    stray = event(1, "fw", "input", type="unknown", verdict=None, packet=headers())
    builder = PathBuilder(SNAPSHOT)
    builder.feed(stray)
    assert [p.verdict for p in builder.flush()] == ["unknown"]
