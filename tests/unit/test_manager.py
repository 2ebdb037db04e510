"""Unit tests for optimizely_odp_ext.manager.EventManager with an injected fake transport.

No sleeps: every wait is on a condition (the fake transport's calls, flush(), an Event) with a
bounded timeout. Every manager is closed, and its threads checked gone, by the ``build`` fixture.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import threading
import time
from typing import Any, Callable, Deque, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import pytest

from optimizely_odp_ext.event import Pending, batch_size_bytes, default_data, encode
from optimizely_odp_ext.manager import EventManager
from optimizely_odp_ext.retry import RetryPolicy
from optimizely_odp_ext.settings import Options
from optimizely_odp_ext.transport import Reply
from tests.conftest import RecordingHandler

HOST = "http://127.0.0.1:1"
URL = HOST + "/v3/events"
KEY = "k"
SECRET_KEY = "secret-api-key-0123456789"
SDK_VERSION = "9.9.9"
WAIT = 5.0  # upper bound for every wait on a condition
OK = Reply(202, None, "")

Log = Tuple[logging.Logger, RecordingHandler]


class Call(NamedTuple):
    url: str
    key: str
    body: bytes
    timeout: Tuple[float, float]
    at: float
    reply: Optional[Reply]


Script = Union[Reply, BaseException]


class FakeTransport:
    """Records every send; answers from a script, then from ``responder`` (default 202).

    ``gate`` is set by default; clear it to make every send block until it is set again.
    """

    def __init__(self, responder: Optional[Callable[[bytes], Reply]] = None) -> None:
        self._cond = threading.Condition()
        self.calls: List[Call] = []
        self.script: Deque[Script] = collections.deque()
        self.responder = responder
        self.gate = threading.Event()
        self.gate.set()
        self.closed = 0

    def send(self, url: str, api_key: str, body: bytes, timeout: Tuple[float, float]) -> Reply:
        with self._cond:
            index = len(self.calls)
            self.calls.append(Call(url, api_key, body, timeout, time.monotonic(), None))
            scripted = self.script.popleft() if self.script else None
            self._cond.notify_all()
        self.gate.wait()
        if isinstance(scripted, BaseException):
            raise scripted
        reply = scripted or (self.responder(body) if self.responder else OK)
        with self._cond:
            self.calls[index] = self.calls[index]._replace(reply=reply)
        return reply

    def close(self) -> None:
        self.closed += 1

    def wait_calls(self, count: int, timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.calls) >= count, timeout)

    def events(self, call: Call) -> List[Dict[str, Any]]:
        parsed: List[Dict[str, Any]] = json.loads(call.body)
        return parsed

    def batch_sizes(self) -> List[int]:
        return [len(self.events(c)) for c in self.calls]

    def delivered_ids(self) -> List[str]:
        """idempotence_ids of the events in batches answered 2xx, in order."""
        return [e["data"]["idempotence_id"] for c in self.calls if c.reply is not None and 200 <= c.reply.status < 300
                for e in self.events(c)]


def ev(name: str, **data: Any) -> Pending:
    """A validated event whose idempotence_id is ``name`` (so log lines and bodies are predictable)."""
    return ("fullstack", "bought", {"fs_user_id": f"user-{name}"}, {"idempotence_id": name, **data})


Build = Callable[..., Tuple[EventManager, FakeTransport]]


def _odp_threads() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("odp-ext-")]


@pytest.fixture
def build(log: Log) -> Iterator[Build]:
    """Builds managers integrated at once (api_host/api_key), closes them and checks their threads end."""
    made: List[Tuple[EventManager, FakeTransport]] = []
    before = set(_odp_threads())

    def _build(transport: Optional[FakeTransport] = None, policy: Optional[RetryPolicy] = None,
               integrated: bool = True, **overrides: Any) -> Tuple[EventManager, FakeTransport]:
        fake = transport or FakeTransport()
        settings: Dict[str, Any] = {"flush_interval": 0.01, "close_timeout": 2.0}
        if integrated:
            settings.update(api_host=HOST, api_key=KEY)
        settings.update(overrides)
        manager = EventManager(Options(**settings), log[0], sdk_version=SDK_VERSION,
                               transport_factory=lambda _options: fake, retry_policy=policy)
        made.append((manager, fake))
        return manager, fake

    yield _build
    for manager, fake in made:
        fake.gate.set()
        manager.close(timeout=2.0)
    deadline = time.monotonic() + WAIT
    for thread in set(_odp_threads()) - before:
        thread.join(max(deadline - time.monotonic(), 0.0))
    assert [t.name for t in set(_odp_threads()) - before if t.is_alive()] == []


def fast_policy(**kwargs: Any) -> RetryPolicy:
    settings: Dict[str, Any] = {"base": 0.01, "cap": 0.02, "window": 30.0, "retry_after_cap": 5.0,
                                "rng": random.Random(1)}
    settings.update(kwargs)
    return RetryPolicy(**settings)


def check_invariant(manager: EventManager) -> Dict[str, Any]:
    stats = manager.stats()
    assert stats["accepted"] == stats["delivered"] + sum(stats["dropped"].values()) + stats["pending"]
    return stats


def no_drops(**dropped: int) -> Dict[str, int]:
    counts = dict.fromkeys(("rejected", "rejected_systemic", "too_large", "queue_full", "retry_expired", "shutdown",
                            "unconfirmed", "not_integrated", "unencodable"), 0)
    counts.update(dropped)
    return counts


def encoded_len(pending: Pending) -> int:
    return len(encode(pending, default_data(SDK_VERSION)))


# ----------------------------------------------------------------- batching


def test_batches_by_count(build: Build, log: Log) -> None:
    manager, transport = build(batch_size=10, flush_interval=60.0)
    for i in range(25):
        assert manager.enqueue(ev(f"e{i:02d}")) is True
    assert manager.flush(WAIT) is True
    assert transport.batch_sizes() == [10, 10, 5]
    assert transport.delivered_ids() == [f"e{i:02d}" for i in range(25)]
    assert {(c.url, c.key) for c in transport.calls} == {(URL, KEY)}
    stats = check_invariant(manager)
    assert (stats["accepted"], stats["delivered"], stats["pending"], stats["requests"]) == (25, 25, 0, 3)
    assert stats["dropped"] == no_drops()
    assert log[1].errors() == []


def test_full_batches_go_without_waiting_for_the_interval(build: Build) -> None:
    manager, transport = build(batch_size=5, flush_interval=60.0)
    for i in range(10):
        manager.enqueue(ev(f"e{i}"))
    assert transport.wait_calls(2)
    assert transport.batch_sizes() == [5, 5]


def test_a_partial_batch_goes_after_flush_interval(build: Build) -> None:
    manager, transport = build(batch_size=100, flush_interval=0.05)
    started = time.monotonic()
    manager.enqueue(ev("only"))
    assert transport.wait_calls(1)
    assert time.monotonic() - started >= 0.05
    assert transport.batch_sizes() == [1]


def test_batches_by_bytes(build: Build) -> None:
    size = encoded_len(ev("e00", pad="x" * 20))
    limit = batch_size_bytes(3, 3 * size)
    manager, transport = build(batch_size=100, max_batch_bytes=limit, flush_interval=60.0)
    for i in range(10):
        manager.enqueue(ev(f"e{i:02d}", pad="x" * 20))
    assert manager.flush(WAIT) is True
    assert transport.batch_sizes() == [3, 3, 3, 1]
    assert max(len(c.body) for c in transport.calls) == limit
    assert transport.delivered_ids() == [f"e{i:02d}" for i in range(10)]


@pytest.mark.parametrize(("spare", "sizes"), [(0, [3, 3, 3, 1]), (-1, [2, 2, 2, 2, 2])])
def test_batches_by_bytes_to_the_byte(build: Build, spare: int, sizes: List[int]) -> None:
    # A limit one byte short of three events' array takes two per batch: the cut is exact, not lenient.
    size = encoded_len(ev("e00", pad="x" * 20))
    limit = batch_size_bytes(3, 3 * size) + spare
    manager, transport = build(batch_size=100, max_batch_bytes=limit, flush_interval=60.0)
    for i in range(10):
        manager.enqueue(ev(f"e{i:02d}", pad="x" * 20))
    assert manager.flush(WAIT) is True
    assert transport.batch_sizes() == sizes
    assert max(len(c.body) for c in transport.calls) <= limit
    assert transport.delivered_ids() == [f"e{i:02d}" for i in range(10)]


@pytest.mark.parametrize(("spare", "delivered"), [(0, ["s1", "fits", "s2"]), (-1, ["s1", "s2"])])
def test_a_single_event_fits_max_batch_bytes_to_the_byte(build: Build, spare: int, delivered: List[str]) -> None:
    one = ev("fits", blob="x" * 200)
    manager, transport = build(max_batch_bytes=batch_size_bytes(1, encoded_len(one)) + spare, flush_interval=60.0)
    for pending in (ev("s1"), one, ev("s2")):
        manager.enqueue(pending)
    assert manager.flush(WAIT) is True
    assert transport.delivered_ids() == delivered
    assert check_invariant(manager)["dropped"] == no_drops(too_large=3 - len(delivered))


def test_single_event_over_max_batch_bytes_is_dropped_too_large(build: Build, log: Log) -> None:
    big = ev("big-1", blob="x" * 400)
    manager, transport = build(max_batch_bytes=300, flush_interval=60.0)
    manager.enqueue(ev("s1"))
    manager.enqueue(big)
    manager.enqueue(ev("s2"))
    assert manager.flush(WAIT) is True
    assert transport.delivered_ids() == ["s1", "s2"]
    assert log[1].errors() == [
        f"ODP event send failed (event big-1 is {encoded_len(big)} bytes, over max_batch_bytes (300); dropped)."]
    stats = check_invariant(manager)
    assert stats["dropped"] == no_drops(too_large=1)
    assert (stats["accepted"], stats["delivered"], stats["pending"]) == (3, 2, 0)


# ----------------------------------------------------------------- rejected batches: split and drop


def test_400_split_finds_the_poison_event(build: Build, log: Log) -> None:
    transport = FakeTransport(lambda body: Reply(400, None, "invalid event") if b"poison-id" in body else OK)
    manager, _ = build(transport, batch_size=8, flush_interval=60.0, api_key=SECRET_KEY)
    names = [f"good-{i}" for i in range(8)]
    names[5] = "poison-id"
    for name in names:
        manager.enqueue(ev(name))
    assert manager.flush(WAIT) is True
    assert sorted(transport.delivered_ids()) == sorted(n for n in names if n != "poison-id")
    assert len(transport.delivered_ids()) == 7
    assert transport.batch_sizes() == [8, 4, 4, 2, 2, 1, 1]
    assert log[1].errors() == [
        "ODP event send failed (ODP rejected 1 event(s) with HTTP 400: invalid event; "
        "dropped idempotence_id poison-id)."]
    assert all(SECRET_KEY not in line for line in log[1].lines())
    stats = check_invariant(manager)
    assert stats["dropped"] == no_drops(rejected=1)
    assert (stats["delivered"], stats["requests"], stats["retries"], stats["pending"]) == (7, 7, 0, 0)


def test_400_split_with_two_poison_events(build: Build, log: Log) -> None:
    transport = FakeTransport(lambda body: Reply(400, None, "") if b"poison" in body else OK)
    manager, _ = build(transport, batch_size=6, flush_interval=60.0)
    names = ["a", "poison-1", "b", "c", "poison-2", "d"]
    for name in names:
        manager.enqueue(ev(name))
    assert manager.flush(WAIT) is True
    assert sorted(transport.delivered_ids()) == ["a", "b", "c", "d"]
    assert sorted(log[1].errors()) == [
        f"ODP event send failed (ODP rejected 1 event(s) with HTTP 400; dropped idempotence_id {name})."
        for name in ("poison-1", "poison-2")]
    assert check_invariant(manager)["dropped"] == no_drops(rejected=2)


def test_413_splits_until_batches_fit(build: Build, log: Log) -> None:
    one = encoded_len(ev("e0"))
    fits = batch_size_bytes(2, 2 * one)
    transport = FakeTransport(lambda body: Reply(413, None, "too big") if len(body) > fits else OK)
    manager, _ = build(transport, batch_size=8, flush_interval=60.0)
    for i in range(8):
        manager.enqueue(ev(f"e{i}"))
    assert manager.flush(WAIT) is True
    assert sorted(transport.delivered_ids()) == [f"e{i}" for i in range(8)]
    assert transport.batch_sizes() == [8, 4, 4, 2, 2, 2, 2]
    assert log[1].errors() == []
    stats = check_invariant(manager)
    assert (stats["delivered"], stats["dropped"]) == (8, no_drops())


def test_413_for_a_single_event_drops_it_as_too_large(build: Build, log: Log) -> None:
    transport = FakeTransport(lambda body: Reply(413, None, "") if b"huge" in body else OK)
    manager, _ = build(transport, batch_size=4, flush_interval=60.0)
    for name in ("a", "huge", "b", "c"):
        manager.enqueue(ev(name))
    assert manager.flush(WAIT) is True
    assert sorted(transport.delivered_ids()) == ["a", "b", "c"]
    assert log[1].errors() == [
        "ODP event send failed (ODP rejected 1 event(s) with HTTP 413; dropped idempotence_id huge)."]
    assert check_invariant(manager)["dropped"] == no_drops(too_large=1)


def test_401_drops_the_batch_without_retry(build: Build, log: Log) -> None:
    transport = FakeTransport(lambda body: Reply(401, None, "unauthorized"))
    manager, _ = build(transport, batch_size=5, flush_interval=60.0, api_key=SECRET_KEY)
    for i in range(5):
        manager.enqueue(ev(f"e{i}"))
    assert manager.flush(WAIT) is True
    assert len(transport.calls) == 1
    assert log[1].errors() == [
        "ODP event send failed (ODP rejected 5 event(s) with HTTP 401: unauthorized; "
        "dropped idempotence_id e0, e1, e2, ...)."]
    assert all(SECRET_KEY not in line for line in log[1].lines())
    stats = check_invariant(manager)
    assert stats["dropped"] == no_drops(rejected=5)
    assert (stats["delivered"], stats["retries"], stats["pending"]) == (0, 0, 0)


# ----------------------------------------------------------------- retries


def test_503_then_202_is_retried_with_the_same_bytes(build: Build, log: Log) -> None:
    transport = FakeTransport()
    transport.script.append(Reply(503, None, "unavailable"))
    manager, _ = build(transport, policy=fast_policy())
    manager.enqueue(ev("once"))
    assert manager.flush(WAIT) is True
    assert [c.reply.status for c in transport.calls if c.reply] == [503, 202]
    assert transport.calls[0].body == transport.calls[1].body
    assert transport.delivered_ids() == ["once"]
    assert log[1].errors() == []
    warnings = log[1].lines(logging.WARNING)
    assert len(warnings) == 1
    assert warnings[0].startswith(
        "ODP event delivery failing (HTTP 503); holding events and retrying (next attempt in ")
    assert [line for line in log[1].lines(logging.INFO) if line.startswith("ODP event delivery recovered after ")]
    stats = check_invariant(manager)
    assert (stats["delivered"], stats["requests"], stats["retries"], stats["dropped"]) == (1, 2, 1, no_drops())


def test_retry_keeps_the_generated_idempotence_id(build: Build) -> None:
    transport = FakeTransport()
    transport.script.extend([Reply(500, None, ""), Reply(0, None, "network error: reset")])
    manager, _ = build(transport, policy=fast_policy())
    manager.enqueue(("fullstack", "a", {"fs_user_id": "u"}, None))
    assert manager.flush(WAIT) is True
    ids = [transport.events(c)[0]["data"]["idempotence_id"] for c in transport.calls]
    assert len(ids) == 3
    assert len(set(ids)) == 1
    assert len({c.body for c in transport.calls}) == 1


@pytest.mark.parametrize("status", [408, 429, 500, 502, 504, 0])
def test_retryable_statuses(build: Build, status: int) -> None:
    transport = FakeTransport()
    transport.script.append(Reply(status, None, ""))
    manager, _ = build(transport, policy=fast_policy())
    manager.enqueue(ev("x"))
    assert manager.flush(WAIT) is True
    assert [c.reply.status for c in transport.calls if c.reply] == [status, 202]
    assert transport.delivered_ids() == ["x"]


def test_429_retry_after_is_honoured(build: Build) -> None:
    transport = FakeTransport()
    transport.script.append(Reply(429, 0.3, "slow down"))
    manager, _ = build(transport, policy=fast_policy(retry_after_cap=5.0))
    manager.enqueue(ev("x"))
    assert manager.flush(WAIT) is True
    assert len(transport.calls) == 2
    gap = transport.calls[1].at - transport.calls[0].at
    assert gap >= 0.3  # not before the Retry-After


def test_429_retry_after_is_capped(build: Build) -> None:
    transport = FakeTransport()
    transport.script.append(Reply(429, 3600.0, ""))
    manager, _ = build(transport, policy=fast_policy(retry_after_cap=0.05))
    manager.enqueue(ev("x"))
    assert manager.flush(WAIT) is True  # within WAIT, not after the 3600 s asked: capped
    gap = transport.calls[1].at - transport.calls[0].at
    assert gap >= 0.05


def test_transport_exception_is_a_failed_attempt(build: Build, log: Log) -> None:
    transport = FakeTransport()
    transport.script.append(RuntimeError("boom"))
    manager, _ = build(transport, policy=fast_policy())
    manager.enqueue(ev("x"))
    assert manager.flush(WAIT) is True
    assert len(transport.calls) == 2
    assert transport.calls[0].body == transport.calls[1].body
    assert transport.delivered_ids() == ["x"]
    warnings = log[1].lines(logging.WARNING)
    assert len(warnings) == 1
    assert warnings[0].startswith("ODP event delivery failing (RuntimeError: boom); holding events and retrying")
    assert log[1].errors() == []
    stats = check_invariant(manager)
    assert (stats["delivered"], stats["retries"]) == (1, 1)
    # The worker is still alive and serving.
    manager.enqueue(ev("y"))
    assert manager.flush(WAIT) is True
    assert transport.delivered_ids() == ["x", "y"]


def test_retry_window_zero_gives_up_after_the_first_failure(build: Build, log: Log) -> None:
    transport = FakeTransport(lambda body: Reply(503, None, ""))
    manager, _ = build(transport, policy=fast_policy(window=0.0))
    manager.enqueue(ev("x"))
    assert manager.flush(WAIT) is True
    assert len(transport.calls) == 1
    assert log[1].errors() == ["ODP event send failed (gave up on 1 event(s) after 1 attempt(s) over 0 s; "
                               "last: HTTP 503)."]
    assert check_invariant(manager)["dropped"] == no_drops(retry_expired=1)


def test_retry_window_expiry(build: Build, log: Log) -> None:
    transport = FakeTransport(lambda body: Reply(0, None, "network error: refused"))
    manager, _ = build(transport, policy=fast_policy(window=0.3), batch_size=2, flush_interval=60.0)
    manager.enqueue(ev("a"))
    manager.enqueue(ev("b"))
    assert manager.flush(WAIT) is True
    assert len(transport.calls) >= 2
    assert len({c.body for c in transport.calls}) == 1
    errors = log[1].errors()
    assert len(errors) == 1
    assert errors[0].startswith("ODP event send failed (gave up on 2 event(s)")
    stats = check_invariant(manager)
    assert stats["dropped"] == no_drops(retry_expired=2)
    assert (stats["delivered"], stats["pending"]) == (0, 0)


def test_one_probe_at_a_time_while_failing(build: Build) -> None:
    """While ODP fails, new batches wait behind the retry: requests do not multiply."""
    transport = FakeTransport()
    transport.script.extend([Reply(503, None, "")] * 3)
    manager, _ = build(transport, policy=fast_policy(), batch_size=1, flush_interval=60.0)
    for i in range(4):
        manager.enqueue(ev(f"e{i}"))
    assert manager.flush(WAIT) is True
    assert sorted(transport.delivered_ids()) == ["e0", "e1", "e2", "e3"]
    statuses = [c.reply.status for c in transport.calls if c.reply]
    assert statuses.count(503) == 3
    assert statuses.count(202) == 4


# ----------------------------------------------------------------- queue overflow


@pytest.mark.parametrize(("policy", "word", "kept"), [("drop_newest", "new", range(0, 5)),
                                                      ("drop_oldest", "oldest", range(3, 8))])
def test_overflow(build: Build, log: Log, policy: str, word: str, kept: range) -> None:
    manager, transport = build(queue_capacity=5, batch_size=100, flush_interval=60.0, overflow=policy)
    results = [manager.enqueue(ev(f"e{i}")) for i in range(8)]
    assert results == [True] * 8
    stats = check_invariant(manager)
    assert stats["dropped"] == no_drops(queue_full=3)
    assert (stats["accepted"], stats["queued"]) == (8, 5)
    assert log[1].lines(logging.WARNING) == [
        f"ODP event queue is full (5 events); dropped 1 {word} event(s) since the last warning."]
    for i in range(8, 40):
        manager.enqueue(ev(f"e{i}"))
    assert len(log[1].lines(logging.WARNING)) == 1  # rate limited
    assert check_invariant(manager)["dropped"]["queue_full"] == 35
    assert manager.flush(WAIT) is True
    expected = [f"e{i}" for i in kept] if policy == "drop_newest" else [f"e{i}" for i in range(35, 40)]
    assert transport.delivered_ids() == expected
    stats = check_invariant(manager)
    assert (stats["accepted"], stats["delivered"], stats["pending"]) == (40, 5, 0)
    assert log[1].errors() == []


def test_drop_oldest_racing_the_worker_loses_nothing(build: Build) -> None:
    manager, transport = build(queue_capacity=3, batch_size=100, flush_interval=60.0, overflow="drop_oldest")
    fired = threading.Event()

    class RacingDeque(collections.deque):  # type: ignore[type-arg]
        """Lets a caller's enqueue() land right as the worker takes its first event."""

        def popleft(self) -> Any:
            if not fired.is_set() and threading.current_thread().name.startswith("odp-ext-worker"):
                fired.set()
                manager.enqueue(ev("e3"))  # the queue is full: drop_oldest pops e0 now
            return super().popleft()

    manager._queue = manager.door.queue = RacingDeque()  # one queue, as the manager's reset makes it
    for i in range(3):
        manager.enqueue(ev(f"e{i}"))
    assert manager.flush(WAIT) is True
    assert fired.is_set()
    # e0 was dropped (queue_full) to make room for e3: the others must all arrive, e0 must not.
    assert sorted(transport.delivered_ids()) == ["e1", "e2", "e3"]


