"""Which legacy ruleset made a TRACE line, when the rules change while nftrace traces. Pure logic.

A TRACE line names table, chain and position, nothing more, and a rule inserted above
another shifts the positions: the line must be read against the rules as they were when the
packet passed, whenever nftrace gets to read it (on a loaded machine, seconds later).
nftrace cannot know when a line was made, but it can bound it, by construction:

- nfnetlink_log queues a line on nftrace's socket while the packet is still in the chain
  (queue threshold 1), and x_tables replaces a table only once every packet in the old one
  is through: a line is on the socket before the table that made it is gone.
- The tables are observed (xtstate.py: a fingerprint of what the kernel holds, read in
  microseconds) before a drain of the socket when the last observation is stale, and after
  every drain that read lines. A line read by one drain was queued after the previous drain
  emptied the socket, so after every observation taken before that drain began; and before
  the first observation after its own drain. Its ruleset is one of those observed in between.
- At prerouting, input and forward the line carries its packet's timestamp (NFULA_TIMESTAMP,
  when the packet arrived: never later than the line): an observation finished before it
  came before the line too, and moves the lower bound up.

When every ruleset in that window gives the line the same step, that is the answer, in
whatever order things happened. Otherwise only the rulesets that can have made the line
stay: those that have such a rule, policy or return, whose rule the kernel labels as the
line is labelled, and whose rule does not provably miss the packet the line carries. One step left is the answer; else the step is
unknown and a warning says which rules changed. What no observation can see: rules changed
and changed back between two observations (at most a poll interval apart while nftrace runs).
"""

from __future__ import annotations

import bisect
from array import array
from dataclasses import dataclass, field
from typing import Optional

from ..protocols import iptables_command
from ..trace.matching import PacketView
from .legacy import CHAIN_HOOKS, LegacyRuleset, Resolution
from .nflog import LegacyTraceEvent
from .xtmatch import rule_conditions


@dataclass
class _Ambiguity:
    lines: int = 0
    meanings: list = field(default_factory=list)


