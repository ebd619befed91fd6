"""`nftrace drops`: what the firewall dropped, counted per deciding rule and per kernel reason.

Pure: finished packet paths in, counts out; nothing here reads the kernel, so recorded or
hand-made paths test it exactly. The same tally feeds the live table, the summary at the
end, and the JSON document.

Which packets count, and under what (one meaning of "verdict", see README "The answer"):
- a packet that a rule or a policy dropped (a reject is a drop) counts under that step;
- a packet that netfilter let through and the kernel then dropped (`kernel_drop`: no
  socket, reverse-path filter, no route, ...) counts under the kernel's reason, whatever
  netfilter's verdict says (it is netfilter's: accept);
- anything else (accepted and delivered, incomplete, queued) is not a drop.

Memory stays bounded on a busy box: each rule and reason keeps at most FLOWS_KEPT distinct
flows; packets of flows met after that are counted, and said to be, as `other_flows`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from ..protocols import protocol_name
from ..trace.paths import PacketPath, Step
from ..trace.report import decided_by_json
from ..kernel.system import interface_name
from .reasons import explain_many, location_cause

FLOWS_KEPT = 4096
TOP_FLOWS = 5


@dataclass(frozen=True)
class FlowKey:
    """A dropped packet's flow as the summary groups it (headers as the packet arrived)."""

    src: Optional[str]
    dst: Optional[str]
    proto: Optional[str]
    sport: Optional[int]
    dport: Optional[int]
    iif: Optional[str]

    def to_json(self, packets: int) -> dict:
        return {"src": self.src, "dst": self.dst, "proto": self.proto, "sport": self.sport, "dport": self.dport,
                "iif": self.iif, "packets": packets}

    def describe(self) -> str:
        """`10.0.0.5:41522 → 10.0.0.9:22 tcp in eth0`"""
        src = _endpoint(self.src, self.sport)
        dst = _endpoint(self.dst, self.dport)
        where = f" in {self.iif}" if self.iif else ""
        return f"{src} → {dst} {self.proto or '?'}{where}"


def _endpoint(address: Optional[str], port: Optional[int]) -> str:
    text = address or "?"
    if port:
        return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"
    return text


def flow_key(path: PacketPath, interfaces: dict) -> FlowKey:
    packet = path.first_packet
    if packet is None:
        return FlowKey(None, None, None, None, None, interface_name(interfaces, path.interface_index("iif")))
    return FlowKey(str(packet.src) if packet.src is not None else None,
                   str(packet.dst) if packet.dst is not None else None,
                   protocol_name(packet.proto), packet.sport, packet.dport,
                   interface_name(interfaces, path.interface_index("iif")))


def rule_key(step: Step) -> tuple:
    """What makes two dropping steps the same rule or policy (text aside: it can be re-read)."""
    return (step.backend, step.family, step.table, step.chain, step.type, step.handle, step.rule_number,
            step.verdict)


@dataclass
class Counted:
    """Packets dropped by one rule, policy or kernel reason, and the flows behind them."""

    packets: int = 0
    flows: Counter = field(default_factory=Counter)
    other_flows: int = 0  # packets of flows met after FLOWS_KEPT distinct ones
    last_flow: Optional[FlowKey] = None
    last_seen: float = 0.0

    def add(self, flow: FlowKey, now: float) -> None:
        self.packets += 1
        if flow in self.flows or len(self.flows) < FLOWS_KEPT:
            self.flows[flow] += 1
        else:
            self.other_flows += 1
        self.last_flow = flow
        self.last_seen = now

    def top_flows(self, limit: Optional[int] = TOP_FLOWS) -> list:
        return self.flows.most_common(limit)

    def flows_json(self, limit: Optional[int] = TOP_FLOWS) -> list:
        return [flow.to_json(packets) for flow, packets in self.top_flows(limit)]


@dataclass
class RuleDrops(Counted):
    step: Optional[Step] = None  # the latest dropping step seen for the rule (its text as read then)


@dataclass
class ReasonDrops(Counted):
    reason: str = ""
    # In plain words: the packets' own explanation while they share one ("nothing listens on
    # tcp/22"), then the reason's without values (explain_many): never one packet's for all.
    explain: Optional[str] = None
    mixed: bool = False
    routing: Optional[dict] = None  # the refusal of routing they all met (drops/routing.py), if that

    def explained(self, text: Optional[str]) -> None:
        if text is None or self.mixed or text == self.explain:
            return
        if self.explain is None and not self.packets:
            self.explain = text
        else:
            self.mixed = True
            self.explain = explain_many(self.reason)


def drop_kind(path: PacketPath) -> Optional[str]:
    """`rule` (a rule or policy of netfilter dropped it), `kernel` (the kernel dropped it after
    netfilter), or None: not a drop."""
    if not path.complete:
        return None
    if path.kernel_drop is not None:
        return "kernel"
    if path.verdict == "drop" and path.decided_by is not None:
        return "rule"
    return None


