"""A second signal while nftrace undoes its changes changes nothing (issue 19).

The impatient user: SIGTERM, and a moment later Ctrl-C (or any two of SIGINT, SIGTERM,
SIGHUP) while the first stop's cleanup is still running; or a barrage of them until the
process is gone. Whatever the gaps, the namespace's nftables ruleset, legacy iptables tables
and nf_log bindings are exactly what they were before, nothing of nftrace's stays behind,
and the exit status is the first signal's.

nftrace runs in a session of its own (a background job of a shell would ignore SIGINT, and
the Ctrl-C part would test nothing). The gaps are random; the seed is in every failure
message (NFTRACE_SIGNAL_SEED repeats a run, NFTRACE_SIGNAL_RUNS makes it longer).
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, load_ruleset
from nftrace.lab.topology import Topology, in_netns

pytestmark = pytest.mark.kernel

RUNS = int(os.environ.get("NFTRACE_SIGNAL_RUNS", "10"))
SEED = int(os.environ.get("NFTRACE_SIGNAL_SEED", str(time.time_ns() % 1_000_000)))
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
MAX_GAP = 0.08
BARRAGE_PAUSE = 0.002
STATE_DIR = Path(os.environ.get("NFTRACE_STATE_DIR", "/run/nftrace"))

RULESET = """
table inet fw {
    chain forward {
        type filter hook forward priority filter; policy accept;
        tcp dport 25 counter drop
    }
}
"""
# Legacy tables of the flow's family: `why` binds nfnetlink_log for IPv4 in the namespace.
LEGACY = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -p tcp -m tcp --dport 25 -j LOG --log-prefix "smtp "
-A FORWARD -p tcp -m tcp --dport 25 -j DROP
COMMIT
"""
FLOW = ["--from", "127.0.0.1", "--to", "127.0.0.1", "--proto", "tcp", "--dport", "25"]


def legacy_save(ns: str, tool: str) -> str:
    return "".join(line + "\n" for line in in_netns(ns, [tool]).stdout.splitlines() if not line.startswith("#"))


def firewall_state(ns: str) -> dict:
    """Everything nftrace may touch in the namespace, as text."""
    return {
        "ruleset": in_netns(ns, ["nft", "-s", "list", "ruleset"]).stdout,
        "iptables": legacy_save(ns, "iptables-legacy-save"),
        "ip6tables": legacy_save(ns, "ip6tables-legacy-save"),
        "nf_log": in_netns(ns, ["cat", "/proc/net/netfilter/nf_log"]).stdout,
    }


@pytest.fixture
def router(netns):
    """A namespace with nftables rules, legacy iptables rules, and nf_log_ipv4 as its IPv4 logger."""
    ns = netns("sig")
    load_ruleset(ns, RULESET)
    in_netns(ns, ["iptables-legacy-restore"], input=LEGACY)
    in_netns(ns, ["sysctl", "-qw", "net.netfilter.nf_log.2=nf_log_ipv4"])
    before = firewall_state(ns)
    assert "nf_log_ipv4" in before["nf_log"].splitlines()[2] and "-j LOG" in before["iptables"]
    return ns


def start(*args: str) -> subprocess.Popen:
    """nftrace in a session (and process group) of its own, so that SIGINT reaches it as Ctrl-C would."""
    return subprocess.Popen([sys.executable, "-m", "nftrace", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))


def wait_for_line(process: subprocess.Popen, prefix: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stderr], [], [], deadline - time.monotonic())
        line = process.stderr.readline() if ready else ""
        if line.startswith(prefix):
            return
        assert line or process.poll() is None, f"nftrace ended before '{prefix}': {process.stderr.read()}"
    pytest.fail(f"no '{prefix}' line from nftrace within {seconds:g} s")


def send(process: subprocess.Popen, signum: int) -> bool:
    """Signal the process if it has not exited yet; whether it was sent."""
    if process.poll() is not None:
        return False
    process.send_signal(signum)
    return True


def wait_until_taken(process: subprocess.Popen, signum: int, seconds: float = 5.0) -> None:
    """Until the kernel has handed the signal to one of the process's threads.

    Two signals pending together (sent before the process had the CPU again) are handed over
    in an order of the kernel's, not the order they were sent in: no process can tell which
    came first then, and the test would ask the impossible. So the gap starts once the first
    one has left the process's pending set (ShdPnd in /proc/PID/status)."""
    deadline = time.monotonic() + seconds
    while process.poll() is None and time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
        except OSError:
            return  # gone meanwhile
        pending = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("ShdPnd:"))
        if not pending & (1 << (signum - 1)):
            return
        time.sleep(0.0005)


def stop_impatiently(process: subprocess.Popen, rng: random.Random, barrage: bool) -> tuple:
    """A first stop signal, then a second one after a random gap (or a barrage of them until the
    process is gone); returns the first signal and whether it reached the process."""
    first, second = rng.choice(STOP_SIGNALS), rng.choice(STOP_SIGNALS)
    sent = send(process, first)
    if sent:
        wait_until_taken(process, first)
    time.sleep(rng.uniform(0, MAX_GAP))
    send(process, second)
    while barrage and process.poll() is None:
        send(process, rng.choice(STOP_SIGNALS))
        time.sleep(BARRAGE_PAUSE)
    return first, sent


