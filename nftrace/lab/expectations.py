"""Expected verdicts for flows: the format shared by the lab scenarios (rules/*.expect.toml),
the scenario tests, and `nftrace test`.

A file names a ruleset and lists flows, each with the verdict the kernel must give and,
optionally, the rule that must decide it:

    ruleset = "host-firewall.nft"      # relative to this file; .nft, or iptables-save text
    ruleset_kind = "nft"               # nft | iptables-legacy | iptables-nft (default: nft)
    description = "..."
    xfail = "reason"                   # optional: every flow of the file is a known gap of nftrace

    [[flow]]
    name = "ssh from an admin is accepted"
    from = "10.77.1.2"
    to = "10.77.1.1"
    proto = "tcp"
    dport = 22
    # sport, iif, oif: optional, as on the command line
    expect = "accept"                  # accept | drop | unknown
    chain = "ssh"                      # optional: the deciding step's chain
    text = "ip saddr @admins accept"   # optional: the deciding rule: its comment, iptables form or nft text
    type = "rule"                      # optional: rule | policy
    sender = "client"                  # optional: client | router | server (default client)
    dnat = "10.77.1.2:22"              # optional: the destination became this (address, or address:port)
    snat = "10.77.2.1"                 # optional: the source became this (address, or address:port)
    xfail = "reason"                   # optional: nftrace cannot give this answer yet, and why
    demo = true                        # optional: `nftrace demo` traces this flow

The file states what the kernel must do; the kernel decides, and a scenario test checks that
nftrace names it. `text` names the deciding rule by what stays the same when nftables or
iptables is upgraded (see rulematch.py), so that a file written on one version passes
unchanged on another: the rule's comment (best: it says why the rule is there), its iptables
form for iptables-nft and legacy rules (`-A DOCKER -d 10.77.2.2/32 ... -j ACCEPT`, as
iptables-save prints it), or its nft text, compared with blanks collapsed, set elements
sorted, and its matches in any order (nft 1.1.3 prints `ip daddr 10.77.2.2 iifname !=
"r-server" ...` for the rule that 1.0.6 printed as `iifname != "r-server" ... ip daddr
10.77.2.2 ...`); statements and the verdict stay in order.
An `xfail` flow is still traced and checked: it states the right answer for a case nftrace
does not handle yet, and starts passing when nftrace does. The ruleset of a lab scenario is
loaded with `nft -f` (nft), `iptables-nft-restore` or `iptables-legacy-restore`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import InputError
from ..flow import Flow, parse_flow
from .rulematch import blanks_collapsed, names_rule

VERDICTS = ("accept", "drop", "unknown")
RULESET_KINDS = ("nft", "iptables-legacy", "iptables-nft")
SENDERS = ("client", "router", "server")
EXPECTATION_SUFFIX = ".expect.toml"


def _nat_matches(changes: list, field: str, expected: str) -> bool:
    """Whether some rewrite of `field` ended at `expected` (an address matches any port)."""
    for change in changes:
        if change.get("field") != field:
            continue
        to = change.get("to") or ""
        if to == expected or to.startswith(expected + ":") or to.startswith(f"[{expected}]:"):
            return True
    return False


@dataclass(frozen=True)
class FlowExpectation:
    name: str
    flow: Flow
    expect: str
    chain: Optional[str] = None
    text: Optional[str] = None
    type: Optional[str] = None
    sender: str = "client"
    dnat: Optional[str] = None
    snat: Optional[str] = None
    xfail: Optional[str] = None
    demo: bool = False

    def check(self, packet: dict) -> list[str]:
        """What differs between this expectation and one packet of nftrace's JSON."""
        problems = []
        if packet.get("verdict") != self.expect:
            problems.append(f"verdict {packet.get('verdict')}, expected {self.expect}")
        decided = packet.get("decided_by") or {}
        if self.chain is not None and decided.get("chain") != self.chain:
            problems.append(f"decided in chain {decided.get('chain')}, expected {self.chain}")
        if self.type is not None and decided.get("type") != self.type:
            problems.append(f"decided by a {decided.get('type')}, expected a {self.type}")
        if self.text is not None and not names_rule(self.text, decided.get("text"), decided.get("iptables"),
                                                       decided.get("family")):
            seen = blanks_collapsed(decided.get("text") or decided.get("iptables") or "")
            problems.append(f"decided by '{seen}', expected '{self.text}'")
        for side, expected in (("dst", self.dnat), ("src", self.snat)):
            if expected is not None and not _nat_matches(packet.get("nat") or [], side, expected):
                seen = ", ".join(f"{c.get('field')} {c.get('from')} → {c.get('to')}" for c in packet.get("nat") or [])
                problems.append(f"{'dnat' if side == 'dst' else 'snat'} to {expected} expected, saw {seen or 'no NAT'}")
        return problems


@dataclass
class ExpectationFile:
    path: Path
    ruleset: Path
    ruleset_kind: str = "nft"
    description: str = ""
    flows: list = field(default_factory=list)
    xfail: Optional[str] = None

    @property
    def name(self) -> str:
        """The scenario's name: `host-firewall` for rules/host-firewall.expect.toml."""
        name = self.path.name
        return name[: -len(EXPECTATION_SUFFIX)] if name.endswith(EXPECTATION_SUFFIX) else self.path.stem


def load_expectations(path: Path) -> ExpectationFile:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise InputError(f"{path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{path}: {err}") from None
    kind = data.get("ruleset_kind", "nft")
    if kind not in RULESET_KINDS:
        raise InputError(f"{path}: ruleset_kind '{kind}' is not one of {', '.join(RULESET_KINDS)}")
    if "ruleset" not in data:
        raise InputError(f"{path}: no 'ruleset' given")
    result = ExpectationFile(path, (path.parent / data["ruleset"]).resolve(), kind, data.get("description", ""),
                             xfail=data.get("xfail"))
    for index, entry in enumerate(data.get("flow", []), 1):
        where = f"{path}: flow {index}"
        expect = entry.get("expect")
        if expect not in VERDICTS:
            raise InputError(f"{where}: expect must be one of {', '.join(VERDICTS)}")
        try:
            flow = parse_flow(entry["from"], entry["to"], entry.get("proto"), entry.get("sport"), entry.get("dport"),
                              entry.get("iif"), entry.get("oif"))
        except KeyError as missing:
            raise InputError(f"{where}: missing {missing}") from None
        except InputError as err:
            raise InputError(f"{where}: {err}") from None
        sender = entry.get("sender", "client")
        if sender not in SENDERS:
            raise InputError(f"{where}: sender must be one of {', '.join(SENDERS)}")
        result.flows.append(FlowExpectation(entry.get("name", f"flow {index}"), flow, expect, entry.get("chain"),
                                            entry.get("text"), entry.get("type"), sender, entry.get("dnat"),
                                            entry.get("snat"), entry.get("xfail", result.xfail),
                                            bool(entry.get("demo", False))))
    return result
