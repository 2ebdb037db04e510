"""Our SIGTERM handler closes inline, on the thread it interrupted: that must never deadlock.

Python runs a signal handler on the main thread between two bytecodes of whatever it was doing,
possibly in the middle of ``send_odp_event``. With ``flush_on_sigterm=True`` the handler closes
every manager right there, so the close path must not wait for a lock that the interrupted code
holds on that same thread (a ``threading.Event``'s or a ``Condition(Lock())``'s would wait forever).

These tests interrupt a caller at *every* line it runs (a trace function stands in for the signal)
and close there, as the handler does; each close must return, and every event stays accounted for.
"""

from __future__ import annotations

import sys
import threading
from types import FrameType
from typing import Any, Callable, List, Optional, Tuple

import pytest

from optimizely_odp_ext import _lifecycle
from optimizely_odp_ext._threads import Wake
from optimizely_odp_ext.manager import EventManager
from tests.unit.test_manager import WAIT, Build, build, check_invariant, ev

__all__ = ["build"]  # the fixture, shared with test_manager

Setup = Callable[[Build], Tuple[EventManager, Callable[[], Any]]]


def _idle_worker(make: Build) -> Tuple[EventManager, Callable[[], Any]]:
    """The worker is idle: the next event wakes it (Wake.set on the caller's thread)."""
    manager, _ = make(flush_interval=0.01)
    manager.enqueue(ev("before"))
    assert manager.flush(WAIT)
    return manager, lambda: manager.enqueue(ev("interrupted"))


def _first_event(make: Build) -> Tuple[EventManager, Callable[[], Any]]:
    """The first event starts the threads (the start lock, thread start-up)."""
    manager, _ = make(flush_interval=0.01)
    return manager, lambda: manager.enqueue(ev("first"))


def _blocked_on_a_full_queue(make: Build) -> Tuple[EventManager, Callable[[], Any]]:
    """overflow="block": the caller waits for room inside the room condition."""
    # No datafile yet: events wait in the queue, so it stays full.
    manager, _ = make(integrated=False, queue_capacity=2, overflow="block", block_timeout=0.05)
    for name in ("a", "b"):
        manager.enqueue(ev(name))
    return manager, lambda: manager.enqueue(ev("waiting"))


def _dropping_the_oldest(make: Build) -> Tuple[EventManager, Callable[[], Any]]:
    """overflow="drop_oldest": the caller counts a drop under the count lock and logs a warning."""
    manager, _ = make(integrated=False, queue_capacity=2, overflow="drop_oldest")
    for name in ("a", "b"):
        manager.enqueue(ev(name))
    return manager, lambda: manager.enqueue(ev("newest"))


def _lines_run_by(action: Callable[[], Any]) -> int:
    count = [0]

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            count[0] += 1
        return tracer

    sys.settrace(tracer)
    try:
        action()
    finally:
        sys.settrace(None)
    return count[0]


def _close_at_line(manager: EventManager, action: Callable[[], Any], line: int) -> Optional[str]:
    """Runs ``action`` on a thread and, at its ``line``-th traced line, closes ``manager`` there
    as the SIGTERM handler would. Fails if that close (or the rest of the action) never returns."""
    seen = [0]
    where: List[str] = []
    errors: List[BaseException] = []

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line" and not where:
            seen[0] += 1
            if seen[0] == line:
                where.append(f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno} ({frame.f_code.co_name})")
                sys.settrace(None)
                _lifecycle.close_managers([manager], 1.0, why="SIGTERM (simulated)")
        return tracer

    def run() -> None:
        sys.settrace(tracer)
        try:
            action()
        except BaseException as exc:  # reported by the test
            errors.append(exc)
        finally:
            sys.settrace(None)

    thread = threading.Thread(target=run, name="interrupted-caller", daemon=True)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive(), f"deadlock: the close at {where} never returned"
    assert errors == [], f"closing at {where} raised into the caller: {errors!r}"
    return where[0] if where else None


@pytest.mark.parametrize("setup", [_idle_worker, _first_event, _blocked_on_a_full_queue, _dropping_the_oldest],
                         ids=lambda setup: setup.__name__.strip("_"))
def test_a_close_interrupting_the_caller_at_any_line_returns_and_accounts_for_every_event(
        build: Build, setup: Setup) -> None:
    manager, action = setup(build)
    lines = _lines_run_by(action)
    assert lines > 5  # the caller's path was traced (a Python-level path, not one C call)
    manager.close(1.0)
    interrupted = []
    for line in range(1, lines + 1):
        manager, action = setup(build)
        where = _close_at_line(manager, action, line)
        if where is None:
            manager.close(1.0)  # this run took fewer lines (a wait ended sooner): nothing interrupted
        else:
            interrupted.append(where)
        assert manager.closed
        stats = check_invariant(manager)
        assert stats["pending"] == 0
    # A run may take a few lines more or fewer (a wait ending sooner, a warning rate-limited).
    assert len(interrupted) >= lines // 2, interrupted


def test_wake_set_never_blocks_and_wait_consumes_it() -> None:
    wake = Wake()
    assert not wake.is_set()
    assert wake.wait(0) is False
    wake.set()
    wake.set()  # a second set while one is pending: still one wake-up, no error
    assert wake.is_set()
    assert wake.wait(WAIT) is True
    assert wake.wait(0.01) is False  # consumed
    wake.set()
    wake.clear()
    assert wake.wait(0) is False
    woke = threading.Event()

    def waiter() -> None:
        if wake.wait(WAIT):
            woke.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    wake.set()
    assert woke.wait(WAIT)
    thread.join(WAIT)
