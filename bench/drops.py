"""`nftrace drops` against what an admin would do instead, on one flood with one drop in ten.

The router's ruleset drops one packet in ten of port DROPS_PORT (a numgen rule with a
counter, in the chain the flood's packets jump to). Three runs, one after the other, on the
same flood:
- the admin's way: a catch-all trace rule (`meta nftrace set 1` at prerouting, in a table of
  its own) and `nft monitor trace`, its drop verdicts counted afterwards (what `| grep drop`
  would show);
- `nftrace drops --max-rate 0 --json` as it comes (its receive buffer for --max-rate 0: 1 GiB,
  a limit that costs only what is queued), stopped with SIGTERM once the flood is over;
- the same with the buffer capped at 16 MiB (NFTRACE_RCVBUF), as nft monitor's: whether it keeps
  up without a backlog that a small buffer could not hold.
Each is compared with the rule's counter: drops reported, lost events, CPU, memory, and how
long after the flood its last report came.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from bench.flood import FLOOD_PORT, Lab, _follow, _kill, _queued, _stop
from bench.probes import CommitWatcher, Finished, own_usage, wait_for_ready, wait_for_trace_listener
from nftrace.lab.topology import SERVER_V4, in_netns

DROPS_PORT = FLOOD_PORT + 1
RCVBUF = 16 << 20
DROP_RULE = f'udp dport {DROPS_PORT} numgen inc mod 10 0 counter drop comment "one in ten"'
ADMIN_TABLE = """
table inet admintrace {
    chain pre { type filter hook prerouting priority -350; meta nftrace set 1; }
}
"""


@dataclass
class DropsToolResult:
    name: str
    drops_reported: int = 0
    rule_counter: int = 0  # the drop rule's counter over the run
    loss_reported: str = "none"
    kernel_drops: int = 0
    drained_after: Optional[float] = None
    finished: Optional[Finished] = None
    own_cpu_seconds: Optional[float] = None
    own_max_rss_bytes: Optional[int] = None
    rss_while_streaming: list = field(default_factory=list)
    stderr: str = ""

    @property
    def every_drop(self) -> bool:
        return self.drops_reported == self.rule_counter and self.rule_counter > 0


@dataclass
class DropsFloodResult:
    sent: int
    admin: DropsToolResult
    nftrace: DropsToolResult  # with its own receive buffer
    capped: DropsToolResult  # with the buffer capped at RCVBUF
    admin_flood_seconds: float = 0.0
    nftrace_flood_seconds: float = 0.0
    capped_flood_seconds: float = 0.0


def add_drop_rule(lab: Lab) -> None:
    in_netns(lab.router, ["nft", "-f", "-"], input=f"insert rule inet fw udp_services {DROP_RULE}\n")


def rule_counter(lab: Lab) -> int:
    listing = json.loads(in_netns(lab.router, ["nft", "-j", "list", "chain", "inet", "fw", "udp_services"]).stdout)
    for item in listing["nftables"]:
        rule = item.get("rule")
        if rule and rule.get("comment") == "one in ten":
            for expr in rule["expr"]:
                if "counter" in expr:
                    return expr["counter"]["packets"]
    raise RuntimeError("the benchmark's drop rule is missing")


def flood(lab: Lab, packets: int) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", lab.topology.client, sys.executable, "-m", "nftrace.lab.traffic",
                             "udp", SERVER_V4, str(DROPS_PORT), "--count", str(packets), "--max-seconds", "120"],
                            stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def run_admin(lab: Lab, packets: int, workdir: Path) -> tuple[DropsToolResult, int, float]:
    """A catch-all trace rule and `nft monitor trace`; drops are its `(verdict drop)` lines."""
    result = DropsToolResult("nft monitor trace + catch-all trace rule")
    before = rule_counter(lab)
    in_netns(lab.router, ["nft", "-f", "-"], input=ADMIN_TABLE)
    process = None
    try:
        started = time.monotonic()
        out = open(workdir / "admin.txt", "w")
        process = subprocess.Popen(["ip", "netns", "exec", lab.router, "nft", "monitor", "trace"], stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()
        if not wait_for_trace_listener(process.pid, 10):
            raise RuntimeError("nft monitor trace did not start listening")
        _, sent, seconds = _measure(lab, packets, process, started, workdir / "admin.txt", 1.0, result, workdir)
    finally:
        _kill(process)
        in_netns(lab.router, ["nft", "delete", "table", "inet", "admintrace"], check=False)
    result.rule_counter = rule_counter(lab) - before
    notices = 0
    with open(workdir / "admin.txt") as lines:
        for line in lines:
            if line.startswith("# ERROR: We lost some netlink events"):
                notices += 1
            elif "(verdict drop)" in line and f"dport {DROPS_PORT}" in line:
                result.drops_reported += 1
    if notices:
        result.loss_reported = f"{notices} \"lost some events\" line{'s' if notices > 1 else ''}, no count"
    return result, sent, seconds


def _measure(lab: Lab, packets: int, process: subprocess.Popen, started: float, output: Path, settle: float,
             result: DropsToolResult, workdir: Path, sample_rss: bool = False) -> tuple[list, int, float]:
    """Flood, follow the tool until its output settles, then stop it and take its figures.
    Returns its resident memory over time (when sampled), packets sent, the flood's seconds."""
    flood_started = time.monotonic()
    sender = flood(lab, packets)
    rss, flood_ended, drained = _follow(sender, None, process if sample_rss else None, workdir, flood_started,
                                        flood_started + 180, 60 + packets / 1000,
                                        outputs={result.name: (process, output, settle)})
    sent = int(sender.stdout.read().strip() or 0)
    sender.stdout.close()
    result.kernel_drops = _queued(process.pid)[1]
    result.own_cpu_seconds, result.own_max_rss_bytes = own_usage(process.pid)
    result.finished = _stop(process, started)
    result.drained_after = drained.get(result.name)
    return rss, sent, flood_ended - flood_started


