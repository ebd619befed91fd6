"""Reading `nft monitor trace`'s output: which packets it showed from start to end.

nft monitor prints one line per trace event (`trace id 1a2b3c4d inet fw forward rule ...`)
plus a `packet: ...` line where a base chain's run starts, and one
`# ERROR: We lost some netlink events!` line when its socket overflowed, without a count.
A packet's path is complete when its lines, in order, are exactly those of a packet that
nothing was lost of (the reference path, taken from a slow calibration run).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional

from nftrace.kernel.tracetable import MARK_CHAIN_PREFIX, TRACE_TABLE_PREFIX

LOSS_LINE = "# ERROR: We lost some netlink events!"
# nft prints a rule's counter values as they were when it read the ruleset.
_COUNTER_VALUES = re.compile(r"counter packets \d+ bytes \d+")


@dataclass(frozen=True)
class MonitorOutput:
    paths: list  # one tuple of line keys per packet, in the order packets started
    loss_notices: int  # how many times nft said it lost events


def line_key(line: str) -> Optional[tuple]:
    """What a trace line says, without what changes from packet to packet (id, headers)."""
    parts = line.rstrip("\n").split(" ", 6)
    if len(parts) < 7 or parts[0] != "trace" or parts[1] != "id":
        return None
    _, _, _, family, table, chain, rest = parts
    if table.startswith(TRACE_TABLE_PREFIX):
        table = TRACE_TABLE_PREFIX  # nftrace's table has a new name every run
    what = "packet" if rest.startswith("packet:") else _COUNTER_VALUES.sub("counter", rest.strip())
    return (family, table, chain, what)


def is_path_start(key: tuple) -> bool:
    """A packet's first line: nftrace's mark chain, where tracing is switched on for it."""
    return key[1] == TRACE_TABLE_PREFIX and key[2].startswith(MARK_CHAIN_PREFIX) and key[3] == "packet"


def parse(lines: Iterable[str]) -> MonitorOutput:
    """Group the lines into packets: by trace id, a new packet at each path start (ids are
    reused by later packets, so an id alone does not tell packets apart)."""
    open_paths: dict = {}
    paths = []
    notices = 0
    for line in lines:
        if line.startswith(LOSS_LINE):
            notices += 1
            continue
        key = line_key(line)
        if key is None:
            continue
        trace_id = line.split(" ", 3)[2]
        if is_path_start(key):
            path = open_paths[trace_id] = [key]
            paths.append(path)
        elif trace_id in open_paths:
            open_paths[trace_id].append(key)
    return MonitorOutput([tuple(path) for path in paths], notices)


def reference_path(output: MonitorOutput) -> Optional[tuple]:
    """The path most packets of a lossless run share."""
    counts = Counter(output.paths)
    return counts.most_common(1)[0][0] if counts else None


def complete_paths(output: MonitorOutput, reference: tuple) -> int:
    return sum(1 for path in output.paths if path == reference)
