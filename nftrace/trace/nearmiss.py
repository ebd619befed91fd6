"""Near misses: the rules on a packet's path that did not match and would have changed its fate.

"Dropped by inet filter forward policy drop" answers the first question; the admin's next one
is which accept rule should have let the packet through, and why it did not. This module
answers it from what nftrace already has: the packet as the kernel reported it at each hook
(`HookObservation`), the rules the kernel ran (the path's steps), and the ruleset with its
set elements (a `RuleBook`, trace/rulebook.py). Pure logic: no socket, no process.

Which rules count (`find_near_misses`):
- the chains the kernel ran for the packet are walked again in rule order, with the path's
  steps saying which rules matched (the kernel's word, never re-evaluated); every rule that
  the kernel evaluated and that did not match is a candidate; rules after the one that
  ended a chain were never evaluated and do not count;
- a dropped packet: rules of the base-chain run that dropped it (its base chain and the
  chains it jumped to) whose verdict is accept — an accept ends only its own base chain, so
  an accept elsewhere would not have saved it. An accepted packet: drop and reject rules of
  every base-chain run it passed. Other verdicts (queue, stolen, unknown) have no near miss;
- a jump or goto counts by what its target chain would decide for this packet (the target's
  rules evaluated in order; a rule that cannot be evaluated stops the walk, undecided); a
  verdict map by the verdicts of its elements.

For each candidate every match expression is evaluated against the packet at that hook:
`mismatches` are those that failed (with the packet's value and what was wanted), `first`
marks the one the kernel stopped at (it evaluates in order and stops at the first failure;
when an expression before it cannot be evaluated, nobody knows, and none is marked),
`unknown` the expressions that cannot be evaluated from the trace (limit, quota, numgen,
socket, fib, meta time, ...): never guessed, but found by elimination where it is the only
one and every other expression matched (`by_elimination`: `tcp dport 22 limit rate 2/minute
accept` did not match an ssh packet, so its limit was spent). A candidate whose expressions
all matched (the evaluation disagrees with the kernel, e.g. state that changed between the
packet and the listing) is left out rather than explained wrongly.

Ranking: fewest failed expressions first, then fewest unknown ones, then rules that the flow's
own values missed before those that want another protocol or family, and those before the
ones that only the packet's circumstances kept from matching (conntrack state, loopback), then
the most that matched (a rule that fits the packet but for its source is closer than a bare `iif "lo"`),
then path order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Protocol

from ..kernel.tracetable import MARK_CHAIN_PREFIX
from ..protocols import iptables_command

from .matching import Condition, PacketView, RuleEvaluation

HOOK_RANK = {hook: rank for rank, hook in enumerate(("ingress", "prerouting", "input", "forward", "output",
                                                     "postrouting", "egress"))}

# How deep a hypothetical jump is followed (the kernel allows 16 levels).
MAX_JUMP_DEPTH = 16
# Fates that a near miss can change, and the verdicts that change them.
WANTED_VERDICT = {"drop": "accept", "accept": "drop"}
TEXT_LIMIT = 3


@dataclass(frozen=True)
class Mismatch:
    """One match expression of a near miss that failed for this packet.

    `expr`: the expression as nft prints it (`ip saddr 10.77.1.0/28`, `iifname "lan0"`,
    `ip saddr @allowed`), or as iptables-save does for legacy rules (`-s 10.77.1.0/28`).
    `packet`: the packet's value (`10.77.1.50`, `"wan0"`, `udp`). `wanted`: what the
    expression wanted (`10.77.1.0/28`, `@allowed`, `{ 22, 80 }`).
    `first`: the kernel stopped at this one (the first failing expression in rule order).
    `field`: what it tests, normalised (`ip saddr`, `tcp dport`, `iifname`, `ct state`,
    `meta mark`, ...) — the same words for nft and iptables rules.
    `set_name`: the named set (nft) or ipset (iptables) looked up; for a fix, the packet's
    value goes there. `negated`: the expression was `!=` / `!` (the packet's value is the
    one excluded). `reason`: the explanation in one line. `other_protocol`: the packet has no
    such field (a tcp port of a udp packet, an IPv4 address of an IPv6 one): no value of the
    flow's would match, only another kind of packet.
    """

    expr: str
    packet: str
    first: bool
    field: Optional[str] = None
    set_name: Optional[str] = None
    wanted: Optional[str] = None
    negated: bool = False
    reason: str = ""
    other_protocol: bool = False

    def to_json(self) -> dict:
        return {"expr": self.expr, "packet": self.packet, "first": self.first, "field": self.field,
                "set_name": self.set_name, "wanted": self.wanted, "negated": self.negated, "reason": self.reason,
                "other_protocol": self.other_protocol}


@dataclass(frozen=True)
class NearMiss:
    """A rule on the packet's path that did not match and whose verdict would have changed the
    packet's fate.

    `verdict`: what it would have done to the packet: `accept` or `drop` (a reject is a
    drop); for a jump or goto, what the target chain would decide (`target` names the chain,
    `decided_in` the target's rule that decides); for a verdict map, the verdict of the
    elements named in its mismatch.
    `handle` is None for legacy iptables rules (`rule_number` is the position an admin sees);
    `backend` is `nft` or `iptables-legacy`; `iptables` the iptables-save form of an
    iptables-nft or legacy rule. `matched`: the expressions that matched (shown with ✓).
    """

    family: str
    table: str
    chain: str
    hook: Optional[str]
    handle: Optional[int]
    rule_number: Optional[int]
    text: str
    verdict: str
    mismatches: tuple = ()
    unknown: tuple = ()
    matched: tuple = ()
    backend: str = "nft"
    iptables: Optional[str] = None
    target: Optional[str] = None
    decided_in: Optional[str] = None

    @property
    def failed(self) -> int:
        return len(self.mismatches)

    def where(self) -> str:
        if self.backend == "iptables-legacy":
            return f"{iptables_command(self.family)} {self.table} {self.chain}"
        return f"{self.family} {self.table} {self.chain}"

    def label(self) -> str:
        """`[9]` (handle) for nft rules, `[#3]` (position) for legacy ones, as the tree shows steps."""
        if self.handle is not None:
            return f"[{self.handle}]"
        return f"[#{self.rule_number}]" if self.rule_number is not None else "[?]"

    def to_json(self) -> dict:
        return {
            "family": self.family, "table": self.table, "chain": self.chain, "hook": self.hook,
            "handle": self.handle, "rule_number": self.rule_number, "text": self.text, "verdict": self.verdict,
            "target": self.target, "decided_in": self.decided_in,
            "mismatches": [m.to_json() for m in self.mismatches], "unknown": list(self.unknown),
            "matched": list(self.matched), "backend": self.backend, "iptables": self.iptables,
        }


def describe_mismatch(condition: Condition) -> str:
    """`ip saddr 10.77.1.50 is not in 10.77.1.0/28`: the packet's value against the wanted one
    (the evaluators say it; this is the plain form for a condition that does not)."""
    if condition.reason:
        return condition.reason
    return f"{condition.field or condition.expr} {condition.packet} is not {condition.wanted or '?'}"


def mismatches_from(evaluation: RuleEvaluation) -> tuple:
    """The failed conditions as Mismatches, the first marked when no unknown comes before it."""
    found = []
    first_done = False
    for condition in evaluation.conditions:
        if condition.matched is None:
            first_done = True  # an unknown before any failure: where the kernel stopped is not known
        elif condition.matched is False:
            found.append(Mismatch(condition.expr, condition.packet or "?", not first_done, condition.field,
                                  condition.set_name, condition.wanted, condition.negated,
                                  describe_mismatch(condition), condition.other_protocol))
            first_done = True
    return tuple(found)


def by_elimination(evaluation: RuleEvaluation) -> RuleEvaluation:
    """A rule the kernel evaluated and did not match, whose every condition matched but one that
    the trace cannot tell (`limit`, `quota`, `ct count`, ...): that one failed, for the kernel
    matches a rule only when all of its conditions hold. Not where a matched condition looks a
    set up: a set can change between the packet and nftrace's listing of it (dynamic sets,
    timeouts), a packet's headers cannot."""
    unknown = evaluation.unknown
    if evaluation.failed or len(unknown) != 1 or any(c.set_name for c in evaluation.conditions if c.matched):
        return evaluation
    [condition] = unknown
    failed = replace(condition, matched=False, packet="", reason=f"{condition.expr}: {_why_it_failed(condition.expr)} "
                                                                   "(every other condition matched, and the kernel "
                                                                   "did not match the rule)")
    return RuleEvaluation([failed if c is condition else c for c in evaluation.conditions])


