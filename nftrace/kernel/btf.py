"""Byte offsets of kernel struct members and values of kernel enums, read from the kernel's BTF.

An eBPF program reads kernel structs with bpf_probe_read_kernel, so it needs each member's byte
offset on the running kernel: layouts change between versions and configurations, and the
kernel describes its own in BTF (/sys/kernel/btf/vmlinux; format in the kernel's
include/uapi/linux/btf.h and Documentation/bpf/btf.rst). The same goes for enum values (drop
reasons are renumbered as reasons are added).

nftrace reads BTF at the start of every run, and vmlinux holds some 130,000 types, so loading
does the least it can: one pass records where each type starts (type ids are positions in the
type section, and every kind's trailing data must be skipped to find the next) and, for structs,
unions and enums only, the offset of their name; no string is read until a name is asked for,
found in the string section, and its offset gives the types. Parsing (`Btf(data)`) is pure;
`Btf.load` is the only I/O.
"""

from __future__ import annotations

import array
import struct
import sys
from dataclasses import dataclass
from typing import Iterator

from ..errors import EnvironmentProblem

BTF_PATH = "/sys/kernel/btf/vmlinux"

_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type_off, type_len, str_off, str_len

# linux/btf.h BTF_KIND_*
_INT, _PTR, _ARRAY, _STRUCT, _UNION, _ENUM, _FWD, _TYPEDEF, _VOLATILE, _CONST, _RESTRICT = range(1, 12)
_FUNC, _FUNC_PROTO, _VAR, _DATASEC, _FLOAT, _DECL_TAG, _TYPE_TAG, _ENUM64 = range(12, 20)
# What a member's type may be wrapped in without changing its layout.
_TRANSPARENT = frozenset((_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG))
# The kinds looked up by name; only their names are indexed.
_NAMED_KINDS = (_STRUCT, _UNION, _ENUM, _ENUM64)

# Words (u32) after each kind's 3-word struct btf_type: a fixed part and a part per vlen item.
# Indexed by kind; a kind beyond this table cannot be skipped, so it ends the parse.
_FIXED_WORDS = (0, 1, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0)
_WORDS_PER_ITEM = (0, 0, 0, 0, 3, 3, 2, 0, 0, 0, 0, 0, 0, 2, 0, 3, 0, 0, 0, 3)

# eBPF is 64-bit, and so are the kernels nftrace's programs run on.
_POINTER_SIZE = 8


class BtfError(EnvironmentProblem):
    """The kernel's BTF is missing or unreadable, or lacks a struct, member or enum asked for."""


@dataclass(frozen=True)
class Field:
    """Where to read a member: `size` bytes at `offset` from the start of the outermost struct.

    A bitfield is the `bits` bits from bit `bit` (0 = least significant) of those bytes, read as
    a little-endian number; `size` is then the fewest bytes (1, 2, 4 or 8) that hold it.
    """

    offset: int
    size: int
    bit: int = 0
    bits: int = 0


def _signed(value: int, width: int) -> int:
    return value - (1 << width) if value >> (width - 1) else value


