"""The idempotence-id pool under threads: several managers' workers draw at once (issue 9, item 1)."""

from __future__ import annotations

import re
import sys
import threading
from typing import Iterator, List

import pytest

from optimizely_odp_ext.event import _IdPool

UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Hand the interpreter lock over as often as possible, so threads interleave inside next()."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


@pytest.mark.usefixtures("busy_switching")
def test_threads_drawing_from_one_pool_never_fail_and_never_repeat() -> None:
    pool = _IdPool(block=2)  # tiny blocks: a refill at every other draw, where the race was
    drawn: List[List[str]] = []
    errors: List[BaseException] = []

    def draw() -> None:
        mine: List[str] = []
        try:
            for _ in range(20_000):
                mine.append(pool.next())
        except BaseException as exc:  # the test reports any failure inside the thread
            errors.append(exc)
        drawn.append(mine)

    threads = [threading.Thread(target=draw) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    every = [i for mine in drawn for i in mine]
    assert len(every) == 160_000
    assert len(set(every)) == len(every)
    assert all(UUID4.fullmatch(i) for i in every)


def test_each_thread_has_its_own_block() -> None:
    pool = _IdPool(block=4)
    pool.next()
    seen: List[str] = []
    thread = threading.Thread(target=lambda: seen.append(pool._hex))
    thread.start()
    thread.join(5)
    assert seen == [""]  # the other thread starts with no block of its own
    assert len(pool._hex) == 4 * 32
