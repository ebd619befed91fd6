"""Drops by the kernel's routing, said by the route that made them.

Why: the kernel frees a packet that routing refuses with a reason that does not say which
refusal. Forwarded into a blackhole, unreachable or prohibit route, or where no route
exists, IPv4 says NOT_SPECIFIED (ip_error); with forwarding off on the interface the packet
came in on, IP_INADDRERRORS ("invalid destination address", though the address is fine).
IPv6 says NOT_SPECIFIED for a blackhole and IP_INNOROUTES for unreachable and prohibit alike.
The code that freed the packet says that routing did it; asking the namespace's routing the
same question (`ip route get DST from SRC iif IIF`) says how: its error names the route's type
(EINVAL blackhole, EHOSTUNREACH unreachable, EACCES prohibit, ENETUNREACH no route), and the
tables and rules name the route. kernel/routes.py asks; this module decides when to ask and
says the answer in plain words.

Two more drops are routing's answer to a question the packet raised, and say nothing of it:
IP_RPFILTER (the reverse-path filter: which route replies would take, and which setting made
that a drop) and PKT_TOO_BIG (larger than the MTU toward its destination: which interface,
which MTU). Both are asked of routing the same way (ReversePathFacts, MtuFacts). A rule's own
reverse-path check (nft's `fib saddr . iif oif missing`) is named by the rule; the route back
it found is the same question (RouteBack, explain_reverse_check).

Pure: the facts come in as RoutingFacts, ReversePathFacts, MtuFacts and RouteBack.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

from .reasons import KernelDrop, function_of

# Where the kernel frees packets that its routing refused (the input route's dst.input, or
# its output for IPv6): a drop there is routing's, whatever its reason.
ROUTE_DROP_FUNCTIONS = frozenset({
    "ip_error",  # IPv4: blackhole, unreachable, prohibit, no route, forwarding off
    "ip6_pkt_discard", "ip6_pkt_discard_out", "ip6_pkt_prohibit", "ip6_pkt_prohibit_out", "ip6_pkt_drop",
    "dst_discard", "dst_discard_out",  # a blackhole route
})
# ip6_forward frees with IP_INADDRERRORS where forwarding is off (or the source may not be forwarded).
FORWARDING_DROPS = frozenset({("ip6_forward", "IP_INADDRERRORS")})

# The error of a route lookup → the type of route (or rule) that refused the packet.
REFUSALS = {errno.EINVAL: "blackhole", errno.EHOSTUNREACH: "unreachable", errno.EACCES: "prohibit",
            errno.ENETUNREACH: "no route"}
# The questions: which route refused the packet, which route replies to it would take, and
# which MTU it met on the way out.
REFUSAL, REVERSE_PATH, PATH_MTU = "refusal", "reverse path", "path mtu"
# Questions asked of routing: each packet's once, a few new ones a second (RouteQuestions).
ANSWERS_REMEMBERED = 1024
QUESTIONS_PER_SECOND = 10.0
QUESTIONS_BURST = 50.0
NO_ROUTE = "no route covers the destination in any routing table, not even a default route"
# What each refusal does besides dropping: the sender hears of it, or not.
_REFUSAL_EFFECTS = {
    "blackhole": "drops it silently",
    "unreachable": "drops it and answers ICMP host unreachable",
    "prohibit": "drops it and answers ICMP administratively prohibited",
}


def is_routing_drop(drop: KernelDrop) -> bool:
    """The drop was made by the kernel's routing (see ROUTE_DROP_FUNCTIONS)."""
    function = function_of(drop.code_location())
    return function in ROUTE_DROP_FUNCTIONS or (function, drop.reason) in FORWARDING_DROPS


def question_for(drop: KernelDrop) -> Optional[str]:
    """What to ask routing about the drop (REFUSAL, REVERSE_PATH, PATH_MTU); None: nothing, its
    reason says all that routing could add."""
    if is_routing_drop(drop):
        return REFUSAL
    if drop.reason == "IP_RPFILTER" and drop.src is not None and drop.src.version == 4:  # IPv4's own filter
        return REVERSE_PATH
    if drop.reason == "PKT_TOO_BIG":
        return PATH_MTU
    return None


