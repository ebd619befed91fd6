"""Drops by the kernel's routing, said by the route that made them: the pure logic
(drops/routing.py), from hand-made drops and facts. The kernel-backed counterparts, which
ask a real router namespace, are in test_routing_drops.py."""

from __future__ import annotations

import errno
import ipaddress

from nftrace.drops.correlator import kernel_drop_record
from nftrace.drops.reasons import KernelDrop
from nftrace.drops.routing import (PATH_MTU, REFUSAL, REVERSE_PATH, MtuFacts, ReversePathFacts, RouteBack,
                                   RouteQuestions, RoutingFacts, explain_reverse_check, explain_unanswered,
                                   explain_unsent, is_routing_drop, question_for, reverse_path_check)
from nftrace.drops.tally import DropTally
from nftrace.trace.paths import PacketPath

CLIENT, BLACKHOLED = ipaddress.ip_address("10.77.1.2"), ipaddress.ip_address("10.99.0.1")


def drop(reason="NOT_SPECIFIED", location="ip_error+0x94", src=CLIENT, dst=BLACKHOLED, at=10.0) -> KernelDrop:
    return KernelDrop(at, reason, location, src, dst, 17, 40000, 5000)


# -- which drops are routing's -------------------------------------------------------------------


def test_a_drop_where_an_input_route_refuses_is_routings_whatever_its_reason():
    for location in ("ip_error+0x94", "ip6_pkt_prohibit+0x14", "ip6_pkt_discard+0x14", "dst_discard_out+0x14"):
        assert is_routing_drop(drop(location=location)), location


def test_ip6_forward_drops_are_routings_only_as_invalid_addresses_where_forwarding_is_off():
    assert is_routing_drop(drop("IP_INADDRERRORS", "ip6_forward+0x642"))
    assert not is_routing_drop(drop("IP_INHDR", "ip6_forward+0x1a0"))  # hop limit exceeded


def test_drops_elsewhere_are_not_routings():
    assert not is_routing_drop(drop("NO_SOCKET", "udp_queue_rcv_one_skb+0x2c"))
    assert not is_routing_drop(drop("IP_RPFILTER", "ip_rcv_finish_core+0x1c3"))


# -- in plain words ------------------------------------------------------------------------------


def test_a_refusing_route_is_named_with_what_the_sender_hears():
    blackhole = RoutingFacts(errno.EINVAL, ("blackhole 10.99.0.0/24 table main",))
    assert blackhole.cause == "blackhole"
    assert blackhole.explain(drop(), "r-client") == \
        "a blackhole route drops it silently: blackhole 10.99.0.0/24 table main"
    prohibit = RoutingFacts(errno.EACCES, ("prohibit 10.99.0.0/24 table 100",))
    assert prohibit.explain(drop(), None) == \
        "a prohibit route drops it and answers ICMP administratively prohibited: prohibit 10.99.0.0/24 table 100"
    unreachable = RoutingFacts(errno.EHOSTUNREACH, ("unreachable default table main",))
    assert unreachable.explain(drop(), None).startswith("an unreachable route drops it and answers ICMP host")


def test_without_a_refusing_route_the_policy_rule_is_named_or_the_refusal_alone():
    by_rule = RoutingFacts(errno.EINVAL, (), ("100: from all to 10.99.0.0/24 blackhole",))
    assert by_rule.explain(drop(), None) == \
        "a policy routing rule drops it silently: ip rule 100: from all to 10.99.0.0/24 blackhole"
    assert RoutingFacts(errno.EINVAL).explain(drop(), None) == \
        "routing drops it silently (`ip route get` answers blackhole)"


def test_no_route_at_all():
    facts = RoutingFacts(errno.ENETUNREACH)
    assert facts.cause == "no route"
    assert facts.explain(drop("IP_INNOROUTES"), None) == \
        "no route covers the destination in any routing table, not even a default route"


