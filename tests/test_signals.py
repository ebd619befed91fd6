"""Undoing is never cut short: signals wait for it, and a failing step never hides the error.

Signals are raised in this very process (signal.raise_signal delivers them at once, to this
thread), inside the blocks nftrace uses to undo its changes.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

import pytest

from nftrace.signals import (Interrupted, SignalsAsExceptions, SignalsHeld, UndoStack, cleanup_failures,
                             raise_if_stopped, undo_after)


def signal_of(stop: BaseException) -> int:
    """Which signal an interruption stands for (Ctrl-C is a KeyboardInterrupt)."""
    return stop.signum if isinstance(stop, Interrupted) else signal.SIGINT


def test_a_signal_during_an_undo_step_waits_for_it_and_is_raised_after():
    done = []
    with pytest.raises(Interrupted) as stop:
        with SignalsAsExceptions():
            with SignalsHeld():
                signal.raise_signal(signal.SIGTERM)
                done.append("undone")
    assert done == ["undone"] and stop.value.signum == signal.SIGTERM


def test_a_stop_whose_exception_a_weakref_callback_swallowed_is_raised_again_by_the_loop():
    """Python drops what a handler raises inside a weakref callback ("Exception ignored in"):
    the read loop's raise_if_stopped() raises it again."""
    import weakref

    class Thing:
        pass

    def callback(_ref):
        signal.raise_signal(signal.SIGTERM)  # its handler runs here, and its exception is dropped

    rounds = []
    with pytest.raises(Interrupted) as stop:
        with SignalsAsExceptions():
            thing = Thing()
            ref = weakref.ref(thing, callback)
            del thing  # the callback runs, and Python ignores the exception raised in it
            rounds.append(ref() is None)
            raise_if_stopped()
            rounds.append("not stopped")
    assert rounds == [True] and stop.value.signum == signal.SIGTERM


def test_only_the_first_signal_counts_the_second_does_not_cut_the_cleanup_short():
    done = []
    with pytest.raises(Interrupted) as stop:
        with SignalsAsExceptions():
            try:
                signal.raise_signal(signal.SIGTERM)
            finally:
                signal.raise_signal(signal.SIGINT)  # Ctrl-C while the SIGTERM's cleanup runs
                done.append("cleanup finished")
    assert done == ["cleanup finished"] and stop.value.signum == signal.SIGTERM


def test_ctrl_c_stays_a_keyboard_interrupt_and_handlers_come_back_after_the_run():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with SignalsAsExceptions():
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def raise_while_the_main_thread_waits(*signums: int) -> None:
    """Raise the signals, one after the other, from a worker thread that the main thread is
    blocked joining (as call_in_namespace does): they are delivered to the worker, and the main
    thread runs their handlers all together once the join is over."""
    main = threading.main_thread().ident

    def worker():
        deadline = time.monotonic() + 5
        while sys._current_frames()[main].f_code.co_name != "_wait_for_tstate_lock" and time.monotonic() < deadline:
            time.sleep(0.001)
        for signum in signums:
            signal.raise_signal(signum)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        thread.join()
    finally:
        thread.join()  # the block is never left while the worker may still raise a signal


def test_the_first_signal_to_arrive_counts_even_when_python_runs_the_handler_of_a_later_one_first():
    """SIGTERM, then Ctrl-C, while the main thread waits: Python runs the pending handlers by
    signal number, SIGINT's first. The run still ends as the SIGTERM says."""
    with pytest.raises((Interrupted, KeyboardInterrupt)) as stop:
        with SignalsAsExceptions():
            raise_while_the_main_thread_waits(signal.SIGTERM, signal.SIGINT)
    assert signal_of(stop.value) == signal.SIGTERM


