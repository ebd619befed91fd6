"""Expected verdicts for flows: the format shared by the lab scenarios (rules/*.expect.toml),
the scenario tests, and `nftrace test`.

A file names a ruleset and lists flows, each with the verdict the kernel must give and,
optionally, the rule that must decide it:

    ruleset = "host-firewall.nft"      # relative to this file; .nft, or iptables-save text
    ruleset_kind = "nft"               # nft | iptables-legacy | iptables-nft (default: nft)
    description = "..."

    [[flow]]
    name = "ssh from an admin is accepted"
    from = "10.77.1.2"
    to = "10.77.1.1"
    proto = "tcp"
    dport = 22
    # sport, iif, oif: optional, as on the command line
    expect = "accept"                  # accept | drop | unknown
    chain = "ssh"                      # optional: the deciding step's chain
    text = "ip saddr @admins accept"   # optional: the deciding rule's text (or its comment)
    type = "rule"                      # optional: rule | policy
    sender = "client"                  # optional: client | router | server (default client)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import InputError
from .flow import Flow, parse_flow

VERDICTS = ("accept", "drop", "unknown")
RULESET_KINDS = ("nft", "iptables-legacy", "iptables-nft")


@dataclass(frozen=True)
class FlowExpectation:
    name: str
    flow: Flow
    expect: str
    chain: Optional[str] = None
    text: Optional[str] = None
    type: Optional[str] = None
    sender: str = "client"

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
        if self.text is not None:
            texts = [decided.get("text") or "", decided.get("iptables") or ""]
            if not any(text == self.text or f'comment "{self.text}"' in text for text in texts):
                problems.append(f"decided by '{texts[0] or texts[1]}', expected '{self.text}'")
        return problems


@dataclass
class ExpectationFile:
    path: Path
    ruleset: Path
    ruleset_kind: str = "nft"
    description: str = ""
    flows: list = field(default_factory=list)


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
    result = ExpectationFile(path, (path.parent / data["ruleset"]).resolve(), kind, data.get("description", ""))
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
        result.flows.append(FlowExpectation(entry.get("name", f"flow {index}"), flow, expect, entry.get("chain"),
                                            entry.get("text"), entry.get("type"), entry.get("sender", "client")))
    return result
