"""`nftrace why ... --fix accept|drop`: the smallest change that gives the flow that verdict,
proven by the kernel in a sandbox copy of the namespace. The target is never changed.

The proof, in a sandbox (nftrace.dryrun.session.DryRun):
1. the flow's packet is traced as it is (for a live run, the packet the live trace saw);
2. the flows of `--keep FILE` are traced, for the verdict each has before any change;
3. a change (nftrace.dryrun.fixplan) is applied to the sandbox with the very command line it
   prints, run by `sh -c` (only a handle or rule number differs: the sandbox's for the same rule),
   and the packet is traced again, along its whole path; while another base chain, hook or
   table still decides otherwise, the next change is made there;
4. every `--keep` flow is traced again and must keep its verdict.
A fix is printed as proven only when the kernel gave the asked verdict. A set element (a near
miss's lookup) is tried first; if it is refused, does not help or changes a --keep flow, a
fresh sandbox tries rules that match only the flow.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from ..errors import InputError
from ..flow import Flow
from ..lab.expectations import ExpectationFile, FlowExpectation
from ..trace.paths import PacketPath
from ..trace.report import TraceReport, decided_by_json
from .fixplan import (VERDICTS, Change, NoChange, element_change, flow_match, is_fix_rule, kernel_drop_words,
                      neighbour_discovery_changes, reversed_flow, rule_change)
from .managers import manager_of
from .sandbox import default_iptables_kind
from ..kernel.runner import CommandFailed, first_line
from ..kernel.system import interface_name
from ..protocols import protocol_name
from .session import NEIGHBOUR_FIELDS, DryRun, DryRunRequest
from .testing import load_all

MAX_CHANGES = 6  # base chains that may each decide the packet's fate along one path


def parse_fix_verdict(text: Optional[str]) -> Optional[str]:
    if text is None:
        return None
    verdict = text.strip().lower()
    if verdict not in VERDICTS:
        raise InputError(f"--fix: '{text}' is not one of {', '.join(VERDICTS)}")
    return verdict


def load_keep(path: Optional[Path]) -> Optional[ExpectationFile]:
    """The --keep file, read and checked as `nftrace test` does, before anything is traced."""
    if path is None:
        return None
    try:
        return load_all([Path(path)])[0]
    except InputError as err:
        raise InputError(f"--keep: {err}") from None


@dataclass
class FixAnswer:
    """The `fix` of a packet's answer: the commands, and what the sandbox proved."""

    verdict: str
    needed: bool = True
    proven: bool = False
    changes: list = field(default_factory=list)  # Change, in the order they are to be run
    netns: Optional[str] = None
    after: Optional[PacketPath] = None
    reply: Optional[PacketPath] = None  # the other side's answer, after the change
    # Neighbour discovery the flow waits for, after the change (dry runs of IPv6 flows):
    # NEIGHBOUR_FIELDS -> its NeighbourTrace.
    neighbours: dict = field(default_factory=dict)
    kept: int = 0
    keep_file: Optional[str] = None
    broken: Optional[dict] = None  # the --keep flow that a fix would have changed
    reason: Optional[str] = None
    managers: list = field(default_factory=list)  # ManagerNote
    warnings: list = field(default_factory=list)

    @property
    def commands(self) -> list[str]:
        prefix = f"ip netns exec {self.netns} " if self.netns else ""
        return [prefix + change.command() for change in self.changes]

    @property
    def scope(self) -> str:
        """What the changes let through or stop besides the flow: nothing, for rules."""
        # A rule for the flow says what it matches; other changes (a set element, neighbour
        # discovery) say what else they let in.
        rules = [change.match_text for change in self.changes if change.kind == "rule" and change.match_text]
        parts = []
        if rules:
            parts.append(f"the new rule{'s' if len(rules) > 1 else ''} match{'' if len(rules) > 1 else 'es'} only "
                         + " and ".join(dict.fromkeys(rules)))
        parts += [change.scope for change in self.changes if not (change.kind == "rule" and change.match_text)
                  and change.scope]
        return "; ".join(dict.fromkeys(parts))

    def after_json(self) -> Optional[dict]:
        if self.after is None:
            return None
        after = _outcome_json(self.after)
        if self.reply is not None:
            after["reply"] = _outcome_json(self.reply)
        after.update((name, _outcome_json(traced.path)) for name, traced in self.neighbours.items())
        return after

    def to_json(self) -> dict:
        return {"verdict": self.verdict, "needed": self.needed, "proven": self.proven,
                "commands": self.commands if self.proven else [],
                "changes": [change.to_json() for change in self.changes] if self.proven else [],
                "after": self.after_json(), "kept": self.kept, "keep_file": self.keep_file, "broken": self.broken,
                "scope": self.scope if self.proven else None, "reason": self.reason,
                "managers": [note.to_json() for note in self.managers], "warnings": list(self.warnings)}