def assert_stopped_by(process: subprocess.Popen, first: int, sent: bool, what: str) -> str:
    """The exit status is the first signal's: 128+N, or death by it once everything was undone."""
    returncode = process.wait(60)
    stderr = process.stderr.read()
    if sent:
        assert returncode in (128 + first, -first), (
            f"{what}: first signal {signal.Signals(first).name}, exit status {returncode}: {stderr}")
    return stderr


def own_leftovers(pid: int) -> list:
    """Sandboxes and state files that carry the run's pid."""
    netns = [name for name in os.listdir("/run/netns") if f"-{pid}-" in name] if os.path.isdir("/run/netns") else []
    state = [path.name for path in STATE_DIR.glob(f"*-{pid}.json")] if STATE_DIR.is_dir() else []
    return netns + state


def test_two_signals_at_random_gaps_during_a_trace_leave_ruleset_legacy_tables_and_nf_log_as_they_were(router):
    rng = random.Random(SEED)
    before = firewall_state(router)
    for run in range(RUNS):
        what = f"run {run}, seed {SEED}"
        process = start("--netns", router, "why", *FLOW, "--count", "0", "--timeout", "60", "--no-drop-reasons")
        wait_for_line(process, "tracing ")
        assert firewall_state(router)["nf_log"] != before["nf_log"], f"{what}: nfnetlink_log was not bound"
        time.sleep(rng.uniform(0, 0.2))  # the first signal at a random point of the trace
        first, sent = stop_impatiently(process, rng, barrage=run % 2 == 1)
        stderr = assert_stopped_by(process, first, sent, what)
        assert firewall_state(router) == before, f"{what}: {stderr}"
        assert own_leftovers(process.pid) == [], what


def test_signals_while_a_normal_end_removes_the_table_leave_the_ruleset_byte_identical(router):
    """SIGTERM during the removal of nftrace's table (issue 13): the run ends by --timeout,
    and SIGTERMs keep coming from just before that end until the process is gone."""
    before = firewall_state(router)
    for run in range(max(2, RUNS // 2)):
        process = start("--netns", router, "why", *FLOW, "--timeout", "0.5", "--no-drop-reasons")
        wait_for_line(process, "tracing ")
        signalled = False
        while process.poll() is None:
            signalled = send(process, signal.SIGTERM) or signalled
            time.sleep(BARRAGE_PAUSE)
        stderr = assert_stopped_by(process, signal.SIGTERM, signalled, f"run {run}")
        assert firewall_state(router) == before, stderr
        assert own_leftovers(process.pid) == []


def test_two_signals_at_random_gaps_during_a_dry_run_leave_the_namespace_and_no_sandbox(router):
    rng = random.Random(SEED + 1)
    before = firewall_state(router)
    for run in range(max(2, RUNS // 2)):
        what = f"run {run}, seed {SEED + 1}"
        process = start("--netns", router, "why", *FLOW, "--dry-run", "--json")
        # The sandbox exists: the dry run is under way. Then signals at a random point of it.
        deadline = time.monotonic() + 30
        while not own_leftovers(process.pid) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.5))
        first, sent = stop_impatiently(process, rng, barrage=run % 2 == 1)
        stderr = assert_stopped_by(process, first, sent, what)
        assert firewall_state(router) == before, f"{what}: {stderr}"
        assert own_leftovers(process.pid) == [], f"{what}: {stderr}"


def lab_namespaces(prefix: str) -> list:
    return sorted(name for name in os.listdir("/run/netns") if name.startswith(f"{prefix}-"))


def test_two_signals_at_random_gaps_during_lab_down_leave_no_half_lab(netns):
    from conftest import unique_name

    rng = random.Random(SEED + 2)
    prefix = unique_name("lab")
    state = STATE_DIR / f"lab-{prefix}.json"
    try:
        for run in range(max(2, RUNS // 3)):
            what = f"run {run}, seed {SEED + 2}"
            up = subprocess.run([sys.executable, "-m", "nftrace", "lab", "up", "--prefix", prefix, "--listen-seconds",
                                 "120"], capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
            assert up.returncode == 0, up.stderr
            listeners = Topology(prefix).listener_pids()
            assert listeners
            process = start("lab", "down", "--prefix", prefix)
            # `down` has begun once a listener is gone: then the signals, at random gaps.
            deadline = time.monotonic() + 30
            while all(os.path.exists(f"/proc/{pid}") for pid in listeners) and process.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.05))
            first, sent = stop_impatiently(process, rng, barrage=run % 2 == 1)
            stderr = assert_stopped_by(process, first, sent, what)
            assert lab_namespaces(prefix) == [], f"{what}: {stderr}"
            assert not state.exists(), f"{what}: {stderr}"
    finally:
        subprocess.run([sys.executable, "-m", "nftrace", "lab", "down", "--prefix", prefix], capture_output=True,
                       timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
