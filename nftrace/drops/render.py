"""`nftrace drops` for people: a live table on a terminal, one line per drop elsewhere, and
the summary at the end. All of it is read from the tally (tally.py) and the report."""

from __future__ import annotations

import shlex
import time
from collections import Counter
from typing import Optional

from ..protocols import endpoint_text, protocol_name
from ..trace.paths import PacketPath
from ..trace.report import netns_words, summary
from ..kernel.system import interface_name
from .report import DropsReport
from .tally import Counted, DropTally, FlowKey

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen: the table is redrawn in place
LAST_FLOW_WIDTH = 48


def drop_line(path: PacketPath, interfaces: dict, now: Optional[float] = None) -> str:
    """`14:02:11 DROP   10.0.0.5:41522 → 10.0.0.9:22 tcp  in eth0  dropped by inet filter input rule ...`;
    a packet that the kernel dropped after netfilter reads `KERNEL` and says both."""
    stamp = time.strftime("%H:%M:%S", time.localtime(now if now is not None else time.time()))
    label = "KERNEL" if path.kernel_drop is not None else "DROP"
    packet = path.first_packet
    flow = "?" if packet is None else (f"{endpoint_text(packet.src, packet.sport)} → "
                                       f"{endpoint_text(packet.dst, packet.dport)} {protocol_name(packet.proto)}")
    iif = interface_name(interfaces, path.interface_index("iif"))
    where = f" in {iif}" if iif else ""
    return f"{stamp} {label:<6} {flow}{where}  {summary(path)}"


def _what(entry: Counted) -> str:
    """The rule as the tree shows it (`[12] tcp dport 25 drop`), the policy, or the kernel's reason."""
    step = getattr(entry, "step", None)
    if step is not None:
        if step.type == "policy":
            return f"policy {step.verdict}"
        label = f"[{step.handle}]" if step.handle is not None else f"[#{step.rule_number}]" if step.rule_number else "[?]"
        return f"{label} {step.iptables or step.text or '(rule text unknown)'}"
    reason = getattr(entry, "reason", "?")
    explain = getattr(entry, "explain", None)
    return f"kernel: {reason}" + (f" — {explain}" if explain else "")


def _chain(entry: Counted) -> str:
    step = getattr(entry, "step", None)
    return step.where() if step is not None else "(after netfilter)"