def _why_it_failed(expr: str) -> str:
    """What the failure of a condition the trace cannot tell means, where its form says it."""
    words = expr.split()
    if words[:1] == ["limit"]:
        return "under the rate for this packet" if "over" in words else "over the limit for this packet"
    if words[:1] == ["quota"]:
        return "the quota is not used up yet" if "over" in words else "the quota is used up"
    if words[:2] == ["fib", "saddr"] and "iif" in words and words[-2:] in (["oif", "exists"], ["oif", "missing"]):
        # The reverse-path check: is there a route back to the source through the way it came in?
        if words[-1] == "exists":
            return "no route back to its source leaves through the interface it came in on (reverse-path check)"
        return "a route back to its source leaves through the interface it came in on"
    if words[:2] in (["meta", "time"], ["meta", "day"], ["meta", "hour"]):
        return "outside the rule's time window when the packet came"
    return "did not hold for this packet"


# -- the rules, as the finder needs them ------------------------------------------------------


@dataclass(frozen=True)
class RuleVerdict:
    """What a rule does when it matches: `accept`, `drop` (reject too), `jump`/`goto` (with
    `target`), `return`, `continue` (no verdict), `vmap`, or `other` (queue, NAT, ...)."""

    kind: str
    target: Optional[str] = None
    reject: bool = False


