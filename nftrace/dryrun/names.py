"""The target's names for what the sandbox calls otherwise: rule handles and anonymous chains.

The sandbox loads a copy of the target's ruleset, so its chains hold the same rules in the same
order, but the kernel numbers what it creates on its own: rule handles (per table, in order of
creation) and anonymous chains (`jump { ... }` becomes `__chainN`, N from one counter for the
whole machine). An answer or a fix that named the sandbox's `__chain494` would name a chain
the target does not have. Every rule of the copy is paired with the target's by its place
(a named chain's rule by its number, an anonymous chain by the rule that jumps to it, see
nftrace.kernel.anonchains), and keyed by the sandbox's handle, which stays the same when a
fix inserts rules in the sandbox; a rule the target does not have is new (handle None).

Pure: listings and kernel dumps in, translations out.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Optional

from ..kernel.anonchains import anonymous_positions
from ..trace.paths import PacketPath, nat_rewrites
from ..trace.ruleset import RulesetSnapshot, parse_ruleset_listing


class TargetNames:
    """Translates the sandbox's chain names and rule handles into the target's."""

    def __init__(self, target_listing: str = "", target_anonymous: Iterable = (), sandbox_listing: Optional[str] = None,
                 sandbox_anonymous: Optional[Iterable] = None):
        target_anonymous = list(target_anonymous)
        sandbox_anonymous = target_anonymous if sandbox_anonymous is None else list(sandbox_anonymous)
        sandbox_listing = target_listing if sandbox_listing is None else sandbox_listing
        by_place = {place: key[2] for key, place in anonymous_positions(target_anonymous).items()}
        self._chains = {key: by_place[place] for key, place in anonymous_positions(sandbox_anonymous).items()
                        if place in by_place}
        # (family, table, sandbox chain, sandbox handle) -> (target handle, its number in the chain)
        self._rules: dict = {}
        target_rules = {(r.family, r.table, r.chain, r.number): r for r in parse_ruleset_listing(target_listing)[2].values()}
        for rule in parse_ruleset_listing(sandbox_listing)[2].values():
            paired = target_rules.get((rule.family, rule.table, rule.chain, rule.number))
            if paired is not None:
                self._rules[(rule.family, rule.table, rule.chain, rule.handle)] = (paired.handle, paired.number)
        target_handles = {(c.family, c.table, c.name): c.handles for c in target_anonymous}
        for chain in sandbox_anonymous:
            handles = target_handles.get((chain.family, chain.table, self._chains.get(chain.key)), [])
            for number, (handle, paired) in enumerate(zip(chain.handles, handles), 1):
                self._rules[(chain.family, chain.table, chain.name, handle)] = (paired, number)
        # Chains that hold a rule of the copy: a handle unknown in one of them is a new rule.
        self._known_chains = {key[:3] for key in self._rules}

    def chain(self, family: str, table: str, name: Optional[str]) -> Optional[str]:
        if name is None:
            return None
        return self._chains.get((family, table, name), name)

    def handle(self, family: str, table: str, sandbox_chain: str, handle: Optional[int],
               number: Optional[int]) -> tuple[Optional[int], Optional[int]]:
        """(the target's handle, the rule's number in the target's chain) for a rule of the
        sandbox; (None, None) for a rule that only the sandbox has (a fix being proven)."""
        if handle is None:
            return None, number
        paired = self._rules.get((family, table, sandbox_chain, handle))
        if paired is not None:
            return paired
        if (family, table, sandbox_chain) in self._known_chains or number is not None:
            return None, None
        return handle, number

    def sandbox_handle(self, family: str, table: str, chain: str, handle: int) -> Optional[int]:
        """The sandbox's handle of one of the target's rules (a fix is placed by it there)."""
        target_chain = self.chain(family, table, chain)
        for (f, t, c, sandbox), (paired, _) in self._rules.items():
            if (f, t, self.chain(f, t, c), paired) == (family, table, target_chain, handle):
                return sandbox
        return None

    def translate(self, path: PacketPath, sandbox: Optional[RulesetSnapshot] = None) -> None:
        """Give each nftables step of a sandbox path the target's names and handles; rules of
        anonymous chains get their text from the sandbox's snapshot (one that knows them).
        Steps are replaced, not changed: paths of one shape share theirs (trace/shapes.py)."""
        steps = []
        for step in path.steps:
            translated = step if step.backend != "nft" else self._step(step, sandbox)
            if step is path.decided_by:
                path.decided_by = translated
            steps.append(translated)
        path.steps = steps
        path.near_misses = [self._near_miss(item) for item in path.near_misses]
        if path.nat:
            # The NAT rewrites name their rule by location: say it in the target's words too.
            path.nat = nat_rewrites(path.observations, path.steps)

    def _step(self, step, sandbox: Optional[RulesetSnapshot]):
        """An nftables step named as the target names it (legacy rules are named by chain and
        number, the same in every copy)."""
        sandbox_chain, text, handle, number = step.chain, step.text, step.handle, step.rule_number
        if text is None and handle is not None and sandbox is not None:
            rule = sandbox.rule(step.family, step.table, sandbox_chain, handle)
            text = rule.text if rule is not None else None
        if step.type == "rule" or (step.type == "return" and handle is not None):
            handle, number = self.handle(step.family, step.table, sandbox_chain, handle, number)
        return replace(step, text=text, chain=self.chain(step.family, step.table, sandbox_chain),
                       target=self.chain(step.family, step.table, step.target), handle=handle, rule_number=number)

    def _near_miss(self, item):
        """A near miss (trace/nearmiss.py) named as the target names its rule."""
        if item.backend != "nft":
            return item
        handle, number = self.handle(item.family, item.table, item.chain, item.handle, item.rule_number)
        return replace(item, chain=self.chain(item.family, item.table, item.chain), handle=handle,
                       rule_number=number, target=self.chain(item.family, item.table, item.target))