def _outcome_json(path: PacketPath) -> dict:
    """`{"verdict", "decided_by"}` of a path in the sandbox; `new`: decided by a rule of the fix."""
    decided = decided_by_json(path.decided_by)
    if decided is not None:
        decided["new"] = is_new_step(path.decided_by)
    return {"verdict": path.verdict if path.complete else "unknown", "decided_by": decided}


def is_new_step(step) -> bool:
    """A step of a rule that only the sandbox has: one a fix added."""
    if step is None or step.type != "rule":
        return False
    return is_fix_rule(step.iptables or step.text) and (step.handle is None or step.backend != "nft")


def decider_key(path: PacketPath) -> tuple:
    step = path.decided_by
    where = None if step is None else (step.backend, step.family, step.table, step.chain, step.type, step.handle,
                                       step.rule_number, step.hook)
    return (path.verdict if path.complete else "unknown", where)


class StrategyFailed(Exception):
    """This way of fixing does not work (the message says why); another may."""


@dataclass
class FixRequest:
    verdict: str
    keep: Optional[ExpectationFile] = None
    date: str = field(default_factory=lambda: datetime.date.today().isoformat())
    timeout: float = 10.0


class FixProver:
    """Finds and proves a fix for one flow, in sandbox copies of the target."""

    def __init__(self, dry_request: DryRunRequest, flow: Flow, request: FixRequest,
                 near_misses: Callable[[PacketPath, DryRun], list] = lambda path, dry: path.near_misses):
        self.dry_request = dry_request
        self.flow = flow
        self.request = request
        self.near_misses = near_misses
        self.legacy_is_default = default_iptables_kind() == "iptables-legacy"
        self.baseline: dict = {}  # --keep flow name -> verdict before any change
        # A dry run's IPv6 packet comes from the wire only after its sender's neighbour
        # solicitation, and goes on only after its next hop's advertisement: the proof lets them
        # in too. A live packet was seen, so its neighbours had found each other.
        self.neighbours_first = False
        self._interfaces: dict = {}  # the sandbox's interface names, as the last trace saw them

    # -- entry ------------------------------------------------------------------------------------

    def prove(self, probe: Flow, dry: Optional[DryRun] = None, first: Optional[PacketPath] = None,
              live_verdict: Optional[str] = None, first_interfaces: Optional[dict] = None) -> FixAnswer:
        """`probe` is one concrete packet of the flow (what the sandbox sends); `dry` an open
        sandbox to start in (a dry run's own), else one is made; `first` its path there, and
        `first_interfaces` the names of the interfaces that path went through."""
        answer = FixAnswer(self.request.verdict, netns=self.dry_request.netns,
                           keep_file=str(self.request.keep.path) if self.request.keep else None)
        made = None  # a sandbox of our own, closed here
        try:
            if dry is None:
                dry = made = self._open()
                first = None
            elif first is not None:
                self._interfaces = dict(first_interfaces or {})
            try:
                self._attempt(dry, probe, first, True, answer, live_verdict)
                return answer
            except StrategyFailed as failed:
                answer.reason = str(failed)
                if not any(change.kind == "element" for change in answer.changes):
                    return answer
                # The sandbox holds the element now: rules alone are tried in a fresh copy.
                answer.warnings.append(f"adding to a set did not do: {failed}; a rule that matches only the flow "
                                       f"is tried instead")
                answer.changes, answer.after, answer.broken, answer.managers = [], None, None, []
                answer.reply = None
            if made is not None:
                made.close()
            dry = made = self._open()
            try:
                self._attempt(dry, probe, None, False, answer, live_verdict)
            except StrategyFailed as failed:
                answer.reason = str(failed)
            return answer
        finally:
            if made is not None:
                made.close()

    def _open(self) -> DryRun:
        dry = DryRun(self.dry_request)
        try:
            dry.open()
        except BaseException:
            dry.close()
            raise
        return dry

    # -- one attempt ------------------------------------------------------------------------------

    def _attempt(self, dry: DryRun, probe: Flow, first: Optional[PacketPath], use_sets: bool, answer: FixAnswer,
                 live_verdict: Optional[str]) -> None:
        asked = self.request.verdict
        path = first or self._trace(dry, probe)
        if path is None:
            raise StrategyFailed("the packet was not seen in the sandbox copy")
        if asked == "accept" and path.complete and path.verdict == "accept" and path.kernel_drop:
            raise StrategyFailed(f"the ruleset lets it through already, and the kernel drops it after netfilter: "
                                 f"{kernel_drop_words(path)}; no ruleset change can let it through")
        if self._has_verdict(path) and not (asked == "accept" and self._neighbour_discovery_dropped(dry, probe)):
            answer.needed = False
            answer.after = path
            if live_verdict is not None and live_verdict != asked:
                answer.reason = (f"in a sandbox copy a new packet of the flow is already {_word(asked)}: the live "
                                 f"verdict ({live_verdict}) depends on what the copy does not have (the conntrack "
                                 f"table, sockets, rate-limit state)")
            else:
                answer.reason = f"the packet is already {_word(asked)}"
            return
        if self.request.keep and not self.baseline:
            self.baseline = self._keep_verdicts(dry, answer)
            if self._has_verdict(path):
                # Let through already (neighbour discovery is what needs a change): its answer,
                # traced next, answers the packet traced last, which must be the flow's again.
                path = self._trace(dry, probe) or path
        answer.changes, answer.managers = [], []
        reply_before = None
        for _ in range(MAX_CHANGES + 1):
            if not self._has_verdict(path):
                before = decider_key(path)
                change = self._apply_first(dry, path, use_sets)
                self._record(change, path, answer)
                path = self._retrace(dry, probe, change)
                if not self._has_verdict(path) and decider_key(path) == before:
                    raise StrategyFailed(f"`{change.command()}` did not change what decides the packet: still "
                                         f"{_location(path)}")
                continue
            if asked != "accept":
                break
            # Let through, the flow works only if its answers come back: the other side's reply
            # is sent right after the packet, while its connection is in the sandbox's conntrack.
            reply = self._trace_reply(dry, path, answer)
            answer.reply = reply
            if reply is None or (reply.complete and reply.verdict == "accept"):
                break
            if reply_before is not None and decider_key(reply) == reply_before:
                raise StrategyFailed(f"the flow's answers are still dropped, by {_location(reply)}")
            reply_before = decider_key(reply)
            try:
                change = rule_change(reversed_flow(self.flow), reply, "accept", self.request.date,
                                     self.legacy_is_default, established=True,
                                     iptables_nft_tables=iptables_nft_tables(dry))
            except NoChange as reason:
                raise StrategyFailed(f"the flow's answers are dropped and cannot be let through: {reason}") from None
            self._apply(dry, change)
            self._record(change, reply, answer, reversed_flow(self.flow))
            path = self._retrace(dry, probe, change)
        else:
            raise StrategyFailed(f"after {MAX_CHANGES} changes the packet is still {_word(path.verdict)} by "
                                 f"{_location(path)}")
        if asked == "accept" and self.neighbours_first:
            for name, trace in NEIGHBOUR_FIELDS.items():
                traced = self._let_neighbour_through(dry, answer, trace, probe)
                if traced is not None:
                    answer.neighbours[name] = traced
        answer.after = path
        if self.request.keep:
            self._check_keep(dry, answer)
        answer.proven = True
        answer.reason = None

    def _neighbour_discovery_dropped(self, dry: DryRun, probe: Flow) -> bool:
        """Whether the ruleset drops neighbour discovery that the flow waits for: then a flow
        that it lets through still needs a change."""
        if not self.neighbours_first:
            return False
        return any(traced is not None and traced.verdict == "drop"
                   for traced in (trace(dry, probe) for trace in NEIGHBOUR_FIELDS.values()))

    def _let_neighbour_through(self, dry: DryRun, answer: FixAnswer, trace: Callable, probe: Flow):
        """Where the ruleset drops a neighbour discovery message that the flow waits for, the flow
        never gets through, let through or not: neighbour discovery is let through where the
        message was dropped, and the message traced again (`trace`), as many times as chains
        drop it. Returns its NeighbourTrace once it got through (None: none is asked)."""
        before = None
        for _ in range(MAX_CHANGES + 1):
            traced = trace(dry, probe)
            if traced is None or traced.verdict == "accept":
                return traced
            what = traced.name
            if traced.path is None:
                answer.warnings.append(f"{what} was not seen in the sandbox copy: whether it gets through is not "
                                       f"proven")
                return None
            if before is not None and decider_key(traced.path) == before:
                raise StrategyFailed(f"{what} is still dropped, by {_location(traced.path)}")
            before = decider_key(traced.path)
            try:
                changes = neighbour_discovery_changes(traced.path, self.request.date, self.legacy_is_default,
                                                      iptables_nft_tables(dry))
            except NoChange as reason:
                raise StrategyFailed(f"{what} is dropped, and neighbour discovery cannot be let in: {reason}") from None
            for change in changes:
                self._apply(dry, change)
                self._record(change, traced.path, answer, traced.asked, hint=False)
        raise StrategyFailed(f"after {MAX_CHANGES} changes {what} is still dropped")

    def _record(self, change: Change, path: PacketPath, answer: FixAnswer, flow: Optional[Flow] = None,
                hint: bool = True) -> None:
        if len(answer.changes) >= MAX_CHANGES:
            raise StrategyFailed(f"more than {MAX_CHANGES} changes would be needed; the last decider is "
                                 f"{_location(path)}")
        answer.changes.append(change)
        self._note_manager(change, path, answer, flow or self.flow, hint)

    def _retrace(self, dry: DryRun, probe: Flow, change: Change) -> PacketPath:
        path = self._trace(dry, probe)
        if path is None:
            raise StrategyFailed(f"after `{change.command()}` the packet was not seen any more in the sandbox")
        return path

    def _trace_reply(self, dry: DryRun, path: PacketPath, answer: FixAnswer) -> Optional[PacketPath]:
        closed = closed_port(path, dry.netstate)
        if closed:
            answer.warnings.append(f"nothing listens on {closed} in {dry.netstate.where}: the firewall lets the "
                                   f"packet through, and the box answers it with a refusal")
            return None
        report = TraceReport(flow=self.flow, netns=dry.request.netns)
        seen: list = []
        sent = dry.trace_reply(path, self._interfaces, report, seen.append, timeout=self.request.timeout)
        if sent is None:
            return None
        if not seen:
            answer.warnings.append("the other side's answer to the packet was not seen in the sandbox: whether it "
                                   "comes back is not proven")
            return None
        self._translate_legacy(dry, seen[0])
        return seen[0]

    def _has_verdict(self, path: PacketPath) -> bool:
        return path.complete and path.verdict == self.request.verdict

    def _apply_first(self, dry: DryRun, path: PacketPath, use_sets: bool) -> Change:
        """Apply the first candidate that the sandbox takes: a set element of a near miss, else
        one rule. A refused command changed nothing, so the next candidate is tried."""
        refused = None
        for change in self._candidates(dry, path, use_sets):
            try:
                self._apply(dry, change)
                return change
            except StrategyFailed as failed:
                refused = failed
        raise refused or StrategyFailed("no change can be made for this path")

    def _candidates(self, dry: DryRun, path: PacketPath, use_sets: bool):
        asked = self.request.verdict
        if use_sets:
            for near_miss in self.near_misses(path, dry):
                change = element_change(near_miss, asked)
                if change is not None:
                    yield replace(change, scope=element_scope(change, dry.snapshot))
        try:
            yield rule_change(self.flow, path, asked, self.request.date, self.legacy_is_default,
                              iptables_nft_tables=iptables_nft_tables(dry))
        except NoChange as reason:
            raise StrategyFailed(str(reason)) from None

    def _note_manager(self, change: Change, path: PacketPath, answer: FixAnswer, flow: Flow, hint: bool = True) -> None:
        """The manager's note on a change in its chains, with its own way to make it (`hint`: the
        managers' hints are for a flow; a change that is not one, neighbour discovery, has none)."""
        placement = change.placement or change.used_in  # a manager rewrites its sets as it does its chains
        if placement is None:
            return
        on_path = {step.chain for step in path.steps
                   if (step.backend, step.family, step.table) == (placement.backend, placement.family, placement.table)}
        note = manager_of(placement, flow_match(flow, path, placement), self.request.verdict, on_path)
        if note is not None and not hint:
            if any(noted.note == note.note for noted in answer.managers):
                return
            note = replace(note, hint=None)
        if note is not None and note not in answer.managers:
            answer.managers.append(note)

    # -- the sandbox --------------------------------------------------------------------------------

    def _trace(self, dry: DryRun, flow: Flow, near_misses: bool = True) -> Optional[PacketPath]:
        report = TraceReport(flow=flow, netns=dry.request.netns)
        seen: list = []
        # The verdict is netfilter's: the kernel's drop reasons (bpftrace, a second to start) add nothing.
        dry.trace(flow, report, seen.append, timeout=self.request.timeout, drop_reasons=False,
                  near_misses=near_misses)
        self._interfaces = report.interfaces
        if not seen:
            return None
        path = seen[0]
        self._translate_legacy(dry, path)
        return path

    def _apply(self, dry: DryRun, change: Change) -> None:
        """Run the change's own command line in the sandbox, with the sandbox's handle or number."""
        handle = number = None
        placement = change.placement
        if placement is not None and placement.backend == "nft" and not placement.iptables_nft \
                and placement.handle is not None:
            handle = dry.names.sandbox_handle(placement.family, placement.table, placement.chain, placement.handle)
            if handle is None:
                raise StrategyFailed(f"the rule before which the fix goes ({placement.describe()}) is not in the "
                                     f"sandbox copy")
        if placement is not None and (placement.backend != "nft" or placement.iptables_nft) and placement.rule_number:
            number = self._sandbox_number(dry, placement)
        line = change.command(handle=handle, rule_number=number)
        # The printed line itself, through a POSIX shell: its quoting is proven with it.
        try:
            result = dry.sandbox.run(["sh", "-c", line], check=False)
        except CommandFailed as err:
            raise StrategyFailed(f"`{change.command()}` could not be run in the sandbox copy: {err}") from None
        if result.returncode != 0:
            raise StrategyFailed(f"`{change.command()}` was refused in the sandbox copy: {first_line(result)}")

    def _fix_positions(self, dry: DryRun, backend: str, family: str, table: str, chain: str) -> list[int]:
        """Rule numbers, in the sandbox's chain, of the rules a fix added (iptables tables)."""
        if backend == "iptables-legacy":
            tool = ("ip6tables" if family == "ip6" else "iptables") + "-legacy"
        else:
            tool = ("ip6tables" if family == "ip6" else "iptables") + "-nft"
        result = dry.sandbox.run([tool, "-t", table, "-S", chain], check=False)
        rules = [line for line in result.stdout.splitlines() if line.startswith("-A ")]
        return [number for number, line in enumerate(rules, 1) if is_fix_rule(line)]

    def _sandbox_number(self, dry: DryRun, placement) -> int:
        """The target's rule number N is the sandbox's N plus the fix rules inserted before it."""
        number = placement.rule_number
        for position in self._fix_positions(dry, placement.backend, placement.family, placement.table,
                                            placement.chain):
            if position <= number:
                number += 1
        return number

    def _translate_legacy(self, dry: DryRun, path: PacketPath) -> None:
        """Legacy rules are named by number: a fix rule inserted before one shifts it in the sandbox."""
        inserted = {}
        for step in path.steps:
            if step.backend != "iptables-legacy" or step.rule_number is None:
                continue
            key = (step.family, step.table, step.chain)
            if key not in inserted:
                inserted[key] = self._fix_positions(dry, "iptables-legacy", *key)
            positions = inserted[key]
            if step.rule_number in positions:
                continue  # the fix's own rule: its text says so
            step.rule_number -= sum(1 for position in positions if position < step.rule_number)

    # -- --keep ------------------------------------------------------------------------------------

    def _keep_verdicts(self, dry: DryRun, answer: FixAnswer) -> dict:
        verdicts = {}
        for expectation in self.request.keep.flows:
            verdict = self._keep_verdict(dry, expectation)
            verdicts[expectation.name] = verdict
            if verdict is None:
                answer.warnings.append(f"--keep flow '{expectation.name}' cannot be sent in the sandbox copy: "
                                       f"it is not checked")
            elif verdict != expectation.expect:
                answer.warnings.append(f"--keep flow '{expectation.name}': the file expects {expectation.expect}, "
                                       f"it is {verdict} before any change; it is held to {verdict}")
        return verdicts

    def _keep_verdict(self, dry: DryRun, expectation: FlowExpectation) -> Optional[str]:
        try:
            path = self._trace(dry, expectation.flow, near_misses=False)
        except InputError:
            return None
        if path is None:
            return "no packet"
        return path.verdict if path.complete else "unknown"

    def _check_keep(self, dry: DryRun, answer: FixAnswer) -> None:
        kept = 0
        for expectation in self.request.keep.flows:
            before = self.baseline.get(expectation.name)
            if before is None:
                continue
            after = self._keep_verdict(dry, expectation)
            if after != before:
                answer.broken = {"flow": expectation.name, "description": expectation.flow.describe(),
                                 "before": before, "after": after}
                raise StrategyFailed(f"the change would make --keep flow '{expectation.name}' "
                                     f"({expectation.flow.describe()}) {after} instead of {before}")
            kept += 1
        answer.kept = kept