def _backlog_batches(build: Build, **options: Any) -> Tuple[List[int], List[str]]:
    """Two batches hang while 300 more events queue up behind them; then every event is delivered.
    Returns the batch sizes in order and the ids delivered."""
    manager, transport = build(batch_size=10, max_in_flight=2, queue_capacity=10_000, **options)
    transport.gate.clear()  # the first requests hang: the backlog builds up behind them
    for i in range(20):
        manager.enqueue(ev(f"e-{i}"))
    assert transport.wait_calls(2)
    for i in range(20, 320):
        manager.enqueue(ev(f"e-{i}"))
    transport.gate.set()
    assert manager.flush(WAIT) is True
    return transport.batch_sizes(), transport.delivered_ids()


def test_a_backlog_goes_in_batches_growing_toward_max_batch_size(build: Build) -> None:
    # While the senders keep up, batches are batch_size; once more waits than the requests in flight
    # can take at batch_size, the backlog is spread over them, up to max_batch_size (never past it).
    sizes, delivered = _backlog_batches(build, max_batch_size=40)
    assert sizes[:2] == [10, 10]
    assert max(sizes) == 40  # 300 waiting for 2 requests in flight: as large as allowed
    assert sorted(delivered) == sorted(f"e-{i}" for i in range(320))


def test_max_batch_size_at_batch_size_keeps_every_batch_at_batch_size(build: Build) -> None:
    sizes, delivered = _backlog_batches(build, max_batch_size=10)
    assert set(sizes) == {10}
    assert sorted(delivered) == sorted(f"e-{i}" for i in range(320))


