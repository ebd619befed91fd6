"""What a run found, as data: the one-line answer per packet and the JSON document.

The terminal renderer and `--json` both read these; nothing in the CLI assembles output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from ..flow import Flow
from ..protocols import protocol_name
from .paths import PacketPath, Step
from ..kernel.system import interface_name

VERDICT_WORDS = {"drop": "dropped", "accept": "accepted", "queue": "queued", "stolen": "stolen"}


@dataclass
class TraceReport:
    """One run of `nftrace why`: the flow and what could not be seen. The packets are not kept:
    each is written as it completes (trace/jsonstream.py, render.py) between header and trailer."""

    flow: Flow
    backend: str = "nft"
    mode: str = "live"
    netns: Optional[str] = None  # the (first) namespace traced; None: nftrace's own
    namespaces: list = field(default_factory=list)  # every namespace traced, in the order given
    lost_events: int = 0
    warnings: list = field(default_factory=list)
    interfaces: dict = field(default_factory=dict)
    dry_run: Optional[dict] = None  # mode "dry-run": the sandbox, the packet sent, what was not copied

    def header_json(self) -> dict:
        return {"backend": self.backend, "mode": self.mode, "netns": self.netns,
                "namespaces": list(self.namespaces or [self.netns]), "flow": self.flow.to_json(),
                "dry_run": self.dry_run}

    def trailer_json(self) -> dict:
        return {"lost_events": self.lost_events, "warnings": list(self.warnings)}


def summary(path: PacketPath) -> str:
    """The answer in one line: what happened to the packet and which rule decided it."""
    step = path.decided_by
    if not path.complete:
        if path.incomplete_reason == "events lost":
            return "incomplete: trace events were lost (socket buffer full), verdict not known"
        where = path.hooks[-1] if path.hooks else "its first hook"
        return f"not seen after {where}: netfilter did not drop it, something outside the ruleset did (routing, rp_filter, no socket, ...)"
    drop = path.kernel_drop
    if drop:
        # The verdict is netfilter's; the kernel's drop after it is said too (see
        # paths.verdict_before_kernel_drop).
        said = drop.get("reason") + (f" — {drop['explain']}" if drop.get("explain") else "")
        where = path.vanished_after or (path.hooks[-1] if path.hooks else "its first hook")
        if path.verdict == "accept":
            if path.vanished_after:
                return f"no rule dropped it: it passed every chain up to {where}, then the kernel dropped it: {said}"
            if step is not None:
                return f"accepted by {step.location()}, then dropped by the kernel: {said}"
            return f"accepted by every chain, then dropped by the kernel: {said}"
        if path.verdict == "drop" and step is None:  # NETFILTER_DROP, whose explanation says no more than this
            return (f"dropped by netfilter outside the traced chains (iptables-legacy, conntrack or NAT), "
                    f"after {where}: {drop.get('reason')}")
    if step is None:
        if path.verdict == "accept":
            hooks = ", ".join(path.hooks)
            return f"accepted: no chain of the ruleset gave a verdict on its path ({hooks})"
        return VERDICT_WORDS.get(path.verdict, path.verdict)
    word = VERDICT_WORDS.get(path.verdict, path.verdict)
    if path.verdict == "drop" and step.type == "rule" and step.text and "reject" in step.text.lower():
        word = "rejected"
    if path.segments:
        word += f" in {netns_words(step.netns)}"
    text = f"{word} by {step.location()}"
    state = accepted_by_connection(path)
    if state == "established":
        text += " — only because it belongs to an earlier connection (ct state established)"
    elif state == "related":
        text += " — only because it is related to an earlier connection (ct state related)"
    return text


def netns_words(label: Optional[str]) -> str:
    """How the answer names a namespace: `netns R`, `the namespace of pid 4242`, `container web`."""
    if label is None:
        return "this namespace"
    kind, _, rest = label.partition(":")
    if kind == "pid" and rest:
        return f"the namespace of pid {rest}"
    if kind == "container" and rest:
        return f"container {rest}"
    return f"netns {label}"


def accepted_by_connection(path: PacketPath) -> Optional[str]:
    """`established` or `related` when the accepting rule matched on the connection's state
    (`ct state established,related accept`) and that was the packet's state there."""
    step = path.decided_by
    if path.verdict != "accept" or step is None or step.type != "rule" or not step.text:
        return None
    if not re.search(r"\bct state\b", step.text) or re.search(r"\bnew\b", step.text):
        return None  # a rule that also accepts new connections does not owe its match to an old one
    for entry in conntrack_json(path):
        if entry["hook"] == step.hook and entry["netns"] == step.netns and entry["state"] in ("established", "related"):
            return entry["state"] if re.search(rf"\b{entry['state']}\b", step.text) else None
    return None