class DropTally:
    """Every dropped packet of a run, per deciding rule and per kernel reason."""

    def __init__(self):
        self.rules: dict = {}  # rule_key → RuleDrops, in the order first seen
        self.reasons: dict = {}  # reason (with routing's refusal, see _reason_entry) → ReasonDrops
        self.packets = 0  # dropped packets counted
        self.seen = 0  # packets offered (dropped or not)

    def not_built(self, count: int) -> None:
        """Packets traced that were never built into paths: not drops (drops/deferred.py)."""
        self.seen += count

    def add(self, path: PacketPath, interfaces: dict, now: float = 0.0) -> Optional[str]:
        """Count the packet if it was dropped; returns drop_kind(path)."""
        self.seen += 1
        kind = drop_kind(path)
        if kind is None:
            return None
        flow = flow_key(path, interfaces)
        if kind == "rule":
            step = path.decided_by
            entry = self.rules.get(rule_key(step))
            if entry is None:
                entry = self.rules[rule_key(step)] = RuleDrops()
            entry.step = step
        else:
            entry = self._reason_entry(path.kernel_drop)
        entry.add(flow, now)
        self.packets += 1
        return kind

    def add_late(self, signature, kernel_drop: dict, interfaces: dict, now: float = 0.0) -> None:
        """A kernel drop (correlator.kernel_drop_record) that came after its packet was answered
        as accepted (the kernel was slow to report it, or dropped the packet seconds later):
        counted under its reason, with the packet's flow as the correlator kept it."""
        self._add_kernel_drop(kernel_drop, *signature.headers[0], interface_name(interfaces, signature.iif), now)

    def add_unpaired(self, drop, kernel_drop: dict, now: float = 0.0) -> None:
        """A kernel drop of a traced packet that was never built (its events were lost, or
        evicted from the kernel's stash before a drop asked for it): counted under its reason,
        with the flow its own record gives (no input interface)."""
        self._add_kernel_drop(kernel_drop, drop.src, drop.dst, drop.proto, drop.sport, drop.dport, None, now)

    def _add_kernel_drop(self, kernel_drop: dict, src, dst, proto, sport, dport, iif: Optional[str], now: float) -> None:
        flow = FlowKey(str(src) if src is not None else None, str(dst) if dst is not None else None,
                       protocol_name(proto), sport, dport, iif)
        self._reason_entry(kernel_drop).add(flow, now)
        self.packets += 1

    def _reason_entry(self, kernel_drop: dict) -> "ReasonDrops":
        """The entry that counts a kernel drop: one per reason, per refusal of routing
        (drops/routing.py: a blackhole route and a prohibit route are both NOT_SPECIFIED), and
        per cause that the code which freed the packet tells (reasons.location_cause: IPv6
        multicast not for this host is NOT_SPECIFIED too)."""
        reason = kernel_drop.get("reason") or "unknown"
        routing = kernel_drop.get("routing")
        cause = location_cause(kernel_drop.get("location"), reason)
        key = (reason, kernel_drop.get("explain")) if routing else (reason, cause) if cause else reason
        entry = self.reasons.get(key)
        if entry is None:
            entry = self.reasons[key] = ReasonDrops(reason=reason, routing=routing)
        entry.explained(kernel_drop.get("explain"))
        return entry

    def ranked_rules(self) -> list:
        """Rules by packets dropped, most first (ties: first seen first)."""
        return sorted(self.rules.values(), key=lambda entry: -entry.packets)

    def ranked_reasons(self) -> list:
        return sorted(self.reasons.values(), key=lambda entry: -entry.packets)

    def rules_json(self, flows: Optional[int] = TOP_FLOWS) -> list:
        return [{"decided_by": decided_by_json(entry.step), "packets": entry.packets,
                 "flows": entry.flows_json(flows), "other_flows": entry.other_flows}
                for entry in self.ranked_rules()]

    def kernel_drops_json(self, flows: Optional[int] = TOP_FLOWS) -> list:
        return [{"reason": entry.reason, "explain": entry.explain, "routing": entry.routing, "packets": entry.packets,
                 "flows": entry.flows_json(flows), "other_flows": entry.other_flows}
                for entry in self.ranked_reasons()]


@dataclass
class TraceCounts:
    """What nftrace's own counters say (kernel-side, before and after the rate limit)."""

    matched: int  # packets that matched the filter at a mark chain
    traced: int  # of those, packets the rate limit let through (marked for tracing)

    @property
    def not_traced(self) -> int:
        return max(0, self.matched - self.traced)

    @property
    def sampled(self) -> bool:
        return self.not_traced > 0
