"""Signals as exceptions, so that every `finally` block that undoes a kernel change runs.

Ctrl-C already raises KeyboardInterrupt; SIGTERM and SIGHUP are made to raise `Interrupted`
while a run is on, so that they end it the same way, and the exit status says which signal.
"""

from __future__ import annotations

import signal


class Interrupted(BaseException):
    """A signal asked nftrace to stop; cleanup runs, then the exit status says which."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


class _SignalHandlers:
    SIGNALS: tuple = ()
    HANDLER = signal.SIG_DFL

    def __enter__(self):
        self._previous = {signum: signal.signal(signum, self.HANDLER) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class SignalsAsExceptions(_SignalHandlers):
    """SIGTERM and SIGHUP end the run the way Ctrl-C does: through every finally block."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)
    HANDLER = staticmethod(_raise_interrupted)


class SignalsIgnored(_SignalHandlers):
    """While something is being removed, a second Ctrl-C must not leave half of it behind."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    HANDLER = signal.SIG_IGN
