"""Kernel drops after netfilter: why a packet that every chain let through still did not arrive.

Netfilter is only part of a packet's way: after the last chain accepted it, the kernel can
still drop it (nothing listens on the port, reverse-path filter, no route, no neighbour, a
full queue). The kernel says so in the `skb:kfree_skb` tracepoint, with a drop reason and
the code location. `KernelDropWatcher` runs a small bpftrace program on that tracepoint that
reports only packets carrying the trace bit (`skb->nf_trace`, set by nftrace's mark chains)
in the traced network namespace, with the headers needed to tell which packet it was.
`DropCorrelator` (pure) pairs those drops with the packet paths built from trace events.

Why the order of reading matters: the kernel queues a packet's trace events on nftrace's
netlink socket while netfilter runs, before the packet can be freed; bpftrace learns of the
drop only after that. So a drop line read *before* the netlink socket is drained has all of
its packet's events in the drained batch: applying drops after the drain never closes a
packet whose events are still unread.

The tracepoint needs tracefs. Where it is not mounted, bpftrace runs in a mount namespace of
its own with tracefs mounted there, so the machine's mount table never changes. The drop
reason names come from the tracepoint's own format file (the numbers differ between kernels).
"""

from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from .errors import EnvironmentProblem
from .flow import PROTOCOL_NAMES
from .paths import PacketPath

BTF_PATH = "/sys/kernel/btf/vmlinux"
KALLSYMS_PATH = "/proc/kallsyms"
BPFTRACE_ENV = "NFTRACE_BPFTRACE"  # path of the bpftrace to run (default: the one on PATH)
READY_MARKER = "__BPFTRACE_NOTIFY_PROBES_ATTACHED"  # bpftrace prints it once every probe is attached
DROP_PREFIX = "nftrace-drop"
FORMAT_BEGIN = "nftrace-format-begin"
FORMAT_END = "nftrace-format-end"
STARTUP_TIMEOUT = 15.0
PORT_PROTOCOLS = frozenset({6, 17, 132, 136})
PR_SET_PDEATHSIG = 1
TERMINATE_ATTEMPTS = 5

# Runs inside the new mount namespace: mount tracefs there if needed, hand the tracepoint's
# format (the reason names) to nftrace, then become bpftrace. Nothing of the user's is
# interpolated: bpftrace and its program come as positional arguments.
_SETUP_SCRIPT = (
    'tracing=/sys/kernel/tracing; format="$tracing/events/skb/kfree_skb/format"; '
    '[ -e "$format" ] || mount -t tracefs nftrace "$tracing" || exit 97; '
    f'echo {FORMAT_BEGIN}; cat "$format" || exit 98; echo {FORMAT_END}; '
    'exec "$@"'
)

# One line per drop: time (CLOCK_MONOTONIC ns, as Python's time.monotonic), reason number,
# location address, then IP version, addresses, L4 protocol and the first four
# bytes of L4 (ports) read big-endian. Packets of other namespaces are filtered in the kernel.
_PROGRAM = r"""
tracepoint:skb:kfree_skb
/((struct sk_buff *)args->skbaddr)->nf_trace/
{
  $skb = (struct sk_buff *)args->skbaddr;
  $netns = (uint32)0;
  if ($skb->dev != 0) {
    $netns = $skb->dev->nd_net.net->ns.inum;
  } else {
    if ($skb->sk != 0) {
      $netns = $skb->sk->__sk_common.skc_net.net->ns.inum;
    }
  }
  if ($netns == NETNS_INODE) {
    $ip = $skb->head + $skb->network_header;
    $version = *(uint8 *)$ip >> 4;
    if ($version == 4) {
      $ip4 = (struct iphdr *)$ip;
      $l4 = $ip + (*(uint8 *)$ip & 15) * 4;
      printf("DROP_PREFIX %llu %u %lu 4 %s %s %u %u %u\n", nsecs, args->reason, args->location,
             ntop($ip4->saddr), ntop($ip4->daddr), $ip4->protocol,
             *(uint8 *)$l4 << 8 | *(uint8 *)($l4 + 1), *(uint8 *)($l4 + 2) << 8 | *(uint8 *)($l4 + 3));
    } else {
      if ($version == 6) {
        $ip6 = (struct ipv6hdr *)$ip;
        $l4 = $ip + 40;
        printf("DROP_PREFIX %llu %u %lu 6 %s %s %u %u %u\n", nsecs, args->reason, args->location,
               ntop($ip6->saddr.in6_u.u6_addr8), ntop($ip6->daddr.in6_u.u6_addr8),
               $ip6->nexthdr, *(uint8 *)$l4 << 8 | *(uint8 *)($l4 + 1),
               *(uint8 *)($l4 + 2) << 8 | *(uint8 *)($l4 + 3));
      }
    }
  }
}
"""

