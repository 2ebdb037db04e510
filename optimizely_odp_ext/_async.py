"""asyncio: wait for delivery without blocking the event loop.

``client.flush_odp_events(2)`` and ``client.close()`` wait (for ODP, up to their timeouts) on the
calling thread: in a coroutine that is the event loop's thread, and every other task stops for as
long. The awaitable forms run that same wait on a thread of their own and resume the awaiting task
when it ends; the loop serves other tasks meanwhile::

    delivered = await optimizely_odp_ext.flush_async(client, timeout=2)
    await optimizely_odp_ext.close_async(client)      # in a FastAPI lifespan's shutdown

Sending needs no awaitable form: ``send_odp_event`` never waits and never does I/O.

Cancelling the awaiting task (a request's timeout, a lifespan cut short) raises ``CancelledError``
in it, as any await does, but delivery goes on: what was queued is still delivered in the background,
and a close under way still finishes (the process's exit waits for it, within ``close_timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any, Callable, Optional, TypeVar

from ._threads import start_quiet
from ._types import odp
from .extension import manager_of

__all__ = ["close_async", "flush_async"]

_T = TypeVar("_T")


async def flush_async(client: Any, timeout: Optional[float] = None) -> bool:
    """``await``-able ``client.flush_odp_events(timeout)``: the loop runs other tasks while it waits.

    Args:
        client: An Optimizely client with the plugin installed (otherwise one error line, False).
        timeout: Seconds to wait at most; None has the bounds of ``flush_odp_events(None)``.

    Returns:
        True when every event sent before the call reached an outcome in time, False otherwise.

    Raises:
        asyncio.CancelledError: The awaiting task was cancelled (the flush and delivery go on).
    """
    return await _off_the_loop("flush", lambda: _flush(client, timeout))


async def close_async(client: Any, timeout: Optional[float] = None) -> None:
    """``await``-able ``client.close()``: delivers what is queued, then the SDK's own close.

    Args:
        client: An Optimizely client (with the plugin installed, its ODP events are delivered first).
        timeout: Seconds the delivery may take at most; None takes the client's ``close_timeout``.

    Raises:
        asyncio.CancelledError: The awaiting task was cancelled (the close goes on to its end).
    """
    await _off_the_loop("close", lambda: _close(client, timeout))


def _flush(client: Any, timeout: Optional[float]) -> bool:
    flush = getattr(odp(client), "flush_odp_events", None)  # odp() logs when the plugin is not installed
    return bool(flush(timeout)) if callable(flush) else False


def _close(client: Any, timeout: Optional[float]) -> None:
    manager = manager_of(client) if timeout is not None and hasattr(client, "__dict__") else None
    if manager is not None:
        manager.close(timeout)  # the budget asked for; client.close() below finds it closed
    client.close()


async def _off_the_loop(name: str, call: Callable[[], _T]) -> _T:
    """Runs ``call`` on a new thread of ours (not the loop's default executor, which the application
    may keep busy or shut down first) and awaits its result."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if future.done():
            return  # the awaiting task was cancelled: the call ran to its end all the same
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def run() -> None:
        ok = True
        value: Any = None
        try:
            value = call()
        except BaseException as exc:  # handed to the awaiting task, as the direct call would raise it
            ok, value = False, exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits the result any more
            loop.call_soon_threadsafe(settle, ok, value)

    try:
        start_quiet(threading.Thread(target=run, name=f"odp-ext-{name}-async", daemon=True))
    except RuntimeError:  # no new threads (the interpreter is exiting): wait here, as the direct call
        return call()
    return await future
