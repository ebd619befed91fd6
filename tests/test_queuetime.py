"""When the datagrams of a backlog were queued: counted by the kernel, sampled by nftrace.

Every datagram counted by a sample was queued before that sample's time; the n-th datagram
read was at most the n-th counted. So a datagram's bound is the first sample that counted it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from conftest import REPO, load_ruleset
from nftrace.kernel.queuetime import QueueClock, QueueCounter


def test_a_datagram_was_queued_by_the_first_sample_that_counted_it():
    clock = QueueClock()
    clock.sample(10, 1.0)
    clock.sample(25, 2.0)
    assert clock.queued_by(10) == 1.0
    assert clock.queued_by(11) == 2.0
    assert clock.queued_by(25) == 2.0


def test_a_datagram_no_sample_counted_yet_has_no_bound():
    clock = QueueClock()
    assert clock.queued_by(1) is None
    clock.sample(3, 1.0)
    assert clock.queued_by(4) is None


def test_a_sample_that_counted_nothing_new_keeps_the_earlier_time():
    clock = QueueClock()
    clock.sample(5, 1.0)
    clock.sample(5, 2.0)
    assert clock.queued_by(5) == 1.0


def test_samples_before_the_one_found_are_forgotten():
    clock = QueueClock()
    for offered, when in ((10, 1.0), (20, 2.0), (30, 3.0)):
        clock.sample(offered, when)
    assert clock.queued_by(21) == 3.0
    assert clock.queued_by(5) == 3.0  # positions read never go down: the earlier samples are gone
    assert len(clock._samples) == 1


def test_a_datagram_was_queued_after_the_last_sample_that_did_not_count_it():
    clock = QueueClock()
    assert clock.queued_after(1) is None
    clock.sample(10, 1.0)
    clock.sample(25, 2.0)
    assert clock.queued_after(11) == 1.0
    assert clock.queued_by(30) is None
    assert clock.queued_after(31) == 2.0  # remembered once the samples before it are forgotten


@pytest.mark.kernel
def test_the_counter_counts_every_datagram_and_keeps_each_whole():
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    counter = QueueCounter()
    with sender, receiver:
        try:
            counter.attach(receiver)
            for number in range(5):
                sender.send(b"datagram %d" % number)
            assert counter.offered() == 5
            assert [receiver.recv(64, socket.MSG_DONTWAIT) for _ in range(5)] == [b"datagram %d" % n for n in range(5)]
        finally:
            counter.close()


MONITOR = r"""
import json, subprocess, sys, time
from nftrace.kernel.monitor import TraceMonitor
monitor = TraceMonitor(counted=True)
if "--ruleset-change-first" in sys.argv:
    monitor.watch_ruleset()
    subprocess.run(["nft", "add table inet elsewhere"], check=True)  # queued before the clock starts
assert monitor.time_queue()
def send():
    subprocess.run([sys.executable, "-m", "nftrace.lab.traffic", "udp", "127.0.0.1", "5000", "--count", "3"],
                   check=True, capture_output=True)
send()
monitor.sample_queue()
sampled = time.monotonic()
first = [d for d in monitor.read_raw() if d is not None]
first_bound = monitor.queued_by
send()
second = [d for d in monitor.read_raw() if d is not None]
json.dump({"first": len(first), "second": len(second), "bound_before_sampled": first_bound is not None and first_bound <= sampled,
           "second_bound": monitor.queued_by}, sys.stdout)
"""


def run_monitor(netns, *args: str) -> dict:
    ns = netns("q")
    load_ruleset(ns, """table inet t {
        chain out { type filter hook output priority -350; udp dport 5000 meta nftrace set 1 accept; }
    }""")
    done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", MONITOR, *args], capture_output=True,
                          text=True, timeout=60, env=dict(PYTHONPATH=str(REPO), PATH="/usr/sbin:/usr/bin:/sbin:/bin"))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.kernel
def test_a_batch_read_after_a_sample_that_counted_it_is_bounded_by_that_sample(netns):
    result = run_monitor(netns)
    assert result["first"] >= 3 and result["second"] >= 3
    assert result["bound_before_sampled"]
    assert result["second_bound"] is None  # sent after the last sample: no bound, the reading time stands


@pytest.mark.kernel
def test_datagrams_queued_before_the_clock_started_were_counted_too(netns):
    """A ruleset change queued between joining the groups and the start of the clock (nftrace
    changes its own table there) is read like any datagram: had the count begun with the clock,
    every datagram read after it would be one place ahead of the count, and the last batch of
    a backlog beyond every sample (a burst's last packets then took the wrong kernel drops)."""
    result = run_monitor(netns, "--ruleset-change-first")
    assert result["first"] >= 3 + 1
    assert result["bound_before_sampled"]


@pytest.mark.kernel
def test_a_monitor_not_counted_has_no_clock():
    from nftrace.kernel.monitor import TraceMonitor

    with TraceMonitor() as monitor:
        assert not monitor.time_queue()
