"""What nftrace reads of the machine itself (nftrace/kernel/system.py)."""

from __future__ import annotations

import os
import subprocess

from nftrace.kernel.system import pid_alive


def test_a_killed_process_is_dead_even_before_its_parent_waits_for_it():
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert pid_alive(child.pid)
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
        assert not pid_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not pid_alive(child.pid)


def test_a_pid_given_since_to_another_process_is_not_the_process_that_recorded_it():
    """Leftovers of a killed run name it by pid and start time: a long-lived process that got
    the pid later does not keep them, nor stand for a live run."""
    from nftrace.kernel.system import process_start

    child = subprocess.Popen(["sleep", "30"])
    try:
        started = process_start(child.pid)
        assert started is not None and started >= process_start(os.getpid())
        assert pid_alive(child.pid, started) and pid_alive(child.pid)
        assert not pid_alive(child.pid, started + 1)  # the same pid, started at another time
    finally:
        child.kill()
        child.wait()
    assert process_start(child.pid) is None and not pid_alive(child.pid, started)