class BookRule(Protocol):
    """One rule of a RuleBook (trace/rulebook.py implements it for nft JSON and iptables-save)."""

    backend: str
    family: str
    table: str
    chain: str
    handle: Optional[int]
    number: int
    text: str
    iptables: Optional[str]
    verdict: RuleVerdict

    def evaluate(self, view: PacketView) -> RuleEvaluation: ...

    def vmap_choices(self, view: PacketView) -> list:
        """For a verdict-map rule: [(Condition for the map lookup, RuleVerdict)] per verdict."""
        ...


class RuleBook(Protocol):
    def rules(self, backend: str, family: str, table: str, chain: str) -> Optional[list]: ...


# -- the packet at each hook --------------------------------------------------------------------


def packet_view(observation, interfaces: dict, conntrack_reported: bool) -> PacketView:
    """The packet as a base chain first saw it (`HookObservation`), in the words rules test.

    The kernel sends no conntrack attributes when the packet has no conntrack entry (invalid,
    or before conntrack ran at this hook): then `ct state` is `invalid` for the rule too. On a
    kernel that never sends them (`conntrack_reported` false), the state is unknown.
    """
    packet = observation.packet
    hook = observation.hook
    ct = observation.ct
    if ct is not None:
        ct_state, ct_status, ct_direction = ct.state, frozenset(ct.status), ct.direction
    elif conntrack_reported:
        ct_state, ct_status, ct_direction = "invalid", frozenset(), None
    else:
        ct_state = ct_status = ct_direction = None

    def name(index: Optional[int]) -> Optional[str]:
        if index:
            return interfaces.get(index)  # an index nftrace cannot name: unknown, never guessed
        return ""

    return PacketView(
        hook=hook,
        version=packet.src.version if packet is not None and packet.src is not None else None,
        src=packet.src if packet else None,
        dst=packet.dst if packet else None,
        proto=packet.proto if packet else None,
        sport=packet.sport if packet else None,
        dport=packet.dport if packet else None,
        icmp_type=packet.icmp_type if packet else None,
        icmp_code=packet.icmp_code if packet else None,
        tcp_flags=packet.tcp_flags if packet else None,
        length=packet.length if packet else None,
        iifname=name(observation.iif),
        oifname=name(observation.oif),
        mark=observation.mark or 0,
        ct_state=ct_state,
        ct_status=ct_status,
        ct_direction=ct_direction,
    )