# Plain words for the reasons an admin meets. Placeholders: {proto} {dport} {src} {dst} {iif}.
REASON_EXPLANATIONS = {
    "NOT_SPECIFIED": "the kernel freed it without saying why",
    "NO_SOCKET": "nothing listens on {proto}/{dport} in this namespace",
    "SOCKET_CLOSE": "the receiving socket was closed before it read the packet",
    "SOCKET_FILTER": "a socket filter (BPF program on the receiving socket) rejected it",
    "SOCKET_RCVBUFF": "the receiving socket's buffer was full (the application does not read fast enough)",
    "SOCKET_BACKLOG": "the receiving socket's backlog was full",
    "PKT_TOO_SMALL": "the packet is shorter than its headers say",
    "TCP_CSUM": "bad TCP checksum",
    "UDP_CSUM": "bad UDP checksum",
    "IP_CSUM": "bad IP header checksum",
    "ICMP_CSUM": "bad ICMP checksum",
    "NETFILTER_DROP": "netfilter dropped it outside the traced chains (iptables-legacy, conntrack or NAT)",
    "OTHERHOST": "the frame was addressed to another host's MAC address",
    "IP_INHDR": "invalid IP header",
    "IP_RPFILTER": "reverse-path filter: replies to {src} would not leave through {iif} "
                   "(net.ipv4.conf.{iif_key}.rp_filter / conf.all.rp_filter)",
    "UNICAST_IN_L2_MULTICAST": "unicast IP packet in a link-layer multicast or broadcast frame",
    "XFRM_POLICY": "an IPsec (xfrm) policy refused it",
    "IP_NOPROTO": "this host has no handler for IP protocol {proto}",
    "PROTO_MEM": "the protocol's memory limit was reached",
    "TCP_FLAGS": "TCP flags not valid for the connection's state",
    "TCP_ZEROWINDOW": "the receiver's TCP window is zero",
    "TCP_OLD_DATA": "TCP data already received (a duplicate)",
    "TCP_OVERWINDOW": "TCP data beyond the receive window",
    "TCP_RFC7323_PAWS": "TCP timestamp older than the connection's (PAWS check)",
    "TCP_LISTEN_OVERFLOW": "the listening socket's accept queue is full",
    "TCP_OLD_SEQUENCE": "TCP sequence number older than the window",
    "TCP_INVALID_SEQUENCE": "TCP sequence number outside the window",
    "TCP_INVALID_ACK_SEQUENCE": "TCP acknowledges data that was never sent",
    "TCP_RESET": "TCP reset for this connection",
    "TCP_INVALID_SYN": "unexpected TCP SYN on an existing connection",
    "TCP_CLOSE": "the TCP connection is closed",
    "IP_OUTNOROUTES": "no route to {dst} for a locally sent packet",
    "IP_INNOROUTES": "no route to {dst}: the packet cannot be forwarded",
    "IP_INADDRERRORS": "invalid destination address {dst}",
    "IP_LOCAL_SOURCE": "the source {src} is one of this host's own addresses",
    "IP_INVALID_SOURCE": "invalid source address {src} (multicast, broadcast or zero)",
    "IP_LOCALNET": "127.0.0.0/8 address on a non-loopback interface (net.ipv4.conf.*.route_localnet)",
    "IP_INVALID_DEST": "invalid destination address {dst}",
    "IPV6DISABLED": "IPv6 is disabled on the interface",
    "BPF_CGROUP_EGRESS": "a cgroup BPF program refused to send it",
    "NEIGH_CREATEFAIL": "no neighbour entry could be created for the next hop",
    "NEIGH_FAILED": "the next hop did not answer ARP / neighbour discovery (no host there)",
    "NEIGH_QUEUEFULL": "too many packets were waiting for the next hop's ARP / neighbour answer",
    "NEIGH_DEAD": "the next hop's neighbour entry was being removed",
    "NEIGH_HH_FILLFAIL": "the link-layer header for the next hop could not be built",
    "TC_EGRESS": "a tc filter dropped it on the way out",
    "TC_INGRESS": "a tc filter dropped it on the way in",
    "SECURITY_HOOK": "a security module (SELinux, AppArmor, ...) refused it",
    "QDISC_DROP": "the interface's queue (qdisc) was full",
    "CPU_BACKLOG": "the CPU's input backlog was full (net.core.netdev_max_backlog)",
    "XDP": "an XDP program dropped it",
    "UNHANDLED_PROTO": "no handler for its protocol",
    "NOMEM": "the kernel ran out of memory",
    "PKT_TOO_BIG": "larger than the path MTU and not allowed to be fragmented",
    "DUP_FRAG": "a duplicate fragment",
    "FRAG_REASM_TIMEOUT": "the other fragments did not arrive in time",
    "FRAG_TOO_FAR": "a fragment too far from the others",
    "NO_TX_TARGET": "no device to send it on",
}
# Families of reasons: when a reason has no sentence of its own, its prefix gives one.
REASON_PREFIX_EXPLANATIONS = (
    ("TCP_MD5", "TCP MD5 signature check failed"),
    ("TCP_AO", "TCP authentication option check failed"),
    ("TCP_", "TCP's own checks refused it"),
    ("NEIGH_", "the next hop's link-layer address could not be found"),
    ("QDISC_", "the interface's queueing discipline dropped it"),
    ("IPV6_", "invalid IPv6 packet"),
    ("IP_", "the IP layer refused it"),
)


