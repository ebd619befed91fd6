"""How big the trace socket's receive buffer is allowed to grow, and why.

The kernel sends trace events as fast as packets cross the ruleset, and drops the ones that
do not fit in the listener's receive buffer. The buffer is a limit, not an allocation:
kernel memory is used only by events queued because nftrace has not read them yet. So it is
sized from how far nftrace may fall behind:

- with a rate limit (`--max-rate N`, default 100): N packets a second, at most
  EVENTS_PER_PACKET events each, for BACKLOG_SECONDS, at BYTES_PER_EVENT each; never below
  what `nft monitor trace` uses (16 MiB);
- without one (`--max-rate 0`): MAX_RCVBUF, 1 GiB, which holds about 1.5 million events
  (a flood of 100,000 forwarded packets through a small ruleset, unread);
- NFTRACE_RCVBUF=SIZE (bytes, or with K, M, G; 1G at most, the kernel's limit) replaces the
  computed size: to cap it on a small box, or to give a rate limit with a heavy ruleset (many
  events per packet) more room than the estimate.

When it was not enough, the socket's drop counter says how many events were lost, and the
run says so (lost_events, a warning naming this setting).
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Optional

from ..errors import InputError

ENV_VAR = "NFTRACE_RCVBUF"
# Measured on 6.x: a trace event of ~100-300 bytes is charged ~1.3 KiB of truesize, and the
# kernel doubles the SO_RCVBUF value it is given; 1 KiB of the value per event has margin.
BYTES_PER_EVENT = 1024
# nftrace's own mark and observation chains give a forwarded packet 8 to 12 events; a
# ruleset's jumps and matching rules add theirs.
EVENTS_PER_PACKET = 16
BACKLOG_SECONDS = 10
MIN_RCVBUF = 16 << 20
# The kernel keeps the doubled size in an int, so it cuts what it is given to INT_MAX / 2:
# 1 GiB is as big as one socket's buffer gets.
MAX_RCVBUF = 1 << 30

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]?)i?B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """`67108864`, `64M`, `1G`, `512KiB` -> bytes."""
    match = _SIZE_RE.match(text)
    if not match:
        raise InputError(f"{ENV_VAR}: '{text}' is not a size (bytes, or a number with K, M or G)")
    size = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if not 4096 <= size <= MAX_RCVBUF:
        raise InputError(f"{ENV_VAR}: {text} is out of range (4K to 1G, the kernel's limit)")
    return size


def receive_buffer_size(max_rate: int, environ: Optional[Mapping[str, str]] = None) -> int:
    """The receive buffer for a run limited to `max_rate` traced packets a second (0: no limit)."""
    environ = os.environ if environ is None else environ
    configured = environ.get(ENV_VAR)
    if configured:
        return parse_size(configured)
    if max_rate <= 0:
        return MAX_RCVBUF
    needed = max_rate * EVENTS_PER_PACKET * BYTES_PER_EVENT * BACKLOG_SECONDS
    return max(MIN_RCVBUF, min(MAX_RCVBUF, needed))


def describe_size(size: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    if size >= 1 << 20:
        return f"{size / (1 << 20):.1f} MiB"
    return f"{size} bytes"


def loss_warning(lost: int, size: int, max_rate: int) -> str:
    """What to tell the user when the buffer overflowed: what was lost and what to change."""
    rate = "no rate limit (--max-rate 0)" if max_rate <= 0 else f"--max-rate {max_rate}"
    advice = "Lower --max-rate" if size >= MAX_RCVBUF else f"Lower --max-rate or raise {ENV_VAR} (up to 1G)"
    return (f"{lost} trace events were lost: the kernel dropped them when the {describe_size(size)} receive buffer "
            f"was full ({rate}); the packets they belonged to are marked incomplete. {advice}.")