def iptables_nft_tables(dry: DryRun) -> set:
    """(family, table) of the target's tables that iptables-nft writes: changed with iptables."""
    return set(dry.netstate.xtables_nft) | set(dry.netstate.iptables_managed)


def closed_port(path: PacketPath, netstate) -> Optional[str]:
    """`tcp/3306` when the packet is delivered to the box itself and nothing listens there."""
    packet = next((o.packet for o in reversed(path.observations) if o.packet is not None), None)
    if "input" not in path.hooks or packet is None or packet.dport is None or packet.proto not in (6, 17):
        return None
    proto = "tcp" if packet.proto == 6 else "udp"
    wildcard = ("0.0.0.0", "::")
    for listener in netstate.listeners:
        if (listener.proto, listener.port) == (proto, packet.dport) \
                and (listener.address in wildcard or listener.address == str(packet.dst)):
            return None
    return f"{proto}/{packet.dport}"


def element_scope(change: Change, snapshot) -> str:
    """What else a set element changes: every rule that looks the set up matches the value now."""
    users = [rule for rule in snapshot.rules.values()
             if (rule.family, rule.table) == (change.set_family, change.set_table)
             and re.search(rf"@{re.escape(change.set_name)}\b", rule.text)]
    chains = ", ".join(dict.fromkeys(f"{rule.family} {rule.table} {rule.chain}" for rule in users))
    count = f"{len(users)} rule{'s' if len(users) != 1 else ''}"
    return (f"{change.element} joins set {change.set_family} {change.set_table} {change.set_name}: every rule that "
            f"uses @{change.set_name} matches it now ({count}" + (f", in {chains})" if chains else ")"))