# -- finding them ------------------------------------------------------------------------------


@dataclass
class _Run:
    """One base-chain run of the packet: the chain the kernel entered at a hook."""

    backend: str
    family: str
    table: str
    chain: str
    hook: Optional[str]
    steps: list = field(default_factory=list)


def _runs(path) -> list:
    """The path's steps grouped by base-chain run, in order: a run starts with a step of a base
    chain (depth 0) other than the running one; the steps of the chains it calls follow it."""
    runs: list = []
    current: Optional[_Run] = None
    for step in path.steps:
        if current is None or (step.depth == 0 and (current.backend, current.family, current.table, current.chain,
                                                    current.hook) != (step.backend, step.family, step.table,
                                                                      step.chain, step.hook)):
            current = _Run(step.backend, step.family, step.table, step.chain, step.hook)
            runs.append(current)
        current.steps.append(step)
    return runs


def _observation_for(path, run: _Run) -> tuple:
    """(observation, same hook): the one the run's base chain made (its own headers), else one
    of the hook's, else the latest of an earlier hook (a chain that dropped the packet before
    nftrace's observation chain, with no event of its own: a legacy iptables chain).

    Of the hook's, a chain of the ruleset's; else the first of nftrace's that ran after
    conntrack (a conntrack or observation chain): the mark chain runs before conntrack, and
    its event has no conntrack state, which for a chain after conntrack would read as an
    invalid packet. Only a legacy raw table runs before conntrack too."""
    best = before_conntrack = earlier = None
    rank = HOOK_RANK.get(run.hook or "", -1)
    for observation in path.observations:
        if observation.packet is None:
            continue
        if observation.hook != run.hook:
            if HOOK_RANK.get(observation.hook or "", 99) < rank:
                earlier = observation
            continue
        if observation.table == run.table and observation.chain == run.chain:
            return observation, True
        if observation.own and observation.chain.startswith(MARK_CHAIN_PREFIX):
            before_conntrack = before_conntrack or observation
        elif not observation.own or best is None:
            best = observation
    if run.backend == "iptables-legacy" and run.table == "raw" and before_conntrack is not None:
        return before_conntrack, True
    best = best or before_conntrack
    return (best, True) if best is not None else (earlier, False)


