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
