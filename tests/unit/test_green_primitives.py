"""Green threads: ``_remake_primitives()`` makes every lock, condition and semaphore of a manager again,
wherever its components keep them (issues 17 and 18).

gunicorn's gevent worker patches ``threading`` after the fork, once a preloaded app made its client: a
greenlet waiting on a lock made before the patch blocks the process's only OS thread. ``_start()``
remakes them all before the worker starts; this finds every primitive reachable from the manager, so
a lock that moves into a new component without its ``remake()`` fails here.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Iterator, Tuple

from optimizely_odp_ext._threads import Wake
from tests.unit import test_manager
from tests.unit.test_manager import Build

build = test_manager.build  # the same fixture: managers closed and their threads checked gone

PRIMITIVES: Tuple[type, ...] = (type(threading.Lock()), type(threading.RLock()), threading.Condition,
                                threading.Semaphore, threading.Event, Wake)
# Held only around flag changes that neither wait nor yield (see Lifetime): a real lock there cannot
# block a greenlet. Remaking it could let two holders in at once, so it is made again only after a fork.
NOT_REMADE = {"_life.lock"}


def _attributes(obj: Any) -> Iterator[Tuple[str, Any]]:
    names = {name for cls in type(obj).__mro__ for name in getattr(cls, "__slots__", ())}
    names |= set(getattr(obj, "__dict__", {}))
    for name in sorted(names - {"__dict__", "__weakref__"}):
        if hasattr(obj, name):
            yield name, getattr(obj, name)


def primitives(obj: Any, prefix: str = "", depth: int = 2) -> Dict[str, Any]:
    """Path -> primitive, for every lock, condition, semaphore or event of ``obj`` and its components."""
    found: Dict[str, Any] = {}
    for name, value in _attributes(obj):
        if isinstance(value, PRIMITIVES):
            found[prefix + name] = value
        elif depth and type(value).__module__.startswith("optimizely_odp_ext."):
            found.update(primitives(value, f"{prefix}{name}.", depth - 1))
    return found


def test_every_primitive_of_a_manager_is_made_again(build: Build) -> None:
    manager, _ = build(integrated=False)  # no worker started: nothing waits on them yet
    before = primitives(manager)
    # The walk sees into the components (a component that hides its locks from it fails here too).
    assert {"_wake", "_ledger.lock", "_life.start_lock", "_life.lock", "_room._cond", "_barrier._cond",
            "_senders._ready", "_counts._lock", "_tally._failures_lock"} <= set(before)
    manager._remake_primitives()
    after = primitives(manager)
    assert set(after) == set(before)
    assert {path for path, old in before.items() if after[path] is old} == NOT_REMADE