class _Finder:
    def __init__(self, path, book: RuleBook, interfaces: dict):
        self.path = path
        self.book = book
        self.interfaces = interfaces
        self.conntrack_reported = any(o.ct is not None for o in path.observations)
        self.found: list = []

    def view(self, run: _Run) -> Optional[PacketView]:
        observation, same_hook = _observation_for(self.path, run)
        if observation is None:
            return None
        view = packet_view(observation, self.interfaces, self.conntrack_reported)
        if not same_hook:
            # Seen at an earlier hook: routing may have chosen the output interface since; the
            # headers, the input side and the conntrack state (confirmed only when the packet
            # leaves netfilter) hold.
            oifname = "" if run.hook in ("prerouting", "input", "ingress") else None
            view = replace(view, hook=run.hook, oifname=oifname)
        return view

    def walk_run(self, run: _Run, wanted: str) -> None:
        """Walk the run's chains as the kernel did, the steps saying which rules matched."""
        view = self.view(run)
        if view is None:
            return
        matched = {}
        for step in run.steps:
            if step.type == "rule":
                key = (step.chain, step.handle if run.backend == "nft" else step.rule_number)
                matched.setdefault(key, []).append(step)
        self._walk_chain(run, run.chain, view, wanted, matched, depth=0)

    def _walk_chain(self, run: _Run, chain: str, view: PacketView, wanted: str, matched: dict, depth: int) -> str:
        """`end` (fell off / returned), `stop` (a terminal verdict), `goto` (left by a goto whose
        chain came to its end: the kernel goes back to this chain's caller, as from a return)."""
        rules = self.book.rules(run.backend, run.family, run.table, chain)
        if rules is None or depth > MAX_JUMP_DEPTH:
            return "stop"  # not known: nothing sound can be said past it
        for rule in rules:
            key = (chain, rule.handle if run.backend == "nft" else rule.number)
            steps = matched.get(key)
            if steps:
                step = steps.pop(0) if len(steps) > 1 else steps[0]
                if step.verdict == "jump" and step.target:
                    outcome = self._walk_chain(run, step.target, view, wanted, matched, depth + 1)
                    if outcome == "stop":
                        return "stop"
                    continue  # the target returned here, itself or through a goto
                if step.verdict == "goto" and step.target:
                    outcome = self._walk_chain(run, step.target, view, wanted, matched, depth + 1)
                    return "stop" if outcome == "stop" else "goto"
                if step.verdict == "return":
                    return "end"
                if step.verdict == "continue":
                    continue
                return "stop"
            self._consider(run, rule, view, wanted)
        return "end"

    def _consider(self, run: _Run, rule, view: PacketView, wanted: str) -> None:
        verdict = rule.verdict
        evaluation = None
        if verdict.kind == "vmap":
            base = rule.evaluate(view)
            for lookup, element_verdict in rule.vmap_choices(view):
                fate, target, decided_in = self._fate(run, element_verdict, view, 0)
                if fate == wanted and lookup.matched is False:
                    evaluation = RuleEvaluation(base.conditions + [lookup])
                    self._add(run, rule, evaluation, fate, target, decided_in)
            return
        if verdict.kind in ("jump", "goto"):
            evaluation = rule.evaluate(view)
            fate, target, decided_in = self._fate(run, verdict, view, 0, _assumptions(evaluation))
        else:
            fate, target, decided_in = self._fate(run, verdict, view, 0)
        if fate != wanted:
            return
        self._add(run, rule, evaluation or rule.evaluate(view), fate, target, decided_in)

    def _add(self, run: _Run, rule, evaluation: RuleEvaluation, fate: str, target, decided_in) -> None:
        if evaluation.matches is True:
            return  # the kernel says it did not match: a view that disagrees explains nothing
        evaluation = by_elimination(evaluation)
        self.found.append(NearMiss(
            family=run.family, table=run.table, chain=rule.chain, hook=run.hook, handle=rule.handle,
            rule_number=rule.number, text=rule.text, verdict=fate,
            mismatches=mismatches_from(evaluation),
            unknown=tuple(c.expr for c in evaluation.unknown),
            matched=tuple(c.expr for c in evaluation.conditions if c.matched is True),
            backend=run.backend, iptables=rule.iptables, target=target, decided_in=decided_in,
        ))

    def _fate(self, run: _Run, verdict: RuleVerdict, view: PacketView, depth: int, assumed: Optional[dict] = None):
        """What a rule with this verdict would do to the packet: (accept|drop|None, target, deciding rule)."""
        if verdict.kind in ("accept", "drop"):
            return verdict.kind, None, None
        if verdict.kind in ("jump", "goto") and verdict.target:
            fate, decided_in = self._decide_chain(run, verdict.target, view, depth + 1, assumed or {})
            return fate, verdict.target, decided_in
        return None, None, None

    def _decide_chain(self, run: _Run, chain: str, view: PacketView, depth: int, assumed: dict):
        """What `chain` would decide for the packet if it were entered now: its first rule that
        matches for sure gives the answer; a rule that may or may not match ends the walk.

        `assumed`: what the jump there needed and the packet lacked (`iifname` → `"wan0"`): in the
        target, the same test holds, and any other test of that field is not known."""
        rules = self.book.rules(run.backend, run.family, run.table, chain)
        if rules is None or depth > MAX_JUMP_DEPTH:
            return None, None
        for rule in rules:
            if rule.verdict.kind == "vmap":
                return None, None
            matches = _assuming(rule.evaluate(view), assumed).matches
            if matches is False:
                continue
            if matches is None:
                return None, None
            kind = rule.verdict.kind
            if kind in ("accept", "drop"):
                return kind, _rule_location(run, rule)
            if kind in ("jump", "goto"):
                fate, decided_in = self._decide_chain(run, rule.verdict.target, view, depth + 1, assumed)
                if fate is not None or kind == "goto":
                    return fate, decided_in
                continue  # the jump returned: the chain goes on
            if kind in ("return", "other"):
                return None, None
        return None, None