class DropReasonsUnavailable(EnvironmentProblem):
    """Kernel drop reasons cannot be watched here; the trace goes on without them."""


@dataclass(frozen=True)
class KernelDrop:
    """One traced packet freed by the kernel with a drop reason, as the tracepoint saw it."""

    time: float  # CLOCK_MONOTONIC seconds: comparable with time.monotonic()
    reason: str
    location: str
    src: Optional[ipaddress._BaseAddress]
    dst: Optional[ipaddress._BaseAddress]
    proto: Optional[int]
    sport: Optional[int] = None
    dport: Optional[int] = None

    def headers(self) -> tuple:
        return (self.src, self.dst, self.proto, self.sport, self.dport)


def bpftrace_program(netns_inode: int) -> str:
    """The bpftrace program for one network namespace (its nsfs inode number)."""
    return _PROGRAM.replace("NETNS_INODE", str(int(netns_inode))).replace("DROP_PREFIX", DROP_PREFIX)


_SYMBOLIC_RE = re.compile(r'\{\s*(\d+)\s*,\s*"(\w+)"\s*\}')


def parse_reason_names(format_text: str) -> dict[int, str]:
    """Reason number → name, from the `__print_symbolic` table of the tracepoint's format."""
    return {int(number): name for number, name in _SYMBOLIC_RE.findall(format_text)}


def has_reason_field(format_text: str) -> bool:
    return re.search(r"field:[^;]*\breason;", format_text) is not None


class KernelSymbols:
    """Kernel code addresses as `function+0xoffset`, from /proc/kallsyms.

    Resolved here rather than by bpftrace's ksym(), which reads the whole symbol table on
    first use and delays the first drop line by half a second. A drop location is looked up
    by one pass over the file (a tenth of a second), without keeping the table (tens of MB).
    """

    def __init__(self, path: str = KALLSYMS_PATH):
        self.path = path
        self._cache: dict[int, str] = {}

    def location(self, address: int) -> str:
        """`tcp_v4_rcv+0x91`; the bare address when no symbol covers it."""
        if address not in self._cache:
            self._cache[address] = self._lookup(address)
        return self._cache[address]

    def _lookup(self, address: int) -> str:
        # kallsyms addresses are fixed-width lowercase hex: as strings they compare as numbers.
        target = f"{address:016x}"
        best, name = "", None
        try:
            with open(self.path) as table:
                for line in table:
                    start, _, rest = line.partition(" ")
                    if len(start) == len(target) and best < start <= target and rest[:1] in ("t", "T", "w", "W"):
                        best, name = start, rest[2:].split(maxsplit=1)[0]
        except OSError:
            pass
        if name is None or int(best, 16) == 0:  # all zero: addresses hidden (kptr_restrict)
            return f"0x{address:x}"
        return f"{name}+0x{address - int(best, 16):x}"