def test_forwarding_off_comes_before_what_the_lookup_says():
    """With forwarding off on the interface, IPv4's lookup fails as if the host were
    unreachable: the sysctl is the cause, not a route."""
    facts = RoutingFacts(errno.EHOSTUNREACH, forwarding_off="net.ipv4.conf.r-client.forwarding = 0")
    assert facts.cause == "forwarding off"
    assert facts.explain(drop("IP_INADDRERRORS"), "r-client") == (
        "forwarding is off on r-client (net.ipv4.conf.r-client.forwarding = 0): routed packets are dropped "
        "(net.ipv4.ip_forward = 1 turns it on for every interface)")
    v6 = RoutingFacts(0, forwarding_off="net.ipv6.conf.all.forwarding = 0")
    assert v6.explain(drop("IP_INADDRERRORS", "ip6_forward+0x642", ipaddress.ip_address("fd77:1::2"),
                                    ipaddress.ip_address("fd77:2::2")), None) == \
        "IPv6 forwarding is off (net.ipv6.conf.all.forwarding = 0): routed packets are dropped"


def test_a_route_found_now_leaves_the_reasons_own_words():
    """The tables changed since the drop, or it was no refusal: nothing is made up."""
    assert RoutingFacts(0).explain(drop(), None) is None
    record = kernel_drop_record(drop(), 3, {3: "r-client"}, routing=lambda drop, index, name, mark: RoutingFacts(0))
    assert record == {"reason": "NOT_SPECIFIED", "location": "ip_error+0x94",
                      "explain": "the kernel freed it without saying why"}


def test_the_answer_carries_the_facts_for_scripts():
    facts = RoutingFacts(errno.EINVAL, ("blackhole 10.99.0.0/24 table main",))
    record = kernel_drop_record(drop(), 3, {3: "r-client"}, routing=lambda drop, index, name, mark: facts)
    assert record == {"reason": "NOT_SPECIFIED", "location": "ip_error+0x94",
                      "explain": "a blackhole route drops it silently: blackhole 10.99.0.0/24 table main",
                      "routing": {"cause": "blackhole", "routes": ["blackhole 10.99.0.0/24 table main"], "rules": [],
                                  "sysctl": None}}


# -- the reverse-path filter: which route replies would take ----------------------------------------


RPFILTER = dict(reason="IP_RPFILTER", location="ip_rcv_finish_core+0x25b", src=ipaddress.ip_address("10.88.0.5"),
                dst=ipaddress.ip_address("10.77.2.2"))


def test_which_drops_routing_is_asked_about_and_what():
    assert question_for(drop()) == REFUSAL
    assert question_for(drop(**RPFILTER)) == REVERSE_PATH
    assert question_for(drop("PKT_TOO_BIG", "ip_forward+0x2c0")) == PATH_MTU
    assert question_for(drop("NO_SOCKET", "udp_queue_rcv_one_skb+0x2c")) is None
    v6 = dict(RPFILTER, src=ipaddress.ip_address("fd88::5"), dst=ipaddress.ip_address("fd77:2::2"))
    assert question_for(drop(**v6)) is None  # IPv6 has no rp_filter: its RPFILTER drops are rules (fib), traced


def test_strict_mode_names_the_interface_replies_would_leave_through_and_the_way_out():
    facts = ReversePathFacts(1, ("net.ipv4.conf.r-client.rp_filter = 1",),
                             back=RouteBack(route="10.88.0.0/24 via 10.77.2.2 dev r-server", oifs=("r-server",)))
    assert facts.explain(drop(**RPFILTER), "r-client") == (
        "reverse-path filter (strict, net.ipv4.conf.r-client.rp_filter = 1): replies would leave through r-server "
        "(10.88.0.0/24 via 10.77.2.2 dev r-server), not r-client where it came in; loose mode (rp_filter = 2; the "
        "kernel takes the higher of conf.all and conf.r-client) or a route back through r-client lets it in")