def test_concurrent_producers_lose_nothing(build: Build) -> None:
    manager, transport = build(batch_size=50, max_batch_size=50, flush_interval=0.01, queue_capacity=10_000)
    start = threading.Barrier(4)

    def produce(worker: int) -> None:
        start.wait(WAIT)
        for i in range(300):
            manager.enqueue(ev(f"t{worker}-{i}"))

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert manager.flush(WAIT) is True
    delivered = transport.delivered_ids()
    assert len(delivered) == 1200
    assert set(delivered) == {f"t{w}-{i}" for w in range(4) for i in range(300)}
    assert max(transport.batch_sizes()) <= 50
    for w in range(4):  # each producer's events arrive in the order it sent them
        mine = [d for d in delivered if d.startswith(f"t{w}-")]
        assert mine == [f"t{w}-{i}" for i in range(300)]
    stats = check_invariant(manager)
    assert (stats["accepted"], stats["delivered"], stats["pending"]) == (1200, 1200, 0)


def test_two_producers_on_an_empty_queue_still_wake_the_worker(build: Build) -> None:
    manager, transport = build(batch_size=100, flush_interval=0.01)
    manager.enqueue(ev("first"))
    assert manager.flush(WAIT) is True

    class WatchedEvent(threading.Event):
        """The worker's wake-up event; ``idle`` is set while the worker sleeps its long idle wait."""

        def __init__(self) -> None:
            super().__init__()
            self.idle = threading.Event()

        def wait(self, timeout: Optional[float] = None) -> bool:
            if threading.current_thread().name.startswith("odp-ext-worker") and (timeout or 0) >= 1.0:
                self.idle.set()
            return super().wait(timeout)

        def set(self) -> None:
            self.idle.clear()
            super().set()

    watched, previous = WatchedEvent(), manager._wake
    manager._wake = watched
    previous.set()
    assert watched.idle.wait(WAIT)  # the worker sleeps with nothing to do

    other = (ev("other"), manager._odp.target)

    class InterleavedDeque(collections.deque):  # type: ignore[type-arg]
        """Another producer's append lands between this producer's append and its len()."""

        def append(self, item: Any) -> None:
            super().append(item)
            if item is not other:
                super().append(other)

    manager._queue = manager.door.queue = InterleavedDeque()  # one queue, as the manager's reset makes it
    manager.enqueue(ev("second"))
    assert transport.wait_calls(2, timeout=0.5)  # flush_interval is 10 ms, the idle wait 5 s
    assert manager.flush(WAIT) is True
    assert transport.delivered_ids() == ["first", "second", "other"]


