"""The trace events `nftrace drops` reads, and the socket filter that has the kernel discard
the others before they take room in nftrace's receive buffer.

`drops` answers which rule dropped what: of each packet it needs where the packet was (the
first event of every base chain it ran: headers, interfaces, conntrack, the hook), how it
ended (a rule's drop, reject, queue or stolen verdict; a drop policy) and nftrace's own events
(the mark rule: the packet is this run's; the observation chains: netfilter let it through).
Every other event says how a packet went on inside a chain: a rule that matched without a
verdict, a jump, a goto, a return, an accept after a base chain's first event, an accept
policy. On a busy box those are most of the events, and reading them is what made `drops`
lose events under a flood. The path builder needs none of them to place a verdict: it knows
the hook from the base chain's first event, and a chain met without its jump is one level
deeper (trace/jumpstack.py). So the kernel drops them (kernel/sockfilter.py), and the paths
`drops` reports show the base chains a packet ran and the step that decided it; `why`
reads every event of its flow.

Kept, in the order the filter tests it:
- every datagram that is not a trace event (ruleset changes);
- a base chain's first event (it carries the interfaces or the packet's headers);
- every event of nftrace's own tables (names start with `nftrace_`);
- a rule event with a verdict other than accept, continue, jump, goto and return (drop,
  queue, stolen: the packet ends there), or without a verdict;
- a policy event whose policy is not accept.
"""

from __future__ import annotations

import struct

from ..kernel.netlink import NFGENMSG_END
from ..kernel.sockfilter import Program
from ..kernel.tracetable import TRACE_TABLE_PREFIX
from ..trace.events import TRACE_ATTRIBUTES, TRACE_MESSAGE_TYPE, TRACE_TYPES, VERDICT_ATTRIBUTES, VERDICT_NAMES

TRACE_NUMBERS = {name: number for number, (name, _) in enumerate(TRACE_ATTRIBUTES)}
VERDICT_CODE = next(number for number, (name, _) in enumerate(VERDICT_ATTRIBUTES) if name == "NFTA_VERDICT_CODE")
_TYPE_NUMBERS = {name: number for number, name in TRACE_TYPES.items()}
_VERDICT_NUMBERS = {name: number for number, name in VERDICT_NAMES.items()}
# Verdicts after which the packet goes on: their rule events are not needed.
GOING_ON = ("accept", "continue", "jump", "goto", "return")
# Attributes that only a base chain's first event carries.
FIRST_EVENT_ATTRIBUTES = ("NFTA_TRACE_IIF", "NFTA_TRACE_OIF", "NFTA_TRACE_NETWORK_HEADER", "NFTA_TRACE_LL_HEADER")
# Attributes whose place the walk notes (scratch slot of each), to read once it is over.
_NOTED = {"NFTA_TRACE_TABLE": 0, "NFTA_TRACE_TYPE": 1, "NFTA_TRACE_VERDICT": 2, "NFTA_TRACE_POLICY": 3}
_CURSOR, _LOW = 4, 5  # scratch: the walk's offset, a length's low byte
# An event has at most 21 attributes (TRACE_ATTRIBUTES); a walk of more steps ends on the
# datagram's end.
WALK_STEPS = len(TRACE_ATTRIBUTES) + 2
# nlmsg_type is in host byte order; classic BPF reads big-endian.
_TRACE_TYPE_AS_READ = struct.unpack(">H", struct.pack("=H", TRACE_MESSAGE_TYPE))[0]
_PREFIX = TRACE_TABLE_PREFIX.encode()
_PREFIX_WORDS = struct.unpack(">II", _PREFIX[:8])


def drops_event_filter() -> Program:
    """The classic BPF program that keeps the datagrams `drops` reads (see the module)."""
    if len(_PREFIX) != 8:
        raise AssertionError("the filter compares nftrace's table prefix as two words")
    program = Program()
    program.load_half(4).jump_if_equal(_TRACE_TYPE_AS_READ, true="trace_event").jump("keep")
    program.label("trace_event").load_constant(0)
    for slot in _NOTED.values():
        program.store(slot)
    program.load_x_constant(NFGENMSG_END)
    for step in range(WALK_STEPS):
        _walk_step(program, step)
    program.label("walked")
    # nftrace's own tables: the name's first eight bytes (the attribute's value is at +4).
    _noted(program, "NFTA_TRACE_TABLE")
    program.load_word_at_x(4).jump_if_equal(_PREFIX_WORDS[0], false="not_own")
    program.load_word_at_x(8).jump_if_equal(_PREFIX_WORDS[1], true="keep")
    program.label("not_own")
    _noted(program, "NFTA_TRACE_TYPE")
    program.load_word_at_x(4)
    program.jump_if_equal(_TYPE_NUMBERS["policy"], true="policy")
    program.jump_if_equal(_TYPE_NUMBERS["return"], true="discard")
    # A rule event: the verdict code, the first attribute of the nest (nft_verdict_dump).
    _noted(program, "NFTA_TRACE_VERDICT")
    program.load_byte_at_x(4 + 2).jump_if_equal(VERDICT_CODE, false="keep").load_word_at_x(4 + 4)
    for verdict in GOING_ON:
        program.jump_if_equal(_VERDICT_NUMBERS[verdict], true="discard")
    program.jump("keep")
    program.label("policy")
    _noted(program, "NFTA_TRACE_POLICY")
    program.load_word_at_x(4).jump_if_equal(_VERDICT_NUMBERS["accept"], true="discard")
    program.label("keep").accept()
    program.label("discard").discard()
    return program


def _walk_step(program: Program, step: int) -> None:
    """One attribute, at offset X: keep the event if a base chain's first event carries it,
    note where it is if it is read later, and move X past it."""
    # Conditional jumps reach 255 instructions: far targets go through a jump of the step's own.
    noted, advance, keep, walked = f"noted_{step}", f"advance_{step}", f"keep_{step}", f"walked_{step}"
    program.load_length().subtract(4).jump_if_at_least_x(false=walked)  # no attribute header left
    program.load_byte_at_x(2)  # the type's low byte (the high one holds the nested/byte-order flags)
    for name in FIRST_EVENT_ATTRIBUTES:
        program.jump_if_equal(TRACE_NUMBERS[name], true=keep)
    for name, slot in _NOTED.items():
        program.jump_if_equal(TRACE_NUMBERS[name], true=f"{noted}_{slot}")
    program.jump(advance)
    for slot in _NOTED.values():
        program.label(f"{noted}_{slot}").store_x(slot).jump(advance)
    # X += the attribute's length (host byte order: low byte first), rounded up to 4.
    program.label(advance).store_x(_CURSOR).load_byte_at_x(0).store(_LOW)
    program.load_byte_at_x(1).multiply(256).a_to_x().load_scratch(_LOW).add_x()
    program.add(3).bitwise_and(0xFFFFFFFC).jump_if_equal(0, true=walked)
    program.load_x_scratch(_CURSOR).add_x().a_to_x().jump(f"step_{step + 1}")
    program.label(keep).jump("keep")
    program.label(walked).jump("walked")
    program.label(f"step_{step + 1}")


def _noted(program: Program, name: str) -> None:
    """X = where the walk found the attribute; an event without it is kept."""
    program.load_scratch(_NOTED[name]).jump_if_equal(0, true="keep").a_to_x()