def _word(verdict: str) -> str:
    return {"accept": "accepted", "drop": "dropped"}.get(verdict, verdict)


def _location(path: PacketPath) -> str:
    step = path.decided_by
    return step.location() if step is not None else "no rule"


# -- for people ---------------------------------------------------------------------------------


def _decided_text(step) -> str:
    if step is not None and is_new_step(step):
        return f"{step.where()} rule (new): {step.iptables or step.text}"
    return step.location() if step is not None else "every chain on its path"


def render_fix(answer: FixAnswer) -> str:
    """The fix under a packet's answer: commands ready to paste, then the proof."""
    asked = answer.verdict.upper()
    lines = []
    if not answer.needed:
        lines.append(f"fix {answer.verdict}: nothing to change ({answer.reason})")
        return "\n".join(lines)
    if not answer.proven:
        lines.append(f"fix {answer.verdict}: no change could be proven: {answer.reason}")
        for note in answer.managers:
            lines.append(f"  note: {note.note}")
        for warning in answer.warnings:
            lines.append(f"  note: {warning}")
        return "\n".join(lines)
    where = f" in netns {answer.netns}" if answer.netns else ""
    lines.append(f"fix {answer.verdict}: run{where}:")
    lines += [f"  {command}" for command in answer.commands]
    decided = _decided_text(answer.after.decided_by)
    lines.append(f"proven in a sandbox copy: {asked} by {decided}")
    if answer.reply is not None:
        reply = answer.reply
        lines.append(f"  and the answer comes back: {reply.verdict.upper()} by {_decided_text(reply.decided_by)}")
    for traced in answer.neighbours.values():
        if is_new_step(traced.path.decided_by):  # let through by the fix
            lines.append(f"  and {traced.what}: ACCEPT by {_decided_text(traced.path.decided_by)}")
    scope = answer.scope
    if answer.keep_file:
        scope += f"; the {answer.kept} flows of {answer.keep_file} keep their verdicts"
    lines.append(f"scope: {scope}")
    for note in answer.managers:
        lines.append(f"  note: {note.note}")
        if note.hint:
            lines.append(f"  the manager's own way (not proven): {note.hint}")
    for warning in answer.warnings:
        lines.append(f"  note: {warning}")
    return "\n".join(lines)