# ----------------------------------------------------------------- flush, close


def test_flush_true_when_done_false_while_the_transport_blocks(build: Build) -> None:
    manager, transport = build()
    transport.gate.clear()
    manager.enqueue(ev("x"))
    assert transport.wait_calls(1)
    started = time.monotonic()
    assert manager.flush(0.1) is False  # returned with the send still blocked
    assert not transport.gate.is_set()
    assert time.monotonic() - started >= 0.1
    assert check_invariant(manager)["pending"] == 1
    transport.gate.set()
    assert manager.flush(WAIT) is True
    stats = check_invariant(manager)
    assert (stats["delivered"], stats["pending"]) == (1, 0)


def test_flush_without_events(build: Build) -> None:
    manager, transport = build()
    assert manager.flush(0.5) is True
    assert transport.calls == []


def test_flush_waits_only_for_events_sent_before_it(build: Build) -> None:
    manager, transport = build(batch_size=1)
    transport.gate.clear()
    manager.enqueue(ev("first"))
    assert transport.wait_calls(1)
    done = threading.Event()
    results: List[bool] = []

    def flusher() -> None:
        results.append(manager.flush(WAIT))
        done.set()

    thread = threading.Thread(target=flusher)
    thread.start()
    try:
        assert not done.wait(0.1)
        transport.gate.set()
        assert done.wait(WAIT)
    finally:
        transport.gate.set()
        thread.join(WAIT)
    assert results == [True]
    assert transport.delivered_ids()[0] == "first"


