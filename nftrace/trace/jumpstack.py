"""The jump stack of one base chain's run: which chain a packet is in, and how deep.

The kernel says when a packet enters a chain by a jump (the jump rule's event) and when a
chain returns (a return event, or a rule event without handle at its end), but nothing when
the calling chain resumes. So the chains are tracked here, for nftables trace events
(trace/paths.py) and legacy TRACE lines (iptables/merge.py) alike:

- an event in a chain lower on the stack means the chains above it have returned;
- an event in a chain not on the stack was entered by a jump whose event was lost: it is one
  level deeper than the running chain (the base chain starts the stack again);
- `goto` replaces the running chain, so the end of a goto'd chain returns to the caller's
  caller, past it (to the base chain's policy when the goto came from the base chain).

Pure logic, no kernel.
"""

from __future__ import annotations


class JumpStack:
    """[chain, depth] frames of one base chain's run, the running chain last."""

    __slots__ = ("base", "_frames")

    def __init__(self, base: str):
        self.base = base
        self._frames: list[list] = [[base, 0]]

    def enter(self, chain: str) -> int:
        """Follow the chain an event comes from; return its depth."""
        frames = self._frames
        if not frames or frames[-1][0] != chain:
            for index in range(len(frames) - 1, -1, -1):
                if frames[index][0] == chain:
                    del frames[index + 1:]
                    break
            else:
                if chain == self.base:
                    frames[:] = [[chain, 0]]
                else:
                    frames.append([chain, frames[-1][1] + 1 if frames else 1])
        return frames[-1][1]

    @property
    def depth(self) -> int:
        return self._frames[-1][1] if self._frames else 0

    def in_base_only(self, chain: str) -> bool:
        """The base chain is running, with nothing called from it."""
        return len(self._frames) == 1 and chain == self.base

    def jump(self, target: str) -> None:
        self._frames.append([target, self.depth + 1])

    def goto(self, target: str) -> None:
        """The running chain is replaced: its end goes back to the caller's caller."""
        depth = self.depth + 1
        if self._frames:
            self._frames[-1] = [target, depth]
        else:
            self._frames.append([target, depth])

    def ret(self) -> None:
        """The running chain returned to its caller."""
        if self._frames:
            self._frames.pop()