def test_a_later_signal_whose_handler_runs_inside_the_first_ones_does_not_take_its_place(monkeypatch):
    """Python runs a handler between any two bytecodes, another handler too: a SIGHUP that
    arrives just after the Ctrl-C's handler read the wakeup fd (and so finds only itself
    there) runs inside it. The run still ends as the Ctrl-C says (a CI run once said SIGHUP)."""
    from nftrace import signals

    read = signals._State._arrivals

    def read_then_a_sighup_arrives(state):
        arrived = read(state)
        if arrived == [signal.SIGINT]:
            signal.raise_signal(signal.SIGHUP)  # its handler runs as this call returns
        return arrived

    monkeypatch.setattr(signals._State, "_arrivals", read_then_a_sighup_arrives)
    with pytest.raises((Interrupted, KeyboardInterrupt)) as stop:
        with SignalsAsExceptions():
            signal.raise_signal(signal.SIGINT)
    assert signal_of(stop.value) == signal.SIGINT


def test_the_first_of_several_signals_that_arrive_during_an_undo_step_is_the_one_raised_after_it():
    done = []
    with pytest.raises((Interrupted, KeyboardInterrupt)) as stop:
        with SignalsAsExceptions(), SignalsHeld():
            raise_while_the_main_thread_waits(signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
            done.append("undone")
    assert done == ["undone"] and signal_of(stop.value) == signal.SIGTERM


def test_held_outside_a_run_still_defers_the_signal_to_the_end_of_the_undo():
    done = []
    with pytest.raises(Interrupted):
        with SignalsHeld():
            signal.raise_signal(signal.SIGHUP)
            done.append("undone")
    assert done == ["undone"]


def test_every_undo_step_runs_and_a_failing_one_is_a_note_on_the_error_that_started_it():
    done = []

    def failing():
        raise RuntimeError("could not delete table inet nftrace_1_abc")

    with pytest.raises(ValueError) as raised:
        with UndoStack() as undo:
            undo.callback(done.append, "first made, last undone")
            undo.callback(failing)
            undo.callback(done.append, "last made, first undone")
            raise ValueError("the run failed")
    assert done == ["last made, first undone", "first made, last undone"]
    assert cleanup_failures(raised.value) == [
        "while undoing what nftrace changed: could not delete table inet nftrace_1_abc"]


def test_a_failing_undo_step_is_the_error_when_nothing_else_went_wrong():
    def failing():
        raise RuntimeError("nf_log could not be restored")

    with pytest.raises(RuntimeError, match="nf_log could not be restored"):
        with UndoStack() as undo:
            undo.callback(failing)


def test_undo_after_keeps_the_original_error_and_runs_every_step():
    error = ValueError("install failed")
    steps = []

    def failing():
        steps.append("failing")
        raise OSError("busy")

    undo_after(error, failing, lambda: steps.append("next"))
    assert steps == ["failing", "next"]
    assert cleanup_failures(error) == ["while undoing what nftrace changed: busy"]


def test_a_signal_during_the_undo_of_an_error_says_it_waited_and_the_error_goes_on():
    with pytest.raises(ValueError) as raised:
        with SignalsAsExceptions(), UndoStack() as undo:
            undo.callback(signal.raise_signal, signal.SIGTERM)
            raise ValueError("the run failed")
    assert cleanup_failures(raised.value) == [
        "SIGTERM came while nftrace was undoing its changes: it waited until they were undone"]


def test_an_undo_step_in_another_thread_neither_holds_nor_raises_the_main_threads_signal():
    entered, release = threading.Event(), threading.Event()

    def worker():
        with SignalsHeld():
            entered.set()
            release.wait(5)

    thread = threading.Thread(target=worker)
    with pytest.raises(Interrupted):
        with SignalsAsExceptions():
            thread.start()
            entered.wait(5)
            try:
                signal.raise_signal(signal.SIGTERM)  # the main thread is not undoing anything: raised now
            finally:
                release.set()
                thread.join(5)


def test_a_signal_that_came_as_the_run_ended_before_its_handler_ran_still_ends_it():
    """Python runs a handler between two bytecodes, later than its signal arrives: one that came
    just as the command line's block was left would be lost with the handler given back, and the
    process would end with status 0 (seen in CI: a SIGHUP at the very end of a dry run)."""
    import os

    from nftrace.signals import STOP_SIGNALS, _state

    saved = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        with pytest.raises(Interrupted) as stop:
            with SignalsAsExceptions(until_exit=True):
                os.write(_state._wakeup[1], bytes([signal.SIGHUP]))  # what the C-level handler does first
        assert stop.value.signum == signal.SIGHUP
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN  # and no later one changes the ending
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