def parse_drop_line(line: str, reason_names: dict[int, str], symbols: Optional[KernelSymbols] = None) -> Optional[KernelDrop]:
    """One line of the bpftrace program; None for anything else bpftrace printed."""
    parts = line.split()
    if len(parts) != 10 or parts[0] != DROP_PREFIX:
        return None
    try:
        nsecs, reason, address = int(parts[1]), int(parts[2]), int(parts[3])
        src, dst = ipaddress.ip_address(parts[5]), ipaddress.ip_address(parts[6])
        proto, sport, dport = int(parts[7]), int(parts[8]), int(parts[9])
    except ValueError:
        return None
    location = symbols.location(address) if symbols is not None else f"0x{address:x}"
    ports = proto in PORT_PROTOCOLS
    return KernelDrop(
        time=nsecs / 1e9,
        reason=reason_names.get(reason, f"reason-{reason}"),
        location=location,
        src=src,
        dst=dst,
        proto=proto,
        sport=sport if ports else None,
        dport=dport if ports else None,
    )


class _SafeFormat(dict):
    def __missing__(self, key: str) -> str:
        return "?"


def explain(drop: KernelDrop, iif: Optional[str] = None) -> str:
    """The drop reason in plain words, with the packet's own addresses and port filled in."""
    template = REASON_EXPLANATIONS.get(drop.reason)
    if template is None:
        template = next((text for prefix, text in REASON_PREFIX_EXPLANATIONS if drop.reason.startswith(prefix)),
                        "see enum skb_drop_reason in the kernel's include/net/dropreason-core.h")
    values = _SafeFormat(
        proto=PROTOCOL_NAMES.get(drop.proto, str(drop.proto)) if drop.proto is not None else "?",
        dport=drop.dport if drop.dport is not None else "?",
        src=drop.src,
        dst=drop.dst,
        iif=iif or "the interface it came in on",
        iif_key=iif or "IFACE",
    )
    return template.format_map(values)


# -- pairing drops with packets ---------------------------------------------------------------

# A drop happens after its packet's trace events were generated; nftrace reads those events
# some time later. So a drop may precede the first reading by that delay (EARLY), and follows
# the last event by little more than the kernel's own work (LATE).
MATCH_EARLY_SECONDS = 1.0
MATCH_LATE_SECONDS = 0.25
# How long a packet that netfilter accepted waits for a drop before its answer is given.
HOLD_SECONDS = 0.3
# How long drops and answered packets are remembered for pairing.
REMEMBER_SECONDS = 10.0
REMEMBER_MAX = 4096


@dataclass(frozen=True)
class PacketSignature:
    """What pairing a drop with a packet needs, and all that is kept of an answered packet."""

    trace_id: int
    headers: tuple  # (src, dst, proto, sport, dport) at each hook where they were seen, NAT included
    first_seen: float
    last_seen: float
    dropped_by_rule: bool
    iif: Optional[int]

    @classmethod
    def of(cls, path: PacketPath) -> "PacketSignature":
        headers = []
        for observation in path.observations:
            packet = observation.packet
            if packet is None:
                continue
            ports = packet.proto in PORT_PROTOCOLS
            key = (packet.src, packet.dst, packet.proto, packet.sport if ports else None, packet.dport if ports else None)
            if key not in headers:
                headers.append(key)
        return cls(path.trace_id, tuple(headers), path.first_seen, path.last_seen or path.first_seen,
                   path.verdict == "drop" and path.decided_by is not None, path.interface_index("iif"))

    def matches(self, drop: KernelDrop, late_seconds: float = MATCH_LATE_SECONDS) -> bool:
        """Same packet: the headers it had at some hook (before or after NAT), a time that fits.

        A NETFILTER_DROP of a packet that a traced rule dropped says nothing the rule did not.
        """
        if drop.reason == "NETFILTER_DROP" and self.dropped_by_rule:
            return False
        if drop.headers() not in self.headers:
            return False
        return self.first_seen - MATCH_EARLY_SECONDS <= drop.time <= self.last_seen + late_seconds

    def distance(self, drop: KernelDrop) -> float:
        if drop.time < self.first_seen:
            return self.first_seen - drop.time
        return max(0.0, drop.time - self.last_seen)


def _endpoint(address, port: Optional[int]) -> str:
    text = f"[{address}]" if address is not None and address.version == 6 and port else str(address)
    return f"{text}:{port}" if port else text


