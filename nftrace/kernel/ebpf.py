"""eBPF programs with maps: socket filters that loop and remember what earlier datagrams held
(drops/eventstash.py), and a program at a kernel tracepoint (drops/dropwatch.py).

Classic BPF (sockfilter.py) has no loops and forgets everything between datagrams. An eBPF
program may loop (bounded: the verifier must see that the loop ends) and keeps state in maps,
which nftrace also reads and writes from here, or hands records over through a ring buffer
read in place. The kernel checks every program before it runs (the verifier); when it
refuses one, its log says why, and the last line of that log is what the user sees.

Programs are written with registers and labels (`Program.jump_if_imm("==", R0, 0, "out")`)
and assembled into the kernel's `struct bpf_insn` array here; assembling is pure, and needs
no compiler on the machine. The kernel is reached only through the bpf() syscall (maps,
`load`, `attach_raw_tracepoint`), `attach` and the ring buffer's mapped pages.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import re
import socket
import struct
from dataclasses import dataclass
from typing import Optional

from ..errors import KernelError

R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)  # R10: the read-only frame pointer

# linux/bpf.h enum bpf_func_id
MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, KTIME_GET_NS = 1, 2, 3, 5
SKB_LOAD_BYTES, MAP_PUSH_ELEM, PROBE_READ_KERNEL, RINGBUF_OUTPUT = 26, 87, 113, 130
# linux/bpf.h enum bpf_map_type
MAP_HASH, MAP_ARRAY, MAP_LRU_HASH, MAP_QUEUE, MAP_RINGBUF = 1, 2, 9, 22, 27
# linux/bpf.h enum bpf_prog_type
PROG_TYPE_SOCKET_FILTER, PROG_TYPE_RAW_TRACEPOINT = 1, 17

SO_ATTACH_BPF = 50  # asm-generic/socket.h; Python's socket module does not name it

# linux/bpf_common.h and linux/bpf.h: instruction class | size or operation | mode or source
_LD, _LDX, _ST, _STX, _ALU, _JMP, _ALU64 = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x07
_SIZES = {1: 0x10, 2: 0x08, 4: 0x00, 8: 0x18}
_IMM, _MEM, _ATOMIC = 0x00, 0x60, 0xC0
_ATOMIC_ADD = 0x00  # BPF_ADD, in an atomic instruction's imm
_K, _X = 0x00, 0x08
_ADD, _SUB, _MUL, _OR, _AND, _LSH, _RSH, _MOV = 0x00, 0x10, 0x20, 0x40, 0x50, 0x60, 0x70, 0xB0
_JA, _CALL, _EXIT = 0x00, 0x80, 0x90
_JUMP_OPS = {"==": 0x10, ">": 0x20, ">=": 0x30, "&": 0x40, "!=": 0x50, "s>": 0x60, "s>=": 0x70,
             "<": 0xA0, "<=": 0xB0, "s<": 0xC0, "s<=": 0xD0}
_PSEUDO_MAP_FD = 1
_INSTRUCTION = struct.Struct("<BBhi")


@dataclass(frozen=True)
class _Slot:
    """One 8-byte instruction slot; `target`, a label, replaces `off` when assembled."""

    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0
    target: Optional[str] = None


class Program:
    """An eBPF program under construction: instruction slots and the labels between them.
    Methods named `..._imm` take an immediate, the others a register; ALU operations are
    64-bit unless named `...32`."""

    def __init__(self) -> None:
        self._slots: list[_Slot] = []
        self._labels: dict[str, int] = {}

    def label(self, name: str) -> "Program":
        if name in self._labels:
            raise ValueError(f"label {name!r} defined twice")
        self._labels[name] = len(self._slots)
        return self

    def _add(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0,
             target: Optional[str] = None) -> "Program":
        self._slots.append(_Slot(code, _register(dst), _register(src), _s16(off), imm, target))
        return self

    def _alu(self, op: int, dst: int, src: int) -> "Program":
        return self._add(_ALU64 | op | _X, dst, src)

    def _alu_imm(self, op: int, dst: int, imm: int) -> "Program":
        return self._add(_ALU64 | op | _K, dst, imm=_s32(imm))

    def mov(self, dst: int, src: int) -> "Program":
        return self._alu(_MOV, dst, src)

    def mov_imm(self, dst: int, imm: int) -> "Program":
        """dst = imm, sign-extended to 64 bits."""
        return self._alu_imm(_MOV, dst, imm)

    def mov32(self, dst: int, src: int) -> "Program":
        """dst = the low 32 bits of src, zero-extended."""
        return self._add(_ALU | _MOV | _X, dst, src)

    def mov32_imm(self, dst: int, imm: int) -> "Program":
        """dst = imm as an unsigned 32-bit value, zero-extended (up to 2**32 - 1)."""
        return self._add(_ALU | _MOV | _K, dst, imm=_s32(imm, unsigned=True))

    def add(self, dst: int, src: int) -> "Program":
        return self._alu(_ADD, dst, src)

    def add_imm(self, dst: int, imm: int) -> "Program":
        return self._alu_imm(_ADD, dst, imm)

    def sub(self, dst: int, src: int) -> "Program":
        return self._alu(_SUB, dst, src)

    def sub_imm(self, dst: int, imm: int) -> "Program":
        return self._alu_imm(_SUB, dst, imm)

    def and_(self, dst: int, src: int) -> "Program":
        return self._alu(_AND, dst, src)

    def and_imm(self, dst: int, imm: int) -> "Program":
        return self._alu_imm(_AND, dst, imm)

    def or_(self, dst: int, src: int) -> "Program":
        return self._alu(_OR, dst, src)

    def or_imm(self, dst: int, imm: int) -> "Program":
        return self._alu_imm(_OR, dst, imm)

    def lsh_imm(self, dst: int, imm: int) -> "Program":
        return self._alu_imm(_LSH, dst, imm)

    def rsh_imm(self, dst: int, imm: int) -> "Program":
        """Logical (unsigned) shift right."""
        return self._alu_imm(_RSH, dst, imm)

    def mul_imm(self, dst: int, imm: int) -> "Program":
        return self._alu_imm(_MUL, dst, imm)

    def load(self, size: int, dst: int, src: int, offset: int) -> "Program":
        """dst = the `size` bytes at src + offset (host byte order), zero-extended."""
        return self._add(_LDX | _MEM | _size(size), dst, src, offset)

    def store(self, size: int, dst: int, offset: int, src: int) -> "Program":
        """The `size` low bytes of register src go to dst + offset."""
        return self._add(_STX | _MEM | _size(size), dst, src, offset)

    def store_imm(self, size: int, dst: int, offset: int, imm: int) -> "Program":
        return self._add(_ST | _MEM | _size(size), dst, off=offset, imm=_s32(imm))

    def load_map(self, dst: int, map_fd: int) -> "Program":
        """dst = the map behind `map_fd`, which the kernel swaps for the map when it loads the
        program: the one instruction that takes two slots (the second holds imm's high half)."""
        self._add(_LD | _IMM | _SIZES[8], dst, _PSEUDO_MAP_FD, imm=_s32(map_fd))
        return self._add(0)

    def load_imm64(self, dst: int, value: int) -> "Program":
        """dst = a 64-bit constant (the two-slot load, without a map)."""
        value &= 0xFFFFFFFFFFFFFFFF
        self._add(_LD | _IMM | _SIZES[8], dst, imm=_s32(value & 0xFFFFFFFF, unsigned=True))
        return self._add(0, imm=_s32(value >> 32, unsigned=True))

    def atomic_add(self, size: int, dst: int, offset: int, src: int) -> "Program":
        """*(dst + offset) += src, atomically (4 or 8 bytes): counters that CPUs share."""
        if size not in (4, 8):
            raise ValueError("atomic adds are of 4 or 8 bytes")
        return self._add(_STX | _ATOMIC | _size(size), dst, src, offset, imm=_ATOMIC_ADD)

    def call(self, helper: int) -> "Program":
        """Call a kernel helper: arguments in R1-R5, result in R0; R1-R5 are garbage after."""
        return self._add(_JMP | _CALL, imm=helper)

    def jump(self, target: str) -> "Program":
        return self._add(_JMP | _JA, target=target)

    def jump_if(self, op: str, dst: int, src: int, target: str) -> "Program":
        """Jump if `dst op src` (registers, 64 bits, unsigned unless op starts with "s";
        "&": any bit in common)."""
        return self._add(_JMP | _jump_op(op) | _X, dst, src, target=target)

    def jump_if_imm(self, op: str, dst: int, imm: int, target: str) -> "Program":
        """Jump if `dst op imm`, imm sign-extended to 64 bits."""
        return self._add(_JMP | _jump_op(op) | _K, dst, imm=_s32(imm), target=target)

    def exit(self) -> "Program":
        """Return R0: for a socket filter, how many bytes of the datagram to keep (0 drops it)."""
        return self._add(_JMP | _EXIT)

    def assemble(self) -> bytes:
        """The `struct bpf_insn` array; jumps reach 32767 slots forward or 32768 back."""
        out = bytearray()
        for index, slot in enumerate(self._slots):
            off = slot.off if slot.target is None else self._offset(index, slot.target)
            out += _INSTRUCTION.pack(slot.code, slot.src << 4 | slot.dst, off, slot.imm)
        return bytes(out)

    def __len__(self) -> int:
        return len(self._slots)

    def _offset(self, index: int, target: str) -> int:
        if target not in self._labels:
            raise ValueError(f"undefined label {target!r}")
        offset = self._labels[target] - index - 1
        if not -(1 << 15) <= offset < 1 << 15:
            raise ValueError(f"label {target!r} is out of a jump's reach ({offset})")
        return offset


def _register(number: int) -> int:
    if not R0 <= number <= R10:
        raise ValueError(f"register r{number} does not exist")
    return number


def _size(size: int) -> int:
    if size not in _SIZES:
        raise ValueError(f"a load or store moves 1, 2, 4 or 8 bytes, not {size}")
    return _SIZES[size]


def _s16(value: int) -> int:
    if not -(1 << 15) <= value < 1 << 15:
        raise ValueError(f"offset {value} does not fit in 16 bits")
    return value


def _s32(value: int, unsigned: bool = False) -> int:
    """The signed 32-bit field for `value`; `unsigned` also takes 2**31..2**32-1."""
    if not -(1 << 31) <= value < (1 << (32 if unsigned else 31)):
        raise ValueError(f"immediate {value} does not fit in 32 bits")
    return value - (1 << 32) if value >= 1 << 31 else value


def _jump_op(op: str) -> int:
    if op not in _JUMP_OPS:
        raise ValueError(f"unknown comparison {op!r}")
    return _JUMP_OPS[op]


# The bpf() syscall: linux/bpf.h enum bpf_cmd, and the parts of union bpf_attr used here.
_MAP_CREATE, _MAP_LOOKUP, _MAP_UPDATE, _MAP_DELETE, _MAP_NEXT_KEY, _PROG_LOAD = 0, 1, 2, 3, 4, 5
_MAP_LOOKUP_AND_DELETE = 21
_RAW_TRACEPOINT_OPEN = 17
_SYSCALL_NUMBERS = {"x86_64": 321, "aarch64": 280}
_LOG_SIZE = 1 << 20
_NAME = b"nftrace"  # what `bpftool map` and `bpftool prog` show


class _MapCreate(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("inner_map_fd", ctypes.c_uint32),
                ("numa_node", ctypes.c_uint32), ("map_name", ctypes.c_char * 16)]


class _Element(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("key", ctypes.c_uint64), ("value", ctypes.c_uint64),
                ("flags", ctypes.c_uint64)]


class _ProgLoad(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
                ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
                ("prog_name", ctypes.c_char * 16)]


class _RawTracepoint(ctypes.Structure):
    _fields_ = [("name", ctypes.c_uint64), ("prog_fd", ctypes.c_uint32)]


class _Attr(ctypes.Union):
    """union bpf_attr, zero-padded: the kernel takes a shorter one and checks a longer one's tail is 0."""

    _fields_ = [("create", _MapCreate), ("element", _Element), ("prog", _ProgLoad), ("raw_tracepoint", _RawTracepoint),
                ("padding", ctypes.c_uint8 * 144)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_ulong]


def _bpf(command: int, attr: _Attr) -> int:
    """bpf(command, attr): the result, or OSError with the kernel's errno."""
    machine = os.uname().machine
    if machine not in _SYSCALL_NUMBERS:
        raise KernelError(f"nftrace does not know the bpf() syscall's number on {machine}")
    result = _libc.syscall(_SYSCALL_NUMBERS[machine], command, ctypes.byref(attr), ctypes.sizeof(attr))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def _address(buffer: Optional[ctypes.Array]) -> int:
    return 0 if buffer is None else ctypes.addressof(buffer)


class Map:
    """A BPF map (an fd). Keys and values are bytes of exactly key_size / value_size (per-CPU
    maps, whose values are longer, are not supported); a queue map's key size is 0."""

    def __init__(self, map_type: int, key_size: int, value_size: int, max_entries: int, what: str) -> None:
        self.key_size, self.value_size, self.max_entries, self.what = key_size, value_size, max_entries, what
        attr = _Attr(create=_MapCreate(map_type=map_type, key_size=key_size, value_size=value_size,
                                       max_entries=max_entries, map_name=_NAME))
        try:
            self.fd = _bpf(_MAP_CREATE, attr)
        except OSError as err:
            raise KernelError(f"cannot create {what}: {err.strerror}", err.errno) from None

    def _bytes(self, data: bytes, size: int, name: str) -> Optional[ctypes.Array]:
        if len(data) != size:
            raise ValueError(f"{self.what}: a {name} is {size} bytes, not {len(data)}")
        return ctypes.create_string_buffer(data, size) if size else None

    def _element(self, command: int, action: str, key: Optional[ctypes.Array],
                 value: Optional[ctypes.Array] = None, flags: int = 0) -> bool:
        """One command on one element; False when the kernel answers that it is not there."""
        attr = _Attr(element=_Element(map_fd=self.fd, key=_address(key), value=_address(value), flags=flags))
        try:
            _bpf(command, attr)
        except OSError as err:
            if err.errno == errno.ENOENT:
                return False
            raise KernelError(f"cannot {action} {self.what}: {err.strerror}", err.errno) from None
        return True

    def lookup(self, key: bytes) -> Optional[bytes]:
        """The value under `key` (a queue map's b"": its oldest value, left there); None if absent."""
        value = ctypes.create_string_buffer(self.value_size)
        found = self._element(_MAP_LOOKUP, "read", self._bytes(key, self.key_size, "key"), value)
        return value.raw if found else None

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        """Set `key` to `value` (a queue map's b"": push); flags BPF_ANY (0), NOEXIST (1), EXIST (2)."""
        self._element(_MAP_UPDATE, "update", self._bytes(key, self.key_size, "key"),
                      self._bytes(value, self.value_size, "value"), flags)

    def delete(self, key: bytes) -> bool:
        """False when `key` was not there."""
        return self._element(_MAP_DELETE, "delete from", self._bytes(key, self.key_size, "key"))

    def lookup_and_delete(self, key: bytes) -> Optional[bytes]:
        """Take `key`'s value out (hash maps need kernel 5.14); None if absent."""
        value = ctypes.create_string_buffer(self.value_size)
        found = self._element(_MAP_LOOKUP_AND_DELETE, "take from", self._bytes(key, self.key_size, "key"), value)
        return value.raw if found else None

    def pop(self) -> Optional[bytes]:
        """A queue map's oldest value, taken out; None when the queue is empty."""
        return self.lookup_and_delete(b"")

    def keys(self) -> list[bytes]:
        """The keys, in the kernel's order. A key deleted meanwhile makes a hash map's walk start
        over, so keys seen twice count once and the walk stops after max_entries steps."""
        seen: dict[bytes, None] = {}
        current: Optional[ctypes.Array] = None
        for _ in range(self.max_entries):
            following = ctypes.create_string_buffer(self.key_size)
            if not self._element(_MAP_NEXT_KEY, "walk", current, following):
                break
            seen[following.raw] = None
            current = following
        return list(seen)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Map":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def _prog_load(instructions: bytes, log: Optional[ctypes.Array], prog_type: int) -> int:
    code = ctypes.create_string_buffer(instructions, len(instructions))
    license_ = ctypes.create_string_buffer(b"GPL")  # helpers such as ktime_get_ns are GPL-only
    logging = {} if log is None else {"log_level": 1, "log_size": len(log), "log_buf": _address(log)}
    prog = _ProgLoad(prog_type=prog_type, insn_cnt=len(instructions) // _INSTRUCTION.size,
                     insns=_address(code), license=_address(license_), prog_name=_NAME, **logging)
    return _bpf(_PROG_LOAD, _Attr(prog=prog))


# Verifier log lines that are not its verdict: an instruction it walked ("12: (bf) r0 = r2"),
# the register states it compared, the statistics it prints last.
_NOT_A_VERDICT = re.compile(r"\d+: |processed |verification time|stack depth|cur state|old state")


def _verifier_reason(log: str) -> str:
    """The verifier's last word on a program."""
    verdicts = [line.strip() for line in log.splitlines() if line.strip() and not _NOT_A_VERDICT.match(line.strip())]
    return verdicts[-1] if verdicts else ""


def load(program: Program, what: str, prog_type: int = PROG_TYPE_SOCKET_FILTER) -> int:
    """Load `program` (a socket filter, or another type); its fd, which the caller closes.

    The verifier's log costs time and a buffer, so it is asked for only when a first load fails:
    the second, logged, load explains the first one's failure."""
    instructions = program.assemble()
    try:
        return _prog_load(instructions, None, prog_type)
    except OSError as err:
        failure = err
    log = ctypes.create_string_buffer(_LOG_SIZE)
    try:
        return _prog_load(instructions, log, prog_type)  # accepted this time: nothing to explain
    except OSError:
        pass
    reason = _verifier_reason(log.value.decode(errors="replace"))
    message = f"cannot load {what}: {failure.strerror}" + (f": {reason}" if reason else "")
    raise KernelError(message, failure.errno)


def attach(sock: socket.socket, prog_fd: int, what: str) -> None:
    """Let the kernel run the loaded program on every datagram for `sock` before queueing it;
    the socket holds the program, so its fd may be closed after."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, prog_fd)
    except OSError as err:
        raise KernelError(f"cannot attach {what}: {err.strerror}", err.errno) from None


def attach_raw_tracepoint(name: str, prog_fd: int, what: str) -> int:
    """Run a loaded raw-tracepoint program at the kernel's tracepoint `name` (no tracefs
    needed); the fd returned holds it there until closed."""
    tracepoint = ctypes.create_string_buffer(name.encode())
    try:
        return _bpf(_RAW_TRACEPOINT_OPEN, _Attr(raw_tracepoint=_RawTracepoint(name=_address(tracepoint),
                                                                               prog_fd=prog_fd)))
    except OSError as err:
        raise KernelError(f"cannot attach {what} to {name}: {err.strerror}", err.errno) from None


class Counters:
    """An array map of 64-bit counters that a program adds to (`add`, atomically: CPUs share
    them) and nftrace reads (`read`)."""

    def __init__(self, count: int, what: str) -> None:
        self.map = Map(MAP_ARRAY, 4, 8, count, what)

    def add(self, program: Program, index: int, amount: Optional[int], scratch: int) -> None:
        """Emit `counters[index] += amount` (a register; None: 1). It uses R0-R2, and the 4-byte
        stack slot at R10 + `scratch` for the key."""
        done = f"counted_{len(program)}"
        program.store_imm(4, R10, scratch, index).load_map(R1, self.map.fd).mov(R2, R10).add_imm(R2, scratch)
        program.call(MAP_LOOKUP_ELEM).jump_if_imm("==", R0, 0, done)
        if amount is None:
            program.mov_imm(R1, 1)
        else:
            program.mov(R1, amount)
        program.atomic_add(8, R0, 0, R1).label(done)

    def read(self, index: int) -> int:
        value = self.map.lookup(struct.pack("=I", index))
        return struct.unpack("=Q", value)[0] if value else 0

    def close(self) -> None:
        self.map.close()


class RingBuffer:
    """A ring buffer map that a program writes records to (bpf_ringbuf_output) and nftrace
    reads in place, through the kernel's pages mapped into this process: no syscall per
    record, and its fd wakes a select() when records come.

    The kernel maps the consumer position (one page, writable), then the producer position
    (one page) and the data twice in a row, so that a record that wraps reads as one piece.
    A record is an 8-byte header (length, with busy and discarded bits; page offset) and its
    bytes, rounded up to 8."""

    _BUSY, _DISCARDED = 1 << 31, 1 << 30
    _HEADER = struct.Struct("=II")

    def __init__(self, size: int, what: str) -> None:
        page = mmap.PAGESIZE
        if size < page or size & (size - 1):
            raise ValueError("a ring buffer's size is a power of 2, at least a page")
        self.map = Map(MAP_RINGBUF, 0, 0, size, what)
        self.fd, self.size = self.map.fd, size
        try:
            self._consumer = mmap.mmap(self.fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self._producer = mmap.mmap(self.fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except OSError as err:
            self.map.close()
            raise KernelError(f"cannot map {what}: {err.strerror}", err.errno) from None
        self._data = page

    def fileno(self) -> int:
        return self.fd

    def records(self, limit: Optional[int] = None) -> list[bytes]:
        """The records committed now (at most `limit`), taken out of the buffer; the rest stay
        for the next call."""
        records = []
        consumer = struct.unpack_from("=Q", self._consumer, 0)[0]
        producer = struct.unpack_from("=Q", self._producer, 0)[0]
        mask = self.size - 1
        while consumer < producer and (limit is None or len(records) < limit):
            at = self._data + (consumer & mask)
            length, _ = self._HEADER.unpack_from(self._producer, at)
            if length & self._BUSY:
                break  # still being written: the rest comes at the next read
            size = length & ~(self._BUSY | self._DISCARDED)
            if not length & self._DISCARDED:
                records.append(self._producer[at + 8:at + 8 + size])
            consumer += (size + 8 + 7) & ~7
        struct.pack_into("=Q", self._consumer, 0, consumer)
        return records

    def close(self) -> None:
        for mapped in (self._consumer, self._producer):
            mapped.close()
        self.map.close()


@functools.lru_cache(maxsize=None)
def available() -> Optional[str]:
    """None when this process can create maps and load socket filters; otherwise why not."""
    try:
        with Map(MAP_ARRAY, 4, 8, 1, "a probe map"):
            os.close(load(Program().mov_imm(R0, 0).exit(), "a probe program"))
    except KernelError as err:
        return f"bpf(): {os.strerror(err.errno)}" if err.errno else str(err)
    return None
