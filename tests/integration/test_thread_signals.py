"""Threads of ours never take the application's signals (see optimizely_odp_ext._threads).

A signal sent to a process goes to any thread that does not block it. Python runs its handlers on
the main thread only, and a main thread blocked in C (a multiprocessing lock, a join) is not
interrupted when another thread took the signal: a ``Pool.terminate()`` whose worker had our
threads and ``flush_on_sigterm=True`` could then wait forever. Every thread we start is born with
the asynchronous signals blocked; the application's threads keep their masks.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Set

import pytest

from optimizely_odp_ext._threads import ASYNC_SIGNALS, start_quiet
from optimizely_odp_ext.testing import FakeOdpServer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task/*/status")


def _blocked(native_id: int) -> Set[int]:
    """The signals a thread of this process blocks, from the kernel's view of it."""
    for line in Path(f"/proc/self/task/{native_id}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            mask = int(line.split()[1], 16)
            return {number for number in range(1, 65) if mask & (1 << (number - 1))}
    raise AssertionError(f"no SigBlk line for thread {native_id}")


def _ours() -> Dict[str, int]:
    return {t.name: t.native_id for t in threading.enumerate()
            if (t.name.startswith(("odp-ext-", "FakeOdpServer:"))) and t.native_id is not None}


def test_start_quiet_blocks_async_signals_in_the_new_thread_only() -> None:
    before = _blocked(threading.get_native_id())
    seen: Dict[str, Set[int]] = {}
    done = threading.Event()

    def body() -> None:
        seen["inside"] = _blocked(threading.get_native_id())
        done.wait(10)

    thread = threading.Thread(target=body, name="quiet")
    start_quiet(thread)
    try:
        assert _blocked(threading.get_native_id()) == before  # the starting thread's mask is put back
    finally:
        done.set()
        thread.join(10)
    assert seen["inside"] >= ASYNC_SIGNALS
    assert {signal.SIGTERM, signal.SIGINT} <= seen["inside"]
    assert signal.SIGSEGV not in seen["inside"]  # raised by the thread itself: never blocked


def test_worker_senders_and_fake_server_threads_never_take_sigterm(
        odp_server: FakeOdpServer, installed: Callable[..., Any]) -> None:
    client = installed(odp_server, flush_interval=0.01, max_in_flight=2)
    client.send_odp_event("signals", {"fs_user_id": "u"})
    assert client.flush_odp_events(10)
    threads = _ours()
    assert {"odp-ext-worker", "odp-ext-sender-0", "odp-ext-sender-1"} <= set(threads), threads
    for name, native_id in threads.items():
        blocked = _blocked(native_id)
        assert {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1} <= blocked, name
    # The application's thread (here pytest's main thread) is untouched: it still takes SIGTERM.
    assert signal.SIGTERM not in _blocked(threading.get_native_id())
