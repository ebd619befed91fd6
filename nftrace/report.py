"""What a run found, as data: the one-line answer per packet and the JSON document.

The terminal renderer and `--json` both read these; nothing in the CLI assembles output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .flow import Flow
from .paths import PacketPath, protocol_name
from .system import interface_name

VERDICT_WORDS = {"drop": "dropped", "accept": "accepted", "queue": "queued", "stolen": "stolen"}


@dataclass
class TraceReport:
    """One run of `nftrace why`: the flow, the packets, and what could not be seen."""

    flow: Flow
    backend: str = "nft"
    mode: str = "live"
    netns: Optional[str] = None
    packets: list = field(default_factory=list)
    lost_events: int = 0
    warnings: list = field(default_factory=list)
    interfaces: dict = field(default_factory=dict)
    dry_run: Optional[dict] = None  # mode "dry-run": the sandbox, the packet sent, what was not copied

    def header_json(self) -> dict:
        return {"backend": self.backend, "mode": self.mode, "netns": self.netns, "flow": self.flow.to_json(),
                "dry_run": self.dry_run}

    def trailer_json(self) -> dict:
        return {"lost_events": self.lost_events, "warnings": list(self.warnings)}

    def to_json(self) -> dict:
        document = self.header_json()
        document["packets"] = [packet_json(path, self.interfaces) for path in self.packets]
        document.update(self.trailer_json())
        return document


def summary(path: PacketPath) -> str:
    """The answer in one line: what happened to the packet and which rule decided it."""
    step = path.decided_by
    if not path.complete:
        if path.incomplete_reason == "events lost":
            return "incomplete: trace events were lost (socket buffer full), verdict not known"
        where = path.hooks[-1] if path.hooks else "its first hook"
        text = f"not seen after {where}: netfilter did not drop it, something outside the ruleset did (routing, rp_filter, no socket, ...)"
        if path.kernel_drop:
            text = f"accepted by every chain, then dropped by the kernel: {path.kernel_drop.get('reason')}"
            if path.kernel_drop.get("explain"):
                text += f" — {path.kernel_drop['explain']}"
        return text
    if step is None:
        if path.verdict == "accept":
            hooks = ", ".join(path.hooks)
            return f"accepted: no chain of the ruleset gave a verdict on its path ({hooks})"
        return VERDICT_WORDS.get(path.verdict, path.verdict)
    word = VERDICT_WORDS.get(path.verdict, path.verdict)
    if path.verdict == "drop" and step.type == "rule" and step.text and "reject" in step.text:
        word = "rejected"
    text = f"{word} by {step.location()}"
    if path.verdict == "accept" and path.kernel_drop:
        text = f"accepted by every chain, then dropped by the kernel: {path.kernel_drop.get('reason')}"
        if path.kernel_drop.get("explain"):
            text += f" — {path.kernel_drop['explain']}"
    return text


def packet_fields(path: PacketPath, interfaces: dict) -> dict:
    packet = path.first_packet
    return {
        "iif": interface_name(interfaces, path.interface_index("iif")),
        "oif": interface_name(interfaces, path.interface_index("oif")),
        "src": str(packet.src) if packet and packet.src else None,
        "dst": str(packet.dst) if packet and packet.dst else None,
        "proto": protocol_name(packet.proto) if packet else None,
        "sport": packet.sport if packet else None,
        "dport": packet.dport if packet else None,
        "length": packet.length if packet else None,
        "mark": path.mark,
    }


def _decided_by_json(path: PacketPath) -> Optional[dict]:
    step = path.decided_by
    if step is None:
        return None
    fields = step.to_json()
    return {key: fields[key] for key in ("hook", "family", "table", "chain", "type", "handle", "rule_number", "text",
                                         "verdict", "iptables")}


def packet_json(path: PacketPath, interfaces: dict) -> dict:
    return {
        "trace_id": f"{path.trace_id:08x}",
        "verdict": path.verdict if path.complete else "unknown",
        "complete": path.complete,
        "incomplete_reason": path.incomplete_reason,
        "summary": summary(path),
        "hooks": list(path.hooks),
        "decided_by": _decided_by_json(path),
        "steps": [step.to_json() for step in path.steps],
        "packet": packet_fields(path, interfaces),
        "conntrack": conntrack_json(path),
        "nat": list(path.nat),
        "kernel_drop": path.kernel_drop,
    }


def conntrack_json(path: PacketPath) -> list:
    """The packet's conntrack state at each hook where the kernel reported it."""
    seen = []
    for observation in path.observations:
        ct = observation.ct
        if ct is None or observation.hook is None:
            continue
        entry = {"hook": observation.hook, "state": ct.state, "direction": ct.direction, "status": list(ct.status)}
        if not seen or {k: v for k, v in seen[-1].items() if k != "hook"} != {k: v for k, v in entry.items() if k != "hook"}:
            seen.append(entry)
    return seen


def endpoint_text(address, port) -> str:
    if address is None:
        return "?"
    text = f"[{address}]" if address.version == 6 and port else str(address)
    return f"{text}:{port}" if port else text