def test_close_delivers_what_is_queued(build: Build, log: Log) -> None:
    manager, transport = build(flush_interval=60.0)
    for i in range(3):
        manager.enqueue(ev(f"e{i}"))
    manager.close(timeout=WAIT)
    assert transport.delivered_ids() == ["e0", "e1", "e2"]
    assert transport.closed == 1
    assert manager.closed is True
    assert "ODP event manager closed: 3 delivered, 0 dropped." in log[1].lines(logging.INFO)
    stats = check_invariant(manager)
    assert (stats["delivered"], stats["pending"]) == (3, 0)


def test_close_twice_is_harmless_and_send_after_close_is_refused(build: Build, log: Log) -> None:
    manager, transport = build()
    manager.enqueue(ev("x"))
    manager.close(timeout=WAIT)
    manager.close(timeout=WAIT)
    assert transport.closed == 1
    closing_lines = [line for line in log[1].lines() if line.startswith("ODP event manager closed")]
    assert closing_lines == ["ODP event manager closed: 1 delivered, 0 dropped."]
    assert manager.enqueue(ev("late")) is False
    assert log[1].errors() == ["ODP event not sent: the ODP event manager is closed."]
    assert manager.stats()["accepted"] == 1
    assert manager.flush(0.5) is True


def test_send_racing_close_is_counted(build: Build) -> None:
    manager, _ = build()
    manager.enqueue(ev("before"))
    assert manager.flush(WAIT) is True
    armed = threading.Event()
    armed.set()

    class ClosingDeque(collections.deque):  # type: ignore[type-arg]
        """close() (on another thread, in real life) completes right after enqueue()'s closed check."""

        def __len__(self) -> int:
            if armed.is_set() and threading.current_thread() is threading.main_thread():
                armed.clear()
                manager.close(timeout=WAIT)
            return super().__len__()

    manager._queue = manager.door.queue = ClosingDeque(manager._queue)  # one queue, as the reset makes it
    accepted = manager.enqueue(ev("racing"))
    assert manager.closed is True
    stats = check_invariant(manager)
    # Either refused, or accepted and accounted for (dropped as shutdown): never silently pending.
    assert (accepted, stats["pending"]) in ((False, 0), (True, 0))


