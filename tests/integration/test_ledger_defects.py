"""The seven accounting defects of issue 17, one named test each, against FakeOdpServer over real HTTP.

Every test checks the outcome of each event against an independent record (the server's received
idempotence ids, the ids ``on_outcome`` was called with), not only against the counters.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
from optimizely import optimizely

import optimizely_odp_ext
from optimizely_odp_ext import manager as manager_module
from optimizely_odp_ext.extension import manager_of
from optimizely_odp_ext.manager import EventManager
from optimizely_odp_ext.settings import make_options
from optimizely_odp_ext.testing import FakeOdpServer
from tests.conftest import TEST_KEY

from ._helpers import FAST, FLUSH_TIMEOUT, delivered, ids, send, wait_until

GIVE_UP = "flush_odp_events gave up after "


class Recorder:
    """``on_outcome``: every call, with the ids it reported; ``gate`` (optional) holds the first call."""

    def __init__(self, gate: Optional[threading.Event] = None) -> None:
        self.calls: List[Tuple[str, List[str], str]] = []
        self.lock = threading.Lock()
        self.gate = gate
        self.entered = threading.Event()

    def __call__(self, outcome: str, events: List[Dict[str, Any]], detail: str) -> None:
        with self.lock:
            self.calls.append((outcome, [str(e["idempotence_id"]) for e in events], threading.current_thread().name))
            first = len(self.calls) == 1
        if first and self.gate is not None:
            self.entered.set()
            assert self.gate.wait(60), "the test never released the callback"

    def outcomes(self) -> Dict[str, str]:
        """id -> outcome; fails if an id was reported twice."""
        seen: Dict[str, str] = {}
        with self.lock:
            for outcome, event_ids, _ in self.calls:
                for event_id in event_ids:
                    assert event_id not in seen, f"{event_id} reported twice: {seen[event_id]}, then {outcome}"
                    seen[event_id] = outcome
        return seen


def balanced(stats: Dict[str, Any]) -> bool:
    return bool(stats["accepted"] == stats["delivered"] + sum(stats["dropped"].values()) + stats["pending"]
                + stats["left_in_spool"])


# ----------------------------------------------------------------- 1. held parts never end


def test_held_bisection_parts_end_when_a_sibling_part_expires(
        odp_server: FakeOdpServer, installed: Callable[..., Any]) -> None:
    """16 events refused with a 400 are bisected; three quarters are refused (held for the fourth),
    the fourth fails with 500 until the retry window expires. The held quarters must not wait for a
    verdict that cannot come: their good events are delivered, their bad ones rejected."""
    sent = ids("h", 16, start=10)  # h-10 .. h-25: ids of one length, quarters h-10..13, 14..17, 18..21, 22..25
    bad = {"h-10", "h-14", "h-18"}  # one bad event in each of the first three quarters
    failing = set(sent[12:])  # the fourth quarter: 500 once the first three quarters were tried
    seen: Dict[str, int] = collections.Counter()

    def rule(event: Dict[str, Any]) -> bool:
        event_id = event["data"]["idempotence_id"]
        seen[event_id] += 1
        # h-18 is in the whole batch, its second half and its third quarter: armed from the 3rd.
        if event_id in failing and seen["h-18"] >= 3:
            raise RuntimeError("fourth quarter fails")  # FakeOdpServer answers 500
        return event_id in bad

    odp_server.reject_events(rule)
    recorder = Recorder()
    client = installed(odp_server, batch_size=16, max_in_flight=1, flush_interval=60, retry_window=1.0,
                       on_outcome=recorder)
    send(client, sent)
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True, client.odp_event_stats()

    good = set(sent) - bad - failing
    assert set(delivered(odp_server)) == good
    outcomes = recorder.outcomes()
    assert {i for i, o in outcomes.items() if o == "delivered"} == good
    assert {i for i, o in outcomes.items() if o == "rejected"} == bad
    assert {i for i, o in outcomes.items() if o == "retry_expired"} == failing
    stats = client.odp_event_stats()
    assert (stats["accepted"], stats["delivered"], stats["pending"]) == (16, 9, 0)
    assert balanced(stats)
    # ODP recovers, new events flow: flush succeeds.
    odp_server.reject_events(None)
    send(client, ids("after", 3))
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True


# ----------------------------------------------------------------- 2. 413 split, then 400


def test_a_part_of_a_413_split_refused_with_400_is_bisected_not_held(
        odp_server: FakeOdpServer, installed: Callable[..., Any]) -> None:
    """52 events over the server's body limit are split twice (413) into 13-event parts at depth 2;
    one part holds a bad event (400). Its group must not wait for three siblings that never exist."""
    client = installed(odp_server, batch_size=52, max_in_flight=1, flush_interval=60)
    send(client, ["s-00"])  # one event alone, to measure an event's size on the wire
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    one = len(odp_server.requests[0].body) - 2  # "[" + event + "]"
    sent = [f"s-{n:02d}" for n in range(10, 62)]  # ids of one length: every event has that size
    recorder = Recorder()
    # 13 events fit in a body, 26 do not.
    with FakeOdpServer(TEST_KEY, max_body_bytes=13 * (one + 1) + 1 + one) as limited:
        limited.reject_events(lambda event: event["data"]["idempotence_id"] == "s-15")
        client2 = installed(limited, batch_size=52, max_in_flight=1, flush_interval=60, on_outcome=recorder)
        send(client2, sent)
        assert client2.flush_odp_events(FLUSH_TIMEOUT) is True, client2.odp_event_stats()
        client2.close()
    odp_server = limited
    assert set(delivered(odp_server)) == set(sent) - {"s-15"}
    outcomes = recorder.outcomes()
    assert outcomes == {i: ("rejected" if i == "s-15" else "delivered") for i in sent}
    stats = client2.odp_event_stats()
    assert (stats["delivered"], stats["dropped"]["rejected"], stats["pending"]) == (51, 1, 0)
    assert balanced(stats)


# ----------------------------------------------------------------- 3. slow on_outcome at close


def test_a_slow_callback_at_close_counts_and_reports_each_event_once(
        odp_server: FakeOdpServer, installed: Callable[..., Any]) -> None:
    """The first delivered report blocks the worker past close()'s deadline: the closing thread
    must not count what the worker still holds (it used to count delivered events as unconfirmed)."""
    gate = threading.Event()
    recorder = Recorder(gate)
    sent = ids("slow", 4)
    client = installed(odp_server, batch_size=1, max_in_flight=4, close_timeout=0.2, on_outcome=recorder)
    manager = manager_of(client)
    assert manager is not None
    send(client, sent)
    try:
        assert recorder.entered.wait(FLUSH_TIMEOUT)
        assert odp_server.wait_for_events(4, timeout=FLUSH_TIMEOUT)
        client.close()  # returns past its deadline while the callback still blocks
    finally:
        gate.set()
    worker = manager._life.worker
    if worker is not None:
        worker.join(FLUSH_TIMEOUT)
        assert not worker.is_alive()

    assert set(delivered(odp_server)) == set(sent)
    outcomes = recorder.outcomes()
    assert sorted(outcomes) == sorted(sent)  # each event reported exactly once
    stats = client.odp_event_stats()
    assert stats["accepted"] == 4
    assert stats["delivered"] + sum(stats["dropped"].values()) == 4, stats
    assert stats["pending"] == 0
    assert collections.Counter(outcomes.values())["delivered"] == stats["delivered"]


# ----------------------------------------------------------------- 4. on_outcome at close, every mode


def test_with_the_spool_every_event_left_at_close_is_reported(
        odp_server: FakeOdpServer, installed: Callable[..., Any], tmp_path: Any) -> None:
    odp_server.fail_for(60)  # ODP is down: nothing is delivered before the close deadline
    recorder = Recorder()
    sent = ids("spooled", 3)
    client = installed(odp_server, spool_dir=str(tmp_path), close_timeout=0.3, on_outcome=recorder)
    send(client, sent)
    assert odp_server.wait_for_requests(1, timeout=FLUSH_TIMEOUT)
    client.close()

    assert delivered(odp_server) == {}
    stats = client.odp_event_stats()
    assert (stats["accepted"], stats["pending"]) == (3, 0), stats
    assert balanced(stats), stats
    outcomes = recorder.outcomes()
    assert sorted(outcomes) == sent
    by_name = collections.Counter(outcomes.values())
    # The same names as the stats: left_in_spool, or a drop reason.
    assert by_name["left_in_spool"] == stats["left_in_spool"]
    for reason, count in stats["dropped"].items():
        assert by_name[reason] == count


class _CloseOnStart:
    """A transport factory that closes the manager when the first event starts it: what our SIGTERM
    handler does when it interrupts a caller between queueing its event and starting the worker."""

    def __init__(self, url: str) -> None:
        self.manager: Optional[EventManager] = None
        self.url = url

    def __call__(self, options: Any) -> Any:
        assert self.manager is not None
        self.manager.close()
        return manager_module._default_transport(options)


@pytest.mark.parametrize("spool", [False, True], ids=["memory", "spool"])
def test_a_send_racing_the_close_is_counted_and_reported_once(
        odp_server: FakeOdpServer, tmp_path: Any, spool: bool) -> None:
    recorder = Recorder()
    logger = logging.getLogger("tests.ledger.race")
    factory = _CloseOnStart(odp_server.url)
    options = make_options(**{**FAST, "api_host": odp_server.url, "api_key": TEST_KEY, "on_outcome": recorder,
                              "spool_dir": str(tmp_path) if spool else None})
    manager = EventManager(options, logger, transport_factory=factory)
    factory.manager = manager
    from optimizely_odp_ext.event import validate

    for event_id in ids("race", 6):
        manager.enqueue(validate("a", {"fs_user_id": "u"}, "fullstack", {"idempotence_id": event_id}))
    stats = manager.stats()
    # The first event was queued before the close: it has an outcome. The other five were refused.
    assert stats["accepted"] == 1, stats
    assert stats["refused"]["closed"] == 5
    assert stats["pending"] == 0, stats
    assert balanced(stats), stats
    assert list(recorder.outcomes()) == ["race-0"]
    worker = manager._life.worker
    if worker is not None:
        worker.join(FLUSH_TIMEOUT)


class _CloseOnLine(logging.Handler):
    """Closes the manager on the caller's thread when the queue-full warning is logged: the caller
    then appends its event after the close finished (our SIGTERM handler can interrupt it there)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.manager: Optional[EventManager] = None

    def emit(self, record: logging.LogRecord) -> None:
        if "queue is full" in record.getMessage() and self.manager is not None:
            self.manager.close(1.0)


