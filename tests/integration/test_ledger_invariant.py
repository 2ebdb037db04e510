"""The ledger's invariant, ``accepted == delivered + dropped + pending + left_in_spool``, checked while
faults come and go, and at the end against the server's records and ``on_outcome`` (issue 17).

``pending`` is counted from what the owners hold (queue, ready list, batches in flight, retrying,
queued next or held by a bisection), never inferred: a lost or stuck event breaks the sum.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List

import pytest

from optimizely_odp_ext.testing import FakeOdpServer
from tests.conftest import TEST_KEY

from ._helpers import FLUSH_TIMEOUT, delivered, ids, send
from .test_ledger_defects import Recorder, balanced

_BAD = {"inv-7", "inv-61", "inv-62", "inv-140", "inv-233"}


def _faults(server: FakeOdpServer, step: int) -> None:
    """One fault of the cycle (each one short: the events get through once it passes)."""
    kind = step % 6
    if kind == 0:
        server.fail_next(2, 503)
    elif kind == 1:
        server.rate_limit_next(1, retry_after="0")
    elif kind == 2:
        server.reset_connection_every(3)
    elif kind == 3:
        server.reset_connection_every(None)
        server.hang_next(1, seconds=0.1)  # shorter than the request timeout
    elif kind == 4:
        server.set_latency(0.02)
    else:
        server.set_latency(0)


@pytest.mark.parametrize("spool", [False, True], ids=["memory", "spool"])
def test_the_ledger_balances_through_faults_and_every_event_is_reported_once(
        installed: Callable[..., Any], tmp_path: Any, spool: bool) -> None:
    recorder = Recorder()
    # 14 events fit in one body, 28 do not: batches of 40 are split by 413s before a 400 is bisected.
    with FakeOdpServer(TEST_KEY, max_body_bytes=14 * 260) as server:
        server.reject_events(lambda event: event["data"]["idempotence_id"] in _BAD)
        client = installed(server, batch_size=40, max_in_flight=3, on_outcome=recorder, retry_window=30.0,
                           spool_dir=str(tmp_path) if spool else None)
        unbalanced: List[Dict[str, Any]] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                stats = client.odp_event_stats()
                if not balanced(stats) or stats["pending"] < 0:
                    unbalanced.append(stats)
                stop.wait(0.002)

        watcher = threading.Thread(target=watch, name="test-ledger-watch")
        watcher.start()
        sent = ids("inv", 300)
        senders = [threading.Thread(target=send, args=(client, sent[n::3]), name=f"test-send-{n}") for n in range(3)]
        try:
            for thread in senders:
                thread.start()
            for step in range(12):
                _faults(server, step)
                assert server.wait_for_requests(step + 1, timeout=FLUSH_TIMEOUT)
            for thread in senders:
                thread.join(FLUSH_TIMEOUT)
            server.reset_connection_every(None)
            server.set_latency(0)
            assert client.flush_odp_events(FLUSH_TIMEOUT) is True, client.odp_event_stats()
        finally:
            stop.set()
            watcher.join(FLUSH_TIMEOUT)
        assert unbalanced == []

        stats = client.odp_event_stats()
        assert (stats["accepted"], stats["pending"]) == (300, 0), stats
        assert balanced(stats)
        good = set(sent) - _BAD
        assert set(delivered(server)) == good  # at least once: a reset request may have landed twice
        outcomes = recorder.outcomes()  # fails on an event reported twice
        assert {i for i, o in outcomes.items() if o == "delivered"} == good
        assert {i for i, o in outcomes.items() if o != "delivered"} == _BAD
        assert stats["delivered"] == len(good)
        client.close()
        closed = client.odp_event_stats()
        assert balanced(closed)
        assert closed["pending"] == 0
