"""One exception family: each carries the one line the user sees and the exit status.

The CLI turns any NftraceError into that line on stderr and that status; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Optional


class NftraceError(Exception):
    """A failure the user can act on; `str(err)` is the whole message."""

    exit_code = 2


class InputError(NftraceError):
    """The command line asked for something that cannot be (bad address, port, name)."""


class EnvironmentProblem(NftraceError):
    """The machine cannot do what was asked (not root, no nf_tables, missing package)."""


class KernelError(NftraceError):
    """The kernel refused a change or a netlink socket failed mid-run; `errno` says why, where
    the kernel's answer was read (None otherwise)."""

    def __init__(self, message: str, errno: Optional[int] = None):
        super().__init__(message)
        self.errno = errno


class TraceTableGone(NftraceError):
    """Someone deleted nftrace's own table while it was tracing."""

    exit_code = 1
