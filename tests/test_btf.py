"""BTF: member offsets and enum values, from a blob written here byte for byte as
include/uapi/linux/btf.h lays it out, and from the running kernel's /sys/kernel/btf/vmlinux."""

from __future__ import annotations

import os
import struct

import pytest

from conftest import unavailable
from nftrace.kernel.btf import BTF_PATH, Btf, BtfError, Field

# linux/btf.h BTF_KIND_*
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)


class Blob:
    """A BTF blob built type by type; each `add` returns the new type's id."""

    def __init__(self):
        self.strings = b"\0"
        self.offsets = {"": 0}
        self.types: list[bytes] = []

    def name(self, text: str) -> int:
        """Each string once, as pahole writes them."""
        if text not in self.offsets:
            self.offsets[text] = len(self.strings)
            self.strings += text.encode() + b"\0"
        return self.offsets[text]

    def add(self, kind: int, name: str = "", size_or_type: int = 0, *, vlen: int = 0, kind_flag: int = 0,
            extra: tuple[int, ...] = ()) -> int:
        info = kind_flag << 31 | kind << 24 | vlen
        self.types.append(struct.pack("<III", self.name(name), info, size_or_type)
                          + struct.pack(f"<{len(extra)}I", *extra))
        return len(self.types)

    def int_(self, name: str, size: int, bits: int, offset: int = 0) -> int:
        return self.add(INT, name, size, extra=(offset << 16 | bits,))

    def record(self, kind: int, name: str, size: int, members: list[tuple[str, int, int]], kind_flag: int = 0) -> int:
        extra = tuple(word for member, type_id, offset in members for word in (self.name(member), type_id, offset))
        return self.add(kind, name, size, vlen=len(members), kind_flag=kind_flag, extra=extra)

    def data(self) -> bytes:
        types = b"".join(self.types)
        header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(self.strings))
        return header + types + self.strings


def kernel_style_blob() -> Blob:
    """A packet struct with kind_flag bitfields, an anonymous union, a typedef, const and a
    pointer, after a forward declaration and an empty struct of the same name; an older-style
    struct whose bitfields are INT encodings; and enums, one of them declared empty first."""
    blob = Blob()
    u32 = blob.int_("unsigned int", 4, 32)
    blob.add(FWD, "pkt")
    blob.add(STRUCT, "pkt", 0)
    blob.add(ENUM, "colour", 4)
    u16 = blob.int_("unsigned short", 2, 16)
    u16_typedef = blob.add(TYPEDEF, "u16", u16)
    const_u16 = blob.add(CONST, "", u16_typedef)
    u8 = blob.int_("unsigned char", 1, 8)
    bytes4 = blob.add(ARRAY, extra=(u8, u32, 4))
    inner = blob.record(STRUCT, "inner", 8, [("a", u32, 0), ("b", u16_typedef, 32)])
    anon = blob.record(UNION, "", 8, [("word", u32, 0), ("in", inner, 0)])
    pkt_pointer = blob.add(PTR, "", len(blob.types) + 2)
    blob.record(STRUCT, "pkt", 32, [
        ("next", pkt_pointer, 0),
        ("flag", u32, 1 << 24 | 67),  # 1 bit at bit 67: byte 8, bit 3
        ("mode", u32, 3 << 24 | 70),  # 3 bits at bit 70: bits 6 to 8 of the two bytes at 8
        ("", anon, 128),
        ("len", const_u16, 192),
        ("data", bytes4, 208),
    ], kind_flag=1)
    two_bits = blob.int_("unsigned int", 4, 2)
    three_bits_at_4 = blob.int_("unsigned int", 4, 3, offset=4)
    blob.record(STRUCT, "old", 4, [("low", two_bits, 13), ("high", three_bits_at_4, 8), ("whole", u16, 16)])
    blob.add(ENUM, "colour", 4, vlen=3, kind_flag=1, extra=(blob.name("RED"), 0, blob.name("GREEN"), 1,
                                                            blob.name("DARK"), 0xFFFFFFFF))
    blob.add(ENUM, "flags", 4, vlen=1, extra=(blob.name("TOP"), 0x80000000))
    blob.add(ENUM64, "wide", 8, vlen=2, extra=(blob.name("HUGE"), 0, 1 << 8,
                                                blob.name("MINUS"), 0xFFFFFFFE, 0xFFFFFFFF))
    blob.add(ENUM64, "wide_signed", 8, vlen=1, kind_flag=1,
             extra=(blob.name("MINUS_TWO"), 0xFFFFFFFE, 0xFFFFFFFF))
    return blob


@pytest.fixture(scope="module")
def btf() -> Btf:
    return Btf(kernel_style_blob().data())


# Pure: the format.

def test_a_pointer_member_is_read_whole_at_its_offset(btf):
    assert btf.field("pkt", "next") == Field(offset=0, size=8)


