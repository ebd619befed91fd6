"""nftrace's own kernel drop watcher (drops/dropwatch.py): the drops of traced packets in one
namespace, with their reason, location and headers, as bpftrace's program gave them.

A namespace traces its locally sent packets (`meta nftrace set 1` at output) to a closed UDP
port: the kernel frees each with NO_SOCKET. An untraced packet and a traced packet of another
namespace must not be reported.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from typing import Optional

import pytest

from conftest import REPO, in_netns, load_ruleset, unavailable
from nftrace.drops.dropwatch import RECORD, parse_record

TRACE_OUTPUT = """
table inet t {
    chain out { type filter hook output priority 0; udp dport 9999 meta nftrace set 1; }
}
"""

WATCH = r"""
import json, sys, time
from nftrace.drops.dropwatch import EbpfDropWatcher
watcher = EbpfDropWatcher.start(ring_bytes=int(sys.argv[1]))
print("ready", flush=True)
sys.stdin.readline()
time.sleep(0.3)
limit = int(sys.argv[2]) if len(sys.argv) > 2 else None
first = watcher.read(limit)
drops, lost = first + watcher.read(), watcher.lost
watcher.close()
json.dump({"lost": lost, "first": len(first),
           "drops": [[d.reason, str(d.src), str(d.dst), d.proto, d.dport, d.time, d.code_location()] for d in drops]},
          sys.stdout)
"""

SEND = """
import socket, sys
for _ in range(int(sys.argv[1])):
    for port in (9999, 9998):
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", port))
"""


def record(network: bytes, ports: bytes = b"\0\x35\x23\x0f", reason: int = 3) -> bytes:
    return RECORD.pack(5_000_000_000, 0xFFFFFFFF81000000, reason, 0, network.ljust(40, b"\0"), ports)


def test_an_ipv4_record_gives_the_packet_its_reason_and_ports():
    header = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0]) + bytes([10, 0, 0, 5]) + bytes([10, 0, 0, 9])
    drop = parse_record(record(header), {3: "NO_SOCKET"})
    assert (drop.time, drop.reason, drop.location, drop.proto, drop.sport, drop.dport) == (
        5.0, "NO_SOCKET", "0xffffffff81000000", 17, 53, 8975)
    assert (drop.src, drop.dst) == (ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("10.0.0.9"))


def test_an_ipv6_record_reads_next_header_and_addresses():
    src, dst = ipaddress.ip_address("fe80::1"), ipaddress.ip_address("ff02::16")
    header = bytes([0x60, 0, 0, 0, 0, 8, 58, 1]) + src.packed + dst.packed
    drop = parse_record(record(header, reason=99), {})
    assert (drop.src, drop.dst, drop.proto, drop.sport, drop.dport, drop.reason) == (src, dst, 58, None, None,
                                                                                     "reason-99")


def test_a_record_of_neither_ip_version_is_no_drop():
    assert parse_record(record(b"\x00" * 40), {}) is None


def watch(here: str, senders: dict, ring_bytes: int = 1 << 22, first_read: Optional[int] = None) -> tuple[dict, float]:
    """(what the watcher in `here` read once every namespace in `senders` sent its packets
    (to 9999, traced, and 9998, not), when the sending started). `first_read`: the watcher
    reads at most that many first, then the rest."""
    limit = [] if first_read is None else [str(first_read)]
    watcher = subprocess.Popen(["ip", "netns", "exec", here, sys.executable, "-c", WATCH, str(ring_bytes), *limit],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={"PYTHONPATH": str(REPO)})
    try:
        line = watcher.stdout.readline().strip()
        if line != "ready":
            unavailable(f"nftrace's kernel drop watcher cannot start here: {watcher.stderr.read().strip()}")
        started = time.monotonic()
        for name, count in senders.items():
            in_netns(name, [sys.executable, "-c", SEND, str(count)])
        out, err = watcher.communicate("done\n", timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 0, err
    return json.loads(out), started


@pytest.mark.kernel
def test_the_watcher_reports_traced_drops_of_its_namespace_only(netns):
    here, elsewhere = netns("dw"), netns("dwo")
    for name in (here, elsewhere):
        load_ruleset(name, TRACE_OUTPUT)
    read, started = watch(here, {here: 1, elsewhere: 1})
    assert read["lost"] == 0
    [(reason, src, dst, proto, dport, when, location)] = read["drops"]
    # Port 9998 was not traced, the other namespace's 9999 is not this one's.
    assert (reason, src, dst, proto, dport) == ("NO_SOCKET", "127.0.0.1", "127.0.0.1", 17, 9999)
    assert started <= when <= time.monotonic()  # CLOCK_MONOTONIC, as time.monotonic()
    assert "udp" in location and "+0x" in location  # the function that freed it, from /proc/kallsyms


@pytest.mark.kernel
def test_drops_that_find_the_ring_full_are_counted_not_lost_silently(netns):
    """A ring of one page holds 51 records: 200 drops unread, the rest counted."""
    here = netns("dwf")
    load_ruleset(here, TRACE_OUTPUT)
    read, _ = watch(here, {here: 200}, ring_bytes=4096)
    assert 0 < len(read["drops"]) < 200 and read["lost"] > 0
    assert len(read["drops"]) + read["lost"] == 200


@pytest.mark.kernel
def test_a_read_with_a_limit_leaves_the_other_drops_in_the_ring_in_order(netns):
    """Under a backlog nftrace reads no more drops than it can keep for pairing."""
    here = netns("dwl")
    load_ruleset(here, TRACE_OUTPUT)
    read, _ = watch(here, {here: 10}, first_read=4)
    times = [drop[5] for drop in read["drops"]]
    assert (read["first"], len(read["drops"]), read["lost"]) == (4, 10, 0)
    assert times == sorted(times)
