"""Kernel drops after netfilter: a bpftrace process that reports traced packets the kernel frees.

Netfilter is only part of a packet's way: after the last chain accepted it, the kernel can
still drop it (nothing listens on the port, reverse-path filter, no route, no neighbour, a
full queue). The kernel says so in the `skb:kfree_skb` tracepoint, with a drop reason and
the code location. `KernelDropWatcher` runs a small bpftrace program on that tracepoint that
reports only packets carrying the trace bit (`skb->nf_trace`, set by nftrace's mark chains)
in the traced network namespace, with the headers needed to tell which packet it was.
`correlator.DropCorrelator` (pure) pairs those drops with the packet paths.

The tracepoint needs tracefs. Where it is not mounted, bpftrace runs in a mount namespace of
its own with tracefs mounted there, so the machine's mount table never changes. The drop
reason names come from the tracepoint's own format file (the numbers differ between kernels).
"""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import signal
import subprocess
import time
from typing import Optional

from ..errors import EnvironmentProblem
from ..kernel import runner
from ..kernel.system import current_netns
from .reasons import DROP_PREFIX, has_reason_field, parse_drop_line, parse_reason_names

BTF_PATH = "/sys/kernel/btf/vmlinux"
KALLSYMS_PATH = "/proc/kallsyms"
BPFTRACE_ENV = "NFTRACE_BPFTRACE"  # path of the bpftrace to run (default: the one on PATH)
READY_MARKER = "__BPFTRACE_NOTIFY_PROBES_ATTACHED"  # bpftrace prints it once every probe is attached
FORMAT_BEGIN = "nftrace-format-begin"
FORMAT_END = "nftrace-format-end"
STARTUP_TIMEOUT = 15.0
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


class DropReasonsUnavailable(EnvironmentProblem):
    """Kernel drop reasons cannot be watched here; the trace goes on without them."""


def bpftrace_program(netns_inode: int) -> str:
    """The bpftrace program for one network namespace (its nsfs inode number)."""
    return _PROGRAM.replace("NETNS_INODE", str(int(netns_inode))).replace("DROP_PREFIX", DROP_PREFIX)


class KernelSymbols:
    """Kernel code addresses as `function+0xoffset`, from /proc/kallsyms.

    Resolved here rather than by bpftrace's ksym(), which reads the whole symbol table on
    first use and delays the first drop line by half a second. A drop location is looked up
    by one pass over the file (60 ms on the test VM), without keeping the table (tens of MB),
    and only when an answer shows the drop (reasons.KernelDrop.code_location).
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



# -- the bpftrace process ---------------------------------------------------------------------


def _run_as_batch_task(pid: int) -> None:
    """bpftrace is woken for every drop it reports (each printf is a perf event): under a
    flood of drops, thousands of times a second, and each wake-up preempted nftrace, whose
    reading of trace events decides whether the socket overflows. As a batch task
    (SCHED_BATCH: the normal scheduler, without wake-up preemption) it runs when nftrace waits
    or its time slice ends, and reads its perf buffer in bulk: a drop line comes at most a
    time slice later (the correlator waits far longer). In the drops flood of bench/run.py with
    a 16 MiB buffer, runs that lost events went from 4 in 12 to none in 15, and bpftrace's CPU
    from 0.1-0.2 s to 0.03 s. The policy holds across bpftrace's exec (same pid)."""
    try:
        os.sched_setscheduler(pid, os.SCHED_BATCH, os.sched_param(0))
    except OSError:
        pass  # the process already exited: its failure is read from its output


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


class KernelDropWatcher:
    """bpftrace on skb:kfree_skb for traced packets of one network namespace.

    `start()` spawns it and returns at once (its startup overlaps nftrace's own); `wait_ready()`
    blocks until every probe is attached. `close()` (or leaving the `with` block) stops it; it
    also dies with nftrace, whatever kills nftrace.
    """

    lost = 0  # drops it could not report: bpftrace's perf buffer loses them without a count here

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
        tools = {name: shutil.which(name) for name in ("setpriv", "unshare")}
        for name, path in tools.items():
            if path is None:
                raise DropReasonsUnavailable(f"{name} (util-linux) is not installed")
        inode = current_netns() if netns_inode is None else netns_inode
        # setpriv sets the parent-death signal in the child, before it becomes unshare, sh and then
        # bpftrace (execve keeps it): if nftrace dies, even by SIGKILL, so does bpftrace. Python's
        # preexec_fn would do the same from the forked child, which is unsafe while threads run.
        argv = [tools["setpriv"], "--pdeathsig", "KILL", "--", tools["unshare"], "--mount", "--propagation", "private",
                "--", "sh", "-c", _SETUP_SCRIPT, "nftrace-drops", bpftrace, "-B", "none", "-e", bpftrace_program(inode)]
        env = dict(os.environ, **{READY_MARKER: "1"})
        try:
            process = runner.start(argv, stderr=subprocess.STDOUT, env=env, new_session=True)
        except runner.CommandFailed as err:
            raise DropReasonsUnavailable(str(err)) from None
        _run_as_batch_task(process.pid)
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

    def read(self, limit: Optional[int] = None) -> list:
        """Every drop line available now, without blocking (`limit` is not kept to: a pipe holds
        too few lines for bpftrace to wait on)."""
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