# -- the packets of one run -------------------------------------------------------------------------


def probe_of(path: PacketPath, interfaces: dict, flow: Flow) -> Flow:
    """One concrete packet of the flow to send in the sandbox: the one the live trace saw
    (its addresses, ports and input interface), so that the copy decides on the same packet."""
    packet = path.first_packet
    if packet is None or packet.src is None or packet.dst is None:
        return flow
    iif = interface_name(interfaces, path.interface_index("iif"))
    if iif is not None and iif.startswith("if") and iif[2:].isdigit():
        iif = None  # an interface the namespace does not have any more
    return Flow(src=ipaddress.ip_network(packet.src), dst=ipaddress.ip_network(packet.dst),
                proto=protocol_name(packet.proto) if packet.proto is not None else flow.proto,
                sport=packet.sport or None, dport=packet.dport or None, iif=iif if iif != "lo" else None,
                oif=flow.oif)


def fix_packets(paths: list, flow: Flow, request: FixRequest, dry_request: DryRunRequest, *,
                interfaces: Optional[dict] = None, dry: Optional[DryRun] = None,
                near_misses: Optional[Callable[[PacketPath, DryRun], list]] = None) -> list[FixAnswer]:
    """A fix for each distinct fate among the packets (most runs have one): each packet gets
    `path.fix`. `dry` is the dry run's open sandbox (its one packet is `paths[0]`); for a live
    run, sandboxes are made here. `interfaces` names the interfaces of the packets' paths."""
    prover = FixProver(dry_request, flow, request, *([near_misses] if near_misses else []))
    prover.neighbours_first = dry is not None
    answers: dict = {}
    for path in paths:
        key = decider_key(path)
        if key not in answers:
            if dry is not None:
                answers[key] = prover.prove(flow, dry=dry, first=path, first_interfaces=interfaces)
            else:
                live = path.verdict if path.complete else None
                answers[key] = prover.prove(probe_of(path, interfaces or {}, flow), live_verdict=live)
        path.fix = answers[key]
    return list(answers.values())
