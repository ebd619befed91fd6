"""One namespace's share of a live trace: its libnftables context, trace table, monitor
socket, ruleset snapshot, path builder and interface names.

A trace of one namespace has one part, and nftrace is in that namespace. A trace across
several has one part per namespace; nftrace stays in the first, and every other part makes
its kernel calls inside its own namespace (kernel/nsexec.NamespaceCaller): its libnftables
context and its netlink socket are made there and belong to that namespace for good, so that
the trace table's `flags owner` ties the table to a socket of its namespace and the kernel
removes it there if nftrace is killed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..kernel.netns import NetnsTarget
from ..kernel.nsexec import NamespaceCaller
from .report import netns_words


@dataclass(eq=False)
class NamespacePart:
    label: Optional[str]  # what answers call the namespace (None: nftrace's own, unnamed)
    target: Optional[NetnsTarget] = None
    caller: Optional[NamespaceCaller] = None  # None: nftrace is in the namespace itself
    nft: Any = None  # NftContext, or the same reached through the caller (InNamespace)
    snapshot: Any = None
    monitor: Any = None
    table: Any = None
    builder: Any = None
    interfaces: Optional[dict] = None
    iptables_nft: Any = None
    near_misses: Any = None
    # Its table may leave IP postrouting unobserved (kernel/tracetable.hook_ends): one namespace,
    # nftables alone, no bridge (egress chains and legacy tables are looked for on each change).
    exit_unobserved: bool = False
    ended: bool = False  # its namespace went away: nothing more is read from it

    @property
    def shown(self) -> str:
        return netns_words(self.label)

    def call(self, function: Callable[..., Any], *args, **kwargs) -> Any:
        """Run `function` inside this part's namespace."""
        if self.caller is None:
            return function(*args, **kwargs)
        return self.caller.call(function, *args, **kwargs)

    def inside(self, thing: Any) -> Any:
        """`thing` (made in this namespace) with its methods run there."""
        return thing if self.caller is None else self.caller.proxy(thing)

    def gone(self) -> bool:
        """The namespace can no longer be reached as the user named it (see NetnsTarget.alive)."""
        return self.target is not None and not self.target.alive()
