"""Anonymous chains (`jump { ... }`) as the kernel names them, read over netlink.

nft prints an anonymous chain inline, inside the rule that jumps to it, and never says its
name; the kernel names it `__chainN` when it is created, N from a counter shared by every
namespace of the machine, and trace events use that name. So the same ruleset loaded in two
namespaces (a target and its dry-run sandbox) has other names for the same chains, and only
the kernel can say which rule jumps to which `__chainN` and what its rules' handles are.

The dump asks the kernel (NFT_MSG_GETRULE, filtered by table and chain) for the rules of the
chains that hold anonymous blocks, then of the anonymous chains they jump to, and keeps only
what identifies them: each chain's rule handles in order, and which rule jumps to which
anonymous chain. Reading changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

from ..errors import EnvironmentProblem
from ..trace.events import TABLE_FAMILIES

ANONYMOUS_CHAIN_RE = re.compile(r"^__chain\d+$")
# An nft listing line that opens an anonymous chain: `tcp dport 22 jump {`.
_OPENS_BLOCK_RE = re.compile(r"\b(jump|goto) \{$")


def is_anonymous_chain(name: str) -> bool:
    return bool(ANONYMOUS_CHAIN_RE.match(name))


@dataclass
class KernelChain:
    """One chain's rules as the kernel holds them: handles in order, anonymous jumps."""

    family: str
    table: str
    name: str
    handles: list = field(default_factory=list)
    jumps: dict = field(default_factory=dict)  # rule handle -> the anonymous chain it jumps or goes to

    @property
    def key(self) -> tuple:
        return (self.family, self.table, self.name)


def chains_with_blocks(listing: str) -> list[tuple[str, str, str]]:
    """(family, table, chain) of the named chains whose rules open an anonymous chain.

    A cheap scan of nft's text, so that a ruleset without `jump {` costs nothing more.
    """
    found = []
    family = table = chain = None
    for line in listing.splitlines():
        if not line.startswith("\t"):
            match = re.match(r"^table (\S+) (\S+) \{", line)
            if match:
                family, table = match.group(1), match.group(2).strip('"')
            continue
        if line.startswith("\tchain "):
            chain = line[len("\tchain "):].split(" {", 1)[0].strip('"')
            continue
        if line.startswith("\t\t") and not line.startswith("\t\t\t") and _OPENS_BLOCK_RE.search(line.rstrip()):
            key = (family, table, chain)
            if chain is not None and key not in found:
                found.append(key)
    return found


def _verdict_chain(expression) -> Optional[str]:
    """The chain that an `immediate` expression's jump or goto names, if any."""
    if expression.get_attr("NFTA_EXPR_NAME") != "immediate":
        return None
    data = expression.get_attr("NFTA_EXPR_DATA")
    value = data.get_attr("NFTA_IMMEDIATE_DATA") if data is not None else None
    verdict = value.get_attr("NFTA_DATA_VERDICT") if value is not None else None
    return verdict.get_attr("NFTA_VERDICT_CHAIN") if verdict is not None else None


def read_anonymous_chains(listing: str) -> list[KernelChain]:
    """Run in the namespace to read: the chains holding anonymous blocks and the anonymous
    chains under them (nested ones too), as the kernel names them."""
    starts = chains_with_blocks(listing)
    if not starts:
        return []
    try:
        from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_GETRULE, nft_rule_msg
        from pyroute2.nftables.main import NFTables
    except ImportError:
        raise EnvironmentProblem("pyroute2 is missing: pip install pyroute2") from None
    chains: list[KernelChain] = []
    # Family 0 asks every family; the table and chain attributes filter the dump.
    socket = NFTables(nfgen_family=0)
    try:
        todo = list(starts)
        seen = set()
        while todo:
            family, table, name = todo.pop(0)
            if (family, table, name) in seen:
                continue
            seen.add((family, table, name))
            request = nft_rule_msg()
            request["attrs"] = [("NFTA_RULE_TABLE", table), ("NFTA_RULE_CHAIN", name)]
            chain = KernelChain(family, table, name)
            for message in socket.request_get(request, NFT_MSG_GETRULE):
                if TABLE_FAMILIES.get(message["nfgen_family"]) != family:
                    continue
                handle = message.get_attr("NFTA_RULE_HANDLE")
                chain.handles.append(handle)
                for expression in message.get_attr("NFTA_RULE_EXPRESSIONS") or []:
                    target = _verdict_chain(expression)
                    if target and is_anonymous_chain(target):
                        chain.jumps[handle] = target
                        todo.append((family, table, target))
            chains.append(chain)
    finally:
        socket.close()
    return chains


def anonymous_positions(chains: Iterable[KernelChain]) -> dict:
    """Each anonymous chain's place in the ruleset, the same in every copy of it:
    (family, table, anonymous chain) -> (family, table, named chain, (position, position, ...)),
    the positions (from 1) of the jumping rule in the named chain, then in each anonymous
    chain down to this one."""
    by_key = {chain.key: chain for chain in chains}
    parents = {}
    for chain in by_key.values():
        for handle, target in chain.jumps.items():
            parents[(chain.family, chain.table, target)] = (chain, chain.handles.index(handle) + 1)
    positions = {}
    for key in parents:
        trail = []
        current = key
        while current in parents:
            parent, position = parents[current]
            trail.append(position)
            current = parent.key
            if len(trail) > len(parents):
                break  # a cycle cannot happen in the kernel; never loop on bad input
        positions[key] = (*current, tuple(reversed(trail)))
    return positions
