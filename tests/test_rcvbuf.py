"""The trace socket's receive buffer: sized from --max-rate, overridable, explained on loss."""

from __future__ import annotations

import pytest

from nftrace.errors import InputError
from nftrace.kernel.rcvbuf import MAX_RCVBUF, MIN_RCVBUF, loss_warning, parse_size, receive_buffer_size


def test_default_rate_gets_a_small_buffer():
    assert receive_buffer_size(100, environ={}) == MIN_RCVBUF == 16 << 20


def test_buffer_grows_with_the_rate_limit_up_to_the_kernel_limit():
    assert MIN_RCVBUF < receive_buffer_size(1000, environ={}) < MAX_RCVBUF
    assert receive_buffer_size(1_000_000, environ={}) == MAX_RCVBUF == 1 << 30


def test_no_rate_limit_gets_the_biggest_buffer():
    assert receive_buffer_size(0, environ={}) == MAX_RCVBUF


def test_environment_replaces_the_computed_size():
    assert receive_buffer_size(0, environ={"NFTRACE_RCVBUF": "64M"}) == 64 << 20
    assert receive_buffer_size(100, environ={"NFTRACE_RCVBUF": "1G"}) == 1 << 30


@pytest.mark.parametrize("text, size", [("4096", 4096), ("512K", 512 << 10), ("64MiB", 64 << 20), ("1g", 1 << 30)])
def test_sizes_are_bytes_or_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "-1", "2G", "12", "1.5G"])
def test_a_bad_size_is_an_input_error_naming_the_variable(text):
    with pytest.raises(InputError, match="NFTRACE_RCVBUF"):
        parse_size(text)


def test_loss_warning_says_how_much_was_lost_and_what_to_change():
    text = loss_warning(1234, 16 << 20, 100)
    assert "1234 trace events" in text and "16 MiB" in text and "NFTRACE_RCVBUF" in text


def test_loss_warning_at_the_largest_buffer_asks_for_a_lower_rate_only():
    text = loss_warning(5, MAX_RCVBUF, 0)
    assert "Lower --max-rate" in text and "NFTRACE_RCVBUF" not in text
