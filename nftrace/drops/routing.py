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

Pure: the facts come in as `RoutingFacts`.
"""

from __future__ import annotations

import errno
import os
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


def explain_routing(facts: RoutingFacts, drop: KernelDrop, iif: Optional[str]) -> Optional[str]:
    """The refusal in plain words, the same for every packet it refuses (`drops` counts them
    under it); None where routing finds a route now (the tables changed since, or the drop
    was not a refusal): the reason's own words then."""
    cause = facts.cause
    if cause == "forwarding off":
        if drop.dst is not None and drop.dst.version == 6:
            return f"IPv6 forwarding is off ({facts.forwarding_off}): routed packets are dropped"
        where = f" on {iif}" if iif else ""
        return (f"forwarding is off{where} ({facts.forwarding_off}): routed packets are dropped "
                f"(net.ipv4.ip_forward = 1 turns it on for every interface)")
    if cause == "no route":
        return NO_ROUTE
    if cause is None:
        return None
    effect = _REFUSAL_EFFECTS[cause]
    refused = _refused_by(facts)
    if refused is not None:
        return f"{refused[0]} {effect}: {refused[1]}"
    return f"routing {effect} (`ip route get` answers {cause})"


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
    """`questions(drop, iif_index, iif, mark)`: the routing facts of a drop made by routing,
    from `ask` (kernel/routes.py routing_facts); None for any other drop, where asking fails, or
    over the budget. The packet's mark goes with the question: policy rules can select by it.
    Each packet's addresses, interface and mark are asked about once, and only a few new ones a
    second: a flood of routed-away packets costs a lookup now and then, never one per packet."""

    def __init__(self, ask: Callable, clock: Callable[[], float] = time.monotonic):
        self._ask = ask
        self._clock = clock
        self._answers: OrderedDict = OrderedDict()
        self._budget = QUESTIONS_BURST
        self._refilled = clock()

    def __call__(self, drop: KernelDrop, iif_index: Optional[int], iif: Optional[str],
                 mark: Optional[int] = None) -> Optional[RoutingFacts]:
        if drop.src is None or drop.dst is None or not is_routing_drop(drop):
            return None
        key = (drop.src, drop.dst, iif_index, mark)
        if key in self._answers:
            self._answers.move_to_end(key)
            return self._answers[key]
        if not self._spend():
            return None
        try:
            facts = self._ask(drop.src, drop.dst, iif_index, iif, mark)
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