def _nearest(candidates: Iterable, drop: KernelDrop, late_seconds: float = MATCH_LATE_SECONDS):
    """The candidate (anything with a `.signature`) that the drop fits best, or None."""
    matching = [item for item in candidates if item.signature.matches(drop, late_seconds)]
    return min(matching, key=lambda item: item.signature.distance(drop)) if matching else None


def attach_drop(path: PacketPath, drop: KernelDrop, interfaces: Optional[dict] = None) -> None:
    """Put the drop on the packet. A packet that vanished after netfilter (it was never seen
    leaving) is now a complete answer: dropped, by the kernel, not by a rule."""
    iif_index = path.interface_index("iif")
    iif = (interfaces or {}).get(iif_index) if iif_index else None
    path.kernel_drop = {"reason": drop.reason, "location": drop.location, "explain": explain(drop, iif)}
    if not path.complete and path.incomplete_reason != "events lost":
        path.complete = True
        path.verdict = "drop"
        path.decided_by = None
        path.incomplete_reason = None


class _ByHeaders:
    """Items filed under every header tuple of their packet: a drop is compared only with
    what had its headers, so a flood costs no quadratic search."""

    def __init__(self):
        self._items: dict = {}

    def add(self, item) -> None:
        for key in item.signature.headers:
            self._items.setdefault(key, []).append(item)

    def remove(self, item) -> None:
        for key in item.signature.headers:
            items = self._items.get(key, [])
            for index, other in enumerate(items):
                if other is item:
                    del items[index]
                    break
            if not items:
                self._items.pop(key, None)

    def get(self, key: tuple) -> list:
        return self._items.get(key, [])


@dataclass(eq=False)
class _Held:
    """A finished packet whose answer waits for a possible kernel drop."""

    path: PacketPath
    signature: PacketSignature
    until: float
    waiting: bool = True  # filed by headers, waiting for a drop


@dataclass(eq=False)
class _Answered:
    """What is kept of a packet answered as accepted: enough to place a late drop."""

    signature: PacketSignature
    at: float


