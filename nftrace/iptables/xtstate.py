"""What the legacy x_tables tables of a family hold right now, read from the kernel itself.

x_tables announce no change, and `iptables-legacy-save` is a process of its own (tens of
milliseconds, far more on a loaded machine), so it cannot be run every time nftrace needs to
know whether the rules are still those it read. The kernel hands the same rules over a raw
socket in two getsockopt calls per table (IPT_SO_GET_INFO, then IPT_SO_GET_ENTRIES: what
iptables-save itself reads), in microseconds. `fingerprint()` digests them with the packet
and byte counters zeroed: equal fingerprints, equal rules; any rule added, removed, moved or
changed, or a policy changed, gives another fingerprint. The kernel replaces a table as a
whole and reads it under the same lock, so a reading is the table at one instant.

Only tables the namespace already has are read: asking for a table by name creates it.
`RulesetObserver` records each reading in a rulehistory.RulesetHistory, and reads the rules
as text (iptables-legacy-save) once per fingerprint it has not seen.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import socket
import struct
import time
from typing import Optional

from ..errors import KernelError
from .legacy import legacy_tables, read_legacy_ruleset
from .rulehistory import RulesetHistory

# linux/netfilter_ipv4/ip_tables.h and linux/netfilter_ipv6/ip6_tables.h: the same numbers.
SO_GET_INFO = 64
SO_GET_ENTRIES = 65
SOL_IP = 0
SOL_IPV6 = 41
TABLE_NAME_SIZE = 32
NF_INET_NUMHOOKS = 5
# struct ipt_getinfo / ip6t_getinfo: name, valid_hooks, hook_entry[5], underflow[5], num_entries, size.
GETINFO = struct.Struct(f"={TABLE_NAME_SIZE}sI{NF_INET_NUMHOOKS}I{NF_INET_NUMHOOKS}III")
# struct ipt_get_entries: name, size, then the entries, aligned to 8 (they hold 64-bit counters).
GET_ENTRIES_HEADER = struct.Struct(f"={TABLE_NAME_SIZE}sI4x")


class EntryLayout:
    """Where an entry (struct ipt_entry / ip6t_entry) keeps its length and its counters."""

    def __init__(self, next_offset_at: int, counters_at: int):
        self.next_offset_at = next_offset_at
        self.counters_at = counters_at
        self.counters_size = 16  # struct xt_counters: packets, bytes


FAMILIES = {
    # ipt_entry: struct ipt_ip (84 bytes), nfcache, target_offset, next_offset, comefrom, counters.
    "ip": (socket.AF_INET, SOL_IP, EntryLayout(next_offset_at=90, counters_at=96)),
    # ip6t_entry: struct ip6t_ip6 (136 bytes), then the same fields; counters aligned to 8.
    "ip6": (socket.AF_INET6, SOL_IPV6, EntryLayout(next_offset_at=142, counters_at=152)),
}
# A table replaced between the two calls answers EAGAIN: read it again.
READ_ATTEMPTS = 10


def _libc():
    return ctypes.CDLL(None, use_errno=True)


class TableReader:
    """A raw socket of one family, to read its tables through. `close()` releases it."""

    def __init__(self, family: str):
        self.family = family
        domain, self._level, self._layout = FAMILIES[family]
        try:
            self._sock = socket.socket(domain, socket.SOCK_RAW, socket.IPPROTO_RAW)
        except OSError as err:
            raise KernelError(f"cannot open a raw socket to read the legacy tables: {err.strerror}") from None
        self._getsockopt = _libc().getsockopt

    def _get(self, option: int, buffer: ctypes.Array) -> int:
        """One getsockopt on a buffer that carries the request in; 0 or the errno."""
        length = ctypes.c_uint32(len(buffer))
        if self._getsockopt(self._sock.fileno(), self._level, option, buffer, ctypes.byref(length)) == 0:
            return 0
        return ctypes.get_errno()

    def contents(self, table: str) -> Optional[bytes]:
        """The table's hook entry points and entries, counters zeroed; None if it is gone."""
        name = table.encode()[:TABLE_NAME_SIZE - 1]
        for _ in range(READ_ATTEMPTS):
            info = ctypes.create_string_buffer(GETINFO.pack(name, 0, *[0] * (2 * NF_INET_NUMHOOKS), 0, 0),
                                               GETINFO.size)
            code = self._get(SO_GET_INFO, info)
            if code == errno.ENOENT:
                return None
            if code:
                raise KernelError(f"cannot read the legacy {self.family} table {table}: {os.strerror(code)}")
            size = GETINFO.unpack(info.raw)[-1]
            entries = ctypes.create_string_buffer(GET_ENTRIES_HEADER.pack(name, size), GET_ENTRIES_HEADER.size + size)
            code = self._get(SO_GET_ENTRIES, entries)
            if code == errno.EAGAIN:
                continue
            if code == errno.ENOENT:
                return None
            if code:
                raise KernelError(f"cannot read the legacy {self.family} table {table}: {os.strerror(code)}")
            # name, valid_hooks, hook entries and underflows; the entry count and size follow from the entries.
            return info.raw[:GETINFO.size - 8] + self._without_counters(entries.raw[GET_ENTRIES_HEADER.size:])
        raise KernelError(f"the legacy {self.family} table {table} kept changing while nftrace read it")

    def _without_counters(self, blob: bytes) -> bytes:
        layout = self._layout
        data = bytearray(blob)
        offset = 0
        while offset + layout.counters_at + layout.counters_size <= len(data):
            next_offset = struct.unpack_from("=H", data, offset + layout.next_offset_at)[0]
            data[offset + layout.counters_at:offset + layout.counters_at + layout.counters_size] = \
                bytes(layout.counters_size)
            if next_offset == 0:
                break
            offset += next_offset
        return bytes(data)

    def fingerprint(self) -> bytes:
        """A digest of every table of the family in this namespace, counters aside."""
        digest = hashlib.blake2b(digest_size=16)
        for table in sorted(legacy_tables(self.family)):
            contents = self.contents(table)
            if contents is not None:
                digest.update(struct.pack("=I", len(contents)) + contents)
        return digest.digest()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "TableReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RulesetObserver:
    """Observes one family's legacy tables into a RulesetHistory. `close()` releases the socket."""

    # The rules can change while iptables-legacy-save reads them: its text belongs to a
    # fingerprint only when the fingerprints before and after it are the same.
    SAVE_ATTEMPTS = 3

    def __init__(self, family: str, history: RulesetHistory):
        self.family = family
        self.history = history
        self.reader = TableReader(family)

    def observe(self) -> int:
        """Read the fingerprint (and, if new, the rules); the index of the latest observation."""
        fingerprint = self.reader.fingerprint()
        index = self.history.record(fingerprint, time.time())
        attempts = self.SAVE_ATTEMPTS
        while not self.history.knows(fingerprint) and attempts:
            attempts -= 1
            ruleset = read_legacy_ruleset(self.family)
            again = self.reader.fingerprint()
            index = self.history.record(again, time.time())
            if again == fingerprint:
                self.history.learn(fingerprint, ruleset)
            fingerprint = again
        return index

    def close(self) -> None:
        self.reader.close()
