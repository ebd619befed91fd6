"""iptables-nft rules shown as the admin wrote them: the iptables form of nftables rules.

iptables-nft keeps its rules in nftables tables (`ip filter`, `ip6 nat`, ...), so they report
as nftables trace events and nftrace reads their nft text like any rule's. The admin wrote
`-A INPUT -p tcp --dport 25 -j DROP`, though: `iptables-nft-save` prints that form, chain by
chain in rule order, so the n-th `-A` line of a chain is the rule at position n of the nft
listing. A chain whose two listings do not have the same number of rules is left alone
rather than guessed at.
"""

from __future__ import annotations

import shutil
from typing import Optional

from ..kernel import runner
from ..protocols import iptables_command
from .legacy import parse_save
from ..trace.paths import PacketPath

XTABLES_TABLES = frozenset({"filter", "nat", "mangle", "raw", "security"})
FAMILIES = ("ip", "ip6")


class IptablesNftText:
    """Rule texts of iptables-nft chains, by (family, table, chain) and position."""

    def __init__(self, chains: Optional[dict] = None):
        self.chains = chains or {}

    @classmethod
    def from_listings(cls, listings: dict, snapshot) -> "IptablesNftText":
        """`listings`: family → iptables-nft-save output; `snapshot`: the nftables ruleset."""
        chains = {}
        for family, text in listings.items():
            for (table, name), chain in parse_save(text).items():
                nft_chain = snapshot.chain(family, table, name)
                if nft_chain is not None and len(nft_chain.rules) == len(chain.rules):
                    chains[(family, table, name)] = [rule.text for rule in chain.rules]
        return cls(chains)

    @classmethod
    def read(cls, snapshot) -> "IptablesNftText":
        """Run iptables-nft-save for each family that has tables iptables-nft could have made."""
        families = {family for family, table in snapshot.tables if family in FAMILIES and table in XTABLES_TABLES}
        listings = {}
        for family in sorted(families):
            command = shutil.which(f"{iptables_command(family)}-nft-save")
            if command is None:
                continue
            result = runner.run([command], check=False)
            if result.returncode == 0:
                listings[family] = result.stdout
        return cls.from_listings(listings, snapshot)

    def text(self, family: str, table: str, chain: str, number: int) -> Optional[str]:
        rules = self.chains.get((family, table, chain))
        if rules is None or not 1 <= number <= len(rules):
            return None
        return rules[number - 1]

    def annotate(self, path: PacketPath) -> PacketPath:
        """Give each nftables rule step of an iptables-nft chain its iptables form."""
        if not self.chains:
            return path  # no iptables-nft chain here (a packet's steps are not looked at)
        for step in path.steps:
            if (step.backend == "nft" and step.type == "rule" and step.rule_number and not step.rule_deleted
                    and step.iptables is None):
                step.iptables = self.text(step.family, step.table, step.chain, step.rule_number)
        return path