@dataclass(frozen=True)
class RoutingFacts:
    """What the namespace's routing says now of a dropped packet's addresses and interface."""

    error: int  # errno of `ip route get DST from SRC iif IIF`; 0: it finds a route now
    # The routes of the refusing type that cover DST, longest prefix first, as `ip route` prints them.
    routes: tuple = ()
    # Where no such route is: the policy rules whose action is the refusal (`ip rule` form).
    rules: tuple = ()
    # `net.ipv4.conf.IIF.forwarding = 0` (or IPv6's `all`) where forwarding is off for the packet.
    forwarding_off: Optional[str] = None

    @property
    def cause(self) -> Optional[str]:
        """blackhole | unreachable | prohibit | no route | forwarding off | None (a route now)."""
        if self.forwarding_off is not None:
            return "forwarding off"
        return REFUSALS.get(self.error)

    def to_json(self) -> dict:
        return {"cause": self.cause, "routes": list(self.routes), "rules": list(self.rules),
                "sysctl": self.forwarding_off}

    def explain(self, drop: KernelDrop, iif: Optional[str]) -> Optional[str]:
        """The refusal in plain words, the same for every packet it refuses (`drops` counts them
        under it); None where routing finds a route now (the tables changed since, or the drop
        was not a refusal): the reason's own words then."""
        cause = self.cause
        if cause == "forwarding off":
            if drop.dst is not None and drop.dst.version == 6:
                return f"IPv6 forwarding is off ({self.forwarding_off}): routed packets are dropped"
            where = f" on {iif}" if iif else ""
            return (f"forwarding is off{where} ({self.forwarding_off}): routed packets are dropped "
                    f"(net.ipv4.ip_forward = 1 turns it on for every interface)")
        if cause == "no route":
            return NO_ROUTE
        if cause is None:
            return None
        effect = _REFUSAL_EFFECTS[cause]
        refused = _refused_by(self)
        if refused is not None:
            return f"{refused[0]} {effect}: {refused[1]}"
        return f"routing {effect} (`ip route get` answers {cause})"


RP_FILTER_MODES = {1: "strict", 2: "loose"}
# nft's reverse-path check: the route to the packet's source (with its mark; through the interface
# it came in on), `missing` or `exists`.
_FIB_REVERSE_PATH = re.compile(r"fib saddr(?: \. mark)?(?: \. iif)? oif (?:missing|exists|0|!= 0)")


@dataclass(frozen=True)
class RouteBack:
    """The route that replies to a source would take (`ip route get fibmatch SRC`): what a
    reverse-path check, rp_filter's or a rule's `fib saddr`, looks up."""

    error: int = 0  # errno of the lookup; 0: it finds one
    route: Optional[str] = None  # as `ip route` prints it
    oifs: tuple = ()  # the interfaces it leaves through

    def none_words(self) -> str:
        """No route back, as `ip route get` answered."""
        return f"`ip route get` answers {REFUSALS.get(self.error, os.strerror(self.error))}"


