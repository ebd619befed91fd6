"""Python's garbage collector during a trace: passes between reads, never in the middle of one
(nftrace/trace/collection.py)."""

import gc
import weakref

import pytest

from nftrace.trace.collection import CollectionBetweenReads, generation_to_collect


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Node:
    """An object in a reference cycle: only the collector frees it."""

    def __init__(self):
        self.other = self


def cycle_garbage() -> weakref.ref:
    return weakref.ref(Node())


def many_objects(count: int) -> list:
    return [[] for _ in range(count)]


@pytest.fixture
def collection():
    clock = Clock()
    collection = CollectionBetweenReads(young_objects=1_000, busy_seconds=2.0, clock=clock)
    collection.start()
    try:
        yield collection, clock
    finally:
        collection.stop()
        gc.unfreeze()


def test_while_reading_nothing_is_collected_however_much_is_made(collection):
    garbage = cycle_garbage()
    kept = many_objects(5_000)
    assert garbage() is not None
    assert gc.get_count()[0] >= 5_000
    del kept


def test_once_caught_up_a_pass_collects_what_cycles_left(collection):
    collection, _ = collection
    garbage = cycle_garbage()
    kept = many_objects(2_000)
    assert collection.between_reads(caught_up=True) == 0
    assert garbage() is None
    del kept


def test_caught_up_with_little_made_no_pass_is_run(collection):
    collection, _ = collection
    garbage = cycle_garbage()
    assert collection.between_reads(caught_up=True) is None
    assert garbage() is not None


def test_behind_a_flood_a_pass_waits_for_the_busy_interval(collection):
    collection, clock = collection
    garbage = cycle_garbage()
    kept = many_objects(2_000)
    clock.now += 1.9
    assert collection.between_reads(caught_up=False) is None
    assert garbage() is not None
    clock.now += 0.1
    assert collection.between_reads(caught_up=False) == 0
    assert garbage() is None
    del kept


def test_passes_take_the_generation_python_would():
    thresholds = (700, 10, 10)
    assert generation_to_collect((20_000, 3, 0), thresholds) == 0
    assert generation_to_collect((20_000, 10, 3), thresholds) == 1
    assert generation_to_collect((20_000, 10, 10), thresholds) == 2


def test_after_the_run_the_collector_is_as_it_was():
    assert gc.isenabled()
    collection = CollectionBetweenReads()
    collection.start()
    assert not gc.isenabled()
    collection.stop()
    gc.unfreeze()
    assert gc.isenabled()
    gc.disable()
    try:
        collection.start()
        collection.stop()
        assert not gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()


def test_stopping_a_collection_never_started_changes_nothing():
    CollectionBetweenReads().stop()
    assert gc.isenabled()
