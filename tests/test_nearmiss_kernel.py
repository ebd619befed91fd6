"""Near misses, proven by the kernel: for each near miss that the answer says failed on exactly
one expression, a dry run of the packet changed as the explanation says (the source inside
the prefix, a member of the set, the wanted port, protocol or interface, an established
connection) is decided by that rule — or, for a jump, by the target's rule it named.

Run over every flow of the rules/ scenarios and over random rulesets (the generator of
test_dryrun_property.py). A changed packet can also start to match an earlier rule that the
original did not (`tcp dport 22 drop` before `ip saddr 10.0.0.0/8 tcp dport 22 accept`):
then the kernel's answer names a rule that comes before the near miss in the same chain run,
and that is accepted as the one honest alternative (shadowed), never anything else.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import nftrace, unique_name
from nftrace.lab.lab import Lab, list_scenarios
from nftrace.lab.topology import CLIENT_V4, ROUTER_CLIENT_V4, SERVER_V4, Topology, in_netns
from nftrace.trace.rulebook import RuleBook
from test_dryrun_property import PORTS, rulesets

pytestmark = pytest.mark.kernel

# Fields whose wanted value a dry run can be given, and the option that gives it.
ADDRESS_OPTIONS = {"ip saddr": "--from", "ip6 saddr": "--from", "ip daddr": "--to", "ip6 daddr": "--to"}
PORT_OPTIONS = {"tcp dport": "--dport", "udp dport": "--dport", "th dport": "--dport", "sctp dport": "--dport",
                "tcp sport": "--sport", "udp sport": "--sport", "th sport": "--sport"}
INTERFACE_FIELDS = ("iifname", "iif")
PROTOCOL_FIELDS = ("meta l4proto", "ip protocol", "ip6 nexthdr")
MAX_PROOFS_PER_FLOW = 4


def namespace_facts(netns: str) -> tuple[RuleBook, set, set]:
    """The router's rule book (set elements), its own addresses and its interfaces."""
    listing = in_netns(netns, ["nft", "-j", "list", "ruleset"]).stdout
    book = RuleBook()
    book.add_nft_json(json.loads(listing or '{"nftables": []}'))
    addresses = json.loads(in_netns(netns, ["ip", "-j", "addr"]).stdout)
    local = {ipaddress.ip_address(a["local"]) for link in addresses for a in link.get("addr_info", [])}
    names = {link["ifname"] for link in addresses}
    return book, local, names


def _values(wanted: str, near_miss: dict, book: RuleBook) -> list:
    """The values a wanted text stands for: `{ 22, 80 }`, `@set`, `10.0.0.0/24`, `1000-2000`, `"lan0"`."""
    wanted = wanted.strip()
    if near_miss["backend"] == "iptables-legacy":  # iptables' lists: 22,443 and 8000:8100
        return [part.replace(":", "-") for part in wanted.split(",")]
    if wanted.startswith("@"):
        elements = book.set_elements(near_miss["family"], near_miss["table"], wanted[1:]) or []
        return [_element_value(element) for element in elements]
    if wanted.startswith("{"):
        return [part.strip() for part in wanted.strip("{} ").split(",") if part.strip()]
    return [wanted]


def _element_value(element) -> str:
    if isinstance(element, list):
        element = element[0]
    if isinstance(element, dict):
        if "prefix" in element:
            return f"{element['prefix']['addr']}/{element['prefix']['len']}"
        if "range" in element:
            return f"{element['range'][0]}-{element['range'][1]}"
        if "elem" in element:
            return _element_value(element["elem"]["val"])
        return ""
    return str(element)


def _address_in(value: str, hook: Optional[str], local: set) -> Optional[str]:
    """An address the value stands for, local to the router where the near miss is at input."""
    try:
        if "-" in value:
            return str(ipaddress.ip_address(value.split("-")[0]))
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        return None
    if network.num_addresses == 1:
        return str(network.network_address)
    candidates = list(itertools.islice(network.hosts(), 8))  # never the whole of a /64
    for address in candidates:
        if (address in local) == (hook == "input"):
            return str(address)
    return str(candidates[0]) if candidates else None


