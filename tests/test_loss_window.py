"""Where lost trace events lie in the stream a socket delivers (kernel/monitor.py LossWindow).

The kernel says once that a socket overflowed, and counts every event it drops. Read after
each batch, the counter places the loss: after everything read before the batch, before
everything queued after the counter was read, which is at most what the socket held then.
"""

from nftrace.kernel.monitor import LossWindow


def test_no_drop_is_no_loss():
    window = LossWindow()
    assert not window.observe(drops=0, queued=50_000, batch=4_000)
    window.advance(4_000)
    assert window.behind


def test_a_loss_is_behind_once_what_the_socket_held_has_been_read():
    window = LossWindow()
    assert window.observe(drops=3, queued=10_000, batch=4_000)  # reported in front of this batch
    window.advance(4_000)
    assert not window.behind
    assert not window.observe(drops=3, queued=9_000, batch=9_999)
    window.advance(9_999)
    assert not window.behind  # one byte of what the socket held is still unread
    window.advance(1)
    assert window.behind


def test_a_later_loss_moves_the_clean_point_on():
    window = LossWindow()
    window.observe(drops=1, queued=1_000, batch=100)
    window.advance(100)
    assert window.observe(drops=2, queued=5_000, batch=500)
    window.advance(500)
    window.advance(1_000)
    assert not window.behind
    window.advance(4_000)
    assert window.behind


def test_an_overrun_without_counter_is_a_loss_too():
    """ENOBUFS seen by the reads, on a kernel that gives no drop counter (SO_MEMINFO)."""
    window = LossWindow()
    assert window.observe(drops=0, queued=2_000, batch=10, overrun=True)
    window.advance(10)
    assert not window.behind