def _assumptions(evaluation: RuleEvaluation) -> dict:
    """field → wanted value, for each plain test of a jump rule that failed."""
    return {c.field: c.wanted for c in evaluation.failed if c.field and c.wanted and not c.negated
            and not c.other_protocol}


def _assuming(evaluation: RuleEvaluation, assumed: dict) -> RuleEvaluation:
    if not assumed:
        return evaluation
    conditions = []
    for condition in evaluation.conditions:
        if condition.field in assumed:
            holds = condition.wanted == assumed[condition.field] and not condition.negated
            condition = replace(condition, matched=True if holds else None)
        conditions.append(condition)
    return RuleEvaluation(conditions)


def _rule_location(run: _Run, rule) -> str:
    if run.backend == "iptables-legacy":
        where = f"{iptables_command(run.family)} {run.table} {rule.chain}"
        return f"{where} rule {rule.number}: {rule.iptables or rule.text}"
    return f"{run.family} {run.table} {rule.chain} rule handle {rule.handle}: {rule.text}"


def find_near_misses(path, book: RuleBook, interfaces: dict) -> list:
    """The near misses of one finished packet, ranked (see the module's docstring)."""
    if not path.complete:
        return []
    wanted = WANTED_VERDICT.get(path.verdict)
    if wanted is None:
        return []
    runs = _runs(path)
    finder = _Finder(path, book, interfaces)
    if path.verdict == "drop":
        deciding = path.decided_by
        if deciding is None:
            return []
        for run in reversed(runs):
            if any(step is deciding for step in run.steps):
                finder.walk_run(run, wanted)
                break
    else:
        for run in runs:
            finder.walk_run(run, wanted)
    order = {id(item): index for index, item in enumerate(finder.found)}
    return sorted(finder.found, key=lambda item: (item.failed, len(item.unknown), _remoteness(item),
                                                  -len(item.matched), order[id(item)]))


# What a packet brings with it from elsewhere: its connection's state, the loopback interface.
STATE_FIELDS = frozenset({"ct state", "ct status", "ct direction"})
LOOPBACK_NAMES = frozenset({'"lo"', "lo"})


def _remoteness(near_miss: NearMiss) -> int:
    """0: the flow's own values missed (another address, port, interface would match);
    1: a failed expression wants another protocol or address family; 2: only the packet's
    circumstances kept the rule from matching (`ct state established,related accept`,
    `iif "lo" accept`): such rules need another packet, not another rule, so they rank last."""
    mismatches = near_miss.mismatches
    if mismatches and all(m.field in STATE_FIELDS or m.wanted in LOOPBACK_NAMES for m in mismatches):
        return 2
    return 1 if any(m.other_protocol for m in mismatches) else 0


__all__ = ["Mismatch", "NearMiss", "RuleVerdict", "find_near_misses", "packet_view", "describe_mismatch",
           "TEXT_LIMIT"]