def test_an_interface_setting_that_conf_all_overrides_is_named_as_overridden():
    """The trap: `rp_filter = 0` on the interface does nothing while conf.all says 1."""
    facts = ReversePathFacts(1, ("net.ipv4.conf.all.rp_filter = 1",), "net.ipv4.conf.r-client.rp_filter = 0",
                             RouteBack(route="default via 10.77.2.2 dev r-server", oifs=("r-server",)))
    assert facts.explain(drop(**RPFILTER), "r-client").startswith(
        "reverse-path filter (strict, net.ipv4.conf.all.rp_filter = 1, which overrides net.ipv4.conf.r-client.rp_filter"
        " = 0): replies would leave through r-server")
    assert facts.to_json() == {"cause": "reverse path", "mode": "strict", "sysctls": ["net.ipv4.conf.all.rp_filter = 1"],
                               "overrides": "net.ipv4.conf.r-client.rp_filter = 0",
                               "route": "default via 10.77.2.2 dev r-server", "oifs": ["r-server"]}


def test_no_route_back_is_a_drop_in_either_mode():
    for mode, word in ((1, "strict"), (2, "loose")):
        facts = ReversePathFacts(mode, (f"net.ipv4.conf.all.rp_filter = {mode}",), back=RouteBack(errno.ENETUNREACH))
        assert facts.explain(drop(**RPFILTER), "r-client") == (
            f"reverse-path filter ({word}, net.ipv4.conf.all.rp_filter = {mode}): no route leads back to its source "
            f"(`ip route get` answers no route), so replies could not be sent; a route back to it lets it in")


def test_a_route_back_that_the_filter_accepts_now_leaves_the_reasons_own_words():
    """Loose mode with a route back, or strict with one through the interface it came in on:
    the routes changed since the drop, and nothing is made up."""
    loose = ReversePathFacts(2, ("net.ipv4.conf.all.rp_filter = 2",),
                             back=RouteBack(route="default via 10.77.2.2 dev r-server", oifs=("r-server",)))
    assert loose.explain(drop(**RPFILTER), "r-client") is None
    strict = ReversePathFacts(1, ("net.ipv4.conf.all.rp_filter = 1",),
                              back=RouteBack(route="10.88.0.0/24 dev r-client", oifs=("r-client",)))
    record = kernel_drop_record(drop(**RPFILTER), 3, {3: "r-client"}, routing=lambda drop, index, name, mark: strict)
    assert "routing" not in record and record["explain"].startswith("reverse-path filter: replies to 10.88.0.5")


def test_drops_counts_a_spoofing_flood_from_many_sources_under_one_line():
    facts = ReversePathFacts(1, ("net.ipv4.conf.r-client.rp_filter = 1",),
                             back=RouteBack(route="default via 10.77.2.2 dev r-server", oifs=("r-server",)))
    tally = DropTally()
    for n in range(20):
        path = PacketPath(n, complete=True, verdict="accept")
        spoofed = drop(**dict(RPFILTER, src=ipaddress.ip_address(f"10.88.{n}.5")))
        path.kernel_drop = kernel_drop_record(spoofed, 3, {3: "r-client"}, routing=lambda drop, index, name, mark: facts)
        tally.add(path, {})
    [entry] = tally.kernel_drops_json()
    assert (entry["reason"], entry["packets"], entry["routing"]["cause"]) == ("IP_RPFILTER", 20, "reverse path")


# -- a rule's reverse-path check ------------------------------------------------------------------