def test_a_kind_flag_bitfield_is_its_byte_and_bit(btf):
    assert btf.field("pkt", "flag") == Field(offset=8, size=1, bit=3, bits=1)


def test_a_bitfield_across_a_byte_boundary_is_read_as_two_bytes(btf):
    assert btf.field("pkt", "mode") == Field(offset=8, size=2, bit=6, bits=3)


def test_a_member_of_an_anonymous_union_is_found_by_its_name(btf):
    assert btf.field("pkt", "word") == Field(offset=16, size=4)


def test_a_dotted_path_goes_into_nested_structs_and_adds_their_offsets(btf):
    assert btf.field("pkt", "in.b") == Field(offset=20, size=2)


def test_const_and_typedef_are_seen_through_for_the_size(btf):
    assert btf.field("pkt", "len") == Field(offset=24, size=2)


def test_an_array_member_is_its_whole_size(btf):
    assert btf.field("pkt", "data") == Field(offset=26, size=4)


def test_without_kind_flag_an_int_encoding_makes_a_bitfield(btf):
    assert btf.field("old", "low") == Field(offset=1, size=1, bit=5, bits=2)


def test_an_int_encodings_bit_offset_adds_to_the_members(btf):
    assert btf.field("old", "high") == Field(offset=1, size=1, bit=4, bits=3)


def test_without_kind_flag_a_whole_int_is_no_bitfield(btf):
    assert btf.field("old", "whole") == Field(offset=2, size=2)


def test_a_path_through_a_pointer_is_refused(btf):
    with pytest.raises(BtfError, match=r"^struct pkt member 'next' is a pointer: cannot go on to 'a'$"):
        btf.field("pkt", "next.a")


def test_a_path_into_a_scalar_is_refused(btf):
    with pytest.raises(BtfError, match="member 'len' is not a struct or union"):
        btf.field("pkt", "len.x")


def test_a_missing_member_is_named_in_one_line(btf):
    with pytest.raises(BtfError, match=r"^struct pkt has no member 'in\.foo'$"):
        btf.field("pkt", "in.foo")


def test_an_empty_path_component_is_refused(btf):
    with pytest.raises(BtfError, match="is not a member path"):
        btf.field("pkt", "in..b")


def test_a_struct_that_is_not_there_is_named(btf):
    with pytest.raises(BtfError, match=r"^the kernel's BTF has no struct nosuch$"):
        btf.field("nosuch", "x")


def test_the_first_struct_of_a_name_that_has_members_is_taken():
    blob = Blob()
    u32 = blob.int_("unsigned int", 4, 32)
    blob.add(STRUCT, "twice", 0)
    blob.record(STRUCT, "twice", 4, [("a", u32, 0)])
    blob.record(STRUCT, "twice", 8, [("a", u32, 32)])
    assert Btf(blob.data()).field("twice", "a") == Field(offset=0, size=4)


def test_a_union_is_not_taken_for_a_struct_of_that_name():
    blob = Blob()
    u32 = blob.int_("unsigned int", 4, 32)
    blob.record(UNION, "either", 4, [("word", u32, 0)])
    with pytest.raises(BtfError, match="no struct either"):
        Btf(blob.data()).field("either", "word")


def test_enum_values_follow_kind_flag_for_sign(btf):
    assert btf.enum_values("colour") == {"RED": 0, "GREEN": 1, "DARK": -1}
    assert btf.enum_values("flags") == {"TOP": 0x80000000}


def test_enum64_values_join_their_two_halves(btf):
    assert btf.enum_values("wide") == {"HUGE": 1 << 40, "MINUS": (1 << 64) - 2}
    assert btf.enum_values("wide_signed") == {"MINUS_TWO": -2}


def test_an_enum_that_is_not_there_is_named(btf):
    with pytest.raises(BtfError, match=r"^the kernel's BTF has no enum nosuch$"):
        btf.enum_values("nosuch")


def test_a_struct_name_is_not_an_enum(btf):
    with pytest.raises(BtfError, match="no enum pkt"):
        btf.enum_values("pkt")


# Each kind as btf.h lays out its trailing data: (kind, vlen, words after struct btf_type).
FILLERS = {
    "int": (INT, 0, (32,)), "ptr": (PTR, 0, ()), "array": (ARRAY, 0, (1, 1, 4)),
    "struct": (STRUCT, 1, (0, 1, 0)), "union": (UNION, 2, (0, 1, 0, 0, 1, 0)),
    "enum": (ENUM, 2, (0, 5, 0, 6)), "fwd": (FWD, 0, ()), "typedef": (TYPEDEF, 0, ()),
    "volatile": (VOLATILE, 0, ()), "const": (CONST, 0, ()), "restrict": (RESTRICT, 0, ()),
    "func": (FUNC, 0, ()), "func_proto": (FUNC_PROTO, 2, (0, 1, 0, 1)), "var": (VAR, 0, (1,)),
    "datasec": (DATASEC, 2, (1, 0, 4, 1, 4, 4)), "float": (FLOAT, 0, ()), "decl_tag": (DECL_TAG, 0, (0,)),
    "type_tag": (TYPE_TAG, 0, ()), "enum64": (ENUM64, 2, (0, 5, 0, 0, 6, 0)),
}