def changed_arguments(args: list, near_miss: dict, book: RuleBook, local: set, interfaces: set) -> Optional[list]:
    """The dry run's arguments with the one failed expression made true; None when the change
    is not one a flow option can express."""
    [mismatch] = near_miss["mismatches"]
    if mismatch["negated"]:
        return None
    field, values = mismatch["field"], _values(mismatch["wanted"] or "", near_miss, book)
    changed = list(args)

    def put(option: str, value: str) -> list:
        if option in changed:
            changed[changed.index(option) + 1] = value
        else:
            changed.extend([option, value])
        return changed

    for value in values:
        if field in ADDRESS_OPTIONS:
            address = _address_in(value, near_miss["hook"], local)
            if address is not None:
                return put(ADDRESS_OPTIONS[field], address)
        elif field in PORT_OPTIONS:
            port = value.split("-")[0]
            protocol = field.split()[0]
            if not mismatch["packet"].isdigit():  # the packet is of another protocol
                if protocol not in ("tcp", "udp", "sctp"):
                    return None
                put("--proto", protocol)
            if port.isdigit():
                return put(PORT_OPTIONS[field], port)
        elif field in INTERFACE_FIELDS:
            name = value.strip('"')
            if name in interfaces and name != "lo":  # arriving on lo is a local packet: another flow
                return put("--iif", name)
        elif field in PROTOCOL_FIELDS and value in ("tcp", "udp"):
            return put("--proto", value)
        elif field == "ct state" and "established" in value.split(","):
            return put("--state", "established")
    return None


def run_dry(netns: str, args: list, changed: bool = False) -> Optional[dict]:
    """The dry run's answer for one packet; None for a changed flow that nftrace refuses as
    input (an address with no route back, a port for icmp, ...): not a change a dry run can make."""
    result = nftrace("--netns", netns, "why", *args, "--dry-run", "--json", "--no-drop-reasons", timeout=60)
    if changed and result.returncode == 2 and result.stderr.startswith("nftrace: "):
        return None
    assert result.returncode in (0, 3), f"{' '.join(args)}: {result.stderr}"
    packets = result.json["packets"]
    return packets[0] if packets else {}


def _position(packet: dict, family: str, table: str, chain: str, handle) -> Optional[int]:
    for index, step in enumerate(packet.get("steps", [])):
        if (step["family"], step["table"], step["chain"], step["handle"]) == (family, table, chain, handle):
            return index
    return None


def rewritten_by_nat(answer: dict, field: Optional[str]) -> bool:
    """Whether NAT rewrote the side of the packet that `field` tests: then the packet at the
    near miss's hook is not the flow as given, and no flow option can change it there."""
    sides = {change["field"] for change in answer.get("nat", [])}
    if field is None:
        return False
    tests_source = "saddr" in field or "sport" in field
    tests_destination = "daddr" in field or "dport" in field
    return (tests_source and "src" in sides) or (tests_destination and "dst" in sides)