class LiveTable:
    """The `top`-like view: deciding rules and kernel reasons by packets dropped, with the rate
    since the last refresh and the latest flow."""

    def __init__(self, report: DropsReport, width: int = 120, rows: int = 20):
        self.report = report
        self.width = width
        self.rows = rows
        self._previous: dict = {}
        self._previous_at: Optional[float] = None

    def render(self, now: float, elapsed: float) -> str:
        tally: DropTally = self.report.tally
        since = (now - self._previous_at) if self._previous_at is not None else None
        where = f" in {netns_words(self.report.netns)}" if self.report.netns else ""
        lines = [f"nftrace drops{where}: {self.report.flow.describe()}   {elapsed:,.0f} s, "
                 f"{tally.packets:,} dropped of {tally.seen:,} traced packets   (Ctrl-C to stop)", ""]
        rule_width = max(30, self.width - 9 - 1 - 8 - 2 - 28 - 1 - 1 - LAST_FLOW_WIDTH)
        header = f"{'PACKETS':>9} {'RATE/s':>8}  {'CHAIN':<28} {'RULE / REASON':<{rule_width}} LAST FLOW"
        lines.append(header)
        entries = [(("rule",) + key, entry) for key, entry in tally.rules.items()] + \
                  [(("kernel", key), entry) for key, entry in tally.reasons.items()]
        entries.sort(key=lambda item: -item[1].packets)
        current = {}
        for key, entry in entries[: self.rows]:
            current[key] = entry.packets
            before = self._previous.get(key, 0)
            rate = f"{(entry.packets - before) / since:,.1f}" if since else "-"
            last = entry.last_flow.describe() if entry.last_flow else ""
            lines.append(f"{entry.packets:>9,} {rate:>8}  {_cut(_chain(entry), 28):<28} "
                         f"{_cut(_what(entry), rule_width):<{rule_width}} {last}")
        if not entries:
            lines.append("  (no packet dropped yet)")
        elif len(entries) > self.rows:
            lines.append(f"  ... and {len(entries) - self.rows} more")
        self._previous = {key: entry.packets for key, entry in entries}
        self._previous_at = now
        return "\n".join(_cut(line, self.width) for line in lines)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def render_summary(report: DropsReport) -> str:
    """The answer at the end: per deciding rule and kernel reason, packets and top flows."""
    tally = report.tally
    lines = []
    counted = f"{tally.packets:,} dropped"
    if report.counts is not None:
        counted += (f" of {report.counts.traced:,} traced packets"
                    f" ({report.counts.not_traced:,} matching packets not traced)")
    lines.append(f"{report.duration:,.1f} s: {counted}")
    note = report.sample_note()
    lines.append(note if note else "counts are exact: every matching packet was traced")
    for entry in tally.ranked_rules():
        lines.append("")
        lines.append(f"{entry.packets:>9,}  dropped by {entry.step.location()}")
        lines += _flow_lines(entry)
    for entry in tally.ranked_reasons():
        lines.append("")
        explained = f" — {entry.explain}" if entry.explain else ""
        # NETFILTER_DROP is netfilter's own drop, outside the traced chains: not "after netfilter".
        when = "" if entry.reason == "NETFILTER_DROP" else " after netfilter"
        lines.append(f"{entry.packets:>9,}  dropped by the kernel{when}: {entry.reason}{explained}")
        lines += _flow_lines(entry)
        if entry.reason == "NETFILTER_DROP" and report.untraced_legacy and entry.flows:
            lines.append(f"{'':>9}  legacy iptables tables are not traced by drops; to name the rule, trace "
                         f"the commonest destination: {why_command(report.netns, commonest_destination(entry))}")
    if not tally.packets:
        lines.append("")
        lines.append(f"no packet of {report.flow.describe()} was dropped")
    for warning in report.warnings:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def commonest_destination(entry: Counted) -> FlowKey:
    """A flow of the destination (address, protocol, port) with the most packets: source ports
    make many flows of one, and `why` needs no source port."""
    totals: Counter = Counter()
    for flow, packets in entry.flows.items():
        totals[(flow.src, flow.dst, flow.proto, flow.dport)] += packets
    [(commonest, _)] = totals.most_common(1)
    return next(flow for flow in entry.flows if (flow.src, flow.dst, flow.proto, flow.dport) == commonest)


def why_command(netns: Optional[str], flow: FlowKey) -> str:
    """The `nftrace why` of a dropped flow, in the namespace drops watched (its label: NAME,
    pid:PID, container:NAME); its own traffic, then, is the admin's to send."""
    from ..lab.lab import command_name  # only here: the lab's module is not worth its import time to drops

    kind, _, rest = (netns or "").partition(":")
    where = {"pid": ["--pid", rest], "container": ["--container", rest]}.get(kind, ["--netns", netns] if netns else [])
    args = [command_name(), *where, "why", "--from", flow.src or "?", "--to", flow.dst or "?"]
    if flow.proto:
        args += ["--proto", flow.proto]
    if flow.dport is not None:
        args += ["--dport", str(flow.dport)]
    return shlex.join(args)


def _flow_lines(entry: Counted) -> list:
    lines = [f"{'':>9}  {packets:>7,}  {flow.describe()}" for flow, packets in entry.top_flows()]
    hidden = entry.packets - sum(packets for _, packets in entry.top_flows())
    if hidden:
        lines.append(f"{'':>9}  {hidden:>7,}  (other flows)")
    return lines


__all__ = ["LiveTable", "drop_line", "render_summary", "why_command"]
