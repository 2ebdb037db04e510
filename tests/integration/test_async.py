"""asyncio: ``flush_async`` and ``close_async`` wait without blocking the event loop (issue 18).

A ticker task measures how late the loop runs it (its worst lag) while the awaitable waits, with
ODP hanging, beside the lag of the blocking call made on the loop's thread. The bound asserted only
tells "the loop kept running" (a few ms; the issue asks for under 50 ms) from "the loop stopped for
the whole wait" (2,000 ms), without flaking on a loaded machine: the figures are printed (``-s``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Awaitable, Callable, Tuple

import pytest

import optimizely_odp_ext
from optimizely_odp_ext.testing import FakeOdpServer

from ._helpers import assert_delivered_exactly_once, ids, send, wait_until
from .conftest import Log

LOOP_RUNNING = 0.2  # seconds: far below the waits measured (2 s), far above a busy machine's jitter
TICK = 0.005


async def _lag_while(wait: Callable[[], Awaitable[Any]]) -> Tuple[float, Any]:
    """Runs ``wait()`` beside a ticker task; returns the ticker's worst lag (seconds) and the result."""
    worst = 0.0
    stop = asyncio.Event()

    async def tick() -> None:
        nonlocal worst
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(TICK)
            now = time.monotonic()
            worst = max(worst, now - last - TICK)
            last = now

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(TICK * 4)  # the ticker is running before the wait starts
    try:
        result = await wait()
    finally:
        stop.set()
        await ticker
    return worst, result


def _hanging(server: FakeOdpServer) -> None:
    server.hang_next(1000, seconds=3.0)  # every request: no answer (the senders time out and retry)


def test_flush_async_waits_for_delivery(odp_server: FakeOdpServer, installed: Callable[..., Any]) -> None:
    client = installed(odp_server, flush_interval=30.0)
    sent = ids("async", 25)
    send(client, sent)
    assert asyncio.run(optimizely_odp_ext.flush_async(client, 10)) is True
    assert_delivered_exactly_once(odp_server, sent)  # flushed: already there, no waiting


def test_flush_async_keeps_the_loop_running_while_odp_hangs(odp_server: FakeOdpServer,
                                                            installed: Callable[..., Any]) -> None:
    client = installed(odp_server)
    _hanging(odp_server)
    send(client, ids("hang", 5))

    async def blocking() -> bool:
        return bool(client.flush_odp_events(2))

    blocked_lag, blocked = asyncio.run(_lag_while(blocking))
    lag, flushed = asyncio.run(_lag_while(lambda: optimizely_odp_ext.flush_async(client, 2)))
    print(f"loop lag while waiting 2 s with ODP hanging: flush_odp_events {blocked_lag * 1000:.0f} ms, "
          f"flush_async {lag * 1000:.1f} ms")
    assert blocked is False  # ODP hangs: neither could deliver in 2 s
    assert flushed is False
    assert blocked_lag > 1.5  # the measure sees a blocked loop (else the next bound proves nothing)
    assert lag < LOOP_RUNNING


def test_close_async_keeps_the_loop_running_while_odp_hangs(odp_server: FakeOdpServer,
                                                            installed: Callable[..., Any], log: Log) -> None:
    client = installed(odp_server, close_timeout=2.0)
    _hanging(odp_server)
    send(client, ids("hang", 5))
    started = time.monotonic()
    lag, _ = asyncio.run(_lag_while(lambda: optimizely_odp_ext.close_async(client)))
    waited = time.monotonic() - started
    print(f"loop lag while close_async waits {waited:.1f} s with ODP hanging: {lag * 1000:.1f} ms")
    assert lag < LOOP_RUNNING
    assert waited >= 1.5  # it did wait for the close (close_timeout 2 s), on another thread
    assert optimizely_odp_ext.odp(client).odp_event_stats()["pending"] == 0  # closed: nothing left pending


def test_close_async_timeout_bounds_the_delivery(odp_server: FakeOdpServer, installed: Callable[..., Any]) -> None:
    client = installed(odp_server, close_timeout=30.0)
    _hanging(odp_server)
    send(client, ids("hang", 5))
    started = time.monotonic()
    asyncio.run(optimizely_odp_ext.close_async(client, timeout=0.5))
    assert time.monotonic() - started < 20.0  # the timeout given, not close_timeout's 30 s
    client.send_odp_event("late", {"fs_user_id": "u"})  # closed: refused (logged), never raises


def _cancel_while_waiting(odp_server: FakeOdpServer, client: Any,
                          wait: Callable[[], Awaitable[Any]]) -> None:
    """Cancels the task awaiting ``wait()`` while it waits: CancelledError there; every event arrives."""
    odp_server.set_latency(0.5)  # still waiting when the task is cancelled
    sent = ids("cancel", 10)
    send(client, sent)

    async def main() -> None:
        task = asyncio.ensure_future(wait())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert odp_server.wait_for_events(len(sent), timeout=10.0)
    assert_delivered_exactly_once(odp_server, sent)


def test_cancelling_flush_async_raises_there_but_delivery_goes_on(odp_server: FakeOdpServer,
                                                                   installed: Callable[..., Any]) -> None:
    client = installed(odp_server, flush_interval=30.0)
    _cancel_while_waiting(odp_server, client, lambda: optimizely_odp_ext.flush_async(client, 10))


def test_cancelling_close_async_does_not_cancel_the_close(odp_server: FakeOdpServer,
                                                          installed: Callable[..., Any]) -> None:
    client = installed(odp_server, flush_interval=30.0)
    _cancel_while_waiting(odp_server, client, lambda: optimizely_odp_ext.close_async(client))
    # The close ran to its end, on its own thread.
    assert wait_until(lambda: not any(t.name == "odp-ext-close-async" for t in threading.enumerate()), 10.0)


def test_flush_async_on_a_client_without_the_plugin(make_client: Callable[..., Any], log: Log) -> None:
    client = make_client(logger=log[0])
    assert asyncio.run(optimizely_odp_ext.flush_async(client, 1)) is False
    assert any("not installed on this client" in line for line in log[1].errors())