def test_an_event_appended_after_the_close_finished_is_reported_once() -> None:
    recorder = Recorder()
    handler = _CloseOnLine()
    logger = logging.getLogger("tests.ledger.late")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        # No datafile: the two first events wait in the queue, which is then full.
        options = make_options(**{**FAST, "queue_capacity": 2, "overflow": "drop_oldest", "on_outcome": recorder})
        manager = EventManager(options, logger)
        handler.manager = manager
        from optimizely_odp_ext.event import validate

        for event_id in ids("late", 3):
            manager.enqueue(validate("a", {"fs_user_id": "u"}, "fullstack", {"idempotence_id": event_id}))
        stats = manager.stats()
        assert stats["accepted"] == 3, stats
        assert stats["pending"] == 0, stats
        assert balanced(stats), stats
        outcomes = recorder.outcomes()
        assert outcomes == {"late-0": "queue_full", "late-1": "shutdown", "late-2": "shutdown"}, outcomes
        assert (stats["dropped"]["queue_full"], stats["dropped"]["shutdown"]) == (1, 2)
    finally:
        logger.removeHandler(handler)


# ----------------------------------------------------------------- 5. uninstall never stalls others


def test_one_clients_uninstall_does_not_stall_another_clients_first_send(
        odp_server: FakeOdpServer, make_client: Callable[..., Any], log: Any) -> None:
    from optimizely_odp_ext._datafile import datafile

    gate = threading.Event()
    recorder = Recorder(gate)
    closing = make_client(datafile_json=datafile(odp_server.url, TEST_KEY), logger=log[0])
    assert optimizely_odp_ext.install(closing, **{**FAST, "close_timeout": 20.0, "on_outcome": recorder})
    assert optimizely_odp_ext.install(**FAST)
    try:
        other = make_client(datafile_json=datafile(odp_server.url, TEST_KEY), logger=log[0])
        send(closing, ["a-0"])
        assert recorder.entered.wait(FLUSH_TIMEOUT)  # its worker is held in on_outcome: close() waits
        manager = manager_of(closing)
        assert manager is not None
        uninstaller = threading.Thread(target=optimizely_odp_ext.uninstall, args=(closing,), name="test-uninstall")
        uninstaller.start()
        try:
            assert wait_until(lambda: manager.closed, timeout=FLUSH_TIMEOUT)
            send(other, ["b-0"])  # its first send makes its manager: must not wait for the other's close
            assert uninstaller.is_alive(), "the other client's send waited for the uninstall to end"
            assert other.odp_event_stats()["accepted"] == 1
        finally:
            gate.set()
            uninstaller.join(FLUSH_TIMEOUT)
        assert not uninstaller.is_alive()
        assert other.flush_odp_events(FLUSH_TIMEOUT) is True
        assert set(delivered(odp_server)) == {"a-0", "b-0"}
    finally:
        optimizely_odp_ext.uninstall()