class Btf:
    """The types of one BTF blob, indexed by id (1 onwards; 0 is void)."""

    def __init__(self, data: bytes):
        if len(data) < _HEADER.size:
            raise BtfError("BTF is truncated: no header")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise BtfError(f"not little-endian BTF: magic {magic:#06x}, expected {_MAGIC:#06x}")
        if version != 1:
            raise BtfError(f"BTF version {version} is not supported (only 1)")
        type_start, str_start = hdr_len + type_off, hdr_len + str_off
        if type_start + type_len > len(data) or str_start + str_len > len(data) or type_len % 4:
            raise BtfError("BTF is truncated: its sections run past the end")
        # Straight from the file's bytes: a slice first would be one more 5 MB copy, and freed
        # big blocks raise glibc's mmap threshold, so the next one stays in the heap after use.
        words = array.array("I")
        words.frombytes(memoryview(data)[type_start:type_start + type_len])
        if sys.byteorder != "little":
            words.byteswap()
        self._words = words
        self._strings = data[str_start:str_start + str_len]
        self._starts, self._name_offsets, self._named_ids = self._index(words)

    @classmethod
    def load(cls, path: str = BTF_PATH) -> Btf:
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError as err:
            raise BtfError(f"cannot read the kernel's BTF {path}: {err.strerror}") from None
        return cls(data)

    @staticmethod
    def _index(words: array.array) -> tuple[array.array, array.array, array.array]:
        """Where each type starts (a word index), for ids 1 onwards, and the ids of the structs,
        unions and enums with their name offsets: the one pass over all types, kept to a few
        operations per type because it runs on every nftrace start; in arrays, not lists and
        dictionaries of 140,000 int objects, which stayed in nftrace's memory after (5 MiB)."""
        starts, name_offsets, named_ids = array.array("I"), array.array("I"), array.array("I")
        append, fixed, per_item, named_kinds = starts.append, _FIXED_WORDS, _WORDS_PER_ITEM, _NAMED_KINDS
        at, end = 0, len(words)
        try:
            while at < end:
                append(at)
                info = words[at + 1]
                kind = info >> 24 & 0x1F
                if kind in named_kinds:
                    name_offsets.append(words[at])
                    named_ids.append(len(starts))
                at += 3 + fixed[kind] + per_item[kind] * (info & 0xFFFF)
        except IndexError:
            if at + 1 >= end:
                raise BtfError(f"BTF type {len(starts)} is cut short") from None
            raise BtfError(f"BTF type {len(starts)} has kind {kind}, which nftrace cannot read") from None
        if at != end:
            raise BtfError(f"BTF type {len(starts)} runs past the type section")
        return starts, name_offsets, named_ids

    def _name(self, name_off: int) -> str:
        return self._strings[name_off:self._strings.index(b"\0", name_off)].decode()

    def _type(self, type_id: int) -> tuple[int, int, int, int, int]:
        """(word index, kind, kind_flag, vlen, size or type) of a type."""
        if not 0 < type_id <= len(self._starts):
            raise BtfError(f"BTF refers to type {type_id}, which it does not have")
        at = self._starts[type_id - 1]
        info = self._words[at + 1]
        return at, info >> 24 & 0x1F, info >> 31, info & 0xFFFF, self._words[at + 2]

    def _named(self, name: str, kinds: tuple[int, ...]) -> list[int]:
        """Ids, in order, of the types of `kinds` called `name`. The kernel's BTF holds each
        string once (pahole and libbpf deduplicate them), so the name's first place in the
        string section is the one its types use, and the search stops there."""
        at = self._strings.find(b"\0" + name.encode() + b"\0")
        if at < 0:
            return []
        found, index = [], -1
        while True:
            try:
                index = self._name_offsets.index(at + 1, index + 1)
            except ValueError:
                break
            if self._type(self._named_ids[index])[1] in kinds:
                found.append(self._named_ids[index])
        return found

    def _defined(self, name: str, kinds: tuple[int, ...]) -> int | None:
        """The first type of `kinds` called `name` that has members or values: the definition,
        not an empty declaration of the same name."""
        return next((type_id for type_id in self._named(name, kinds) if self._type(type_id)[3] > 0), None)

    def _resolve(self, type_id: int) -> int:
        """The type under typedefs, const, volatile, restrict and type tags."""
        while True:
            _at, kind, _flag, _vlen, target = self._type(type_id)
            if kind not in _TRANSPARENT:
                return type_id
            type_id = target

    def _size(self, type_id: int) -> int:
        type_id = self._resolve(type_id)
        at, kind, _flag, _vlen, size = self._type(type_id)
        if kind in (_INT, _STRUCT, _UNION, _ENUM, _ENUM64, _FLOAT):
            return size
        if kind == _PTR:
            return _POINTER_SIZE
        if kind == _ARRAY:
            return self._words[at + 5] * self._size(self._words[at + 3])
        raise BtfError(f"BTF type {type_id} (kind {kind}) has no size")

    def _members(self, type_id: int) -> Iterator[tuple[str, int, int, int]]:
        """(name, type, bit offset, bitfield width or 0) of a struct's or union's members."""
        at, _kind, kind_flag, vlen, _size = self._type(type_id)
        for item in range(at + 3, at + 3 + 3 * vlen, 3):
            name_off, member_type, offset = self._words[item:item + 3]
            if kind_flag:
                yield self._name(name_off), member_type, offset & 0xFFFFFF, offset >> 24
            else:
                yield self._name(name_off), member_type, offset, 0

    def _member(self, type_id: int, name: str) -> tuple[int, int, int] | None:
        """(type, bit offset, bitfield width) of a member by name, looking inside anonymous
        structs and unions as C does; None when there is none."""
        for member_name, member_type, offset, width in self._members(type_id):
            if member_name == name:
                return member_type, offset, width
            if not member_name and self._type(self._resolve(member_type))[1] in (_STRUCT, _UNION):
                inner = self._member(self._resolve(member_type), name)
                if inner is not None:
                    return inner[0], offset + inner[1], inner[2]
        return None

    def _int_bitfield(self, type_id: int) -> tuple[int, int]:
        """(bit offset, width) that an INT type's own encoding adds: how BTF without kind_flag
        says a member is a bitfield. (0, 0) for a whole integer or another kind."""
        at, kind, _flag, _vlen, size = self._type(self._resolve(type_id))
        if kind != _INT:
            return 0, 0
        encoding = self._words[at + 3]
        offset, width = encoding >> 16 & 0xFF, encoding & 0xFF
        if offset == 0 and width == 8 * size:
            return 0, 0
        return offset, width

    def field(self, struct: str, path: str) -> Field:
        """Where the member at dotted `path` (`"__sk_common.skc_net.net"`) of struct `struct`
        lies. Pointers are not followed: the eBPF program reads them and goes on from there."""
        type_id = self._defined(struct, (_STRUCT,))
        if type_id is None:
            raise BtfError(f"the kernel's BTF has no struct {struct}")
        bit_offset, width, walked = 0, 0, []
        for name in path.split("."):
            if not name:
                raise BtfError(f"'{path}' is not a member path (names joined by dots)")
            container = self._resolve(type_id)
            kind = self._type(container)[1]
            if kind not in (_STRUCT, _UNION):
                what = "is a pointer" if kind == _PTR else "is not a struct or union"
                raise BtfError(f"struct {struct} member '{'.'.join(walked)}' {what}: cannot go on to '{name}'")
            walked.append(name)
            found = self._member(container, name)
            if found is None:
                raise BtfError(f"struct {struct} has no member '{'.'.join(walked)}'")
            type_id, offset, width = found
            bit_offset += offset
        if not width:
            extra, width = self._int_bitfield(type_id)
            bit_offset += extra
        if width:
            bit = bit_offset % 8
            size = next((n for n in (1, 2, 4, 8) if bit + width <= 8 * n), None)
            if size is None:
                raise BtfError(f"struct {struct} member '{path}' spans more than 8 bytes")
            return Field(bit_offset // 8, size, bit, width)
        if bit_offset % 8:
            raise BtfError(f"struct {struct} member '{path}' starts at bit {bit_offset}, not on a byte")
        return Field(bit_offset // 8, self._size(type_id))

    def enum_values(self, name: str) -> dict[str, int]:
        """The values of enum `name`, by enumerator name, signed or not as BTF says."""
        type_id = self._defined(name, (_ENUM, _ENUM64))
        if type_id is None:
            raise BtfError(f"the kernel's BTF has no enum {name}")
        at, kind, signed, vlen, _size = self._type(type_id)
        values = {}
        if kind == _ENUM:
            for item in range(at + 3, at + 3 + 2 * vlen, 2):
                value = self._words[item + 1]
                values[self._name(self._words[item])] = _signed(value, 32) if signed else value
        else:
            for item in range(at + 3, at + 3 + 3 * vlen, 3):
                value = self._words[item + 1] | self._words[item + 2] << 32
                values[self._name(self._words[item])] = _signed(value, 64) if signed else value
        return values
