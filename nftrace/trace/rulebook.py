"""The ruleset as near misses need it: every rule of every chain, in order, able to say how
its match expressions fare against a packet. Pure logic: built from libnftables' JSON
listing (`nft -j -a list ruleset`, set elements included), iptables-save text and
`ipset save` text that someone else read (trace/nearmiss_source.py reads them live).

The rule text shown is nft's own (`nft -a list ruleset`, from the ruleset snapshot) where
it is at hand, so a near miss reads like the steps of the path; else it is made from the
JSON. iptables-nft rules whose JSON holds compat matches (`xt match multiport`, which nft
1.0.6 cannot show) are evaluated in their iptables form, when that is known.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..iptables import xtmatch
from . import nftexpr
from .matching import PacketView, RuleEvaluation
from .nearmiss import RuleVerdict

# Fields that vary from packet to packet of one flow, and how a rule that tests them reads
# (nft JSON, iptables-save): a packet's near misses depend on them only when a rule does.
VARYING_FIELDS = {
    "sport": ('"field": "sport"', "--sport", "--source-port", "--sports", "--source-ports", "--ports"),
    "length": ('"field": "length"', '"key": "length"', "-m length"),
    "tcp_flags": ('"field": "flags"', "--tcp-flags", "--syn"),
    "mark": ('"key": "mark"', "-m mark", "-m connmark"),
}

# (family, table, chain, rule number) → the iptables-save form of an iptables-nft rule.
IptablesForm = Callable[[str, str, str, int], Optional[str]]
# (family, table, chain, handle) → nft's text of the rule (the snapshot's).
NftText = Callable[[str, str, str, int], Optional[str]]


@dataclass
class NftRule:
    """One nftables rule from the JSON listing."""

    family: str
    table: str
    chain: str
    handle: int
    number: int
    text: str
    exprs: list
    book: "RuleBook"
    iptables: Optional[str] = None
    backend: str = "nft"
    verdict: RuleVerdict = field(default=RuleVerdict("continue"))

    def __post_init__(self) -> None:
        self.verdict = nftexpr.rule_verdict(self.exprs)
        self._compat = any("xt" in expr and (expr["xt"] or {}).get("type") == "match" for expr in self.exprs)

    def evaluate(self, view: PacketView) -> RuleEvaluation:
        if self._compat and self.iptables:
            return xtmatch.rule_conditions(self.iptables, view, self.family, self.book.ipsets)
        return RuleEvaluation(nftexpr.rule_conditions(self.exprs, view, self.book.set_elements, self.family,
                                                      self.table))

    def vmap_choices(self, view: PacketView) -> list:
        return nftexpr.vmap_choices(self.exprs, view, self.book.set_elements, self.family, self.table)


@dataclass
class LegacyBookRule:
    """One legacy iptables rule (iptables-save's `-A` line)."""

    family: str
    table: str
    chain: str
    number: int
    text: str
    book: "RuleBook"
    verdict: RuleVerdict
    handle: Optional[int] = None
    backend: str = "iptables-legacy"

    @property
    def iptables(self) -> str:
        return self.text

    def evaluate(self, view: PacketView) -> RuleEvaluation:
        return xtmatch.rule_conditions(self.text, view, self.family, self.book.ipsets)

    def vmap_choices(self, view: PacketView) -> list:
        return []


class RuleBook:
    """Chains of rules by (backend, family, table, chain), and the elements of named sets.

    Filled up front (`add_nft_json`, `add_legacy`), or on demand: `chain_loader` gives the JSON
    listing of one nftables chain (`nft -j -a list chain`), `set_loader` a set's or map's
    elements, each asked once.
    """

    def __init__(self, chain_loader: Optional[Callable[[str, str, str], Optional[dict]]] = None,
                 set_loader: Optional[Callable[[str, str, str], Optional[list]]] = None,
                 nft_text: Optional[NftText] = None, iptables_form: Optional[IptablesForm] = None) -> None:
        self.chains: dict = {}
        self.sets: dict = {}  # (family, table, name) → the JSON elements
        self.ipsets: dict = {}
        self.chain_loader = chain_loader
        self.set_loader = set_loader
        self.nft_text = nft_text
        self.iptables_form = iptables_form
        self._asked: set = set()
        # Which of VARYING_FIELDS the rules read so far test (see trace/nearmiss_live.py).
        self.tested_fields: set = set()

    def _note_fields(self, *texts: Optional[str]) -> None:
        for name, marks in VARYING_FIELDS.items():
            if name not in self.tested_fields and any(t and any(mark in t for mark in marks) for t in texts):
                self.tested_fields.add(name)

    def rules(self, backend: str, family: str, table: str, chain: str) -> Optional[list]:
        key = (backend, family, table, chain)
        if key not in self.chains and backend == "nft" and self.chain_loader and key not in self._asked:
            self._asked.add(key)
            document = self.chain_loader(family, table, chain)
            if document is not None:
                self.add_nft_json(document)
        return self.chains.get(key)

    def set_elements(self, family: str, table: str, name: str) -> Optional[list]:
        key = (family, table, name)
        if key not in self.sets and self.set_loader and ("set",) + key not in self._asked:
            self._asked.add(("set",) + key)
            elements = self.set_loader(family, table, name)
            if elements is not None:
                self.sets[key] = elements
        return self.sets.get(key)

    def add_nft_json(self, document: dict, text: Optional[NftText] = None,
                     iptables: Optional[IptablesForm] = None) -> None:
        """Add the chains, rules and sets of a JSON listing (`nft -j -a list ruleset`, or of one chain)."""
        text = text or self.nft_text
        iptables = iptables or self.iptables_form
        for item in document.get("nftables", []):
            if "set" in item or "map" in item:
                body = item.get("set") or item.get("map")
                elements = body.get("elem", [])
                self.sets[(body["family"], body["table"], body["name"])] = elements
            elif "chain" in item:
                body = item["chain"]
                self.chains.setdefault(("nft", body["family"], body["table"], body["name"]), [])
            elif "rule" in item:
                body = item["rule"]
                key = ("nft", body["family"], body["table"], body["chain"])
                rules = self.chains.setdefault(key, [])
                family, table, chain, handle = body["family"], body["table"], body["chain"], body.get("handle")
                number = len(rules) + 1
                shown = (text(family, table, chain, handle) if text and handle is not None else None) \
                    or nftexpr.rule_text(body.get("expr", []), body.get("comment"))
                form = iptables(family, table, chain, number) if iptables else None
                rules.append(NftRule(family, table, chain, handle, number, shown, body.get("expr", []), self, form))
                self._note_fields(json.dumps(body.get("expr", [])), form)

    def add_legacy(self, family: str, chains: dict) -> None:
        """Add one family's legacy chains ({(table, chain): LegacyChain}, iptables/legacy.py)."""
        user_chains: dict = {}
        for (table, name), chain in chains.items():
            if not chain.builtin:
                user_chains.setdefault(table, set()).add(name)
        for (table, name), chain in chains.items():
            users = frozenset(user_chains.get(table, ()))
            self._note_fields(*(rule.text for rule in chain.rules))
            self.chains[("iptables-legacy", family, table, name)] = [
                LegacyBookRule(family, table, name, rule.number, rule.text, self, xtmatch.rule_verdict(rule.text, users))
                for rule in chain.rules if rule.number is not None
            ]

    def add_ipsets(self, ipsets: dict) -> None:
        self.ipsets.update(ipsets)
