"""What the stateful ledger test (test_stateful_ledger.py) found beyond issue 17's seven defects, each
reproduced on its own, deterministically."""

from __future__ import annotations

import threading
from typing import Any, Callable, List

import pytest

from optimizely_odp_ext.manager import EventManager
from optimizely_odp_ext.testing import FakeOdpServer

from ._helpers import FLUSH_TIMEOUT, assert_delivered_exactly_once, send

# How long the test lets a flush run before it lets the worker start. A correct flush waits for the
# worker whatever this is; a flush that gives up without waiting returns long before it.
FLUSH_GRACE = 2.0


def test_a_flush_racing_the_first_send_waits_for_its_event(
        odp_server: FakeOdpServer, installed: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    client = installed(odp_server)
    queued = threading.Event()
    release = threading.Event()
    start_worker = EventManager._start

    def start_when_released(manager: EventManager) -> None:
        queued.set()  # the event is in the queue; the worker that will send it is not running yet
        release.wait(FLUSH_TIMEOUT)
        start_worker(manager)

    monkeypatch.setattr(EventManager, "_start", start_when_released)
    sender = threading.Thread(target=send, args=(client, ["racing-0"]), name="test-sender", daemon=True)
    sender.start()
    assert queued.wait(10)
    flushed: List[bool] = []
    flusher = threading.Thread(target=lambda: flushed.append(client.flush_odp_events(FLUSH_TIMEOUT)),
                               name="test-flusher", daemon=True)
    flusher.start()
    flusher.join(FLUSH_GRACE)
    release.set()
    flusher.join(FLUSH_TIMEOUT + 5)
    sender.join(10)
    assert not flusher.is_alive()
    assert not sender.is_alive()
    assert flushed == [True], client.odp_event_stats()
    assert_delivered_exactly_once(odp_server, ["racing-0"])
