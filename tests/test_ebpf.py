"""eBPF socket filters: instructions encoded as the kernel reads them, maps and programs that the
real kernel creates, verifies and runs on datagrams sent through a socket pair."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import socket
import struct
import time
from typing import Callable, Iterator

import pytest

from conftest import unavailable
from nftrace.errors import KernelError
from nftrace.kernel.ebpf import (KTIME_GET_NS, MAP_ARRAY, MAP_DELETE_ELEM, MAP_HASH, MAP_LOOKUP_ELEM, MAP_LRU_HASH,
                                 MAP_PUSH_ELEM, MAP_QUEUE, MAP_UPDATE_ELEM, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9,
                                 R10, SKB_LOAD_BYTES, Map, Program, _verifier_reason, attach, available, load)


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """struct bpf_insn, written out independently of the module under test."""
    return struct.pack("<BBhi", code, src << 4 | dst, off, imm)


# Pure: the encoding.

def test_registers_are_numbered_as_the_kernel_numbers_them():
    assert (R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10) == tuple(range(11))


def test_mov_imm_is_a_64_bit_move_of_a_sign_extended_immediate():
    assert Program().mov_imm(R1, 5).mov_imm(R0, -1).assemble() == insn(0xB7, R1, imm=5) + insn(0xB7, R0, imm=-1)


def test_load_names_size_destination_source_and_offset():
    assert Program().load(4, R0, R1, 0).load(2, R3, R6, -8).assemble() == (
        insn(0x61, R0, R1) + insn(0x69, R3, R6, off=-8))


def test_store_and_store_imm_address_the_destination_register():
    assert Program().store(8, R10, -16, R6).store_imm(1, R10, -1, 0xAB).assemble() == (
        insn(0x7B, R10, R6, off=-16) + insn(0x72, R10, off=-1, imm=0xAB))


@pytest.mark.parametrize("build, code, src, imm", [
    (lambda p: p.mov(R1, R2), 0xBF, R2, 0),
    (lambda p: p.mov32(R1, R2), 0xBC, R2, 0),
    (lambda p: p.mov32_imm(R1, 0xFFFFFFFF), 0xB4, 0, -1),
    (lambda p: p.add(R1, R2), 0x0F, R2, 0),
    (lambda p: p.add_imm(R1, 3), 0x07, 0, 3),
    (lambda p: p.sub(R1, R2), 0x1F, R2, 0),
    (lambda p: p.sub_imm(R1, 3), 0x17, 0, 3),
    (lambda p: p.and_(R1, R2), 0x5F, R2, 0),
    (lambda p: p.and_imm(R1, 3), 0x57, 0, 3),
    (lambda p: p.or_(R1, R2), 0x4F, R2, 0),
    (lambda p: p.or_imm(R1, 3), 0x47, 0, 3),
    (lambda p: p.lsh_imm(R1, 3), 0x67, 0, 3),
    (lambda p: p.rsh_imm(R1, 3), 0x77, 0, 3),
    (lambda p: p.mul_imm(R1, 3), 0x27, 0, 3),
])
def test_alu_instructions_encode_operation_source_and_width(build, code, src, imm):
    assert build(Program()).assemble() == insn(code, R1, src, imm=imm)


def test_a_forward_conditional_jump_counts_the_slots_it_skips():
    program = Program().jump_if_imm("==", R0, 0, "out").mov_imm(R0, 1).label("out").exit()
    assert program.assemble() == insn(0x15, R0, off=1) + insn(0xB7, R0, imm=1) + insn(0x95)


def test_a_backward_jump_has_a_negative_offset():
    program = Program().mov_imm(R0, 0).label("loop").add_imm(R0, 1).jump_if_imm("<", R0, 16, "loop").exit()
    assert program.assemble()[16:24] == insn(0xA5, R0, off=-2, imm=16)


def test_register_compares_are_unsigned_unless_named_signed():
    program = Program().label("top").jump_if(">", R1, R2, "top").jump_if("s>", R1, R2, "top")
    program.jump_if_imm("&", R1, 4, "top").jump("top")
    assert program.assemble() == (insn(0x2D, R1, R2, off=-1) + insn(0x6D, R1, R2, off=-2)
                                  + insn(0x45, R1, off=-3, imm=4) + insn(0x05, off=-4))


def test_load_map_takes_two_slots_that_jumps_count():
    program = Program().jump("end").load_map(R1, 7).label("end").call(MAP_LOOKUP_ELEM).exit()
    assert len(program) == 5
    assert program.assemble() == (insn(0x05, off=2) + insn(0x18, R1, 1, imm=7) + insn(0)
                                  + insn(0x85, imm=MAP_LOOKUP_ELEM) + insn(0x95))


def test_load_imm64_splits_a_64_bit_constant_over_two_slots():
    assert Program().load_imm64(R1, 0x8877665544332211).assemble() == (
        insn(0x18, R1, imm=0x44332211) + insn(0, imm=-0x778899AB))  # 0x88776655 as a signed 32-bit field


def test_atomic_add_is_the_atomic_class_with_add_in_imm():
    assert Program().atomic_add(8, R0, 8, R1).atomic_add(4, R0, 0, R1).assemble() == (
        insn(0xDB, R0, R1, off=8) + insn(0xC3, R0, R1))
    with pytest.raises(ValueError):
        Program().atomic_add(2, R0, 0, R1)


def test_an_undefined_label_is_an_error():
    with pytest.raises(ValueError, match="undefined label 'nowhere'"):
        Program().jump("nowhere").assemble()


def test_a_label_defined_twice_is_an_error():
    with pytest.raises(ValueError, match="label 'here' defined twice"):
        Program().label("here").exit().label("here")


def test_a_jump_beyond_16_bit_offsets_is_an_error():
    program = Program().jump("far")
    for _ in range(1 << 15):
        program.mov_imm(R0, 0)
    with pytest.raises(ValueError, match="out of a jump's reach"):
        program.label("far").exit().assemble()


@pytest.mark.parametrize("build", [
    lambda: Program().mov_imm(R0, 1 << 31),
    lambda: Program().mov_imm(11, 0),
    lambda: Program().load(3, R0, R1, 0),
    lambda: Program().load(4, R0, R1, 1 << 15),
    lambda: Program().jump_if_imm("=~", R0, 0, "x"),
])
def test_what_an_instruction_cannot_hold_is_refused_at_once(build):
    with pytest.raises(ValueError):
        build()


def test_the_verifier_reason_is_its_last_line_before_states_and_statistics():
    log = ("0: R1=ctx() R10=fp0\n0: (b7) r0 = 0                        ; R0=0\n"
           "1: (15) if r0 == 0x0 goto pc-1        ; R0=0\ninfinite loop detected at insn 1\n"
           "cur state: R0=0 R1=ctx() R10=fp0\nold state: R0=P0 R1=ctx() R10=fp0\n"
           "processed 9 insns (limit 1000000) max_states_per_insn 0 total_states 1 peak_states 1 mark_read 0\n")
    assert _verifier_reason(log) == "infinite loop detected at insn 1"
    assert _verifier_reason("") == ""


# Kernel-backed: the real bpf() syscall.

def kernel_ebpf(test: Callable[[], None]) -> Callable[[], None]:
    """Kernel-backed (the `kernel` marker checks root and the kernel), and needing a kernel that
    lets this process load eBPF socket filters with maps: where it cannot, the test skips (fails
    under CI, as the marker's do)."""
    @functools.wraps(test)
    def where_available() -> None:
        if available() is not None:
            unavailable(f"eBPF socket filters are not available: {available()}")
        test()
    return pytest.mark.kernel(where_available)


def u32(value: int) -> bytes:
    return struct.pack("=I", value)


def u64(value: int) -> bytes:
    return struct.pack("=Q", value)


@contextlib.contextmanager
def filtered_pair(program: Program, what: str) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(sender, receiver): a datagram socket pair whose receiver runs `program`."""
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sender, receiver:
        fd = load(program, what)
        try:
            attach(receiver, fd, what)
        finally:
            os.close(fd)
        yield sender, receiver


def update_array_slot0(program: Program, array: Map, value_offset: int) -> Program:
    """array[0] = the value_size bytes on the stack at R10 + value_offset; returns 0 (drop)."""
    program.store_imm(4, R10, -4, 0).load_map(R1, array.fd).mov(R2, R10).add_imm(R2, -4)
    program.mov(R3, R10).add_imm(R3, value_offset).mov_imm(R4, 0).call(MAP_UPDATE_ELEM)
    return program.mov_imm(R0, 0).exit()


@kernel_ebpf
def test_this_machine_can_load_socket_filters():
    assert available() is None


@kernel_ebpf
def test_array_map_values_are_read_and_written_by_index():
    with Map(MAP_ARRAY, 4, 8, 4, "an array") as array:
        assert array.lookup(u32(2)) == bytes(8)
        array.update(u32(2), u64(42))
        assert array.lookup(u32(2)) == u64(42)
        assert array.lookup(u32(4)) is None
        assert array.keys() == [u32(0), u32(1), u32(2), u32(3)]
        with pytest.raises(KernelError, match="cannot delete from an array: Invalid argument"):
            array.delete(u32(2))
    assert array.fd == -1


@kernel_ebpf
def test_hash_map_keys_come_and_go():
    with Map(MAP_HASH, 4, 8, 16, "a hash") as table:
        for key in (3, 1, 2):
            table.update(u32(key), u64(key * 10))
        assert sorted(table.keys()) == [u32(1), u32(2), u32(3)]
        assert table.lookup(u32(2)) == u64(20)
        assert table.delete(u32(2)) is True
        assert table.delete(u32(2)) is False
        assert table.lookup(u32(2)) is None
        assert table.lookup_and_delete(u32(3)) == u64(30)
        assert table.lookup_and_delete(u32(3)) is None
        with pytest.raises(KernelError) as refused:
            table.update(u32(1), u64(0), flags=1)  # BPF_NOEXIST
        assert refused.value.errno == errno.EEXIST


@kernel_ebpf
def test_lru_hash_map_makes_room_instead_of_refusing():
    with Map(MAP_LRU_HASH, 4, 8, 64, "an LRU hash") as table:
        for key in range(256):
            table.update(u32(key), u64(key))
        assert table.lookup(u32(255)) == u64(255)
        assert sum(table.lookup(u32(key)) is not None for key in range(256)) <= 64


@kernel_ebpf
def test_queue_map_pops_in_the_order_pushed():
    with Map(MAP_QUEUE, 0, 8, 4, "a queue") as queue:
        assert queue.pop() is None
        queue.update(b"", u64(1))
        queue.update(b"", u64(2))
        assert queue.lookup(b"") == u64(1)
        assert [queue.pop(), queue.pop(), queue.pop()] == [u64(1), u64(2), None]


@kernel_ebpf
def test_keys_and_values_must_have_the_map_sizes():
    with Map(MAP_HASH, 4, 8, 4, "a hash") as table:
        with pytest.raises(ValueError, match="a hash: a key is 4 bytes, not 2"):
            table.lookup(b"ab")
        with pytest.raises(ValueError, match="a hash: a value is 8 bytes, not 4"):
            table.update(u32(1), u32(1))


@kernel_ebpf
def test_a_map_the_kernel_refuses_is_a_kernel_error():
    with pytest.raises(KernelError, match="cannot create a keyed queue: Invalid argument"):
        Map(MAP_QUEUE, 4, 8, 4, "a keyed queue")


@kernel_ebpf
def test_a_filter_returning_0_drops_the_datagram_after_writing_the_map():
    with Map(MAP_ARRAY, 4, 8, 1, "a flag") as flag:
        program = Program().store_imm(4, R10, -4, 0).load_map(R1, flag.fd).mov(R2, R10).add_imm(R2, -4)
        program.call(MAP_LOOKUP_ELEM).jump_if_imm("==", R0, 0, "out").store_imm(8, R0, 0, 42)
        program.label("out").mov_imm(R0, 0).exit()
        with filtered_pair(program, "the flag setter") as (sender, receiver):
            sender.send(b"hello")
            assert flag.lookup(u32(0)) == u64(42)
            with pytest.raises(BlockingIOError):
                receiver.recv(64, socket.MSG_DONTWAIT)


@kernel_ebpf
def test_a_filter_returning_skb_len_lets_datagrams_through():
    program = Program().load(4, R0, R1, 0).exit()  # __sk_buff.len
    with filtered_pair(program, "the pass-through") as (sender, receiver):
        sender.send(b"hello, world")
        assert receiver.recv(64, socket.MSG_DONTWAIT) == b"hello, world"


@kernel_ebpf
def test_a_program_the_verifier_refuses_says_why():
    with pytest.raises(KernelError, match=r"^cannot load the broken filter: .+: R2 !read_ok$"):
        load(Program().mov(R0, R2).exit(), "the broken filter")


@kernel_ebpf
def test_attaching_what_is_not_a_program_is_a_kernel_error():
    with Map(MAP_ARRAY, 4, 8, 1, "a map") as array, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        with pytest.raises(KernelError, match="cannot attach a map as a filter: "):
            attach(sock, array.fd, "a map as a filter")


@kernel_ebpf
def test_a_bounded_loop_loads_and_runs():
    program = Program().mov_imm(R0, 0).label("loop").add_imm(R0, 1).jump_if_imm("<", R0, 16, "loop").exit()
    with filtered_pair(program, "the counting loop") as (sender, receiver):
        sender.send(bytes(range(40)))
        assert receiver.recv(64, socket.MSG_DONTWAIT) == bytes(range(16))  # kept: the count, 16 bytes


@kernel_ebpf
def test_skb_load_bytes_copies_the_datagram_start_into_a_map():
    with Map(MAP_ARRAY, 4, 8, 1, "the first bytes") as first:
        program = Program().mov_imm(R2, 0).mov(R3, R10).add_imm(R3, -16).mov_imm(R4, 8)
        program.call(SKB_LOAD_BYTES).jump_if_imm("!=", R0, 0, "out")
        update_array_slot0(program, first, -16).label("out").mov_imm(R0, 0).exit()
        with filtered_pair(program, "the copier") as (sender, _receiver):
            sender.send(b"ABCDEFGHIJ")
        assert first.lookup(u32(0)) == b"ABCDEFGH"


@kernel_ebpf
def test_alu_instructions_compute_what_their_names_say():
    with Map(MAP_ARRAY, 4, 32, 1, "the results") as results:
        program = Program().mov_imm(R6, 5).mul_imm(R6, 3).lsh_imm(R6, 4).or_imm(R6, 1).and_imm(R6, 0x71)
        program.rsh_imm(R6, 1).add_imm(R6, 10).sub_imm(R6, 6)  # ((15 << 4 | 1) & 0x71) >> 1 = 56, + 4 = 60
        program.mov_imm(R7, 4).add(R6, R7).sub(R6, R7).mov_imm(R8, 0x0C).and_(R6, R8).mov_imm(R9, 0x30).or_(R6, R9)
        program.mov32_imm(R7, 0xFFFFFFFF).mov_imm(R8, -1).mov32(R9, R8)
        program.store(8, R10, -40, R6).store(8, R10, -32, R7).store(8, R10, -24, R9).store(8, R10, -16, R8)
        update_array_slot0(program, results, -40)
        with filtered_pair(program, "the calculator") as (sender, _receiver):
            sender.send(b"x")
        assert struct.unpack("=4Q", results.lookup(u32(0))) == (0x3C, 0xFFFFFFFF, 0xFFFFFFFF, (1 << 64) - 1)


@kernel_ebpf
def test_compares_in_a_running_program_are_unsigned_unless_named_signed():
    with Map(MAP_ARRAY, 4, 8, 1, "the outcomes") as outcomes:
        program = Program().mov_imm(R6, -1).mov_imm(R7, 1).mov_imm(R8, 0)
        program.jump_if(">", R6, R7, "unsigned").jump("signed?").label("unsigned").or_imm(R8, 1)
        program.label("signed?").jump_if("s>", R6, R7, "signed").jump("bit?").label("signed").or_imm(R8, 2)
        program.label("bit?").jump_if_imm("&", R6, 4, "bit").jump("done").label("bit").or_imm(R8, 4)
        program.label("done").store(8, R10, -16, R8)
        update_array_slot0(program, outcomes, -16)
        with filtered_pair(program, "the comparer") as (sender, _receiver):
            sender.send(b"x")
        assert outcomes.lookup(u32(0)) == u64(1 | 4)


@kernel_ebpf
def test_a_program_pushes_kernel_times_onto_a_queue():
    with Map(MAP_QUEUE, 0, 8, 8, "the times") as times:
        program = Program().call(KTIME_GET_NS).store(8, R10, -8, R0).load_map(R1, times.fd)
        program.mov(R2, R10).add_imm(R2, -8).mov_imm(R3, 0).call(MAP_PUSH_ELEM).mov_imm(R0, 0).exit()
        with filtered_pair(program, "the clock") as (sender, _receiver):
            before = time.monotonic_ns()
            sender.send(b"one")
            sender.send(b"two")
            after = time.monotonic_ns()
        first, second = (struct.unpack("=Q", times.pop())[0] for _ in range(2))
        assert before <= first <= second <= after
        assert times.pop() is None


@kernel_ebpf
def test_a_program_deletes_from_a_hash_map():
    with Map(MAP_HASH, 4, 8, 4, "the pending") as pending:
        pending.update(u32(7), u64(1))
        pending.update(u32(8), u64(1))
        program = Program().store_imm(4, R10, -4, 7).load_map(R1, pending.fd).mov(R2, R10).add_imm(R2, -4)
        program.call(MAP_DELETE_ELEM).mov_imm(R0, 0).exit()
        with filtered_pair(program, "the deleter") as (sender, _receiver):
            sender.send(b"x")
        assert pending.keys() == [u32(8)]
