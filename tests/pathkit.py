"""Hand-written trace event streams for the path builder's tests, in the kernel's words.

Each helper returns the events the kernel sends for one thing, as observed on this
machine's kernel (see tests/data/router-flows.json for the real bytes): a base chain's
first event carries the packet headers and interfaces; falling off the end of a chain is a
rule event without handle; nftrace's own mark and observation chains end on a policy event.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from nftrace.trace.events import PacketHeaders, TraceEvent
from nftrace.kernel.monitor import decode_monitor_datagram
from nftrace.trace.ruleset import RulesetSnapshot

OWN = "nftrace_100_abcdef"
DATA = Path(__file__).parent / "data"


def headers(src="10.0.0.5", dst="10.0.0.9", proto=6, sport=40000, dport=22) -> PacketHeaders:
    return PacketHeaders(ipaddress.ip_address(src), ipaddress.ip_address(dst), proto, 60, sport, dport)


SYN = headers()


def event(trace_id, table, chain, type="rule", verdict="continue", handle=None, target=None, family="inet",
          packet=None, iif=None, oif=None) -> TraceEvent:
    return TraceEvent(trace_id=trace_id, family=family, table=table, chain=chain, type=type, verdict=verdict,
                      handle=handle, target=target, nfproto=2, iif=iif, oif=oif, packet=packet)


def mark(trace_id, hook="prerouting", packet=SYN, iif=2, family="inet"):
    return [event(trace_id, OWN, f"mark_{hook}", handle=3, packet=packet, iif=iif if hook == "prerouting" else None,
                  oif=None if hook == "prerouting" else 3, family=family),
            event(trace_id, OWN, f"mark_{hook}", family=family),
            event(trace_id, OWN, f"mark_{hook}", "policy", "accept", family=family)]


def observe(trace_id, hook, packet=SYN, iif=2, oif=None, family="inet"):
    return [event(trace_id, OWN, f"obs_{hook}", packet=packet, iif=iif, oif=oif, family=family),
            event(trace_id, OWN, f"obs_{hook}", "policy", "accept", family=family)]


def first(trace_id, chain, handle=None, verdict="continue", target=None, table="fw", family="inet", packet=SYN, iif=2):
    """The first event of a base chain run: it carries the headers."""
    return event(trace_id, table, chain, handle=handle, verdict=verdict, target=target, family=family, packet=packet,
                 iif=iif)


def rule(trace_id, chain, handle, verdict="continue", target=None, table="fw", family="inet"):
    return event(trace_id, table, chain, handle=handle, verdict=verdict, target=target, family=family)


def end_of_chain(trace_id, chain, table="fw", family="inet"):
    return event(trace_id, table, chain, family=family)


def policy(trace_id, chain, verdict, table="fw", family="inet"):
    return event(trace_id, table, chain, "policy", verdict, family=family)


def recorded(name="router-flows.json"):
    """(snapshot, events, flows) of a real recording made by tests/record_trace.py."""
    data = json.loads((DATA / name).read_text())
    events = [item for datagram in data["datagrams"] for item in decode_monitor_datagram(bytes.fromhex(datagram))]
    return RulesetSnapshot(data["listing"]), [e for e in events if isinstance(e, TraceEvent)], data["flows"]