@dataclass(frozen=True)
class ReversePathFacts:
    """What the reverse-path filter (IPv4's rp_filter) weighed for a packet it dropped: the
    route that replies to its source would take, and the setting in force. The kernel takes the
    higher of conf.all.rp_filter and conf.IIF.rp_filter: strict (1) drops a packet whose replies
    would leave through another interface than it came in on, loose (2) only one with no route
    back at all. The route back is `ip route get SRC` (with the packet's mark where src_valid_mark
    is on); the kernel's own lookup also takes DST as the source, which only policy rules with a
    `from` selector would notice."""

    mode: int  # 1 strict, 2 loose
    sysctls: tuple  # the settings that put it in force (the higher of conf.all and conf.IIF), as sysctl prints them
    overridden: Optional[str] = None  # conf.IIF's lower setting, where conf.all's is in force
    back: RouteBack = RouteBack()

    def explains(self, iif: Optional[str]) -> bool:
        """The facts make the drop: no route back, or (strict) one through another interface."""
        return self.back.error != 0 or (self.mode == 1 and iif is not None and iif not in self.back.oifs)

    def to_json(self) -> dict:
        return {"cause": REVERSE_PATH, "mode": RP_FILTER_MODES.get(self.mode, str(self.mode)),
                "sysctls": list(self.sysctls), "overrides": self.overridden, "route": self.back.route,
                "oifs": list(self.back.oifs)}

    def explain(self, drop: KernelDrop, iif: Optional[str]) -> Optional[str]:
        """The filter's decision in words without the packet's addresses (`drops` counts every
        packet it drops for one reason under one line); None where the facts do not make the
        drop (routes changed since): the reason's own words then."""
        if not self.explains(iif):
            return None
        setting = " and ".join(self.sysctls) + (f", which overrides {self.overridden}" if self.overridden else "")
        what = f"reverse-path filter ({RP_FILTER_MODES.get(self.mode, self.mode)}, {setting})"
        back = self.back
        if back.error:
            return (f"{what}: no route leads back to its source ({back.none_words()}), so replies could not be "
                    f"sent; a route back to it lets it in")
        return (f"{what}: replies would leave through {', '.join(back.oifs)} ({back.route}), not {iif} where it "
                f"came in; loose mode (rp_filter = 2; the kernel takes the higher of conf.all and conf.{iif}) "
                f"or a route back through {iif} lets it in")


@dataclass(frozen=True)
class MtuFacts:
    """The MTU a packet dropped as PKT_TOO_BIG met: forwarding it needs fragments, which its DF
    bit (IPv6: any packet) forbids. The kernel takes the route's MTU (an `mtu` on the route, or a
    path MTU it learned) where there is one, else the output interface's."""

    mtu: int
    oif: Optional[str]  # the interface the route to its destination leaves through
    from_route: bool = False  # the route sets the MTU, not the interface

    def to_json(self) -> dict:
        return {"cause": PATH_MTU, "mtu": self.mtu, "oif": self.oif, "from": "route" if self.from_route else "interface"}

    def explain(self, drop: KernelDrop, iif: Optional[str]) -> Optional[str]:
        """Which MTU, and what becomes of the sender: told by ICMP to send smaller packets, unless
        the ICMP is dropped on its way back (then the flow's large packets vanish for good)."""
        where = f"{self.mtu}" + (f" on {self.oif}" if self.oif else "") + (", the route's" if self.from_route else "")
        if drop.dst is not None and drop.dst.version == 6:
            forbids, told = "IPv6 routers never fragment", f"ICMPv6 packet too big (mtu {self.mtu})"
        else:
            forbids, told = "its DF bit forbids fragmenting it", f"ICMP fragmentation needed (mtu {self.mtu})"
        return (f"larger than the MTU toward its destination ({where}) and {forbids}: the sender was sent {told}; "
                f"where that ICMP is dropped on its way back, the flow's large packets vanish (a path MTU black hole)")


def reverse_path_check(path) -> Optional[str]:
    """The fib reverse-path check that dropped the packet (`fib saddr . iif oif missing drop`,
    firewalld's IPv6 filter), or whose failure left it to a drop (`fib saddr . mark . iif oif
    exists accept`, NixOS's, found by elimination in the closest near miss): the check as the
    rule says it; None for any other packet. The route back it looked up is what the admin
    needs next (explain_reverse_check)."""
    if not path.complete or path.verdict != "drop":
        return None
    step = path.decided_by
    if step is not None and step.type == "rule" and step.text:
        found = _FIB_REVERSE_PATH.search(step.text)
        if found:
            return found.group(0)
    for near_miss in (path.near_misses or [])[:1]:
        for mismatch in near_miss.mismatches:
            if _FIB_REVERSE_PATH.fullmatch(mismatch.expr):
                return mismatch.expr
    return None


def explain_reverse_check(check: str, back: Optional[RouteBack], src, iif: Optional[str]) -> Optional[str]:
    """What the reverse-path check of a rule found (`back`: the route back, as rp_filter's): no
    route back, or (a check with `iif`) one through another interface; None where the route
    back now passes the check (the routes changed since)."""
    if back is None:
        return None
    if back.error:
        return f"the reverse-path check `{check}` finds no route back to {src} ({back.none_words()})"
    if " iif " not in f" {check} " or iif is None or iif in back.oifs:
        return None
    return (f"the reverse-path check `{check}` finds the route back to {src} through {', '.join(back.oifs)} "
            f"({back.route}), not {iif} where the packet came in")