class RulesetHistory:
    """The legacy rulesets one family had, observation by observation, and the step each TRACE
    line stands for. `record` each observation; a ruleset's text is `learn`t once per
    fingerprint (a fingerprint without text is a ruleset nftrace saw but could not read)."""

    def __init__(self, family: str, interfaces: Optional[dict] = None):
        self.family = family
        self.interfaces = interfaces or {}  # ifindex → name, for matching a rule against a line's packet
        self._rulesets: dict[bytes, LegacyRuleset] = {}
        self._starts: list[int] = []  # observation index where each run of one fingerprint starts
        self._fingerprints: list[bytes] = []  # the fingerprint of each run
        self._finished = array("d")  # CLOCK_REALTIME when each observation had read the tables
        self._ambiguous: dict[tuple, _Ambiguity] = {}

    # -- what was observed ------------------------------------------------------------------

    def knows(self, fingerprint: bytes) -> bool:
        return fingerprint in self._rulesets

    def learn(self, fingerprint: bytes, ruleset: LegacyRuleset) -> None:
        self._rulesets[fingerprint] = ruleset

    def record(self, fingerprint: bytes, finished_at: float) -> int:
        """One observation of the tables; its index."""
        index = len(self._finished)
        self._finished.append(finished_at)
        if not self._fingerprints or self._fingerprints[-1] != fingerprint:
            self._starts.append(index)
            self._fingerprints.append(fingerprint)
        return index

    @property
    def latest(self) -> int:
        return len(self._finished) - 1

    @property
    def latest_finished(self) -> float:
        return self._finished[-1] if self._finished else float("-inf")

    @property
    def current(self) -> Optional[LegacyRuleset]:
        """The ruleset of the latest observation (None: not read)."""
        return self._rulesets.get(self._fingerprints[-1]) if self._fingerprints else None

    # -- what a line means ------------------------------------------------------------------

    def window(self, event: LegacyTraceEvent) -> tuple[int, int]:
        """The first and last observation whose ruleset may have made the line."""
        if event.seen_between is None:
            return self.latest, self.latest
        low, high = event.seen_between
        stamp = event.timestamp
        if stamp is not None and (event.read_at is None or stamp <= event.read_at):
            # The last observation finished by the time the packet arrived came before the line.
            before = bisect.bisect_right(self._finished, stamp, low, high + 1) - 1
            low = max(low, before)
        return low, high

    def candidates(self, event: LegacyTraceEvent) -> list[Optional[LegacyRuleset]]:
        """The distinct rulesets observed in the line's window, oldest first (None: unread)."""
        low, high = self.window(event)
        first = max(0, bisect.bisect_right(self._starts, low) - 1)
        last = bisect.bisect_right(self._starts, high) - 1
        return [self._rulesets.get(fingerprint) for fingerprint in self._fingerprints[first:last + 1]]

    def resolve_line(self, event: LegacyTraceEvent) -> Optional[Resolution]:
        """The step the line stands for; None when nftrace cannot tell (a warning says why)."""
        rulesets = self.candidates(event)
        meanings = [ruleset.resolve(event.table, event.chain, event.type, event.rule_number) if ruleset else _UNREAD
                    for ruleset in rulesets]
        distinct = list(dict.fromkeys(meanings))
        if len(distinct) == 1:
            return None if distinct[0] is _UNREAD else distinct[0]
        possible = [meaning for meaning in distinct if meaning is _UNREAD or (
            meaning is not None and _labelled_so(meaning, event) and self._may_match(meaning, event))]
        if len(possible) == 1 and possible[0] is not _UNREAD:
            return possible[0]
        self._note(event, possible or distinct)
        return None

    def _may_match(self, meaning: Resolution, event: LegacyTraceEvent) -> bool:
        """Whether the rule can have matched the packet the line carries (as it was at that rule)."""
        if meaning.rule is None or event.packet is None or event.type != "rule":
            return True
        return rule_conditions(meaning.rule.text, self._view(event), self.family).matches is not False

    def _view(self, event: LegacyTraceEvent) -> PacketView:
        packet = event.packet

        def name(index: Optional[int]) -> Optional[str]:
            return self.interfaces.get(index) if index else ""  # no index: no such interface at this hook

        return PacketView(hook=event.hook, version=packet.src.version if packet.src is not None else None,
                          src=packet.src, dst=packet.dst, proto=packet.proto, sport=packet.sport, dport=packet.dport,
                          icmp_type=packet.icmp_type, icmp_code=packet.icmp_code, tcp_flags=packet.tcp_flags,
                          length=packet.length, iifname=name(event.iif), oifname=name(event.oif), mark=event.mark or 0)

    def _note(self, event: LegacyTraceEvent, meanings: list) -> None:
        ambiguity = self._ambiguous.setdefault((event.table, event.chain), _Ambiguity())
        ambiguity.lines += 1
        for meaning in meanings:
            text = _describe(meaning, event)
            if text not in ambiguity.meanings:
                ambiguity.meanings.append(text)

    def notes(self) -> list[str]:
        """One warning per chain whose lines could not be told apart."""
        command = iptables_command(self.family)
        return [f"the legacy rules of {command} {table} {chain} changed while packets were traced, and "
                f"{ambiguity.lines} TRACE line(s) could have been made by the rules before or after the change "
                f"({'; or '.join(ambiguity.meanings)}): those steps say unknown"
                for (table, chain), ambiguity in self._ambiguous.items()]


def _labelled_so(meaning: Resolution, event: LegacyTraceEvent) -> bool:
    """Whether the kernel would label a line for this rule as the line is labelled: an
    unconditional ACCEPT, DROP or RETURN rule is `policy` (in a built-in chain) or `return`,
    every other rule is `rule` (ipt_do_table's trace_packet)."""
    rule = meaning.rule
    if rule is None:
        return True
    unconditional = rule.text.split()[2:] in (["-j", "ACCEPT"], ["-j", "DROP"], ["-j", "RETURN"])
    if not unconditional:
        return event.type == "rule"
    return event.type == ("policy" if rule.chain in CHAIN_HOOKS else "return")


class _Unread:
    """The meaning of a line in a ruleset nftrace saw but could not read: anything."""

    def __repr__(self) -> str:
        return "<unread ruleset>"


_UNREAD = _Unread()


def _describe(meaning, event: LegacyTraceEvent) -> str:
    if meaning is _UNREAD:
        return "rules nftrace could not read in time"
    if meaning is None:
        return f"no {event.type} {event.rule_number}"
    if meaning.rule is not None:
        return f"rule {meaning.rule.number}: {meaning.rule.text}"
    return f"the {meaning.type}"
