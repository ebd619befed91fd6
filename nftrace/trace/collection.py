"""Python's cyclic garbage collector during a trace: run between reads, when nftrace has
caught up, not wherever an allocation happens to cross a threshold.

Paths hold no reference cycles: what a packet made is freed by reference counting once it
is answered, and the collector finds garbage only where a cycle was made (rare: an error
kept with its traceback). But each pass scans every object made since the last one that is
still alive. Under a flood with drop reasons on, that is every packet held back for a late
kernel drop (drops/correlator.py): on the bench's flood, 25 passes of 20 ms that collected
nothing, 8 % of nftrace's CPU, each a pause in reading while the socket's buffer filled.

So automatic collection is off while events are read, and the read loop offers a pass after
each round: taken when the sockets are drained and enough was made since the last pass, or,
on a flood nftrace never catches up with, every BUSY_SECONDS at most, so that cyclic
garbage stays bounded. A pass collects the generation Python's own policy would.
"""

from __future__ import annotations

import gc
import time
from typing import Callable, Optional

# Tracked objects made (and still alive) since the last pass before one is worth it
# (Python's own threshold: 700).
YOUNG_OBJECTS = 20_000
# Behind a flood, a pass at most this often: the garbage of cycles cannot pile up for long.
BUSY_SECONDS = 2.0


def generation_to_collect(counts: tuple, thresholds: tuple) -> int:
    """The oldest generation whose count is over its threshold, as Python's collector picks
    (gen 0's count: objects made; gen 1's and 2's: passes of the generation below)."""
    for generation in (2, 1):
        if counts[generation] >= thresholds[generation]:
            return generation
    return 0


class CollectionBetweenReads:
    """From `start()` to `stop()`: no automatic collection; `between_reads` runs a pass when
    it is due."""

    def __init__(self, young_objects: int = YOUNG_OBJECTS, busy_seconds: float = BUSY_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.young_objects = young_objects
        self.busy_seconds = busy_seconds
        self.clock = clock
        self._last_pass = 0.0
        self._was_enabled = False

    def start(self) -> None:
        """Collect once and freeze what setting up made (imports, the CLI, the ruleset
        snapshot): it lives as long as the run, and no pass scans it again."""
        gc.collect()
        gc.freeze()
        self._was_enabled = gc.isenabled()
        gc.disable()
        self._last_pass = self.clock()

    def stop(self) -> None:
        """Automatic collection as it was before `start()` (safe without a start)."""
        if self._was_enabled:
            gc.enable()
            self._was_enabled = False

    def between_reads(self, caught_up: bool) -> Optional[int]:
        """After a round of reads (`caught_up`: every socket was drained): the generation
        collected, or None."""
        counts = gc.get_count()
        if counts[0] < self.young_objects:
            return None
        now = self.clock()
        if not caught_up and now - self._last_pass < self.busy_seconds:
            return None
        generation = generation_to_collect(counts, gc.get_threshold())
        gc.collect(generation)
        self._last_pass = now
        return generation