# ----------------------------------------------------------------- 6. flush from on_outcome


def test_flush_from_on_outcome_returns_at_once_with_one_line(
        odp_server: FakeOdpServer, installed: Callable[..., Any], log: Any) -> None:
    inner: List[bool] = []
    client_box: List[Any] = []

    def callback(outcome: str, events: List[Dict[str, Any]], detail: str) -> None:
        if not inner:
            inner.append(client_box[0].flush_odp_events(30.0))

    client = installed(odp_server, on_outcome=callback, batch_size=2)
    client_box.append(client)
    send(client, ids("cb", 2))
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    assert len(inner) == 1, "the flush inside on_outcome has not returned"
    assert set(delivered(odp_server)) == set(ids("cb", 2))
    give_ups = [line for line in log[1].lines() if line.startswith(GIVE_UP)]
    assert len(give_ups) <= 1
    if inner[0] is False:
        assert len(give_ups) == 1, give_ups
        assert "worker thread" in give_ups[0], give_ups


# ----------------------------------------------------------------- 7. silent give-ups and resurrection


def test_flush_that_cannot_start_a_worker_says_why(
        make_client: Callable[..., Any], log: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """No datafile yet, and the worker cannot start (the interpreter is exiting): flush gives up
    with the same line as every other give-up, never silently."""

    def refuse(thread: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(manager_module, "start_quiet", refuse)
    options = make_options(**FAST)
    manager = EventManager(options, log[0])
    from optimizely_odp_ext.event import validate

    with pytest.raises(RuntimeError):
        manager.enqueue(validate("a", {"fs_user_id": "u"}, "fullstack", None))
    assert manager.flush(0.1) is False
    give_ups = [line for line in log[1].lines() if line.startswith(GIVE_UP)]
    assert len(give_ups) == 1, log[1].lines()
    assert "no datafile has arrived yet" in give_ups[0]
    monkeypatch.undo()
    manager.close(0.1)


@pytest.mark.skipif(not hasattr(optimizely.Optimizely, "close"), reason="optimizely-sdk 4.1.1 has no close()")
def test_a_client_closed_before_install_stays_closed(
        odp_server: FakeOdpServer, make_client: Callable[..., Any], log: Any) -> None:
    from optimizely_odp_ext._datafile import datafile

    client = make_client(datafile_json=datafile(odp_server.url, TEST_KEY), logger=log[0])
    client.close()  # the SDK's own close: the plugin is not installed yet
    threads = set(threading.enumerate())
    assert optimizely_odp_ext.install(client, **FAST) is True
    send(client, ids("ghost", 2))
    closed = [line for line in log[1].errors() if "closed" in line]
    assert len(closed) == 2, log[1].errors()
    assert client.flush_odp_events(1.0) is True
    assert odp_server.requests == []
    stats = client.odp_event_stats()
    assert (stats["accepted"], stats["refused"]["closed"]) == (0, 2)
    assert {t for t in threading.enumerate() if t.name.startswith("odp-ext-")} - threads == set()


# ----------------------------------------------------------------- re-entrant callbacks


def test_a_callback_that_sends_and_closes_reentrantly_changes_no_count(
        odp_server: FakeOdpServer, installed: Callable[..., Any]) -> None:
    """on_outcome, on the worker thread, sends one more event and closes the client: the close
    returns at once (the worker finishes it when the callback returns), and every accepted event
    still has exactly one outcome, reported once."""
    calls: List[str] = []
    box: List[Any] = []

    def callback(outcome: str, events: List[Dict[str, Any]], detail: str) -> None:
        calls.extend(str(e["idempotence_id"]) for e in events)
        if len(calls) == len(events):  # the first call only
            send(box[0], ["reentrant-0"])
            box[0].close()

    client = installed(odp_server, on_outcome=callback, batch_size=2)
    box.append(client)
    manager = manager_of(client)
    assert manager is not None
    send(client, ids("first", 2))
    assert wait_until(lambda: manager.closed, timeout=FLUSH_TIMEOUT)
    worker = manager._life.worker
    assert worker is not None
    worker.join(FLUSH_TIMEOUT)
    assert not worker.is_alive()

    stats = client.odp_event_stats()
    assert stats["accepted"] == 3, stats
    assert stats["pending"] == 0, stats
    assert balanced(stats), stats
    assert sorted(calls) == sorted([*ids("first", 2), "reentrant-0"])  # each reported once
    assert set(delivered(odp_server)) <= set(calls)
    assert stats["delivered"] == len(set(delivered(odp_server)))