def test_close_without_any_event(build: Build, log: Log) -> None:
    manager, transport = build()
    manager.close(timeout=WAIT)
    assert transport.calls == []
    assert [line for line in log[1].lines() if line.startswith("ODP event manager closed")] == [
        "ODP event manager closed: 0 delivered, 0 dropped."]


def test_close_returns_within_its_timeout_while_the_transport_blocks(build: Build, log: Log) -> None:
    manager, transport = build(batch_size=3, flush_interval=60.0)
    transport.gate.clear()
    for i in range(3):
        manager.enqueue(ev(f"e{i}"))
    assert transport.wait_calls(1)
    manager.close(timeout=0.3)
    assert not transport.gate.is_set()  # close returned while the request was still blocked
    stats = check_invariant(manager)
    # The request was in flight at the deadline: ODP may have it, so it is "unconfirmed".
    assert stats["dropped"] == no_drops(unconfirmed=3)
    assert (stats["delivered"], stats["pending"]) == (0, 0)
    assert log[1].lines(logging.WARNING) == ["ODP event manager closed: 0 delivered, 3 dropped (3 unconfirmed)."]
    # the fixture releases the gate, so the blocked sender thread ends


def test_close_cuts_a_long_backoff_short(build: Build) -> None:
    transport = FakeTransport()
    transport.script.append(Reply(503, None, ""))
    manager, _ = build(transport, policy=fast_policy(base=30.0, cap=30.0))
    manager.enqueue(ev("x"))
    assert transport.wait_calls(1)
    started = time.monotonic()
    manager.close(timeout=WAIT)
    assert time.monotonic() - started < WAIT
    assert transport.delivered_ids() == ["x"]
    assert check_invariant(manager)["dropped"] == no_drops()


