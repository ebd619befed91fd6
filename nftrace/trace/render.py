"""The answer for people: one line per packet first, then its path as a tree."""

from __future__ import annotations

from ..protocols import endpoint_text, protocol_name
from .colour import PLAIN, Style
from .nearmiss import TEXT_LIMIT, NearMiss
from .paths import PacketPath, Step
from .report import TraceReport, conntrack_json, netns_words, summary
from ..kernel.system import interface_name

VERDICT_LABELS = {"accept": "ACCEPT", "drop": "DROP", "queue": "QUEUE", "stolen": "STOLEN", "unknown": "?"}


def headline(path: PacketPath, style: Style = PLAIN) -> str:
    """`DROP  10.0.0.5:41522 → 10.0.0.9:22 tcp  dropped by inet filter input rule handle 7: ...`"""
    packet = path.first_packet
    verdict = path.verdict if path.complete else "unknown"
    label = VERDICT_LABELS.get(verdict, path.verdict.upper())
    if packet is None:
        flow = "?"
    else:
        flow = f"{endpoint_text(packet.src, packet.sport)} → {endpoint_text(packet.dst, packet.dport)} {protocol_name(packet.proto)}"
    return f"{style.verdict(f'{label:<6}', verdict)} {flow}  {summary(path)}"


def _step_line(step: Step, style: Style = PLAIN, deciding: bool = False) -> str:
    indent = "    " * (step.depth + 1)
    if step.type == "policy":
        line = f"policy {step.verdict}"
        return indent + (style.deciding(line, step.verdict) if deciding else line)
    if step.type == "return":
        return f"{indent}↩ return (end of {step.chain})"
    label = f"[{step.handle}]" if step.handle is not None else f"[#{step.rule_number}]" if step.rule_number else "[?]"
    text = step.iptables or step.text or ("(deleted rule)" if step.rule_deleted else "(unknown rule)")
    if step.rule_deleted and step.text:
        text += "  (deleted since)"
    verdict = step.verdict
    if step.target:
        verdict = f"{verdict} {step.target}"
    line = f"{label} {text}  → {verdict}"
    return indent + (style.deciding(line, step.verdict) if deciding else line)


def path_lines(path: PacketPath, interfaces: dict, style: Style = PLAIN) -> list[str]:
    """hook → table/chain → rule and verdict; jumps indented; every hook the packet passed.
    A packet traced across namespaces: its hooks grouped under each namespace, in order."""
    lines = []
    if path.segments:
        for segment in path.segments:
            lines.append(f"  {netns_words(segment.netns)}")
            names = segment.interfaces or interfaces
            lines += ["  " + line for line in _hook_lines(segment, names, style, path.decided_by)]
            lines += ["  " + line for line in _nat_lines(segment)]
    else:
        lines += _hook_lines(path, interfaces, style, path.decided_by)
        lines += _nat_lines(path)
    if path.kernel_drop:
        drop = path.kernel_drop
        where = f" at {drop['location']}" if drop.get("location") else ""
        explained = f": {drop['explain']}" if drop.get("explain") else ""
        lines.append(f"  kernel drop: {drop.get('reason')}{where}{explained}")
    return lines + near_miss_lines(path, style)


def _occurrences(hooks: list, items: list) -> list:
    """Which pass of `hooks` each item (a step, an observation) belongs to, in order: a hook can
    come twice (a packet routed out through a bridge passes postrouting, then the bridge's
    output and postrouting)."""
    places, position = [], 0
    for item in items:
        found = next((i for i in range(position, len(hooks)) if hooks[i] == item.hook), None)
        if found is None:
            found = next((i for i in range(len(hooks)) if hooks[i] == item.hook), None)
        else:
            position = found
        places.append(found)
    return places


