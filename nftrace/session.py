"""`nftrace why`: put trace rules in, read events while traffic flows, take the rules out.

Everything that changes the kernel is undone in `finally` blocks, and SIGTERM/SIGHUP are
turned into an exception so that those blocks run for them as they do for Ctrl-C and for
crashes; SIGKILL is covered by the trace table's `flags owner`.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from .errors import EnvironmentProblem, KernelError, NftraceError, TraceTableGone
from .events import TraceEvent
from .flow import Flow
from .monitor import EventsLost, RulesetChanged, TableDeleted, TraceMonitor
from .nft import NftContext
from .paths import PacketPath, PathBuilder
from .rcvbuf import loss_warning, receive_buffer_size
from .report import TraceReport
from .ruleset import RulesetSnapshot
from .system import enter_namespace, interface_index, interface_names, require_net_admin
from .tracetable import DEFAULT_MAX_RATE, TraceTable, remove_leftover_tables

COMMAND_GRACE_SECONDS = 0.5
POLL_SECONDS = 0.2


class Interrupted(BaseException):
    """A signal asked nftrace to stop; cleanup runs, then the exit status says which."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@dataclass
class TraceOptions:
    flow: Flow
    netns: Optional[str] = None
    count: int = 10
    timeout: float = 60.0
    max_rate: int = DEFAULT_MAX_RATE
    command: list = field(default_factory=list)
    idle_seconds: float = 2.0
    rcvbuf: Optional[int] = None  # None: sized from max_rate (rcvbuf.py)


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


class _SignalsAsExceptions:
    """SIGTERM and SIGHUP end the run the way Ctrl-C does: through every finally block."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __enter__(self):
        self._previous = {signum: signal.signal(signum, _raise_interrupted) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def prepare_namespace(options: TraceOptions) -> None:
    """Checks that need no kernel change, in the order a user would fix them."""
    require_net_admin()
    if options.netns:
        enter_namespace(options.netns)
    for name, option in ((options.flow.iif, "--iif"), (options.flow.oif, "--oif")):
        if name:
            interface_index(name, option)


def open_nftables() -> NftContext:
    nft = NftContext()
    try:
        nft.run("list chains")  # not `list tables`: nft 1.0.6 fetches the whole ruleset for that
    except KernelError as err:
        raise EnvironmentProblem(f"nf_tables is not available in this kernel or namespace ({err})") from None
    return nft


class TraceSession:
    """One live trace. `run(on_packet)` calls `on_packet` for each packet of the flow."""

    def __init__(self, options: TraceOptions, report: TraceReport):
        self.options = options
        self.report = report
        self.packets_seen = 0
        self._process: Optional[subprocess.Popen] = None

    def run(self, on_packet: Callable[[PacketPath], None], on_batch: Optional[Callable[[], None]] = None) -> None:
        """`on_batch` is called after each batch of events read: the moment to flush output."""
        options = self.options
        rcvbuf = options.rcvbuf or receive_buffer_size(options.max_rate)
        with _SignalsAsExceptions():
            prepare_namespace(options)
            nft = open_nftables()
            # Tables only until the trace rules are in: a full listing of a big ruleset takes
            # long, and it is taken once they are in anyway.
            snapshot = RulesetSnapshot.take_tables(nft)
            removed = remove_leftover_tables(nft, snapshot)
            if removed:
                self.report.warnings.append(f"removed trace tables left by killed nftrace runs: {', '.join(removed)}")
            self.report.interfaces = interface_names()
            with TraceMonitor(rcvbuf) as monitor, TraceTable(nft, options.flow, options.max_rate) as table:
                monitor.watch_ruleset()
                snapshot.refresh(nft.run("list ruleset", handles=True, stateless=True, terse=True))
                builder = PathBuilder(snapshot, keep=self._keep, idle_seconds=options.idle_seconds)
                try:
                    self._start_command()
                    self._loop(nft, snapshot, monitor, table, builder, on_packet, on_batch)
                finally:
                    self._stop_command()
                    self.report.lost_events = monitor.dropped_messages() or monitor.overruns
                    if self.report.lost_events:
                        self.report.warnings.append(loss_warning(self.report.lost_events, rcvbuf, options.max_rate))

    def _keep(self, path: PacketPath) -> bool:
        packet = path.first_packet
        return self.options.flow.matches(packet.src, packet.dst, packet.proto, packet.sport, packet.dport)

    def _wanted(self, path: PacketPath) -> bool:
        """--oif cannot be matched where the packet is marked (before routing): filter here."""
        oif = self.options.flow.oif
        if not oif:
            return True
        return self.report.interfaces.get(path.interface_index("oif") or -1) == oif

    def _start_command(self) -> None:
        if not self.options.command:
            return
        try:
            # The command's output goes to stderr, so that stdout stays nftrace's (and valid JSON).
            self._process = subprocess.Popen(self.options.command, stdout=sys.stderr.fileno(), stdin=subprocess.DEVNULL)
        except OSError as err:
            raise NftraceError(f"cannot run {self.options.command[0]}: {err.strerror}") from None

    def _stop_command(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(2)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _loop(self, nft, snapshot, monitor, table, builder, on_packet, on_batch=None) -> None:
        options = self.options
        start = time.monotonic()
        deadline = start + options.timeout if options.timeout else None
        command_done_at = None

        def deliver(paths):
            for path in paths:
                if not self._wanted(path):
                    continue
                self.packets_seen += 1
                on_packet(path)

        while True:
            now = time.monotonic()
            if options.count and self.packets_seen >= options.count:
                return
            if deadline is not None and now >= deadline:
                break
            if self._process is not None and command_done_at is None and self._process.poll() is not None:
                command_done_at = now
            # A backlog still in the socket belongs to the command's packets: read it all first.
            if command_done_at is not None and monitor.drained and now - command_done_at >= COMMAND_GRACE_SECONDS:
                if builder.open_packets == 0 or now - command_done_at >= options.idle_seconds + COMMAND_GRACE_SECONDS:
                    break
            wait = POLL_SECONDS if deadline is None else min(POLL_SECONDS, deadline - now)
            if monitor.wait(wait):
                for item in monitor.read():
                    if isinstance(item, TraceEvent):
                        deliver(builder.feed(item, time.monotonic()))
                        if options.count and self.packets_seen >= options.count:
                            return
                    elif isinstance(item, RulesetChanged):
                        snapshot.refresh(nft.run("list ruleset", handles=True, stateless=True, terse=True))
                    elif isinstance(item, EventsLost):
                        builder.mark_loss()
                    elif isinstance(item, TableDeleted) and item.name == table.name:
                        table.installed = False
                        raise TraceTableGone(f"nftrace's table inet {table.name} was deleted by someone else; stopping")
            deliver(builder.expire(time.monotonic()))
            if on_batch is not None:
                on_batch()
        deliver(builder.flush())