def test_stats_invariant_with_mixed_outcomes(build: Build) -> None:
    transport = FakeTransport(lambda body: Reply(400, None, "") if b"bad" in body else OK)
    transport.script.append(Reply(503, None, ""))
    manager, _ = build(transport, policy=fast_policy(), batch_size=4, max_batch_bytes=600, queue_capacity=50,
                       flush_interval=60.0)
    for i in range(10):
        manager.enqueue(ev(f"ok{i}"))
    manager.enqueue(ev("bad1"))
    manager.enqueue(ev("huge", blob="x" * 700))
    check_invariant(manager)
    assert manager.flush(WAIT) is True
    stats = check_invariant(manager)
    assert stats["pending"] == 0
    assert stats["accepted"] == 12
    assert stats["delivered"] == 10
    assert stats["dropped"] == no_drops(rejected=1, too_large=1)
    assert stats["accepted"] == stats["delivered"] + sum(stats["dropped"].values())


def test_count_invalid(build: Build) -> None:
    manager, _ = build()
    manager.count_invalid()
    manager.count_invalid()
    stats = manager.stats()
    assert stats["refused"]["invalid_input"] == 2
    assert stats["accepted"] == 0


def test_request_timeout_from_options(build: Build) -> None:
    manager, transport = build(connect_timeout=1.5, request_timeout=4.0)
    manager.enqueue(ev("x"))
    assert manager.flush(WAIT) is True
    assert transport.calls[0].timeout == (1.5, 4.0)


def test_default_data_carries_the_sdk_version(build: Build) -> None:
    manager, transport = build()
    manager.enqueue(("fullstack", "a", {"fs_user_id": "u"}, None))
    assert manager.flush(WAIT) is True
    data = transport.events(transport.calls[0])[0]["data"]
    assert data["data_source_version"] == SDK_VERSION
    assert data["data_source"] == "python-sdk"
    assert data["data_source_type"] == "sdk"


# ----------------------------------------------------------------- ODP settings: rotation, undetermined, refused


def test_key_rotation_keeps_each_events_key(build: Build, log: Log) -> None:
    manager, transport = build(api_key="old-key-AAAA1111", batch_size=100, flush_interval=60.0)
    manager.enqueue(ev("o1"))
    manager.enqueue(ev("o2"))
    manager.update_config(HOST, "new-key-BBBB2222", True)
    manager.enqueue(ev("n1"))
    manager.enqueue(ev("n2"))
    manager.enqueue(ev("n3"))
    assert manager.flush(WAIT) is True
    assert [(c.key, [e["data"]["idempotence_id"] for e in transport.events(c)]) for c in transport.calls] == [
        ("old-key-AAAA1111", ["o1", "o2"]), ("new-key-BBBB2222", ["n1", "n2", "n3"])]
    assert log[1].lines(logging.INFO)[:2] == [
        f"ODP events go to {URL} (key ****1111).", f"ODP events go to {URL} (key ****2222)."]
    assert all("old-key" not in line and "new-key" not in line for line in log[1].lines())


def test_host_rotation(build: Build) -> None:
    manager, transport = build(batch_size=100, flush_interval=60.0)
    manager.enqueue(ev("a"))
    manager.update_config("https://odp.example/", "k2", True)
    manager.enqueue(ev("b"))
    assert manager.flush(WAIT) is True
    assert [(c.url, c.key) for c in transport.calls] == [(URL, KEY), ("https://odp.example/v3/events", "k2")]


def test_same_config_again_logs_nothing_new(build: Build, log: Log) -> None:
    manager, _ = build()
    manager.update_config(HOST, KEY, True)
    manager.update_config(HOST, KEY, True)
    assert log[1].lines() == [f"ODP events go to {URL} (key ****)."]