@pytest.mark.parametrize("kind, vlen, trailing", FILLERS.values(), ids=FILLERS.keys())
def test_each_kinds_trailing_data_is_skipped(kind, vlen, trailing):
    """The struct right after a type of `kind` is found only if the parse lands on its first
    word: a kind skipped one word too far or too short puts every later type out of step."""
    blob = Blob()
    u32 = blob.int_("unsigned int", 4, 32)
    blob.add(kind, "", 4 if kind in (INT, STRUCT, UNION, ENUM, DATASEC, FLOAT, ENUM64) else u32,
             vlen=vlen, extra=trailing)
    blob.record(STRUCT, "after", 4, [("a", u32, 0)])
    assert Btf(blob.data()).field("after", "a") == Field(offset=0, size=4)


def test_a_kind_it_cannot_skip_stops_the_parse():
    blob = Blob()
    blob.add(20, "future")
    with pytest.raises(BtfError, match="type 1 has kind 20"):
        Btf(blob.data())


def test_a_type_cut_short_is_refused():
    blob = Blob()
    blob.add(STRUCT, "s", 4, vlen=2, extra=(0, 0, 0))  # says two members, holds one
    with pytest.raises(BtfError, match="type 1 runs past the type section"):
        Btf(blob.data())


def test_bad_magic_is_refused():
    data = bytearray(kernel_style_blob().data())
    data[0:2] = struct.pack(">H", 0xEB9F)
    with pytest.raises(BtfError, match="magic 0x9feb"):
        Btf(bytes(data))


def test_sections_past_the_end_are_refused():
    with pytest.raises(BtfError, match="truncated"):
        Btf(kernel_style_blob().data()[:-1])


def test_load_reads_a_file(tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(kernel_style_blob().data())
    assert Btf.load(str(path)).field("pkt", "len") == Field(offset=24, size=2)


def test_load_of_a_missing_file_says_which(tmp_path):
    with pytest.raises(BtfError, match=r"cannot read the kernel's BTF .*/absent: No such file"):
        Btf.load(str(tmp_path / "absent"))


# The running kernel.

@pytest.fixture(scope="module")
def vmlinux() -> Btf:
    if not os.path.exists(BTF_PATH):
        unavailable(f"{BTF_PATH} is absent: the kernel was built without CONFIG_DEBUG_INFO_BTF")
    return Btf.load()


@pytest.mark.kernel
def test_sk_buff_nf_trace_is_a_one_bit_bitfield(vmlinux):
    nf_trace = vmlinux.field("sk_buff", "nf_trace")
    assert nf_trace.size == 1 and nf_trace.bits == 1 and 0 <= nf_trace.bit < 8
    assert 0 < nf_trace.offset < 256


@pytest.mark.kernel
def test_sk_buff_network_header_is_a_u16(vmlinux):
    network_header = vmlinux.field("sk_buff", "network_header")
    assert network_header.size == 2 and network_header.bits == 0 and network_header.offset % 2 == 0


@pytest.mark.kernel
@pytest.mark.parametrize("struct_name, path", [
    ("sk_buff", "head"), ("sk_buff", "dev"), ("sk_buff", "sk"), ("net_device", "nd_net.net"),
    ("sock", "__sk_common.skc_net.net"),
])
def test_pointers_are_eight_aligned_bytes(vmlinux, struct_name, path):
    pointer = vmlinux.field(struct_name, path)
    assert pointer.size == 8 and pointer.bits == 0 and pointer.offset % 8 == 0


@pytest.mark.kernel
def test_net_ns_inum_is_a_u32(vmlinux):
    inum = vmlinux.field("net", "ns.inum")
    assert inum.size == 4 and inum.offset % 4 == 0


@pytest.mark.kernel
def test_a_nested_path_adds_the_offset_of_the_struct_it_goes_through(vmlinux):
    inner = vmlinux.field("sock_common", "skc_net.net").offset
    assert vmlinux.field("sock", "__sk_common.skc_net.net").offset == vmlinux.field("sock", "__sk_common").offset + inner


@pytest.mark.kernel
def test_skb_drop_reasons_are_numbered(vmlinux):
    reasons = vmlinux.enum_values("skb_drop_reason")
    assert "SKB_DROP_REASON_NO_SOCKET" in reasons
    assert len(set(reasons.values())) == len(reasons) and min(reasons.values()) == 0


@pytest.mark.kernel
def test_a_member_the_kernel_lacks_is_an_error(vmlinux):
    with pytest.raises(BtfError, match=r"^struct sk_buff has no member 'foo'$"):
        vmlinux.field("sk_buff", "foo")

