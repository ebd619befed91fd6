"""`nftrace demo`, as a newcomer runs it: real namespaces, real packets, nftrace's own answers,
and no namespace left behind on any exit path."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import REPO, nftrace
from nftrace.lab.demo import DEMO_PREFIX, leftover_demo_labs
from nftrace.lab.lab import Lab, find_scenario
from nftrace.kernel.system import NETNS_RUN_DIR


def demo_namespaces() -> set:
    names = os.listdir(NETNS_RUN_DIR) if os.path.isdir(NETNS_RUN_DIR) else []
    return {name for name in names if name.startswith(DEMO_PREFIX)}


def test_only_labs_of_dead_demos_count_as_leftovers():
    dead = subprocess.Popen(["true"])
    dead.wait()
    names = [f"{DEMO_PREFIX}{dead.pid}-router", f"{DEMO_PREFIX}{dead.pid}-client", f"{DEMO_PREFIX}{os.getpid()}-router",
             "nftlab-router", f"{DEMO_PREFIX}x-router"]
    assert leftover_demo_labs(names) == [f"{DEMO_PREFIX}{dead.pid}"]


@pytest.mark.kernel
def test_demo_traces_accepted_rule_dropped_policy_dropped_and_natted_flows_then_removes_its_lab():
    result = nftrace("demo", timeout=60)
    assert result.returncode == 0, result.stderr
    headlines = [line for line in result.stdout.splitlines() if re.match(r"^(ACCEPT|DROP)\s", line)]
    assert [line.split()[0] for line in headlines] == ["ACCEPT", "DROP", "DROP", "ACCEPT"]
    assert 'dropped by inet filter forward rule handle' in headlines[1] and "no direct SMTP from the LAN" in headlines[1]
    assert headlines[2].endswith("dropped by inet filter input policy drop")
    assert "nat at prerouting: dst 10.77.2.1:2222 → 10.77.1.2:22" in result.stdout
    assert "[as expected]" in result.stdout and "EXPECTED" not in result.stdout
    prefix = re.search(r"^\[1/6\] building the lab: .*\((nftdemo\d+)-\*\)", result.stderr, re.MULTILINE).group(1)
    assert "[6/6] removing the lab" in result.stderr
    assert not any(name.startswith(prefix + "-") for name in demo_namespaces())


@pytest.mark.kernel
def test_demo_removes_a_lab_left_by_a_killed_demo():
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = Lab(f"{DEMO_PREFIX}{dead.pid}")
    try:
        leftover.up(find_scenario("nat-router"), listen_seconds=60)
        result = nftrace("demo", timeout=60)
        assert f"removing {leftover.prefix}, left by a demo that was killed" in result.stderr
        assert not any(os.path.exists(f"{NETNS_RUN_DIR}/{name}") for name in leftover.topology.namespaces)
    finally:
        leftover.down()


def interrupt_demo(signum: int, whole_group: bool, after: str) -> tuple[int, str, int]:
    """Start the demo, send `signum` once its progress shows `after`; (exit status, stderr, pid)."""
    process = subprocess.Popen([sys.executable, "-m", "nftrace", "demo"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True,
                               env=dict(os.environ, PYTHONPATH=str(REPO)))
    seen = []
    try:
        for line in process.stderr:
            seen.append(line)
            if line.startswith(after):
                break
        # A terminal's Ctrl-C reaches the whole foreground group: the demo, nftrace, the traffic.
        (os.killpg if whole_group else os.kill)(process.pid, signum)
        seen.append(process.stderr.read())
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, "".join(seen), process.pid


@pytest.mark.kernel
@pytest.mark.parametrize("signum, whole_group, after, status", [
    (signal.SIGINT, True, "[3/", 130),
    (signal.SIGINT, True, "[1/", 130),
    (signal.SIGTERM, False, "[2/", 128 + signal.SIGTERM),
])
def test_an_interrupted_demo_removes_its_lab(signum, whole_group, after, status):
    returncode, stderr, pid = interrupt_demo(signum, whole_group, after)
    assert returncode == status, stderr
    assert "the lab is removed" in stderr
    assert not any(name.startswith(f"{DEMO_PREFIX}{pid}-") for name in demo_namespaces())


def test_the_readmes_first_command_ends_with_the_demo():
    readme = (REPO / "README.md").read_text()
    first = re.search(r"```sh\n(.*?)\n```", readme, re.DOTALL).group(1).strip().splitlines()[0]
    # scripts/demo.sh is setup.sh then the demo (checked by the next test)
    assert first.endswith("scripts/demo.sh") or (first.endswith(".venv/bin/nftrace demo") and "scripts/setup.sh" in first)


def test_demo_script_sets_up_then_runs_the_demo():
    script = REPO / "scripts" / "demo.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    lines = [line for line in script.read_text().splitlines() if line and not line.startswith("#")]
    assert lines[-2:] == ["./scripts/setup.sh", "exec .venv/bin/nftrace demo"]