def run_nftrace(lab: Lab, packets: int, workdir: Path, rcvbuf: Optional[int] = None) -> tuple[DropsToolResult, int,
                                                                                               float]:
    """`nftrace drops --max-rate 0 --json` (its receive buffer capped at `rcvbuf` bytes), stopped
    by SIGTERM once the flood has drained."""
    result = DropsToolResult("nftrace drops" if rcvbuf is None else f"nftrace drops, {rcvbuf >> 20} MiB")
    name = "drops" if rcvbuf is None else f"drops-{rcvbuf >> 20}m"
    env = {key: value for key, value in os.environ.items() if key != "NFTRACE_RCVBUF"}
    if rcvbuf is not None:
        env["NFTRACE_RCVBUF"] = str(rcvbuf)
    before = rule_counter(lab)
    watcher = CommitWatcher(lab.router)
    process = None
    try:
        started = time.monotonic()
        out, err = open(workdir / f"{name}.json", "w"), open(workdir / f"{name}.err", "w")
        process = subprocess.Popen([sys.executable, "-m", "nftrace", "--netns", lab.router, "drops", "--proto", "udp",
                                    "--max-rate", "0", "--json"], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                   env=env)
        out.close()
        err.close()
        if watcher.rules_installed("nftrace_", 30) is None or \
                not wait_for_ready(workdir / f"{name}.err", "watching drops", process.pid, 60):
            raise RuntimeError(f"nftrace drops did not get ready: {(workdir / f'{name}.err').read_text()}")
        rss, sent, seconds = _measure(lab, packets, process, started, workdir / f"{name}.json", 3.0, result, workdir,
                                      sample_rss=True)
        result.rss_while_streaming = [(t, value) for t, value in rss
                                      if result.drained_after is None or t <= seconds + result.drained_after]
    finally:
        _kill(process)
        watcher.close()
    result.rule_counter = rule_counter(lab) - before
    result.stderr = (workdir / f"{name}.err").read_text()
    try:
        document = json.loads((workdir / f"{name}.json").read_text())
    except ValueError:
        raise RuntimeError(f"nftrace drops' output is not one JSON document: {result.stderr[-500:]}") from None
    for rule in document["rules"]:
        if rule["decided_by"] and "one in ten" in (rule["decided_by"]["text"] or ""):
            result.drops_reported += rule["packets"]
    lost = document.get("lost_events", 0)
    result.loss_reported = f"{lost:,} events" if lost else "none"
    return result, sent, seconds


def run_drops_flood(lab: Lab, packets: int, workdir: Path) -> DropsFloodResult:
    add_drop_rule(lab)
    admin, sent, admin_seconds = run_admin(lab, packets, workdir)
    mine, sent_mine, mine_seconds = run_nftrace(lab, packets, workdir)
    capped, sent_capped, capped_seconds = run_nftrace(lab, packets, workdir, RCVBUF)
    return DropsFloodResult(min(sent, sent_mine, sent_capped), admin, mine, capped, admin_seconds, mine_seconds,
                            capped_seconds)