class DropCorrelator:
    """Pairs kernel drops with finished packet paths, before their answer is given.

    A packet that netfilter accepted is held for `hold_seconds`: the kernel may still drop
    it (a closed port is found after the input hook). A drop for a packet that is still open
    (it vanished after a hook, e.g. rp_filter after prerouting) closes it at once through
    `vanished`. A drop that comes after the packet's answer was given (a next hop that never
    answers ARP makes the kernel drop the packet seconds later) becomes a note.

    Answers come out in the order the packets finished: while one waits, those behind it
    wait too.

    Per batch of drops: `add_drops`, then `PathBuilder.close_vanished(vanished)` and `hold`,
    then `release`; so a drop goes to an open packet before an answered one is considered.
    """

    def __init__(self, interfaces: Optional[dict] = None, hold_seconds: float = HOLD_SECONDS):
        self.interfaces = interfaces if interfaces is not None else {}
        self.hold_seconds = hold_seconds
        self.notes: list = []
        self._held: deque = deque()  # in the order the packets finished
        self._held_index = _ByHeaders()
        self._drops: deque = deque()  # not yet paired, oldest first
        self._drops_index: dict = {}  # headers -> [drop]
        self._answered: deque = deque()
        self._answered_index = _ByHeaders()

    @property
    def holding(self) -> int:
        return len(self._held)

    def add_drops(self, drops: Iterable[KernelDrop]) -> None:
        for drop in drops:
            held = _nearest(self._held_index.get(drop.headers()), drop)
            if held is not None:
                attach_drop(held.path, drop, self.interfaces)
                self._stop_waiting(held)
            else:
                self._drops.append(drop)
                self._drops_index.setdefault(drop.headers(), []).append(drop)
        while len(self._drops) > REMEMBER_MAX:
            self._forget_drop(self._drops[0])

    def vanished(self, path: PacketPath) -> bool:
        """For PathBuilder.close_vanished: an open packet that a remembered drop accounts for."""
        if not self._drops:
            return False
        return self._remembered_drop(PacketSignature.of(path)) is not None

    def hold(self, paths: Iterable, now: float) -> list:
        """Pair each finished path with a remembered drop; return those whose answer is ready."""
        for path in paths:
            signature = PacketSignature.of(path)
            drop = self._remembered_drop(signature)
            if drop is not None:
                self._forget_drop(drop)
                attach_drop(path, drop, self.interfaces)
            held = _Held(path, signature, now, waiting=False)
            if drop is None and path.complete and path.verdict == "accept":
                held.until, held.waiting = now + self.hold_seconds, True
                self._held_index.add(held)
            self._held.append(held)
        return self.release(now)

    def release(self, now: float, everything: bool = False) -> list:
        """Held paths whose drop came or whose wait is over (all of them at the end of a run)."""
        ready = []
        while self._held:
            head = self._held[0]
            if not (everything or not head.waiting or head.until <= now):
                break
            self._held.popleft()
            self._stop_waiting(head)
            ready.append(head.path)
        self._note_late_drops()
        self._forget(now)
        return self._answer(ready, now)

    def _stop_waiting(self, held: _Held) -> None:
        if held.waiting:
            held.waiting = False
            self._held_index.remove(held)

    def _remembered_drop(self, signature: PacketSignature) -> Optional[KernelDrop]:
        candidates = [drop for key in signature.headers for drop in self._drops_index.get(key, ())
                      if signature.matches(drop)]
        return min(candidates, key=signature.distance) if candidates else None

    def _forget_drop(self, drop: KernelDrop) -> None:
        for index, other in enumerate(self._drops):
            if other is drop:
                del self._drops[index]
                break
        same = self._drops_index.get(drop.headers(), [])
        for index, other in enumerate(same):
            if other is drop:
                del same[index]
                break
        if not same:
            self._drops_index.pop(drop.headers(), None)

    def _answer(self, paths: list, now: float) -> list:
        """Remember what a late drop could still belong to: packets answered as accepted."""
        for path in paths:
            if path.complete and path.verdict == "accept" and path.kernel_drop is None:
                answered = _Answered(PacketSignature.of(path), now)
                self._answered.append(answered)
                self._answered_index.add(answered)
        while len(self._answered) > REMEMBER_MAX:
            self._answered_index.remove(self._answered.popleft())
        return paths

    def _note_late_drops(self) -> None:
        for drop in list(self._drops):
            answered = _nearest(self._answered_index.get(drop.headers()), drop, late_seconds=REMEMBER_SECONDS)
            if answered is not None:
                self._answered_index.remove(answered)
                self._answered.remove(answered)
                self._forget_drop(drop)
                self._late(answered.signature, drop)

    def _late(self, signature: PacketSignature, drop: KernelDrop) -> None:
        iif = self.interfaces.get(signature.iif) if signature.iif else None
        src, dst, proto, sport, dport = signature.headers[0]
        packet = f"{_endpoint(src, sport)} → {_endpoint(dst, dport)} {PROTOCOL_NAMES.get(proto, proto)}"
        self.notes.append(
            f"the kernel dropped packet {packet} (trace id {signature.trace_id:08x}) after its answer was given: "
            f"{drop.reason} at {drop.location} — {explain(drop, iif)}"
        )

    def _forget(self, now: float) -> None:
        while self._drops and now - self._drops[0].time >= REMEMBER_SECONDS:
            self._forget_drop(self._drops[0])
        while self._answered and now - self._answered[0].at >= REMEMBER_SECONDS:
            self._answered_index.remove(self._answered.popleft())


# -- the bpftrace process ---------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: if nftrace dies (even by SIGKILL), so does bpftrace."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def find_bpftrace() -> str:
    configured = os.environ.get(BPFTRACE_ENV)
    if configured:
        if not os.access(configured, os.X_OK):
            raise DropReasonsUnavailable(f"{BPFTRACE_ENV}={configured} is not an executable bpftrace")
        return configured
    found = shutil.which("bpftrace")
    if found is None:
        raise DropReasonsUnavailable("bpftrace is not installed (apt-get install bpftrace)")
    return found


def current_netns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


