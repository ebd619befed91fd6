"""Stop signals, and undoing what nftrace changed whatever signals arrive meanwhile.

SIGINT, SIGTERM and SIGHUP end a run the same way: while one is on (`SignalsAsExceptions`),
the first of them raises an exception (KeyboardInterrupt for Ctrl-C, `Interrupted` for the
others), so that every `finally` and `with` block that undoes a kernel change runs, and the
exit status says which signal it was.

Undoing must not be cut short by a second signal (an impatient Ctrl-C after a SIGTERM, a
second Ctrl-C): every undo step runs inside `SignalsHeld`, and a run's undo steps as a whole
in an `UndoStack`:
- only the first stop signal counts (the first to arrive, whatever order Python runs the
  handlers of signals that arrived together in); any later one is recorded and dropped,
  since the stop it asks for is already under way;
- a first signal that comes while something is being undone waits until the undoing is
  done, and is raised then (the exit status is that signal's);
- an undo step that fails never replaces the error that started the undoing: it is added to
  it as a note (`cleanup_failures`), the user sees both, and the remaining steps still run.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable, Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
CLEANUP_NOTE = "while undoing what nftrace changed: "


class Interrupted(BaseException):
    """A signal asked nftrace to stop; cleanup runs, then the exit status says which."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def interruption(signum: int) -> BaseException:
    """The exception a stop signal raises: Ctrl-C stays a KeyboardInterrupt."""
    return KeyboardInterrupt() if signum == signal.SIGINT else Interrupted(signum)


def is_interruption(error: Optional[BaseException]) -> bool:
    return isinstance(error, (KeyboardInterrupt, Interrupted))


class _State:
    """What the process knows about stop signals (handlers run in the main thread only)."""

    def __init__(self):
        self.installed = 0  # SignalsAsExceptions / SignalsHeld blocks that installed the handler
        self.previous: dict = {}
        self.first: Optional[int] = None  # the first stop signal since the handler went in
        self.held = 0  # undo steps running now
        self.pending = False  # the first signal came while held and has not been raised yet
        self.deciding = False  # a handler is reading which signal came first
        self._wakeup: Optional[tuple[int, int]] = None  # the C-level handler writes each signal number here
        self._previous_wakeup = -1

    def handle(self, signum, _frame) -> None:
        if self.deciding:
            # Python ran this handler inside another one (it may, between any two bytecodes):
            # that one has read, or will read, the wakeup fd, and decides which came first.
            return
        self.deciding = True
        try:
            arrived = self._arrivals()
            if self.first is not None:
                return  # a stop is already under way: this signal asks for nothing more
            # `signum` is not necessarily the first to arrive: see _arrivals.
            self.first = arrived[0] if arrived else signum
        finally:
            self.deciding = False
        if self.held:
            self.pending = True  # raised when the undoing is done
            return
        raise interruption(self.first)

    def _arrivals(self) -> list[int]:
        """The stop signals that arrived since the last call, in the order they arrived.

        Python runs its signal handlers later than the signals arrive (in the main thread,
        between two bytecodes), and when several are pending by then it runs them in the
        order of their numbers, not of their arrival: a SIGTERM and then a Ctrl-C that both
        come while the main thread waits (for a worker thread that the signals were
        delivered to, say) run the SIGINT handler first. The wakeup fd is written by the
        C-level handler at the moment each signal arrives, so it has the true order."""
        arrived: list[int] = []
        while self._wakeup is not None:
            try:
                data = os.read(self._wakeup[0], 512)
            except BlockingIOError:
                break
            if not data:
                break
            arrived += [signal.Signals(number) for number in data if number in STOP_SIGNALS]
        return arrived

    def install(self) -> None:
        if self.installed == 0:
            # A signal ignored on purpose stays ignored: SIGINT of a background job of a script.
            self.previous = {signum: signal.signal(signum, self.handle) for signum in STOP_SIGNALS
                             if signal.getsignal(signum) is not signal.SIG_IGN}
            self.first, self.pending = None, False
            read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._wakeup = (read_end, write_end)
            self._previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        self.installed += 1

    def uninstall(self, exiting: bool = False) -> Optional[int]:
        """Give the handlers back once the last block is left. `exiting`: the process ends next;
        returns a stop signal that arrived while the handlers were still nftrace's and that
        Python had not run the handler of yet (it runs them between two bytecodes; once the
        handler is given back, it would never run, and the process would end as if no signal
        had come). Meanwhile stop signals are blocked: one sent then is taken as the handler
        given back says (ignored after a stop; otherwise the default: death by it)."""
        self.installed -= 1
        late = None
        if self.installed == 0:
            if exiting:
                signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
                if self.first is None:
                    self.deciding = True  # a handler that Python runs now leaves the decision here
                    arrived = self._arrivals()
                    self.deciding = False
                    if arrived:
                        self.first = late = arrived[0]
            stopping = exiting and self.first is not None
            for signum, handler in self.previous.items():
                # On the way out after a stop signal: no later one may change how the process ends.
                signal.signal(signum, signal.SIG_IGN if stopping else handler)
            self.previous = {}
            self.first, self.pending = None, False
            try:
                signal.set_wakeup_fd(self._previous_wakeup)
            except (ValueError, OSError):  # closed by its owner meanwhile: there is none to give back
                signal.set_wakeup_fd(-1)
            for fd in self._wakeup or ():
                os.close(fd)
            self._wakeup, self._previous_wakeup = None, -1
            if exiting:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return late