def test_undetermined_holds_events_until_the_datafile(build: Build, log: Log) -> None:
    manager, transport = build(integrated=False)
    assert manager.state == "undetermined"
    for i in range(3):
        assert manager.enqueue(ev(f"e{i}")) is True
    manager.update_config(HOST, KEY, False)  # still no datafile: nothing changes
    assert manager.state == "undetermined"
    assert manager.flush(0.2) is False
    assert transport.calls == []
    assert check_invariant(manager)["pending"] == 3
    manager.update_config(HOST, KEY, True)
    assert manager.state == "integrated"
    assert manager.flush(WAIT) is True
    assert [c.key for c in transport.calls] == [KEY]
    assert transport.delivered_ids() == ["e0", "e1", "e2"]
    assert log[1].errors() == []


def test_held_events_take_the_first_settings_not_a_later_rotation(build: Build) -> None:
    manager, transport = build(integrated=False, flush_interval=60.0)
    manager.enqueue(ev("held"))
    manager.update_config(HOST, "first", True)
    manager.update_config(HOST, "second", True)
    manager.enqueue(ev("after"))
    assert manager.flush(WAIT) is True
    assert [(c.key, [e["data"]["idempotence_id"] for e in transport.events(c)]) for c in transport.calls] == [
        ("first", ["held"]), ("second", ["after"])]


def test_not_integrated_discards_held_events(build: Build, log: Log) -> None:
    manager, transport = build(integrated=False)
    for i in range(3):
        manager.enqueue(ev(f"e{i}"))
    manager.update_config(None, None, True)
    assert manager.state == "not_integrated"
    assert manager.flush(WAIT) is True
    assert transport.calls == []
    assert log[1].errors() == [
        "ODP is not integrated. Discarded event(s) sent before the datafile was loaded (3 so far)."]
    stats = check_invariant(manager)
    assert stats["dropped"] == no_drops(not_integrated=3)
    assert stats["pending"] == 0
    # Later sends are refused at once, one line each.
    assert manager.enqueue(ev("later")) is False
    assert log[1].errors()[-1] == "ODP is not integrated."


def test_undetermined_worker_does_not_spin(build: Build) -> None:
    manager, _ = build(integrated=False, flush_interval=0.01)
    steps = [0]
    spinning = threading.Event()
    step = manager._step

    def counting_step() -> Optional[float]:
        steps[0] += 1
        if steps[0] >= 30:
            spinning.set()
        return step()

    manager._step = counting_step  # type: ignore[method-assign]
    manager.enqueue(ev("held"))
    # Without a datafile there is nothing to do: a few passes at most (a 1 ms spin makes hundreds).
    assert not spinning.wait(0.3), f"{steps[0]} worker passes"


def test_refused_host(build: Build, log: Log) -> None:
    refusal = ('ODP host "http://example.com" uses plain http; refusing to send the API key unencrypted '
               "(use https, or pass allow_insecure_http=True to install()).")
    manager, transport = build(api_host="http://example.com", api_key=SECRET_KEY)
    assert manager.state == "refused"
    assert log[1].errors() == [refusal]
    assert manager.enqueue(ev("x")) is False
    assert log[1].errors() == [refusal, refusal]
    manager.update_config("http://example.com", SECRET_KEY, True)  # same refusal: not logged again
    assert log[1].errors() == [refusal, refusal]
    assert transport.calls == []
    assert manager.stats()["accepted"] == 0
    assert all(SECRET_KEY not in line for line in log[1].lines())


def test_refused_host_allowed_on_request(build: Build) -> None:
    manager, transport = build(api_host="http://example.com", api_key="k", allow_insecure_http=True)
    assert manager.state == "integrated"
    manager.enqueue(ev("x"))
    assert manager.flush(WAIT) is True
    assert transport.calls[0].url == "http://example.com/v3/events"


def test_from_refused_to_integrated(build: Build) -> None:
    manager, transport = build(api_host="http://example.com", api_key="k")
    manager.update_config(HOST, "k", True)
    assert manager.state == "integrated"
    manager.enqueue(ev("x"))
    assert manager.flush(WAIT) is True
    assert transport.delivered_ids() == ["x"]


def test_close_returns_once_the_worker_loop_ended_even_if_its_thread_still_counts_as_alive(build: Build) -> None:
    # gevent at exit (gunicorn -k gevent --preload, about 1 in 25 under load): the worker's loop had
    # returned, its thread still counted as alive, join() and is_alive() alike, for the whole close
    # budget. The close waits for the loop (Lifetime.ended), not for the thread's bookkeeping.
    manager, transport = build(close_timeout=30.0)
    manager.enqueue(ev("one"))
    assert manager.flush(WAIT) is True
    worker = manager._life.worker
    assert worker is not None

    def missed_join(timeout: Optional[float] = None) -> None:
        time.sleep(timeout if timeout is not None else 30.0)  # as gevent's: the end is not noticed

    worker.is_alive = lambda: True  # type: ignore[method-assign]
    worker.join = missed_join  # type: ignore[method-assign]
    started = time.monotonic()
    manager.close()
    assert time.monotonic() - started < 15.0  # 30.5 s (the budget and the margin) without Lifetime.ended
    assert manager.closed
    assert len(transport.delivered_ids()) == 1