def proof_problems(netns: str, args: list, answer: dict, book: RuleBook, local: set, interfaces: set) -> tuple:
    """(proofs made, problems) for every one-expression near miss of an answer."""
    proofs, problems = 0, []
    for near_miss in answer.get("near_misses", []):
        if len(near_miss["mismatches"]) != 1 or near_miss["unknown"]:
            continue
        if rewritten_by_nat(answer, near_miss["mismatches"][0]["field"]):
            continue
        if proofs >= MAX_PROOFS_PER_FLOW:
            break
        changed = changed_arguments(args, near_miss, book, local, interfaces)
        if changed is None:
            continue
        after = run_dry(netns, changed, changed=True)
        if after is None:
            continue
        decided = after.get("decided_by") or {}
        proofs += 1
        # A legacy rule has no handle: its position names it.
        name = "handle" if near_miss["backend"] == "nft" else "rule_number"
        rule = (near_miss["family"], near_miss["table"], near_miss["chain"], near_miss[name])
        got = (decided.get("family"), decided.get("table"), decided.get("chain"), decided.get(name))
        if near_miss["target"]:
            # decided_in: `inet fw web rule handle 20: ...` or `iptables filter LAN rule 1: ...`
            where = f"{decided.get('chain')} rule {'handle ' if name == 'handle' else ''}{got[3]}:"
            if after.get("verdict") == near_miss["verdict"] and f" {where}" in near_miss["decided_in"]:
                continue
        elif got == rule and after.get("verdict") == near_miss["verdict"]:
            continue
        # Shadowed: the change made a rule match that the kernel evaluates before the near miss.
        steps = after.get("steps", [])
        if near_miss["backend"] == "nft" and decided and decided.get("type") == "rule" \
                and decided.get("hook") == near_miss["hook"] and decided.get("table") == near_miss["table"] \
                and _earlier_in_chain(book, decided, near_miss):
            continue
        problems.append(f"{' '.join(changed)}: near miss {near_miss['text']!r} ({near_miss['mismatches'][0]['reason']})"
                        f" but the kernel: {after.get('summary')} [{len(steps)} steps]")
    return proofs, problems


def _earlier_in_chain(book: RuleBook, decided: dict, near_miss: dict) -> bool:
    """Whether the rule that decided comes before the near miss in the kernel's walk of their chain
    (same chain, lower position), or sits in a chain the near miss's chain jumps to earlier."""
    rules = book.rules("nft", near_miss["family"], near_miss["table"], near_miss["chain"]) or []
    handles = [rule.handle for rule in rules]
    if near_miss["handle"] not in handles:
        return False
    before = handles[:handles.index(near_miss["handle"])]
    if decided.get("chain") == near_miss["chain"]:
        return decided.get("handle") in before
    return decided.get("chain") != near_miss["chain"] and decided.get("depth", 0) > 0 or any(
        rule.verdict.target == decided.get("chain") for rule in rules if rule.handle in before)


# -- the rules/ scenarios ------------------------------------------------------------------------


SCENARIOS = [scenario for scenario in list_scenarios()]


def dry_arguments(flow) -> Optional[list]:
    """A scenario flow as dry-run arguments; None when it is not one concrete packet."""
    spec = flow.flow.to_json()
    if spec["proto"] is None or "/" in spec["src"] or "/" in spec["dst"]:
        return None
    if spec["proto"] in ("tcp", "udp", "sctp") and spec["dport"] is None:
        return None
    args = ["--from", spec["src"], "--to", spec["dst"], "--proto", spec["proto"]]
    for option in ("sport", "dport", "iif"):
        if spec[option] is not None:
            args += [f"--{option}", str(spec[option])]
    return args


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_each_one_expression_near_miss_of_a_scenario_is_proven_by_a_dry_run(scenario, tmp_path):
    lab = Lab(unique_name("nm"), state_dir=tmp_path)
    try:
        lab.up(scenario, listen_seconds=300)
        netns = lab.topology.router
        book, local, interfaces = namespace_facts(netns)
        proofs, problems = 0, []
        for flow in scenario.flows:
            args = dry_arguments(flow)
            if args is None or flow.xfail:
                continue
            answer = run_dry(netns, args)
            assert "near_misses" in answer or not answer
            made, found = proof_problems(netns, args, answer, book, local, interfaces)
            proofs += made
            problems += [f"{flow.name}: {problem}" for problem in found]
        print(f"{scenario.name}: {proofs} near misses proven")
        assert not problems, "\n".join(problems)
    finally:
        lab.down()


