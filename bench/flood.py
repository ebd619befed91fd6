"""nftrace and `nft monitor trace` side by side on one flood of traced UDP packets.

client ── router ── server: the router carries a ruleset of a few chains and forwards the
flood; `nftrace why --count 0 --max-rate 0 --json` marks the flow there, and both listeners
receive the same trace events of the same packets. The server drops the datagrams (no ICMP
errors flow back). Everything runs in namespaces made for the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from bench import nftmonitor
from bench.probes import (
    CommitWatcher, Finished, exited, inside_netns, own_usage, reap, rss_bytes, trace_sockets, wait_for_ready,
    wait_for_trace_listener,
)
from nftrace.kernel.monitor import TraceMonitor
from nftrace.lab.topology import CLIENT_V4, SERVER_V4, Topology, in_netns

FLOOD_PORT = 5000
ROUTER_RULESET = f"""
table inet fw {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state invalid drop
        iifname "r-client" jump from_clients
    }}
    chain from_clients {{
        ip saddr 10.77.1.0/24 jump udp_services
    }}
    chain udp_services {{
        udp dport 53 accept
        udp dport {FLOOD_PORT}-{FLOOD_PORT + 100} counter accept
    }}
}}
"""
SERVER_RULESET = f"""
table inet sink {{
    chain input {{ type filter hook input priority filter; policy accept; udp dport {FLOOD_PORT} drop; }}
}}
"""
EXPECTED_HOOKS = ["prerouting", "forward", "postrouting"]
NFTRACE_SETTLE_SECONDS = 3.0  # past nftrace's idle expiry (2 s): packets that went idle are out
MONITOR_SETTLE_SECONDS = 1.0


@dataclass
class ToolResult:
    """What one listener made of the flood."""

    name: str
    complete: int = 0
    incomplete_reported: int = 0
    loss_reported: str = "none"
    loss_reported_count: Optional[int] = None  # None: the tool gives no count
    kernel_drops: int = 0  # the kernel's drop counter of the tool's trace socket
    drained_after: Optional[float] = None  # seconds after the flood ended, until its last output
    unaccounted: int = 0  # packets sent that were shown neither complete nor incomplete
    finished: Optional[Finished] = None  # the process and the children it reaped (wait4)
    own_cpu_seconds: Optional[float] = None  # the process alone, children not included
    own_max_rss_bytes: Optional[int] = None
    exit_code: Optional[int] = None
    stderr: str = ""

    @property
    def silent_loss(self) -> bool:
        """Packets neither shown complete, nor shown incomplete, nor covered by a loss report."""
        return self.loss_reported == "none" and self.unaccounted > 0


@dataclass
class FloodResult:
    packets: int
    sent: int
    flood_seconds: float
    events_per_packet: Optional[float]
    nftrace: ToolResult
    monitor: ToolResult
    rules_installed_after: Optional[float]
    rss_while_streaming: list = field(default_factory=list)  # (seconds since flood end, bytes)
    datagrams: list = field(default_factory=list)  # recorded trace datagrams (calibration only)
    reference_path: Optional[tuple] = None
    rcvbuf: str = ""


class Lab:
    """The namespaces and rulesets of the flood, removed by `down()` whatever happened."""

    def __init__(self, prefix: str):
        self.topology = Topology(prefix)

    def up(self) -> "Lab":
        self.topology.up()
        in_netns(self.topology.router, ["nft", "-f", "-"], input=ROUTER_RULESET)
        in_netns(self.topology.server, ["nft", "-f", "-"], input=SERVER_RULESET)
        return self

    def down(self) -> None:
        self.topology.down()

    @property
    def router(self) -> str:
        return self.topology.router


def nftrace_command(netns: str, *, max_rate: int, timeout: float) -> list[str]:
    return [sys.executable, "-m", "nftrace", "--netns", netns, "why", "--from", CLIENT_V4, "--to", SERVER_V4,
            "--proto", "udp", "--dport", str(FLOOD_PORT), "--count", "0", "--max-rate", str(max_rate), "--json",
            "--timeout", str(timeout)]


def flood_command(lab: Lab, packets: int, rate: float) -> list[str]:
    return ["ip", "netns", "exec", lab.topology.client, sys.executable, "-m", "nftrace.lab.traffic", "udp", SERVER_V4,
            str(FLOOD_PORT), "--count", str(packets), "--rate", str(rate), "--max-seconds", "120"]


def _queued(pid: int) -> tuple[int, int]:
    """(bytes waiting in the process's trace sockets, events the kernel dropped on them)."""
    sockets = trace_sockets(pid)
    return sum(s.queued_bytes for s in sockets), sum(s.drops for s in sockets)


def _stop(process: subprocess.Popen, started: float) -> Finished:
    if process.returncode is None:
        try:
            process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    finished = reap(process.pid, started)
    process.returncode = finished.exit_code
    return finished


def _kill(process: Optional[subprocess.Popen]) -> None:
    """Last resort on the way out of a failed run: never leave a listener behind."""
    if process is not None and process.returncode is None:
        try:
            process.kill()
            process.wait(5)
        except (ProcessLookupError, ChildProcessError, subprocess.TimeoutExpired):
            pass


def run_flood(lab: Lab, packets: int, workdir: Path, *, rate: float = 0.0, record: bool = False, monitor: bool = True,
              max_rate: int = 0, reference: Optional[tuple] = None) -> FloodResult:
    """One side-by-side run: nft monitor (unless `monitor` is False) and nftrace listen while
    `packets` UDP datagrams are sent (at `rate` a second, 0: as fast as Python sends them);
    their output goes to `workdir`, which the caller removes."""
    watcher = CommitWatcher(lab.router)
    recorder = None
    nft_process = nftrace_process = None
    try:
        nft_started = time.monotonic()
        if monitor:
            nft_out = open(workdir / "nft-monitor.txt", "w")
            nft_process = subprocess.Popen(["ip", "netns", "exec", lab.router, "nft", "monitor", "trace"],
                                           stdout=nft_out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            nft_out.close()
            if not wait_for_trace_listener(nft_process.pid, 10):
                raise RuntimeError("nft monitor trace did not start listening")
        if record:
            with inside_netns(lab.router):
                recorder = TraceMonitor(256 << 20)
        timeout = 120 + packets / 500
        nftrace_out = open(workdir / "nftrace.json", "w")
        nftrace_err = open(workdir / "nftrace.err", "w")
        nftrace_started = time.monotonic()
        nftrace_process = subprocess.Popen(nftrace_command(lab.router, max_rate=max_rate, timeout=timeout),
                                           stdout=nftrace_out, stderr=nftrace_err, stdin=subprocess.DEVNULL)
        nftrace_out.close()
        nftrace_err.close()
        installed = watcher.rules_installed("nftrace_", 30)
        if installed is None:
            raise RuntimeError(f"nftrace did not install its trace rules: {(workdir / 'nftrace.err').read_text()}")
        rules_installed_after = installed - nftrace_started
        # As a script would: traffic once nftrace says it traces (its drop watcher attached).
        if not wait_for_ready(workdir / "nftrace.err", "(Ctrl-C to stop)", nftrace_process.pid, 60):
            raise RuntimeError(f"nftrace did not get ready: {(workdir / 'nftrace.err').read_text()}")

        flood_started = time.monotonic()
        sender = subprocess.Popen(flood_command(lab, packets, rate), stdout=subprocess.PIPE, text=True,
                                  stdin=subprocess.DEVNULL)
        rss_samples, flood_ended, drained = _follow(sender, nft_process, nftrace_process, workdir, flood_started,
                                                    flood_deadline=flood_started + 180,
                                                    drain_seconds=60 + packets / 1000)
        sent = int(sender.stdout.read().strip() or 0)
        sender.stdout.close()
        nft_drops = _queued(nft_process.pid)[1] if nft_process else 0
        nftrace_drops = _queued(nftrace_process.pid)[1]
        nftrace_own = own_usage(nftrace_process.pid)
        datagrams = []
        if recorder is not None:
            datagrams = [d for d in recorder.read_raw() if d is not None]
        nftrace_finished = _stop(nftrace_process, nftrace_started)
        nft_finished = _stop(nft_process, nft_started) if nft_process else None
    finally:
        _kill(nftrace_process)
        _kill(nft_process)
        watcher.close()
        if recorder is not None:
            recorder.close()

    nftrace_result = _nftrace_result(workdir, sent, nftrace_finished, nftrace_drops, drained.get("nftrace"))
    nftrace_result.own_cpu_seconds, nftrace_result.own_max_rss_bytes = nftrace_own
    monitor_output = None
    if nft_process:
        with open(workdir / "nft-monitor.txt") as lines:
            monitor_output = nftmonitor.parse(lines)
        reference = reference or nftmonitor.reference_path(monitor_output)
    monitor_result = _monitor_result(monitor_output, reference, sent, nft_finished, nft_drops, drained.get("nft"))
    return FloodResult(
        packets=packets,
        sent=sent,
        flood_seconds=flood_ended - flood_started,
        events_per_packet=(len(datagrams) / sent) if datagrams and sent else None,
        nftrace=nftrace_result,
        monitor=monitor_result,
        rules_installed_after=rules_installed_after,
        rss_while_streaming=rss_samples,
        datagrams=datagrams,
        reference_path=reference,
    )


def _follow(sender, nft_process, nftrace_process, workdir: Path, flood_started: float, flood_deadline: float,
            drain_seconds: float, outputs: Optional[dict] = None):
    """Watch the flood, then each listener until its socket is empty and its output has not
    grown for a while.

    Returns nftrace's resident memory over time (seconds since the flood started, bytes),
    when the flood ended, and, per tool, how long after the flood's end its output last grew.
    """
    if outputs is None:
        outputs = {"nftrace": (nftrace_process, workdir / "nftrace.json", NFTRACE_SETTLE_SECONDS)}
        if nft_process:
            outputs["nft"] = (nft_process, workdir / "nft-monitor.txt", MONITOR_SETTLE_SECONDS)
    sizes = {name: -1 for name in outputs}
    grew_at = {name: flood_started for name in outputs}
    done: dict = {}
    rss_samples = []
    flood_ended = None
    deadline = flood_deadline
    while len(done) < len(outputs) and time.monotonic() < deadline:
        now = time.monotonic()
        rss = rss_bytes(nftrace_process.pid) if nftrace_process is not None else None
        if rss is not None and "nftrace" not in done:
            rss_samples.append((now - flood_started, rss))
        for name, (process, path, settle) in outputs.items():
            size = path.stat().st_size
            if size != sizes[name]:
                sizes[name], grew_at[name] = size, now
            if flood_ended is None or name in done:
                continue
            queued, _ = _queued(process.pid)
            if exited(process.pid) or (queued == 0 and now - grew_at[name] >= settle):
                done[name] = max(0.0, grew_at[name] - flood_ended)
        if flood_ended is None and sender.poll() is not None:
            flood_ended = now
            deadline = now + drain_seconds
        time.sleep(0.05)
    if flood_ended is None:
        sender.kill()
        sender.wait()
        raise RuntimeError("the flood did not end in time")
    return rss_samples, flood_ended, done


def _nftrace_result(workdir: Path, sent: int, finished: Finished, kernel_drops: int,
                    drained_after: Optional[float]) -> ToolResult:
    result = ToolResult("nftrace why", finished=finished, exit_code=finished.exit_code, kernel_drops=kernel_drops,
                        drained_after=drained_after, stderr=(workdir / "nftrace.err").read_text())
    try:
        document = read_json_stream(workdir / "nftrace.json")
    except ValueError:
        raise RuntimeError(f"nftrace's output is not one JSON document (exit {finished.exit_code}): "
                           f"{result.stderr.strip()[-500:]}") from None
    for packet in document["packets"]:
        if packet["complete"] and packet["verdict"] == "accept" and packet["hooks"] == EXPECTED_HOOKS:
            result.complete += 1
        elif not packet["complete"]:
            result.incomplete_reported += 1
    lost = document.get("lost_events", 0)
    result.loss_reported_count = lost
    result.loss_reported = f"{lost:,} events" if lost else "none"
    result.unaccounted = max(0, sent - result.complete - result.incomplete_reported)
    return result


def read_json_stream(path: Path) -> dict:
    """nftrace's --json document, read a packet line at a time (trace/jsonstream.py writes one
    packet per line): a flood's 200 MB document read whole would make this process a GiB,
    and every process it starts afterwards inherits that peak in its own figures. Packets
    are kept only as far as the benchmark reads them."""
    keep = ("complete", "verdict", "hooks")
    with open(path) as lines:
        header = next(lines)
        if not header.rstrip().endswith('"packets": ['):
            return json.loads(header + lines.read())  # not written packet by packet
        document = json.loads(header.rstrip()[:-len('"packets": [')].rstrip().rstrip(",") + "}")
        packets = []
        for line in lines:
            if line.startswith("  {") or line.startswith(", {"):
                packet = json.loads(line[2:])
                packets.append({key: packet.get(key) for key in keep})
            elif line.startswith("]"):
                document.update(json.loads("{" + line[line.index(",") + 1:]) if "," in line else {})
        document["packets"] = packets
    return document


def _monitor_result(output, reference, sent: int, finished: Optional[Finished], kernel_drops: int,
                    drained_after: Optional[float]) -> ToolResult:
    result = ToolResult("nft monitor trace", finished=finished, kernel_drops=kernel_drops, drained_after=drained_after,
                        exit_code=finished.exit_code if finished else None)
    if output is None:
        return result
    result.complete = nftmonitor.complete_paths(output, reference) if reference else 0
    result.incomplete_reported = 0  # it has no notion of an incomplete packet
    if output.loss_notices:
        result.loss_reported = f"{output.loss_notices} \"lost some events\" line{'s' if output.loss_notices > 1 else ''}, no count"
    result.unaccounted = max(0, sent - result.complete)
    return result


def machine() -> dict:
    """What the figures were taken on."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = None
    try:
        with open("/proc/meminfo") as info:
            memory = int(info.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    nft = subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip()
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": os.uname().release, "memory": memory, "nft": nft,
            "python": sys.version.split()[0], "load": os.getloadavg()[0]}