def explain_unsent(facts: RoutingFacts) -> Optional[str]:
    """Why a packet this host would send never reached netfilter: routing refused to send it,
    and the sending socket got the error instead. None where routing finds a route."""
    cause = facts.cause
    if cause is None:
        return None
    refused = _refused_by(facts)
    if cause == "no route":
        what = NO_ROUTE
    elif refused is not None:
        what = f"{refused[0]}: {refused[1]}"
    else:
        what = f"`ip route get` answers {cause}"
    return (f"routing refuses to send it, so no packet reaches netfilter (the sender gets "
            f"\"{os.strerror(facts.error)}\"): {what}")


def explain_unanswered(hop, oif: Optional[str], state: str) -> str:
    """A next hop that has not answered ARP (IPv6: neighbour discovery): the kernel holds the
    packets netfilter accepted for it, and drops them (NEIGH_FAILED) when it gives up, seconds
    after the answer was given."""
    asked = "neighbour discovery" if hop.version == 6 else "ARP"
    where = f" on {oif}" if oif else ""
    if state == "FAILED":
        return (f"the next hop {hop}{where} did not answer {asked} (neighbour {state}): the kernel drops packets "
                f"for it after netfilter accepted them (NEIGH_FAILED); is the host there?")
    return (f"the next hop {hop}{where} has not answered {asked} yet (neighbour {state}): the kernel holds packets "
            f"for it and drops them (NEIGH_FAILED) if it never does; is the host there?")


def _refused_by(facts: RoutingFacts) -> Optional[tuple]:
    """(what refused the packet, it as `ip route` or `ip rule` prints it); None where neither
    the tables nor the rules name it."""
    if facts.routes:
        return f"{_a(facts.cause)} route", facts.routes[0]
    if facts.rules:
        return "a policy routing rule", f"ip rule {facts.rules[0]}"
    return None


def _a(cause: str) -> str:
    return f"an {cause}" if cause[0] in "aeiou" else f"a {cause}"


class RouteQuestions:
    """`questions(drop, iif_index, iif, mark)`: what routing says of a drop it has a say in
    (question_for), from `ask(question, src, dst, iif_index, iif, mark)` (kernel/routes.py
    routing_facts): RoutingFacts, ReversePathFacts or MtuFacts; None for any other drop, where
    asking fails, or over the budget. The packet's mark goes with the question: policy rules can
    select by it. Each packet's addresses, interface and mark are asked about once, and only a
    few new ones a second: a flood of routed-away packets costs a lookup now and then, never one
    per packet."""

    def __init__(self, ask: Callable, clock: Callable[[], float] = time.monotonic):
        self._ask = ask
        self._clock = clock
        self._answers: OrderedDict = OrderedDict()
        self._budget = QUESTIONS_BURST
        self._refilled = clock()

    def __call__(self, drop: KernelDrop, iif_index: Optional[int], iif: Optional[str], mark: Optional[int] = None):
        question = question_for(drop) if drop.src is not None and drop.dst is not None else None
        if question is None:
            return None
        key = (question, drop.src, drop.dst, iif_index, mark)
        if key in self._answers:
            self._answers.move_to_end(key)
            return self._answers[key]
        if not self._spend():
            return None
        try:
            facts = self._ask(question, drop.src, drop.dst, iif_index, iif, mark)
        except OSError:  # no rtnetlink here: the reason's own words
            facts = None
        self._answers[key] = facts
        if len(self._answers) > ANSWERS_REMEMBERED:
            self._answers.popitem(last=False)
        return facts

    def _spend(self) -> bool:
        now = self._clock()
        self._budget = min(QUESTIONS_BURST, self._budget + (now - self._refilled) * QUESTIONS_PER_SECOND)
        self._refilled = now
        if self._budget < 1:
            return False
        self._budget -= 1
        return True