def test_a_live_answer_names_the_accept_rule_that_nearly_matched(tmp_path):
    """The issue's done-criterion on a lab router: a dropped flow's live answer names the accept
    rule and the one expression that failed."""
    scenario = next(s for s in SCENARIOS if s.name == "sets-and-maps")
    lab = Lab(unique_name("nm"), state_dir=tmp_path)
    try:
        lab.up(scenario, listen_seconds=60)
        topology = lab.topology
        sender = ["ip", "netns", "exec", topology.client, "python3", "-m", "nftrace.lab.traffic", "tcp",
                  ROUTER_CLIENT_V4, "23", "--timeout", "1"]
        result = nftrace("--netns", topology.router, "why", "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto",
                         "tcp", "--dport", "23", "--count", "1", "--timeout", "10", "--json", "--", *sender)
        assert result.returncode == 0, result.stderr
        [packet] = result.packets
        assert packet["verdict"] == "drop"
        trusted = next(n for n in packet["near_misses"] if n["text"].startswith("ip saddr . meta l4proto . th dport"))
        [mismatch] = trusted["mismatches"]
        assert (mismatch["packet"], mismatch["wanted"], mismatch["set_name"], mismatch["first"]) == (
            f"{CLIENT_V4} . tcp . 23", "@trusted", "trusted", True)
        text = nftrace("--netns", topology.router, "why", "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto",
                       "tcp", "--dport", "23", "--count", "1", "--timeout", "10", "--", *sender)
        assert "closest rule that would have accepted it: inet filter input" in text.stdout
        assert "\033[" not in text.stdout, "no colour when stdout is not a terminal"
    finally:
        lab.down()


@pytest.fixture(scope="module")
def lab():
    topology = Topology(unique_name("nmprop"))
    topology.up()
    try:
        yield topology
    finally:
        topology.down()


# -- a condition the trace cannot tell, found by elimination ------------------------------------


LIMITED_INPUT = """
flush ruleset
table inet fw {
    chain input {
        type filter hook input priority filter; policy drop;
        udp dport 5353 ct state new limit rate 1/minute burst 1 packets accept
        udp dport 53 accept
    }
}
"""


def test_a_spent_rate_limit_is_named_as_the_one_failed_condition(lab):
    """The trace cannot tell a limit's state, but the kernel's own order can: the first datagram
    took the one token and was accepted by the rule; the second, with every other condition of
    the rule matched, was not: its limit was spent."""
    in_netns(lab.router, ["nft", "-f", "-"], input=LIMITED_INPUT)
    sender = ["ip", "netns", "exec", lab.client, "python3", "-m", "nftrace.lab.traffic", "udp", ROUTER_CLIENT_V4,
              "5353", "--count", "2", "--rate", "20", "--sport", "41000"]
    result = nftrace("--netns", lab.router, "why", "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "udp",
                     "--dport", "5353", "--count", "2", "--timeout", "10", "--json", "--no-drop-reasons", "--",
                     *sender)
    assert result.returncode == 0, result.stderr
    first, second = result.packets
    assert (first["verdict"], first["decided_by"]["handle"]) == ("accept", 2)
    assert (second["verdict"], second["decided_by"]["type"]) == ("drop", "policy")
    limited = second["near_misses"][0]
    assert limited["handle"] == 2 and limited["unknown"] == []
    assert limited["matched"] == ["udp dport 5353", "ct state new"]
    [spent] = limited["mismatches"]
    assert spent["reason"].startswith("limit rate 1/minute burst 1 packets: over the limit for this packet")


# -- random rulesets ------------------------------------------------------------------------------


flows = st.tuples(st.sampled_from(["tcp", "udp"]), st.sampled_from(PORTS), st.sampled_from([ROUTER_CLIENT_V4, SERVER_V4]))


@settings(max_examples=12, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(ruleset=rulesets(), flow=flows)
def test_one_expression_near_misses_of_random_rulesets_are_proven_by_dry_runs(lab, ruleset, flow):
    in_netns(lab.router, ["nft", "-f", "-"], input=ruleset)
    book, local, interfaces = namespace_facts(lab.router)
    proto, port, destination = flow
    args = ["--from", CLIENT_V4, "--to", destination, "--proto", proto, "--dport", str(port)]
    answer = run_dry(lab.router, args)
    proofs, problems = proof_problems(lab.router, args, answer, book, local, interfaces)
    print(f"random ruleset: {proofs} near misses proven")
    assert not problems, ruleset + "\n" + "\n".join(problems)
