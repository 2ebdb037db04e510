"""The ``overflow="block"`` policy: a caller waits (up to ``block_timeout``) for room in the queue.

Same fake transport and ``build`` fixture as test_manager. The transport's ``gate`` holds every
request, so the queue stays full until the test opens it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import List

import pytest

from optimizely_odp_ext.settings import ConfigurationError, Options
from tests.unit import test_manager
from tests.unit.test_manager import WAIT, Build, Log, ev

build = test_manager.build  # the same fixture: managers closed and their threads checked gone


def _fill(build: Build, **overrides: object) -> tuple:  # type: ignore[type-arg]
    """A manager with one request held at the gate and its queue full (capacity 3)."""
    manager, transport = build(queue_capacity=3, batch_size=1, max_in_flight=1, overflow="block", **overrides)
    transport.gate.clear()
    assert manager.enqueue(ev("e0"))
    assert transport.wait_calls(1)  # e0 is in flight: the worker takes nothing more
    for i in range(1, 4):
        assert manager.enqueue(ev(f"e{i}"))
    return manager, transport


def test_a_blocked_caller_goes_on_when_the_worker_makes_room(build: Build, log: Log) -> None:
    manager, transport = _fill(build, block_timeout=30.0)
    done = threading.Event()
    results: List[bool] = []

    def caller() -> None:
        results.append(manager.enqueue(ev("e4")))
        done.set()

    thread = threading.Thread(target=caller)
    thread.start()
    try:
        # Still waiting while the request is held (a bounded look, not a sleep standing in for sync).
        assert not done.wait(0.2)
        assert manager._room.waiters == 1
        transport.gate.set()
        assert done.wait(WAIT)
    finally:
        transport.gate.set()
        thread.join(WAIT)
    assert results == [True]
    assert manager.flush(WAIT) is True
    assert transport.delivered_ids() == [f"e{i}" for i in range(5)]
    stats = manager.stats()
    assert stats["delivered"] == 5
    assert sum(stats["dropped"].values()) == 0
    assert log[1].lines(logging.WARNING) == []


def test_block_timeout_then_the_new_event_is_dropped_and_counted(build: Build, log: Log) -> None:
    manager, transport = _fill(build, block_timeout=0.05)
    started = time.monotonic()
    assert manager.enqueue(ev("late")) is True  # accepted, then dropped as queue_full (as drop_newest)
    assert time.monotonic() - started >= 0.05
    assert manager.stats()["dropped"]["queue_full"] == 1
    assert log[1].lines(logging.WARNING) == [
        "ODP event queue is full (3 events); dropped 1 new event(s) since the last warning."]
    transport.gate.set()
    assert manager.flush(WAIT) is True
    assert "late" not in transport.delivered_ids()


def test_close_releases_a_blocked_caller(build: Build) -> None:
    manager, transport = _fill(build, block_timeout=60.0)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (manager.enqueue(ev("e4")), done.set()))
    thread.start()
    try:
        deadline = time.monotonic() + WAIT
        while manager._room.waiters == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert manager._room.waiters == 1
        closer = threading.Thread(target=manager.close, kwargs={"timeout": 0.2})
        closer.start()
        assert done.wait(WAIT)  # long before block_timeout
        transport.gate.set()
        closer.join(WAIT)
    finally:
        transport.gate.set()
        thread.join(WAIT)
    stats = manager.stats()
    assert stats["accepted"] == stats["delivered"] + sum(stats["dropped"].values())


def test_the_other_policies_never_wait(build: Build) -> None:
    manager, transport = build(queue_capacity=1, batch_size=1, max_in_flight=1, block_timeout=60.0)
    transport.gate.clear()
    manager.enqueue(ev("e0"))
    assert transport.wait_calls(1)
    manager.enqueue(ev("e1"))
    started = time.monotonic()
    manager.enqueue(ev("e2"))  # drop_newest: refused at once, whatever block_timeout says
    assert time.monotonic() - started < WAIT
    assert manager.stats()["dropped"]["queue_full"] == 1
    assert manager._room.waiters == 0


@pytest.mark.parametrize("value", [-1.0, math.inf, math.nan, "1", True])
def test_block_timeout_is_validated(value: object) -> None:
    with pytest.raises(ConfigurationError, match="block_timeout"):
        Options(block_timeout=value)  # type: ignore[arg-type]


def test_block_is_a_valid_policy() -> None:
    assert Options(overflow="block", block_timeout=0.0).overflow == "block"
    with pytest.raises(ConfigurationError, match='"block"'):
        Options(overflow="wait")  # type: ignore[arg-type]


@pytest.mark.parametrize("why", ["every sender busy", "no datafile yet"])
def test_a_blocked_caller_and_a_worker_that_cannot_drain_do_not_wake_each_other_in_a_loop(
        build: Build, why: str) -> None:
    if why == "every sender busy":
        manager, _ = _fill(build, block_timeout=0.3)
    else:
        manager, _ = build(integrated=False, queue_capacity=3, overflow="block", block_timeout=0.3)
        for i in range(3):
            assert manager.enqueue(ev(f"e{i}"))
    passes = [0]
    step = manager._step

    def counted() -> object:
        passes[0] += 1
        return step()

    manager._step = counted  # type: ignore[method-assign]
    manager.enqueue(ev("waits"))  # blocks for block_timeout: nothing can make room
    # The caller wakes the worker once per wait; a worker that made no room does not answer. Before,
    # each woke the other at once, thousands of passes in 0.3 s.
    assert passes[0] <= 10, passes[0]
    assert manager.stats()["dropped"]["queue_full"] == 1