_state = _State()


def stop_signal() -> Optional[int]:
    """The stop signal that is ending this run, if one is (inside SignalsAsExceptions)."""
    return _state.first


def raise_if_stopped() -> None:
    """Raise the stop again if a stop signal came and its exception never reached the caller.

    Python runs a signal handler between any two bytecodes, inside a weakref callback or a
    finaliser too, where it prints "Exception ignored" and drops what the handler raised (seen
    in CI: a Ctrl-C that `why` never stopped for, until its --timeout). A loop that must stop
    calls this on every round; while undo steps run (held), the signal waits for them."""
    if _state.first is not None and not _state.held:
        raise interruption(_state.first)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class SignalsAsExceptions:
    """While a run is on: the first of SIGINT, SIGTERM, SIGHUP ends it through every finally
    block; later ones do not interrupt the cleanup it started.

    `until_exit` (the command line's entry point): when the block is left after a stop signal,
    later ones stay ignored, so that the exit status is the first one's to the very end; and
    one that came as the block was left, before Python ran its handler, is raised then."""

    def __init__(self, until_exit: bool = False):
        self.until_exit = until_exit

    def __enter__(self) -> "SignalsAsExceptions":
        _state.install()
        return self

    def __exit__(self, *exc) -> None:
        late = _state.uninstall(exiting=self.until_exit)
        if late is not None:
            raise interruption(late)


class SignalsHeld:
    """An undo step: no stop signal interrupts it. A first one that comes meanwhile is raised
    once the outermost held block is left, unless an exception is already on its way out
    (`propagating`, or the block's own): an interruption keeps going as it is; an error keeps
    going too, with a note saying which signal waited."""

    def __init__(self, propagating: Optional[BaseException] = None):
        self.propagating = propagating
        self._main = False

    def __enter__(self) -> "SignalsHeld":
        # Python runs signal handlers in the main thread only: another thread's undo step is
        # never interrupted, and must not hold (or later raise) the main thread's signals.
        self._main = _main_thread()
        if self._main:
            _state.install()
            _state.held += 1
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._main:
            return
        _state.held -= 1
        signum = _state.first if (_state.pending and _state.held == 0) else None
        if signum is not None:
            _state.pending = False
        _state.uninstall()
        if signum is None:
            return
        in_flight = exc if exc is not None else self.propagating
        if in_flight is None:
            raise interruption(signum)
        if not is_interruption(in_flight):
            in_flight.add_note(f"{signal.Signals(signum).name} came while nftrace was undoing its changes: "
                               "it waited until they were undone")


def add_cleanup_failure(error: BaseException, failure: BaseException) -> None:
    """Keep `error` as what went wrong, and say that undoing failed too."""
    error.add_note(CLEANUP_NOTE + (str(failure) or type(failure).__name__))


def cleanup_failures(error: BaseException) -> list[str]:
    """What failed while undoing, as added by add_cleanup_failure (and signals that waited)."""
    return list(getattr(error, "__notes__", ()))


def undo_after(error: BaseException, *steps: Callable[[], object]) -> None:
    """Run undo steps because `error` happened; their failures are added to it, never raised.
    The caller raises `error` again."""
    with SignalsHeld(propagating=error):
        for step in steps:
            try:
                step()
            except BaseException as failure:  # noqa: BLE001 - kept as a note on the original error
                add_cleanup_failure(error, failure)


class UndoStack:
    """Undo steps of a run, run last-in first-out on leaving the block, all of them, with stop
    signals held (see the module docstring). The first failure is raised when nothing else
    went wrong; any other is a note on the error that is raised."""

    def __init__(self):
        self._exits: list = []

    def enter_context(self, manager):
        result = manager.__enter__()
        self._exits.append(manager.__exit__)
        return result

    def callback(self, function: Callable, *args, **kwargs) -> None:
        self._exits.append(lambda *exc: function(*args, **kwargs))

    def __enter__(self) -> "UndoStack":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        with SignalsHeld(propagating=exc):
            error = exc
            while self._exits:
                step = self._exits.pop()
                try:
                    step(exc_type, exc, tb)
                except BaseException as failure:  # noqa: BLE001 - every step runs; failures are kept
                    if error is None:
                        error = failure
                    else:
                        add_cleanup_failure(error, failure)
            if error is not None and error is not exc:
                raise error