def test_the_reverse_path_check_that_decided_or_failed_is_found_on_dropped_packets_only():
    from nftrace.trace.nearmiss import Mismatch, NearMiss
    from nftrace.trace.paths import Step

    rule = Step("prerouting", "inet", "firewalld", "filter_PREROUTING", "rule", 88, 2, "meta nfproto ipv6 fib saddr . "
                "mark . iif oif missing drop", "drop", None, 0)
    dropped = PacketPath(1, complete=True, verdict="drop", decided_by=rule)
    assert reverse_path_check(dropped) == "fib saddr . mark . iif oif missing"
    policy = Step("prerouting", "inet", "nixos-fw", "rpfilter", "policy", None, None, None, "drop", None, 0)
    failed = Mismatch("fib saddr . mark . iif oif exists", "?", True, reason="...")
    nixos = PacketPath(2, complete=True, verdict="drop", decided_by=policy)
    nixos.near_misses = [NearMiss("inet", "nixos-fw", "rpfilter", "prerouting", 10, 1,
                                  "fib saddr . mark . iif oif exists accept", "accept", mismatches=(failed,))]
    assert reverse_path_check(nixos) == "fib saddr . mark . iif oif exists"
    assert reverse_path_check(PacketPath(3, complete=True, verdict="accept", decided_by=rule)) is None


def test_the_route_back_a_reverse_path_check_found_is_said_where_it_explains_the_check():
    check, src = "fib saddr . iif oif missing", ipaddress.ip_address("10.88.0.5")
    elsewhere = RouteBack(0, "10.88.0.0/24 via 10.77.2.2 dev r-server", ("r-server",))
    assert explain_reverse_check(check, elsewhere, src, "r-client") == (
        "the reverse-path check `fib saddr . iif oif missing` finds the route back to 10.88.0.5 through r-server "
        "(10.88.0.0/24 via 10.77.2.2 dev r-server), not r-client where the packet came in")
    assert explain_reverse_check(check, RouteBack(errno.ENETUNREACH), src, "r-client").endswith(
        "finds no route back to 10.88.0.5 (`ip route get` answers no route)")
    assert explain_reverse_check(check, RouteBack(0, "10.88.0.0/24 dev r-client", ("r-client",)), src, "r-client") is None
    assert explain_reverse_check("fib saddr oif missing", elsewhere, src, "r-client") is None  # loose: any way back


# -- too big for the MTU on the way out --------------------------------------------------------------


def test_a_packet_too_big_names_the_mtu_the_interface_and_what_the_sender_is_told():
    facts = MtuFacts(1400, "r-server")
    assert facts.explain(drop("PKT_TOO_BIG", "ip_forward+0x2c0"), "r-client") == (
        "larger than the MTU toward its destination (1400 on r-server) and its DF bit forbids fragmenting it: the "
        "sender was sent ICMP fragmentation needed (mtu 1400); where that ICMP is dropped on its way back, the flow's "
        "large packets vanish (a path MTU black hole)")
    assert facts.to_json() == {"cause": "path mtu", "mtu": 1400, "oif": "r-server", "from": "interface"}


def test_an_mtu_set_on_the_route_and_ipv6_which_never_fragments_in_transit():
    v6 = drop("PKT_TOO_BIG", "ip6_forward+0x3a0", ipaddress.ip_address("fd77:1::2"), ipaddress.ip_address("fd77:2::2"))
    assert MtuFacts(1280, "r-server", from_route=True).explain(v6, "r-client").startswith(
        "larger than the MTU toward its destination (1280 on r-server, the route's) and IPv6 routers never fragment: "
        "the sender was sent ICMPv6 packet too big (mtu 1280);")


# -- asking: once per packet, a few a second -----------------------------------------------------


class Asker:
    def __init__(self, facts=RoutingFacts(errno.EINVAL)):
        self.asked = []
        self.facts = facts

    def __call__(self, question, src, dst, iif_index, iif, mark):
        self.asked.append((question, str(src), str(dst), iif_index, iif, mark))
        if isinstance(self.facts, Exception):
            raise self.facts
        return self.facts


def test_only_routings_drops_are_asked_about_and_each_packets_addresses_once():
    asker = Asker()
    questions = RouteQuestions(asker, clock=lambda: 0.0)
    assert questions(drop("NO_SOCKET", "udp_queue_rcv_one_skb+0x2c"), 3, "r-client") is None
    assert questions(drop(), 3, "r-client") == questions(drop(at=11.0), 3, "r-client") == asker.facts
    assert asker.asked == [(REFUSAL, "10.77.1.2", "10.99.0.1", 3, "r-client", None)]