class KernelDropWatcher:
    """bpftrace on skb:kfree_skb for traced packets of one network namespace.

    `start()` spawns it and returns at once (its startup overlaps nftrace's own); `wait_ready()`
    blocks until every probe is attached. `close()` (or leaving the `with` block) stops it; it
    also dies with nftrace, whatever kills nftrace.
    """

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.ready = False
        self.reason_names: dict[int, str] = {}
        self.symbols = KernelSymbols()
        self.ended = False  # bpftrace's output is closed: it exited
        self._buffer = b""
        self._early: list = []  # drops read while waiting for the ready marker
        self._format: Optional[list] = None
        self._diagnostics: list = []

    @classmethod
    def start(cls, netns_inode: Optional[int] = None) -> "KernelDropWatcher":
        bpftrace = find_bpftrace()
        if not os.path.exists(BTF_PATH):
            raise DropReasonsUnavailable(f"the kernel has no BTF ({BTF_PATH}), which bpftrace needs to read packets")
        unshare = shutil.which("unshare")
        if unshare is None:
            raise DropReasonsUnavailable("unshare (util-linux) is not installed")
        inode = current_netns_inode() if netns_inode is None else netns_inode
        argv = [unshare, "--mount", "--propagation", "private", "--", "sh", "-c", _SETUP_SCRIPT, "nftrace-drops",
                bpftrace, "-B", "none", "-e", bpftrace_program(inode)]
        env = dict(os.environ, **{READY_MARKER: "1"})
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       env=env, start_new_session=True, preexec_fn=_die_with_parent)
        except OSError as err:
            raise DropReasonsUnavailable(f"cannot run bpftrace: {err.strerror}") from None
        fd = process.stdout.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        return cls(process)

    def fileno(self) -> int:
        return self.process.stdout.fileno()

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Block until bpftrace has attached its probe; raise DropReasonsUnavailable if it cannot."""
        deadline = time.monotonic() + timeout
        while not self.ready:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DropReasonsUnavailable(f"bpftrace did not start within {timeout:.0f} s")
            select.select([self.fileno()], [], [], min(left, 0.5))
            self._early.extend(self.read())
            if not self.ready and self.ended:
                self.process.wait()
                raise DropReasonsUnavailable(self.failure())

    def failure(self) -> str:
        """Why bpftrace stopped, in one line."""
        code = self.process.poll()
        if code == 97:
            return "tracefs is not mounted and could not be mounted (the skb:kfree_skb tracepoint needs it)"
        if code == 98:
            return "the kernel has no skb:kfree_skb tracepoint"
        lines = [line for line in self._diagnostics if "RLIMIT_MEMLOCK" not in line and line.strip()]
        detail = next((line for line in lines if "ERROR" in line), lines[-1] if lines else f"exit status {code}")
        return f"bpftrace failed: {detail.strip()}"

    def read(self) -> list:
        """Every drop line available now, without blocking."""
        while not self.ended:
            try:
                chunk = os.read(self.fileno(), 65536)
            except BlockingIOError:
                break
            if not chunk:
                self.ended = True
                self._buffer += b"\n"
            self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        drops, self._early = self._early, []
        for raw in lines:
            line = raw.decode(errors="replace")
            if line.startswith(DROP_PREFIX):
                drop = parse_drop_line(line, self.reason_names, self.symbols)
                if drop is not None:
                    drops.append(drop)
            else:
                self._note(line)
        return drops

    def _note(self, line: str) -> None:
        """Lines that are not drops: the format block, the ready marker, diagnostics."""
        if line == FORMAT_BEGIN:
            self._format = []
        elif line == FORMAT_END and self._format is not None:
            text = "\n".join(self._format)
            self._format = None
            if not has_reason_field(text):
                self.close()
                raise DropReasonsUnavailable("this kernel's skb:kfree_skb tracepoint has no drop reason (Linux 5.17 or later)")
            self.reason_names = parse_reason_names(text)
        elif self._format is not None:
            self._format.append(line)
        elif line.strip() == READY_MARKER:
            self.ready = True
        else:
            self._diagnostics = (self._diagnostics + [line])[-20:]

    def close(self) -> None:
        process = self.process
        self.ended = True
        # bpftrace (0.17) misses a SIGTERM that comes while it prints: ask again, then insist.
        # Killing it is safe: the kernel detaches its program when its file descriptors close.
        for _ in range(TERMINATE_ATTEMPTS):
            if process.poll() is not None:
                break
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(0.1)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if process.stdout is not None and not process.stdout.closed:
            process.stdout.close()

    def __enter__(self) -> "KernelDropWatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_drop_watcher(warn: Callable[[str], None]) -> Optional[KernelDropWatcher]:
    """A watcher for the current namespace, or None after one warning saying why not."""
    try:
        return KernelDropWatcher.start()
    except DropReasonsUnavailable as err:
        warn(f"kernel drop reasons unavailable: {err}")
        return None