def _hook_lines(path: PacketPath, interfaces: dict, style: Style, decided_by) -> list[str]:
    lines = []
    hooks = list(path.hooks) + [step.hook for step in path.steps if step.hook not in path.hooks]
    steps_at: dict = {}
    for step, place in zip(path.steps, _occurrences(hooks, path.steps)):
        steps_at.setdefault(place, []).append(step)
    # Interfaces as the first chain on the hook saw them (the port a bridged frame came in on,
    # before br_netfilter's IP chains show the bridge device); the output interface, when that
    # chain ran before routing chose one, as the hook's last chain saw it.
    seen: dict = {}
    out: dict = {}
    for observation, place in zip(path.observations, _occurrences(hooks, path.observations)):
        if place is None:
            continue
        seen.setdefault(place, observation)
        if observation.oif:
            out[place] = observation.oif
    # A hook that only legacy tables ran: its interfaces as their first TRACE line there gave them.
    for observation, place in zip(path.legacy_observations, _occurrences(hooks, path.legacy_observations)):
        if place is not None:
            seen.setdefault(place, observation)
    conntrack = {entry["hook"]: entry for entry in conntrack_json(path)}
    for place, hook in enumerate(hooks):
        observation = seen.get(place)
        where = ""
        if observation is not None:
            iif = interface_name(interfaces, observation.iif)
            oif = interface_name(interfaces, observation.oif or out.get(place))
            where = "  " + " ".join(part for part in (f"in {iif}" if iif else "", f"out {oif}" if oif else "") if part)
        if hook in conntrack and (observation is None or observation.family not in ("bridge", "netdev")):
            ct = conntrack[hook]
            where += f"  ct {ct['state']}" + (f" ({ct['direction']})" if ct["direction"] else "")
        label = hook or "(hook unknown)"
        if observation is not None and observation.family == "bridge" \
                and all(step.family == "bridge" for step in steps_at.get(place, [])):
            label += " (bridge)"
        lines.append(f"  {label}{where}".rstrip())
        current = None
        for step in steps_at.get(place, []):
            chain = (step.backend, step.family, step.table, step.chain)
            if step.depth == 0 and chain != current:
                lines.append(f"    {step.where()}")
                current = chain
            lines.append("  " + _step_line(step, style, step is decided_by))
        if not steps_at.get(place):
            lines.append("    (no chain of the ruleset on this hook)")
    return lines


def _nat_lines(path: PacketPath) -> list[str]:
    lines = []
    for change in path.nat:
        by = f"by {change['rule']}" if change.get("rule") else "by conntrack (the connection's NAT mapping)"
        lines.append(f"  nat at {change['hook']}: {change['field']} {change['from']} → {change['to']}  {by}")
    return lines


WOULD_HAVE = {"accept": "accepted", "drop": "dropped"}
COLUMN_GAP = "      "


def near_miss_lines(path: PacketPath, style: Style = PLAIN, limit: int = TEXT_LIMIT) -> list[str]:
    """The closest rules that would have changed the packet's fate, and why each did not match:
    `closest rule that would have accepted it: inet filter forward [9] ip saddr 10.77.1.0/28 ... accept`
    `    ✗ ip saddr 10.77.1.50 is not in 10.77.1.0/28      ✓ tcp dport 8080`"""
    lines = []
    shown = path.near_misses[:limit]
    for index, near_miss in enumerate(shown):
        would = style.verdict(WOULD_HAVE.get(near_miss.verdict, near_miss.verdict), near_miss.verdict)
        lead = f"closest rule that would have {would} it" if index == 0 else f"next closest, would have {would} it"
        lines.append(f"  {lead}: {near_miss.where()} {near_miss.label()} {near_miss.iptables or near_miss.text}")
        if near_miss.target and near_miss.decided_in:
            lines.append(f"    (its target {near_miss.target} decides: {near_miss.decided_in})")
        lines.append("    " + COLUMN_GAP.join(_explanation(near_miss, style)))
    if len(path.near_misses) > len(shown):
        more = len(path.near_misses) - len(shown)
        lines.append(f"  ({more} more in --json)")
    return lines


def _explanation(near_miss: NearMiss, style: Style) -> list[str]:
    parts = []
    several = len(near_miss.mismatches) > 1
    for mismatch in near_miss.mismatches:
        first = " (checked first)" if several and mismatch.first else ""
        parts.append(style.failed(f"✗ {mismatch.reason or mismatch.expr}") + first)
    parts += [style.passed(f"✓ {expr}") for expr in near_miss.matched]
    parts += [style.unknown(f"? {expr} (not known from the trace)") for expr in near_miss.unknown]
    return parts


def render_packet(path: PacketPath, interfaces: dict, style: Style = PLAIN) -> str:
    return "\n".join([headline(path, style)] + path_lines(path, interfaces, style))


def render_closing(report: TraceReport, packet_count: int) -> str:
    lines = []
    if packet_count == 0:
        hint = "" if report.dry_run is not None else " (`--dry-run` traces a crafted one, no traffic needed)"
        if hint and report.flow.ip_version == 6:  # a sender that cannot find its next hop sends nothing
            hint = hint[:-1] + ", and the sender's neighbour solicitation before it)"
        lines.append(f"no packet of {report.flow.describe()} was seen{hint}")
    for warning in report.warnings:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def dry_run_line(report: TraceReport) -> str:
    """For a dry run, the line under each packet that says where the answer comes from."""
    if report.dry_run is None:
        return ""
    dry = report.dry_run
    where = f"netns {report.netns}" if report.netns else "this namespace"
    ruleset = "its ruleset" if dry["ruleset"] == "copy" else dry["ruleset"]
    injected = dry["injected"]
    entry = f"arriving on {injected['iif']}" if injected["iif"] else "sent by a local socket"
    return (f"\n  dry run: sandbox copy of {where} with {ruleset}; one {dry['state']} packet {entry}; "
            f"nothing was sent to {where}")