def test_a_flood_of_new_addresses_is_asked_about_a_few_times_a_second_not_per_packet():
    asker, now = Asker(), [0.0]
    questions = RouteQuestions(asker, clock=lambda: now[0])
    answered = [questions(drop(dst=ipaddress.ip_address(f"10.99.{n // 250}.{n % 250 + 1}")), 3, "r-client")
                for n in range(500)]
    assert len(asker.asked) == sum(facts is not None for facts in answered) == 50
    now[0] = 1.0
    questions(drop(dst=ipaddress.ip_address("10.99.9.9")), 3, "r-client")
    assert len(asker.asked) == 51


def test_where_routing_cannot_be_asked_the_reason_stands_alone():
    questions = RouteQuestions(Asker(OSError(errno.EPROTONOSUPPORT, "no rtnetlink")), clock=lambda: 0.0)
    assert questions(drop(), 3, "r-client") is None


# -- counted by drops ----------------------------------------------------------------------------


def test_drops_counts_each_refusal_apart_under_one_kernel_reason():
    tally = DropTally()
    for route, count in (("blackhole 10.99.0.0/24 table main", 3), ("prohibit 10.97.0.0/24 table main", 2)):
        facts = RoutingFacts(errno.EINVAL if route.startswith("blackhole") else errno.EACCES, (route,))
        for _ in range(count):
            path = PacketPath(1, complete=True, verdict="accept")
            path.kernel_drop = kernel_drop_record(drop(), None, routing=lambda drop, index, name, mark: facts)
            assert tally.add(path, {}) == "kernel"
    counted = [(entry["reason"], entry["routing"]["cause"], entry["packets"], entry["explain"])
               for entry in tally.kernel_drops_json()]
    assert counted == [
        ("NOT_SPECIFIED", "blackhole", 3, "a blackhole route drops it silently: blackhole 10.99.0.0/24 table main"),
        ("NOT_SPECIFIED", "prohibit", 2, "a prohibit route drops it and answers ICMP administratively prohibited: "
                                         "prohibit 10.97.0.0/24 table main")]


# -- a packet this host would send, refused before netfilter saw it --------------------------------


def test_a_refused_send_says_what_the_sender_got_and_what_refused_it():
    assert explain_unsent(RoutingFacts(errno.EINVAL, ("blackhole 10.99.0.0/24 table main",))) == (
        'routing refuses to send it, so no packet reaches netfilter (the sender gets "Invalid argument"): '
        'a blackhole route: blackhole 10.99.0.0/24 table main')
    assert explain_unsent(RoutingFacts(errno.EACCES, (), ("100: from all to 10.95.0.0/24 prohibit",))).endswith(
        '(the sender gets "Permission denied"): a policy routing rule: ip rule 100: from all to 10.95.0.0/24 prohibit')
    assert explain_unsent(RoutingFacts(errno.ENETUNREACH)).endswith(
        '(the sender gets "Network is unreachable"): no route covers the destination in any routing table, not even '
        'a default route')


def test_a_send_that_routing_allows_has_nothing_to_say():
    assert explain_unsent(RoutingFacts(0)) is None


# -- a next hop that does not answer ----------------------------------------------------------------


def test_a_next_hop_still_asked_about_and_one_that_never_answered():
    hop = ipaddress.ip_address("10.77.2.99")
    assert explain_unanswered(hop, "r-server", "INCOMPLETE") == (
        "the next hop 10.77.2.99 on r-server has not answered ARP yet (neighbour INCOMPLETE): the kernel holds "
        "packets for it and drops them (NEIGH_FAILED) if it never does; is the host there?")
    assert explain_unanswered(ipaddress.ip_address("fd77:2::99"), None, "FAILED") == (
        "the next hop fd77:2::99 did not answer neighbour discovery (neighbour FAILED): the kernel drops packets "
        "for it after netfilter accepted them (NEIGH_FAILED); is the host there?")