def packet_fields(path: PacketPath, interfaces: dict) -> dict:
    """The packet as it arrived in its first namespace; `oif` where it left its last one."""
    packet = path.first_packet
    first, last = (path.segments[0], path.segments[-1]) if path.segments else (path, path)
    return {
        "iif": interface_name(first.interfaces or interfaces, first.interface_index("iif")),
        "oif": interface_name(last.interfaces or interfaces, last.interface_index("oif")),
        "src": str(packet.src) if packet and packet.src else None,
        "dst": str(packet.dst) if packet and packet.dst else None,
        "proto": protocol_name(packet.proto) if packet else None,
        "sport": packet.sport if packet else None,
        "dport": packet.dport if packet else None,
        "length": packet.length if packet else None,
        "mark": path.mark,
    }


DECIDED_BY_FIELDS = ("hook", "family", "table", "chain", "type", "handle", "rule_number", "text", "verdict",
                     "iptables", "backend", "netns")


def decided_by_json(step: Optional[Step]) -> Optional[dict]:
    """A deciding step in JSON: what `decided_by` says in every document."""
    if step is None:
        return None
    fields = step.to_json()
    return {key: fields[key] for key in DECIDED_BY_FIELDS}


def _decided_by_json(path: PacketPath) -> Optional[dict]:
    return decided_by_json(path.decided_by)


def namespaces_json(path: PacketPath, interfaces: dict) -> list:
    """The packet's part in each namespace it crossed, in order (one part when one was traced)."""
    parts = []
    for segment in path.segments or [path]:
        names = segment.interfaces or interfaces
        parts.append({"netns": segment.netns, "trace_id": f"{segment.trace_id:08x}", "hooks": list(segment.hooks),
                      "iif": interface_name(names, segment.interface_index("iif")),
                      "oif": interface_name(names, segment.interface_index("oif")),
                      "verdict": segment.verdict if segment.complete else "unknown"})
    return parts


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
        "namespaces": namespaces_json(path, interfaces),
        "conntrack": conntrack_json(path),
        # "established" / "related": the accepting rule matched only because of an earlier connection
        "accepted_by_connection": accepted_by_connection(path),
        "nat": list(path.nat),
        "kernel_drop": path.kernel_drop,
        "near_misses": [near_miss.to_json() for near_miss in path.near_misses],
        "fix": path.fix.to_json() if path.fix is not None else None,
    }


def conntrack_json(path: PacketPath) -> list:
    """The packet's conntrack state at each hook where the kernel reported it.

    The kernel reports the state as the hook's last chain (nftrace's observation chain) saw it.
    It sends nothing for an invalid packet; a rule that matched `ct state invalid` says it.
    Each namespace has a conntrack table of its own: a packet across several has an entry per
    namespace and hook.
    """
    if path.segments:
        return [entry for segment in path.segments for entry in conntrack_json(segment)]
    by_hook: dict = {}
    for observation in path.observations:
        if observation.ct is not None and observation.hook is not None:
            ct = observation.ct
            by_hook[observation.hook] = {"hook": observation.hook, "state": ct.state, "direction": ct.direction,
                                         "status": list(ct.status), "id": ct.id, "netns": path.netns}
    for step in path.steps:
        if step.hook and step.hook not in by_hook and step.type == "rule" and step.text \
                and _INVALID_RULE_RE.search(step.text):
            by_hook[step.hook] = {"hook": step.hook, "state": "invalid", "direction": None, "status": [], "id": None,
                                  "netns": path.netns}
    return [by_hook[hook] for hook in path.hooks if hook in by_hook]


# A matched rule that tests for invalid alone (not within a set of states).
_INVALID_RULE_RE = re.compile(r"\bct state invalid\b(?!\s*,)")

