"""Classic BPF socket filters: the kernel discards, before queueing them, the datagrams a
reader has no use for.

A netlink broadcast runs each listener's socket filter (sk_filter) before the datagram takes
room in that listener's receive buffer. A datagram filtered out costs no buffer space and no
read, which is what lets a reader keep up with a flood whose events it mostly does not need
(drops/eventfilter.py says which ones `nftrace drops` needs).

Classic BPF has an ancillary load that finds a netlink attribute by type (SKF_AD_NLATTR), but
on this machine's kernel (6.18) it found nothing in trace events: it gave 0 for every
attribute, those at the first offset included (why was not established; the kernel's helper
gives up on non-linear buffers). So programs read attributes with plain loads, walking them
one by one: classic BPF has no loops, so the walk is unrolled (drops/eventfilter.py), with
scratch memory (M[0..15]) for what it found.

Programs are written with labels (`Program.jump(..., "keep")`) and assembled into the
kernel's `struct sock_filter` array here. Assembling is pure; `attach` is the one call that
touches a socket.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from dataclasses import dataclass
from typing import Optional, Union

from ..errors import KernelError

SO_ATTACH_FILTER = 26  # asm-generic/socket.h; Python's socket module does not name it

# linux/bpf_common.h and linux/filter.h
_LD, _LDX, _ST, _STX, _ALU, _JMP, _RET, _MISC = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
_W, _H, _B = 0x00, 0x08, 0x10
_IMM, _ABS, _IND, _MEM, _LEN = 0x00, 0x20, 0x40, 0x60, 0x80
_ADD, _SUB, _MUL, _AND = 0x00, 0x10, 0x20, 0x50
_JA, _JEQ, _JGE = 0x00, 0x10, 0x30
_K, _X = 0x00, 0x08
_TAX = 0x00
SCRATCH_WORDS = 16  # BPF_MEMWORDS
KEEP_ALL = 0xFFFFFFFF  # a filter's return value: how many bytes of the datagram to keep

_INSTRUCTION = struct.Struct("=HBBI")
Target = Union[str, None]  # a label, or None: the next instruction


@dataclass(frozen=True)
class _Instruction:
    code: int
    k: int = 0
    true: Target = None  # conditional jumps only
    false: Target = None


class Program:
    """A classic BPF program under construction: instructions and the labels between them."""

    def __init__(self) -> None:
        self._instructions: list[_Instruction] = []
        self._labels: dict[str, int] = {}

    def label(self, name: str) -> "Program":
        if name in self._labels:
            raise ValueError(f"label {name!r} defined twice")
        self._labels[name] = len(self._instructions)
        return self

    def _add(self, code: int, k: int = 0, true: Target = None, false: Target = None) -> "Program":
        self._instructions.append(_Instruction(code, k & 0xFFFFFFFF, true, false))
        return self

    def load_half(self, offset: int) -> "Program":
        """A = the 16 bits at `offset`, read big-endian."""
        return self._add(_LD | _H | _ABS, offset)

    def load_constant(self, value: int) -> "Program":
        return self._add(_LD | _IMM, value)

    def load_x_constant(self, value: int) -> "Program":
        return self._add(_LDX | _W | _IMM, value)

    def load_word_at_x(self, offset: int) -> "Program":
        """A = the 32 bits at X + `offset`, read big-endian."""
        return self._add(_LD | _W | _IND, offset)

    def load_byte_at_x(self, offset: int) -> "Program":
        """A = the byte at X + `offset`."""
        return self._add(_LD | _B | _IND, offset)

    def load_length(self) -> "Program":
        """A = the datagram's length."""
        return self._add(_LD | _W | _LEN)

    def load_scratch(self, slot: int) -> "Program":
        return self._add(_LD | _MEM, _slot(slot))

    def load_x_scratch(self, slot: int) -> "Program":
        return self._add(_LDX | _MEM, _slot(slot))

    def store(self, slot: int) -> "Program":
        """M[slot] = A."""
        return self._add(_ST, _slot(slot))

    def store_x(self, slot: int) -> "Program":
        """M[slot] = X."""
        return self._add(_STX, _slot(slot))

    def add(self, value: int) -> "Program":
        return self._add(_ALU | _ADD | _K, value)

    def add_x(self) -> "Program":
        return self._add(_ALU | _ADD | _X)

    def subtract(self, value: int) -> "Program":
        return self._add(_ALU | _SUB | _K, value)

    def multiply(self, value: int) -> "Program":
        return self._add(_ALU | _MUL | _K, value)

    def bitwise_and(self, value: int) -> "Program":
        return self._add(_ALU | _AND | _K, value)

    def a_to_x(self) -> "Program":
        return self._add(_MISC | _TAX)

    def jump(self, target: str) -> "Program":
        return self._add(_JMP | _JA, 0, target)

    def jump_if_equal(self, value: int, true: Target = None, false: Target = None) -> "Program":
        return self._add(_JMP | _JEQ | _K, value, true, false)

    def jump_if_at_least_x(self, true: Target = None, false: Target = None) -> "Program":
        """Jump to `true` if A >= X (unsigned), else to `false`."""
        return self._add(_JMP | _JGE | _X, 0, true, false)

    def accept(self, length: int = KEEP_ALL) -> "Program":
        return self._add(_RET | _K, length)

    def discard(self) -> "Program":
        return self._add(_RET | _K, 0)

    def assemble(self) -> bytes:
        """The `struct sock_filter` array; conditional jumps go forward at most 255 steps."""
        out = bytearray()
        for index, instruction in enumerate(self._instructions):
            if instruction.code == _JMP | _JA:  # the one jump whose offset is k, 32 bits wide
                out += _INSTRUCTION.pack(instruction.code, 0, 0, self._offset(index, instruction.true, 0xFFFFFFFF))
                continue
            true = self._offset(index, instruction.true)
            false = self._offset(index, instruction.false)
            out += _INSTRUCTION.pack(instruction.code, true, false, instruction.k)
        return bytes(out)

    def __len__(self) -> int:
        return len(self._instructions)

    def _offset(self, index: int, target: Target, reach: int = 255) -> int:
        if target is None:
            return 0
        if target not in self._labels:
            raise ValueError(f"undefined label {target!r}")
        offset = self._labels[target] - index - 1
        if not 0 <= offset <= reach:
            raise ValueError(f"label {target!r} is out of a jump's reach ({offset})")
        return offset


def _slot(slot: int) -> int:
    if not 0 <= slot < SCRATCH_WORDS:
        raise ValueError(f"scratch slot {slot} does not exist")
    return slot


def attach(sock: socket.socket, program: Program, what: Optional[str] = None) -> None:
    """Let the kernel run `program` on every datagram for `sock` before queueing it."""
    code = program.assemble()
    instructions = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }, native alignment.
    fprog = struct.pack("HP", len(program), ctypes.addressof(instructions))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError as err:
        raise KernelError(f"cannot attach {what or 'a socket filter'}: {err.strerror}") from None
